"""PG19 with a sentencepiece tokenizer and the released 1.3B pg19 preset (same as mega1_3B_pg19.py)."""

from configs.mega1_3B_pg19 import get_config  # noqa: F401
