"""Padding-free packing is exact: a packed sample sees only itself, and a packed training step
(rows run one after another, loss on supervised positions only) equals a padded step on full logits."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script

from medgpt.data.collator import TokenStats, build_collator, enable_packing, packing_mode, split_packed_batch
from medgpt.data.sft import IGNORE_INDEX
from medgpt.kernels.packed_attention import VARLEN_SDPA


def _samples(lengths, prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(10, 5000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def _llama(tokenizer, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _assert_isolated(model, collator, samples):
    batch = collator(samples)
    with torch.no_grad():
        packed = model(**_model_inputs(batch)).logits[0]  # use_cache as configured (True): no help from the mask
        start = 0
        for s in samples:
            alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            n = len(s["input_ids"])
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


def test_packed_logits_equal_each_sample_alone(smol_tokenizer):
    model = _llama(smol_tokenizer)
    collator, packed = build_collator(smol_tokenizer, model, packing=True)
    assert packed and model.config._attn_implementation == VARLEN_SDPA
    _assert_isolated(model, collator, _samples([9, 17, 5, 12]))


def test_sliding_window_models_stay_isolated_and_windowed(smol_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)).eval()
    collator, packed = build_collator(smol_tokenizer, model, packing=True)
    assert packed
    _assert_isolated(model, collator, _samples([11, 3, 14]))  # samples longer and shorter than the window


def test_padded_batches_still_work_under_the_packed_attention(smol_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    model = _llama(smol_tokenizer)
    samples = _samples([6, 10])
    pad = DataCollatorForSeq2Seq(smol_tokenizer, label_pad_token_id=IGNORE_INDEX)(samples)
    with torch.no_grad():
        before = model(**pad).loss
        enable_packing(model)
        after = model(**pad).loss
    torch.testing.assert_close(before, after)


def test_eager_attention_falls_back_to_padding(smol_tokenizer):
    model = _llama(smol_tokenizer, attn_implementation="eager")
    assert packing_mode(model)[0] is None
    collator, packed = build_collator(smol_tokenizer, model, packing=True)
    assert not packed
    batch = collator(_samples([4, 7]))
    assert batch["input_ids"].shape[0] == 2 and "cu_seq_lens_q" not in batch


def test_split_packed_batch_keeps_whole_samples_within_the_limit(smol_tokenizer):
    model = _llama(smol_tokenizer)
    collator, _ = build_collator(smol_tokenizer, model, packing=True)
    samples = _samples([5, 6, 20, 3, 3, 4])
    batch = collator(samples)
    rows = split_packed_batch(batch, 12)
    assert [r["input_ids"].shape[1] for r in rows] == [11, 20, 10]  # 5+6 | 20 (alone, over the limit) | 3+3+4
    assert torch.equal(torch.cat([r["input_ids"] for r in rows], 1), batch["input_ids"])
    assert torch.equal(torch.cat([r["labels"] for r in rows], 1), batch["labels"])
    assert rows[2]["cu_seq_lens_q"].tolist() == [0, 3, 6, 10] and rows[2]["max_length_q"] == 4
    assert rows[2]["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3]]
    assert split_packed_batch(batch, 0) == [batch] and split_packed_batch(batch, 1000) == [batch]


def _lora(tokenizer, gradient_checkpointing=False):
    from types import SimpleNamespace

    from medgpt.args import LoraArguments
    from medgpt.modeling import apply_lora

    model = _llama(tokenizer)
    model = apply_lora(model, LoraArguments(lora_dropout=0.0), SimpleNamespace(gradient_checkpointing=gradient_checkpointing))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _trainer(cls, model, tmp_path, collator, **kwargs):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    return cls(model=model, args=args, data_collator=collator, **kwargs)


def _step(trainer, batch):
    """One training step as the Trainer runs it: loss normalized by the batch's supervised token count."""
    trainer.model.zero_grad()
    n = batch["labels"][..., 1:].ne(IGNORE_INDEX).sum()
    loss = trainer.training_step(trainer.model, dict(batch), n)
    return loss, {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_packed_training_step_equals_padded_step(smol_tokenizer, tmp_path, gradient_checkpointing):
    from transformers import DataCollatorForSeq2Seq, Trainer

    from medgpt.trainers.lm import LeanTrainer

    samples = _samples([9, 17, 5, 12, 30], prompt=4)
    # reference: plain Trainer, padded batch, the model's own loss on full logits
    model = _lora(smol_tokenizer, gradient_checkpointing)
    pad = DataCollatorForSeq2Seq(smol_tokenizer, label_pad_token_id=IGNORE_INDEX)
    ref_loss, ref_grads = _step(_trainer(Trainer, model, tmp_path / "pad", pad), pad(samples))
    # ours: packed rows of at most 32 tokens (three passes accumulated), logits at supervised positions only
    model = _lora(smol_tokenizer, gradient_checkpointing)
    collator, packed = build_collator(smol_tokenizer, model, packing=True)
    trainer = _trainer(LeanTrainer, model, tmp_path / "packed", collator, max_packed_tokens=32)
    batch = collator(samples)
    assert packed and len(split_packed_batch(batch, 32)) == 3
    loss, grads = _step(trainer, batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert trainer.token_stats.supervised == int(batch["labels"][..., 1:].ne(IGNORE_INDEX).sum())
    assert trainer.token_stats.pad_fraction == 0.0


def test_lean_loss_equals_full_logits_loss_on_padded_batches(smol_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    from medgpt.trainers.lm import supervised_lm_loss

    model = _llama(smol_tokenizer)
    batch = DataCollatorForSeq2Seq(smol_tokenizer, label_pad_token_id=IGNORE_INDEX)(_samples([8, 20, 13]))
    with torch.no_grad():
        full = model(**batch)
        lean, outputs = supervised_lm_loss(model, batch)
    torch.testing.assert_close(lean, full.loss)
    kept = batch["labels"][..., 1:].ne(IGNORE_INDEX).any(0).sum()
    assert outputs.logits.shape[1] == kept < batch["input_ids"].shape[1]


@pytest.mark.parametrize("tie", [True, False])
def test_fused_head_and_swiglu_match_the_model_on_padded_batches(smol_tokenizer, tie):
    """With gradients on, the loss fused with the head (medgpt.kernels.cross_entropy.linear_cross_entropy, chunked)
    and the recomputing SwiGLU give the model's own loss on full logits and the same gradients, for every parameter
    (the head/embedding trains here), on a padded batch whose rows leave some kept positions unsupervised."""
    from transformers import DataCollatorForSeq2Seq

    from medgpt.kernels.cross_entropy import plain_head
    from medgpt.kernels.fused import use_recomputed_swiglu
    from medgpt.trainers.lm import supervised_lm_loss

    batch = DataCollatorForSeq2Seq(smol_tokenizer, label_pad_token_id=IGNORE_INDEX)(_samples([8, 20, 13]))
    results = []
    for lean in (False, True):
        model = _llama(smol_tokenizer, tie_word_embeddings=tie).train()
        if lean:
            assert use_recomputed_swiglu(model) == 2
            assert plain_head(model) is not None
            loss, outputs = supervised_lm_loss(model, batch)
            assert outputs.logits is None  # the head ran inside the fused loss
        else:
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref)
    assert all(g is not None for g in grads.values())
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_matches_llamas(dtype):
    """medgpt.kernels.fused' rotary drop-in gives Llama's apply_rotary_pos_emb values and gradients (float32: to
    rounding; bf16: no further from a float64 reference than Llama's own), on transformers' transposed q/k layout;
    inputs it does not cover (mixed dtypes, cos halves that differ) go to the original unchanged."""
    from transformers.models.llama import modeling_llama

    from medgpt.kernels.fused import _llama_rotary

    original = getattr(modeling_llama.apply_rotary_pos_emb, "medgpt_original", modeling_llama.apply_rotary_pos_emb)
    fused = _llama_rotary(original)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 11, 4, 16, generator=gen).transpose(1, 2)
    k = torch.randn(2, 11, 2, 16, generator=gen).transpose(1, 2)
    angles = torch.rand(2, 11, 8, generator=gen) * 20
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    grads = torch.randn(2, 4, 11, 16, generator=gen), torch.randn(2, 2, 11, 16, generator=gen)

    def run(apply, dt):
        qq, kk = q.to(dt, copy=True).requires_grad_(), k.to(dt, copy=True).requires_grad_()
        out = apply(qq, kk, cos.to(dt), sin.to(dt))
        torch.autograd.backward(out, [g.to(dt) for g in grads])
        return [t.detach().double() for t in (*out, qq.grad, kk.grad)]

    ref = run(original, torch.float64)
    llama, ours = run(original, dtype), run(fused, dtype)
    for i, want in enumerate(ref):
        if dtype is torch.float32:
            torch.testing.assert_close(ours[i], llama[i], rtol=1e-5, atol=1e-6)
        else:
            assert (ours[i] - want).norm() <= 1.2 * (llama[i] - want).norm() + 1e-6, i
    # not covered: q in bf16 with float32 cos/sin (autocast over float32 weights), and halves that differ
    qb, kb = q.bfloat16(), k.bfloat16()
    for a, b in zip(fused(qb, kb, cos, sin), original(qb, kb, cos, sin)):
        assert a.dtype is torch.float32 and torch.equal(a, b)
    skewed = cos.clone()
    skewed[..., 0] += 0.5
    for a, b in zip(fused(q, k, skewed, sin), original(q, k, skewed, sin)):
        assert torch.equal(a, b)


def test_use_fused_rotary_patches_llama_once(smol_tokenizer, monkeypatch):
    """use_fused_rotary swaps modeling_llama's apply_rotary_pos_emb once (a second call does not wrap it again), and
    the model's loss and gradients stay those of the original."""
    from transformers.models.llama import modeling_llama

    from medgpt.kernels.fused import use_fused_rotary

    # Llama's own (an in-process training run of an earlier test may have swapped it); restored after the test
    original = getattr(modeling_llama.apply_rotary_pos_emb, "medgpt_original", modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)
    from transformers import DataCollatorForSeq2Seq

    batch = DataCollatorForSeq2Seq(smol_tokenizer, label_pad_token_id=IGNORE_INDEX)(_samples([8, 20, 13]))
    results = []
    for fused in (False, True):
        model = _llama(smol_tokenizer).train()
        if fused:
            assert use_fused_rotary(model) == 1 and use_fused_rotary(model) == 1
            assert modeling_llama.apply_rotary_pos_emb.medgpt_original is original
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_linear_cross_entropy_chunks_and_ignored_targets():
    from medgpt.kernels.cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 4, 29, 0, -100, 7, 8, 9])
    full = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    full.backward()
    ref = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    fused = linear_cross_entropy(hidden, weight, targets, chunk=3)
    (fused * 2).backward()  # the upstream gradient scales the precomputed ones
    torch.testing.assert_close(fused, full)
    torch.testing.assert_close(hidden.grad, 2 * ref[0])
    torch.testing.assert_close(weight.grad, 2 * ref[1])


