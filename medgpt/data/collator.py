"""Padding-free, exact packing for causal-LM training (SFT, pretraining, and later DPO).

Each batch becomes one row `[1, total_tokens]` with no pad token at all: transformers'
`DataCollatorWithFlattening` concatenates the samples, restarts `position_ids` at every sample,
puts -100 on each sample's first label (so no sample learns to predict the next one) and returns
the sample boundaries `cu_seq_lens_q/k`. Packing is exact only if attention also stays inside each
sample, and that depends on the attention kernel:

* flash_attention_2/3 (CUDA): the kernels read `cu_seq_lens` natively.
* sdpa (CPU, or CUDA without flash-attn): transformers has no variable-length sdpa. It turns restarted
  `position_ids` into a block-diagonal mask only when no KV cache is passed (with the default
  use_cache=True samples attend to each other: packed logits off by 0.4-0.75), and even then computes
  attention over the whole row. `varlen_sdpa_attention` below is hand-written for that reason: it runs
  sdpa once per sample (causal, no mask), so each sample sees exactly what it sees alone, whatever
  use_cache says, and attention costs sum(len_i^2) instead of (sum len_i)^2.
* anything else (eager-only models, remote code, ALiBi models without position ids): no packing;
  batches are padded (`packing_mode` says why).

Samples stay in the batches the sampler made (the same batches as padded training), so a packed
run takes the same optimizer steps on the same samples as a padded one, up to float error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import cpu_attention
from .sft import IGNORE_INDEX

logger = logging.getLogger(__name__)

VARLEN_SDPA = "medgpt_varlen_sdpa"
_FLASH = ("flash_attention_2", "flash_attention_3")


def _sdpa(module, query, key, value, mask, **kwargs):
    """transformers' sdpa attention for one sample. bf16/fp16 tensors on a CPU: causal bf16 samples go to
    medgpt.cpu_attention (bf16 matmuls, no per-length kernel builds); the rest runs in float32, because torch's CPU
    flash attention in bf16 compiles kernels for each new sequence length (measured: 34 ms for a 300-token sample's
    forward + backward when every length is new, as in packed rows, against 7 ms in float32)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.dtype not in (torch.bfloat16, torch.float16) or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)[0]
    if cpu_attention.fits(module, query, key, mask, **kwargs):
        return cpu_attention.causal_attention(query, key, value, kwargs.get("scaling"))
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
    medgpt.dpo.PairPackingCollator): prompt and chosen attend causally as one sequence; the rejected tokens attend
    to the prompt and causally to themselves, never to the chosen reply. So the prompt is encoded once per pair, and
    both replies see exactly what they see in a separate `prompt + reply` sequence (their position ids continue
    from the prompt)."""
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


def base_pretrained_model(model):
    """The transformers model under DDP/DeepSpeed/FSDP and PEFT wrappers (or the model itself)."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=True)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def packing_mode(model) -> tuple[str | None, str]:
    """How `model` can train on packed rows exactly: ("flash" | "varlen_sdpa", why) or (None, why not)."""
    base = base_pretrained_model(model)
    config = getattr(base, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in _FLASH:
        return "flash", f"{impl} reads the sample boundaries natively"
    if impl in ("sdpa", VARLEN_SDPA) and getattr(base, "_supports_attention_backend", False):
        return "varlen_sdpa", "sdpa run per sample (CPU-safe variable-length attention)"
    return None, (f"attention '{impl}' of {type(base).__name__} cannot be confined to each sample of a packed row")


def enable_packing(model) -> str | None:
    """Switch `model` to attention that isolates packed samples. Returns the mode, or None (train padded)."""
    mode, why = packing_mode(model)
    if mode == "varlen_sdpa":
        base = base_pretrained_model(model)
        base.set_attn_implementation(register_varlen_sdpa())
    if mode:
        logger.info("Packing: batches are padding-free rows; %s", why)
    else:
        logger.warning("Packing off: %s; batches are padded instead", why)
    return mode


def build_collator(tokenizer, model=None, packing: bool = True, pad_to_multiple_of: int | None = 8):
    """The training collator: packed rows when `packing` and the model's attention allows it exactly
    (this switches sdpa models to `varlen_sdpa_attention`), else padding to the batch's longest sample.
    Returns (collator, packed)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing and model is not None and enable_packing(model):
        return DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX), True
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of,
                                  padding="longest"), False


class DocumentFlatteningCollator:
    """Pretraining blocks (documents joined, an eos after each; medgpt.data.pretrain) -> one padding-free row in
    which every document piece is its own sample: position ids restart after each eos and at each block start,
    `cu_seq_lens` mark the pieces, and each piece's first label is -100. With an attention that reads the
    boundaries (`enable_packing`), no document attends to, or is predicted from, another one; the blocks keep
    MedicalGPT's exact --block_size slicing of the token stream. (transformers' DataCollatorWithFlattening does the
    flattening; this only cuts the blocks at the eos tokens first.)"""

    def __init__(self, eos_token_id: int):
        from transformers import DataCollatorWithFlattening

        self.eos_token_id = eos_token_id
        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict]) -> dict:
        pieces = []
        for feature in features:
            ids = list(feature["input_ids"])
            labels = list(feature.get("labels", ids))
            start = 0
            for i, token in enumerate(ids):
                if token == self.eos_token_id:
                    pieces.append({"input_ids": ids[start:i + 1], "labels": labels[start:i + 1]})
                    start = i + 1
            if start < len(ids):
                pieces.append({"input_ids": ids[start:], "labels": labels[start:]})
        return self.flatten(pieces)


def split_packed_batch(batch: dict, max_tokens: int | None) -> list[dict]:
    """Cut a flattened batch (one row; sample boundaries in `cu_seq_lens_q`) into consecutive rows
    of at most `max_tokens` tokens, whole samples only (a longer sample gets a row of its own).

    A trainer runs the rows one after another and accumulates their gradients into one optimizer
    step, so activation memory is bounded by `max_tokens` instead of batch size x sample length,
    while no pad token is processed. Without a limit (None/0), or when all fits, the batch is returned as is."""
    bounds = batch["cu_seq_lens_q"].tolist()
    total = bounds[-1]
    if not max_tokens or total <= max_tokens:
        return [batch]
    groups, first = [], 0  # next-fit over consecutive samples: rows need no padding, so order is kept
    for i in range(1, len(bounds) - 1):
        if bounds[i + 1] - bounds[first] > max_tokens:
            groups.append((first, i))
            first = i
    groups.append((first, len(bounds) - 1))
    rows = []
    for a, b in groups:
        start, end = bounds[a], bounds[b]
        row = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == total:
                row[key] = value[:, start:end]
            else:
                row[key] = value
        cu = batch["cu_seq_lens_q"][a:b + 1] - start
        longest = int(torch.diff(cu).max())
        row.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=longest, max_length_k=longest)
        rows.append(row)
    return rows


def pad_packed_row(row: dict, multiple: int) -> dict:
    """A packed row (one flattened row, samples marked by `cu_seq_lens_q`) whose length is rounded up to a multiple of
    `multiple` by a filler sample at its end: token id 0, labels -100 (no loss), positions from 0 and its own
    boundary, so no real sample attends to it or is changed by it; `filler_tokens` says how many (TokenStats does
    not count them as real). Hand-written for bf16 on a CPU: oneDNN compiles a kernel for every new matmul shape
    (measured ~13 ms for one [n, 576] x [576, 1536] bf16 matmul, 6x the matmul itself), and packed rows' token counts
    all differ, so every linear layer of every step would pay it; rounded lengths repeat and hit oneDNN's cache."""
    total = row["input_ids"].shape[1]
    extra = -total % multiple
    if not extra:
        return row
    out = dict(row)
    for key, value in row.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == total:
            if key == "position_ids":
                fill = torch.arange(extra, dtype=value.dtype, device=value.device).expand(value.shape[0], extra)
            else:
                fill = value.new_full((value.shape[0], extra), IGNORE_INDEX if key == "labels" else 0)
            out[key] = torch.cat([value, fill], dim=1)
    cu = torch.cat([row["cu_seq_lens_q"], row["cu_seq_lens_q"].new_tensor([total + extra])])
    longest = max(int(row.get("max_length_q") or 0), extra)
    out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=longest, max_length_k=longest,
               filler_tokens=int(row.get("filler_tokens", 0)) + extra)
    return out


