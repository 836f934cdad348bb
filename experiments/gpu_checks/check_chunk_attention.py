"""GPU check of the Pallas chunked-attention kernel against the XLA path: errors and timings.

Default shape (SPEC presets): B=1, 16 chunks of 2048, 4 heads, dk 256, dv 2048, bfloat16.
Target on one H200: kernel fwd+bwd <= 3.8 ms (XLA path ~9.8 ms, the released CUDA kernel 5.76 ms).

  python experiments/gpu_checks/check_chunk_attention.py             # errors + fwd, fwd+bwd timings
  python experiments/gpu_checks/check_chunk_attention.py --profile   # + time of every kernel stage
  python experiments/gpu_checks/check_chunk_attention.py --sweep --parallel 12 --json "$OUT/sweep.json"
      # every tiling in SWEEP in its own process: they compile side by side, then each times
      # alone (a file lock) its errors, fwd, fwd+bwd and every stage; logs/JSON next to the JSON
  python experiments/gpu_checks/check_chunk_attention.py --configs default s_first_128x256
  python experiments/gpu_checks/check_chunk_attention.py --cpu       # tiny shapes, interpret mode

Errors: the kernel (in the input dtype) against a float32 XLA reference computed from the same
inputs: max |a - ref| / max |ref| per output; the XLA path in the input dtype, for scale, is in
the plain run. FLOPs count the causal half of every chunk (C^2/2 query-key pairs per chunk and
head): forward 2 (dk + dv) per pair, backward 2 (3 dk + 2 dv) per pair.

Timings: a function is dispatched --iters times back to back and waited for once (median of 3
such rounds), so the per-call dispatch overhead of the small stage functions is hidden behind
the GPU work and stage times add up to the whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks import harness  # noqa: E402
from kernels_pallas import chunk_attention as ca  # noqa: E402
from megalodon_jax.ops import attention as xla_attention  # noqa: E402

TARGET_FWD_BWD_MS = 3.8
KNOBS = tuple(f.name for f in dataclasses.fields(ca.KernelConfig))

# Tilings tried by --sweep: KernelConfig overrides (names are stable: JSON keys, --configs).
_BWD_WIDE = dict(bwd_block_k=256, bwd_mm_block_k=128, bwd_order="s_first", tiles_warps=16)
SWEEP = {
    "default": {},
    "online_scores": dict(fwd_scores="online", block_k=64),  # the forward before 2026-11-28
    # the default before 2026-11-29 (the combo below became the default)
    "previous_default": dict(fwd_scores="twopass", block_k=64, mm_block_k=64, tiles_stages=3),
    "scores_128x128_w8": dict(block_k=128, mm_block_k=64, scores_warps=8),
    "scores_w8": dict(scores_warps=8),
    "tiles_s_first_128x256_w16_s2": dict(_BWD_WIDE, tiles_stages=2),
    "tiles_s_first_128x256_w16_s3": dict(_BWD_WIDE, tiles_stages=3),
    "tiles_s_first_256x128_w16_s2": dict(bwd_block_q=256, bwd_mm_block_q=128, bwd_order="s_first",
                                         tiles_warps=16, tiles_stages=2),
    "tiles_stages4": dict(tiles_stages=4),
    "tiles_block_c128_s2": dict(block_c=128, tiles_stages=2),
    "matmul_stages4": dict(matmul_stages=4),
    "bounded_scores": dict(fwd_scores="bounded"),
    "delta_pallas": dict(delta_impl="pallas"),
    # Mosaic GPU kernels (the Hopper default of 'auto' since 2026-11-30) one at a time, all, and none
    "mgpu_matmul": dict(matmul_impl="mgpu", tiles_impl="triton", scores_impl="triton"),
    "mgpu_tiles": dict(matmul_impl="triton", tiles_impl="mgpu", scores_impl="triton"),
    "mgpu_scores": dict(matmul_impl="triton", tiles_impl="triton", scores_impl="mgpu"),
    "mgpu_all": dict(matmul_impl="mgpu", tiles_impl="mgpu", scores_impl="mgpu"),
    "triton_all": dict(matmul_impl="triton", tiles_impl="triton", scores_impl="triton"),
    # Combinations of the 2026-11-29 sweep's best stages (scores: bounded and 128x128 tiles on 8
    # warps; backward tiles: 4 pipeline stages).
    "combo": dict(fwd_scores="bounded", block_k=128, mm_block_k=64, scores_warps=8, tiles_stages=4),
    "combo_twopass": dict(block_k=128, mm_block_k=64, scores_warps=8, tiles_stages=4),
    "combo_tiles_s3": dict(fwd_scores="bounded", block_k=128, mm_block_k=64, scores_warps=8,
                           tiles_stages=3),
    "combo_matmul_s4": dict(fwd_scores="bounded", block_k=128, mm_block_k=64, scores_warps=8,
                            tiles_stages=4, matmul_stages=4),
    "tiles_stages5": dict(tiles_stages=5),
}
CPU_TILES = dict(block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=16)
CPU_SWEEP = {
    "default": {},
    "online_scores": dict(fwd_scores="online"),
    "mm_tiles_s_first": dict(block_q=32, block_k=32, mm_block_q=16, mm_block_k=16, bwd_block_k=32,
                             bwd_mm_block_k=16, bwd_order="s_first", block_r=16),
}


# ----------------------------------------------------------------------------------------------
# Arguments, inputs, functions


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cpu", action="store_true", help="tiny shapes, kernels in interpret mode")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--chunks", type=int, default=None)
  parser.add_argument("--chunk-size", type=int, default=None)
  parser.add_argument("--heads", type=int, default=None)
  parser.add_argument("--dk", type=int, default=None)
  parser.add_argument("--dv", type=int, default=None)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  parser.add_argument("--segments", action="store_true", help="also pass packed-sequence segment ids")
  parser.add_argument("--iters", type=int, default=None, help="calls per timing round (3 rounds, median)")
  parser.add_argument("--profile", action="store_true", help="time every kernel stage separately")
  parser.add_argument("--sweep", action="store_true", help="time every tiling in SWEEP (with stages)")
  parser.add_argument("--configs", nargs="*", default=None, help="names from SWEEP to time (with stages)")
  parser.add_argument("--parallel", type=int, default=0,
                      help="one process per configuration, this many at once: compile side by side, "
                           "time one at a time")
  parser.add_argument("--deadline", type=float, default=170.0,
                      help="--parallel: seconds after which configurations still compiling are dropped")
  parser.add_argument("--json", default=None, help="write all numbers to this file")
  parser.add_argument("--skip-checks", action="store_true", help="no errors against the reference")
  parser.add_argument("--no-stages", action="store_true",
                      help="--configs/--sweep: only fwd and fwd+bwd (fewer compilations)")
  parser.add_argument("--no-xla", action="store_true", help="skip the XLA path's timings")
  parser.add_argument("--timing-lock", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--go-file", default=None, help=argparse.SUPPRESS)
  for knob in KNOBS:
    kind = str if knob in ("fwd_impl", "fwd_scores", "bwd_order", "delta_impl") else int
    parser.add_argument("--" + knob.replace("_", "-"), type=kind, default=None)
  args = parser.parse_args(argv)
  defaults = dict(batch=1, chunks=2, chunk_size=32, heads=2, dk=16, dv=32, iters=2) if args.cpu else \
      dict(batch=1, chunks=16, chunk_size=2048, heads=4, dk=256, dv=2048, iters=10)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def config_for(args, overrides: dict) -> ca.KernelConfig:
  """Command-line knobs, then the named overrides (CPU runs get tiles that fit the tiny shapes)."""
  knobs = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
  if args.cpu:
    knobs = {**CPU_TILES, **knobs}
  return ca.KernelConfig(**{**knobs, **overrides})


def make_inputs(args):
  """Scores of order 1 (as after Megalodon's normalised q, k), v and the output cotangent ~ N(0, 1)."""
  dtype = jnp.dtype(args.dtype)
  length = args.chunks * args.chunk_size
  keys = jax.random.split(jax.random.key(0), 5)
  shape_qk = (args.batch, length, args.heads, args.dk)
  shape_v = (args.batch, length, args.heads, args.dv)
  q = (jax.random.normal(keys[0], shape_qk) * args.dk ** -0.25).astype(dtype)
  k = (jax.random.normal(keys[1], shape_qk) * args.dk ** -0.25).astype(dtype)
  v = jax.random.normal(keys[2], shape_v).astype(dtype)
  d_out = jax.random.normal(keys[3], shape_v).astype(dtype)
  segment_ids = None
  if args.segments:  # a few packed documents per row
    boundaries = jax.random.uniform(keys[4], (args.batch, length)) < 4.0 / length
    segment_ids = jnp.cumsum(boundaries, axis=1).astype(jnp.int32)
  return q, k, v, d_out, segment_ids


def kernel_fn(args, config):
  return lambda q, k, v, s: ca.chunk_attention(q, k, v, segment_ids=s, config=config, chunk_size=args.chunk_size,
                                               interpret=True if args.cpu else None)


def xla_fn(args):
  return lambda q, k, v, s: xla_attention.chunked_attention_xla(q, k, v, segment_ids=s, chunk_size=args.chunk_size)


def fwd_bwd(attention):
  def run(q, k, v, s, d_out):
    out, vjp = jax.vjp(lambda a, b, c: attention(a, b, c, s), q, k, v)
    return (out, *vjp(d_out))
  return run


def flop_counts(args) -> tuple[float, float]:
  pairs = args.batch * args.heads * args.chunks * args.chunk_size ** 2 / 2
  fwd = 2 * pairs * (args.dk + args.dv)
  bwd = 2 * pairs * (3 * args.dk + 2 * args.dv)
  return fwd, fwd + bwd


# ----------------------------------------------------------------------------------------------
# Timing (a file lock keeps the processes of a --parallel sweep from timing at the same time)

_TIMING_LOCK: str | None = None


def timing_lock():
  return harness.exclusive_file_lock(_TIMING_LOCK)


def timed(fn, *fn_args, iters: int, rounds: int = 3) -> float:
  """ms per call: `iters` calls dispatched back to back, one wait; median over `rounds` (after a warm-up)."""
  jax.block_until_ready(fn(*fn_args))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*fn_args)  # the previous result is freed here: memory stays at one call's outputs
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / iters)
  return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# One configuration: errors, whole-op timings, stage timings


