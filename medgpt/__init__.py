"""Shared code of the MedicalGPT-compatible training toolkit.

The top-level scripts (supervised_finetuning.py, pretraining.py, ...) stay short: argument
dataclasses, data loading/validation, model/tokenizer/LoRA loading and callbacks live here, once.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend warns on import when the optional hub-downloaded `kernels` package is
# absent, then uses its built-in kernel; we never fetch kernels from a hub, so the warning is noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
