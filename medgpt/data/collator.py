"""Padding-free, exact packing for causal-LM training (SFT, pretraining, and later DPO).

Each batch becomes one row `[1, total_tokens]` with no pad token at all: transformers'
`DataCollatorWithFlattening` concatenates the samples, restarts `position_ids` at every sample,
puts -100 on each sample's first label (so no sample learns to predict the next one) and returns
the sample boundaries `cu_seq_lens_q/k`. Packing is exact only if attention also stays inside each
sample, and that depends on the attention kernel:

* flash_attention_2/3 (CUDA): the kernels read `cu_seq_lens` natively.
* sdpa (CPU, or CUDA without flash-attn): transformers has no variable-length sdpa, so these models switch to
  `medgpt.kernels.packed_attention.varlen_sdpa_attention`, which runs sdpa once per sample (see its module).
* anything else (eager-only models, remote code, ALiBi models without position ids): no packing;
  batches are padded (`packing_mode` says why).

Samples stay in the batches the sampler made (the same batches as padded training), so a packed
run takes the same optimizer steps on the same samples as a padded one, up to float error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..kernels.packed_attention import VARLEN_SDPA, register_varlen_sdpa
from .sft import IGNORE_INDEX

logger = logging.getLogger(__name__)

_FLASH = ("flash_attention_2", "flash_attention_3")


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
    (this switches sdpa models to medgpt.kernels.packed_attention), else padding to the batch's longest sample.
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
