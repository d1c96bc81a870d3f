"""bf16 on a CPU (medgpt/precision.py): the capability check and its fallback, our kernels in bf16, and bf16 training
following the float32 loss curve."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
from medgpt import precision


@pytest.fixture
def fresh_check(monkeypatch, tmp_path):
    """An uncached capability check with its cache file in tmp_path."""
    monkeypatch.setenv("MEDGPT_HOME", str(tmp_path))
    monkeypatch.delenv(precision.ENV, raising=False)
    precision.cpu_bf16.cache_clear()
    precision._log_decision.cache_clear()
    yield
    precision.cpu_bf16.cache_clear()
    precision._log_decision.cache_clear()


def test_cpu_without_bf16_flags_trains_in_float32_and_says_why(fresh_check, monkeypatch, caplog):
    from medgpt.args import _half_precision_on_cpu
    from medgpt.modeling import resolve_dtype

    monkeypatch.setattr(precision, "_cpu_info", lambda: ("AMD EPYC 7B12", ()))
    monkeypatch.setattr("medgpt.args._cuda_available", lambda: False)
    monkeypatch.setattr("medgpt.modeling.has_cuda", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert _half_precision_on_cpu(["--bf16", "--fp16", "True", "--x", "1"]) == ["--x", "1"]
        assert resolve_dtype("bfloat16") is torch.float32
    text = caplog.text
    assert "-> float32" in text and "AMD EPYC 7B12 has no native bf16" in text and "300x slower" in text


def test_timed_matmul_decides_and_is_cached(fresh_check, monkeypatch, tmp_path, caplog):
    """Flags that promise bf16 are not enough: a slow measured bf16 matmul means float32, and the verdict is cached."""
    calls = []

    def gflops(dtype, **kw):
        calls.append(dtype)
        return 67.0 if dtype is torch.float32 else 0.2

    monkeypatch.setattr(precision, "_cpu_info", lambda: ("Some CPU", ("avx512_bf16",)))
    monkeypatch.setattr(precision, "_matmul_gflops", gflops)
    check = precision.cpu_bf16()
    assert not check.fast and "bf16 matmul 0 GFLOP/s vs fp32 67" in check.reason and "1.3x" in check.reason
    assert len(calls) == 2
    cached = json.loads((tmp_path / "cpu_bf16.json").read_text())
    assert [v["fast"] for v in cached.values()] == [False]
    precision.cpu_bf16.cache_clear()
    assert not precision.cpu_bf16().fast and len(calls) == 2  # read from the cache, not measured again
    with caplog.at_level(logging.WARNING):
        assert precision.half_precision_on_cpu("--bf16") is None
    assert "--bf16 on this CPU -> float32" in caplog.text


def test_fast_bf16_keeps_bf16_flags_and_adds_use_cpu(fresh_check, monkeypatch):
    from medgpt.args import _half_precision_on_cpu
    from medgpt.modeling import resolve_dtype

    monkeypatch.setenv(precision.ENV, "1")
    monkeypatch.setattr("medgpt.args._cuda_available", lambda: False)
    monkeypatch.setattr("medgpt.modeling.has_cuda", lambda: False)
    assert _half_precision_on_cpu(["--fp16", "--x", "1"]) == ["--x", "1", "--bf16", "True", "--use_cpu", "True"]
    assert _half_precision_on_cpu(["--bf16", "False"]) == []  # asked for float32: nothing to do
    assert _half_precision_on_cpu(["--bf16_full_eval", "--use_cpu", "True"]) == ["--use_cpu", "True", "--bf16_full_eval", "True"]
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float16") is torch.bfloat16
    assert resolve_dtype(None) is torch.float32  # bf16 on a CPU is asked for, never a default


def test_this_machines_check_agrees_with_its_flags(fresh_check):
    check = precision.cpu_bf16()
    cpu, flags = precision._cpu_info()
    if not flags:
        assert not check.fast
    else:
        assert check.fast == (check.bf16_gflops >= precision.MIN_SPEEDUP * check.fp32_gflops)
    assert check.reason


def _tiny_llama(smol_tokenizer, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        initializer_range=0.2)).to(dtype)


def test_default_packed_rows_are_longer_in_bf16_on_a_cpu(smol_tokenizer, tmp_path):
    """SFT/PT rows default to 2 samples' worth of tokens, 3.5 in bf16 on a CPU (--bf16, or bf16 weights), where
    longer rows are faster at float32's memory (medgpt.trainers.lm.default_max_packed_tokens)."""
    from transformers import TrainingArguments

    from medgpt.trainers.lm import default_max_packed_tokens

    fp32, bf16 = _tiny_llama(smol_tokenizer, torch.float32), _tiny_llama(smol_tokenizer, torch.bfloat16)
    plain = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    autocast = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=True)
    assert default_max_packed_tokens(512, fp32, plain) == 1024
    assert default_max_packed_tokens(512, fp32, autocast) == 1792
    assert default_max_packed_tokens(512, bf16, plain) == 1792
    assert default_max_packed_tokens(300, bf16, plain) == 1050


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_lora_in_bf16_is_as_close_to_float32_as_peft(smol_tokenizer, dropout):
    """bf16 weights, float32 LoRA weights (peft's choice), bf16 autocast: the fused layer (bf16 matmuls, with dropout
    a bf16 mask drawn from the same numbers, or the bool mask with compact masks) is as close to the float32 model's loss and LoRA gradients as peft's own
    bf16 forward, and adapter gradients stay float32."""
    from medgpt.args import LoraArguments
    from medgpt.kernels.lora import use_fast_cpu_dropout, use_fused_lora
    from medgpt.modeling import apply_lora

    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    results = {}
    saved = {}
    for name in ("fp32", "peft-bf16", "fused-bf16", "fused-bf16-compact"):
        model = _tiny_llama(smol_tokenizer, torch.float32)
        model = apply_lora(model, LoraArguments(lora_dropout=dropout), SimpleNamespace(gradient_checkpointing=False))
        use_fast_cpu_dropout(model)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(pname))) * 0.1)
                elif not param.requires_grad and name != "fp32":
                    param.data = param.data.bfloat16()  # the frozen base in bf16, as --torch_dtype bfloat16 loads it
        if name.startswith("fused"):  # 7 linear layers x 2 decoder layers
            assert use_fused_lora(model, compact_masks=name.endswith("compact")) == 14
        torch.manual_seed(5)  # the same dropout masks in every run
        saved[name] = set()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "fp32"), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved[name].add(t.dtype) or t, lambda t: t):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert len(grads) == 28 and all(g.dtype is torch.float32 for g in grads.values())
        results[name] = (float(out.loss.detach()), torch.cat([g.flatten() for g in grads.values()]))
    ref_loss, ref = results["fp32"]
    errors = {}
    for name in ("peft-bf16", "fused-bf16"):
        loss, grad = results[name]
        assert loss == pytest.approx(ref_loss, rel=1e-2)
        errors[name] = float((grad - ref).norm() / ref.norm())
    assert errors["fused-bf16"] < 0.05 and errors["fused-bf16"] < 1.5 * errors["peft-bf16"] + 1e-3, errors
    # compact masks (LeanTrainer's): the same masks kept as bool, so the same loss and gradients
    assert results["fused-bf16-compact"][0] == results["fused-bf16"][0]
    assert torch.equal(results["fused-bf16-compact"][1], results["fused-bf16"][1])
    assert (torch.bool in saved["fused-bf16-compact"]) == (dropout > 0) and torch.bool not in saved["fused-bf16"]


