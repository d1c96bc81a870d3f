"""PPO for language models (RLHF stage 3), written here because TRL removed its PPOTrainer
(`trl.experimental.ppo` exists up to trl 1.12 and is gone from 1.13; we stay on trl 1.16).

One rollout batch = `batch_size` prompts:
  1. the policy samples a response to each prompt;
  2. the reward function (a reward model, or any callable) scores each (prompt, response);
  3. a forward pass gives the policy's log-probs and values and the reference's log-probs;
     the per-token reward is -kl_coef * (logp - ref_logp), plus the score on the last response token;
  4. GAE turns rewards and values into advantages and returns;
  5. `num_ppo_epochs` passes over `mini_batch_size` minibatches minimise the clipped policy loss plus
     vf_coef * the clipped value loss, each a mean over the minibatch's response tokens (micro-batches of
     --per_device_train_batch_size accumulate gradients).

The value function is a linear head on the policy's last hidden state (no second model), and the
reference is the policy with its adapter switched off or swapped for a frozen copy of the starting
adapter, so LoRA PPO holds one copy of the base weights. Design after torchtune's
recipes/ppo_full_finetune_single_device.py and the PPO-for-LM recipe of Ziegler et al. / Huang et al.
("The N+ implementation details of RLHF with PPO").

Data-parallel (`torchrun --nproc_per_node N ppo_training.py ...`): every process holds the whole policy and
generates, scores and trains on its 1/N share of each rollout batch (`batch_size` and `mini_batch_size` are global
sizes, each a multiple of N). The gradients of every minibatch are summed over the processes (all-reduce: gloo on
CPU, NCCL on GPU) after each process has divided its per-token loss sums by the minibatch's token count summed over
all processes, and the advantage whitening and the logged statistics are taken over all processes' samples, so a
step is the step one process would take on the whole batch. Rollouts are sampled by the Gumbel-max trick with noise
seeded per (seed, step, sample): a sample's response does not depend on which process generates it or on the rest
of its batch. Minibatches take an equal share from every process (each process shuffles its own share), so with
one minibatch per rollout (the default) N processes and one process make the same update, up to float rounding.
Under --deepspeed (ZeRO-0/1/2) the policy and value head form one DeepSpeed engine that reduces the gradients and
steps a partitioned optimizer; ZeRO-3 is refused (generation needs the whole policy on every process every step).

Checkpoints (`--save_steps`) hold the policy's trainable weights, the value head, optimizer (under DeepSpeed, each
process's partition), scheduler, step and RNG state; training resumed from one continues with the same rollouts and
updates as an uninterrupted run (with any process count, except a DeepSpeed checkpoint: the same count).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger("medgpt.ppo")  # the stage's name in the log, as its script's own lines

REF_ADAPTER = "ref"
VALUE_HEAD_FILE = "value_head.safetensors"
LOG_FILE = "ppo_log.jsonl"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pth"
DEEPSPEED_TAG = "deepspeed"  # the folder of a checkpoint that holds DeepSpeed's (partitioned) optimizer state

RewardFn = Callable[[list, list], "torch.Tensor | list[float]"]  # (prompt messages, response texts) -> scores


@dataclass
class PPOArguments:
    sft_model_path: Optional[str] = field(
        default=None, metadata={"help": "The SFT output to start from: a LoRA adapter folder (its base is --model_name_or_path "
                                        "or the adapter's own base) or a full/merged model folder. Default: --model_name_or_path."})
    reward_model_path: Optional[str] = field(
        default=None, metadata={"help": "The reward model: reward_modeling.py's output (LoRA adapter with a score head, or a "
                                        "merged/full sequence-classification model).",
                                "aliases": ["--reward_model_name_or_path"]})
    reward_base_model: Optional[str] = field(
        default=None, metadata={"help": "Base model of a LoRA reward adapter (default: the one recorded in the adapter)."})
    template_name: Optional[str] = field(
        default=None, metadata={"help": "Chat template of the prompts (default: the one the SFT model was trained with, "
                                        "else chatml for the embedded model, else vicuna)."})
    system_prompt: Optional[str] = field(
        default=None, metadata={"help": "System prompt for records without one (default: the template's)."})
    max_source_length: int = field(default=256, metadata={"help": "Longest prompt in tokens; longer prompts are skipped (counted in the log)."})
    response_length: int = field(
        default=128, metadata={"help": "Most tokens generated per response.",
                               "aliases": ["--max_target_length", "--max_completion_length"]})
    total_episodes: Optional[int] = field(
        default=None, metadata={"help": "Responses to generate in all (default: --num_train_epochs x the number of prompts)."})
    batch_size: Optional[int] = field(
        default=None, metadata={"help": "Prompts per rollout (one PPO step), over all processes: under torchrun each of "
                                        "N processes rolls out batch_size / N. Default: --per_device_train_batch_size x "
                                        "--gradient_accumulation_steps x N."})
    mini_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Samples per optimizer step inside a rollout, over all processes (default: "
                                        "--batch_size; both a multiple of the process count)."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Optimisation passes over each rollout."})
    kl_coef: float = field(default=0.05, metadata={"help": "Per-token KL penalty to the reference model.",
                                                   "aliases": ["--init_kl_coef"]})
    cliprange: float = field(default=0.2, metadata={"help": "PPO clip range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Normalise the per-token rewards of each rollout."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the rollouts."})
    missing_eos_penalty: Optional[float] = field(
        default=None, metadata={"help": "Subtracted from the score of a response that does not end within --response_length."})
    reward_baseline: float = field(default=0.0, metadata={"help": "Subtracted from every reward-model score."})
    early_stopping: bool = field(
        default=False, metadata={"help": "Stop optimising a rollout once the approximate KL to the rollout policy exceeds "
                                         "1.5 x --target_kl."})
    target_kl: float = field(default=0.1, metadata={"help": "KL threshold of --early_stopping."})


# ---------------------------------------------------------------------------------------------------
# Small tensor helpers

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=None) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries. `reduce` (a sum over processes, see Processes.sum) takes the
    mean and variance over every process's entries, as one process holding them all would."""
    reduce = reduce or (lambda t: t)
    total, count = reduce(torch.stack([(x * mask).sum(), mask.sum()]).float())
    count = count.clamp(min=1)
    mean = total / count
    var = reduce(((x - mean) ** 2 * mask).sum().float()) / count
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over the response tokens; positions past a response's end
    (mask 0) carry no reward or value. Returns (advantages, returns)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def sample_seed(*parts) -> int:
    """A 63-bit seed from e.g. (run seed, step, sample index): the same on every process and after a resume."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class GumbelMaxSampler:
    """A transformers logits processor for greedy decoding that turns it into sampling at `temperature`: the argmax of
    logits / temperature + Gumbel noise is a sample of softmax(logits / temperature) (the Gumbel-max trick). Each row
    draws its noise from its own generator (one seed per sample), so a sample's tokens do not depend on the rest of
    its batch, nor on which process generates it."""

    def __init__(self, seeds: list[int], temperature: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        return scores.float() / self.temperature - torch.log(-torch.log(u))


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout would make the log-probs of the same tokens differ between rollout and update."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def stop_token_ids(tokenizer, template) -> list[int]:
    """eos plus the template's end-of-turn token when that is a single token (e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    if template is not None and template.stop_str:
        enc = tokenizer.encode(template.stop_str, add_special_tokens=False)
        if len(enc) == 1:
            ids.add(enc[0])
    return sorted(i for i in ids if i is not None)


