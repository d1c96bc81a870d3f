"""Stage 3, one step instead of SFT + DPO: ORPO (odds-ratio preference optimization, no reference model).
The loss is the SFT loss on the chosen reply plus --orpo_beta times the odds-ratio term chosen vs rejected.

    python orpo_training.py --train_file_dir data/reward --output_dir outputs-orpo --do_train --do_eval --orpo_beta 0.1

Logs rewards/accuracies and rewards/margins (log-probability based), nll_loss and log_odds_ratio; the output
adapter is used by inference.py (--lora_model).
"""
from __future__ import annotations

import logging

from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from medgpt.cli import run_main
from medgpt.trainers.preference import (LengthColumnMixin, PretokenizedPairsMixin, prepare_preference_stage,
                                        reference_free_trainer, train_preference_stage)

logger = logging.getLogger("medgpt.orpo")


class PretokenizedORPOTrainer(LengthColumnMixin, PretokenizedPairsMixin, ORPOTrainer):
    """ORPOTrainer fed with medgpt's tokenization (prompt_ids/chosen_ids/rejected_ids, medgpt.data.preference; TRL's
    own would double the end-of-turn, see PretokenizedPairsMixin); batches grouped by length by default
    (medgpt.trainers.preference.choose_sampling)."""

    def nll_token_count(self, batch):
        # ORPO's NLL covers prompt and reply: every real chosen token after the first
        return batch["chosen_attention_mask"][:, 1:].sum()


def build_trainer(argv=None):
    """(run, trainer): the flags parsed, the pairs tokenized, the model and trainer built; nothing trained yet."""
    run = prepare_preference_stage(ORPOConfig, argv)
    if run.pref_args.orpo_beta is not None:
        run.training_args.beta = run.pref_args.orpo_beta
    trainer = reference_free_trainer(PretokenizedORPOTrainer, run, "orpo_training.py")
    return run, trainer


def main(argv=None):
    run, trainer = build_trainer(argv)
    train_preference_stage(trainer, run, "orpo")


if __name__ == "__main__":
    run_main(main)
