"""The whole recipe in one command: PT -> SFT -> RM -> PPO, and SFT -> DPO, SFT -> ORPO, on the sample
data, each stage reading the previous stage's output; then a report (curves, metrics, the base and every
trained model scored on the same medical multiple-choice questions and held-out conversations, answers side
by side) and a chat answer from the final model.

    python run_pipeline.py                      # embedded SmolLM2-135M-Instruct, data/, outputs-pipeline/
    python run_pipeline.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --template_name qwen

Each stage runs its own run_*.sh (so the pipeline exercises exactly what users run), with the output and
model paths overridden; its console output is shown live and kept in <output_root>/logs/<stage>.log.
A stage whose output already exists is skipped (--force reruns everything), so an interrupted pipeline
continues where it stopped.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.abspath(__file__))

QUESTIONS = [
    "What are the early warning signs of a stroke?",
    "I have had a mild fever and a sore throat for two days. What should I do?",
    "高血压患者日常饮食应该注意什么？",
    "How can I lower my risk of type 2 diabetes?",
    "儿童发烧到多少度需要去医院？",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="Base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--template_name", default="chatml", help="Chat template for SFT/RM/DPO/ORPO/PPO")
    p.add_argument("--output_root", default="outputs-pipeline", help="Where every stage's output and the report go")
    p.add_argument("--stages", default="pt,sft,rm,ppo,dpo,orpo", help="Comma-separated subset of pt,sft,rm,ppo,dpo,orpo")
    p.add_argument("--force", action="store_true", help="Rerun stages whose output already exists")
    p.add_argument("--max_new_tokens", type=int, default=96,
                   help="Answer length of the final chat answer (and of the report's answers with --skip_eval)")
    p.add_argument("--eval_mcq", nargs="+", default=["data/eval/medical_mcq_en.jsonl", "data/eval/medical_mcq_zh.jsonl"],
                   help="Multiple-choice files the report scores every model on (evaluate_model.py's layouts)")
    p.add_argument("--eval_conversations", nargs="+", default=["data/eval/medical_conversations_heldout.jsonl"],
                   help="Held-out SFT conversations every model answers in the report (ROUGE-L, BLEU, reward)")
    p.add_argument("--eval_max_samples", type=int, default=20,
                   help="Questions per --eval_mcq file and held-out conversations scored (keeps the CPU run short)")
    p.add_argument("--eval_max_new_tokens", type=int, default=64, help="Answer length for the held-out conversations")
    p.add_argument("--skip_eval", action="store_true", help="No evaluation section in the report")
    p.add_argument("--question", default="What should I do if I have a fever and a headache?",
                   help="The question the final model answers at the end")
    p.add_argument("--expand_vocab", action="store_true",
                   help="Domain vocabulary expansion before PT: a SentencePiece model and a jieba word list built from "
                        "data/pretrain and data/vocab/medical_terms.txt merged into the base tokenizer "
                        "(tools/build_domain_tokenizer.py, tools/merge_tokenizers.py); PT trains with it and "
                        "--modules_to_save embed_tokens,lm_head, later stages use the PT output's tokenizer")
    p.add_argument("--vocab_size", type=int, default=3000, help="--expand_vocab: pieces of the domain SentencePiece model")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="Training precision of every stage: auto = bf16 (bf16 weights + autocast, float32 LoRA weights) "
                        "on a GPU or a CPU with native bf16 (AVX512-BF16/AMX, checked by medgpt/precision.py), "
                        "float32 elsewhere")
    p.add_argument("--stage_args", action="append", default=[], metavar="STAGE=FLAGS",
                   help="Extra flags for one stage, e.g. --stage_args 'sft=--num_train_epochs 2' (repeatable)")
    return p.parse_args(argv)


def precision_flags(precision: str) -> list[str]:
    """The stages' precision flags for --precision (auto: bf16 where the GPU or the CPU runs it fast)."""
    if precision == "auto":
        import torch

        from medgpt.precision import cpu_bf16

        check = None if torch.cuda.is_available() else cpu_bf16()
        precision = "bf16" if check is None or check.fast else "fp32"
        print(f"[pipeline] precision: {precision}" + (f" ({check.reason})" if check else " (GPU)"), flush=True)
    return ["--torch_dtype", "bfloat16", "--bf16"] if precision == "bf16" else []


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.root = os.path.abspath(args.output_root)
        self.logs = os.path.join(self.root, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.extra = {}
        for item in args.stage_args:
            stage, _, flags = item.partition("=")
            self.extra[stage.strip()] = flags.split()
        self.python = sys.executable
        self.precision = precision_flags(args.precision)
        # the evaluation and the report's answers load the models in the stages' precision (bf16 halves the scoring
        # time on a CPU with native bf16: MCQ 6.5 vs 12.4 s a model, the same accuracy on the sample set)
        self.inference_dtype = "bfloat16" if self.precision else None

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def banner(self, text: str):
        print(f"\n{'=' * 100}\n[pipeline {time.strftime('%H:%M:%S')}] {text}\n{'=' * 100}", flush=True)

    def run(self, name: str, cmd: list[str], output: str, done_file: str):
        """Run one stage command, streaming its output to the console and a log; skip if already done."""
        if os.path.exists(os.path.join(output, done_file)) and not self.args.force:
            self.banner(f"{name}: already done ({output}), skipping (--force reruns)")
            return
        self.banner(f"{name}: {' '.join(cmd)}")
        start = time.time()
        env = dict(os.environ, PYTHON=self.python, PYTHONUNBUFFERED="1")
        log_path = os.path.join(self.logs, f"{name.lower()}.log")
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
        self.timings[name] = time.time() - start
        if rc != 0:
            raise SystemExit(f"error: stage {name} failed with exit code {rc}; its log: {log_path}")
        print(f"[pipeline] {name} finished in {self.timings[name]:.0f} s", flush=True)

    def stage(self, name: str, script: str, output: str, flags: list[str], done_file: str):
        self.run(name, ["bash", script, *self.precision, *flags, "--output_dir", output, *self.extra.get(name.lower(), [])],
                 output, done_file)

    def merge(self, name: str, base: str | None, adapter: str, output: str, flags: list[str] = ()):
        cmd = [self.python, "merge_peft_adapter.py", "--lora_model", adapter, "--output_dir", output, *flags]
        if base:
            cmd += ["--base_model", base]
        self.run(f"merge-{name}", cmd, output, "model.safetensors")


def expand_vocab(p: Pipeline, base: str | None) -> str:
    """Build a domain SentencePiece model and jieba word list from the PT data, merge them and the medical word list
    into the base tokenizer; returns the merged tokenizer folder."""
    vocab = p.path("vocab")
    os.makedirs(vocab, exist_ok=True)
    p.run("Vocab", [p.python, "tools/build_domain_tokenizer.py", "--in_file", "data/pretrain",
                    "--domain_sp_model_name", os.path.join(vocab, "domain_sp"), "--vocab_size", str(p.args.vocab_size),
                    "--word_freq_file", os.path.join(vocab, "word_freq.txt"),
                    "--jieba_user_dict", "data/vocab/medical_terms.txt", *p.extra.get("vocab", [])],
          vocab, "domain_sp.model")
    merged = os.path.join(vocab, "merged_tokenizer")
    p.run("Merge-tokenizer", [p.python, "tools/merge_tokenizers.py", "--output_dir", merged,
                              *(["--base_tokenizer_dir", base] if base else []),
                              "--domain_sp_model_file", os.path.join(vocab, "domain_sp.model"), "--add_words_file",
                              "data/vocab/medical_terms.txt", os.path.join(vocab, "word_freq.txt")],
          merged, "medgpt_vocab.json")
    return merged


def evaluate_stages(p: Pipeline, args, stages: list[str], base, sft: str) -> tuple[dict, list[str]]:
    """The base model and every trained model (PT, SFT, DPO, ORPO, PPO) scored on the same multiple-choice questions
    and held-out conversations (medgpt.evaluation); results also in <output_root>/report/evaluation.json."""
    from medgpt.default_model import is_default
    from medgpt.evaluation import EvalConfig, evaluate_models, load_conversations, load_mcq
    from medgpt.generation import GenerationOptions

    p.banner("Evaluation: the base model and each trained model on the same questions and conversations")
    start = time.time()
    items = load_mcq([os.path.join(ROOT, f) for f in args.eval_mcq], max_samples=args.eval_max_samples)
    convs = load_conversations([os.path.join(ROOT, f) for f in args.eval_conversations], args.eval_max_samples)
    models = {"Base": (base, None)}
    if "pt" in stages:
        models["PT"] = (p.path("pt-merged"), None)
    models["SFT"] = (sft, None)
    models.update({name.upper(): (sft, p.path(name)) for name in ("dpo", "orpo", "ppo") if name in stages})
    scorer = None
    if "rm" in stages or "ppo" in stages:
        from medgpt.reward import RewardScorer
        scorer = RewardScorer(p.path("rm"), torch_dtype=p.inference_dtype)
    config = EvalConfig(batch_size=8, generation=GenerationOptions(max_new_tokens=args.eval_max_new_tokens,
                                                                   temperature=0, repetition_penalty=1.1))
    results = evaluate_models(models, args.template_name, items, convs, config, scorer,
                              torch_dtype=p.inference_dtype)
    del scorer
    gc.collect()
    p.timings["evaluation"] = time.time() - start
    os.makedirs(p.path("report"), exist_ok=True)
    with open(p.path(os.path.join("report", "evaluation.json")), "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=2)
    notes = [f"Evaluation took {p.timings['evaluation']:.0f} s; with a few dozen questions the intervals are wide: "
             "differences inside them are noise. `python evaluate_model.py` scores a model on real benchmarks."]
    if is_default(base):
        notes.append("The embedded SmolLM2-135M-Instruct is an English model: its scores on the Chinese questions and "
                     "conversations are not meaningful.")
    print(f"[pipeline] evaluation finished in {p.timings['evaluation']:.0f} s", flush=True)
    return results, notes


def held_out_answers(evaluation: dict) -> tuple[list, list, dict, Optional[dict]]:
    """(questions, reference replies, label -> answers, label -> mean reward or None) of the evaluation's held-out
    conversations."""
    samples = {label: r["generation"]["samples"] for label, r in evaluation.items()}
    first = next(iter(samples.values()))
    answers = {label: [s["prediction"] for s in rows] for label, rows in samples.items()}
    rewards = {label: r["generation"]["reward_mean"] for label, r in evaluation.items()
               if "reward_mean" in r["generation"]}
    return [s["question"] for s in first], [s["reference"] for s in first], answers, rewards or None


def answer_questions(p: Pipeline, args, stages: list[str], sft: str, models: dict) -> tuple[dict, Optional[dict]]:
    """Without the evaluation: each of `models` (label -> adapter on the SFT model, or None) answers QUESTIONS,
    scored by the reward model when there is one. Returns (label -> answers, label -> mean reward or None)."""
    from medgpt.generation import ChatModel, GenerationOptions

    p.banner("Report: answering the questions with each model")
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=0, repetition_penalty=1.1)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    answers = {}
    for label, adapter in models.items():
        chat = ChatModel(sft, adapter, template_name=args.template_name,
                         torch_dtype=p.inference_dtype)
        answers[label] = chat.chat(convs, options)
        print(f"[pipeline] {label} answered {len(QUESTIONS)} questions", flush=True)
        del chat
        gc.collect()
    rewards = None
    if "rm" in stages or "ppo" in stages:
        from medgpt.reward import RewardScorer
        scorer = RewardScorer(p.path("rm"), torch_dtype=p.inference_dtype)
        prompts = [scorer.build_prompt(c) for c in convs]
        rewards = {label: float(scorer.score(prompts, ans).mean()) for label, ans in answers.items()}
        del scorer
    return answers, rewards


def main(argv=None):
    args = parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    p = Pipeline(args)
    base = args.model_name_or_path
    model_flag = ["--model_name_or_path", base] if base else []
    tmpl = ["--template_name", args.template_name]
    total_start = time.time()

    # Stage 1: continued pretraining (LoRA), merged so SFT starts from the adapted weights
    sft_base = base
    pt_flags = []
    if args.expand_vocab:
        if "pt" not in stages:
            raise SystemExit("error: --expand_vocab trains the new tokens in PT: add pt to --stages")
        pt_flags = ["--tokenizer_name_or_path", expand_vocab(p, base), "--modules_to_save", "embed_tokens,lm_head"]
    if "pt" in stages:
        p.stage("PT", "run_pt.sh", p.path("pt"), model_flag + pt_flags, "adapter_config.json")
        p.merge("pt", base, p.path("pt"), p.path("pt-merged"), ["--resize_emb"] if args.expand_vocab else [])
        sft_base = p.path("pt-merged")
    # Stage 2: SFT, merged: the starting point of RM, PPO, DPO and ORPO
    p.stage("SFT", "run_sft.sh", p.path("sft"),
            (["--model_name_or_path", sft_base] if sft_base else []) + tmpl, "adapter_config.json")
    p.merge("sft", sft_base, p.path("sft"), p.path("sft-merged"))
    sft = p.path("sft-merged")
    on_sft = ["--model_name_or_path", sft] + tmpl
    if "rm" in stages or "ppo" in stages:
        p.stage("RM", "run_rm.sh", p.path("rm"), on_sft, "adapter_config.json")
    if "ppo" in stages:
        p.stage("PPO", "run_ppo.sh", p.path("ppo"),
                ["--sft_model_path", sft, "--reward_model_path", p.path("rm")] + tmpl, "adapter_config.json")
    if "dpo" in stages:
        p.stage("DPO", "run_dpo.sh", p.path("dpo"), on_sft, "adapter_config.json")
    if "orpo" in stages:
        p.stage("ORPO", "run_orpo.sh", p.path("orpo"), on_sft, "adapter_config.json")

    evaluation, eval_notes = (None, None) if args.skip_eval else evaluate_stages(p, args, stages, base, sft)

    # The answers side by side: with the evaluation, those of its held-out conversations (every model has answered them
    # and the reward model has scored them: no second pass over the models); without it, answers to QUESTIONS
    trained = {"SFT": None, **{n.upper(): p.path(n) for n in ("dpo", "ppo", "orpo") if n in stages}}
    if evaluation and all("generation" in r for r in evaluation.values()):
        questions, references, answers, rewards = held_out_answers(evaluation)
    else:
        questions, references = QUESTIONS, None
        answers, rewards = answer_questions(p, args, stages, sft, trained)
    stage_dirs = [("PT", "pt"), ("SFT", "sft"), ("RM", "rm"), ("PPO", "ppo"), ("DPO", "dpo"), ("ORPO", "orpo")]
    report_stages = [{"name": n, "output_dir": p.path(d)} for n, d in stage_dirs
                     if (d in stages or d == "sft") and os.path.isdir(p.path(d))]
    p.timings["total"] = time.time() - total_start
    from medgpt.report import write_report

    report = write_report(os.path.join(p.root, "report", "report.md"), report_stages, questions, answers,
                          rewards=None if references else rewards,  # (the evaluation's table has them)
                          timings=p.timings, evaluation=evaluation, evaluation_notes=eval_notes, references=references)
    with open(os.path.join(p.root, "report", "summary.json"), "w", encoding="utf-8") as f:
        from medgpt.evaluation import summary
        json.dump({"timings_s": p.timings, "mean_reward": rewards, "answers": answers, "questions": questions,
                   "evaluation": {k: summary(r) for k, r in (evaluation or {}).items()}},
                  f, ensure_ascii=False, indent=2)
    final_model = "PPO" if "PPO" in trained else list(trained)[-1]
    p.banner(f"Done in {p.timings['total'] / 60:.1f} min. Report: {report}")
    if rewards:
        print("Mean reward of the answers: " + ", ".join(f"{k} {v:+.3f}" for k, v in rewards.items()))
    # the final chat answer, from the end of the RLHF chain, printed by inference.py as a user would run it
    adapter = trained[final_model]
    cmd = [sys.executable, "inference.py", "--base_model", sft, "--with_prompt", "--temperature", "0",
           "--repetition_penalty", "1.1", "--max_new_tokens", str(args.max_new_tokens), "--prompt", args.question]
    cmd += ["--lora_model", adapter] if adapter else []
    print(f"\n[pipeline] {' '.join(cmd)}\nUser: {args.question}\nAssistant ({final_model} model):", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    from medgpt.cli import run_main
    run_main(main)
