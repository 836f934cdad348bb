"""Times the forward's mma chunk summaries (kernels_pallas.cema_summary_mma) against the FMA ones.

    python experiments/gpu_checks/probe_cema_summary_mma.py --json /tmp/mma.json          # H200
    python experiments/gpu_checks/probe_cema_summary_mma.py --interpret --length 512 --dim 32

Both kernels compute all 16 chunk summaries of x [1, L, D] (bf16) at N = 16 in one process; the
table gives each one's median time (15 samples of 10 calls) and its largest error against a
float64 sum over the first 256 channels, relative to the largest summary. The design steps that
led to the library kernel, and their times, are in docs/performance_history.md (session 23) and
results/gpu_checks/2026-11-30_nvidia-h200_probe_cema_summary_mma.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from experiments.gpu_checks.probe_cema_summary_tc import median_call_ms
from kernels_pallas import cema as K
from kernels_pallas import cema_summary_mma as M


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--length", type=int, default=32768)
  ap.add_argument("--dim", type=int, default=4096)
  ap.add_argument("--interpret", action="store_true")
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--inner", type=int, default=10)
  ap.add_argument("--json", default="")
  args = ap.parse_args()

  rng = np.random.default_rng(0)
  mag = rng.uniform(0.9, 0.99995, (args.dim, M.ORDERS))
  q = (mag * np.exp(1j * rng.uniform(0, np.pi, (args.dim, M.ORDERS)))).astype(np.complex64)
  q64 = q.astype(np.complex128)
  x = jnp.asarray(rng.standard_normal((1, args.length, args.dim)).astype(ml_dtypes.bfloat16))
  check_d = min(args.dim, 256)
  steps = args.length // M.CHUNKS
  weights = q64[:check_d, :, None] ** (steps - 1 - np.arange(steps))[None, None, :]
  xs = np.asarray(x[:, :, :check_d], np.float64).reshape(1, M.CHUNKS, steps, check_d)
  want = np.einsum("dnt,bctd->bcnd", weights, xs)

  cfg = dataclasses.replace(K.default_config(1, args.length, args.dim, M.ORDERS), num_chunks=M.CHUNKS,
                            summary_mma=False)
  plan = K._plan(args.length, cfg)

  def fma(x):
    (re, im), _ = K._chunk_summary_planes(x, None, jnp.asarray(q), cfg, plan, reverse=False, split=cfg.split,
                                          block_d=cfg.block_d, num_warps=cfg.num_warps,
                                          interpret=args.interpret, name="cema_fwd_chunk_states",
                                          all_chunks=True)
    return re, im

  powers = q64[None] ** np.arange(M.STEP + 1)[:, None, None]
  tables = M.fragment_tables(jnp.asarray(powers.real, jnp.float32), jnp.asarray(powers.imag, jnp.float32))
  mma = functools.partial(M.summary_planes, interpret=args.interpret)
  rows = []
  for name, fn, fargs in (("fma", jax.jit(fma), (x,)), ("mma", jax.jit(mma), (x, *tables))):
    re, im = fn(*fargs)
    got = (np.asarray(re) + 1j * np.asarray(im))[..., :check_d]
    err = float(np.abs(got - want).max() / np.abs(want).max())
    ms = float("nan") if args.interpret else median_call_ms(fn, *fargs, reps=args.reps, inner=args.inner)
    rows.append({"kernel": name, "ms": ms, "max_err_rel": err})
    print(f"{name:>4}: {ms:.4f} ms, max error / max|S| {err:.2e}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "length": args.length,
                 "dim": args.dim, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
