"""Causal-LM loss without full-vocabulary logits, and the lean Trainer that uses it.

A causal LM's forward normally projects every position onto the vocabulary: for SmolLM2 that is
49,152 floats per token (a [4, 512] batch: 400 MB of logits, plus as much again for their softmax and
gradient), while only the positions whose next token is supervised (the assistant replies, ~60-65%
of real tokens in chat SFT, none of the padding) enter the loss. transformers models accept
`logits_to_keep` as a tensor of positions, so the model's own head (with its soft-capping or logit
scaling, if any) runs on those positions only; the cross-entropy is then summed and divided by the
same token count the Trainer uses for its own loss (`num_items_in_batch`), so the loss, and so
training, is the same as the model's loss on full logits up to float error. Hand-written because
transformers' Trainer and loss functions do not select positions before the head, and TRL's
`add_fused_lm_head` (tiled log-probs) skips unsupervised positions only on Triton devices: on CPU it
projects every position, so the head costs as much as full logits there. For plain Linear heads the kept
positions then go through `medgpt.kernels.cross_entropy.linear_cross_entropy` (head and loss fused,
chunked), so not even the kept logits are stored for backward.
"""
from __future__ import annotations

import contextlib
import inspect
import logging

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..data.collator import TokenStats, base_pretrained_model, pad_packed_row, split_packed_batch
from ..data.sft import IGNORE_INDEX
from ..kernels import ROWS
from ..kernels import use_cpu_fast_paths
from ..kernels.cross_entropy import hidden_instead_of_logits, linear_cross_entropy, plain_head
from ..moe import aux_loss_coef, check_zero3, log_aux_loss_choice, router_aux_term, set_aux_loss_coef

logger = logging.getLogger(__name__)


def accepts_logits_to_keep(model) -> bool:
    base = base_pretrained_model(model)
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def supervised_lm_loss(model, inputs: dict, num_items_in_batch=None):
    """Next-token cross-entropy computed from logits at supervised positions only.

    `inputs` holds input_ids, labels and the model's other inputs (attention_mask or packed
    position_ids/cu_seq_lens). Returns (loss, outputs) where outputs.logits covers only the kept
    positions: [batch, kept, vocab], or is None when the loss was fused with the head. The loss is the sum over
    supervised tokens divided by `num_items_in_batch` (the Trainer's count across gradient accumulation) or, without
    it, by this batch's supervised token count, exactly as transformers' ForCausalLMLoss divides.

    When gradients are on and the model's head is a plain Linear (medgpt.kernels.cross_entropy.plain_head), the model
    returns its final hidden states at those positions instead of logits and `linear_cross_entropy` applies the head
    chunk by chunk, so no [positions, vocab] tensor is kept for backward."""
    labels = inputs["labels"]
    targets = labels[..., 1:]
    # positions whose next token is supervised in any row (padded batches share one set of positions)
    keep = targets.ne(IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    head = plain_head(model) if torch.is_grad_enabled() else None
    with hidden_instead_of_logits(*head) if head else contextlib.nullcontext() as head_weight:
        outputs = model(**model_inputs, use_cache=False, logits_to_keep=keep)
    targets = targets[:, keep].to(outputs.logits.device)
    if head:
        hidden, outputs.logits = outputs.logits, None
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head_weight, targets.reshape(-1))
    else:
        logits = outputs.logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.ne(IGNORE_INDEX).sum()
    if torch.is_tensor(count):
        count = count.to(loss.device).clamp(min=1)
    else:
        count = max(int(count), 1)
    return loss / count, outputs


def step_rows(trainer, model, rows: list[dict], training_step, num_items_in_batch=None):
    """Run the rows of one optimizer step one after another with `training_step` (a Trainer's own): their
    gradients accumulate locally and DDP syncs once, on the last row. Returns the summed (detached) loss."""
    total = 0.0
    for i, row in enumerate(rows):
        sync = contextlib.nullcontext() if i == len(rows) - 1 else trainer.accelerator.no_sync(model)
        with sync:
            total = total + training_step(model, row, num_items_in_batch)
    return total


def bf16_on_cpu(model, args) -> bool:
    """Whether `model` trains in bf16 on a CPU: --bf16 (autocast) or bf16 weights."""
    return args.device.type == "cpu" and (args.bf16 or any(p.dtype == torch.bfloat16 for p in model.parameters()))


def default_max_packed_tokens(sample_tokens: int, model, args) -> int:
    """The default row length of packed batches (LeanTrainer's max_packed_tokens) for samples of at most
    `sample_tokens` (--model_max_length, --block_size): two samples' worth, or three and a half in bf16 on a CPU,
    where oneDNN's AMX matmuls and the per-row costs gain more from longer rows. Measured on the 2-core Xeon with
    AMX-BF16 (SmolLM2-135M, LoRA r8 on all linear layers, batches of 4 samples of up to 512 tokens; in-process A/B,
    each batch run A B B A): a bf16 step with rows of 1792 tokens and LoRA dropout masks kept as bool (LeanTrainer's
    compact masks, which pay for the rows' memory) took 0.90x the time of rows of 1024 with bf16 masks (1536: 0.92x;
    2048 with bf16 masks: 0.86x), a float32 step with rows of 2048 0.96x. Peak RSS of that SFT run in bf16: 3.16 GB with rows of 1792, 3.59 GB with 2048, against
    3.36 GB in float32 with rows of 1024 (its default), so bf16 stays within float32's memory."""
    return 7 * sample_tokens // 2 if bf16_on_cpu(model, args) else 2 * sample_tokens


