"""Multiple-choice questions from the common benchmark layouts, each record checked, errors naming file and line.

Layouts (detected per record, so a folder may mix them):

* CMB            {"question", "option": {"A": ..., "E": ...}, "answer": "C", "exam_subject"?}; options with empty
                 text are dropped; multiple-answer questions ("answer": "ABD") are skipped and counted
* MedQA          {"question", "options": {"A": ...}, "answer_idx": "A", "answer": <the answer's text>}
* MedMCQA        {"question", "opa", "opb", "opc", "opd", "cop", "subject_name"?}; `cop` is 1-4 in the original
                 release and 0-3 in the Hugging Face export (openlifescienceai/medmcqa): see `cop_base`
* generic        {"question", "options": [...] or {"A": ...}, "answer": a letter or the exact text of an option}
* C-Eval, CMMLU  CSV with the columns question, A, B, C, D(, ...), answer (any case; extra columns ignored)

The subject is the record's "subject", "exam_subject" or "subject_name" field, else the file name without a split
suffix (`anatomy_val.csv` -> anatomy; `test/anatomy.csv` -> anatomy; `US/test.jsonl` -> US). The split
(dev/val/test/train) comes from the same suffix or folder: dev questions of a subject that other files also
have are few-shot examples (split_few_shot).
A question without an answer key (a test split) is skipped and counted; a malformed one raises DataError.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from ..data.io import DataError, find_data_files, iter_records, read_text_file

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
EXTENSIONS = (".json", ".jsonl", ".csv")
SUBJECT_FIELDS = ("subject", "exam_subject", "subject_name")
_SPLITS = {"dev": "dev", "val": "val", "valid": "val", "validation": "val", "test": "test", "train": "train"}
_SPLIT_SUFFIX = re.compile(r"^(.*?)[_\-.](dev|val|valid|validation|test|train)$", re.IGNORECASE)


@dataclass
class MCQ:
    question: str
    letters: list[str]  # the option labels, in order (A, B, C, ...)
    options: list[str]  # the option texts, parallel to letters
    answer: int         # index of the correct option
    subject: str
    where: str          # "file:line"
    split: Optional[str] = None

    @property
    def answer_letter(self) -> str:
        return self.letters[self.answer]


class _Skip(Exception):
    """A record that cannot be scored but is not malformed (no answer key, several answers): counted, not an error."""


def subject_and_split(path: str) -> tuple[str, Optional[str]]:
    """(subject, split) from a file's name and folder (see the module docstring)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    m = _SPLIT_SUFFIX.match(stem)
    if m and m.group(1):
        return m.group(1), _SPLITS[m.group(2).lower()]
    if stem.lower() in _SPLITS:  # US/test.jsonl, medmcqa/dev.json
        return parent or stem, _SPLITS[stem.lower()]
    return stem, _SPLITS.get(parent.lower())


def _text(value, where: str, name: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # numeric options ("12", 0.5) as CSV readers and JSON exports write them
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} must be a string, got {type(value).__name__}")
    return value.strip()


def _options_from_dict(opts: dict, where: str, name: str) -> tuple[list[str], list[str]]:
    letters, texts = [], []
    for key, value in opts.items():
        letter = str(key).strip().upper()
        if letter not in LETTERS:
            raise DataError(f"{where}: {name} has the key {key!r}; option keys must be letters A-{LETTERS[-1]}")
        if value is None:
            continue
        text = _text(value, where, f"{name}[{key!r}]")
        if text:  # CMB pads its option dicts with empty E options
            letters.append(letter)
            texts.append(text)
    order = sorted(range(len(letters)), key=lambda i: letters[i])
    return [letters[i] for i in order], [texts[i] for i in order]


def _options_from_list(opts: list, where: str, name: str) -> tuple[list[str], list[str]]:
    if len(opts) > len(LETTERS):
        raise DataError(f"{where}: {name} has {len(opts)} options; at most {len(LETTERS)} are supported")
    texts = [_text(v, where, f"{name}[{i}]") for i, v in enumerate(opts)]
    for i, t in enumerate(texts):
        if not t:
            raise DataError(f"{where}: {name}[{i}] is empty")
    return list(LETTERS[: len(texts)]), texts


