"""Mixture-of-experts models train with LoRA (the fused experts adapted too) and in full, with the router's
load-balancing loss in our lean/packed loss exactly as the model's own forward adds it."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script

IGNORE = -100


def build_tiny_moe(path, tokenizer, kind: str, seed: int = 0, **overrides) -> str:
    """A tiny random MoE causal LM of transformers' `kind` architecture, with the SmolLM2 tokenizer."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    config_cls, model_cls, extra = {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                      dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=64)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                        dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                             topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    }[kind]
    config = getattr(transformers, config_cls)(**{**common, **extra, **overrides})
    model = getattr(transformers, model_cls)(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, smol_tokenizer):
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = build_tiny_moe(tmp_path_factory.mktemp(f"tiny-{kind}"), smol_tokenizer, kind)
        return made[kind]
    return get


def _lora(model, **kw):
    from medgpt.args import LoraArguments
    from medgpt.modeling import apply_lora

    return apply_lora(model, LoraArguments(**kw))


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_lora_all_adapts_every_expert_and_says_so(kind, moe_dirs, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_dirs(kind))
    experts = {n: p.shape for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3}
    with caplog.at_level(logging.INFO):
        model = _lora(model)  # --target_modules all (the default)
    log = caplog.text
    assert "MoE: LoRA on the fused expert weights mlp.experts.down_proj,mlp.experts.gate_up_proj" in log
    assert "LoRA dropout 0.05 -> 0" in log
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expert_lora = [n for n in trainable if ".experts." in n and "lora_" in n]
    # one A and one B per fused weight (gate_up_proj, down_proj) per MoE layer; the base experts stay frozen
    assert len(expert_lora) == 2 * len(experts)  # a lora_A and a lora_B per fused weight of every MoE layer
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))
                   and "lora_" not in n and ".experts." in n)
    assert not any(".gate." in n or "shared_expert_gate" in n for n in trainable)  # routers are not adapted
    # the expert adapters are in the forward: after a step their gradient is non-zero
    for n, p in trainable.items():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(100, 5000, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(trainable[n].grad is not None and trainable[n].grad.abs().sum() > 0 for n in expert_lora)


def test_explicit_target_modules_may_name_expert_weights(moe_dirs, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_dirs("mixtral"))
    model = _lora(model, target_modules="q_proj,v_proj,down_proj", lora_dropout=0.0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("experts.lora_A" in n for n in names) and not any("base_layer.lora_A" in n for n in names)
    assert any("q_proj.lora_A" in n for n in names) and not any("k_proj" in n for n in names)


def _features(tokenizer, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for n in lengths:
        ids = torch.randint(100, 5000, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3:]  # a prompt, then a supervised reply
        feats.append({"input_ids": ids, "labels": labels})
    return feats


def _trainer(model, tmp_path, **kw):
    from transformers import TrainingArguments

    from medgpt.trainers.lm import LeanTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    return LeanTrainer(model=model, args=args, **kw)


@pytest.mark.parametrize("kind,peft", [("mixtral", True), ("qwen2_moe", True), ("qwen3_moe", False)])
def test_packed_loss_equals_the_models_own_loss_with_aux(kind, peft, moe_dirs, smol_tokenizer, tmp_path):
    """The packed lean loss (LeanTrainer.compute_loss on a padding-free row, LM head on supervised positions only)
    equals the model's own loss `CE + router_aux_loss_coef * aux_loss` on the padded batch, to 1e-5; the aux term is
    large enough (> 1e-3) that leaving it out would fail."""
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from medgpt.data.collator import build_collator
    from medgpt.kernels.cross_entropy import plain_head

    model = AutoModelForCausalLM.from_pretrained(moe_dirs(kind))
    assert plain_head(model) is not None  # the hidden states stand in for the logits; the head runs in the loss
    if peft:
        model = _lora(model, lora_dropout=0.0)
        for n, p in model.named_parameters():  # make the adapters (experts included) matter
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
    collator, packed = build_collator(smol_tokenizer, model, packing=True)
    assert packed
    trainer = _trainer(model, tmp_path)
    feats = _features(smol_tokenizer, [37, 20, 51])
    model.train()
    ours = trainer.compute_loss(model, collator(feats))  # with gradients: the training path (head fused with the loss)
    assert ours.requires_grad
    ours = ours.item()
    with torch.no_grad():
        padded = DataCollatorForSeq2Seq(smol_tokenizer, label_pad_token_id=IGNORE)(feats)
        own = model(**padded, output_router_logits=True)
        lm_only = model(**padded).loss.item()
    coef = model.config.router_aux_loss_coef
    assert coef * own.aux_loss.item() > 1e-3
    assert abs(ours - own.loss.item()) < 1e-5, (ours, own.loss.item(), lm_only)
    assert abs(ours - lm_only) > 1e-3
    assert len(trainer._aux_losses) == 1 and abs(trainer._aux_losses[0] - own.aux_loss.item()) < 1e-5


def test_router_aux_loss_coef_flag_and_no_aux_models(moe_dirs, smol_tokenizer, tmp_path):
    """--router_aux_loss_coef overrides the config's weight (0: off); DeepSeek-V3 has no auxiliary loss in
    transformers, so none is added, and asking for one is a one-line error."""
    from transformers import AutoModelForCausalLM

    from medgpt.data.collator import build_collator
    from medgpt.moe import aux_loss_coef

    model = AutoModelForCausalLM.from_pretrained(moe_dirs("mixtral"))
    collator, _ = build_collator(smol_tokenizer, model, packing=True)
    batch = collator(_features(smol_tokenizer, [30, 25]))
    model.train()
    with torch.no_grad():
        off = _trainer(model, tmp_path / "a", router_aux_loss_coef=0.0).compute_loss(model, batch).item()
        big = _trainer(model, tmp_path / "b", router_aux_loss_coef=0.5).compute_loss(model, batch).item()
        aux = model(**{k: v for k, v in batch.items() if k != "labels"}, output_router_logits=True).aux_loss.item()
    assert abs(big - off - 0.5 * aux) < 1e-5
    deepseek = AutoModelForCausalLM.from_pretrained(moe_dirs("deepseek_v3"))
    assert aux_loss_coef(deepseek, None) == 0.0
    with pytest.raises(SystemExit, match="DeepseekV3ForCausalLM computes no router load-balancing loss"):
        aux_loss_coef(deepseek, 0.01)


def _history(out) -> list[dict]:
    return json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]


SFT = ("--train_file_dir", str(ROOT / "data/finetune"), "--max_train_samples", "12", "--model_max_length", "128",
       "--do_train", "--per_device_train_batch_size", "4", "--num_train_epochs", "3", "--logging_steps", "1",
       "--save_strategy", "no", "--report_to", "none", "--seed", "1", "--overwrite_output_dir")


@pytest.mark.parametrize("kind,extra", [("mixtral", ("--learning_rate", "1e-2")),
                                        pytest.param("qwen2_moe", ("--use_peft", "False", "--learning_rate", "2e-3"),
                                                     marks=pytest.mark.slow)])
def test_sft_on_moe_lowers_the_loss(kind, extra, moe_dirs, tmp_path):
    """A few packed SFT steps on a tiny MoE (Mixtral with LoRA on experts; Qwen2-MoE in full) lower the loss; the
    logged aux_loss shows the load-balancing term in the training loss."""
    out = tmp_path / "out"
    proc = run_script("supervised_finetuning.py", "--model_name_or_path", moe_dirs(kind), "--output_dir", str(out),
                      *SFT, *extra, env={"OMP_NUM_THREADS": "1"})
    assert "MoE: the router load-balancing loss x 0.001 (router_aux_loss_coef) is part of the training loss" \
        in proc.stderr
    assert "Packing: batches are padding-free rows" in proc.stderr
    steps = [h for h in _history(out) if "loss" in h]
    losses = [h["loss"] for h in steps]
    assert len(losses) == 9 and all(h["aux_loss"] > 0 for h in steps)
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 0.5, losses
    if "--use_peft" in extra:
        return
    # the adapter (expert LoRA included) loads and changes the model's output
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(moe_dirs(kind))
    ids = torch.randint(100, 5000, (1, 16))
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(out))
        assert any("experts" in n and "lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-3


def test_packed_dpo_adds_the_aux_loss(moe_dirs, tmp_path):
    """Packed DPO on a MoE: the first step's loss is log 2 (policy = reference) + coef * aux_loss."""
    out = tmp_path / "out"
    proc = run_script("dpo_training.py", "--model_name_or_path", moe_dirs("mixtral"), "--output_dir", str(out),
                      "--train_file_dir", str(ROOT / "data/reward"), "--max_train_samples", "8", "--do_train",
                      "--per_device_train_batch_size", "4", "--max_steps", "1", "--learning_rate", "1e-3",
                      "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
                      "--router_aux_loss_coef", "0.05", "--overwrite_output_dir", env={"OMP_NUM_THREADS": "1"})
    assert "DPO: each pair packed" in proc.stderr
    first = next(h for h in _history(out) if "loss" in h)
    assert first["aux_loss"] > 0.5
    assert first["loss"] == pytest.approx(0.693147 + 0.05 * first["aux_loss"], abs=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("peft", [True, False])
def test_zero3_trains_the_one_process_moe(peft, moe_dirs, tmp_path):
    """DeepSpeed ZeRO-3 (DS_ACCELERATOR=cpu, 2 processes over gloo) on a tiny Mixtral, LoRA on the experts or full:
    the same steps, first loss and weights as one process with the global batch (fused experts are gathered whole
    on every rank, whichever experts its tokens reach)."""
    from test_distributed import DS_ENV, assert_same_training, train

    from safetensors.torch import load_file

    model = moe_dirs("mixtral")
    args = ("--train_file_dir", str(ROOT / "data/finetune"), "--max_train_samples", "8", "--model_max_length", "128")
    if not peft:
        args += ("--use_peft", "False")
    one, two = tmp_path / "one", tmp_path / "two"
    train("supervised_finetuning.py", model, one, 1, *args)
    proc = train("supervised_finetuning.py", model, two, 2, *args, "--deepspeed", str(ROOT / "zero3.json"),
                 env=DS_ENV)
    assert "on 2 processes: DEEPSPEED (cpu)" in proc.stderr
    base = None if peft else load_file(str(Path(model) / "model.safetensors"))
    # (float rounding: ~1.5e-5 measured for LoRA; ranks training independently would differ by ~1)
    assert_same_training(one, two, base=base, rtol=1e-4 if peft else 2e-3)
    assert all("aux_loss" in h for h in _history(two) if "loss" in h)


def test_zero3_with_separate_expert_modules_is_one_line():
    """Under ZeRO-3 a model whose experts are separate modules (older remote-code layouts; transformers' own MoE
    models fuse them) stops with one line naming the module, instead of hanging when ranks route differently."""
    from transformers.integrations import HfDeepSpeedConfig

    from medgpt.moe import check_zero3

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(4)])

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Block()])
    check_zero3(model)  # no ZeRO-3: nothing to say
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})  # noqa: F841
    with pytest.raises(SystemExit, match=r"ZeRO-3: Module keeps its experts as separate modules \(layers.0.experts\)"):
        check_zero3(model)
    del zero3
