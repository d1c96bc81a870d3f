"""Domain vocabulary expansion (MedicalGPT's build_domain_tokenizer.py / merge_tokenizers.py).

1. `train_domain_sp`: a SentencePiece model trained on a domain corpus (a folder of .txt/.json/.jsonl, read like
   pretraining data), with MedicalGPT's trainer options.
2. `jieba_word_freqs`: optionally a word list with frequencies from the same corpus, segmented with jieba (Chinese).
3. `merge_tokenizers`: the new pieces (and words) appended to a base HF tokenizer, every original token keeping its
   id and string, saved as an HF tokenizer folder with `medgpt_vocab.json` beside it: for each new token its id and
   the base tokenizer's sub-token ids, which `medgpt.modeling.resize_embeddings` uses to initialise its embedding rows.

Both kinds of BPE tokenizer are extended the same way, by appending vocab entries and merges to tokenizer.json's BPE
model: byte-level ones (SmolLM2, Qwen, GPT-2: pieces written in the byte-level alphabet, `Ġ` for a space) and
SentencePiece/Llama-style ones (`▁` for a space, characters missing from the vocab added as tokens; byte fallback
kept). New tokens are not `added_tokens`: those split the text before the pre-tokenizer (a space before them is
lost on a round trip) and always win over the merges. Appended merges rank after every original merge, so text is
first cut as the base tokenizer cuts it and only then joined into the new tokens; decoding stays exact (a token is
the concatenation of its merge). When the base folder also has a SentencePiece `tokenizer.model`, the same pieces
are appended to its proto (score 0, as MedicalGPT does) so slow/sentencepiece users see the same ids.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter
from typing import Iterable, Optional, Sequence

from .data.io import DataError, find_data_files, load_records
from .data.pretrain import TEXT_EXTENSIONS, text_converter

logger = logging.getLogger(__name__)

VOCAB_INFO_FILE = "medgpt_vocab.json"
SP_SPACE = "\u2581"  # SentencePiece's "▁"
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


# ---------------------------------------------------------------- corpus, SentencePiece training, word lists
def corpus_texts(paths: Sequence[str], skip_invalid: bool = False) -> list[str]:
    """The documents of every .txt (a line each) / .json / .jsonl (`text`) file under `paths`, as pretraining reads them."""
    files: list[str] = []
    for path in paths:
        files += find_data_files(path, TEXT_EXTENSIONS)
    rows = load_records(files, text_converter(keep_linebreaks=False), skip_invalid)
    if not rows:
        raise DataError(f"{', '.join(paths)}: no text documents found")
    return [r["text"] for r in rows]


def train_domain_sp(in_paths: Sequence[str], model_prefix: str, vocab_size: int = 10000, model_type: str = "bpe",
                    max_sentence_length: int = 16384, character_coverage: float = 0.9995,
                    pad_id: int = 3, skip_invalid: bool = False) -> str:
    """Train a SentencePiece model on the corpus; returns the .model path. Options as MedicalGPT's
    build_domain_tokenizer.py (byte fallback, digits split, NFKC, whitespace kept). `vocab_size` is an upper
    bound: a small corpus gives fewer pieces instead of failing (hard_vocab_limit off)."""
    import sentencepiece as spm

    texts = corpus_texts(in_paths, skip_invalid)
    if os.path.dirname(model_prefix):
        os.makedirs(os.path.dirname(model_prefix), exist_ok=True)
    model_type = model_type.lower()
    if model_type not in ("bpe", "unigram", "char", "word"):
        raise DataError(f"--model_type {model_type}: expected bpe, unigram, char or word")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
            max_sentence_length=max_sentence_length, character_coverage=character_coverage, pad_id=pad_id,
            shuffle_input_sentence=False, split_digits=True, split_by_unicode_script=True, byte_fallback=True,
            allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="nfkc",
            hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as e:  # sentencepiece reports bad options / corpora as RuntimeError with a long message
        raise DataError(f"{', '.join(in_paths)}: sentencepiece training failed: {str(e).strip().splitlines()[-1]}")
    path = model_prefix + ".model"
    logger.info("Trained SentencePiece model %s (%s) on %d documents", path, model_type, len(texts))
    return path


def jieba_word_freqs(texts: Iterable[str], user_dict: Optional[str] = None, min_freq: int = 2,
                     min_len: int = 2) -> list[tuple[str, int]]:
    """Chinese words (at least `min_len` characters, seen at least `min_freq` times) of `texts` segmented with jieba,
    most frequent first. `user_dict` (jieba's format: `word [freq [tag]]` a line, e.g. data/vocab/medical_terms.txt)
    keeps domain terms whole."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    for word in read_word_list(user_dict) if user_dict else []:  # (jieba.load_userdict would take '#' lines as words)
        jieba.add_word(word)  # with the frequency jieba needs to cut it out whole
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w in jieba.cut(text) if len(w) >= min_len and all(_CJK.match(c) for c in w))
    return sorted(((w, n) for w, n in counts.items() if n >= min_freq), key=lambda x: (-x[1], x[0]))


