"""Padding benchmark for the reward model and ORPO: the real trainers' training batches (reward_modeling.py and
orpo_training.py, their build_trainer) with randomly drawn batches (`--train_sampling_strategy random`) against
length-grouped ones (the default, `group_by_length`), on the same pairs, tokenizer, flags and seed.

One epoch of batches is drawn from each trainer's train dataloader, without training (no forward pass), and counted
as the model runs it: the reward model scores a (2 x batch, longest sequence) tensor of chosen then rejected
sequences; ORPO pads chosen and rejected to the longer of the two and runs them concatenated, the same shape.
Pad fraction = pad slots / token slots. Every pair must appear exactly once per epoch.

    python benchmarks/bench_pads.py                    # 200 pairs of MedicalGPT's dpo_zh_500.jsonl, batch 4
    python benchmarks/bench_pads.py --num_samples 40   # a quick check
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "reward", "dpo_zh_500.jsonl")
STAGES = {"rm": "reward_modeling", "orpo": "orpo_training"}
STRATEGIES = ("random", "group_by_length")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="preference .jsonl (one pair a line)")
    p.add_argument("--num_samples", type=int, default=200, help="pairs: the file's first N records")
    p.add_argument("--batch_size", type=int, default=4, help="pairs per batch")
    p.add_argument("--max_length", type=int, default=768, help="prompt + reply tokens (prompt: half, the default)")
    p.add_argument("--model", default=None, help="model folder or name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "bench_pads.json"))
    return p.parse_args(argv)


def batch_tokens(batch) -> tuple[int, int, list[tuple]]:
    """(token slots, real tokens, chosen sequences without padding) of one training batch as the model runs it."""
    if "input_ids" in batch:  # reward model: chosen rows, then rejected rows, one padded tensor
        ids, mask = batch["input_ids"], batch["attention_mask"]
        chosen = [tuple(r[m.bool()].tolist()) for r, m in zip(ids[: len(ids) // 2], mask[: len(ids) // 2])]
        return mask.numel(), int(mask.sum()), chosen
    # ORPO: chosen and rejected padded apart, then to the longer of the two and concatenated
    c, r = batch["chosen_attention_mask"], batch["rejected_attention_mask"]
    chosen = [tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["chosen_input_ids"], c)]
    return (len(c) + len(r)) * max(c.shape[1], r.shape[1]), int(c.sum() + r.sum()), chosen


def epoch_pads(trainer, pairs, seed: int = 42) -> dict:
    """Token slots, real tokens and pad fraction of one epoch of `trainer`'s training batches, and whether every
    pair (dataset `pairs`: prompt_ids/chosen_ids) came exactly once."""
    from transformers import set_seed

    set_seed(seed)
    slots = real = batches = 0
    seen = Counter()
    for batch in trainer.get_train_dataloader():
        s, t, chosen = batch_tokens(batch)
        slots, real, batches = slots + s, real + t, batches + 1
        seen.update(chosen)
    expected = Counter(tuple(p + c) for p, c in zip(pairs["prompt_ids"], pairs["chosen_ids"]))
    return {"token_slots": slots, "real_tokens": real, "pad_tokens": slots - real,
            "pad_fraction": round((slots - real) / slots, 4), "batches": batches, "pairs": sum(seen.values()),
            "each_pair_once": seen == expected}


def write_pairs(data: str, n: int, directory: str) -> str:
    with open(data, encoding="utf-8") as f:
        lines = [line for line, _ in zip(f, range(n))]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "pairs.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(lines)
    return directory


def flags(args, train_dir, output_dir, strategy):
    out = ["--train_file_dir", train_dir, "--output_dir", output_dir, "--do_train", "--per_device_train_batch_size",
           str(args.batch_size), "--max_length", str(args.max_length), "--template_name", "chatml", "--seed",
           str(args.seed), "--torch_dtype", "float32", "--report_to", "none", "--dataloader_num_workers", "0",
           "--train_sampling_strategy", strategy]
    return out + (["--model_name_or_path", args.model] if args.model else [])


def main(argv=None):
    import importlib

    import torch

    from medgpt.data.preference import COLUMNS, pair_length

    args = parse(argv)
    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # the trainers' start-up chatter; the table is what matters here
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    workdir = tempfile.mkdtemp(prefix="bench_pads-")
    train_dir = write_pairs(args.data, args.num_samples, os.path.join(workdir, "train"))
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "settings": {k: v for k, v in vars(args).items() if k != "output"}, "torch": torch.__version__,
               "stages": {}}
    start = time.perf_counter()
    for stage, module in STAGES.items():
        build_trainer = importlib.import_module(module).build_trainer
        runs = {}
        for strategy in STRATEGIES:
            run, trainer = build_trainer(flags(args, train_dir, os.path.join(workdir, stage, strategy), strategy))
            assert trainer.args.train_sampling_strategy == strategy
            runs[strategy] = epoch_pads(trainer, run.train_dataset, args.seed)
            pairs = run.train_dataset
            del trainer
        # the floor: each pair alone, chosen and rejected padded to the longer one (no batch could pad less)
        floor = sum(2 * pair_length(p, c, r) for p, c, r in zip(*(pairs[k] for k in COLUMNS)))
        runs["pad_fraction_one_pair_per_batch"] = round((floor - runs["random"]["real_tokens"]) / floor, 4)
        rnd, grp = runs["random"], runs["group_by_length"]
        runs["token_slots_random_over_grouped"] = round(rnd["token_slots"] / grp["token_slots"], 3)
        runs["pad_tokens_random_over_grouped"] = round(rnd["pad_tokens"] / max(grp["pad_tokens"], 1), 2)
        results["stages"][stage] = runs
    results["seconds"] = round(time.perf_counter() - start, 1)

    print(f"\n{args.num_samples} pairs of {os.path.basename(args.data)}, batch {args.batch_size}, --max_length "
          f"{args.max_length}, one epoch, no training ({results['seconds']} s)\n")
    print(f"{'stage':6}{'sampling':>17}{'token slots':>13}{'real tokens':>13}{'pad fraction':>14}"
          f"{'each pair once':>16}")
    for stage, runs in results["stages"].items():
        for strategy in STRATEGIES:
            r = runs[strategy]
            print(f"{stage:6}{strategy:>17}{r['token_slots']:>13}{r['real_tokens']:>13}{r['pad_fraction']:>14.1%}"
                  f"{str(r['each_pair_once']):>16}")
        print(f"{stage:6}{'random / grouped':>17}{runs['token_slots_random_over_grouped']:>12.3f}x"
              f"{'':>13}{runs['pad_tokens_random_over_grouped']:>13.2f}x (pad tokens)")
        print(f"{stage:6}{'floor':>17}{'':>26}{runs['pad_fraction_one_pair_per_batch']:>14.1%}  (one pair per batch)")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nresults: {args.output}")
    ok = all(runs[s]["each_pair_once"] for runs in results["stages"].values() for s in STRATEGIES)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
