"""What CEMA's per-step address arithmetic costs: the kernels with Pallas' 32-bit load offsets against
the same kernels lowered with 64-bit offsets, timed interleaved in one process.

Pallas' Triton lowering computes a load's element offsets in int32 when the array is smaller than
4 GiB (jax/_src/pallas/triton/lowering.py, _compute_offsets_from_indices), and sign-extends them to
64 bits for the address. The scans load one row per step at offset (t * D + lane), so ptxas cannot
fold a step's constant t * D into the load's immediate offset: each row costs an IADD3, a LEA and a
LEA.HI.X besides the LDG (sass_report.py: 32 LEA per 16 steps in the chunk-summary loop). With 64-bit
offsets the forward kernels lose them (offline SASS, Triton 3.9: summaries 428 -> 379 instructions
per 16 steps, forward scan 1515 -> 1423); the reverse kernels keep theirs, since their time index
counts down (t_hi - s does not separate the constant the way t_lo + 16 i + s does).

The 64-bit lowering here is a PROBE-ONLY patch of that private function (the production kernels
do not patch JAX). Programs: fwd and fwd+bwd of cema_pallas at the benchmark shape (B=1, L=32768,
D=4096, N=16, bf16 x), default_config; outputs of the two lowerings compared, then timed in
interleaved rounds (5 samples of 10 calls each per round).

  python experiments/gpu_checks/probe_cema_offsets64.py --rounds 3 --json "$OUT/cema_offsets64.json"
  python experiments/gpu_checks/probe_cema_offsets64.py --smoke   # CPU interpreter lowering, no timing
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

from experiments.gpu_checks.cema_problem import (  # noqa: E402
    as_float64, benchmark_problem, interleaved_medians, relative_difference)
from kernels_pallas import cema as K  # noqa: E402

_OLD_LINE = "offset_eltype = ir.IntegerType.get_signless(64 if full_size > 2**32 else 32)"


@contextlib.contextmanager
def offsets64():
  """Pallas' Triton lowering with 64-bit load/store offsets for every array, while inside."""
  from jax._src.pallas.triton import lowering

  original = lowering._compute_offsets_from_indices
  source = textwrap.dedent(inspect.getsource(original))
  if _OLD_LINE not in source:
    raise RuntimeError("this jax's Pallas Triton lowering no longer chooses the offset width on that line; "
                       "update the probe")
  namespace = dict(vars(lowering))
  exec(compile(source.replace(_OLD_LINE, "offset_eltype = ir.IntegerType.get_signless(64)"), lowering.__file__,
               "exec"), namespace)
  lowering._compute_offsets_from_indices = namespace["_compute_offsets_from_indices"]
  try:
    yield
  finally:
    lowering._compute_offsets_from_indices = original


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", default=None)
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args(argv)
  x, coeffs, omega, w, cfg, (batch, length, dim, ndim) = benchmark_problem(args.smoke)

  def make_programs():
    """Fresh functions for each lowering: jax caches a traced and lowered function by its identity."""
    def forward(x, c, om):
      return K.cema_pallas(x, c, om, config=cfg)

    def forward_backward(x, c, om):
      y, vjp = jax.vjp(forward, x, c, om)
      return y, vjp(w.astype(y.dtype))
    return (("fwd", forward), ("fwdbwd", forward_backward))

  programs, outputs, rows = {}, {}, []
  for width, context in (("offsets32", contextlib.nullcontext), ("offsets64", offsets64)):
    for name, fn in make_programs():
      label = f"{name}_{width}"
      start = time.perf_counter()
      with context():  # the kernels are lowered while the program compiles, here
        compiled = jax.jit(fn).lower(x, coeffs, omega).compile()
      programs[label] = compiled
      outputs[label] = as_float64(compiled(x, coeffs, omega))
      print(f"{label}: compiled and ran in {time.perf_counter() - start:.1f} s", flush=True)
  for name in ("fwd", "fwdbwd"):
    worst = max(relative_difference(a, b) for a, b in zip(outputs[f"{name}_offsets64"], outputs[f"{name}_offsets32"]))
    rows.append({"program": name, "largest_difference": worst})
    print(f"{name}: 64-bit against 32-bit offsets, largest difference {worst:.2e}", flush=True)
  timing = {}
  if args.rounds and not args.smoke:
    timing = interleaved_medians(programs, (x, coeffs, omega), args.rounds)
    for name in ("fwd", "fwdbwd"):
      a, b = timing[f"{name}_offsets32"]["median_ms"], timing[f"{name}_offsets64"]["median_ms"]
      print(f"{name}: 32-bit offsets {a:.3f} ms, 64-bit {b:.3f} ms ({a / b:.3f}x)", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                 "shape": [batch, length, dim, ndim], "rows": rows, "timing": timing,
                 "config": dataclasses.asdict(cfg)}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
