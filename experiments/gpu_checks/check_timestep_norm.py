"""GPU check of the fused TimestepNorm Pallas kernels: accuracy against the XLA op, and timings.

Run from the repository root on a GPU machine:
    python experiments/gpu_checks/check_timestep_norm.py            # accuracy + default sweep
    python experiments/gpu_checks/check_timestep_norm.py --sweep full
    python experiments/gpu_checks/check_timestep_norm.py --sweep tiled --shapes target \
        --breakdown --json "$OUT/tsn_tiled.json"   # the tiled design's variants vs the others
    python experiments/gpu_checks/check_timestep_norm.py --cpu      # tiny shapes, interpreted

For every shape: errors of the kernel (not interpreted) and of the XLA "associative" op against a
float32 evaluation of the XLA op on the same (bf16-rounded) inputs, for y, the final state and the
gradients w.r.t. x, weight, bias and the incoming state's mean/var; then the median time (after
warm-up, block_until_ready) of forward and forward+backward for the XLA op and for each kernel
configuration of the sweep, with the effective bandwidth and a measured memory floor (a fused
XLA elementwise pass that moves the same bytes: fwd reads x and writes y, bwd reads x and dy and
writes dx). The target shape is B=1, L=32768, D=4096, G=64 in bfloat16 (fwd+bwd <= 0.6 ms).
Times are given twice: "fwd"/"fwd+bwd" are medians of single calls (host dispatch included, as
in earlier logs); "pipe" are medians over samples of --pipeline back-to-back calls divided by
their number (host dispatch hidden behind the GPU work: the device time). --breakdown times the
kernels of the tiled design one by one (pipelined); --json writes every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import traceback
import types

if "--cpu" in sys.argv:
  os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas import timestep_norm as K  # noqa: E402
from megalodon_jax.ops import timestep_norm as tsn  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  length: int
  dim: int
  groups: int
  dtype: str
  pad: bool = False        # Random padding (and a padded tail).
  segments: bool = False   # Packed sequences (segment resets).
  carry: bool = False      # A carried incoming state.
  extra: tuple = ()        # Kernel configurations checked on this shape besides the default.

  def __str__(self):
    extras = "".join(f"+{n}" for n in ("pad", "segments", "carry") if getattr(self, n))
    return f"B{self.batch} L{self.length} D{self.dim} G{self.groups} {self.dtype}{extras}"


GPU_SHAPES = [
    Shape(1, 32768, 4096, 64, "bfloat16"),                                   # The target.
    Shape(2, 8192, 2048, 64, "bfloat16", carry=True),                        # mega1.3B width.
    Shape(2, 3001, 768, 12, "float32", pad=True, segments=True, carry=True,   # Odd everything.
          extra=(K.KernelConfig(block_t=128, num_warps=8, time_splits=3),
                 K.KernelConfig(block_t=32, time_splits=5, cumsum=True, prefetch=0))),
]
CPU_SHAPES = [
    Shape(1, 100, 64, 4, "bfloat16"),
    Shape(2, 37, 24, 4, "float32", pad=True, segments=True, carry=True),
]

DEFAULT = K.default_config("triton")
SWEEPS = {
    "none": [],
    # Tile size / warps, running sums by masked reductions or scans, tiles loaded ahead (bytes in
    # flight per program), Triton's own pipelining instead, and time splits (more programs).
    "default": [
        K.KernelConfig(block_t=64, num_warps=4, prefetch=3),
        K.KernelConfig(block_t=128, num_warps=8, prefetch=1),
        K.KernelConfig(block_t=128, num_warps=8, prefetch=3),
        K.KernelConfig(block_t=64, num_warps=4, cumsum=True, prefetch=3),
        K.KernelConfig(block_t=128, num_warps=8, cumsum=True, prefetch=3),
        K.KernelConfig(block_t=256, num_warps=8, cumsum=True, prefetch=2),
        K.KernelConfig(block_t=64, num_warps=4, prefetch=0, num_stages=4),
        K.KernelConfig(block_t=128, num_warps=8, cumsum=True, prefetch=0, num_stages=4),
        K.KernelConfig(block_t=64, num_warps=4, time_splits=4, prefetch=2),
        K.KernelConfig(block_t=64, num_warps=4, time_splits=8, prefetch=1),
        K.KernelConfig(block_t=128, num_warps=8, time_splits=4, cumsum=True, prefetch=2),
    ],
}
SWEEPS["full"] = [
    K.KernelConfig(block_t=t, num_warps=w, time_splits=s, cumsum=c, prefetch=p, num_stages=st)
    for t in (64, 128, 256) for w in (4, 8) for s in (1, 4) for c in (False, True)
    for p, st in ((1, 1), (3, 1), (0, 4))
]
TILED = lambda **kw: K.KernelConfig(tiled=K.TiledConfig(**kw))
# The tiled design: tile shape (T steps x Gb groups of 64 features) against warps, and the scan.
SWEEPS["tiled"] = [
    TILED(block_t=32, groups_per_block=1, num_warps=4),
    TILED(block_t=64, groups_per_block=1, num_warps=4),
    TILED(block_t=32, groups_per_block=2, num_warps=4),
    TILED(block_t=16, groups_per_block=4, num_warps=4),
    TILED(block_t=64, groups_per_block=2, num_warps=8),
    TILED(block_t=128, groups_per_block=1, num_warps=8),
]
# A short final comparison (< 90 s with --shapes target_only): the default (tiled) and the
# per-(sequence, group) kernel's old default.
SWEEPS["final"] = [K.KernelConfig()]
# The step-wise backward (TiledConfig.backward="steps") against the per-tile one, with the
# scans over tiles in one pass of one group per program (scan_chunk >= tiles), and the passes
# over x and dy in smaller tiles than the forward's.
STEPS = functools.partial(TILED, backward="steps")
ONE_PASS_SCAN = {"scan_chunk": 512, "scan_groups": 1}
SWEEPS["steps"] = [
    STEPS(**ONE_PASS_SCAN),
    STEPS(**ONE_PASS_SCAN, pass_block_t=32, pass_groups=1, pass_tiles=8),
    STEPS(**ONE_PASS_SCAN, pass_block_t=32, pass_groups=2, pass_tiles=4),
    TILED(**ONE_PASS_SCAN),
]
STEPS_BREAKDOWN = [STEPS(**ONE_PASS_SCAN, pass_block_t=32, pass_groups=1, pass_tiles=8)]
# The default (step-wise backward since 2026-11-29) against the previous one (TiledConfig()).
SWEEPS["previous"] = [TILED()]
# Launch order: the default against the same kernels launched with the group blocks fastest
# (TiledConfig.groups_fastest: resident programs share whole rows of x), then tile shapes and
# warps on top of that order.
_GF = dataclasses.replace(K.GPU_DEFAULT, groups_fastest=True)
LAUNCH = lambda **kw: K.KernelConfig(tiled=dataclasses.replace(_GF, **kw))  # noqa: E731
SWEEPS["launch"] = [
    LAUNCH(),
    LAUNCH(groups_per_block=4),
    LAUNCH(block_t=32, groups_per_block=4),
    LAUNCH(pass_block_t=16, pass_groups=4),
    LAUNCH(pass_tiles=8),
    LAUNCH(num_warps=8, groups_per_block=4),
    LAUNCH(pass_groups=4),
]
LAUNCH_BREAKDOWN = [DEFAULT, LAUNCH()]
BREAKDOWN = [TILED(block_t=32, groups_per_block=2, num_warps=4),
             TILED(block_t=64, groups_per_block=2, num_warps=8)]
CPU_SWEEP = [K.KernelConfig(block_t=16), K.KernelConfig(block_t=16, time_splits=2, cumsum=True),
             TILED(block_t=16, groups_per_block=2, scan_chunk=2),
             STEPS(block_t=16, groups_per_block=2, scan_chunk=2, pass_block_t=8, pass_groups=1,
                   pass_tiles=3)]


def make_inputs(shape: Shape, seed: int = 0):
  rng = np.random.default_rng(seed)
  b, l, d, g = shape.batch, shape.length, shape.dim, shape.groups
  x = jnp.asarray(1.5 + rng.standard_normal((b, l, d), np.float32), shape.dtype)
  w = jnp.asarray(0.2 * rng.standard_normal(d), jnp.float32)
  bias = jnp.asarray(0.2 * rng.standard_normal(d), jnp.float32)
  mask = seg = None
  if shape.pad:
    m = rng.random((b, l)) < 0.1
    m[:, -17:] = True
    mask = jnp.asarray(m)
  if shape.segments:
    seg = jnp.asarray(np.cumsum(rng.random((b, l)) < 2e-3, axis=1), jnp.int32)
  state = tsn.initial_state(b, g)
  if shape.carry:
    state = tsn.TimestepNormState(jnp.full((b,), 1000, jnp.int32),
                                  jnp.asarray(1.5 + 0.1 * rng.standard_normal((b, g)), jnp.float32),
                                  jnp.asarray(1.0 + 0.1 * rng.random((b, g)), jnp.float32))
  dy = jnp.asarray(rng.standard_normal((b, l, d), np.float32), shape.dtype)
  dmean = jnp.asarray(rng.standard_normal((b, g)), jnp.float32)
  dvar = jnp.asarray(rng.standard_normal((b, g)), jnp.float32)
  return x, w, bias, mask, seg, state, (dy, dmean, dvar)


def op_fn(kind: str, shape: Shape, config: K.KernelConfig | None, interpret: bool):
  """(x, w, b, mean0, var0) -> (y, mean, var) for the XLA op or the kernel."""
  def fn(x, w, b, mean0, var0, count0, mask, seg):
    state = tsn.TimestepNormState(count0, mean0, var0)
    if kind == "xla":
      y, new = tsn.timestep_norm(x, w, b, num_groups=shape.groups, state=state, padding_mask=mask,
                                 segment_ids=seg, method="associative")
    else:
      y, new = K.timestep_norm_pallas(x, w, b, num_groups=shape.groups, state=state,
                                      padding_mask=mask, segment_ids=seg, interpret=interpret,
                                      config=config)
    return y, new.mean, new.var
  return fn


def forward_and_vjp(fn):
  """Jitted forward, and jitted forward+backward returning (y, state, grads)."""
  fwd = jax.jit(lambda x, w, b, m0, v0, c0, mask, seg: fn(x, w, b, m0, v0, c0, mask, seg)[0])

  @jax.jit
  def fwd_bwd(x, w, b, m0, v0, c0, mask, seg, cts):
    out, pullback = jax.vjp(lambda *a: fn(*a, c0, mask, seg), x, w, b, m0, v0)
    return out, pullback(cts)
  return fwd, fwd_bwd


def median_time(f, *args, warmup: int, iters: int, pipeline: int = 1) -> float:
  """Median over iters samples of (time of `pipeline` back-to-back calls) / pipeline."""
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    out = [f(*args) for _ in range(pipeline)]
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / pipeline)
  return statistics.median(times)


def rel(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def errors(result, truth) -> dict:
  (y, mean, var), grads = result
  (y_t, mean_t, var_t), grads_t = truth
  out = {"y": rel(y, y_t), "mean": rel(mean, mean_t), "var": rel(var, var_t)}
  for name, g, gt in zip(("dx", "dw", "db", "dmean0", "dvar0"), grads, grads_t):
    out[name] = rel(g, gt)
  return out


def memory_floor(x, dy, warmup, iters, pipeline=1):
  """Times of fused elementwise passes with the kernel's traffic: (fwd, bwd)."""
  fwd = jax.jit(lambda x: (x.astype(jnp.float32) * 1.5 + 0.5).astype(x.dtype))
  bwd = jax.jit(lambda x, dy: (x.astype(jnp.float32) * dy.astype(jnp.float32) + 0.5).astype(x.dtype))
  return (median_time(fwd, x, warmup=warmup, iters=iters, pipeline=pipeline),
          median_time(bwd, x, dy, warmup=warmup, iters=iters, pipeline=pipeline))


