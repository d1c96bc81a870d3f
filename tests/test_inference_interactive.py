"""inference.py --interactive without --with_prompt (issue 14 item 6): a chat model gets its chat template by
default, raw mode says what it does, and an empty generation is never shown as a silent blank."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, build_tiny_model


def run_interactive(*args: str, stdin: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--interactive", "--temperature", "0", *args],
                          input=stdin, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def answers(stdout: str) -> list[str]:
    """The text printed after each 'Assistant: ' prompt."""
    return [part.split("\nUser:")[0].strip() for part in stdout.split("Assistant: ")[1:]]


@pytest.fixture(scope="module")
def silent_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny model that only ever generates token 0 (<|endoftext|>, a special token): its final norm is zero, so
    every logit is 0 and greedy decoding takes the first id. Its answers decode to empty text."""
    import torch
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("tiny-silent"), smol_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(path)
    return path


def test_chat_model_gets_its_template_by_default_on_every_turn(tiny_model_dir):
    proc = run_interactive("--base_model", tiny_model_dir, "--max_new_tokens", "4",
                           stdin="hello\nsecond question\nthird one\nexit\n")
    assert "Chat mode: inputs are wrapped in the vicuna chat template" in proc.stderr  # MedicalGPT's default
    assert "Chat with the model" in proc.stdout
    got = answers(proc.stdout)
    assert len(got) == 3 and all(got), got  # the second and later turns answer too


def test_empty_generation_is_never_a_silent_blank(silent_model_dir):
    proc = run_interactive("--base_model", silent_model_dir, "--max_new_tokens", "3", stdin="hello\nagain\nexit\n")
    got = answers(proc.stdout)
    assert got == ["(no text: the model ended its answer at once)"] * 2, got

    proc = run_interactive("--base_model", silent_model_dir, "--max_new_tokens", "3", "--raw",
                           stdin="hello\nagain\nexit\n")
    assert "Raw mode: each line you type is continued as plain text" in proc.stdout
    assert "Raw mode: each input is continued as plain text, no chat template (--raw)" in proc.stderr
    got = answers(proc.stdout)
    assert len(got) == 2 and all("no text" in a and "drop --raw" in a for a in got), got


def test_prompt_mode_warns_on_an_empty_answer(silent_model_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--base_model", silent_model_dir, "--raw",
                           "--prompt", "hi", "--max_new_tokens", "2", "--temperature", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("warning: (no text: the model ended its answer at once")


def test_base_model_without_a_chat_template_stays_raw(tmp_path, smol_tokenizer):
    """A base model (no chat template in its tokenizer, no run info) keeps raw mode by default, as before."""
    import inference
    from medgpt.generation import ChatModel

    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tok.chat_template = None
    path = build_tiny_model(tmp_path / "base", tok)
    assert not ChatModel(path, device="cpu").is_chat_model
    assert ChatModel(path, device="cpu", template_name="chatml").is_chat_model  # --template_name: a chat model
    assert inference.parse_args(["--base_model", path, "--interactive"]).with_prompt is None  # decided on load
    assert inference.parse_args(["--interactive", "--raw"]).with_prompt is False
    assert inference.parse_args(["--interactive", "--with_prompt"]).with_prompt is True


@pytest.mark.slow
def test_embedded_model_answers_every_turn_without_with_prompt():
    """The reported case: the embedded SmolLM2-135M-Instruct, --interactive, no --with_prompt."""
    proc = run_interactive("--max_new_tokens", "24",
                           stdin="What is a fever?\nHow is it treated?\nWhat about a headache?\nexit\n")
    got = answers(proc.stdout)
    assert len(got) == 3 and all(len(a) > 10 for a in got), got
    proc = run_interactive("--max_new_tokens", "24", "--raw", stdin="What is a fever?\nexit\n")
    assert "drop --raw" in answers(proc.stdout)[0]
