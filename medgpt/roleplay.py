"""Role-play dialogue data: multi-turn patient–doctor and patient–nurse conversations, with one chat model playing
each side through any OpenAI-compatible endpoint (by default our openai_api.py), written as sharegpt JSONL that
supervised_finetuning.py reads as is (the patient is "human", the doctor or nurse is "gpt").

MedicalGPT's role_play_data asks GPT-4 for a whole scripted dialogue in one answer and parses its "患者:"/"护士:"
lines. Here each side speaks in a request of its own (the patient sees the dialogue with the roles swapped), so a
small local model can play both parts and every turn is checked on its own before the next one is asked for.

Resuming: every planned dialogue has a stable id (patient persona, clinician persona, round); the output is
append-only, one dialogue a line, flushed as each one ends, and a rerun skips the ids already in the output or in
its `.rejected` companion (dialogues the quality filter or the deduplication dropped, kept for inspection).
Retries: the official openai client's own (exponential backoff from 0.5 s to 8 s with jitter, honouring the
server's Retry-After, on connection errors, 408/409/429 and 5xx), `--max_retries` times per request.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .data.io import DataError, iter_records

logger = logging.getLogger("medgpt.roleplay")

LANGUAGES = ("en", "zh")
CLINICIAN_ROLES = ("doctor", "nurse")
PATIENT_FIELDS = ("id", "name", "age", "sex", "complaint", "history", "personality", "language", "system_prompt")
CLINICIAN_FIELDS = ("id", "role", "name", "specialty", "style", "greeting", "language", "system_prompt")
QUALITY_CHECKS = ("too_short", "degenerate", "repeat", "role_confusion")  # "empty" is always checked
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # openai_api.py's default port


class EndpointError(ConnectionError):
    """The endpoint cannot be used (unreachable, key refused, no model): one line; cli.run_main prints it."""


# ------------------------------------------------------------------------------------------------
# Personas

@dataclass(frozen=True)
class Persona:
    id: str
    role: str  # "patient", "doctor" or "nurse"
    language: str
    fields: dict = field(hash=False, compare=False)
    where: str = ""

    def get(self, key: str) -> str:
        value = self.fields.get(key)
        return "" if value is None else str(value).strip()


_ID = re.compile(r"^[\w-]+$")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def _persona(data, where: str, patient: bool, default_role: str) -> Persona:
    noun = "patient" if patient else "doctor/nurse"
    if not isinstance(data, dict):
        raise DataError(f"{where}: a {noun} persona must be a JSON object, got {type(data).__name__}")
    allowed = PATIENT_FIELDS if patient else CLINICIAN_FIELDS
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise DataError(f"{where}: unknown field '{unknown[0]}' (a {noun} persona has: {', '.join(allowed)})")
    for key, value in data.items():
        if key == "age" and isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= 130:
                raise DataError(f"{where}: field 'age' must be between 0 and 130, got {value}")
        elif not isinstance(value, str) or not value.strip():
            kind = "an integer or a non-empty string" if key == "age" else "a non-empty string"
            raise DataError(f"{where}: field '{key}' must be {kind}, got {json.dumps(value, ensure_ascii=False)}")
    if patient:
        role = "patient"
        missing = [k for k in ("age", "sex", "complaint") if k not in data]
        if missing and "system_prompt" not in data:
            raise DataError(f"{where}: missing field '{missing[0]}' (a patient persona needs age, sex and complaint, "
                            "or a system_prompt)")
    else:
        role = data.get("role", default_role)
        if role not in CLINICIAN_ROLES:
            raise DataError(f"{where}: field 'role' must be 'doctor' or 'nurse', got '{role}'")
        if "system_prompt" not in data and "specialty" not in data and "style" not in data:
            raise DataError(f"{where}: a {role} persona needs a specialty or style (or a system_prompt)")
    language = data.get("language") or ("zh" if _CJK.search(json.dumps(data, ensure_ascii=False)) else "en")
    if language not in LANGUAGES:
        raise DataError(f"{where}: field 'language' must be one of {', '.join(LANGUAGES)}, got '{language}'")
    pid = data.get("id")
    if pid is None:  # stable across runs: derived from the persona itself
        digest = hashlib.sha1(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:8]
        pid = f"{role}-{digest}"
    elif not _ID.match(pid):
        raise DataError(f"{where}: field 'id' may hold only letters, digits, '_' and '-', got '{pid}'")
    return Persona(pid, role, language, dict(data), where)


def load_personas(paths: Sequence[str], patient: bool) -> list[Persona]:
    """The personas of JSONL seed files; a malformed line raises DataError naming its file and line. A doctor/nurse
    persona without 'role' is a nurse when its file's name says 'nurse', else a doctor."""
    personas: list[Persona] = []
    seen: dict[str, str] = {}
    for path in paths:
        default_role = "nurse" if "nurse" in os.path.basename(path).lower() else "doctor"
        count = 0
        for rec in iter_records(path):
            p = _persona(rec.data, rec.where, patient, default_role)
            if p.id in seen:
                raise DataError(f"{rec.where}: duplicate persona id '{p.id}' (first at {seen[p.id]})")
            seen[p.id] = rec.where
            personas.append(p)
            count += 1
        if not count:
            raise DataError(f"{path}: no personas in the file")
    return personas


