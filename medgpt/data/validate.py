"""Checking data files for any stage (tools/validate_data.py): every bad record as 'file:line: what is wrong', then
records per format, turns, token lengths as training would tokenize them, truncation, and duplicates.

Records go through the stages' own reader (io.read_records -> io.convert_records) and converters
(formats.stage_converter), so a file the validator passes is a file training reads, and each problem is the line
training would stop at. Tokens are counted by the stages' own encoders: sft.encode_conversation (SFT),
preference.encode_pair (RM/DPO/ORPO), pretrain.encode_documents (PT) and qa.question_prompt (GRPO).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .formats import FORMAT_STAGE, STAGE_EXTENSIONS, detect_format, file_stage, stage_converter, unknown_record
from .io import DataError, Record, convert_records, find_data_files, nothing_usable, read_records

ALL_EXTENSIONS = (".txt", ".json", ".jsonl")


@dataclass
class Row:
    where: str
    fmt: str
    row: dict


@dataclass
class Scan:
    """What reading the paths found: problems in file order, clean rows per stage, files per stage."""
    problems: list[str] = field(default_factory=list)
    rows: dict[str, list[Row]] = field(default_factory=lambda: defaultdict(list))
    files: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    n_files: int = 0

    @property
    def n_rows(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def formats(self) -> Counter:
        return Counter(r.fmt for rows in self.rows.values() for r in rows)


def scan(paths: Sequence[str], stage: Optional[str] = None) -> Scan:
    """Read every data file under `paths` (files or folders). Each file is read as `stage`, or, without one, as the
    stage most of its records look like (formats.file_stage); every problem is collected, none raised."""
    out = Scan()
    for source in paths:
        try:
            files = find_data_files(source, STAGE_EXTENSIONS[stage] if stage else ALL_EXTENSIONS)
        except DataError as e:
            out.problems.append(str(e))
            continue
        usable, problems = 0, []
        for path in files:
            items = list(read_records(path))
            file_as = stage or file_stage(items)
            convert = stage_converter(file_as) if file_as else unknown_record
            for item in convert_records(items, convert):
                if isinstance(item, DataError):
                    problems.append(str(item))
                    continue
                record, row = item
                if row is None:  # fine but empty (a blank text line)
                    continue
                fmt = detect_format(record.data)
                if fmt is None or FORMAT_STAGE[fmt] != file_as:
                    fmt = file_as  # e.g. a {"text"} record read as pretraining data by --stage pt
                out.rows[file_as].append(Row(record.where, fmt, row))
                usable += 1
            if file_as:
                out.files[file_as].append(path)
        out.n_files += len(files)
        out.problems += problems
        if not usable:
            out.problems.append(str(nothing_usable(source, len(files), problems)))
    return out


# ---------------------------------------------------------------------------------------------------
# Duplicates

def _key(stage: str, row: dict) -> str:
    if stage == "pt":
        return " ".join(row["text"].split())
    return json.dumps({k: v for k, v in row.items() if k != "where"}, ensure_ascii=False, sort_keys=True)


def duplicates(result: Scan) -> list[str]:
    """'file:line: duplicate of file:line' for every record equal (once normalised) to an earlier one of its stage."""
    out = []
    for stage, rows in result.rows.items():
        first: dict[str, str] = {}
        for r in rows:
            k = _key(stage, r.row)
            if k in first:
                out.append(f"{r.where}: duplicate of {first[k]}")
            else:
                first[k] = r.where
    return out


# ---------------------------------------------------------------------------------------------------
# Token statistics

def percentiles(values: Sequence[int]) -> str:
    import numpy as np

    if not values:
        return "none"
    a = np.asarray(values)

    def p(q):  # a length that occurs, not an interpolation
        return int(np.percentile(a, q, method="higher"))

    return f"min {int(a.min())}, p50 {p(50)}, p90 {p(90)}, p99 {p(99)}, max {int(a.max())}, mean {a.mean():.1f}"


@dataclass
class LengthOptions:
    model_max_length: int = 512  # SFT, as --model_max_length
    train_on_inputs: bool = False  # SFT
    max_length: Optional[int] = None  # preference, as --max_length (default: model_max_length)
    max_prompt_length: Optional[int] = None  # preference (default: half of max_length, as the stages)
    block_size: int = 1024  # PT
    system_prompt: Optional[str] = None  # GRPO (default: the R1 prompt, as grpo_training.py)


def sft_lengths(rows: list[Row], tokenizer, template, opts: LengthOptions) -> list[str]:
    from .sft import IGNORE_INDEX, encode_conversation

    def supervised_tokens(enc) -> int:
        return 0 if enc is None else sum(label != IGNORE_INDEX for label in enc["labels"])

    lengths, exchanges, truncated, dropped, supervised, lost = [], [], 0, 0, 0, 0
    for r in rows:
        messages = r.row["messages"]
        # the stage's own encoder, without a limit and then (only when the sample is longer) with --model_max_length
        full = encode_conversation(messages, tokenizer, template, 2 ** 62, opts.train_on_inputs)
        n = 0 if full is None else len(full["input_ids"])
        cut = full if n <= opts.model_max_length else \
            encode_conversation(messages, tokenizer, template, opts.model_max_length, opts.train_on_inputs)
        lengths.append(n)
        exchanges.append(sum(m["role"] == "user" for m in messages))
        truncated += n > opts.model_max_length and cut is not None
        dropped += cut is None
        supervised += supervised_tokens(full)
        lost += supervised_tokens(full) - supervised_tokens(cut)
    turns = Counter(exchanges)
    share = f"{100 * lost / supervised:.1f}%" if supervised else "0%"
    return [
        f"sft: {len(rows)} conversations, {sum(exchanges)} user/assistant exchanges "
        f"({', '.join(f'{n} with {k}' for k, n in sorted(turns.items()))} exchange(s)), "
        f"{sum('system' == r.row['messages'][0]['role'] for r in rows)} with a system prompt",
        f"sft: tokens per conversation: {percentiles(lengths)}",
        f"sft: --model_max_length {opts.model_max_length}: {truncated} conversations truncated, {dropped} dropped "
        f"(no supervised token fits); {lost} of {supervised} supervised tokens lost ({share})",
    ]


def preference_lengths(rows: list[Row], tokenizer, template, opts: LengthOptions) -> list[str]:
    from .preference import encode_pair, pair_length

    max_length = opts.max_length or opts.model_max_length
    max_prompt = opts.max_prompt_length or max_length // 2
    lengths, prompts, truncated, dropped, reply_tokens, lost = [], [], 0, 0, 0, 0
    for r in rows:
        full = encode_pair(r.row, tokenizer, template, None, None)
        if full is None:  # identical once tokenized: the stage drops it whatever the limits
            dropped += 1
            continue
        fits = len(full["prompt_ids"]) <= max_prompt and \
            pair_length(*(full[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))) <= max_length
        cut = full if fits else encode_pair(r.row, tokenizer, template, max_length, max_prompt)
        n_full = len(full["chosen_ids"]) + len(full["rejected_ids"])
        n_cut = 0 if cut is None else len(cut["chosen_ids"]) + len(cut["rejected_ids"])
        lengths.append(pair_length(*(full[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))))
        prompts.append(len(full["prompt_ids"]))
        dropped += cut is None
        truncated += cut is not None and (lengths[-1] > max_length or prompts[-1] > max_prompt)
        reply_tokens += n_full
        lost += max(0, n_full - n_cut)
    share = f"{100 * lost / reply_tokens:.1f}%" if reply_tokens else "0%"
    return [
        f"preference: {len(rows)} pairs, "
        f"{sum(len(r.row['messages']) > 1 + (r.row['messages'][0]['role'] == 'system') for r in rows)} with history",
        f"preference: prompt tokens: {percentiles(prompts)}",
        f"preference: prompt + longer reply tokens: {percentiles(lengths)}",
        f"preference: --max_length {max_length} / --max_prompt_length {max_prompt}: {truncated} pairs cut, {dropped} "
        f"dropped; {lost} of {reply_tokens} reply tokens lost ({share})",
    ]


def pt_lengths(rows: list[Row], tokenizer, opts: LengthOptions) -> list[str]:
    from .pretrain import encode_documents

    lengths = [len(ids) for batch in encode_documents((r.row["text"] for r in rows), tokenizer) for ids in batch]
    total = sum(lengths)
    return [
        f"pt: {len(rows)} documents, {total} tokens (an eos after each)",
        f"pt: tokens per document: {percentiles(lengths)}",
        f"pt: --block_size {opts.block_size}: {total // opts.block_size} full blocks, {total % opts.block_size} "
        "trailing tokens dropped",
    ]


def grpo_lengths(rows: list[Row], tokenizer, template, opts: LengthOptions) -> list[str]:
    from ..rewards import SYSTEM_PROMPT
    from .qa import question_prompt

    system = SYSTEM_PROMPT if opts.system_prompt is None else opts.system_prompt
    lengths = [len(tokenizer(question_prompt(r.row["question"], tokenizer, template, system))["input_ids"])
               for r in rows]
    return [f"grpo: {len(rows)} questions",
            f"grpo: prompt tokens (with the system prompt): {percentiles(lengths)}"]


def token_report(result: Scan, tokenizer, template, opts: LengthOptions) -> list[str]:
    out = []
    if result.rows.get("sft"):
        out += sft_lengths(result.rows["sft"], tokenizer, template, opts)
    if result.rows.get("preference"):
        out += preference_lengths(result.rows["preference"], tokenizer, template, opts)
    if result.rows.get("pt"):
        out += pt_lengths(result.rows["pt"], tokenizer, opts)
    if result.rows.get("grpo"):
        out += grpo_lengths(result.rows["grpo"], tokenizer, template, opts)
    return out


def summary(result: Scan, dups: list[str]) -> list[str]:
    n_bad = len(result.problems)
    out = [f"{result.n_files} file(s), {result.n_rows} usable record(s), {n_bad} problem(s), {len(dups)} duplicate(s)"]
    for stage in ("sft", "preference", "pt", "grpo"):
        if result.files.get(stage):
            out.append(f"{stage}: {len(result.files[stage])} file(s)")
    formats = result.formats()
    if formats:
        out.append("records per format: " + ", ".join(f"{f} {n}" for f, n in sorted(formats.items())))
    return out
