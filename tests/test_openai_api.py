"""openai_api.py: the official openai client against a real server subprocess (tiny model + a LoRA adapter
from a 2-step SFT run), raw HTTP for malformed requests, and the request queue in-process."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import free_port, run_script, running_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("lora-sft")
    run_script("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", "data/finetune",
               "--output_dir", str(out), "--do_train", "--max_steps", "2", "--report_to", "none",
               "--per_device_train_batch_size", "2")
    return str(out)


@pytest.fixture(scope="module")
def server(tiny_model_dir, lora_dir, tmp_path_factory):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("api") / "server.log"
    args = ["--base_model", tiny_model_dir, "--lora_model", lora_dir, "--port", str(port), "--api_key", API_KEY,
            "--max_new_tokens", "32", "--max_queue", "16"]
    with running_server("openai_api.py", args, f"{base}/health", log) as proc:
        yield base
    assert proc.returncode is not None


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


USER = [{"role": "system", "content": "You are a careful medical assistant."},
        {"role": "user", "content": "What are the early warning signs of a stroke?"}]


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["lora-sft0"]  # the adapter's folder name
    assert client.models.retrieve("lora-sft0").id == "lora-sft0"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_completion(client):
    r = client.chat.completions.create(model="lora-sft0", messages=USER, max_tokens=12, temperature=1.0, seed=3)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "lora-sft0" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # multi-turn: the history counts in the prompt
    longer = client.chat.completions.create(model="x", max_tokens=4, messages=USER + [
        {"role": "assistant", "content": "Face drooping, arm weakness, speech difficulty."},
        {"role": "user", "content": [{"type": "text", "text": "And what should I do?"}]}])
    assert longer.usage.prompt_tokens > r.usage.prompt_tokens + 10


def collect_stream(client, **kw):
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return pieces, finish, usage


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=11)], ids=["greedy", "seeded"])
def test_stream_matches_non_stream(client, sampling):
    kw = dict(model="lora-sft0", messages=USER, max_tokens=20, **sampling)
    whole = client.chat.completions.create(**kw)
    pieces, finish, usage = collect_stream(client, **kw)
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.model_dump() == whole.usage.model_dump()
    if "seed" in sampling:  # the tiny model's greedy answer is blank lines (stripped to ""); sampled text is not
        assert len([p for p in pieces if p]) > 3


def test_stop_strings(client):
    kw = dict(model="lora-sft0", messages=USER, max_tokens=24, temperature=1.0, seed=5)
    full = client.chat.completions.create(**kw).choices[0].message.content
    words = full.split()
    assert len(words) >= 4, full
    stop = words[3]
    expected = full[:full.index(stop)].strip()
    for s in (stop, [stop, "never-in-output-zz"]):
        r = client.chat.completions.create(stop=s, **kw)
        assert r.choices[0].message.content == expected
        assert r.choices[0].finish_reason == "stop"
    pieces, finish, _ = collect_stream(client, stop=stop, **kw)
    assert "".join(pieces) == expected and finish == "stop"


def post(server, body, key=API_KEY):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{server}/v1/chat/completions", content=body, headers=headers, timeout=60)


MSG = '[{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize("body,key,status,param,code", [
    ('{"messages": [{"role": "user", "content": "hi"}', API_KEY, 400, None, None),  # invalid JSON
    ('["not an object"]', API_KEY, 400, None, None),
    ('{"messages": [{"role": "doctor", "content": "hi"}]}', API_KEY, 400, "messages[0].role", None),
    ('{"messages": []}', API_KEY, 400, "messages", None),
    ('{"model": "m"}', API_KEY, 400, "messages", None),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}', API_KEY, 400,
     "messages", None),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', API_KEY, 400,
     "messages[0].content[0]", None),
    ('{"messages": %s, "max_tokens": 5000}' % MSG, API_KEY, 400, "max_tokens", "context_length_exceeded"),
    ('{"messages": [{"role": "user", "content": "%s"}]}' % ("word " * 1100), API_KEY, 400, "messages",
     "context_length_exceeded"),
    ('{"messages": %s, "max_tokens": 0}' % MSG, API_KEY, 400, "max_tokens", None),
    ('{"messages": %s, "temperature": "hot"}' % MSG, API_KEY, 400, "temperature", None),
    ('{"messages": %s, "n": 2}' % MSG, API_KEY, 400, "n", None),
    ('{"messages": %s, "n": 2, "stream": true}' % MSG, API_KEY, 400, "n", None),
    ('{"messages": %s, "stop": ["a", "b", "c", "d", "e"]}' % MSG, API_KEY, 400, "stop", None),
    ('{"messages": %s}' % MSG, None, 401, None, None),
    ('{"messages": %s}' % MSG, "wrong-key", 401, None, "invalid_api_key"),
], ids=["bad-json", "not-object", "unknown-role", "empty-messages", "no-messages", "ends-with-assistant",
        "image-part", "max-tokens-over-context", "prompt-over-context", "max-tokens-0", "bad-temperature", "n-2",
        "n-2-stream", "too-many-stops", "no-key", "wrong-key"])
def test_bad_requests(server, body, key, status, param, code):
    r = post(server, body.encode(), key)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code


def test_openai_client_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=USER, n=2)
    assert e.value.body["param"] == "n"
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    assert httpx.get(f"{server}/v1/nowhere", timeout=10).status_code == 404


def test_concurrent_requests(client, server):
    def ask(i):
        kw = dict(model="lora-sft0", max_tokens=8, temperature=0.8,
                  messages=[{"role": "user", "content": f"Question {i}: how is a fever treated?"}])
        if i % 4 == 0:
            pieces, finish, usage = collect_stream(client, **kw)
            return "".join(pieces), finish, usage.completion_tokens
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16), timeout=300))
    assert len(answers) == 16
    for text, finish, n in answers:
        assert isinstance(text, str) and finish in ("stop", "length") and 0 < n <= 8
    assert time.monotonic() - start < 300
    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"


# ---------------------------------------------------------------------------------------------- in-process
class FakeChat:
    """Stands in for ChatModel: complete() waits until released, so tests control when the worker is busy."""
    context_length = 100
    model_name = "fake"

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.batches: list[list[str]] = []

    def build_prompt(self, messages, system_prompt=None):
        return " | ".join(m["content"] for m in messages)

    def count_tokens(self, text):
        return len(text.split())

    def complete(self, prompts, options, stop=None):
        from medgpt.generation import Completion

        self.started.set()
        assert self.release.wait(30)
        self.batches.append(list(prompts))
        return [Completion(p.upper(), len(p.split()), 1, "stop") for p in prompts]


def test_worker_bounds_queue_and_batches():
    from medgpt.generation import GenerationOptions
    from medgpt.serving import GenerationWorker, Job

    async def scenario():
        chat = FakeChat()
        worker = GenerationWorker(chat, max_queue=3, max_batch_size=2).start()
        loop = asyncio.get_running_loop()

        def job(prompt, **kw):
            return Job(prompt, kw.pop("options", GenerationOptions()), loop=loop, future=loop.create_future(), **kw)

        try:
            first = job("first")
            assert worker.submit(first)
            assert await asyncio.to_thread(chat.started.wait, 10)  # the worker holds `first`
            waiting = [job("a"), job("b", options=GenerationOptions(temperature=0)), job("c")]
            assert all(worker.submit(j) for j in waiting)
            assert not worker.submit(job("overflow"))  # 3 waiting: full
            assert worker.queued == 3
            chat.release.set()
            results = await asyncio.wait_for(asyncio.gather(*(j.future for j in [first, *waiting])), 30)
        finally:
            worker.stop()
        assert [r.text for r in results] == ["FIRST", "A", "B", "C"]
        # "a" and "c" have the same options and waited together: one batch; "b" differs
        assert chat.batches == [["first"], ["a", "c"], ["b"]]

    asyncio.run(scenario())


def test_full_queue_is_503():
    from fastapi.testclient import TestClient

    from medgpt.generation import GenerationOptions
    from medgpt.serving import GenerationWorker
    from medgpt.serving.openai_app import create_app

    chat = FakeChat()
    worker = GenerationWorker(chat, max_queue=0)  # not started: every request finds the queue full
    app = create_app(chat, worker, GenerationOptions(max_new_tokens=10), "fake")
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
        assert r.status_code == 503
        assert http.get("/v1/models").json()["data"][0]["id"] == "fake"


def test_normalize_messages():
    from medgpt.serving import MessageError, normalize_messages

    out = normalize_messages([
        {"role": "system", "content": "S1"}, {"role": "developer", "content": "S2"},
        {"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}, {"role": "user", "content": "c"}])
    assert out == [{"role": "system", "content": "S1\n\nS2"}, {"role": "user", "content": "a\n\nb"},
                   {"role": "assistant", "content": ""}, {"role": "user", "content": "c"}]
    for bad, param in [([{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                         {"role": "user", "content": "b"}], "messages[1].role"),
                       ([{"role": "user"}], "messages[0].content"),
                       ([{"role": "user", "content": 5}], "messages[0].content")]:
        with pytest.raises(MessageError) as e:
            normalize_messages(bad)
        assert e.value.param == param
