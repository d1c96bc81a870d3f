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
them), and the loss and logged metrics are TRL's (rewards/*, logps/*, logits/*, entropy, mean_token_accuracy). Every
`loss_type` of TRL 1.16's DPOConfig is served (`dpo_loss`: each is a function of the per-sequence log-probs of policy
and reference and the replies' token counts), alone or several with `loss_weights`, with `f_divergence_type`,
`ld_alpha` (token weights past the shorter reply) and `use_weighting` (WPO weights from the kept logits)
(tests/test_dpo_variants.py checks each against TRL's padded step). For MoE models the router's load-balancing loss
(the model's `aux_loss` over the packed row's tokens, the prompt counted once) is added with TRL's
`router_aux_loss_coef` and logged as aux_loss, as TRL's padded path does. Precomputed reference log-probs
(`precompute_ref_log_probs`, computed by TRL on padded batches) keep TRL's own padded path, with a log line.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ..data.collator import enable_packing, packing_mode
from ..kernels import use_cpu_fast_paths
from ..moe import check_zero3, router_aux_term
from .lm import step_rows
from .preference import LengthColumnMixin

logger = logging.getLogger("medgpt.dpo")  # the stage's name in the log, as its script's own lines

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
    gets a row of its own). The DPO losses are means over the batch's pairs (or, 'sft', over its chosen tokens), so each
    row carries the batch's pair and chosen-token counts (`batch_pairs`, `batch_chosen_tokens`, for `dpo_loss`) and its
    share of the pairs (`loss_weight`, for the MoE load-balancing term): the rows' losses add up to the batch's, while
    activation memory is bounded by one row. Without a limit (None/0), or when all fits, the batch is returned as is."""
    lengths = [p + c + r for p, c, r in batch["pair_lens"]]
    if not max_tokens or sum(lengths) <= max_tokens:
        return [batch]
    chosen_tokens = sum(c for _, c, _ in batch["pair_lens"])
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
               "loss_weight": (b - a) / len(lengths), "batch_pairs": len(lengths), "batch_chosen_tokens": chosen_tokens}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in batch:
                row[key] = batch[key][a:b]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# DPO loss types

# TRL 1.16's DPOConfig.loss_type values. Each is a function of per-sequence quantities only: the summed log-probs of
# the chosen and rejected replies under policy and reference, the replies' token counts ('ipo', 'sigmoid_norm') and the
# chosen replies' token log-probs summed ('sft': their mean over the batch's chosen tokens), so packed pairs serve them
# all.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# Reference-free preference losses: TRL serves them with CPOTrainer (cpo_training.py), not DPOTrainer.
CPO_LOSS_TYPES = ("simpo", "alphapo", "cpo")


def whole_batch_losses(args) -> list[str]:
    """The configured losses that are no sum over pairs: 'aot'/'aot_unpaired' sort the batch's log-ratios, and with
    WPO weights (--use_weighting) 'sft' is the batch's token mean times the mean pair weight. A packed batch with one
    of them is not cut into rows (split_pairs), so its loss is TRL's."""
    found = [t for t in args.loss_type if t in ("aot", "aot_unpaired")]
    if args.use_weighting and "sft" in args.loss_type:
        found.append("sft")
    return found


def f_divergence_scores(logratios: torch.Tensor, args) -> torch.Tensor:
    """TRL's f-divergence reparameterization of policy/reference log-ratios (`f_divergence_type`; reverse_kl, the
    default, is standard DPO: the log-ratio itself)."""
    kind = args.f_divergence_type
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":  # f'(t) = (t^(a-1) - 1) / (a - 1); a -> 1 is reverse_kl
        alpha = args.f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = (alpha - 1.0) * logratios
        clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0}.get(t.dtype, 80.0)  # exp() stays representable
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"Unknown f_divergence_type: {kind}")


