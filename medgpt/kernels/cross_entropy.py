"""The LM head and the next-token cross-entropy as one op, for heads that are a plain bias-free Linear.

`linear_cross_entropy` computes the loss chunk by chunk, with the gradient with respect to the hidden states (and
the head weight, if it trains) computed in the forward, as Liger-Kernel's fused linear cross-entropy does; Liger's
kernels are Triton (GPU) only. So no [positions, vocab] logits, their log-softmax or their gradient outlive one
chunk: with SmolLM2's 49,152-token vocabulary that is 200 KB a position that would otherwise be kept from the forward
to the backward (0.4 GB for a 2,000-position batch). `plain_head` and `hidden_instead_of_logits` let a model's forward
return the hidden states its head would project, for the models whose head is such a Linear. Same loss and
gradients as the model's own head and cross-entropy up to float rounding (tests/test_packing.py, tests/test_bf16.py).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..data.sft import IGNORE_INDEX
from . import ROWS

CHUNK = 1024  # positions per chunk: [1024, vocab] float logits (200 MB for a 49k vocabulary) at a time


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, target_i) over targets != -100; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None  # every chunk fills its rows
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dtype = _matmul_dtype(hidden, weight)  # bf16 matmuls; the softmax, the loss and grad_w in float32
        w = weight.to(dtype)
        # bf16 on a CPU: oneDNN compiles a kernel per matmul shape (medgpt.data.collator.pad_packed_row), so the last,
        # odd-sized chunk is padded with ignored rows to a multiple of ROWS
        multiple = ROWS if dtype in (torch.bfloat16, torch.float16) and hidden.device.type == "cpu" else 1
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]
            n, extra = len(t), -len(t) % multiple
            if extra:
                h, t = F.pad(h, (0, 0, 0, extra)), F.pad(t, (0, extra), value=IGNORE_INDEX)
            valid = t.ne(IGNORE_INDEX)
            t = t.masked_fill(~valid, 0)
            logits = h @ w.t()
            if dtype is torch.bfloat16:
                # softmax straight from the bf16 logits (one kernel, float32 inside, bf16 out) and the loss from the
                # target's probability: the float32 logsumexp path below costs ~8 float32 passes over [chunk, vocab]
                # (measured: 332 -> 162 ms for 704 positions x 49,152 of SmolLM2, of which 161 ms are the two
                # matmuls; loss and gradient within 1e-6 and 2e-5 of it)
                probs = torch.softmax(logits, dim=-1)
                target_p = probs.gather(1, t[:, None]).squeeze(1).float()
                total = total + torch.where(valid, -target_p.log(), 0.0).sum()
            else:
                logits = logits.float()
                lse = torch.logsumexp(logits, dim=-1)
                total = total + ((lse - logits.gather(1, t[:, None]).squeeze(1)) * valid).sum()
                if need_h or need_w:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            if need_h or need_w:
                rows = torch.arange(len(t), device=t.device)
                probs[rows, t] -= 1.0  # d CE / d logits = softmax - one-hot
                if not bool(valid.all()):
                    probs.mul_(valid[:, None].to(probs.dtype))
                probs = probs.to(dtype)
                if need_h:
                    grad_h[start:start + chunk] = (probs @ w)[:n]
                if need_w:
                    grad_w += (probs.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad).to(ctx.weight_dtype), None, None)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The head's matmul dtype: a half-precision head weight's own; else autocast's, when it is on (mixed precision
    with float32 weights: the Trainer runs the loss under the accelerator's autocast); else the hidden states'."""
    if weight.dtype in (torch.bfloat16, torch.float16):
        return weight.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK) -> torch.Tensor:
    """Summed cross-entropy of the logits `hidden @ weight^T` ([n, d] x [vocab, d]) against `targets` ([n], -100
    ignored), without keeping [n, vocab] tensors for backward."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


# Causal LMs whose forward is `logits = lm_head(hidden_states[:, positions])` with nothing after the head (no logit
# scaling or soft-capping): the hidden states the head sees can stand in for the logits. (The MoE ones return their
# router load-balancing loss as `aux_loss` beside the logits; medgpt/moe.py adds it.)
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "olmo2", "smollm3",
                          "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"}


class _Passthrough(torch.nn.Module):
    def forward(self, hidden):
        return hidden


def plain_head(model):
    """(the transformers model, its head's attribute name) when `model`'s head is a plain bias-free Linear that
    `linear_cross_entropy` can replace; else None."""
    from ..data.collator import base_pretrained_model

    base = base_pretrained_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if getattr(base.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or type(head) is not torch.nn.Linear \
            or head.bias is not None or head.weight.dim() != 2 or head.weight.numel() == 0:  # ZeRO-3 shards weights
        return None
    name = next((n for n, child in base.named_children() if child is head), None)
    return (base, name) if name else None


@contextlib.contextmanager
def hidden_instead_of_logits(base, name: str):
    """Within the block, the model's forward returns the hidden states its head would project as `logits`."""
    head = getattr(base, name)
    setattr(base, name, _Passthrough())
    try:
        yield head.weight
    finally:
        setattr(base, name, head)