def write_word_list(path: str, words: Sequence[tuple[str, int]]) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for word, freq in words:
            f.write(f"{word} {freq}\n")


def read_word_list(path: str, max_words: Optional[int] = None) -> list[str]:
    """Words of a word list: `word [frequency [tag]]` a line (MedicalGPT's word_freq.txt, jieba's dict format); blank
    lines and `#` comments skipped. With frequencies, the most frequent first (MedicalGPT keeps the top 20000)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 3:
                raise DataError(f"{path}:{lineno}: expected 'word [frequency [tag]]', got {len(fields)} fields")
            freq = 0
            if len(fields) >= 2:
                if not fields[1].isdigit():
                    raise DataError(f"{path}:{lineno}: frequency {fields[1]!r} is not a whole number")
                freq = int(fields[1])
            entries.append((fields[0], freq))
    entries.sort(key=lambda x: -x[1])  # stable: without frequencies the file's order
    words = list(dict.fromkeys(w for w, _ in entries))
    return words[:max_words] if max_words else words


def sp_pieces(model_file: str) -> list[str]:
    """The normal and user-defined pieces of a SentencePiece model, in its order (BPE: merge order); no control,
    unknown or byte pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    if not os.path.isfile(model_file):
        raise DataError(f"{model_file}: no such file")
    proto = pb.ModelProto()
    try:
        with open(model_file, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # protobuf's DecodeError: not a SentencePiece model
        raise DataError(f"{model_file}: not a SentencePiece model ({e})") from None
    keep = (pb.ModelProto.SentencePiece.NORMAL, pb.ModelProto.SentencePiece.USER_DEFINED)
    return [p.piece for p in proto.pieces if p.type in keep and p.piece.strip(SP_SPACE)]


def piece_text(piece: str) -> str:
    return piece.replace(SP_SPACE, " ")


def word_text(word: str) -> str:
    """A word-list entry as it stands in text: words of space-separated scripts follow a space."""
    return word if _CJK.match(word[0]) or not word[0].isalnum() else " " + word


# ---------------------------------------------------------------- the BPE model of a tokenizer.json
class BpeExtender:
    """tokenizer.json's BPE model, with vocab entries and merges appended.

    The segmentation of a new token's text by the base merges is computed here (`bpe`), a few lines of the standard
    algorithm: the `tokenizers` library can only encode with a finished model (and applies byte fallback), while each
    new token's merges depend on the ones appended before it."""

    def __init__(self, tokenizer_json: dict, where: str):
        model = tokenizer_json.get("model") or {}
        if model.get("type") != "BPE":
            raise DataError(f"{where}: a {model.get('type')} tokenizer model; only BPE tokenizers (byte-level like "
                            "GPT-2/SmolLM2/Qwen, or SentencePiece-style like Llama) can be extended")
        self.json = tokenizer_json
        self.model = model
        self.kind = _alphabet(tokenizer_json, where)
        self.vocab: dict[str, int] = model["vocab"]
        merges = model.get("merges") or []
        self.merges_as_str = bool(merges) and isinstance(merges[0], str)
        self.ranks = {tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m): i for i, m in enumerate(merges)}
        self.base_ranks = dict(self.ranks)
        # Added tokens outside the model's vocabulary (Qwen's specials) get their ids counted from the model's
        # vocabulary size when the tokenizer loads, so new entries would shift them: they join the vocabulary, with
        # their ids, first (as SmolLM2's specials already are; matched before the model, they never come out of it).
        for t in tokenizer_json.get("added_tokens") or []:
            self.vocab.setdefault(t["content"], t["id"])
        self.start = max(self.vocab.values()) + 1
        self.next_id = self.start
        self.new_merges: list[tuple[str, str]] = []
        self.new_tokens: list[str] = []
        self.ignore_merges = bool(model.get("ignore_merges"))
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(json.dumps(tokenizer_json))

    # text -> the model's symbols (bytes as characters, or characters with ▁ for a space)
    def symbols(self, text: str) -> Optional[str]:
        """The string the BPE model sees for `text`, or None when the pre-tokenizer would cut it (unreachable)."""
        if self.kind == "byte_level":
            if self._tok.normalizer is not None:
                text = self._tok.normalizer.normalize_str(text)
            pieces = self._tok.pre_tokenizer.pre_tokenize_str(text)
            return pieces[0][0] if len(pieces) == 1 else None
        s = text.replace(" ", SP_SPACE)
        if self.metaspace_split and SP_SPACE in s[1:]:
            return None
        return s

    def bpe(self, word: str, ranks: dict) -> list[str]:
        if self.ignore_merges and word in self.vocab:
            return [word]
        parts = list(word)
        while len(parts) > 1:
            best = min(((ranks[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in ranks), default=None)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def _new_token(self, token: str):
        self.vocab[token] = self.next_id
        self.next_id += 1
        self.new_tokens.append(token)

    def add(self, word: str) -> bool:
        """Make `word` (model symbols) one token: missing characters become tokens, then merges joining the base
        segmentation left to right (intermediate strings become tokens too). False if it already was one."""
        if word in self.vocab:
            return False
        for c in word:
            if c not in self.vocab:  # SentencePiece-style only: byte-level vocabularies hold every byte
                self._new_token(c)
        parts = self.bpe(word, self.ranks)
        cur = parts[0]
        for nxt in parts[1:]:
            pair = (cur, nxt)
            cur = cur + nxt
            if cur not in self.vocab:
                self._new_token(cur)
            if pair not in self.ranks:
                self.ranks[pair] = len(self.ranks)
                self.new_merges.append(pair)
        return True

    def base_ids(self, token: str) -> list[int]:
        """Ids of the base tokenizer's tokens for this token's text (base merges only; byte fallback)."""
        ids = []
        for part in self.bpe(token, self.base_ranks):
            if part in self.vocab and self.vocab[part] < self.start:
                ids.append(self.vocab[part])
            else:  # a character the base vocabulary lacks: its bytes (byte fallback), else unk
                for b in part.encode("utf-8"):
                    byte = f"<0x{b:02X}>"
                    if byte in self.vocab:
                        ids.append(self.vocab[byte])
                    elif self.model.get("unk_token") in self.vocab:
                        ids.append(self.vocab[self.model["unk_token"]])
                        break
        return ids

    @property
    def metaspace_split(self) -> bool:
        return any(p.get("type") == "Metaspace" and p.get("split") for p in _components(self.json.get("pre_tokenizer")))

    def text_of(self, token: str) -> str:
        if self.kind == "byte_level":
            from tokenizers.decoders import ByteLevel
            return ByteLevel().decode([token])
        return piece_text(token)

    def to_json(self) -> dict:
        merges = self.model.setdefault("merges", [])
        merges += [f"{a} {b}" if self.merges_as_str else [a, b] for a, b in self.new_merges]
        return self.json


def _components(node) -> list[dict]:
    if not node:
        return []
    out = [node]
    for key in ("pretokenizers", "normalizers", "decoders"):
        for child in node.get(key) or []:
            out += _components(child)
    return out


def _alphabet(tokenizer_json: dict, where: str) -> str:
    parts = _components(tokenizer_json.get("pre_tokenizer")) + _components(tokenizer_json.get("normalizer"))
    if any(p.get("type") == "Metaspace" for p in parts) or any(
            p.get("type") == "Replace" and p.get("content") == SP_SPACE for p in parts):
        return "metaspace"
    if any(p.get("type") == "ByteLevel" for p in parts):
        return "byte_level"
    raise DataError(f"{where}: neither a byte-level nor a SentencePiece-style (▁) BPE tokenizer; cannot extend it")


# ---------------------------------------------------------------- merging
def merge_tokenizers(base_tokenizer: str, output_dir: str, domain_sp_model_file: Optional[str] = None,
                     add_words: Sequence[str] = (), trust_remote_code: bool = False) -> dict:
    """Append the domain model's pieces, then `add_words`, to the base tokenizer; save it to `output_dir` with
    VOCAB_INFO_FILE. Returns that file's content (counts and new tokens)."""
    from transformers import AutoTokenizer

    from .default_model import resolve_model_path

    base_path = resolve_model_path(base_tokenizer)
    base = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    if not getattr(base, "is_fast", False) or not hasattr(base, "backend_tokenizer"):
        raise DataError(f"{base_path}: not a tokenizers-backed (fast) tokenizer; cannot extend it")
    where = os.path.join(base_path, "tokenizer.json")
    ext = BpeExtender(json.loads(base.backend_tokenizer.to_str()), where)
    base_len = len(base)
    sources = ([("domain_sp", piece_text(p)) for p in sp_pieces(domain_sp_model_file)] if domain_sp_model_file else [])
    sources += [("words", word_text(w)) for w in add_words]
    if not sources:
        raise DataError("nothing to add: pass --domain_sp_model_file and/or --add_words_file")
    counts = {"domain_sp": 0, "words": 0, "already_in_vocab": 0, "unreachable": 0}
    targets: dict[str, str] = {}  # model-symbol string -> its source, for the reachability check
    for source, text in sources:
        word = ext.symbols(text)
        if word is None:  # the pre-tokenizer cuts it in pieces: no single token could ever be produced for it
            counts["unreachable"] += 1
            continue
        if word in targets:
            continue
        if ext.add(word):
            targets[word] = source
            counts[source] += 1
        else:
            counts["already_in_vocab"] += 1
    tok_json = ext.to_json()
    from tokenizers import Tokenizer

    check = Tokenizer.from_str(json.dumps(tok_json))
    missed = [w for w in targets if [t.value for t in check.model.tokenize(w)] != [w]]
    if missed:  # base merges that continue from a new token can segment it differently; kept (exact), reported
        logger.warning("%d of %d new words do not encode as one token (e.g. %r); they stay in the vocabulary",
                       len(missed), len(targets), ext.text_of(missed[0]))
    new = [{"id": ext.vocab[t], "token": t, "text": ext.text_of(t), "base_ids": ext.base_ids(t)} for t in ext.new_tokens]
    info = {"base_tokenizer": base_path, "base_vocab_size": base_len, "first_new_id": ext.start,
            "alphabet": ext.kind, "added": {**counts, "tokens": len(new), "not_one_token": len(missed)},
            "new_tokens": new}

    os.makedirs(output_dir, exist_ok=True)
    base.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok_json, f, ensure_ascii=False)
    sp_file = os.path.join(base_path, "tokenizer.model") if os.path.isdir(base_path) else None
    if ext.kind == "metaspace" and sp_file and os.path.isfile(sp_file):
        _extend_sp_proto(sp_file, os.path.join(output_dir, "tokenizer.model"), ext)
    with open(os.path.join(output_dir, VOCAB_INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, ensure_ascii=False, indent=1)
    merged = AutoTokenizer.from_pretrained(output_dir, trust_remote_code=trust_remote_code)
    base_vocab, merged_vocab = base.get_vocab(), merged.get_vocab()
    changed = [t for t, i in base_vocab.items() if merged_vocab.get(t) != i]
    if changed or len(merged) != base_len + len(new):
        raise RuntimeError(f"the merged tokenizer in {output_dir} does not keep the base vocabulary "
                           f"({len(changed)} tokens changed, {len(merged)} tokens for {base_len} + {len(new)})")
    logger.info("Base tokenizer %s: %d tokens; added %d (%d domain pieces, %d words, %d characters or intermediate "
                "pieces; %d already in the vocabulary, %d cut by the pre-tokenizer) -> %d tokens in %s",
                base_path, base_len, len(new), counts["domain_sp"], counts["words"],
                len(new) - counts["domain_sp"] - counts["words"], counts["already_in_vocab"], counts["unreachable"],
                len(merged), output_dir)
    return info


def _extend_sp_proto(sp_file: str, out_file: str, ext: BpeExtender) -> None:
    """MedicalGPT's way for a SentencePiece base: the new pieces appended to the model proto (score 0), so that
    `tokenizer.model` gives the new tokens the same ids as tokenizer.json."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(sp_file, "rb") as f:
        proto.ParseFromString(f.read())
    if len(proto.pieces) != ext.start or any(ext.vocab.get(p.piece) != i for i, p in enumerate(proto.pieces)
                                             if p.type == pb.ModelProto.SentencePiece.NORMAL):
        logger.warning("%s does not match tokenizer.json's ids; not writing an extended tokenizer.model", sp_file)
        return
    for token in ext.new_tokens:
        piece = proto.pieces.add()
        piece.piece, piece.score = token, 0.0
    with open(out_file, "wb") as f:
        f.write(proto.SerializeToString())


# ---------------------------------------------------------------- embedding rows for the new tokens
def read_vocab_info(tokenizer_dir: Optional[str]) -> Optional[dict]:
    path = os.path.join(tokenizer_dir, VOCAB_INFO_FILE) if tokenizer_dir else None
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def copy_vocab_info(tokenizer_dir: Optional[str], output_dir: str) -> None:
    """Keep VOCAB_INFO_FILE beside a saved copy of the tokenizer (an adapter folder), for merge_peft_adapter.py."""
    if read_vocab_info(tokenizer_dir) and os.path.abspath(tokenizer_dir) != os.path.abspath(output_dir):
        shutil.copy(os.path.join(tokenizer_dir, VOCAB_INFO_FILE), os.path.join(output_dir, VOCAB_INFO_FILE))


def sub_token_ids(tokenizer_dir: Optional[str], first_id: int) -> dict[int, list[int]]:
    """{new token id: base sub-token ids} for the tokens of `tokenizer_dir`'s VOCAB_INFO_FILE with id >= first_id."""
    info = read_vocab_info(tokenizer_dir)
    if not info:
        return {}
    where = os.path.join(tokenizer_dir, VOCAB_INFO_FILE)
    out = {}
    for i, t in enumerate(info.get("new_tokens") or []):
        if not (isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("base_ids"), list)):
            raise DataError(f"{where}: new_tokens[{i}] needs an integer 'id' and a list 'base_ids'")
        if t["id"] >= first_id and t["base_ids"]:
            out[t["id"]] = t["base_ids"]
    return out
