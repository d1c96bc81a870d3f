"""SFT data: record formats, validation errors with file:line, and label masks token by token."""
from __future__ import annotations

import json

import pytest

from medgpt.data.io import DataError, load_records, find_data_files
from medgpt.data.sft import IGNORE_INDEX, encode_conversation, sft_row, to_messages
from medgpt.templates import get_conv_template

CONV = [
    {"role": "system", "content": "You are a careful medical assistant."},
    {"role": "user", "content": "What is a normal resting heart rate?"},
    {"role": "assistant", "content": "For adults it is usually 60 to 100 beats per minute."},
    {"role": "user", "content": "头痛应该怎么办？"},
    {"role": "assistant", "content": "多休息，多喝水；如果持续或剧烈，请及时就医。"},
]


def test_three_formats_normalize_to_the_same_messages():
    sharegpt = {"conversations": [{"from": "system", "value": CONV[0]["content"]}]
                + [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in CONV[1:]]}
    openai = {"messages": CONV}
    alpaca = {"system": CONV[0]["content"], "history": [[CONV[1]["content"], CONV[2]["content"]]],
              "instruction": CONV[3]["content"], "input": "", "output": CONV[4]["content"]}
    for record in (sharegpt, openai, alpaca):
        assert to_messages(record, "x:1") == CONV


def test_alpaca_input_is_appended_to_the_instruction():
    msgs = to_messages({"instruction": "Translate to English", "input": "发烧", "output": "fever"}, "x:1")
    assert msgs == [{"role": "user", "content": "Translate to English\n发烧"}, {"role": "assistant", "content": "fever"}]


def test_labels_are_exactly_the_assistant_tokens(smol_tokenizer):
    """Built by hand from literal ChatML strings, independent of the template code."""
    tok = smol_tokenizer
    enc = encode_conversation(CONV, tok, get_conv_template("chatml"), max_length=4096)
    parts = [
        (f"<|im_start|>system\n{CONV[0]['content']}<|im_end|>\n<|im_start|>user\n{CONV[1]['content']}<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        (f"{CONV[2]['content']}<|im_end|>\n", True),
        (f"<|im_start|>user\n{CONV[3]['content']}<|im_end|>\n<|im_start|>assistant\n", False),
        (f"{CONV[4]['content']}<|im_end|>\n", True),
    ]
    ids, labels = [], []
    for text, trained in parts:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    assert enc["input_ids"] == ids
    assert enc["labels"] == labels
    assert enc["attention_mask"] == [1] * len(ids)
    # the end-of-turn token of each reply is trained
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    supervised = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert supervised.count(im_end) == 2
    # and the decoded supervised text is exactly the two replies with their markers
    assert tok.decode(supervised) == parts[1][0] + parts[3][0]


def test_train_on_inputs_supervises_everything(smol_tokenizer):
    enc = encode_conversation(CONV, smol_tokenizer, get_conv_template("chatml"), 4096, train_on_inputs=True)
    assert enc["labels"] == enc["input_ids"]


def test_truncation_drops_whole_trailing_turns(smol_tokenizer):
    tmpl = get_conv_template("chatml")
    full = encode_conversation(CONV, smol_tokenizer, tmpl, 4096)
    first_turn = encode_conversation(CONV[:3], smol_tokenizer, tmpl, 4096)
    # room for the first exchange and part of the second: the second is dropped, not half-kept
    enc = encode_conversation(CONV, smol_tokenizer, tmpl, len(full["input_ids"]) - 3)
    assert enc["input_ids"] == first_turn["input_ids"]
    assert enc["labels"] == first_turn["labels"]


def test_truncation_of_a_long_question_keeps_the_assistant_header(smol_tokenizer):
    tmpl = get_conv_template("chatml")
    long_q = "请详细说明高血压的病因、症状、诊断和治疗。" * 60
    msgs = [{"role": "user", "content": long_q}, {"role": "assistant", "content": "Please see a doctor for a full check-up."}]
    enc = encode_conversation(msgs, smol_tokenizer, tmpl, max_length=96)
    assert len(enc["input_ids"]) <= 96
    text = smol_tokenizer.decode(enc["input_ids"])
    assert "<|im_end|>\n<|im_start|>assistant\nPlease see a doctor for a full check-up.<|im_end|>" in text
    assert "\ufffd" not in text  # never cut inside a character
    supervised = smol_tokenizer.decode([t for t in enc["labels"] if t != IGNORE_INDEX])
    assert supervised.startswith("Please see a doctor")


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


GOOD = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = _write(tmp_path, "bad.jsonl", [GOOD, GOOD, '{"conversations": [', GOOD])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_records([path], sft_row)


@pytest.mark.parametrize("record,message", [
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no answer"),
    ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]}, "'user' was expected"),
    ({"conversations": [{"from": "doctor", "value": "hi"}]}, "unknown role 'doctor'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}, "is empty"),
    ({"text": "hello"}, "unknown record format"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_invalid_records_name_file_line_and_problem(tmp_path, record, message):
    path = _write(tmp_path, "d.jsonl", [GOOD, json.dumps(record)])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{message}"):
        load_records([path], sft_row)


def test_skip_invalid_records_skips_and_counts(tmp_path, caplog):
    path = _write(tmp_path, "d.jsonl", [GOOD, "{oops", json.dumps({"text": 1}), GOOD])
    rows = load_records([path], sft_row, skip_invalid=True)
    assert len(rows) == 2
    assert "Skipped 2 invalid record(s)" in caplog.text


def test_json_array_errors_name_the_element_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json:3: alpaca record needs a string 'output'"):
        load_records([str(path)], sft_row)


def test_sample_data_all_loads():
    rows = load_records(find_data_files("data/finetune"), sft_row)
    assert len(rows) >= 50


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        find_data_files(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no .json/.jsonl files"):
        find_data_files(str(tmp_path))
