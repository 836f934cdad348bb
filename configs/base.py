"""Defaults shared by every experiment config; each config file starts from `base_config()`."""

from __future__ import annotations

import ml_collections

from megalodon_jax.config import MegalodonConfig, PRESETS
from megalodon_jax.sharding.rules import DEFAULT_RULES, rules_to_config


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  """All MegalodonConfig fields for a preset, as a ConfigDict (overridable from the command line)."""
  fields = MegalodonConfig(**{**PRESETS[preset], **overrides}).to_dict()
  return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config("small")

  # Fields of megalodon_jax.data.DataConfig ('' means unset), except batch_size, which is GLOBAL here
  # (rows per optimiser step over all processes); each process reads batch_size / process_count.
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "shakespeare_works"  # any TFDS text dataset prepared in data_dir (array_record)
  c.data.data_dir = ""  # '' -> tfds's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.text_key = ""  # '' -> "text" ("book_text" for pg19)
  c.data.tokenizer = "byte"  # "byte" or "sentencepiece:/path/to/tokenizer.model"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.seq_len = 256
  c.data.batch_size = 16
  c.data.eval_batch_size = 0  # 0 -> same as batch_size
  c.data.add_bos = True
  c.data.add_eos = True
  c.data.seed = 0
  c.data.num_epochs = 0  # 0 -> repeat forever
  c.data.shuffle_documents = True
  c.data.shuffle_window = 1024
  c.data.read_threads = 2

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.warmup = 2000
  c.optim.scheduler = "linear"  # linear | cosine | constant (the release's schedules)
  c.optim.lr_init_ratio = 1e-4
  c.optim.lr_end_ratio = 0.01
  c.optim.cycles = 1.0
  c.optim.weight_decay = 0.1
  c.optim.decay_norms_and_cema = False  # the release decays everything; we skip norms/CEMA/biases by default
  c.optim.beta1 = 0.9
  c.optim.beta2 = 0.98
  c.optim.epsilon = 1e-8
  c.optim.clip = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 10000
  c.train.microbatches = 1  # gradient accumulation
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.eval_batches = 20
  c.train.final_eval_batches = 0  # the evaluation after training: 0 scores the whole eval split
  c.train.max_nonfinite_streak = 20  # stop after this many consecutive skipped (non-finite) steps

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "\n"
  c.sample.max_new_tokens = 256
  c.sample.temperature = 0.8
  c.sample.top_k = 0
  c.sample.top_p = 0.95
  c.sample.seed = 0
  # Tokens per device call while streaming (decoding.generate): 1 is a host round trip per token.
  c.sample.tokens_per_call = 16

  # Device mesh and multi-host settings (see megalodon_jax/sharding). Sizes of the mesh axes inside
  # a slice (ICI: one TPU slice or one GPU host) and across slices (DCN: between slices or hosts);
  # each mesh axis is their product. -1 takes the remaining devices (at most one of each kind).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.sequence = 1  # sequence parallelism: seq_len / sequence must be a multiple of chunk_size
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_sequence = 1
  c.mesh.dcn_tensor = 1
  # Logical axis -> mesh axes ('a,b'; '' = replicated), e.g. --config.mesh.rules.embed=fsdp,tensor.
  c.mesh.rules = ml_collections.ConfigDict(rules_to_config(DEFAULT_RULES))
  c.mesh.sequence_combine = "all_gather"  # CEMA/TimestepNorm summaries: all_gather (depth 1) | doubling (log P)
  # Data loaded in this many shards (0: one per data-parallel host); fix it to keep the same batches
  # when the number of hosts changes (e.g. resuming on another topology).
  c.mesh.loader_shards = 0
  # Multi-host: jax.distributed.initialize runs automatically on TPU pods, SLURM and Open MPI
  # ('auto'); elsewhere give process 0's host:port, the process count and this process's id.
  c.mesh.initialize = "auto"  # auto | always | never
  c.mesh.coordinator_address = ""
  c.mesh.num_processes = 0
  c.mesh.process_id = -1
  return c
