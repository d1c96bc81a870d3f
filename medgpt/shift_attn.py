"""LongLoRA's shifted sparse attention (S²-Attn, Chen et al. 2023) for training on long contexts (--shift_attn).

In training, each attention layer attends within groups of G tokens (G = a quarter of the training length,
--model_max_length or --block_size, as LongLoRA's group_size_ratio 1/4): half of the heads over the groups
[0, G), [G, 2G), ..., the other half over groups shifted by half a group, [0, G/2), [G/2, 3G/2), ..., so information
flows between neighbouring groups through the shifted heads. Attention stays causal inside a group. Evaluation and
generation (the module in eval mode, or one query at a time) use full attention, as in LongLoRA: the model is
trained cheaply and used with its whole context. Together with --rope_scaling this is LongLoRA's recipe.

Groups are counted from each sample's first token, so they compose with our packing: in a packed row every sample is
split into its own groups (no group spans two samples), and a sample is grouped the same whether it is packed or
padded. Unlike LongLoRA's reference code, which rolls the shifted heads by G/2 so that its last group mixes the
sequence's last and first tokens (those first tokens then see the end of the sequence), the shifted heads here start
with a half group: a token sees only earlier tokens of its own group.

Written as a transformers attention function (`AttentionInterface`) because transformers has no grouped attention;
it works for every model whose attention layers call that interface with rotary-embedded queries and keys (Llama,
Mistral, Qwen2/3, Mixtral, Qwen-MoE, ...). Packed rows run group by group on sdpa's causal kernel (cost per sample
~ len * G instead of len^2); padded batches with padding use one explicit mask per head half.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .data.collator import base_pretrained_model
from .kernels.packed_attention import VARLEN_SDPA, register_sdpa_attention, varlen_sdpa_attention

logger = logging.getLogger(__name__)

S2_ATTN = "medgpt_s2_sdpa"
GROUP_RATIO = 4  # groups of a quarter of the training length (LongLoRA's group_size_ratio = 1/4)


def group_size_for(training_length: int) -> int:
    return max(2, training_length // GROUP_RATIO)


def _causal(q, k, v, scale, dropout):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout)


def grouped_causal_attention(q, k, v, group: int, first: int, scale=None, dropout: float = 0.0):
    """Causal attention of one sequence ([batch, heads, n, dim], as many key/value heads as query heads) within the
    groups [0, first), [first, first + group), ... (the last one possibly shorter)."""
    b, h, n, d = q.shape
    head = min(first, n)
    outputs = [_causal(q[:, :, :head], k[:, :, :head], v[:, :, :head], scale, dropout)]
    whole = (n - head) // group * group  # full groups after the first: one sdpa call, groups as batch entries
    if whole:
        m = whole // group

        def grouped(x):
            return x[:, :, head:head + whole].reshape(b, h, m, group, x.shape[-1]).transpose(1, 2).reshape(
                b * m, h, group, x.shape[-1])

        out = _causal(grouped(q), grouped(k), grouped(v), scale, dropout)
        outputs.append(out.reshape(b, m, h, group, out.shape[-1]).transpose(1, 2).reshape(b, h, whole, -1))
    if head + whole < n:
        tail = slice(head + whole, n)
        outputs.append(_causal(q[:, :, tail], k[:, :, tail], v[:, :, tail], scale, dropout))
    return torch.cat(outputs, dim=2)


def s2_visible(positions: torch.Tensor, group: int, shifted: bool) -> torch.Tensor:
    """[..., n, n] bool: query i sees key j iff j <= i and both lie in the same (shifted) group, by position id."""
    ids = (positions + (group // 2 if shifted else 0)) // group
    n = positions.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=positions.device).tril()
    return causal & (ids[..., :, None] == ids[..., None, :])


def _repeat_kv(x, n_rep: int):
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def shifted_sparse_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, cu_seq_lens_k=None,
                             **kwargs):
    """S²-Attn in training (see the module docstring); full attention (medgpt's varlen sdpa) otherwise."""
    group = getattr(module, "s2_group_size", None)
    if not group or not module.training or query.shape[2] == 1 or key.shape[2] != query.shape[2]:
        return varlen_sdpa_attention(module, query, key, value, attention_mask, cu_seq_lens_q=cu_seq_lens_q,
                                     cu_seq_lens_k=cu_seq_lens_k, **kwargs)
    scale, dropout = kwargs.get("scaling"), kwargs.get("dropout", 0.0)
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    half = query.shape[1] // 2  # heads [0, half) unshifted, [half, H) shifted by G/2 (as LongLoRA)

    def both_halves(q, k, v):
        return torch.cat([grouped_causal_attention(q[:, :half], k[:, :half], v[:, :half], group, group, scale, dropout),
                          grouped_causal_attention(q[:, half:], k[:, half:], v[:, half:], group, group // 2, scale,
                                                   dropout)], dim=1)

    if cu_seq_lens_q is not None:  # a packed row: every sample grouped from its own first token
        if query.shape[0] != 1:
            raise ValueError("packed attention expects one flattened row")
        lengths = torch.diff(cu_seq_lens_q).tolist()
        out = torch.cat([both_halves(q, k, v) for q, k, v in zip(query.split(lengths, dim=2),
                                                                 key.split(lengths, dim=2),
                                                                 value.split(lengths, dim=2))], dim=2)
    elif attention_mask is None:  # unpadded rows: one sequence each
        out = both_halves(query, key, value)
    else:  # padded rows: the model's mask (causal + padding) and the groups, by position in the row
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        positions = torch.arange(query.shape[2], device=query.device)
        outs = []
        for heads, shifted in ((slice(0, half), False), (slice(half, None), True)):
            visible = mask[..., -query.shape[2]:, -key.shape[2]:] & s2_visible(positions, group, shifted)
            outs.append(F.scaled_dot_product_attention(query[:, heads], key[:, heads], value[:, heads],
                                                       attn_mask=visible, scale=scale, dropout_p=dropout))
        out = torch.cat(outs, dim=1)
    return out.transpose(1, 2).contiguous(), None


def _attention_layers(base) -> list:
    """The attention modules that call transformers' attention interface with grouped-query heads."""
    return [m for m in base.modules() if type(m).__name__.endswith("Attention")
            and hasattr(m, "num_key_value_groups") and hasattr(m, "config")]


def enable_shift_attn(model, training_length: int, flag_name: str = "--model_max_length") -> int:
    """Train `model` with S²-Attn in groups of a quarter of `training_length`; returns the group size. Call it after
    the collator was chosen (build_collator / enable_packing). A model it cannot run in is a one-line error."""
    base = base_pretrained_model(model)
    name = type(base).__name__
    impl = getattr(base.config, "_attn_implementation", None)
    layers = _attention_layers(base)
    if not getattr(base, "_supports_attention_backend", False) or not layers:
        raise SystemExit(f"error: --shift_attn: {name} has no attention layers that S²-Attn can run in (it needs a "
                         "model whose attention uses transformers' attention interface, e.g. Llama, Mistral, Qwen)")
    heads = getattr(base.config.get_text_config(), "num_attention_heads", 0) or 0
    if heads < 2:
        raise SystemExit(f"error: --shift_attn: {name} has {heads} attention head(s); S²-Attn shifts half of them")
    group = group_size_for(training_length)
    window = getattr(base.config, "sliding_window", None)
    if window and window < group:
        raise SystemExit(f"error: --shift_attn: the groups ({group} tokens, a quarter of {flag_name} "
                         f"{training_length}) are longer than {name}'s sliding window ({window})")
    if impl not in ("sdpa", VARLEN_SDPA, S2_ATTN):
        logger.warning("--shift_attn: S²-Attn runs on sdpa; the model's '%s' attention is not used", impl)
    for layer in layers:
        layer.s2_group_size = group
    base.set_attn_implementation(register_sdpa_attention(S2_ATTN, shifted_sparse_attention))
    logger.info("S²-Attn (LongLoRA shift short attention) in training: groups of %d tokens (a quarter of %s %d), "
                "half of the %d heads shifted by %d, within each sample; evaluation and generation use full attention",
                group, flag_name, training_length, heads, group // 2)
    return group
