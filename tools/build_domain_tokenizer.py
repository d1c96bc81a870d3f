"""Train a SentencePiece model on a domain corpus (MedicalGPT's build_domain_tokenizer.py), to be merged into a base
tokenizer with tools/merge_tokenizers.py.

    python tools/build_domain_tokenizer.py --in_file data/pretrain --domain_sp_model_name outputs-vocab/domain_sp \
        --vocab_size 10000 --word_freq_file outputs-vocab/word_freq.txt --jieba_user_dict data/vocab/medical_terms.txt

--in_file: .txt (a document a line), .json/.jsonl (`text`) files or folders of them, as pretraining.py reads them.
Writes <domain_sp_model_name>.model/.vocab; with --word_freq_file also the corpus' Chinese words counted with jieba
(`word frequency` a line, most frequent first), for merge_tokenizers.py --add_words_file.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in_file", "--domain_corpus", dest="in_file", nargs="+", required=True,
                   help="Corpus files or folders (.txt/.json/.jsonl)")
    p.add_argument("--domain_sp_model_name", default="domain_sp", help="Output prefix: writes PREFIX.model, PREFIX.vocab")
    p.add_argument("--vocab_size", type=int, default=10000, help="Pieces at most (a small corpus gives fewer)")
    p.add_argument("--model_type", default="bpe", help="bpe (default), unigram, char or word")
    p.add_argument("--max_sentence_length", type=int, default=16384, help="Longer lines are skipped by sentencepiece")
    p.add_argument("--character_coverage", type=float, default=0.9995)
    p.add_argument("--pad_id", type=int, default=3)
    p.add_argument("--word_freq_file", default=None, help="Also write the corpus' jieba word frequencies here")
    p.add_argument("--jieba_user_dict", default=None, help="A word list jieba keeps whole (e.g. data/vocab/medical_terms.txt)")
    p.add_argument("--min_word_freq", type=int, default=2, help="--word_freq_file: words seen at least this often")
    p.add_argument("--skip_invalid_records", action="store_true", help="Skip malformed lines (counted) instead of stopping")
    args = p.parse_args(argv)
    if args.vocab_size < 1:
        p.error("--vocab_size must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    from medgpt.logs import setup_logging
    setup_logging()  # one format on stderr (medgpt/logs.py)
    from medgpt.vocab import corpus_texts, jieba_word_freqs, sp_pieces, train_domain_sp, write_word_list

    model_file = train_domain_sp(args.in_file, args.domain_sp_model_name, args.vocab_size, args.model_type,
                                 args.max_sentence_length, args.character_coverage, args.pad_id,
                                 args.skip_invalid_records)
    print(f"{model_file}: {len(sp_pieces(model_file))} pieces")
    if args.word_freq_file:
        words = jieba_word_freqs(corpus_texts(args.in_file, args.skip_invalid_records), args.jieba_user_dict,
                                 args.min_word_freq)
        write_word_list(args.word_freq_file, words)
        print(f"{args.word_freq_file}: {len(words)} words (jieba, seen at least {args.min_word_freq} times)")


if __name__ == "__main__":
    from medgpt.cli import run_main
    sys.exit(run_main(main))
