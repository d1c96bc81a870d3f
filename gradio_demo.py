"""A chat page in the browser for a base model (+ LoRA adapter): multi-turn, answers streamed as generated.

    python gradio_demo.py --base_model path/to/model --lora_model outputs-sft
    # then open http://127.0.0.1:7860 (--server_name 0.0.0.0 to serve other machines, --share for a public link)
    python gradio_demo.py --rag_docs data/rag   # answers from a folder of documents, with their sources
"""
import argparse
import logging
import os
import sys

logger = logging.getLogger("medgpt.gradio_demo")


def parse_args(argv=None):
    from medgpt.serving import add_model_args, add_rag_args, add_server_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_rag_args(p)
    g = add_server_args(p, port=7860)
    g.add_argument("--share", action="store_true", help="Also publish a temporary public gradio.live link")
    g.add_argument("--title", default="MedicalGPT", help="Page title")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from medgpt.logs import setup_logging
    setup_logging()  # one format on stderr (medgpt/logs.py)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from medgpt.serving import default_options, load_chat_model, load_rag, warn_if_exposed
    from medgpt.serving.gradio_app import build_demo

    warn_if_exposed(args.host, False)
    rag = load_rag(args)  # before the model: a bad document folder stops at once
    chat = load_chat_model(args)
    system_prompt = args.system_prompt if args.system_prompt is not None else chat.template.system_prompt
    demo = build_demo(chat, default_options(args), system_prompt, args.title, args.max_queue, rag)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    from medgpt.cli import run_main
    sys.exit(run_main(main))
