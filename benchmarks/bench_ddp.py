"""Data-parallel SFT benchmark: supervised_finetuning.py as one process (the baseline) against `torchrun
--nproc_per_node N` (DDP over gloo on a CPU machine, NCCL on GPUs), in one run, on the same model, data and global
batch (N processes with batch_size / N each). Reports wall time, train runtime, supervised tokens/s, optimizer steps
and the final train loss of both; the two must take the same steps and reach the same loss.

On this project's 2-core CPU machine the processes share the two cores (one thread each, against two threads for the
single process), so no speed-up is expected: the figure shows what data-parallelism costs in communication here.
On a multi-GPU node the same command measures the scaling.

    python benchmarks/bench_ddp.py                      # 32 samples of MedicalGPT's medical SFT file, 2 processes
    python benchmarks/bench_ddp.py --nproc 4 --num_samples 256 --extra "--torch_dtype bfloat16 --bf16"
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sft import DEFAULT_DATA, ROOT, common_flags, finish, print_table, sft_run, start, train_sides  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="SFT .json/.jsonl file (one record a line)")
    p.add_argument("--num_samples", type=int, default=32, help="training samples: the file's first N records")
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel side")
    p.add_argument("--max_length", type=int, default=512, help="--model_max_length")
    p.add_argument("--batch_size", type=int, default=4, help="global batch: samples per optimizer step (both sides)")
    p.add_argument("--model", default=None, help="model folder or name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.0, help="0: both sides compute the same update")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the single process (default: all)")
    p.add_argument("--repeat", type=int, default=1, help="train each side N times, alternating; fastest run kept")
    p.add_argument("--extra", default="", help="more flags for both sides")
    p.add_argument("--workdir", default=None, help="where data and outputs go (default: a temporary folder)")
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "bench_ddp.json"),
                   help="JSON results file")
    args = p.parse_args(argv)
    if args.batch_size % args.nproc:
        p.error(f"--batch_size {args.batch_size} must be a multiple of --nproc {args.nproc}")
    args.eval_samples, args.only = 0, None
    return args


def main(argv=None):
    args = parse(argv)
    workdir, dirs, flags, results, names = start(args, "bench_ddp-", common_flags)
    per_rank = [*flags, "--per_device_train_batch_size", str(args.batch_size // args.nproc)]
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc))

    def train_one(name, out):
        if name == "baseline":
            run = sft_run("supervised_finetuning.py", flags, out, args.threads)
        else:
            run = sft_run("supervised_finetuning.py", per_rank, out, launcher=torchrun)
        import json
        with open(os.path.join(out, "trainer_state.json")) as f:
            run["optimizer_steps"] = json.load(f)["global_step"]
        return run

    results["sides"] = {"baseline": "1 process", "ours": f"torchrun --nproc_per_node {args.nproc}"}
    results["runs"] = train_sides(names, args.repeat, workdir, train_one)
    one, many = results["runs"]["baseline"], results["runs"]["ours"]
    loss_diff = abs(many["train_loss"] - one["train_loss"]) / one["train_loss"]
    results["checks"] = {
        "same optimizer steps": {"value": f"{many['optimizer_steps']} vs {one['optimizer_steps']}", "target": "equal",
                                 "ok": many["optimizer_steps"] == one["optimizer_steps"]},
        "same supervised tokens": {"value": f"{many['supervised_tokens']} vs {one['supervised_tokens']}",
                                   "target": "equal", "ok": many["supervised_tokens"] == one["supervised_tokens"]},
        "train loss, |N procs - 1| / 1": {"value": round(loss_diff, 6), "target": "<= 1e-4", "ok": loss_diff <= 1e-4},
    }
    print(f"baseline: 1 process; ours: {args.nproc} processes (torchrun), global batch {args.batch_size}")
    print_table(results["runs"], [("wall time (s)", "wall_s", "{:.1f}"),
                                  ("train runtime (s)", "train_runtime_s", "{:.1f}"),
                                  ("supervised tokens / s", "supervised_tokens_per_s", "{:.1f}"),
                                  ("optimizer steps", "optimizer_steps", "{:d}"),
                                  ("train loss", "train_loss", "{:.5f}"),
                                  ("peak RSS, largest process (GB)", "peak_rss_gb", "{:.2f}"),
                                  ("CPU seconds, all processes", "cpu_s", "{:.1f}")], no_ratio=("optimizer_steps",))
    return finish(results, args.output, workdir)


if __name__ == "__main__":
    sys.exit(main())
