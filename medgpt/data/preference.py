"""Preference pairs for reward modeling, DPO and ORPO: record -> prompt messages + chosen + rejected -> token ids.

Two record formats (MedicalGPT's), mixed freely in one folder of .json/.jsonl files:

* ``{"system", "history": [[q, a], ...], "question", "response_chosen", "response_rejected"}``
  (``system`` and ``history`` may be missing or empty)
* ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...], "chosen", "rejected"}``, the
  conversation ending with the human turn being answered (``"messages"`` with role/content works as well)

Tokenization (done here, not by TRL, for all three stages): the prompt is the chat template's rendering up to and
including the assistant header; a reply is the template's assistant piece, i.e. the answer *with* its end-of-turn
marker (``<|im_end|>\\n`` for chatml), so the policy learns to stop and the reward model sees the whole turn.
Prompt and reply are tokenized without the tokenizer's own special tokens: the template already holds any BOS text,
and the end-of-turn is in the reply, so nothing is doubled (TRL's text path would add the tokenizer's BOS and append
its eos after chatml's ``<|im_end|>\\n``).
"""
from __future__ import annotations

import logging
from typing import Optional

from .io import DataError, encode_rows, load_train_eval_rows, require_str
from .sft import to_messages

logger = logging.getLogger(__name__)

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


# ---------------------------------------------------------------------------------------------------
# Records

