"""Whole training step: Megalodon against a Llama of the same size, measured in the same run.

Per row (model size x batch shape x architecture): tokens/s of one jitted train step (forward,
float32-logit cross-entropy, backward, global-norm clipping and AdamW, all in one program; bf16
compute, float32 parameters and optimizer state, layers under nn.scan), model FLOPs utilisation
(MFU) against the bf16 matmul peak measured at the start of this run and against the 989 TFLOP/s
datasheet figure, and memory. Both models use exactly the same step (harness.make_train_step),
optimizer (harness.adamw) and loss.

  Megalodon: megalodon_jax.model.MegalodonLM(config.preset("mega200M" | "mega1.3B")), kernels as
             config's "auto" picks them (Pallas CEMA, TimestepNorm and chunked attention on a GPU;
             the XLA TimestepNorm if kernels_pallas.timestep_norm is absent); the impls column says.
  Llama:     experiments.baselines.llama presets "llama200M" | "llama1.3B" (parameter counts within
             0.5%), cuDNN flash attention.

MFU uses model FLOPs per token: megalodon_jax.training.metrics.model_flops_per_token and the
Llama module's flops_per_token ("mfu_measured_peak_causal" counts Megalodon's attention the way
the Llama module counts its own: the causal half of each chunk). Memory: "mem_gib" is what XLA's buffer assignment of the compiled
step holds (arguments + outputs - donated aliases + temporaries), a per-row peak independent of
earlier rows; "live_gib" is the allocator's bytes in use with the row's state resident.

Every row compiles its own step; arrays and caches are dropped between rows. A row that fails
prints "failed: <reason>" and the run goes on; with --oom-remat POLICY a row that runs out of
memory is retried with that activation-checkpointing policy (labelled in the remat column).
Results are rewritten to experiments/results/<date>_<device>_train.json after every row.

  python -m experiments.benchmarks.bench_train                            # both sizes, both shapes
  python -m experiments.benchmarks.bench_train --sizes 1.3B --shapes 1x32768 --remat dots
  python -m experiments.benchmarks.bench_train --smoke                    # tiny models on the CPU
  python -m experiments.benchmarks.bench_train --lower-only               # trace + lower full sizes, no run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import math
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp

from experiments.baselines import llama as llama_lib
from experiments.benchmarks import bench_ops, floors, harness
from megalodon_jax import config as mega_config
from megalodon_jax.ops import backend
from megalodon_jax.training import metrics as mega_metrics

ARCHS = ("llama", "megalodon")
SIZES = {"200M": ("mega200M", "llama200M"), "1.3B": ("mega1.3B", "llama1.3B")}
SMOKE_SIZES = {"tiny": ("tiny", "tiny")}
DATASHEET_TFLOPS = 989.0  # H100/H200 SXM dense bf16

# Released Megalodon throughput (tokens/s) and this project's targets, keyed by (size, (B, L)).
RELEASED_TOKENS_PER_S = {
    ("200M", (8, 4096)): 171_401, ("200M", (1, 32768)): 126_162,
    ("1.3B", (8, 4096)): 40_874, ("1.3B", (1, 32768)): 32_050,
}
TARGET_TOKENS_PER_S = {("1.3B", (1, 32768)): 48_000, ("1.3B", (8, 4096)): 49_000, ("200M", (1, 32768)): 252_000}
TARGET_MEGA_OVER_LLAMA_LONG = 1.32  # at 32K tokens per sequence
LONG_CONTEXT = 32768
TARGET_LLAMA_MFU = 0.5  # of the measured matmul peak at 8x4096: the baseline is a fair one
LLAMA_FAIRNESS_SHAPE = (8, 4096)


@dataclasses.dataclass(frozen=True)
class RowSpec:
  size: str
  arch: str
  batch: int
  length: int
  remat: str


@dataclasses.dataclass
class Model:
  """What a row needs from either architecture."""
  name: str
  init: Callable[[jax.Array], Any]  # rng -> params (run under jit)
  apply: Callable[[Any, jax.Array], jax.Array]  # (params, tokens [B, L]) -> float32 logits [B, L, V]
  vocab_size: int
  flops_per_token: float
  extra: dict[str, Any]  # implementation choices, parameter count, config


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def _kernel_available(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


def scan_layers(args: argparse.Namespace) -> bool:
  """--scan-layers; scanned when the caller's namespace has no such option (bench_scaling)."""
  return getattr(args, "scan_layers", "true") == "true"


