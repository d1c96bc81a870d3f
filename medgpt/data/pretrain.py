"""Raw text for continued pretraining: documents -> token stream (an eos after each document) -> blocks.

Documents come from .txt files (one a line, as MedicalGPT reads them through datasets' text loader),
.json/.jsonl files (a string `text` field) or a hub dataset (its `text` column). With packing (the
default) all documents are joined and cut into blocks of exactly --block_size tokens; labels are the
input ids (the model shifts them), so the loss covers every token, eos separators included.

The grouping is written here rather than done with `datasets.map(group_texts, batched=True)` (the
run_clm recipe) or `trl.pack_dataset(strategy="wrapped")`: both cut each map batch on its own, so a
batch edge drops tokens (run_clm) or leaves a short block (TRL). Carrying the tail of one batch into
the next keeps every block full and drops only the corpus' last < block_size tokens.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from .io import DataError, TextLine, convert_rows, find_data_files, load_records, load_train_eval_rows, require_str

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".json", ".jsonl")


def text_converter(keep_linebreaks: bool = True) -> Callable[[object, str], Optional[dict]]:
    """`convert(data, where)` for load_records: a .txt line (TextLine) or a record with a string `text`.
    Blank documents are skipped (a blank line is not a document)."""
    def convert(data, where: str) -> Optional[dict]:
        if isinstance(data, TextLine):
            text = data if keep_linebreaks else data.rstrip("\r\n")
        elif isinstance(data, dict):
            text = require_str(data, "text", where, allow_empty=True)
        else:
            raise DataError(f"{where}: a record must be a JSON object with a string 'text' field, "
                            f"got {type(data).__name__}")
        return {"text": text} if text.strip() else None
    return convert


@dataclass
class PackStats:
    documents: int = 0
    tokens: int = 0
    dropped: int = 0  # packing: the tokens left at the end (< one block); else: the tokens cut off long documents

    def log(self, desc: str, block_size: int, samples: int, packing: bool = True):
        if packing:
            logger.info("%s: %d documents, %d tokens -> %d blocks of %d tokens; %d trailing tokens dropped",
                        desc, self.documents, self.tokens, samples, block_size, self.dropped)
        else:
            logger.info("%s: %d documents, %d tokens -> %d samples of at most %d tokens; %d tokens cut off "
                        "the longer documents", desc, self.documents, self.tokens, samples, block_size, self.dropped)


def encode_documents(texts: Iterable[str], tokenizer, batch_docs: int = 1000) -> Iterator[list[list[int]]]:
    """Token ids of each document with an eos at its end (the tokenizer's own special tokens, e.g. a bos,
    are kept), a batch of documents at a time (a fast tokenizer encodes a batch in parallel)."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []

    def encode(texts_):
        ids = tokenizer(texts_, add_special_tokens=True, verbose=False)["input_ids"]
        return [x if x and x[-1] == eos else x + [eos] for x in ids]

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_docs:
            yield encode(batch)
            batch = []
    if batch:
        yield encode(batch)


def pack_blocks(encoded: Iterable[list[list[int]]], block_size: int, stats: PackStats) -> Iterator[np.ndarray]:
    """Arrays of shape (n, block_size): the documents' tokens concatenated and cut into full blocks, the
    tail of each batch carried into the next (see the module docstring)."""
    carry = np.zeros(0, dtype=np.int64)
    for docs in encoded:
        stats.documents += len(docs)
        stats.tokens += sum(len(d) for d in docs)
        flat = np.concatenate([carry] + [np.asarray(d, dtype=np.int64) for d in docs])
        n = len(flat) // block_size * block_size
        if n:
            yield flat[:n].reshape(-1, block_size)
        carry = flat[n:]
        stats.dropped = len(carry)


def truncate_documents(encoded: Iterable[list[list[int]]], block_size: int, stats: PackStats) -> Iterator[list[list[int]]]:
    """--packing False: one sample per document, cut at block_size (the cut-off tokens are counted as dropped)."""
    for docs in encoded:
        stats.documents += len(docs)
        stats.tokens += sum(len(d) for d in docs)
        stats.dropped += sum(max(0, len(d) - block_size) for d in docs)
        yield [d[:block_size] for d in docs]


def sample_chunks(texts: Iterable[str], tokenizer, block_size: int, packing: bool, stats: PackStats):
    """Training samples a chunk at a time: (n, block_size) arrays of full blocks with packing, else lists
    of documents cut at block_size."""
    encoded = encode_documents(texts, tokenizer)
    if packing:
        return pack_blocks(encoded, block_size, stats)
    return truncate_documents(encoded, block_size, stats)


