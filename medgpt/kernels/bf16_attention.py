"""Causal attention for one bf16 sample on a CPU, used by the packed (per-sample) attention in bf16 training.

Hand-written because torch's CPU kernels lack a fast path for it (torch 2.13, measured on a 2-core Xeon with AMX-BF16,
9 query heads, 3 KV heads, head size 64, lengths 100-512, forward + backward):
- sdpa's CPU flash attention in bf16 builds kernels for every new sequence length (34 ms a sample when lengths vary,
  as in packed rows) and, even with lengths padded so it builds none, is no faster than in float32 (6.4 ms);
- the math backend and a plain composition of bf16 matmuls and a float32 softmax spend their time in elementwise
  passes over float32 score matrices and in oneDNN building a matmul kernel for each new length (11-25 ms).
Here each sample is padded to a multiple of 64 tokens (so oneDNN reuses eight kernel shapes; with causal attention
the padded keys are invisible to the real queries and the padded queries' outputs are dropped), the query heads that
share a KV head are stacked into one matrix (GQA without repeating K and V, and dK/dV summed by the matmul itself),
scores and probabilities stay bf16 (softmax and its backward accumulate in float32 inside torch's kernels), and the
probabilities are kept for the backward instead of recomputed: 4.1 ms a sample, output error against float32 0.4%
(float32 flash attention on the same bf16 inputs: 0.3%).
Kept probabilities cost 18 bytes per query-key pair and layer for SmolLM2's 9 heads (4.7 MB for a 512-token sample, 30
layers: 141 MB), so samples longer than MAX_LENGTH keep float32 flash attention, which keeps no such matrix.
"""
from __future__ import annotations

import math

import torch

from . import ROWS as _BLOCK  # padding unit: oneDNN builds one matmul kernel per shape

MAX_LENGTH = 512  # longer samples: float32 flash attention (memory; see above)
_BIASES: dict = {}


def _causal_bias(n: int, rep: int) -> torch.Tensor:
    """[rep * n, n] bf16: 0 where query i % n sees key j (j <= i % n), -inf above the diagonal. Added by the score
    matmul itself (baddbmm: 0.6 ms for 512 tokens and 9 heads, against 1.3 ms for bmm + masked_fill_)."""
    bias = _BIASES.get((n, rep))
    if bias is None:
        hidden = torch.ones(n, n, dtype=torch.bool).triu_(1)
        bias = torch.zeros(n, n, dtype=torch.bfloat16).masked_fill_(hidden, float("-inf")).repeat(rep, 1)
        _BIASES[(n, rep)] = bias
    return bias


class _CausalAttention(torch.autograd.Function):
    """q [1, H, L, D], k/v [1, G, L, D] (H a multiple of G) -> output [1, L, H, D] (transformers' layout)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        _, heads, n, dim = q.shape
        groups = k.shape[1]
        rep = heads // groups
        padded = -(-n // _BLOCK) * _BLOCK
        qs = q.new_zeros(groups, rep, padded, dim)
        qs[:, :, :n] = q[0].view(groups, rep, n, dim) * scale
        ks = k.new_zeros(groups, padded, dim)
        ks[:, :n] = k[0]
        vs = v.new_zeros(groups, padded, dim)
        vs[:, :n] = v[0]
        qs = qs.view(groups, rep * padded, dim)
        scores = torch.baddbmm(_causal_bias(padded, rep).expand(groups, -1, -1), qs, ks.transpose(1, 2))
        probs = torch.softmax(scores, dim=-1)
        out = torch.bmm(probs, vs).view(groups * rep, padded, dim)
        ctx.save_for_backward(qs, ks, vs, probs)
        ctx.scale, ctx.n = scale, n
        return out[:, :n].transpose(0, 1).unsqueeze(0)

    @staticmethod
    def backward(ctx, grad_out):
        qs, ks, vs, probs = ctx.saved_tensors
        scale, n = ctx.scale, ctx.n
        groups, rows, padded = probs.shape
        dim = qs.shape[-1]
        rep = rows // padded
        heads = groups * rep
        go = grad_out.new_zeros(heads, padded, dim, dtype=qs.dtype)
        go[:, :n] = grad_out[0].transpose(0, 1)
        go = go.view(groups, rows, dim)
        grad_v = torch.bmm(probs.transpose(1, 2), go)
        grad_p = torch.bmm(go, vs.transpose(1, 2))
        grad_s = torch._softmax_backward_data(grad_p, probs, -1, probs.dtype)
        grad_q = torch.bmm(grad_s, ks).mul_(scale).view(groups * rep, padded, dim)[:, :n]
        grad_k = torch.bmm(grad_s.transpose(1, 2), qs)[:, :n]  # qs carries the scale already
        return grad_q.unsqueeze(0), grad_k.unsqueeze(0), grad_v[:, :n].unsqueeze(0), None


def fits(module, query, key, mask, **kwargs) -> bool:
    """Whether `causal_attention` computes what transformers' sdpa attention would for this call (`kwargs`: the
    attention interface's: dropout, sliding_window, is_causal, softcap, ...)."""
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and key.dtype == torch.bfloat16
            and query.shape[0] == 1 and query.shape[2] == key.shape[2] and query.shape[1] % key.shape[1] == 0
            and query.shape[2] <= MAX_LENGTH and mask is None and not kwargs.get("dropout")
            and not kwargs.get("sliding_window") and kwargs.get("softcap") is None
            and kwargs.get("is_causal", getattr(module, "is_causal", True)))


def causal_attention(query, key, value, scaling=None) -> torch.Tensor:
    """Causal self-attention of one sample in bf16: query [1, H, L, D], key/value [1, G, L, D] -> [1, L, H, D]."""
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    return _CausalAttention.apply(query, key, value, scale)
