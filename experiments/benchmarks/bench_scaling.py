"""Multi-GPU scaling of the Megalodon train step: data parallel, sequence parallel, long sequences.

Rows (each its own compiled step; the mesh is built over jax.devices()[:n]):

  data      global batch (8 n) x 4096 on mesh data=n (or fsdp=n with --dp-axis fsdp): parameters
            replicated, gradients all-reduced.
  sequence  one sequence of L tokens split over mesh sequence=n: the project's sequence-parallel
            CEMA / TimestepNorm (per-slice scan + prefix combine of the slice summaries) and
            device-local chunked attention.
  long      mega1.3B (--long-size) with one sequence of 65536 / 131072 tokens over all devices,
            without activation checkpointing unless --long-remat says otherwise (--oom-remat
            retries a row that does not fit).

Per row: tokens/s, tokens/s per GPU, scaling efficiency = (tokens/s per GPU) / (tokens/s of the
n=1 row of the same size, mode and per-GPU shape; for sequence rows: the same L), the loss of the
first step (equal across n up to bf16 rounding: the same parameters and tokens), and memory per
GPU ("mem_gib": XLA's buffer assignment of the compiled step on one device; "peak_gib": the
allocator's peak on the busiest device since the process started). Sequence rows with n > 1 also
time the state combine alone ("combine_ms_per_layer": one CEMA and one TimestepNorm exchange,
forward and backward, at the row's shapes) and give it as a share of the step.

The step is harness.train_step_fn (the one bench_train times: float32 cross-entropy, clip + AdamW,
params / optimizer state donated), jitted with shardings and traced under sharding.use(par).
Timing: median of --iters steps after --warmup. --compile-workers K > 1 compiles every row of the
run first, K at a time (the compile of a Megalodon step takes 1-2 minutes on an H200 host), then
runs them one after the other, so that no compile disturbs a timed step.

A row that fails prints "failed: <reason>" and the run goes on; the JSON
(<results-dir>/<date>_<device>_<name>.json, device e.g. nvidia-h200x2) is rewritten after every row.

  python -m experiments.benchmarks.bench_scaling --sizes 200M --devices 1,2 --modes data,sequence
  python -m experiments.benchmarks.bench_scaling --sizes 1.3B --modes long --long-lengths 65536,131072
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    python -m experiments.benchmarks.bench_scaling --smoke                  # tiny model, CPU devices
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from experiments.benchmarks import bench_ops, bench_train, harness
from megalodon_jax import config as mega_config
from megalodon_jax import sharding
from megalodon_jax.ops import cema as cema_ops
from megalodon_jax.sharding import partitioning
from megalodon_jax.sharding import sequence_parallel as sp
from megalodon_jax.xla_flags import cpu_flags

MODES = ("data", "sequence", "long")
SIZES = {"200M": "mega200M", "1.3B": "mega1.3B"}
SMOKE_SIZES = {"tiny": "tiny"}
TARGET_EFFICIENCY = {"data": 0.90, "sequence": 0.85}  # on 2 GPUs (issue 7)
TARGET_DEVICES = 2


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """One measurement. batch x length is the global shape; `devices` the first n devices."""
  size: str
  mode: str
  devices: int
  batch: int
  length: int
  remat: str

  @property
  def tokens(self) -> int:
    return self.batch * self.length

  @property
  def arch(self) -> str:  # what bench_train.build_megalodon reads
    return "megalodon"

  @property
  def per_device(self) -> "RowSpec":
    """The n=1 row this one is compared with: data rows keep the rows per GPU, others the shape."""
    batch = self.batch // self.devices if self.mode == "data" else self.batch
    return dataclasses.replace(self, devices=1, batch=batch)

  def mesh_sizes(self, dp_axis: str) -> dict[str, int]:
    axis = dp_axis if self.mode == "data" else "sequence"
    return {"data": 1, axis: self.devices}

  def label(self) -> str:
    return f"{self.size} {self.mode} n={self.devices} {self.batch}x{self.length} remat={self.remat}"


# --------------------------------------------------------------------------------------------
# Building and compiling one row's step
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
  """A compiled sharded train step and what is needed to feed it."""
  spec: RowSpec
  model: bench_train.Model
  config: mega_config.MegalodonConfig
  par: sharding.Parallelism
  params_sharding: Any
  opt_sharding: Any
  batch_sharding: Any
  optimizer: Any
  compiled: Any = None
  compile_s: float | None = None


def build_step(spec: RowSpec, args: argparse.Namespace) -> Step:
  """The row's model, mesh, shardings and jitted step (not compiled yet; nothing allocated)."""
  if spec.devices > jax.device_count():
    raise ValueError(f"needs {spec.devices} devices, this host has {jax.device_count()}")
  preset = args.size_table[spec.size]
  model = bench_train.build_megalodon(preset, spec, args)
  cfg = bench_train.megalodon_config(preset, spec, args)
  mesh = sharding.create_mesh(spec.mesh_sizes(args.dp_axis), jax.devices()[:spec.devices])
  par = sharding.Parallelism(mesh, sharding.DEFAULT_RULES, args.sequence_combine)
  params_sh = partitioning.param_shardings(cfg, par)
  optimizer = harness.adamw(args.learning_rate)
  abstract_params = jax.eval_shape(model.init, jax.random.key(0))
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  replicated = partitioning.replicated(par)
  opt_sh = partitioning.mirror_shardings(abstract_opt, abstract_params, params_sh, replicated)
  batch_sh = partitioning.batch_shardings(par, spec.batch, spec.length, keys=("inputs", "targets"))
  return Step(spec, model, cfg, par, params_sh, opt_sh, batch_sh, optimizer)


