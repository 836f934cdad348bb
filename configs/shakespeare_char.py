"""The default: a small byte-level Megalodon on the embedded Shakespeare corpus, CPU-friendly.

python -m experiments.train --config=configs/shakespeare_char.py --workdir=/tmp/shakespeare
"""

from configs.base import base_config, model_config


def get_config(arg: str | None = None):
  c = base_config()
  # 4 layers, D=128, chunk 128; vocab = 256 bytes + 3 specials (pad, bos, eos), rounded up.
  c.model = model_config("small", vocab_size=260, num_layers=4, model_dim=128, z_dim=64, value_dim=256,
                         ffn_hidden_dim=256, num_heads=2, chunk_size=128, norm_num_groups=16, cema_ndim=16,
                         cema_chunk=32)
  c.data.seq_len = 256
  c.data.batch_size = 16
  c.optim.lr = 4e-3
  c.optim.warmup = 30
  c.optim.scheduler = "cosine"
  c.optim.beta2 = 0.98
  c.train.steps = 300
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 10
  c.checkpoint.every = 100
  c.sample.prompt = "ROMEO:\n"
  c.sample.max_new_tokens = 300
  if arg == "smoke":  # a few seconds: used by the tests
    c.model.num_layers = 1
    c.model.model_dim = 32
    c.model.z_dim = 16
    c.model.value_dim = 32
    c.model.ffn_hidden_dim = 64
    c.model.chunk_size = 16
    c.model.norm_num_groups = 4
    c.model.cema_ndim = 4
    c.model.cema_chunk = 8
    c.data.seq_len = 32
    c.data.batch_size = 4
    c.optim.warmup = 2
    c.train.steps = 8
    c.train.log_every = 2
    c.train.eval_every = 4
    c.train.eval_batches = 2
    # The whole validation split is ~1,300 batches of this shape (about a minute on a CPU, most of a
    # test's time); 128 batches (16 KB) still beat the unigram baseline after 30 steps.
    c.train.final_eval_batches = 128
    c.checkpoint.every = 4
    c.sample.max_new_tokens = 20
  return c