def build_lm_dataset(texts: Iterable[str], tokenizer, block_size: int, packing: bool = True,
                     limit: Optional[int] = None, desc: str = "train"):
    """A datasets.Dataset of input_ids/labels (labels = input_ids) from documents; `limit` keeps the first
    N samples (--max_train_samples/--max_eval_samples count blocks, as in MedicalGPT) and stops reading."""
    from datasets import Dataset

    stats = PackStats()
    chunks, n = [], 0
    for chunk in sample_chunks(texts, tokenizer, block_size, packing, stats):
        chunks.append(chunk)
        n += len(chunk)
        if limit is not None and n >= limit:
            break
    # blocks stay in one int32 array (4 bytes a token), not in Python lists, until Arrow takes them
    samples = np.concatenate(chunks).astype(np.int32) if packing and chunks else [s for c in chunks for s in c]
    if limit is not None and n >= limit:
        samples = samples[:limit]
        logger.info("%s: keeping the first %d samples (--max_%s_samples)", desc, limit, desc)
    else:
        stats.log(desc, block_size, n, packing)
    if not len(samples):
        raise DataError(f"{desc}: no sample of {block_size} tokens: the data has {stats.tokens} tokens "
                        f"(lower --block_size or add text)")
    return Dataset.from_dict({"input_ids": samples, "labels": samples})


def resolve_block_size(block_size: Optional[int], tokenizer) -> int:
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    if block_size is None:
        return min(1024, limit or 1024)
    if block_size <= 0:
        raise SystemExit(f"error: --block_size {block_size}: must be positive")
    if limit and block_size > limit:
        logger.warning("--block_size %d is longer than the tokenizer's model_max_length %d; using %d",
                       block_size, limit, limit)
        return limit
    return block_size


def _stream_documents(data_args, convert, cache_dir=None) -> Iterator[str]:
    """Documents read lazily (a file at a time, or a hub dataset streamed) for --streaming."""
    if data_args.dataset_name:
        from datasets import load_dataset

        ds = load_dataset(data_args.dataset_name, data_args.dataset_config_name, split="train", streaming=True,
                          cache_dir=cache_dir)
        for doc in convert_rows(ds, convert, f"{data_args.dataset_name}[train]", data_args.skip_invalid_records):
            yield doc["text"]
    if data_args.train_file_dir:
        for path in find_data_files(data_args.train_file_dir, TEXT_EXTENSIONS):
            for doc in load_records([path], convert, data_args.skip_invalid_records):
                yield doc["text"]


def build_pretrain_datasets(data_args, pt_args, tokenizer, training_args, cache_dir=None):
    """(train, eval) datasets for pretraining from --train_file_dir/--validation_file_dir/--dataset_name.
    Without validation data, --validation_split_percentage of the documents is held out for evaluation."""
    block_size = resolve_block_size(pt_args.block_size, tokenizer)
    convert = text_converter(pt_args.keep_linebreaks)
    if pt_args.streaming and training_args.do_train:
        return _streaming_datasets(data_args, pt_args, convert, tokenizer, block_size, training_args, cache_dir)
    do_train, do_eval = training_args.do_train, training_args.do_eval
    # --max_*_samples count blocks here, not documents: read all documents, cut the blocks later
    doc_args = dataclasses.replace(data_args, max_train_samples=None, max_eval_samples=None)
    with training_args.main_process_first(desc="tokenizing"):
        train_docs, eval_docs = load_train_eval_rows(doc_args, convert, TEXT_EXTENSIONS, need_eval=do_eval,
                                                     cache_dir=cache_dir, seed=training_args.seed)
        logger.info("Pretraining data: %d training and %d evaluation documents", len(train_docs), len(eval_docs))
        train = build_lm_dataset((d["text"] for d in train_docs), tokenizer, block_size, pt_args.packing,
                                 data_args.max_train_samples, "train") if do_train else None
        evals = build_lm_dataset((d["text"] for d in eval_docs), tokenizer, block_size, pt_args.packing,
                                 data_args.max_eval_samples, "eval") if do_eval else None
    return train, evals


def _streaming_datasets(data_args, pt_args, convert, tokenizer, block_size, training_args, cache_dir=None):
    from datasets import IterableDataset

    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise SystemExit("error: --streaming needs --max_steps N (a stream has no length to count epochs by)")
    if not data_args.dataset_name and not data_args.train_file_dir:
        raise DataError("no training data: pass --train_file_dir (a folder of data files) or --dataset_name")
    if training_args.do_eval and not data_args.validation_file_dir:
        raise SystemExit("error: --streaming with --do_eval needs --validation_file_dir (a held-out share "
                         "cannot be cut from a stream of unknown length)")

    def samples():
        stats, n = PackStats(), 0
        for chunk in sample_chunks(_stream_documents(data_args, convert, cache_dir), tokenizer, block_size,
                                   pt_args.packing, stats):
            for ids in (chunk.tolist() if isinstance(chunk, np.ndarray) else chunk):
                if data_args.max_train_samples is not None and n >= data_args.max_train_samples:
                    return
                n += 1
                yield {"input_ids": ids, "labels": ids}
        stats.log("train (one pass of the stream)", block_size, n, pt_args.packing)

    train = IterableDataset.from_generator(samples)
    evals = None
    if training_args.do_eval:
        skip = data_args.skip_invalid_records
        eval_docs = load_records(find_data_files(data_args.validation_file_dir, TEXT_EXTENSIONS), convert, skip)
        evals = build_lm_dataset((d["text"] for d in eval_docs), tokenizer, block_size, pt_args.packing,
                                 data_args.max_eval_samples, "eval")
    return train, evals

