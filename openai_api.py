"""An OpenAI-compatible chat server for a base model (+ LoRA adapter): any OpenAI client can talk to it.

    python openai_api.py --base_model path/to/model --lora_model outputs-sft --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "medgpt", "messages": [{"role": "user", "content": "What causes a fever?"}]}'

Endpoints: GET /v1/models, POST /v1/chat/completions (stream: true sends server-sent events ending with
`data: [DONE]`), GET /health. One worker generates; requests wait in a bounded queue (503 when full).
With --rag_docs FOLDER, each question is answered from the best passages of those documents and the response
carries them as "sources" (see medgpt/rag).
"""
import argparse
import logging
import os
import sys

logger = logging.getLogger("medgpt.openai_api")


def parse_args(argv=None):
    from medgpt.serving import add_model_args, add_rag_args, add_server_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_rag_args(p)
    g = add_server_args(p, port=8000)
    g.add_argument("--api_key", default=os.environ.get("MEDGPT_API_KEY"),
                   help="Require 'Authorization: Bearer KEY' (default: $MEDGPT_API_KEY; unset = no key)")
    g.add_argument("--model_id", default=None, help="Model name reported by /v1/models (default: the adapter's "
                                                     "or model's folder name)")
    g.add_argument("--max_batch_size", type=int, default=4,
                   help="Waiting non-streamed requests with equal settings generated together (1 = never batch)")
    g.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from medgpt.logs import setup_logging
    level = getattr(logging, args.log_level.upper())  # ours and uvicorn's (its access log too) in our one format
    setup_logging(level=level, lib_level=level if level <= logging.DEBUG else max(level, logging.WARNING),
                  own=("uvicorn",))
    import uvicorn

    from medgpt.serving import GenerationWorker, default_options, load_chat_model, load_rag, warn_if_exposed
    from medgpt.serving.openai_app import create_app

    warn_if_exposed(args.host, bool(args.api_key))
    rag = load_rag(args)  # before the model: a bad document folder stops at once
    chat = load_chat_model(args)
    worker = GenerationWorker(chat, args.max_queue, args.max_batch_size).start()
    app = create_app(chat, worker, default_options(args), args.model_id or chat.model_name, args.api_key, rag)
    logger.info("Model %s ready (template %s, context %d tokens); serving on http://%s:%d/v1",
                args.model_id or chat.model_name, chat.template.name, chat.context_length, args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
                    timeout_graceful_shutdown=5)
    finally:
        worker.stop()


if __name__ == "__main__":
    from medgpt.cli import run_main
    sys.exit(run_main(main))
