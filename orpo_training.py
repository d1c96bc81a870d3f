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
from medgpt.data.preference import LengthColumnMixin, prepare_preference_stage, train_preference_stage
from medgpt.data.sft import IGNORE_INDEX
from medgpt.modeling import apply_lora, load_model

logger = logging.getLogger("medgpt.orpo")


class PretokenizedORPOTrainer(LengthColumnMixin, ORPOTrainer):
    """ORPOTrainer fed with medgpt's tokenization (prompt_ids/chosen_ids/rejected_ids, medgpt.data.preference);
    batches grouped by length by default (medgpt.data.preference.choose_sampling).

    TRL's tokenize_row prepends the tokenizer's BOS when the prompt does not start with it and appends its eos when
    the reply does not end with it: chatml replies end with "<|im_end|>\\n", so each would get a second
    "<|im_end|>"; and it has no prompt-length limit. Here the rows become the trainer's columns as they are."""

    def tokenize_row(self, feature, model=None) -> dict:
        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for name in ("chosen", "rejected"):
            reply = feature[f"{name}_ids"]
            row[f"{name}_input_ids"] = prompt + reply
            row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(reply))
            row[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt) + reply
        return row

    def concatenated_forward(self, model, batch):
        """TRL's NLL term is a mean over this process's chosen tokens and DDP then averages the processes, which
        equals one process's mean over the global batch only when every rank holds as many tokens. Rescale it to
        (this rank's token sum) / (token count summed over ranks) x world size, so the update is the same as one
        process with the global batch. The count is TRL's: every real chosen token after the first."""
        out = super().concatenated_forward(model, batch)
        world = self.accelerator.num_processes
        if world == 1:
            return out
        count = batch["chosen_attention_mask"][:, 1:].sum().to(out[4].device).float()
        total = self.accelerator.reduce(count.clone(), reduction="sum").clamp(min=1)
        return (*out[:4], out[4] * count * world / total, *out[5:])


def build_trainer(argv=None):
    """(run, trainer): the flags parsed, the pairs tokenized, the model and trainer built; nothing trained yet."""
    run = prepare_preference_stage(ORPOConfig, argv)
    if run.pref_args.orpo_beta is not None:
        run.training_args.beta = run.pref_args.orpo_beta
    model = load_model(run.model_args)
    if model.config.is_encoder_decoder:
        raise SystemExit("error: orpo_training.py trains decoder-only (causal) language models")
    trainer = PretokenizedORPOTrainer(
        model=apply_lora(model, run.lora_args, run.training_args),
        args=run.training_args,
        train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset,
        processing_class=run.tokenizer,
    )
    return run, trainer


def main(argv=None):
    run, trainer = build_trainer(argv)
    train_preference_stage(trainer, run, "orpo")


if __name__ == "__main__":
    run_main(main)
