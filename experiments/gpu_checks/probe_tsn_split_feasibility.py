"""Probe (session 16): would running both halves of every sequence at once speed up the single-pass TimestepNorm?

  python3 experiments/gpu_checks/probe_tsn_split_feasibility.py OUT.json

At B=1, L=32768, D=4096, G=64 the single-pass Mosaic GPU kernels run 64 programs on 132 SMs. This times them on x
reshaped to [2, L/2, D] and [4, L/4, D] (128 / 256 programs, each piece from the default prior: a timing of the
kernels, not a correct TimestepNorm of x) against [1, L, D], fwd and fwd+bwd, and XLA's versions of the sums that a
correct split needs over half the sequence (the first half's statistics, the second half's adjoint). Interleaved
rounds, medians printed and written as JSON.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import harness
from kernels_pallas import timestep_norm_single_pass as single
from megalodon_jax.ops import timestep_norm as tsn_ops

L, D, G = 32768, 4096, 64
HALF = L // 2


def _kernels_on_pieces(x, dy, pieces):
  """(fwd+bwd, fwd) of the single pass on x cut into `pieces` sequences, and the reshaped x."""
  xs = x.reshape(pieces, L // pieces, D)
  dys = dy.reshape(xs.shape)
  state = tsn_ops.initial_state(pieces, G)

  def fwd(x, w, b):
    return single.timestep_norm_single_pass(x, w, b, state, num_groups=G, eps=1e-5, splits=1)[0]

  def fwd_bwd(x, w, b):
    y, vjp = jax.vjp(fwd, x, w, b)
    return y, vjp(dys)
  return jax.jit(fwd_bwd), jax.jit(fwd), xs


def _xla_adjoint_sums(x, dy, w, mu, rstd):
  """XLA's per-group adjoint sums over the second half (the split's backward needs them)."""
  xg = x[:, HALF:].astype(jnp.float32).reshape(1, HALF, G, D // G)
  dyw = (dy[:, HALF:].astype(jnp.float32) * (w + 1.0)).reshape(1, HALF, G, D // G)
  s1, s2 = dyw.sum(-1), (dyw * xg).sum(-1)
  dmu, dvar = -rstd * s1, -0.5 * rstd ** 3 * (s2 - mu * s1)
  n = (HALF + jnp.arange(1, HALF + 1, dtype=jnp.float32))[None, :, None]
  return ((dmu - 2 * mu * dvar) / n).sum(1), (dvar / n).sum(1)


def main() -> None:
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (1, L, D), jnp.bfloat16)
  w = 0.1 * jax.random.normal(keys[1], (D,))
  bias = 0.1 * jax.random.normal(keys[2], (D,))
  dy = jax.random.normal(keys[3], (1, L, D), jnp.bfloat16)
  fns = {}
  for pieces in (1, 2, 4):
    fwd_bwd, fwd, xs = _kernels_on_pieces(x, dy, pieces)
    fns[f"fb_split{pieces}"] = (fwd_bwd, xs)
    fns[f"f_split{pieces}"] = (fwd, xs)
  stats = jax.jit(lambda x: tsn_ops.weighted_stats(x[:, :HALF], G, jnp.ones((1, HALF), bool)))
  fns["weighted_stats_half"] = (lambda x, w, b: stats(x), x)
  adjoint = jax.jit(_xla_adjoint_sums)
  mu, rstd = jnp.zeros((1, HALF, G)), jnp.ones((1, HALF, G))
  fns["boundary_half"] = (lambda x, w, b: adjoint(x, dy, w, mu, rstd), x)
  for fn, xs in fns.values():
    jax.block_until_ready(fn(xs, w, bias))
  rounds = {name: [] for name in fns}
  for _ in range(6):
    for name, (fn, xs) in fns.items():
      rounds[name].append(harness.time_fn(fn, xs, w, bias, warmup=1, iters=5, inner=3)["median_ms"])
  out = {name: float(np.median(v)) for name, v in rounds.items()}
  for name, v in out.items():
    print(f"{name:24s} {v:.4f} ms")
  with open(sys.argv[1], "w") as f:
    json.dump({"device": str(jax.devices()[0]), "median_ms": out, "rounds": rounds}, f, indent=1)


if __name__ == "__main__":
  main()
