"""DPO on packed pairs: each pair is one `prompt + chosen + rejected` segment of a padding-free row.

Hand-written because TRL 1.16's DPOTrainer has no padding-free mode (its `padding_free` option is disabled "after a
refactor") and, on CPU, its fused LM head projects every position of the padded [2 x batch, longest] layout onto the
vocabulary. Here, per optimizer step:

* no padding: the pairs of a batch are concatenated into one row (position ids restart per pair);
* the prompt is encoded once per pair, not twice: the rejected reply attends to the prompt's keys and causally to
  itself, never to the chosen reply (`medgpt.data.collator._shared_prefix_attention`), and its position ids continue
  from the prompt, so each reply sees exactly what it sees in its own `prompt + reply` sequence;
* the LM head runs only at the positions that predict a reply token (`logits_to_keep`); the last prompt position,
  which predicts the first token of both replies, is kept twice.

The sequence log-probs are therefore those of TRL's padded layout up to float error (tests/test_dpo_orpo.py checks
them), and the loss and logged metrics are TRL's ("sigmoid" DPO loss; rewards/*, logps/*, logits/*, entropy,
mean_token_accuracy). For MoE models the router's load-balancing loss (the model's `aux_loss` over the packed row's
tokens, the prompt counted once) is added with TRL's `router_aux_loss_coef` and logged as aux_loss, as TRL's padded
path does. Other loss types, `ld_alpha`, `use_weighting` and precomputed reference log-probs keep TRL's own padded
path.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .data.collator import enable_packing, packing_mode
from .data.preference import LengthColumnMixin
from .losses import step_rows
from .moe import check_zero3, router_aux_term

logger = logging.getLogger(__name__)

MODEL_KEYS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
              "pair_lens")


class PairPackingCollator:
    """Preference pairs (prompt_ids, chosen_ids, rejected_ids) -> one packed row.

    Returns input_ids/position_ids [1, N], the segment boundaries (cu_seq_lens_q/k, max_length_q/k) and
    `pair_lens` [(prompt, chosen, rejected) lengths] for the attention; `keep` (positions whose logits are needed),
    `targets` (the reply token each predicts) and `groups` (2 * pair + 0 for chosen / 1 for rejected) for the loss.
    Prompt + reply is cut to `max_length` keeping the start, as TRL's collator does."""

    def __init__(self, max_length: int | None = None):
        self.max_length = max_length

    def __call__(self, examples: list[dict]) -> dict:
        ids, positions, keep, targets, groups, pair_lens, bounds = [], [], [], [], [], [], [0]
        for i, ex in enumerate(examples):
            prompt, chosen, rejected = list(ex["prompt_ids"]), list(ex["chosen_ids"]), list(ex["rejected_ids"])
            if self.max_length is not None:
                prompt = prompt[:self.max_length]
                room = self.max_length - len(prompt)
                chosen, rejected = chosen[:room], rejected[:room]
            p, c, r = len(prompt), len(chosen), len(rejected)
            if p == 0:
                raise ValueError("a preference pair has an empty prompt: nothing predicts the replies' first token")
            start = bounds[-1]
            ids += prompt + chosen + rejected
            positions += list(range(p + c)) + list(range(p, p + r))
            # chosen token j is predicted at position p-1+j; rejected token 0 at p-1 (the shared prompt end),
            # rejected token j>0 at the rejected segment's position j-1
            keep += [start + p - 1 + j for j in range(c)]
            keep += [start + p - 1] + [start + p + c + j for j in range(r - 1)]
            targets += chosen + rejected
            groups += [2 * i] * c + [2 * i + 1] * r
            pair_lens.append((p, c, r))
            bounds.append(start + p + c + r)
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = max(p + c + r for p, c, r in pair_lens)
        batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
                 "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(), "max_length_q": longest, "max_length_k": longest,
                 "pair_lens": pair_lens, "keep": torch.tensor(keep), "targets": torch.tensor(targets),
                 "groups": torch.tensor(groups)}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples])
        return batch


