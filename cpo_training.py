"""Stage 3 without a reference model: CPO (contrastive preference optimization) and SimPO (simple preference
optimization), through TRL's experimental CPOTrainer, on the same chosen/rejected pairs as dpo_training.py.

    python cpo_training.py --train_file_dir data/reward --output_dir outputs-simpo --do_train --do_eval \
        --loss_type simpo --cpo_alpha 0                     # SimPO
    python cpo_training.py --train_file_dir data/reward --output_dir outputs-cpo --do_train --do_eval   # CPO

--loss_type: sigmoid (CPO, the default), hinge, ipo, simpo (a target margin --simpo_gamma; log-probs averaged per
token) or alphapo (simpo with --cpo_alpha 0 and the reward shape --alpha); --cpo_alpha weighs the NLL of the chosen
reply (CPO's behaviour-cloning term; 0 for plain SimPO); --beta, --label_smoothing as in CPOConfig. Only the policy
is loaded: no reference model, no reference forward. Logs rewards/* (beta times the policy's log-probability of each
reply: summed, or averaged per token for simpo and ipo), logps/*, nll_loss; the output adapter is used by
inference.py (--lora_model) like an SFT adapter.
"""
from __future__ import annotations

import logging

from trl.experimental.cpo import CPOConfig, CPOTrainer

from medgpt.cli import run_main
from medgpt.data.sft import IGNORE_INDEX
from medgpt.trainers.preference import (LengthColumnMixin, PretokenizedPairsMixin, prepare_preference_stage,
                                        reference_free_trainer, train_preference_stage)

logger = logging.getLogger("medgpt.cpo")


class PretokenizedCPOTrainer(LengthColumnMixin, PretokenizedPairsMixin, CPOTrainer):
    """CPOTrainer fed with medgpt's tokenization (prompt_ids/chosen_ids/rejected_ids, medgpt.data.preference; TRL's
    own would double the end-of-turn, see PretokenizedPairsMixin); batches grouped by length by default
    (medgpt.trainers.preference.choose_sampling)."""

    def nll_token_count(self, batch):
        # CPO's NLL covers the chosen reply only: its labels after the first position that are not masked
        return batch["chosen_labels"][:, 1:].ne(IGNORE_INDEX).sum()


def build_trainer(argv=None):
    """(run, trainer): the flags parsed, the pairs tokenized, the model and trainer built; nothing trained yet."""
    run = prepare_preference_stage(CPOConfig, argv)
    args = run.training_args
    logger.info("CPO: loss_type %s, beta %s, cpo_alpha %s%s%s (no reference model)", args.loss_type, args.beta,
                args.cpo_alpha, f", simpo_gamma {args.simpo_gamma}" if args.loss_type == "simpo" else "",
                f", alpha {args.alpha}" if args.alpha else "")
    trainer = reference_free_trainer(PretokenizedCPOTrainer, run, "cpo_training.py")
    return run, trainer


def main(argv=None):
    run, trainer = build_trainer(argv)
    train_preference_stage(trainer, run, "cpo")


if __name__ == "__main__":
    run_main(main)