def _answer_index(answer, letters: list[str], texts: list[str], where: str, name: str) -> int:
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise _Skip("no answer key")
    if not isinstance(answer, str):
        raise DataError(f"{where}: {name} must be an option letter ({', '.join(letters)}), got {answer!r}")
    a = answer.strip()
    key = a.strip("()（）.．、: ").upper()
    if key in letters:
        return letters.index(key)
    if a in texts:  # the answer written out as an option's text
        return texts.index(a)
    if len(key) > 1 and all(c in letters for c in key):
        raise _Skip("multiple answers")
    raise DataError(f"{where}: {name} {answer!r} is not one of the options {', '.join(letters)}")


def _subject(data: dict, default: str, where: str) -> str:
    for key in SUBJECT_FIELDS:
        if key in data and data[key] is not None:
            value = data[key]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field '{key}' must be a non-empty string")
            return value.strip()
    return default


def _question(data: dict, where: str) -> str:
    if "question" not in data:
        if "messages" in data or "conversations" in data or "instruction" in data:
            raise DataError(f"{where}: an SFT conversation, not a multiple-choice question (held-out conversations "
                            "go to --sft_eval_file)")
        raise DataError(f"{where}: not a multiple-choice record (keys: {', '.join(sorted(map(str, data))) or 'none'}); "
                        "expected 'question' with 'option'/'options' and 'answer'/'answer_idx' (CMB, MedQA, generic) "
                        "or 'opa'..'opd' and 'cop' (MedMCQA)")
    q = _text(data["question"], where, "field 'question'")
    if not q:
        raise DataError(f"{where}: field 'question' is empty")
    return q


def _check(letters: list[str], where: str) -> None:
    if len(letters) < 2:
        raise DataError(f"{where}: needs at least 2 non-empty options, found {len(letters)}")


def record_to_mcq(data, where: str, subject: str, split: Optional[str]) -> MCQ:
    """One JSON record in the CMB, MedQA or generic layout. (MedMCQA records go through medmcqa_to_mcq.)"""
    if not isinstance(data, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(data).__name__}")
    question = _question(data, where)
    key = "option" if "option" in data else "options"
    if key not in data:
        raise DataError(f"{where}: missing field 'options' (a list, or an object keyed by letter)")
    opts = data[key]
    if isinstance(opts, dict):
        letters, texts = _options_from_dict(opts, where, f"field '{key}'")
    elif isinstance(opts, list):
        letters, texts = _options_from_list(opts, where, f"field '{key}'")
    else:
        raise DataError(f"{where}: field '{key}' must be a list or an object keyed by letter, got {type(opts).__name__}")
    _check(letters, where)
    if "answer_idx" in data:  # MedQA: 'answer' holds the text, 'answer_idx' the letter
        answer = _answer_index(data["answer_idx"], letters, texts, where, "field 'answer_idx'")
    elif "answer" in data:
        answer = _answer_index(data["answer"], letters, texts, where, "field 'answer'")
    else:
        raise DataError(f"{where}: missing field 'answer' (the letter of the correct option)")
    return MCQ(question, letters, texts, answer, _subject(data, subject, where), where, split)


_MEDMCQA_OPTIONS = ("opa", "opb", "opc", "opd", "ope")


def _medmcqa_cop(data: dict, where: str) -> Optional[int]:
    cop = data.get("cop")
    if cop is None or cop == "" or cop == -1:  # the test split has no key (HF export: -1)
        return None
    if isinstance(cop, str) and cop.strip().lstrip("-").isdigit():
        cop = int(cop)
    if not isinstance(cop, int) or isinstance(cop, bool) or not 0 <= cop <= len(_MEDMCQA_OPTIONS):
        raise DataError(f"{where}: field 'cop' must be the correct option's number (1-4, or 0-3), got {data.get('cop')!r}")
    return cop


def medmcqa_to_mcq(data: dict, where: str, subject: str, split: Optional[str], cop_base: int) -> MCQ:
    question = _question(data, where)
    letters, texts = [], []
    for i, key in enumerate(_MEDMCQA_OPTIONS):
        if key in data and data[key] is not None:
            text = _text(data[key], where, f"field '{key}'")
            if not text:
                raise DataError(f"{where}: field '{key}' is empty")
            letters.append(LETTERS[i])
            texts.append(text)
    _check(letters, where)
    cop = _medmcqa_cop(data, where)
    if cop is None:
        raise _Skip("no answer key")
    answer = cop - cop_base
    if not 0 <= answer < len(letters):
        raise DataError(f"{where}: field 'cop' is {cop} but there are {len(letters)} options "
                        f"(read as {'1-4' if cop_base else '0-3'})")
    return MCQ(question, letters, texts, answer, _subject(data, subject, where), where, split)


