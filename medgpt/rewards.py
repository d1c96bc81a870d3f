"""Rule rewards for GRPO on question/answer data ({"question", "answer"} records).

The model is asked (SYSTEM_PROMPT, as in MedicalGPT's grpo_training.py) to reason inside <think>...</think>
and give the final answer inside <answer>...</answer>. Two rewards, each 0 or 1:

* accuracy: the final answer (the last <answer>...</answer>, else the whole reply) matches the reference.
  Numeric references compare as numbers with the last number of the answer ("7" = "7.0" = "7 days",
  "1,000" = "1000"); GSM8K-style references ("... #### 42") use the part after "####". Other references
  compare as normalised text (case, spaces, surrounding punctuation), and also match a short answer that
  contains them ("The pancreas." for "pancreas").
* format: the whole reply is <think>...</think> then <answer>...</answer>.

Each function follows TRL's reward-function convention: f(completions, **columns) -> list[float], where a
completion is a string (plain-text prompts) or a list of messages (conversational prompts).
"""
from __future__ import annotations

import math
import re
import unicodedata
from typing import Optional

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
)

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"^\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*$", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_EDGE_PUNCT = " \t\r\n.,;:!?。，；：！？、\"'“”‘’`()[]{}（）【】<>《》"


def completion_text(completion) -> str:
    """A completion as TRL passes it: a string, or a list of messages whose last one is the reply."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def extract_answer(text: str) -> str:
    """The content of the last <answer>...</answer>, else the whole text (stripped)."""
    found = _ANSWER.findall(text or "")
    return (found[-1] if found else (text or "")).strip()


def reference_answer(answer: str) -> str:
    """The gold answer; GSM8K-style "reasoning #### 42" keeps only "42"."""
    answer = str(answer)
    return answer.split("####", 1)[1].strip() if "####" in answer else answer.strip()


def parse_number(text: str) -> Optional[float]:
    """The value of a string that is just a number ("7", "7.0", "-3", "1,000", "0.5%"), else None."""
    s = unicodedata.normalize("NFKC", text).strip().rstrip("%").strip()
    if _NUMBER.fullmatch(s):
        return float(s.replace(",", ""))
    return None


def last_number(text: str) -> Optional[float]:
    found = _NUMBER.findall(unicodedata.normalize("NFKC", text or ""))
    return float(found[-1].replace(",", "")) if found else None


def normalize_text(text: str) -> str:
    s = unicodedata.normalize("NFKC", text or "").lower()
    s = re.sub(r"\s+", " ", s).strip(_EDGE_PUNCT)
    return s


def answers_match(predicted: str, gold: str) -> bool:
    gold = reference_answer(gold)
    value = parse_number(gold)
    if value is not None:
        got = last_number(predicted)
        return got is not None and math.isclose(got, value, rel_tol=1e-6, abs_tol=1e-9)
    p, g = normalize_text(predicted), normalize_text(gold)
    if not g:
        return False
    return p == g or (g in p and len(p) <= 2 * len(g) + 10)


def accuracy_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 where the final answer matches the reference answer (the dataset's "answer" column)."""
    return [1.0 if answers_match(extract_answer(completion_text(c)), a) else 0.0 for c, a in zip(completions, answer)]


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 where the reply is exactly <think>...</think> followed by <answer>...</answer>."""
    return [1.0 if _FORMAT.match(completion_text(c)) else 0.0 for c in completions]


REWARD_FUNCS = {"accuracy": accuracy_reward, "format": format_reward}


def get_reward_funcs(names: str) -> list:
    """Reward functions by comma-separated name: one of REWARD_FUNCS, or your own as "module:function"
    (importable, with TRL's signature f(completions, **columns) -> list[float])."""
    import importlib

    out = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if ":" in name:
            module, _, func = name.partition(":")
            try:
                out.append(getattr(importlib.import_module(module), func))
            except (ImportError, AttributeError) as e:
                raise SystemExit(f"error: --reward_funcs {name}: cannot import it ({e})")
            continue
        if name not in REWARD_FUNCS:
            raise SystemExit(f"error: --reward_funcs: unknown reward '{name}' (choose from {', '.join(REWARD_FUNCS)}, "
                             "or give module:function)")
        out.append(REWARD_FUNCS[name])
    if not out:
        raise SystemExit("error: --reward_funcs: give at least one reward")
    return out
