"""Logging as MedicalGPT users know it (medgpt/logs.py): one loguru stream for our loggers and transformers', a log
file per run in <output_dir>/logs/ (rank 0: train.log with its progress; other ranks: train-rank<N>.log with their
warnings), the Trainer's loss dicts in the file, tqdm bars only on the terminal, and run_main's one-line errors and a
crash's traceback at the end of the file. Each test reads the real file a real script wrote."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_script, run_torchrun

ONE_THREAD = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| (DEBUG|INFO|WARNING|ERROR|CRITICAL) *\| "
                  r"(rank\d+ \| )?[\w.]+ \| ")
SFT = ("--train_file_dir", str(ROOT / "data/finetune"), "--max_train_samples", "8", "--max_steps", "3",
       "--logging_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
       "--do_train")
GOOD = {"conversations": [{"from": "human", "value": "发烧怎么办？"}, {"from": "gpt", "value": "多喝水，注意休息。"}]}


def runs(text: str) -> list[str]:
    """The log file split at its run headers: one string per run."""
    parts = re.split(r"^(?====== )", text, flags=re.M)
    return [p for p in parts if p]


def test_sft_log_file_has_transformers_progress_our_lines_and_the_loss_curve(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    proc = run_script("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
                      "--fp16", *SFT, env=ONE_THREAD)
    log = out / "logs" / "train.log"
    assert f"| INFO    | medgpt.training | Log file: {log}" in proc.stderr
    text = log.read_text(encoding="utf-8")
    [run] = runs(text)
    header, *lines = run.splitlines()
    assert header.startswith("===== ") and "supervised_finetuning.py --model_name_or_path" in header, header
    # transformers' own training log (INFO on the main process, whatever the terminal shows)
    assert "| INFO    | transformers.trainer | ***** Running training *****" in text
    assert "| transformers.trainer |   Num examples = 8" in text
    # our lines, including one logged while the arguments were parsed, before the file could be opened
    assert re.search(r"\| medgpt\.precision \| --fp16 on ", text), text[:3000]
    assert "| INFO    | medgpt.data.sft | SFT data: 8 training and 0 evaluation conversations" in text
    assert "| INFO    | medgpt.data.collator | Packing: " in text
    # the loss curve: one line per logging step, the values the Trainer recorded
    logged = [ast.literal_eval(m) for m in re.findall(r"\| medgpt\.metrics \| step \d+/3: (\{'loss'.*)", text)]
    history = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logged) == len(history) == 3
    for a, b in zip(logged, history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-5)
    assert re.search(r"\| medgpt\.metrics \| step 3/3: \{'train_runtime': .*'train_loss': ", text)
    # one format; tqdm's bars stay on the terminal (they are there, the file has none)
    assert "it/s]" in proc.stderr
    assert "\r" not in text and "it/s]" not in text and "%|" not in text
    starts = [line for line in lines if line and not line.startswith((" ", "\t", "}", "{", "]"))]
    assert starts and all(LINE.match(line) for line in starts), [line for line in starts if not LINE.match(line)][:5]
    # the terminal as before: our progress, not transformers' INFO lines (passive --log_level)
    assert "| INFO    | medgpt.data.sft | SFT data: 8 training" in proc.stderr
    assert "***** Running training *****" not in proc.stderr
    assert proc.stderr.count("SFT data: 8 training") == 1  # not printed twice (loguru + a leftover handler)

    # a second run into the same folder appends a new run; --log_level warning quietens the terminal, not the file
    proc = run_script("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
                      "--overwrite_output_dir", "--log_level", "warning", *SFT, env=ONE_THREAD)
    assert "SFT data:" not in proc.stderr and "Log file:" not in proc.stderr
    first, second = runs(log.read_text(encoding="utf-8"))
    assert first == run
    assert "--log_level warning" in second.splitlines()[0]
    assert "SFT data: 8 training" in second
    # the Trainer resets transformers' verbosity to --log_level when it is built: the file still gets its progress
    assert "***** Running training *****" in second
    assert len(re.findall(r"medgpt\.metrics \| step \d/3: \{'loss'", second)) == 3


def test_bad_data_ends_with_one_line_on_the_terminal_and_in_the_log(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text(json.dumps(GOOD, ensure_ascii=False) + "\n" + '{"conversations": 3}\n',
                                    encoding="utf-8")
    out = tmp_path / "out"
    proc = run_script("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
                      "--train_file_dir", str(data), "--do_train", "--report_to", "none", check=False, env=ONE_THREAD)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {data / 'sft.jsonl'}:2:"), proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [last]
    text = (out / "logs" / "train.log").read_text(encoding="utf-8")
    assert text.rstrip().endswith(f"| ERROR   | medgpt.cli | {last}"), text[-2000:]


CRASH = """
import sys
sys.path.insert(0, {root!r})
from medgpt.cli import run_main
from medgpt.logs import setup_logging

def main():
    setup_logging({out!r})
    import logging
    logging.getLogger("medgpt.test").info("before the bug")
    def inner(x):
        return x["missing"]
    return inner({{}})