# ------------------------------------------------------------------------------------------------
# Prompts

_TEXT = {
    "en": {
        "doctor": "doctor", "nurse": "nurse",
        "patient_intro": "You are role-playing a patient who has come to see a {role}. Stay in character as this "
                         "patient:",
        "name": "Name: {}.", "age_sex": "Age and sex: {age}, {sex}.", "age": "Age: {}.", "sex": "Sex: {}.",
        "years": "{}",
        "complaint": "Main complaint: {}.", "history": "Medical history: {}.", "personality": "Personality: {}.",
        "character": "Character: {}",
        "patient_rules": "Speak only as the patient, in the first person, one short natural turn at a time (one to "
                         "three sentences). Describe what you feel in everyday words, answer the {role}'s questions, "
                         "ask your own when you are worried, and reveal details only when asked. Never write the "
                         "{role}'s lines, role labels or stage directions. Reply in English.",
        "clinician_intro": "You are {name}, a {role}{specialty}.",
        "specialty": " ({})", "style": "Manner: {}.",
        "clinician_rules": "You are talking with a patient. Ask focused questions about the symptoms, their history "
                           "and medicines, explain possible causes in plain words, give safe practical advice, and "
                           "say when tests or in-person care are needed; never claim a certain diagnosis. Speak only "
                           "as the {role}, one turn at a time, without role labels. Reply in English.",
        "opened": "You opened the visit by saying: \"{}\"",
        "greeting": {"doctor": "Hello, I'm {name}. What brings you in today?",
                     "nurse": "Hi, I'm {name}, one of the nurses here. How are you feeling today?"},
        "default_name": {"doctor": "the doctor", "nurse": "the nurse"},
    },
    "zh": {
        "doctor": "医生", "nurse": "护士",
        "patient_intro": "你正在扮演一位来看{role}的患者，请始终以这位患者的身份说话：",
        "name": "姓名：{}。", "age_sex": "年龄和性别：{age}，{sex}。", "age": "年龄：{}。", "sex": "性别：{}。",
        "years": "{}岁",
        "complaint": "主诉：{}。", "history": "既往史：{}。", "personality": "性格：{}。", "character": "人物设定：{}",
        "patient_rules": "只以患者的身份、用第一人称说话，每次只说一轮，简短自然（一到三句话）。"
                         "用日常的话描述自己的感受，回答{role}的提问，担心时可以提出自己的问题，只有被问到时才说出细节。"
                         "不要替{role}说话，不要写角色标签或动作描写。请用中文回答。",
        "clinician_intro": "你是{name}，一位{specialty}{role}。",
        "specialty": "{}", "style": "风格：{}。",
        "clinician_rules": "你正在和一位患者交谈。请围绕症状、病史和用药情况有针对性地提问，"
                           "用通俗的话解释可能的原因，给出安全可行的建议，需要检查或当面就诊时要说明；不要做出确定的诊断。"
                           "只以{role}的身份说话，每次只说一轮，不要写角色标签。请用中文回答。",
        "opened": "你已经用这句话开始了这次问诊：“{}”",
        "greeting": {"doctor": "您好，我是{name}，请问今天哪里不舒服？",
                     "nurse": "您好，我是{name}，今天感觉怎么样？"},
        "default_name": {"doctor": "接诊医生", "nurse": "责任护士"},
    },
}


