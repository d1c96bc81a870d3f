"""The one place logging is set up: loguru is the stream, every logger feeds it, each run leaves a log file.

* Our modules keep plain `logging.getLogger("medgpt....")` loggers. An intercepting handler on the root logger hands
  their records to loguru, together with those of transformers, datasets, TRL, accelerate, peft, DeepSpeed, torch and
  huggingface_hub (their own stderr handlers are removed, so no line is printed twice) and Python warnings.
* One format on stderr and in the file::

      2026-11-29 14:23:04 | INFO    | medgpt.data.sft | SFT data: 8 training and 0 evaluation conversations
      2026-11-29 14:23:51 | WARNING | rank1 | medgpt.data.io | Skipped 1 invalid record(s) ...   (rank: world size > 1)

* The terminal shows what it showed before: on the main process our messages at INFO and the libraries' at WARNING
  (`--log_level` sets both), other ranks at `--log_level_replica` (WARNING). tqdm progress bars stay on the terminal.
* A training run (`setup_run_logging`, called by `medgpt.training.prepare_run`) appends to
  `<output_dir>/logs/train.log`: the main process writes our INFO lines, the training progress of transformers'
  Trainer and TRL ("***** Running training *****", "Num examples = ...", checkpoints), the Trainer's `{'loss': ...}`
  dicts (`MetricsToLog`) and every warning (other libraries' INFO chatter only with --log_level info); each other
  rank writes its WARNING and up to `train-rank<N>.log` beside it (created only when that rank has something to say).
  Every run starts with a `=====` header line (script, command line, host, pid, processes). Lines logged before the
  file could be opened (argument parsing, the launch) are kept and written first. The one-line errors of
  `medgpt.cli.run_main` and the full traceback of a crash end the file.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field

from loguru import logger

# loggers with a stderr handler of their own (and propagate=False for some): routed into ours instead
_OWN_HANDLERS = ("transformers", "datasets", "DeepSpeed", "torch", "huggingface_hub")
OURS = ("medgpt", "__main__")
# library loggers whose INFO lines are a run's progress ("***** Running training *****", "Num examples = ...", saved
# checkpoints, evaluation): the main process's log file takes them at INFO. Other library INFO lines (config dumps,
# file loading) reach the file only when --log_level asks for them on the terminal too.
PROGRESS = ("transformers.trainer", "trl")
_MAX_EARLY = 5000  # lines kept before the log file is opened


@dataclass
class _State:
    ours: int = logging.INFO         # terminal threshold for our loggers
    libs: int = logging.WARNING      # terminal threshold for everything else
    own: tuple = OURS                # logger-name prefixes shown at `ours`
    file_level: int | None = None    # threshold of the log file (None: no file and no early buffer)
    rank: int = 0
    world: int = 1
    main: bool = True                # the process that shows progress (transformers' `should_log`)
    sink_ids: list = field(default_factory=list)
    early: list | None = None        # (level number, formatted line) until the file is opened
    file: "_LogFile | None" = None
    path: str | None = None


_state = _State()


class _Stderr:
    """sys.stderr as it is when a line is written (pytest swaps it per test)."""

    def write(self, message):
        sys.stderr.write(message)

    def flush(self):
        sys.stderr.flush()

    def isatty(self):
        return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


class _LogFile:
    """Appends lines to `path`, line-buffered (a killed process loses nothing it logged). With `lazy`, the file (and
    its folder) is created at the first line, so a rank with nothing to say leaves nothing behind."""

    def __init__(self, path: str, header: str, lazy: bool):
        self.path, self.header, self.f = path, header, None
        if not lazy:
            self._open()

    def _open(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.f = open(self.path, "a", encoding="utf-8", buffering=1)
        self.f.write(self.header)

    def write(self, message):
        if self.f is None:
            self._open()
        self.f.write(message)

    def flush(self):
        if self.f is not None:
            self.f.flush()

    def stop(self):
        if self.f is not None:
            self.f.close()
            self.f = None


class _Intercept(logging.Handler):
    """stdlib logging -> loguru, keeping the logger's name and the exception."""

    def emit(self, record):
        try:
            try:
                level = logger.level(record.levelname).name
            except ValueError:
                level = record.levelno
            message = record.getMessage().strip("\n")
            if record.name == "py.warnings":  # "file:line: Category: text\n  <source line>\n": the first part
                lines = message.rstrip().splitlines()
                message = "\n".join(lines[:-1] if len(lines) > 1 and lines[-1].startswith("  ") else lines)
            logger.bind(source=record.name).opt(exception=record.exc_info).log(level, message)
        except Exception:
            self.handleError(record)


