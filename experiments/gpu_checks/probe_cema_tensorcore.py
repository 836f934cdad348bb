"""Probe: can CEMA run on tensor cores? The blocked CEMA's pieces as XLA ops on an H200.

The Pallas scans are FP32-FMA bound (26 multiply-adds per step, channel and order). In blocks of
T steps every CEMA operator is a per-channel matrix applied to that channel's [C = L / T, T]
matrix of blocks (SPEC §2; `ops.cema.cema_blocked`): the in-block Toeplitz [T, T], the
into-state weights [T, 2N], the readout [2N, T]; the backward adds dY^T X ([T, T], whose
diagonal sums are the in-block cross-correlation of x and dy). x and dy are bf16, so a float32
weight split into three bf16 parts (hi + mid + lo) gives float32-exact products in three bf16
tensor-core matmuls. This probe times, in one run, with x channel-major ([D, C, T]):

  transpose   x [1, L, D] bf16 -> [D, C, T] and a float32 [D, C, T] back to [1, L, D] bf16
  toeplitz    Y = X Toe^T, three bf16 splits, float32 out                (2 D C T^2 * 3 flops)
  summaries   S = X W, W [T, 4N] (S and its q-derivative), three splits   (2 D C T 4N * 3)
  xcorr       M = X^T dY per channel, one bf16 matmul                     (2 D T^2 C)
  forward     a whole blocked forward in XLA (operators built from the coefficients, block
              states by lax.associative_scan, readout with HIGHEST) against the Pallas kernel
              in the same run, with the largest relative difference of y

  python experiments/gpu_checks/probe_cema_tensorcore.py --json "$OUT/probe.json"
  python experiments/gpu_checks/probe_cema_tensorcore.py --cpu --length 1024 --dim 64   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
if "--cpu" in sys.argv:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from experiments.benchmarks import harness  # noqa: E402
from experiments.gpu_checks.check_cema import make_params  # noqa: E402
from kernels_pallas import cema as K  # noqa: E402
from megalodon_jax.ops.cema import cema_coefficients  # noqa: E402

F32 = jnp.float32
BF16 = jnp.bfloat16


def split3(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """float32 w = hi + mid + lo (bf16 each) to within float32 rounding."""
  hi = w.astype(BF16)
  r = w - hi.astype(F32)
  mid = r.astype(BF16)
  lo = (r - mid.astype(F32)).astype(BF16)
  return hi, mid, lo


def bdot(spec: str, a: jax.Array, w_parts) -> jax.Array:
  """sum over the bf16 parts of einsum(spec, a, part) in float32."""
  out = None
  for part in w_parts:
    term = jnp.einsum(spec, a, part, preferred_element_type=F32)
    out = term if out is None else out + term
  return out


def blocked_forward(x: jax.Array, p: dict, block: int) -> jax.Array:
  """y [1, L, D] float32 by the blocked form (channel-major, bf16x3 for the x operands)."""
  coeffs = cema_coefficients(p["alpha"], p["delta"], p["theta"], p["gamma"])
  q, pp, eta = coeffs.q, coeffs.p, coeffs.eta  # [D, N] complex
  _, length, dim = x.shape
  count = length // block
  c = eta * pp  # folded state s = h / p, y = Re(sum c s) + omega x
  k = jnp.arange(block + 1)
  pw = q[..., None] ** k  # [D, N, T + 1]: q^0..q^T
  kern = jnp.real(jnp.einsum("dn,dnk->dk", c, pw[..., :block]))  # [D, T]
  tau = jnp.arange(block)
  lag = tau[:, None] - tau[None, :]
  toe = jnp.where(lag >= 0, kern[:, jnp.clip(lag, 0, block - 1)], 0.0)  # [D, tau, sigma]
  toe = toe + jnp.eye(block) * p["omega"][:, :, None]
  into = pw[..., block - 1 - tau]  # [D, N, sigma]: q^(T-1-sigma)
  w = jnp.concatenate([jnp.real(into), jnp.imag(into)], axis=1)  # [D, 2N, sigma]
  read = c[..., None] * pw[..., 1:]  # [D, N, tau]: c q^(tau+1)
  r = jnp.concatenate([jnp.real(read), -jnp.imag(read)], axis=1)  # [D, 2N, tau]
  xt = x[0].T.reshape(dim, count, block)  # [D, C, T] bf16
  y = bdot("dcs,dts->dct", xt, split3(toe))
  s = bdot("dcs,djs->dcj", xt, split3(w))  # [D, C, 2N]
  order = q.shape[1]
  s = lax.complex(s[..., :order], s[..., order:])  # [D, C, N]
  decay = jnp.broadcast_to(pw[:, None, :, block], s.shape)

  def combine(first, second):
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2

  _, states = lax.associative_scan(combine, (decay, s), axis=1)  # state after each block
  prev = jnp.concatenate([jnp.zeros_like(states[:, :1]), states[:, :-1]], axis=1)
  prev = jnp.concatenate([jnp.real(prev), jnp.imag(prev)], axis=-1)  # [D, C, 2N]
  y = y + jnp.einsum("dcj,djt->dct", prev, r, precision=lax.Precision.HIGHEST)
  return y.reshape(dim, length).T[None]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cpu", action="store_true")
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--order", type=int, default=16)
  parser.add_argument("--blocks", type=int, nargs="*", default=[64, 128])
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  dim, length, order = args.dim, args.length, args.order
  x = jnp.asarray(rng.normal(size=(1, length, dim)), BF16)
  p = make_params(dim, order, seed=0)
  rows = []

  def timed(name, fn, *fargs, flops=None, nbytes=None, **extra):
    row = dict(piece=name, **extra)
    try:
      stats = harness.time_fn(jax.jit(fn), *fargs, warmup=2, iters=args.iters)
      ms = stats["median_ms"]
      row["ms"] = round(ms, 4)
      if flops:
        row["tflops"] = round(flops / ms / 1e9, 1)
      if nbytes:
        row["tb_s"] = round(nbytes / ms / 1e9, 2)
    except Exception as err:  # a failed piece is a row, not the end of the probe
      row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
      traceback.print_exc()
    print(row, flush=True)
    rows.append(row)
    return row

  cfg = K.default_config(1, length, dim, order)

  def pallas_fwd(x, p):
    coeffs = cema_coefficients(p["alpha"], p["delta"], p["theta"], p["gamma"])
    return K.cema_pallas(x, coeffs, p["omega"], config=cfg, interpret=args.cpu)

  timed("pallas forward (the scan, default config)", pallas_fwd, x, p)
  y_ref = jax.jit(pallas_fwd)(x, p)
  for block in args.blocks:
    count = length // block
    xt = x[0].T.reshape(dim, count, block)
    timed("transpose x -> [D, C, T]", lambda x: x[0].T.reshape(dim, count, block), x, block=block,
          nbytes=2 * x.size * 2)
    yt = jnp.asarray(rng.normal(size=(dim, count, block)), F32)
    timed("transpose y f32 [D, C, T] -> [1, L, D] bf16", lambda y: y.reshape(dim, length).T[None].astype(BF16),
          yt, block=block, nbytes=x.size * 6)
    toe = split3(jnp.asarray(rng.normal(size=(dim, block, block)), F32))
    timed("toeplitz Y = X Toe^T (bf16 x3)", lambda a, w: bdot("dcs,dts->dct", a, w), xt, toe, block=block,
          flops=2 * dim * count * block * block * 3)
    w = split3(jnp.asarray(rng.normal(size=(dim, 4 * order, block)), F32))
    timed("summaries S = X W, 4N columns (bf16 x3)", lambda a, w: bdot("dcs,djs->dcj", a, w), xt, w, block=block,
          flops=2 * dim * count * block * 4 * order * 3)
    dyt = jnp.asarray(rng.normal(size=(dim, count, block)), BF16)
    timed("xcorr M = X^T dY (bf16)", lambda a, b: jnp.einsum("dcs,dct->dst", a, b, preferred_element_type=F32),
          xt, dyt, block=block, flops=2 * dim * count * block * block)
    row = timed("blocked forward in XLA (all pieces)", lambda x, p, block=block: blocked_forward(x, p, block), x, p,
                block=block)
    if "ms" in row:
      y = jax.jit(lambda x, p, block=block: blocked_forward(x, p, block))(x, p)
      row["max_rel_diff_vs_pallas"] = float(jnp.max(jnp.abs(y - y_ref)) / jnp.max(jnp.abs(y_ref)))
      print("   max rel diff vs pallas:", row["max_rel_diff_vs_pallas"], flush=True)
  print(harness.format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": harness.run_metadata(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
