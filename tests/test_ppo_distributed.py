"""PPO under torchrun (2 processes, gloo on this CPU machine): one policy trained data-parallel, equal to one process
with the same global batch, with plain torchrun (gradients all-reduced) and with --deepspeed zero2.json; each process
generates and scores its half of every batch; only the main process writes; a run resumed from a checkpoint continues
like an uninterrupted one; ZeRO-3 and bad batch sizes are one-line errors."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import ROOT, run_script, run_torchrun
from test_ppo import ONE_THREAD, build_reward_model, build_yes_no_model, load_safetensors, one_thread  # noqa: F401

B = 2  # rollouts per process and step
STEPS = 4


def build_yes_no_stop_model(path, tokenizer) -> str:
    """test_ppo's yes/no model with <|im_end|> nearly as likely as yes or no: responses stop after a varying number
    of tokens, so the padding masks and token counts differ between samples and between processes."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(build_yes_no_model(str(path) + "-base", tokenizer))
        with torch.no_grad():
            model.lm_head.weight[tokenizer.convert_tokens_to_ids("<|im_end|>"), 0] = 1.4
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory, smol_tokenizer):
    """A tiny policy that says yes/no and stops after a varying number of tokens, and a tiny reward model."""
    base = tmp_path_factory.getbasetemp()
    return (build_yes_no_stop_model(base / "yes-no-stop-model", smol_tokenizer),
            build_reward_model(base / "ppo-dist-rm", smol_tokenizer))


def ppo_args(models, out, *extra) -> list[str]:
    """STEPS steps of 2*B rollouts (the global batch), checkpoint at step 2; SGD, so float rounding is not amplified
    the way Adam's first steps amplify it for near-zero gradients."""
    policy, rm = models
    return ["--model_name_or_path", policy, "--reward_model_path", rm, "--template_name", "chatml",
            "--train_file_dir", "data/finetune", "--output_dir", str(out),
            "--per_device_train_batch_size", str(B), "--batch_size", str(2 * B), "--num_ppo_epochs", "2",
            "--response_length", "6", "--max_steps", str(STEPS), "--save_steps", "2", "--optim", "sgd",
            "--learning_rate", "0.1", "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0",
            "--kl_coef", "0.05", "--seed", "3", "--report_to", "none", "--logging_steps", "1", *extra]


def log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "ppo_log.jsonl").read_text().splitlines()]


# statistics built from differences of log-probs (O(1) values whose float32 rounding differs with the batch padding
# and composition of each process) are compared to 1e-5 absolute: e.g. the policy loss, a mean of whitened (zero-mean)
# advantages, is a near-cancelling sum
LOGPROB_STATS = {"kl", "non_score_reward", "policy_loss", "approx_kl", "clipfrac", "ratio", "entropy"}


def assert_close(a: dict, b: dict, where: str, rel: float = 1e-5):
    for key, va in a.items():
        if key == "elapsed_s" or not isinstance(va, (int, float)):
            continue
        vb = b[key]
        atol = 1e-5 if key in LOGPROB_STATS else 1e-8
        assert abs(va - vb) <= rel * max(abs(va), abs(vb)) + atol, f"{where}: {key} {va} != {vb}"


def rel_diff(a: dict, b: dict, trained_from_zero: bool = True) -> float:
    """||a - b|| / ||a|| over the tensors that training moves from zero (LoRA B, the value head): the update itself.
    (LoRA A starts random and moves little, so it would hide a wrong update.)"""
    assert set(a) == set(b)
    keys = [k for k in a if not trained_from_zero or "lora_A" not in k]
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in keys) ** 0.5
    return (num / sum((a[k].double() ** 2).sum() for k in keys) ** 0.5).item()