def _fmt(color: bool) -> str:
    rank = f"rank{_state.rank} | " if _state.world > 1 else ""
    if color:
        return ("<green>{time:YYYY-MM-DD HH:mm:ss}</green> | <level>{level: <7}</level> | " + rank
                + "<cyan>{extra[source]}</cyan> | <level>{message}</level>")
    return "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | " + rank + "{extra[source]} | {message}"


def _threshold(source: str) -> int:
    return _state.ours if source.startswith(_state.own) else _state.libs


def _to_terminal(record) -> bool:
    extra = record["extra"]
    return not extra.get("file_only") and record["level"].no >= _threshold(extra.get("source", ""))


def _file_threshold(source: str) -> int:
    if source.startswith(_state.own + PROGRESS):
        return _state.file_level
    return max(_state.file_level, min(_state.libs, logging.WARNING))


def _to_file(record) -> bool:
    extra = record["extra"]
    return (_state.file_level is not None and not extra.get("terminal_only")
            and record["level"].no >= _file_threshold(extra.get("source", "")))


def _keep_early(message):
    if _state.early is not None and len(_state.early) < _MAX_EARLY:
        _state.early.append((message.record["level"].no, str(message)))


def _route_stdlib():
    root = logging.getLogger()
    if not any(isinstance(h, _Intercept) for h in root.handlers):
        root.addHandler(_Intercept())
    for name in _OWN_HANDLERS:
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lib.removeHandler(h)
        lib.propagate = True
    try:  # transformers keeps a reference to its handler and may add it back unless told
        import transformers.utils.logging as hf_logging
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    except ImportError:
        pass
    logging.captureWarnings(True)


def apply_levels():
    """Let every logger emit what the terminal or the file wants. (transformers' Trainer resets transformers'
    verbosity to --log_level when it is built: `medgpt.training.train_and_save` calls this again.)"""
    st = _state
    file_level = st.file_level if st.file_level is not None else logging.CRITICAL + 10
    libs = min(st.libs, max(file_level, min(st.libs, logging.WARNING)))
    for name in st.own:
        logging.getLogger(name).setLevel(min(st.ours, file_level))
    for name in PROGRESS:
        logging.getLogger(name).setLevel(min(st.libs, file_level))
    logging.getLogger().setLevel(libs)
    for name in ("transformers", "datasets"):
        logging.getLogger(name).setLevel(libs)


