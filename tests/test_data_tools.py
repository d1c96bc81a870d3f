"""tools/validate_data.py and tools/convert_dataset.py: every bad record of every stage format is listed with its file
and line (the same line the stage itself stops at), the project's data passes, conversions round-trip, and the token
statistics are what SFT training does."""
from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT, run_script

from medgpt.data.formats import convert_files, detect_format, file_stage, stage_converter, write_record
from medgpt.data.io import DataError, TextLine, find_data_files, load_records, read_records
from medgpt.data.sft import IGNORE_INDEX, sft_row, tokenize_rows
from medgpt.data.validate import LengthOptions, Row, scan, sft_lengths
from medgpt.templates import get_conv_template


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


SHAREGPT = {"conversations": [{"from": "human", "value": "发烧怎么办？"}, {"from": "gpt", "value": "多喝水，注意休息。"}]}
SHAREGPT_2 = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Flu?"},
                              {"from": "gpt", "value": "Rest."}, {"from": "human", "value": "And?"},
                              {"from": "gpt", "value": "Fluids."}]}
MESSAGES = {"messages": [{"role": "user", "content": "What is BMI?"}, {"role": "assistant", "content": "Body mass index."}]}
ALPACA = {"instruction": "Explain the term.", "input": "Hypertension", "output": "High blood pressure."}
PREF = {"system": "", "history": [], "question": "Headache?", "response_chosen": "Rest and drink water.",
        "response_rejected": "Ignore it."}
PREF_CONV = {"conversations": [{"from": "human", "value": "Cough?"}], "chosen": "See a doctor if it lasts.",
             "rejected": "Nothing."}
QA = {"question": "How many kidneys?", "answer": "2"}


@pytest.fixture()
def broken(tmp_path):
    """A folder with one broken file per stage format; `expected` holds every problem as 'file:line: ...' patterns."""
    d = tmp_path / "broken"
    (d / "sft").mkdir(parents=True)
    (d / "reward").mkdir()
    (d / "pt").mkdir()
    (d / "grpo").mkdir()
    expected = []

    f = _jsonl(d / "sft" / "sharegpt.jsonl", [SHAREGPT, '{"conversations": [', SHAREGPT_2,
                                               {"conversations": [{"from": "human", "value": "hi"}]}])
    expected += [rf"{f}:2: invalid JSON", rf"{f}:4: conversation ends with a user turn that has no answer"]
    f = _jsonl(d / "sft" / "messages.jsonl", [MESSAGES, {"messages": [{"role": "doctor", "content": "x"}]}])
    expected += [rf"{f}:2: messages\[0\]: unknown role 'doctor'"]
    f = d / "sft" / "alpaca.json"
    f.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q"},\n'
                 '  {"instruction": "q2", "output": "   "}\n]\n', encoding="utf-8")
    expected += [rf"{f}:3: alpaca record needs a string 'output'", rf"{f}:4: turn 2 \(assistant\) is empty"]
    f = _jsonl(d / "reward" / "pairs.jsonl", [PREF, dict(PREF, response_rejected=PREF["response_chosen"]),
                                              dict(PREF, question=7)])
    expected += [rf"{f}:2: 'response_chosen' and 'response_rejected' are identical",
                 rf"{f}:3: field 'question' must be a string"]
    f = _jsonl(d / "reward" / "pairs_conv.jsonl", [PREF_CONV, {k: v for k, v in PREF_CONV.items() if k != "rejected"}])
    expected += [rf"{f}:2: missing field 'rejected'"]
    f = d / "pt" / "corpus.txt"
    f.write_bytes("第一段文字。\n".encode() + "第二段".encode("gbk") + b"\n")
    expected += [rf"{f}:2: not UTF-8 text \(byte 0xb5 at offset 19\); convert it with iconv -f GBK -t UTF-8"]
    f = _jsonl(d / "pt" / "corpus.jsonl", [{"text": "fine"}, {"txt": "typo"}, {"text": ["a list"]}])
    expected += [rf"{f}:2: missing field 'text'", rf"{f}:3: field 'text' must be a string"]
    f = d / "pt" / "empty.jsonl"
    f.write_text("", encoding="utf-8")
    expected += [rf"{f}: empty file"]
    f = _jsonl(d / "grpo" / "qa.jsonl", [QA, {"question": "q2", "answer": None}, {"question": "", "answer": "1"}])
    expected += [rf"{f}:2: field 'answer' must be a non-empty string or a number", rf"{f}:3: field 'question' is empty"]
    f = d / "grpo" / "image.json"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    expected += [rf"{f}: a binary file, not text \(a NUL byte at offset 8\)"]
    return d, expected


