"""Data-parallel training for real, on this CPU machine: `torchrun --nproc_per_node 2` over gloo, DeepSpeed with
DS_ACCELERATOR=cpu. Two processes with per-device batch B must train the model that one process trains with batch 2B:
same step count (each rank sees half the samples), same first-step loss and the same weights after a few steps. SGD
and LoRA dropout 0 keep the comparison sharp (Adam's first step is ~lr * sign(grad), which hides gradient errors);
two ranks training independently would take twice the steps and end with other weights, so every test here fails
then."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script, run_torchrun

COMMON = ("--do_train", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--seed", "1",
          "--lora_dropout", "0", "--optim", "sgd", "--learning_rate", "0.05", "--num_train_epochs", "1",
          "--overwrite_output_dir")
PREF = ("--train_file_dir", str(ROOT / "data/reward"), "--max_train_samples", "12")
STAGES = {
    # SFT rows of at most 100 tokens: several rows per step, gradients accumulated locally, synced once
    "sft": ("supervised_finetuning.py", ("--train_file_dir", str(ROOT / "data/finetune"), "--max_train_samples", "12",
                                         "--max_packed_tokens", "100")),
    "pt": ("pretraining.py", ("--train_file_dir", str(ROOT / "data/pretrain"), "--block_size", "32",
                              "--max_train_samples", "12")),
    "rm": ("reward_modeling.py", PREF),
    "dpo": ("dpo_training.py", PREF),
    "orpo": ("orpo_training.py", PREF),
    "cpo": ("cpo_training.py", PREF),  # CPO's default: NLL term on (--cpo_alpha 1), exact over ranks
}
BATCH = 2  # per device with 2 processes; one process gets 2 * BATCH


def train(script, model, out, nproc, *extra, env=None):
    args = ("--model_name_or_path", model, "--output_dir", str(out),
            "--per_device_train_batch_size", str(BATCH * 2 // nproc), *COMMON, *extra)
    return run_torchrun(script, *args, nproc=nproc, env=env)


def state(out) -> dict:
    return json.loads((Path(out) / "trainer_state.json").read_text())


def losses(out) -> list[float]:
    return [h["loss"] for h in state(out)["log_history"] if "loss" in h]


def tensors(out) -> dict:
    from safetensors.torch import load_file

    out = Path(out)
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(out / name))


def assert_same_training(one, two, base: dict | None = None, rtol: float = 1e-5):
    """Same steps, same first-step loss, same weights (relative to each tensor's change from `base` for full
    training, to its own size for LoRA, whose B matrices start at zero and so are pure updates)."""
    assert state(one)["global_step"] == state(two)["global_step"] > 1
    l1, l2 = losses(one), losses(two)
    assert l1[0] == pytest.approx(l2[0], rel=rtol), (l1, l2)
    a, b = tensors(one), tensors(two)
    # (ZeRO-1/2 full saves also write a tied head, lm_head.weight, as its own tensor: a copy of the embeddings)
    assert a.keys() <= b.keys() and all(k in a for k in b if k != "lm_head.weight"), (a.keys() ^ b.keys())
    worst = 0.0
    for k in a:
        ref = (a[k] - base[k]).abs().max() if base is not None else a[k].abs().max()
        if ref == 0:
            continue
        worst = max(worst, ((a[k] - b[k]).abs().max() / ref).item())
    assert worst < rtol, f"weights differ by {worst:.2e} (relative) between 1 and 2 processes"
    return worst


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_model_dir):
    """One-process runs with the global batch, made once per stage on demand."""
    made = {}

    def get(stage, *extra):
        key = (stage, extra)
        if key not in made:
            out = tmp_path_factory.mktemp(f"ref-{stage}") / "out"
            script, args = STAGES[stage]
            train(script, tiny_model_dir, out, 1, *args, *extra)
            made[key] = out
        return made[key]
    return get


BF16 = ("--bf16", "--torch_dtype", "bfloat16")


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_train_the_one_process_model_in_bf16(stage, tmp_path, tiny_model_dir, references):
    """bf16 (bf16 weights, autocast, float32 LoRA weights and gradients) on a CPU with native bf16: two processes
    still train the one-process model. The rows differ (each process packs its own half of the batch), so bf16
    rounding differs too: a looser tolerance than float32's 1e-5, still far below what independent ranks give
    (each would see half the data: weights apart by tens of percent)."""
    from medgpt.precision import cpu_bf16

    if not cpu_bf16().fast:
        pytest.skip(f"no native bf16 on this CPU: {cpu_bf16().reason}")
    script, args = STAGES[stage]
    out = tmp_path / "out"
    proc = train(script, tiny_model_dir, out, 2, *args, *BF16)
    assert "on a CPU with native bf16 -> bfloat16" in proc.stderr
    worst = assert_same_training(references(stage, *BF16), out, rtol=2e-2)  # measured: sft 0, dpo 4.9e-3
    print(f"{stage} bf16: weights differ by {worst:.2e} (relative) between 1 and 2 processes")


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_train_the_one_process_model(stage, tmp_path, tiny_model_dir, references):
    script, args = STAGES[stage]
    out = tmp_path / "out"
    proc = train(script, tiny_model_dir, out, 2, *args)
    assert "2 processes train one model data-parallel over gloo (DDP)" in proc.stderr
    assert "Training one model on 2 processes: MULTI_CPU (cpu)" in proc.stderr
    one = references(stage)
    assert_same_training(one, out)
    # only the main process writes: one output folder, metrics printed once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert proc.stdout.count("***** train metrics *****") == 1
    if stage == "sft":  # the token counts of the train metrics cover both ranks
        m1 = json.loads((one / "train_results.json").read_text())
        m2 = json.loads((out / "train_results.json").read_text())
        assert m1["train_tokens_supervised"] == m2["train_tokens_supervised"] > 0
    # the output loads as the next stage would load it
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if stage == "rm":
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, str(out))


def test_grpo_two_processes_share_each_step(tmp_path, tiny_model_dir):
    """GRPO samples its completions with per-rank seeds (TRL), so its weights cannot be compared with one process;
    what must hold: the global batch of each step is split over the ranks (half the steps of one rank with the same
    per-device batch; TRL's num_tokens, gathered over ranks, counts both halves) and one output loads."""
    args = ("--model_name_or_path", tiny_model_dir, "--train_file_dir", str(ROOT / "data/grpo"), "--train_samples", "2",
            "--num_generations", "4", "--max_completion_length", "6", "--num_train_epochs", "1",
            "--gradient_checkpointing", "False", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
            "--seed", "1", "--per_device_train_batch_size", "4", "--template_name", "chatml")
    one, two = tmp_path / "one", tmp_path / "two"
    run_torchrun("grpo_training.py", *args, "--output_dir", str(one), nproc=1)
    run_torchrun("grpo_training.py", *args, "--output_dir", str(two), nproc=2)
    s1, s2 = state(one), state(two)
    assert s1["global_step"] == 2 * s2["global_step"] == 2  # 2 questions x 4 completions / (4 per rank x ranks)
    tokens1 = [h["num_tokens"] for h in s1["log_history"] if "num_tokens" in h]
    tokens2 = [h["num_tokens"] for h in s2["log_history"] if "num_tokens" in h]
    assert tokens2[-1] == pytest.approx(tokens1[-1], rel=0.05)  # same 8 completions of at most 6 tokens, all ranks
    assert (two / "adapter_model.safetensors").exists()


# ---- DeepSpeed (DS_ACCELERATOR=cpu, 2 processes over gloo) ----

DS_ENV = {"DS_ACCELERATOR": "cpu"}


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_deepspeed_lora_sft_equals_one_process(config, tmp_path, tiny_model_dir, references):
    script, args = STAGES["sft"]
    out = tmp_path / "out"
    proc = train(script, tiny_model_dir, out, 2, *args, "--deepspeed", str(ROOT / config), env=DS_ENV)
    assert "data-parallel over gloo (DeepSpeed" in proc.stderr and "on 2 processes: DEEPSPEED (cpu)" in proc.stderr
    assert_same_training(references("sft"), out)


def test_qlora_zero2_equals_one_process(tmp_path, tiny_model_dir, references):
    """4-bit QLoRA under DeepSpeed ZeRO-2 (2 processes) trains the one-process QLoRA model."""
    script, args = STAGES["sft"]
    out = tmp_path / "out"
    qlora = ("--load_in_4bit", "True", "--qlora", "True")
    train(script, tiny_model_dir, out, 2, *args, *qlora, "--deepspeed", str(ROOT / "zero2.json"), env=DS_ENV)
    assert_same_training(references("sft", *qlora), out)


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_deepspeed_lora_dpo_equals_one_process(config, tmp_path, tiny_model_dir, references):
    script, args = STAGES["dpo"]
    out = tmp_path / "out"
    train(script, tiny_model_dir, out, 2, *args, "--deepspeed", str(ROOT / config), env=DS_ENV)
    assert_same_training(references("dpo"), out)


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_deepspeed_full_sft_saves_a_loadable_model(config, tmp_path, tiny_model_dir, references):
    """Full-parameter ZeRO-2/3: the output folder holds consolidated safetensors (under ZeRO-3 not only DeepSpeed
    shards) equal to the one-process model; inference.py loads the ZeRO-3 one and answers."""
    from safetensors.torch import load_file

    script, args = STAGES["sft"]
    out = tmp_path / "out"
    train(script, tiny_model_dir, out, 2, *args, "--use_peft", "False", "--deepspeed", str(ROOT / config),
          env=DS_ENV)
    one = references("sft", "--use_peft", "False")
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    # an update is ~1e-4 of a weight here, so float32 rounding of `weight + update` alone is ~1e-4 of the update
    # (independent ranks would differ by ~1)
    assert_same_training(one, out, base=base, rtol=2e-3)
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out))(ids).logits
        want = AutoModelForCausalLM.from_pretrained(str(one))(ids).logits
    assert (got - want).abs().max().item() < 1e-4
    if config != "zero3.json":
        return
    proc = run_script("inference.py", "--base_model", str(out), "--prompt", "hi", "--max_new_tokens", "4",
                      "--temperature", "0", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0


def test_fsdp_lora_sft_equals_one_process_and_loads(tmp_path, tiny_model_dir, references):
    """--fsdp "full_shard auto_wrap" (FSDP2 over gloo here): the same model as one process; the adapter loads."""
    script, args = STAGES["sft"]
    out = tmp_path / "out"
    proc = train(script, tiny_model_dir, out, 2, *args, "--fsdp", "full_shard auto_wrap")
    assert "data-parallel over gloo (FSDP)" in proc.stderr and "on 2 processes: FSDP (cpu)" in proc.stderr
    assert_same_training(references("sft"), out)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))


