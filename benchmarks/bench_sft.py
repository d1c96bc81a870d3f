"""SFT benchmark: the plain baseline (benchmarks/baseline_sft.py: HF Trainer, padding to the batch's
longest sample, full-vocabulary logits, as MedicalGPT does) against our supervised_finetuning.py
(packed padding-free rows, loss on supervised positions only), and, on a CPU with native bf16
(medgpt/precision.py), our script in bf16 as well, in one run, on the same model, data, flags and seed.

Each training run is its own subprocess, one after the other, so its peak RSS is its own (wait4).
Both see the same samples in the same batches (batch_size samples per optimizer step, same sampler
seed), hence the same supervised tokens; afterwards both adapters are scored here on the same
held-out samples with a plain padded forward (no packing code involved).

    python benchmarks/bench_sft.py                       # 64 samples of MedicalGPT's medical SFT file
    python benchmarks/bench_sft.py --num_samples 8       # a quick check
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "sft", "medical_sft_1K_format.jsonl")
RUNS = {"baseline": "benchmarks/baseline_sft.py", "ours": "supervised_finetuning.py",
        "ours_bf16": "supervised_finetuning.py"}
# the bf16 side: bf16 weights and bf16 autocast, LoRA weights and optimizer in float32 (what GPU users run)
BF16_FLAGS = ["--torch_dtype", "bfloat16", "--bf16"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="SFT .json/.jsonl file (one record a line)")
    p.add_argument("--num_samples", type=int, default=64, help="training samples: the file's first N records")
    p.add_argument("--eval_samples", type=int, default=32, help="held-out samples: the N records after those")
    p.add_argument("--max_length", type=int, default=512, help="--model_max_length")
    p.add_argument("--batch_size", type=int, default=4, help="samples per optimizer step (both runs)")
    p.add_argument("--model", default=None, help="model folder or name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: all cores)")
    p.add_argument("--repeat", type=int, default=1,
                   help="train each side N times, alternating; speed from each side's fastest run (noise from other "
                        "processes only slows a run down), peak RSS: our highest against the baseline's lowest")
    p.add_argument("--only", type=side_list(RUNS), default=None,
                   help="run these sides only, comma-separated (e.g. ours,ours_bf16)")
    p.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                   help="the bf16 side: auto = where the CPU has native bf16 (or a GPU is used)")
    p.add_argument("--extra", default="", help="more flags for both runs, e.g. \"--gradient_checkpointing True\"")
    p.add_argument("--workdir", default=None, help="where data and outputs go (default: a temporary folder)")
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "bench_sft.json"),
                   help="JSON results file")
    return p.parse_args(argv)


def split_data(path, n_train, n_eval, workdir):
    """The first n_train non-empty lines -> train/, the next n_eval -> heldout/."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if len(lines) < n_train + n_eval:
        raise SystemExit(f"error: {path}: {len(lines)} records, need {n_train} + {n_eval}")
    dirs = {}
    for name, chunk in (("train", lines[:n_train]), ("heldout", lines[n_train:n_train + n_eval])):
        os.makedirs(os.path.join(workdir, name), exist_ok=True)
        with open(os.path.join(workdir, name, "data.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(chunk)
        dirs[name] = os.path.join(workdir, name)
    return dirs


def common_flags(args, train_dir):
    flags = ["--train_file_dir", train_dir, "--do_train", "--per_device_train_batch_size", str(args.batch_size),
             "--model_max_length", str(args.max_length), "--num_train_epochs", "1",
             "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "linear",
             "--target_modules", "all", "--lora_rank", str(args.lora_rank), "--lora_alpha", str(args.lora_alpha),
             "--lora_dropout", str(args.lora_dropout), "--seed", str(args.seed), "--template_name", "chatml",
             "--torch_dtype", "float32", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
             "--disable_tqdm", "True", "--dataloader_num_workers", "0", "--overwrite_output_dir"]
    if args.model:
        flags += ["--model_name_or_path", args.model]
    return flags + args.extra.split()


def _cpu_busy_seconds() -> float:
    """CPU seconds spent by every process on the machine so far (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(script, flags, output_dir, threads=None, launcher=()):
    """Run one training subprocess (`python [launcher...] script`, e.g. launcher = torchrun's module and flags);
    its peak RSS (wait4: the largest process of the run), wall and CPU time (all its processes), and the CPU time
    other processes took meanwhile (a shared machine distorts timings)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log_path = os.path.join(os.path.dirname(output_dir), os.path.basename(output_dir) + ".log")
    busy0, load0, t0 = _cpu_busy_seconds(), os.getloadavg()[0], time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *launcher, os.path.join(ROOT, script), *flags, "--output_dir", output_dir],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"error: {script} failed (log: {log_path}):\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    with open(os.path.join(output_dir, "train_results.json")) as f:
        metrics = json.load(f)
    return {"script": script, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 1024 ** 2, 3),  # ru_maxrss is in KiB on Linux
            "other_processes_cpu_s": round(max(0.0, _cpu_busy_seconds() - busy0 - cpu), 1),
            "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2),
            "train_runtime_s": metrics["train_runtime"], "train_loss": metrics["train_loss"],
            "metrics": metrics, "log": log_path}


def sft_run(script, flags, output_dir, threads=None, launcher=()):
    run = run_child(script, flags, output_dir, threads, launcher)
    metrics = run.pop("metrics")
    run.update(supervised_tokens=metrics["train_tokens_supervised"], real_tokens=metrics["train_tokens_real"],
               processed_tokens=metrics["train_tokens_processed"], pad_fraction=metrics["train_pad_fraction"],
               supervised_tokens_per_s=round(metrics["train_tokens_supervised"] / metrics["train_runtime"], 2))
    return run


def heldout_losses(model_name, adapters: dict, heldout_dir, max_length, template_name="chatml"):
    """Token-weighted next-token loss on the held-out samples, one plain padded forward per sample
    (full logits, the model's own loss), for the base model and each adapter."""
    import torch
    from peft import PeftModel

    from medgpt.args import DataArguments, ModelArguments
    from medgpt.data.io import load_train_eval_rows
    from medgpt.data.sft import IGNORE_INDEX, sft_row, tokenize_rows
    from medgpt.modeling import load_model, load_tokenizer
    from medgpt.templates import get_conv_template

    model_args = ModelArguments(model_name_or_path=model_name, torch_dtype="float32")
    tokenizer = load_tokenizer(model_args)
    rows, _ = load_train_eval_rows(DataArguments(train_file_dir=heldout_dir), sft_row)
    samples = tokenize_rows(rows, tokenizer, get_conv_template(template_name), max_length, False, desc="held-out")

    def score(model):
        total, count = 0.0, 0
        model.eval()
        with torch.no_grad():
            for s in samples:
                ids, labels = torch.tensor([s["input_ids"]]), torch.tensor([s["labels"]])
                n = int(labels[..., 1:].ne(IGNORE_INDEX).sum())
                total += float(model(input_ids=ids, labels=labels).loss) * n
                count += n
        return total / count

    results = {"base": score(load_model(model_args)), "heldout_samples": len(samples)}
    for name, path in adapters.items():
        results[name] = score(PeftModel.from_pretrained(load_model(model_args), path))
    return results


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    import torch
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def bf16_side(args) -> bool:
    """Whether to run the bf16 side (--bf16 auto: where the CPU has native bf16, see medgpt/precision.py)."""
    if args.bf16 != "auto":
        return args.bf16 == "yes"
    import torch

    from medgpt.precision import cpu_bf16
    return torch.cuda.is_available() or cpu_bf16().fast


def side_list(known):
    """--only's type: comma-separated side names, each one of `known`."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in known] or ([] if names else [text])
        if bad:
            raise argparse.ArgumentTypeError(f"unknown side {bad[0]!r} (choose from {', '.join(sorted(known))})")
        return names
    return parse


def start(args, prefix: str, common_flags):
    """The data split, the flags of both sides, the results record and the sides to run."""
    workdir = args.workdir or tempfile.mkdtemp(prefix=prefix)
    dirs = split_data(args.data, args.num_samples, args.eval_samples, workdir)
    flags = common_flags(args, dirs["train"])
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
               "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "output")},
               "flags": flags, "runs": {}}
    names = ["baseline", "ours"] + (["ours_bf16"] if bf16_side(args) else [])
    return workdir, dirs, flags, results, args.only or names


def train_sides(names, repeat, workdir, train_one) -> dict:
    """Train each side `repeat` times, alternating the order; `train_one(name, output_dir)` returns a run dict.
    Returns each side's fastest run (noise from other processes only slows a run down), with peak RSS: our highest
    against the baseline's lowest, and every attempt."""
    attempts = {name: [] for name in names}
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            print(f"training {name}, run {r + 1}/{repeat} ...", flush=True)
            run = train_one(name, os.path.join(workdir, f"{name}-{r}"))
            attempts[name].append(run)
            print(f"  {run['train_runtime_s']:.1f} s, peak RSS {run['peak_rss_gb']:.2f} GB, "
                  f"other processes' CPU {run['other_processes_cpu_s']:.1f} s", flush=True)
    best = {}
    for name, runs in attempts.items():
        best[name] = dict(min(runs, key=lambda run: run["train_runtime_s"]))
        rss = [run["peak_rss_gb"] for run in runs]
        best[name]["peak_rss_gb"] = max(rss) if name.startswith("ours") else min(rss)
        best[name]["attempts"] = [{k: run[k] for k in ("train_runtime_s", "peak_rss_gb", "other_processes_cpu_s", "log")}
                                  for run in runs]
        best[name]["output_dir"] = os.path.join(workdir, f"{name}-{len(runs) - 1}")
    return best


def print_table(runs: dict, rows, no_ratio=("pad_fraction",)):
    """rows: (label, key, format); then each side's ratio to the first (the baseline) when several ran."""
    names = [n for n in ("baseline", "ours", "ours_bf16") if n in runs]
    print(f"\n{'':28}" + "".join(f"{n:>14}" for n in names) + "".join(f"{n + '/' + names[0]:>22}" for n in names[1:]))
    for label, key, fmt in rows:
        vals = [runs[n].get(key) for n in names]
        line = f"{label:28}" + "".join(f"{fmt.format(v) if v is not None else '-':>14}" for v in vals)
        if all(isinstance(v, (int, float)) and v for v in vals) and key not in no_ratio:
            line += "".join(f"{v / vals[0]:>21.3f}x" for v in vals[1:])
        print(line)


def finish(results: dict, output: str, workdir: str) -> int:
    """Print the checks, write the JSON record; exit code 0 when every check passed."""
    for name, check in results.get("checks", {}).items():
        print(f"{'PASS' if check['ok'] else 'FAIL'}  {name}: {check['value']} (target {check['target']})")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    print(f"results: {output}; logs and outputs: {workdir}")
    return 0 if all(c["ok"] for c in results.get("checks", {}).values()) else 1


SFT_ROWS = [("supervised tokens / s", "supervised_tokens_per_s", "{:.1f}"),
            ("train runtime (s)", "train_runtime_s", "{:.1f}"),
            ("pad fraction", "pad_fraction", "{:.1%}"),
            ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
            ("held-out loss", "heldout_loss", "{:.4f}"),
            ("supervised tokens", "supervised_tokens", "{:d}"),
            ("processed tokens", "processed_tokens", "{:d}"),
            ("other processes' CPU s", "other_processes_cpu_s", "{:.1f}")]


def main(argv=None):
    args = parse(argv)
    workdir, dirs, flags, results, names = start(args, "bench_sft-", common_flags)
    results["runs"] = train_sides(names, args.repeat, workdir,
                                  lambda name, out: sft_run(RUNS[name], flags + (BF16_FLAGS if name == "ours_bf16" else []),
                                                            out, args.threads))
    print("scoring the held-out samples ...", flush=True)
    losses = heldout_losses(args.model, {n: run["output_dir"] for n, run in results["runs"].items()},
                            dirs["heldout"], args.max_length)
    results["heldout"] = losses
    for name, run in results["runs"].items():
        run["heldout_loss"] = round(losses[name], 5)
    if "baseline" in results["runs"] and "ours" in results["runs"]:
        base, ours = results["runs"]["baseline"], results["runs"]["ours"]
        speed = ours["supervised_tokens_per_s"] / base["supervised_tokens_per_s"]
        rss = ours["peak_rss_gb"] / base["peak_rss_gb"]
        loss_diff = abs(ours["heldout_loss"] - base["heldout_loss"]) / base["heldout_loss"]
        results["checks"] = {
            "supervised tokens/s, ours / baseline": {"value": round(speed, 3), "target": ">= 2.0", "ok": speed >= 2.0},
            "peak RSS, ours / baseline": {"value": round(rss, 3), "target": "<= 0.5", "ok": rss <= 0.5},
            "pad fraction, ours": {"value": ours["pad_fraction"], "target": "<= 0.03",
                                   "ok": ours["pad_fraction"] <= 0.03},
            "held-out loss, |ours - baseline| / baseline": {"value": round(loss_diff, 4), "target": "<= 0.02",
                                                           "ok": loss_diff <= 0.02},
            "same supervised tokens": {"value": f"{ours['supervised_tokens']} vs {base['supervised_tokens']}",
                                       "target": "equal", "ok": ours["supervised_tokens"] == base["supervised_tokens"]},
        }
        if "ours_bf16" in results["runs"]:
            bf16 = results["runs"]["ours_bf16"]
            speed = bf16["supervised_tokens_per_s"] / ours["supervised_tokens_per_s"]
            loss_diff = abs(bf16["heldout_loss"] - base["heldout_loss"]) / base["heldout_loss"]
            results["checks"].update({
                "supervised tokens/s, ours bf16 / ours fp32": {"value": round(speed, 3), "target": ">= 1.8",
                                                               "ok": speed >= 1.8},
                "peak RSS, ours bf16 / ours fp32": {"value": round(bf16["peak_rss_gb"] / ours["peak_rss_gb"], 3),
                                                    "target": "<= 1.0", "ok": bf16["peak_rss_gb"] <= ours["peak_rss_gb"]},
                "held-out loss, |ours bf16 - baseline| / baseline": {"value": round(loss_diff, 4), "target": "<= 0.02",
                                                                     "ok": loss_diff <= 0.02},
                "same supervised tokens, bf16": {"value": f"{bf16['supervised_tokens']} vs {base['supervised_tokens']}",
                                                 "target": "equal",
                                                 "ok": bf16["supervised_tokens"] == base["supervised_tokens"]},
            })
    print_table(results["runs"], SFT_ROWS)
    print(f"\nheld-out loss before training: {losses['base']:.4f} ({losses['heldout_samples']} samples)")
    return finish(results, args.output, workdir)


if __name__ == "__main__":
    sys.exit(main())
