"""Stage 3: reward modeling. A scalar head on the causal LM learns to score the chosen reply above the rejected one
(pairwise loss -log sigmoid(r_chosen - r_rejected)); eval reports accuracy (chosen scored higher) and mean margin.

    python reward_modeling.py --train_file_dir data/reward --output_dir outputs-rm --do_train --do_eval

The output (a LoRA adapter with the `score` head, or a full model) scores replies with medgpt.reward.RewardScorer.
"""
from __future__ import annotations

import logging

from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from medgpt.args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args
from medgpt.cli import run_main
from medgpt.data.preference import build_preference_datasets
from medgpt.modeling import apply_lora, load_model, load_tokenizer, trainable_to_float32_on_cpu
from medgpt.templates import get_conv_template
from medgpt.training import prepare_run, train_and_save

logger = logging.getLogger("medgpt.rm")


def join_prompt(dataset):
    """RewardTrainer scores whole sequences: prompt + reply ids, already tokenized (TRL passes them through as is)."""
    if dataset is None:
        return None
    return dataset.map(lambda ex: {"chosen_ids": ex["prompt_ids"] + ex["chosen_ids"],
                                   "rejected_ids": ex["prompt_ids"] + ex["rejected_ids"]},
                       remove_columns=["prompt_ids"], desc="Joining prompts and replies")


def main(argv=None):
    model_args, data_args, lora_args, pref_args, training_args, compat = parse_args(
        ModelArguments, DataArguments, LoraArguments, PreferenceArguments, RewardConfig, argv=argv)
    resume = prepare_run(training_args, compat)
    template = get_conv_template(pref_args.template_name)
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset = build_preference_datasets(data_args, pref_args, tokenizer, template, training_args)

    model = load_model(model_args, AutoModelForSequenceClassification,
                       config_overrides={"num_labels": 1, "pad_token_id": tokenizer.pad_token_id})
    # LoRA with task SEQ_CLS: peft trains the new `score` head in full and saves it with the adapter.
    model = apply_lora(model, lora_args, training_args, task_type="SEQ_CLS")
    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=join_prompt(train_dataset),
        eval_dataset=join_prompt(eval_dataset),
        processing_class=tokenizer,
    )
    trainable_to_float32_on_cpu(trainer.model)  # QLoRA on a CPU
    train_and_save(trainer, training_args, resume, tokenizer, perplexity=False, run_info={
        "template_name": pref_args.template_name, "stage": "reward", "max_length": training_args.max_length})


if __name__ == "__main__":
    run_main(main)
