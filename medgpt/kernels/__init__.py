"""Our own training kernels, and the one call that puts them into a model.

Each is hand-written because torch, transformers, peft or Liger lack it on a CPU (the module docstrings say what
each replaces and what it measured), and each keeps the module's own code for what it does not cover (other
dtypes, devices, model layouts, layer variants):

* `cross_entropy`: the LM head and the cross-entropy fused and chunked (no [positions, vocab] tensor kept).
* `fused`: SwiGLU recomputed in backward; one-op RMSNorm (bf16) and rotary embedding for Llama-layout models.
* `lora`: FastCPUDropout and the fused LoRA layer (dropout + A + B + scaling + add as one op).
* `packed_attention`: sdpa attention inside each sample of a packed row (exact padding-free packing).
* `bf16_attention`: causal attention of one bf16 sample with bf16 matmuls (CPU).
"""
from __future__ import annotations

import logging

# bf16 on a CPU: oneDNN builds one matmul kernel per shape, so token counts (packed rows, head chunks, attention
# samples) are rounded up to a multiple of this many
ROWS = 64

logger = logging.getLogger(__name__)


def use_cpu_fast_paths(trainer, *models, compact_masks: bool = False) -> None:
    """Our training fast paths on `models` (the trainer's model, and e.g. DPO's reference copy), each logged once:
    SwiGLU MLPs recomputing silu(gate) in backward (any device; medgpt/kernels/fused.py), and on a CPU the fused bf16
    RMSNorm, the fused rotary embedding, FastCPUDropout and the fused LoRA layer (medgpt/kernels/lora.py; with
    `compact_masks`, bool dropout masks in bf16 too)."""
    from .fused import use_fused_rmsnorm, use_fused_rotary, use_recomputed_swiglu
    from .lora import use_fast_cpu_dropout, use_fused_lora

    models = [m for m in models if m is not None]

    def applied(use) -> int:
        return sum(use(model) for model in models)

    if applied(use_recomputed_swiglu):
        logger.info("SwiGLU MLPs: silu(gate) recomputed in backward instead of kept (medgpt/kernels/fused.py)")
    if trainer.args.device.type != "cpu":
        return
    if applied(use_fused_rmsnorm):
        logger.info("RMSNorm: one fused op in bf16 (medgpt/kernels/fused.py)")
    if applied(use_fused_rotary):
        logger.info("Rotary position embedding: one fused op per tensor on CPU (medgpt/kernels/fused.py)")
    if applied(use_fast_cpu_dropout):
        logger.info("LoRA dropout: using FastCPUDropout (a multi-draw mask, same distribution)")
    # (not under DeepSpeed/FSDP: they gather sharded weights in module hooks the fused op would bypass)
    if not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled) \
            and applied(lambda model: use_fused_lora(model, compact_masks)):
        logger.info("LoRA layers: one fused CPU op for dropout + A + B + scaling + add (medgpt/kernels/lora.py)")
