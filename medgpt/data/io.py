"""Reading data files with errors that name the file and line.

datasets' own json loader reports a malformed line as an Arrow parse error without the line, and
silently unifies records of different shapes; we read the (small, text) files ourselves, validate
each record, and hand clean rows to `datasets.Dataset` for map/cache.

One path for every reader: bytes -> text by `decode_text` (UTF-8, BOM dropped; binary, UTF-16 and non-UTF-8 files
are one-line errors), text -> records by `read_records`, records -> clean rows by a stage's converter in
`convert_records`. The training stages (`load_records`: stop at the first problem, or skip and count) and
tools/validate_data.py (collect every problem) both read through it.
"""
from __future__ import annotations

import codecs
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
    """All files under `directory` (recursively) with one of `extensions`, sorted; `directory` may also be one file."""
    kinds = "/".join(extensions)
    if not os.path.exists(directory):
        raise DataError(f"{directory}: no such directory")
    if os.path.isfile(directory):
        if not directory.endswith(tuple(extensions)):
            raise DataError(f"{directory}: not a {kinds} file")
        return [directory]
    found = []
    for root, _, names in os.walk(directory):
        found += [os.path.join(root, n) for n in names if not n.startswith(".")]
    files = sorted(f for f in found if f.endswith(tuple(extensions)))
    if not files:
        others = sorted(os.path.relpath(f, directory) for f in found)
        held = f" (it holds {len(others)} other file(s): {', '.join(others[:5])}{', ...' if len(others) > 5 else ''})" \
            if others else " (it is empty)"
        raise DataError(f"{directory}: no {kinds} files found{held}")
    return files


# ---------------------------------------------------------------------------------------------------
# Decoding: the one path from bytes to text for every reader (stage data, inference --data_file, documents)

_SNIFF = 8192  # bytes looked at for binary content, as git and grep do
_MAGIC = (  # (leading bytes, what the file is)
    (b"\x1f\x8b", "a gzip-compressed file (decompress it first: gunzip)"),
    (b"PK\x03\x04", "a zip archive (an .xlsx/.docx is one too; unzip or export it as text first)"),
    (b"PAR1", "a Parquet file (export it as JSON lines first)"),
    (b"%PDF-", "a PDF document, not text"),
    (b"SQLite format 3\x00", "an SQLite database, not text"),
)
_WIDE_BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)
_TEXT_CONTROLS = set(b"\t\n\r\f\b\x1b")


def _binary_reason(head: bytes) -> Optional[str]:
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    nul = head.find(b"\x00")
    if nul >= 0:
        return f"a binary file, not text (a NUL byte at offset {nul})"
    controls = sum(1 for b in head if b < 32 and b not in _TEXT_CONTROLS)
    if head and controls / len(head) > 0.05:
        return f"a binary file, not text ({controls} control bytes in its first {len(head)})"
    return None


def _encoding_hint(raw: bytes, bad: int) -> str:
    """How to convert a non-UTF-8 file, judged by the line holding its first bad byte (offset `bad`): legacy Chinese
    encodings are the usual case here (GBK on Windows)."""
    line = raw[raw.rfind(b"\n", 0, bad) + 1:]
    line = line[:line.find(b"\n")] if b"\n" in line else line
    for encoding in ("GBK", "GB18030", "BIG5"):
        try:
            text = line.decode(encoding)
        except UnicodeDecodeError:
            continue
        if any("\u4e00" <= ch <= "\u9fff" for ch in text[:_SNIFF]):
            return f"convert it with iconv -f {encoding} -t UTF-8"
    return "convert it to UTF-8 (e.g. iconv -f <its encoding> -t UTF-8; iconv -c drops stray bytes)"


