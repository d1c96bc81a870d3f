"""Stage 3 (RLHF without a reward model): Direct Preference Optimization on chosen/rejected pairs.

    python dpo_training.py --model_name_or_path merged-sft --train_file_dir data/reward --output_dir outputs-dpo \
        --do_train --do_eval --beta 0.1

Start from the SFT model: a merged folder as --model_name_or_path, or the SFT adapter as --peft_path (it is trained
further). With LoRA no second model is loaded: the reference is the starting point (TRL keeps a frozen copy of the
adapter, only LoRA-sized, or disables it). Logs rewards/accuracies and rewards/margins; the output adapter is used
by inference.py (--lora_model) like an SFT adapter.
"""
from __future__ import annotations

import logging

from trl import DPOConfig, DPOTrainer

from medgpt.cli import run_main
from medgpt.data.preference import prepare_preference_stage, train_preference_stage
from medgpt.modeling import apply_lora, load_model

logger = logging.getLogger("medgpt.dpo")


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer fed with medgpt's tokenization (prompt_ids/chosen_ids/rejected_ids, medgpt.data.preference).

    TRL's text path would add the tokenizer's special tokens to the rendered prompt (a second BOS after templates that
    write it, e.g. llama3), append the eos after replies that already end with the template's end-of-turn (chatml:
    "<|im_end|>\\n" + "<|im_end|>"), and has no prompt-length limit; so the prepared columns go in unchanged."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def main(argv=None):
    run = prepare_preference_stage(DPOConfig, argv)
    model = apply_lora(load_model(run.model_args), run.lora_args, run.training_args)
    ref_model = None
    if not run.lora_args.use_peft and not run.training_args.precompute_ref_log_probs:
        ref_model = load_model(run.model_args)  # full training: a frozen copy of the starting model
    trainer = PretokenizedDPOTrainer(
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
