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

from medgpt.args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args
from medgpt.cli import run_main
from medgpt.data.preference import build_preference_datasets
from medgpt.modeling import apply_lora, load_model, load_tokenizer, trainable_to_float32_on_cpu
from medgpt.templates import get_conv_template
from medgpt.training import prepare_run, train_and_save

logger = logging.getLogger("medgpt.dpo")


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer fed with medgpt's tokenization (prompt_ids/chosen_ids/rejected_ids, medgpt.data.preference).

    TRL's text path would add the tokenizer's special tokens to the rendered prompt (a second BOS after templates that
    write it, e.g. llama3), append the eos after replies that already end with the template's end-of-turn (chatml:
    "<|im_end|>\\n" + "<|im_end|>"), and has no prompt-length limit; so the prepared columns go in unchanged."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def main(argv=None):
    model_args, data_args, lora_args, pref_args, training_args, compat = parse_args(
        ModelArguments, DataArguments, LoraArguments, PreferenceArguments, DPOConfig, argv=argv)
    resume = prepare_run(training_args, compat)
    template = get_conv_template(pref_args.template_name)
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset = build_preference_datasets(data_args, pref_args, tokenizer, template, training_args)

    model = load_model(model_args)
    model = apply_lora(model, lora_args, training_args)
    ref_model = None
    if not lora_args.use_peft and not training_args.precompute_ref_log_probs:
        ref_model = load_model(model_args)  # full training: a frozen copy of the starting model
    trainer = PretokenizedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    trainable_to_float32_on_cpu(trainer.model)  # QLoRA on a CPU
    train_and_save(trainer, training_args, resume, tokenizer, perplexity=False,
                   run_info={"template_name": pref_args.template_name, "stage": "dpo"})


if __name__ == "__main__":
    run_main(main)