class TokenCountingTrainer(Trainer):
    """transformers' Trainer that counts the tokens of its training batches (processed, real,
    supervised; pad fraction) and adds them, with supervised tokens per second, to the train metrics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_stats = TokenStats()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.token_stats.update(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        stats = self.token_stats.summed_over(self.accelerator)  # all processes' tokens
        result.metrics.update(stats.metrics("train"))
        runtime = result.metrics.get("train_runtime")
        if runtime:
            result.metrics["train_supervised_tokens_per_second"] = round(stats.supervised / runtime, 3)
        return result


class LeanTrainer(TokenCountingTrainer):
    """The Trainer of our stages: `supervised_lm_loss` (no full-vocabulary logits), token accounting,
    and, for packed batches, rows of at most `max_packed_tokens` run one after another within one
    optimizer step (activation memory bounded by one row, not by the whole batch)."""

    def __init__(self, *args, lean_loss: bool = True, max_packed_tokens: int | None = None,
                 router_aux_loss_coef: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_packed_tokens = max_packed_tokens
        # MoE: the router's load-balancing loss, weighted as the model's own forward weights it (medgpt/moe.py)
        check_zero3(self.model)
        self.aux_coef = aux_loss_coef(self.model, router_aux_loss_coef)
        set_aux_loss_coef(self.model, self.aux_coef)
        log_aux_loss_choice(self.model, self.aux_coef)
        self._aux_losses: list[float] = []
        # (bool LoRA dropout masks: in bf16 their memory goes to longer rows, see default_max_packed_tokens)
        use_cpu_fast_paths(self, self.model, compact_masks=True)
        self.lean_loss = lean_loss and accepts_logits_to_keep(self.model)
        if lean_loss and not self.lean_loss:
            logger.warning("%s has no logits_to_keep argument: computing the loss on full logits",
                           type(base_pretrained_model(self.model)).__name__)
        # bf16 on a CPU: packed rows rounded up to a multiple of ROWS tokens (see pad_packed_row)
        # (not for MoE models: filler tokens would enter the router's load-balancing loss)
        self.row_multiple = ROWS if self.lean_loss and not self.aux_coef and bf16_on_cpu(self.model, self.args) \
            else None

    def _bucketed(self, row: dict) -> dict:
        return pad_packed_row(row, self.row_multiple) if self.row_multiple and "cu_seq_lens_q" in row else row

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = split_packed_batch(inputs, self.max_packed_tokens) if "cu_seq_lens_q" in inputs else [inputs]
        if len(rows) == 1 or self.is_deepspeed_enabled:  # DeepSpeed steps inside backward: one pass per step
            return super().training_step(model, self._bucketed(inputs), num_items_in_batch)
        if num_items_in_batch is None:  # normalize every row by the whole batch, so the rows add up to its loss
            num_items_in_batch = inputs["labels"][..., 1:].ne(IGNORE_INDEX).sum()
        total = inputs["input_ids"].shape[1]
        for row in rows:  # MoE: each row's load-balancing loss weighted by its share of the batch's tokens
            row["aux_weight"] = row["input_ids"].shape[1] / total
        return step_rows(self, model, [self._bucketed(row) for row in rows], super().training_step, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        aux_weight, filler = inputs.get("aux_weight", 1.0), inputs.get("filler_tokens", 0)
        inputs = {k: v for k, v in inputs.items() if k not in ("aux_weight", "filler_tokens")}
        with_aux = bool(self.aux_coef) and model.training  # evaluation reports the LM loss (and its perplexity)
        if with_aux:
            inputs["output_router_logits"] = True
        if not self.lean_loss or "labels" not in inputs or self.label_smoother is not None:
            # (the model's own loss: with output_router_logits it adds router_aux_loss_coef * aux_loss itself)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.token_stats.update({**inputs, "filler_tokens": filler})
        with self.accelerator.autocast():  # --bf16: the fused head + loss outside the model's forward too
            loss, outputs = supervised_lm_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # the count is summed over devices and DDP averages gradients: scale back, as Trainer does
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        aux = router_aux_term(outputs, self.aux_coef) if with_aux else None
        if aux is not None:
            # the model's own `loss + coef * aux_loss`; with gradient accumulation each micro-batch's term is divided
            # by their number when the Trainer does not divide the loss itself (num_items_in_batch normalization),
            # so an optimizer step carries coef x the mean aux loss (transformers' Trainer would sum them)
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                aux_weight = aux_weight / max(getattr(self, "current_gradient_accumulation_steps", 1) or 1, 1)
            loss = loss + aux.to(loss.device) * aux_weight
            self._aux_losses.append(float(outputs.aux_loss.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs and self._aux_losses:  # the mean router load-balancing loss since the last log (this rank)
            logs["aux_loss"] = round(sum(self._aux_losses) / len(self._aux_losses), 6)
            self._aux_losses.clear()
        return super().log(logs, *args, **kwargs)
