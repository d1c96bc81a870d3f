"""Tokenizer, model and LoRA/QLoRA loading, shared by every stage and by inference."""
from __future__ import annotations

import logging
import math
import os
from typing import Optional

import torch

from .default_model import resolve_model_path
from .distributed import fsdp_requested, local_rank, world_size

logger = logging.getLogger(__name__)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def resolve_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """The load dtype. On a machine without CUDA: float32 by default ("auto" too), and half precision becomes
    bfloat16 where the CPU has native bf16, else float32 (medgpt.precision says which, and why, in the log)."""
    if name in (None, "auto"):
        return torch.float32 if not has_cuda() else "auto"
    dtype = getattr(torch, name)
    if dtype in (torch.float16, torch.bfloat16) and not has_cuda():
        from .precision import half_precision_on_cpu
        return half_precision_on_cpu(f"--torch_dtype {name}") or torch.float32
    return dtype


def load_tokenizer(model_args, padding_side: str = "right"):
    from transformers import AutoTokenizer

    path = resolve_model_path(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        path,
        cache_dir=model_args.cache_dir,
        use_fast=model_args.use_fast_tokenizer,
        trust_remote_code=model_args.trust_remote_code,
        revision=model_args.model_revision,
        token=model_args.hf_hub_token,
    )
    if tokenizer.eos_token_id is None:
        tokenizer.eos_token = tokenizer.pad_token or "</s>"
    if tokenizer.pad_token_id is None:
        # Padding never reaches the loss (labels are -100 there), so eos/unk is a safe pad.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        logger.info("Tokenizer has no pad token; using %r", tokenizer.pad_token)
    tokenizer.padding_side = padding_side
    return tokenizer


def sharded_training() -> Optional[str]:
    """"ZeRO-3" or "FSDP" when the weights are to be sharded across processes by DeepSpeed or FSDP (then no
    device_map may be passed: the engine places and partitions the weights itself), else None."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return "ZeRO-3"
    if fsdp_requested():
        return "FSDP"
    return None


def _multiprocess_device_map(qconfig) -> Optional[dict]:
    """Under torchrun/deepspeed each rank loads the model onto its own device only (never device_map="auto", which
    would spread one copy over every GPU of the node); DeepSpeed ZeRO-3 and FSDP take no device_map at all."""
    if world_size() <= 1:
        return None
    sharded = sharded_training()
    if sharded and qconfig is not None:
        raise SystemExit(f"error: --load_in_4bit/--load_in_8bit cannot be combined with {sharded} here (bitsandbytes "
                         "weights are not sharded): use DDP or --deepspeed zero2.json for QLoRA, or LoRA without "
                         "quantization under ZeRO-3/FSDP")
    if sharded:
        return {}
    return {"": local_rank() if has_cuda() else "cpu"}


def quantization_config(model_args, compute_dtype=None):
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise SystemExit("error: choose one of --load_in_4bit and --load_in_8bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SystemExit("error: --load_in_4bit/--load_in_8bit need bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.float32,
    )


def load_model(model_args, model_class=None, config_overrides: Optional[dict] = None, max_length: Optional[int] = None,
               shift_attn_stage: bool = False, **extra):
    """Load a causal LM (or `model_class`, e.g. AutoModelForSequenceClassification) with the dtype,
    quantization, attention and RoPE options of `model_args`. No --model_name_or_path: the embedded default.
    `config_overrides` are set on the model config before loading (e.g. {"num_labels": 1}); `max_length` (the
    training length) sets the --rope_scaling factor. `shift_attn_stage`: the caller applies --shift_attn itself
    (medgpt.shift_attn.enable_shift_attn, SFT and PT); elsewhere the flag only warns."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    path = resolve_model_path(model_args.model_name_or_path)
    dtype = resolve_dtype(model_args.torch_dtype)
    config = AutoConfig.from_pretrained(path, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                                        trust_remote_code=model_args.trust_remote_code, token=model_args.hf_hub_token)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    kwargs = dict(extra)
    if model_args.rope_scaling:
        _set_rope_scaling(config, model_args.rope_scaling, model_args.rope_scaling_factor, max_length)
    if model_args.flash_attn:
        try:
            import flash_attn  # noqa: F401
            if not has_cuda():
                raise ImportError("no CUDA device")
            kwargs["attn_implementation"] = "flash_attention_2"
        except ImportError as e:
            logger.warning("--flash_attn: FlashAttention-2 unavailable (%s); using sdpa attention.", e)
    if model_args.shift_attn and not shift_attn_stage:
        logger.warning("--shift_attn: S²-Attn is for supervised_finetuning.py and pretraining.py; this stage uses full "
                       "attention.")
    qconfig = quantization_config(model_args, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    per_rank = _multiprocess_device_map(qconfig)
    if per_rank is not None:
        if per_rank:
            kwargs["device_map"] = per_rank
    elif qconfig is not None:
        kwargs["device_map"] = "auto" if has_cuda() else "cpu"
    elif has_cuda() and model_args.device_map not in (None, "", "none", "None"):
        kwargs["device_map"] = model_args.device_map
    model = model_class.from_pretrained(
        path, config=config, dtype=dtype, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code, token=model_args.hf_hub_token, **kwargs)
    return model


def _set_rope_scaling(config, kind: str, factor: Optional[float], max_length: Optional[int]):
    """As MedicalGPT: factor = ceil(training length / native context) when training longer than the model's
    max_position_embeddings, else 1 (nothing to extend); --rope_scaling_factor sets it directly."""
    native = getattr(config, "max_position_embeddings", None)
    if factor is None:
        if native and max_length and max_length > native:
            factor = float(math.ceil(max_length / native))
        else:
            logger.warning("--rope_scaling %s: the training length (%s) is not longer than the model's context (%s); "
                           "factor 1 (pass --rope_scaling_factor to choose one)", kind, max_length, native)
            factor = 1.0
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update({"rope_type": kind, "factor": factor})
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = params
    else:
        config.rope_scaling = {"type": kind, "factor": factor}
    logger.info("RoPE scaling: %s, factor %.1f (native context %s, training length %s)", kind, factor, native, max_length)


def find_all_linear_names(model) -> list[str]:
    """Names (last component) of every linear layer except the output head, incl. bitsandbytes layers."""
    linear_types = [torch.nn.Linear]
    try:
        import bitsandbytes as bnb
        linear_types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:
        pass
    head_names = {"lm_head", "score", "output_layer", "embed_out", "classifier", "v_head"}
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, tuple(linear_types)):
            last = name.split(".")[-1]
            if last not in head_names:
                names.add(last)
    return sorted(names)


