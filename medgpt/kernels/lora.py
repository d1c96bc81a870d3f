"""LoRA on CPU without the elementwise overhead: a faster dropout mask and a fused LoRA branch.

Hand-written because peft's `lora.Linear.forward` runs `result + lora_B(lora_A(dropout(x))) * scaling` as separate
ops, each a full pass over a [tokens, features] tensor: dropout (mask, multiply, scale), the scaling multiply, the
add, and as many again in backward; and it keeps the dropped-out copy of `x` of every LoRA layer for backward (q, k
and v each keep their own copy of the same input). On a 2-core CPU those passes cost as much as the LoRA matmuls.
`use_fused_lora` gives each vanilla LoRA layer one autograd op: out = base(x) + (s / (1-p)) * ((x * mask) A^T) B^T,
computed with one masked copy (a multiply by the 0/1 float mask), one small matmul and one fused multiply-add into
the base layer's output; backward recomputes the masked input from `x` (shared by the layers that read it) and the
mask. Same math, same dropout masks for the same seed as peft with FastCPUDropout. Layers it does not cover (DoRA and
other variants, several active adapters, merged or disabled adapters, quantized base layers, other devices) keep
peft's forward.
In bf16 (--bf16 autocast or bf16 weights) the branch runs in bf16 with float32 adapter weights and gradients.
"""
from __future__ import annotations

import math
import types

import numpy as np
import torch


def keep_mask(shape, p: float, dtype=torch.bool) -> torch.Tensor:
    """A mask keeping each element with probability 1 - round(p * 65536) / 65536 (CPU). torch's CPU dropout
    draws one Mersenne-Twister number per element on one thread (16% of a LoRA SFT step on 2 cores); here each
    64-bit draw of numpy's SFC64 generator (twice as fast as torch's int64 `random_`) gives four 16-bit uniforms. The
    generator is seeded with one draw from torch's CPU generator, so torch.manual_seed (and a Trainer resuming its
    RNG state) still fixes every mask. `dtype`: bool, or a floating dtype for a 0/1 mask written by the comparison
    itself (bf16: 0.12 ms for [1024, 576] against 0.37 ms for a bool mask converted afterwards); same draws, same
    mask."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    draws = torch.from_numpy(np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]).view(shape)
    threshold = round(p * 65536) - 32768
    if dtype is torch.bool:
        return draws >= threshold
    return torch.ge(draws, threshold, out=torch.empty(shape, dtype=dtype))


class _Dropout(torch.autograd.Function):
    """x * keep / (1 - p), keeping only the bool mask for backward (1 byte an element, not 4)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None, None


class FastCPUDropout(torch.nn.Dropout):
    """Dropout for CPU tensors with `keep_mask` (measured: torch's own was 16% of a LoRA SFT step on 2 cores);
    an element is dropped with probability round(p * 65536) / 65536 (p=0.05: 0.050003). The same seed gives the
    same masks. Other devices use torch's own (fused) dropout."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu" or not x.is_floating_point():
            return super().forward(x)
        return _Dropout.apply(x, keep_mask(x.shape, self.p), 1.0 / (1.0 - self.p))


def use_fast_cpu_dropout(model) -> int:
    """Swap the LoRA dropouts of a PEFT model for FastCPUDropout; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in list(dropouts.items()):
                if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                    dropouts[name] = FastCPUDropout(dropout.p)
                    swapped += 1
    return swapped


def _as_float(keep: torch.Tensor, dtype) -> torch.Tensor:
    """The 0/1 float mask of a bool mask (a float mask as it is): multiplying by it is twice as fast as torch.where
    on a bool mask on CPU, and converting through uint8 three times as fast as bool -> float directly (measured,
    torch 2.13)."""
    return keep.to(dtype) if keep.is_floating_point() else keep.view(torch.uint8).to(dtype)