def resolve_template_name(explicit: Optional[str], model_name_or_path: Optional[str], *trained_folders) -> str:
    """--template_name, else the one recorded with the trained weights, else chatml for the embedded model,
    else vicuna (MedicalGPT's default)."""
    from ..default_model import DEFAULT_TEMPLATE, is_default
    from ..generation import read_run_info

    return explicit or read_run_info(*trained_folders, model_name_or_path).get("template_name") or (
        DEFAULT_TEMPLATE if is_default(model_name_or_path) else "vicuna")


class ValueHead(torch.nn.Module):
    """V(state) from the policy's last hidden state; float32 whatever the policy's dtype."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.summary.weight)
        torch.nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).float().squeeze(-1)


def lm_forward(model, input_ids, attention_mask, keep: int, hidden_states: bool = False):
    """A causal LM's output on left-padded rows (positions count real tokens only), logits of the last `keep` positions."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 output_hidden_states=hidden_states, logits_to_keep=keep, use_cache=False)


class PolicyWithValue(torch.nn.Module):
    """The policy and its value head as one module (the one DeepSpeed wraps): logits of the last `keep` positions
    and the values of the `keep - 1` positions before the last."""

    def __init__(self, policy, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, input_ids, attention_mask, keep: int):
        out = lm_forward(self.policy, input_ids, attention_mask, keep, hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1][:, -keep:-1])


# ---------------------------------------------------------------------------------------------------
# Processes

class Processes:
    """The processes of a data-parallel run (torch.distributed: gloo on CPU, NCCL on GPU, the same calls); with one
    process every collective returns its input."""

    def __init__(self, training_args=None):
        import torch.distributed as dist

        from ..distributed import world_size

        if world_size() > 1 and not (dist.is_available() and dist.is_initialized()):
            if training_args is not None:
                training_args.device  # accelerate's PartialState starts the process group (gloo without CUDA)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.dist = dist
        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self.enabled else 1
        self.rank = dist.get_rank() if self.enabled else 0
        self.is_main = self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `t` over all processes (a new tensor; `t` itself with one process)."""
        if not self.enabled:
            return t
        t = t.clone()
        self.dist.all_reduce(t)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's `t` (same shape on each) concatenated along dim 0, in rank order."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def sum_grads(self, params: list, bucket_numel: int = 1 << 24) -> None:
        """Replace each parameter's gradient by its sum over the processes (flattened in buckets, one all-reduce each)."""
        if not self.enabled:
            return
        buckets, bucket, numel = [], [], 0
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if bucket and (p.grad.dtype != bucket[0].grad.dtype or numel >= bucket_numel):
                buckets.append(bucket)
                bucket, numel = [], 0
            bucket.append(p)
            numel += p.numel()
        for bucket in [b for b in buckets + [bucket] if b]:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            self.dist.all_reduce(flat)
            for p, summed in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad.copy_(summed.view_as(p.grad))

    def broadcast_(self, tensors: list) -> None:
        """Overwrite `tensors` with rank 0's."""
        if self.enabled:
            for t in tensors:
                self.dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        if self.enabled:
            self.dist.barrier()

    def start_alone(self) -> None:
        """A process group of this one process (DeepSpeed needs one even without torchrun)."""
        if not self.dist.is_initialized():
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            for key, value in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1), ("MASTER_ADDR", "127.0.0.1"),
                               ("MASTER_PORT", port)):
                os.environ.setdefault(key, str(value))  # as torchrun sets them; DeepSpeed reads LOCAL_RANK
            self.dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def close(self) -> None:
        """End the process group (at the end of a run)."""
        if self.dist.is_available() and self.dist.is_initialized():
            self.dist.destroy_process_group()
        self.enabled = False


