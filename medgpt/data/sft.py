"""Chat samples for SFT: any supported record format -> role/content messages -> input_ids + labels.

Labels come from character spans: the conversation is rendered once by the template into
(text, is_assistant) pieces and tokenized as one string with offsets, so the token ids are exactly
those of the whole rendered text (no piecewise-tokenization seams), and a token is supervised when it
starts inside an assistant piece (the reply and its end-of-turn marker).
"""
from __future__ import annotations

import logging
from typing import Optional

from .io import DataError, encode_rows

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

_ROLE_NAMES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "chatgpt": "assistant", "model": "assistant",
}


def _turns(items, where: str, role_key: str, content_key: str, field_name: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: '{field_name}' must be a non-empty list")
    messages = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {field_name}[{i}] must be an object")
        rk = role_key if role_key in turn else ("role" if "role" in turn else "from")
        ck = content_key if content_key in turn else ("content" if "content" in turn else "value")
        if rk not in turn or ck not in turn:
            raise DataError(f"{where}: {field_name}[{i}] needs '{role_key}' and '{content_key}'")
        role = _ROLE_NAMES.get(str(turn[rk]).lower())
        if role is None:
            raise DataError(f"{where}: {field_name}[{i}]: unknown role '{turn[rk]}' "
                            f"(expected one of {', '.join(sorted(_ROLE_NAMES))})")
        if not isinstance(turn[ck], str):
            raise DataError(f"{where}: {field_name}[{i}].{ck} must be a string")
        messages.append({"role": role, "content": turn[ck]})
    return messages


def _alpaca(data: dict, where: str) -> list[dict]:
    for key in ("instruction", "output"):
        if not isinstance(data.get(key), str):
            raise DataError(f"{where}: alpaca record needs a string '{key}'")
    query = data["instruction"]
    if isinstance(data.get("input"), str) and data["input"].strip():
        query = f"{query}\n{data['input']}"
    messages = []
    if isinstance(data.get("system"), str) and data["system"].strip():
        messages.append({"role": "system", "content": data["system"]})
    for pair in data.get("history") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: 'history' must be a list of [question, answer] string pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": query}, {"role": "assistant", "content": data["output"]}]
    return messages


def validate_messages(messages: list[dict], where: str, require_final_answer: bool = True) -> list[dict]:
    """A leading system message at most, then user/assistant alternating from user, no empty turn."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise DataError(f"{where}: conversation has no user/assistant turns")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(f"{where}: turn {i + 1} is '{m['role']}' but '{expected}' was expected "
                            "(turns must alternate user/assistant, starting with user)")
        if not m["content"].strip():
            raise DataError(f"{where}: turn {i + 1} ({m['role']}) is empty")
    if require_final_answer and body[-1]["role"] != "assistant":
        raise DataError(f"{where}: conversation ends with a user turn that has no answer")
    return messages


def to_messages(data, where: str, require_final_answer: bool = True) -> list[dict]:
    """Normalize a sharegpt / OpenAI-messages / alpaca record into role/content messages."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(data).__name__}")
    if "conversations" in data:
        messages = _turns(data["conversations"], where, "from", "value", "conversations")
    elif "messages" in data:
        messages = _turns(data["messages"], where, "role", "content", "messages")
    elif "instruction" in data:
        messages = _alpaca(data, where)
    else:
        raise DataError(f"{where}: unknown record format (keys: {', '.join(sorted(data)) or 'none'}); expected "
                        "'conversations' (sharegpt), 'messages' (OpenAI) or 'instruction'/'output' (alpaca)")
    return validate_messages(messages, where, require_final_answer)


def sft_row(data, where: str) -> dict:
    return {"messages": to_messages(data, where), "where": where}


# ---------------------------------------------------------------------------------------------------
# Tokenization

def _tokenize_pieces(pieces, tokenizer):
    """Token ids of "".join(text) and, per token, whether it is supervised."""
    text = "".join(t for t, _ in pieces)
    spans, pos = [], 0
    for t, is_assistant in pieces:
        if is_assistant and t:
            spans.append((pos, pos + len(t)))
        pos += len(t)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        flags = []
        for start, end in enc["offset_mapping"]:
            # a token is supervised if it starts inside an assistant span (zero-width tokens: by end)
            p = start if end > start else max(start - 1, 0)
            flags.append(any(a <= p < b for a, b in spans))
        return ids, flags
    # Slow tokenizers (e.g. remote-code ChatGLM) have no offsets: tokenize piece by piece.
    ids, flags = [], []
    for t, is_assistant in pieces:
        piece_ids = tokenizer.encode(t, add_special_tokens=False) if t else []
        ids += piece_ids
        flags += [is_assistant] * len(piece_ids)
    return ids, flags


def _turn_ends(pieces) -> list[int]:
    """Character offsets where each assistant turn (and so each whole exchange) ends."""
    ends, pos = [], 0
    for t, is_assistant in pieces:
        pos += len(t)
        if is_assistant:
            ends.append(pos)
    return ends


