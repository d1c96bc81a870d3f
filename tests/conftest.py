"""Shared fixtures: a tiny random Llama built locally (seconds to train) that uses the embedded
SmolLM2 tokenizer (ChatML special tokens), saved as an ordinary HF folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from medgpt.default_model import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def smol_tokenizer(default_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model_dir)


def build_tiny_model(path, tokenizer, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


def run_script(script: str, *args: str, timeout: int = 600, check: bool = True, cwd=None, env=None):
    """Run a top-level script as a user would; returns the CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def lora_layers(model) -> list:
    """The peft LoRA layers of `model` (those with a base layer)."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def fused_lora_layers(model) -> int:
    """How many LoRA layers of `model` run medgpt's fused CPU forward (medgpt.kernels.lora.use_fused_lora)."""
    from medgpt.kernels.lora import _fused_forward

    return sum(getattr(m.forward, "__func__", None) is _fused_forward for m in lora_layers(model))


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600, check: bool = True, env=None,
                 launcher_args=()):
    """Run a top-level script under `torchrun --nproc_per_node nproc` (gloo on this CPU machine), as a user would.
    `launcher_args` go to torchrun before the script (default: --standalone, a free rendezvous port)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    launcher = list(launcher_args) or ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(nproc),
           str(ROOT / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def learnable_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny model whose weights are large enough (init std 0.2) for LoRA alone to move the loss a lot:
    with the default 0.02 init the frozen, tied output embeddings cap the logits near uniform."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-learnable"), smol_tokenizer, initializer_range=0.2)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class running_server:
    """`with running_server(script, args, url, log_path) as proc:` starts a top-level server script, waits
    (bounded) until GET url answers, and always stops it on exit."""

    def __init__(self, script: str, args, url: str, log_path, timeout: float = 180):
        self.script, self.args, self.url, self.log_path, self.timeout = script, list(args), url, log_path, timeout

    def __enter__(self):
        import time
        import urllib.error
        import urllib.request

        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / self.script), *self.args], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                return self.proc
            except urllib.error.HTTPError:  # it answers, if only with an error status
                return self.proc
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise AssertionError(f"{self.script} did not come up within {self.timeout:.0f}s:\n"
                             f"{open(self.log_path).read()[-4000:]}")

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.log.close()
        return False
