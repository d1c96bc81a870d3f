"""Stage 2: supervised fine-tuning on multi-turn chat data (loss on assistant turns only).

    python supervised_finetuning.py --train_file_dir data/finetune --output_dir outputs-sft --do_train
"""
from __future__ import annotations

import logging

from transformers import Seq2SeqTrainingArguments

from medgpt.args import DataArguments, LoraArguments, ModelArguments, SFTArguments, parse_args
from medgpt.cli import run_main
from medgpt.data.collator import build_collator
from medgpt.data.sft import build_sft_datasets
from medgpt.modeling import apply_lora, load_model, load_tokenizer
from medgpt.shift_attn import enable_shift_attn
from medgpt.templates import get_conv_template
from medgpt.trainers.lm import LeanTrainer, default_max_packed_tokens
from medgpt.training import prepare_run, train_and_save

logger = logging.getLogger("medgpt.sft")


def main(argv=None):
    model_args, data_args, lora_args, sft_args, training_args, compat = parse_args(
        ModelArguments, DataArguments, LoraArguments, SFTArguments, Seq2SeqTrainingArguments, argv=argv)
    resume = prepare_run(training_args, compat)
    template = get_conv_template(sft_args.template_name)
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset = build_sft_datasets(
        data_args, tokenizer, template, sft_args.model_max_length, sft_args.train_on_inputs, training_args)

    model = load_model(model_args, max_length=sft_args.model_max_length, shift_attn_stage=True)
    model = apply_lora(model, lora_args, training_args)
    if model_args.neft_alpha:
        training_args.neftune_noise_alpha = model_args.neft_alpha
    # packed padding-free rows (exact) unless --packing False; the loss never builds full-vocabulary logits
    collator, packed = build_collator(tokenizer, model, sft_args.packing)
    if model_args.shift_attn:  # LongLoRA S²-Attn in training, within each packed sample
        enable_shift_attn(model, sft_args.model_max_length)
    max_tokens = sft_args.max_packed_tokens if sft_args.max_packed_tokens is not None else \
        default_max_packed_tokens(sft_args.model_max_length, model, training_args)
    trainer = LeanTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        max_packed_tokens=max_tokens if packed else None,
        router_aux_loss_coef=model_args.router_aux_loss_coef,
    )
    train_and_save(trainer, training_args, resume, tokenizer, run_info={"template_name": sft_args.template_name})


if __name__ == "__main__":
    run_main(main)