def megalodon_config(preset: str, spec: RowSpec, args: argparse.Namespace) -> mega_config.MegalodonConfig:
  """The preset with bf16 compute, float32 parameters, scanned (or unrolled) layers and the chosen kernels.

  'auto' TimestepNorm falls back to the XLA path when kernels_pallas.timestep_norm is not
  installed, so the row still runs (the impls column says which ran).
  """
  tsn = args.timestep_norm_impl
  if tsn == "auto" and backend.has_accelerator() and not _kernel_available("kernels_pallas.timestep_norm"):
    tsn = "xla"
  return mega_config.preset(preset, dtype=args.dtype, param_dtype="float32", scan_layers=scan_layers(args),
                            remat_policy=spec.remat, cema_method=args.cema_method,
                            attention_impl=args.attention_impl, timestep_norm_impl=tsn)


def megalodon_impls(cfg: mega_config.MegalodonConfig) -> str:
  """Which implementation each op resolves to on this backend, e.g. 'cema=pallas tsn=pallas attn=pallas'."""
  attn = cfg.attention_impl
  if attn == "auto":
    attn = "pallas" if backend.has_accelerator() and _kernel_available("kernels_pallas.chunk_attention") else "xla"
  return (f"cema={backend.cema_method(cfg.cema_method)} "
          f"tsn={backend.timestep_norm_method(cfg.timestep_norm_impl)} attn={attn}")


def megalodon_matmul_params(cfg: mega_config.MegalodonConfig) -> int:
  """Weights that take part in a matmul per token (the Llama module's convention): the block
  projections wz, wv, wr, wh1, wh2, the FFN and the output head (the tied embedding counts once,
  as the head; an untied input embedding is a gather and does not count)."""
  d, z, v, f = cfg.model_dim, cfg.z_dim, cfg.value_dim, cfg.ffn_hidden_dim
  per_layer = d * z + 2 * d * v + d * d + v * d + (3 if cfg.swiglu else 2) * d * f
  return cfg.num_layers * per_layer + cfg.vocab_size * d


def megalodon_flops_per_token_causal(cfg: mega_config.MegalodonConfig, seq_len: int) -> float:
  """Training FLOPs per token counted exactly as llama.flops_per_token counts the baseline's.

  6 per matmul weight; attention inside chunks of C: a query sees (C + 1) / 2 keys on average, so
  the forward pass does about 2 Z C / 2 FLOPs for q.k and 2 V C / 2 for p.v per token and layer,
  3x that for training; CEMA as training.metrics counts it (10 FLOPs per (token, d, n) forward).
  """
  chunk = min(seq_len, cfg.chunk_size)
  attention_fwd = cfg.num_layers * (cfg.z_dim + cfg.value_dim) * chunk
  cema_fwd = cfg.num_layers * 10 * cfg.model_dim * cfg.cema_ndim
  return 6.0 * megalodon_matmul_params(cfg) + 3.0 * (attention_fwd + cema_fwd)


def build_megalodon(preset: str, spec: RowSpec, args: argparse.Namespace) -> Model:
  from megalodon_jax.model import MegalodonLM, init_params
  cfg = megalodon_config(preset, spec, args)
  module = MegalodonLM(cfg)
  # Initialise through the XLA paths: same parameters, and no kernel is compiled for the short
  # init sequence.
  init_cfg = cfg.replace(cema_method="chunked", attention_impl="xla", timestep_norm_impl="xla")
  return Model(
      name=preset,
      init=lambda rng: init_params(init_cfg, rng),
      apply=lambda params, tokens: module.apply({"params": params}, tokens),
      vocab_size=cfg.vocab_size,
      flops_per_token=mega_metrics.model_flops_per_token(cfg, spec.length),
      extra={"impls": megalodon_impls(cfg), "n_params": mega_config.count_params(cfg),
             "flops_per_token_causal": megalodon_flops_per_token_causal(cfg, spec.length),
             "config": cfg.to_dict()})


