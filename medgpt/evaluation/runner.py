"""One model's evaluation (multiple-choice + held-out generation) as a results dict, and its JSON/Markdown files;
a side-by-side table of several models' results (the pipeline report)."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from ..generation import GenerationOptions
from .generation_eval import evaluate_generation
from .mcq import MCQ
from .scoring import FewShot, accuracy_by_subject, score_generated, score_loglikelihood

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    num_few_shot: int = 0
    batch_size: int = 8
    ll_norm: str = "none"             # "none": sum of the option's token log-probs; "tokens": their mean
    generated_letter: bool = False    # also score the letter the model generates
    letter_max_new_tokens: int = 16
    generation: Optional[GenerationOptions] = None  # held-out answers (default: greedy, up to 256 new tokens)


def evaluate(chat, items: Sequence[MCQ] = (), conversations: Sequence[dict] = (), config: Optional[EvalConfig] = None,
             few_shot_pool: Sequence[MCQ] = (), reward_scorer=None, model_info: Optional[dict] = None) -> dict:
    """Results of one loaded ChatModel: {"model", "config", "mcq"?, "mcq_generated"?, "generation"?, "seconds"}."""
    config = config or EvalConfig()
    results: dict = {"model": model_info or {"name": chat.model_name}, "template": chat.template.name,
                     "config": asdict(config)}
    start = time.time()
    if items:
        shots = FewShot(config.num_few_shot, items, few_shot_pool)
        per_item = score_loglikelihood(chat, items, shots, config.batch_size, config.ll_norm)
        results["mcq"] = {"method": f"log-likelihood ({'sum' if config.ll_norm == 'none' else 'mean per token'})",
                          **accuracy_by_subject(per_item), "items": per_item}
        if config.generated_letter:
            gen = score_generated(chat, items, shots, config.batch_size, config.letter_max_new_tokens)
            results["mcq_generated"] = {"method": "generated letter (greedy)", **accuracy_by_subject(gen),
                                        "unparsed": sum(r["prediction"] is None for r in gen), "items": gen}
    if conversations:
        options = config.generation or GenerationOptions(max_new_tokens=256, temperature=0)
        results["generation"] = evaluate_generation(chat, conversations, options, config.batch_size, reward_scorer)
    results["seconds"] = round(time.time() - start, 1)
    return results


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mcq_table(section: dict) -> list[str]:
    lines = ["| subject | questions | accuracy (%) | 95% CI (Wilson) |", "|---|---:|---:|---|"]
    for name, s in section["subjects"].items():
        lines.append(f"| {name} | {s['n']} | {_pct(s['accuracy'])} | {_pct(s['ci95'][0])}–{_pct(s['ci95'][1])} |")
    o = section["overall"]
    lines.append(f"| **overall** | {o['n']} | **{_pct(o['accuracy'])}** | {_pct(o['ci95'][0])}–{_pct(o['ci95'][1])} |")
    if len(section["subjects"]) > 1:
        lines.append(f"| macro average | | {_pct(section['macro_accuracy'])} | |")
    return lines


def to_markdown(results: dict) -> str:
    cfg = results["config"]
    m = results["model"]
    lines = ["# Evaluation results", "",
             f"Model: `{m.get('base_model') or m.get('name')}`" + (f" + LoRA `{m['lora_model']}`" if m.get("lora_model")
                                                                  else "") + f", template `{results['template']}`, "
             f"{cfg['num_few_shot']}-shot, {results['seconds']} s.", ""]
    if "mcq" in results:
        lines += [f"## Multiple choice: {results['mcq']['method']}", ""] + _mcq_table(results["mcq"]) + [""]
    if "mcq_generated" in results:
        g = results["mcq_generated"]
        lines += [f"## Multiple choice: {g['method']}", "", f"{g['unparsed']} replies named no option (counted wrong).",
                  ""] + _mcq_table(g) + [""]
    if "generation" in results:
        g = results["generation"]
        lines += ["## Held-out conversations", "",
                  f"{g['n']} answers ({'greedy' if not g['temperature'] else 'sampled at temperature ' + str(g['temperature'])}, "
                  f"up to {g['max_new_tokens']} new tokens) against the reference replies; "
                  "ROUGE-L F1 and BLEU tokenized with Chinese characters as tokens.", "",
                  "| ROUGE-L | BLEU |" + (" mean reward |" if "reward_mean" in g else ""),
                  "|---:|---:|" + ("---:|" if "reward_mean" in g else ""),
                  f"| {g['rougeL']:.2f} | {g['bleu']:.2f} |" + (f" {g['reward_mean']:.4f} |" if "reward_mean" in g else ""),
                  ""]
    return "\n".join(lines)


def write_results(results: dict, output_dir: str) -> tuple[str, str]:
    """results.json and results.md in output_dir; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path, md_path = os.path.join(output_dir, "results.json"), os.path.join(output_dir, "results.md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=2)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(to_markdown(results) + "\n")
    return json_path, md_path


def summary(results: dict) -> dict:
    """The headline numbers of one model's results: MCQ accuracy (%) per subject and overall, ROUGE-L, BLEU,
    mean reward; name -> value (the pipeline report's table and bar chart)."""
    out: dict[str, float] = {}
    if "mcq" in results:
        subjects = results["mcq"]["subjects"]
        for name, s in subjects.items():
            out[f"MCQ {name}"] = 100 * s["accuracy"]
        if len(subjects) > 1:
            out["MCQ overall"] = 100 * results["mcq"]["overall"]["accuracy"]
    if "generation" in results:
        g = results["generation"]
        out["ROUGE-L"] = g["rougeL"]
        out["BLEU"] = g["bleu"]
        if "reward_mean" in g:
            out["mean reward"] = g["reward_mean"]
    return out


def comparison_table(results_by_model: dict[str, dict]) -> list[str]:
    """Markdown rows: one line per model, one column per headline number (MCQ cells carry the 95% CI)."""
    columns: list[str] = []
    for r in results_by_model.values():
        columns += [c for c in summary(r) if c not in columns]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for name, r in results_by_model.items():
        s = summary(r)
        cells = []
        for c in columns:
            if c not in s:
                cells.append("-")
            elif c.startswith("MCQ "):
                subj = c[4:]
                acc = r["mcq"]["overall"] if subj == "overall" else r["mcq"]["subjects"][subj]
                cells.append(f"{s[c]:.1f} ({_pct(acc['ci95'][0])}–{_pct(acc['ci95'][1])})")
            elif c == "mean reward":
                cells.append(f"{s[c]:+.3f}")
            else:
                cells.append(f"{s[c]:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def evaluate_models(models: dict[str, tuple[Optional[str], Optional[str]]], template_name: Optional[str],
                    items: Sequence[MCQ] = (), conversations: Sequence[dict] = (), config: Optional[EvalConfig] = None,
                    reward_scorer=None, device: Optional[str] = None,
                    torch_dtype: Optional[str] = None) -> dict[str, dict]:
    """label -> results for each (base model, LoRA adapter or None), loaded one at a time with the same template and
    scored on the same questions and conversations (the pipeline report's evaluation). `torch_dtype`: the load dtype
    (e.g. "bfloat16": on a CPU with native bf16 the scoring takes half the time, measured with the same accuracy)."""
    import gc

    from ..generation import ChatModel

    out = {}
    for label, (base, adapter) in models.items():
        chat = ChatModel(base, adapter, template_name=template_name, device=device, torch_dtype=torch_dtype)
        out[label] = evaluate(chat, items, conversations, config, reward_scorer=reward_scorer,
                              model_info={"name": label, "base_model": base, "lora_model": adapter})
        logger.info("%s evaluated in %.0f s: %s", label, out[label]["seconds"],
                    ", ".join(f"{k} {v:.1f}" for k, v in summary(out[label]).items()))
        del chat
        gc.collect()
    return out