def _reply(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if isinstance(value, dict):  # {"from": "gpt", "value": ...} / {"role": "assistant", "content": ...}
        value = value.get("value", value.get("content"))
        data = {key: value}
    return require_str(data, key, where)


def preference_row(data, where: str) -> dict:
    """Normalize one record into {"messages": prompt messages ending with a user turn, "chosen", "rejected", "where"}."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(data).__name__}")
    if "conversations" in data or "messages" in data:
        chosen_key, rejected_key = "chosen", "rejected"
        chosen, rejected = _reply(data, chosen_key, where), _reply(data, rejected_key, where)
        messages = to_messages(data, where, require_final_answer=False)
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: the conversation must end with the user turn that 'chosen'/'rejected' answer, "
                            f"not with a '{messages[-1]['role']}' turn")
    elif "question" in data or "response_chosen" in data:
        chosen_key, rejected_key = "response_chosen", "response_rejected"
        question = require_str(data, "question", where)
        chosen, rejected = require_str(data, chosen_key, where), require_str(data, rejected_key, where)
        if data.get("system") is not None and not isinstance(data["system"], str):
            raise DataError(f"{where}: field 'system' must be a string, got {type(data['system']).__name__}")
        # The same record as an alpaca one (system + history + instruction -> output) gives the messages and
        # validates the history; the prompt is everything but the answer.
        alpaca = {"instruction": question, "output": chosen, "system": data.get("system"),
                  "history": data.get("history")}
        messages = to_messages(alpaca, where)[:-1]
    else:
        raise DataError(f"{where}: unknown preference record format (keys: {', '.join(sorted(data)) or 'none'}); "
                        "expected 'question'/'response_chosen'/'response_rejected' (+ 'system', 'history') or "
                        "'conversations'/'chosen'/'rejected'")
    if chosen.strip() == rejected.strip():
        raise DataError(f"{where}: '{chosen_key}' and '{rejected_key}' are identical (no preference to learn)")
    return {"messages": messages, "chosen": chosen, "rejected": rejected, "where": where}


# ---------------------------------------------------------------------------------------------------
# Text

def render_prompt(template, messages: list[dict], eos_token: str) -> str:
    """The prompt the model answers: the conversation up to and including the assistant header."""
    return template.render(messages, add_generation_prompt=True, eos_token=eos_token)


def reply_text(template, answer: str, eos_token: str) -> str:
    """An assistant reply as the template writes it, with its end-of-turn marker (e.g. "answer<|im_end|>\\n")."""
    pieces = template.segments([{"role": "user", "content": "?"}, {"role": "assistant", "content": answer}],
                               system_prompt="", eos_token=eos_token)
    return "".join(text for text, is_reply in pieces if is_reply)


def eos_text(tokenizer) -> str:
    return tokenizer.eos_token or "</s>"


# ---------------------------------------------------------------------------------------------------
# Tokens

def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_tokenize(tokenizer, prompt: str, reply: str, prompt_ids: Optional[list[int]] = None):
    """(prompt ids, reply ids). The prompt is tokenized alone, as generation sees it; the reply is the rest of the
    joint tokenization (as SFT tokenizes it) when that starts with the prompt's ids, else the reply tokenized alone."""
    if prompt_ids is None:
        prompt_ids = _ids(tokenizer, prompt)
    full = _ids(tokenizer, prompt + reply)
    if full[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full[len(prompt_ids):]
    return prompt_ids, _ids(tokenizer, reply)


def _shorten_prompt(messages: list[dict], tokenizer, template, eos: str, max_prompt_length: int):
    """(text, ids) of the prompt cut to at most max_prompt_length tokens: the oldest exchanges go first, then the end
    of the last question, at a token boundary (the template's headers stay whole). None when even that cannot fit."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(system):]
    text = render_prompt(template, messages, eos)
    ids = _ids(tokenizer, text)
    while len(ids) > max_prompt_length and len(body) > 1:
        body = body[2:]
        text = render_prompt(template, system + body, eos)
        ids = _ids(tokenizer, text)
    question = body[-1]["content"]
    for _ in range(4):  # a cut can change the token count at the seam: re-check
        excess = len(ids) - max_prompt_length
        if excess <= 0:
            return text, ids
        enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
        keep = len(enc["input_ids"]) - excess
        if keep <= 0:
            return None
        question = question[: enc["offset_mapping"][keep][0]]
        text = render_prompt(template, system + body[:-1] + [{"role": "user", "content": question}], eos)
        ids = _ids(tokenizer, text)
    return (text, ids) if len(ids) <= max_prompt_length else None


def encode_pair(row: dict, tokenizer, template, max_length: Optional[int], max_prompt_length: Optional[int]):
    """{"prompt_ids", "chosen_ids", "rejected_ids"} of a normalized row, or None when no usable pair fits.

    A prompt over max_prompt_length loses its oldest exchanges, then the end of its question; replies that do not
    fit in max_length (prompt + reply) keep their start (a cut reply has no end-of-turn marker)."""
    eos = eos_text(tokenizer)
    prompt = render_prompt(template, row["messages"], eos)
    prompt_ids = _ids(tokenizer, prompt)
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        if not tokenizer.is_fast:  # no offsets to cut the question at: keep the prompt's end
            prompt_ids = prompt_ids[-max_prompt_length:]
            prompt = tokenizer.decode(prompt_ids)
        else:
            shortened = _shorten_prompt(row["messages"], tokenizer, template, eos, max_prompt_length)
            if shortened is None:
                return None
            prompt, prompt_ids = shortened
    _, chosen_ids = split_tokenize(tokenizer, prompt, reply_text(template, row["chosen"], eos), prompt_ids)
    _, rejected_ids = split_tokenize(tokenizer, prompt, reply_text(template, row["rejected"], eos), prompt_ids)
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room <= 0:
            return None
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    if not chosen_ids or not rejected_ids or chosen_ids == rejected_ids:
        return None
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def resolve_lengths(pref_args, training_args) -> tuple[Optional[int], Optional[int]]:
    """(max_length, max_prompt_length) from --max_length / --max_prompt_length and MedicalGPT's
    --max_source_length / --max_target_length; writes max_length back into the trainer config."""
    import dataclasses

    default_max = {f.name: f.default for f in dataclasses.fields(training_args)}.get("max_length")
    max_prompt = pref_args.max_prompt_length or pref_args.max_source_length
    max_length = training_args.max_length
    if pref_args.max_target_length and max_length == default_max:
        max_length = (max_prompt or max_length // 2) + pref_args.max_target_length
    if max_prompt is None and max_length is not None:
        max_prompt = max_length // 2
    if max_prompt is not None and max_length is not None and max_prompt >= max_length:
        raise SystemExit(f"error: --max_prompt_length {max_prompt} leaves no room for a reply in --max_length {max_length}")
    training_args.max_length = max_length
    return max_length, max_prompt


def tokenize_pairs(rows: list[dict], tokenizer, template, max_length, max_prompt_length,
                   num_proc: Optional[int] = None, desc: str = "train"):
    """A datasets.Dataset of prompt_ids/chosen_ids/rejected_ids; pairs that do not fit are dropped and counted."""
    if not rows:
        return None
    tokenized, dropped = encode_rows(
        rows, ("messages", "chosen", "rejected"),
        lambda row: encode_pair(row, tokenizer, template, max_length, max_prompt_length),
        COLUMNS, num_proc, f"Tokenizing {desc} preference pairs")
    if dropped:
        logger.warning("%s: %d of %d pairs dropped: they do not fit in --max_length %s / --max_prompt_length %s "
                       "(or are identical once cut)", desc, dropped, len(rows), max_length, max_prompt_length)
    if len(tokenized) == 0:
        raise DataError(f"{desc}: no preference pair left after tokenization (are --max_length {max_length} / "
                        f"--max_prompt_length {max_prompt_length} too small?)")
    first = tokenized[0]
    logger.info("First %s pair, as tokenized:\n  prompt:   %r\n  chosen:   %r\n  rejected: %r", desc,
                tokenizer.decode(first["prompt_ids"]), tokenizer.decode(first["chosen_ids"]),
                tokenizer.decode(first["rejected_ids"]))
    return tokenized


# ---------------------------------------------------------------------------------------------------
# Length-grouped batches: a padded batch is as long as its longest pair, so pairs of similar length go together

LENGTH_STRATEGIES = ("group_by_length", "batch_rebalance")  # the samplers that read --length_column_name


def pair_length(prompt_ids, chosen_ids, rejected_ids) -> int:
    """Tokens of a pair's longer sequence, prompt + chosen or prompt + rejected: what it adds to a padded batch."""
    return len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))


