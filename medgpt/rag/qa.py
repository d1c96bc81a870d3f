"""Answering from documents: the retrieved chunks go into the question as numbered passages the model is asked
to cite, within the model's context; the answer is shown with its sources (file and position)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional

from ..data.io import DataError
from .documents import Chunk
from .index import DocumentIndex
from .retrieval import has_cjk

logger = logging.getLogger(__name__)

# MedicalGPT chatpdf's RAG_PROMPT, asking for citations too; the English one says the same.
PROMPT_ZH = """基于以下已知信息，简洁和专业地回答用户的问题，并用编号（如 [1]）注明答案所用的信息。
如果无法从中得到答案，请说 "根据已知信息无法回答该问题"，不允许在答案中添加编造成分，答案请使用中文。

已知内容:
{passages}

问题:
{question}"""

PROMPT_EN = """Answer the question briefly and precisely from the numbered passages below, and cite the passages \
you use by their number, like [1]. If they do not contain the answer, say "The documents do not answer this \
question." Do not add anything they do not say.

Passages:
{passages}

Question: {question}"""

NO_PASSAGE = {True: "（没有与问题相关的内容）", False: "(none: no passage of the documents matches the question)"}

EMBEDDED_MODEL_CHINESE_NOTE = ("Note: the embedded SmolLM2-135M-Instruct is an English-only model: its Chinese answers "
                               "are poor; use a Chinese chat model (e.g. a Qwen folder) with --base_model.")

_CITATION = re.compile(r"[\[【]\s*(\d{1,3})\s*[\]】]")


@dataclass
class Source:
    """A passage given to the model, numbered as in the prompt."""
    number: int
    file: str  # as shown: the path inside the documents folder
    chunk: Chunk
    score: float
    cited: bool = False

    def label(self) -> str:
        return f"[{self.number}] {self.file} ({self.chunk.location()})"

    def to_dict(self) -> dict:
        c = self.chunk
        return {"number": self.number, "file": self.file, "page": c.page, "line_start": c.line_start,
                "line_end": c.line_end, "char_start": c.start, "char_end": c.end, "location": c.location(),
                "score": round(self.score, 6), "cited": self.cited, "text": c.text}


def cited_numbers(answer: str) -> set[int]:
    """The passage numbers an answer cites: [1], [ 2 ], 【3】."""
    return {int(n) for n in _CITATION.findall(answer or "")}


def mark_cited(sources: list[Source], answer: str) -> list[Source]:
    cited = cited_numbers(answer)
    for s in sources:
        s.cited = s.number in cited
    return sources


def format_sources(sources: list[Source], markdown: bool = False) -> str:
    """'Sources:' and one line per passage given to the model, those the answer cites marked."""
    if not sources:
        return "Sources: none (no passage of the documents matches the question)"
    lines = [s.label() + (" (cited)" if s.cited else "") for s in sources]
    if markdown:
        return "\n".join(f"- {line}" for line in lines)
    return "Sources:\n" + "\n".join(f"  {line}" for line in lines)


def chinese_note(base_model: Optional[str], lora_model: Optional[str], question: str) -> Optional[str]:
    """One line for a Chinese question to the embedded English-only model, else None."""
    from ..default_model import is_default

    return EMBEDDED_MODEL_CHINESE_NOTE if is_default(base_model) and not lora_model and has_cjk(question) else None


class DocumentQA:
    """Retrieval over a DocumentIndex and the prompt that puts the passages before a question."""

    def __init__(self, index: DocumentIndex, top_k: int = 3):
        if top_k < 1:
            raise DataError(f"--top_k {top_k}: must be at least 1")
        self.index, self.top_k = index, top_k

    def sources(self, question: str, top_k: Optional[int] = None) -> list[Source]:
        hits = self.index.search(question, top_k or self.top_k)
        return [Source(n, self.index.name(self.index.chunks[h.index]), self.index.chunks[h.index], h.score)
                for n, h in enumerate(hits, 1)]

    @staticmethod
    def user_message(question: str, sources: list[Source]) -> str:
        chinese = has_cjk(question)
        passages = "\n\n".join(f"[{s.number}] ({s.file}, {s.chunk.location()})\n{s.chunk.text}" for s in sources)
        return (PROMPT_ZH if chinese else PROMPT_EN).format(passages=passages or NO_PASSAGE[chinese],
                                                            question=question)

    def augment(self, chat, messages: list[dict], max_new_tokens: int,
                system_prompt: Optional[str] = None) -> tuple[list[dict], list[Source]]:
        """messages (ending with the user's question) with the retrieved passages put into the question, as many
        of the best as fit the model's context with max_new_tokens to spare, and those passages."""
        question = messages[-1]["content"]
        sources = self.sources(question)
        budget = chat.context_length - max_new_tokens
        dropped = 0
        while True:
            augmented = messages[:-1] + [{"role": "user", "content": self.user_message(question, sources)}]
            if not sources or chat.count_tokens(chat.build_prompt(augmented, system_prompt)) <= budget:
                break
            sources, dropped = sources[:-1], dropped + 1
        if dropped:
            logger.warning("Left out the %d lowest-ranked passage(s): the model's %d-token context holds %d with "
                           "%d new tokens", dropped, chat.context_length, len(sources), max_new_tokens)
        return augmented, sources

    def prompt(self, chat, question: str, max_new_tokens: int,
               system_prompt: Optional[str] = None) -> tuple[str, list[Source]]:
        """The whole prompt (chat template applied) for one question, and the passages in it."""
        messages, sources = self.augment(chat, [{"role": "user", "content": question}], max_new_tokens,
                                         system_prompt)
        return chat.build_prompt(messages, system_prompt), sources