def patient_system_prompt(patient: Persona, clinician: Persona) -> str:
    t = _TEXT[patient.language]
    role = t[clinician.role]
    lines = [t["patient_intro"].format(role=role)]
    if patient.get("name"):
        lines.append(t["name"].format(patient.get("name")))
    age = patient.get("age")
    if isinstance(patient.fields.get("age"), int):
        age = t["years"].format(age)
    if age and patient.get("sex"):
        lines.append(t["age_sex"].format(age=age, sex=patient.get("sex")))
    elif age or patient.get("sex"):
        lines.append(t["age"].format(age) if age else t["sex"].format(patient.get("sex")))
    for key in ("complaint", "history", "personality"):
        if patient.get(key):
            lines.append(t[key].format(patient.get(key).rstrip("。.")))
    if patient.get("system_prompt"):
        lines.append(t["character"].format(patient.get("system_prompt")))
    lines.append(t["patient_rules"].format(role=role))
    return "\n".join(lines)


def clinician_name(clinician: Persona) -> str:
    return clinician.get("name") or _TEXT[clinician.language]["default_name"][clinician.role]


def clinician_system_prompt(clinician: Persona) -> str:
    """The doctor's/nurse's system prompt: sent with its requests and kept as the sample's system turn."""
    t = _TEXT[clinician.language]
    role = t[clinician.role]
    specialty = t["specialty"].format(clinician.get("specialty")) if clinician.get("specialty") else ""
    lines = [t["clinician_intro"].format(name=clinician_name(clinician), role=role, specialty=specialty)]
    if clinician.get("style"):
        lines.append(t["style"].format(clinician.get("style").rstrip("。.")))
    if clinician.get("system_prompt"):
        lines.append(clinician.get("system_prompt"))
    lines.append(t["clinician_rules"].format(role=role))
    return "\n".join(lines)


def greeting(clinician: Persona) -> str:
    """The doctor's/nurse's opening line: the patient answers it (it is not a sample turn)."""
    return clinician.get("greeting") or \
        _TEXT[clinician.language]["greeting"][clinician.role].format(name=clinician_name(clinician))


def patient_messages(patient: Persona, clinician: Persona, turns: Sequence[str]) -> list[dict]:
    """The patient's request: its persona as the system prompt, then the dialogue with the roles swapped (the
    clinician's greeting and turns are 'user', the patient's own turns 'assistant'). turns: patient first."""
    messages = [{"role": "system", "content": patient_system_prompt(patient, clinician)},
                {"role": "user", "content": greeting(clinician)}]
    for i, text in enumerate(turns):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
    return messages


def clinician_messages(clinician: Persona, turns: Sequence[str]) -> list[dict]:
    """The doctor's/nurse's request: its persona (and its greeting) as the system prompt, the patient as 'user'."""
    system = clinician_system_prompt(clinician) + "\n" + _TEXT[clinician.language]["opened"].format(greeting(clinician))
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return messages


# ------------------------------------------------------------------------------------------------
# Quality filter

@dataclass(frozen=True)
class QualityConfig:
    checks: frozenset = frozenset(QUALITY_CHECKS)
    min_chars: int = 2  # letters/digits/CJK characters a turn needs (too_short)
    max_repeats: int = 3  # back-to-back copies of a word or phrase allowed (degenerate)


_LABELS = {"patient": r"patient|患者|病人|病患",
           "clinician": r"doctor|dr\.?|nurse|physician|[\u4e00-\u9fff]{0,3}(?:医生|大夫|护士)"}