@dataclass
class TokenStats:
    """Token counts over training batches: processed (row slots, padding included), real and supervised."""
    processed: int = 0
    real: int = 0
    supervised: int = 0
    batches: int = 0

    def update(self, inputs: dict) -> None:
        ids = inputs["input_ids"]
        self.processed += ids.numel()
        mask = inputs.get("attention_mask")
        self.real += int(mask.sum()) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else ids.numel()
        self.real -= int(inputs.get("filler_tokens", 0))  # pad_packed_row's filler
        labels = inputs.get("labels")
        if isinstance(labels, torch.Tensor):
            # what a causal-LM loss is computed on: labels[..., 1:] (packed rows carry -100 at each sample start)
            self.supervised += int(labels[..., 1:].ne(IGNORE_INDEX).sum())
        self.batches += 1

    def summed_over(self, accelerator) -> "TokenStats":
        """The counts of every process of a multi-process run added up (a collective: call it on every rank)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self
        counts = torch.tensor([self.processed, self.real, self.supervised, self.batches], device=accelerator.device)
        total = accelerator.reduce(counts, reduction="sum").tolist()
        return TokenStats(*[int(x) for x in total])

    @property
    def pad_fraction(self) -> float:
        return 1.0 - self.real / self.processed if self.processed else 0.0

    def metrics(self, prefix: str = "train") -> dict:
        return {f"{prefix}_tokens_processed": self.processed, f"{prefix}_tokens_real": self.real,
                f"{prefix}_tokens_supervised": self.supervised, f"{prefix}_pad_fraction": round(self.pad_fraction, 4)}
