"""The training loop behind experiments/train.py: data, steps, evaluation, checkpoints, logging.

One program for one device, many devices and many hosts: the train step is one jit with in/out
shardings over the device mesh of config.mesh (megalodon_jax/sharding). On several hosts every
process runs this same loop: it joins the runtime first (sharding.distributed.initialize, from
the mesh section's coordinator settings or automatically on TPU pods / SLURM), loads only its rows
of every batch, saves and restores checkpoints together with the others, and logs from process 0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from megalodon_jax import data as data_lib
from megalodon_jax import model as model_lib
from megalodon_jax import sharding
from megalodon_jax.config import ConfigError, MegalodonConfig
from megalodon_jax.sharding import distributed, partitioning
from megalodon_jax.training import checkpoint as checkpoint_lib
from megalodon_jax.training import metrics as metrics_lib
from megalodon_jax.training import optimizer as optimizer_lib
from megalodon_jax.training import train_step as step_lib

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
  """Training cannot continue (e.g. too many non-finite steps in a row); the message says why."""


def model_config(config: ml_collections.ConfigDict) -> MegalodonConfig:
  return MegalodonConfig.from_dict(config.model.to_dict())


def data_config(config: ml_collections.ConfigDict, process_count: int | None = None) -> data_lib.DataConfig:
  """The pipeline settings of this process: '' and 0 mean unset; batch sizes become per process."""
  process_count = jax.process_count() if process_count is None else process_count
  values = {k: (None if v in ("", 0) and k in ("data_dir", "text_key", "eval_batch_size", "num_epochs") else v)
            for k, v in config.data.to_dict().items()}
  if not values["tokenizer"]:
    raise ConfigError("data.tokenizer is not set: use 'byte' or 'sentencepiece:/path/to/tokenizer.model'")
  for key in ("batch_size", "eval_batch_size"):
    if values[key] is not None:
      if values[key] % process_count:
        raise ConfigError(f"data.{key}={values[key]} is the global batch and must be divisible by the "
                          f"number of processes ({process_count})")
      values[key] //= process_count
  return data_lib.DataConfig.from_dict(values)


def check_config(config: ml_collections.ConfigDict) -> tuple[MegalodonConfig, data_lib.DataConfig]:
  """Validates the experiment config before anything expensive happens."""
  model_cfg = model_config(config)
  data_cfg = data_config(config)
  tokenizer = data_lib.make_tokenizer(data_cfg.tokenizer)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                      f"({tokenizer.vocab_size}); set --config.model.vocab_size={tokenizer.vocab_size} or larger")
  from megalodon_jax.config import check_sequence_length
  check_sequence_length(model_cfg, data_cfg.seq_len)
  if config.train.steps <= 0:
    raise ConfigError(f"train.steps must be positive, got {config.train.steps}")
  if config.data.batch_size % config.train.microbatches:
    raise ConfigError(f"data.batch_size={config.data.batch_size} must be divisible by "
                      f"train.microbatches={config.train.microbatches}")
  return model_cfg, data_cfg


def make_parallelism(config: ml_collections.ConfigDict) -> sharding.Parallelism:
  """The device mesh, logical-axis rules and sequence combine of config.mesh (all devices)."""
  mesh_cfg = config.get("mesh", None) or ml_collections.ConfigDict()
  mesh = sharding.create_mesh(mesh_cfg)
  rules = sharding.rules_from_config(mesh_cfg.get("rules", None))
  return sharding.Parallelism(mesh, rules, mesh_cfg.get("sequence_combine", "all_gather"))


@dataclasses.dataclass
class Experiment:
  """What train/evaluate/generate share: configs, model, tokenizer, mesh, shardings, jitted functions."""
  config: ml_collections.ConfigDict
  model_cfg: MegalodonConfig
  data_cfg: data_lib.DataConfig
  model: model_lib.MegalodonLM
  optimizer: Any
  parallelism: sharding.Parallelism
  _state_shardings: Any = dataclasses.field(default=None, init=False, repr=False)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict) -> "Experiment":
    model_cfg, data_cfg = check_config(config)
    optimizer = optimizer_lib.make_optimizer(config.optim.to_dict(), config.train.steps)
    return cls(config, model_cfg, data_cfg, model_lib.MegalodonLM(model_cfg), optimizer, make_parallelism(config))

  def _init_fn(self):
    rng = jax.random.PRNGKey(self.config.seed)
    params_rng, dropout_rng = jax.random.split(rng)
    init = lambda r: step_lib.init_train_state(model_lib.init_params(self.model_cfg, r), self.optimizer, dropout_rng)
    return init, params_rng

  def state_shardings(self) -> step_lib.TrainState:
    """A TrainState of NamedShardings: parameters and Adam moments by the logical rules, rest replicated."""
    if self._state_shardings is None:
      init, rng = self._init_fn()
      params = partitioning.param_shardings(self.model_cfg, self.parallelism)
      self._state_shardings = partitioning.train_state_shardings(jax.eval_shape(init, rng), params,
                                                                 self.parallelism)
    return self._state_shardings

  def init_state(self) -> step_lib.TrainState:
    init, rng = self._init_fn()
    return jax.jit(init, out_shardings=self.state_shardings())(rng)

  def abstract_state(self) -> Any:
    """Shapes, dtypes and shardings of the TrainState (what checkpoints restore into)."""
    init, rng = self._init_fn()
    return partitioning.with_shardings(jax.eval_shape(init, rng), self.state_shardings())

  def batch_sharding(self, rows: int) -> jax.sharding.NamedSharding:
    """Sharding of [rows, seq_len] batch arrays (rows over data/fsdp, steps over sequence)."""
    return self.parallelism.sharding((rows, self.data_cfg.seq_len), ("batch", "length"))

  def place_batch(self, local: dict[str, np.ndarray], rows: int) -> dict[str, jax.Array]:
    """Global arrays of `rows` rows from this process's rows of a batch."""
    sharding_ = self.batch_sharding(rows)
    return distributed.global_batch(local, {key: sharding_ for key in local}, rows)

  def train_step(self) -> Any:
    """The jitted, sharded train step: (state, batch) -> (state, metrics); donates the state."""
    tcfg = self.config.train
    state_sh = self.state_shardings()
    step = step_lib.make_train_step(self.model.apply, self.optimizer, microbatches=tcfg.microbatches,
                                    use_dropout=_uses_dropout(self.model_cfg))
    return partitioning.jit_sharded(
        step, self.parallelism, in_shardings=(state_sh, self.batch_sharding(self.config.data.batch_size)),
        out_shardings=(state_sh, partitioning.replicated(self.parallelism)), donate_argnums=(0,))

  def eval_step(self) -> Any:
    """The jitted, sharded eval step: (params, batch) -> {nll, tokens} (replicated scalars)."""
    return partitioning.jit_sharded(step_lib.make_eval_step(self.model.apply), self.parallelism,
                                    out_shardings=partitioning.replicated(self.parallelism))

  def train_loader(self) -> distributed.ShardedLoader:
    """This process's loader shards of the training data (see sharding.distributed.ShardedLoader)."""
    rows = self.config.data.batch_size
    block = distributed.process_rows(self.batch_sharding(rows), (rows, self.data_cfg.seq_len))

    def make(shard: int, shards: int):
      cfg = dataclasses.replace(self.data_cfg, batch_size=rows // shards)
      return data_lib.make_train_iterator(cfg, process_index=shard, process_count=shards)

    mesh_cfg = self.config.get("mesh", None) or {}
    return distributed.ShardedLoader(make, global_rows=rows, rows=block,
                                     loader_shards=int(mesh_cfg.get("loader_shards", 0) or 0))

  def tokenizer(self):
    return data_lib.make_tokenizer(self.data_cfg.tokenizer)


def _count_bytes(batch: dict) -> jax.Array:
  """Targets that are bytes (not BOS/EOS/padding): the byte count of the text a batch scores."""
  return jnp.sum((batch["loss_mask"] > 0) & (batch["targets"] >= data_lib.ByteTokenizer.num_special))


def evaluate(experiment: Experiment, params: Any, split: str | None = None, max_batches: int | None = None,
             eval_step=None) -> dict[str, float]:
  """Loss (nats/token), perplexity and bits per byte on a split (all of it unless max_batches).

  Every process reads its rows of each global eval batch; the sums are over the global batch.
  """
  eval_step = eval_step or experiment.eval_step()
  split = split or experiment.data_cfg.eval_split
  rows = experiment.config.data.get("eval_batch_size", 0) or experiment.config.data.batch_size
  start, stop = distributed.process_rows(experiment.batch_sharding(rows), (rows, experiment.data_cfg.seq_len))
  block = stop - start
  data_cfg = dataclasses.replace(experiment.data_cfg, eval_batch_size=block)
  count_bytes = jax.jit(_count_bytes, out_shardings=partitioning.replicated(experiment.parallelism))
  nll, tokens, batches = 0.0, 0.0, 0
  scored_bytes = 0
  byte_level = isinstance(experiment.tokenizer(), data_lib.ByteTokenizer)
  for local in data_lib.make_eval_batches(data_cfg, split, process_index=start // block, process_count=rows // block):
    if max_batches is not None and batches >= max_batches:
      break
    batch = experiment.place_batch(local, rows)
    out = jax.device_get(eval_step(params, batch))
    nll += float(out["nll"])
    tokens += float(out["tokens"])
    if byte_level and max_batches is not None:
      scored_bytes += int(jax.device_get(count_bytes(batch)))
    batches += 1
  if tokens == 0:
    raise ConfigError(f"evaluation split {split!r} produced no tokens")
  if max_batches is None:
    scored_bytes = data_lib.count_text_bytes(experiment.data_cfg, split)
  result = {"loss": nll / tokens, "perplexity": math.exp(min(nll / tokens, 50.0)), "tokens": tokens}
  if scored_bytes:
    result["bits_per_byte"] = nll / math.log(2) / scored_bytes
  return result


class _Preemption:
  """Turns SIGTERM into a flag checked between steps, so the loop can save and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the newest readable checkpoint in workdir), evaluates, returns a summary.

  Writes metrics.jsonl, TensorBoard events and checkpoints/ under workdir.
  """
  # Joins the other hosts (a no-op on one host); must come before anything touches a JAX backend.
  distributed.initialize_from_config(config.get("mesh", None) or {})
  experiment = Experiment.create(config)
  tcfg = config.train
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                                             async_save=config.checkpoint.async_save)
  writer = metrics_lib.MetricsWriter(workdir)
  data_iter = experiment.train_loader()

  restored = checkpointer.restore_latest(experiment.abstract_state())
  if restored is None:
    state = experiment.init_state()
    start = 0
  else:
    start, state, data_state = restored
    data_iter.set_state(data_state)
    _print(f"resumed from step {start} in {checkpointer.directory}")
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  _print(f"model: {n_params:,} parameters; {experiment.model_cfg.num_layers} layers, "
         f"D={experiment.model_cfg.model_dim}; training steps {start}..{tcfg.steps}")
  _print(f"mesh: {sharding.describe(experiment.parallelism.mesh)}; data: {data_iter.num_shards} loader shard(s), "
         f"this process reads {len(data_iter.shards)}")

  train_step = experiment.train_step()
  eval_step = experiment.eval_step()
  flops_per_token = metrics_lib.model_flops_per_token(experiment.model_cfg, experiment.data_cfg.seq_len)
  peak = metrics_lib.device_peak_flops()
  schedule = optimizer_lib.learning_rate_schedule(config.optim.to_dict(), tcfg.steps)
  tokens_per_step = config.data.batch_size * experiment.data_cfg.seq_len

  progress = metrics_lib.Progress(tcfg.steps, initial=start)
  last_time, last_step = time.perf_counter(), start
  step = start
  summary: dict[str, Any] = {"start_step": start, "losses": {}}
  with _Preemption() as preemption:
    while step < tcfg.steps:
      batch = experiment.place_batch(next(data_iter), config.data.batch_size)
      state, metrics = train_step(state, batch)
      step += 1
      if step % tcfg.log_every == 0 or step == tcfg.steps:
        host = jax.device_get(metrics)
        now = time.perf_counter()
        tokens_per_sec = tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        scalars = {"loss": host["loss"], "grad_norm": host["grad_norm"], "learning_rate": schedule(step - 1),
                   "tokens_per_sec": tokens_per_sec, "skipped_steps": host["nonfinite_total"]}
        if isinstance(experiment.tokenizer(), data_lib.ByteTokenizer):
          scalars["bits_per_token"] = host["loss"] / math.log(2)
        if peak:
          scalars["mfu"] = flops_per_token * tokens_per_sec / (peak * jax.device_count())
        writer.write(step, scalars)
        summary["losses"][step] = float(host["loss"])
        progress.advance_to(step, loss=float(host["loss"]), tok_s=f"{tokens_per_sec:,.0f}")
        if int(host["nonfinite_streak"]) >= tcfg.max_nonfinite_streak:
          checkpointer.close()
          raise TrainingStopped(
              f"{int(host['nonfinite_streak'])} consecutive steps had a non-finite loss or gradient (up to step "
              f"{step}); the updates were skipped and the last good state is in {checkpointer.directory}. "
              "Lower optim.lr, raise optim.warmup, or check the data.")
      if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
        result = evaluate(experiment, state.params, max_batches=tcfg.eval_batches, eval_step=eval_step)
        writer.write(step, result, prefix="eval")
        progress.write(f"step {step}: eval " + _format(result))
      if _any_process(preemption.requested, step, tcfg.log_every):
        checkpointer.save(step, state, data_iter.get_state(), wait=True)
        progress.close()
        _print(f"SIGTERM received: saved checkpoint at step {step} in {checkpointer.directory}; exiting")
        summary.update(step=step, preempted=True)
        checkpointer.close()
        writer.close()
        return summary
      if config.checkpoint.every and step % config.checkpoint.every == 0 and step < tcfg.steps:
        checkpointer.save(step, state, data_iter.get_state())
  progress.close()
  if step > start or not checkpointer.steps():
    checkpointer.save(step, state, data_iter.get_state(), wait=True)
  checkpointer.close()

  result = evaluate(experiment, state.params, max_batches=tcfg.get("final_eval_batches", 0) or None,
                    eval_step=eval_step)
  writer.write(step, result, prefix="eval")
  baseline = data_lib.unigram_baseline(experiment.data_cfg)
  writer.close()
  limit = tcfg.get("final_eval_batches", 0)
  scope = f", first {limit} batches" if limit else ""
  _print(f"validation ({experiment.data_cfg.eval_split}{scope}): " + _format(result))
  _print(f"unigram baseline of the corpus: {baseline:.3f} bits per byte")
  summary.update(step=step, eval=result, unigram_bits_per_byte=baseline, preempted=False,
                 checkpoint_dir=checkpointer.directory)
  final_loss = summary["losses"].get(step)
  _print(f"done: step {step}, final train loss {final_loss:.4f}" if final_loss is not None else f"done: step {step}")
  summary["state"] = state
  return summary


def _any_process(flag: bool, step: int, every: int) -> bool:
  """Whether any process has `flag` set: all processes must save a checkpoint together.

  With several processes the flags are exchanged every `every` steps only (an exchange waits for
  the devices), so a SIGTERM is acted on at the next multiple of train.log_every.
  """
  if jax.process_count() == 1:
    return flag
  if step % max(every, 1):
    return False
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _uses_dropout(cfg: MegalodonConfig) -> bool:
  return max(cfg.dropout, cfg.hidden_dropout, cfg.attention_dropout) > 0


def _format(result: dict[str, float]) -> str:
  parts = [f"loss {result['loss']:.4f}", f"ppl {result['perplexity']:.3f}"]
  if "bits_per_byte" in result:
    parts.append(f"bits/byte {result['bits_per_byte']:.4f}")
  return ", ".join(parts)


def _print(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def load_params(experiment: Experiment, workdir: str, step: int | None = None) -> Any:
  """Parameters from the newest readable checkpoint in workdir (or a given step)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir}: train first with "
                            f"`python -m experiments.train --workdir={workdir}` (and the same --config)")
  checkpointer = checkpoint_lib.Checkpointer(directory, async_save=False)
  try:
    abstract = experiment.abstract_state()
    if step is not None:
      state, _ = checkpointer.restore(step, abstract)
    else:
      restored = checkpointer.restore_latest(abstract)
      if restored is None:
        raise FileNotFoundError(f"no readable checkpoint in {directory}")
      step, state, _ = restored
  finally:
    checkpointer.close()
  if jax.process_index() == 0:
    print(f"loaded checkpoint step {step} from {directory}", file=sys.stderr, flush=True)
  return state.params
