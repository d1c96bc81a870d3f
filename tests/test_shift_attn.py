"""--shift_attn: LongLoRA's S²-Attn in training (groups of a quarter of the training length, half of the heads shifted
by half a group, per packed sample), full attention in evaluation; SFT and PT train with it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script

from medgpt.shift_attn import enable_shift_attn, s2_visible, shifted_sparse_attention


class _Layer(torch.nn.Module):
    """What the attention function reads from an attention layer."""

    def __init__(self, group, n_rep):
        super().__init__()
        self.s2_group_size, self.num_key_value_groups, self.is_causal = group, n_rep, True


def _expected(lengths, group, heads):
    """[heads, N, N] bool: query i sees key j iff same sample, j <= i, same group (shifted for the second half)."""
    n = sum(lengths)
    seen = torch.zeros(heads, n, n, dtype=torch.bool)
    start = 0
    for length in lengths:
        pos = torch.arange(length)
        for h in range(heads):
            seen[h, start:start + length, start:start + length] = s2_visible(pos, group, shifted=h >= heads // 2)
        start += length
    return seen


def _packed_inputs(lengths, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q = torch.randn(1, heads, n, dim, generator=g, requires_grad=True)
    k = torch.randn(1, kv_heads, n, dim, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, n, dim, generator=g, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def test_a_token_sees_only_earlier_tokens_of_its_group_and_sample():
    """Checked directly on the attention function: output i of head h depends on value/key j exactly when j is an
    earlier (or the same) token of i's group in i's sample; groups of 8, the second half of the heads shifted by 4."""
    lengths, group, heads, kv_heads = [13, 22], 8, 4, 2
    q, k, v, cu = _packed_inputs(lengths, heads, kv_heads)
    layer = _Layer(group, heads // kv_heads).train()
    out, _ = shifted_sparse_attention(layer, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, scaling=8 ** -0.5,
                                      dropout=0.0)
    assert out.shape == (1, sum(lengths), heads, 8)
    want = _expected(lengths, group, heads)
    n = sum(lengths)
    for h in range(heads):
        # row i of the batched gradient: d out[i, h] / d (v, k), one backward per query (is_grads_batched)
        ones = torch.zeros(n, *out.shape)
        ones[torch.arange(n), 0, torch.arange(n), h] = 1.0
        gv, gk = torch.autograd.grad(out, (v, k), grad_outputs=ones, retain_graph=True, is_grads_batched=True)
        kv = h // (heads // kv_heads)
        seen_v = gv[:, 0, kv].abs().sum(-1) > 0  # [query, key]
        seen_k = gk[:, 0, kv].abs().sum(-1) > 0
        assert torch.equal(seen_v, want[h]), (h, (seen_v ^ want[h]).nonzero().tolist()[:5])
        assert not (seen_k & ~want[h]).any()
    # the pattern is the grouped/shifted one, not full causal attention: head 0 (unshifted) and head 3 (shifted)
    assert want[0, 9].nonzero().flatten().tolist() == [8, 9]  # sample 1, group [8, 16)
    assert want[3, 9].nonzero().flatten().tolist() == [4, 5, 6, 7, 8, 9]  # shifted group [4, 12)
    assert want[3, 13 + 2].nonzero().flatten().tolist() == [13, 14, 15]  # sample 2 starts its own half group


def test_values_equal_masked_softmax_and_padded_rows_equal_packed():
    """The grouped computation equals softmax attention under the S² mask; a padded batch (explicit-mask path) gives
    each sample the same output as the packed row (grouped-kernel path)."""
    lengths, group, heads, kv_heads, dim = [13, 22], 8, 4, 2, 8
    q, k, v, cu = _packed_inputs(lengths, heads, kv_heads, dim)
    layer = _Layer(group, heads // kv_heads).train()
    packed, _ = shifted_sparse_attention(layer, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                         scaling=dim ** -0.5, dropout=0.0)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * dim ** -0.5
    scores = scores.masked_fill(~_expected(lengths, group, heads)[None], float("-inf"))
    reference = (scores.softmax(-1) @ vv).transpose(1, 2)
    assert (packed - reference).abs().max().item() < 1e-5

    longest = max(lengths)  # the same samples right-padded to one batch, with a [B, 1, L, L] causal+padding mask
    qs, ks, vs = (torch.zeros(2, x.shape[1], longest, dim) for x in (q, k, v))
    mask = torch.zeros(2, 1, longest, longest, dtype=torch.bool)
    for b, (start, n) in enumerate(zip([0, lengths[0]], lengths)):
        for dst, src in ((qs, q), (ks, k), (vs, v)):
            dst[b, :, :n] = src[0, :, start:start + n].detach()
        mask[b, 0, :, :n] = torch.ones(longest, n, dtype=torch.bool).tril()
    padded, _ = shifted_sparse_attention(layer, qs, ks, vs, mask, scaling=dim ** -0.5, dropout=0.0)
    for b, (start, n) in enumerate(zip([0, lengths[0]], lengths)):
        assert (padded[b, :n] - packed[0, start:start + n]).abs().max().item() < 1e-5


def test_model_trains_grouped_and_evaluates_with_full_attention(tiny_model_dir, smol_tokenizer):
    """On a model: in train mode a token's logits do not change when a token two groups back changes (in a one-layer
    model nothing outside the groups of its two head halves reaches it); in eval mode they do (full attention), and
    eval-mode logits equal the unmodified model's."""
    from transformers import AutoModelForCausalLM

    from medgpt.data.collator import enable_packing

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, num_hidden_layers=1)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, num_hidden_layers=1).eval()
    enable_packing(model)
    assert enable_shift_attn(model, 64) == 16
    ids = torch.randint(100, 5000, (1, 40))
    changed = ids.clone()
    changed[0, 2] += 1  # position 2: group [0, 16) unshifted, [0, 8) shifted
    model.train()
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    diff = (a - b).abs().amax(-1)[0]
    assert diff[:16].max() > 0 and diff[16:].max() == 0  # positions 16.. are in other groups of both halves
    model.eval()
    with torch.no_grad():
        a, b, ref = model(ids).logits, model(changed).logits, reference(ids).logits
    assert (a - b).abs().amax(-1)[0, 16:].max() > 0
    assert (a - ref).abs().max().item() < 1e-5


