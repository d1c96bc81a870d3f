"""The pipeline report: per-stage curves (PNG), final metrics, and the answers of several models to the
same questions side by side, as one Markdown file."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

# Log keys that are bookkeeping, not learning curves.
_SKIP = ("epoch", "step", "learning_rate", "grad_norm", "total_flos", "num_tokens", "mean_token_accuracy")
_SKIP_PARTS = ("runtime", "per_second", "flos", "logps", "logits", "num_input_tokens", "clip_ratio", "entropy")


def read_log_history(output_dir: str) -> list[dict]:
    """The trainer's log history (trainer_state.json), or a JSON-lines metrics log (PPO)."""
    state = os.path.join(output_dir, "trainer_state.json")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as f:
            return json.load(f).get("log_history", [])
    for name in ("metrics.jsonl", "ppo_log.jsonl", "log.jsonl"):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
    return []


def curves(history: list[dict]) -> dict[str, tuple[list, list]]:
    """key -> (steps, values) for every numeric key logged at least twice."""
    series: dict[str, tuple[list, list]] = {}
    for i, entry in enumerate(history):
        step = entry.get("step", i)
        for key, value in entry.items():
            if key in _SKIP or any(p in key for p in _SKIP_PARTS) or key.startswith("train_"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(step)
                ys.append(value)
    return {k: v for k, v in series.items() if len(v[0]) >= 2}


def plot_stage(name: str, history: list[dict], path: str, max_panels: int = 6) -> Optional[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(history)
    if not data:
        return None
    # losses first, then rewards/accuracies, then the rest
    def rank(k: str):
        if k in ("reward", "kl", "loss", "eval_loss"):
            return (0, k)
        if "std" in k or "max" in k or "min" in k:
            return (3, k)
        return (1 if "loss" in k or "reward" in k or "acc" in k or "margin" in k else 2, k)
    order = sorted(data, key=rank)
    keys = order[:max_panels]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs, ys = data[key]
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def final_metrics(output_dir: str) -> dict:
    for name in ("all_results.json", "eval_results.json", "train_results.json"):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    history = read_log_history(output_dir)
    return history[-1] if history else {}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def plot_evaluation(evaluation: dict[str, dict], path: str) -> Optional[str]:
    """Grouped bars, one per model: MCQ accuracy per subject (with its 95% CI), ROUGE-L and BLEU, mean reward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluation import summary

    models = list(evaluation)
    rows = {m: summary(r) for m, r in evaluation.items()}
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    panels = [("MCQ accuracy (%)", [k for k in keys if k.startswith("MCQ ")]),
              ("held-out answers vs reference", [k for k in keys if k in ("ROUGE-L", "BLEU")]),
              ("mean reward (reward model)", [k for k in keys if k == "mean reward"])]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(1.6 + 0.35 * len(models) * len(ks) for _, ks in panels), 3.6),
                             squeeze=False, gridspec_kw={"width_ratios": [max(len(ks), 1) for _, ks in panels]})
    width = 0.8 / len(models)
    for ax, (title, ks) in zip(axes[0], panels):
        for j, m in enumerate(models):
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(ks))]
            ys = [rows[m].get(k, 0.0) for k in ks]
            err = None
            if title.startswith("MCQ"):
                mcq = evaluation[m].get("mcq", {})
                cis = [(mcq.get("overall") if k == "MCQ overall" else mcq.get("subjects", {}).get(k[4:]) or {})
                       .get("ci95", [y / 100, y / 100]) for k, y in zip(ks, ys)]
                err = [[y - 100 * lo for y, (lo, _) in zip(ys, cis)], [100 * hi - y for y, (_, hi) in zip(ys, cis)]]
            ax.bar(xs, ys, width, label=m, yerr=err, capsize=2 if err else 0)
        ax.set_xticks(range(len(ks)))
        ax.set_xticklabels([k[4:] if k.startswith("MCQ ") else k for k in ks], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="black", linewidth=0.6)
        if title.startswith("MCQ"):
            ax.set_ylim(0, 100)
        elif not title.startswith("mean reward"):  # ROUGE-L and BLEU are 0-100 scores
            ax.set_ylim(0, max([1.0] + [1.15 * rows[m].get(k, 0.0) for m in models for k in ks]))
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(models), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # the legend below the panels, clear of the bars
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def evaluation_section(evaluation: dict[str, dict], report_dir: str, notes: Optional[list[str]] = None) -> list[str]:
    """The report's evaluation section: what was scored, a table (model x headline numbers) and the bar chart."""
    from .evaluation import comparison_table

    first = next(iter(evaluation.values()))
    lines = ["## Evaluation: medical multiple choice and held-out conversations", ""]
    if "mcq" in first:
        n = first["mcq"]["overall"]["n"]
        lines.append(f"Every model answers the same {n} multiple-choice questions, scored by the log-likelihood of each "
                     f"option after the chat template ({first['config']['num_few_shot']}-shot; accuracy in %, 95% "
                     "Wilson interval in brackets).")
    if "generation" in first:
        g = first["generation"]
        lines.append(f"Each answers {g['n']} held-out conversations (greedy, up to {g['max_new_tokens']} new tokens), "
                     "compared with the reference replies by ROUGE-L F1 and BLEU (Chinese characters as tokens)"
                     + ("; the trained reward model scores the answers." if "reward_mean" in g else "."))
    lines += notes or []
    lines += [""] + comparison_table(evaluation) + [""]
    png = plot_evaluation(evaluation, os.path.join(report_dir, "evaluation.png"))
    if png:
        lines += [f"![evaluation]({os.path.basename(png)})", ""]
    return lines


def write_report(path: str, stages: list[dict], questions: list[str], answers: dict[str, list[str]],
                 rewards: Optional[dict[str, float]] = None, timings: Optional[dict[str, float]] = None,
                 title: str = "MedGPT pipeline report", evaluation: Optional[dict[str, dict]] = None,
                 evaluation_notes: Optional[list[str]] = None, references: Optional[list[str]] = None) -> str:
    """stages: [{"name", "output_dir", "metrics": [keys to show] (optional)}]; answers: model -> answers;
    references: the reference reply to each question (a column before the answers), if there is one;
    evaluation: model -> medgpt.evaluation results (its section: a table and a bar chart)."""
    report_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(report_dir, exist_ok=True)
    lines = [f"# {title}", ""]
    lines += ["## Stages", "", "| stage | output | time | key metrics |", "|---|---|---|---|"]
    for st in stages:
        m = final_metrics(st["output_dir"])
        keys = st.get("metrics") or [k for k in m if (k.startswith("eval_") or k in ("perplexity", "train_loss"))
                                     and not any(p in k for p in _SKIP_PARTS + ("num_tokens",))]
        shown = ", ".join(f"{k} = {_fmt(m[k])}" for k in keys if k in m)
        series = curves(read_log_history(st["output_dir"]))
        if "reward" in series:  # RL stages: the reward of the first and the last rollouts
            ys = series["reward"][1]
            shown = ", ".join(filter(None, [shown, f"mean reward {ys[0]:.3f} (first step) → {ys[-1]:.3f} (last step)"]))
        shown = shown or "-"
        t = f"{timings[st['name']]:.0f} s" if timings and st["name"] in timings else "-"
        lines.append(f"| {st['name']} | `{os.path.relpath(st['output_dir'], report_dir)}` | {t} | {shown} |")
    lines.append("")
    if rewards:
        lines += ["## Mean reward of each model's answers (scored by the trained reward model)", "",
                  "| model | mean reward |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in rewards.items()]
        lines.append("")
    if evaluation:
        lines += evaluation_section(evaluation, report_dir, evaluation_notes)
    lines += ["## Training curves", ""]
    for st in stages:
        png = plot_stage(st["name"], read_log_history(st["output_dir"]),
                         os.path.join(report_dir, f"{st['name'].lower().replace(' ', '_')}.png"))
        if png:
            lines += [f"### {st['name']}", "", f"![{st['name']}]({os.path.basename(png)})", ""]
    if answers:
        models = list(answers)
        columns = ["question"] + (["reference"] if references else []) + models
        lines += ["## Answers side by side", ""]
        if references:
            lines += ["The held-out conversations of the evaluation: the last user turn, the reference reply and each "
                      "model's answer.", ""]
        lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        for i, q in enumerate(questions):
            cells = [q] + ([references[i]] if references else []) + [answers[m][i] for m in models]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