def check_shape(shape: Shape, configs, args) -> list[dict]:
  x, w, b, mask, seg, state, cts = make_inputs(shape)
  common = (w, b, state.mean, state.var, state.count, mask, seg)
  itemsize = jnp.dtype(shape.dtype).itemsize
  n = shape.batch * shape.length * shape.dim
  print(f"\n=== {shape} ===", flush=True)

  # Truth: the XLA op in float32 on the same (rounded) inputs.
  _, truth_fb = forward_and_vjp(op_fn("xla", shape, None, args.interpret))
  f32_cts = (cts[0].astype(jnp.float32), cts[1], cts[2])
  truth = truth_fb(x.astype(jnp.float32), *common, f32_cts)

  rows = []
  runs = [("xla", None)] * (not args.skip_xla) + [("pallas", c) for c in configs]
  for kind, config in runs:
    name = "xla associative" if kind == "xla" else describe(config)
    row = {"shape": str(shape), "impl": name}
    try:
      fwd, fwd_bwd = forward_and_vjp(op_fn(kind, shape, config, args.interpret))
      result = fwd_bwd(x, *common, cts)
      row.update(errors(result, truth))
      row["fwd_ms"] = 1e3 * median_time(fwd, x, *common, warmup=args.warmup, iters=args.iters)
      row["fwdbwd_ms"] = 1e3 * median_time(fwd_bwd, x, *common, cts, warmup=args.warmup,
                                           iters=args.iters)
      row["fwd_pipe_ms"] = 1e3 * median_time(fwd, x, *common, warmup=1, iters=args.iters,
                                             pipeline=args.pipeline)
      row["fwdbwd_pipe_ms"] = 1e3 * median_time(fwd_bwd, x, *common, cts, warmup=1,
                                                iters=args.iters, pipeline=args.pipeline)
      row["fwd_GBps"] = 2 * n * itemsize / row["fwd_ms"] / 1e6
      row["fwdbwd_GBps"] = 5 * n * itemsize / row["fwdbwd_ms"] / 1e6
    except Exception as e:  # Report and continue with the next configuration.
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      if args.verbose:
        traceback.print_exc()
    print(format_row(row), flush=True)
    rows.append(row)

  floor_f, floor_b = memory_floor(x, cts[0], args.warmup, args.iters)
  pipe_f, pipe_b = memory_floor(x, cts[0], args.warmup, args.iters, args.pipeline)
  print(f"memory floor (fused elementwise, same bytes): fwd {1e3 * floor_f:.3f} ms, "
        f"fwd+bwd {1e3 * (floor_f + floor_b):.3f} ms "
        f"({2 * n * itemsize / floor_f / 1e9:.0f} GB/s fwd); pipelined fwd {1e3 * pipe_f:.3f} ms, "
        f"fwd+bwd {1e3 * (pipe_f + pipe_b):.3f} ms ({2 * n * itemsize / pipe_f / 1e9:.0f} GB/s)",
        flush=True)
  rows.append({"shape": str(shape), "impl": "memory floor", "fwd_ms": 1e3 * floor_f,
               "fwdbwd_ms": 1e3 * (floor_f + floor_b), "fwd_pipe_ms": 1e3 * pipe_f,
               "fwdbwd_pipe_ms": 1e3 * (pipe_f + pipe_b)})
  return rows


