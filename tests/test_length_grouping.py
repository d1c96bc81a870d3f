"""Length-grouped batches for the reward model and ORPO (the default; --train_sampling_strategy random turns it off):
the real trainers' training batches, one epoch drawn without training, carry fewer pads than random ones, hold every
pair exactly once, and the length column never reaches the data collator. Which stages group by default."""
from __future__ import annotations

import json
import random
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_pads import epoch_pads  # noqa: E402

COMMON = ["--per_device_train_batch_size", "4", "--report_to", "none", "--max_length", "256",
          "--max_prompt_length", "128", "--seed", "0", "--save_strategy", "no", "--dataloader_num_workers", "0"]


@pytest.fixture(scope="module")
def varied_pairs_dir(tmp_path_factory):
    """64 pairs whose prompts and replies run from a few to ~60 tokens (both replies of a pair alike, so that what
    pads remain comes from the batching, not from within the pairs)."""
    rng = random.Random(0)
    directory = tmp_path_factory.mktemp("varied-pairs")
    lines = []
    for i in range(64):
        question, reply = rng.randint(1, 60), rng.randint(1, 60)
        lines.append(json.dumps({"question": f"Case {i}: {' '.join(['fever'] * question)}?",
                                 "response_chosen": f"{i} {' '.join(['rest'] * reply)}",
                                 "response_rejected": f"{i} {' '.join(['wait'] * reply)}"}))
    (directory / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def build(stage, model_dir, data_dir, out, *flags):
    if stage == "rm":
        import reward_modeling as script
    else:
        import orpo_training as script
    return script.build_trainer(["--model_name_or_path", model_dir, "--train_file_dir", str(data_dir),
                                 "--output_dir", str(out), "--do_train", *COMMON, *flags])


def spy_on_collator(trainer) -> list:
    """The keys of every example that reaches TRL's collator, behind the length column's filter."""
    seen, inner = [], trainer.data_collator.collator

    def collate(examples):
        seen.extend(set(ex) for ex in examples)
        return inner(examples)

    trainer.data_collator.collator = collate
    return seen


@pytest.mark.parametrize("stage, flags", [("rm", []), ("rm", ["--remove_unused_columns", "False"]), ("orpo", [])])
def test_default_batches_are_length_grouped(stage, flags, tiny_model_dir, varied_pairs_dir, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    run, trainer = build(stage, tiny_model_dir, varied_pairs_dir, tmp_path / "grouped", *flags)
    assert trainer.args.train_sampling_strategy == "group_by_length"
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    seen = spy_on_collator(trainer)
    grouped = epoch_pads(trainer, run.train_dataset, seed=0)

    run, trainer = build(stage, tiny_model_dir, varied_pairs_dir, tmp_path / "random", *flags,
                         "--train_sampling_strategy", "random")
    assert "length" not in run.train_dataset.column_names
    rand = epoch_pads(trainer, run.train_dataset, seed=0)

    assert grouped["each_pair_once"] and rand["each_pair_once"] and grouped["pairs"] == 64
    assert grouped["real_tokens"] == rand["real_tokens"]
    assert grouped["pad_fraction"] < 0.5 * rand["pad_fraction"], (grouped, rand)
    assert seen and not any("length" in keys for keys in seen)  # the sampler had it, the collator never


def test_random_turns_grouping_off(tiny_model_dir, varied_pairs_dir, tmp_path):
    from torch.utils.data import RandomSampler

    for flags in (["--train_sampling_strategy", "random"], ["--group_by_length", "False"]):
        run, trainer = build("orpo", tiny_model_dir, varied_pairs_dir, tmp_path, *flags)
        assert trainer.args.train_sampling_strategy == "random"
        assert isinstance(trainer._get_train_sampler(), RandomSampler)
        assert "length" not in trainer.train_dataset.column_names


@pytest.mark.parametrize("config, flags, expected", [
    ("RewardConfig", [], "group_by_length"),
    ("RewardConfig", ["--train_sampling_strategy", "random"], "random"),
    ("RewardConfig", ["--train_sampling_strategy=sequential"], "sequential"),
    ("ORPOConfig", ["--group_by_length"], "group_by_length"),
    ("ORPOConfig", ["--group_by_length", "False"], "random"),
    ("DPOConfig", [], "random"),  # packed DPO batches hold no pads
    ("DPOConfig", ["--packing", "False"], "group_by_length"),
    ("DPOConfig", ["--train_sampling_strategy", "group_by_length"], "group_by_length"),
])
def test_which_stages_group_by_default(config, flags, expected, tmp_path):
    import trl
    from trl.experimental.orpo import ORPOConfig

    from medgpt.args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args
    from medgpt.trainers.preference import choose_sampling

    config_class = ORPOConfig if config == "ORPOConfig" else getattr(trl, config)
    *_, pref_args, training_args, compat = parse_args(
        ModelArguments, DataArguments, LoraArguments, PreferenceArguments, config_class,
        argv=["--output_dir", str(tmp_path), *flags])
    choose_sampling(training_args, pref_args, compat.given_flags)
    assert training_args.train_sampling_strategy == expected


def test_config_file_choice_wins(tmp_path):
    from trl import RewardConfig

    from medgpt.args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args
    from medgpt.trainers.preference import choose_sampling

    (tmp_path / "rm.yaml").write_text("train_sampling_strategy: random\n")
    *_, pref_args, training_args, compat = parse_args(
        ModelArguments, DataArguments, LoraArguments, PreferenceArguments, RewardConfig,
        argv=["--config", str(tmp_path / "rm.yaml"), "--output_dir", str(tmp_path)])
    choose_sampling(training_args, pref_args, compat.given_flags)
    assert training_args.train_sampling_strategy == "random"


def test_padded_dpo_trains_on_length_grouped_batches(tiny_model_dir, varied_pairs_dir, tmp_path, caplog):
    import logging

    import dpo_training

    out = tmp_path / "dpo"
    with caplog.at_level(logging.INFO, logger="medgpt"):
        dpo_training.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(varied_pairs_dir),
                           "--validation_file_dir", str(varied_pairs_dir), "--output_dir", str(out), "--do_train",
                           "--do_eval", "--max_eval_samples", "4", "--max_steps", "1", "--packing", "False", *COMMON])
    assert "Training batches: train_sampling_strategy group_by_length" in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    assert "eval_rewards/accuracies" in json.loads((out / "eval_results.json").read_text())
