"""What every stage does around `trainer.train()`: prepare the run (logging, seed, report_to, resume),
train without losing work on Ctrl-C, save weights + tokenizer + state, evaluate, and log metrics."""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys

from .distributed import check_enough_samples
from .logs import MetricsToLog, apply_levels, setup_run_logging

logger = logging.getLogger(__name__)


def prepare_run(training_args, compat=None):
    """Settle run-wide options before the model is built. Returns the checkpoint to resume from, or None."""
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    # one stream (loguru) for our and the libraries' loggers; <output_dir>/logs/train.log (other ranks: their warnings
    # in train-rank<N>.log). Terminal levels as before: our progress at INFO unless --log_level says otherwise on the
    # main process, the libraries at --log_level (WARNING), the other processes at --log_level_replica
    path = setup_run_logging(training_args)
    if path and training_args.process_index == 0:
        logger.info("Log file: %s", path)
    set_seed(training_args.seed)
    if not training_args.should_log:  # the other ranks of a multi-process run: warnings only, no progress bars
        import datasets
        datasets.disable_progress_bars()

    report_to = training_args.report_to or []
    if isinstance(report_to, str):
        report_to = [report_to]
    missing = [r for r in report_to if r in ("tensorboard", "wandb", "mlflow", "swanlab")
               and importlib.util.find_spec({"tensorboard": "tensorboard"}.get(r, r)) is None
               and not (r == "tensorboard" and importlib.util.find_spec("tensorboardX"))]
    if missing:
        logger.warning("--report_to %s: not installed, not reporting there", ",".join(missing))
        training_args.report_to = [r for r in report_to if r not in missing] or ["none"]
    if compat is not None and compat.logging_dir:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", compat.logging_dir)
    if training_args.gradient_checkpointing and not training_args.gradient_checkpointing_kwargs:
        # non-reentrant checkpointing works with frozen base weights (LoRA) without extra hooks
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}

    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if resume is None:
            raise SystemExit(f"error: --resume_from_checkpoint True: no checkpoint-* folder in {training_args.output_dir}")
    elif isinstance(resume, str) and resume.lower() in ("false", "none", ""):
        resume = None
    elif resume is None and os.path.isdir(training_args.output_dir) and training_args.do_train:
        last = get_last_checkpoint(training_args.output_dir)
        if last is not None:
            if compat is not None and compat.overwrite_output_dir:
                logger.info("--overwrite_output_dir: not resuming from %s", last)
            else:
                logger.info("Found %s (pass --overwrite_output_dir to start afresh)", last)
                resume = last
    if isinstance(resume, str) and not os.path.isdir(resume):
        raise SystemExit(f"error: --resume_from_checkpoint {resume}: no such folder")
    if resume:
        logger.info("Resuming from %s", resume)
    return resume


def add_perplexity(metrics: dict, prefix: str = "eval") -> dict:
    key = f"{prefix}_loss"
    if key in metrics:
        try:
            metrics["perplexity"] = math.exp(metrics[key])
        except OverflowError:
            metrics["perplexity"] = float("inf")
    return metrics


def train_and_save(trainer, training_args, resume_from_checkpoint=None, tokenizer=None, perplexity: bool = True,
                   run_info: dict | None = None):
    """Train (if --do_train), save, evaluate (if --do_eval). Ctrl-C during training saves what was
    learned so far to output_dir before exiting, so no work is lost; --resume_from_checkpoint continues.
    `run_info` (e.g. the template name) is written beside the weights for inference to pick up."""
    if not any(isinstance(cb, MetricsToLog) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(MetricsToLog())  # the loss curve (and eval metrics) in the log file
    apply_levels()  # building the Trainer reset transformers' verbosity to --log_level; the log file wants INFO
    if training_args.do_train:
        if trainer.train_dataset is not None and hasattr(trainer.train_dataset, "__len__"):
            check_enough_samples(len(trainer.train_dataset))
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and trainer.is_world_process_zero():
            logger.info("Training one model on %d processes: %s (%s)", accelerator.num_processes,
                        accelerator.distributed_type.value, accelerator.device.type)
        try:
            result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        except KeyboardInterrupt:
            logger.warning("Interrupted: saving the model and state to %s before exiting", training_args.output_dir)
            path = os.path.join(training_args.output_dir, f"checkpoint-{trainer.state.global_step}")
            trainer._save_checkpoint(trainer.model, trial=None)
            logger.warning("Saved %s; continue with --resume_from_checkpoint %s", path, path)
            sys.exit(130)
        metrics = result.metrics
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        save_model(trainer, training_args, tokenizer)
        if run_info and trainer.is_world_process_zero():
            from .generation import write_run_info
            write_run_info(training_args.output_dir, **run_info)
    if training_args.do_eval and trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        if perplexity:
            add_perplexity(metrics)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


def save_model(trainer, training_args, tokenizer=None):
    """Weights (adapter or full model, safetensors) and tokenizer into output_dir, on the main process."""
    model = trainer.model
    if getattr(model, "config", None) is not None:
        model.config.use_cache = True
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        # transformers writes no weights at all under FSDP's SHARDED_STATE_DICT (fast for checkpoints): the final
        # output must load anywhere, so it is gathered in full
        plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(training_args.output_dir)
    if tokenizer is not None and trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
    if trainer.is_world_process_zero():
        logger.info("Saved model to %s", training_args.output_dir)
