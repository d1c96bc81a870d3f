"""merge_peft_adapter.py and inference.py on a tiny model with a trained LoRA adapter."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script


@pytest.fixture(scope="module")
def adapter_dir(learnable_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    run_script("supervised_finetuning.py", "--model_name_or_path", learnable_model_dir, "--train_file_dir",
               "data/finetune/medical_sft_messages.jsonl", "--output_dir", str(out), "--do_train", "--max_steps", "3",
               "--learning_rate", "1e-2", "--report_to", "none", "--save_strategy", "no")
    return str(out)


def test_merged_logits_equal_base_plus_adapter(learnable_model_dir, adapter_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    run_script("merge_peft_adapter.py", "--base_model", learnable_model_dir, "--lora_model", adapter_dir,
               "--output_dir", str(merged_dir))
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 520, 3412, 88, 2, 1, 9004, 42]])
    base = AutoModelForCausalLM.from_pretrained(learnable_model_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, adapter_dir).eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-4, rtol=1e-4)


def test_merge_rejects_a_folder_without_adapter(tmp_path):
    proc = run_script("merge_peft_adapter.py", "--lora_model", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                      check=False)
    assert proc.returncode == 2 and "not a LoRA adapter folder" in proc.stderr.strip().splitlines()[-1]


def test_inference_data_file_writes_one_prediction_a_line(learnable_model_dir, adapter_dir, tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_text("What is hypertension?\n\n高血压怎么办？\nHow much water should I drink?\n", encoding="utf-8")
    preds = tmp_path / "out" / "pred.jsonl"
    run_script("inference.py", "--base_model", learnable_model_dir, "--lora_model", adapter_dir, "--with_prompt",
               "--data_file", str(questions), "--predictions_file", str(preds), "--max_new_tokens", "8",
               "--temperature", "0", "--eval_batch_size", "2")
    lines = preds.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    rows = [json.loads(line) for line in lines]
    assert [r["Input"] for r in rows] == ["What is hypertension?", "高血压怎么办？", "How much water should I drink?"]
    assert all(isinstance(r["Output"], str) for r in rows)


def test_batched_generation_equals_one_at_a_time(learnable_model_dir, adapter_dir):
    """Left padding in a batch must not change greedy answers."""
    from medgpt.generation import ChatModel, GenerationOptions

    chat = ChatModel(learnable_model_dir, adapter_dir, device="cpu")
    opts = GenerationOptions(max_new_tokens=6, temperature=0)
    convs = [[{"role": "user", "content": q}] for q in ("Hi", "What causes a fever in young children?")]
    assert chat.chat(convs, opts) == [chat.chat([c], opts)[0] for c in convs]
    assert "".join(chat.stream(convs[1], opts)).strip() == chat.chat([convs[1]], opts)[0]


def test_inference_interactive_streams_and_clears(learnable_model_dir, adapter_dir):
    import subprocess
    import sys

    from conftest import ROOT
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--base_model", learnable_model_dir,
                           "--lora_model", adapter_dir, "--with_prompt", "--interactive", "--max_new_tokens", "4",
                           "--temperature", "0"], input="hello\nclear\nsecond question\nexit\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("Assistant: ") == 2 and "(history cleared)" in proc.stdout


def test_inference_missing_data_file_is_a_clear_error(tmp_path):
    proc = run_script("inference.py", "--with_prompt", "--data_file", str(tmp_path / "nope.txt"), check=False)
    assert proc.returncode == 2 and "nope.txt: no such file" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_embedded_default_model_answers(default_model_dir):
    proc = run_script("inference.py", "--with_prompt", "--prompt", "What is the capital of France?",
                      "--max_new_tokens", "16", "--temperature", "0")
    assert "Paris" in proc.stdout