@pytest.fixture(scope="module")
def one_process(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-1proc") / "out"
    run_script("ppo_training.py", *ppo_args(models, out), env=ONE_THREAD)
    return out


@pytest.fixture(scope="module")
def two_processes(models, tmp_path_factory):
    parent = tmp_path_factory.mktemp("ppo-2proc")
    run_torchrun("ppo_training.py", *ppo_args(models, parent / "out"), nproc=2)
    return parent / "out"


@pytest.fixture(scope="module")
def two_processes_zero2(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-2proc-zero2") / "out"
    run_torchrun("ppo_training.py", *ppo_args(models, out, "--deepspeed", "zero2.json"), nproc=2)
    return out


def test_torchrun_trains_one_policy_like_one_process(one_process, two_processes, models):
    """2 processes x B rollouts == 1 process x 2B rollouts: the same statistics at every step (rewards and KL
    gathered over both processes, losses normalised by the token count of both) and the same trained adapter and
    value head. Were the processes training independently (no gradient all-reduce), each would step on its own half
    of the batch and the weights would differ by far more than float rounding."""
    one, two = log(one_process), log(two_processes)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1)) and [r["episode"] for r in two] == [4, 8, 12, 16]
    assert one[0]["response_length"] < 6 and len({r["response_length"] for r in one}) > 1  # masks matter
    for a, b in zip(one, two):
        assert_close(a, b, f"step {a['step']}")

    for name in ("adapter_model.safetensors", "value_head.safetensors", "checkpoint-2/adapter_model.safetensors"):
        w1, w2 = load_safetensors(one_process / name), load_safetensors(two_processes / name)
        assert rel_diff(w1, w2) < 2e-5, name
    adapter = load_safetensors(two_processes / "adapter_model.safetensors")
    assert sum(adapter[k].norm() for k in adapter if "lora_B" in k) > 1e-3  # trained away from B = 0


