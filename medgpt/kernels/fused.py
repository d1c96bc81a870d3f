"""Fused replacements for the modules of Llama-layout models (transformers' Llama, Qwen2, Mistral, ... classes), each
swapped in only where the module's own forward source is exactly Llama's, so any other model keeps its code:

* `use_recomputed_swiglu`: a SwiGLU MLP (`down(silu(gate(x)) * up(x))`) keeps gate(x) and up(x) for its backward
  and recomputes silu there, instead of also keeping silu(gate(x)) (one [tokens, intermediate] tensor a layer:
  180 KB a token for SmolLM2's 30 layers). Any device.
* `use_fused_rmsnorm`: Llama's RMSNorm in bf16 as one autograd op (see `_RMSNorm`). CPU.
* `use_fused_rotary`: Llama's rotary position embedding as one autograd op per tensor (see `_Rotary`). CPU.

They give the same values and gradients as the unfused code up to float rounding (tests/test_packing.py,
tests/test_bf16.py).
"""
from __future__ import annotations

import inspect
import sys
import types

import torch
import torch.nn.functional as F


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # aten's silu_backward: grad * silu'(gate) in one vectorized pass (float32 inside for bf16), where composing
        # silu'(g) = s (1 + g (1 - s)) from tensor ops takes seven ([1024, 1536] bf16, both gradients: 4.2 -> 2.3 ms)
        return torch.ops.aten.silu_backward(grad * up, gate), F.silu(gate).mul_(grad)


def _swiglu_forward(self, x):
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


_SWIGLU_SOURCE = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


def _swap_forwards(model, source_matches, forward, extra=lambda module: True) -> int:
    """Give every module of `model` whose class's forward source passes `source_matches` (and that passes `extra`)
    the bound `forward`; returns how many modules got it."""
    count, checked = 0, {}
    for module in model.modules():
        cls = type(module)
        if cls not in checked:
            try:
                checked[cls] = source_matches(inspect.getsource(cls.forward))
            except (OSError, TypeError):
                checked[cls] = False
        if checked[cls] and extra(module):
            module.forward = types.MethodType(forward, module)
            count += 1
    return count


def use_recomputed_swiglu(model) -> int:
    """Give every MLP of `model` whose forward is exactly Llama's SwiGLU with a SiLU activation the recomputing
    forward; returns how many MLPs got it."""
    def silu(module):
        act = getattr(module, "act_fn", None)
        return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"

    return _swap_forwards(model, lambda source: _SWIGLU_SOURCE in source, _swiglu_forward, silu)


