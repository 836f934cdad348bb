"""Probe: the blocked CEMA (`ops.cema.cema_blocked`, every chunk at once as batched matmuls)
against the Pallas scan kernels, in one run on one GPU.

    python experiments/gpu_checks/probe_cema_blocked.py --json out/cema_blocked.json
    python experiments/gpu_checks/probe_cema_blocked.py --cpu      # tiny shapes, a smoke run

For each (chunk, matmul precision) row: forward and forward+backward median times (gradients of
x and of the raw CEMA parameters, as check_cema.py times the kernel), their ratio to the Pallas
default timed in the same process, and the largest relative differences of y and of the
gradients from the Pallas kernel (which equals the float64 recurrence to ~1e-6 on the H200).
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

from experiments.gpu_checks import check_cema as CC  # noqa: E402
from kernels_pallas import cema as K  # noqa: E402
from megalodon_jax.ops import cema as cema_ops  # noqa: E402

PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "bf16x6": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    "bf16x3": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
    "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cpu", action="store_true")
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--order", type=int, default=16)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--rows", nargs="*", default=["128:highest", "128:bf16x6", "128:bf16x3",
                                                    "64:bf16x6", "256:bf16x6", "128:tf32x3"],
                      help="chunk:precision pairs")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if args.cpu:
    args.length, args.dim, args.order, args.iters = 300, 8, 4, 2
    args.rows = ["64:highest", "128:highest"]
  x = jax.random.normal(jax.random.key(0), (1, args.length, args.dim), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (1, args.length, args.dim), jnp.float32)
  params = CC.make_params(args.dim, args.order, 0)
  iters = dict(iters=args.iters)
  print(f"probe_cema_blocked: jax {jax.__version__}, {jax.devices()[0].device_kind}; "
        f"B=1 L={args.length} D={args.dim} N={args.order} bf16", flush=True)

  def pallas(*a, **k):
    return K.cema_pallas(*a, interpret=args.cpu, **k)

  def measure(fn):
    coeffs = cema_ops.cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
    fwd = jax.jit(lambda x, c, o: fn(x, c, o))
    fwd_bwd = jax.jit(jax.value_and_grad(CC.loss_fn(fn, w), argnums=(0, 1)))
    out = {"fwd_ms": CC.bench(fwd, x, coeffs, params["omega"], **iters),
           "fwd_bwd_ms": CC.bench(fwd_bwd, x, params, **iters)}
    return out, fwd(x, coeffs, params["omega"]), fwd_bwd(x, params)[1]

  base, y_ref, g_ref = measure(pallas)
  print(f"pallas default            fwd {base['fwd_ms']:.3f} ms  fwd+bwd {base['fwd_bwd_ms']:.3f} ms", flush=True)
  results = {"shape": dict(length=args.length, dim=args.dim, order=args.order, batch=1, dtype="bfloat16"),
             "device": jax.devices()[0].device_kind, "jax": jax.__version__, "pallas": base, "rows": []}
  for row in args.rows:
    chunk, name = row.split(":")
    try:
      fn = lambda *a, chunk=int(chunk), prec=PRECISIONS[name], **k: cema_ops.cema_blocked(  # noqa: E731
          *a, chunk=chunk, precision=prec, **k)
      tm, y, g = measure(fn)
      err = {"y": CC.rel_err(y, y_ref), "grad_x": CC.rel_err(g[0].astype(jnp.float32), g_ref[0].astype(jnp.float32))}
      for key in ("alpha", "delta", "theta", "gamma", "omega"):
        err[f"grad_{key}"] = CC.rel_err(g[1][key], g_ref[1][key])
      entry = dict(chunk=int(chunk), precision=name, **tm, fwd_ratio=tm["fwd_ms"] / base["fwd_ms"],
                   fwd_bwd_ratio=tm["fwd_bwd_ms"] / base["fwd_bwd_ms"], diff_vs_pallas=err)
      print(f"blocked T={chunk:>4} {name:8s}  fwd {tm['fwd_ms']:.3f} ms ({entry['fwd_ratio']:.2f}x)  "
            f"fwd+bwd {tm['fwd_bwd_ms']:.3f} ms ({entry['fwd_bwd_ratio']:.2f}x)  | max diff vs Pallas: "
            + " ".join(f"{k}={v:.1e}" for k, v in err.items()), flush=True)
    except Exception as e:  # one failing row (e.g. an unsupported dot algorithm) must not stop the rest
      traceback.print_exc()
      entry = dict(chunk=int(chunk), precision=name, error=f"{type(e).__name__}: {e}"[:500])
      print(f"blocked T={chunk} {name}: FAILED {entry['error'][:200]}", flush=True)
    results["rows"].append(entry)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"-> {args.json}")


if __name__ == "__main__":
  main()
