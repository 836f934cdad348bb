"""enwik8, byte level, for a GPU: a Megalodon sized like the Mega paper's enwik8 model.

Mega reports 1.02 bits per character on enwik8; this config has not been run to convergence here.
Needs an `enwik8` TFDS-style text dataset in data.data_dir with train/validation/test splits of
90M/5M/5M bytes (the standard split).
"""

from configs.base import base_config, model_config


def get_config(arg: str | None = None):
  c = base_config()
  c.model = model_config("small", vocab_size=260, num_layers=12, model_dim=512, z_dim=128, value_dim=1024,
                         num_heads=1, ffn_hidden_dim=1536, chunk_size=1024, norm_num_groups=32,
                         dropout=0.1, hidden_dropout=0.1, attention_dropout=0.0,
                         dtype="bfloat16", scan_layers=True)
  c.data.dataset = "enwik8"
  c.data.tokenizer = "byte"
  c.data.seq_len = 8192
  c.data.batch_size = 8
  c.optim.lr = 5e-3
  c.optim.warmup = 4000
  c.optim.scheduler = "linear"
  c.optim.beta2 = 0.98
  c.optim.weight_decay = 0.1
  c.train.steps = 200000
  c.train.eval_every = 2000
  return c