def compile_step(step: Step) -> Step:
  """Lowers and compiles from abstract shapes (no device memory), so it can run in a thread."""
  fn = partitioning.jit_sharded(harness.train_step_fn(step.model.apply, step.optimizer), step.par,
                                in_shardings=(step.params_sharding, step.opt_sharding, step.batch_sharding),
                                out_shardings=(step.params_sharding, step.opt_sharding,
                                               partitioning.replicated(step.par)),
                                donate_argnums=(0, 1))
  params = jax.eval_shape(step.model.init, jax.random.key(0))
  opt_state = jax.eval_shape(step.optimizer.init, params)
  batch = bench_train.abstract_batch(step.spec)
  start = time.perf_counter()
  step.compiled = fn.lower(partitioning.with_shardings(params, step.params_sharding),
                           partitioning.with_shardings(opt_state, step.opt_sharding),
                           partitioning.with_shardings(batch, step.batch_sharding)).compile(compiler_options())
  step.compile_s = round(time.perf_counter() - start, 1)
  return step


def compiler_options() -> dict[str, Any]:
  """LLVM -O0 and no fusion emitters on the CPU (the smoke run): several times faster compiles of
  the same program; GPU compiles keep XLA's defaults."""
  if jax.default_backend() != "cpu":
    return {}
  options: dict[str, Any] = {"xla_backend_optimization_level": 0}
  if "--xla_cpu_use_fusion_emitters=false" in cpu_flags():  # a flag jaxlib 0.11 no longer has
    options["xla_cpu_use_fusion_emitters"] = False
  return options


def make_batch(spec: RowSpec, vocab_size: int) -> dict[str, jax.Array]:
  """bench_train's hashed tokens [B, L]. Data rows repeat the n=1 row's batch on every device, so
  that their loss (and, with gradients averaged over identical shards, every later loss) equals
  the single-device one: a check of the data-parallel step at no cost to the timing."""
  if spec.mode != "data":
    return bench_train.make_batch(spec, vocab_size)
  single = bench_train.make_batch(spec.per_device, vocab_size)
  return jax.tree.map(lambda x: jnp.tile(x, (spec.devices, 1)), single)


