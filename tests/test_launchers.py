"""scripts/launch.sh through the run_*.sh scripts on this CPU machine: NPROC processes train one model (half the
optimizer steps with two), a two-node launch (NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT) started twice on one machine
trains the same model as one node with two processes, and a bad DeepSpeed config stops with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port

# A short SFT run: 16 conversations, 2 per process and step, one epoch, no eval and no checkpoints; no LoRA dropout and
# plain SGD so that two launches of the same training give the same weights up to float error.
SFT_FLAGS = ["--max_train_samples", "16", "--per_device_train_batch_size", "2", "--num_train_epochs", "1",
             "--do_eval", "False", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
             "--lora_dropout", "0", "--optim", "sgd", "--learning_rate", "0.1", "--logging_steps", "1",
             ]


def launch_env(**extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for key in ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "DEEPSPEED"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_sh(script: str, *args: str, timeout: int = 300, **env):
    return subprocess.run(["bash", str(ROOT / script), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=launch_env(**env))


def global_step(out) -> int:
    return json.loads((out / "trainer_state.json").read_text())["global_step"]


def sft(model_dir, out, **env):
    proc = run_sh("run_sft.sh", "--model_name_or_path", model_dir, "--output_dir", str(out), *SFT_FLAGS, **env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir, tmp_path_factory):
    """NPROC=2 bash run_sft.sh: the reference data-parallel run."""
    out = tmp_path_factory.mktemp("launch") / "nproc2"
    sft(tiny_model_dir, out, NPROC=2)
    return out


def test_two_processes_take_half_the_steps(tiny_model_dir, two_process_run, tmp_path):
    out1 = tmp_path / "nproc1"
    sft(tiny_model_dir, out1, NPROC=1)
    # 16 samples, 2 per process and step: one process takes 8 steps, two processes (4 samples a step) take 4
    assert global_step(out1) == 8
    assert global_step(two_process_run) == 4
    assert (two_process_run / "adapter_model.safetensors").is_file()


def test_two_nodes_on_one_machine_train_the_two_process_model(tiny_model_dir, two_process_run, tmp_path):
    """NNODES=2 launches (one process each) meeting at 127.0.0.1:<port>, as on two machines with their own disks:
    only node 0 writes its output folder (node 1 only its log), and the model equals the one-node, two-process run."""
    from safetensors.torch import load_file

    port = free_port()
    outs = [tmp_path / f"node{rank}" for rank in (0, 1)]
    procs = []
    for rank, out in enumerate(outs):
        env = launch_env(NPROC=1, NNODES=2, NODE_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            ["bash", str(ROOT / "run_sft.sh"), "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
             *SFT_FLAGS], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            results.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-4000:]
    assert (outs[0] / "adapter_model.safetensors").is_file()
    # node 1 writes no weights or state, only its own log (medgpt/logs.py: logs/train-rank1.log)
    assert not outs[1].exists() or sorted(p.name for p in outs[1].iterdir()) == ["logs"], \
        sorted(p.name for p in outs[1].iterdir())
    if outs[1].exists():
        assert [p.name for p in (outs[1] / "logs").iterdir()] == ["train-rank1.log"]
    assert global_step(outs[0]) == global_step(two_process_run) == 4
    ours = load_file(outs[0] / "adapter_model.safetensors")
    ref = load_file(two_process_run / "adapter_model.safetensors")
    assert set(ours) == set(ref)
    for name, tensor in ref.items():
        scale = tensor.abs().max().item() or 1.0
        assert (ours[name] - tensor).abs().max().item() <= 1e-5 * scale, name


LAUNCHED = ["run_pt.sh", "run_sft.sh", "run_rm.sh", "run_dpo.sh", "run_orpo.sh", "run_cpo.sh", "run_grpo.sh", "run_ppo.sh"]


def stage_args(script: str, tmp_path) -> list[str]:
    if script != "run_ppo.sh":
        return []
    # run_ppo.sh first checks that its input models exist; folders are enough to get past that to the launch
    (tmp_path / "sft").mkdir()
    (tmp_path / "rm").mkdir()
    return ["--sft_model_path", str(tmp_path / "sft"), "--reward_model_path", str(tmp_path / "rm")]


@pytest.mark.parametrize("script", LAUNCHED)
def test_bad_deepspeed_env_stops_with_one_line(script, tmp_path):
    proc = run_sh(script, "--output_dir", str(tmp_path / "out"), *stage_args(script, tmp_path), timeout=60,
                  DEEPSPEED="zero9.json")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: --deepspeed zero9.json: no such file (the repository has zero1.json, zero2.json, zero3.json and "
        "zero3_offload.json)"]
    assert not (tmp_path / "out").exists()


def test_bad_deepspeed_flag_stops_with_one_line(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2},\n "train_batch_size": }\n')
    proc = run_sh("run_sft.sh", "--deepspeed", str(bad), "--output_dir", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:2: not valid JSON"), proc.stderr[-3000:]
    proc = run_sh("run_dpo.sh", f"--deepspeed={tmp_path / 'missing.json'}", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --deepspeed {tmp_path / 'missing.json'}: no such file (the repository has zero1.json, zero2.json, "
        "zero3.json and zero3_offload.json)"]


@pytest.mark.parametrize("config", ["zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"])
def test_deepspeed_configs_parse(config):
    """The shipped configs pass the stages' own check and leave to transformers what it fills in ("auto")."""
    from medgpt.distributed import check_deepspeed_config

    cfg = check_deepspeed_config(str(ROOT / config))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert cfg[key] == "auto", key
    zero = cfg["zero_optimization"]
    assert zero["stage"] == int(config[4]) and zero["overlap_comm"] is False
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if config == "zero3_offload.json":
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