def add_length_column(dataset, name: str):
    """The pairs with their pair_length in column `name`, for the length-grouped sampler."""
    if dataset is None or name in dataset.column_names:
        return dataset
    return dataset.map(lambda b: {name: [pair_length(*p) for p in zip(*(b[k] for k in COLUMNS))]},
                       batched=True, desc="Measuring pair lengths")


def build_preference_datasets(data_args, pref_args, tokenizer, template, training_args):
    """(train, eval) datasets of prompt_ids/chosen_ids/rejected_ids for --do_train / --do_eval, plus the length column
    (--length_column_name) when the sampler groups by length."""
    max_length, max_prompt = resolve_lengths(pref_args, training_args)
    train_rows, eval_rows = load_train_eval_rows(
        data_args, preference_row, need_eval=training_args.do_eval, seed=training_args.seed)
    logger.info("Preference data: %d training and %d evaluation pairs (max_length %s, max_prompt_length %s)",
                len(train_rows), len(eval_rows), max_length, max_prompt)
    num_proc = data_args.preprocessing_num_workers
    with training_args.main_process_first(desc="tokenizing"):
        train = tokenize_pairs(train_rows, tokenizer, template, max_length, max_prompt, num_proc, "train") \
            if training_args.do_train else None
        evals = tokenize_pairs(eval_rows, tokenizer, template, max_length, max_prompt, num_proc, "eval") \
            if training_args.do_eval else None
    if training_args.do_train and train is None:
        raise DataError("no training pairs: the training data is empty")
    if training_args.train_sampling_strategy in LENGTH_STRATEGIES:
        name = training_args.length_column_name
        train, evals = add_length_column(train, name), add_length_column(evals, name)
    return train, evals
