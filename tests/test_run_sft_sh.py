"""run_sft.sh through torchrun, and a MedicalGPT user's run_sft.sh flag set, unchanged, on this CPU."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, free_port, run_torchrun

# The flags of MedicalGPT's own run_sft.sh (GPU-oriented: fp16, tensorboard, gradient checkpointing,
# device_map auto, --evaluation_strategy, --overwrite_output_dir), with the model and data swapped for
# local ones and the run shortened.
MEDICALGPT_SFT_FLAGS = """
    --model_type auto --train_file_dir {data} --validation_file_dir {data}
    --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --do_train --do_eval --template_name qwen
    --use_peft True --max_train_samples 1000 --max_eval_samples 10 --model_max_length 1024 --num_train_epochs 1
    --learning_rate 2e-5 --warmup_ratio 0.05 --weight_decay 0.05 --logging_strategy steps --logging_steps 10
    --eval_steps 50 --evaluation_strategy steps --save_steps 500 --save_strategy steps --save_total_limit 13
    --gradient_accumulation_steps 1 --preprocessing_num_workers 4 --output_dir {out} --overwrite_output_dir
    --ddp_timeout 30000 --logging_first_step True --target_modules all --lora_rank 8 --lora_alpha 16
    --lora_dropout 0.05 --torch_dtype float16 --fp16 --device_map auto --report_to tensorboard
    --ddp_find_unused_parameters False --gradient_checkpointing True --cache_dir {cache}
"""


def test_medicalgpt_run_sft_flags_run_unchanged(tiny_model_dir, tmp_path):
    """As MedicalGPT's run_sft.sh launches them: `torchrun --nproc_per_node 2 supervised_finetuning.py ...` (here over
    gloo: one model, data-parallel, with gradient checkpointing and --ddp_find_unused_parameters False)."""
    out = tmp_path / "out"
    flags = MEDICALGPT_SFT_FLAGS.format(data="data/finetune/medical_sft_messages.jsonl", out=out,
                                        cache=tmp_path / "cache").split()
    proc = run_torchrun("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, *flags, "--max_steps", "2",
                        nproc=2)
    assert "Training one model on 2 processes: MULTI_CPU" in proc.stderr
    assert (out / "adapter_model.safetensors").is_file()
    from medgpt.precision import cpu_bf16  # --fp16: bf16 where this CPU has native bf16, else float32, with the reason
    assert ("--fp16 on a CPU with native bf16 -> bfloat16" if cpu_bf16().fast else "--fp16 on this CPU -> float32") \
        in proc.stderr
    assert any(p.name.startswith("events.out.tfevents") for p in out.rglob("*")), "no tensorboard log"


def test_run_sft_sh_launches_through_torchrun(tiny_model_dir, tmp_path):
    """One process on a given rendezvous port (MASTER_PORT set: no --standalone), train + eval + save."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "NNODES", "NODE_RANK", "DEEPSPEED")}
    env.update(PYTHON=sys.executable, MASTER_PORT=str(free_port()), MASTER_ADDR="127.0.0.1", NPROC="1")
    proc = subprocess.run(["bash", str(ROOT / "run_sft.sh"), "--model_name_or_path", tiny_model_dir,
                           "--output_dir", str(out), "--max_steps", "2", "--report_to", "none"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "eval_results.json").is_file()
