"""GRPO (R1-style RL with rule rewards) on question/answer data, with TRL's GRPOTrainer.

    python grpo_training.py --train_file_dir data/grpo --output_dir outputs-grpo-v1 \
        --num_generations 4 --per_device_train_batch_size 4 --max_completion_length 128

Records are {"question": ..., "answer": ...}; the prompt asks for <think>...</think><answer>...</answer>
(medgpt.rewards.SYSTEM_PROMPT), and the rewards (medgpt/rewards.py) score the answer against "answer" and
the layout. Generation runs with transformers' generate (CPU or GPU; vLLM only if you pass --use_vllm True).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

from trl import GRPOConfig, GRPOTrainer

from medgpt.args import DataArguments, LoraArguments, ModelArguments, parse_args
from medgpt.cli import run_main
from medgpt.data.io import DataError, load_train_eval_rows
from medgpt.data.qa import build_prompts, qa_row
from medgpt.kernels import use_cpu_fast_paths
from medgpt.modeling import apply_lora, load_model, load_tokenizer
from medgpt.rewards import SYSTEM_PROMPT, get_reward_funcs
from medgpt.templates import get_conv_template
from medgpt.trainers.ppo import resolve_template_name, stop_token_ids
from medgpt.training import prepare_run, train_and_save

logger = logging.getLogger("medgpt.grpo")


@dataclass
class GRPOArguments:
    template_name: Optional[str] = field(
        default=None, metadata={"help": "Chat template of the prompts (default: the model's recorded one, else chatml for "
                                        "the embedded model, else vicuna)."})
    system_prompt: Optional[str] = field(
        default=None, metadata={"help": "System prompt (default: the R1 prompt asking for <think>/<answer> tags; '' for none)."})
    reward_funcs: str = field(
        default="accuracy,format", metadata={"help": "Comma-separated rule rewards from medgpt/rewards.py: accuracy, format."})
    max_prompt_length: Optional[int] = field(
        default=None, metadata={"help": "Skip prompts longer than this many tokens (counted in the log)."})
    train_samples: int = field(
        default=-1, metadata={"help": "MedicalGPT: train on this many shuffled samples (-1: all)."})
    subset_name: Optional[str] = field(default=None, metadata={"help": "MedicalGPT name of --dataset_config_name."})
    dataset_splits: Optional[str] = field(default="train", metadata={"help": "Accepted for MedicalGPT compatibility (the train split is used)."})


def _medicalgpt_trl_flags(argv: list[str]) -> list[str]:
    """MedicalGPT's run_grpo.sh uses TRL ModelConfig names: --lora_r, --lora_target_modules a b c, --dtype."""
    out, i = [], 0
    while i < len(argv):
        name, eq, val = argv[i].partition("=")
        if name == "--lora_r":
            out.append("--lora_rank" + eq + val)
        elif name == "--dtype":
            out.append("--torch_dtype" + eq + val)
        elif name == "--lora_target_modules":
            values = [val] if eq else []
            while not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                values.append(argv[i])
            out += ["--target_modules", ",".join(v.strip(",") for v in values)]
        else:
            out.append(argv[i])
        i += 1
    return out


def main(argv=None):
    import sys
    argv = _medicalgpt_trl_flags(list(sys.argv[1:] if argv is None else argv))
    model_args, data_args, lora_args, grpo_args, training_args, compat = parse_args(
        ModelArguments, DataArguments, LoraArguments, GRPOArguments, GRPOConfig, argv=argv)
    training_args.do_train = True  # GRPO always trains (MedicalGPT's run_grpo.sh passes no --do_train)
    resume = prepare_run(training_args, compat)
    if grpo_args.subset_name and not data_args.dataset_config_name:
        data_args.dataset_config_name = grpo_args.subset_name
    reward_funcs = get_reward_funcs(grpo_args.reward_funcs)

    tokenizer = load_tokenizer(model_args, padding_side="left")
    template_name = resolve_template_name(grpo_args.template_name, model_args.model_name_or_path, lora_args.peft_path)
    template = get_conv_template(template_name)
    system_prompt = SYSTEM_PROMPT if grpo_args.system_prompt is None else grpo_args.system_prompt

    need_eval = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    train_rows, eval_rows = load_train_eval_rows(data_args, qa_row, need_eval=need_eval, seed=training_args.seed)
    if grpo_args.train_samples and grpo_args.train_samples > 0:
        import random
        random.Random(training_args.seed).shuffle(train_rows)
        train_rows = train_rows[: grpo_args.train_samples]
    logger.info("GRPO data: %d training and %d evaluation questions; template %s", len(train_rows), len(eval_rows),
                template_name)
    train_dataset = build_prompts(train_rows, tokenizer, template, system_prompt, grpo_args.max_prompt_length, "train")
    eval_dataset = build_prompts(eval_rows, tokenizer, template, system_prompt, grpo_args.max_prompt_length, "eval")
    if train_dataset is None:
        raise DataError("no training questions")

    model = load_model(model_args)
    # completions end at the template's end-of-turn as well as at eos
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, template)
    model = apply_lora(model, lora_args, training_args)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if need_eval else None,
        processing_class=tokenizer,
    )
    use_cpu_fast_paths(trainer, trainer.model)
    steps = training_args.max_steps if training_args.max_steps > 0 else math.ceil(
        training_args.num_train_epochs * len(train_dataset) * training_args.num_generations
        / (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
           * training_args.world_size))
    logger.info("GRPO: %d questions, %d completions each, about %d steps", len(train_dataset),
                training_args.num_generations, steps)
    train_and_save(trainer, training_args, resume, tokenizer, perplexity=False,
                   run_info={"template_name": template_name, "system_prompt": system_prompt, "stage": "grpo"})


if __name__ == "__main__":
    run_main(main)