def apply_lora(model, lora_args, training_args=None, task_type: str = "CAUSAL_LM"):
    """Wrap `model` in a LoRA adapter (new, or --peft_path to continue one); QLoRA prepares k-bit models.
    With --use_peft False the model is returned for full-parameter training."""
    from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training

    from .moe import moe_lora_targets

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if not lora_args.use_peft:
        if quantized:
            raise SystemExit("error: a 4/8-bit model cannot be trained in full; add --use_peft True (QLoRA)")
        return model
    gc = bool(training_args is not None and training_args.gradient_checkpointing)
    if quantized or lora_args.qlora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc:
        model.enable_input_require_grads()
    if lora_args.peft_path:
        logger.info("Continuing LoRA adapter %s", lora_args.peft_path)
        model = PeftModel.from_pretrained(model, lora_args.peft_path, is_trainable=True)
    else:
        targets = lora_args.target_modules or "all"
        all_linear = targets.strip().lower() == "all"
        if all_linear:
            target_modules = find_all_linear_names(model)
        else:
            target_modules = [t.strip() for t in targets.split(",") if t.strip()]
        # MoE: the fused expert weights are parameters, not modules (medgpt/moe.py)
        target_modules, target_parameters, dropout = moe_lora_targets(model, target_modules, all_linear,
                                                                      lora_args.lora_dropout)
        modules_to_save = [m.strip() for m in lora_args.modules_to_save.split(",")] if lora_args.modules_to_save else None
        config = LoraConfig(
            task_type=task_type, r=lora_args.lora_rank, lora_alpha=lora_args.lora_alpha,
            lora_dropout=dropout, target_modules=target_modules, modules_to_save=modules_to_save,
            target_parameters=target_parameters or None,
        )
        logger.info("LoRA on %s (r=%d, alpha=%s)", ",".join(target_modules), lora_args.lora_rank, lora_args.lora_alpha)
        try:
            from peft import get_peft_model
            model = get_peft_model(model, config)
        except ValueError as e:  # e.g. a --target_modules name the model does not have
            raise SystemExit(f"error: --target_modules {targets}: {str(e).splitlines()[0]}")
    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 (ZeRO-3 partitions leave numel() at 0)
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    logger.info("Trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def trainable_to_float32_on_cpu(model) -> None:
    """TRL's trainers (DPO, ORPO, Reward, ...) turn the trainable weights of a 4/8-bit model into bfloat16, the QLoRA
    paper's choice for GPUs. On a machine without CUDA, a bf16 head fed float32 activations fails without autocast (a
    reward model's `score`), and on a CPU without native bf16 its matmuls are ~300x slower. Put them back to float32
    (under --bf16 autocast still runs their matmuls in bf16; the weights and their updates stay float32)."""
    if has_cuda() or not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.float()


def resize_embeddings(model, tokenizer) -> int:
    """Grow the input embeddings (and an untied output head) to the tokenizer's size when it has more tokens than
    the model has rows (an expanded vocabulary, tools/merge_tokenizers.py). Each new token's rows start as the mean
    of the base tokenizer's rows for the sub-tokens its text encodes to (recorded in medgpt.vocab.VOCAB_INFO_FILE
    beside the tokenizer), not at random; tokens without that record get transformers' mean_resizing rows (drawn
    around the mean of all rows). Returns how many rows were added."""
    from .vocab import VOCAB_INFO_FILE, sub_token_ids

    old, new = model.get_input_embeddings().weight.shape[0], len(tokenizer)
    if new <= old:
        return 0
    subs = sub_token_ids(getattr(tokenizer, "name_or_path", None), 0)
    # transformers' mean_resizing (a covariance of all rows) only for rows no record covers
    model.resize_token_embeddings(new, mean_resizing=sum(1 for i in subs if old <= i < new) < new - old)
    inside = sum(1 for i in subs if i < old)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head = head.weight if head is not None and head.weight is not emb else None  # tied heads follow emb
    done = 0
    with torch.no_grad():
        for i, ids in subs.items():
            if old <= i < new and all(j < old for j in ids):
                emb[i] = emb[ids].mean(0)
                if head is not None:
                    head[i] = head[ids].mean(0)
                done += 1
    logger.info("Resized the embeddings from %d to %d rows: %d new rows set to the mean of their base sub-token "
                "embeddings%s (%s), %d by transformers (mean_resizing)", old, new, done,
                "" if head is None else " (input and output)", VOCAB_INFO_FILE, new - old - done)
    if inside:
        logger.warning("%d new token ids fall in embedding rows the model already had (a padded vocabulary); those "
                       "rows are kept as they are", inside)
    return new - old