def _label_re(names: str, anchored: bool) -> re.Pattern:
    # a role label at the start of a line: "Doctor:", "**Patient**:", "> 护士：", "李医生："
    return re.compile(rf"{'^' if anchored else '(?m)^'}[\s>*_#\-]*(?:{names})[\s*_]*[:：][\s*_]*", re.IGNORECASE)


_OWN_LABEL = {side: _label_re(names, True) for side, names in _LABELS.items()}
_OTHER_LABEL = {"patient": _label_re(_LABELS["clinician"], False), "clinician": _label_re(_LABELS["patient"], False)}
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S)  # an unclosed block (cut by max_tokens) runs to the end
_QUOTES = {'"': '"', "“": "”", "「": "」", "'": "'"}
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]|[^\W_]+|[^\w\s]")


def normalize(text: str) -> str:
    """Case, width, spaces and punctuation folded away: what deduplication and the repeat check compare."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).lower() if ch.isalnum())


def clean_turn(text: Optional[str], side: str) -> str:
    """A generated turn without surrounding space, its own leading role label ("Patient:") or wrapping quotes."""
    text = _THINK.sub("", text or "").strip()  # a reasoning model's thoughts are not part of the turn
    text = _OWN_LABEL[side].sub("", text, count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1] and text.count(text[0]) + text.count(text[-1]) == 2:
        text = text[1:-1].strip()
    return text


def is_degenerate(text: str, max_repeats: int = 3) -> bool:
    """A word or phrase (up to 8 tokens; a CJK character is a token) repeated back to back more than max_repeats
    times, or a long turn made of very few distinct tokens. Punctuation runs ("......") do not count."""
    tokens = _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())
    n = len(tokens)
    if n >= 40 and len(set(tokens)) < 0.25 * n:
        return True
    for period in range(1, 9):
        run = 0  # how many tokens in a row equal the one `period` before
        for i in range(period, n):
            run = run + 1 if tokens[i] == tokens[i - period] else 0
            if run >= period * max_repeats and any(t[0].isalnum() for t in tokens[i - period + 1: i + 1]):
                return True
    return False


def bad_turn_reason(text: str, side: str, previous: Sequence[str], cfg: QualityConfig) -> Optional[str]:
    """Why a cleaned turn is unusable, or None. side: "patient" or "clinician"; previous: the dialogue so far."""
    if not text.strip():
        return "empty"
    norm = normalize(text)
    checks = cfg.checks
    if "too_short" in checks and len(norm) < cfg.min_chars:
        return "too_short"
    if "role_confusion" in checks and _OTHER_LABEL[side].search(text):
        return "role_confusion"  # e.g. the patient writing the doctor's lines
    if "degenerate" in checks and is_degenerate(text, cfg.max_repeats):
        return "degenerate"
    if "repeat" in checks and norm and any(norm == normalize(p) for p in previous[-2:]):
        return "repeat"  # echoes the other side's last turn, or its own
    return None


def dialogue_hash(conversations: Sequence[dict]) -> str:
    """Deduplication key: the normalized human/gpt turns (the system prompt and ids do not count)."""
    body = "\n".join(f"{t['from']}:{normalize(t['value'])}" for t in conversations if t["from"] != "system")
    return hashlib.sha1(body.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Planning

@dataclass(frozen=True)
class Plan:
    index: int
    id: str
    patient: Persona
    clinician: Persona


def plan_dialogues(patients: Sequence[Persona], clinicians: Sequence[Persona], num_dialogues: int,
                   seed: int) -> list[Plan]:
    """Dialogue i: patient i mod P (round i div P) with a doctor/nurse of the patient's language drawn from
    (seed, patient, round). Plan i never depends on num_dialogues, so a larger rerun extends a smaller one."""
    pools = {lang: [c for c in clinicians if c.language == lang] for lang in LANGUAGES}
    plans = []
    for i in range(num_dialogues):
        patient = patients[i % len(patients)]
        rnd = i // len(patients)
        pool = pools[patient.language]
        if not pool:
            raise DataError(f"{patient.where}: no doctor or nurse persona speaks '{patient.language}' "
                            "(add one to the doctor/nurse seed files, or choose --language)")
        clinician = random.Random(f"{seed}:{patient.id}:{rnd}").choice(pool)
        plans.append(Plan(i, f"{patient.id}.{clinician.id}.{rnd}", patient, clinician))
    return plans


def request_seed(seed: int, dialogue_id: str, turn: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{dialogue_id}:{turn}".encode()).digest()[:4], "big") >> 1


# ------------------------------------------------------------------------------------------------
# Output files

class JsonlLog:
    """An append-only JSONL file of records with an 'id': reads what an earlier run left (an unfinished last line
    from a killed run is cut off and its dialogue made again) and appends one flushed line a record."""

    def __init__(self, path: str, need_conversations: bool):
        self.path = path
        self.records: list[dict] = []
        if os.path.exists(path) and self._cut_unfinished_line():
            for rec in iter_records(path):
                data = rec.data
                if not isinstance(data, dict) or not isinstance(data.get("id"), str):
                    raise DataError(f"{rec.where}: not a role-play record (no string 'id'); choose another "
                                    "--output_file")
                conv = data.get("conversations")
                if need_conversations and not (isinstance(conv, list) and all(
                        isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
                        for t in conv)):
                    raise DataError(f"{rec.where}: role-play record '{data['id']}' needs 'conversations': a list of "
                                    "{\"from\", \"value\"} strings")
                self.records.append(data)
        self._file = None

    def _cut_unfinished_line(self) -> bool:
        """Cuts off an unfinished last line; whether any record is left to read."""
        with open(self.path, "rb+") as f:
            data = f.read()
            keep = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
            if keep < len(data):
                f.truncate(keep)
                logger.warning("%s: cut off an unfinished last line (%d bytes) left by an interrupted run; that "
                               "dialogue is generated again", self.path, len(data) - keep)
        return bool(data[:keep].strip())

    def append(self, record: dict) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ------------------------------------------------------------------------------------------------
# Generation

@dataclass
class GenerationSettings:
    model: str
    num_turns: int = 4
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.9
    seed: int = 42
    system_turn: bool = True
    quality: QualityConfig = QualityConfig()


@dataclass
class Outcome:
    plan: Plan
    turns: list = field(default_factory=list)  # texts, patient first
    bad: Optional[tuple] = None  # (reason, turn index, raw text)
    error: Optional[str] = None  # the endpoint failed (after the client's retries): not written, a rerun retries
    cancelled: bool = False


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class RolePlayGenerator:
    """Plays both sides of one dialogue at a time (thread-safe: one openai client, shared by the workers)."""

    def __init__(self, client, settings: GenerationSettings, stop: Optional[threading.Event] = None):
        self.client, self.s = client, settings
        self.stop = stop or threading.Event()

    def say(self, messages: list[dict], seed: int) -> str:
        r = self.client.chat.completions.create(model=self.s.model, messages=messages, max_tokens=self.s.max_tokens,
                                                temperature=self.s.temperature, top_p=self.s.top_p, seed=seed)
        return r.choices[0].message.content if r.choices else ""

    def run(self, plan: Plan) -> Outcome:
        import openai

        out = Outcome(plan)
        for t in range(2 * self.s.num_turns):
            if self.stop.is_set():
                out.cancelled = True
                return out
            side = "patient" if t % 2 == 0 else "clinician"
            messages = patient_messages(plan.patient, plan.clinician, out.turns) if side == "patient" \
                else clinician_messages(plan.clinician, out.turns)
            try:
                raw = self.say(messages, request_seed(self.s.seed, plan.id, t))
            except openai.BadRequestError as e:  # e.g. the dialogue outgrew the model's context: it ends here
                out.bad = ("bad_request", t, _one_line(e))
                break
            except openai.APIConnectionError as e:  # the client retried already: the server is gone
                out.error = _one_line(e)
                self.stop.set()
                return out
            except openai.APIError as e:
                out.error = _one_line(e)
                return out
            text = clean_turn(raw, side)
            reason = bad_turn_reason(text, side, out.turns, self.s.quality)
            if reason:
                out.bad = (reason, t, raw or "")
                break
            out.turns.append(text)
        if len(out.turns) % 2:  # a patient turn without its answer
            out.turns.pop()
        return out

    def record(self, out: Outcome) -> dict:
        plan = out.plan
        conv = [{"from": "system", "value": clinician_system_prompt(plan.clinician)}] if self.s.system_turn else []
        conv += [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(out.turns)]
        return {"id": plan.id, "conversations": conv, "patient": plan.patient.id, "clinician": plan.clinician.id,
                "role": plan.clinician.role, "language": plan.patient.language, "model": self.s.model,
                "turns": len(out.turns) // 2}


def make_client(base_url: str, api_key: str, max_retries: int, timeout: float):
    """(openai.OpenAI, retry counter): the counter holds how many requests were retries, read from the
    x-stainless-retry-count header that the client puts on every attempt (it reports no total of its own)."""
    import openai

    retries = _Counter()

    def on_request(request):
        if request.headers.get("x-stainless-retry-count", "0") != "0":
            retries.add()

    http_client = openai.DefaultHttpxClient(event_hooks={"request": [on_request]})
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout,
                           http_client=http_client)
    return client, retries


class _Counter:
    def __init__(self):
        self.value, self._lock = 0, threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n


def resolve_model(client, base_url: str, model: Optional[str]) -> str:
    """Checks the endpoint answers (GET /models) and returns --model, or the first model it serves."""
    import openai

    try:
        served = [m.id for m in client.with_options(max_retries=1).models.list().data]
    except openai.APIConnectionError as e:
        cause = e.__cause__ or e
        raise EndpointError(f"cannot reach {base_url} ({_one_line(cause)}); start a server first, e.g. "
                            "`python openai_api.py --port 8000`, or pass --base_url") from None
    except openai.AuthenticationError as e:
        raise EndpointError(f"{base_url}: the API key was refused (401); pass --api_key") from None
    except openai.APIStatusError as e:
        if model:  # some OpenAI-compatible servers have no /models: trust --model
            logger.warning("%s/models answered %d; using --model %s", base_url, e.status_code, model)
            return model
        raise EndpointError(f"{base_url}/models answered {e.status_code}; pass --model") from None
    if model:
        return model
    if not served:
        raise EndpointError(f"{base_url}/models lists no model; pass --model")
    return served[0]


def generate(args: argparse.Namespace) -> dict:
    """Generate the planned dialogues that are not done yet; returns the summary (counts)."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    patients = load_personas([args.patient_file], patient=True)
    clinicians = load_personas(args.clinician_files, patient=False)
    if args.language != "all":
        patients = [p for p in patients if p.language == args.language]
        clinicians = [c for c in clinicians if c.language == args.language]
        if not patients:
            raise DataError(f"{args.patient_file}: no patient persona in language '{args.language}'")
    plans = plan_dialogues(patients, clinicians, args.num_dialogues, args.seed)

    output = JsonlLog(args.output_file, need_conversations=True)
    rejected = JsonlLog(args.output_file + ".rejected", need_conversations=False)
    hashes = {}
    for rec in output.records:
        hashes.setdefault(dialogue_hash(rec["conversations"]), rec["id"])
    done = {r["id"] for r in output.records} | {r["id"] for r in rejected.records}
    todo = [p for p in plans if p.id not in done]
    summary = {"planned": len(plans), "skipped_done": len(plans) - len(todo), "generated": 0, "shortened": 0,
               "dropped": {}, "bad_turns": {}, "failed": 0, "cancelled": 0, "retries": 0, "output": args.output_file}
    if not todo:
        logger.info("All %d planned dialogues are already in %s (or its .rejected file)", len(plans), args.output_file)
        return summary

    client, retries = make_client(args.base_url, args.api_key, args.max_retries, args.timeout)
    model = resolve_model(client, args.base_url, args.model)
    checks = frozenset(QUALITY_CHECKS) if args.quality_checks == "all" else \
        frozenset(c for c in args.quality_checks.split(",") if c and c != "none")
    settings = GenerationSettings(model, args.num_turns, args.max_tokens, args.temperature,
                                  args.top_p, args.seed, args.system_turn,
                                  QualityConfig(checks, args.min_turn_chars, args.max_repeats))
    gen = RolePlayGenerator(client, settings)
    logger.info("Generating %d dialogue(s) of up to %d turns with %s at %s (%d done before, %d at a time)",
                len(todo), args.num_turns, model, args.base_url, summary["skipped_done"], args.max_concurrency)
    first_error = None

    def count(key: str, reason: str) -> None:
        summary[key][reason] = summary[key].get(reason, 0) + 1

    def handle(out: Outcome) -> None:
        nonlocal first_error
        if out.cancelled:  # stopped before its end (connection lost, or interrupted): a rerun makes it
            summary["cancelled"] += 1
            return
        if out.error:
            summary["failed"] += 1
            first_error = first_error or out.error
            logger.warning("dialogue %s failed: %s", out.plan.id, out.error)
            return
        rec = gen.record(out)
        if out.bad:
            count("bad_turns", out.bad[0])
        reason = None
        if rec["turns"] < max(1, args.min_turns):
            reason = out.bad[0] if out.bad else "too_few_turns"
        else:
            h = dialogue_hash(rec["conversations"])
            if h in hashes:
                reason = "duplicate"
                rec["duplicate_of"] = hashes[h]
            else:
                hashes[h] = rec["id"]
        if reason:
            count("dropped", reason)
            rejected.append({**rec, "reason": reason,
                             **({"bad_turn": out.bad[1], "bad_text": out.bad[2]} if out.bad else {})})
        else:
            output.append(rec)
            summary["generated"] += 1
            summary["shortened"] += rec["turns"] < args.num_turns

    pool = ThreadPoolExecutor(max_workers=args.max_concurrency, thread_name_prefix="roleplay")
    futures, handled = [], set()
    try:
        with logging_redirect_tqdm(), tqdm(total=len(todo), desc="dialogues", unit="dlg",
                                           disable=args.no_progress) as bar:
            futures = [pool.submit(gen.run, plan) for plan in todo]
            for fut in as_completed(futures):
                handled.add(fut)
                handle(fut.result())
                bar.update(1)
                bar.set_postfix(kept=summary["generated"], dropped=sum(summary["dropped"].values()),
                                failed=summary["failed"], refresh=False)
    except KeyboardInterrupt:
        summary["interrupted"] = True
        logger.warning("Interrupted: waiting for the requests in flight (Ctrl-C again quits at once); the finished "
                       "dialogues are saved; rerun the same command to continue")
    finally:
        gen.stop.set()  # running dialogues stop after their current request
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt:  # a second Ctrl-C: leave the requests in flight behind (every line is flushed)
            output.close()
            rejected.close()
            logger.warning("Stopped; rerun the same command to continue")
            os._exit(130)
        try:
            for fut in futures:  # after an interrupt: those that finished meanwhile are saved too
                if fut not in handled and fut.done() and not fut.cancelled():
                    handle(fut.result())
        finally:
            output.close()
            rejected.close()
            summary["retries"] = retries.value
    if first_error:
        summary["first_error"] = first_error
    return summary


