"""dpo_training.py and orpo_training.py on a tiny model: the batches hold one template and one end-of-turn per reply,
a few DPO steps raise the chosen-vs-rejected implicit reward margin (computed here from the saved adapter against
the base), ORPO applies --orpo_beta and saves an adapter that inference loads."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import fused_lora_layers, run_script
from medgpt.data.io import find_data_files, load_records
from medgpt.data.preference import encode_pair, preference_row
from medgpt.templates import get_conv_template
from test_reward_model import sample_pairs

MAX_LENGTH, MAX_PROMPT_LENGTH = 112, 64
COMMON = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--report_to", "none",
          "--gradient_checkpointing", "False", "--max_length", str(MAX_LENGTH), "--max_prompt_length",
          str(MAX_PROMPT_LENGTH), "--seed", "0", "--logging_steps", "1", "--save_strategy", "no",
          "--dataloader_num_workers", "0"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return sample_pairs(tmp_path_factory.mktemp("dpo-data"), 3, 1)


def completion_logps(model, pairs):
    """Summed log-probabilities of the chosen and rejected replies given their prompts."""
    out = []
    with torch.no_grad():
        for enc in pairs:
            row = []
            for key in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([enc["prompt_ids"] + enc[key]])
                logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                targets = ids[0, 1:]
                n = len(enc[key])
                row.append(logp[-n:].gather(-1, targets[-n:, None]).sum().item())
            out.append(row)
    return torch.tensor(out)


def test_dpo_raises_the_reward_margin_and_saves_a_loadable_adapter(tmp_path, tiny_model_dir, pairs_dir, smol_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import dpo_training

    out = tmp_path / "dpo"
    dpo_training.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pairs_dir), "--output_dir",
                       str(out), "--do_train", "--max_steps", "4", "--learning_rate", "5e-3", "--beta", "0.1",
                       "--warmup_steps", "0", *COMMON])
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "medgpt_run.json").read_text())["template_name"] == "chatml"

    template = get_conv_template("chatml")
    rows = load_records(find_data_files(str(pairs_dir)), preference_row)
    pairs = [encode_pair(r, smol_tokenizer, template, MAX_LENGTH, MAX_PROMPT_LENGTH) for r in rows]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ref = completion_logps(base, pairs)
    policy = PeftModel.from_pretrained(base, str(out)).eval()
    logps = completion_logps(policy, pairs)
    margins = 0.1 * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]))  # beta * (log-ratio chosen - rejected)
    # before training the LoRA adapter is the identity (margin 0); after a few steps chosen gained on rejected
    assert margins.mean() > 0.05 and (margins > 0).all(), margins

    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in logs if "rewards/margins" in entry]
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # first step: policy == reference
    assert steps[-1]["rewards/margins"] > 0.05 and steps[-1]["rewards/accuracies"] >= 0.75

    from medgpt.generation import ChatModel, GenerationOptions
    chat = ChatModel(base_model=tiny_model_dir, lora_model=str(out))
    assert chat.template.name == "chatml"
    answer = chat.chat([[{"role": "user", "content": "Hi"}]], GenerationOptions(max_new_tokens=4, temperature=0))
    assert isinstance(answer[0], str)


def test_dpo_batches_hold_one_template_and_one_end_of_turn(tiny_model_dir, pairs_dir, tmp_path):
    import dpo_training
    from trl import DPOConfig

    from medgpt.args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args
    from medgpt.data.preference import build_preference_datasets
    from medgpt.modeling import apply_lora, load_model, load_tokenizer

    model_args, data_args, lora_args, pref_args, args, _ = parse_args(
        ModelArguments, DataArguments, LoraArguments, PreferenceArguments, DPOConfig,
        argv=["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pairs_dir), "--output_dir",
              str(tmp_path), "--do_train", *COMMON, "--max_length", "512", "--max_prompt_length", "256"])
    tok = load_tokenizer(model_args)
    train, _ = build_preference_datasets(data_args, pref_args, tok, get_conv_template("chatml"), args)
    model = apply_lora(load_model(model_args), lora_args, args)
    trainer = dpo_training.MedDPOTrainer(packing=False, model=model, args=args, train_dataset=train,
                                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 8  # 4 chosen + 4 rejected
    for ids, mask, comp in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        text = tok.decode(ids[mask.bool()])
        reply = tok.decode(ids[comp.bool()])
        assert text.count("<|im_start|>assistant\n") == text.count("<|im_start|>user\n")  # one header a turn
        assert text.startswith("<|im_start|>system\n") and text.count("<|im_start|>system") == 1
        assert reply.endswith("<|im_end|>\n") and reply.count("<|im_end|>") == 1
        assert text.endswith("<|im_start|>assistant\n" + reply)


def _dpo_setup(tiny_model_dir, pairs_dir, tmp_path, *flags):
    from trl import DPOConfig

    from medgpt.args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args
    from medgpt.data.preference import build_preference_datasets
    from medgpt.modeling import apply_lora, load_model, load_tokenizer

    model_args, data_args, lora_args, pref_args, args, _ = parse_args(
        ModelArguments, DataArguments, LoraArguments, PreferenceArguments, DPOConfig,
        argv=["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pairs_dir), "--output_dir",
              str(tmp_path), "--do_train", *COMMON, *flags])
    tok = load_tokenizer(model_args)
    train, _ = build_preference_datasets(data_args, pref_args, tok, get_conv_template("chatml"), args)
    model = apply_lora(load_model(model_args), lora_args, args)
    return model, args, tok, train


def _perturb_adapter(model):
    """The same non-identity adapter ('default') on every call, so the policy differs from the reference."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A.default" in name or "lora_B.default" in name:
                param.normal_(0, 0.05)


