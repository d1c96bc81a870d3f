"""Generate multi-turn patient-doctor and patient-nurse dialogues with one model playing both sides through any
OpenAI-compatible endpoint (default: openai_api.py on http://127.0.0.1:8000/v1), as sharegpt JSONL that
supervised_finetuning.py --train_file_dir reads as is. A rerun with the same flags continues where it stopped.

    python openai_api.py --port 8000 &
    python role_play_data/roleplay_data_generate.py --num_dialogues 24 --num_turns 4 \\
        --output_file outputs-roleplay/roleplay_dialogues.jsonl

The logic lives in medgpt/roleplay.py; see role_play_data/README.md.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for `medgpt`

if __name__ == "__main__":
    from medgpt.cli import run_main
    from medgpt.roleplay import main

    sys.exit(run_main(main, seed_dir=HERE))