# ------------------------------------------------------------------------------------------------
# Command line

def build_parser(seed_dir: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate multi-turn patient-doctor/nurse dialogues (sharegpt JSONL for supervised_finetuning.py)"
                    " with one model playing both sides through an OpenAI-compatible endpoint.")
    g = p.add_argument_group("personas and output")
    g.add_argument("--patient_file", default=os.path.join(seed_dir, "seed_patient_role.jsonl"),
                   help="JSONL of patient personas (default: the shipped seed file)")
    g.add_argument("--clinician_files", nargs="+", default=[os.path.join(seed_dir, "seed_doctor_role.jsonl"),
                                                            os.path.join(seed_dir, "seed_nurse_role.jsonl")],
                   help="JSONL files of doctor/nurse personas (default: the shipped doctor and nurse seed files)")
    g.add_argument("--language", default="all", choices=["all", *LANGUAGES], help="Only personas of this language")
    g.add_argument("--output_file", default="outputs-roleplay/roleplay_dialogues.jsonl",
                   help="Sharegpt JSONL, appended to; dropped dialogues go to OUTPUT_FILE.rejected")
    g.add_argument("--num_dialogues", type=int, default=24, help="Dialogues planned in all (a rerun skips those done)")
    g.add_argument("--num_turns", type=int, default=4, help="Patient/clinician exchanges per dialogue")
    g.add_argument("--min_turns", type=int, default=1,
                   help="A dialogue cut short by a bad turn is kept when it has at least this many good exchanges")
    g.add_argument("--system_turn", action=argparse.BooleanOptionalAction, default=True,
                   help="Start each sample with the doctor's/nurse's persona as a system turn")
    g = p.add_argument_group("endpoint")
    g.add_argument("--base_url", default=os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
                   help=f"OpenAI-compatible API (default: $OPENAI_BASE_URL, else {DEFAULT_BASE_URL}: openai_api.py)")
    g.add_argument("--model", default=None, help="Model name (default: the first one the endpoint lists)")
    g.add_argument("--api_key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("MEDGPT_API_KEY") or "none",
                   help="API key (default: $OPENAI_API_KEY or $MEDGPT_API_KEY)")
    g.add_argument("--max_concurrency", type=int, default=4, help="Dialogues generated at the same time")
    g.add_argument("--max_retries", type=int, default=5,
                   help="Retries of a request on connection errors, 429 and 5xx (the openai client's backoff)")
    g.add_argument("--timeout", type=float, default=300.0, help="Seconds one request may take")
    g = p.add_argument_group("sampling")
    g.add_argument("--max_tokens", type=int, default=256, help="Most tokens in one turn")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top_p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=42, help="Pairs personas and seeds every request (reproducible)")
    g = p.add_argument_group("quality filter")
    g.add_argument("--quality_checks", default="all",
                   help=f"Comma-separated checks, 'all' or 'none': {', '.join(QUALITY_CHECKS)} (empty turns are "
                        "always dropped)")
    g.add_argument("--min_turn_chars", type=int, default=2, help="too_short: fewer letters/digits/characters")
    g.add_argument("--max_repeats", type=int, default=3,
                   help="degenerate: a word or phrase repeated back to back more times than this")
    p.add_argument("--no_progress", action="store_true", help="No progress bar")
    return p