def _pair_loss(loss_type, args, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_scores,
               rejected_scores, chosen_lens, rejected_lens):
    """One TRL loss type, per pair [pairs] (TRL 1.16 DPOTrainer._compute_loss, formula by formula)."""
    beta, eps = args.beta, args.label_smoothing
    delta = chosen_scores - rejected_scores
    chosen_logratios, rejected_logratios = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type in ("ipo", "sigmoid_norm"):  # scores averaged over each reply's tokens
        avg_delta = chosen_scores / chosen_lens.clamp(min=1.0) - rejected_scores / rejected_lens.clamp(min=1.0)
        return (avg_delta - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * avg_delta)
    if loss_type == "exo_pair":
        epsilon = torch.tensor(eps, device=delta.device)
        qw, log_qw = torch.sigmoid(beta * delta), F.logsigmoid(beta * delta)
        ql, log_ql = torch.sigmoid(-beta * delta), F.logsigmoid(-beta * delta)
        return qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
    if loss_type == "nca_pair":
        return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards))
    if loss_type == "robust":
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "bco_pair":  # TRL 1.16: no running reward mean (delta) any more
        return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):  # the batch's sorted log-ratios, paired by rank
        if loss_type == "aot":
            sorted_delta = torch.sort(chosen_logps - rejected_logps, dim=0)[0] - torch.sort(
                ref_chosen_logps - ref_rejected_logps, dim=0)[0]
        else:
            sorted_delta = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
        return -F.logsigmoid(beta * sorted_delta) * (1 - eps) - F.logsigmoid(-beta * sorted_delta) * eps
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(chosen_rewards)) + torch.sigmoid(rejected_rewards)
    if loss_type == "apo_down":
        return torch.sigmoid(chosen_rewards) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    if loss_type == "discopop":
        logits = delta * beta
        modulation = torch.sigmoid(logits / args.discopop_tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    raise ValueError(f"Unknown loss type: {loss_type}. Should be one of {list(LOSS_TYPES)}")


def dpo_loss(args, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lens, rejected_lens,
             chosen_token_logps=None, pair_weights=None, batch_pairs=None, batch_chosen_tokens=None):
    """TRL 1.16's DPO loss: `args.loss_type` (one or several, weighted by `args.loss_weights`), with
    `args.f_divergence_type`, from per-pair tensors: the summed log-probs of the chosen and rejected replies under the
    policy and the reference (with ld_alpha: token-weighted), the replies' token counts, `chosen_token_logps` the
    chosen replies' plain summed log-probs ('sft'; default chosen_logps) and `pair_weights` (WPO, use_weighting: the
    chosen x rejected weight of each pair).

    Written out here because TRL computes each variant inline in DPOTrainer._compute_loss, between its padded forward
    passes and its metrics: there is no TRL function to hand log-probs to. The formulas are TRL's one by one, and
    tests/test_dpo_variants.py checks every loss type against TRL's padded step.

    The pairs may be one row of a split batch (split_pairs): `batch_pairs`/`batch_chosen_tokens` are then the whole
    batch's pair and chosen-token counts (default: these pairs'), so that the rows' losses add up to the batch's mean
    (only for losses that are sums over pairs: see whole_batch_losses)."""
    n_pairs = batch_pairs or chosen_logps.shape[0]
    chosen_scores = f_divergence_scores(chosen_logps - ref_chosen_logps, args)
    rejected_scores = f_divergence_scores(rejected_logps - ref_rejected_logps, args)
    weights = args.loss_weights or [1.0] * len(args.loss_type)
    loss = 0.0
    for loss_type, weight in zip(args.loss_type, weights, strict=True):
        if loss_type == "sft":  # the chosen replies' NLL: one mean over the batch's chosen tokens
            tokens = batch_chosen_tokens if batch_chosen_tokens is not None else chosen_lens.sum()
            logps = chosen_logps if chosen_token_logps is None else chosen_token_logps
            term = -logps.sum() / tokens
            if pair_weights is not None:  # TRL weights the batch value per pair, then averages
                term = term * pair_weights.sum() / n_pairs
        else:
            per_pair = _pair_loss(loss_type, args, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                  chosen_scores, rejected_scores, chosen_lens, rejected_lens)
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            term = per_pair.sum() / n_pairs
        loss = loss + term * weight
    return loss


def ld_token_weights(pair_lens, ld_alpha: float) -> torch.Tensor:
    """LD-DPO token weights (TRL's `ld_alpha`), in the packed batch's `targets` order: 1 for the first
    min(chosen, rejected) tokens of each reply, ld_alpha for the tokens past that shared length."""
    weights = []
    for _, c, r in pair_lens:
        shared = min(c, r)
        weights += [1.0] * shared + [ld_alpha] * (c - shared) + [1.0] * shared + [ld_alpha] * (r - shared)
    return torch.tensor(weights)


# ---------------------------------------------------------------------------------------------------
# Log-probs of packed pairs

def pair_sums(values: torch.Tensor, inputs: dict) -> torch.Tensor:
    """Per-token values (in `targets` order) summed per reply: [chosen_0, rejected_0, chosen_1, ...]."""
    groups = inputs["groups"].to(values.device)
    n = 2 * len(inputs["pair_lens"])
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, groups, values)