def test_token_stats_count_padding():
    stats = TokenStats()
    stats.update({"input_ids": torch.zeros(2, 5, dtype=torch.long),
                  "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
                  "labels": torch.tensor([[-100, 1, 1, 1, 1], [-100, 1, -100, -100, -100]])})
    assert (stats.processed, stats.real, stats.supervised) == (10, 7, 5)
    assert stats.metrics()["train_pad_fraction"] == 0.3


def test_sft_script_packed_and_padded_learn_the_same(tiny_model_dir, tmp_path):
    data = "data/finetune/medical_sft_messages.jsonl"
    results = {}
    for packing in ("True", "False"):
        out = tmp_path / packing
        run_script("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", data,
                   "--output_dir", str(out), "--do_train", "--max_steps", "3", "--per_device_train_batch_size", "4",
                   "--learning_rate", "1e-2", "--lora_dropout", "0", "--report_to", "none", "--save_strategy", "no",
                   "--packing", packing, "--max_packed_tokens", "128")
        results[packing] = json.loads((out / "train_results.json").read_text())
    packed, padded = results["True"], results["False"]
    assert packed["train_loss"] == pytest.approx(padded["train_loss"], rel=1e-4)
    assert packed["train_tokens_supervised"] == padded["train_tokens_supervised"] > 0
    assert packed["train_pad_fraction"] == 0.0 < padded["train_pad_fraction"]


