"""Check data files for any stage before training: every bad record as `file:line: what is wrong`, then a summary
(records per format, turns, token lengths with the tokenizer and chat template, what --model_max_length would cut,
duplicates). Exit status 0 when every file reads cleanly, 1 when anything is wrong, 2 for a usage error.

    python tools/validate_data.py data/finetune
    python tools/validate_data.py data --template_name chatml --model_max_length 512
    python tools/validate_data.py my_sft.jsonl --stage sft --tokenizer_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --template_name qwen

Formats are detected per file: sharegpt, OpenAI messages and alpaca (SFT), the two preference layouts (RM, DPO,
ORPO), pretraining text (.txt lines or {"text"}) and GRPO {"question", "answer"}. Records are read by the stages'
own reader, so this tool and training cannot disagree about a file.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from medgpt.data.formats import STAGES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="Data files or folders (.json, .jsonl, .txt; folders are searched recursively)")
    p.add_argument("--stage", choices=STAGES, default=None,
                   help="Read every file as this stage's data (default: each file as the stage its records look like)")
    g = p.add_argument_group("token statistics (as training tokenizes)")
    g.add_argument("--tokenizer_name_or_path", default=None, help="Tokenizer (default: the embedded SmolLM2 model's)")
    g.add_argument("--template_name", default="chatml", help="Chat template of the conversations (default: chatml)")
    g.add_argument("--model_max_length", type=int, default=512, help="SFT: maximum tokens per sample (default: 512)")
    g.add_argument("--train_on_inputs", action="store_true", help="SFT: count prompt tokens as supervised too")
    g.add_argument("--max_length", type=int, default=None,
                   help="Preference: maximum prompt + reply tokens (default: --model_max_length)")
    g.add_argument("--max_prompt_length", type=int, default=None,
                   help="Preference: maximum prompt tokens (default: half of --max_length)")
    g.add_argument("--block_size", type=int, default=1024, help="Pretraining: tokens per block (default: 1024)")
    g.add_argument("--no_tokens", action="store_true", help="Skip the token statistics (no tokenizer is loaded)")
    p.add_argument("--strict", action="store_true", help="Duplicates count as problems (exit status 1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from medgpt.data.validate import LengthOptions, duplicates, scan, summary, token_report

    result = scan(args.paths, args.stage)
    dups = duplicates(result)
    for problem in result.problems:
        print(problem, flush=True)
    for dup in dups:
        print(f"{dup}{'' if args.strict else ' (warning)'}", flush=True)
    print("--- summary ---")
    for line in summary(result, dups):
        print(line)
    if not args.no_tokens and result.n_rows:
        from medgpt.args import ModelArguments
        from medgpt.modeling import load_tokenizer
        from medgpt.templates import get_conv_template

        template = get_conv_template(args.template_name)
        tokenizer = load_tokenizer(ModelArguments(tokenizer_name_or_path=args.tokenizer_name_or_path))
        print(f"tokens ({tokenizer.name_or_path}, template {args.template_name}):")
        opts = LengthOptions(model_max_length=args.model_max_length, train_on_inputs=args.train_on_inputs,
                             max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                             block_size=args.block_size)
        for line in token_report(result, tokenizer, template, opts):
            print(f"  {line}", flush=True)
    bad = bool(result.problems) or (args.strict and bool(dups))
    print("FAILED: fix the lines above" if bad else "OK")
    return 1 if bad else 0


if __name__ == "__main__":
    from medgpt.cli import run_main

    sys.exit(run_main(main))
