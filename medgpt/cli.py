"""Entry-point wrapper: bad input ends with one clear line, not a traceback; the run's log file says why it ended.

The one-line error goes to stderr and, at ERROR, into the log file (`medgpt.logs`). In a multi-process launch every
rank usually hits the same bad input: rank 0 prints the line at once; another rank writes it to its own log file and
prints it only if it is still running a few seconds later (the launcher stops the other ranks as soon as one fails,
so the line shows once; a failure of that rank alone still reaches the terminal). A crash (any other exception)
keeps Python's traceback on the terminal and writes it in full into the log file.
"""
from __future__ import annotations

import logging
import sys
import time

from .data.io import DataError

logger = logging.getLogger("medgpt")

# seconds a rank other than 0 waits before printing its one-line error (torchrun polls its processes every 0.1 s)
OTHER_RANK_GRACE_S = 20.0


def _say(line: str) -> None:
    """The one-line error: in this process's log file, and on the terminal once for the whole launch."""
    from .logs import file_only, is_global_main

    file_only("ERROR", line, source="medgpt.cli")
    if not is_global_main():
        time.sleep(OTHER_RANK_GRACE_S)  # rank 0 usually says the same; the launcher then ends this process
    print(line, file=sys.stderr, flush=True)


def run_main(main, *args, **kwargs):
    try:
        return main(*args, **kwargs)
    except DataError as e:
        _say(f"error: {e}")
        sys.exit(2)
    except FileNotFoundError as e:
        _say(f"error: {e.filename or ''}: {e.strerror or e}")
        sys.exit(2)
    except OSError as e:
        # transformers raises OSError for a model/tokenizer folder or hub name it cannot find
        msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        _say(f"error: {msg}")
        sys.exit(2)
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("error: ..."): Python would print it; we print it once
            _say(e.code)
            sys.exit(1)
        if e.code not in (None, 0):
            from .logs import file_only
            file_only("ERROR", f"exit status {e.code}", source="medgpt.cli")
        raise
    except KeyboardInterrupt:
        from .logs import file_only
        file_only("WARNING", "Interrupted (Ctrl-C)", source="medgpt.cli")
        raise
    except Exception as e:
        from .logs import file_only
        file_only("CRITICAL", f"The run crashed: {type(e).__name__}: {e}", exception=e, source="medgpt.cli")
        raise
