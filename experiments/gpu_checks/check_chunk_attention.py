"""GPU check of the Pallas chunked-attention kernel against the XLA path: errors and timings.

Default shape (SPEC presets): B=1, 16 chunks of 2048, 4 heads, dk 256, dv 2048, bfloat16.
Target on one H200: kernel fwd+bwd <= 3.8 ms (XLA path ~7.5 ms, the released CUDA kernel 5.76 ms).

  python experiments/gpu_checks/check_chunk_attention.py             # errors + fwd, fwd+bwd timings
  python experiments/gpu_checks/check_chunk_attention.py --profile   # + time of every kernel stage
  python experiments/gpu_checks/check_chunk_attention.py --sweep --skip-checks --sweep-entries 0,1,2
                                                                     # fwd+bwd for tilings in SWEEP
  python experiments/gpu_checks/check_chunk_attention.py --cpu       # tiny shapes, interpret mode

Errors: the kernel and the XLA path (both in the input dtype) against a float32 XLA reference
computed from the same inputs, so the kernel's error can be read next to XLA's own rounding.
FLOPs count the causal half of every chunk (C^2/2 query-key pairs per chunk and head):
forward 2 (dk + dv) per pair, backward 2 (3 dk + 2 dv) per pair (Q K^T recomputed, dV, dP, dQ, dK).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas import chunk_attention as ca  # noqa: E402
from megalodon_jax.ops import attention as xla_attention  # noqa: E402

TARGET_FWD_BWD_MS = 3.8
KNOBS = ("block_q", "block_k", "bwd_block_q", "bwd_block_k", "block_d", "block_c", "block_qk", "block_r",
         "num_warps", "num_stages")

# Tilings tried by --sweep (each differs from the defaults in one or two knobs).
SWEEP = [
    ca.KernelConfig(),
    ca.KernelConfig(block_q=64),
    ca.KernelConfig(block_k=128, block_qk=128),
    ca.KernelConfig(bwd_block_q=64, bwd_block_k=64),
    ca.KernelConfig(bwd_block_q=128, bwd_block_k=64),
    ca.KernelConfig(bwd_block_q=64, bwd_block_k=128),
    ca.KernelConfig(bwd_block_k=256, num_warps=8),
    ca.KernelConfig(block_d=128),
    ca.KernelConfig(block_c=32),
    ca.KernelConfig(block_c=128),
    ca.KernelConfig(block_qk=64),
    ca.KernelConfig(block_r=32),
    ca.KernelConfig(block_r=128),
    ca.KernelConfig(num_warps=4),
    ca.KernelConfig(num_stages=2),
    ca.KernelConfig(num_stages=4),
    ca.KernelConfig(fwd_impl="flash"),
    ca.KernelConfig(fwd_impl="flash", block_q=64, block_d=256),
]
CPU_SWEEP = [ca.KernelConfig(block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=16),
             ca.KernelConfig(block_q=32, block_k=16, bwd_block_q=16, bwd_block_k=32, block_d=16),
             ca.KernelConfig(block_q=16, block_k=16, fwd_impl="flash")]


def parse_args() -> argparse.Namespace:
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
  parser.add_argument("--iters", type=int, default=None, help="timed repetitions (median reported)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--profile", action="store_true", help="time every kernel stage separately")
  parser.add_argument("--sweep", action="store_true", help="time fwd+bwd for the tilings in SWEEP")
  parser.add_argument("--sweep-entries", default=None,
                      help="comma-separated indices into SWEEP (default: all; each costs a compilation)")
  parser.add_argument("--skip-checks", action="store_true", help="skip the error report and the main timings")
  parser.add_argument("--no-xla", action="store_true", help="skip the XLA path (errors and timings)")
  for knob in KNOBS:
    parser.add_argument("--" + knob.replace("_", "-"), type=int, default=None)
  parser.add_argument("--fwd-impl", default="blocks", choices=["blocks", "flash"])
  args = parser.parse_args()
  defaults = dict(batch=1, chunks=2, chunk_size=32, heads=2, dk=16, dv=32, iters=3) if args.cpu else \
      dict(batch=1, chunks=16, chunk_size=2048, heads=4, dk=256, dv=2048, iters=20)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def config_from_args(args) -> ca.KernelConfig:
  knobs = {k: getattr(args, k) for k in KNOBS}
  if args.cpu:  # tiles that fit the tiny shapes
    for name in ("block_q", "block_k", "bwd_block_q", "bwd_block_k"):
      knobs[name] = knobs[name] or 16
  return ca.KernelConfig(fwd_impl=args.fwd_impl, **knobs)


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


def attention_fns(args, config):
  common = dict(chunk_size=args.chunk_size)
  kernel = lambda q, k, v, s: ca.chunk_attention(q, k, v, segment_ids=s, config=config,
                                                 interpret=True if args.cpu else None, **common)
  xla = lambda q, k, v, s: xla_attention.chunked_attention_xla(q, k, v, segment_ids=s, **common)
  return kernel, xla


def fwd_bwd(attention):
  def run(q, k, v, s, d_out):
    out, vjp = jax.vjp(lambda a, b, c: attention(a, b, c, s), q, k, v)
    return (out, *vjp(d_out))
  return run


def timed(fn, *args, iters: int, warmup: int) -> float:
  """Median wall time in ms of a jitted call, after warm-up (which includes compilation)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def flop_counts(args) -> tuple[float, float]:
  pairs = args.batch * args.heads * args.chunks * args.chunk_size ** 2 / 2
  fwd = 2 * pairs * (args.dk + args.dv)
  bwd = 2 * pairs * (3 * args.dk + 2 * args.dv)
  return fwd, fwd + bwd


