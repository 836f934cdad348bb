"""CemaKernelConfig.fwd_pairs on the GPU: compiled values and gradients against the default forward
and against the float32 sequential reference, at the benchmark shape (B=1, L=32768, D=4096, N=16).

Timing is bench_ops' job (`--variant cema:fwd_pairs=true`); this script only checks that the paired
forward computes the same function when compiled (the tests run it in the interpreter).

  python experiments/gpu_checks/check_cema_fwd_pairs.py --json "$OUT/cema_fwd_pairs_check.json"
  python experiments/gpu_checks/check_cema_fwd_pairs.py --reference   # also y against the lax.scan reference
  python experiments/gpu_checks/check_cema_fwd_pairs.py --smoke   # CPU interpreter, tiny shape

Each result prints as soon as it exists (a first run at the full shape, with the reference, did not
finish within 115 s on an H200; the sequential reference is the slow part, so it is optional).
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
  parser.add_argument("--reference", action="store_true", help="also compare y with the sequential lax.scan")
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
  rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))  # noqa: E731
  default = run(base)
  print("default compiled and run", flush=True)
  pairs = run(dataclasses.replace(base, fwd_pairs=True))
  rows = [{"quantity": n, "pairs_vs_default": rel(a, b)} for n, a, b in zip(names, pairs, default)]
  for row in rows:
    print(f"{row['quantity']}: pairs vs default {row['pairs_vs_default']:.3e}", flush=True)
  ok = all(r["pairs_vs_default"] < 1e-4 for r in rows)
  if args.reference or args.smoke:
    y_ref = np.asarray(jax.jit(K.cema_reference)(x, coeffs, omega), np.float64)
    rows.append({"quantity": "y vs sequential reference", "default": rel(default[0], y_ref),
                 "pairs": rel(pairs[0], y_ref)})
    print(f"y vs sequential reference: default {rows[-1]['default']:.3e}, pairs {rows[-1]['pairs']:.3e}", flush=True)
    ok = ok and rows[-1]["pairs"] < 1e-4
  print("OK" if ok else "MISMATCH", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "shape": [batch, length, dim, ndim],
                 "rows": rows, "ok": ok}, f, indent=1)


if __name__ == "__main__":
  main()
