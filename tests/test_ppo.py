"""PPO (medgpt/trainers/ppo.py + ppo_training.py) on tiny models: the maths, the reference model, learning on a toy
reward, and the script end to end (SFT adapter + reward model in, adapter out, loadable by inference.py)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import build_tiny_model, run_script

YES, NO = "yes", "no"


def build_yes_no_model(path, tokenizer) -> str:
    """A tiny Llama that (by hand-set weights, no training) says "yes"/"no" about equally often, with the
    preference between them reachable by LoRA: every position gets a large constant in hidden dim 0, the
    output head scores yes/no/<|im_end|> on dim 0 and yes-vs-no along a direction of the other dims."""
    from transformers import AutoModelForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return str(path)
    build_tiny_model(path, tokenizer, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    yes, no = tokenizer.convert_tokens_to_ids(YES), tokenizer.convert_tokens_to_ids(NO)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    direction = torch.randn(model.config.hidden_size - 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        head = model.lm_head.weight
        head.zero_()
        head[yes, 0] = head[no, 0] = 1.5
        head[stop, 0] = 1.0
        head[yes, 1:], head[no, 1:] = direction, -direction
    model.save_pretrained(path)
    return str(path)


def yes_fraction(texts) -> list[float]:
    out = []
    for t in texts:
        y, n = t.count(YES), t.count(NO)
        out.append(y / max(y + n, 1))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two (and much faster on a CPU shared with other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def yes_no_model_dir(tmp_path_factory, smol_tokenizer):
    return build_yes_no_model(tmp_path_factory.getbasetemp() / "yes-no-model", smol_tokenizer)


def build_reward_model(path, tokenizer, seed: int = 1) -> str:
    """A tiny random sequence-classification model (one score), as reward_modeling.py saves a full RM."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_sft_adapter(path, base_dir) -> str:
    """A LoRA adapter with non-zero weights (as SFT leaves it), recorded as trained with chatml."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medgpt.generation import write_run_info

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(path)
    write_run_info(str(path), template_name="chatml")
    return str(path)


def chat_prompts(tokenizer, questions=("hi", "hello", "ok", "how are you")) -> list[dict]:
    from medgpt.templates import get_conv_template

    template = get_conv_template("chatml")
    out = []
    for q in questions:
        messages = [{"role": "user", "content": q}]
        text = template.render(messages, add_generation_prompt=True, eos_token=tokenizer.eos_token)
        out.append({"messages": messages, "input_ids": tokenizer(text, add_special_tokens=False)["input_ids"]})
    return out


def load_safetensors(path):
    from safetensors.torch import load_file
    return load_file(path)


# ---------------------------------------------------------------------------------------------------
# The maths

def test_gae_matches_hand_computation():
    from medgpt.trainers.ppo import gae

    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 2 by hand: delta1 = 2.0 + 0 - 0.5 = 1.5; delta0 = 0.5 + 0.9*0.5 - 0.4 = 0.55; A0 = 0.55 + 0.72*1.5
    assert torch.allclose(adv[1], torch.tensor([0.55 + 0.72 * 1.5, 1.5, 0.0, 0.0]))
    # gamma = lam = 1: the advantage is the reward-to-go minus the value; padding carries nothing
    adv1, ret1 = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv1[0], torch.tensor([1 - 0.1, 1 - 0.2, 1 - 0.3, 0.0]))
    assert torch.allclose(ret1[0], torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_masked_whiten_ignores_padding():
    from medgpt.trainers.ppo import masked_mean, masked_whiten

    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert abs(masked_mean(w, mask).item()) < 1e-6
    assert w[0, 3].item() == 0.0
    assert w[0, 2].item() > 1.0


# ---------------------------------------------------------------------------------------------------
# The reference model

def test_reference_adapter_stays_frozen_while_policy_trains(tmp_path, tiny_model_dir):
    """Continuing an SFT adapter: the reference is a frozen copy of it; switching to it and back leaves only the
    policy's adapter trainable, and after an update the reference still gives the SFT model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medgpt.trainers.ppo import Reference

    adapter = build_sft_adapter(tmp_path / "sft", tiny_model_dir)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter, is_trainable=True)
    ref = Reference(policy, "adapter", adapter)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        sft_logits = policy(ids).logits
        with ref.active() as m:
            assert torch.allclose(m(ids).logits, sft_logits)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)

    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    policy(ids).logits.logsumexp(-1).mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(policy(ids).logits, sft_logits)
        with ref.active() as m:
            assert torch.allclose(m(ids).logits, sft_logits)
        assert not torch.allclose(policy(ids).logits, sft_logits)  # back on the policy's adapter


