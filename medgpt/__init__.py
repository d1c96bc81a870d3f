"""Shared code of the MedicalGPT-compatible training toolkit.

The top-level scripts (supervised_finetuning.py, pretraining.py, ...) stay short: argument
dataclasses, data loading/validation, model/tokenizer/LoRA loading and callbacks live here, once.
"""

__version__ = "0.1.0"