def batch_layout(ppo_args, training_args, world: int) -> dict:
    """Rollout prompts per step (global), samples per optimizer step (global), their per-process shares and the
    micro-batch size; one-line SystemExit when the sizes do not split evenly over `world` processes."""
    batch = ppo_args.batch_size or training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    if batch < 1:
        raise SystemExit(f"error: --batch_size must be at least 1, got {batch}")
    if ppo_args.mini_batch_size is not None and ppo_args.mini_batch_size < 1:
        raise SystemExit(f"error: --mini_batch_size must be at least 1, got {ppo_args.mini_batch_size}")
    mini = min(ppo_args.mini_batch_size or batch, batch)
    for flag, size in (("--batch_size", batch), ("--mini_batch_size", mini)):
        if size % world:
            raise SystemExit(f"error: {flag} {size} does not split over {world} processes: each process takes an equal "
                             f"share of every batch (use a multiple of {world})")
    if ppo_args.temperature <= 0:
        raise SystemExit(f"error: --temperature must be > 0 (PPO samples its rollouts), got {ppo_args.temperature}")
    if ppo_args.num_ppo_epochs < 1:
        raise SystemExit(f"error: --num_ppo_epochs must be at least 1, got {ppo_args.num_ppo_epochs}")
    local_mini = mini // world
    return {"batch": batch, "mini": mini, "local_batch": batch // world, "local_mini": local_mini,
            "micro": max(1, min(training_args.per_device_train_batch_size, local_mini))}


def build_optimizer(params: list, training_args):
    """torch's AdamW (--optim adamw_torch_fused, the default, or any AdamW variant's name) or SGD (--optim sgd)."""
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    if optim == "sgd":
        return torch.optim.SGD(params, lr=training_args.learning_rate, weight_decay=training_args.weight_decay)
    if "adamw" not in optim:
        raise SystemExit(f"error: --optim {optim}: PPO supports adamw_torch (the default) and sgd")
    if optim not in ("adamw_torch", "adamw_torch_fused"):
        logger.warning("--optim %s: PPO uses torch's AdamW", optim)
    return torch.optim.AdamW(params, lr=training_args.learning_rate, weight_decay=training_args.weight_decay,
                             betas=(training_args.adam_beta1, training_args.adam_beta2), eps=training_args.adam_epsilon)


def deepspeed_config(training_args, micro_batch_size: int, world: int, hidden_size: int) -> dict:
    """The --deepspeed config for PPO's own loop: its "auto" values filled, gradients accumulated over any number of
    micro-batches and reduced at engine.step() (managed_gradient_accumulation false), the client optimizer allowed.
    ZeRO-3 and an "optimizer"/"scheduler" section are one-line errors."""
    from ..distributed import check_deepspeed_config

    where = f"--deepspeed {training_args.deepspeed}" if isinstance(training_args.deepspeed, str) else "--deepspeed"
    config = copy.deepcopy(training_args.deepspeed if isinstance(training_args.deepspeed, dict)
                           else check_deepspeed_config(training_args.deepspeed))
    zero = config.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage == 3:
        raise SystemExit(f"error: {where}: PPO cannot run under ZeRO-3 (every process generates its rollouts with the "
                         "whole policy each step, which ZeRO-3 shards across processes); use zero2.json, or torchrun "
                         "without --deepspeed")
    if stage not in (0, 1, 2):
        raise SystemExit(f"error: {where}: PPO needs zero_optimization.stage 0, 1 or 2, got {stage!r}")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise SystemExit(f"error: {where}: remove its \"{section}\" section: PPO builds its own (--optim, "
                             "--learning_rate, --lr_scheduler_type)")
    clip = training_args.max_grad_norm if training_args.max_grad_norm and training_args.max_grad_norm > 0 else 0.0
    fill = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch_size * world, "gradient_clipping": clip}
    for key, value in fill.items():
        if config.get(key, "auto") != "auto" and config[key] != value:
            logger.warning("%s: %s %s replaced by %s (set by PPO's batch layout and --max_grad_norm)",
                           where, key, config[key], value)
        config[key] = value
    for key, enabled in (("fp16", training_args.fp16), ("bf16", training_args.bf16)):
        if key in config and config[key].get("enabled", "auto") == "auto":
            config[key]["enabled"] = bool(enabled)
    for key, value in list(zero.items()):
        if value == "auto":
            if key == "reduce_bucket_size":
                zero[key] = hidden_size * hidden_size
            else:
                del zero[key]  # DeepSpeed's default
    config["zero_allow_untested_optimizer"] = True
    config["managed_gradient_accumulation"] = False
    return config


