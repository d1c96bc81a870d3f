"""Bad input files end in one line naming the file (and line), never a traceback; a UTF-8 byte-order mark is read.

Every reader decodes through medgpt.data.io.decode_text: the stage readers (SFT, preference, PT, GRPO) through
read_records, inference --data_file and RAG documents through read_text_file. The cases: a GBK file, a binary file, a
UTF-8 file with a BOM, an empty file, a folder with nothing usable, and an unknown --template_name. Each case runs
through a real script here (the full case x script matrix is marked slow); the in-process tests cover every reader.
"""
from __future__ import annotations

import json

import pytest
from conftest import run_script

from medgpt.data.formats import STAGE_EXTENSIONS, stage_converter
from medgpt.data.io import DataError, decode_text, find_data_files, load_records, read_text_file

ONE_THREAD = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

RECORDS = {  # one valid record per stage, with Chinese text (GBK encodes it differently from UTF-8)
    "sft": {"conversations": [{"from": "human", "value": "发烧怎么办？"}, {"from": "gpt", "value": "多喝水，注意休息。"}]},
    "preference": {"question": "发烧怎么办？", "response_chosen": "多喝水，注意休息。", "response_rejected": "不用管。"},
    "pt": {"text": "高血压是一种常见的慢性病。"},
    "grpo": {"question": "人有几个肾？", "answer": "2"},
}
SCRIPTS = {  # stage script -> (stage, extra flags)
    "supervised_finetuning.py": ("sft", ["--do_train"]),
    "dpo_training.py": ("preference", ["--do_train"]),
    "reward_modeling.py": ("preference", ["--do_train"]),
    "orpo_training.py": ("preference", ["--do_train"]),
    "pretraining.py": ("pt", ["--do_train", "--block_size", "16"]),
    "grpo_training.py": ("grpo", ["--num_generations", "2", "--max_completion_length", "4"]),
}
LINE = {stage: json.dumps(r, ensure_ascii=False) + "\n" for stage, r in RECORDS.items()}
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))


def make_case(folder, case: str, stage: str):
    """A training folder for `case`; returns (folder, the file the error must name, the message's pattern)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.jsonl"
    if case == "gbk":
        raw = LINE[stage].encode("utf-8") + LINE[stage].encode("gbk")
        path.write_bytes(raw)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            first_bad = e.start
        return folder, path, rf"{path}:2: not UTF-8 text \(byte 0x{raw[first_bad]:02x} at offset {first_bad}\); " \
                             r"convert it with iconv -f GBK -t UTF-8"
    if case == "binary":
        path.write_bytes(BINARY)
        return folder, path, rf"{path}: a binary file, not text \(a NUL byte at offset 8\)"
    if case == "empty":
        path.write_bytes(b"")
        return folder, path, rf"{path}: empty file"
    if case == "nothing":
        (folder / "notes.csv").write_text("question,answer\n", encoding="utf-8")
        kinds = "/".join(STAGE_EXTENSIONS[stage])
        return folder, folder, rf"{folder}: no {kinds} files found \(it holds 1 other file\(s\): notes.csv\)"
    if case == "blank":  # files whose every line is blank: a folder with nothing usable, the file named
        path.write_text("\n\n", encoding="utf-8")
        return folder, path, rf"{path}: empty file \(only blank lines\)"
    if case == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + (LINE[stage] * 4).encode("utf-8"))
        return folder, path, None
    raise ValueError(case)


def assert_one_line_error(proc, pattern: str):
    import re

    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-4000:]
    assert proc.returncode == 2, out[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
    assert re.fullmatch("error: " + pattern + ".*", errors[0]), errors[0]


def run_stage(script: str, folder, tiny_model_dir, tmp_path, *extra):
    stage, flags = SCRIPTS[script]
    return run_script(script, "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(folder),
                      "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--max_steps", "1",
                      "--per_device_train_batch_size", "2", *flags, *extra, check=False, env=ONE_THREAD)


# ---------------------------------------------------------------------------------------------------
# In process: every stage's reader, every case

@pytest.mark.parametrize("stage", ["sft", "preference", "pt", "grpo"])
@pytest.mark.parametrize("case", ["gbk", "binary", "empty", "nothing", "blank"])
def test_every_reader_gives_one_line_naming_the_file(tmp_path, stage, case):
    import re

    folder, _, pattern = make_case(tmp_path / "d", case, stage)
    with pytest.raises(DataError) as e:
        load_records(find_data_files(str(folder), STAGE_EXTENSIONS[stage]), stage_converter(stage),
                     source=str(folder))
    assert "\n" not in str(e.value)
    assert re.fullmatch(pattern + ".*", str(e.value)), str(e.value)


@pytest.mark.parametrize("stage", ["sft", "preference", "pt", "grpo"])
def test_every_reader_reads_a_bom_file(tmp_path, stage):
    folder, _, _ = make_case(tmp_path / "d", "bom", stage)
    convert = stage_converter(stage)
    rows = load_records(find_data_files(str(folder)), convert)
    assert len(rows) == 4 and rows[0] == convert(RECORDS[stage], rows[0].get("where", "x"))
    array = tmp_path / "array.json"  # a JSON array after the mark
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([RECORDS[stage]] * 2, ensure_ascii=False).encode())
    assert len(load_records([str(array)], convert)) == 2
    txt = tmp_path / "corpus.txt"
    txt.write_bytes(b"\xef\xbb\xbffirst\r\nsecond\n")
    assert [r["text"] for r in load_records([str(txt)], stage_converter("pt"))] == ["first\n", "second\n"]


def test_other_encodings_and_binaries_are_named():
    assert decode_text(b"\xef\xbb\xbfok", "f") == "ok"
    assert decode_text(b"", "f") == ""
    for raw, message in [
        ("问题".encode("utf-16"), "f: UTF-16 text, not UTF-8; convert it with iconv -f UTF-16 -t UTF-8"),
        ("问题".encode("utf-32"), "f: UTF-32 text, not UTF-8; convert it with iconv -f UTF-32 -t UTF-8"),
        (b"\x1f\x8b\x08\x00abc", "f: a gzip-compressed file (decompress it first: gunzip)"),
        (b"PK\x03\x04abc", "f: a zip archive"),
        (b"ok\nok\n\xe9t\xe9\n", "f:3: not UTF-8 text (byte 0xe9 at offset 6); convert it to UTF-8"),
        ("繁體中文".encode("big5"), "f:1: not UTF-8 text (byte 0xc1 at offset 0); convert it with iconv -f"),
    ]:
        with pytest.raises(DataError) as e:
            decode_text(raw, "f")
        assert str(e.value).startswith(message), str(e.value)


def test_a_line_separator_inside_a_json_string_is_not_a_line_break(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028 raw; str.splitlines would cut the record there."""
    path = tmp_path / "d.jsonl"
    record = {"text": "first\u2028second\x85third"}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_records([str(path)], stage_converter("pt")) == [record]


