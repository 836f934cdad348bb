"""Probe: can a Pallas Triton kernel run CEMA's per-channel block products on tensor cores?

The blocked form of CEMA (SPEC §2, `ops.cema.cema_blocked`) applies, in blocks of T steps, a per-channel
causal Toeplitz matrix Toe_d[t, s] = k_d[t - s] to that channel's [C = L / T, T] matrix of blocks:
y[c T + t, d] = sum_{s <= t} k_d[t - s] x[c T + s, d] (the in-block part of the forward; the states
between blocks add a rank-2N term). XLA cannot run it well (session 12: its transposes of x into
channel-major order move 2.1-2.3 TB/s, its per-channel batched matmuls 36-68 TFLOP/s), and a Mosaic
GPU kernel with one chain of small wgmmas per SM took 5.1 ms (session 15). Pallas' Triton `dot` has
no batch dimension, so this probe gives each channel its own 2-D dot inside one program:

  split    load a [Ct blocks, T, Dc channels] tile of x in its natural [B, L, D] layout (coalesced
           rows of Dc channels), cut it into Dc [Ct, T] channel tiles with `jnp.split` on the last
           axis (Triton `split`), one dot per channel, `jnp.stack` the Dc results back, store
  strided  load each channel's [Ct, T] tile straight from memory (a stride-D gather) and store it
           the same way, no split or stack

x is bfloat16 (exact in bf16) and the float32 Toeplitz matrix is split into three bf16 parts
(hi + mid + lo), so three bf16 tensor-core dots give the float32 product to within rounding. Each
program builds its channels' Toeplitz matrices from k [D, T] (a gather of T^2 values per channel).

Timed in the same run: the Pallas CEMA forward at the same shape (all of it: summaries, combine,
scan), and an elementwise pass that reads x (bf16) and writes y (float32) of the same sizes (the memory floor of a
kernel with this traffic). Values: max |y - y_ref| / max |y_ref| against a float32 HIGHEST einsum.

  python experiments/gpu_checks/probe_cema_toeplitz_triton.py --json "$OUT/probe_toeplitz.json"
  python experiments/gpu_checks/probe_cema_toeplitz_triton.py --smoke   # CPU interpreter, tiny shape
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from experiments.benchmarks import harness  # noqa: E402
from kernels_pallas.triton_backend import plgpu  # noqa: E402

F32 = jnp.float32
BF16 = jnp.bfloat16


def _split3(a, interpret=False):
  """float32 a = hi + mid + lo, three bf16 parts.

  In the interpreter the kernel body runs as XLA code, and XLA on a GPU may keep a float32 value
  through a bf16 round trip (excess precision), which would leave the remainders zero; there the
  roundings are made explicit with reduce_precision (which Pallas' Triton lowering does not have)."""
  to_bf16 = (lambda v: lax.reduce_precision(v, exponent_bits=8, mantissa_bits=7)) if interpret else (
      lambda v: v.astype(BF16).astype(F32))
  hi = to_bf16(a)
  r = a - hi
  mid = to_bf16(r)
  lo = r - mid
  return hi.astype(BF16), mid.astype(BF16), lo.astype(BF16)


def _stack_last(parts):
  """[Ct, T] tiles p_0..p_(n-1) (n a power of two) -> [Ct, T, n] with [..., j] = p_j, by pairwise stacks
  on the last axis (the only stack Pallas' Triton lowering has)."""
  if len(parts) == 2:
    return jnp.stack(parts, axis=-1)
  even, odd = _stack_last(parts[0::2]), _stack_last(parts[1::2])  # [..., m] = p_(2m), p_(2m+1)
  both = jnp.stack([even, odd], axis=-1)  # [..., m, j] = p_(2m + j)
  return both.reshape(*both.shape[:-2], both.shape[-2] * 2)


def _channel_product(xd, kd_row_fn, block, interpret):
  """xd: [Ct, T] bf16 -> [Ct, T] float32, y[c, t] = sum_{s <= t} k[t - s] x[c, s]."""
  lag = jnp.arange(block)[:, None] - jnp.arange(block)[None, :]  # [t, s]
  toe = jnp.where(lag >= 0, kd_row_fn(jnp.maximum(lag, 0)), 0.0)
  out = None
  for part in _split3(toe, interpret):
    term = jnp.dot(xd, part.T, preferred_element_type=F32)
    out = term if out is None else out + term
  return out


def _kernel(x_ref, k_ref, y_ref, *, mode, dc, block, ct, interpret):
  """x_ref, y_ref: [Ct, T, Dc] blocks; k_ref: [Dc, T]."""
  if mode == "split":
    tiles = [t.reshape(ct, block) for t in jnp.split(x_ref[...], dc, axis=-1)]
  ys = []
  for d in range(dc):
    xd = tiles[d] if mode == "split" else x_ref[:, :, d]
    y = _channel_product(xd, lambda idx, d=d: k_ref[d, idx], block, interpret)
    if mode == "split":
      ys.append(y)
    else:
      y_ref[:, :, d] = y.astype(y_ref.dtype)
  if mode == "split":
    y_ref[...] = _stack_last(ys).astype(y_ref.dtype)


def toeplitz_pallas(x, k, *, mode="split", block=64, ct=64, dc=16, num_warps=4, interpret=False):
  """x: [B, L, D] bf16, k: [D, T] float32 -> y [B, L, D] float32 (as cema_pallas' y), the in-block product."""
  batch, length, dim = x.shape
  chunks = length // block
  xv = x.reshape(batch, chunks, block, dim)
  spec = pl.BlockSpec((None, ct, block, dc), lambda b, j, i: (b, i, 0, j))
  kernel = functools.partial(_kernel, mode=mode, dc=dc, block=block, ct=ct, interpret=interpret)
  y = pl.pallas_call(
      kernel, grid=(batch, dim // dc, chunks // ct),
      in_specs=[spec, pl.BlockSpec((dc, block), lambda b, j, i: (j, 0))], out_specs=spec,
      out_shape=jax.ShapeDtypeStruct(xv.shape, F32), interpret=interpret,
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      name=f"cema_toeplitz_{mode}")(xv, k)
  return y.reshape(batch, length, dim)


def toeplitz_reference(x, k):
  """The same product in float32 XLA (HIGHEST): y [B, L, D] float32."""
  batch, length, dim = x.shape
  block = k.shape[1]
  xv = x.astype(F32).reshape(batch, length // block, block, dim)
  lag = jnp.arange(block)[:, None] - jnp.arange(block)[None, :]
  toe = jnp.where(lag >= 0, k[:, jnp.maximum(lag, 0)], 0.0)  # [D, t, s]
  y = jnp.einsum("dts,bcsd->bctd", toe, xv, precision=jax.lax.Precision.HIGHEST)
  return y.reshape(batch, length, dim)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--smoke", action="store_true", help="CPU interpreter at a tiny shape")
  parser.add_argument("--configs", default="split:64:64:16:4,split:64:64:8:4,strided:64:64:16:4,split:128:32:8:4",
                      help="mode:T:Ct:Dc:warps,...")
  parser.add_argument("--skip-cema", action="store_true", help="do not time the Pallas CEMA forward (its compile is slow)")
  args = parser.parse_args()
  batch, length, dim = (1, 512, 32) if args.smoke else (1, 32768, 4096)
  x = jax.random.normal(jax.random.key(0), (batch, length, dim), F32).astype(BF16)
  report = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "shape": [batch, length, dim], "rows": []}

  def emit(row):
    report["rows"].append(row)
    print(json.dumps(row), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(report, f, indent=1)

  if not args.smoke:
    from kernels_pallas import cema as K  # the Pallas forward at the same shape, for scale
    from megalodon_jax.ops.cema import cema_coefficients
    keys = jax.random.split(jax.random.key(1), 5)
    ndim = 16
    coeffs = cema_coefficients(jax.random.normal(keys[0], (dim, ndim, 1)), jax.random.normal(keys[1], (dim, ndim, 1)),
                               jax.random.normal(keys[2], (dim, 1, 1)), 0.5 * jax.random.normal(keys[3], (dim, ndim, 2)))
    omega = jax.random.normal(keys[4], (dim,))
    if not args.skip_cema:
      fwd = jax.jit(lambda x: K.cema_pallas(x, coeffs, omega))
      emit({"case": "cema_pallas forward", **_timing(fwd, x)})
    copy = jax.jit(lambda x: x.astype(F32) * 1.5)
    emit({"case": "elementwise x -> y (bf16 in, float32 out)", **_timing(copy, x)})

  for item in args.configs.split(","):
    mode, block, ct, dc, warps = item.split(":")
    block, ct, dc, warps = int(block), int(ct), int(dc), int(warps)
    if args.smoke:
      ct = min(ct, length // block)
    row = {"case": f"toeplitz {mode}", "T": block, "Ct": ct, "Dc": dc, "num_warps": warps}
    try:
      k = 0.3 * jax.random.normal(jax.random.key(2), (dim, block), F32) * (0.97 ** jnp.arange(block))
      fn = jax.jit(functools.partial(toeplitz_pallas, mode=mode, block=block, ct=ct, dc=dc, num_warps=warps,
                                     interpret=args.smoke))
      start = time.perf_counter()
      y = np.asarray(jax.block_until_ready(fn(x, k)), np.float64)
      row["compile_s"] = time.perf_counter() - start
      ref = np.asarray(jax.jit(toeplitz_reference)(x, k), np.float64)
      row["rel_err_vs_f32_einsum"] = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
      if not args.smoke:
        row.update(_timing(fn, x, k))
        # tensor-core work: 3 bf16 dots of [Ct, T] x [T, T] per channel and block tile
        row["tflops_bf16"] = 3 * 2 * batch * length * dim * block / (row["median_ms"] * 1e9)
    except Exception as e:  # noqa: BLE001 - a probe reports and moves on
      row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
      traceback.print_exc()
    emit(row)


def _timing(fn, *args):
  t = harness.time_fn(fn, *args, warmup=2, iters=15, inner=10)
  return {"median_ms": t["median_ms"], "p10_ms": t["p10_ms"], "p90_ms": t["p90_ms"]}


if __name__ == "__main__":
  main()