# ---------------------------------------------------------------------------------------------------
# The reference model

class Reference:
    """Log-probs of the frozen starting policy, without a second copy of the base weights under LoRA.

    mode "disable": a new LoRA adapter on the SFT model; the reference is the model with it switched off.
    mode "adapter": the policy continues a trained adapter (the SFT LoRA); a frozen copy of it, loaded
                    as adapter "ref", is swapped in for the reference pass.
    mode "model":   full-parameter training; the reference is a frozen copy of the starting model.
    """

    def __init__(self, policy, mode: str, adapter_path: Optional[str] = None):
        self.policy, self.mode, self.model = policy, mode, None
        if mode == "adapter":
            policy.load_adapter(adapter_path, adapter_name=REF_ADAPTER, is_trainable=False)
            policy.set_adapter("default")  # keeps "default" trainable, "ref" frozen
        elif mode == "model":
            self.model = copy.deepcopy(policy).eval()
            self.model.requires_grad_(False)
        elif mode != "disable":
            raise ValueError(f"unknown reference mode {mode!r}")

    @contextlib.contextmanager
    def active(self):
        """Within the block, `self.forward_model` computes the reference."""
        if self.mode == "disable":
            with self.policy.disable_adapter():
                yield self.policy
        elif self.mode == "adapter":
            self.policy.set_adapter(REF_ADAPTER)
            try:
                yield self.policy
            finally:
                self.policy.set_adapter("default")
        else:
            yield self.model


# ---------------------------------------------------------------------------------------------------
# Prompt batches

