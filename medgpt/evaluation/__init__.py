"""Evaluation of a trained model (evaluate_model.py, the pipeline report): multiple-choice medical benchmarks
scored by log-likelihood or generated letter, and answers to held-out conversations scored by ROUGE-L, BLEU and
the reward model."""
from .generation_eval import evaluate_generation, load_conversations, text_metrics
from .mcq import MCQ, load_mcq, split_few_shot
from .runner import EvalConfig, comparison_table, evaluate, evaluate_models, summary, to_markdown, write_results
from .scoring import FewShot, accuracy_by_subject, continuation_logprobs, wilson_interval

__all__ = ["MCQ", "EvalConfig", "FewShot", "accuracy_by_subject", "comparison_table", "continuation_logprobs",
           "evaluate", "evaluate_generation", "evaluate_models", "load_conversations", "load_mcq", "split_few_shot", "summary",
           "text_metrics", "to_markdown", "wilson_interval", "write_results"]
