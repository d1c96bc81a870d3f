"""DPO benchmark: plain DPO (TRL's DPOTrainer with its padded batches: `dpo_training.py --packing False`, what
MedicalGPT's dpo_training.py runs) against our packed DPO (`dpo_training.py`, default `--packing True`: each pair
once as prompt + chosen + rejected, no padding, LM head on reply positions only), and, on a CPU with native bf16
(medgpt/precision.py), our packed DPO in bf16, in one run, on the same model, data, flags and seed.

Each training run is its own subprocess (its own peak RSS, from wait4). Both take the same optimizer steps on the
same pairs; afterwards both adapters are scored here on the same held-out pairs with plain per-sequence forwards
(no packing code): reward accuracy = share of pairs whose implicit reward beta * (log-ratio chosen - rejected) > 0.

    python benchmarks/bench_dpo.py                  # 40 pairs of MedicalGPT's dpo_zh_500.jsonl, batch 4, 10 steps
    python benchmarks/bench_dpo.py --num_samples 8  # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_sft import BF16_FLAGS, finish, print_table, run_child, side_list, start, train_sides  # noqa: E402

DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "reward", "dpo_zh_500.jsonl")
RUNS = {"baseline": ["--packing", "False"], "ours": [], "ours_bf16": BF16_FLAGS}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="preference .jsonl (one pair a line)")
    p.add_argument("--num_samples", type=int, default=40, help="training pairs: the file's first N records")
    p.add_argument("--eval_samples", type=int, default=32, help="held-out pairs: the N records after those")
    p.add_argument("--batch_size", type=int, default=4, help="pairs per optimizer step (both runs)")
    p.add_argument("--max_source_length", type=int, default=512, help="prompt tokens (MedicalGPT's run_dpo.sh: 1024)")
    p.add_argument("--max_target_length", type=int, default=256, help="reply tokens (MedicalGPT's run_dpo.sh: 512)")
    p.add_argument("--model", default=None, help="model folder or name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: all cores)")
    p.add_argument("--repeat", type=int, default=1, help="train each side N times, alternating; speed from the fastest")
    p.add_argument("--only", type=side_list(RUNS), default=None,
                   help="run these sides only, comma-separated (e.g. ours,ours_bf16)")
    p.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                   help="the bf16 side (ours in bf16): auto = where the CPU has native bf16 (or a GPU is used)")
    p.add_argument("--extra", default="", help="more flags for both runs")
    p.add_argument("--workdir", default=None, help="where data and outputs go (default: a temporary folder)")
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "bench_dpo.json"))
    return p.parse_args(argv)


def common_flags(args, train_dir):
    flags = ["--train_file_dir", train_dir, "--do_train", "--per_device_train_batch_size", str(args.batch_size),
             "--max_source_length", str(args.max_source_length), "--max_target_length", str(args.max_target_length),
             "--num_train_epochs", "1", "--learning_rate", str(args.learning_rate), "--beta", str(args.beta),
             "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--use_peft", "True", "--target_modules", "all",
             "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--seed", str(args.seed),
             "--template_name", "chatml", "--torch_dtype", "float32", "--gradient_checkpointing", "False",
             "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "True",
             "--dataloader_num_workers", "0", "--overwrite_output_dir",
             # the same batches on both sides (dpo_training.py --packing False would group them by length)
             "--train_sampling_strategy", "random"]
    if args.model:
        flags += ["--model_name_or_path", args.model]
    return flags + args.extra.split()


def heldout_reward_accuracy(model_name, adapters: dict, heldout_dir, args):
    """Implicit-reward accuracy and mean margin of each adapter on the held-out pairs, from plain per-sequence
    forwards (prompt + reply, full logits): reward = beta * (log p_policy(reply) - log p_base(reply))."""
    import torch
    from peft import PeftModel

    from medgpt.args import ModelArguments
    from medgpt.data.io import find_data_files, load_records
    from medgpt.data.preference import encode_pair, preference_row
    from medgpt.modeling import load_model, load_tokenizer
    from medgpt.templates import get_conv_template

    model_args = ModelArguments(model_name_or_path=model_name, torch_dtype="float32")
    tokenizer = load_tokenizer(model_args)
    # what resolve_lengths gives the training runs for --max_source_length / --max_target_length
    max_length, max_prompt = args.max_source_length + args.max_target_length, args.max_source_length
    rows = load_records(find_data_files(heldout_dir), preference_row)
    pairs = [p for p in (encode_pair(r, tokenizer, get_conv_template("chatml"), max_length, max_prompt) for r in rows)
             if p is not None]

    def logps(model):
        model.eval()
        out = []
        with torch.no_grad():
            for pair in pairs:
                row = []
                for key in ("chosen_ids", "rejected_ids"):
                    ids = torch.tensor([pair["prompt_ids"] + pair[key]])
                    n = len(pair[key])
                    logp = model(input_ids=ids).logits[0, -n - 1:-1].float().log_softmax(-1)
                    row.append(float(logp.gather(-1, ids[0, -n:, None]).sum()))
                out.append(row)
        return torch.tensor(out)

    ref = logps(load_model(model_args))
    results = {"heldout_pairs": len(pairs)}
    for name, path in adapters.items():
        policy = logps(PeftModel.from_pretrained(load_model(model_args), path))
        margins = args.beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
        results[name] = {"reward_accuracy": round(float((margins > 0).float().mean()), 4),
                         "mean_margin": round(float(margins.mean()), 5)}
    return results


def dpo_run(name, flags, output_dir, threads):
    run = run_child("dpo_training.py", flags + RUNS[name], output_dir, threads)
    metrics = run.pop("metrics")
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        state = json.load(f)
    steps = [e for e in state["log_history"] if "rewards/accuracies" in e and "loss" in e]
    run.update(steps=state["global_step"], step_s=round(metrics["train_runtime"] / state["global_step"], 2),
               steps_per_s=round(state["global_step"] / metrics["train_runtime"], 4),
               train_tokens=int(steps[-1].get("num_tokens", 0)) if steps else None,
               last_train_reward_accuracy=steps[-1]["rewards/accuracies"] if steps else None,
               last_train_margin=steps[-1]["rewards/margins"] if steps else None)
    return run


DPO_ROWS = [("step time (s)", "step_s", "{:.2f}"), ("steps / s", "steps_per_s", "{:.4f}"),
            ("train runtime (s)", "train_runtime_s", "{:.1f}"), ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
            ("train loss", "train_loss", "{:.4f}"), ("last-step reward accuracy", "last_train_reward_accuracy", "{:.2f}"),
            ("held-out reward accuracy", "heldout_reward_accuracy", "{:.4f}"),
            ("held-out mean margin", "heldout_margin", "{:.5f}"),
            ("other processes' CPU s", "other_processes_cpu_s", "{:.1f}")]


def main(argv=None):
    args = parse(argv)
    workdir, dirs, flags, results, names = start(args, "bench_dpo-", common_flags)
    results["runs"] = train_sides(names, args.repeat, workdir,
                                  lambda name, out: dpo_run(name, flags, out, args.threads))
    print("scoring the held-out pairs ...", flush=True)
    scores = heldout_reward_accuracy(args.model, {n: run["output_dir"] for n, run in results["runs"].items()},
                                     dirs["heldout"], args)
    results["heldout"] = scores
    for name, run in results["runs"].items():
        run.update(heldout_reward_accuracy=scores[name]["reward_accuracy"], heldout_margin=scores[name]["mean_margin"])
    runs, checks = results["runs"], {}
    if "baseline" in runs and "ours" in runs:
        base, ours = runs["baseline"], runs["ours"]
        speed = ours["steps_per_s"] / base["steps_per_s"]
        checks = {
            "DPO steps/s, ours / baseline": {"value": round(speed, 3), "target": ">= 1.5", "ok": speed >= 1.5},
            "held-out reward accuracy, ours vs baseline": {
                "value": f"{ours['heldout_reward_accuracy']} vs {base['heldout_reward_accuracy']}", "target": "equal",
                "ok": ours["heldout_reward_accuracy"] == base["heldout_reward_accuracy"]},
            "same steps": {"value": f"{ours['steps']} vs {base['steps']}", "target": "equal",
                           "ok": ours["steps"] == base["steps"]},
        }
    if "ours" in runs and "ours_bf16" in runs:
        ours, bf16 = runs["ours"], runs["ours_bf16"]
        speed = bf16["steps_per_s"] / ours["steps_per_s"]
        checks.update({
            "DPO steps/s, ours bf16 / ours fp32": {"value": round(speed, 3), "target": ">= 1.5", "ok": speed >= 1.5},
            "held-out reward accuracy, ours bf16 vs ours fp32": {
                "value": f"{bf16['heldout_reward_accuracy']} vs {ours['heldout_reward_accuracy']}",
                "target": "equal", "ok": bf16["heldout_reward_accuracy"] == ours["heldout_reward_accuracy"]},
        })
    if checks:
        results["checks"] = checks
    print_table(results["runs"], DPO_ROWS, no_ratio=())
    return finish(results, args.output, workdir)


if __name__ == "__main__":
    sys.exit(main())
