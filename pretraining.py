"""Stage 1: continued pretraining on raw domain text (.txt a document per line, or .json/.jsonl `text`).

    python pretraining.py --train_file_dir data/pretrain --output_dir outputs-pt --do_train --do_eval --block_size 256

Documents are joined with an eos after each and cut into blocks of exactly --block_size tokens, as in MedicalGPT;
within a block each document attends only to itself (position ids restart after each eos; exact with sdpa or
flash attention), and the loss covers every token but each document piece's first. Reports eval loss and
perplexity. LoRA by default; --use_peft False trains in full.
"""
from __future__ import annotations

import logging

from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments

from medgpt.args import DataArguments, LoraArguments, ModelArguments, PretrainArguments, parse_args
from medgpt.cli import run_main
from medgpt.data.collator import DocumentFlatteningCollator, enable_packing
from medgpt.data.pretrain import build_pretrain_datasets, resolve_block_size
from medgpt.data.sft import IGNORE_INDEX
from medgpt.modeling import apply_lora, load_model, load_tokenizer, resize_embeddings
from medgpt.shift_attn import enable_shift_attn
from medgpt.trainers.lm import LeanTrainer, default_max_packed_tokens
from medgpt.training import prepare_run, train_and_save
from medgpt.vocab import copy_vocab_info

logger = logging.getLogger("medgpt.pt")


def main(argv=None):
    model_args, data_args, lora_args, pt_args, training_args, compat = parse_args(
        ModelArguments, DataArguments, LoraArguments, PretrainArguments, Seq2SeqTrainingArguments, argv=argv)
    resume = prepare_run(training_args, compat)
    tokenizer = load_tokenizer(model_args)
    pt_args.block_size = block_size = resolve_block_size(pt_args.block_size, tokenizer)  # once (it may warn)
    train_dataset, eval_dataset = build_pretrain_datasets(
        data_args, pt_args, tokenizer, training_args, cache_dir=model_args.cache_dir)

    model = load_model(model_args, max_length=block_size, shift_attn_stage=True)
    # an expanded vocabulary (--tokenizer_name_or_path, tools/merge_tokenizers.py): new rows from their sub-tokens'
    # mean; train them with --modules_to_save embed_tokens,lm_head
    resize_embeddings(model, tokenizer)
    model = apply_lora(model, lora_args, training_args)
    if model_args.neft_alpha:
        training_args.neftune_noise_alpha = model_args.neft_alpha
    # packed blocks: each document attends only to itself (position ids restart after every eos) where the
    # attention allows it exactly; else blocks as MedicalGPT trains them. --packing False pads whole documents.
    isolated = pt_args.packing and tokenizer.eos_token_id is not None and enable_packing(model) is not None
    if isolated:
        collator = DocumentFlatteningCollator(tokenizer.eos_token_id)
        logger.info("Packed blocks: each document attends only to itself")
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
        if pt_args.packing:
            logger.warning("Documents in a block attend to the ones before them (this model's attention cannot keep "
                           "them apart)")
    if model_args.shift_attn:  # LongLoRA S²-Attn in training, groups counted from each document piece's start
        enable_shift_attn(model, block_size, "--block_size")
    trainer = LeanTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        # a batch's blocks run as rows of whole pieces of at most two blocks (3.5 in bf16 on a CPU), as SFT's rows
        max_packed_tokens=default_max_packed_tokens(block_size, model, training_args) if isolated else None,
        router_aux_loss_coef=model_args.router_aux_loss_coef,
    )
    train_and_save(trainer, training_args, resume, tokenizer)
    if training_args.should_save:  # the sub-token record travels with the adapter's tokenizer (merge_peft_adapter.py)
        copy_vocab_info(tokenizer.name_or_path, training_args.output_dir)


if __name__ == "__main__":
    run_main(main)