def stage_functions(args, config, inputs) -> list[tuple[str, object, tuple, int | None]]:
  """(name, jitted fn, its arguments, feature width for a FLOP rate) of every GPU kernel stage.

  Uses the kernel module's private helpers so that every stage runs exactly as inside the op.
  """
  q, k, v, d_out, seg = inputs
  plan = ca._triton_plan(dataclasses.replace(config, fwd_impl="blocks"), args.cpu, 1.0, args.batch, args.heads,
                         args.chunks, args.chunk_size, args.chunk_size, args.dk, args.dv, q.dtype)
  mm_plan = dataclasses.replace(plan, geom=plan.mm_geom)
  bwd_mm_plan = dataclasses.replace(plan, geom=plan.bwd_mm_geom)
  scores = jax.jit(lambda q, k, s: ca._tr_scores(plan, q, k, v.dtype, s))
  p_buf, stats, lse = scores(q, k, seg)
  mgpu = lambda m, x: ca._mgpu_takes(plan, plan.geom if m is p_buf else plan.bwd_geom, m, x)  # noqa: E731
  if plan.fwd_scores != "online" and mgpu(p_buf, v):
    pv = jax.jit(lambda p, x, r: ca._mgpu_block_matmul(p, x, r, plan.geom, transpose_m=False))
    pv_args = (p_buf, v, stats)
  elif plan.fwd_scores != "online":
    pv = jax.jit(lambda p, x, r: ca._tr_block_matmul(mm_plan, p, x, None, None, v.dtype, rscale=r))
    pv_args = (p_buf, v, stats)
  else:
    pv = jax.jit(lambda p, x, m, l: ca._tr_block_matmul(mm_plan, p, x, m, l, v.dtype))
    pv_args = (p_buf, v, stats, lse)
  out = pv(*pv_args)
  delta_fn = jax.jit(lambda o, do: ca._tr_delta(plan, o, do) if plan.delta_impl == "pallas" else ca._delta(o, do))
  delta = delta_fn(out, d_out)
  tiles = jax.jit(lambda *a: ca._bwd_tiles(plan, *a))  # Triton or Mosaic GPU, as inside the op
  p_bwd, ds_buf = tiles(q, k, v, seg, lse, delta, d_out)
  def bwd_matmul(transpose_m, dtype):
    if mgpu(p_bwd, d_out):  # the backward's tile buffers have one shape: p_bwd stands for both
      return jax.jit(lambda m, x: ca._mgpu_block_matmul(m, x, None, plan.bwd_geom, transpose_m=transpose_m))
    if transpose_m:
      return jax.jit(lambda m, x: ca._tr_block_tmatmul(bwd_mm_plan, m, x, dtype))
    return jax.jit(lambda m, x: ca._tr_block_matmul(bwd_mm_plan, m, x, None, None, dtype))

  return [
      ("fwd scores (S, stats, P~ tiles)", scores, (q, k, seg), args.dk * (2 if plan.fwd_scores == "twopass" else 1)),
      ("fwd O = P V (block matmul)", pv, pv_args, args.dv),
      ("bwd delta = rowsum(O dO)", delta_fn, (out, d_out), None),
      ("bwd tiles (S, P, dP, dS)", tiles, (q, k, v, seg, lse, delta, d_out), args.dk + args.dv),
      ("bwd dV = P^T dO", bwd_matmul(True, v.dtype), (p_bwd, d_out), args.dv),
      ("bwd dK = dS^T Q", bwd_matmul(True, k.dtype), (ds_buf, q), args.dk),
      ("bwd dQ = dS K", bwd_matmul(False, q.dtype), (ds_buf, k), args.dk),
  ]


