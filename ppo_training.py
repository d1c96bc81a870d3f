"""Stage 3 (RLHF): PPO of the SFT model against the reward model.

    python ppo_training.py --sft_model_path outputs-sft-v1 --reward_model_path outputs-rm-v1 \
        --train_file_dir data/finetune --output_dir outputs-ppo-v1

Prompts are the first user turn (and system prompt) of SFT-format records (sharegpt / OpenAI messages /
alpaca), or {"question"} records. The PPO algorithm itself is in medgpt/trainers/ppo.py (hand-written: TRL 1.13+
has no PPOTrainer). With a LoRA SFT adapter, PPO continues that adapter and the output folder is an
adapter again: `python inference.py --lora_model outputs-ppo-v1 --with_prompt --interactive`.

Data-parallel: `torchrun --nproc_per_node N ppo_training.py ...` trains one policy, each process generating and
scoring 1/N of every --batch_size rollout batch (gloo on CPU, NCCL on GPU); only the main process logs and writes.
--deepspeed zero2.json (or zero1.json) partitions the optimizer state over the processes; ZeRO-3 is refused.
--save_steps writes checkpoint-N folders; --resume_from_checkpoint <folder|True> continues from one.
"""
from __future__ import annotations

import logging
import os
import sys

from transformers import TrainingArguments

from medgpt.args import DataArguments, LoraArguments, ModelArguments, parse_args
from medgpt.cli import run_main
from medgpt.data.io import DataError, load_train_eval_rows, require_str
from medgpt.data.sft import to_messages
from medgpt.distributed import world_size
from medgpt.generation import _has_tokenizer
from medgpt.modeling import apply_lora, load_model, load_tokenizer
from medgpt.templates import get_conv_template
from medgpt.trainers.ppo import (PPOArguments, PPOTrainer, Reference, batch_layout, deepspeed_config,
                                 resolve_template_name, stop_token_ids)
from medgpt.training import prepare_run

logger = logging.getLogger("medgpt.ppo")


def prompt_row(data, where: str) -> dict:
    """The system prompt (if any) and the first user turn of a record."""
    if isinstance(data, dict) and "question" in data and not {"conversations", "messages", "instruction"} & set(data):
        messages = [{"role": "user", "content": require_str(data, "question", where)}]
        if isinstance(data.get("system"), str) and data["system"].strip():
            messages.insert(0, {"role": "system", "content": data["system"]})
    else:
        messages = to_messages(data, where, require_final_answer=False)
    head = messages[:1] if messages[0]["role"] == "system" else []
    user = next(m for m in messages if m["role"] == "user")
    return {"messages": head + [user], "where": where}


def encode_prompts(rows: list[dict], tokenizer, template, system_prompt, max_length: int) -> list[dict]:
    prompts, too_long = [], 0
    for row in rows:
        text = template.render(row["messages"], system_prompt=system_prompt, add_generation_prompt=True,
                               eos_token=tokenizer.eos_token or "</s>")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            too_long += 1
            continue
        prompts.append({"input_ids": ids, "messages": row["messages"]})
    if too_long:
        logger.warning("Skipped %d of %d prompts longer than --max_source_length %d tokens", too_long, len(rows), max_length)
    if not prompts:
        raise DataError(f"no prompt fits in --max_source_length {max_length} tokens")
    return prompts


def load_policy(model_args, lora_args, ppo_args, training_args):
    """The policy and how to get the reference from it (see medgpt.trainers.ppo.Reference)."""
    sft = ppo_args.sft_model_path
    is_adapter = bool(sft) and os.path.isfile(os.path.join(sft, "adapter_config.json"))
    if is_adapter:
        from peft import PeftConfig
        model_args.model_name_or_path = model_args.model_name_or_path or PeftConfig.from_pretrained(sft).base_model_name_or_path
    elif sft:
        model_args.model_name_or_path = sft
    if sft and not model_args.tokenizer_name_or_path and _has_tokenizer(sft):
        model_args.tokenizer_name_or_path = sft
    tokenizer = load_tokenizer(model_args, padding_side="left")
    model = load_model(model_args)
    if is_adapter and not lora_args.use_peft:  # full-parameter PPO from a LoRA SFT: merge the adapter first
        from peft import PeftModel
        logger.info("--use_peft False: merging the SFT adapter %s into the base for full-parameter PPO", sft)
        model = PeftModel.from_pretrained(model, sft).merge_and_unload()
    elif is_adapter:
        logger.info("Continuing the SFT adapter %s; the reference is a frozen copy of it", sft)
        lora_args.peft_path = sft
    policy = apply_lora(model, lora_args, training_args)
    if training_args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not lora_args.use_peft:
        reference = Reference(policy, "model")
    elif lora_args.peft_path:
        reference = Reference(policy, "adapter", lora_args.peft_path)
    else:
        reference = Reference(policy, "disable")
    return policy, tokenizer, reference