def test_linear_cross_entropy_in_bf16_is_close_to_float32():
    """The fused head + loss with a bf16 head: loss and gradient within bf16 rounding of the float32 result, the loss
    accumulated in float32, odd-sized chunks padded without changing the result."""
    from medgpt.kernels.cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(203, 64)
    weight = torch.randn(500, 64) * 0.2
    targets = torch.randint(0, 500, (203,))
    targets[::7] = -100
    h32 = hidden.clone().requires_grad_()
    loss32 = linear_cross_entropy(h32, weight, targets, chunk=64)
    loss32.backward()
    h16 = hidden.bfloat16().requires_grad_()
    loss16 = linear_cross_entropy(h16, weight.bfloat16(), targets, chunk=64)
    loss16.backward()
    assert loss16.dtype is torch.float32
    assert float(loss16) == pytest.approx(float(loss32), rel=5e-3)
    assert h16.grad.dtype is torch.bfloat16 and h16.grad.shape == h32.grad.shape
    torch.testing.assert_close(h16.grad.float(), h32.grad, atol=2e-2, rtol=5e-2)


def test_bf16_dropout_mask_is_the_bool_mask():
    """keep_mask in bf16 is the bool mask of the same draws, as 0/1 values."""
    from medgpt.kernels.lora import keep_mask

    torch.manual_seed(3)
    mask = keep_mask((5, 700), 0.3)
    torch.manual_seed(3)
    mask16 = keep_mask((5, 700), 0.3, torch.bfloat16)
    assert mask.dtype is torch.bool and mask16.dtype is torch.bfloat16
    assert torch.equal(mask16, mask.to(torch.bfloat16)) and 0.25 < 1 - float(mask.float().mean()) < 0.35


