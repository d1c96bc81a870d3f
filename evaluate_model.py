"""Evaluate a model (base, base + LoRA adapter, or merged) on multiple-choice medical benchmarks and on held-out
SFT conversations; writes results.json and results.md.

    python evaluate_model.py --lora_model outputs-sft-v1 --eval_file data/eval --output_dir outputs-eval
    python evaluate_model.py --base_model Qwen/Qwen2.5-7B-Instruct --template_name qwen --eval_file CMB/val.json \
        --num_few_shot 3 --sft_eval_file held_out.jsonl --reward_model outputs-rm-v1 --output_dir outputs-eval

Multiple choice (--eval_file: files or folders of .json/.jsonl/.csv in the CMB, C-Eval/CMMLU, MedQA, MedMCQA or
generic layout): each option is scored by its log-likelihood after the question rendered with the chat template
(the sum of its answer tokens' log-probabilities; --ll_norm tokens: their mean), the highest wins; accuracy per
subject with a Wilson 95% confidence interval. --generated_letter also scores the letter the model writes.
Held-out conversations (--sft_eval_file, any SFT record format): the model answers the last user turn; ROUGE-L and
BLEU against the last assistant turn, and the mean reward with --reward_model.
"""
from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("medgpt.evaluate")


def parse_args(argv=None):
    from medgpt.evaluation.scoring import LL_NORMS
    from medgpt.serving import add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.set_defaults(temperature=0, max_new_tokens=256)  # held-out answers: greedy unless asked
    g = p.add_argument_group("multiple choice")
    g.add_argument("--eval_file", "--eval_files", "--eval_dir", dest="eval_file", nargs="+", default=[],
                   help="Question files or folders (.json, .jsonl, .csv); questions of files named *_dev.* or in a "
                        "dev/ folder are few-shot examples, not scored, for the subjects other files have")
    g.add_argument("--few_shot_file", nargs="+", default=[],
                   help="Files or folders of few-shot examples (default: dev files among --eval_file, else the first "
                        "other questions of the same subject)")
    g.add_argument("--num_few_shot", type=int, default=0, help="Examples before each question (0: zero-shot)")
    g.add_argument("--ll_norm", choices=LL_NORMS, default="none",
                   help="none: sum of the option's token log-probabilities; tokens: their mean (length-normalised)")
    g.add_argument("--generated_letter", action="store_true",
                   help="Also score by the option letter the model generates (greedy) after the same prompt")
    g.add_argument("--medmcqa_cop_base", type=int, choices=[0, 1], default=None,
                   help="MedMCQA 'cop' numbering: 1 = 1-4 (original release), 0 = 0-3 (Hugging Face export); "
                        "default: read from the values in each file")
    g = p.add_argument_group("held-out conversations")
    g.add_argument("--sft_eval_file", nargs="+", default=[],
                   help="SFT conversation files or folders; the last assistant turn of each is the reference")
    g.add_argument("--reward_model", default=None,
                   help="reward_modeling.py's output: also report the mean reward of the answers")
    g = p.add_argument_group("run")
    g.add_argument("--max_samples", type=int, default=None,
                   help="Score at most this many questions of each file, and this many conversations")
    g.add_argument("--batch_size", "--eval_batch_size", dest="batch_size", type=int, default=8,
                   help="Questions per forward pass (the options of a question share one pass over its prompt), "
                        "and answers generated together")
    g.add_argument("--output_dir", default="outputs-eval", help="Where results.json and results.md go")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if not args.eval_file and not args.sft_eval_file:
        p.error("nothing to evaluate: give --eval_file (multiple choice) and/or --sft_eval_file (conversations)")
    for name in ("num_few_shot", "batch_size", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_few_shot" else 1):
            p.error(f"--{name} must be {'>= 0' if name == 'num_few_shot' else '>= 1'}, got {value}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from medgpt.logs import setup_logging
    # one format on stderr; the run's log (warnings, progress, a crash's traceback) in <output_dir>/logs/evaluate.log
    setup_logging(args.output_dir, name="evaluate")
    from transformers import set_seed

    from medgpt.evaluation import EvalConfig, evaluate, load_conversations, load_mcq, split_few_shot, write_results
    from medgpt.evaluation.runner import to_markdown
    from medgpt.serving import default_options, load_chat_model

    set_seed(args.seed)
    # read and check every input before loading a model
    items, pool = [], []
    if args.eval_file:
        items, pool = split_few_shot(load_mcq(args.eval_file, args.medmcqa_cop_base, args.max_samples))
        if args.few_shot_file:
            pool = load_mcq(args.few_shot_file, args.medmcqa_cop_base)
        logger.info("%d questions to score (%d subjects), %d few-shot examples", len(items),
                    len({q.subject for q in items}), len(pool))
    conversations = load_conversations(args.sft_eval_file, args.max_samples) if args.sft_eval_file else []
    scorer = None
    if args.reward_model:
        from medgpt.reward import RewardScorer
        scorer = RewardScorer(args.reward_model, batch_size=args.batch_size, device="cpu" if args.use_cpu else None,
                              trust_remote_code=args.trust_remote_code)
    chat = load_chat_model(args)
    config = EvalConfig(num_few_shot=args.num_few_shot, batch_size=args.batch_size, ll_norm=args.ll_norm,
                        generated_letter=args.generated_letter, generation=default_options(args))
    info = {"base_model": args.base_model or "SmolLM2-135M-Instruct (embedded)", "lora_model": args.lora_model,
            "reward_model": args.reward_model}
    results = evaluate(chat, items, conversations, config, pool, scorer, model_info=info)
    json_path, md_path = write_results(results, args.output_dir)
    print(to_markdown(results), flush=True)
    logger.info("Wrote %s and %s", json_path, md_path)


if __name__ == "__main__":
    from medgpt.cli import run_main
    sys.exit(run_main(main))