def test_deepspeed_zero2_resume_continues_as_uninterrupted(tmp_path, tiny_model_dir):
    """Stop after 2 of 4 steps (a checkpoint from ZeRO-2, Adam state included), resume: steps 3 and 4 have the
    losses of the uninterrupted run and the final adapter is the same."""
    script, args = STAGES["sft"]
    extra = (*args, "--deepspeed", str(ROOT / "zero2.json"), "--max_steps", "4", "--save_strategy", "steps",
             "--save_steps", "2", "--optim", "adamw_torch", "--learning_rate", "1e-3", "--max_train_samples", "24")
    full, part = tmp_path / "full", tmp_path / "part"
    train(script, tiny_model_dir, full, 2, *extra, env=DS_ENV)
    assert (full / "checkpoint-2" / "global_step2").is_dir()  # a DeepSpeed checkpoint
    part.mkdir()
    os.rename(full / "checkpoint-2", part / "checkpoint-2")
    resumed = train(script, tiny_model_dir, part, 2, *extra, "--resume_from_checkpoint", "True", env=DS_ENV)
    assert f"Resuming from {part / 'checkpoint-2'}" in resumed.stderr
    assert losses(part)[2:] == pytest.approx(losses(full)[2:], rel=1e-6)
    a, b = tensors(full), tensors(part)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-8) for k in a)


