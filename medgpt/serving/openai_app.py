"""The app of openai_api.py: OpenAI's chat-completions API (GET /v1/models, POST /v1/chat/completions with
server-sent-event streaming, GET /health) in FastAPI over a ChatModel and its GenerationWorker, with OpenAI's error
bodies, an optional API key, and sources for answers under --rag_docs.

(No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations, such as the `Request`
imported inside create_app, as objects.)"""
import asyncio
import json
import logging
import secrets
import time
import uuid
from typing import Any, Optional, Union

from . import Job, MessageError, normalize_messages

logger = logging.getLogger("medgpt.openai_api")


class APIError(Exception):
    """Answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _param(loc) -> str:
    """pydantic's error location ('messages', 0, 'role') as OpenAI names a field: messages[0].role."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _request_model():
    from pydantic import BaseModel, ConfigDict, Field

    class ChatCompletionRequest(BaseModel):
        # Other OpenAI parameters (presence_penalty, logit_bias, user, ...) are accepted and ignored.
        model_config = ConfigDict(extra="allow")
        model: Optional[str] = None
        messages: list[Any]
        max_tokens: Optional[int] = Field(None, ge=1)
        max_completion_tokens: Optional[int] = Field(None, ge=1)
        temperature: Optional[float] = Field(None, ge=0, le=2)
        top_p: Optional[float] = Field(None, ge=0, le=1)
        stop: Union[str, list[str], None] = None
        n: Optional[int] = 1
        stream: Optional[bool] = False
        stream_options: Optional[dict] = None
        seed: Optional[int] = None
        frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
        presence_penalty: Optional[float] = Field(None, ge=-2, le=2)

    return ChatCompletionRequest


def create_app(chat, worker, defaults, model_id: str, api_key: Optional[str] = None, rag=None):
    """The FastAPI app: chat (a medgpt ChatModel), worker (a started GenerationWorker), defaults
    (GenerationOptions for fields a request leaves out), rag (a medgpt.rag.DocumentQA for --rag_docs: the last
    user message gets the best passages, and answers carry them as "sources")."""
    from dataclasses import replace

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException


    Request_ = _request_model()
    created = int(time.time())
    app = FastAPI(title="MedicalGPT OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):  # unknown path, wrong method
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        message = f"Unknown request URL: {request.method} {request.url.path}" if e.status_code in (404, 405) \
            else str(e.detail)
        return JSONResponse(APIError(e.status_code, message, kind).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        err = e.errors()[0]
        return JSONResponse(APIError(400, err.get("msg", "Invalid request"), param=_param(err.get("loc", ()))).body(),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request, e):  # a bug: still an OpenAI-shaped answer, and logged
        logger.exception("Unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, f"Internal server error: {type(e).__name__}", "server_error").body(),
                            status_code=500)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            raise APIError(401, "You didn't provide an API key. You need to provide your API key in an "
                                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        if not secrets.compare_digest(auth[7:].strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "medgpt"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": worker.queued, "busy": worker.busy}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        check_key(request)
        if name != model_id:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return model_card()

    async def parse(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "We could not parse the JSON body of your request. The body must be a JSON object "
                                "(Content-Type: application/json).") from None
        if not isinstance(body, dict):
            raise APIError(400, f"The request body must be a JSON object, not {type(body).__name__}")
        try:
            return Request_.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            param = _param(err["loc"])
            raise APIError(400, f"Invalid value for '{param}': {err['msg']}", param=param) from None

    def prepare(req) -> Job:
        if req.n not in (None, 1):
            raise APIError(400, "Only n=1 is supported: ask for more answers with more requests", param="n")
        sources = None
        try:
            messages = normalize_messages(req.messages)
            if rag is not None:
                messages, found = rag.augment(chat, messages, req.max_tokens or req.max_completion_tokens
                                              or defaults.max_new_tokens)
                sources = [s.to_dict() for s in found]
            prompt = chat.build_prompt(messages)
        except MessageError as e:
            raise APIError(400, str(e), param=e.param) from None
        except ValueError as e:  # the template refused the conversation
            raise APIError(400, str(e), param="messages") from None
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "'stop' takes up to 4 non-empty strings", param="stop")

        context, n_prompt = chat.context_length, chat.count_tokens(prompt)
        asked = req.max_tokens or req.max_completion_tokens
        max_tokens = asked or min(defaults.max_new_tokens, context - n_prompt)
        if n_prompt + max_tokens > context or max_tokens < 1:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{n_prompt + max(max_tokens, 1)} tokens ({n_prompt} in the messages, "
                                f"{max(max_tokens, 1)} in the completion). Please reduce the length of the messages "
                                f"or completion.", param="max_tokens" if asked else "messages",
                           code="context_length_exceeded")
        temperature = defaults.temperature if req.temperature is None else req.temperature
        top_p = defaults.top_p if req.top_p is None else req.top_p
        if top_p == 0:  # only the most likely token: greedy
            temperature = 0.0
        options = replace(defaults, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)
        return Job(prompt, options, stop or None, req.seed, bool(req.stream), sources=sources)

    def submit(job: Job) -> None:
        if not worker.submit(job):
            raise APIError(503, f"The server is overloaded: {worker.max_queue} requests are already waiting. "
                                f"Please retry shortly.", "server_error", code="queue_full",
                           headers={"Retry-After": "1"})

    def with_sources(job: Job, text: str) -> dict:
        """--rag_docs: {"sources": the passages in the prompt, each marked "cited" when the answer cites it}."""
        if job.sources is None:
            return {}
        from medgpt.rag import cited_numbers

        cited = cited_numbers(text)
        return {"sources": [dict(s, cited=s["number"] in cited) for s in job.sources]}

    def usage(c) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = await parse(request)
        job = prepare(req)
        loop = asyncio.get_running_loop()
        job.loop, job.future = loop, loop.create_future()
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if not job.stream:
            submit(job)
            try:
                c = await job.future
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            return {**head, "object": "chat.completion", "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": None, "finish_reason": c.finish_reason}],
                    "usage": usage(c), **with_sources(job, c.text)}

        job.pieces = asyncio.Queue()
        submit(job)
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def event(delta: Optional[dict], finish: Optional[str] = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}]
            chunk = {**head, "object": "chat.completion.chunk", "system_fingerprint": None, "choices": choices,
                     **({"usage": None} if include_usage else {}), **extra}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield event({"role": "assistant", "content": ""})
                while True:
                    kind, text = await job.pieces.get()
                    if kind == "end":
                        break
                    yield event({"content": text})
                try:
                    c = await job.future
                except Exception as e:  # headers are sent: report it in the stream, as OpenAI does
                    logger.exception("Streamed generation failed")
                    err = APIError(500, f"Generation failed: {type(e).__name__}", "server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                else:
                    yield event({}, c.finish_reason, **with_sources(job, c.text))
                    if include_usage:
                        yield event(None, usage=usage(c))
                yield "data: [DONE]\n\n"
            finally:  # the client left (or we are done): stop generating for it
                job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
