"""The record formats every stage reads, how to tell them apart, and how to write one as another.

Each format belongs to one stage, whose converter (the very function the stage's reader uses) turns a record into a
clean row or raises a 'file:line: what is wrong' DataError:

=========================  ==========  =====================================================================
format                     stage       record
=========================  ==========  =====================================================================
sharegpt                   sft         {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}
messages                   sft         {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}
alpaca                     sft         {"instruction", "input", "output", "system"?, "history"?: [[q, a], ...]}
preference                 preference  {"system", "history": [[q, a], ...], "question", "response_chosen",
                                       "response_rejected"}
preference_conversations   preference  {"conversations" (or "messages") ending with the user turn, "chosen",
                                       "rejected"}
text                       pt          a line of a .txt file, or {"text"}
qa                         grpo        {"question", "answer"}
=========================  ==========  =====================================================================

A file is read as one stage: the stage most of its records look like (`file_stage`), so a record that is broken in
a file of sharegpt conversations gets the SFT reader's message, as training would give it.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Optional

from .io import DataError, Record, TextLine
from .preference import preference_row
from .pretrain import text_converter
from .qa import qa_row
from .sft import sft_row

FORMAT_STAGE = {
    "sharegpt": "sft", "messages": "sft", "alpaca": "sft",
    "preference": "preference", "preference_conversations": "preference",
    "text": "pt", "qa": "grpo",
}
SFT_FORMATS = ("alpaca", "sharegpt", "messages")
PREFERENCE_FORMATS = ("preference", "preference_conversations")
STAGES = ("sft", "preference", "pt", "grpo")
# the file extensions each stage's script reads (pretraining.py also reads .txt)
STAGE_EXTENSIONS = {"sft": (".json", ".jsonl"), "preference": (".json", ".jsonl"),
                    "pt": (".txt", ".json", ".jsonl"), "grpo": (".json", ".jsonl")}


def stage_converter(stage: str) -> Callable[[object, str], Optional[dict]]:
    """`convert(data, where)` of a stage: exactly what its training script reads records with."""
    if stage == "sft":
        return sft_row
    if stage == "preference":
        return preference_row
    if stage == "pt":
        return text_converter(keep_linebreaks=True)
    if stage == "grpo":
        return qa_row
    raise ValueError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")


def detect_format(data) -> Optional[str]:
    """The format a record looks like (by its keys; whether it is valid is the stage converter's call), or None."""
    if isinstance(data, TextLine):
        return "text"
    if not isinstance(data, dict):
        return None
    if ("conversations" in data or "messages" in data) and ("chosen" in data or "rejected" in data):
        return "preference_conversations"
    if "response_chosen" in data or "response_rejected" in data:
        return "preference"
    if "conversations" in data:
        return "sharegpt"
    if "messages" in data:
        return "messages"
    if "instruction" in data:
        return "alpaca"
    if "question" in data and "answer" in data:
        return "qa"
    if "text" in data:
        return "text"
    return None


def file_stage(items: Iterable["Record | DataError"]) -> Optional[str]:
    """The stage most records of a file (read_records' output) look like; None when no record looks like any."""
    votes = Counter(FORMAT_STAGE[f] for f in (detect_format(i.data) for i in items if isinstance(i, Record)) if f)
    return votes.most_common(1)[0][0] if votes else None


def unknown_record(data, where: str):
    """The converter of a file whose records look like no format: each record is reported as such."""
    keys = ", ".join(sorted(data)) if isinstance(data, dict) else type(data).__name__
    raise DataError(f"{where}: unknown record format ({keys or 'no keys'}); expected sharegpt 'conversations', "
                    "OpenAI 'messages', alpaca 'instruction'/'output', a preference pair, 'text' or "
                    "'question'/'answer'")


# ---------------------------------------------------------------------------------------------------
# Writing: a clean row (what sft_row / preference_row return) as a record of another format

_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def _sharegpt_turns(messages: list[dict]) -> list[dict]:
    return [{"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages]


def _openai_turns(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _system_history_question(messages: list[dict]) -> tuple[str, list[list[str]], str]:
    """(system, [[question, answer], ...] before the last question, last question) of messages ending with a user turn."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    system = messages[0]["content"] if has_system else ""
    body = messages[1:] if has_system else messages
    history = [[body[i]["content"], body[i + 1]["content"]] for i in range(0, len(body) - 1, 2)]
    return system, history, body[-1]["content"]


def write_record(row: dict, fmt: str) -> dict:
    """`row` (a clean SFT row {"messages"} or preference row {"messages", "chosen", "rejected"}) as a record of `fmt`.
    A preference row written as an SFT format keeps the chosen reply; an SFT row has no rejected reply, so it cannot
    become a preference record (DataError)."""
    where = row.get("where", "?")
    if fmt in SFT_FORMATS:
        messages = row["messages"] + ([{"role": "assistant", "content": row["chosen"]}] if "chosen" in row else [])
        if fmt == "sharegpt":
            return {"conversations": _sharegpt_turns(messages)}
        if fmt == "messages":
            return {"messages": _openai_turns(messages)}
        system, history, question = _system_history_question(messages[:-1])
        record = {"instruction": question, "input": "", "output": messages[-1]["content"]}
        if system:
            record["system"] = system
        if history:
            record["history"] = history
        return record
    if fmt in PREFERENCE_FORMATS:
        if "chosen" not in row:
            raise DataError(f"{where}: a conversation has no rejected reply, so it cannot become a preference pair")
        if fmt == "preference_conversations":
            return {"conversations": _sharegpt_turns(row["messages"]), "chosen": row["chosen"],
                    "rejected": row["rejected"]}
        system, history, question = _system_history_question(row["messages"])
        return {"system": system, "history": history, "question": question, "response_chosen": row["chosen"],
                "response_rejected": row["rejected"]}
    raise ValueError(f"cannot write format {fmt!r} (one of {', '.join(SFT_FORMATS + PREFERENCE_FORMATS)})")


def convert_files(paths, to: str, skip_invalid: bool = False) -> list[dict]:
    """Every record of the SFT or preference files under `paths`, read by its stage's reader, as a record of `to`.
    A bad record stops with its 'file:line' DataError, or, with skip_invalid, is skipped and counted (load_records)."""
    from .io import find_data_files, load_records, nothing_usable, read_records

    if to not in SFT_FORMATS + PREFERENCE_FORMATS:
        raise ValueError(f"cannot write format {to!r} (one of {', '.join(SFT_FORMATS + PREFERENCE_FORMATS)})")
    out: list[dict] = []
    for source in paths:
        files = find_data_files(source)
        n_before = len(out)
        for path in files:
            stage = file_stage(read_records(path))
            if stage not in ("sft", "preference"):
                what = f"{stage} data" if stage else "records of no known format"
                raise DataError(f"{path}: holds {what}; only conversations (alpaca, sharegpt, messages) and "
                                "preference pairs can be converted")
            if stage == "sft" and to in PREFERENCE_FORMATS:
                raise DataError(f"{path}: conversations have no rejected reply, so they cannot become preference "
                                f"pairs ({to})")
            out += [write_record(row, to) for row in load_records([path], stage_converter(stage), skip_invalid)]
        if len(out) == n_before:
            raise nothing_usable(source, len(files), [])
    return out
