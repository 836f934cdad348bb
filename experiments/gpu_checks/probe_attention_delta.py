"""The backward's delta = rowsum(O dO) against memory floors measured in the same run (H200 probe).

  python experiments/gpu_checks/probe_attention_delta.py [--json out.json]

Shape: bench_ops' attention (B=1, L=32768, 4 heads, dv 2048, bf16): O and dO are 268 MB each, so
delta reads 537 MB. Rows: the op's XLA delta, the Pallas Triton delta (delta_impl='pallas'), a
one-input row sum (268 MB), and a read-both-write-one elementwise pass (805 MB) as the floors.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from experiments.benchmarks import harness
from kernels_pallas import chunk_attention as ca


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  batch, length, heads, dv = 1, 32768, 4, 2048
  keys = jax.random.split(jax.random.key(0), 2)
  out = jax.random.normal(keys[0], (batch, length, heads, dv)).astype(jnp.bfloat16)
  d_out = jax.random.normal(keys[1], (batch, length, heads, dv)).astype(jnp.bfloat16)
  nbytes = out.size * 2
  plan = ca._triton_plan(ca.KernelConfig(delta_impl="pallas"), False, 1.0, batch, heads, length // 2048, 2048,
                         2048, 256, dv, jnp.bfloat16)
  cases = {
      "delta xla (op default)": (jax.jit(ca._delta), (out, d_out), 2 * nbytes),
      "delta pallas triton": (jax.jit(lambda o, d: ca._tr_delta(plan, o, d)), (out, d_out), 2 * nbytes),
      "delta xla, [B,L,H] out": (jax.jit(lambda o, d: jnp.sum(o.astype(jnp.float32) * d.astype(jnp.float32), -1)),
                                 (out, d_out), 2 * nbytes),
      "floor: row sum of O": (jax.jit(lambda o: jnp.sum(o.astype(jnp.float32), -1)), (out,), nbytes),
      "floor: O + dO -> bf16": (jax.jit(lambda o, d: o + d), (out, d_out), 3 * nbytes),
  }
  want = ca._delta(out, d_out)
  rows = []
  for name, (fn, fn_args, moved) in cases.items():
    ms = harness.time_fn(fn, *fn_args, warmup=3, iters=20, inner=5)["median_ms"]
    err = None
    if name.startswith("delta"):
      got = fn(*fn_args)
      got = got.transpose(0, 2, 1) if got.shape != want.shape else got
      err = float(jnp.max(jnp.abs(got - want)))
    rows.append(dict(case=name, ms=ms, tb_per_s=moved / ms / 1e9, max_abs_err=err))
    print(f"{name:28s} {ms:7.3f} ms  {moved / ms / 1e9:5.2f} TB/s  err {err}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "device": jax.devices()[0].device_kind, "jax": jax.__version__}, f, indent=1)


if __name__ == "__main__":
  main()
