"""Mixture-of-experts training: LoRA on the experts, and the router's load-balancing loss in our own loss paths.

* Experts. transformers 5 stores each MoE layer's experts fused, as 3D `nn.Parameter`s ([experts, out, in], e.g.
  Mixtral's `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`), not as `nn.Linear` modules, so LoRA by module name
  (`target_modules`) never reaches them. peft (0.17+) adapts such parameters with `LoraConfig(target_parameters=...)`
  (`lora.ParamWrapper`: a rank-r update per expert, folded into the weight at each forward); `lora_targets` below
  finds them, so `--target_modules all` covers attention, dense/shared-expert MLPs and every routed expert. The routers
  (`gate`, `shared_expert_gate`) stay frozen under LoRA: they train in full training only.
* Auxiliary loss. Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ... return `aux_loss` (the Switch-Transformer load-balancing
  loss over the router logits of every layer, padding excluded through the 2D attention mask) when called with
  `output_router_logits=True`, and add `router_aux_loss_coef * aux_loss` to their loss when given labels. Our lean
  and packed losses (medgpt/trainers/lm.py, medgpt/trainers/dpo.py) call the model without labels, so they add that term
  themselves, from the model's own `aux_loss` (`router_aux_term`); a packed row has no padding and no 2D mask, so the
  model averages over exactly the real tokens, as on the padded batch. DeepSeek-V2/V3 have no auxiliary loss in
  transformers (V3 balances its experts with a routing bias): nothing is added there.
"""
from __future__ import annotations

import inspect
import logging
import re

import torch

logger = logging.getLogger(__name__)

# Linear layers that route tokens (their output scores experts): adapted by no LoRA ("all" leaves them out)
ROUTER_NAMES = {"gate", "router", "shared_expert_gate"}


def _shape(param) -> tuple:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions leave param.shape empty


def fused_expert_parameters(model) -> dict[str, list[str]]:
    """{short parameter name: [full names]} of the fused expert weights (3D parameters of an experts module)."""
    from .data.collator import base_pretrained_model

    found: dict[str, list[str]] = {}
    for module_name, module in base_pretrained_model(model).named_modules():
        if not type(module).__name__.endswith("Experts"):
            continue
        for name, param in module.named_parameters(recurse=False):
            if len(_shape(param)) == 3:
                found.setdefault(name, []).append(f"{module_name}.{name}")
    return found


def is_moe(model) -> bool:
    return bool(fused_expert_parameters(model))


def _layer_suffix(full_name: str) -> str:
    """'model.layers.3.mlp.experts.gate_up_proj' -> 'mlp.experts.gate_up_proj' (what peft matches as a suffix)."""
    return re.sub(r"^.*?\.\d+\.", "", full_name)


def moe_lora_targets(model, target_modules: list[str], all_linear: bool, dropout: float):
    """(target_modules, target_parameters, lora_dropout) for peft's LoraConfig. With `all_linear`, `target_modules`
    is every linear layer but the head: routers are dropped from it and every fused expert weight becomes a target
    parameter. An explicit list may name expert weights (e.g. q_proj,v_proj,gate_up_proj,down_proj): those become
    target parameters too. peft's expert LoRA takes no dropout (it cannot factor the input out of
    B(A(dropout(x))) for a weight), so the adapter's dropout is 0 when experts are adapted. Logs what it chose."""
    experts = fused_expert_parameters(model)
    if not experts:
        return target_modules, [], dropout
    if all_linear:
        modules = [m for m in target_modules if m not in ROUTER_NAMES]
        chosen = experts
    else:
        linear = set(_linear_names(model))
        chosen = {name: full for name, full in experts.items() if name in target_modules}
        # a name that is only an expert weight is no module name peft could match
        modules = [m for m in target_modules if m not in chosen or m in linear]
    parameters = sorted({_layer_suffix(full) for names in chosen.values() for full in names})
    routers = sorted(set(_linear_names(model)) & ROUTER_NAMES)
    if parameters:
        count = sum(len(names) for names in chosen.values())
        logger.info("MoE: LoRA on the fused expert weights %s (%d tensors: every expert of every MoE layer, peft "
                    "target_parameters)%s", ",".join(parameters), count,
                    f"; routers not adapted ({','.join(routers)})" if routers and all_linear else "")
        if dropout:
            logger.warning("MoE: LoRA dropout %g -> 0 for the whole adapter (peft's LoRA on expert weights takes no "
                           "dropout)", dropout)
            dropout = 0.0
    else:
        logger.warning("MoE: --target_modules %s adapts no expert weight (they are %s; 'all' includes them)",
                       ",".join(target_modules), ",".join(sorted(experts)))
    return modules, parameters, dropout


def _linear_names(model) -> list[str]:
    from .modeling import find_all_linear_names

    return find_all_linear_names(model)


def aux_loss_coef(model, requested: float | None) -> float:
    """The weight of the router's load-balancing loss in training: `requested` (--router_aux_loss_coef), else the
    model config's `router_aux_loss_coef`; 0.0 for models that compute no such loss. A coefficient asked of a model
    without one is a one-line error."""
    from .data.collator import base_pretrained_model

    base = base_pretrained_model(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    try:
        returns_aux = "output_router_logits" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        returns_aux = False
    own = getattr(config, "router_aux_loss_coef", None)
    if not returns_aux or own is None:
        if requested:
            raise SystemExit(f"error: --router_aux_loss_coef {requested}: {type(base).__name__} computes no router "
                             "load-balancing loss (not a Mixture-of-Experts model, or one balanced without it)")
        return 0.0
    return float(own if requested is None else requested)


def set_aux_loss_coef(model, coef: float) -> None:
    """Make the model's own forward (paths that use the model's loss) weigh the auxiliary loss by `coef` too."""
    from .data.collator import base_pretrained_model

    base = base_pretrained_model(model)
    if hasattr(base, "router_aux_loss_coef") and coef:
        base.router_aux_loss_coef = coef
        base.config.router_aux_loss_coef = coef


def log_aux_loss_choice(model, coef: float) -> None:
    if not is_moe(model):
        return
    if coef:
        logger.info("MoE: the router load-balancing loss x %g (router_aux_loss_coef) is part of the training loss "
                    "(logged as aux_loss)", coef)
    else:
        logger.info("MoE: no router load-balancing loss in the training loss (%s computes none, or "
                    "--router_aux_loss_coef 0)", type(model).__name__)


def router_aux_term(outputs, coef: float):
    """`coef * outputs.aux_loss` (a tensor), or None when the forward returned no auxiliary loss."""
    aux = outputs.get("aux_loss") if isinstance(outputs, dict) else getattr(outputs, "aux_loss", None)
    if not coef or aux is None or not torch.is_tensor(aux):
        return None
    return coef * aux


def check_zero3(model) -> None:
    """Under DeepSpeed ZeRO-3 every rank must gather the same parameters in the same order. transformers 5 keeps all
    the experts of a layer in one fused parameter that every forward gathers whole, whichever experts its tokens are
    routed to, so ZeRO-3 needs nothing more; models that keep experts as separate modules (remote code, older
    layouts) would gather only the experts a rank's tokens hit, and hang: stop those with one line."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from .data.collator import base_pretrained_model

    if not is_deepspeed_zero3_enabled():
        return
    base = base_pretrained_model(model)
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("experts") and len(module) > 1:
            raise SystemExit(f"error: DeepSpeed ZeRO-3: {type(base).__name__} keeps its experts as separate modules "
                             f"({name}), which ZeRO-3 cannot gather consistently across ranks; use ZeRO-2 "
                             "(--deepspeed zero2.json) or a transformers model with fused experts")
