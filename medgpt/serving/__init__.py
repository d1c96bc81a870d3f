"""Serving a chat model. This module: what gradio_demo.py and openai_api.py (and inference.py, evaluate_model.py,
tools/chatpdf.py for the model flags) share: the model flags, loading the chat model, turning chat messages (OpenAI's
or Gradio's) into a conversation the template renders, and a bounded request queue that feeds one generation worker
(batching compatible requests). The apps: `openai_app` (the OpenAI-compatible FastAPI app) and `gradio_app` (the chat
page)."""
from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from ..generation import ChatModel, Completion, GenerationOptions

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_model_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The model flags of MedicalGPT's gradio_demo.py / openai_api.py, plus generation defaults."""
    g = p.add_argument_group("model")
    g.add_argument("--base_model", default=None,
                   help="Base model: hub name or HF folder (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--lora_model", default=None, help="LoRA adapter folder; omit for a full or merged model")
    g.add_argument("--tokenizer_path", default=None,
                   help="Tokenizer folder (default: --lora_model's if it has one, else --base_model's)")
    g.add_argument("--template_name", default=None,
                   help="Chat template (default: the one the adapter was trained with, else chatml for the "
                        "embedded model, else vicuna)")
    g.add_argument("--system_prompt", default=None, help="System prompt (default: the template's)")
    g.add_argument("--use_cpu", action="store_true", help="Run on the CPU even if a GPU is present")
    g.add_argument("--gpus", default="0", help="GPU id(s) to use, e.g. 0 or 0,1 (the model runs on the first)")
    g.add_argument("--torch_dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--load_in_8bit", action="store_true")
    g.add_argument("--load_in_4bit", action="store_true")
    g.add_argument("--trust_remote_code", action="store_true", help="Allow the model's own code (off by default)")
    d = GenerationOptions()
    g = p.add_argument_group("generation defaults")
    g.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy decoding")
    g.add_argument("--top_p", type=float, default=d.top_p)
    g.add_argument("--repetition_penalty", type=float, default=d.repetition_penalty)
    return p


