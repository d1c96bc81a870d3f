"""Merge a LoRA adapter into its base model and save a standalone HF folder (safetensors + tokenizer).

    python merge_peft_adapter.py --lora_model outputs-sft --output_dir merged-sft
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

logger = logging.getLogger("medgpt.merge")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", "--base_model_name_or_path", dest="base_model", default=None,
                   help="Base model (default: the adapter's own base_model_name_or_path, else the embedded SmolLM2)")
    p.add_argument("--lora_model", "--peft_model_path", dest="lora_model", required=True, help="LoRA adapter folder")
    p.add_argument("--tokenizer_path", default=None, help="Tokenizer (default: the adapter's, else the base model's)")
    p.add_argument("--output_dir", default="./merged", help="Where the merged model is written")
    p.add_argument("--resize_emb", action="store_true", help="Resize the base embeddings to the tokenizer's size first")
    p.add_argument("--model_type", default=None, help="Accepted for MedicalGPT compatibility (read from the config)")
    p.add_argument("--torch_dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="dtype of the saved weights (auto: the base model's)")
    p.add_argument("--trust_remote_code", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from medgpt.logs import setup_logging
    setup_logging()  # one format on stderr (medgpt/logs.py)
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from medgpt.data.io import DataError
    from medgpt.default_model import resolve_model_path
    from medgpt.generation import RUN_INFO_FILE, _has_tokenizer
    from medgpt.modeling import resize_embeddings

    if not os.path.isfile(os.path.join(args.lora_model, "adapter_config.json")):
        raise DataError(f"{args.lora_model}: not a LoRA adapter folder (no adapter_config.json)")
    peft_config = PeftConfig.from_pretrained(args.lora_model)
    base = args.base_model or peft_config.base_model_name_or_path
    base_path = resolve_model_path(base)
    if not (base and os.path.exists(base_path)) and base is not None and os.path.sep in str(base):
        raise DataError(f"{base}: base model folder not found; pass --base_model")
    tok_path = args.tokenizer_path or (args.lora_model if _has_tokenizer(args.lora_model) else base_path)
    tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=args.trust_remote_code)
    dtype = "auto" if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
    model_class = AutoModelForSequenceClassification if peft_config.task_type == "SEQ_CLS" else AutoModelForCausalLM
    extra = {"num_labels": 1} if model_class is AutoModelForSequenceClassification else {}
    logger.info("Base model %s, adapter %s", base_path, args.lora_model)
    model = model_class.from_pretrained(base_path, dtype=dtype, trust_remote_code=args.trust_remote_code, **extra)
    # an expanded vocabulary: new rows from their base sub-tokens' mean (medgpt_vocab.json beside the tokenizer);
    # an adapter trained with --modules_to_save embed_tokens,lm_head then brings its own rows
    if not resize_embeddings(model, tokenizer) and args.resize_emb:
        model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, args.lora_model).merge_and_unload()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.output_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.output_dir)
    info = os.path.join(args.lora_model, RUN_INFO_FILE)
    if os.path.isfile(info):
        shutil.copy(info, os.path.join(args.output_dir, RUN_INFO_FILE))
    logger.info("Merged model written to %s", args.output_dir)


if __name__ == "__main__":
    from medgpt.cli import run_main
    sys.exit(run_main(main))
