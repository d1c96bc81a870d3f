"""Entry-point wrapper: bad input ends with one clear line, not a traceback."""
from __future__ import annotations

import logging
import sys

from .data.io import DataError

logger = logging.getLogger("medgpt")


def run_main(main, *args, **kwargs):
    try:
        return main(*args, **kwargs)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # transformers raises OSError for a model/tokenizer folder or hub name it cannot find
        msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