@pytest.mark.parametrize("train_weight", [False, True])
def test_fused_rmsnorm_in_bf16_is_as_close_to_float32_as_llamas(train_weight):
    """The fused bf16 RMSNorm (medgpt.kernels.fused) is as close to a float32 RMSNorm as Llama's own bf16 forward, for
    the output, the input gradient and (full fine-tuning) the weight gradient; float32 inputs keep Llama's forward."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from medgpt.kernels.fused import use_fused_rmsnorm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 96, generator=gen) * 3
    grad = torch.randn(3, 40, 96, generator=gen)
    weight = torch.rand(96, generator=gen) + 0.5
    results = {}
    for name in ("fp32", "llama-bf16", "fused-bf16"):
        norm = LlamaRMSNorm(96, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(weight)
        norm.weight.requires_grad_(train_weight)
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        norm = norm.to(dtype)
        if name == "fused-bf16":
            assert use_fused_rmsnorm(torch.nn.Sequential(norm)) == 1
        inp = x.to(dtype, copy=True).requires_grad_()
        out = norm(inp)
        assert out.dtype is dtype
        out.backward(grad.to(dtype))
        results[name] = [out.detach().float(), inp.grad.float()] + ([norm.weight.grad.float()] if train_weight else [])
    for i, ref in enumerate(results["fp32"]):
        err = {name: float((results[name][i] - ref).norm() / ref.norm()) for name in ("llama-bf16", "fused-bf16")}
        assert err["fused-bf16"] < 1.5 * err["llama-bf16"] + 1e-3, (i, err)
    fused = LlamaRMSNorm(96)
    use_fused_rmsnorm(torch.nn.Sequential(fused))
    torch.testing.assert_close(fused(x), LlamaRMSNorm(96)(x), rtol=0, atol=0)  # float32: Llama's own forward


def test_pad_packed_row_keeps_samples_and_loss(smol_tokenizer):
    """The filler that rounds a packed row's length changes neither the real samples' logits nor the loss."""
    from medgpt.data.collator import TokenStats, enable_packing, pad_packed_row
    from medgpt.trainers.lm import supervised_lm_loss

    model = _tiny_llama(smol_tokenizer, torch.float32)
    enable_packing(model)
    lengths = [5, 9, 7]
    ids = torch.randint(0, 1000, (1, sum(lengths)))
    labels = ids.clone()
    cu = torch.tensor([0, 5, 14, 21], dtype=torch.int32)
    for start in cu[:-1]:
        labels[0, start] = -100
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    row = {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(),
           "max_length_q": 9, "max_length_k": 9}
    padded = pad_packed_row(row, 16)
    assert padded["input_ids"].shape[1] == 32 and padded["filler_tokens"] == 11
    assert padded["cu_seq_lens_q"].tolist() == [0, 5, 14, 21, 32] and padded["position_ids"][0, 21:].tolist() == list(range(11))
    assert pad_packed_row(padded, 16) is padded
    with torch.no_grad():
        keys = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
        a = model(**{k: row[k] for k in keys}, use_cache=False).logits
        b = model(**{k: padded[k] for k in keys}, use_cache=False).logits
        torch.testing.assert_close(b[:, :21], a, atol=1e-5, rtol=1e-5)
        loss_a, _ = supervised_lm_loss(model, {k: row[k] for k in keys + ("labels",)})
        loss_b, _ = supervised_lm_loss(model, {k: padded[k] for k in keys + ("labels",)})
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-6)
    stats = TokenStats()
    stats.update(padded)
    assert (stats.processed, stats.real, stats.supervised) == (32, 21, 18)


@pytest.mark.parametrize("heads,kv_heads,n", [(9, 3, 37), (4, 4, 64), (6, 2, 130), (4, 2, 256), (9, 3, 300)])
def test_cpu_attention_in_bf16_matches_float32_sdpa(heads, kv_heads, n):
    """medgpt.kernels.bf16_attention (bf16 scores and probabilities, GQA by stacking query heads, lengths padded to
    64) gives causal attention's output and gradients within bf16 rounding of float32 sdpa (measured 0.4-0.6%), and no
    query sees a later key."""
    from medgpt.kernels import bf16_attention
    from medgpt.kernels.bf16_attention import causal_attention

    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, h, n, 16, generator=gen) for h in (heads, kv_heads, kv_heads))
    weights = torch.randn(1, n, heads, 16, generator=gen)
    q32, k32, v32 = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=True).transpose(1, 2)
    (ref * weights).sum().backward()
    q16, k16, v16 = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = causal_attention(q16, k16, v16)
    assert out.dtype is torch.bfloat16 and out.shape == (1, n, heads, 16)
    (out.float() * weights).sum().backward()
    for name, a, b in (("out", ref, out), ("dq", q32.grad, q16.grad), ("dk", k32.grad, k16.grad),
                       ("dv", v32.grad, v16.grad)):
        assert b.dtype is torch.bfloat16
        assert float((b.detach().float() - a).norm() / a.norm()) < 0.015, name
    later = k.bfloat16().clone()
    later[:, :, n // 2:] += 3.0  # change every key from n // 2 on: earlier queries must not notice
    with torch.no_grad():
        moved = causal_attention(q.bfloat16(), later, v.bfloat16())
    assert torch.equal(moved[:, :n // 2], out.detach()[:, :n // 2]) and not torch.equal(moved, out.detach())
    assert bf16_attention.fits(None, q16, k16, None, dropout=0.0)
    assert not bf16_attention.fits(None, q16, k16, None, is_causal=False)
    assert not bf16_attention.fits(None, q16, k16, None, softcap=30.0)
    long_q, long_k = (torch.zeros(1, h, 513, 16, dtype=torch.bfloat16) for h in (heads, kv_heads))
    assert not bf16_attention.fits(None, long_q, long_k, None)  # longer samples keep float32 flash attention


def test_packed_bf16_rows_use_the_bf16_attention(smol_tokenizer, monkeypatch):
    """A packed bf16 row on the CPU runs each sample through medgpt.kernels.bf16_attention, and every sample's logits
    match the sample run alone through transformers' own sdpa attention, up to bf16 rounding."""
    from medgpt.data.collator import enable_packing
    from medgpt.kernels import bf16_attention

    calls = []
    original = bf16_attention.causal_attention
    monkeypatch.setattr(bf16_attention, "causal_attention",
                        lambda *a, **kw: calls.append(a[0].shape) or original(*a, **kw))
    model = _tiny_llama(smol_tokenizer, torch.bfloat16)
    lengths = [5, 70, 9]
    ids = torch.randint(0, 1000, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        alone = [model(input_ids=x, use_cache=False).logits for x in ids.split(lengths, dim=1)]
        enable_packing(model)
        cu = torch.tensor([0, 5, 75, 84], dtype=torch.int32)
        packed = model(input_ids=ids, position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                       cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=70, max_length_k=70, use_cache=False).logits
    assert [shape[2] for shape in calls] == lengths * 2  # each sample, in each of the 2 layers
    for a, b in zip(alone, packed.split(lengths, dim=1)):
        assert float((b.float() - a.float()).norm() / a.float().norm()) < 0.02


def _sft(model_dir, out, *flags, env=None):
    """supervised_finetuning.py on the sample conversations (batch 4, lr 5e-3, seed 7) through conftest's run_script."""
    return run_script("supervised_finetuning.py", "--model_name_or_path", model_dir, "--train_file_dir",
                      "data/finetune/medical_sft_messages.jsonl", "--output_dir", str(out), "--do_train",
                      "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--report_to", "none",
                      "--save_strategy", "no", "--seed", "7", *flags, env=env)


@pytest.mark.skipif(not precision.cpu_bf16().fast, reason="this CPU has no fast bf16: " + precision.cpu_bf16().reason)
def test_bf16_training_follows_the_float32_loss_curve(learnable_model_dir, tmp_path):
    """On this CPU (native bf16), SFT in bf16 (bf16 weights + autocast) follows the float32 run step by step: every
    step's loss within 3% (bf16 rounds activations to 8 significant bits), and the loss drops as much."""
    curves = {}
    for name, extra in (("fp32", []), ("bf16", ["--torch_dtype", "bfloat16", "--bf16"])):
        out = tmp_path / name
        proc = _sft(learnable_model_dir, out, "--max_steps", "8", "--lora_dropout", "0", "--logging_steps", "1", *extra)
        curves[name] = [float(line.split("'loss': '")[1].split("'")[0])
                        for line in (proc.stdout + proc.stderr).splitlines() if "'loss': '" in line]
        if name == "bf16":
            assert "-> bfloat16" in proc.stderr
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) == 8
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=0.03)
    assert fp32[-1] < fp32[0] - 0.5 and bf16[-1] < bf16[0] - 0.5


def test_no_fast_bf16_means_the_float32_run(learnable_model_dir, tmp_path):
    """Told the CPU lacks fast bf16 (MEDGPT_CPU_BF16=0), --torch_dtype bfloat16 --bf16 trains exactly the float32 run
    and the log says why."""
    results = {}
    for name, extra in (("fp32", []), ("asked-bf16", ["--torch_dtype", "bfloat16", "--bf16"])):
        out = tmp_path / name
        proc = _sft(learnable_model_dir, out, "--max_steps", "2", *extra, env={"MEDGPT_CPU_BF16": "0"})
        results[name] = json.loads((out / "train_results.json").read_text())["train_loss"]
        if extra:
            assert "--bf16 on this CPU -> float32: MEDGPT_CPU_BF16=0" in proc.stderr
            assert "--torch_dtype bfloat16 on this CPU -> float32" in proc.stderr
    assert results["asked-bf16"] == results["fp32"]
