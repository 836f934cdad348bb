"""GPU check of the single-pass TimestepNorm (kernels_pallas/timestep_norm_single_pass.py), one short call:

  python3 experiments/gpu_checks/check_tsn_single_pass.py --json OUT.json

At B=1, L=32768, D=4096, G=64 bf16 with a prior state (count 1000), compares the single-pass op (values,
returned state, and the gradients of sum(y * dy) + the final state's mean and var in x, weight, bias and the
incoming mean / var) against the two-pass Triton kernels (timestep_norm_pallas with their explicit default
config) and the float32 XLA associative op; prints max |a - b| / max |b| per output. Run several times: an
ordering race would show as a run that differs.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import timestep_norm as tsn_kernel
from kernels_pallas import timestep_norm_single_pass as single
from megalodon_jax.ops import timestep_norm as tsn_ops

EPS = 1e-5


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default=None)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--splits", default="1,2", help="time splits of the single pass to check (comma-separated)")
  args = parser.parse_args()
  b, length, dim, groups = 1, 32768, 4096, 64
  keys = jax.random.split(jax.random.PRNGKey(1), 7)
  x = (0.3 + jax.random.normal(keys[0], (b, length, dim)) * (0.5 + jax.random.uniform(keys[1], (dim,))))
  x = x.astype(jnp.bfloat16)
  weight = 0.1 * jax.random.normal(keys[2], (dim,))
  bias = 0.1 * jax.random.normal(keys[3], (dim,))
  mean0 = 0.3 + 0.1 * jax.random.normal(keys[4], (b, groups))
  var0 = 1.0 + 0.2 * jax.random.uniform(keys[5], (b, groups))
  count0 = jnp.full((b,), 1000, jnp.int32)
  dy = jax.random.normal(keys[6], (b, length, dim)).astype(jnp.bfloat16)

  splits = [int(v) for v in args.splits.split(",")]
  impls = {
      f"single_s{n}": functools.partial(single.timestep_norm_single_pass, num_groups=groups, eps=EPS, splits=n)
      for n in splits
  }
  impls.update({
      "triton": lambda x, w, bb, st: tsn_kernel.timestep_norm_pallas(x, w, bb, num_groups=groups, eps=EPS, state=st,
                                                                      config=tsn_kernel.default_config("triton")),
      "xla": lambda x, w, bb, st: tsn_ops.timestep_norm(x.astype(jnp.float32), w, bb, num_groups=groups, eps=EPS,
                                                        state=st, method="associative"),
  })

  def outputs(fn):
    def loss(x, w, bb, m, v):
      y, st = fn(x, w, bb, tsn_ops.TimestepNormState(count0, m, v))
      return (jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)) + jnp.sum(st.mean) + jnp.sum(st.var),
              (y, st.mean, st.var))
    (_, (y, m, v)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
        x, weight, bias, mean0, var0)
    names = ("y", "mean", "var", "dx", "dweight", "dbias", "dmean0", "dvar0")
    return {n: np.asarray(a, np.float32) for n, a in zip(names, (y, m, v, *grads))}

  results = {}
  want = {name: outputs(fn) for name, fn in impls.items() if not name.startswith("single")}
  for r in range(args.repeats):
    for n in splits:
      got = outputs(impls[f"single_s{n}"])
      for ref_name, ref in want.items():
        errs = {k: float(np.max(np.abs(got[k] - ref[k])) / max(float(np.max(np.abs(ref[k]))), 1e-30)) for k in got}
        errs["finite"] = bool(all(np.isfinite(a).all() for a in got.values()))
        results[f"run{r}_splits{n}_vs_{ref_name}"] = errs
        print(f"run {r} single (splits {n}) vs {ref_name}: " + " ".join(
            f"{k} {e:.1e}" if isinstance(e, float) else f"{k} {e}" for k, e in errs.items()), flush=True)
  triton_vs_xla = {n: float(np.max(np.abs(want["triton"][n] - want["xla"][n])) / max(float(np.max(np.abs(
      want["xla"][n]))), 1e-30)) for n in want["xla"]}
  print("triton vs xla (for scale): " + " ".join(f"{n} {e:.1e}" for n, e in triton_vs_xla.items()))
  results["triton_vs_xla"] = triton_vs_xla
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
