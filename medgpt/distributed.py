"""Multi-process runs: what a stage needs so that `torchrun`, `deepspeed` and `accelerate launch` train ONE model.

transformers' Trainer and accelerate do the data-parallel work (DDP, DeepSpeed ZeRO, FSDP, sharded samplers, main-process
saves). What they lack, and this module adds:

* On a machine without CUDA, a `torchrun --nproc_per_node N` launch is not data-parallel by default: TrainingArguments
  builds a distributed accelerate state on CPU only when `--use_cpu` (or ACCELERATE_USE_CPU) is set, so each rank
  silently trains its own model on all the data. `configure_launch` sets ACCELERATE_USE_CPU for such launches (DDP over
  gloo), with one log line saying so.
* DeepSpeed on CPU (DS_ACCELERATOR=cpu): accelerate picks no process-group backend when there is no GPU (its
  `_prepare_backend` knows gloo only for its own CPU mode, which turns DeepSpeed off), so the state reports a world
  size of 1 and DeepSpeed's batch-size check fails ("train_batch_size is not equal to ... 2 != 2 * 1 * 2").
  `_gloo_without_cuda` lets that case use gloo, the backend DeepSpeed's CPU accelerator itself uses.
* FSDP on CPU (`--fsdp "full_shard auto_wrap"`, FSDP2): the same, and accelerate's state must be told it is FSDP
  (`_fsdp_on_cpu`); otherwise the run is silently plain DDP.
* A `--deepspeed` file that is missing or not valid JSON stops with one line naming the file (and line).
"""
from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 of the launch (True for a single process); usable before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def _flag_value(argv: list[str], name: str):
    """The value of the last `--name value` / `--name=value` in argv ('' for a bare flag), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def check_deepspeed_config(path: str) -> dict:
    """The parsed --deepspeed file (or inline JSON); one-line SystemExit naming the file and line when it is not."""
    if path.lstrip().startswith("{"):
        where, text = "--deepspeed", path
    else:
        where = path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise SystemExit(f"error: --deepspeed {path}: no such file (the repository has zero1.json, zero2.json, "
                             "zero3.json and zero3_offload.json)")
        except OSError as e:
            raise SystemExit(f"error: --deepspeed {path}: {e.strerror or e}")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {where}:{e.lineno}: not valid JSON ({e.msg})")
    if not isinstance(config, dict):
        raise SystemExit(f"error: {where}: a DeepSpeed config must be a JSON object, got {type(config).__name__}")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3, "auto"):
        raise SystemExit(f"error: {where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return config


def _gloo_without_cuda() -> None:
    """Let accelerate's PartialState use gloo for DeepSpeed and FSDP launches on a machine without CUDA (see the module
    docstring); on GPUs and for every other case its own choice stands."""
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_medgpt_gloo", False):
        return

    def prepare_backend(self, cpu: bool = False, sagemaker_dp=False, backend=None):
        chosen, kind = original(self, cpu, sagemaker_dp, backend)
        if chosen is None and not cpu and world_size() > 1 and not torch.cuda.is_available():
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    prepare_backend._medgpt_gloo = True
    PartialState._prepare_backend = prepare_backend


def _fsdp_on_cpu() -> None:
    """FSDP over gloo without CUDA. torch's FSDP2 (`fully_shard`) runs on CPU, but accelerate turns an FSDP plugin into
    FSDP only for GPU-like process groups: on MULTI_CPU it silently keeps plain DDP. So MULTI_CPU + an FSDP plugin
    becomes FSDP, in both of accelerate's shared states (AcceleratorState copies PartialState's type on re-entry)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _gloo_without_cuda()
    init = AcceleratorState.__init__
    if getattr(init, "_medgpt_fsdp", False):
        return

    def state_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate itself keeps them

    state_init._medgpt_fsdp = True
    AcceleratorState.__init__ = state_init


_FSDP_FLAG = False  # set by configure_launch: --fsdp was given


def fsdp_requested() -> bool:
    """--fsdp on the command line, or an `accelerate launch` with an FSDP config."""
    return _FSDP_FLAG or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def configure_launch(argv: list[str]) -> None:
    """Called by `medgpt.args.parse_args` before TrainingArguments exist: validate --deepspeed and, for a
    multi-process launch without CUDA, make it data-parallel over gloo."""
    import torch

    ds_path = _flag_value(argv, "--deepspeed")
    if ds_path:
        check_deepspeed_config(ds_path)
    fsdp = _flag_value(argv, "--fsdp")
    global _FSDP_FLAG
    _FSDP_FLAG = fsdp is not None and fsdp.lower() not in ("false", "0", "no")
    fsdp = fsdp_requested()
    world = world_size()
    if world == 1 and "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        # `torchrun --nproc_per_node 1` (run_*.sh on a CPU machine): accelerate would open a one-process group with no
        # backend of its own and transformers then warn that it is "initialized, but parallel_mode != DISTRIBUTED"
        os.environ.pop("LOCAL_RANK")
    if world <= 1 or torch.cuda.is_available():
        if world > 1 and is_main_process():
            logger.info("%d processes: data-parallel (%s)", world,
                        "DeepSpeed" if ds_path else "FSDP" if fsdp else "DDP over NCCL")
        return
    if ds_path:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _gloo_without_cuda()
    elif fsdp:
        if os.environ.get("FSDP_SYNC_MODULE_STATES", "false").lower() == "true":  # accelerate launch --config_file
            raise SystemExit("error: the accelerate FSDP config sets fsdp_sync_module_states, which needs GPUs; on a "
                             "machine without CUDA launch with torchrun and --fsdp \"full_shard auto_wrap\" instead")
        _fsdp_on_cpu()
    else:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if is_main_process():
        logger.info("No CUDA device: %d processes train one model data-parallel over gloo (%s)", world,
                    "DeepSpeed, DS_ACCELERATOR=cpu" if ds_path else "FSDP" if fsdp else "DDP")


def check_enough_samples(n_samples: int, what: str = "training samples") -> None:
    """Every process needs at least one sample; fewer samples than processes would leave a rank with an empty shard
    (it then waits for the others' gradients forever or trains on repeats)."""
    world = world_size()
    if world > 1 and n_samples < world:
        raise SystemExit(f"error: {n_samples} {what} for {world} processes: each process needs at least one "
                         f"(launch fewer processes, e.g. --nproc_per_node {max(n_samples, 1)}, or give more data)")