def test_validator_lists_every_bad_record_and_exits_non_zero(broken):
    d, expected = broken
    proc = run_script("tools/validate_data.py", str(d), "--no_tokens", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    problems = proc.stdout.split("--- summary ---")[0].strip().splitlines()
    assert len(problems) == len(expected), "\n".join(problems)
    for pattern in expected:
        assert sum(bool(re.match(pattern, line)) for line in problems) == 1, (pattern, problems)
    summary = proc.stdout.split("--- summary ---")[1]
    assert f"10 file(s), 8 usable record(s), {len(expected)} problem(s)" in summary
    assert ("records per format: alpaca 1, messages 1, preference 1, preference_conversations 1, qa 1, sharegpt 2, "
            "text 1") in summary
    assert proc.stdout.rstrip().endswith("FAILED: fix the lines above")


def test_each_stage_reader_stops_at_the_validators_first_line_of_a_file(broken):
    """One reader: for every broken file, the stage's own load_records raises exactly the validator's first problem."""
    d, _ = broken
    problems = scan([str(d)]).problems
    for path in find_data_files(str(d), (".json", ".jsonl", ".txt")):
        stage = file_stage(read_records(path)) or "pt"
        with pytest.raises(DataError) as e:
            load_records([path], stage_converter(stage))
        first = next(p for p in problems if p.startswith(path + ":") or p.startswith(path + ": "))
        assert str(e.value) == first


def test_validator_passes_the_projects_own_data():
    proc = run_script("tools/validate_data.py", "data", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "0 problem(s), 0 duplicate(s)" in out and out.rstrip().endswith("OK")
    for fmt in ("alpaca", "messages", "sharegpt", "preference", "preference_conversations", "text", "qa"):
        assert re.search(rf"\b{fmt} \d+", out), fmt
    assert re.search(r"sft: --model_max_length 512: \d+ conversations truncated", out)
    assert re.search(r"sft: tokens per conversation: min \d+, p50 \d+, p90 \d+, p99 \d+, max \d+", out)


def test_validator_reports_a_folder_with_nothing_usable_and_duplicates(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("a,b\n")
    _jsonl(tmp_path / "dups.jsonl", [SHAREGPT, MESSAGES, {"messages": [
        {"role": "user", "content": "发烧怎么办？"}, {"role": "assistant", "content": "多喝水，注意休息。"}]}])
    proc = run_script("tools/validate_data.py", str(tmp_path / "empty"), str(tmp_path / "dups.jsonl"), "--no_tokens",
                      check=False)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1
    assert f"{tmp_path / 'empty'}: no .txt/.json/.jsonl files found (it holds 1 other file(s): notes.csv)" in lines
    # the same conversation in two formats is one conversation
    assert f"{tmp_path / 'dups.jsonl'}:3: duplicate of {tmp_path / 'dups.jsonl'}:1 (warning)" in lines
    proc = run_script("tools/validate_data.py", str(tmp_path / "dups.jsonl"), "--no_tokens", check=False)
    assert proc.returncode == 0
    proc = run_script("tools/validate_data.py", str(tmp_path / "dups.jsonl"), "--no_tokens", "--strict", check=False)
    assert proc.returncode == 1


def test_detected_formats():
    assert [detect_format(r) for r in (SHAREGPT, MESSAGES, ALPACA, PREF, PREF_CONV, QA, {"text": "x"}, TextLine("x\n"),
                                       {"foo": 1}, [1])] == \
        ["sharegpt", "messages", "alpaca", "preference", "preference_conversations", "qa", "text", "text", None, None]


def test_sft_statistics_match_what_training_keeps(smol_tokenizer):
    """Truncation counts and lost supervised tokens equal what tokenize_rows (the SFT stage) produces."""
    template = get_conv_template("chatml")
    long_answer = "The patient should rest, drink fluids and see a doctor. " * 12
    convs = [
        {"messages": [{"role": "user", "content": "short?"}, {"role": "assistant", "content": "yes"}]},
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": long_answer}]},
    ]
    rows = [sft_row(c, f"mem:{i}") for i, c in enumerate(convs)]
    max_len = 96
    lines = sft_lengths([Row(r["where"], "messages", r) for r in rows], smol_tokenizer, template,
                        LengthOptions(model_max_length=max_len))
    full = tokenize_rows(rows, smol_tokenizer, template, 10_000, False)
    cut = tokenize_rows(rows, smol_tokenizer, template, max_len, False)
    supervised = sum(sum(label != IGNORE_INDEX for label in x) for x in full["labels"])
    kept = sum(sum(label != IGNORE_INDEX for label in x) for x in cut["labels"])
    n_truncated = sum(len(x) > max_len for x in full["input_ids"])
    assert n_truncated == 2 and kept < supervised
    assert f"{n_truncated - (len(full) - len(cut))} conversations truncated, {len(full) - len(cut)} dropped" in lines[2]
    assert f"{supervised - kept} of {supervised} supervised tokens lost" in lines[2]
    assert "3 conversations, 4 user/assistant exchanges" in lines[0]


def _conversations(path):
    return [r["messages"] for r in load_records(find_data_files(str(path)), sft_row)]


def test_conversion_round_trips(tmp_path):
    src = ROOT / "data" / "finetune" / "medical_sft_alpaca.json"
    run_script("tools/convert_dataset.py", str(src), "--to", "sharegpt", "--output", str(tmp_path / "a.jsonl"))
    run_script("tools/convert_dataset.py", str(tmp_path / "a.jsonl"), "--to", "messages",
               "--output", str(tmp_path / "b.json"))
    assert _conversations(tmp_path / "b.json") == _conversations(src)
    assert list(json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))[0]) == ["messages"]
    assert list(json.loads((tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()[0])) == ["conversations"]


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages"])
def test_every_sft_format_round_trips_multi_turn_with_system(fmt):
    """System prompts and history survive each format (alpaca keeps them in 'system' and 'history')."""
    for path in find_data_files(str(ROOT / "data" / "finetune")):
        for row in load_records([path], sft_row):
            again = sft_row(write_record(row, fmt), "again")
            assert again["messages"] == row["messages"], (path, fmt)


def test_preference_layouts_round_trip_and_keep_the_chosen_reply_as_sft():
    pref = stage_converter("preference")
    rows = load_records(find_data_files(str(ROOT / "data" / "reward")), pref)
    assert any(len(r["messages"]) > 2 for r in rows)
    for to in ("preference", "preference_conversations"):
        for r in rows:
            again = pref(write_record(r, to), r["where"])
            assert {k: again[k] for k in ("messages", "chosen", "rejected")} == \
                {k: r[k] for k in ("messages", "chosen", "rejected")}
    as_sft = sft_row(write_record(rows[0], "sharegpt"), "x")
    assert as_sft["messages"] == rows[0]["messages"] + [{"role": "assistant", "content": rows[0]["chosen"]}]
    records = convert_files([str(ROOT / "data" / "reward")], "preference_conversations")
    assert len(records) == len(rows)


def test_converter_refuses_what_cannot_be_converted_in_one_line(tmp_path):
    proc = run_script("tools/convert_dataset.py", str(ROOT / "data" / "finetune"), "--to", "preference",
                      "--output", str(tmp_path / "x.jsonl"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "conversations have no rejected reply" in proc.stderr.strip().splitlines()[-1]
    bad = _jsonl(tmp_path / "bad.jsonl", [SHAREGPT, {"conversations": [{"from": "gpt", "value": "x"}]}])
    proc = run_script("tools/convert_dataset.py", str(bad), "--to", "alpaca", "--output", str(tmp_path / "y.jsonl"),
                      check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:2: turn 1 is 'assistant'")
    assert not (tmp_path / "y.jsonl").exists()


def test_preference_statistics_match_what_training_keeps(smol_tokenizer):
    from medgpt.data.preference import tokenize_pairs
    from medgpt.data.validate import preference_lengths

    template = get_conv_template("chatml")
    pref = stage_converter("preference")
    rows = load_records(find_data_files(str(ROOT / "data" / "reward")), pref)
    max_length, max_prompt = 128, 64
    lines = preference_lengths([Row(r["where"], "preference", r) for r in rows], smol_tokenizer, template,
                               LengthOptions(max_length=max_length, max_prompt_length=max_prompt))
    full = tokenize_pairs(rows, smol_tokenizer, template, None, None)
    cut = tokenize_pairs(rows, smol_tokenizer, template, max_length, max_prompt)
    replies = sum(len(c) + len(r) for c, r in zip(full["chosen_ids"], full["rejected_ids"]))
    kept = sum(len(c) + len(r) for c, r in zip(cut["chosen_ids"], cut["rejected_ids"]))
    n_cut = sum(len(p) > max_prompt or len(p) + max(len(c), len(r)) > max_length
                for p, c, r in zip(full["prompt_ids"], full["chosen_ids"], full["rejected_ids"])) - (len(full) - len(cut))
    assert n_cut > 0 and kept < replies
    assert f"{n_cut} pairs cut, {len(full) - len(cut)} dropped; {replies - kept} of {replies} reply tokens lost" \
        in lines[-1], lines[-1]
