"""Stage 3: reward modeling. A scalar head on the causal LM learns to score the chosen reply above the rejected one
(pairwise loss -log sigmoid(r_chosen - r_rejected)); eval reports accuracy (chosen scored higher) and mean margin.

    python reward_modeling.py --train_file_dir data/reward --output_dir outputs-rm --do_train --do_eval

The output (a LoRA adapter with the `score` head, or a full model) scores replies with medgpt.reward.RewardScorer.
"""
from __future__ import annotations

import logging

from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from medgpt.cli import run_main
from medgpt.kernels import use_cpu_fast_paths
from medgpt.modeling import apply_lora, load_model
from medgpt.trainers.preference import LengthColumnMixin, prepare_preference_stage, train_preference_stage

logger = logging.getLogger("medgpt.rm")


def join_prompt(dataset):
    """RewardTrainer scores whole sequences: prompt + reply ids, already tokenized (TRL passes them through as is)."""
    if dataset is None:
        return None
    return dataset.map(lambda ex: {"chosen_ids": ex["prompt_ids"] + ex["chosen_ids"],
                                   "rejected_ids": ex["prompt_ids"] + ex["rejected_ids"]},
                       remove_columns=["prompt_ids"], desc="Joining prompts and replies")


class MedRewardTrainer(LengthColumnMixin, RewardTrainer):
    """TRL's RewardTrainer; batches grouped by length by default (medgpt.trainers.preference.choose_sampling), and our
    CPU fast paths on the model (medgpt.kernels.use_cpu_fast_paths)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        use_cpu_fast_paths(self, self.model)


def build_trainer(argv=None):
    """(run, trainer): the flags parsed, the pairs tokenized, the model and trainer built; nothing trained yet."""
    run = prepare_preference_stage(RewardConfig, argv)
    model = load_model(run.model_args, AutoModelForSequenceClassification,
                       config_overrides={"num_labels": 1, "pad_token_id": run.tokenizer.pad_token_id})
    # LoRA with task SEQ_CLS: peft trains the new `score` head in full and saves it with the adapter.
    model = apply_lora(model, run.lora_args, run.training_args, task_type="SEQ_CLS")
    trainer = MedRewardTrainer(
        model=model,
        args=run.training_args,
        train_dataset=join_prompt(run.train_dataset),
        eval_dataset=join_prompt(run.eval_dataset),
        processing_class=run.tokenizer,
    )
    return run, trainer


def main(argv=None):
    run, trainer = build_trainer(argv)
    # the scorer truncates as training did
    train_preference_stage(trainer, run, "reward", max_length=run.training_args.max_length)


if __name__ == "__main__":
    run_main(main)