class _LoRABranch(torch.autograd.Function):
    """out = base + coef * ((x masked) @ A^T) @ B^T, saving x, the mask and the [tokens, r] hidden.

    Computed in the dtype of `base`, the base layer's output: bfloat16 under --bf16 (autocast) or with bf16 weights.
    peft keeps adapter weights in float32; they are cast for the matmuls (r rows: cheap) and their gradients come
    back in float32 (each matmul accumulates in float32 inside oneDNN, as autocast's own LoRA matmuls do on a GPU);
    x may be float32 (autocast over float32 weights): it is cast here and its gradient returned in its dtype."""

    @staticmethod
    def forward(ctx, x, base, weight_a, weight_b, keep, coef):
        dtype = base.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        masked = x2 if keep is None else x2 * _as_float(keep.reshape(x2.shape), dtype)
        hidden = (masked @ weight_a.to(dtype).t()).mul_(coef)
        ctx.save_for_backward(x, keep, hidden, weight_a, weight_b)
        ctx.coef = coef
        if not base.is_contiguous():
            return torch.addmm(base.reshape(-1, base.shape[-1]), hidden, weight_b.to(dtype).t()).view(base.shape)
        # the base layer's output is this op's alone: the branch is added into it (no new [tokens, out] tensor to
        # fill and copy: in-process A/B on B1's batches, a bf16 step 0.96x the time)
        base.view(-1, base.shape[-1]).addmm_(hidden, weight_b.to(dtype).t())
        ctx.mark_dirty(base)
        return base

    @staticmethod
    def backward(ctx, grad):
        x, keep, hidden, weight_a, weight_b = ctx.saved_tensors
        dtype = hidden.dtype
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_hidden = (g @ weight_b.to(dtype)).mul_(ctx.coef)  # d out / d (masked @ A^T)
        grad_x = grad_a = grad_b = None
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        mask = None if keep is None else _as_float(keep.reshape(x2.shape), dtype)
        if ctx.needs_input_grad[2]:
            masked = x2 if mask is None else x2 * mask
            grad_a = (grad_hidden.t() @ masked).to(weight_a.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = (g.t() @ hidden).to(weight_b.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = grad_hidden @ weight_a.to(dtype)
            if mask is not None:
                grad_x = grad_x.mul_(mask)
            grad_x = grad_x.view(x.shape).to(x.dtype)
        return grad_x, grad if ctx.needs_input_grad[1] else None, grad_a, grad_b, None, None


def _fused_forward(self, x, *args, **kwargs):
    """peft lora.Linear.forward for the common case (see the module docstring); anything else goes to peft."""
    fallback = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1 \
            or x.device.type != "cpu":
        return fallback(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A or name in self.lora_variant:
        return fallback(self, x, *args, **kwargs)
    lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
    if lora_a.bias is not None or lora_b.bias is not None or not x.is_floating_point() \
            or not (x.dtype == self.base_layer.weight.dtype or torch.is_autocast_enabled("cpu")) \
            or lora_a.weight.shape[-1] != x.shape[-1]:  # e.g. a sharded (ZeRO-3) weight
        return fallback(self, x, *args, **kwargs)
    base = self.base_layer(x)
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    # bf16/fp16: the mask in that dtype, kept for backward (1 byte an element more than a bool mask, and no
    # conversion in forward and again in backward: a bf16 step 0.96x the time), unless the layer was given compact
    # masks (use_fused_lora); float32 keeps the bool mask (3 bytes less)
    mask_dtype = base.dtype if base.dtype in (torch.bfloat16, torch.float16) and not self.medgpt_compact_masks \
        else torch.bool
    keep = keep_mask(x.shape, p, mask_dtype) if p > 0 else None
    return _LoRABranch.apply(x, base, lora_a.weight, lora_b.weight, keep, self.scaling[name] / (1.0 - p))


def use_fused_lora(model, compact_masks: bool = False) -> int:
    """Give every peft `lora.Linear` layer of `model` the fused CPU forward; returns how many layers got it.
    `compact_masks`: keep dropout masks as bool (1 byte an element) in bf16 too, where the memory buys more elsewhere
    (longer packed rows: medgpt.trainers.lm.default_max_packed_tokens)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            module.forward = types.MethodType(_fused_forward, module)
            module.medgpt_compact_masks = compact_masks
            count += 1
    return count