def encode_conversation(messages, tokenizer, template, max_length: int, train_on_inputs: bool = False) -> Optional[dict]:
    """input_ids/attention_mask/labels of one conversation, at most max_length tokens.

    Too long: whole trailing exchanges are dropped first; if even the first exchange does not fit, its
    user message is shortened at a token boundary (the template's assistant header is kept, so the
    model never learns to run a question into its answer), then the reply is cut at the end.
    Returns None when nothing trainable fits (counted by the caller)."""
    eos = tokenizer.eos_token or "</s>"
    pieces = template.segments(messages, eos_token=eos)
    ids, flags = _tokenize_pieces(pieces, tokenizer)
    if len(ids) > max_length:
        ids, flags = _truncate(messages, pieces, ids, flags, tokenizer, template, max_length, eos)
        if ids is None:
            return None
    labels = list(ids) if train_on_inputs else [i if f else IGNORE_INDEX for i, f in zip(ids, flags)]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _truncate(messages, pieces, ids, flags, tokenizer, template, max_length, eos):
    # 1) keep as many whole exchanges as fit: the token index where each assistant piece ends
    n_kept = 0
    ends = _turn_ends(pieces)
    # token i ends a turn when the supervised run that contains it finishes at i
    run_ends = [i + 1 for i in range(len(flags)) if flags[i] and (i + 1 == len(flags) or not flags[i + 1])]
    for end_tok in run_ends[: len(ends)]:
        if end_tok <= max_length:
            n_kept += 1
            cut = end_tok
        else:
            break
    if n_kept > 0:
        return ids[:cut], flags[:cut]
    # 2) the first exchange alone is too long
    first_answer_start = flags.index(True) if True in flags else len(flags)
    answer_len = (run_ends[0] if run_ends else len(flags)) - first_answer_start
    prompt_budget = max_length - min(answer_len, max_length // 2)
    if first_answer_start > prompt_budget:
        msgs = [dict(m) for m in messages]
        ui = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        user = msgs[ui]["content"]
        enc = tokenizer(user, add_special_tokens=False, return_offsets_mapping=True) if tokenizer.is_fast else None
        excess = first_answer_start - prompt_budget
        for _ in range(4):  # token counts shift slightly at the cut; re-check and cut more if needed
            if enc is not None:
                keep = len(enc["input_ids"]) - excess
                if keep <= 0:
                    return None, None
                cut_char = enc["offset_mapping"][keep][0] if keep < len(enc["offset_mapping"]) else len(user)
            else:
                cut_char = max(0, len(user) - excess * 2)
            msgs[ui]["content"] = user[:cut_char]
            short_pieces = template.segments(msgs[: ui + 2], eos_token=eos)
            ids, flags = _tokenize_pieces(short_pieces, tokenizer)
            first_answer_start = flags.index(True) if True in flags else len(flags)
            if first_answer_start <= prompt_budget:
                break
            excess += first_answer_start - prompt_budget
        else:
            return None, None
    # 3) cut the end of the reply
    return ids[:max_length], flags[:max_length]


def tokenize_rows(rows: list[dict], tokenizer, template, max_length: int, train_on_inputs: bool,
                  num_proc: Optional[int] = None, desc: str = "train"):
    """Tokenize normalized rows into a datasets.Dataset (input_ids, attention_mask, labels)."""
    if not rows:
        return None
    tokenized, dropped = encode_rows(
        rows, ("messages",),
        lambda row: encode_conversation(row["messages"], tokenizer, template, max_length, train_on_inputs),
        ("input_ids", "attention_mask", "labels"), num_proc, f"Tokenizing {desc} conversations")
    if dropped:
        logger.warning("%s: %d of %d samples dropped: no assistant token fits in --model_max_length %d",
                       desc, dropped, len(rows), max_length)
    if len(tokenized) == 0:
        raise DataError(f"{desc}: no sample left after tokenization (is --model_max_length {max_length} too small?)")
    return tokenized


def build_sft_datasets(data_args, tokenizer, template, max_length: int, train_on_inputs: bool, training_args):
    from .io import load_train_eval_rows

    train_rows, eval_rows = load_train_eval_rows(
        data_args, sft_row, need_eval=training_args.do_eval, cache_dir=None, seed=training_args.seed)
    logger.info("SFT data: %d training and %d evaluation conversations", len(train_rows), len(eval_rows))
    with training_args.main_process_first(desc="tokenizing"):
        train = tokenize_rows(train_rows, tokenizer, template, max_length, train_on_inputs,
                              data_args.preprocessing_num_workers, "train") if training_args.do_train else None
        evals = tokenize_rows(eval_rows, tokenizer, template, max_length, train_on_inputs,
                              data_args.preprocessing_num_workers, "eval") if training_args.do_eval else None
    return train, evals
