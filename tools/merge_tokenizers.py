"""Merge a domain SentencePiece model's pieces (and a word list) into a base tokenizer (MedicalGPT's
merge_tokenizers.py), keeping every original token's id and string; saves an HF tokenizer folder.

    python tools/merge_tokenizers.py --base_tokenizer_dir HuggingFaceTB/SmolLM2-135M-Instruct \
        --domain_sp_model_file outputs-vocab/domain_sp.model --add_words_file data/vocab/medical_terms.txt \
        --output_dir outputs-vocab/merged_tokenizer
    python pretraining.py --tokenizer_name_or_path outputs-vocab/merged_tokenizer \
        --modules_to_save embed_tokens,lm_head ...

Byte-level BPE bases (SmolLM2, Qwen, GPT-2) and SentencePiece/Llama-style bases (tokenizer.json with ▁; an existing
tokenizer.model is extended too) are supported. The output folder also holds medgpt_vocab.json: each new token's
base sub-token ids, from which pretraining.py initialises its embedding rows.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_tokenizer_dir", "--llama_tokenizer_dir", dest="base_tokenizer_dir", default=None,
                   help="Base tokenizer folder or hub name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--domain_sp_model_file", "--chinese_sp_model_file", dest="domain_sp_model_file", default=None,
                   help="SentencePiece model from tools/build_domain_tokenizer.py")
    p.add_argument("--add_words_file", "--jieba_word_freq_file", dest="add_words_file", nargs="+", default=[],
                   help="Word lists to add: 'word [frequency [tag]]' a line, most frequent first")
    p.add_argument("--max_add_words", type=int, default=20000, help="Keep the N most frequent words of each word list")
    p.add_argument("--output_dir", default="merged_tokenizer_hf", help="Where the merged HF tokenizer is written")
    p.add_argument("--trust_remote_code", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from medgpt.logs import setup_logging
    setup_logging()  # one format on stderr (medgpt/logs.py)
    from medgpt.vocab import merge_tokenizers, read_word_list

    words = [w for path in args.add_words_file for w in read_word_list(path, args.max_add_words)]
    info = merge_tokenizers(args.base_tokenizer_dir, args.output_dir, args.domain_sp_model_file, words,
                            args.trust_remote_code)
    print(f"{args.output_dir}: {info['base_vocab_size']} -> {info['base_vocab_size'] + len(info['new_tokens'])} tokens")


if __name__ == "__main__":
    from medgpt.cli import run_main
    sys.exit(run_main(main))