run_main(main)
"""


def test_a_crash_keeps_its_traceback_on_the_terminal_and_writes_it_in_full_to_the_log(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "buggy.py"
    script.write_text(CRASH.format(root=str(ROOT), out=str(out)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "KeyError: 'missing'" in proc.stderr
    text = (out / "logs" / "run.log").read_text(encoding="utf-8")
    assert "| INFO    | medgpt.test | before the bug" in text
    crash = text[text.index("| CRITICAL | medgpt.cli | The run crashed: KeyError: 'missing'"):]
    assert "Traceback (most recent call last)" in crash and 'return x["missing"]' in crash and "in inner" in crash
    assert "The run crashed" not in proc.stderr  # the terminal shows Python's own traceback, once


def two_process_sft(tmp_path, model, data, *extra, check=True):
    return run_torchrun("supervised_finetuning.py", "--model_name_or_path", model, "--output_dir",
                        str(tmp_path / "out"), "--train_file_dir", str(data), "--do_train", "--report_to", "none",
                        "--save_strategy", "no", "--per_device_train_batch_size", "1", "--max_steps", "2",
                        "--logging_steps", "1", *extra, nproc=2, check=check, env={"TOKENIZERS_PARALLELISM": "false"})


def test_two_processes_rank1_warnings_in_its_own_file_progress_once(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    # one invalid record, skipped with a warning by each rank as it reads the data
    (data / "sft.jsonl").write_text((json.dumps(GOOD, ensure_ascii=False) + "\n") * 6 + '{"conversations": 3}\n',
                                    encoding="utf-8")
    proc = two_process_sft(tmp_path, tiny_model_dir, data, "--skip_invalid_records", "True")
    logs = tmp_path / "out" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["train-rank1.log", "train.log"]
    main, rank1 = (logs / "train.log").read_text(), (logs / "train-rank1.log").read_text()
    assert "rank 1 of 2 processes" in rank1.splitlines()[0]
    assert re.search(r"\| WARNING \| rank1 \| medgpt\.data\.io \| Skipped 1 invalid record", rank1), rank1
    assert "| INFO " not in rank1  # the other ranks write their warnings and errors, not the progress
    assert "| rank1 |" not in main and "| rank0 |" not in rank1
    assert re.search(r"\| WARNING \| rank0 \| medgpt\.data\.io \| Skipped 1 invalid record", main)
    assert "| INFO    | rank0 | transformers.trainer | ***** Running training *****" in main
    assert len(re.findall(r"\| rank0 \| medgpt\.metrics \| step \d/2: \{'loss'", main)) == 2
    # the terminal: rank 0's progress once, rank 1's warning shown too (as before), no INFO line from rank 1
    assert proc.stderr.count("SFT data: 6 training") == 1
    assert "| INFO    | rank0 | medgpt.data.sft | SFT data: 6 training" in proc.stderr
    assert "| WARNING | rank1 | medgpt.data.io | Skipped 1 invalid record" in proc.stderr
    assert not re.search(r"\| INFO +\| rank1 \|", proc.stderr), proc.stderr[-3000:]


def test_two_processes_same_bad_input_prints_the_error_once(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text(json.dumps(GOOD, ensure_ascii=False) + "\n" + '{"conversations": 3}\n',
                                    encoding="utf-8")
    proc = two_process_sft(tmp_path, tiny_model_dir, data, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {data / 'sft.jsonl'}:2:"), proc.stderr[-3000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    logs = tmp_path / "out" / "logs"
    # both ranks hit it: each says so in its own file
    assert f"| ERROR   | rank0 | medgpt.cli | {errors[0]}" in (logs / "train.log").read_text()
    assert f"| ERROR   | rank1 | medgpt.cli | {errors[0]}" in (logs / "train-rank1.log").read_text()


def test_ppo_progress_lines_reach_its_log_file(tmp_path, tiny_model_dir, smol_tokenizer):
    from test_ppo import build_reward_model, build_sft_adapter

    sft = build_sft_adapter(tmp_path / "sft", tiny_model_dir)
    rm = build_reward_model(tmp_path / "rm", smol_tokenizer)
    out = tmp_path / "ppo"
    proc = run_script("ppo_training.py", "--model_name_or_path", tiny_model_dir, "--sft_model_path", sft,
                      "--reward_model_path", rm, "--train_file_dir", "data/finetune", "--output_dir", str(out),
                      "--batch_size", "4", "--mini_batch_size", "2", "--num_ppo_epochs", "1", "--response_length",
                      "4", "--max_steps", "2", "--report_to", "none", "--logging_steps", "1", env=ONE_THREAD)
    text = (out / "logs" / "train.log").read_text(encoding="utf-8")
    assert runs(text)[0].startswith("===== ") and "ppo_training.py" in text.splitlines()[0]
    steps = re.findall(r"\| INFO    \| medgpt\.ppo \| step (\d)/2  reward ", text)
    assert steps == ["1", "2"], text[-3000:]
    assert "| medgpt.ppo | PPO done: " in text
    assert proc.stderr.count("step 1/2  reward") == 1
