"""cpo_training.py (TRL's experimental CPOTrainer: CPO, SimPO, AlphaPO, no reference model) on a tiny model: SimPO
trains through the script and its metrics show the flags arrived (per-token averaged log-probs, beta, no NLL term at
--cpo_alpha 0); the pairs reach CPO's trainer with medgpt's tokenization (one end-of-turn per reply)."""
from __future__ import annotations

import json
import math

import pytest

from conftest import fused_lora_layers, lora_layers, run_script
from test_dpo_orpo import COMMON
from test_reward_model import sample_pairs


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return sample_pairs(tmp_path_factory.mktemp("cpo-data"), 3, 1)


def test_simpo_trains_through_the_script_and_saves_a_loadable_adapter(tmp_path, tiny_model_dir, pairs_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "simpo"
    proc = run_script("cpo_training.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pairs_dir),
                      "--validation_file_dir", str(pairs_dir), "--output_dir", str(out), "--do_train", "--do_eval",
                      "--max_steps", "3", "--learning_rate", "5e-3", "--loss_type", "simpo", "--cpo_alpha", "0",
                      "--beta", "2.0", "--simpo_gamma", "0.5", "--warmup_steps", "0", *COMMON,
                      env={"OMP_NUM_THREADS": "1"})
    assert "CPO: loss_type simpo, beta 2.0, cpo_alpha 0.0, simpo_gamma 0.5" in proc.stdout + proc.stderr
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    metrics = json.loads((out / "eval_results.json").read_text())
    # SimPO's reward: beta x the reply's log-probability averaged over its tokens (about -log(vocab) = -10.8 for the
    # random tiny model; summed over a reply it would be hundreds); --cpo_alpha 0: no NLL term
    assert metrics["eval_rewards/chosen"] == pytest.approx(2.0 * metrics["eval_logps/chosen"], rel=1e-5)
    assert -13 < metrics["eval_logps/chosen"] < -8 and -13 < metrics["eval_logps/rejected"] < -8
    assert metrics["eval_nll_loss"] == 0.0
    assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_loss"} <= set(metrics)
    assert (out / "adapter_model.safetensors").is_file() and json.loads(
        (out / "medgpt_run.json").read_text())["stage"] == "cpo"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_cpo_trainer_gets_medgpts_tokenization(tmp_path, tiny_model_dir, pairs_dir, smol_tokenizer):
    import cpo_training

    run, trainer = cpo_training.build_trainer(
        ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pairs_dir), "--output_dir", str(tmp_path),
         "--do_train", *COMMON])
    assert run.training_args.loss_type == "sigmoid" and run.training_args.cpo_alpha == 1.0  # CPO by default
    # reference_free_trainer (CPO, ORPO) gives the model our CPU fast paths: every LoRA layer fused
    assert lora_layers(trainer.model) and fused_lora_layers(trainer.model) == len(lora_layers(trainer.model))
    row, pair = trainer.train_dataset[0], run.train_dataset[0]
    assert row["chosen_input_ids"] == pair["prompt_ids"] + pair["chosen_ids"]
    assert row["rejected_labels"] == [-100] * len(pair["prompt_ids"]) + pair["rejected_ids"]
    for key in ("chosen_input_ids", "rejected_input_ids"):
        text = smol_tokenizer.decode(row[key])
        assert text.endswith("<|im_end|>\n") and text.count("<|im_end|>") == text.count("<|im_start|>")