def decode_text(raw: bytes, path: str) -> str:
    """The text of a file's bytes, as every reader of this project decodes it.

    UTF-8, with or without a byte-order mark (the mark is dropped, as 'utf-8-sig' does). Anything else is a
    DataError naming `path`: a binary file (NUL or control bytes, or a known archive/document signature),
    UTF-16/UTF-32 text, or bytes that are not UTF-8 ('path:line: not UTF-8 text (byte 0xb7 at offset 47); convert
    it with iconv -f GBK -t UTF-8'). An empty input gives ""; callers decide whether that is an error."""
    for bom, name in _WIDE_BOMS:
        if raw.startswith(bom):
            raise DataError(f"{path}: {name} text, not UTF-8; convert it with iconv -f {name} -t UTF-8")
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    reason = _binary_reason(raw[:_SNIFF])
    if reason:
        raise DataError(f"{path}: {reason}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        f"{_encoding_hint(raw, e.start)}") from None


def read_text_file(path: str) -> str:
    """The whole text of the file at `path`, decoded by decode_text (UTF-8, BOM dropped; a binary or non-UTF-8 file
    is a one-line DataError naming the file and line). For any reader of user files, e.g. RAG documents."""
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, not a file")
    with open(path, "rb") as f:
        return decode_text(f.read(), path)


def _lines(text: str) -> Iterator[str]:
    """The lines of `text` with their "\\n" ("\\r\\n" becomes "\\n"). Only "\\n" ends a line: str.splitlines would
    also cut at U+2028 and other separators, which json.dumps(ensure_ascii=False) leaves raw inside strings."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        if end < 0:
            yield text[start:]
            return
        line = text[start:end]
        yield (line[:-1] if line.endswith("\r") else line) + "\n"
        start = end + 1


# ---------------------------------------------------------------------------------------------------
# Records

def _json_error(path: str, line: int, e: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno})")


def read_records(path: str) -> Iterator["Record | DataError"]:
    """The records of one file, in order, with each problem in its place as a DataError (never raised here):

    * .txt: every line (a TextLine, with its line break) is a record;
    * .json: an array of objects (each named by the line it starts on), one object, or JSON lines;
    * .jsonl (and anything else): one JSON value a line, blank lines ignored.

    A file that cannot be decoded (decode_text), an empty file, a broken JSON array (the whole file) and each line
    that is not valid JSON are problems."""
    try:
        text = read_text_file(path)
    except DataError as e:
        yield e
        return
    if not text.strip():
        yield DataError(f"{path}: empty file" + (" (only blank lines)" if text else ""))
        return
    if path.endswith(".txt"):  # plain text: each line (a str, with its line break) is a record
        for lineno, line in enumerate(_lines(text), 1):
            yield Record(TextLine(line), f"{path}:{lineno}")
        return
    stripped = text.lstrip()
    if path.endswith(".json") and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            yield _json_error(path, e.lineno, e)
            return
        if not data:
            yield DataError(f"{path}: no records (an empty JSON array)")
            return
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
    if path.endswith(".json") and stripped.startswith("{") and "\n{" not in stripped.rstrip():
        try:
            yield Record(json.loads(text), f"{path}:{text.count(chr(10), 0, len(text) - len(stripped)) + 1}")
            return
        except json.JSONDecodeError:
            pass  # fall through: JSON lines
    for lineno, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            yield Record(json.loads(line), f"{path}:{lineno}")
        except json.JSONDecodeError as e:
            yield _json_error(path, lineno, e)


def iter_records(path: str, bad_lines: Optional[list] = None) -> Iterator[Record]:
    """The records of read_records(path); a problem raises DataError, or, when `bad_lines` is a list, is appended to
    it (as its one-line message) and skipped."""
    for item in read_records(path):
        if isinstance(item, DataError):
            if bad_lines is None:
                raise item
            bad_lines.append(str(item))
            continue
        yield item


def convert_records(items: Iterable["Record | DataError"], convert: Callable[[object, str], Optional[dict]]
                    ) -> Iterator["tuple[Record, Optional[dict]] | DataError"]:
    """Each record of `items` (read_records' output) through `convert(data, where)`: (record, clean row or None for a
    record that is fine but holds nothing, e.g. a blank text line), or the DataError that the file or the record is.
    The stages (load_records) and tools/validate_data.py both read through here, so they cannot disagree."""
    for item in items:
        if isinstance(item, DataError):
            yield item
            continue
        try:
            row = convert(item.data, item.where)
        except DataError as e:
            yield e
            continue
        yield item, row


def load_records(
    files: Iterable[str],
    convert: Callable[[object, str], Optional[dict]],
    skip_invalid: bool = False,
    limit: Optional[int] = None,
    source: Optional[str] = None,
) -> list[dict]:
    """Read every record of `files` through `convert(data, where)`, which returns a clean row or raises
    DataError. With skip_invalid, bad records (and bad JSON lines, undecodable or empty files) are skipped and
    counted in the log. With `source` (the folder the files came from), finding no usable row is a DataError."""
    files = list(files)
    rows: list[dict] = []
    skipped: list[str] = []
    for path in files:
        for item in convert_records(read_records(path), convert):
            if isinstance(item, DataError):
                if not skip_invalid:
                    raise item
                skipped.append(str(item))
                continue
            row = item[1]
            if row is not None:
                rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
        if limit is not None and len(rows) >= limit:
            break
    if skipped:
        logger.warning("Skipped %d invalid record(s) (--skip_invalid_records); first: %s", len(skipped), skipped[0])
        for msg in skipped[1:20]:
            logger.warning("  skipped %s", msg)
    if source is not None and not rows:
        raise nothing_usable(source, len(files), skipped)
    return rows


def nothing_usable(source: str, n_files: int, problems: Sequence[str]) -> DataError:
    """The error for a folder (or file) whose files hold no usable record."""
    why = f"{len(problems)} invalid record(s), first: {problems[0]}" if problems else "no records"
    return DataError(f"{source}: nothing usable in {n_files} file(s) ({why})")


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
        train += load_records(find_data_files(data_args.train_file_dir, extensions), convert, skip,
                              source=data_args.train_file_dir)
    if data_args.validation_file_dir and need_eval:
        evals += load_records(find_data_files(data_args.validation_file_dir, extensions), convert, skip,
                              source=data_args.validation_file_dir)
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