def reference_fn(args, inputs):
  """The float32 XLA path's (out, dq, dk, dv), compiled now (run it later: it needs several GiB)."""
  q, k, v, d_out, seg = inputs
  up = lambda x: x.astype(jnp.float32)
  compiled = jax.jit(fwd_bwd(xla_fn(args))).lower(up(q), up(k), up(v), seg, up(d_out)).compile()
  return lambda: compiled(up(q), up(k), up(v), seg, up(d_out))


def errors(got, exact) -> dict:
  """max |kernel - ref| / max |ref| per output (got, exact: (out, dq, dk, dv))."""
  up = lambda x: x.astype(jnp.float32)
  result = {}
  for label, a, r in zip(("out", "dq", "dk", "dv"), got, exact):
    diff = jnp.abs(up(a) - r)
    result[label] = float(jnp.max(diff) / jnp.max(jnp.abs(r)))
    if not bool(jnp.all(jnp.isfinite(up(a)))):
      result[label] = float("nan")
  return result


def run_config(args, name: str, overrides: dict, inputs, with_stages: bool) -> dict:
  """Errors, fwd and fwd+bwd times, and (with_stages) every stage's time, of one configuration.

  In a --parallel child everything is compiled (and the errors computed) first, then the child
  reports ready, waits for the go file and times under the lock.
  """
  config = config_for(args, overrides)
  q, k, v, d_out, seg = inputs
  row = {"config": {k_: v_ for k_, v_ in dataclasses.asdict(config).items() if v_ is not None}}
  kernel = kernel_fn(args, config)
  fwd = jax.jit(kernel)
  both = jax.jit(fwd_bwd(kernel))
  jax.block_until_ready(fwd(q, k, v, seg))  # compile
  jax.block_until_ready(both(q, k, v, seg, d_out))
  reference = None if args.skip_checks else reference_fn(args, inputs)
  with_stages = with_stages and not args.no_stages
  stages = stage_functions(args, config, inputs) if with_stages and config.fwd_impl == "blocks" else []
  widths = {stage: width for stage, _, _, width in stages}
  for _, fn, fn_args, _ in stages:
    jax.block_until_ready(fn(*fn_args))
  if args.go_file:
    open(args.ready_file, "w").close()
    while not os.path.exists(args.go_file):
      time.sleep(0.5)
  fwd_flops, total_flops = flop_counts(args)
  pairs = args.batch * args.heads * args.chunks * args.chunk_size ** 2 / 2
  with timing_lock():
    row["fwd_ms"] = timed(fwd, q, k, v, seg, iters=args.iters)
    row["fwd_bwd_ms"] = timed(both, q, k, v, seg, d_out, iters=args.iters)
    row["stages_ms"] = {}
    for stage, fn, fn_args, _ in stages:
      row["stages_ms"][stage] = timed(fn, *fn_args, iters=args.iters)
    del stages
    # After the timings and still under the lock: the float32 reference needs several GiB, and
    # processes of a --parallel sweep hold what they allocated until they exit.
    if reference is not None:
      row["errors"] = errors(both(q, k, v, seg, d_out), reference())
  row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
  row["fwd_bwd_tflops"] = total_flops / row["fwd_bwd_ms"] / 1e9
  row["stages_tflops"] = {stage: 2 * pairs * width / row["stages_ms"][stage] / 1e9
                          for stage, width in widths.items() if width is not None}
  return row


