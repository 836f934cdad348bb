"""CemaKernelConfig.fwd_pairs on the GPU: compiled values and gradients against the stepwise forward
and against the float32 sequential reference, at the benchmark shape (B=1, L=32768, D=4096, N=16).

Each config is one jitted forward + backward program (y and the gradients), compiled once: on an H200
each fwd+bwd compiles and runs once in 41-45 s (session 19). --rounds N also times the two programs in N interleaved rounds;
bench_ops (`--variant cema:fwd_pairs=true`) is the op benchmark proper.

  python experiments/gpu_checks/check_cema_fwd_pairs.py --json "$OUT/cema_fwd_pairs_check.json"
  python experiments/gpu_checks/check_cema_fwd_pairs.py --rounds 5   # and time fwd+bwd, interleaved
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
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402



from experiments.gpu_checks.cema_problem import (  # noqa: E402
    as_float64, benchmark_problem, fwd_bwd_program, interleaved_medians, relative_difference)
from kernels_pallas import cema as K  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--reference", action="store_true", help="also compare y with the sequential lax.scan")
  parser.add_argument("--rounds", type=int, default=0, help="also time fwd+bwd of both configs in this many "
                      "interleaved rounds (5 samples of 10 calls each per round)")
  args = parser.parse_args()
  x, coeffs, omega, w, base, (batch, length, dim, ndim) = benchmark_problem(args.smoke)

  names = ["y", "dx", "dp", "dq", "deta", "domega"]
  programs, outputs, compile_s = {}, {}, {}
  for label, cfg in (("steps", dataclasses.replace(base, fwd_pairs=False)),
                     ("pairs", dataclasses.replace(base, fwd_pairs=True))):
    start = time.perf_counter()
    programs[label] = fwd_bwd_program(cfg, w)
    outputs[label] = as_float64(jax.block_until_ready(programs[label](x, coeffs, omega)))
    compile_s[label] = time.perf_counter() - start
    print(f"{label}: compiled and ran in {compile_s[label]:.1f} s", flush=True)
  rows = [{"quantity": n, "pairs_vs_steps": relative_difference(a, b)}
          for n, a, b in zip(names, outputs["pairs"], outputs["steps"])]
  for row in rows:
    print(f"{row['quantity']}: pairs vs steps {row['pairs_vs_steps']:.3e}", flush=True)
  ok = all(r["pairs_vs_steps"] < 1e-4 for r in rows)
  if args.reference or args.smoke:
    y_ref = np.asarray(jax.jit(K.cema_reference)(x, coeffs, omega), np.float64)
    rows.append({"quantity": "y vs sequential reference", "steps": relative_difference(outputs["steps"][0], y_ref),
                 "pairs": relative_difference(outputs["pairs"][0], y_ref)})
    print(f"y vs sequential reference: steps {rows[-1]['steps']:.3e}, pairs {rows[-1]['pairs']:.3e}", flush=True)
    ok = ok and rows[-1]["pairs"] < 1e-4
  print("OK" if ok else "MISMATCH", flush=True)
  timing = {}
  if args.rounds:
    # Interleaved rounds of fwd+bwd (the programs above, which also return y), median per config.
    timing = interleaved_medians(programs, (x, coeffs, omega), args.rounds)
    ratio = timing["steps"]["median_ms"] / timing["pairs"]["median_ms"]
    print(f"fwd+bwd over {args.rounds} interleaved rounds: steps {timing['steps']['median_ms']:.3f} ms, "
          f"pairs {timing['pairs']['median_ms']:.3f} ms ({ratio:.3f}x)", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "shape": [batch, length, dim, ndim],
                 "rows": rows, "ok": ok,
                 "compile_and_first_run_s": compile_s, "fwdbwd_timing": timing}, f, indent=1)


if __name__ == "__main__":
  main()