def _medmcqa_base(records, path: str, cop_base: Optional[int]) -> int:
    """1 for the original release (cop 1-4), 0 for the Hugging Face export (cop 0-3): from the values in the file."""
    if cop_base is not None:
        return cop_base
    seen = set()
    for rec in records:
        if isinstance(rec.data, dict) and "opa" in rec.data:
            cop = _medmcqa_cop(rec.data, rec.where)
            if cop is not None:
                seen.add(cop)
    if 0 in seen and 4 in seen:
        raise DataError(f"{path}: MedMCQA 'cop' values include both 0 and 4: cannot tell 0-3 from 1-4 "
                        "numbering (pass --medmcqa_cop_base 0 or 1)")
    if 0 in seen:
        return 0
    if seen and 4 not in seen:
        logger.warning("%s: MedMCQA 'cop' values are all in 1-3: reading them as 1-4 numbering (the original "
                       "release); pass --medmcqa_cop_base 0 for the Hugging Face export", path)
    return 1


def _csv_records(path: str):
    """(row dict with lower-cased column names, 'file:line') for each CSV row, line = where the row starts."""
    with io.StringIO(read_text_file(path), newline="") as f:  # the project's one decoding path (BOM, GBK: errors)
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty CSV file") from None
        except csv.Error as e:
            raise DataError(f"{path}:1: unreadable CSV header ({e})") from None
        names = [h.strip().lower() if h.strip().lower() in ("question", "answer") else h.strip() for h in header]
        columns = {n: i for i, n in enumerate(names) if n}
        if "question" not in columns or "A" not in columns or "B" not in columns:
            raise DataError(f"{path}:1: CSV header needs the columns question, A, B, ... and answer (C-Eval/CMMLU "
                            f"layout); found: {', '.join(h for h in header if h.strip()) or 'none'}")
        if "answer" not in columns:
            raise DataError(f"{path}:1: no 'answer' column (a test split without answers cannot be scored)")
        letters = [c for c in LETTERS if c in columns]
        line = reader.line_num
        while True:
            start = line + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}:{start}: unreadable CSV row ({e})") from None
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{start}"
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} fields, but the header has {len(header)}")
            yield {"question": row[columns["question"]], "options": {c: row[columns[c]] for c in letters},
                   "answer": row[columns["answer"]]}, where


def load_mcq_file(path: str, cop_base: Optional[int] = None, skipped: Optional[dict] = None) -> list[MCQ]:
    """The scorable questions of one file; unscorable ones are counted in `skipped` (reason -> [where])."""
    subject, split = subject_and_split(path)
    items: list[MCQ] = []
    if path.endswith(".csv"):
        records = [(d, w) for d, w in _csv_records(path)]
        base = 1
    else:
        recs = list(iter_records(path))
        records = [(r.data, r.where) for r in recs]
        base = _medmcqa_base(recs, path, cop_base) if any(isinstance(d, dict) and "opa" in d for d, _ in records) else 1
    for data, where in records:
        try:
            if isinstance(data, dict) and "opa" in data:
                items.append(medmcqa_to_mcq(data, where, subject, split, base))
            else:
                items.append(record_to_mcq(data, where, subject, split))
        except _Skip as e:
            if skipped is not None:
                skipped.setdefault(str(e), []).append(where)
    return items


def load_mcq(paths: Sequence[str], cop_base: Optional[int] = None, max_samples: Optional[int] = None,
             skipped: Optional[dict] = None) -> list[MCQ]:
    """Questions of every .json/.jsonl/.csv file in `paths` (files or folders); at most `max_samples` per file."""
    items: list[MCQ] = []
    skipped = {} if skipped is None else skipped
    for given in paths:
        for path in find_data_files(given, EXTENSIONS):
            got = load_mcq_file(path, cop_base, skipped)
            if not got:
                raise DataError(f"{path}: no question with an answer key")
            items += got[:max_samples] if max_samples else got
    for reason, where in skipped.items():
        logger.warning("Skipped %d question(s) with %s (not scorable), first at %s", len(where), reason, where[0])
    return items


def split_few_shot(items: list[MCQ]) -> tuple[list[MCQ], list[MCQ]]:
    """(questions to score, few-shot pool): questions from dev-split files are examples only, for the subjects that
    other files have questions of (C-Eval's dev/ beside val/); a dev split alone (MedMCQA's dev.json) is scored."""
    scored_subjects = {q.subject for q in items if q.split != "dev"}
    pool = [q for q in items if q.split == "dev" and q.subject in scored_subjects]
    return [q for q in items if not (q.split == "dev" and q.subject in scored_subjects)], pool