# ----------------------------------------------------------------------------------------------
# Reports


def print_row(name: str, row: dict) -> None:
  if "error" in row:
    print(f"{name:32s} FAILED: {row['error'][:300]}", flush=True)
    return
  errs = row.get("errors", {})
  err = " ".join(f"{k} {v:.1e}" for k, v in errs.items())
  print(f"{name:32s} fwd {row['fwd_ms']:7.3f} ms  fwd+bwd {row['fwd_bwd_ms']:7.3f} ms "
        f"({row['fwd_bwd_tflops']:5.1f} TFLOP/s)  err: {err}", flush=True)
  for stage, t in row.get("stages_ms", {}).items():
    rate = row["stages_tflops"].get(stage)
    print(f"    {stage:38s} {t:7.3f} ms" + ("" if rate is None else f"  {rate:6.1f} TFLOP/s"), flush=True)
  if row.get("stages_ms"):
    print(f"    {'sum of stages':38s} {sum(row['stages_ms'].values()):7.3f} ms", flush=True)


_SHORT = {"fwd scores (S, stats, P~ tiles)": "scores", "fwd O = P V (block matmul)": "PV",
          "bwd delta = rowsum(O dO)": "delta", "bwd tiles (S, P, dP, dS)": "tiles",
          "bwd dV = P^T dO": "dV", "bwd dK = dS^T Q": "dK", "bwd dQ = dS K": "dQ"}