def parse_args(argv=None, seed_dir: str = ".") -> argparse.Namespace:
    p = build_parser(seed_dir)
    args = p.parse_args(argv)
    for name in ("num_dialogues", "num_turns", "max_concurrency", "max_tokens", "max_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.max_retries < 0 or args.min_turns < 0 or args.min_turn_chars < 0:
        p.error("--max_retries, --min_turns and --min_turn_chars cannot be negative")
    if args.min_turns > args.num_turns:
        p.error(f"--min_turns {args.min_turns} is more than --num_turns {args.num_turns}: every dialogue would be "
                "dropped")
    if args.quality_checks not in ("all", "none"):
        unknown = [c for c in args.quality_checks.split(",") if c not in QUALITY_CHECKS]
        if unknown:
            p.error(f"--quality_checks: unknown check '{unknown[0]}' (choose from {', '.join(QUALITY_CHECKS)}, "
                    "or all / none)")
    return args


def main(argv=None, seed_dir: str = ".") -> int:
    args = parse_args(argv, seed_dir)
    from .logs import setup_logging
    setup_logging()  # one format on stderr (medgpt/logs.py)
    for name in ("httpx", "httpx2", "openai"):  # a line per request or retry would bury the progress bar; the
        logging.getLogger(name).setLevel(logging.WARNING)  # retries are counted in the summary
    summary = generate(args)
    print("summary: " + json.dumps(summary, ensure_ascii=False), flush=True)
    if summary["failed"] or summary["cancelled"] or summary.get("interrupted"):
        logger.error("%d dialogue(s) not finished%s; rerun the same command to continue",
                     summary["failed"] + summary["cancelled"],
                     f" (first error: {summary['first_error']})" if summary.get("first_error") else "")
        return 1
    return 0