class _RMSNorm(torch.autograd.Function):
    """weight * x / rms(x) for bf16 `x` and `weight`, with the mean square and the backward's row sums accumulated in
    float32. Hand-written because Llama's RMSNorm in bf16 converts the whole tensor to float32 and back, and autograd
    then runs ~10 float32 passes in backward: 3.8 ms against 2.1 ms here for [1024, 576] forward + backward on the
    2-core Xeon (61 norms a SmolLM2 step); the result is as close to a float32 RMSNorm as Llama's own (0.24%)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = (x * x).sum(-1, keepdim=True, dtype=torch.float32).div_(x.shape[-1]).add_(eps).rsqrt_()
        out = torch.empty_like(x)
        torch.mul(x, rstd, out=out)  # float32 product, rounded once to bf16 as Llama's .to(input_dtype) does
        ctx.save_for_backward(x, weight, rstd)
        return out.mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        gw = grad * weight
        # d/dx of x * rstd: rstd * (gw - x * mean(gw * x) * rstd^2)
        coef = (gw * x).sum(-1, keepdim=True, dtype=torch.float32).mul_(rstd.pow(3)).div_(-x.shape[-1])
        grad_x = torch.empty_like(x)
        torch.mul(gw, rstd, out=grad_x)
        grad_x.addcmul_(x, coef.to(x.dtype))
        grad_w = None
        if ctx.needs_input_grad[1]:  # full fine-tuning trains the norms
            rows = tuple(range(x.dim() - 1))
            grad_w = (grad.float() * (x.float() * rstd)).sum(dim=rows).to(weight.dtype)
        return grad_x, grad_w, None


def _rmsnorm_forward(self, hidden_states):
    if hidden_states.dtype is torch.bfloat16 and self.weight.dtype is torch.bfloat16 \
            and hidden_states.device.type == "cpu":
        return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


_RMSNORM_SOURCE = ("hidden_states.pow(2).mean(-1, keepdim=True)", "torch.rsqrt(variance + self.variance_epsilon)",
                   "return self.weight * hidden_states.to(input_dtype)")


def use_fused_rmsnorm(model) -> int:
    """Give every RMSNorm of `model` whose forward is exactly Llama's (weight * normalized x, not Gemma's 1 + weight)
    the fused bf16 forward (other dtypes and devices keep the module's own); returns how many norms got it."""
    return _swap_forwards(model, lambda source: all(line in source for line in _RMSNORM_SOURCE), _rmsnorm_forward,
                          lambda module: isinstance(getattr(module, "weight", None), torch.nn.Parameter))


class _Rotary(torch.autograd.Function):
    """x rotated by the angles whose cosines and sines are `cos`, `sin` (Llama's half-split layout: both halves of the
    last dimension share their angles): out1 = x1 c - x2 s, out2 = x2 c + x1 s, each half one multiply and one fused
    multiply-add written in place, and the backward (the inverse rotation) likewise. Hand-written because Llama's
    `q * cos + rotate_half(q) * sin` runs five full passes in forward (rotate_half negates and concatenates) and as
    many again in backward, where autograd also zero-fills and accumulates the slices' gradients: [1, 9, 1024, 64]
    and [1, 3, 1024, 64] forward + backward 2.8 -> 1.7 ms in bf16, 3.4 -> 1.7 ms in float32 on the 2-core Xeon."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        out = torch.empty_like(x)
        _rotate(out, x, c, s)
        ctx.save_for_backward(c, s)
        return out

    @staticmethod
    def backward(ctx, grad):
        c, s = ctx.saved_tensors
        grad_x = torch.empty_like(grad)
        _rotate(grad_x, grad, c, -s)  # the transpose of a rotation is the rotation by minus the angle
        return grad_x, None, None


def _rotate(out, x, c, s):
    half = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=o2).addcmul_(x1, s)


def _llama_rotary(original):
    """A drop-in for a modeling module's `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` that runs `_Rotary`
    on CPU tensors of one dtype whose cos/sin halves are equal (Llama's rotary embedding always builds them so; the
    check reads [tokens, head_dim / 2] values), and the original otherwise."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        half = cos.shape[-1] // 2
        if (q.device.type == "cpu" and q.dtype == k.dtype == cos.dtype == sin.dtype and not cos.requires_grad
                and not sin.requires_grad and q.shape[-1] == k.shape[-1] == cos.shape[-1] == 2 * half
                and torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.medgpt_original = original
    return apply_rotary_pos_emb


_ROTARY_SOURCE = ("q_embed = (q * cos) + (rotate_half(q) * sin)", "k_embed = (k * cos) + (rotate_half(k) * sin)")
_ROTATE_HALF_SOURCE = "return torch.cat((-x2, x1), dim=-1)"


def use_fused_rotary(model) -> int:
    """Give the modeling modules (transformers' modeling_llama, modeling_qwen2, ...) of `model`'s attention layers
    whose `apply_rotary_pos_emb` is exactly Llama's the `_Rotary` drop-in (module-wide: same values up to rounding,
    other devices and dtypes keep the original); returns how many modules got it (or had it already)."""
    done = set()
    for module in model.modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        source_module = sys.modules.get(type(module).__module__)
        apply = getattr(source_module, "apply_rotary_pos_emb", None)
        if source_module is None or apply is None or source_module.__name__ in done:
            continue
        if not hasattr(apply, "medgpt_original"):
            try:
                matches = all(line in inspect.getsource(apply) for line in _ROTARY_SOURCE) and \
                    _ROTATE_HALF_SOURCE in inspect.getsource(source_module.rotate_half)
            except (OSError, TypeError, AttributeError):
                matches = False
            if not matches:
                continue
            source_module.apply_rotary_pos_emb = _llama_rotary(apply)
        done.add(source_module.__name__)
    return len(done)
