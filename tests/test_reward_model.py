"""reward_modeling.py and medgpt.reward.RewardScorer on a tiny model: a short run learns to score the chosen replies
of its training pairs above the rejected ones, the saved adapter (+ score head) or full model loads and scores."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import fused_lora_layers, lora_layers, run_script
from medgpt.data.io import find_data_files, load_records
from medgpt.data.preference import preference_row

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--report_to", "none",
          "--gradient_checkpointing", "False", "--max_length", "192", "--max_prompt_length", "96", "--seed", "0",
          "--logging_steps", "5", "--save_strategy", "no", "--dataloader_num_workers", "0"]


def sample_pairs(directory: Path, n_flat: int, n_conversations: int) -> Path:
    """The first pairs of both sample files (data/reward) in one file under `directory`."""
    lines = (ROOT / "data/reward/medical_preference.jsonl").read_text(encoding="utf-8").splitlines()[:n_flat]
    lines += (ROOT / "data/reward/medical_preference_conversations.jsonl").read_text(
        encoding="utf-8").splitlines()[:n_conversations]
    (directory / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return sample_pairs(tmp_path_factory.mktemp("rm-data"), 5, 3)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_model_dir, pairs_dir):
    import reward_modeling

    out = tmp_path_factory.mktemp("rm") / "out"
    reward_modeling.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pairs_dir),
                          "--validation_file_dir", str(pairs_dir), "--output_dir", str(out), "--do_train", "--do_eval",
                          "--max_steps", "12", "--learning_rate", "5e-3", "--warmup_steps", "0", *COMMON])
    return out


def score_pairs(scorer, directory):
    rows = load_records(find_data_files(str(directory)), preference_row)
    prompts = [scorer.build_prompt(r["messages"]) for r in rows]
    return scorer.score(prompts, [r["chosen"] for r in rows]), scorer.score(prompts, [r["rejected"] for r in rows])


def test_reward_model_learns_the_training_pairs(trained_rm, pairs_dir):
    from medgpt.reward import RewardScorer

    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "medgpt_run.json"):
        assert (trained_rm / name).is_file(), name
    adapter = json.loads((trained_rm / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    metrics = json.loads((trained_rm / "eval_results.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9 and metrics["eval_margin"] > 0

    scorer = RewardScorer(str(trained_rm))  # base model from adapter_config.json, template from medgpt_run.json
    assert scorer.template.name == "chatml" and scorer.max_length == 192
    chosen, rejected = score_pairs(scorer, pairs_dir)
    assert chosen.shape == (8,) and chosen.dtype == torch.float32
    assert (chosen > rejected).float().mean() >= 0.9
    # the scorer reproduces the trainer's evaluation (same tokens, same last-token read-out)
    assert (chosen - rejected).mean().item() == pytest.approx(metrics["eval_margin"], rel=1e-3)


def test_scorer_appends_the_end_of_turn_and_batches_consistently(trained_rm):
    from medgpt.reward import RewardScorer

    scorer = RewardScorer(str(trained_rm), batch_size=3)
    prompt = scorer.build_prompt([{"role": "user", "content": "Is it normal to feel tired all the time?"}])
    ids = scorer.encode(prompt, "See a doctor.")
    assert scorer.tokenizer.decode(ids).endswith("<|im_start|>assistant\nSee a doctor.<|im_end|>\n")
    assert scorer.encode(prompt, "See a doctor.<|im_end|>") == ids
    answers = ["See a doctor.", "Sleep more and see a doctor if it lasts.", "Ignore it.", "Drink coffee.", "Rest."]
    together = scorer.score([prompt] * 5, answers)
    alone = torch.cat([scorer.score([prompt], [a]) for a in answers])
    assert torch.allclose(together, alone, atol=1e-4)
    assert torch.allclose(scorer.score_messages([[{"role": "user", "content": "Is it normal to feel tired all the "
                                                                              "time?"}]], ["Rest."]), alone[4:])
    scorer.max_length = 20
    assert len(scorer.encode(prompt, "word " * 50)) == 20


def test_full_reward_model_saves_and_scores(tmp_path, tiny_model_dir, pairs_dir):
    from medgpt.reward import load_reward_model

    import reward_modeling

    out = tmp_path / "full"
    reward_modeling.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pairs_dir),
                          "--output_dir", str(out), "--do_train", "--use_peft", "False", "--max_steps", "2", *COMMON])
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config.get("num_labels", len(config.get("id2label", {}))) == 1
    assert config["pad_token_id"] is not None
    scorer = load_reward_model(str(out))
    chosen, rejected = score_pairs(scorer, pairs_dir)
    assert torch.isfinite(chosen).all() and not torch.equal(chosen, rejected)


def test_reward_trainer_gets_the_cpu_fast_paths(tmp_path, tiny_model_dir, pairs_dir):
    """MedRewardTrainer gives the sequence-classification model our CPU fast paths (fused LoRA layers, rotary,
    SwiGLU: medgpt.kernels.use_cpu_fast_paths), and the fused model scores pairs as the plain one does."""
    import reward_modeling

    run, trainer = reward_modeling.build_trainer(["--model_name_or_path", tiny_model_dir, "--train_file_dir",
                                                  str(pairs_dir), "--output_dir", str(tmp_path), "--do_train", *COMMON])
    model = trainer.model
    layers = lora_layers(model)
    assert layers and fused_lora_layers(model) == len(layers)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        fused = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for layer in layers:  # back to peft's own forward
            del layer.forward
        assert fused_lora_layers(model) == 0
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
    assert fused.std() > 0


def test_bad_pair_stops_with_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    good = {"question": "q", "response_chosen": "a", "response_rejected": "b"}
    (data / "x.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "response_rejected": "a"}) + "\n")
    proc = run_script("reward_modeling.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data),
                      "--output_dir", str(tmp_path / "out"), "--do_train", "--report_to", "none", check=False)
    assert proc.returncode == 2
    assert f"error: {data / 'x.jsonl'}:2: 'response_chosen' and 'response_rejected' are identical" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "adapter_model.safetensors")