def test_read_text_file_for_other_readers(tmp_path):
    (tmp_path / "doc.md").write_bytes(b"\xef\xbb\xbf# Title\n")
    assert read_text_file(str(tmp_path / "doc.md")) == "# Title\n"
    with pytest.raises(DataError, match="a folder, not a file"):
        read_text_file(str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# Through the real scripts: each case once (a different stage each time), the full matrix with -m slow

DIAGONAL = [("gbk", "supervised_finetuning.py"), ("binary", "dpo_training.py"), ("empty", "grpo_training.py"),
            ("nothing", "reward_modeling.py"), ("blank", "pretraining.py")]


def _check_case(case, script, tmp_path, tiny_model_dir):
    folder, _, pattern = make_case(tmp_path / "data", case, SCRIPTS[script][0])
    assert_one_line_error(run_stage(script, folder, tiny_model_dir, tmp_path), pattern)


@pytest.mark.parametrize("case, script", DIAGONAL)
def test_stage_script_stops_with_one_line(tmp_path, tiny_model_dir, case, script):
    _check_case(case, script, tmp_path, tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("case", ["gbk", "binary", "empty", "nothing", "blank"])
def test_every_stage_script_stops_with_one_line(tmp_path, tiny_model_dir, case, script):
    if (case, script) in DIAGONAL:
        pytest.skip("runs in the fast suite")
    _check_case(case, script, tmp_path, tiny_model_dir)


@pytest.mark.parametrize("script", ["pretraining.py", pytest.param("supervised_finetuning.py", marks=pytest.mark.slow),
                                    pytest.param("dpo_training.py", marks=pytest.mark.slow)])
def test_stage_script_reads_a_bom_file(tmp_path, tiny_model_dir, script):
    folder, _, _ = make_case(tmp_path / "data", "bom", SCRIPTS[script][0])
    proc = run_stage(script, folder, tiny_model_dir, tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "out").is_dir()
    assert "4 training" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("script", ["supervised_finetuning.py", pytest.param("inference.py", marks=pytest.mark.slow)])
def test_unknown_template_is_one_line_with_close_matches(tmp_path, tiny_model_dir, script):
    if script == "inference.py":
        proc = run_script("inference.py", "--base_model", tiny_model_dir, "--template_name", "chatmll", "--prompt", "hi",
                          "--max_new_tokens", "2", check=False, env=ONE_THREAD)
    else:
        folder, _, _ = make_case(tmp_path / "data", "bom", "sft")
        proc = run_stage(script, folder, tiny_model_dir, tmp_path, "--template_name", "chatmll")
    assert_one_line_error(proc, r"Unknown template 'chatmll' \(did you mean 'chatml' or .*\)\. Valid names: .*qwen")


@pytest.mark.parametrize("case", ["gbk", pytest.param("binary", marks=pytest.mark.slow),
                                  pytest.param("empty", marks=pytest.mark.slow)])
def test_inference_data_file_errors_are_one_line(tmp_path, tiny_model_dir, case):
    path = tmp_path / "questions.txt"
    path.write_bytes({"gbk": "发烧怎么办？\n".encode("gbk"), "binary": BINARY, "empty": b""}[case])
    pattern = {"gbk": rf"{path}:1: not UTF-8 text \(byte 0xb7 at offset 0\); convert it with iconv -f GBK -t UTF-8",
               "binary": rf"{path}: a binary file, not text", "empty": rf"{path}: empty file"}[case]
    proc = run_script("inference.py", "--base_model", tiny_model_dir, "--data_file", str(path), "--max_new_tokens", "2",
                      "--predictions_file", str(tmp_path / "p.jsonl"), check=False, env=ONE_THREAD)
    assert_one_line_error(proc, pattern)


def test_inference_data_file_with_a_bom_is_read(tmp_path, tiny_model_dir):
    path = tmp_path / "questions.txt"
    path.write_bytes(b"\xef\xbb\xbfWhat is a fever?\r\n\r\n")
    out = tmp_path / "p.jsonl"
    run_script("inference.py", "--base_model", tiny_model_dir, "--data_file", str(path), "--max_new_tokens", "2",
               "--predictions_file", str(out), env=ONE_THREAD)
    assert [json.loads(line)["Input"] for line in out.read_text(encoding="utf-8").splitlines()] == ["What is a fever?"]
