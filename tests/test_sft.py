"""supervised_finetuning.py end to end on a tiny local model, as a user runs it."""
from __future__ import annotations

import json
import os

import pytest
from conftest import run_script

MESSAGES = "data/finetune/medical_sft_messages.jsonl"


def _eval_losses(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        state = json.load(f)
    return [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]


def _sft(model, out, *extra):
    return run_script("supervised_finetuning.py", "--model_name_or_path", model, "--train_file_dir", MESSAGES,
                      "--validation_file_dir", MESSAGES, "--output_dir", str(out), "--do_train", "--do_eval",
                      "--per_device_train_batch_size", "4", "--report_to", "none", "--logging_steps", "5", *extra)


def test_lora_sft_lowers_the_loss_and_saves_an_adapter(learnable_model_dir, tmp_path):
    out = tmp_path / "sft"
    _sft(learnable_model_dir, out, "--max_steps", "20", "--learning_rate", "1e-2", "--eval_on_start",
         "--eval_strategy", "steps", "--eval_steps", "20", "--save_steps", "10")
    before, after = _eval_losses(out)[0], _eval_losses(out)[-1]
    assert after < before - 1.0, (before, after)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_state.json",
                 "medgpt_run.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-20" / "optimizer.pt").is_file()
    assert json.loads((out / "medgpt_run.json").read_text())["template_name"] == "chatml"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_full_parameter_sft_saves_safetensors(tiny_model_dir, tmp_path):
    out = tmp_path / "full"
    _sft(tiny_model_dir, out, "--use_peft", "False", "--max_steps", "2", "--save_strategy", "no")
    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


def test_resume_from_checkpoint_continues(tiny_model_dir, tmp_path):
    out = tmp_path / "resume"
    _sft(tiny_model_dir, out, "--max_steps", "2", "--save_steps", "2")
    proc = _sft(tiny_model_dir, out, "--max_steps", "4", "--save_steps", "2",
                "--resume_from_checkpoint", str(out / "checkpoint-2"))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert "Continuing training from checkpoint" in proc.stderr + proc.stdout or (out / "checkpoint-4").is_dir()
    # without --overwrite_output_dir a rerun resumes from the last checkpoint by itself
    proc = _sft(tiny_model_dir, out, "--max_steps", "6", "--save_steps", "2")
    assert "Resuming from" in proc.stderr and "checkpoint-4" in proc.stderr


def test_config_yaml_and_medicalgpt_legacy_flags(tiny_model_dir, tmp_path):
    out = tmp_path / "cfg"
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ntrain_file_dir: {MESSAGES}\nmax_steps: 1\n"
                   f"output_dir: {out}\ndo_train: true\nreport_to: none\nlora_rank: 4\n")
    # legacy flags from MedicalGPT's run_sft.sh: --evaluation_strategy, --warmup_ratio, --overwrite_output_dir,
    # --bf16 and --torch_dtype bfloat16 on a CPU machine
    run_script("supervised_finetuning.py", "--config", str(cfg), "--evaluation_strategy", "no", "--warmup_ratio",
               "0.05", "--overwrite_output_dir", "--bf16", "--torch_dtype", "bfloat16", "--model_type", "auto",
               "--lora_rank", "2")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2  # the command line wins


def test_malformed_data_is_one_line_error_with_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}\n'
        '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}\n')
    proc = run_script("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir",
                      str(data), "--output_dir", str(tmp_path / "o"), "--do_train", "--report_to", "none", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "train.jsonl:2: invalid JSON" in last
    assert "Traceback" not in proc.stderr


def test_help_lists_medicalgpt_flags():
    out = run_script("supervised_finetuning.py", "--help").stdout
    for flag in ("--model_name_or_path", "--tokenizer_name_or_path", "--train_file_dir", "--validation_file_dir",
                 "--dataset_name", "--template_name", "--use_peft", "--target_modules", "--lora_rank", "--lora_alpha",
                 "--lora_dropout", "--modules_to_save", "--peft_path", "--qlora", "--load_in_4bit", "--load_in_8bit",
                 "--model_max_length", "--max_train_samples", "--max_eval_samples", "--preprocessing_num_workers",
                 "--torch_dtype", "--train_on_inputs", "--neft_alpha", "--rope_scaling", "--flash_attn", "--config",
                 "--per_device_train_batch_size", "--learning_rate", "--gradient_checkpointing", "--deepspeed",
                 "--resume_from_checkpoint", "--skip_invalid_records"):
        assert flag in out, flag


def test_qlora_4bit_trains_on_cpu_or_says_why(tiny_model_dir, tmp_path):
    out = tmp_path / "qlora"
    proc = _sft(tiny_model_dir, out, "--load_in_4bit", "True", "--qlora", "True", "--max_steps", "2",
                "--save_strategy", "no")
    assert (out / "adapter_model.safetensors").is_file(), proc.stderr[-2000:]


def test_rope_scaling_factor_follows_the_training_length():
    """--rope_scaling: factor ceil(training length / native context) as in MedicalGPT, 1 when there is nothing to
    extend, or --rope_scaling_factor."""
    from transformers import LlamaConfig

    from medgpt.modeling import _set_rope_scaling

    def factor(*args):
        config = LlamaConfig(max_position_embeddings=1024)
        _set_rope_scaling(config, "linear", *args)
        return config.rope_parameters["factor"], config.rope_parameters["rope_type"]

    assert factor(None, 3000) == (3.0, "linear")
    assert factor(None, 512) == (1.0, "linear")
    assert factor(None, None) == (1.0, "linear")
    assert factor(4.0, 512) == (4.0, "linear")