def initial_state(step: Step) -> tuple[Any, Any, dict[str, jax.Array]]:
  """(params, optimizer state, batch), placed with the row's shardings."""
  params = jax.jit(step.model.init, out_shardings=step.params_sharding)(jax.random.key(0))
  opt_state = jax.jit(step.optimizer.init, out_shardings=step.opt_sharding)(params)
  batch = jax.device_put(make_batch(step.spec, step.model.vocab_size), step.batch_sharding)
  return params, opt_state, batch


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

def allocator_peak_bytes(devices: list[jax.Device]) -> int | None:
  """The largest allocator peak over `devices` (since the process started; None on the CPU)."""
  peaks = [harness.peak_memory_bytes(d) for d in devices]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


# --------------------------------------------------------------------------------------------
# The sequence-parallel state combine alone
# --------------------------------------------------------------------------------------------

def combine_program(cfg: mega_config.MegalodonConfig, rows: int, devices: int, slice_length: int,
                    schedule: str):
  """(jitted fwd+bwd of one layer's CEMA and TimestepNorm prefix combines, its inputs).

  The exchange of sequence_parallel.cema_sequence_local and timestep_norm_sequence_local (the
  same combine functions, element shapes and exclusive_prefix calls) without the per-slice scans:
  CEMA states h [rows, D, N] complex as float32 pairs, TimestepNorm (reset, count, mean, var) with
  [rows, G] statistics. Inputs carry a leading device axis of size n, split over 'sequence'.
  """
  d, n, g = cfg.model_dim, cfg.cema_ndim, cfg.norm_num_groups
  mesh = sharding.create_mesh({"data": 1, "sequence": devices}, jax.devices()[:devices])
  angle = jnp.linspace(0.0, math.pi, d * n).reshape(d, n)
  q = jax.lax.complex(0.999 * jnp.cos(angle), 0.999 * jnp.sin(angle))  # a slowly decaying state
  slice_decay = cema_ops.cema_powers(q, 1, offset=slice_length)[..., 0]
  span_powers = cema_ops.cema_powers(slice_decay, devices + 1)

  def body(h, mean, var):
    ones = jnp.ones((rows,), jnp.float32)
    cema_element = (ones, jnp.ones((), jnp.int32), h[0])
    cema_identity = (ones, jnp.zeros((), jnp.int32), jnp.zeros_like(h[0]))
    # Private combines on purpose: this times exactly what the sequence-parallel ops exchange.
    cema_in, _ = sp.exclusive_prefix(cema_element, sp._cema_combine(span_powers), cema_identity,
                                     axis="sequence", size=devices, schedule=schedule, total=False)
    count = jnp.full((rows,), slice_length, jnp.int32)
    zeros = jnp.zeros((rows,), jnp.float32)
    tsn_element = (zeros, count, mean[0], var[0])
    tsn_identity = (zeros, jnp.zeros_like(count), jnp.zeros_like(mean[0]), jnp.zeros_like(var[0]))
    tsn_in, tsn_all = sp.exclusive_prefix(tsn_element, sp._tsn_combine, tsn_identity, axis="sequence",
                                          size=devices, schedule=schedule)
    total = jnp.sum(cema_in[2]) + sum(jnp.sum(x[2] + x[3]) for x in (tsn_in, tsn_all))
    return total[None]

  spec = P("sequence")
  mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  grad = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(mapped(*a)), argnums=(0, 1, 2)))
  sharded = jax.sharding.NamedSharding(mesh, spec)
  keys = jax.random.split(jax.random.key(1), 3)
  h = jax.device_put(jax.random.normal(keys[0], (devices, rows, d, n, 2)), sharded)
  mean = jax.device_put(jax.random.normal(keys[1], (devices, rows, g)), sharded)
  var = jax.device_put(jax.random.uniform(keys[2], (devices, rows, g), minval=0.5, maxval=2.0), sharded)
  return grad, (h, mean, var)