def test_fast_cpu_dropout_keeps_dropout_semantics(smol_tokenizer):
    from medgpt.kernels.lora import FastCPUDropout, use_fast_cpu_dropout

    drop = FastCPUDropout(0.25)
    x = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(1)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.01
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient flows through kept elements only, scaled alike
    torch.manual_seed(1)
    assert torch.equal(drop(x), y)  # same seed, same mask
    drop.eval()
    assert torch.equal(drop(x), x)

    model = _lora(smol_tokenizer)  # lora_dropout 0: nothing to swap
    assert use_fast_cpu_dropout(model) == 0
    from types import SimpleNamespace

    from medgpt.args import LoraArguments
    from medgpt.modeling import apply_lora
    model = apply_lora(_llama(smol_tokenizer), LoraArguments(lora_dropout=0.1), SimpleNamespace(gradient_checkpointing=False))
    assert use_fast_cpu_dropout(model) == 14  # 7 linear layers x 2 decoder layers


@pytest.mark.parametrize("dropout,train", [(0.1, True), (0.0, True), (0.1, False)])
def test_fused_lora_matches_peft(smol_tokenizer, dropout, train):
    """The fused CPU LoRA layer gives peft's outputs and gradients (input, A, B), with the same dropout masks."""
    from types import SimpleNamespace

    from medgpt.args import LoraArguments
    from medgpt.kernels.lora import use_fast_cpu_dropout, use_fused_lora
    from medgpt.modeling import apply_lora

    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = apply_lora(_llama(smol_tokenizer), LoraArguments(lora_dropout=dropout),
                           SimpleNamespace(gradient_checkpointing=False))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
        use_fast_cpu_dropout(model)
        if fused:
            assert use_fused_lora(model) == 14
        model.train(train)
        ids = torch.randint(0, 1000, (2, 24))
        torch.manual_seed(5)
        out = model(input_ids=ids, labels=ids)
        seen, stack = {}, [out.loss.grad_fn]
        while stack:  # which autograd ops built the loss
            node = stack.pop()
            if node is not None and id(node) not in seen:
                seen[id(node)] = type(node).__name__
                stack += [next_fn for next_fn, _ in node.next_functions]
        assert ("_LoRABranchBackward" in seen.values()) == fused
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads))
    (logits, grads), (fused_logits, fused_grads) = results
    torch.testing.assert_close(fused_logits, logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == fused_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], atol=1e-6, rtol=1e-4)