# ---------------------------------------------------------------------------------------------------
# Learning

def make_trainer(model_dir, tokenizer, reward_fn, tmp_path, use_peft=True, steps=8, lr=3e-3, bf16=False, **ppo_kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

    from medgpt.args import LoraArguments
    from medgpt.modeling import apply_lora
    from medgpt.templates import get_conv_template
    from medgpt.trainers.ppo import PPOArguments, PPOTrainer, Reference, stop_token_ids

    set_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if use_peft:
        policy = apply_lora(model, LoraArguments(lora_rank=8, lora_alpha=16))
        ref = Reference(policy, "disable")
    else:
        policy = model
        ref = Reference(policy, "model")
    targs = TrainingArguments(output_dir=str(tmp_path / "ppo"), learning_rate=lr, per_device_train_batch_size=8,
                              report_to=[], save_strategy="no", logging_steps=1, seed=0, bf16=bf16,
                              use_cpu=bf16)
    kwargs = dict(batch_size=8, mini_batch_size=4, num_ppo_epochs=2, response_length=10,
                  total_episodes=8 * steps, kl_coef=0.01, temperature=1.0)
    kwargs.update(ppo_kwargs)
    trainer = PPOTrainer(policy, tok, reward_fn, PPOArguments(**kwargs), targs, ref,
                         stop_token_ids(tok, get_conv_template("chatml")), {"template_name": "chatml"})
    return trainer, chat_prompts(tok)


def test_ppo_raises_a_rule_reward(tmp_path, yes_no_model_dir, smol_tokenizer):
    """LoRA PPO against a reward for saying "yes" rather than "no": the mean reward rises, the policy drifts
    from the reference (KL > 0), and every step is logged to ppo_log.jsonl and trainer_state.json."""
    trainer, prompts = make_trainer(yes_no_model_dir, smol_tokenizer, lambda msgs, texts: yes_fraction(texts), tmp_path)
    trainer.train(prompts)
    rewards = [r["reward"] for r in trainer.log_history]
    assert len(rewards) == 8
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert end > start + 0.2, rewards
    assert end > 0.75, rewards
    assert trainer.log_history[-1]["kl"] > 0.05
    out = tmp_path / "ppo"
    lines = [json.loads(line) for line in (out / "ppo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))
    for key in ("reward", "kl", "value_loss", "policy_loss", "entropy", "clipfrac", "approx_kl", "response_length"):
        assert all(isinstance(r[key], float) and r[key] == r[key] for r in lines), key
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and len(state["log_history"]) == 8
    assert (out / "adapter_model.safetensors").is_file() and (out / "value_head.safetensors").is_file()
    assert not (out / "ref").exists()


@pytest.mark.skipif(not __import__("medgpt.precision").precision.cpu_bf16().fast,
                    reason="this CPU has no fast bf16")
def test_bf16_ppo_runs_its_forward_passes_in_bf16_and_still_learns(tmp_path, yes_no_model_dir, smol_tokenizer):
    """--bf16 over float32 weights: generation and the policy/value/reference forwards run under bf16 autocast
    (a projection's output is bf16), the weights and their optimizer stay float32, and PPO still raises the reward."""
    trainer, prompts = make_trainer(yes_no_model_dir, smol_tokenizer, lambda msgs, texts: yes_fraction(texts), tmp_path,
                                    bf16=True)
    seen = set()
    proj = next(m for n, m in trainer.policy.named_modules() if n.endswith("q_proj.base_layer"))
    proj.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    trainer.train(prompts)
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    rewards = [r["reward"] for r in trainer.log_history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:2]) / 2 + 0.2, rewards


def test_full_parameter_ppo_lowers_a_penalised_token(tmp_path, yes_no_model_dir, smol_tokenizer):
    """Full-parameter PPO (reference = frozen copy): a reward for saying "no" moves the policy the other way,
    and the reference model's weights do not move."""
    trainer, prompts = make_trainer(yes_no_model_dir, smol_tokenizer,
                                    lambda msgs, texts: [1 - y for y in yes_fraction(texts)], tmp_path,
                                    use_peft=False, steps=6, lr=1e-3)
    ref_before = {k: v.clone() for k, v in trainer.reference.model.state_dict().items()}
    policy_before = trainer.policy.lm_head.weight.detach().clone()
    trainer.train(prompts)
    rewards = [r["reward"] for r in trainer.log_history]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.15, rewards
    assert not torch.equal(trainer.policy.lm_head.weight, policy_before)
    for k, v in trainer.reference.model.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    assert (tmp_path / "ppo" / "model.safetensors").is_file()


@pytest.mark.parametrize("use_peft", [True, False])
def test_resumed_training_continues_like_an_uninterrupted_run(tmp_path, yes_no_model_dir, smol_tokenizer, use_peft):
    """4 steps with a checkpoint at step 2; a fresh trainer resumed from checkpoint-2 logs the same steps 3-4 and ends
    with the same weights (LoRA adapter, or the full model), value head and optimizer state."""
    reward = lambda msgs, texts: yes_fraction(texts)  # noqa: E731
    full, prompts = make_trainer(yes_no_model_dir, smol_tokenizer, reward, tmp_path / "full", use_peft=use_peft,
                                 steps=4, lr=1e-3)
    full.targs.save_strategy, full.targs.save_steps = "steps", 2
    full.train(prompts)
    ckpt = tmp_path / "full" / "ppo" / "checkpoint-2"
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "value_head.safetensors"} <= set(os.listdir(ckpt))

    resumed, _ = make_trainer(yes_no_model_dir, smol_tokenizer, reward, tmp_path / "resumed", use_peft=use_peft,
                              steps=4, lr=1e-3)
    resumed.train(prompts, resume_from_checkpoint=str(ckpt))
    assert [r["step"] for r in resumed.log_history] == [1, 2, 3, 4]
    for a, b in zip(full.log_history, resumed.log_history):
        for key in ("reward", "kl", "policy_loss", "value_loss", "approx_kl", "response_length", "learning_rate"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "ppo" / "ppo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    trained = {n: p for n, p in full.policy.named_parameters() if p.requires_grad}
    for n, p in resumed.policy.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, trained[n], rtol=1e-5, atol=1e-7), n
    assert torch.allclose(resumed.value_head.summary.weight, full.value_head.summary.weight, rtol=1e-5, atol=1e-7)


def test_resume_from_a_folder_that_is_no_checkpoint_is_one_line(tmp_path, yes_no_model_dir, smol_tokenizer):
    trainer, prompts = make_trainer(yes_no_model_dir, smol_tokenizer, lambda m, t: [0.0] * len(t), tmp_path, steps=1)
    with pytest.raises(SystemExit, match="no trainer_state.json there: not a PPO checkpoint"):
        trainer.train(prompts, resume_from_checkpoint=str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# The script

def test_ppo_script_from_sft_adapter_and_reward_model(tmp_path, tiny_model_dir, smol_tokenizer):
    """ppo_training.py with an SFT LoRA adapter and a reward model: runs, logs reward/KL/value loss per step,
    changes the adapter's weights, saves an adapter (only the policy's) that inference.py loads."""
    sft = build_sft_adapter(tmp_path / "sft", tiny_model_dir)
    rm = build_reward_model(tmp_path / "rm", smol_tokenizer)
    out = tmp_path / "ppo"
    run_script("ppo_training.py", "--model_name_or_path", tiny_model_dir, "--sft_model_path", sft,
               "--reward_model_path", rm, "--train_file_dir", "data/finetune", "--output_dir", str(out),
               "--batch_size", "4", "--mini_batch_size", "2", "--num_ppo_epochs", "1", "--response_length", "8",
               "--max_steps", "2", "--learning_rate", "1e-2", "--report_to", "none", "--logging_steps", "1",
               "--save_steps", "1", env=ONE_THREAD)
    lines = [json.loads(line) for line in (out / "ppo_log.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for key in ("reward", "kl", "value_loss", "policy_loss", "entropy"):
        assert key in lines[0] and lines[0][key] == lines[0][key]
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    before = load_safetensors(os.path.join(sft, "adapter_model.safetensors"))
    after = load_safetensors(out / "adapter_model.safetensors")
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (out / "ref").exists()
    info = json.loads((out / "medgpt_run.json").read_text())
    assert info["template_name"] == "chatml" and info["stage"] == "ppo"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and len(state["log_history"]) == 2

    proc = run_script("inference.py", "--base_model", tiny_model_dir, "--lora_model", str(out), "--with_prompt",
                      "--prompt", "hi", "--max_new_tokens", "5", "--temperature", "0", env=ONE_THREAD)
    assert proc.returncode == 0


def test_ppo_script_errors_are_one_line(tmp_path, tiny_model_dir, smol_tokenizer):
    rm = build_reward_model(tmp_path / "rm", smol_tokenizer)
    proc = run_script("ppo_training.py", "--model_name_or_path", tiny_model_dir, "--reward_model_path",
                      str(tmp_path / "missing-rm"), "--train_file_dir", "data/finetune", "--output_dir",
                      str(tmp_path / "o"), check=False, env=ONE_THREAD)
    assert proc.returncode != 0 and "missing-rm: no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "p.jsonl").write_text('{"conversations": [{"from": "human", "value": "hi"}]}\n{"conversations": 3}\n')
    proc = run_script("ppo_training.py", "--model_name_or_path", tiny_model_dir, "--reward_model_path", rm,
                      "--train_file_dir", str(bad), "--output_dir", str(tmp_path / "o"), check=False, env=ONE_THREAD)
    assert proc.returncode == 2 and f"{bad / 'p.jsonl'}:2:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_prompt_rows_take_system_and_first_user_turn():
    import ppo_training

    row = ppo_training.prompt_row({"conversations": [
        {"from": "system", "value": "be brief"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}, "f:1")
    assert row["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"}]
    assert ppo_training.prompt_row({"question": "q", "answer": "a"}, "f:2")["messages"] == [{"role": "user", "content": "q"}]
    assert ppo_training.prompt_row({"instruction": "do", "input": "x", "output": "y"}, "f:3")["messages"][-1]["content"] == "do\nx"


@pytest.mark.parametrize("argv", [
    # MedicalGPT's run_ppo.sh, trl-PPOTrainer era
    "--sft_model_path sft --reward_model_path rm --template_name qwen --torch_dtype bfloat16 --train_file_dir d "
    "--validation_file_dir d --max_source_length 1024 --response_length 1000 --per_device_train_batch_size 1 "
    "--gradient_accumulation_steps 4 --gradient_checkpointing True --do_train --total_episodes 30000 --output_dir o "
    "--missing_eos_penalty 1.0 --eval_strategy steps --eval_steps 100 --num_train_epochs 3 --report_to tensorboard",
    # MedicalGPT's older run_ppo.sh (trl 0.x PPOTrainer)
    "--model_type auto --model_name_or_path m --reward_model_name_or_path rm --template_name qwen --torch_dtype float16 "
    "--device_map auto --train_file_dir d --validation_file_dir d --batch_size 8 --max_source_length 2056 "
    "--max_target_length 256 --max_train_samples 1000 --use_peft True --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 "
    "--do_train --max_steps 100 --learning_rate 1e-5 --save_steps 50 --output_dir o --early_stopping True "
    "--target_kl 0.1 --reward_baseline 0.0 --init_kl_coef 0.2",
])
def test_medicalgpt_ppo_flags_parse(argv):
    from transformers import TrainingArguments

    from medgpt.args import DataArguments, LoraArguments, ModelArguments, parse_args
    from medgpt.trainers.ppo import PPOArguments

    model_args, data_args, lora_args, ppo, targs, _ = parse_args(
        ModelArguments, DataArguments, LoraArguments, PPOArguments, TrainingArguments, argv=argv.split())
    assert ppo.reward_model_path == "rm" and ppo.template_name == "qwen"
    if "--total_episodes" in argv:
        assert (ppo.sft_model_path, ppo.response_length, ppo.total_episodes) == ("sft", 1000, 30000)
        assert ppo.missing_eos_penalty == 1.0 and targs.gradient_accumulation_steps == 4
    else:
        assert (ppo.batch_size, ppo.response_length, ppo.kl_coef, targs.max_steps) == (8, 256, 0.2, 100)
        assert ppo.early_stopping and ppo.target_kl == 0.1
