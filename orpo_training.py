"""Stage 3, one step instead of SFT + DPO: ORPO (odds-ratio preference optimization, no reference model).
The loss is the SFT loss on the chosen reply plus --orpo_beta times the odds-ratio term chosen vs rejected.

    python orpo_training.py --train_file_dir data/reward --output_dir outputs-orpo --do_train --do_eval --orpo_beta 0.1

Logs rewards/accuracies and rewards/margins (log-probability based), nll_loss and log_odds_ratio; the output
adapter is used by inference.py (--lora_model).
"""
from __future__ import annotations

import logging

from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from medgpt.args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args
from medgpt.cli import run_main
from medgpt.data.preference import build_preference_datasets
from medgpt.data.sft import IGNORE_INDEX
from medgpt.modeling import apply_lora, load_model, load_tokenizer, trainable_to_float32_on_cpu
from medgpt.templates import get_conv_template
from medgpt.training import prepare_run, train_and_save

logger = logging.getLogger("medgpt.orpo")


class PretokenizedORPOTrainer(ORPOTrainer):
    """ORPOTrainer fed with medgpt's tokenization (prompt_ids/chosen_ids/rejected_ids, medgpt.data.preference).

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


def main(argv=None):
    model_args, data_args, lora_args, pref_args, training_args, compat = parse_args(
        ModelArguments, DataArguments, LoraArguments, PreferenceArguments, ORPOConfig, argv=argv)
    if pref_args.orpo_beta is not None:
        training_args.beta = pref_args.orpo_beta
    resume = prepare_run(training_args, compat)
    template = get_conv_template(pref_args.template_name)
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset = build_preference_datasets(data_args, pref_args, tokenizer, template, training_args)

    model = load_model(model_args)
    if model.config.is_encoder_decoder:
        raise SystemExit("error: orpo_training.py trains decoder-only (causal) language models")
    model = apply_lora(model, lora_args, training_args)
    trainer = PretokenizedORPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    trainable_to_float32_on_cpu(trainer.model)  # QLoRA on a CPU
    train_and_save(trainer, training_args, resume, tokenizer, perplexity=False,
                   run_info={"template_name": pref_args.template_name, "stage": "orpo"})


if __name__ == "__main__":
    run_main(main)