def build_llama(preset: str, spec: RowSpec, args: argparse.Namespace) -> Model:
  cfg = llama_lib.preset(preset, dtype=args.dtype, param_dtype="float32", scan_layers=scan_layers(args),
                         remat_policy=spec.remat, attention_impl=args.llama_attention)
  module = llama_lib.Llama(cfg)
  init_module = llama_lib.Llama(cfg.replace(attention_impl="xla"))  # same parameters, no cuDNN at init
  init_tokens = jnp.zeros((1, 8), jnp.int32)
  return Model(
      name=preset,
      init=lambda rng: init_module.init(rng, init_tokens)["params"],
      apply=lambda params, tokens: module.apply({"params": params}, tokens),
      vocab_size=cfg.vocab_size,
      flops_per_token=llama_lib.flops_per_token(cfg, spec.length),
      extra={"impls": f"attn={llama_lib.resolve_attention_impl(cfg)}", "n_params": llama_lib.count_params(cfg),
             "config": cfg.to_dict()})


def build_model(spec: RowSpec, args: argparse.Namespace) -> Model:
  mega_preset, llama_preset = args.size_table[spec.size]
  if spec.arch == "megalodon":
    return build_megalodon(mega_preset, spec, args)
  return build_llama(llama_preset, spec, args)


def llama_policy(policy: str) -> str:
  """Llama has no CEMA to save; its nearest policy to save_cema_attention is recomputing everything,
  and to recompute_elementwise (no costly recomputation) storing everything."""
  if policy == "recompute_elementwise":
    return "none"
  return policy if policy in llama_lib.REMAT_POLICIES else "full"


# --------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------

