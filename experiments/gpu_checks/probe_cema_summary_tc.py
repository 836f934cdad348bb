"""Probe: CEMA chunk summaries on the tensor cores, as per-channel batched dots in Pallas (Triton).

    python experiments/gpu_checks/probe_cema_summary_tc.py --json /tmp/tc.json          # H200
    python experiments/gpu_checks/probe_cema_summary_tc.py --interpret --length 1024 --dim 64

The chunk summary S[c, n, d] = sum_l q[d, n]^(T - 1 - l) x[c T + l, d] is, per channel, a product
[C, T] x [T, N] (complex). Blocked by 16 steps it is Horner's rule over the blocks,
acc <- q^16 acc + X_b P with P[j, n] = q^(15 - j), and X_b P is a batched dot over the channels:
[Dt, C, 16] x [Dt, 16, N]. Pallas' own dot takes no batch dimension, so this probe registers a tiny
primitive whose Triton lowering is one 3-D tt.dot (Triton runs it as mma.sync, the channels spread
over the warps). x is bf16, so X_b is exact; P (float32-accurate powers) enters as three bf16 parts.
Each program loads a coalesced [C, 16, Dt] tile of x and transposes it in registers / shared memory.

Prints the summary kernel's time against the FMA summary kernel of kernels_pallas.cema at the same
shape in the same process, and both kernels' errors against a float64 reference on a slice.

Result (H200, session 23; experiments/results/gpu_checks/2026-11-30_nvidia-h200_probe_cema_summary_tc.json):
it computes the summaries as accurately as the FMA kernel, but no faster: 0.299-0.306 ms at its best
tiling (8 channels, 8 warps: one channel a warp) against 0.289-0.301 for the FMA kernel, and
0.45-0.64 ms at 4 warps. ncu at 4 warps: L1/TEX 96% busy, warps stalled on shared memory (MIO)
28 of every 35 cycles. Triton moves the x tile into the mma operand layout through shared memory
(the channels, x's contiguous axis, are the batch axis) and re-reads the loop-invariant power
tables with ldmatrix every block; with one bf16 part instead of three the 4-warp kernel ran at
0.37 against 0.61 ms, at 8 warps it did not change. Neither layout can be chosen from Pallas.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.extend.core import Primitive
from jax.interpreters import mlir

from kernels_pallas.triton_backend import plgpu

# ---- a batched dot primitive: acc + einsum("bmk,bkn->bmn", a, b), a / b bf16, acc float32 ----------

batched_dot_p = Primitive("megalodon_batched_dot")


def _batched_dot_impl(a, b, acc):
  return acc + jnp.einsum("bmk,bkn->bmn", a.astype(jnp.float32), b.astype(jnp.float32),
                          precision=lax.Precision.HIGHEST)


batched_dot_p.def_impl(_batched_dot_impl)
batched_dot_p.def_abstract_eval(lambda a, b, acc: jax.core.ShapedArray(acc.shape, jnp.float32))
mlir.register_lowering(batched_dot_p, mlir.lower_fun(_batched_dot_impl, multiple_results=False))


def _register_triton_rule():
  from jax._src.lib.triton import dialect as tt_dialect
  from jax._src.pallas.triton import lowering as triton_lowering

  def rule(ctx, a, b, acc):
    del ctx
    return tt_dialect.dot(a, b, acc)

  triton_lowering.triton_lowering_rules[batched_dot_p] = rule


_register_triton_rule()


def batched_dot(a, b, acc):
  """acc + a @ b per leading index: a [G, M, K] bf16, b [G, K, N] bf16, acc [G, M, N] f32."""
  return batched_dot_p.bind(a, b, acc)


# ---- the kernel ---------------------------------------------------------------------------------

_STEP = 16  # steps per Horner block (the mma's K)


def _summary_tc_kernel(x_ref, p_ref, q16_ref, re_ref, im_ref, *, block_d: int, steps: int,
                       reverse: bool, prefetch: int, nparts: int):
  """x_ref [B, C, T, D] bf16; p_ref [D, 6, 16, N] bf16 (re hi/mid/lo, im hi/mid/lo of P[j, n]);
  q16_ref [D, 2, N] f32; re_ref / im_ref [B, C, N, D] f32."""
  b, blk = pl.program_id(0), pl.program_id(1)
  d0 = blk * block_d
  parts = [p_ref[pl.ds(d0, block_d), k, :, :] for k in range(6)]  # [Dt, 16, N] each
  q16r = q16_ref[pl.ds(d0, block_d), 0, :][:, None, :]
  q16i = q16_ref[pl.ds(d0, block_d), 1, :][:, None, :]
  chunks = x_ref.shape[1]
  ndim = re_ref.shape[2]
  nblocks = steps // _STEP

  def load(i):
    i = jnp.minimum(i, nblocks - 1)  # the prefetch past the last block reloads it (unused)
    kb = nblocks - 1 - i if reverse else i
    return x_ref[b, :, pl.ds(kb * _STEP, _STEP), pl.ds(d0, block_d)]  # [C, 16, Dt]

  def body(i, carry):
    ar, ai, *tiles = carry
    tiles.append(load(i + prefetch))  # issued before this block's arithmetic, used `prefetch` later
    xa = jnp.transpose(tiles.pop(0), (2, 0, 1))  # [Dt, C, 16]
    tr = q16r * ar - q16i * ai
    ti = q16r * ai + q16i * ar
    for k in range(nparts - 1, -1, -1):  # smallest parts first
      tr = batched_dot(xa, parts[k], tr)
      ti = batched_dot(xa, parts[3 + k], ti)
    return (tr, ti, *tiles)

  zeros = jnp.zeros((block_d, chunks, ndim), jnp.float32)
  ar, ai, *_ = lax.fori_loop(0, nblocks, body, (zeros, zeros, *(load(i) for i in range(prefetch))))
  re_ref[b, :, :, pl.ds(d0, block_d)] = jnp.transpose(ar, (1, 2, 0))
  im_ref[b, :, :, pl.ds(d0, block_d)] = jnp.transpose(ai, (1, 2, 0))


def power_parts(q: np.ndarray, reverse: bool):
  """q [D, N] complex128 -> (parts [D, 6, 16, N] bf16, q16 [D, 2, N] f32). Forward: P[j] = q^(15-j);
  reverse (a summary walking the chunk backwards, sum_l q^l x_l): P[j] = q^j."""
  exps = np.arange(_STEP) if reverse else _STEP - 1 - np.arange(_STEP)
  table = q[:, None, :] ** exps[None, :, None]  # [D, 16, N]
  out = []
  for plane in (table.real, table.imag):
    hi = plane.astype(ml_dtypes.bfloat16)
    r1 = plane - hi.astype(np.float64)
    mid = r1.astype(ml_dtypes.bfloat16)
    lo = (r1 - mid.astype(np.float64)).astype(ml_dtypes.bfloat16)
    out += [hi, mid, lo]
  q16 = q ** _STEP
  return (jnp.asarray(np.stack(out, axis=1)),
          jnp.asarray(np.stack([q16.real, q16.imag], axis=1).astype(np.float32)))


def summary_tc(x, parts, q16, *, chunks: int, block_d: int, num_warps: int, reverse: bool,
               interpret: bool, prefetch: int = 1, nparts: int = 3):
  """nparts: bf16 parts of the powers taken (3: float32-accurate; fewer is an ablation only)."""
  """x [B, L, D] bf16 -> (re, im) [B, C, N, D] f32: every chunk's summary from a zero start."""
  batch, length, dim = x.shape
  ndim = parts.shape[-1]
  steps = length // chunks
  x4 = x.reshape(batch, chunks, steps, dim)
  kwargs = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=1)}
  plane = jax.ShapeDtypeStruct((batch, chunks, ndim, dim), jnp.float32)
  return pl.pallas_call(
      functools.partial(_summary_tc_kernel, block_d=block_d, steps=steps, reverse=reverse,
                        prefetch=prefetch, nparts=nparts),
      grid=(batch, dim // block_d), out_shape=(plane, plane), interpret=interpret,
      name="cema_summary_tc", **kwargs)(x4, parts, q16)


def reference(x: np.ndarray, q: np.ndarray, chunks: int, reverse: bool) -> np.ndarray:
  """float64: [B, C, N, D] complex."""
  batch, length, dim = x.shape
  steps = length // chunks
  exps = np.arange(steps) if reverse else steps - 1 - np.arange(steps)
  w = q[:, :, None] ** exps[None, None, :]  # [D, N, T]
  xs = x.astype(np.float64).reshape(batch, chunks, steps, dim)
  return np.einsum("dnt,bctd->bcnd", w, xs)


def median_call_ms(fn, *args, reps: int, inner: int) -> float:
  """Median over `reps` samples of `inner` back-to-back calls, after one warm-up call, in ms."""
  out = fn(*args)
  jax.block_until_ready(out)
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / inner * 1e3)
  return float(np.median(samples))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--length", type=int, default=32768)
  ap.add_argument("--dim", type=int, default=4096)
  ap.add_argument("--ndim", type=int, default=16)
  ap.add_argument("--chunks", type=int, default=16)
  ap.add_argument("--variants", default="8:4:1:3,8:4:2:3,16:4:1:3,16:4:2:3,16:8:1:3,32:8:1:3,4:4:2:3",
                  help="block_d:num_warps:prefetch:nparts,... (nparts < 3: a timing ablation, not accurate)")
  ap.add_argument("--interpret", action="store_true")
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--inner", type=int, default=10)
  ap.add_argument("--json", default="")
  ap.add_argument("--skip-fma", action="store_true", help="leave out the FMA kernel (for ncu)")
  args = ap.parse_args()

  rng = np.random.default_rng(0)
  mag = rng.uniform(0.9, 0.99995, (args.dim, args.ndim))
  theta = rng.uniform(0, np.pi, (args.dim, args.ndim))
  # Rounded to complex64 first: both kernels start from float32 q (q^2047 would otherwise carry
  # 2047 times q's own rounding into the comparison).
  q = (mag * np.exp(1j * theta)).astype(np.complex64).astype(np.complex128)
  x = jnp.asarray(rng.standard_normal((1, args.length, args.dim)).astype(ml_dtypes.bfloat16))
  check_d = min(args.dim, 256)
  ref = reference(np.asarray(x[:, :, :check_d]).astype(np.float64), q[:check_d], args.chunks, False)
  scale = np.abs(ref).max()
  rows = []

  # The FMA summaries of kernels_pallas.cema at its default tiling (all chunks, for a like-for-like).
  from kernels_pallas import cema as kc
  cfg = kc.default_config(1, args.length, args.dim, args.ndim)
  cfg = kc.dataclasses.replace(cfg, num_chunks=args.chunks)
  plan = kc._plan(args.length, cfg)
  qj = jnp.asarray(q.astype(np.complex64))

  def fma_summaries(x):
    (re, im), _ = kc._chunk_summary_planes(x, None, qj, cfg, plan, reverse=False, split=cfg.split,
                                           block_d=cfg.block_d, num_warps=cfg.num_warps,
                                           interpret=args.interpret, name="cema_fwd_chunk_states",
                                           all_chunks=True)
    return re, im

  fma = jax.jit(fma_summaries)
  re, im = (jnp.zeros((1, 1, 1, 1)),) * 2 if args.skip_fma else fma(x)
  got = (np.asarray(re) + 1j * np.asarray(im))  # [B, C, N, D] at summary_split=1
  err = float(np.abs(got[..., :check_d] - ref).max() / scale) if got.shape[2] == args.ndim else float("nan")
  ms = float("nan") if args.interpret or args.skip_fma else median_call_ms(fma, x, reps=args.reps, inner=args.inner)
  rows.append({"kernel": "fma (kernels_pallas.cema)", "ms": ms, "max_err_rel": err})
  print(f"{'fma':>12}: {ms:.4f} ms, max error / max|S| {err:.2e}", flush=True)

  parts, q16 = power_parts(q, reverse=False)
  for variant in args.variants.split(","):
    block_d, warps, prefetch, nparts = (int(v) for v in variant.split(":"))
    fn = jax.jit(functools.partial(summary_tc, chunks=args.chunks, block_d=block_d, num_warps=warps,
                                   reverse=False, interpret=args.interpret, prefetch=prefetch,
                                   nparts=nparts))
    try:
      re, im = fn(x, parts, q16)
      got = np.asarray(re) + 1j * np.asarray(im)
      err = float(np.abs(got[..., :check_d] - ref).max() / scale)
      ms = float("nan") if args.interpret else median_call_ms(fn, x, parts, q16, reps=args.reps, inner=args.inner)
    except Exception as e:  # noqa: BLE001 - a probe reports every variant
      print(f"{variant:>12}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
      rows.append({"kernel": f"tc {variant}", "error": f"{type(e).__name__}: {str(e)[:400]}"})
      continue
    rows.append({"kernel": f"tc block_d:warps:prefetch:nparts={variant}", "ms": ms, "max_err_rel": err})
    print(f"{variant:>12}: {ms:.4f} ms, max error / max|S| {err:.2e}", flush=True)

  # The reverse orientation (the backward's summaries walk their chunk from the end).
  parts_r, q16_r = power_parts(q, reverse=True)
  ref_r = reference(np.asarray(x[:, :, :check_d]).astype(np.float64), q[:check_d], args.chunks, True)
  block_d, warps, _, _ = (int(v) for v in args.variants.split(",")[0].split(":"))
  re, im = jax.jit(functools.partial(summary_tc, chunks=args.chunks, block_d=block_d, num_warps=warps,
                                     reverse=True, interpret=args.interpret))(x, parts_r, q16_r)
  err_r = float(np.abs((np.asarray(re) + 1j * np.asarray(im))[..., :check_d] - ref_r).max()
                / np.abs(ref_r).max())
  print(f"reverse {block_d}:{warps}: max error / max|S| {err_r:.2e}")
  rows.append({"kernel": f"tc reverse {block_d}:{warps}", "max_err_rel": err_r})
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "length": args.length,
                 "dim": args.dim, "ndim": args.ndim, "chunks": args.chunks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
