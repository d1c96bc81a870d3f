"""Preference data (medgpt/data/preference.py): both record formats, file:line errors, tokenization of prompt and
replies (one template, one end-of-turn, no special tokens added), prompt/reply length limits."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from medgpt.data.io import DataError, find_data_files, load_records
from medgpt.data.preference import (build_preference_datasets, encode_pair, preference_row, render_prompt,
                                    reply_text, resolve_lengths)
from medgpt.templates import get_conv_template

ROOT = Path(__file__).resolve().parents[1]
CHATML = get_conv_template("chatml")

FLAT = {"system": "Be brief.", "history": [["I have a cold.", "Rest and drink fluids."]],
        "question": "Should I take antibiotics?", "response_chosen": "No, antibiotics do not treat colds.",
        "response_rejected": "Yes, take as many as you can."}
CONVERSATION = {"conversations": [{"from": "system", "value": "Be brief."},
                                  {"from": "human", "value": "I have a cold."},
                                  {"from": "gpt", "value": "Rest and drink fluids."},
                                  {"from": "human", "value": "Should I take antibiotics?"}],
                "chosen": "No, antibiotics do not treat colds.", "rejected": "Yes, take as many as you can."}


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def load_dir(directory, skip=False):
    return load_records(find_data_files(str(directory)), preference_row, skip_invalid=skip)


def test_both_formats_give_the_same_prompt_and_tokens(tmp_path, smol_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [FLAT])
    write_jsonl(tmp_path / "b.json", [CONVERSATION])
    flat, conv = load_dir(tmp_path)
    assert flat["messages"] == conv["messages"]
    assert [m["role"] for m in flat["messages"]] == ["system", "user", "assistant", "user"]
    assert (flat["chosen"], flat["rejected"]) == (conv["chosen"], conv["rejected"])
    assert flat["where"].endswith("a.jsonl:1") and conv["where"].endswith("b.json:1")
    prompt = render_prompt(CHATML, flat["messages"], smol_tokenizer.eos_token)
    assert prompt == render_prompt(CHATML, conv["messages"], smol_tokenizer.eos_token)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>user\nShould I take antibiotics?<|im_end|>\n<|im_start|>assistant\n")
    assert encode_pair(flat, smol_tokenizer, CHATML, 256, 128) == encode_pair(conv, smol_tokenizer, CHATML, 256, 128)


def test_sample_data_loads():
    rows = load_dir(ROOT / "data" / "reward")
    assert len(rows) == 55
    assert sum(len(r["messages"]) > 2 for r in rows) >= 7  # multi-turn prompts from both formats
    shared = Path("/work/shared/data/reward")
    if shared.is_dir():
        assert len(load_dir(shared)) == 500


def test_encoded_pair_has_one_template_and_one_end_of_turn(smol_tokenizer):
    row = preference_row(FLAT, "x:1")
    enc = encode_pair(row, smol_tokenizer, CHATML, 256, 128)
    tok = smol_tokenizer
    prompt, chosen, rejected = (tok.decode(enc[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert prompt == render_prompt(CHATML, row["messages"], tok.eos_token)  # no BOS/eos added around it
    assert prompt.count("<|im_start|>") == 5  # system, 2 user, 1 assistant turn, the generation header
    assert chosen == "No, antibiotics do not treat colds.<|im_end|>\n"
    assert rejected == "Yes, take as many as you can.<|im_end|>\n"
    for ids in (enc["chosen_ids"], enc["rejected_ids"]):
        assert ids.count(tok.eos_token_id) == 1 and ids[-2] == tok.eos_token_id
    assert enc["prompt_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")
    # the pieces are exactly the joint tokenization of the whole conversation
    full = tok(prompt + chosen, add_special_tokens=False)["input_ids"]
    assert full == enc["prompt_ids"] + enc["chosen_ids"]


def test_reply_text_follows_the_template():
    assert reply_text(CHATML, "Hi.", "<eos>") == "Hi.<|im_end|>\n"
    assert reply_text(get_conv_template("vicuna"), "Hi.", "</s>") == " Hi.</s>"
    assert reply_text(get_conv_template("llama3"), "Hi.", "</s>") == "Hi.<|eot_id|>"


def test_long_prompt_loses_old_turns_first_then_the_end_of_the_question(smol_tokenizer):
    tok = smol_tokenizer
    row = preference_row(FLAT, "x:1")
    full = encode_pair(row, tok, CHATML, None, None)
    only_last = encode_pair(preference_row({**FLAT, "history": []}, "x:2"), tok, CHATML, None, None)
    limit = len(full["prompt_ids"]) - 1
    enc = encode_pair(row, tok, CHATML, None, limit)
    assert enc["prompt_ids"] == only_last["prompt_ids"]  # the old exchange went, the question is whole
    assert "I have a cold" not in tok.decode(enc["prompt_ids"])
    short = encode_pair(row, tok, CHATML, None, len(only_last["prompt_ids"]) - 3)
    text = tok.decode(short["prompt_ids"])
    assert len(short["prompt_ids"]) <= len(only_last["prompt_ids"]) - 3
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nShould I")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")  # headers stay whole
    assert "antibiotics?" not in text
    assert short["chosen_ids"] == full["chosen_ids"]
    assert encode_pair(row, tok, CHATML, None, 5) is None  # not even the headers fit


def test_long_replies_keep_their_start_and_identical_cuts_are_dropped(smol_tokenizer):
    tok = smol_tokenizer
    row = preference_row(FLAT, "x:1")
    full = encode_pair(row, tok, CHATML, None, None)
    n = len(full["prompt_ids"])
    enc = encode_pair(row, tok, CHATML, n + 3, None)
    assert enc["prompt_ids"] == full["prompt_ids"]
    assert enc["chosen_ids"] == full["chosen_ids"][:3] and enc["rejected_ids"] == full["rejected_ids"][:3]
    same_start = preference_row({**FLAT, "response_chosen": "Rest well and see a doctor.",
                                 "response_rejected": "Rest well and skip the doctor."}, "x:2")
    assert encode_pair(same_start, tok, CHATML, n + 2, None) is None


@pytest.mark.parametrize("record, message", [
    ({k: v for k, v in FLAT.items() if k != "response_rejected"}, "missing field 'response_rejected'"),
    ({**FLAT, "response_rejected": FLAT["response_chosen"] + " "}, "are identical"),
    ({**FLAT, "response_chosen": "  "}, "field 'response_chosen' is empty"),
    ({**FLAT, "question": 3}, "field 'question' must be a string"),
    ({**FLAT, "history": [["only a question"]]}, "'history' must be a list of [question, answer]"),
    ({**FLAT, "system": ["x"]}, "field 'system' must be a string"),
    ({**CONVERSATION, "chosen": CONVERSATION["rejected"]}, "'chosen' and 'rejected' are identical"),
    ({k: v for k, v in CONVERSATION.items() if k != "chosen"}, "missing field 'chosen'"),
    ({**CONVERSATION, "conversations": CONVERSATION["conversations"][:3]}, "must end with the user turn"),
    ({**CONVERSATION, "conversations": [{"from": "robot", "value": "x"}]}, "unknown role 'robot'"),
    ({"prompt": "x", "answer": "y"}, "unknown preference record format"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_bad_record_names_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [FLAT, record])
    with pytest.raises(DataError) as e:
        load_dir(tmp_path)
    assert str(e.value).startswith(f"{path}:2: ")
    assert message in str(e.value)


def test_skip_invalid_records_skips_and_counts(tmp_path, caplog):
    write_jsonl(tmp_path / "pairs.jsonl", [FLAT, {**FLAT, "response_rejected": FLAT["response_chosen"]}, CONVERSATION])
    with caplog.at_level("WARNING"):
        rows = load_dir(tmp_path, skip=True)
    assert len(rows) == 2
    assert "Skipped 1 invalid record" in caplog.text and "pairs.jsonl:2" in caplog.text


def _lengths(max_length=1024, **pref):
    fields = dict(max_prompt_length=None, max_source_length=None, max_target_length=None)
    fields.update(pref)
    from trl import DPOConfig  # resolve_lengths reads the config's default --max_length
    args = DPOConfig(output_dir="unused", max_length=max_length, bf16=False, report_to="none")
    return resolve_lengths(SimpleNamespace(**fields), args), args.max_length


def test_length_flags():
    assert _lengths() == ((1024, 512), 1024)  # prompt: half of --max_length by default
    assert _lengths(max_source_length=100, max_target_length=50) == ((150, 100), 150)  # MedicalGPT flags
    assert _lengths(max_length=300, max_source_length=100, max_target_length=50) == ((300, 100), 300)
    assert _lengths(max_length=300, max_prompt_length=64) == ((300, 64), 300)
    with pytest.raises(SystemExit, match="no room for a reply"):
        _lengths(max_length=100, max_prompt_length=100)


def test_build_datasets_holds_out_eval_pairs(tmp_path, smol_tokenizer):
    write_jsonl(tmp_path / "pairs.jsonl", [FLAT, CONVERSATION] * 5)
    data_args = SimpleNamespace(dataset_name=None, train_file_dir=str(tmp_path), validation_file_dir=None,
                                skip_invalid_records=False, validation_split_percentage=20, max_train_samples=None,
                                max_eval_samples=None, preprocessing_num_workers=None)
    pref = SimpleNamespace(max_prompt_length=None, max_source_length=64, max_target_length=32)
    from trl import DPOConfig
    args = DPOConfig(output_dir=str(tmp_path / "out"), do_train=True, do_eval=True, bf16=False, report_to="none")
    train, evals = build_preference_datasets(data_args, pref, smol_tokenizer, CHATML, args)
    assert (len(train), len(evals)) == (8, 2)
    assert train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert args.max_length == 96
    assert all(len(p) <= 64 and len(p) + len(c) <= 96 for p, c in zip(train["prompt_ids"], train["chosen_ids"]))
    assert os.path.isdir(tmp_path)


def test_trl_configs_parse_with_the_shared_dataclasses():
    """--trust_remote_code is in ModelArguments and in TRL's configs: parsed once, given to both; TRL's bf16
    default (True) becomes False on a machine without CUDA; --orpo_beta and MedicalGPT's length flags parse."""
    import torch
    from trl import DPOConfig, RewardConfig
    from trl.experimental.orpo import ORPOConfig

    from medgpt.args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args

    for config in (DPOConfig, RewardConfig, ORPOConfig):
        model_args, _, _, pref, args, _ = parse_args(
            ModelArguments, DataArguments, LoraArguments, PreferenceArguments, config,
            argv=["--output_dir", "unused", "--trust_remote_code", "True", "--orpo_beta", "0.2",
                  "--max_source_length", "64", "--max_target_length", "32", "--template_name", "qwen"])
        assert type(model_args) is ModelArguments and model_args.trust_remote_code and args.trust_remote_code
        assert (pref.orpo_beta, pref.max_source_length, pref.template_name) == (0.2, 64, "qwen")
        if not torch.cuda.is_available():
            assert args.bf16 is False