def split_pairs(batch: dict, max_tokens: int | None) -> list[dict]:
    """Cut a packed pair batch into rows of consecutive whole pairs of at most `max_tokens` tokens (a longer pair
    gets a row of its own). The DPO loss is a mean over pairs, so the rows' losses, weighted by their share of the
    pairs (`loss_weight`), add up to the batch's, while activation memory is bounded by one row. Without a limit
    (None/0), or when all fits, the batch is returned as is."""
    lengths = [p + c + r for p, c, r in batch["pair_lens"]]
    if not max_tokens or sum(lengths) <= max_tokens:
        return [batch]
    groups, first, size = [], 0, 0  # next-fit over consecutive pairs
    for i, n in enumerate(lengths):
        if i > first and size + n > max_tokens:
            groups.append((first, i))
            first, size = i, 0
        size += n
    groups.append((first, len(lengths)))
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    kept = [0]  # the loss entries (keep/targets/groups) of each pair: one per reply token
    for _, c, r in batch["pair_lens"]:
        kept.append(kept[-1] + c + r)
    rows = []
    for a, b in groups:
        lo, hi = starts[a], starts[b]
        cu = torch.tensor([x - lo for x in starts[a:b + 1]], dtype=torch.int32)
        longest = max(lengths[a:b])
        row = {"input_ids": batch["input_ids"][:, lo:hi], "position_ids": batch["position_ids"][:, lo:hi],
               "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(), "max_length_q": longest, "max_length_k": longest,
               "pair_lens": batch["pair_lens"][a:b], "keep": batch["keep"][kept[a]:kept[b]] - lo,
               "targets": batch["targets"][kept[a]:kept[b]], "groups": batch["groups"][kept[a]:kept[b]] - 2 * a,
               "loss_weight": (b - a) / len(lengths)}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in batch:
                row[key] = batch[key][a:b]
        rows.append(row)
    return rows


def packed_pair_logps(model, inputs: dict, with_stats: bool = False, router_logits: bool = False):
    """Summed log-probs of each reply, [chosen_0, rejected_0, chosen_1, ...], from one packed forward; with
    `with_stats`, also per-token (entropy, mean logit, is-top-1) for TRL's metrics, computed without gradient, and
    with `router_logits` (MoE) the model's router load-balancing loss over the row's tokens as stats["aux_loss"]."""
    extra = {"output_router_logits": True} if router_logits else {}
    outputs = model(**{k: inputs[k] for k in MODEL_KEYS}, use_cache=False, logits_to_keep=inputs["keep"], **extra)
    logits = outputs.logits[0].float()  # [kept positions, vocab]
    targets, groups = inputs["targets"].to(logits.device), inputs["groups"].to(logits.device)
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    n = 2 * len(inputs["pair_lens"])
    logps = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, groups, token_logps)
    if not with_stats:
        return logps, None
    with torch.no_grad():
        entropy, mean_logit, top1 = [], [], []
        for chunk, tgt in zip(logits.detach().split(512), targets.split(512)):  # bounded temporary memory
            lse = chunk.logsumexp(-1, keepdim=True)
            entropy.append(lse.squeeze(-1) - (chunk.softmax(-1) * chunk).sum(-1))
            mean_logit.append(chunk.mean(-1))
            top1.append(chunk.argmax(-1).eq(tgt))
        stats = {"entropy": torch.cat(entropy), "mean_logit": torch.cat(mean_logit), "top1": torch.cat(top1),
                 "is_chosen": groups.remainder(2).eq(0), "aux_loss": getattr(outputs, "aux_loss", None)}
    return logps, stats


