"""Scoring multiple-choice questions with a chat model: by the log-likelihood of each option, or by the letter the
model generates; accuracy per subject with a Wilson 95% interval.

Prompt: the question and its lettered options as a user turn, rendered with the model's chat template up to the
assistant header (few-shot examples are earlier user/assistant turns, each answered "C. <option text>"). The
log-likelihood of an option is the sum of the log-probabilities of its answer tokens ("C. <option text>", without
the end-of-turn marker) given that prompt; `ll_norm="tokens"` divides it by the number of those tokens (the
per-token mean, which does not favour short options), `"none"` (default) keeps the sum. The prediction is the
option with the highest score.
"""
from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from typing import Optional, Sequence

import torch

from ..data.preference import split_tokenize
from .mcq import MCQ

logger = logging.getLogger(__name__)

LL_NORMS = ("none", "tokens")
INSTRUCTION = {
    "en": "The following is a multiple-choice question. Answer with the letter of the correct option.",
    "zh": "以下是单项选择题，请给出正确答案的选项。",
}
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def language(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


def question_block(item: MCQ) -> str:
    return "\n".join([item.question] + [f"{l}. {t}" for l, t in zip(item.letters, item.options)])


def option_answer(item: MCQ, i: int) -> str:
    """What the model is scored on for option i (and how few-shot examples are answered)."""
    return f"{item.letters[i]}. {item.options[i]}"


def build_messages(item: MCQ, shots: Sequence[MCQ] = ()) -> list[dict]:
    """The conversation whose next assistant turn answers `item`: the instruction, then the examples, then it."""
    messages: list[dict] = []
    for shot in list(shots) + [item]:
        messages.append({"role": "user", "content": question_block(shot)})
        if shot is not item:
            messages.append({"role": "assistant", "content": option_answer(shot, shot.answer)})
    messages[0]["content"] = f"{INSTRUCTION[language(item.question)]}\n\n{messages[0]['content']}"
    return messages


class FewShot:
    """Examples for a question: the first k questions of its subject from the dev pool; without a dev pool (or
    none for that subject), the first k other questions of its subject among those being scored."""

    def __init__(self, k: int, items: Sequence[MCQ], pool: Sequence[MCQ] = ()):
        self.k = k
        self.by_subject: dict[str, list[MCQ]] = defaultdict(list)
        self.pool: dict[str, list[MCQ]] = defaultdict(list)
        for q in items:
            self.by_subject[q.subject].append(q)
        for q in pool:
            self.pool[q.subject].append(q)

    def __call__(self, item: MCQ) -> list[MCQ]:
        if self.k <= 0:
            return []
        source = self.pool.get(item.subject) or self.by_subject[item.subject]
        return [q for q in source if q is not item][: self.k]


# ---------------------------------------------------------------------------------------------------
# Log-likelihood

@torch.inference_mode()
def continuation_logprobs(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8,
                          max_length: Optional[int] = None, desc: Optional[str] = None) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each continuation given its prompt text.

    Tokens as generation and SFT see them (medgpt.data.preference.split_tokenize: the prompt alone, the continuation
    as the rest of the joint tokenization). Requests that share a prompt (the options of one question) share its
    forward pass: `batch_size` distinct prompts go through the model together (left-padded, keeping their KV cache),
    then all their continuations at once on a copy of that cache (Cache.reorder_cache, as beam search uses it);
    a question with 5 options costs one prompt pass instead of 5."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    groups: dict[str, list[int]] = {}  # prompt -> request indices, in order of first appearance
    for i, (prompt, _) in enumerate(requests):
        groups.setdefault(prompt, []).append(i)
    prompts, conts, cut = [], {}, 0
    for prompt, members in groups.items():
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_all = []
        for i in members:
            _, c_ids = split_tokenize(tokenizer, prompt, requests[i][1], prompt_ids=p_ids)
            if not c_ids:
                raise ValueError(f"empty continuation {requests[i][1]!r}")
            c_all.append(c_ids)
        longest = max(len(c) for c in c_all)
        if max_length and len(p_ids) + longest > max_length:  # keep the end of the prompt
            p_ids = p_ids[len(p_ids) + longest - max_length:]
            cut += 1
        prompts.append((p_ids, members))
        conts.update(zip(members, c_all))
    if cut:
        logger.warning("%d prompt(s) longer than the model's %d tokens: their beginning was cut", cut, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts.sort(key=lambda p: -len(p[0]))  # similar lengths together: little padding
    results: list[Optional[tuple[float, int]]] = [None] * len(requests)
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for batch in tqdm(batches, desc=desc or "log-likelihood", leave=False):
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count from each row's first token
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's first token
        cache = out.cache
        owner = [row for row, (_, members) in enumerate(batch) for _ in members]
        members = [i for _, m in batch for i in m]
        cache.reorder_cache(torch.tensor(owner, device=device))  # one copy of its prompt's cache per continuation
        longest = max(len(conts[i]) for i in members)
        c_ids = torch.tensor([conts[i] + [pad] * (longest - len(conts[i])) for i in members], device=device)
        c_mask = torch.tensor([[1] * len(conts[i]) + [0] * (longest - len(conts[i])) for i in members], device=device)
        owner_t = torch.tensor(owner, device=device)
        full_mask = torch.cat([mask[owner_t], c_mask], dim=1)
        c_pos = mask.sum(-1)[owner_t, None] + torch.arange(longest, device=device)[None]
        logits = model(input_ids=c_ids, attention_mask=full_mask, position_ids=c_pos, cache=cache).logits
        rest = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position j predicts continuation token j + 1
        for row, i in enumerate(members):
            c = conts[i]
            lp = float(first[owner[row], c[0]])
            if len(c) > 1:
                target = torch.tensor(c[1:], device=device)
                lp += float(rest[row, : len(c) - 1].gather(-1, target[:, None]).sum())
            results[i] = (lp, len(c))
        del out, cache, logits, rest
    return results  # type: ignore[return-value]


def score_loglikelihood(chat, items: Sequence[MCQ], few_shot: FewShot, batch_size: int = 8,
                        ll_norm: str = "none") -> list[dict]:
    """Per question: the prediction (highest-scoring option), whether it is right, and every option's score."""
    if ll_norm not in LL_NORMS:
        raise ValueError(f"ll_norm must be one of {', '.join(LL_NORMS)}, got {ll_norm!r}")
    requests, owners = [], []
    for n, item in enumerate(items):
        prompt = chat.build_prompt(build_messages(item, few_shot(item)))
        for i in range(len(item.options)):
            requests.append((prompt, option_answer(item, i)))
            owners.append((n, i))
    scored = continuation_logprobs(chat.model, chat.tokenizer, requests, batch_size, chat.context_length,
                                   desc="MCQ log-likelihood")
    per_item: list[list[tuple[float, int]]] = [[] for _ in items]
    for (n, _), s in zip(owners, scored):
        per_item[n].append(s)
    out = []
    for item, options in zip(items, per_item):
        scores = [lp / k if ll_norm == "tokens" else lp for lp, k in options]
        pred = max(range(len(scores)), key=scores.__getitem__)
        out.append({"where": item.where, "subject": item.subject, "answer": item.answer_letter,
                    "prediction": item.letters[pred], "correct": pred == item.answer,
                    "scores": {l: round(s, 4) for l, s in zip(item.letters, scores)},
                    "tokens": {l: k for l, (_, k) in zip(item.letters, options)}})
    return out


# ---------------------------------------------------------------------------------------------------
# Generated letter

def parse_choice(text: str, item: MCQ) -> Optional[int]:
    """The option a reply names: its first standalone option letter, else the first option text it contains."""
    letters = "".join(item.letters)
    m = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    if m:
        return item.letters.index(m.group(1))
    found = [(text.find(t), i) for i, t in enumerate(item.options) if t and t in text]
    return min(found)[1] if found else None


def score_generated(chat, items: Sequence[MCQ], few_shot: FewShot, batch_size: int = 8,
                    max_new_tokens: int = 16) -> list[dict]:
    """Per question: the reply generated (greedy) with the template, the option it names, whether it is right."""
    from tqdm.auto import tqdm

    from ..generation import GenerationOptions

    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0)
    out = []
    for start in tqdm(range(0, len(items), batch_size), desc="MCQ generated letter", leave=False):
        batch = items[start:start + batch_size]
        replies = chat.chat([build_messages(item, few_shot(item)) for item in batch], options)
        for item, reply in zip(batch, replies):
            pred = parse_choice(reply, item)
            out.append({"where": item.where, "subject": item.subject, "answer": item.answer_letter,
                        "prediction": None if pred is None else item.letters[pred],
                        "correct": pred == item.answer, "reply": reply})
    return out


# ---------------------------------------------------------------------------------------------------
# Accuracy

def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% with z=1.96). Written out: no statistics library is a
    dependency, and unlike the normal approximation it stays inside [0, 1] and is not empty at 0% or 100%."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _acc(correct: int, n: int) -> dict:
    lo, hi = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "ci95": [round(lo, 4), round(hi, 4)]}


def accuracy_by_subject(results: Sequence[dict]) -> dict:
    """{"subjects": {subject: {n, correct, accuracy, ci95}}, "overall": {...}, "macro_accuracy"} (subjects in the
    order first seen; overall counts every question once; macro averages the subjects' accuracies)."""
    counts: dict[str, list[int]] = {}
    for r in results:
        c = counts.setdefault(r["subject"], [0, 0])
        c[0] += bool(r["correct"])
        c[1] += 1
    subjects = {s: _acc(c, n) for s, (c, n) in counts.items()}
    total = sum(n for _, n in counts.values())
    overall = _acc(sum(c for c, _ in counts.values()), total)
    macro = sum(s["accuracy"] for s in subjects.values()) / len(subjects) if subjects else 0.0
    return {"subjects": subjects, "overall": overall, "macro_accuracy": macro}
