"""run_pipeline.py end to end on a tiny model, each stage shortened: every stage runs on the previous
stage's output, and the report has every stage's plot and the side-by-side answers."""
from __future__ import annotations

import json

from conftest import run_script


def test_pipeline_runs_every_stage_and_writes_the_report(learnable_model_dir, tmp_path):
    root = tmp_path / "pipe"
    short = ["--max_steps", "2", "--eval_steps", "1", "--logging_steps", "1", "--report_to", "none"]
    stage_args = [f"{s}={' '.join(short)}" for s in ("pt", "sft", "rm", "dpo", "orpo")]
    stage_args.append("ppo=--max_steps 2 --batch_size 2 --mini_batch_size 2 --response_length 8 --report_to none")
    proc = run_script("run_pipeline.py", "--model_name_or_path", learnable_model_dir, "--output_root", str(root),
                      "--max_new_tokens", "4", *[a for s in stage_args for a in ("--stage_args", s)], timeout=1500)
    for stage in ("pt", "pt-merged", "sft", "sft-merged", "rm", "ppo", "dpo", "orpo"):
        assert (root / stage).is_dir(), stage
    report = (root / "report" / "report.md").read_text(encoding="utf-8")
    for name in ("PT", "SFT", "RM", "PPO", "DPO", "ORPO"):
        assert f"![{name}]({name.lower()}.png)" in report, name
        assert (root / "report" / f"{name.lower()}.png").stat().st_size > 1000
    # the answers side by side are those of the evaluation's held-out conversations, with the reference reply
    assert "| question | reference | Base | PT | SFT | DPO | ORPO | PPO |" in report
    # the evaluation section: every model on the same questions and conversations, a table row each and a bar chart
    assert "## Evaluation: medical multiple choice and held-out conversations" in report
    assert "| model | MCQ medical_mcq_en | MCQ medical_mcq_zh | MCQ overall | ROUGE-L | BLEU | mean reward |" in report
    for name in ("Base", "PT", "SFT", "DPO", "ORPO", "PPO"):
        assert f"\n| {name} | " in report, name
    assert "![evaluation](evaluation.png)" in report and (root / "report" / "evaluation.png").stat().st_size > 1000
    evaluation = json.loads((root / "report" / "evaluation.json").read_text(encoding="utf-8"))
    assert list(evaluation) == ["Base", "PT", "SFT", "DPO", "ORPO", "PPO"]
    assert all(r["mcq"]["overall"]["n"] == 40 and r["generation"]["n"] == 8 for r in evaluation.values())
    summary = json.loads((root / "report" / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["evaluation"]) == set(evaluation)
    assert set(summary["mean_reward"]) == set(evaluation)
    assert all(len(a) == 8 for a in summary["answers"].values())
    assert summary["answers"]["PPO"] == [s["prediction"] for s in evaluation["PPO"]["generation"]["samples"]]
    assert "Assistant (PPO model):" in proc.stdout
    # a second run finds every stage done and only rebuilds the report; without the evaluation, the trained models
    # answer the pipeline's own questions, scored by the reward model
    proc = run_script("run_pipeline.py", "--model_name_or_path", learnable_model_dir, "--output_root", str(root),
                      "--max_new_tokens", "4", "--skip_eval", timeout=900)
    assert proc.stdout.count("already done") == 8
    report = (root / "report" / "report.md").read_text(encoding="utf-8")
    assert "| question | SFT | DPO | PPO | ORPO |" in report and "## Evaluation" not in report
    summary = json.loads((root / "report" / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["mean_reward"]) == {"SFT", "DPO", "PPO", "ORPO"}
    assert all(len(a) == 5 for a in summary["answers"].values())
