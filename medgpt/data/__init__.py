"""Data loading and validation for every stage: file discovery and reading with file:line errors (io),
chat samples for SFT (sft), raw text for pretraining (pretrain), preference pairs for RM/DPO/ORPO
(preference), and batch collation with exact packing (collator)."""
from .io import DataError, Record, find_data_files, iter_records, load_records

__all__ = ["DataError", "Record", "find_data_files", "iter_records", "load_records"]