def report_errors(args, kernel, xla, inputs) -> None:
  q, k, v, d_out, seg = inputs
  up = lambda x: x.astype(jnp.float32)
  exact = jax.jit(fwd_bwd(xla))(up(q), up(k), up(v), seg, up(d_out))
  results = {"kernel": jax.jit(fwd_bwd(kernel))(q, k, v, seg, d_out)}
  if not args.no_xla:
    results["xla"] = jax.jit(fwd_bwd(xla))(q, k, v, seg, d_out)
  print(f"\nerrors vs float32 XLA reference (max |a - ref| / max |ref|; max |a - ref|):")
  for name, got in results.items():
    cells = []
    for label, a, r in zip(("out", "dq", "dk", "dv"), got, exact):
      diff = jnp.abs(up(a) - r)
      finite = bool(jnp.all(jnp.isfinite(up(a))))
      cells.append(f"{label} {float(jnp.max(diff) / jnp.max(jnp.abs(r))):.2e} ({float(jnp.max(diff)):.2e})"
                   + ("" if finite else " NON-FINITE"))
    print(f"  {name:7s}", "  ".join(cells))
  if "xla" in results:
    cells = []
    for label, a, b in zip(("out", "dq", "dk", "dv"), results["kernel"], results["xla"]):
      diff = float(jnp.max(jnp.abs(up(a) - up(b))))
      cells.append(f"{label} {diff / float(jnp.max(jnp.abs(up(b)))):.2e}")
    print("  kernel vs xla (same dtype):", "  ".join(cells))


def report_timings(args, kernel, xla, inputs) -> None:
  q, k, v, d_out, seg = inputs
  fwd_flops, total_flops = flop_counts(args)
  rows = [("kernel", kernel)] + ([] if args.no_xla else [("xla", xla)])
  print(f"\ntimings (median of {args.iters}, ms) and achieved TFLOP/s "
        f"(fwd {fwd_flops / 1e12:.3f} TFLOP, fwd+bwd {total_flops / 1e12:.3f} TFLOP):")
  for name, attention in rows:
    t_fwd = timed(jax.jit(attention), q, k, v, seg, iters=args.iters, warmup=args.warmup)
    t_all = timed(jax.jit(fwd_bwd(attention)), q, k, v, seg, d_out, iters=args.iters, warmup=args.warmup)
    print(f"  {name:7s} fwd {t_fwd:9.3f} ms ({fwd_flops / t_fwd / 1e9:7.1f} TFLOP/s)   "
          f"fwd+bwd {t_all:9.3f} ms ({total_flops / t_all / 1e9:7.1f} TFLOP/s)")
    if name == "kernel" and not args.cpu:
      verdict = "MET" if t_all <= TARGET_FWD_BWD_MS else "NOT met"
      print(f"          target fwd+bwd <= {TARGET_FWD_BWD_MS} ms: {verdict}")