def print_summary(results: dict) -> None:
  stage_names = []
  for row in results.values():
    for stage in row.get("stages_ms", {}):
      if stage not in stage_names:
        stage_names.append(stage)
  short = [_SHORT.get(s, s[:9]) for s in stage_names]
  print("\nsummary (ms; max relative error over out/dq/dk/dv vs the float32 XLA reference):")
  print(f"{'config':32s} {'fwd':>7s} {'fwd+bwd':>8s} {'maxerr':>8s} " + " ".join(f"{s:>9s}" for s in short))
  best = None
  for name, row in results.items():
    if "error" in row:
      print(f"{name:32s} FAILED")
      continue
    errs = row.get("errors", {})
    maxerr = f"{max(errs.values()):.1e}" if errs else "-"
    cells = " ".join(f"{row['stages_ms'][s]:9.3f}" if s in row.get("stages_ms", {}) else f"{'-':>9s}"
                     for s in stage_names)
    print(f"{name:32s} {row['fwd_ms']:7.3f} {row['fwd_bwd_ms']:8.3f} {maxerr:>8s} {cells}")
    if best is None or row["fwd_bwd_ms"] < best[1]:
      best = (name, row["fwd_bwd_ms"])
  if best:
    verdict = "MET" if best[1] <= TARGET_FWD_BWD_MS else "NOT met"
    print(f"best fwd+bwd: {best[0]} {best[1]:.3f} ms (target <= {TARGET_FWD_BWD_MS} ms: {verdict})")
  for stage, label in zip(stage_names, short):
    rows = [(row["stages_ms"][stage], name) for name, row in results.items() if stage in row.get("stages_ms", {})]
    if rows:
      t, name = min(rows)
      print(f"  best {label:9s} {t:7.3f} ms  {name}")


def write_json(path: str | None, data: dict) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(data, f, indent=1)


def report_plain(args, inputs) -> dict:
  """The default (or command-line) configuration against the XLA path, in this process."""
  q, k, v, d_out, seg = inputs
  results = {}
  row = run_config(args, "kernel", {}, inputs, with_stages=args.profile and not args.cpu)
  results["kernel"] = row
  print_row("kernel", row)
  if not args.no_xla:
    xla = xla_fn(args)
    _, total_flops = flop_counts(args)
    t_fwd = timed(jax.jit(xla), q, k, v, seg, iters=args.iters)
    t_all = timed(jax.jit(fwd_bwd(xla)), q, k, v, seg, d_out, iters=args.iters)
    results["xla"] = {"fwd_ms": t_fwd, "fwd_bwd_ms": t_all}
    print(f"{'xla':32s} fwd {t_fwd:7.3f} ms  fwd+bwd {t_all:7.3f} ms ({total_flops / t_all / 1e9:5.1f} TFLOP/s)")
  return results


