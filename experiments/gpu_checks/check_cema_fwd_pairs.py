"""CemaKernelConfig.fwd_pairs on the GPU: compiled values and gradients against the default forward
and against the float32 sequential reference, at the benchmark shape (B=1, L=32768, D=4096, N=16).

Timing is bench_ops' job (`--variant cema:fwd_pairs=true`); this script only checks that the paired
forward computes the same function when compiled (the tests run it in the interpreter).

  python experiments/gpu_checks/check_cema_fwd_pairs.py --json "$OUT/cema_fwd_pairs_check.json"
  python experiments/gpu_checks/check_cema_fwd_pairs.py --smoke   # CPU interpreter, tiny shape
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas import cema as K  # noqa: E402
from megalodon_jax.ops.cema import cema_coefficients  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args()
  batch, length, dim, ndim = (1, 96, 8, 4) if args.smoke else (1, 32768, 4096, 16)
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (batch, length, dim), jnp.float32).astype(jnp.bfloat16)
  coeffs = cema_coefficients(jax.random.normal(keys[1], (dim, ndim, 1)), jax.random.normal(keys[2], (dim, ndim, 1)),
                             jax.random.normal(keys[3], (dim, 1, 1)), 0.5 * jax.random.normal(keys[4], (dim, ndim, 2)))
  omega = jax.random.normal(keys[5], (dim,))
  w = jax.random.normal(jax.random.key(1), (batch, length, dim), jnp.float32)
  base = K.default_config(batch, length, dim, ndim)
  if args.smoke:
    base = dataclasses.replace(base, block_d=4, bwd_block_d=4, num_warps=1, bwd_num_warps=1, num_chunks=3)

  def run(cfg):
    loss = lambda x, c, om: jnp.sum(w * K.cema_pallas(x, c, om, config=cfg))  # noqa: E731
    y = jax.jit(lambda x, c, om: K.cema_pallas(x, c, om, config=cfg))(x, coeffs, omega)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, coeffs, omega)
    return [np.asarray(v, np.float64 if not jnp.iscomplexobj(v) else np.complex128)
            for v in [y] + jax.tree_util.tree_leaves(grads)]

  names = ["y", "dx", "dp", "dq", "deta", "domega"]
  default = run(base)
  pairs = run(dataclasses.replace(base, fwd_pairs=True))
  y_ref = np.asarray(jax.jit(K.cema_reference)(x, coeffs, omega), np.float64)
  rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))  # noqa: E731
  rows = [{"quantity": n, "pairs_vs_default": rel(a, b)} for n, a, b in zip(names, pairs, default)]
  rows.append({"quantity": "y vs sequential reference", "default": rel(default[0], y_ref), "pairs": rel(pairs[0], y_ref)})
  for row in rows:
    print("  ".join(f"{k}={v:.3e}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
  ok = all(r.get("pairs_vs_default", 0.0) < 1e-4 for r in rows) and rows[-1]["pairs"] < 1e-4
  print("OK" if ok else "MISMATCH")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "shape": [batch, length, dim, ndim],
                 "rows": rows, "ok": ok}, f, indent=1)


if __name__ == "__main__":
  main()
