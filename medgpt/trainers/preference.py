"""What reward_modeling.py, dpo_training.py, orpo_training.py and cpo_training.py share around their trainer (whose
class takes LengthColumnMixin first): parsing and tokenizing (medgpt/data/preference.py), the default batch sampling,
the length column kept away from the collator, ORPO/CPO's pre-tokenized pairs, and training and saving.
"""
from __future__ import annotations

import logging

from ..data.preference import LENGTH_STRATEGIES, build_preference_datasets
from ..data.sft import IGNORE_INDEX

logger = logging.getLogger(__name__)


def prepare_preference_stage(config_class, argv=None, check=None):
    """Parse the flags (model, data, LoRA, preference and the TRL `config_class`), prepare the run (logging, seed,
    resume) and tokenize the pairs. `check(training_args)`, when given, runs right after parsing (a stage's own flag
    checks, before any work). Returns a namespace: model_args, data_args, lora_args, pref_args, training_args, resume,
    template, tokenizer, train_dataset, eval_dataset."""
    from types import SimpleNamespace

    from ..args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args
    from ..modeling import load_tokenizer
    from ..templates import get_conv_template
    from ..training import prepare_run

    model_args, data_args, lora_args, pref_args, training_args, compat = parse_args(
        ModelArguments, DataArguments, LoraArguments, PreferenceArguments, config_class, argv=argv)
    if check is not None:
        check(training_args)
    resume = prepare_run(training_args, compat)
    choose_sampling(training_args, pref_args, compat.given_flags)
    template = get_conv_template(pref_args.template_name)
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset = build_preference_datasets(data_args, pref_args, tokenizer, template, training_args)
    return SimpleNamespace(model_args=model_args, data_args=data_args, lora_args=lora_args, pref_args=pref_args,
                           training_args=training_args, resume=resume, template=template, tokenizer=tokenizer,
                           train_dataset=train_dataset, eval_dataset=eval_dataset)


def reference_free_trainer(trainer_class, run, script: str):
    """`trainer_class` (ORPO, CPO: no reference model) over `run` (prepare_preference_stage): the causal LM loaded,
    LoRA applied when asked, the tokenized pairs as its datasets, our CPU fast paths on the model."""
    from ..kernels import use_cpu_fast_paths
    from ..modeling import apply_lora, load_model

    model = load_model(run.model_args)
    if model.config.is_encoder_decoder:
        raise SystemExit(f"error: {script} trains decoder-only (causal) language models")
    trainer = trainer_class(
        model=apply_lora(model, run.lora_args, run.training_args),
        args=run.training_args,
        train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset,
        processing_class=run.tokenizer,
    )
    use_cpu_fast_paths(trainer, trainer.model)
    return trainer


def train_preference_stage(trainer, run, stage: str, **run_info) -> None:
    """Train, save (with medgpt_run.json: template, stage) and evaluate."""
    from ..modeling import trainable_to_float32_on_cpu
    from ..training import train_and_save

    trainable_to_float32_on_cpu(trainer.model)  # QLoRA on a CPU
    train_and_save(trainer, run.training_args, run.resume, run.tokenizer, perplexity=False,
                   run_info={"template_name": run.pref_args.template_name, "stage": stage, **run_info})


def choose_sampling(training_args, pref_args, given_flags=frozenset()) -> None:
    """Default --train_sampling_strategy of the preference stages: group_by_length where batches are padded (reward
    model, ORPO, DPO with --packing False), so a batch's pads stay small; random for packed DPO, which has no pads.
    An explicit --train_sampling_strategy (or MedicalGPT's --group_by_length) wins. Logs the choice."""
    from trl import DPOConfig

    packed = isinstance(training_args, DPOConfig) and (pref_args.packing or training_args.padding_free)
    if "train_sampling_strategy" in given_flags:
        why = "--train_sampling_strategy"
    elif packed:
        why = "the default for packed DPO batches, which hold no padding"
    else:
        training_args.train_sampling_strategy = "group_by_length"
        why = ("the default for padded batches: pairs of similar length share a batch, so pads stay small; "
               "--train_sampling_strategy random draws batches at random")
    logger.info("Training batches: train_sampling_strategy %s (%s)", training_args.train_sampling_strategy, why)


class LengthColumnMixin:
    """Trainer mixin for the length column (add_length_column, --length_column_name): the column stays in the datasets
    for transformers' length-grouped samplers (train and eval; --remove_unused_columns True keeps it too) and is
    taken out of every example before the data collator, so it never reaches the collator or the model. Samplers that
    read no length (build_preference_datasets adds no column then) leave the collator as it is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.train_sampling_strategy in LENGTH_STRATEGIES:
            self.data_collator = WithoutKey(self.data_collator, self.args.length_column_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.train_sampling_strategy in LENGTH_STRATEGIES \
                and self.args.length_column_name not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.args.length_column_name]


class PretokenizedPairsMixin:
    """For TRL's experimental ORPOTrainer and CPOTrainer (orpo_training.py, cpo_training.py; the class takes it before
    the TRL trainer): the pairs go in with medgpt's tokenization (prompt_ids/chosen_ids/rejected_ids), and their NLL
    term is exact under DDP.

    TRL's tokenize_row prepends the tokenizer's BOS when the prompt does not start with it and appends its eos when
    the reply does not end with it: chatml replies end with "<|im_end|>\\n", so each would get a second "<|im_end|>";
    and it has no prompt-length limit. Here the rows become the trainer's columns as they are."""

    def tokenize_row(self, feature, model=None) -> dict:
        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for name in ("chosen", "rejected"):
            reply = feature[f"{name}_ids"]
            row[f"{name}_input_ids"] = prompt + reply
            row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(reply))
            row[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt) + reply
        return row

    def nll_token_count(self, batch):
        """The tokens TRL's NLL term (concatenated_forward's 5th output) averages over on this process."""
        raise NotImplementedError

    def concatenated_forward(self, model, batch):
        """TRL's NLL term is a mean over this process's chosen tokens and DDP then averages the processes, which
        equals one process's mean over the global batch only when every rank holds as many tokens. Rescale it to
        (this rank's token sum) / (token count summed over ranks) x world size, so the update is the same as one
        process with the global batch."""
        out = super().concatenated_forward(model, batch)
        world = self.accelerator.num_processes
        if world == 1:
            return out
        count = self.nll_token_count(batch).to(out[4].device).float()
        total = self.accelerator.reduce(count.clone(), reduction="sum").clamp(min=1)
        return (*out[:4], out[4] * count * world / total, *out[5:])


class WithoutKey:
    """A data collator that drops `key` from the examples first; other attributes are the wrapped collator's."""

    def __init__(self, collator, key: str):
        self.collator, self.key = collator, key

    def __call__(self, examples):
        return self.collator([{k: v for k, v in ex.items() if k != self.key} for ex in examples])

    def __getattr__(self, name):
        if name.startswith("__") or name in ("collator", "key"):
            raise AttributeError(name)
        return getattr(self.collator, name)
