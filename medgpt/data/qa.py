"""Question/answer records for GRPO (rule rewards score a completion against "answer"): record -> clean row -> the
prompt the policy answers."""
from __future__ import annotations

import logging
import numbers
from typing import Optional

from .io import DataError, require_str

logger = logging.getLogger(__name__)


def qa_row(data, where: str) -> dict:
    """{"question", "answer"} of a record {"question": str, "answer": str or number} (a number becomes its text)."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(data).__name__}")
    question = require_str(data, "question", where)
    if "answer" not in data:
        raise DataError(f"{where}: missing field 'answer'")
    answer = data["answer"]
    if isinstance(answer, numbers.Number) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{where}: field 'answer' must be a non-empty string or a number")
    return {"question": question, "answer": answer}


def question_prompt(question: str, tokenizer, template, system_prompt: str) -> str:
    """The text the policy continues: the question in the chat template, ending with the assistant header."""
    text = template.render([{"role": "user", "content": question}], system_prompt=system_prompt,
                           add_generation_prompt=True, eos_token=tokenizer.eos_token or "</s>")
    # The template already writes any BOS text; drop it when the tokenizer adds its own BOS, so it is not doubled.
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def build_prompts(rows: list[dict], tokenizer, template, system_prompt: str, max_prompt_length: Optional[int], desc: str):
    """A datasets.Dataset of {"prompt": rendered text ending with the assistant header, "answer"}."""
    from datasets import Dataset

    out, too_long = [], 0
    for row in rows:
        text = question_prompt(row["question"], tokenizer, template, system_prompt)
        if max_prompt_length and len(tokenizer(text)["input_ids"]) > max_prompt_length:
            too_long += 1
            continue
        out.append({"prompt": text, "answer": row["answer"]})
    if too_long:
        logger.warning("%s: skipped %d of %d prompts longer than --max_prompt_length %d", desc, too_long, len(rows),
                       max_prompt_length)
    if rows and not out:
        raise DataError(f"{desc}: no prompt fits in --max_prompt_length {max_prompt_length}")
    return Dataset.from_list(out) if out else None
