"""Argument dataclasses shared by every stage, and one parser that also reads `--config x.yaml`.

Flag names follow MedicalGPT's scripts so that a MedicalGPT user's run_*.sh runs unchanged. Flags that
transformers 5 removed from TrainingArguments but MedicalGPT's scripts still pass
(--evaluation_strategy, --warmup_ratio, --overwrite_output_dir, ...) are translated, not rejected.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import yaml
from transformers import HfArgumentParser

from .distributed import configure_launch

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Model checkpoint: a hub name or a local HF folder. Default: the embedded "
                          "SmolLM2-135M-Instruct (works offline)."},
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer name or folder, if not the model's own."})
    model_type: Optional[str] = field(
        default=None, metadata={"help": "Accepted for MedicalGPT compatibility; the architecture is read "
                                        "from the model's config (AutoModel)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the model in 8-bit (bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the model in 4-bit NF4 (bitsandbytes)."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where downloaded models/datasets are cached."})
    model_revision: Optional[str] = field(default="main", metadata={"help": "Model revision (branch, tag or commit)."})
    hf_hub_token: Optional[str] = field(default=None, metadata={"help": "Token for private hub models."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (Rust) tokenizer when there is one."})
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "Load dtype: auto, float32, float16 or bfloat16. On a machine without CUDA, "
                          "half precision becomes bfloat16 where the CPU has native bf16 (AVX512-BF16/AMX) and "
                          "float32 elsewhere (emulated bf16 is ~300x slower).",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    device_map: Optional[str] = field(
        default="auto", metadata={"help": "Device map: auto, cpu, cuda, ... (ignored under DDP: one device per rank)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow the model's own code from the hub to run (off by default)."})
    rope_scaling: Optional[str] = field(
        default=None, metadata={"help": "Extend the context with RoPE scaling; the factor is ceil(training length / the "
                                        "model's max_position_embeddings) (SFT: --model_max_length, PT: --block_size), "
                                        "as in MedicalGPT, unless --rope_scaling_factor is given.",
                                "choices": ["linear", "dynamic"]})
    rope_scaling_factor: Optional[float] = field(
        default=None, metadata={"help": "With --rope_scaling: the factor itself (default: from the training length)."})
    flash_attn: bool = field(default=False, metadata={"help": "Use FlashAttention-2 (needs CUDA and flash-attn)."})
    shift_attn: bool = field(
        default=False, metadata={"help": "SFT and PT: LongLoRA's shift short attention (S2-Attn) in training: attention in "
                                         "groups of a quarter of the training length, half of the heads shifted by half "
                                         "a group, within each packed sample; evaluation and generation use full "
                                         "attention. With --rope_scaling: training on long contexts."})
    router_aux_loss_coef: Optional[float] = field(
        default=None, metadata={"help": "MoE models: weight of the router's load-balancing loss added to the training "
                                        "loss (default: the model config's router_aux_loss_coef; 0: off)."})
    neft_alpha: Optional[float] = field(
        default=0, metadata={"help": "NEFTune noise alpha on the embeddings (0 = off); 5 is a common value."})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A dataset name on the hub (datasets library)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The hub dataset's config name."})
    train_file_dir: Optional[str] = field(default=None, metadata={"help": "Folder of training files (.json/.jsonl; .txt for pretraining)."})
    validation_file_dir: Optional[str] = field(default=None, metadata={"help": "Folder of validation files."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep only the first N training samples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep only the first N evaluation samples."})
    ignore_pad_token_for_loss: bool = field(default=True, metadata={"help": "Padding never counts in the loss."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Ignore cached preprocessed data."})
    validation_split_percentage: Optional[int] = field(
        default=1, metadata={"help": "Percent of the training data held out for evaluation when there is no validation set."})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for preprocessing."})
    skip_invalid_records: bool = field(
        default=False, metadata={"help": "Skip malformed records (counted in the log) instead of stopping at the first one."})


@dataclass
class LoraArguments:
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (False: full-parameter training)."})
    target_modules: Optional[str] = field(
        default="all", metadata={"help": "Comma-separated module names for LoRA, or 'all' for every linear layer but the head."})
    lora_rank: Optional[int] = field(default=8, metadata={"help": "LoRA rank."})
    lora_dropout: Optional[float] = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_alpha: Optional[float] = field(default=32.0, metadata={"help": "LoRA alpha."})
    modules_to_save: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated modules trained in full and saved with the adapter (e.g. embed_tokens,lm_head)."})
    peft_path: Optional[str] = field(default=None, metadata={"help": "Continue training this LoRA adapter."})
    qlora: bool = field(default=False, metadata={"help": "QLoRA: prepare the 4/8-bit model for k-bit training."})


@dataclass
class SFTArguments:
    template_name: str = field(
        default="chatml", metadata={"help": "Chat template (see template.py); the embedded SmolLM2 default uses chatml."})
    model_max_length: int = field(default=512, metadata={"help": "Maximum tokens per sample; longer samples are cut at turn boundaries."})
    train_on_inputs: bool = field(default=False, metadata={"help": "Also train on the prompt tokens (default: assistant turns only)."})
    packing: bool = field(
        default=True, metadata={"help": "Padding-free training: each batch's samples are packed into rows with no pad "
                                        "token, attention confined to each sample and positions restarting per sample, "
                                        "so training equals padded training up to float error. Falls back to padding "
                                        "(with a warning) where the model's attention cannot isolate samples. "
                                        "False: pad every batch to its longest sample."})
    max_packed_tokens: Optional[int] = field(
        default=None, metadata={"help": "With --packing: tokens per forward pass. A batch is cut into rows of at most "
                                        "this many tokens (whole samples), run one after another and accumulated into "
                                        "one optimizer step, so activation memory is that of one row. Default: "
                                        "twice --model_max_length (every pass has a fixed cost in op overhead, so "
                                        "rows should not be short), 3.5 times in bf16 on a CPU (its matmuls gain "
                                        "more from longer rows); 0: the whole batch in one row (most memory)."})


@dataclass
class PretrainArguments:
    block_size: Optional[int] = field(
        default=1024, metadata={"help": "Tokens per training block; documents are joined (an eos after each) and cut "
                                        "into blocks of exactly this size. At most the tokenizer's model_max_length."})
    packing: bool = field(
        default=True, metadata={"help": "Join documents into full blocks, each document attending only to itself where "
                                        "the attention allows it (False: one document per sample, cut at block_size, "
                                        "padding kept out of the loss)."})
    streaming: bool = field(
        default=False, metadata={"help": "Read and tokenize the training data lazily while training (needs --max_steps)."})
    keep_linebreaks: bool = field(
        default=True, metadata={"help": "Keep the line break at the end of each .txt line (one document a line)."})


@dataclass
class PreferenceArguments:
    """Reward modeling, DPO and ORPO (the trainer config's own --max_length caps prompt + reply tokens)."""
    template_name: str = field(
        default="chatml", metadata={"help": "Chat template of the prompt (see template.py); the embedded SmolLM2 default uses chatml."})
    max_prompt_length: Optional[int] = field(
        default=None, metadata={"help": "Maximum prompt tokens; longer prompts lose their oldest turns, then the end of the "
                                        "question (default: --max_source_length, else half of --max_length)."})
    max_source_length: Optional[int] = field(
        default=None, metadata={"help": "MedicalGPT name of --max_prompt_length."})
    max_target_length: Optional[int] = field(
        default=None, metadata={"help": "MedicalGPT: maximum reply tokens; with it, --max_length defaults to prompt + "
                                        "reply (an explicit --max_length wins)."})
    packing: bool = field(
        default=True, metadata={"help": "DPO: pack each batch padding-free, every pair as one prompt + chosen + rejected "
                                        "segment (the prompt encoded once; exact, see medgpt/trainers/dpo.py); False: "
                                        "TRL's padded batches. TRL's --padding_free True means the same."})
    max_packed_tokens: Optional[int] = field(
        default=None, metadata={"help": "DPO with --packing: run each batch as rows of whole pairs of at most N tokens "
                                        "one after another in the same optimizer step (activation memory of one row, "
                                        "not of the batch); default --max_length, 0: the whole batch in one row."})
    orpo_beta: Optional[float] = field(
        default=None, metadata={"help": "ORPO only: weight of the odds-ratio term (lambda in the paper); sets --beta."})
    tool_format: Optional[str] = field(
        default=None, metadata={"help": "Accepted for MedicalGPT compatibility; preference records carry no tools."})


@dataclass
class CompatArguments:
    """Flags MedicalGPT's scripts pass that are no longer TrainingArguments fields in transformers 5."""
    config: Optional[str] = field(default=None, metadata={"help": "A YAML or JSON file of flags; flags on the command line win."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh even if output_dir holds checkpoints (default: resume from the last one)."})
    logging_dir: Optional[str] = field(default=None, metadata={"help": "TensorBoard log folder (default: output_dir/runs)."})
    # not a flag: the names of the flags the command line or --config gave (after the legacy translations), so that a
    # stage can tell an explicit value from a default (e.g. --train_sampling_strategy random)
    given_flags: frozenset = field(default_factory=frozenset, init=False)


# Old TrainingArguments flags -> their transformers 5 names.
_RENAMED_FLAGS = {
    "--evaluation_strategy": "--eval_strategy",
    "--warmup_ratio": "--warmup_steps",  # a float in [0, 1) is a ratio in transformers 5
    "--no_cuda": "--use_cpu",
}


def _config_to_argv(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise SystemExit(f"error: --config {path}: no such file")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise SystemExit(f"error: {where}: not valid YAML/JSON ({getattr(e, 'problem', e)})")
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    argv: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).lstrip("-")
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [flag] + [str(v) for v in value]
        elif isinstance(value, dict):
            import json
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def _translate_legacy(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, val = arg.partition("=")
        if name in _RENAMED_FLAGS:
            out.append(_RENAMED_FLAGS[name] + (eq + val if eq else ""))
        elif name == "--group_by_length":
            # --group_by_length [True|False] became --train_sampling_strategy group_by_length; False: random,
            # explicitly, as the preference stages group by length by default
            nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            enabled = (val or nxt or "true").lower() in ("true", "1", "yes")
            if nxt is not None and not eq:
                i += 1
            out += ["--train_sampling_strategy", "group_by_length" if enabled else "random"]
        else:
            out.append(arg)
        i += 1
    return out


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


HALF_PRECISION_FLAGS = ("--bf16", "--fp16", "--bf16_full_eval", "--fp16_full_eval")


def _half_precision_on_cpu(argv: list[str]) -> list[str]:
    """--bf16/--fp16 (as in GPU-oriented run scripts) on a machine without CUDA. Where the CPU has native bf16
    (medgpt.precision: flags plus a timed matmul), --bf16 trains with bf16 autocast as on a GPU, --fp16 becomes --bf16
    (CPUs have no fast fp16 matmul), and --use_cpu is added (TrainingArguments accepts bf16 without a GPU only with
    it). Elsewhere the flags are dropped and training runs in float32, with the measured reason in the log:
    TrainingArguments would refuse them and a MedicalGPT run script would not start at all."""
    if _cuda_available():
        return argv
    out, i, asked = [], 0, []
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in HALF_PRECISION_FLAGS:
            if not eq and i + 1 < len(argv) and argv[i + 1].lower() in ("true", "false", "1", "0"):
                value, i = argv[i + 1], i + 1
            i += 1
            if value.lower() not in ("false", "0"):
                asked.append(name)
            continue
        out.append(argv[i])
        i += 1
    if not asked:
        return out
    from .precision import half_precision_on_cpu

    if half_precision_on_cpu(" ".join(asked)) is None:
        return out  # float32
    for name in sorted({"--bf16_full_eval" if name.endswith("full_eval") else "--bf16" for name in asked}):
        out += [name, "True"]  # (TRL's configs declare bf16 Optional[bool]: a bare flag needs a value there)
    if not any(a.partition("=")[0] == "--use_cpu" for a in out):
        out += ["--use_cpu", "True"]
    return out


def _cpu_precision_defaults(dataclass_types) -> list[str]:
    """TRL's configs (DPOConfig, RewardConfig, ...) default --bf16 to True, which TrainingArguments refuses on a
    machine without CUDA: there, default it to False (float32), so that bf16 on a CPU is asked for with --bf16 (and
    works only where the CPU has native bf16, see _half_precision_on_cpu) and float32 results stay the default."""
    if _cuda_available():
        return []
    for t in dataclass_types:
        f = getattr(t, "__dataclass_fields__", {}).get("bf16")
        if f is not None and f.default is None:
            return ["--bf16", "False"]
    return []


def _without_shared_fields(dataclass_types):
    """HfArgumentParser rejects a flag declared by two dataclasses, e.g. --trust_remote_code in ModelArguments and in
    TRL's configs (DPOConfig, RewardConfig, ...). The last dataclass declaring a name parses it; earlier ones are
    parsed through copies without that field. Returns (types to parse, {index: {name: owner index}})."""
    import dataclasses
    import typing

    owner = {}
    for i, t in enumerate(dataclass_types):
        for f in dataclasses.fields(t):
            owner[f.name] = i
    parse_types, shared = [], {}
    for i, t in enumerate(dataclass_types):
        names = {f.name: owner[f.name] for f in dataclasses.fields(t) if owner[f.name] != i}
        if names:
            hints = typing.get_type_hints(t)
            kept = []
            for f in dataclasses.fields(t):
                if f.name in names:
                    continue
                kw = {"default": f.default} if f.default is not dataclasses.MISSING else {}
                if f.default_factory is not dataclasses.MISSING:
                    kw = {"default_factory": f.default_factory}
                kept.append((f.name, hints[f.name], field(metadata=f.metadata, **kw)))
            t = dataclasses.make_dataclass(t.__name__, kept)
            shared[i] = names
        parse_types.append(t)
    return tuple(parse_types), shared


def _restore_shared_fields(dataclass_types, parsed, shared):
    """Rebuild the dataclasses parsed without their shared fields, with the value the owner parsed."""
    import dataclasses

    out = list(parsed)
    for i, names in shared.items():
        values = {f.name: getattr(parsed[i], f.name) for f in dataclasses.fields(parsed[i])}
        values.update({name: getattr(parsed[j], name) for name, j in names.items()})
        out[i] = dataclass_types[i](**values)
    return tuple(out)


def parse_args(*dataclass_types, argv: list[str] | None = None):
    """Parse the command line (and an optional --config YAML/JSON, or a single .yaml/.json argument)
    into the given dataclasses plus CompatArguments, which is always returned last (its `given_flags`: the flags
    the command line or the config file set)."""
    from .logs import setup_logging
    setup_logging(keep_early=True)  # stderr now; prepare_run opens the run's log file and writes these lines first
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = ["--config", argv[0]]
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
    if config_path:
        argv = _config_to_argv(config_path) + argv  # the command line comes last, so it wins
    argv = _half_precision_on_cpu(_translate_legacy(argv))
    configure_launch(argv)  # torchrun/deepspeed launches: data-parallel (gloo on CPU), --deepspeed file checked
    given = frozenset(a[2:].partition("=")[0] for a in argv if a.startswith("--") and len(a) > 2)
    argv = _cpu_precision_defaults(dataclass_types) + argv
    dataclass_types = tuple(dataclass_types) + (CompatArguments,)
    parse_types, shared = _without_shared_fields(dataclass_types)
    parser = HfArgumentParser(parse_types)
    try:
        parsed = _restore_shared_fields(dataclass_types, parser.parse_args_into_dataclasses(args=argv), shared)
    except ValueError as e:  # TrainingArguments.__post_init__ and friends: one line, no traceback
        parser.error(str(e).strip().splitlines()[0])
    parsed[-1].given_flags = given
    return parsed