def packed_token_logps(model, inputs: dict, with_stats: bool = False, router_logits: bool = False,
                       sq_probs: bool = False):
    """Log-prob of every reply token (in `targets` order) from one packed forward; with `with_stats`, also per-token
    (entropy, mean logit, is-top-1; with `sq_probs` log(sum of squared probabilities), WPO's normalizer) for TRL's
    metrics and weights, computed without gradient, and with `router_logits` (MoE) the model's router load-balancing
    loss over the row's tokens as stats["aux_loss"]."""
    extra = {"output_router_logits": True} if router_logits else {}
    outputs = model(**{k: inputs[k] for k in MODEL_KEYS}, use_cache=False, logits_to_keep=inputs["keep"], **extra)
    logits = outputs.logits[0].float()  # [kept positions, vocab]
    targets, groups = inputs["targets"].to(logits.device), inputs["groups"].to(logits.device)
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    if not with_stats:
        return token_logps, None
    with torch.no_grad():
        entropy, mean_logit, top1, sq = [], [], [], []
        for chunk, tgt in zip(logits.detach().split(512), targets.split(512)):  # bounded temporary memory
            lse = chunk.logsumexp(-1, keepdim=True)
            entropy.append(lse.squeeze(-1) - (chunk.softmax(-1) * chunk).sum(-1))
            mean_logit.append(chunk.mean(-1))
            top1.append(chunk.argmax(-1).eq(tgt))
            if sq_probs:
                sq.append((2 * chunk).logsumexp(-1) - 2 * lse.squeeze(-1))
        stats = {"entropy": torch.cat(entropy), "mean_logit": torch.cat(mean_logit), "top1": torch.cat(top1),
                 "is_chosen": groups.remainder(2).eq(0), "aux_loss": getattr(outputs, "aux_loss", None)}
        if sq_probs:
            stats["log_sum_sq_probs"] = torch.cat(sq)
    return token_logps, stats