def check_launch(ppo_args, training_args):
    """Fail before loading anything when the launch or the batch sizes cannot work."""
    layout = batch_layout(ppo_args, training_args, world_size())
    if training_args.deepspeed:  # ZeRO-0/1/2 (with the client optimizer); ZeRO-3 is a one-line error
        deepspeed_config(training_args, layout["micro"], world_size(), hidden_size=1)
    if training_args.fsdp:
        raise SystemExit("error: --fsdp: ppo_training.py does not run under FSDP; launch it with torchrun and no --fsdp "
                         "(data-parallel, one policy copy per process) or with --deepspeed zero2.json")


def check_paths(ppo_args):
    """Fail before loading anything when an input model is missing."""
    if not ppo_args.reward_model_path:
        raise SystemExit("error: --reward_model_path is required (the output of reward_modeling.py)")
    if not os.path.isdir(ppo_args.reward_model_path):
        raise SystemExit(f"error: --reward_model_path {ppo_args.reward_model_path}: no such folder "
                         "(train one with reward_modeling.py)")
    sft = ppo_args.sft_model_path
    if sft and not os.path.isdir(sft):
        raise SystemExit(f"error: --sft_model_path {sft}: no such folder (train one with supervised_finetuning.py)")


def reward_function(ppo_args, device, torch_dtype=None):
    """The reward model as (prompt messages, responses) -> scores, loaded in the policy's --torch_dtype."""
    from medgpt.reward import RewardScorer

    scorer = RewardScorer(ppo_args.reward_model_path, base_model=ppo_args.reward_base_model, device=device,
                          torch_dtype=torch_dtype)
    logger.info("Reward model %s (template %s)", ppo_args.reward_model_path, scorer.template.name)
    return scorer.score_messages  # renders each prompt with the reward model's own template


def main(argv=None):
    model_args, data_args, lora_args, ppo_args, training_args, compat = parse_args(
        ModelArguments, DataArguments, LoraArguments, PPOArguments, TrainingArguments, argv=argv)
    check_launch(ppo_args, training_args)
    check_paths(ppo_args)
    resume = prepare_run(training_args, compat)  # log levels (other processes: warnings), seed, --resume_from_checkpoint
    rows, _ = load_train_eval_rows(data_args, prompt_row, seed=training_args.seed)
    if data_args.validation_file_dir:
        logger.info("--validation_file_dir is not used by PPO (rewards are logged on the training prompts)")

    policy, tokenizer, reference = load_policy(model_args, lora_args, ppo_args, training_args)
    template_name = resolve_template_name(ppo_args.template_name, model_args.model_name_or_path, ppo_args.sft_model_path)
    template = get_conv_template(template_name)
    logger.info("Prompt template: %s", template_name)
    prompts = encode_prompts(rows, tokenizer, template, ppo_args.system_prompt, ppo_args.max_source_length)

    reward_fn = reward_function(ppo_args, device=next(policy.parameters()).device, torch_dtype=model_args.torch_dtype)
    trainer = PPOTrainer(policy, tokenizer, reward_fn, ppo_args, training_args, reference,
                         stop_token_ids(tokenizer, template),
                         run_info={"template_name": template_name, "sft_model_path": ppo_args.sft_model_path,
                                   "reward_model_path": ppo_args.reward_model_path,
                                   "base_model": model_args.model_name_or_path if lora_args.use_peft else None})
    try:
        metrics = trainer.train(prompts, resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        sys.exit(130)
    logger.info("PPO done: %s", metrics)
    trainer.procs.close()


if __name__ == "__main__":
    run_main(main)
