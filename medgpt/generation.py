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
        template_given = template_name is not None or bool(info.get("template_name"))
        if template_name is None:
            template_name = info.get("template_name") or (DEFAULT_TEMPLATE if is_default(base_model) else "vicuna")
        self.template = get_conv_template(template_name)
        self.system_prompt = system_prompt
        base_path = resolve_model_path(base_model)
        tok_path = tokenizer_path or (lora_model if _has_tokenizer(lora_model) else base_path)
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        # A chat model: its tokenizer ships a chat template, it was trained here with one (run info), or the
        # user named one. Such a model answers a raw, unwrapped question with end-of-turn at once.
        self.is_chat_model = template_given or bool(getattr(self.tokenizer, "chat_template", None))
        self.tokenizer.padding_side = "left"  # batched generation continues each prompt at the right edge

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = resolve_dtype(torch_dtype) if self.device.type == "cuda" or torch_dtype else torch.float32
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
            if q is None:  # inference only: merged, a plain model (LoRA's extra small matmuls and adds per layer
                # double a CPU decode step); a quantized base keeps the adapter beside it (merging would round it)
                model = model.merge_and_unload()
                logger.info("Loaded LoRA adapter %s (merged into the base weights for inference)", lora_model)
            else:
                logger.info("Loaded LoRA adapter %s", lora_model)
        if q is None:
            model.to(self.device)
        model.eval()
        self.model = model
        self.model_name = os.path.basename(os.path.normpath(lora_model or base_path))
        self._lock = threading.Lock()  # one generate() at a time on a model
        self._stop_cache: dict = {}  # stop strings -> StopStringCriteria (see _stop_criteria)

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

    def _stops(self, stop: Optional[list[str]] = None) -> list[str]:
        """The template's end-of-turn string plus a request's own stop strings."""
        stops = [self.template.stop_str] if self.template.stop_str else []
        return stops + [s for s in (stop or []) if s and s not in stops]

    def _clean(self, text: str, stop: Optional[list[str]] = None) -> str:
        cut = _first_stop(text, self._stops(stop))
        if cut is not None:
            text = text[:cut]
        return text.strip()

    def _gen_kwargs(self, options: GenerationOptions, stop: Optional[list[str]] = None) -> dict:
        kw = options.kwargs()
        kw.update(eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        stop_strings = (self.stop_strings or []) + [s for s in (stop or []) if s]
        if stop_strings:
            from transformers import StoppingCriteriaList
            kw.update(stopping_criteria=StoppingCriteriaList([self._stop_criteria(tuple(stop_strings))]))
        return kw

    def _stop_criteria(self, stop_strings: tuple[str, ...]):
        # generate(stop_strings=...) rebuilds its token tables over the whole vocabulary on every call
        # (~0.2-1 s here); clients repeat the same stop strings, so keep the last few built.
        from transformers import StopStringCriteria

        cache = self._stop_cache
        if stop_strings not in cache:
            if len(cache) >= 16:
                cache.pop(next(iter(cache)))
            cache[stop_strings] = StopStringCriteria(self.tokenizer, list(stop_strings))
        return cache[stop_strings]

    @property
    def context_length(self) -> int:
        """How many tokens (prompt + answer) the model can attend to."""
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(getattr(cfg, name, None), int):
                return getattr(cfg, name)
        return 2048

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generated_length(self, row: list[int]) -> tuple[int, bool]:
        """(tokens generated in this row, whether it ended with eos / end-of-turn)."""
        for i, t in enumerate(row):
            if t in self.eos_token_id:
                return i + 1, True
        n = len(row)  # a row stopped early by a stop string is padded up to the batch's longest
        while n and row[n - 1] == self.tokenizer.pad_token_id:
            n -= 1
        return n, False

    def complete(self, prompts: list[str], options: GenerationOptions,
                 stop: Optional[list[str]] = None) -> list["Completion"]:
        """Continue each prompt text (batched, left-padded): the new text of each with its token counts."""
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with self._lock, torch.inference_mode():
            out = self.model.generate(**enc, **self._gen_kwargs(options, stop))
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        results = []
        for row, n_prompt in zip(new, enc["attention_mask"].sum(dim=1).tolist()):
            n, ended = self._generated_length(row)
            raw = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            stopped = ended or _first_stop(raw, self._stops(stop)) is not None or n < options.max_new_tokens
            results.append(Completion(self._clean(raw, stop), int(n_prompt), n, "stop" if stopped else "length"))
        return results

    def generate_raw(self, prompts: list[str], options: GenerationOptions) -> list[str]:
        """Continue each prompt text (batched, left-padded); returns the new text of each."""
        return [c.text for c in self.complete(prompts, options)]

    def chat(self, conversations: list[list[dict]], options: GenerationOptions,
             system_prompt: Optional[str] = None) -> list[str]:
        return self.generate_raw([self.build_prompt(m, system_prompt) for m in conversations], options)

    def stream(self, messages: list[dict], options: GenerationOptions,
               system_prompt: Optional[str] = None, raw_prompt: Optional[str] = None) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated."""
        prompt = raw_prompt if raw_prompt is not None else self.build_prompt(messages, system_prompt)
        yield from self.stream_completion(prompt, options)

    def stream_completion(self, prompt: str, options: GenerationOptions,
                          stop: Optional[list[str]] = None) -> "CompletionStream":
        """Like complete() for one prompt, streamed: iterate for text pieces, then read .completion."""
        return CompletionStream(self, prompt, options, stop)


@dataclass
class Completion:
    """One generated answer with its token counts (an API's usage figures)."""
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": eos, end of turn or a stop string; "length": max_new_tokens reached


def _first_stop(text: str, stops: list[str]) -> Optional[int]:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that could still grow into a stop string (not sent yet)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def _counting_streamer(tokenizer, **kwargs):
    """A transformers TextIteratorStreamer that also counts the generated tokens (usage figures)."""
    from transformers import TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        n_tokens = 0
        last_token: Optional[int] = None

        def put(self, value):
            if not self.next_tokens_are_prompt:  # the first put() is the prompt itself
                ids = value.reshape(-1).tolist()
                self.n_tokens += len(ids)
                self.last_token = ids[-1] if ids else self.last_token
            super().put(value)

    return CountingStreamer(tokenizer, **kwargs)


class CompletionStream:
    """The pieces of one answer as they are generated. The pieces join to exactly what complete() returns
    (stripped, cut before the first stop string: a piece that might begin a stop string is held back
    until it is known not to). After the last piece, .completion holds the text and token counts.
    Leaving the loop early (break, close(), an error in the consumer) stops generation at the next token."""

    def __init__(self, chat: ChatModel, prompt: str, options: GenerationOptions, stop: Optional[list[str]] = None):
        self.chat, self.prompt, self.options, self.stop = chat, prompt, options, stop
        self.completion: Optional[Completion] = None

    def __iter__(self) -> Iterator[str]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        chat = self.chat
        cancel = threading.Event()

        class Cancelled(StoppingCriteria):  # generate() has no other way to be stopped from outside
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        enc = chat.tokenizer([self.prompt], return_tensors="pt", add_special_tokens=False).to(chat.device)
        streamer = _counting_streamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        kwargs = dict(**enc, **chat._gen_kwargs(self.options, self.stop), streamer=streamer)
        kwargs["stopping_criteria"] = StoppingCriteriaList([*kwargs.get("stopping_criteria", []), Cancelled()])
        error: list[BaseException] = []

        def run():
            try:
                with chat._lock, torch.inference_mode():
                    chat.model.generate(**kwargs)
            except BaseException as e:  # surface it in the consumer thread
                error.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        stops = chat._stops(self.stop)
        text, sent, hit = "", None, False  # sent: index in text up to which pieces went out
        try:
            for piece in streamer:
                text += piece
                cut = _first_stop(text, stops)
                if cut is not None:
                    text, hit = text[:cut], True
                    break
                if sent is None:  # the answer starts at its first non-blank character
                    if not text.strip():
                        continue
                    sent = len(text) - len(text.lstrip())
                end = min(len(text.rstrip()), len(text) - _held_back(text, stops))
                if end > sent:
                    yield text[sent:end]
                    sent = end
        finally:
            cancel.set()  # no-op if generation already ended; stops it if we left early
            thread.join()
        if error:
            raise error[0]
        rest = text.rstrip()[len(text) - len(text.lstrip()) if sent is None else sent:]
        if rest:
            yield rest
        n = streamer.n_tokens
        ended = hit or streamer.last_token in chat.eos_token_id or n < self.options.max_new_tokens
        self.completion = Completion(text.strip(), enc["input_ids"].shape[1], n, "stop" if ended else "length")