class MedDPOTrainer(LengthColumnMixin, DPOTrainer):
    """TRL's DPOTrainer fed with medgpt's tokenization, and with packed pairs (see the module docstring) when
    `packing` is on and the model's attention can keep the replies apart (sdpa; eager-only models stay padded).

    medgpt tokenizes (prompt_ids/chosen_ids/rejected_ids, medgpt.data.preference): TRL's text path would add the
    tokenizer's special tokens to the rendered prompt (a second BOS after templates that write it, e.g. llama3),
    append the eos after replies that already end with the template's end-of-turn (chatml: "<|im_end|>\\n" +
    "<|im_end|>") and has no prompt-length limit; so the prepared columns go in unchanged."""

    def __init__(self, *args, packing: bool = True, max_packed_tokens: int | None = None, **kwargs):
        model, config = kwargs.get("model"), kwargs.get("args")
        why_not = self._packing_unsupported(config, model) if packing else None
        if packing and why_not:
            logger.warning("DPO packing off: %s; batches are padded", why_not)
        self.packed = False
        self.max_packed_tokens = max_packed_tokens
        if packing and not why_not and enable_packing(model):
            kwargs["data_collator"] = PairPackingCollator(config.max_length)
            if kwargs.get("ref_model") is not None:
                enable_packing(kwargs["ref_model"])
            self.packed = True
            logger.info("DPO: each pair packed as prompt + chosen + rejected (prompt encoded once, no padding, "
                        "LM head on reply positions only)")
        super().__init__(*args, **kwargs)
        check_zero3(self.model)  # MoE under ZeRO-3: fused experts, or one line (medgpt/moe.py)

    @staticmethod
    def _packing_unsupported(config, model) -> str | None:
        mode, why = packing_mode(model)
        if mode != "varlen_sdpa":  # the shared-prefix layout needs medgpt's sdpa attention (not flash-attn's varlen)
            return why if mode is None else f"{why}, but a shared prompt needs sdpa attention"
        if list(config.loss_type) != ["sigmoid"]:
            return f"loss_type {config.loss_type} (packing implements 'sigmoid')"
        for flag, value in (("ld_alpha", config.ld_alpha), ("use_weighting", config.use_weighting),
                            ("precompute_ref_log_probs", config.precompute_ref_log_probs)):
            if value:
                return f"--{flag} is set"
        if config.f_divergence_type != "reverse_kl":
            return f"f_divergence_type {config.f_divergence_type}"
        return None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = split_pairs(inputs, self.max_packed_tokens) if self.packed and "pair_lens" in inputs else [inputs]
        if len(rows) == 1 or self.is_deepspeed_enabled:  # DeepSpeed steps inside backward: one pass per step
            return super().training_step(model, inputs, num_items_in_batch)
        return step_rows(self, model, rows, super().training_step, num_items_in_batch)

    def _reference_context(self):
        """The reference policy: the model with its adapter disabled (or the frozen 'ref' copy), or ref_model."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return self.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return (self.ref_model if self.ref_model is not None else self.model), contextlib.nullcontext()

    def _compute_loss(self, model, inputs, return_outputs):
        if not self.packed or "pair_lens" not in inputs:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        logps, stats = packed_pair_logps(model, inputs, with_stats=True, router_logits=self.aux_loss_enabled)
        chosen_logps, rejected_logps = logps[0::2], logps[1::2]
        ref_model, context = self._reference_context()
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                context:
            ref_logps, _ = packed_pair_logps(ref_model, inputs)
        chosen_logratios = chosen_logps - ref_logps[0::2]
        rejected_logratios = rejected_logps - ref_logps[1::2]
        loss = -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios)).mean() * self.loss_weights[0]
        aux = router_aux_term(stats, self.router_aux_loss_coef) if self.aux_loss_enabled else None
        if aux is not None:  # MoE: as TRL's padded path, coef x the model's aux_loss (here over the packed row)
            loss = loss + aux.to(loss.device)
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(stats["aux_loss"].detach()).mean().item())
        loss = loss * inputs.get("loss_weight", 1.0)  # a row of a split batch: its share of the batch's pairs
        self._log_packed_metrics(mode, inputs, stats, chosen_logps, rejected_logps, chosen_logratios,
                                 rejected_logratios)
        return (loss, None) if return_outputs else loss

    def _log_packed_metrics(self, mode, inputs, stats, chosen_logps, rejected_logps, chosen_logratios,
                            rejected_logratios):
        """The metrics TRL logs for a padded batch, from the packed one (same names, same reductions)."""
        gather = self.accelerator.gather_for_metrics
        m = self._metrics[mode]
        chosen = stats["is_chosen"]
        n_tokens = gather(torch.tensor(float(chosen.numel()), device=chosen.device)).sum()
        m["entropy"].append((gather(stats["entropy"].sum()).sum() / n_tokens.clamp(min=1)).item())
        if mode == "train":  # as TRL counts: every non-pad token of the chosen and rejected sequences
            real = sum(2 * p + c + r for p, c, r in inputs["pair_lens"])
            self._total_train_tokens += int(gather(torch.tensor(real, device=chosen.device)).sum().item())
        m["num_tokens"] = [self._total_train_tokens]
        for name, sel in (("chosen", chosen), ("rejected", ~chosen)):
            total = gather(stats["mean_logit"][sel].sum()).sum()
            count = gather(sel.sum()).sum()
            m[f"logits/{name}"].append((total / count).item() if count > 0 else 0.0)
        correct, count = gather(stats["top1"][chosen].sum()).sum(), gather(chosen.sum()).sum()
        m["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        m["rewards/chosen"].append(self.accelerator.gather(chosen_rewards).mean().item())
        m["rewards/rejected"].append(self.accelerator.gather(rejected_rewards).mean().item())
        m["rewards/accuracies"].append(self.accelerator.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        m["rewards/margins"].append(self.accelerator.gather(chosen_rewards - rejected_rewards).mean().item())
        m["logps/chosen"].append(self.accelerator.gather(chosen_logps.detach()).mean().item())
        m["logps/rejected"].append(self.accelerator.gather(rejected_logps.detach()).mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self.packed:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)  # packed rows have no per-sequence logits to hand to compute_metrics
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, return_outputs=False)
        return loss.detach(), None, None

