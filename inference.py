"""Chat with a base model (+ LoRA adapter): interactively, one question, or a file of prompts.

    python inference.py --lora_model outputs-sft --interactive
    python inference.py --lora_model outputs-sft --data_file data/inference/medical_questions.txt \
        --predictions_file predictions.jsonl

Inputs are wrapped in the chat template when the model is a chat model (its tokenizer has a chat template,
the adapter was trained with one, or --template_name names one), else continued as raw text; --with_prompt
and --raw force either.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger("medgpt.inference")


def parse_args(argv=None):
    from medgpt.serving import add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("input and output")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--with_prompt", action="store_true", default=None,
                      help="Wrap each input in the chat template (the default for chat models)")
    mode.add_argument("--raw", dest="with_prompt", action="store_false",
                      help="Continue each input as plain text: no chat template, no conversation history (the "
                           "default for base models without a chat template)")
    g.add_argument("--interactive", action="store_true", help="Multi-turn chat in the terminal, streamed")
    g.add_argument("--prompt", default=None, help="Answer this one question and exit")
    g.add_argument("--data_file", default=None, help="A text file with one prompt a line")
    g.add_argument("--predictions_file", default="./predictions_result.jsonl", help="Where --data_file answers go (JSON lines: Input, Output)")
    g.add_argument("--eval_batch_size", "--batch_size", dest="batch_size", type=int, default=4, help="Prompts generated together with --data_file")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    modes = [m for m in ("interactive", "prompt", "data_file") if getattr(args, m)]
    if len(modes) != 1:
        p.error("give exactly one of --interactive, --prompt TEXT, --data_file FILE")
    return args


def read_prompts(path: str) -> list[str]:
    from medgpt.data.io import DataError, read_text_file

    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    text = read_text_file(path)  # the decoding every data reader shares: BOM dropped, GBK/binary a one-line error
    if not text:
        raise DataError(f"{path}: empty file (expected one prompt a line)")
    prompts = [line.strip() for line in text.split("\n") if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (expected one prompt a line)")
    return prompts


def empty_answer_note(with_prompt: bool, is_chat_model: bool) -> str:
    """What to show instead of an empty answer (never a silent blank)."""
    note = "(no text: the model ended its answer at once"
    if not with_prompt and is_chat_model:
        note += "; raw mode continues your text as is, and a chat model usually just ends it: drop --raw"
    elif not with_prompt:
        note += "; raw mode continues your text as is: try --with_prompt if this is a chat model"
    return note + ")"


def interactive(chat, options, with_prompt: bool):
    history: list[dict] = []
    if with_prompt:
        print("Chat with the model. Commands: 'clear' forgets the conversation, 'exit' quits.", flush=True)
    else:
        print("Raw mode: each line you type is continued as plain text by the model, with no chat template and "
              "no memory of earlier lines. 'exit' quits.", flush=True)
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not text:
            continue
        if text.lower() in ("exit", "quit", ":q"):
            return
        if text.lower() in ("clear", "/clear"):
            history = []
            print("(history cleared)")
            continue
        messages = history + [{"role": "user", "content": text}]
        print("Assistant: ", end="", flush=True)
        answer = ""
        try:
            for piece in chat.stream(messages, options, raw_prompt=None if with_prompt else text):
                answer += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]")
        if not answer.strip():
            print(empty_answer_note(with_prompt, chat.is_chat_model), end="")
        print(flush=True)
        history = messages + [{"role": "assistant", "content": answer.strip()}] if with_prompt else []


def main(argv=None):
    args = parse_args(argv)
    from medgpt.logs import setup_logging
    setup_logging()  # one format on stderr (medgpt/logs.py)
    from transformers import set_seed

    from medgpt.serving import default_options, load_chat_model

    set_seed(args.seed)
    prompts = read_prompts(args.data_file) if args.data_file else None
    chat = load_chat_model(args)
    options = default_options(args)
    if args.with_prompt is None:  # chat models get the chat template unless --raw says otherwise
        args.with_prompt = chat.is_chat_model
    if args.with_prompt:
        logger.info("Chat mode: inputs are wrapped in the %s chat template%s", chat.template.name,
                    "" if chat.is_chat_model else " (--with_prompt)")
    else:
        logger.info("Raw mode: each input is continued as plain text, no chat template%s",
                    " (--raw)" if chat.is_chat_model else " (the model has no chat template; --with_prompt adds "
                                                         f"the {chat.template.name} one)")
    empty = empty_answer_note(args.with_prompt, chat.is_chat_model)

    def answer(batch: list[str]) -> list[str]:
        if args.with_prompt:
            return chat.chat([[{"role": "user", "content": q}] for q in batch], options)
        return chat.generate_raw(batch, options)

    if args.interactive:
        interactive(chat, options, args.with_prompt)
    elif args.prompt:
        text = answer([args.prompt])[0]
        print(text, flush=True)
        if not text:
            print(f"warning: {empty}", file=sys.stderr, flush=True)
    else:
        out_dir = os.path.dirname(os.path.abspath(args.predictions_file))
        os.makedirs(out_dir, exist_ok=True)
        n_empty = 0
        with open(args.predictions_file, "w", encoding="utf-8") as f:
            for start in range(0, len(prompts), args.batch_size):
                batch = prompts[start:start + args.batch_size]
                for q, a in zip(batch, answer(batch)):
                    f.write(json.dumps({"Input": q, "Output": a}, ensure_ascii=False) + "\n")
                    f.flush()  # every answer is on disk as soon as it exists
                    n_empty += not a
                    print(f"Input: {q}\nOutput: {a or empty}\n", flush=True)
        logger.info("Wrote %d predictions to %s", len(prompts), args.predictions_file)
        if n_empty:
            logger.warning("%d of %d answers are empty %s", n_empty, len(prompts), empty)


if __name__ == "__main__":
    from medgpt.cli import run_main
    sys.exit(run_main(main))