def _tiled_setup(shape: Shape, config: K.KernelConfig, args) -> types.SimpleNamespace:
  """Inputs, spec, flags and the whole tiled forward / backward shared by both breakdowns."""
  x, w, b, mask, seg, state, (dy, dmean, dvar) = make_inputs(shape)
  batch, length, dim = x.shape
  groups = shape.groups
  k = dim // groups
  spec = K._make_spec(batch, length, dim, groups, 1e-5, args.interpret, config, "triton",
                      mask is not None or seg is not None, seg is not None)
  valid = jnp.ones((batch, length), jnp.bool_) if mask is None else ~mask
  reset = tsn.reset_flags(seg, batch, length)
  flags = (jnp.where(valid, K._VALID, 0) | jnp.where(reset, K._RESET, 0)).astype(jnp.int32)
  x4, dy4 = x.reshape(batch, length, groups, k), dy.reshape(batch, length, groups, k)
  w_hat, bias = (w + 1.0).reshape(groups, k), b.reshape(groups, k)
  per = lambda a: a.reshape(-1)
  n0 = jnp.repeat(state.count.astype(jnp.float32), groups)
  stats0 = (n0, per(state.mean), per(state.var))
  fwd = jax.jit(lambda x4, w, b, *s: K._tiled_forward(spec, x4, w, b, *s, flags))
  y4, mu_end, var_end, saved = fwd(x4, w_hat, bias, *stats0)
  bwd = jax.jit(lambda x4, dy4, w, saved, gm, gv: K._tiled_backward(spec, x4, dy4, w, saved, gm, gv,
                                                                    flags))
  d = spec.dims
  f = None if not d.has_flags else flags
  return types.SimpleNamespace(**{name: value for name, value in locals().items()
                                  if name not in ("args", "shape", "config")})