def iterate_batches(prompts: list[dict], batch_size: int, num_batches: int, seed: int):
    """`num_batches` batches drawn from the prompts in a fresh shuffled order each epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(num_batches):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(prompts)))
                rng.shuffle(order)
            batch.append(prompts[order.pop()])
        yield batch


# ---------------------------------------------------------------------------------------------------

STAT_NAMES = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "ratio")


class PPOTrainer:
    """The PPO loop. `prompts`: dicts with "input_ids" (the rendered prompt's tokens) and "messages"
    (passed to `reward_fn` together with the decoded responses). Under torchrun every process runs it on the same
    prompts; each generates, scores and trains on its share of every batch (see the module docstring)."""

    def __init__(self, policy, tokenizer, reward_fn: RewardFn, args: PPOArguments, training_args,
                 reference: Reference, stop_ids: list[int], run_info: Optional[dict] = None):
        self.policy, self.tokenizer, self.reward_fn = policy, tokenizer, reward_fn
        self.args, self.targs, self.reference = args, training_args, reference
        self.stop_ids = stop_ids
        self.run_info = run_info or {}
        self.output_dir = training_args.output_dir
        self.procs = Processes(training_args)
        self.device = next(policy.parameters()).device
        disable_dropout(policy)
        hidden = policy.config.get_text_config().hidden_size
        self.value_head = ValueHead(hidden).to(policy.get_output_embeddings().weight.device)
        layout = batch_layout(args, training_args, self.procs.world)
        self.batch_size, self.mini_batch_size = layout["batch"], layout["mini"]
        self.local_batch_size, self.local_mini_batch_size = layout["local_batch"], layout["local_mini"]
        self.micro_batch_size = layout["micro"]
        params = [p for p in policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.procs.broadcast_(params)  # every process starts from rank 0's trainable weights
        self.optimizer = build_optimizer(params, training_args)
        self.actor = PolicyWithValue(policy, self.value_head)
        self.engine = None  # --deepspeed: the engine reduces, clips and steps (ZeRO-1/2 partition the optimizer)
        if training_args.deepspeed:
            import deepspeed

            config = deepspeed_config(training_args, self.micro_batch_size, self.procs.world, hidden)
            self.procs.start_alone()
            self.engine, *_ = deepspeed.initialize(model=self.actor, optimizer=self.optimizer, config=config)
        # --bf16 over float32 weights (a GPU, or a CPU with native bf16: medgpt.precision): the forward passes,
        # generation included, run under bf16 autocast as the HF Trainer's do; the weights, the optimizer and the PPO
        # losses stay float32. (--fp16 would need a loss scaler: PPO trains float16 weights only as loaded.)
        self.autocast_dtype = torch.bfloat16 if training_args.bf16 and \
            next(policy.parameters()).dtype == torch.float32 else None
        if self.autocast_dtype is not None:
            logger.info("PPO: forward passes and generation under bf16 autocast (float32 weights and optimizer)")
        self.kl_coef = args.kl_coef
        self.log_history: list[dict] = []
        self.global_step = 0
        self.episode = 0

    # ---------------------------------------------------------------- forward passes
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward(self, model, input_ids, attention_mask, response_len: int):
        """Temperature-scaled logits of the response positions ([B, R, V]) and their values: `model` is the policy
        with its value head (self.actor, or the DeepSpeed engine around it)."""
        with self._autocast():
            logits, values = model(input_ids, attention_mask, response_len + 1)
        return logits[:, :-1].float() / (self.args.temperature + 1e-7), values.float()

    def _reference_logits(self, model, input_ids, attention_mask, response_len: int):
        with self._autocast():
            logits = lm_forward(model, input_ids, attention_mask, response_len + 1).logits
        return logits[:, :-1].float() / (self.args.temperature + 1e-7)

    @staticmethod
    def _logprobs(logits, tokens):
        return torch.gather(F.log_softmax(logits, dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, batch: list[dict], first_index: int = 0) -> dict:
        """Responses, rewards, advantages and returns of `batch`, this process's share of the step's prompts;
        `first_index`: the position of its first prompt in the step's whole batch (it seeds the sampling)."""
        from transformers import LogitsProcessorList

        tok = self.tokenizer
        pad_id = tok.pad_token_id
        prompt_len = max(len(p["input_ids"]) for p in batch)
        prompt_ids = torch.full((len(batch), prompt_len), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt_ids)
        for i, p in enumerate(batch):  # left padding: every response starts at the same column
            n = len(p["input_ids"])
            prompt_ids[i, prompt_len - n:] = torch.tensor(p["input_ids"])
            prompt_mask[i, prompt_len - n:] = 1
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)

        self.policy.eval()
        sampler = GumbelMaxSampler([sample_seed(self.targs.seed, "sample", self.global_step, first_index + i)
                                    for i in range(len(batch))], self.args.temperature, self.device)
        with self._autocast():
            sequences = self.policy.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=self.args.response_length,
                do_sample=False, num_beams=1, temperature=None, top_k=None, top_p=None,
                logits_processor=LogitsProcessorList([sampler]), eos_token_id=self.stop_ids, pad_token_id=pad_id)
        responses = sequences[:, prompt_len:]
        # a response ends at its first stop token (kept: the model learns to stop); later tokens are padding
        is_stop = torch.isin(responses, torch.tensor(self.stop_ids, device=responses.device))
        after_stop = (is_stop.cumsum(-1) - is_stop.long()) > 0
        mask = (~after_stop).long()
        responses = responses.masked_fill(after_stop, pad_id)
        ended = is_stop.any(-1)
        lengths = mask.sum(-1)
        attention_mask = torch.cat([prompt_mask, mask], dim=1)
        input_ids = torch.cat([prompt_ids, responses], dim=1)
        R = responses.shape[1]

        logprobs, ref_logprobs, values = [], [], []
        for s in range(0, len(batch), self.micro_batch_size):
            sl = slice(s, s + self.micro_batch_size)
            logits, v = self._forward(self.actor, input_ids[sl], attention_mask[sl], R)
            logprobs.append(self._logprobs(logits, responses[sl]))
            values.append(v)
            with self.reference.active() as ref:
                ref_logits = self._reference_logits(ref, input_ids[sl], attention_mask[sl], R)
            ref_logprobs.append(self._logprobs(ref_logits, responses[sl]))
        logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)

        texts = []
        for row, n, end in zip(responses, lengths.tolist(), ended.tolist()):
            texts.append(tok.decode(row[: n - 1 if end else n], skip_special_tokens=True))
        scores = self.reward_fn([p["messages"] for p in batch], texts)
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).to(self.device)
        raw_scores = scores.clone()
        scores = scores - self.args.reward_baseline
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * (~ended).float()

        maskf = mask.float()
        kl = (logprobs - ref_logprobs) * maskf
        rewards = -self.kl_coef * kl
        last = (lengths - 1).clamp(min=0)
        rewards[torch.arange(len(batch), device=rewards.device), last] += scores
        if self.args.whiten_rewards:
            rewards = masked_whiten(rewards, maskf, shift_mean=False, reduce=self.procs.sum)
        advantages, returns = gae(rewards, values, maskf, self.args.gamma, self.args.lam)
        advantages = masked_whiten(advantages, maskf, reduce=self.procs.sum)
        return dict(input_ids=input_ids, attention_mask=attention_mask, responses=responses, mask=maskf,
                    logprobs=logprobs, values=values * maskf, advantages=advantages, returns=returns,
                    scores=raw_scores, kl=kl.sum(-1), non_score=(-self.kl_coef * kl).sum(-1),
                    lengths=lengths.float(), texts=texts)

    # ---------------------------------------------------------------- optimisation
    def _losses(self, data: dict, idx: torch.Tensor):
        """Sums over the response tokens of `idx`: the loss (policy + vf_coef * value) and, without gradient, the
        statistics of STAT_NAMES. The caller divides them by the minibatch's token count."""
        a = self.args
        R = data["responses"].shape[1]
        logits, vpred = self._forward(self.engine or self.actor, data["input_ids"][idx], data["attention_mask"][idx], R)
        mask = data["mask"][idx]
        new_logprobs = self._logprobs(logits, data["responses"][idx])
        old_logprobs, old_values = data["logprobs"][idx], data["values"][idx]
        adv, ret = data["advantages"][idx], data["returns"][idx]

        log_ratio = new_logprobs - old_logprobs
        ratio = torch.exp(log_ratio)
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - a.cliprange, 1 + a.cliprange)) * mask
        vclipped = old_values + (vpred - old_values).clamp(-a.cliprange_value, a.cliprange_value)
        vf = 0.5 * torch.max((vpred - ret) ** 2, (vclipped - ret) ** 2) * mask
        with torch.no_grad():
            stats = torch.stack([pg.sum(), vf.sum(), (entropy_from_logits(logits) * mask).sum(),
                                 (0.5 * log_ratio ** 2 * mask).sum(),
                                 (((ratio - 1).abs() > a.cliprange).float() * mask).sum(), (ratio * mask).sum()])
        return pg.sum() + a.vf_coef * vf.sum(), stats

    def optimise(self, data: dict, scheduler=None) -> dict:
        """`num_ppo_epochs` passes over the rollout in minibatches; each minibatch's loss is the mean over its
        response tokens on all processes (per-token sums divided by the token count summed over the processes,
        gradients summed over the processes), so it does not depend on the micro-batch size or the process count."""
        self.policy.train()
        n = data["responses"].shape[0]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        totals, count = None, 0
        for epoch in range(self.args.num_ppo_epochs):
            shuffle = torch.Generator().manual_seed(
                sample_seed(self.targs.seed, "shuffle", self.global_step, epoch, self.procs.rank))
            order = torch.randperm(n, generator=shuffle).to(self.device)
            minibatches = [order[s:s + self.local_mini_batch_size] for s in range(0, n, self.local_mini_batch_size)]
            tokens = self.procs.sum(torch.stack([data["mask"][mb].sum() for mb in minibatches])).clamp(min=1)
            stop = False
            for mb, n_tokens in zip(minibatches, tokens):
                sums = torch.zeros(len(STAT_NAMES), device=self.device)
                for m in range(0, len(mb), self.micro_batch_size):
                    loss, stats = self._losses(data, mb[m:m + self.micro_batch_size])
                    self._backward(loss / n_tokens)
                    sums += stats
                self._update(params)
                if scheduler is not None:
                    scheduler.step()
                mb_stats = self.procs.sum(sums) / n_tokens
                totals = mb_stats if totals is None else totals + mb_stats
                count += 1
                approx_kl = mb_stats[STAT_NAMES.index("approx_kl")].item()  # the same on every process
                if self.args.early_stopping and approx_kl > 1.5 * self.args.target_kl:
                    stop = True
                    break
            if stop:
                logger.info("Early stop at step %d: approx KL %.4f > 1.5 x target_kl %.4f",
                            self.global_step + 1, approx_kl, self.args.target_kl)
                break
        return dict(zip(STAT_NAMES, (totals / count).tolist()))

    def _backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:  # DeepSpeed averages gradients over the processes: make that their sum
            self.engine.backward(loss * self.procs.world, scale_wrt_gas=False)
        else:
            loss.backward()

    def _update(self, params: list) -> None:
        """One optimizer step on the summed gradients, then zero them."""
        if self.engine is not None:
            self.engine.step()  # reduce (ZeRO: scatter), clip (gradient_clipping), step, zero
            return
        self.procs.sum_grads(params)
        if self.targs.max_grad_norm and self.targs.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.targs.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------- the loop
    def plan(self, num_prompts: int) -> tuple[int, int]:
        """(total episodes, PPO steps) for a prompt set of this size."""
        total = self.args.total_episodes or int(math.ceil(self.targs.num_train_epochs * num_prompts))
        steps = max(1, math.ceil(total / self.batch_size))
        if self.targs.max_steps and self.targs.max_steps > 0:
            steps = min(steps, self.targs.max_steps)
        return total, steps

    def train(self, prompts: list[dict], resume_from_checkpoint: Optional[str] = None) -> dict:
        """Train for the planned steps (from a checkpoint-N folder's step when `resume_from_checkpoint` is given),
        then save the policy to output_dir. Only the main process writes files and logs progress."""
        from transformers import get_scheduler

        total, steps = self.plan(len(prompts))
        updates_per_step = self.args.num_ppo_epochs * math.ceil(self.batch_size / self.mini_batch_size)
        scheduler = get_scheduler(self.targs.lr_scheduler_type, self.optimizer,
                                  num_warmup_steps=self.targs.get_warmup_steps(steps * updates_per_step),
                                  num_training_steps=steps * updates_per_step)
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint, scheduler)
        main = self.procs.is_main
        log_path = os.path.join(self.output_dir, LOG_FILE)
        writer = None
        if main:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(log_path, "w", encoding="utf-8") as f:  # a resumed run keeps the steps it continues from
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.log_history)
            writer = self._tensorboard()
        logger.info("PPO: %d prompts, %d episodes -> %d steps of %d rollouts (minibatch %d, micro-batch %d, %d epochs each)%s",
                    len(prompts), total, steps, self.batch_size, self.mini_batch_size, self.micro_batch_size,
                    self.args.num_ppo_epochs,
                    f"; {self.procs.world} processes, {self.local_batch_size} rollouts each" if self.procs.world > 1 else "")
        start, first_episode = time.time(), self.episode
        interrupted = False
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # a killed job saves too
        share = slice(self.procs.rank * self.local_batch_size, (self.procs.rank + 1) * self.local_batch_size)
        try:
            batches = iterate_batches(prompts, self.batch_size, steps, self.targs.seed)
            for batch in itertools.islice(batches, self.global_step, None):
                data = self.rollout(batch[share], share.start)
                stats = self.optimise(data, scheduler)
                self.global_step += 1
                self.episode += len(batch)
                record = self._record(data, stats, scheduler, start, len(prompts))  # every process: gathers stats
                if main:
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    if writer is not None:
                        for k, v in record.items():
                            if isinstance(v, (int, float)) and k not in ("step",):
                                writer.add_scalar(f"train/{k}", v, self.global_step)
                if self.global_step % max(1, int(self.targs.logging_steps or 1)) == 0 or self.global_step in (1, steps):
                    logger.info("step %d/%d  reward %.4f  kl %.4f  policy_loss %.4f  value_loss %.4f  entropy %.3f  len %.1f",
                                self.global_step, steps, record["reward"], record["kl"], record["policy_loss"],
                                record["value_loss"], record["entropy"], record["response_length"])
                    logger.info("  sample: %r", data["texts"][0][:200])
                if self._should_save() and self.global_step % int(self.targs.save_steps) == 0 and self.global_step < steps:
                    self.save_checkpoint(os.path.join(self.output_dir, f"checkpoint-{self.global_step}"), scheduler, steps)
        except KeyboardInterrupt:
            interrupted = True
            logger.warning("Interrupted at step %d: saving the policy to %s", self.global_step, self.output_dir)
        finally:
            signal.signal(signal.SIGTERM, previous)
            if writer is not None:
                writer.close()
        runtime = time.time() - start
        metrics = {"train_runtime": round(runtime, 2), "episodes": self.episode, "steps": self.global_step,
                   "train_samples_per_second": round((self.episode - first_episode) / max(runtime, 1e-9), 3)}
        if self.log_history:
            metrics["reward_first"] = self.log_history[0]["reward"]
            metrics["reward_last"] = self.log_history[-1]["reward"]
        self.save(self.output_dir, metrics=metrics, max_steps=steps)
        if interrupted:
            raise KeyboardInterrupt
        self.procs.barrier()  # no process leaves before the main one has written the output
        return metrics

    def _record(self, data, stats, scheduler, start, num_prompts) -> dict:
        """The step's statistics over every process's samples (the same dict on every process)."""
        scores, kl, non_score, lengths = (self.procs.gather(data[k]) for k in ("scores", "kl", "non_score", "lengths"))
        record = {
            "step": self.global_step,
            "episode": self.episode,
            "epoch": round(self.episode / max(num_prompts, 1), 4),
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "kl": kl.mean().item(),
            "non_score_reward": non_score.mean().item(),
            "response_length": lengths.mean().item(),
            **stats,
            "learning_rate": scheduler.get_last_lr()[0] if scheduler is not None else self.targs.learning_rate,
            "elapsed_s": round(time.time() - start, 2),
        }
        self.log_history.append(record)
        return record

    def _should_save(self) -> bool:
        strategy = str(getattr(self.targs.save_strategy, "value", self.targs.save_strategy))
        return strategy == "steps" and bool(self.targs.save_steps) and self.targs.save_steps >= 1

    def _tensorboard(self):
        report_to = self.targs.report_to or []
        if isinstance(report_to, str):
            report_to = [report_to]
        if "tensorboard" not in report_to:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("--report_to tensorboard: tensorboard is not installed, not reporting there")
            return None
        folder = (getattr(self.targs, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
                  or os.path.join(self.output_dir, "runs"))
        return SummaryWriter(folder)

    # ---------------------------------------------------------------- saving and resuming
    def save(self, path: str, metrics: Optional[dict] = None, max_steps: Optional[int] = None) -> None:
        """The policy (adapter or full model), tokenizer, value head, run info and trainer_state.json, so
        `inference.py --lora_model PATH` (adapter) or `--base_model PATH` (full model) loads it. Main process only."""
        from safetensors.torch import save_file

        from ..generation import write_run_info

        if not self.procs.is_main:
            return
        os.makedirs(path, exist_ok=True)
        model = self.policy
        model.config.use_cache = True
        if hasattr(model, "peft_config"):
            model.save_pretrained(path, selected_adapters=["default"])
        else:
            model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  os.path.join(path, VALUE_HEAD_FILE))
        write_run_info(path, stage="ppo", **self.run_info)
        state = {"global_step": self.global_step, "max_steps": max_steps, "episode": self.episode,
                 "batch_size": self.batch_size, "mini_batch_size": self.mini_batch_size, "seed": self.targs.seed,
                 "world_size": self.procs.world, "log_history": self.log_history}
        with open(os.path.join(path, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
        if metrics is not None:
            for name in ("train_results.json", "all_results.json"):
                with open(os.path.join(path, name), "w", encoding="utf-8") as f:
                    json.dump(metrics, f, indent=2)
        logger.info("Saved the PPO policy to %s", path)

    def save_checkpoint(self, path: str, scheduler, max_steps: Optional[int] = None) -> None:
        """save() plus what resuming needs: optimizer, scheduler and RNG state (the same on every process, so the
        main process's copy serves all; under DeepSpeed every process writes its optimizer partition)."""
        import numpy as np

        if self.engine is not None:  # collective: every process
            self.engine.save_checkpoint(path, tag=DEEPSPEED_TAG, exclude_frozen_parameters=True, save_latest=False)
        if not self.procs.is_main:
            return
        self.save(path, max_steps=max_steps)
        if self.engine is None:
            torch.save(self.optimizer.state_dict(), os.path.join(path, OPTIMIZER_FILE))
        torch.save(scheduler.state_dict(), os.path.join(path, SCHEDULER_FILE))
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                   os.path.join(path, RNG_FILE))

    def load_checkpoint(self, path: str, scheduler) -> None:
        """Continue from a checkpoint-N folder that save_checkpoint wrote: trainable weights, value head, optimizer,
        scheduler, RNG, step and log. (Rollout sampling and minibatch shuffles are seeded per step, so nothing else
        carries state from one step to the next.)"""
        import numpy as np
        from safetensors.torch import load_file

        where = f"--resume_from_checkpoint {path}"
        for name in ("trainer_state.json", VALUE_HEAD_FILE, SCHEDULER_FILE):
            if not os.path.isfile(os.path.join(path, name)):
                raise SystemExit(f"error: {where}: no {name} there: not a PPO checkpoint (ppo_training.py writes "
                                 "checkpoint-N folders every --save_steps steps)")
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        written_by_deepspeed = os.path.isdir(os.path.join(path, DEEPSPEED_TAG))
        if written_by_deepspeed != (self.engine is not None):
            raise SystemExit(f"error: {where} was written {'with' if written_by_deepspeed else 'without'} --deepspeed: "
                             f"resume {'with' if written_by_deepspeed else 'without'} it")
        if self.engine is not None and state.get("world_size") != self.procs.world:
            raise SystemExit(f"error: {where}: a DeepSpeed checkpoint of {state.get('world_size')} processes (its "
                             f"optimizer is partitioned that way): resume with --nproc_per_node {state.get('world_size')}")
        for key, now in (("batch_size", self.batch_size), ("mini_batch_size", self.mini_batch_size)):
            if state.get(key) is not None and state[key] != now:
                raise SystemExit(f"error: {where} was trained with --{key} {state[key]}, this run has {now}: "
                                 f"resume with --{key} {state[key]}")
        if state.get("seed") is not None and state["seed"] != self.targs.seed:
            logger.warning("%s was trained with --seed %s, this run has --seed %s: later rollouts differ from an "
                           "uninterrupted run's", where, state["seed"], self.targs.seed)
        self._load_trainable(path, where)
        self.value_head.load_state_dict(load_file(os.path.join(path, VALUE_HEAD_FILE), device=str(self.device)))
        if self.engine is not None:  # its optimizer partitions, and the fp32 weights the next steps update
            self.engine.load_checkpoint(path, tag=DEEPSPEED_TAG, load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            self.optimizer.load_state_dict(torch.load(os.path.join(path, OPTIMIZER_FILE), map_location=self.device,
                                                      weights_only=True))
        scheduler.load_state_dict(torch.load(os.path.join(path, SCHEDULER_FILE), weights_only=True))
        rng_path = os.path.join(path, RNG_FILE)
        if os.path.isfile(rng_path):
            rng = torch.load(rng_path, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
        self.global_step, self.episode = int(state["global_step"]), int(state.get("episode", 0))
        self.log_history = list(state.get("log_history", []))
        logger.info("Resuming from %s at step %d", path, self.global_step)

    def _load_trainable(self, path: str, where: str) -> None:
        from safetensors.torch import load_file

        if hasattr(self.policy, "peft_config"):
            from peft import set_peft_model_state_dict

            file = os.path.join(path, "adapter_model.safetensors")
            if not os.path.isfile(file):
                raise SystemExit(f"error: {where}: no adapter_model.safetensors there (a full-parameter checkpoint? "
                                 "resume with the --use_peft of the run that wrote it)")
            result = set_peft_model_state_dict(self.policy, load_file(file), adapter_name="default")
            unexpected = list(getattr(result, "unexpected_keys", None) or [])
            if unexpected:
                raise SystemExit(f"error: {where}: the adapter does not fit this policy (e.g. {unexpected[0]}): "
                                 "resume with the model and LoRA flags of the run that wrote it")
            return
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f != VALUE_HEAD_FILE)
        if not files or "adapter_model.safetensors" in files:
            raise SystemExit(f"error: {where}: no full model weights there (a LoRA checkpoint? resume with the "
                             "--use_peft of the run that wrote it)")
        state = {}
        for f in files:
            state.update(load_file(os.path.join(path, f)))
        missing = [n for n, p in self.policy.named_parameters() if p.requires_grad and n not in state]
        if missing:
            raise SystemExit(f"error: {where}: {missing[0]} is missing from the checkpoint's weights")
        self.policy.load_state_dict(state, strict=False)
