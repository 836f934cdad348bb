"""The released mega1.3B_pg19 preset (SwiGLU, tied and scaled embeddings) on PG19.

The paper reports PG19 word-level perplexity 29.5/25.4 (1.3B); PG19 books are long, so rows are
32K tokens. Needs `data.data_dir` holding the TFDS pg19 dataset and `data.tokenizer`.
"""

from configs.released import released_config


def get_config(arg: str | None = None):
  c = released_config("mega1.3B_pg19", dataset="pg19", seq_len=32768, batch_size=32)
  c.data.eval_split = "validation"
  return c
