"""Does the CEMA scans' FMA rate depend on how many distinct registers each FMA reads?

The CEMA scan kernels issue PTX fma.rn.f32 at ~59% of the H200's fp32 rate (ncu, session 15:
0.66 issued instructions a cycle per scheduler, "dispatch" the leading stall), while bench_ops'
FMA ceiling kernel (y = y * a + b, a and b the same registers for every chain) reaches 58-60 of
67 TFLOP/s. One difference: every FMA of a scan reads three registers that differ from the
previous FMA's (per-order coefficients q, c; per-order state; the step's input), where the
ceiling kernel's a and b never change. Register-file bank conflicts between three distinct source
operands (no operand reuse) would cost issue slots. This probe times Triton (Pallas) kernels of
the same instruction counts that differ only in operand sharing:

  shared_ab     8 chains y = fma(y, a, b), a and b splats (the ceiling kernel's pattern)
  distinct_ab   8 chains y_i = fma(y_i, a_i, b_i), a_i and b_i per-lane values, distinct per chain
  cema_1s       the forward scan's step for K = 8 orders, one state per order:
                s = q s + x (fma, fma, mul, fma) and acc += Re(c s) (2 fma), q and c per order
  cema_2s       the same step for K / 2 = 4 orders with TWO states each (two time streams of the
                same channel) that share q and c: as many FMAs and state registers as cema_1s
  cema_2s_k8    8 orders with two streams each (twice the work and ILP of cema_1s)
  cema_1s_k16   16 orders, one stream (the forward scan's lane: all N = 16 orders in one thread)
  bwd_k4, bwd_k8  the backward scan's step for 4 / 8 orders a lane: u = q u + dy, u' = q u' + u,
                A += x u, A' += x u', dx += Re(c u): 14 FMA-class instructions per order
  bwd_k8_late   bwd_k8 with the accumulations after all of a step's state updates, x-major
  bwd_k8_dx4    bwd_k8 with four dx chains instead of two
  bwd_2s_k4     4 orders with two time streams each, sharing q and c (as many states as bwd_k8)

`python experiments/gpu_checks/sass_report.py --op fma_probe` compiles these kernels for sm_90a on
a machine without a GPU and counts their register reads per FP32 instruction.

The GPU first runs shared_ab for ~0.3 s so that the clocks have left idle before the first sample.

Each lane (one thread: block 128, 4 warps, as the scans) runs `--steps` steps; step inputs come
from 8 per-lane registers in turn (the scans read a prefetched row per step). Reported: FMA-class
instructions per second (mul counted as one), TFLOP/s at 2 per FMA, and the ratio to shared_ab.

  python experiments/gpu_checks/probe_fma_operands.py --json "$OUT/fma_operands.json"
  python experiments/gpu_checks/probe_fma_operands.py --smoke   # interpreter, tiny sizes, CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from experiments.benchmarks import harness  # noqa: E402

BLOCK = 128
UNROLL = 8


def _fma_fn(interpret: bool):
  if interpret:
    return lambda a, b, c: a * b + c

  def fma(a, b, c):
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
    args = [jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for v in (a, b, c)]
    return plgpu.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;", args=args, constraints="=r,r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])[0]
  return fma


def _ab_kernel(x_ref, p_ref, o_ref, *, steps: int, chains: int, shared: bool, fma):
  x = x_ref[...]
  if shared:
    a = [jnp.full(x.shape, p_ref[0, 0])] * chains
    b = [jnp.full(x.shape, p_ref[1, 0])] * chains
  else:
    a = [p_ref[0, pl.ds(i * BLOCK, BLOCK)] for i in range(chains)]
    b = [p_ref[1, pl.ds(i * BLOCK, BLOCK)] for i in range(chains)]
  ys = tuple(x + 1e-3 * i for i in range(chains))

  def body(_, ys):
    for _ in range(UNROLL):
      ys = tuple(fma(y, ai, bi) for y, ai, bi in zip(ys, a, b))
    return ys

  ys = jax.lax.fori_loop(0, steps // UNROLL, body, ys)
  o_ref[...] = sum(ys[1:], ys[0])


def _bwd_kernel(x_ref, p_ref, o_ref, *, steps: int, orders: int, fma, streams: int = 1,
                dx_chains: int = 2, late: bool = False):
  """The backward scan's per-order step (kernels_pallas/cema.py's docstring), K orders a lane.

  streams: time streams of one channel per lane (two share each order's q and c); dx_chains: the
  per-step output sum's chains per stream; late: the accumulations (A, A', dx) after all the
  step's state updates, x-major, instead of right after each order's update. Session 20 compiled
  these to see whether the source order changes ptxas' operand reuse (it did not)."""
  x = x_ref[...]
  row = lambda r, k: p_ref[r, pl.ds(k * BLOCK, BLOCK)]  # noqa: E731
  qre, qim = [row(0, k) for k in range(orders)], [row(1, k) for k in range(orders)]
  cre, cim = [row(2, k) for k in range(orders)], [row(3, k) for k in range(orders)]
  dys = [[x * (1.0 + 1e-3 * (j + UNROLL * m)) for j in range(UNROLL)] for m in range(streams)]
  xs = [[x * (0.5 - 1e-3 * (j + UNROLL * m)) for j in range(UNROLL)] for m in range(streams)]
  size = 8 * orders * streams
  # per order and stream: ur, ui, vr, vi (u'), ar, ai (A), br, bi (A'); then the dx chains
  state = tuple(x * (1e-2 * (k + 1)) for k in range(size)) + (jnp.zeros_like(x),) * (dx_chains * streams)

  def accumulate(st, dx, i, m, k, j):
    nur, nui, nvr, nvi, ar, ai, br, bi = st[i:i + 8]
    st[i + 4:i + 8] = [fma(xs[m][j], nur, ar), fma(xs[m][j], nui, ai), fma(xs[m][j], nvr, br),
                       fma(xs[m][j], nvi, bi)]
    c = m * dx_chains + k % dx_chains
    dx[c] = fma(-cim[k], nui, fma(cre[k], nur, dx[c]))

  def body(_, state):
    st, dx = list(state[:size]), list(state[size:])
    for j in range(UNROLL):
      dx = [d * 0.5 for d in dx]
      for k in range(orders):
        for m in range(streams):
          i = 8 * (k * streams + m)
          ur, ui, vr, vi = st[i:i + 4]
          st[i:i + 4] = [fma(qre[k], ur, fma(-qim[k], ui, dys[m][j])), fma(qim[k], ur, qre[k] * ui),
                         fma(qre[k], vr, fma(-qim[k], vi, ur)), fma(qre[k], vi, fma(qim[k], vr, ui))]
          if not late:
            accumulate(st, dx, i, m, k, j)
      if late:
        for m in range(streams):
          for k in range(orders):
            accumulate(st, dx, 8 * (k * streams + m), m, k, j)
    return tuple(st) + tuple(dx)

  state = jax.lax.fori_loop(0, steps // UNROLL, body, state)
  o_ref[...] = sum(state[1:], state[0])


def _cema_kernel(x_ref, p_ref, o_ref, *, steps: int, orders: int, streams: int, fma):
  """Per order k: q_k, c_k (per lane); per stream: state s and an output sum (two chains)."""
  x = x_ref[...]
  row = lambda r, k: p_ref[r, pl.ds(k * BLOCK, BLOCK)]  # noqa: E731
  qre = [row(0, k) for k in range(orders)]
  qim = [row(1, k) for k in range(orders)]
  cre = [row(2, k) for k in range(orders)]
  cim = [row(3, k) for k in range(orders)]
  inputs = [[x * (1.0 + 1e-3 * (j + UNROLL * m)) for j in range(UNROLL)] for m in range(streams)]
  state = tuple(x * (1e-2 * (k + 1)) for k in range(2 * orders * streams)) + tuple(
      jnp.zeros_like(x) for _ in range(2 * streams))

  def body(_, state):
    st = list(state[:2 * orders * streams])
    accs = list(state[2 * orders * streams:])
    for j in range(UNROLL):
      for m in range(streams):
        accs[2 * m] = accs[2 * m] * 0.5  # a per-step output (as y_t); keeps the sums bounded
        accs[2 * m + 1] = accs[2 * m + 1] * 0.5
      for k in range(orders):
        for m in range(streams):
          i = 2 * (k * streams + m)
          sr, si = st[i], st[i + 1]
          xin = inputs[m][j]
          nsr = fma(qre[k], sr, fma(-qim[k], si, xin))
          nsi = fma(qim[k], sr, qre[k] * si)
          st[i], st[i + 1] = nsr, nsi
          a = 2 * m + (k % 2)
          accs[a] = fma(-cim[k], nsi, fma(cre[k], nsr, accs[a]))
    return tuple(st) + tuple(accs)

  state = jax.lax.fori_loop(0, steps // UNROLL, body, state)
  o_ref[...] = sum(state[1:], state[0])


# name -> (kernel factory kwargs, FMA-class instructions per lane per step)
PATTERNS = {
    "shared_ab": (dict(kind="ab", chains=8, shared=True), 8),
    "distinct_ab": (dict(kind="ab", chains=8, shared=False), 8),
    # per order and stream: 4 for the state (fma, fma, mul, fma) + 2 for the output; plus one
    # multiply per output sum and step
    "cema_1s": (dict(kind="cema", orders=8, streams=1), 8 * 6 + 2),
    "cema_2s": (dict(kind="cema", orders=4, streams=2), 4 * 2 * 6 + 4),
    "cema_2s_k8": (dict(kind="cema", orders=8, streams=2), 8 * 2 * 6 + 4),
    "cema_1s_k16": (dict(kind="cema", orders=16, streams=1), 16 * 6 + 2),
    "bwd_k4": (dict(kind="bwd", orders=4), 4 * 14 + 2),
    "bwd_k8": (dict(kind="bwd", orders=8), 8 * 14 + 2),
    # session 20: the same step written otherwise (same multiply-adds; a 4-chain dx adds 2 multiplies)
    "bwd_k8_late": (dict(kind="bwd", orders=8, late=True), 8 * 14 + 2),
    "bwd_k8_dx4": (dict(kind="bwd", orders=8, dx_chains=4), 8 * 14 + 4),
    "bwd_2s_k4": (dict(kind="bwd", orders=4, streams=2), 2 * 4 * 14 + 4),
}


def build(name: str, lanes: int, steps: int, interpret: bool):
  cfg, per_step = PATTERNS[name]
  cfg = dict(cfg)
  kind = cfg.pop("kind")
  fma = _fma_fn(interpret)
  if kind == "ab":
    kernel = functools.partial(_ab_kernel, steps=steps, fma=fma, **cfg)
    rows, cols = 2, cfg["chains"] * BLOCK
  elif kind == "bwd":
    kernel = functools.partial(_bwd_kernel, steps=steps, fma=fma, **cfg)
    rows, cols = 4, cfg["orders"] * BLOCK
  else:
    kernel = functools.partial(_cema_kernel, steps=steps, fma=fma, **cfg)
    rows, cols = 4, cfg["orders"] * BLOCK
  kwargs = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=1)}
  call = pl.pallas_call(
      kernel, grid=(lanes // BLOCK,),
      in_specs=[pl.BlockSpec((BLOCK,), lambda i: (i,)), pl.BlockSpec((rows, cols), lambda i: (0, 0))],
      out_specs=pl.BlockSpec((BLOCK,), lambda i: (i,)),
      out_shape=jax.ShapeDtypeStruct((lanes,), jnp.float32), interpret=interpret,
      name=f"fma_{name}", **kwargs)
  rng = np.random.default_rng(0)
  params = np.empty((rows, cols), np.float32)
  if kind == "ab":
    params[0] = rng.uniform(0.99, 0.999, cols)
    params[1] = rng.uniform(-1e-3, 1e-3, cols)
  else:
    mag, ang = rng.uniform(0.9, 0.999, cols), rng.uniform(0.0, 0.5, cols)
    params[0], params[1] = mag * np.cos(ang), mag * np.sin(ang)
    params[2], params[3] = rng.normal(size=cols), rng.normal(size=cols)
  x = jnp.asarray(rng.normal(size=lanes).astype(np.float32))
  return jax.jit(call), x, jnp.asarray(params), per_step


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lanes", type=int, default=BLOCK * 132 * 16, help="threads in all (128 a program)")
  parser.add_argument("--steps", type=int, default=4096)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--patterns", default=",".join(PATTERNS))
  parser.add_argument("--json", default=None, help="write the rows here")
  parser.add_argument("--smoke", action="store_true", help="interpreter, tiny sizes (CPU)")
  parser.add_argument("--no-warm", action="store_true", help="skip the clock warm-up and the ceiling "
                      "(under ncu: --kernel-name regex:fma_ --launch-count N)")
  args = parser.parse_args(argv)
  interpret = args.smoke or jax.default_backend() == "cpu"
  lanes, steps = (BLOCK * 2, 2 * UNROLL) if args.smoke else (args.lanes, args.steps)
  rows = []
  base = None
  if not interpret and not args.no_warm:  # clocks up before the first sample
    fn, x, params, _ = build("shared_ab", lanes, steps, interpret)
    for _ in range(600):
      out = fn(x, params)
    jax.block_until_ready(out)
  print(f"{'pattern':<12} {'ms':>9} {'TFLOP/s':>9} {'vs shared':>10}")
  for name in args.patterns.split(","):
    fn, x, params, per_step = build(name, lanes, steps, interpret)
    out = fn(x, params)
    if not bool(jnp.all(jnp.isfinite(out))):
      raise RuntimeError(f"{name}: non-finite result")
    stats = harness.time_fn(fn, x, params, warmup=2, iters=1 if args.smoke else args.iters,
                            inner=1 if args.smoke else 5)  # inner 5: the host's ~0.2 ms per call hidden
    fmas = float(lanes) * steps * per_step
    tflops = 2 * fmas / (stats["median_ms"] * 1e-3) / 1e12
    base = tflops if name == "shared_ab" else base
    ratio = tflops / base if base else float("nan")
    rows.append({"pattern": name, "median_ms": stats["median_ms"], "tflops": tflops,
                 "fma_per_lane_step": per_step, "vs_shared_ab": ratio})
    print(f"{name:<12} {stats['median_ms']:9.3f} {tflops:9.2f} {ratio:10.3f}")
  if not interpret and not args.no_warm:  # bench_ops' ceiling kernel (8 elements a thread, 4 chains each), same run
    from experiments.benchmarks import bench_ops
    ceiling = bench_ops.measure_fma_rate_pallas(chains=4, inline_asm=True, iters=args.iters)
    rows.append({"pattern": "bench_ops_ceiling_4chains_ptx", "median_ms": ceiling["median_ms"],
                 "tflops": ceiling["tflops"], "vs_shared_ab": ceiling["tflops"] / base})
    print(f"{'ceiling':<12} {ceiling['median_ms']:9.3f} {ceiling['tflops']:9.2f} {ceiling['tflops'] / base:10.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "lanes": lanes,
                 "steps": steps, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