def packed_pair_logps(model, inputs: dict, with_stats: bool = False, router_logits: bool = False,
                      token_weights: torch.Tensor | None = None):
    """Summed log-probs of each reply, [chosen_0, rejected_0, chosen_1, ...], from one packed forward (each token
    weighted by `token_weights` when given: ld_alpha); `with_stats`/`router_logits` as in packed_token_logps."""
    token_logps, stats = packed_token_logps(model, inputs, with_stats, router_logits)
    if token_weights is not None:
        token_logps = token_logps * token_weights.to(token_logps)
    return pair_sums(token_logps, inputs), stats


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
        self.whole_batch = whole_batch_losses(config) if packing and config is not None else []
        if packing and not why_not and enable_packing(model):
            kwargs["data_collator"] = PairPackingCollator(config.max_length)
            if kwargs.get("ref_model") is not None:
                enable_packing(kwargs["ref_model"])
            self.packed = True
            logger.info("DPO: each pair packed as prompt + chosen + rejected (prompt encoded once, no padding, "
                        "LM head on reply positions only); loss_type %s%s", list(config.loss_type),
                        f" with loss_weights {config.loss_weights}" if config.loss_weights else "")
            if self.whole_batch and max_packed_tokens:
                logger.info("DPO: loss_type %s is computed over the whole batch (not a sum over pairs): each batch "
                            "runs as one packed row (--max_packed_tokens %s not applied)", self.whole_batch,
                            max_packed_tokens)
        super().__init__(*args, **kwargs)
        check_zero3(self.model)  # MoE under ZeRO-3: fused experts, or one line (medgpt/moe.py)
        use_cpu_fast_paths(self, self.model, self.ref_model)

    @staticmethod
    def _packing_unsupported(config, model) -> str | None:
        mode, why = packing_mode(model)
        if mode != "varlen_sdpa":  # the shared-prefix layout needs medgpt's sdpa attention (not flash-attn's varlen)
            return why if mode is None else f"{why}, but a shared prompt needs sdpa attention"
        unknown = [t for t in config.loss_type if t not in LOSS_TYPES]
        if unknown:
            return f"loss_type {unknown} is not one of TRL's DPO losses {list(LOSS_TYPES)}"
        if config.precompute_ref_log_probs:  # TRL computes them before training, with its padded collator
            return "--precompute_ref_log_probs is set (TRL computes the reference log-probs on padded batches)"
        return None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def training_step(self, model, inputs, num_items_in_batch=None):
        max_tokens = None if self.whole_batch else self.max_packed_tokens
        rows = split_pairs(inputs, max_tokens) if self.packed and "pair_lens" in inputs else [inputs]
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
        token_logps, stats = packed_token_logps(model, inputs, with_stats=True, router_logits=self.aux_loss_enabled,
                                                sq_probs=self.use_weighting)
        plain = pair_sums(token_logps, inputs)
        weights = None
        if self.ld_alpha is not None:  # LD-DPO: the tokens past the shorter reply's length count ld_alpha
            weights = ld_token_weights(inputs["pair_lens"], self.ld_alpha).to(token_logps)
            logps = pair_sums(token_logps * weights, inputs)
        else:
            logps = plain
        chosen_logps, rejected_logps = logps[0::2], logps[1::2]
        ref_model, context = self._reference_context()
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                context:
            ref_logps, _ = packed_pair_logps(ref_model, inputs, token_weights=weights)
        ref_logps = ref_logps.to(logps.device)
        lens = torch.tensor([(c, r) for _, c, r in inputs["pair_lens"]], dtype=logps.dtype, device=logps.device)
        pair_weights = None
        if self.use_weighting:  # WPO: exp(mean over each reply of log p - log sum p^2), chosen x rejected
            with torch.no_grad():
                mean = pair_sums(token_logps.detach() - stats["log_sum_sq_probs"], inputs) / lens.view(-1).clamp(min=1)
                seq_weights = torch.exp(mean)
                pair_weights = seq_weights[0::2] * seq_weights[1::2]
        loss = dpo_loss(self.args, chosen_logps, rejected_logps, ref_logps[0::2], ref_logps[1::2], lens[:, 0],
                        lens[:, 1], chosen_token_logps=plain[0::2], pair_weights=pair_weights,
                        batch_pairs=inputs.get("batch_pairs"), batch_chosen_tokens=inputs.get("batch_chosen_tokens"))
        aux = router_aux_term(stats, self.router_aux_loss_coef) if self.aux_loss_enabled else None
        if aux is not None:  # MoE: as TRL's padded path, coef x the model's aux_loss (here over the packed row)
            # (a row of a split batch: weighted by its share of the batch's pairs)
            loss = loss + aux.to(loss.device) * inputs.get("loss_weight", 1.0)
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(stats["aux_loss"].detach()).mean().item())
        chosen_logratios = chosen_logps - ref_logps[0::2]
        rejected_logratios = rejected_logps - ref_logps[1::2]
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

