"""Interleaved A/B of CEMA fwd+bwd under several CemaKernelConfig variants, one process.

  python experiments/gpu_checks/ab_cema_configs.py --variant ss4:summary_split=4 \
      --variant ss4_t32:summary_split=4,summary_block_t=32 --rounds 3 --json "$OUT/ab_cema.json"
  python experiments/gpu_checks/ab_cema_configs.py --smoke --variant ss4:summary_split=4   # CPU

Each variant is default_config at the benchmark shape (B=1, L=32768, D=4096, N=16, bf16 x) with the
given fields replaced (integers, true / false, or strings). Each is one jitted program returning y
and the gradients, compiled once (41-56 s each on an H200), checked against the default's outputs
(largest difference over the largest value, per output), and then all are timed in interleaved
rounds (5 samples of 10 calls each per round) so that clock drift hits every variant alike.
bench_ops (`--variant cema:k=v,...`) remains the op benchmark proper.
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


from experiments.gpu_checks.cema_problem import (  # noqa: E402
    as_float64, benchmark_problem, fwd_bwd_program, interleaved_medians, relative_difference)
from kernels_pallas import cema as K  # noqa: E402

OUTPUTS = ("y", "dx", "dp", "dq", "deta", "domega")


def parse_variant(text: str, base: K.CemaKernelConfig) -> tuple[str, K.CemaKernelConfig]:
  """'label:field=value,field=value' -> (label, base with those fields replaced)."""
  label, _, body = text.partition(":")
  if not label or not body:
    raise ValueError(f"--variant wants 'label:field=value[,field=value]'; got {text!r}.")
  fields = {f.name for f in dataclasses.fields(base)}
  changes = {}
  for item in body.split(","):
    name, _, value = item.partition("=")
    if name not in fields:
      raise ValueError(f"--variant {label}: CemaKernelConfig has no field {name!r}; it has {sorted(fields)}.")
    kind = type(getattr(base, name))
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"--variant {label}: {name} wants true or false; got {value!r}.")
      changes[name] = value.lower() in ("true", "1")
    else:
      changes[name] = kind(value)
  return label, dataclasses.replace(base, **changes)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", action="append", default=[], help="label:field=value[,field=value]")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", default=None)
  parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shape, no timing")
  args = parser.parse_args(argv)
  x, coeffs, omega, w, base, (batch, length, dim, ndim) = benchmark_problem(args.smoke)
  configs = dict([("default", base)] + [parse_variant(v, base) for v in args.variant])
  for label, cfg in configs.items():
    cfg.validate(ndim)

  programs, rows = {}, []
  reference = None
  for label, cfg in configs.items():
    start = time.perf_counter()
    programs[label] = fwd_bwd_program(cfg, w)
    values = as_float64(jax.block_until_ready(programs[label](x, coeffs, omega)))
    seconds = time.perf_counter() - start
    reference = values if reference is None else reference
    diffs = {name: relative_difference(a, b) for name, a, b in zip(OUTPUTS, values, reference)}
    rows.append({"variant": label, "config": dataclasses.asdict(cfg), "compile_and_first_run_s": seconds,
                 "vs_default": diffs})
    worst = max(diffs.values())
    print(f"{label}: compiled and ran in {seconds:.1f} s; largest difference from default {worst:.2e}", flush=True)
  if args.rounds and not args.smoke:
    timing = interleaved_medians(programs, (x, coeffs, omega), args.rounds)
    print(f"{'variant':<16} {'fwd+bwd ms':>10} {'vs default':>10}")
    for row in rows:
      row["fwdbwd_median_ms"] = timing[row["variant"]]["median_ms"]
      row["rounds_ms"] = timing[row["variant"]]["rounds_ms"]
      row["speedup_vs_default"] = timing["default"]["median_ms"] / row["fwdbwd_median_ms"]
      print(f"{row['variant']:<16} {row['fwdbwd_median_ms']:10.3f} {row['speedup_vs_default']:10.3f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                 "shape": [batch, length, dim, ndim], "rounds": args.rounds, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