def add_server_args(p: argparse.ArgumentParser, port: int):
    """--host/--server_name, --port/--server_port (both names, MedicalGPT used each) and --max_queue; returns the
    "server" group for a script's own flags."""
    g = p.add_argument_group("server")
    g.add_argument("--host", "--server_name", dest="host", default="127.0.0.1",
                   help="Address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    g.add_argument("--port", "--server_port", dest="port", type=int, default=port)
    g.add_argument("--max_queue", type=int, default=32, help="Requests that may wait for the model (then: busy)")
    return g


def add_rag_args(p: argparse.ArgumentParser) -> None:
    """--rag_docs and friends: answer from a folder of documents (medgpt.rag), as tools/chatpdf.py does."""
    g = p.add_argument_group("answers from your documents (RAG)")
    g.add_argument("--rag_docs", nargs="+", default=None, metavar="PATH",
                   help="Folders and/or .txt/.md/.pdf/.docx files: every question gets the best passages from them, "
                        "and answers name their sources")
    g.add_argument("--rag_top_k", type=int, default=3, help="Passages given to the model per question")
    g.add_argument("--rag_embedding_model", default=None,
                   help="A Hugging Face encoder folder for dense retrieval fused with BM25 (default: BM25 only)")
    g.add_argument("--rag_index_dir", default=None, help="Where the index is cached (default: $MEDGPT_HOME/rag/...)")


def load_rag(args: argparse.Namespace):
    """The medgpt.rag.DocumentQA for --rag_docs, or None without it."""
    if not getattr(args, "rag_docs", None):
        return None
    from ..rag import DocumentIndex, DocumentQA

    index = DocumentIndex.build(args.rag_docs, args.rag_index_dir, embedding_model=args.rag_embedding_model,
                                device="cpu" if args.use_cpu else None, trust_remote_code=args.trust_remote_code)
    return DocumentQA(index, args.rag_top_k)


def load_chat_model(args: argparse.Namespace) -> ChatModel:
    if not args.use_cpu and args.gpus:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", args.gpus)  # before CUDA is first touched
    import torch

    device = "cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda"
    return ChatModel(args.base_model, args.lora_model, args.tokenizer_path, args.template_name, args.system_prompt,
                     device=device, torch_dtype=args.torch_dtype, load_in_8bit=args.load_in_8bit,
                     load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code)


def default_options(args: argparse.Namespace) -> GenerationOptions:
    return GenerationOptions(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)


def warn_if_exposed(host: str, protected: bool) -> None:
    if host not in LOOPBACK:
        logger.warning("Listening on %s: anyone who can reach this machine can use the model%s", host,
                       "" if protected else " (no --api_key / login set)")


# ------------------------------------------------------------------------------------------------
class MessageError(ValueError):
    """A chat message the server cannot use; param names the field, OpenAI style (messages[2].role)."""

    def __init__(self, message: str, param: Optional[str] = "messages"):
        super().__init__(message)
        self.param = param


ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's newer name for system


def content_text(content: Any, param: str) -> str:
    """A message's content as text: a string, or a list of text parts ({"type": "text", "text": ...},
    as OpenAI clients and Gradio's chatbot send them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise MessageError(f"Only text content is supported; part {i} is {kind!r}", f"{param}[{i}]")
        return "\n".join(texts)
    raise MessageError(f"Invalid content: expected a string or a list of text parts, got {type(content).__name__}",
                       param)


def normalize_messages(messages: list) -> list[dict]:
    """Chat messages -> [system?] + user/assistant turns alternating, starting and ending with user, as the
    templates render them. Leading system messages are joined, and consecutive messages of one role are
    joined (clients send those); anything else a template cannot lay out raises MessageError."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("'messages' must be a non-empty list of messages")
    system: list[str] = []
    turns: list[dict] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise MessageError(f"Invalid message: expected an object, got {type(msg).__name__}", f"messages[{i}]")
        role = msg.get("role")
        if role not in ROLES:
            raise MessageError(f"Invalid value: {role!r}. Supported values are: 'system', 'developer', 'user' "
                               f"and 'assistant'.", f"messages[{i}].role")
        if msg.get("content") is None and role != "assistant":
            raise MessageError(f"Missing content in a {role!r} message", f"messages[{i}].content")
        text = content_text(msg.get("content"), f"messages[{i}].content")
        if role in ("system", "developer"):
            if turns:
                raise MessageError("System messages are supported only at the start of the conversation",
                                   f"messages[{i}].role")
            system.append(text)
        elif turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + text
        else:
            if not turns and role != "user":
                raise MessageError("The conversation must start with a user message (after any system messages)",
                                   f"messages[{i}].role")
            turns.append({"role": role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise MessageError("The last message must have role 'user'")
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + turns


# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One request waiting for the model. Results go back to the asyncio loop that submitted it: a
    future (the Completion) and, for a streamed request, a queue of ("piece", text) items."""
    prompt: str
    options: GenerationOptions
    stop: Optional[list[str]] = None
    seed: Optional[int] = None
    stream: bool = False
    loop: Optional[asyncio.AbstractEventLoop] = None
    future: Optional[asyncio.Future] = None
    pieces: Optional[asyncio.Queue] = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    sources: Optional[list[dict]] = None  # --rag_docs: the passages in the prompt, returned with the answer

    def batch_key(self):
        """Requests with the same key can be generated together in one batch."""
        if self.stream or self.seed is not None:
            return None
        return (self.options, tuple(self.stop or ()))

    def _call(self, fn, *args):
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    def resolve(self, completion: Optional[Completion] = None, error: Optional[BaseException] = None):
        def done():
            if self.future is not None and not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(completion)
            if self.pieces is not None:
                self.pieces.put_nowait(("end", None))
        self._call(done)

    def send_piece(self, text: str):
        self._call(self.pieces.put_nowait, ("piece", text))


class GenerationWorker:
    """One thread runs every generation, so memory stays bounded whatever the number of clients; at most
    max_queue requests wait (submit() answers False beyond that). Waiting non-streamed requests with the
    same options are generated together, up to max_batch_size at a time."""

    def __init__(self, chat: ChatModel, max_queue: int = 32, max_batch_size: int = 4):
        self.chat, self.max_queue, self.max_batch_size = chat, max_queue, max(1, max_batch_size)
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self.busy = False

    def start(self) -> "GenerationWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.cancelled.set()
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> bool:
        with self._cond:
            if self._stopping or len(self._waiting) >= self.max_queue:
                return False
            self._waiting.append(job)
            self._cond.notify()
            return True

    def _take(self) -> Optional[list[Job]]:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._waiting.popleft()
            batch = [first]
            key = first.batch_key()
            if key is not None:
                for job in list(self._waiting):
                    if len(batch) >= self.max_batch_size:
                        break
                    if job.batch_key() == key:
                        self._waiting.remove(job)
                        batch.append(job)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [job for job in batch if not job.cancelled.is_set()]  # their clients went away
            if not batch:
                continue
            self.busy = True
            try:
                self._generate(batch)
            except BaseException as e:  # the worker must outlive any one request
                logger.exception("Generation failed")
                for job in batch:
                    job.resolve(error=e)
            finally:
                self.busy = False

    def _generate(self, batch: list[Job]) -> None:
        first = batch[0]
        if first.seed is not None:
            from transformers import set_seed
            set_seed(first.seed)
        if not first.stream:
            results = self.chat.complete([job.prompt for job in batch], first.options, first.stop)
            for job, completion in zip(batch, results):
                job.resolve(completion)
            return
        stream = self.chat.stream_completion(first.prompt, first.options, first.stop)
        pieces = iter(stream)
        try:
            for piece in pieces:
                if first.cancelled.is_set():
                    break
                first.send_piece(piece)
        finally:
            pieces.close()  # stops generation if we left early
        first.resolve(stream.completion)  # None when cancelled