@pytest.mark.parametrize("window", [None, 6])
def test_packed_pairs_give_the_log_probs_of_separate_sequences(tiny_model_dir, pairs_dir, tmp_path, window):
    """Each pair packed once as prompt + chosen + rejected: every reply's summed log-prob equals the one from its own
    prompt + reply sequence, so the rejected reply never sees the chosen one (also with a sliding window)."""
    from medgpt.data.collator import enable_packing
    from medgpt.trainers.dpo import PairPackingCollator, packed_pair_logps

    model, args, tok, train = _dpo_setup(tiny_model_dir, pairs_dir, tmp_path)
    _perturb_adapter(model)
    base = model.get_base_model()
    if window:
        base.config.sliding_window = window
        base.config.use_sliding_window = True
    model.eval()
    pairs = [train[i] for i in range(len(train))]
    alone = completion_logps(model, pairs)
    assert enable_packing(model) == "varlen_sdpa"
    batch = PairPackingCollator(args.max_length)(pairs)
    assert batch["input_ids"].shape[1] == sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                                              for p in pairs)  # no pad, the prompt once
    with torch.no_grad():
        packed, stats = packed_pair_logps(model, batch, with_stats=True)
    torch.testing.assert_close(packed.view(-1, 2), alone, atol=2e-4, rtol=1e-5)
    assert stats["is_chosen"].sum() == sum(len(p["chosen_ids"]) for p in pairs)


@pytest.mark.parametrize("checkpointing", ["False", "True"])
def test_packed_dpo_step_matches_trl_padded_step(tiny_model_dir, pairs_dir, tmp_path, checkpointing):
    """A packed DPO training step (the batch in one row, or in rows of one pair each) gives the loss, LoRA gradients
    and logged rewards of TRL's padded step (also with gradient checkpointing)."""
    import dpo_training

    results = []
    for packing, max_tokens in ((False, None), (True, 0), (True, 1)):
        model, args, tok, train = _dpo_setup(tiny_model_dir, pairs_dir, tmp_path, "--gradient_checkpointing",
                                             checkpointing)
        trainer = dpo_training.MedDPOTrainer(packing=packing, max_packed_tokens=max_tokens, model=model, args=args,
                                             train_dataset=train, processing_class=tok)
        assert trainer.packed == packing
        _perturb_adapter(model)  # after TRL's set-up: the reference is the base (adapter disabled)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop
        batch = next(iter(trainer.get_train_dataloader()))
        model.zero_grad()
        loss = trainer.training_step(model, batch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
        results.append((loss.item(), grads, metrics))
    loss_pad, grads_pad, m_pad = results[0]
    for loss_packed, grads_packed, m_packed in results[1:]:
        assert loss_packed == pytest.approx(loss_pad, rel=1e-4)
        assert grads_pad.keys() == grads_packed.keys() and len(grads_pad) > 0
        for name in grads_pad:
            torch.testing.assert_close(grads_packed[name], grads_pad[name], atol=1e-5, rtol=1e-3)
        assert m_packed.keys() == m_pad.keys()
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                    "logps/rejected"):
            assert m_packed[key] == pytest.approx(m_pad[key], rel=1e-3, abs=1e-4), key