def time_combine(step: Step, args: argparse.Namespace) -> dict[str, Any]:
  """combine_ms_per_layer (CEMA + TimestepNorm, forward and backward) at the row's shapes."""
  spec = step.spec
  fn, inputs = combine_program(step.config, spec.batch, spec.devices, spec.length // spec.devices,
                               args.sequence_combine)
  stats = harness.time_fn(fn, *inputs, warmup=3, iters=max(args.iters, 5), inner=10)
  return {"combine_ms_per_layer": stats["median_ms"]}


# --------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------

def base_row(spec: RowSpec) -> dict[str, Any]:
  return {"size": spec.size, "mode": spec.mode, "devices": spec.devices, "shape": f"{spec.batch}x{spec.length}",
          "remat": spec.remat}


def run_row(step: Step, args: argparse.Namespace, row: dict[str, Any]) -> dict[str, Any]:
  """Times a compiled step, filling in `row` as it goes. Raises on failure."""
  spec = step.spec
  row.update(model=step.model.name, impls=step.model.extra["impls"], n_params=step.model.extra["n_params"],
             mesh=sharding.describe(step.par.mesh), compile_s=step.compile_s)
  footprint = bench_train.compiled_bytes(step.compiled)
  if footprint is not None:
    row["mem_gib"] = footprint / 2**30
  capacity = bench_train.device_capacity_bytes()
  if footprint is not None and capacity is not None and footprint > capacity:
    raise MemoryError(f"RESOURCE_EXHAUSTED (predicted): the step needs {footprint / 2**30:.1f} GiB per device, "
                      f"the device has {capacity / 2**30:.1f} GiB")
  params, opt_state, batch = initial_state(step)
  metrics: dict[str, Any] = {}

  def train(state, batch):
    params, opt_state, out = step.compiled(*state, batch)
    metrics.setdefault("first_loss", out["loss"])
    metrics["last"] = out
    return (params, opt_state), out

  stats, state = harness.time_stateful(train, (params, opt_state), batch, warmup=args.warmup, iters=args.iters)
  del params, opt_state  # donated; `state` holds the live buffers
  loss = float(metrics["last"]["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss} after {args.warmup + args.iters} steps")
  counted = int(metrics["last"]["tokens"])
  if counted != spec.tokens:
    raise AssertionError(f"the step counted {counted} tokens, the batch holds {spec.tokens}")
  tok_s = harness.tokens_per_second(spec.tokens, stats["median_ms"])
  row.update(step_ms=stats["median_ms"], step_p10_ms=stats["p10_ms"], step_p90_ms=stats["p90_ms"],
             tokens_per_s=tok_s, tokens_per_s_per_gpu=tok_s / spec.devices,
             first_loss=float(metrics["first_loss"]), loss=loss)
  peak = allocator_peak_bytes(list(step.par.mesh.devices.flat))
  if peak is not None:
    row["peak_gib"] = peak / 2**30
  del state, batch
  if spec.mode != "data" and spec.devices > 1:
    row.update(time_combine(step, args))
    layers = step.config.num_layers
    row["combine_pct_of_step"] = 100.0 * layers * row["combine_ms_per_layer"] / row["step_ms"]
  return row


def measure(spec: RowSpec, args: argparse.Namespace, step: Step | BaseException | None = None
            ) -> list[dict[str, Any]]:
  """One row, or two when it runs out of memory and --oom-remat asks for a retry.

  step: a precompiled Step, the exception its compile raised, or None (build and compile here).
  """
  row, retry = base_row(spec), None
  print(f"-- {spec.label()}", flush=True)
  try:
    if isinstance(step, BaseException):
      raise step
    run_row(step or compile_step(build_step(spec, args)), args, row)
  except Exception as err:  # noqa: BLE001 - one failing row must not end the run
    if args.verbose:
      traceback.print_exception(err)
    row["error"] = ("OOM: " if bench_train.is_oom(err) else "") + bench_ops.failure(err)
    if bench_train.is_oom(err) and args.oom_remat and args.oom_remat != spec.remat:
      retry = args.oom_remat
  step = None  # drop the compiled executable before the next row
  bench_train.free_memory()
  rows = [row]
  print(row_line(row), flush=True)
  if retry:
    rows += measure(dataclasses.replace(spec, remat=retry), args)
  return rows


# --------------------------------------------------------------------------------------------
# Rows, efficiencies, the driver
# --------------------------------------------------------------------------------------------

def row_specs(args: argparse.Namespace) -> list[RowSpec]:
  """In order: per size, data rows (n ascending), sequence rows (per L, n ascending), long rows."""
  specs = []
  remat = lambda n: args.single_remat if n == 1 and args.single_remat else args.remat
  for size in args.sizes:
    if "data" in args.modes:
      specs += [RowSpec(size, "data", n, args.data_rows * n, args.data_length, remat(n)) for n in args.devices]
    if "sequence" in args.modes:
      specs += [RowSpec(size, "sequence", n, 1, length, remat(n)) for length in args.seq_lengths
                for n in args.devices]
  if "long" in args.modes:
    n = max(args.devices)
    specs += [RowSpec(args.long_size, "long", n, 1, length, args.long_remat) for length in args.long_lengths]
  return specs


def add_efficiency(rows: list[dict[str, Any]]) -> None:
  """efficiency = tokens/s per GPU over the n=1 row of the same size, mode and per-GPU shape
  (sequence: the same L), preferring a baseline with the same remat policy; and how far the
  first and last losses are from that row's (the same tokens and parameters)."""
  for row in rows:
    if "tokens_per_s" not in row:
      continue
    batch, length = (int(v) for v in row["shape"].split("x"))
    shape = f"{batch // row['devices'] if row['mode'] == 'data' else batch}x{length}"
    modes = ("sequence", "long") if row["mode"] in ("sequence", "long") else (row["mode"],)
    base = [r for r in rows if r["devices"] == 1 and r["size"] == row["size"] and r["mode"] in modes
            and r["shape"] == shape and "tokens_per_s" in r]
    if not base:
      continue
    same = [r for r in base if r["remat"] == row["remat"]]
    ref = (same or base)[0]
    row["efficiency"] = row["tokens_per_s_per_gpu"] / ref["tokens_per_s"]
    row["baseline_remat"] = ref["remat"]
    for key in ("first_loss", "loss"):
      row[f"{key}_rel_diff"] = abs(row[key] - ref[key]) / abs(ref[key])
    target = TARGET_EFFICIENCY.get(row["mode"])
    if target is not None and row["devices"] == TARGET_DEVICES:
      row["target"] = f"efficiency >= {target:.0%}"
      row["target_met"] = row["efficiency"] >= target


TABLE_COLUMNS = ("size", "mode", "devices", "shape", "remat", "step_ms", "tokens_per_s", "tokens_per_s_per_gpu",
                 "efficiency", "baseline_remat", "target", "target_met", "combine_ms_per_layer",
                 "combine_pct_of_step", "mem_gib", "peak_gib", "compile_s", "first_loss", "first_loss_rel_diff",
                 "loss_rel_diff", "error")


def row_line(row: dict[str, Any]) -> str:
  head = f"{row['size']:5s} {row['mode']:8s} n={row['devices']} {row['shape']:9s} remat={row['remat']}"
  if "error" in row:
    mem = f" (compiled step: {row['mem_gib']:.1f} GiB per device)" if "mem_gib" in row else ""
    return f"{head} | failed: {row['error']}{mem}"
  mem = f"{row['mem_gib']:.1f} GiB/GPU" if "mem_gib" in row else "-"
  combine = (f", combine {row['combine_ms_per_layer']:.3f} ms/layer ({row['combine_pct_of_step']:.1f}% of step)"
             if "combine_ms_per_layer" in row else "")
  return (f"{head} | {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:,.0f} tok/s "
          f"({row['tokens_per_s_per_gpu']:,.0f} per GPU), {mem}, compile {row['compile_s']} s, "
          f"first loss {row['first_loss']:.4f}{combine}")


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
  lines = []
  for row in rows:
    if "target_met" in row:
      note = "" if row["baseline_remat"] == row["remat"] else f" (n=1 measured with remat={row['baseline_remat']})"
      lines.append(f"target {row['size']} {row['mode']} {row['shape']} on {row['devices']} GPUs {row['target']}: "
                   f"{row['efficiency']:.1%} {'MET' if row['target_met'] else 'NOT met'}{note}")
  for row in rows:
    if row["mode"] == "long":
      state = f"ran, {row['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in row else f"failed: {row['error']}"
      mem = f", {row['mem_gib']:.1f} GiB per GPU" if "mem_gib" in row else ""
      lines.append(f"long {row['size']} 1x{row['shape'].split('x')[1]} over {row['devices']} GPUs, "
                   f"remat={row['remat']}: {state}{mem}")
  return lines


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--sizes", default="200M,1.3B", help="comma-separated subset of 200M,1.3B")
  parser.add_argument("--devices", default="1,2", help="device counts n; each row uses jax.devices()[:n]")
  parser.add_argument("--modes", default=None,
                      help=f"comma-separated subset of {','.join(MODES)} (default data,sequence; --smoke: all)")
  parser.add_argument("--data-rows", type=int, default=8, help="data parallel: rows per GPU")
  parser.add_argument("--data-length", type=int, default=4096, help="data parallel: tokens per row")
  parser.add_argument("--dp-axis", default="data", choices=("data", "fsdp"),
                      help="data: replicated parameters; fsdp: parameters and optimizer state sharded")
  parser.add_argument("--seq-lengths", default="32768,65536", help="sequence parallel: one sequence of L tokens")
  parser.add_argument("--long-size", default="1.3B", help="size of the long rows")
  parser.add_argument("--long-lengths", default="65536,131072", help="long rows: tokens, over all devices")
  parser.add_argument("--sequence-combine", default="all_gather", choices=sharding.rules.SEQUENCE_COMBINES)
  parser.add_argument("--remat", default="none", choices=mega_config.REMAT_POLICIES,
                      help="activation checkpointing of the data and sequence rows")
  parser.add_argument("--single-remat", default="", help="policy for rows on one device (default: --remat)")
  parser.add_argument("--long-remat", default="none", choices=mega_config.REMAT_POLICIES)
  parser.add_argument("--oom-remat", default="", help="retry a row that runs out of memory with this policy")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
  parser.add_argument("--cema-method", default="auto", choices=mega_config.CEMA_METHODS)
  parser.add_argument("--attention-impl", default="auto", choices=mega_config.ATTENTION_IMPLS)
  parser.add_argument("--timestep-norm-impl", default="auto", choices=mega_config.TIMESTEP_NORM_IMPLS)
  parser.add_argument("--learning-rate", type=float, default=1e-4)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=8)
  parser.add_argument("--compile-workers", type=int, default=1,
                      help="> 1: compile all rows first, this many at a time, then run them")
  parser.add_argument("--smoke", action="store_true", help="tiny model and shapes on CPU devices (seconds)")
  parser.add_argument("--results-dir", default=None)
  parser.add_argument("--name", default="scaling")
  parser.add_argument("--append", action="store_true",
                      help="keep the rows of today's results file of the same name (a row measured again replaces "
                           "its old version), so that several invocations fill one file")
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)
  for flag in ("single_remat", "oom_remat"):
    if getattr(args, flag) and getattr(args, flag) not in mega_config.REMAT_POLICIES:
      parser.error(f"--{flag.replace('_', '-')} must be one of {mega_config.REMAT_POLICIES}")
  args.size_table = SMOKE_SIZES if args.smoke else SIZES
  if args.smoke:  # tiny preset: chunks of 8, so every slice holds whole chunks
    args.sizes, args.long_size = "tiny", "tiny"
    args.data_rows, args.data_length = 2, 32
    args.seq_lengths, args.long_lengths = "64", "256"
    args.modes = args.modes or ",".join(MODES)
    args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
  args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
  unknown = set(args.sizes + [args.long_size]) - set(args.size_table)
  if unknown:
    parser.error(f"unknown sizes {sorted(unknown)}; choose from {sorted(args.size_table)}")
  args.modes = [m.strip() for m in (args.modes or "data,sequence").split(",") if m.strip()]
  if set(args.modes) - set(MODES):
    parser.error(f"--modes must be a subset of {MODES}")
  args.devices = sorted(set(_ints(args.devices)))
  args.seq_lengths, args.long_lengths = _ints(args.seq_lengths), _ints(args.long_lengths)
  # bench_train.megalodon_config reads these
  args.lower_only = False
  return args


