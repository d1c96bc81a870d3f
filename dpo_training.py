"""Stage 3 (RLHF without a reward model): Direct Preference Optimization on chosen/rejected pairs.

    python dpo_training.py --model_name_or_path merged-sft --train_file_dir data/reward --output_dir outputs-dpo \
        --do_train --do_eval --beta 0.1

Start from the SFT model: a merged folder as --model_name_or_path, or the SFT adapter as --peft_path (it is trained
further). With LoRA no second model is loaded: the reference is the starting point (TRL keeps a frozen copy of the
adapter, only LoRA-sized, or disables it). Logs rewards/accuracies and rewards/margins; the output adapter is used
by inference.py (--lora_model) like an SFT adapter. Batches are packed (each pair once as prompt + chosen +
rejected, no padding; medgpt/trainers/dpo.py), for every --loss_type of TRL's DPOTrainer (sigmoid, ipo, hinge,
robust, ...; several with --loss_weights); --packing False gives TRL's padded batches, grouped by length unless
--train_sampling_strategy says otherwise. Reference-free SimPO/CPO: cpo_training.py.
"""
from __future__ import annotations

import logging

from trl import DPOConfig

from medgpt.cli import run_main
from medgpt.modeling import apply_lora, load_model
from medgpt.trainers.dpo import CPO_LOSS_TYPES, LOSS_TYPES, MedDPOTrainer
from medgpt.trainers.preference import prepare_preference_stage, train_preference_stage

logger = logging.getLogger("medgpt.dpo")


def check_loss_types(training_args) -> None:
    """--loss_type: TRL's DPO losses; the reference-free ones (SimPO, CPO, AlphaPO) are cpo_training.py's."""
    for loss_type in training_args.loss_type:
        if loss_type in CPO_LOSS_TYPES:
            cpo_type = "sigmoid" if loss_type == "cpo" else loss_type
            raise SystemExit(f"error: --loss_type {loss_type} is a reference-free loss (CPO/SimPO): train it with "
                             f"cpo_training.py --loss_type {cpo_type} (same data and flags)")
        if loss_type not in LOSS_TYPES:
            raise SystemExit(f"error: --loss_type {loss_type} is not one of TRL's DPO losses: {', '.join(LOSS_TYPES)}")


def main(argv=None):
    run = prepare_preference_stage(DPOConfig, argv, check=check_loss_types)
    model = apply_lora(load_model(run.model_args), run.lora_args, run.training_args)
    ref_model = None
    if not run.lora_args.use_peft and not run.training_args.precompute_ref_log_probs:
        ref_model = load_model(run.model_args)  # full training: a frozen copy of the starting model
    packing = run.pref_args.packing or run.training_args.padding_free
    run.training_args.padding_free = False  # TRL 1.16 disables its own padding-free mode; ours is MedDPOTrainer's
    max_tokens = run.pref_args.max_packed_tokens
    trainer = MedDPOTrainer(
        packing=packing,
        max_packed_tokens=max_tokens if max_tokens is not None else run.training_args.max_length,
        model=model,
        ref_model=ref_model,
        args=run.training_args,
        train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset,
        processing_class=run.tokenizer,
    )
    train_preference_stage(trainer, run, "dpo")


if __name__ == "__main__":
    run_main(main)
