"""Reading data files with errors that name the file and line.

datasets' own json loader reports a malformed line as an Arrow parse error without the line, and
silently unifies records of different shapes; we read the (small, text) files ourselves, validate
each record, and hand clean rows to `datasets.Dataset` for map/cache.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A malformed input; its message is one line: 'file:line: what is wrong'."""


class TextLine(str):
    """A line of a .txt file (with its line break), as iter_records yields it; a JSON string is a plain str."""


@dataclass
class Record:
    data: object
    where: str  # "path:line" (or "dataset[split]:row")


def find_data_files(directory: str, extensions: Sequence[str] = (".json", ".jsonl")) -> list[str]:
    """All files under `directory` (recursively) with one of `extensions`, sorted."""
    if not os.path.exists(directory):
        raise DataError(f"{directory}: no such directory")
    if os.path.isfile(directory):
        files = [directory]
    else:
        files = []
        for root, _, names in os.walk(directory):
            files += [os.path.join(root, n) for n in names]
    files = sorted(f for f in files if f.endswith(tuple(extensions)) and not os.path.basename(f).startswith("."))
    if not files:
        raise DataError(f"{directory}: no {'/'.join(extensions)} files found")
    return files


def _json_error(path: str, line: int, e: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno})")


def iter_records(path: str, bad_lines: Optional[list] = None) -> Iterator[Record]:
    """Yield the records of a .jsonl (one JSON object a line) or .json file (an array of objects, or
    JSON lines under a .json name, as datasets accepts), or the lines of a .txt file. A malformed JSON
    (or non-UTF-8 text) line raises DataError, or, when `bad_lines` is a list, is appended to it and skipped."""
    if path.endswith(".txt"):  # plain text: each line (a str, with its line break) is a record
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    err = DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start + 1})")
                    if bad_lines is None:
                        raise err from None
                    bad_lines.append(str(err))
                    continue
                if lineno == 1:
                    line = line.lstrip("\ufeff")  # a UTF-8 byte-order mark is not text
                yield Record(TextLine(line[:-2] + "\n" if line.endswith("\r\n") else line), f"{path}:{lineno}")
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise _json_error(path, e.lineno, e) from None
            # line numbers of the array's elements: decode them one by one
            decoder = json.JSONDecoder()
            pos = text.index("[") + 1
            for item in data:
                while text[pos] in " \t\r\n,":
                    pos += 1
                _, end = decoder.raw_decode(text, pos)
                yield Record(item, f"{path}:{text.count(chr(10), 0, pos) + 1}")
                pos = end
            return
        if stripped.startswith("{") and "\n{" not in stripped.rstrip():
            try:
                yield Record(json.loads(text), f"{path}:1")
                return
            except json.JSONDecodeError:
                pass  # fall through: JSON lines
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = Record(json.loads(line), f"{path}:{lineno}")
        except json.JSONDecodeError as e:
            if bad_lines is None:
                raise _json_error(path, lineno, e) from None
            bad_lines.append(str(_json_error(path, lineno, e)))
            continue
        yield rec


def load_records(
    files: Iterable[str],
    convert: Callable[[object, str], Optional[dict]],
    skip_invalid: bool = False,
    limit: Optional[int] = None,
) -> list[dict]:
    """Read every record of `files` through `convert(data, where)`, which returns a clean row or raises
    DataError. With skip_invalid, bad records (and bad JSON lines) are skipped and counted in the log."""
    rows: list[dict] = []
    skipped: list[str] = []
    for path in files:
        try:
            for rec in iter_records(path, bad_lines=skipped if skip_invalid else None):
                try:
                    row = convert(rec.data, rec.where)
                except DataError as e:
                    if not skip_invalid:
                        raise
                    skipped.append(str(e))
                    continue
                if row is not None:
                    rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
        except DataError as e:  # a broken JSON array: the whole file is unreadable
            if not skip_invalid:
                raise
            skipped.append(str(e))
        if limit is not None and len(rows) >= limit:
            break
    if skipped:
        logger.warning("Skipped %d invalid record(s) (--skip_invalid_records); first: %s", len(skipped), skipped[0])
        for msg in skipped[1:20]:
            logger.warning("  skipped %s", msg)
    return rows


def require_str(data: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in data:
        raise DataError(f"{where}: missing field '{key}'")
    value = data[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def convert_rows(rows: Iterable, convert, name: str, skip_invalid: bool = False) -> Iterator[dict]:
    """The rows of a hub dataset split (a list or a stream) through `convert(row, "name:i")`; a bad row
    raises DataError, or is skipped with skip_invalid."""
    for i, row in enumerate(rows):
        try:
            r = convert(row, f"{name}:{i}")
        except DataError:
            if not skip_invalid:
                raise
            continue
        if r is not None:
            yield r


def encode_rows(rows: list[dict], fields: Sequence[str], encode: Callable[[dict], Optional[dict]],
                columns: Sequence[str], num_proc: Optional[int] = None, desc: str = ""):
    """(datasets.Dataset of `columns`, how many rows were dropped): `encode` maps a row (its `fields` only) to a dict
    of `columns`, or to None for a row that does not fit; with `num_proc`, in worker processes from 256 rows on."""
    from datasets import Dataset

    ds = Dataset.from_list([{k: row[k] for k in fields} for row in rows])

    def encode_batch(batch):
        out = {k: [] for k in columns}
        for values in zip(*(batch[k] for k in fields)):
            enc = encode(dict(zip(fields, values)))
            if enc is not None:
                for k in columns:
                    out[k].append(enc[k])
        return out

    encoded = ds.map(encode_batch, batched=True, remove_columns=ds.column_names,
                     num_proc=num_proc if num_proc and len(rows) >= 256 else None, desc=desc)
    return encoded, len(ds) - len(encoded)


def _hub_rows(data_args, convert, cache_dir=None) -> dict[str, list[dict]]:
    from datasets import load_dataset

    ds = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    return {split: list(convert_rows(rows, convert, f"{data_args.dataset_name}[{split}]", data_args.skip_invalid_records))
            for split, rows in ds.items()}


def load_train_eval_rows(data_args, convert, extensions=(".json", ".jsonl"), need_eval: bool = False,
                         cache_dir: Optional[str] = None, seed: int = 42) -> tuple[list[dict], list[dict]]:
    """Rows for training and evaluation from --train_file_dir/--validation_file_dir or --dataset_name.
    Without validation data, --validation_split_percentage of the training rows is held out (if eval
    is wanted). --max_train_samples/--max_eval_samples keep the first N."""
    skip = data_args.skip_invalid_records
    train: list[dict] = []
    evals: list[dict] = []
    if data_args.dataset_name:
        splits = _hub_rows(data_args, convert, cache_dir)
        train = splits.get("train", [])
        evals = splits.get("validation", splits.get("test", []))
    if data_args.train_file_dir:
        train += load_records(find_data_files(data_args.train_file_dir, extensions), convert, skip)
    if data_args.validation_file_dir and need_eval:
        evals += load_records(find_data_files(data_args.validation_file_dir, extensions), convert, skip)
    if not data_args.dataset_name and not data_args.train_file_dir:
        raise DataError("no training data: pass --train_file_dir (a folder of data files) or --dataset_name")
    if need_eval and not evals and train:
        import random
        n = max(1, len(train) * (data_args.validation_split_percentage or 1) // 100)
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held = set(order[:n])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
        logger.info("No validation data: holding out %d of the training samples for evaluation", n)
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        evals = evals[: data_args.max_eval_samples]
    return train, evals