def results_device() -> str:
  """'nvidia-h200x2' for the file name: the device kind and how many there are."""
  count = jax.device_count()
  return harness.device_kind() + (f"x{count}" if count > 1 else "")


def row_key(row: dict[str, Any]) -> tuple:
  return tuple(row[k] for k in ("size", "mode", "devices", "shape", "remat"))


def earlier_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  """The rows of today's file of this name and device, if there is one."""
  path = harness.results_path(args.name, results_dir=args.results_dir, device=results_device())
  if not path.exists():
    return []
  rows = json.loads(path.read_text())["rows"]
  print(f"appending to {path} ({len(rows)} rows)", flush=True)
  return rows


def precompile(specs: list[RowSpec], args: argparse.Namespace) -> list[Step | BaseException]:
  """Every row's step compiled, `--compile-workers` at a time (XLA compiles outside the GIL)."""
  def build(spec):
    try:
      return compile_step(build_step(spec, args))
    except Exception as err:  # noqa: BLE001 - reported by the row
      return err

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(args.compile_workers) as pool:
    steps = list(pool.map(build, specs))
  print(f"compiled {len(specs)} steps in {time.perf_counter() - start:.0f} s "
        f"({args.compile_workers} at a time)", flush=True)
  return steps


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  specs = row_specs(args)
  print(f"bench_scaling: {len(specs)} rows on {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}; warmup {args.warmup}, median of {args.iters} steps",
        flush=True)
  steps: list[Any] = [None] * len(specs)
  if args.compile_workers > 1:
    steps = precompile(specs, args)
  meta = {"scaling_settings": {k: v for k, v in vars(args).items() if k != "size_table"},
          "step": "harness.train_step_fn under jit with shardings (params / opt state donated), traced under "
                  "sharding.use(Parallelism(mesh, DEFAULT_RULES, sequence_combine))",
          "efficiency": "tokens/s per GPU over the n=1 row of the same size, mode and per-GPU shape",
          "targets": {f"{mode} on {TARGET_DEVICES} GPUs": f">= {t:.0%}" for mode, t in TARGET_EFFICIENCY.items()},
          "memory": "mem_gib: compiled step per device (arguments + outputs - aliases + temporaries); "
                    "peak_gib: allocator peak of the busiest device since the process started",
          "combine": "one CEMA + one TimestepNorm prefix combine, forward + backward (per layer)",
          "compile_s": "wall time of the row's compile; with compile_workers > 1 the rows compile concurrently"}
  rows = earlier_rows(args) if args.append else []
  for i, spec in enumerate(specs):
    step, steps[i] = steps[i], None
    new = measure(spec, args, step)
    keys = {row_key(r) for r in new}
    rows = [r for r in rows if row_key(r) not in keys] + new
    add_efficiency(rows)
    path = harness.write_results(args.name, rows, meta, results_dir=args.results_dir, print_table=False,
                                 device=results_device())
  print(f"\n== {args.name}: train-step scaling over {max(args.devices)} devices")
  print(harness.format_table([{k: r[k] for k in TABLE_COLUMNS if k in r} for r in rows]))
  print("\n".join(summary_lines(rows)))
  print(f"-> {path}", flush=True)
  return rows


if __name__ == "__main__":
  main()
