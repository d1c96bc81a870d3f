"""The plain SFT baseline of bench_sft.py: what MedicalGPT's supervised_finetuning.py does.

transformers' Trainer, every batch padded to its longest sample (DataCollatorForSeq2Seq,
pad_to_multiple_of=4 as in MedicalGPT), the model's own loss on full-vocabulary logits at every
position, `enable_input_require_grads()` as MedicalGPT calls it. Data, tokenization, model loading and LoRA are medgpt's, so the only differences from
supervised_finetuning.py are the batch layout and the loss. The Trainer subclass only counts tokens.

    python benchmarks/baseline_sft.py <the flags of supervised_finetuning.py>
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments  # noqa: E402

from medgpt.args import DataArguments, LoraArguments, ModelArguments, SFTArguments, parse_args  # noqa: E402
from medgpt.cli import run_main  # noqa: E402
from medgpt.data.sft import IGNORE_INDEX, build_sft_datasets  # noqa: E402
from medgpt.modeling import apply_lora, load_model, load_tokenizer  # noqa: E402
from medgpt.templates import get_conv_template  # noqa: E402
from medgpt.trainers.lm import TokenCountingTrainer  # noqa: E402
from medgpt.training import prepare_run, train_and_save  # noqa: E402


def main(argv=None):
    model_args, data_args, lora_args, sft_args, training_args, compat = parse_args(
        ModelArguments, DataArguments, LoraArguments, SFTArguments, Seq2SeqTrainingArguments, argv=argv)
    resume = prepare_run(training_args, compat)
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset = build_sft_datasets(
        data_args, tokenizer, get_conv_template(sft_args.template_name), sft_args.model_max_length,
        sft_args.train_on_inputs, training_args)
    model = apply_lora(load_model(model_args), lora_args, training_args)
    # MedicalGPT's supervised_finetuning.py calls this whatever --gradient_checkpointing says, so its backward also
    # runs through the first layer's frozen projections down to the embeddings
    model.enable_input_require_grads()
    trainer = TokenCountingTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=4))
    train_and_save(trainer, training_args, resume, tokenizer)


if __name__ == "__main__":
    run_main(main)
