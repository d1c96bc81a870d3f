"""Ask questions about your own documents (RAG, as MedicalGPT's chatpdf.py): the .txt, .md, .pdf and .docx files
of a folder are cut into overlapping chunks, the chunks that match a question are found with BM25 (and an
embedding model when given), and a chat model (base + optional LoRA adapter) answers from them, followed by
the sources it was given (file and position; those it cites are marked).

    python tools/chatpdf.py --docs_dir data/rag --query "How much salt a day with high blood pressure?"
    python tools/chatpdf.py --docs_dir data/rag --lora_model outputs-sft-v1 --interactive
    python tools/chatpdf.py --corpus_files a.pdf,b.docx --query "..." --embedding_model path/to/encoder
    python tools/chatpdf.py --docs_dir data/rag --retrieve_only --query "..."   # the passages only, no model

The index is cached (default: ~/.cache/medgpt/rag/<folders' hash>, or --index_dir) and only documents that
changed are read again.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("medgpt.chatpdf")


def parse_args(argv=None):
    from medgpt.rag import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE
    from medgpt.serving import add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    # MedicalGPT chatpdf.py's names for the same flags
    p.add_argument("--gen_model", dest="base_model", help=argparse.SUPPRESS)
    p.add_argument("--prompt_template_name", dest="template_name", help=argparse.SUPPRESS)
    p.add_argument("--sim_model", dest="embedding_model", help=argparse.SUPPRESS)
    p.add_argument("--int8", dest="load_in_8bit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--int4", dest="load_in_4bit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gen_model_type", help=argparse.SUPPRESS)  # transformers' Auto classes pick the model type
    g = p.add_argument_group("documents and retrieval")
    g.add_argument("--docs_dir", "--corpus_files", dest="sources", action="extend", nargs="+", default=[],
                   metavar="PATH", help="Folders (searched recursively) and/or files: .txt, .md, .pdf, .docx; "
                                        "comma-separated lists work too")
    g.add_argument("--top_k", "--topn", dest="top_k", type=int, default=3, help="Passages given to the model")
    g.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE, help="Characters per chunk")
    g.add_argument("--chunk_overlap", type=int, default=DEFAULT_CHUNK_OVERLAP,
                   help="Characters a chunk shares with the previous one")
    g.add_argument("--embedding_model", default=None,
                   help="A Hugging Face encoder folder: dense retrieval fused with BM25 (default: BM25 only)")
    g.add_argument("--index_dir", default=None,
                   help="Where the index is cached (default: $MEDGPT_HOME/rag/<hash of the document paths>)")
    g = p.add_argument_group("questions")
    g.add_argument("--query", action="append", default=[], help="A question (repeat for several)")
    g.add_argument("--interactive", action="store_true", help="Ask questions in the terminal, answers streamed")
    g.add_argument("--retrieve_only", action="store_true",
                   help="Print the passages found for each question and load no chat model")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    args.sources = [s.strip() for arg in args.sources for s in arg.split(",") if s.strip()]
    if not args.sources:
        p.error("give the documents: --docs_dir FOLDER (or --corpus_files FILE ...)")
    if bool(args.query) == args.interactive:
        p.error("give --query QUESTION (one or more) or --interactive")
    return args


def show_passages(qa, question: str) -> None:
    from medgpt.rag import format_sources

    sources = qa.sources(question)
    print(f"Question: {question}")
    print(format_sources(sources))
    for s in sources:
        print(f"\n[{s.number}] score {s.score:.4g}\n{s.chunk.text}")
    print(flush=True)


def answer(chat, qa, question: str, options, args) -> str:
    """Stream the answer to one question, then its sources."""
    from medgpt.rag import chinese_note, format_sources, mark_cited

    note = chinese_note(args.base_model, args.lora_model, question)
    if note:
        print(note, flush=True)
    prompt, sources = qa.prompt(chat, question, options.max_new_tokens)
    print("Answer: ", end="", flush=True)
    text = ""
    try:
        for piece in chat.stream_completion(prompt, options):
            text += piece
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    if not text.strip():
        print("(no text: the model ended its answer at once)", end="")
    print()
    print(format_sources(mark_cited(sources, text)), flush=True)
    return text


def main(argv=None):
    args = parse_args(argv)
    from medgpt.logs import setup_logging
    setup_logging()  # one format on stderr (medgpt/logs.py)
    from medgpt.rag import DocumentIndex, DocumentQA

    index = DocumentIndex.build(args.sources, args.index_dir, args.chunk_size, args.chunk_overlap,
                                args.embedding_model, device="cpu" if args.use_cpu else None,
                                trust_remote_code=args.trust_remote_code)
    qa = DocumentQA(index, args.top_k)
    chat = options = None
    if not args.retrieve_only:
        from transformers import set_seed

        from medgpt.serving import default_options, load_chat_model

        set_seed(args.seed)
        chat = load_chat_model(args)
        options = default_options(args)

    def ask(question: str) -> None:
        if args.retrieve_only:
            show_passages(qa, question)
        else:
            print(f"Question: {question}", flush=True)
            answer(chat, qa, question, options, args)

    for question in args.query:
        ask(question)
        if len(args.query) > 1:
            print()
    if args.interactive:
        print(f"Ask about the {index.stats.documents} documents ({len(index.chunks)} passages). Each question is "
              f"answered from its own passages; 'exit' quits.", flush=True)
        while True:
            try:
                question = input("\nQuestion: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if not question:
                continue
            if question.lower() in ("exit", "quit", ":q"):
                return
            if args.retrieve_only:
                show_passages(qa, question)
            else:
                answer(chat, qa, question, options, args)


if __name__ == "__main__":
    from medgpt.cli import run_main
    sys.exit(run_main(main))
