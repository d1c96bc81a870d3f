"""Finding the chunks that answer a question: BM25 (the bm25s library) over Chinese-aware tokens, optionally
fused with dense retrieval by any Hugging Face encoder (mean-pooled hidden states) by reciprocal rank fusion."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PIECES = re.compile(rf"([{_CJK}]+)|([^\W_]+)")  # a run of Chinese characters, or a word (letters/digits)
_HAS_CJK = re.compile(f"[{_CJK}]")
RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al. 2009): score = sum 1 / (RRF_K + rank)


def has_cjk(text: str) -> bool:
    return bool(_HAS_CJK.search(text))


_jieba = None
_stopwords: Optional[frozenset] = None


def tokenize(text: str) -> list[str]:
    """BM25 tokens: Chinese runs cut by jieba (search mode: a long word and its parts, so 高血压 also matches 血压),
    other text split into lowercase words; bm25s's Chinese and (NLTK's) English stop words dropped."""
    global _jieba, _stopwords
    if _jieba is None:
        import jieba
        from bm25s.stopwords import STOPWORDS_CHINESE, STOPWORDS_EN_PLUS

        jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading on the first cut
        _jieba, _stopwords = jieba, frozenset(STOPWORDS_CHINESE) | frozenset(STOPWORDS_EN_PLUS)
    tokens = []
    for chinese, word in _PIECES.findall(text.lower()):
        if chinese:
            tokens += [t for t in _jieba.lcut_for_search(chinese) if t not in _stopwords]
        elif word not in _stopwords:
            tokens.append(word)
    return tokens


class BM25Index:
    """bm25s over pre-tokenized chunks (bm25s's own tokenizer splits on ASCII word boundaries only, so a Chinese
    sentence would be one token)."""

    def __init__(self, retriever):
        self.retriever = retriever

    @classmethod
    def build(cls, corpus_tokens: Sequence[list[str]]) -> "BM25Index":
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every build at DEBUG level
        retriever = bm25s.BM25()
        retriever.index([list(t) for t in corpus_tokens], show_progress=False)
        return cls(retriever)

    def save(self, folder: str) -> None:
        self.retriever.save(folder, show_progress=False)

    @classmethod
    def load(cls, folder: str) -> "BM25Index":
        import bm25s

        return cls(bm25s.BM25.load(folder, show_progress=False))

    def scores(self, query_tokens: list[str], n_docs: int) -> np.ndarray:
        if not query_tokens:
            return np.zeros(n_docs, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(query_tokens), dtype=np.float32)


class Encoder:
    """Sentence vectors from any Hugging Face encoder folder (BERT-like or decoder-only): the mean of the last
    hidden states over the real tokens, L2-normalized, so a dot product is the cosine similarity."""

    def __init__(self, name_or_path: str, device: Optional[str] = None, batch_size: int = 16,
                 max_length: int = 512, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.name = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, limit) if isinstance(limit, int) else max_length
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        dim = self.model.config.hidden_size
        return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)


@dataclass
class Hit:
    """A retrieved chunk: its index in the chunk list, its fused score and its rank (1-based) in each retriever."""
    index: int
    score: float
    ranks: dict = field(default_factory=dict)


def rank_bm25(scores: np.ndarray) -> list[int]:
    """Chunk indices by BM25 score, best first; chunks sharing no token with the question are left out."""
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order if scores[i] > 0]


def reciprocal_rank_fusion(rankings: dict[str, list[int]], k: int = RRF_K) -> list[Hit]:
    """Fuse ranked lists of chunk indices: each chunk scores sum over lists of 1 / (k + its rank)."""
    hits: dict[int, Hit] = {}
    for name, ranking in rankings.items():
        for rank, idx in enumerate(ranking, 1):
            hit = hits.setdefault(idx, Hit(idx, 0.0))
            hit.score += 1.0 / (k + rank)
            hit.ranks[name] = rank
    return sorted(hits.values(), key=lambda h: (-h.score, min(h.ranks.values()), h.index))