def _losses(out) -> list[float]:
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.mark.parametrize("script,extra,flag", [
    ("supervised_finetuning.py", ("--train_file_dir", str(ROOT / "data/finetune"), "--model_max_length", "128",
                                  "--max_train_samples", "12"), "--model_max_length 128"),
    ("pretraining.py", ("--train_file_dir", str(ROOT / "data/pretrain"), "--block_size", "64",
                        "--max_train_samples", "12"), "--block_size 64"),
])
def test_training_with_shift_attn_lowers_the_loss(script, extra, flag, tmp_path, learnable_model_dir):
    out = tmp_path / "out"
    proc = run_script(script, "--model_name_or_path", learnable_model_dir, "--output_dir", str(out), *extra,
                      "--shift_attn", "True", "--do_train", "--per_device_train_batch_size", "4",
                      "--num_train_epochs", "3", "--learning_rate", "1e-2", "--logging_steps", "1",
                      "--save_strategy", "no", "--report_to", "none", "--lora_rank", "16", "--seed", "1",
                      "--overwrite_output_dir", env={"OMP_NUM_THREADS": "1"})
    group = int(flag.split()[-1]) // 4
    assert f"S²-Attn (LongLoRA shift short attention) in training: groups of {group} tokens (a quarter of {flag})" \
        in proc.stderr
    losses = _losses(out)
    assert len(losses) >= 6 and sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 1.0, losses
    assert (out / "adapter_model.safetensors").exists()


def test_shift_attn_elsewhere_only_warns(tmp_path, tiny_model_dir):
    from medgpt.args import ModelArguments
    from medgpt.modeling import load_model

    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("medgpt.modeling").addHandler(handler)
    try:
        load_model(ModelArguments(model_name_or_path=tiny_model_dir, shift_attn=True))
    finally:
        logging.getLogger("medgpt.modeling").removeHandler(handler)
    assert any("S²-Attn is for supervised_finetuning.py and pretraining.py" in r.getMessage() for r in records)
