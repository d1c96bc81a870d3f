"""Load a model (+ LoRA adapter) with its chat template and generate: one implementation shared by
inference.py, gradio_demo.py and the API server."""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .default_model import DEFAULT_TEMPLATE, is_default, resolve_model_path

logger = logging.getLogger(__name__)

RUN_INFO_FILE = "medgpt_run.json"  # written next to trained weights: which template they were trained with


def write_run_info(output_dir: str, **info) -> None:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_INFO_FILE)
    old = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    old.update({k: v for k, v in info.items() if v is not None})
    with open(path, "w", encoding="utf-8") as f:
        json.dump(old, f, indent=2, ensure_ascii=False)


def read_run_info(*folders: Optional[str]) -> dict:
    for folder in folders:
        if folder and os.path.isfile(os.path.join(folder, RUN_INFO_FILE)):
            with open(os.path.join(folder, RUN_INFO_FILE), encoding="utf-8") as f:
                return json.load(f)
    return {}


def _has_tokenizer(folder: Optional[str]) -> bool:
    return bool(folder) and os.path.isdir(folder) and any(
        os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


@dataclass
class GenerationOptions:
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0

    def kwargs(self) -> dict:
        do_sample = self.temperature is not None and self.temperature > 0
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": do_sample,
              "repetition_penalty": self.repetition_penalty}
        if do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


class ChatModel:
    """A base model, an optional LoRA adapter and a chat template, ready to answer."""

    def __init__(self, base_model: Optional[str] = None, lora_model: Optional[str] = None,
                 tokenizer_path: Optional[str] = None, template_name: Optional[str] = None,
                 system_prompt: Optional[str] = None, device: Optional[str] = None,
                 torch_dtype: Optional[str] = None, load_in_8bit: bool = False, load_in_4bit: bool = False,
                 trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .modeling import quantization_config, resolve_dtype
        from .templates import get_conv_template

        info = read_run_info(lora_model, base_model)
        if template_name is None:
            template_name = info.get("template_name") or (DEFAULT_TEMPLATE if is_default(base_model) else "vicuna")
        self.template = get_conv_template(template_name)
        self.system_prompt = system_prompt
        base_path = resolve_model_path(base_model)
        tok_path = tokenizer_path or (lora_model if _has_tokenizer(lora_model) else base_path)
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # batched generation continues each prompt at the right edge

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = resolve_dtype(torch_dtype) if self.device.type == "cuda" else torch.float32
        kwargs = {}
        q = quantization_config(type("A", (), {"load_in_4bit": load_in_4bit, "load_in_8bit": load_in_8bit})(), dtype)
        if q is not None:
            kwargs.update(quantization_config=q, device_map={"": self.device.index or 0} if self.device.type == "cuda" else "cpu")
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype if dtype != "auto" else "auto",
                                                     trust_remote_code=trust_remote_code, **kwargs)
        if len(self.tokenizer) > model.get_input_embeddings().weight.shape[0]:
            logger.info("Resizing embeddings to the tokenizer's %d tokens", len(self.tokenizer))
            model.resize_token_embeddings(len(self.tokenizer))
        if lora_model:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, lora_model)
            logger.info("Loaded LoRA adapter %s", lora_model)
        if q is None:
            model.to(self.device)
        model.eval()
        self.model = model
        self.model_name = os.path.basename(os.path.normpath(lora_model or base_path))
        self._lock = threading.Lock()  # one generate() at a time on a model

        # Stop at the template's end-of-turn as well as at eos.
        eos_ids = {self.tokenizer.eos_token_id}
        stop = self.template.stop_str
        if stop:
            ids = self.tokenizer.encode(stop, add_special_tokens=False)
            if len(ids) == 1:
                eos_ids.add(ids[0])
        self.eos_token_id = sorted(i for i in eos_ids if i is not None)
        self.stop_strings = [stop] if stop and len(self.tokenizer.encode(stop, add_special_tokens=False)) > 1 else None

    # ------------------------------------------------------------------------------------------
    def build_prompt(self, messages: list[dict], system_prompt: Optional[str] = None) -> str:
        """messages: role/content dicts ending with a user message."""
        if messages and messages[0]["role"] == "system":
            system_prompt, messages = messages[0]["content"], messages[1:]
        if system_prompt is None:
            system_prompt = self.system_prompt
        return self.template.render(messages, system_prompt=system_prompt, add_generation_prompt=True,
                                    eos_token=self.tokenizer.eos_token or "</s>")

    def _clean(self, text: str) -> str:
        stop = self.template.stop_str
        if stop and stop in text:
            text = text[: text.index(stop)]
        return text.strip()

    def _gen_kwargs(self, options: GenerationOptions) -> dict:
        kw = options.kwargs()
        kw.update(eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        if self.stop_strings:
            kw.update(stop_strings=self.stop_strings, tokenizer=self.tokenizer)
        return kw

    def generate_raw(self, prompts: list[str], options: GenerationOptions) -> list[str]:
        """Continue each prompt text (batched, left-padded); returns the new text of each."""
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with self._lock, torch.inference_mode():
            out = self.model.generate(**enc, **self._gen_kwargs(options))
        new = out[:, enc["input_ids"].shape[1]:]
        return [self._clean(self.tokenizer.decode(row, skip_special_tokens=True)) for row in new]

    def chat(self, conversations: list[list[dict]], options: GenerationOptions,
             system_prompt: Optional[str] = None) -> list[str]:
        return self.generate_raw([self.build_prompt(m, system_prompt) for m in conversations], options)

    def stream(self, messages: list[dict], options: GenerationOptions,
               system_prompt: Optional[str] = None, raw_prompt: Optional[str] = None) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        prompt = raw_prompt if raw_prompt is not None else self.build_prompt(messages, system_prompt)
        enc = self.tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        kwargs = dict(**enc, **self._gen_kwargs(options), streamer=streamer)
        error: list[BaseException] = []

        def run():
            try:
                with self._lock, torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as e:  # surface it in the consumer thread
                error.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        stop = self.template.stop_str
        emitted = ""
        for piece in streamer:
            emitted += piece
            if stop and stop in emitted:
                yield emitted[: emitted.index(stop)][len(emitted) - len(piece):]
                break
            yield piece
        thread.join()
        if error:
            raise error[0]
