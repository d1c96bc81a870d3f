"""GRPO: the rule rewards of medgpt/rewards.py, and grpo_training.py (TRL's GRPOTrainer, generation on CPU)
raising a reward on a toy task with a tiny model."""
from __future__ import annotations

import json

import pytest

from conftest import run_script
from test_ppo import ONE_THREAD, build_yes_no_model, one_thread  # noqa: F401  (one_thread: autouse fixture)

from medgpt.rewards import (accuracy_reward, answers_match, extract_answer, format_reward, get_reward_funcs,
                            normalize_text)


# ---------------------------------------------------------------------------------------------------
# Rewards

@pytest.mark.parametrize("predicted, gold", [
    ("7", "7.0"), ("7.0", "7"), ("about 37 degrees", "37"), ("1,000", "1000"), ("The answer is 4.", "4"),
    ("-3", "-3"), ("0.5", ".5"), ("100.4°F", "100.4"), ("reasoning... #### 42", "xx #### 42"),
    ("Pancreas", "pancreas"), ("The pancreas.", "pancreas"), ("维生素C。", "维生素C"), ("o  negative", "O negative"),
])
def test_answers_match(predicted, gold):
    if "####" in predicted:
        predicted = predicted.split("####")[1]
    assert answers_match(predicted, gold)


@pytest.mark.parametrize("predicted, gold", [
    ("8", "7"), ("7 or 8", "7"), ("", "4"), ("no number", "4"), ("liver", "pancreas"),
    ("a long essay that mentions the pancreas among many other organs of the body", "pancreas"), ("x", ""),
])
def test_answers_do_not_match(predicted, gold):
    assert not answers_match(predicted, gold)


def test_extract_answer_takes_the_last_answer_tag():
    assert extract_answer("<think>maybe 3</think><answer> 4 </answer>") == "4"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("  just 5 ") == "just 5"
    assert normalize_text("  Hello,   World! ") == "hello, world"


def test_accuracy_and_format_rewards():
    completions = [
        "<think>The heart has four chambers.</think><answer>4</answer>",
        "<think>\nhmm\n</think>\n<answer>\n4.0\n</answer>\n",
        "<answer>5</answer>",
        "It is 4",
        "<think>a</think><think>b</think><answer>4</answer>",
    ]
    answers = ["4"] * len(completions)
    assert accuracy_reward(completions, answers) == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    # conversational completions (lists of messages) work too
    assert accuracy_reward([[{"role": "assistant", "content": "<answer>4</answer>"}]], ["4"]) == [1.0]
    assert format_reward([[{"role": "assistant", "content": "<think>x</think><answer>4</answer>"}]]) == [1.0]


def test_get_reward_funcs(tmp_path, monkeypatch):
    assert get_reward_funcs("accuracy, format") == [accuracy_reward, format_reward]
    with pytest.raises(SystemExit, match="unknown reward 'exact'"):
        get_reward_funcs("exact")
    (tmp_path / "my_rewards.py").write_text("def short(completions, **kw):\n    return [1.0 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_reward_funcs("my_rewards:short")[0](["a"]) == [1.0]
    with pytest.raises(SystemExit, match="cannot import"):
        get_reward_funcs("my_rewards:missing")


def test_medicalgpt_trl_flags_are_translated():
    import grpo_training

    argv = ["--lora_target_modules", "q_proj", "k_proj", "--lora_r", "16", "--dtype", "bfloat16", "--use_peft", "True"]
    assert grpo_training._medicalgpt_trl_flags(argv) == [
        "--target_modules", "q_proj,k_proj", "--lora_rank", "16", "--torch_dtype", "bfloat16", "--use_peft", "True"]


# ---------------------------------------------------------------------------------------------------
# The script

TOY_REWARD = '''
def yes_reward(completions, **kwargs):
    """Fraction of yes among the yes/no the model says."""
    out = []
    for c in completions:
        y, n = c.count("yes"), c.count("no")
        out.append(y / max(y + n, 1))
    return out
'''


def test_grpo_raises_a_rule_reward(tmp_path, tmp_path_factory, smol_tokenizer):
    """grpo_training.py (LoRA, transformers generation on CPU, no vLLM) on a toy task: the reward for saying
    "yes" rises within a few steps; the adapter and run info are saved and inference.py loads them."""
    model = build_yes_no_model(tmp_path_factory.getbasetemp() / "yes-no-model", smol_tokenizer)
    (tmp_path / "toy_rewards.py").write_text(TOY_REWARD)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "yes"}) + "\n" for q in ("hi", "hello", "ok", "why")))
    out = tmp_path / "grpo"
    proc = run_script("grpo_training.py", "--model_name_or_path", model, "--template_name", "chatml",
                      "--system_prompt", "", "--train_file_dir", str(data), "--output_dir", str(out),
                      "--reward_funcs", "toy_rewards:yes_reward,format", "--num_generations", "8",
                      "--per_device_train_batch_size", "8", "--max_steps", "5", "--max_completion_length", "10",
                      "--learning_rate", "3e-3", "--logging_steps", "1", "--gradient_checkpointing", "False",
                      "--report_to", "none", "--save_strategy", "no", env={**ONE_THREAD, "PYTHONPATH": str(tmp_path)})
    assert "LoRA layers: one fused CPU op" in proc.stderr  # our CPU fast paths (medgpt.kernels.use_cpu_fast_paths)
    state = json.loads((out / "trainer_state.json").read_text())
    rewards = [h["reward"] for h in state["log_history"] if "reward" in h]
    assert len(rewards) == 5
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.2, rewards
    assert (out / "adapter_model.safetensors").is_file()
    info = json.loads((out / "medgpt_run.json").read_text())
    assert info["template_name"] == "chatml" and info["stage"] == "grpo"
    run_script("inference.py", "--base_model", model, "--lora_model", str(out), "--with_prompt", "--prompt", "hi",
               "--max_new_tokens", "5", "--temperature", "0", env=ONE_THREAD)


def test_grpo_data_errors_name_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q", "answer": "4"}\n{"question": "q2"}\n')
    proc = run_script("grpo_training.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data),
                      "--output_dir", str(tmp_path / "o"), "--report_to", "none", check=False, env=ONE_THREAD)
    assert proc.returncode == 2 and f"{data}:2: missing field 'answer'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
