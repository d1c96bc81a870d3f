"""Generation evaluation on held-out SFT conversations: the model answers each conversation's last user turn and
the answer is compared with the conversation's last assistant turn (the reference).

* ROUGE-L: rouge-score's F-measure per answer, averaged, x100.
* BLEU: sacrebleu's corpus BLEU.
Both tokenize with sacrebleu's "zh" tokenizer: every Chinese character is a token (character level; a word
segmenter would make the score depend on its dictionary), other text is split by the 13a (mteval) rules, so a set
that mixes Chinese and English is scored in one pass. (rouge-score's own tokenizer drops every non-ASCII character.)
* Reward: the mean score that a trained reward model (medgpt.reward.RewardScorer) gives the answers, when given.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from ..data.io import DataError, find_data_files, load_records
from ..data.sft import to_messages

logger = logging.getLogger(__name__)


def _held_out(data, where: str) -> dict:
    messages = to_messages(data, where)
    return {"messages": messages[:-1], "reference": messages[-1]["content"].strip(), "where": where}


def load_conversations(paths: Sequence[str], max_samples: Optional[int] = None) -> list[dict]:
    """{"messages" (up to the last user turn), "reference" (the last assistant turn), "where"} for every
    conversation in the SFT files/folders (sharegpt, OpenAI messages or alpaca records); the first max_samples."""
    files = [f for p in paths for f in find_data_files(p, (".json", ".jsonl"))]
    rows = load_records(files, _held_out, limit=max_samples)
    if not rows:
        raise DataError(f"{', '.join(paths)}: no conversations")
    return rows


class _Tokenizer:
    """rouge-score's tokenizer interface over sacrebleu's zh tokenizer (see the module docstring)."""

    def __init__(self):
        from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

        self._tok = TokenizerZh()

    def tokenize(self, text: str) -> list[str]:
        return self._tok(text.lower()).split()


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """{"rougeL": mean ROUGE-L F1 x100, "bleu": corpus BLEU, "rougeL_each": per answer}."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    each = [scorer.score(ref, pred)["rougeL"].fmeasure * 100 for pred, ref in zip(predictions, references)]
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="zh")
    return {"rougeL": sum(each) / len(each) if each else 0.0, "bleu": bleu.score, "rougeL_each": each}


def evaluate_generation(chat, conversations: Sequence[dict], options, batch_size: int = 8,
                        reward_scorer=None) -> dict:
    """Answer every held-out conversation (batched) and score the answers; see the module docstring."""
    from tqdm.auto import tqdm

    predictions: list[str] = []
    for start in tqdm(range(0, len(conversations), batch_size), desc="held-out answers", leave=False):
        batch = conversations[start:start + batch_size]
        predictions += chat.chat([c["messages"] for c in batch], options)
    references = [c["reference"] for c in conversations]
    metrics = text_metrics(predictions, references)
    rewards = None
    if reward_scorer is not None:
        rewards = reward_scorer.score_messages([c["messages"] for c in conversations], predictions).tolist()
    samples = []
    for i, (c, pred) in enumerate(zip(conversations, predictions)):
        s = {"where": c["where"], "question": c["messages"][-1]["content"], "reference": c["reference"],
             "prediction": pred, "rougeL": round(metrics["rougeL_each"][i], 2)}
        if rewards is not None:
            s["reward"] = round(rewards[i], 4)
        samples.append(s)
    out = {"n": len(conversations), "rougeL": metrics["rougeL"], "bleu": metrics["bleu"],
           "max_new_tokens": options.max_new_tokens, "temperature": options.temperature or 0, "samples": samples}
    if rewards is not None:
        out["reward_mean"] = sum(rewards) / len(rewards)
    return out