def report_profile(args, config, inputs) -> None:
  """Time of each GPU kernel stage (private helpers of the kernel module)."""
  q, k, v, d_out, seg = inputs
  length = args.chunks * args.chunk_size
  make_plan = lambda cfg: ca._triton_plan(cfg, args.cpu, 1.0, args.batch, args.heads, args.chunks,
                                         args.chunk_size, args.chunk_size, args.dk, args.dv, q.dtype)
  plan = make_plan(dataclasses.replace(config, fwd_impl="blocks"))
  flash_plan = make_plan(dataclasses.replace(config, fwd_impl="flash"))
  bwd_plan = dataclasses.replace(plan, geom=plan.bwd_geom)  # the backward kernels' own tiles
  p_buf, mrun, lse = jax.jit(lambda q, k, s: ca._tr_scores(plan, q, k, v.dtype, s))(q, k, seg)
  out = ca._tr_block_matmul(plan, p_buf, v, mrun, lse, v.dtype)
  delta_fn = jax.jit(lambda o, do: jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32)))
  delta = delta_fn(out, d_out)
  tiles = jax.jit(lambda *a: ca._tr_bwd_tiles(bwd_plan, *a))
  p_bwd, ds_buf = tiles(q, k, v, seg, lse, delta, d_out)
  stages = [
      ("fwd scores (S, online stats, P~ tiles)", jax.jit(lambda q, k, s: ca._tr_scores(plan, q, k, v.dtype, s)),
       (q, k, seg), args.dk),
      ("fwd O = P V (block matmul)", jax.jit(lambda *a: ca._tr_block_matmul(plan, *a, v.dtype)),
       (p_buf, v, mrun, lse), args.dv),
      ("fwd flash (alternative forward)", jax.jit(lambda *a: ca._tr_flash_forward(
          flash_plan, *a, None, save_lse=True)), (q, k, v, seg), args.dk * -(-args.dv // flash_plan.block_d)
       + args.dv),
      ("bwd delta = rowsum(O dO) (XLA)", delta_fn, (out, d_out), None),
      ("bwd tiles (S, P, dP, dS)", tiles, (q, k, v, seg, lse, delta, d_out), args.dk + args.dv),
      ("bwd dV = P^T dO", jax.jit(lambda m, x: ca._tr_block_tmatmul(bwd_plan, m, x, v.dtype)), (p_bwd, d_out),
       args.dv),
      ("bwd dK = dS^T Q", jax.jit(lambda m, x: ca._tr_block_tmatmul(bwd_plan, m, x, k.dtype)), (ds_buf, q),
       args.dk),
      ("bwd dQ = dS K", jax.jit(lambda m, x: ca._tr_block_matmul(bwd_plan, m, x, None, None, q.dtype)),
       (ds_buf, k), args.dk),
  ]
  pairs = args.batch * args.heads * args.chunks * args.chunk_size ** 2 / 2
  buffer_mb = np.prod(p_buf.shape) * p_buf.dtype.itemsize / 2 ** 20
  print(f"\nper-stage times (median of {args.iters}); probability-tile buffer {buffer_mb:.0f} MiB each "
        f"(fwd tiles {plan.geom.bq}x{plan.geom.bk}, bwd tiles {bwd_plan.geom.bq}x{bwd_plan.geom.bk}, "
        f"block_d={plan.block_d} block_c={plan.block_c} block_qk={plan.block_qk} block_r={plan.block_r}):")
  total = 0.0
  for name, fn, fn_args, width in stages:
    t = timed(fn, *fn_args, iters=args.iters, warmup=args.warmup)
    rate = "" if width is None else f"  {2 * pairs * width / t / 1e9:7.1f} TFLOP/s"
    if not name.startswith("fwd flash"):
      total += t
    print(f"  {name:42s} {t:9.3f} ms{rate}")
  print(f"  {'sum (blocks fwd + bwd)':42s} {total:9.3f} ms   (length {length})")


def report_sweep(args, inputs) -> None:
  q, k, v, d_out, seg = inputs
  _, total_flops = flop_counts(args)
  print("\nsweep: fwd+bwd per tiling (differences from the defaults)")
  best = None
  configs = CPU_SWEEP if args.cpu else SWEEP
  if args.sweep_entries:
    configs = [configs[int(i)] for i in args.sweep_entries.split(",")]
  for config in configs:
    label = ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
                      if getattr(config, f.name) != getattr(ca.KernelConfig(), f.name)) or "defaults"
    kernel, _ = attention_fns(args, config)
    try:
      t = timed(jax.jit(fwd_bwd(kernel)), q, k, v, seg, d_out, iters=args.iters, warmup=args.warmup)
    except Exception as e:  # a tiling that does not compile (e.g. shared memory) is reported, not fatal
      print(f"  {label:50s} FAILED: {str(e).splitlines()[0][:150]}")
      continue
    print(f"  {label:50s} {t:9.3f} ms ({total_flops / t / 1e9:7.1f} TFLOP/s)")
    if best is None or t < best[0]:
      best = (t, label)
  if best is not None:
    print(f"  best: {best[1]} at {best[0]:.3f} ms")


def main() -> None:
  args = parse_args()
  if args.cpu:
    jax.config.update("jax_platforms", "cpu")
  print(f"jax {jax.__version__}, device: {jax.devices()[0].device_kind}, backend {jax.default_backend()}")
  print(f"shape: B={args.batch} chunks={args.chunks}x{args.chunk_size} H={args.heads} dk={args.dk} "
        f"dv={args.dv} {args.dtype}{' with segment ids' if args.segments else ''}")
  if not args.cpu and jax.default_backend() != "gpu":
    print("warning: not on a GPU; the kernels run in interpret mode (use --cpu for tiny shapes)")
  config = config_from_args(args)
  inputs = make_inputs(args)
  kernel, xla = attention_fns(args, config)
  if not args.skip_checks:
    report_errors(args, kernel, xla, inputs)
    report_timings(args, kernel, xla, inputs)
  if args.profile:
    report_profile(args, config, inputs)
  if args.sweep:
    report_sweep(args, inputs)


if __name__ == "__main__":
  main()