def setup_logging(output_dir: str | None = None, *, name: str = "run", level: int | None = None,
                  lib_level: int | None = None, own: tuple = (), main: bool | None = None,
                  keep_early: bool = False) -> str | None:
    """Route all logging into loguru with one format on stderr; with `output_dir`, also append to
    `<output_dir>/logs/<name>.log` (this process is rank 0) or `<name>-rank<N>.log` (other ranks; created at its first
    line). `level`: our loggers' terminal level (default INFO on the main process, WARNING elsewhere); `lib_level`:
    the libraries' (default WARNING); `own`: more logger-name prefixes shown at `level` (e.g. "uvicorn").
    `keep_early`: keep the lines logged until a later call opens the file. Returns the log file's path, or None."""
    st = _state
    st.rank = int(os.environ.get("RANK", "0"))
    st.world = int(os.environ.get("WORLD_SIZE", "1"))
    if main is None:
        main = int(os.environ.get("LOCAL_RANK", st.rank)) == 0
    st.main = main
    st.ours = level if level is not None else (logging.INFO if main else logging.WARNING)
    st.libs = lib_level if lib_level is not None else logging.WARNING
    st.own = OURS + tuple(own)
    early = st.early
    for sink_id in st.sink_ids:
        try:
            logger.remove(sink_id)
        except ValueError:
            pass
    st.sink_ids = []
    if st.file is not None:
        st.file.stop()
        st.file, st.path = None, None
    try:
        logger.remove(0)  # loguru's default stderr sink
    except ValueError:
        pass
    logger.configure(extra={"source": "medgpt"})
    _route_stdlib()
    stderr = _Stderr()
    st.sink_ids.append(logger.add(stderr, format=_fmt(stderr.isatty()), filter=_to_terminal, level=0,
                                  colorize=stderr.isatty(), backtrace=False, diagnose=False))
    st.file_level = None
    st.early = None
    if output_dir is not None:
        st.file_level = min(logging.INFO if main else logging.WARNING, st.ours, st.libs)
        file_name = f"{name}.log" if st.rank == 0 else f"{name}-rank{st.rank}.log"
        st.path = os.path.join(output_dir, "logs", file_name)
        st.file = _LogFile(st.path, _header(), lazy=st.rank != 0)
        for line_level, line in early or []:
            if line_level >= st.file_level:
                st.file.write(line)
        st.sink_ids.append(logger.add(st.file, format=_fmt(False), filter=_to_file, level=0, colorize=False,
                                      backtrace=False, diagnose=False))
    elif keep_early:
        st.file_level = min(logging.INFO if main else logging.WARNING, st.ours, st.libs)
        st.early = []
        st.sink_ids.append(logger.add(_keep_early, format=_fmt(False),
                                      filter=_to_file, level=0, colorize=False, backtrace=False, diagnose=False))
    apply_levels()
    return st.path


def _header() -> str:
    import shlex

    cmd = " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])
    procs = f", rank {_state.rank} of {_state.world} processes" if _state.world > 1 else ""
    return (f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} run started on {socket.gethostname()} (pid {os.getpid()}"
            f"{procs}): {cmd}\n")


def setup_run_logging(training_args, name: str = "train") -> str | None:
    """A training stage's logging: levels from --log_level/--log_level_replica (as transformers reads them), the log
    file in training_args.output_dir. Returns the file's path (every process gets its own; rank 0's is train.log)."""
    from transformers.training_args import trainer_log_levels
    from transformers.utils.logging import _get_default_logging_level

    default = _get_default_logging_level()  # WARNING unless TRANSFORMERS_VERBOSITY says otherwise

    def level(name):
        value = trainer_log_levels[name]
        return default if value == -1 else value

    if training_args.should_log:
        ours = logging.INFO if training_args.log_level == "passive" else level(training_args.log_level)
        libs = level(training_args.log_level)
    else:  # the other ranks of a multi-process run
        ours = libs = level(training_args.log_level_replica)
    return setup_logging(training_args.output_dir, name=name, level=ours, lib_level=libs, main=training_args.should_log)


def log_path() -> str | None:
    """This process's log file, once opened."""
    return _state.path


def file_only(level: str, message: str, exception=None, source: str = "medgpt"):
    """A line for the log file (and the early buffer), not the terminal. Nothing before `setup_logging`."""
    if not _state.sink_ids:
        return
    logger.bind(file_only=True, source=source).opt(exception=exception).log(level, message)


def is_global_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


try:
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # pragma: no cover
    _TrainerCallback = object


class MetricsToLog(_TrainerCallback):
    """The Trainer's metric dicts ({'loss': ..., 'learning_rate': ...}), which transformers prints with tqdm/print, as
    lines in the log file: the loss curve of a run that died is in its log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        shown = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"}
        file_only("INFO", f"step {state.global_step}/{state.max_steps}: {shown}", source="medgpt.metrics")