# ---- what a user gets wrong ----

@pytest.mark.parametrize("content,message", [
    (None, "error: --deepspeed {path}: no such file"),
    ('{\n  "zero_optimization": {"stage": 2,}\n}', "error: {path}:2: not valid JSON"),
])
def test_bad_deepspeed_config_is_one_line(content, message, tmp_path, tiny_model_dir):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    proc = run_script("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir",
                      str(ROOT / "data/finetune"), "--output_dir", str(tmp_path / "out"), "--do_train",
                      "--deepspeed", str(path), "--report_to", "none", check=False)
    assert proc.returncode != 0
    assert message.format(path=path) in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_more_processes_than_samples_is_one_line(tmp_path, tiny_model_dir):
    proc = run_torchrun("reward_modeling.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir",
                        str(ROOT / "data/reward"), "--max_train_samples", "1", "--output_dir", str(tmp_path / "out"),
                        "--do_train", "--report_to", "none", nproc=2, check=False)
    assert proc.returncode != 0
    assert "error: 1 training samples for 2 processes: each process needs at least one" in proc.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("engine,flags", [("ZeRO-3", ("--deepspeed", str(ROOT / "zero3.json"))),
                                          ("FSDP", ("--fsdp", "full_shard auto_wrap"))])
def test_qlora_under_sharding_is_one_line(engine, flags, tmp_path, tiny_model_dir):
    proc = run_torchrun("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir",
                        str(ROOT / "data/finetune"), "--output_dir", str(tmp_path / "out"), "--do_train",
                        "--load_in_4bit", "True", "--qlora", "True", *flags,
                        "--report_to", "none", nproc=2, check=False, env=DS_ENV)
    assert proc.returncode != 0
    assert f"error: --load_in_4bit/--load_in_8bit cannot be combined with {engine} here" in proc.stderr, \
        proc.stderr[-3000:]
    # the ranks stop with the line, not a traceback (torchrun itself then reports the failed children)
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


def test_a_rank_that_dies_ends_the_run_without_a_finished_output(tmp_path, tiny_model_dir):
    """Kill one training process mid-run: torchrun stops the other (no hang in its next all-reduce), exits non-zero
    naming the failed rank, and the output folder holds no final model."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    script, args = STAGES["sft"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / script),
           "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--per_device_train_batch_size", "1",
           *COMMON, *args, "--max_steps", "100000", "--log_level", "info"]
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        try:
            deadline = time.monotonic() + 120
            while "Training one model on 2 processes" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
            time.sleep(2)  # some steps in
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            assert len(children) == 2, children
            os.kill(int(children[1]), signal.SIGKILL)
            rc = proc.wait(timeout=90)  # no hang
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc != 0
    assert "exitcode  : -9" in text and "FAILED" in text, text[-3000:]
    assert not (out / "adapter_model.safetensors").exists()