def run_configs_here(args, names: list[str], inputs) -> dict:
  sweep = CPU_SWEEP if args.cpu else SWEEP
  results = {}
  for name in names:
    try:
      results[name] = run_config(args, name, sweep[name], inputs, with_stages=True)
    except Exception as err:  # noqa: BLE001 - a tiling that fails to compile is reported, not fatal
      traceback.print_exc()
      results[name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
    print_row(name, results[name])
    write_json(args.json, results)
  return results


def run_parallel(args, names: list[str]) -> dict:
  """One child process per configuration, args.parallel at a time; merges their JSON."""
  workdir = os.path.abspath(os.path.dirname(args.json) if args.json else tempfile.mkdtemp())
  os.makedirs(workdir, exist_ok=True)
  lock = os.path.join(workdir, "check_attention.timing.lock")
  passthrough = []
  for name in ("batch", "chunks", "chunk_size", "heads", "dk", "dv", "dtype", "iters", *KNOBS):
    value = getattr(args, name)
    if value is not None:
      passthrough += ["--" + name.replace("_", "-"), str(value)]
  for flag in ("cpu", "segments", "skip_checks", "no_stages"):
    if getattr(args, flag):
      passthrough.append("--" + flag.replace("_", "-"))
  env = dict(os.environ)
  results = {}
  for wave_start in range(0, len(names), args.parallel):
    wave = names[wave_start:wave_start + args.parallel]
    go_file = os.path.join(workdir, f"check_attention.go.{wave_start}")
    running = []
    for name in wave:
      paths = {ext: os.path.join(workdir, f"check_attention.{name}.{ext}") for ext in ("json", "log", "ready")}
      cmd = [sys.executable, os.path.abspath(__file__), "--configs", name, "--json", paths["json"],
             "--ready-file", paths["ready"], "--go-file", go_file, "--timing-lock", lock, *passthrough]
      log = open(paths["log"], "w")
      running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, paths))
    print(f"started {len(wave)}: {', '.join(wave)}", flush=True)
    started = time.time()
    while running:
      time.sleep(1)
      waiting = [item for item in running if not os.path.exists(item[3]["ready"]) and item[1].poll() is None]
      if not os.path.exists(go_file) and (not waiting or time.time() - started > args.deadline):
        for name, proc, _, _ in waiting:  # still compiling at the deadline: dropped
          proc.kill()
          results[name] = {"error": f"still compiling after {args.deadline:.0f} s; dropped"}
        print(f"compiled after {time.time() - started:.0f} s; timing", flush=True)
        open(go_file, "w").close()
      for item in list(running):
        name, proc, log, paths = item
        if proc.poll() is None:
          continue
        log.close()
        running.remove(item)
        if name not in results:
          try:
            with open(paths["json"]) as f:
              results[name] = json.load(f)[name]
          except (OSError, KeyError, json.JSONDecodeError):
            with open(paths["log"]) as f:
              tail = f.read().splitlines()[-15:]
            results[name] = {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
        print_row(name, results[name])
  return results


def main() -> None:
  global _TIMING_LOCK
  args = parse_args()
  _TIMING_LOCK = args.timing_lock
  sys.stdout.reconfigure(line_buffering=True)
  if args.cpu:
    jax.config.update("jax_platforms", "cpu")
  names = list(CPU_SWEEP if args.cpu else SWEEP) if args.sweep else args.configs
  header = (f"shape: B={args.batch} chunks={args.chunks}x{args.chunk_size} H={args.heads} dk={args.dk} "
            f"dv={args.dv} {args.dtype}{' with segment ids' if args.segments else ''}")
  if names and args.parallel > 0:  # the parent never touches the GPU
    print(header, flush=True)
    results = run_parallel(args, names)
    print_summary(results)
    write_json(args.json, {"shape": header, "results": results})
    return
  print(f"jax {jax.__version__}, device: {jax.devices()[0].device_kind}, backend {jax.default_backend()}")
  print(header, flush=True)
  if not args.cpu and jax.default_backend() != "gpu":
    print("warning: not on a GPU; the kernels run in interpret mode (use --cpu for tiny shapes)")
  inputs = make_inputs(args)
  if names:
    results = run_configs_here(args, names, inputs)
    if not args.go_file:
      print_summary(results)
  else:
    results = report_plain(args, inputs)
    write_json(args.json, results)


if __name__ == "__main__":
  main()