def _time_parts(parts: dict, shape: Shape, config: K.KernelConfig, args) -> list[dict]:
  """Pipelined median of each (fn, args) in `parts`; a failing part is reported, not fatal."""
  rows = []
  print(f"  breakdown of {describe(config)} (pipelined, ms):", flush=True)
  for name, (fn, fargs) in parts.items():
    try:
      ms = 1e3 * median_time(fn, *fargs, warmup=2, iters=args.iters, pipeline=args.pipeline)
      print(f"    {name:<24} {ms:8.4f}", flush=True)
      rows.append({"shape": str(shape), "impl": describe(config), "part": name, "ms": ms})
    except Exception as e:  # Report and continue.
      print(f"    {name:<24} FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
      if args.verbose:
        traceback.print_exc()
  return rows


def breakdown(shape: Shape, config: K.KernelConfig, args) -> list[dict]:
  """Pipelined time of each kernel of the tiled design (and the XLA glue) on its own."""
  t = _tiled_setup(shape, config, args)
  spec, d, f, x4, dy4, w_hat, bias, per = t.spec, t.d, t.f, t.x4, t.dy4, t.w_hat, t.bias, t.per
  fwd, bwd, saved, stats0, dmean, dvar = t.fwd, t.bwd, t.saved, t.stats0, t.dmean, t.dvar
  batch, groups = t.batch, t.groups
  moments = config.tiled.backward == "steps"
  parts = {
      "fwd (3 kernels)": (fwd, (x4, w_hat, bias, *stats0)),
      "bwd (3 kernels + XLA)": (bwd, (x4, dy4, w_hat, saved, per(dmean), per(dvar))),
      "fwd summary": (jax.jit(lambda x4: K._tile_call(
          spec, functools.partial(K._tiled_fwd_summary_kernel, dims=d, moments=moments),
          (x4, f), ("seq", "flags"), ("tstat",) * 3 + ("step",) * (2 * moments), x4.dtype,
          "fwd_summary")), (x4,)),
      "fwd scan": (jax.jit(lambda cn, cmu, cvar, a, b_, c: K._scan_call(
          spec, K._tiled_fwd_scan_kernel, (cn, cmu, cvar), K._tile_resets(spec, f), (a, b_, c),
          3, 3, "fwd_scan")), (*saved[:3], *(s.reshape(batch, groups) for s in stats0))),
      "fwd main": (jax.jit(lambda x4, w, b, cn, cmu, cvar: K._tile_call(
          spec, functools.partial(K._tiled_fwd_kernel, dims=d, eps=spec.eps),
          (x4, w, b, cn, cmu, cvar, f), ("seq", "feat", "feat", "tstat", "tstat", "tstat", "flags"),
          ("seq",), x4.dtype, "fwd_main")), (x4, w_hat, bias, *saved[:3])),
      "bwd summary": (jax.jit(lambda x4, dy4, w, cn, cmu, cvar: K._tile_call(
          spec, functools.partial(K._tiled_bwd_summary_kernel, dims=d, eps=spec.eps),
          (x4, dy4, w, cn, cmu, cvar, f), ("seq", "seq", "feat", "tstat", "tstat", "tstat", "flags"),
          ("tstat",) * 3, x4.dtype, "bwd_summary")), (x4, dy4, w_hat, *saved[:3])),
      "bwd scan": (jax.jit(lambda a, b_, c, gm, gv: K._scan_call(
          spec, K._tiled_bwd_scan_kernel, (a, b_, c), K._tile_resets(spec, f), (gm, gv), 2, 2,
          "bwd_scan")), (*saved[:3], dmean, dvar)),
      "bwd main": (jax.jit(lambda x4, dy4, w, cn, cmu, cvar, um, uv: K._tile_call(
          spec, functools.partial(K._tiled_bwd_kernel, dims=d, eps=spec.eps),
          (x4, dy4, w, cn, cmu, cvar, um, uv, f),
          ("seq", "seq", "feat", "tstat", "tstat", "tstat", "tstat", "tstat", "flags"),
          ("seq", "partial", "partial"), x4.dtype, "bwd_main")),
          (x4, dy4, w_hat, *saved[:3], saved[1], saved[2])),
  }
  return _time_parts(parts, shape, config, args)


def steps_breakdown(shape: Shape, config: K.KernelConfig, args) -> list[dict]:
  """Pipelined time of each kernel of the step-wise backward (TiledConfig.backward="steps")."""
  t = _tiled_setup(shape, config, args)
  spec, f, x4, dy4, w_hat, bias, per = t.spec, t.f, t.x4, t.dy4, t.w_hat, t.bias, t.per
  fwd, bwd, saved, stats0, dmean, dvar = t.fwd, t.bwd, t.saved, t.stats0, t.dmean, t.dvar
  cn, cmu, cvar, n_end, m, v = saved
  pd, sd = K._pass_dims(spec), K._steps_dims(spec)
  per_program = min(spec.config.tiled.pass_tiles, pd.tiles)
  ad = K._pass_dims(spec, per_program)
  warps = spec.config.tiled.scan_warps
  sums = jax.jit(lambda x4, dy4, w: K._tile_call(
      spec, functools.partial(K._steps_bwd_sums_kernel, dims=pd), (x4, dy4, w),
      ("seq", "seq", "feat"), ("step", "step"), x4.dtype, "sums", dims=pd))
  s1, s3 = sums(x4, dy4, w_hat)
  step_kinds = ("step",) * 4 + ("tstat",) * 3

  def adjoint(summary, *a):
    kinds = step_kinds + ("tstat", "tstat") * (not summary) + ("flags",)
    outs = ("tstat",) * 3 if summary else ("step",) * 4
    return K._tile_call(spec, functools.partial(K._steps_bwd_adjoint_kernel, dims=sd, eps=spec.eps,
                                                summary=summary),
                        (*a, f), kinds, outs, x4.dtype, "adjoint", dims=sd, warps=warps)
  maps_fn = jax.jit(functools.partial(adjoint, True))
  maps = maps_fn(m, v, s1, s3, cn, cmu, cvar)
  resets = K._tile_resets(spec, f)
  scan_fn = jax.jit(lambda maps, gm, gv: K._chain_tile_maps(spec, maps, n_end, resets, gm, gv))
  u_mu, u_var, _, _ = scan_fn(maps, per(dmean), per(dvar))
  coef_fn = jax.jit(functools.partial(adjoint, False))
  coefs = coef_fn(m, v, s1, s3, cn, cmu, cvar, u_mu, u_var)
  apply_fn = jax.jit(lambda x4, dy4, w, *c: K._tile_call(
      spec, functools.partial(K._steps_bwd_apply_kernel, dims=pd, per_program=per_program),
      (x4, dy4, w, *c), ("seq", "seq", "feat") + ("step",) * 4, ("seq", "partial", "partial"),
      x4.dtype, "apply", dims=ad))
  parts = {
      "fwd (3 kernels)": (fwd, (x4, w_hat, bias, *stats0)),
      "bwd (5 kernels + XLA)": (bwd, (x4, dy4, w_hat, saved, per(dmean), per(dvar))),
      "bwd sums": (sums, (x4, dy4, w_hat)),
      "bwd maps": (maps_fn, (m, v, s1, s3, cn, cmu, cvar)),
      "bwd scan": (scan_fn, (maps, per(dmean), per(dvar))),
      "bwd coefficients": (coef_fn, (m, v, s1, s3, cn, cmu, cvar, u_mu, u_var)),
      "bwd apply": (apply_fn, (x4, dy4, w_hat, *coefs)),
  }
  return _time_parts(parts, shape, config, args)


def atomic_probe() -> list[dict]:
  """Compiles and runs tiny Pallas kernels with atomic adds (for single-pass look-back designs).

  Pallas (jax 0.10) lowers an atomic add of an integer *tensor* as tt.atomic_rmw fadd (it tests
  the value's type for IntegerType, which a tensor type is not); scalars lower as add. The
  look-back variants of branch tsn2 used a [1] int32 counter and failed to verify on the H200.
  Each case: OK with the result, or FAILED with the error."""
  from jax import lax
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  int32 = lambda v, shape=(): lax.full(shape, v, jnp.int32)

  def counter_scalar(c_ref, o_ref):
    zero = pl.program_id(0) * 0   # A traced index: the interpreter rejects a Python int here.
    o_ref[...] = plgpu.atomic_add(c_ref, (zero,), int32(1))

  def counter_tensor(c_ref, o_ref):
    o_ref[...] = plgpu.atomic_add(c_ref, (pl.ds(0, 1),), int32(1, (1,))).reshape(())

  def float_tensor(f_ref, o_ref):
    old = plgpu.atomic_add(f_ref, (pl.ds(0, 1), pl.ds(0, 4)), jnp.ones((1, 4), jnp.float32))
    o_ref[...] = jnp.sum(old).astype(jnp.int32)

  cases = [("int32 scalar counter", counter_scalar, jnp.zeros((1,), jnp.int32)),
           ("int32 [1] tensor counter", counter_tensor, jnp.zeros((1,), jnp.int32)),
           ("float32 [1, 4] tensor", float_tensor, jnp.zeros((1, 4), jnp.float32))]
  rows = []
  print("\n=== atomic probe (64 programs each) ===")
  for name, kernel, arg in cases:
    row = {"shape": "atomic probe", "impl": name}
    try:
      full = pl.BlockSpec(arg.shape, lambda p: (0,) * arg.ndim)
      out = pl.pallas_call(kernel, grid=(64,), in_specs=[full],
                           out_specs=pl.BlockSpec((None,), lambda p: (p,)),
                           out_shape=jax.ShapeDtypeStruct((64,), jnp.int32),
                           compiler_params=plgpu.CompilerParams(num_warps=4))(arg)
      values = sorted(np.asarray(out).tolist())
      row["result"] = f"old values {values[:3]}..{values[-2:]}"
    except Exception as e:  # Report and continue.
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    print(f"  {name:<28} {row.get('result') or 'FAILED ' + row['error']}", flush=True)
    rows.append(row)
  return rows


def describe(c: K.KernelConfig) -> str:
  if c.tiled is not None:
    t = c.tiled
    text = (f"tiled T{t.block_t} Gb{t.groups_per_block} "
            f"w{t.num_warps} scan C{t.scan_chunk} W{t.scan_groups} w{t.scan_warps}")
    if t.backward == "steps":
      text += (f" steps S{t.step_groups} pass T{t.pass_block_t or t.block_t}"
               f" Gb{t.pass_groups or t.groups_per_block} R{t.pass_tiles}")
    return text + " groups-fastest" * t.groups_fastest
  return (f"pallas T{c.block_t} w{c.num_warps} s{c.num_stages} split{c.time_splits}"
          f"{' cumsum' if c.cumsum else ''} ahead{int(c.prefetch)}")


def format_row(row: dict) -> str:
  if "error" in row:
    return f"  {row['impl']:<44} FAILED {row['error']}"
  errs = " ".join(f"{k}={row[k]:.1e}" for k in ("y", "mean", "var", "dx", "dw", "db", "dmean0",
                                                  "dvar0"))
  return (f"  {row['impl']:<44} fwd {row['fwd_ms']:7.3f} ms (pipe {row['fwd_pipe_ms']:7.3f}, "
          f"{row['fwd_GBps']:5.0f} GB/s)  fwd+bwd {row['fwdbwd_ms']:7.3f} ms (pipe "
          f"{row['fwdbwd_pipe_ms']:7.3f}, {row['fwdbwd_GBps']:5.0f} GB/s)  | rel err {errs}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cpu", action="store_true", help="tiny shapes, interpreted kernels")
  parser.add_argument("--sweep", choices=sorted(SWEEPS), default="default",
                      help="kernel configurations to time on the first (target) shape")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--pipeline", type=int, default=10,
                      help="back-to-back calls per sample of the pipelined times")
  parser.add_argument("--shapes", choices=("all", "target", "target_only"), default="all",
                      help="target: only B1 L32768 D4096 G64 bf16 (plus a small odd-shape check "
                           "of the sweep's first tiled configurations); target_only: without it")
  parser.add_argument("--breakdown", action="store_true",
                      help="time the tiled design's kernels one by one on the target shape")
  parser.add_argument("--json", help="write all rows to this JSON file")
  parser.add_argument("--skip-xla", action="store_true",
                      help="do not time the XLA op (its float32 run is still the reference)")
  parser.add_argument("--atomic-probe", action="store_true",
                      help="first compile and run tiny kernels with atomic adds (see atomic_probe)")
  parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
  args = parser.parse_args()
  args.interpret = args.cpu
  if args.cpu:
    args.iters, args.warmup = min(args.iters, 2), 1
  print(f"jax {jax.__version__}; devices: {jax.devices()}")
  shapes = CPU_SHAPES if args.cpu else GPU_SHAPES
  if args.shapes == "target" and not args.cpu:
    tiled = [c for c in SWEEPS[args.sweep] if c.tiled is not None][:1]
    tiled += STEPS_BREAKDOWN if args.sweep == "steps" else []
    tiled += SWEEPS["launch"][:1] if args.sweep == "launch" else []
    shapes = [shapes[0], dataclasses.replace(shapes[-1], extra=tuple(tiled))]
  if args.shapes == "target_only" and not args.cpu:
    shapes = shapes[:1]
  rows = atomic_probe() if args.atomic_probe and not args.cpu else []
  for i, shape in enumerate(shapes):
    if args.cpu:
      configs = CPU_SWEEP
    else:
      sweep = SWEEPS[args.sweep] if i == 0 else []
      configs = [DEFAULT] + [c for c in (*sweep, *shape.extra) if c != DEFAULT]
    rows += check_shape(shape, configs, args)
    if args.breakdown and i == 0 and args.sweep == "launch" and not args.cpu:
      for config in LAUNCH_BREAKDOWN:
        rows += breakdown(shape, config, args) + steps_breakdown(shape, config, args)
    elif args.breakdown and i == 0:
      for config in (CPU_SWEEP[2:3] if args.cpu else BREAKDOWN[:1 if args.sweep == "steps" else 2]):
        rows += breakdown(shape, config, args)
      if args.sweep == "steps" or args.cpu:
        for config in (CPU_SWEEP[3:] if args.cpu else STEPS_BREAKDOWN):
          rows += steps_breakdown(shape, config, args)
    write_json(args, rows)   # After every shape: a run cut short keeps what it measured.

  print("\n=== summary (fwd+bwd, fastest first, per shape) ===")
  for shape in shapes:
    ok = sorted((r for r in rows if r["shape"] == str(shape) and "y" in r),
                key=lambda r: r["fwdbwd_pipe_ms"])
    print(f"{shape}")
    for r in ok[:8]:
      print(f"  {r['impl']:<44} fwd {r['fwd_ms']:.3f} ms (pipe {r['fwd_pipe_ms']:.3f})  fwd+bwd "
            f"{r['fwdbwd_ms']:.3f} ms (pipe {r['fwdbwd_pipe_ms']:.3f})  "
            f"max rel err {max(r[k] for k in ('y', 'dx', 'dw', 'db')):.1e}")
  failed = [r for r in rows if "error" in r]
  print(f"{len(failed)} failed configuration(s)" + (": see FAILED lines above" if failed else ""))
  write_json(args, rows)
  if args.json:
    print(f"wrote {args.json}")


def write_json(args, rows):
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "rows": rows}, f,
                indent=1)


if __name__ == "__main__":
  main()