def test_dpo_step_with_the_cpu_fast_paths_matches_the_plain_models(tiny_model_dir, pairs_dir, tmp_path, monkeypatch):
    """MedDPOTrainer gives the model our CPU fast paths (fused LoRA layers, rotary, SwiGLU:
    medgpt.kernels.use_cpu_fast_paths); a packed DPO step then has the loss and LoRA gradients of the same step on the
    plain model (reference log-probs included: the adapter-disabled pass falls back to peft's forward)."""
    import dpo_training
    import medgpt.trainers.dpo

    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(medgpt.trainers.dpo, "use_cpu_fast_paths", lambda trainer, *models: None)
        model, args, tok, train = _dpo_setup(tiny_model_dir, pairs_dir, tmp_path)
        trainer = dpo_training.MedDPOTrainer(packing=True, model=model, args=args, train_dataset=train,
                                             processing_class=tok)
        assert trainer.packed and (fused_lora_layers(model) > 0) == fast
        _perturb_adapter(model)
        trainer.current_gradient_accumulation_steps = 1
        batch = next(iter(trainer.get_train_dataloader()))
        model.zero_grad()
        loss = trainer.training_step(model, batch)
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_fast, grads_fast), (loss_plain, grads_plain) = results
    assert loss_fast == pytest.approx(loss_plain, rel=1e-5)
    assert grads_fast.keys() == grads_plain.keys() and len(grads_plain) > 0
    for name in grads_plain:
        torch.testing.assert_close(grads_fast[name], grads_plain[name], atol=1e-6, rtol=1e-4)


def test_split_pairs_keeps_whole_pairs_in_order():
    from medgpt.trainers.dpo import PairPackingCollator, split_pairs

    pairs = [{"prompt_ids": [1] * p, "chosen_ids": [2] * c, "rejected_ids": [3] * r}
             for p, c, r in ((3, 2, 4), (5, 1, 1), (2, 6, 3), (4, 4, 4))]
    batch = PairPackingCollator()(pairs)
    rows = split_pairs(batch, 16)
    assert [len(r["pair_lens"]) for r in rows] == [2, 1, 1]  # 9 + 7 fit in 16; 11; 12
    for row, first in zip(rows, (0, 2, 3)):
        alone = PairPackingCollator()(pairs[first:first + len(row["pair_lens"])])
        for key in ("input_ids", "position_ids", "cu_seq_lens_q", "keep", "targets", "groups"):
            assert torch.equal(row[key], alone[key]), key
    assert split_pairs(batch, 0) == [batch] and split_pairs(batch, 100) == [batch]


def test_orpo_uses_orpo_beta_and_saves_a_loadable_adapter(tmp_path, tiny_model_dir, pairs_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import orpo_training

    out = tmp_path / "orpo"
    orpo_training.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pairs_dir),
                        "--validation_file_dir", str(pairs_dir), "--output_dir", str(out), "--do_train", "--do_eval",
                        "--max_steps", "2", "--learning_rate", "1e-3", "--orpo_beta", "0.25", *COMMON])
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    metrics = json.loads((out / "eval_results.json").read_text())
    # rewards are beta * mean log-probability of the reply: --orpo_beta reached ORPOConfig.beta
    assert metrics["eval_rewards/chosen"] == pytest.approx(0.25 * metrics["eval_logps/chosen"], rel=1e-4)
    assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_nll_loss", "eval_log_odds_ratio"} <= set(metrics)
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("nll_loss" in entry for entry in logs)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(out))
    lora = [n for n, _ in model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_dpo_bad_pair_stops_with_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "p.json").write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": "b"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "chosen": "a",
         "rejected": "b"}], indent=1))
    for script in ("dpo_training.py", "orpo_training.py"):
        proc = run_script(script, "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data),
                          "--output_dir", str(tmp_path / "out"), "--do_train", "--report_to", "none", check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"error: {data / 'p.json'}:12: the conversation must end with the user turn" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_dpo_packing_falls_back_to_padding_when_it_cannot_be_exact(tiny_model_dir, pairs_dir, tmp_path, caplog):
    import dpo_training

    model, args, tok, train = _dpo_setup(tiny_model_dir, pairs_dir, tmp_path)
    model.get_base_model().set_attn_implementation("eager")
    trainer = dpo_training.MedDPOTrainer(packing=True, model=model, args=args, train_dataset=train, processing_class=tok)
    assert not trainer.packed and "attention_mask" in next(iter(trainer.get_train_dataloader()))
    assert "DPO packing off" in caplog.text  # (loss types and options: tests/test_dpo_variants.py)