def test_torchrun_writes_one_output_that_loads(one_process, two_processes, models):
    """Only the main process writes: the parent folder holds the one output folder, with the same files as a
    one-process run's, and the adapter loads on its base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert os.listdir(two_processes.parent) == ["out"]

    def files(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

    # rank 1 may leave its own warnings log (medgpt/logs.py: logs/train-rank1.log, WARNING and up only); every
    # other file is written by the main process alone
    rank_logs = [f for f in files(two_processes) if f.startswith("logs/train-rank")]
    assert rank_logs in ([], ["logs/train-rank1.log"])
    for f in rank_logs:
        lines = [line for line in (two_processes / f).read_text().splitlines() if line and not line.startswith("=====")]
        assert all("| INFO " not in line for line in lines), lines
    assert [f for f in files(two_processes) if f not in rank_logs] == files(one_process)
    state = json.loads((two_processes / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS and state["world_size"] == 2 and state["batch_size"] == 2 * B
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models[0]), str(two_processes))
    ids = torch.tensor([[5, 6, 7]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3


def test_zero2_trains_one_policy_like_one_process(one_process, two_processes_zero2):
    """--deepspeed zero2.json (optimizer state partitioned over the 2 processes, gradients reduce-scattered): the
    same statistics and weights as one process."""
    for a, b in zip(log(one_process), log(two_processes_zero2)):
        assert_close(a, b, f"step {a['step']}")
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        assert rel_diff(load_safetensors(one_process / name), load_safetensors(two_processes_zero2 / name)) < 2e-5, name
    ckpt = two_processes_zero2 / "checkpoint-2" / "deepspeed"
    assert sorted(os.listdir(ckpt)) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.parametrize("deepspeed", [False, True], ids=["ddp", "zero2"])
def test_torchrun_resume_continues_like_an_uninterrupted_run(request, models, tmp_path, deepspeed):
    """Resume (2 processes, --resume_from_checkpoint True) from checkpoint-2 of the 4-step run: steps 3-4 have the
    statistics of the uninterrupted run, and the final weights match (with plain torchrun and under ZeRO-2, whose
    checkpoint holds each process's optimizer partition and the fp32 weights)."""
    full_run = request.getfixturevalue("two_processes_zero2" if deepspeed else "two_processes")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    extra = ["--deepspeed", "zero2.json"] if deepspeed else []
    run_torchrun("ppo_training.py", *ppo_args(models, out, "--resume_from_checkpoint", "True", *extra), nproc=2)
    resumed, full = log(out), log(full_run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(full, resumed):
        assert_close(a, b, f"step {a['step']}", rel=1e-6)
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        assert rel_diff(load_safetensors(full_run / name), load_safetensors(out / name)) < 1e-6, name


DRIVER = """
import json, os, sys
sys.path[:0] = [{root!r}, {tests!r}]
from medgpt.distributed import configure_launch
configure_launch([])  # as the scripts do: several processes without CUDA -> gloo
from test_ppo import make_trainer, chat_prompts, yes_fraction

out = sys.argv[2]
calls = []
def reward(messages, texts):
    calls.append({{"prompts": [m[-1]["content"] for m in messages], "texts": texts}})
    return yes_fraction(texts)

trainer, _ = make_trainer(sys.argv[1], None, reward, __import__("pathlib").Path(out), steps=3, batch_size=8,
                          mini_batch_size=8, num_ppo_epochs=1, response_length=6)
prompts = chat_prompts(trainer.tokenizer, [f"question {{i}}" for i in range(12)])
trainer.train(prompts)
with open(os.path.join(out, "calls-%s.json" % os.environ.get("RANK", "single")), "w") as f:
    json.dump(calls, f)
"""


def test_each_process_generates_and_scores_its_half_of_every_batch(models, tmp_path):
    """PPOTrainer with a rule reward that records what it scores: under 2 processes each scores 4 of every batch of
    8 prompts, rank 0 the first half, rank 1 the second, and their responses are those of a one-process run (sampling
    is seeded per sample, not per process)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    run_torchrun(str(driver), models[0], str(tmp_path / "two"), nproc=2)
    run_script(str(driver), models[0], str(tmp_path / "one"), env=ONE_THREAD)
    single = json.loads((tmp_path / "one" / "calls-single.json").read_text())
    rank0 = json.loads((tmp_path / "two" / "calls-0.json").read_text())
    rank1 = json.loads((tmp_path / "two" / "calls-1.json").read_text())
    assert len(single) == len(rank0) == len(rank1) == 3
    for step, (s, r0, r1) in enumerate(zip(single, rank0, rank1)):
        assert len(r0["prompts"]) == len(r1["prompts"]) == 4, step
        assert r0["prompts"] + r1["prompts"] == s["prompts"], step
        assert r0["texts"] + r1["texts"] == s["texts"], step
    assert rank0[0]["prompts"] != rank1[0]["prompts"]
    one, two = log(tmp_path / "one" / "ppo"), log(tmp_path / "two" / "ppo")
    for a, b in zip(one, two):
        assert_close(a, b, f"step {a['step']}")


def test_zero3_is_a_one_line_error(models, tmp_path):
    proc = run_script("ppo_training.py", *ppo_args(models, tmp_path / "out"), "--deepspeed", "zero3.json",
                      check=False, env=ONE_THREAD)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: --deepspeed zero3.json: PPO cannot run under ZeRO-3 ("), \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    ({"batch_size": 6}, "error: --batch_size 6 does not split over 4 processes"),
    ({"batch_size": 8, "mini_batch_size": 2}, "error: --mini_batch_size 2 does not split over 4 processes"),
    ({"temperature": 0.0}, "error: --temperature must be > 0"),
])
def test_batch_layout_errors(flags, message):
    from transformers import TrainingArguments

    from medgpt.trainers.ppo import PPOArguments, batch_layout

    targs = TrainingArguments(output_dir="unused", per_device_train_batch_size=2, report_to=[])
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        batch_layout(PPOArguments(**flags), targs, world=4)
    # the default batch: per-device batch x gradient accumulation x processes, each process taking its share
    assert batch_layout(PPOArguments(), targs, world=4) == {"batch": 8, "mini": 8, "local_batch": 2, "local_mini": 2,
                                                             "micro": 2}
