"""Convert conversations between alpaca, OpenAI messages and sharegpt, and preference pairs between their two layouts.

    python tools/convert_dataset.py data/finetune/medical_sft_alpaca.json --to sharegpt --output sft_sharegpt.jsonl
    python tools/convert_dataset.py data/finetune --to messages --output sft_messages.jsonl
    python tools/convert_dataset.py data/reward --to preference_conversations --output pairs.jsonl

Formats (--to):
  alpaca                    {"instruction", "input", "output", "system"?, "history"?: [[q, a], ...]}
  sharegpt                  {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}
  messages                  {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}
  preference                {"system", "history", "question", "response_chosen", "response_rejected"}
  preference_conversations  {"conversations": [... ending with the human turn], "chosen", "rejected"}

Input files (or folders of .json/.jsonl files) may mix the formats of their stage; each record is read and checked by
the training stages' own reader (a bad record stops with its file:line unless --skip_invalid_records). Preference
pairs written as conversations keep the chosen reply. The output is JSON lines, or one JSON array for a .json name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from medgpt.data.formats import PREFERENCE_FORMATS, SFT_FORMATS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="Input files or folders (.json, .jsonl)")
    p.add_argument("--to", required=True, choices=SFT_FORMATS + PREFERENCE_FORMATS, help="Output format")
    p.add_argument("--output", "-o", required=True, help="Output file: .jsonl (one record a line) or .json (an array)")
    p.add_argument("--skip_invalid_records", action="store_true", help="Skip bad records (counted) instead of stopping")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from medgpt.data.formats import convert_files

    records = convert_files(args.paths, args.to, args.skip_invalid_records)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        if args.output.endswith(".json"):
            json.dump(records, f, ensure_ascii=False, indent=2)
            f.write("\n")
        else:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"Wrote {len(records)} {args.to} records to {args.output}")
    return 0


if __name__ == "__main__":
    from medgpt.cli import run_main
    from medgpt.logs import setup_logging

    setup_logging()  # one format on stderr (medgpt/logs.py)
    sys.exit(run_main(main))
