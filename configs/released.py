"""Configs for the released presets (SPEC §6) with the release's optimiser settings.

These expect a TFDS text dataset prepared in `data.data_dir` (e.g. c4 or pg19 in a bucket) and a
sentencepiece model (`data.tokenizer=/path/to/tokenizer.model`, the release used LLaMA's 32000-piece
tokenizer). The per-preset files (mega200M.py, ...) call `released_config`.
"""

from configs.base import base_config, model_config


def released_config(preset: str, *, dataset: str = "c4/en:3.1.0", seq_len: int = 4096, batch_size: int = 256,
                    paper_7b: bool = False):
  c = base_config()
  c.model = model_config(preset, vocab_size=32000, dtype="bfloat16", param_dtype="float32", scan_layers=True)
  c.data.dataset = dataset
  c.data.tokenizer = ""  # required: "sentencepiece:/path/to/tokenizer.model"
  c.data.seq_len = seq_len
  c.data.batch_size = batch_size
  c.data.eval_split = "validation"
  # The release's OptimConf defaults: AdamW(0.9, 0.98, eps 1e-8), wd 0.1, clip 1.0, linear schedule
  # with warm-up from 1e-4 of the peak to an end ratio of 0.01.
  c.optim.lr = 1e-3
  c.optim.warmup = 2000
  c.optim.scheduler = "linear"
  c.optim.decay_norms_and_cema = True  # the release decays every parameter
  c.train.steps = 100000
  c.train.log_every = 100
  c.train.eval_every = 2000
  c.checkpoint.every = 1000
  if paper_7b:  # the paper's 7B run: beta2 0.95, lr 3.5e-4, cosine, 2500 warm-up steps, 32K-token rows
    c.optim.beta2 = 0.95
    c.optim.lr = 3.5e-4
    c.optim.scheduler = "cosine"
    c.optim.warmup = 2500
    c.data.seq_len = 32768
    c.data.batch_size = 128  # 4M tokens per step
    c.model.remat_policy = "dots_no_batch"
  return c
