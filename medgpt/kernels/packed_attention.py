"""Attention that stays inside each sample of a packed row, for transformers' sdpa attention interface.

transformers has no variable-length sdpa: given restarted `position_ids` it builds a block-diagonal mask only when no
KV cache is passed (with the default use_cache=True samples attend to each other: packed logits off by 0.4-0.75), and
even then computes attention over the whole row. `varlen_sdpa_attention` is hand-written for that reason: it runs
sdpa once per sample (causal, no mask), so each sample sees exactly what it sees alone, whatever use_cache says, and
attention costs sum(len_i^2) instead of (sum len_i)^2. Packed preference pairs (`prompt + chosen + rejected`, see
medgpt.trainers.dpo.PairPackingCollator) get their shared-prefix layout. bf16 samples on a CPU go to
medgpt.kernels.bf16_attention. medgpt/data/collator.py builds the packed rows.
"""
from __future__ import annotations

import torch

from . import bf16_attention

VARLEN_SDPA = "medgpt_varlen_sdpa"


def _sdpa(module, query, key, value, mask, **kwargs):
    """transformers' sdpa attention for one sample. bf16/fp16 tensors on a CPU: causal bf16 samples go to
    medgpt.kernels.bf16_attention (bf16 matmuls, no per-length kernel builds); the rest runs in float32, because
    torch's CPU flash attention in bf16 compiles kernels for each new sequence length (measured: 34 ms for a 300-token
    sample's forward + backward when every length is new, as in packed rows, against 7 ms in float32)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.dtype not in (torch.bfloat16, torch.float16) or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)[0]
    if bf16_attention.fits(module, query, key, mask, **kwargs):
        return bf16_attention.causal_attention(query, key, value, kwargs.get("scaling"))
    with torch.autocast("cpu", enabled=False):  # (autocast would cast sdpa's inputs back to bf16)
        out = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)[0]
    return out.to(query.dtype)


def varlen_sdpa_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, cu_seq_lens_k=None,
                          **kwargs):
    """sdpa attention that, given `cu_seq_lens_q` (a packed row from the flattening collator), attends
    within each sample only. Without boundaries it is transformers' sdpa attention, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pair_lens = kwargs.pop("pair_lens", None)
    if cu_seq_lens_q is None or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError("packed attention expects one flattened row and no KV cache (pass use_cache=False)")
    window = kwargs.pop("sliding_window", None)
    if pair_lens is not None:
        return _shared_prefix_attention(module, query, key, value, pair_lens, window, **kwargs)
    lengths = torch.diff(cu_seq_lens_q).tolist()
    outputs = []
    # split (not one slice per sample): its backward is a single cat, where slices would each
    # allocate and add a zero gradient of the whole row
    for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)):
        n = q.shape[2]
        mask = None
        if window and n > window:  # sliding-window layers need an explicit mask; else sdpa's causal fast path
            pos = torch.arange(n, device=q.device)
            mask = _visible(pos, pos, window)
        outputs.append(_sdpa(module, q, k, v, mask, **kwargs))
    return torch.cat(outputs, dim=1), None


def _visible(q_pos, k_pos, window=None):
    """[1, 1, queries, keys] bool mask: key j is visible from query i iff k_pos[j] <= q_pos[i] (and, with a sliding
    window, q_pos[i] - k_pos[j] < window)."""
    diff = q_pos[:, None] - k_pos[None, :]
    mask = (diff >= 0) & (diff < window) if window else diff >= 0
    return mask[None, None]


def _shared_prefix_attention(module, query, key, value, pair_lens, window, **kwargs):
    """Attention over packed preference pairs, each laid out once as `prompt + chosen + rejected` (see
    medgpt.trainers.dpo.PairPackingCollator): prompt and chosen attend causally as one sequence; the rejected tokens
    attend to the prompt and causally to themselves, never to the chosen reply. So the prompt is encoded once per
    pair, and both replies see exactly what they see in a separate `prompt + reply` sequence (their position ids
    continue from the prompt)."""
    outputs = []
    lengths = [p + c + r for p, c, r in pair_lens]
    for (p, c, r), q, k, v in zip(pair_lens, query.split(lengths, dim=2), key.split(lengths, dim=2),
                                  value.split(lengths, dim=2)):
        first_mask = None
        if window and p + c > window:
            pos = torch.arange(p + c, device=q.device)
            first_mask = _visible(pos, pos, window)
        outputs.append(_sdpa(module, q[:, :, :p + c], k[:, :, :p + c], v[:, :, :p + c], first_mask, **kwargs))
        # rejected queries (positions p..p+r-1) over the prompt's keys and their own
        q_pos = torch.arange(p, p + r, device=q.device)
        k_pos = torch.cat([torch.arange(p, device=q.device), q_pos])
        keys = torch.cat([k[:, :, :p], k[:, :, p + c:]], dim=2)
        values = torch.cat([v[:, :, :p], v[:, :, p + c:]], dim=2)
        outputs.append(_sdpa(module, q[:, :, p + c:], keys, values, _visible(q_pos, k_pos, window), **kwargs))
    return torch.cat(outputs, dim=1), None


def register_sdpa_attention(name: str, function) -> str:
    """Register an sdpa-based attention `function` with transformers as `name` (once), with sdpa's own masks for
    padded batches. Returns the name, for `set_attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, function)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


def register_varlen_sdpa() -> str:
    """Register `varlen_sdpa_attention` with transformers (once); padded batches keep sdpa's own masks."""
    return register_sdpa_attention(VARLEN_SDPA, varlen_sdpa_attention)