def compiled_bytes(compiled: Any) -> int | None:
  """Device bytes an executable holds while it runs: arguments + outputs - donated aliases + temps."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def device_capacity_bytes() -> int | None:
  stats = None
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    pass
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def is_oom(err: BaseException) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or isinstance(err, MemoryError)


def make_batch(spec: RowSpec, vocab_size: int) -> dict[str, jax.Array]:
  """Hashed token ids: inputs [B, L] and targets (the next token) [B, L]."""
  def build():
    tokens = bench_ops.noise_tokens(spec.length, (spec.batch, spec.length + 1), vocab_size)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  return jax.jit(build)()


def abstract_batch(spec: RowSpec) -> dict[str, jax.ShapeDtypeStruct]:
  shape = jax.ShapeDtypeStruct((spec.batch, spec.length), jnp.int32)
  return {"inputs": shape, "targets": shape}


def base_row(spec: RowSpec) -> dict[str, Any]:
  return {"size": spec.size, "arch": spec.arch, "shape": f"{spec.batch}x{spec.length}", "remat": spec.remat}


def run_row(spec: RowSpec, args: argparse.Namespace, row: dict[str, Any]) -> dict[str, Any]:
  """Builds, compiles and times one configuration, filling in `row` as it goes (so a failure
  still leaves e.g. the compiled memory footprint). Raises on failure; the caller records it."""
  model = build_model(spec, args)
  row.update(model=model.name, impls=model.extra["impls"], n_params=model.extra["n_params"])
  optimizer = harness.adamw(args.learning_rate)
  step = harness.make_train_step(model.apply, optimizer)
  if args.lower_only:
    params = jax.eval_shape(model.init, jax.random.key(0))
    opt_state = jax.eval_shape(optimizer.init, params)
    start = time.perf_counter()
    text = step.lower(params, opt_state, abstract_batch(spec)).as_text()
    row.update(lowered_kib=len(text) // 1024, lower_s=round(time.perf_counter() - start, 1))
    return row

  params = jax.jit(model.init)(jax.random.key(0))
  opt_state = jax.jit(optimizer.init)(params)
  batch = make_batch(spec, model.vocab_size)
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, batch).compile()
  row["compile_s"] = round(time.perf_counter() - start, 1)
  footprint = compiled_bytes(compiled)
  if footprint is not None:
    row["mem_gib"] = footprint / 2**30
  capacity = device_capacity_bytes()
  if footprint is not None and capacity is not None and footprint > capacity:
    raise MemoryError(f"RESOURCE_EXHAUSTED (predicted): the step needs {footprint / 2**30:.1f} GiB, "
                      f"the device has {capacity / 2**30:.1f} GiB")

  last: dict[str, Any] = {}

  def train(state, batch):
    params, opt_state, metrics = compiled(*state, batch)
    last["metrics"] = metrics
    return (params, opt_state), metrics

  stats, state = harness.time_stateful(train, (params, opt_state), batch, warmup=args.warmup, iters=args.iters)
  del params, opt_state  # donated; `state` holds the live buffers
  loss = float(last["metrics"]["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss} after {args.warmup + args.iters} steps")
  live = harness.memory_in_use_bytes()
  tokens = spec.batch * spec.length
  tok_s = harness.tokens_per_second(tokens, stats["median_ms"])
  row.update(step_ms=stats["median_ms"], step_p10_ms=stats["p10_ms"], step_p90_ms=stats["p90_ms"], tokens_per_s=tok_s,
             loss=loss, flops_per_token=model.flops_per_token,
             model_tflops=model.flops_per_token * tok_s / 1e12)
  if live is not None:
    row["live_gib"] = live / 2**30
  if "flops_per_token_causal" in model.extra:
    row["flops_per_token_causal"] = model.extra["flops_per_token_causal"]
  del state, compiled, batch
  return row


def add_derived(row: dict[str, Any], matmul_tflops: float | None) -> None:
  """MFU against both peaks, released numbers and targets of one measured row."""
  if "tokens_per_s" not in row:
    return
  key = (row["size"], tuple(int(v) for v in row["shape"].split("x")))
  row["mfu_989"] = row["model_tflops"] / DATASHEET_TFLOPS
  if matmul_tflops:
    row["mfu_measured_peak"] = row["model_tflops"] / matmul_tflops
    if "flops_per_token_causal" in row:
      row["mfu_measured_peak_causal"] = row["flops_per_token_causal"] * row["tokens_per_s"] / 1e12 / matmul_tflops
  if row["arch"] == "megalodon":
    released = RELEASED_TOKENS_PER_S.get(key)
    if released:
      row["released_tokens_per_s"] = released
      row["x_released"] = row["tokens_per_s"] / released
    target = TARGET_TOKENS_PER_S.get(key)
    if target:
      row["target"] = f">= {target:,} tok/s"
      row["target_met"] = row["tokens_per_s"] >= target
      row["of_target"] = row["tokens_per_s"] / target
  elif key[1] == LLAMA_FAIRNESS_SHAPE and matmul_tflops:
    row["target"] = f"MFU >= {TARGET_LLAMA_MFU:.0%} of measured peak"
    row["target_met"] = row["mfu_measured_peak"] >= TARGET_LLAMA_MFU


def add_ratios(rows: list[dict[str, Any]]) -> None:
  """mega_over_llama on each Megalodon row: its tokens/s over the Llama row of the same size and shape."""
  for row in rows:
    if row["arch"] != "megalodon" or "tokens_per_s" not in row:
      continue
    llama = [r for r in rows if r["arch"] == "llama" and r["size"] == row["size"] and r["shape"] == row["shape"]
             and "tokens_per_s" in r]
    if not llama:
      continue
    ratio = row["tokens_per_s"] / max(r["tokens_per_s"] for r in llama)
    row["mega_over_llama"] = ratio
    if int(row["shape"].split("x")[1]) == LONG_CONTEXT:
      row["target_ratio_met"] = ratio >= TARGET_MEGA_OVER_LLAMA_LONG


def measure(spec: RowSpec, args: argparse.Namespace) -> list[dict[str, Any]]:
  """One row, or two when it runs out of memory and --oom-remat asks for a retry."""
  retry = None
  row = base_row(spec)
  try:
    run_row(spec, args, row)
  except Exception as err:  # noqa: BLE001 - one failing row must not end the run
    if args.verbose:
      traceback.print_exc()
    row["error"] = ("OOM: " if is_oom(err) else "") + bench_ops.failure(err)
    policy = args.oom_remat if spec.arch == "megalodon" else llama_policy(args.oom_remat or "none")
    if is_oom(err) and args.oom_remat and policy != spec.remat:
      retry = policy
  # Outside the except clause: the error's traceback (and the failed row's arrays) are released.
  free_memory()
  rows = [row]
  if retry:
    rows += measure(dataclasses.replace(spec, remat=retry), argparse.Namespace(**{**vars(args), "oom_remat": ""}))
  return rows


def free_memory() -> None:
  jax.clear_caches()
  gc.collect()


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("size", "arch", "shape", "remat", "impls", "step_ms", "tokens_per_s", "model_tflops",
                 "mfu_measured_peak", "mfu_measured_peak_causal", "mfu_989", "mem_gib", "compile_s",
                 "released_tokens_per_s", "x_released", "mega_over_llama", "target", "target_met", "of_target",
                 "target_ratio_met", "error", "lowered_kib")


def summary_lines(rows: list[dict[str, Any]], matmul_tflops: float | None) -> list[str]:
  lines = []
  for row in rows:
    if "mega_over_llama" in row:
      long = int(row["shape"].split("x")[1]) == LONG_CONTEXT
      goal = f" (target >= {TARGET_MEGA_OVER_LLAMA_LONG})" if long else ""
      lines.append(f"Megalodon/Llama {row['size']} {row['shape']}: {row['mega_over_llama']:.3f}x{goal}")
  for row in rows:
    if "target_met" in row:
      short = "" if row["target_met"] or "of_target" not in row else (
          f" ({row['tokens_per_s']:,.0f} tok/s is {row['of_target']:.1%} of it; "
          f"{1 / row['of_target'] - 1:.1%} short)")
      lines.append(f"target {row['arch']} {row['size']} {row['shape']} {row['target']}: "
                   f"{'MET' if row['target_met'] else 'NOT met'}{short}")
  if matmul_tflops:
    lines.append(f"measured bf16 matmul peak: {matmul_tflops:.1f} TFLOP/s (datasheet {DATASHEET_TFLOPS:.0f})")
  lines.append("MFU: Megalodon from training.metrics.model_flops_per_token, which counts chunk attention as "
               "2 (Z+V) C FLOPs per token and layer forward (every query against the whole chunk); Llama's "
               "flops_per_token counts the causal half. mfu_measured_peak_causal counts Megalodon the Llama way.")
  return lines


def row_specs(args: argparse.Namespace) -> list[RowSpec]:
  specs = []
  for size in args.sizes:
    for batch, length in args.shapes:
      for arch in args.archs:
        remat = args.remat if arch == "megalodon" else (args.llama_remat or llama_policy(args.remat))
        specs.append(RowSpec(size, arch, batch, length, remat))
  return specs


def _parse_shape(text: str) -> tuple[int, int]:
  try:
    batch, length = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"shape {text!r} must look like BATCHxLENGTH, e.g. 8x4096") from None
  return batch, length


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--sizes", default="200M,1.3B", help="comma-separated subset of 200M,1.3B")
  parser.add_argument("--shapes", default="8x4096,1x32768", help="comma-separated BATCHxLENGTH")
  parser.add_argument("--archs", default="llama,megalodon", help="comma-separated subset of llama,megalodon")
  parser.add_argument("--remat", default="none", choices=mega_config.REMAT_POLICIES,
                      help="Megalodon activation checkpointing policy (config.remat_policy)")
  parser.add_argument("--llama-remat", default=None, choices=llama_lib.REMAT_POLICIES,
                      help="Llama policy (default: --remat, or 'full' where Llama lacks it)")
  parser.add_argument("--oom-remat", default="", help="retry a row that runs out of memory with this policy")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
  parser.add_argument("--cema-method", default="auto", choices=mega_config.CEMA_METHODS)
  parser.add_argument("--attention-impl", default="auto", choices=mega_config.ATTENTION_IMPLS)
  parser.add_argument("--timestep-norm-impl", default="auto", choices=mega_config.TIMESTEP_NORM_IMPLS)
  parser.add_argument("--llama-attention", default="auto", choices=llama_lib.ATTENTION_IMPLS)
  parser.add_argument("--scan-layers", default="true", choices=["true", "false"],
                      help="both models: layers as one lax.scan (fast compile; XLA copies each layer's saved "
                           "activations in and out of stacked buffers) or unrolled (each its own buffer)")
  parser.add_argument("--learning-rate", type=float, default=1e-4)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=8)
  parser.add_argument("--matmul-n", type=int, default=8192)
  parser.add_argument("--smoke", action="store_true", help="tiny models and shapes on the CPU (seconds)")
  parser.add_argument("--lower-only", action="store_true", help="trace and lower every row's step (no device work)")
  parser.add_argument("--results-dir", default=None)
  parser.add_argument("--name", default="train")
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)
  if args.oom_remat and args.oom_remat not in mega_config.REMAT_POLICIES:
    parser.error(f"--oom-remat must be one of {mega_config.REMAT_POLICIES}")
  args.size_table = SMOKE_SIZES if args.smoke else SIZES
  if args.smoke:
    args.sizes, args.shapes = "tiny", args.shapes if args.shapes != "8x4096,1x32768" else "2x16,1x32"
    args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
  args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
  unknown = set(args.sizes) - set(args.size_table)
  if unknown:
    parser.error(f"--sizes: unknown {sorted(unknown)}; choose from {sorted(args.size_table)}")
  args.shapes = [_parse_shape(s) for s in args.shapes.split(",") if s.strip()]
  args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
  if set(args.archs) - set(ARCHS):
    parser.error(f"--archs must be a subset of {ARCHS}")
  return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  specs = row_specs(args)
  print(f"bench_train: {len(specs)} rows on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}; warmup {args.warmup}, median of {args.iters} steps", flush=True)
  matmul = None
  if not args.lower_only:
    n = 256 if args.smoke else args.matmul_n
    matmul = floors.measure_matmul_peak(n, warmup=2, iters=5 if args.smoke else 10)
    print(f"measured bf16 matmul peak ({n}^3): {matmul['tflops']:.1f} TFLOP/s", flush=True)
  peak = matmul["tflops"] if matmul else None
  meta = {"train_settings": {k: v for k, v in vars(args).items() if k != "size_table"},
          "matmul_peak_tflops": peak, "datasheet_tflops": DATASHEET_TFLOPS,
          "step": "harness.make_train_step: value_and_grad of float32 cross-entropy, clip 1.0 + AdamW "
                  "(b2 0.98, wd 0.1 on matrices), params/opt state donated",
          "timing": "median of iters steps after warmup steps (each waited for)"}
  rows: list[dict[str, Any]] = []
  for spec in specs:
    for row in measure(spec, args):
      add_derived(row, peak)
      rows.append(row)
      add_ratios(rows)
      print(_row_line(row), flush=True)
      harness.write_results(args.name, rows, meta, results_dir=args.results_dir, print_table=False)
  path = harness.write_results(args.name, rows, meta, results_dir=args.results_dir, print_table=False)
  print(f"\n== {args.name}: train step, Megalodon vs Llama of the same size (same step, optimizer, loss)")
  print(harness.format_table([{k: r[k] for k in TABLE_COLUMNS if k in r} for r in rows]))
  print("\n".join(summary_lines(rows, peak)))
  print(f"-> {path}", flush=True)
  return rows


def _row_line(row: dict[str, Any]) -> str:
  head = f"{row['arch']:9s} {row['size']:5s} {row['shape']:8s} remat={row['remat']}"
  if "error" in row:
    return f"{head} | failed: {row['error']}"
  if "lowered_kib" in row:
    return f"{head} | {row['impls']} | lowered ({row['lowered_kib']} KiB of StableHLO, {row['lower_s']} s)"
  mfu = f"{row['mfu_measured_peak']:.1%}" if "mfu_measured_peak" in row else "-"
  mem = f"{row['mem_gib']:.1f} GiB" if "mem_gib" in row else "-"
  return (f"{head} | {row['impls']} | {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:,.0f} tok/s, "
          f"MFU {mfu} of measured peak, {mem}, compile {row['compile_s']} s, loss {row['loss']:.3f}")


if __name__ == "__main__":
  main()
