"""Role-play dialogue generation (role_play_data/roleplay_data_generate.py, medgpt/roleplay.py): the quality filter on
handmade turns, persona seed errors, retries on 429/5xx and deduplication against a small fault-injecting HTTP stub,
and the real path: openai_api.py on a tiny model plays both sides, a killed run resumes without duplicates, and
supervised_finetuning.py trains on the output."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, free_port, run_script, running_server

pytest.importorskip("openai")

from medgpt.data.io import DataError  # noqa: E402
from medgpt.roleplay import (  # noqa: E402
    QualityConfig, bad_turn_reason, clean_turn, clinician_messages, dialogue_hash, is_degenerate, load_personas,
    main, patient_messages, plan_dialogues,
)

SCRIPT = "role_play_data/roleplay_data_generate.py"
SEEDS = ROOT / "role_play_data"
PATIENTS = str(SEEDS / "seed_patient_role.jsonl")
CLINICIANS = [str(SEEDS / "seed_doctor_role.jsonl"), str(SEEDS / "seed_nurse_role.jsonl")]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------------
# Quality filter and prompts (no server)

@pytest.mark.parametrize("text,side,previous,reason", [
    ("", "patient", [], "empty"),
    ("   \n ", "clinician", [], "empty"),
    ("嗯", "patient", [], "too_short"),
    ("?!", "patient", [], "too_short"),
    ("It hurts here.\nDoctor: How long has it hurt?", "patient", [], "role_confusion"),
    ("头疼两周了。\n李医生：还有别的症状吗？", "patient", [], "role_confusion"),
    ("How long has it hurt?\nPatient: two weeks", "clinician", [], "role_confusion"),
    ("**患者**：我也不知道", "clinician", [], "role_confusion"),
    ("the pain the pain the pain the pain is bad", "patient", [], "degenerate"),
    ("好的好的好的好的好的", "patient", [], "degenerate"),
    ("ok ok ok ok", "patient", [], "degenerate"),
    (" ".join(["a", "b"] * 30), "clinician", [], "degenerate"),
    ("How long have you had it?", "patient", ["I have a headache.", "How long have you had it?"], "repeat"),
    ("I have a HEADACHE!", "patient", ["I have a headache.", "How long?"], "repeat"),
    ("I have a headache.", "patient", [], None),
    ("Two weeks, mostly in the afternoon... it gets worse at my desk.", "patient", ["I have a headache.", "When?"],
     None),
    ("哈哈哈，好的，谢谢医生！", "patient", [], None),
    ("Ok, ok. Please rest and drink fluids; if the fever passes 39 °C, come back.", "clinician", ["Fever."], None),
    ("我明白了……那我需要做检查吗？", "patient", ["头疼", "建议先观察"], None),
])
def test_quality_filter_on_handmade_turns(text, side, previous, reason):
    assert bad_turn_reason(clean_turn(text, side), side, previous, QualityConfig()) == reason


def test_quality_filter_is_configurable():
    off = QualityConfig(checks=frozenset())
    for text in ("嗯", "ok ok ok ok ok", "It hurts.\nDoctor: where?"):
        assert bad_turn_reason(text, "patient", [text], off) is None
    assert bad_turn_reason("", "patient", [], off) == "empty"  # an empty turn can never be trained on
    assert bad_turn_reason("ok ok ok ok", "patient", [], QualityConfig(max_repeats=4)) is None
    assert bad_turn_reason("fine", "patient", [], QualityConfig(min_chars=5)) == "too_short"
    assert not is_degenerate("Take it twice a day, twice a day at most.")


def test_clean_turn_strips_own_label_and_quotes():
    assert clean_turn("Patient: I feel dizzy.", "patient") == "I feel dizzy."
    assert clean_turn("**Doctor:** When did it start?", "clinician") == "When did it start?"
    assert clean_turn("  “医生，我头晕。”  ", "patient") == "医生，我头晕。"
    assert clean_turn('He said "rest" and "water"', "patient") == 'He said "rest" and "water"'  # not wrapping quotes
    assert clean_turn("<think>The patient is worried.</think>\n\nHow long?", "clinician") == "How long?"
    assert clean_turn("<think>Let me consider the", "clinician") == ""  # thoughts cut off by max_tokens: empty
    assert clean_turn(None, "patient") == ""


def test_prompts_swap_roles_for_the_patient():
    patients, clinicians = load_personas([PATIENTS], True), load_personas(CLINICIANS, False)
    plan = plan_dialogues(patients, clinicians, 1, seed=0)[0]
    turns = ["I have a headache.", "How long?", "Two weeks."]
    p = patient_messages(plan.patient, plan.clinician, turns[:2])
    assert [m["role"] for m in p] == ["system", "user", "assistant", "user"]  # the clinician is the 'user' here
    assert p[1]["content"].startswith("您好") and "王女士" in p[0]["content"]  # zh patient, zh greeting
    assert [m["content"] for m in p[2:]] == turns[:2]
    c = clinician_messages(plan.clinician, turns)
    assert [m["role"] for m in c] == ["system", "user", "assistant", "user"]
    assert "王女士" not in c[0]["content"] and p[1]["content"] in c[0]["content"]  # no patient secrets; its greeting


def test_shipped_seeds_and_plan():
    patients, clinicians = load_personas([PATIENTS], True), load_personas(CLINICIANS, False)
    assert len(patients) == 12 and {p.language for p in patients} == {"zh", "en"}
    assert {(c.role, c.language) for c in clinicians} == {(r, x) for r in ("doctor", "nurse") for x in ("zh", "en")}
    plans = plan_dialogues(patients, clinicians, 30, seed=42)
    assert len({p.id for p in plans}) == 30 and all(p.patient.language == p.clinician.language for p in plans)
    # plan i does not depend on how many are planned (a larger rerun extends a smaller one), but on --seed
    assert [p.id for p in plan_dialogues(patients, clinicians, 7, seed=42)] == [p.id for p in plans[:7]]
    assert [p.id for p in plan_dialogues(patients, clinicians, 30, seed=1)] != [p.id for p in plans]


@pytest.mark.parametrize("line,message", [
    ('{"id": "a", "age": 30, "sex": "f", "complaint": "x"', ":2: invalid JSON"),
    ('["not", "an", "object"]', ":2: a patient persona must be a JSON object, got list"),
    ('{"id": "b", "age": 30, "sex": "f"}', ":2: missing field 'complaint'"),
    ('{"id": "b", "age": 300, "sex": "f", "complaint": "x"}', ":2: field 'age' must be between 0 and 130"),
    ('{"id": "b", "age": 30, "sex": "", "complaint": "x"}', ":2: field 'sex' must be a non-empty string"),
    ('{"id": "b", "age": 30, "sex": "f", "complain": "x"}', ":2: unknown field 'complain'"),
    ('{"id": "a", "age": 30, "sex": "f", "complaint": "x"}', ":2: duplicate persona id 'a' (first at "),
    ('{"id": "a b", "age": 30, "sex": "f", "complaint": "x"}', ":2: field 'id' may hold only"),
    ('{"id": "c", "age": 30, "sex": "f", "complaint": "x", "language": "fr"}', ":2: field 'language' must be one of"),
])
def test_malformed_patient_seed_lines(tmp_path, line, message):
    path = tmp_path / "patients.jsonl"
    path.write_text('{"id": "a", "age": 30, "sex": "f", "complaint": "cough"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_personas([str(path)], True)
    assert str(e.value).startswith(f"{path}{message}"), str(e.value)


def test_clinician_seed_role_and_errors(tmp_path):
    nurses = tmp_path / "my_nurses.jsonl"
    nurses.write_text('{"system_prompt": "一位耐心的社区护士"}\n', encoding="utf-8")  # MedicalGPT's seed shape
    (nurse,) = load_personas([str(nurses)], False)
    assert (nurse.role, nurse.language) == ("nurse", "zh") and nurse.id.startswith("nurse-")
    assert load_personas([str(nurses)], False)[0].id == nurse.id  # a derived id is stable
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"role": "surgeon", "specialty": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"docs.jsonl:1: field 'role' must be 'doctor' or 'nurse'"):
        load_personas([str(bad)], False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.jsonl: (no personas|empty file)"):
        load_personas([str(empty)], False)
    # a patient language no clinician speaks
    en_only = tmp_path / "en_doctors.jsonl"
    en_only.write_text('{"id": "d", "specialty": "GP", "language": "en"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"seed_patient_role.jsonl:1: no doctor or nurse persona speaks 'zh'"):
        plan_dialogues(load_personas([PATIENTS], True), load_personas([str(en_only)], False), 3, 0)


def test_malformed_seed_is_one_line_error_from_the_script(tmp_path):
    path = tmp_path / "patients.jsonl"
    path.write_text('{"id": "a", "age": 30, "sex": "f", "complaint": "cough"}\n{"id": "b", "age": 4\n')
    proc = run_script(SCRIPT, "--patient_file", str(path), "--output_file", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:2: invalid JSON ("), proc.stderr


def test_unreachable_endpoint_is_one_line_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    proc = run_script(SCRIPT, "--base_url", url, "--output_file", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach {url} ("), proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------------------------
# A fault-injecting stub endpoint (the real path is tested against openai_api.py below)

class Stub:
    """An OpenAI-shaped endpoint that answers the first requests with the given error statuses, then with a
    line that names the side speaking and the turn (and, unless same_text, the persona pair)."""

    def __init__(self, fail_with=(), same_text=False, delay=0.0, hold=None):
        self.fail_with, self.same_text, self.delay = list(fail_with), same_text, delay
        self.hold, self.gate = hold, threading.Event()  # while hold() is true, requests wait for the gate
        self.requests = []  # (status, x-stainless-retry-count)
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def send(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 0,
                                                             "owned_by": "test"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    status = stub.fail_with.pop(0) if stub.fail_with else 200
                    stub.requests.append((status, self.headers.get("x-stainless-retry-count")))
                if status != 200:  # retry-after-ms keeps the client's backoff short in the test
                    return self.send(status, {"error": {"message": "injected", "type": "server_error"}},
                                     [("retry-after-ms", "20")])
                if stub.hold is not None and stub.hold():
                    stub.gate.wait(60)
                time.sleep(stub.delay)
                msgs = body["messages"]
                patient = msgs[0]["content"].startswith(("You are role-playing a patient", "你正在扮演"))
                side = "patient" if patient else "clinician"
                text = f"{side} line {len(msgs)}" + ("" if stub.same_text else f" ({abs(hash(msgs[0]['content']))})")
                self.send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": text}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def run_main(capsys, *args):
    """main() in this process: (exit code, summary)."""
    code = main(["--no_progress", *args], seed_dir=str(SEEDS))
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1].removeprefix("summary: "))


def test_retries_on_429_and_5xx(tmp_path, capsys):
    out = str(tmp_path / "d.jsonl")
    with Stub(fail_with=[429, 500, 503]) as stub:
        code, s = run_main(capsys, "--base_url", stub.url, "--output_file", out, "--num_dialogues", "2",
                           "--num_turns", "2", "--max_concurrency", "1", "--max_retries", "3")
    assert code == 0 and s["generated"] == 2 and s["failed"] == 0 and s["retries"] == 3
    # one request failed three times, the openai client retried it (its own backoff) and the fourth try answered
    assert stub.requests[:4] == [(429, "0"), (500, "1"), (503, "2"), (200, "3")]
    assert len(stub.requests) == 3 + 2 * 2 * 2
    rows = read_jsonl(out)
    assert [r["turns"] for r in rows] == [2, 2] and all(r["model"] == "stub-model" for r in rows)
    conv = rows[0]["conversations"]
    assert [t["from"] for t in conv] == ["system", "human", "gpt", "human", "gpt"]
    assert conv[1]["value"].startswith("patient line 2") and conv[2]["value"].startswith("clinician line 2")


def test_retries_exhausted_fail_the_dialogue_and_a_rerun_finishes_it(tmp_path, capsys):
    out = str(tmp_path / "d.jsonl")
    with Stub(fail_with=[500] * 4) as stub:
        code, s = run_main(capsys, "--base_url", stub.url, "--output_file", out, "--num_dialogues", "1",
                           "--num_turns", "1", "--max_retries", "1")
        assert code == 1 and s["failed"] == 1 and s["generated"] == 0 and s["retries"] == 1
        assert "InternalServerError" in s["first_error"]
        assert len(stub.requests) == 2
        code, s = run_main(capsys, "--base_url", stub.url, "--output_file", out, "--num_dialogues", "1",
                           "--num_turns", "1", "--max_retries", "3")  # 2 more failures, then answers
    assert code == 0 and (s["generated"], s["skipped_done"], s["retries"]) == (1, 0, 2)
    assert len(read_jsonl(out)) == 1


def test_duplicates_are_dropped_and_counted(tmp_path, capsys):
    out = str(tmp_path / "d.jsonl")
    with Stub(same_text=True) as stub:  # every persona pair gets the same lines
        code, s = run_main(capsys, "--base_url", stub.url, "--output_file", out, "--num_dialogues", "3",
                           "--num_turns", "2", "--no-system_turn")
        assert code == 0 and s["generated"] == 1 and s["dropped"] == {"duplicate": 2}
        rows, rejected = read_jsonl(out), read_jsonl(out + ".rejected")
        assert [t["from"] for t in rows[0]["conversations"]] == ["human", "gpt", "human", "gpt"]
        assert [r["reason"] for r in rejected] == ["duplicate"] * 2
        assert {r["duplicate_of"] for r in rejected} == {rows[0]["id"]}
        assert dialogue_hash(rejected[0]["conversations"]) == dialogue_hash(rows[0]["conversations"])
        n = len(stub.requests)
        code, s = run_main(capsys, "--base_url", stub.url, "--output_file", out, "--num_dialogues", "3")
        assert code == 0 and s["skipped_done"] == 3 and s["generated"] == 0 and len(stub.requests) == n


def test_bad_turn_ends_the_dialogue(tmp_path, capsys):
    out = str(tmp_path / "d.jsonl")
    with Stub(same_text=True) as stub:  # "patient line 4" repeats nothing; min_chars 20 makes every turn too short
        code, s = run_main(capsys, "--base_url", stub.url, "--output_file", out, "--num_dialogues", "1",
                           "--min_turn_chars", "20")
        assert code == 0 and s["generated"] == 0 and s["dropped"] == {"too_short": 1}
        assert s["bad_turns"] == {"too_short": 1} and len(stub.requests) == 1
        (rej,) = read_jsonl(out + ".rejected")
        assert (rej["reason"], rej["bad_turn"], rej["bad_text"]) == ("too_short", 0, "patient line 2")


def test_unfinished_first_line_is_cut_off(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    out.write_text('{"id": "en-chest-pain.dr-', encoding="utf-8")  # killed while writing the very first line
    with Stub() as stub:
        code, s = run_main(capsys, "--base_url", stub.url, "--output_file", str(out), "--num_dialogues", "1",
                           "--num_turns", "1")
    assert code == 0 and (s["generated"], s["skipped_done"]) == (1, 0)
    assert [r["id"].split(".")[0] for r in read_jsonl(out)] == ["zh-headache"]


def test_output_of_another_kind_is_refused(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    out.write_text('{"conversations": []}\n')
    with Stub() as stub, pytest.raises(DataError, match=r"d.jsonl:1: not a role-play record"):
        run_main(capsys, "--base_url", stub.url, "--output_file", str(out), "--num_dialogues", "1")


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    out = tmp_path / "d.jsonl"
    args = [sys.executable, str(ROOT / SCRIPT), "--output_file", str(out), "--num_dialogues", "8", "--num_turns", "2",
            "--max_concurrency", "2", "--no_progress"]
    # once 2 dialogues are saved, the stub holds every request until Ctrl-C has been sent: the signal always lands
    # while the other 6 run, however slow or fast the machine
    with Stub(delay=0.01, hold=lambda: out.exists() and out.read_text().count("\n") >= 2) as stub:
        # (SIGINT back to its default first: a test run started in the background by a non-interactive shell, as
        # `nohup bash .ci/run &`, inherits it ignored, and Python then installs no KeyboardInterrupt handler)
        proc = subprocess.Popen([*args, "--base_url", stub.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 2):
            time.sleep(0.05)
        time.sleep(0.5)  # the running dialogues reach their next request and wait there
        proc.send_signal(signal.SIGINT)  # Ctrl-C: finished dialogues stay, the running ones stop
        time.sleep(0.5)
        stub.gate.set()
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1, stderr
        first = json.loads(stdout.strip().splitlines()[-1].removeprefix("summary: "))
        assert first["interrupted"] and 2 <= first["generated"] < 8, first
        assert "rerun the same command to continue" in stderr
        done = read_jsonl(out)
        assert len(done) == first["generated"]
        rerun = subprocess.run([*args, "--base_url", stub.url], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    s = json.loads(rerun.stdout.strip().splitlines()[-1].removeprefix("summary: "))
    assert (s["skipped_done"], s["generated"]) == (len(done), 8 - len(done))
    rows = read_jsonl(out)
    assert rows[: len(done)] == done and len({r["id"] for r in rows}) == 8
    assert len({dialogue_hash(r["conversations"]) for r in rows}) == 8


# ------------------------------------------------------------------------------------------------
# The real path: openai_api.py serving a tiny model plays both sides

def test_dialogues_from_openai_api_resume_and_train(tiny_model_dir, tmp_path):
    port = free_port()
    out_dir = tmp_path / "roleplay"
    out = out_dir / "dialogues.jsonl"
    gen = [SCRIPT, "--base_url", f"http://127.0.0.1:{port}/v1", "--output_file", str(out), "--num_turns", "2",
           "--max_tokens", "8", "--temperature", "1.0", "--quality_checks", "none", "--no_progress"]

    def summary(proc):
        return json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("summary: "))

    with running_server("openai_api.py", ["--base_model", tiny_model_dir, "--port", str(port)],
                        f"http://127.0.0.1:{port}/health", tmp_path / "server.log"):
        s = summary(run_script(*gen, "--num_dialogues", "2"))
        assert (s["generated"], s["skipped_done"], s["failed"]) == (2, 0, 0)
        first = out.read_text(encoding="utf-8").splitlines(keepends=True)
        # a run killed while writing the second dialogue: half its line is on disk
        out.write_text(first[0] + first[1][: len(first[1]) // 2], encoding="utf-8")
        proc = run_script(*gen, "--num_dialogues", "3")
        s = summary(proc)
        assert (s["generated"], s["skipped_done"], s["failed"]) == (2, 1, 0), proc.stderr
        assert "cut off an unfinished last line" in proc.stderr
    rows = read_jsonl(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 3
    assert len({dialogue_hash(r["conversations"]) for r in rows}) == 3
    # the same seeds make the same dialogue: the one cut off was made again identically
    again = {json.dumps(r, ensure_ascii=False) for r in rows}
    assert {line.rstrip("\n") for line in first} <= again
    for r in rows:
        assert r["model"] == "tiny-llama0" and r["turns"] == 2
        assert [t["from"] for t in r["conversations"]] == ["system", "human", "gpt", "human", "gpt"]
        assert all(t["value"].strip() for t in r["conversations"])

    sft = tmp_path / "sft"
    run_script("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(out_dir),
               "--output_dir", str(sft), "--do_train", "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--report_to", "none", "--model_max_length", "512")
    state = json.loads((sft / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (sft / "adapter_model.safetensors").exists()
