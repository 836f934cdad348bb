"""Interleaved A/B of CEMA fwd+bwd across versions of kernels_pallas/cema.py, one process.

  git show 296d8fd:kernels_pallas/cema.py > /tmp/cema_old.py
  python experiments/gpu_checks/ab_cema_versions.py --version old:/tmp/cema_old.py \
      --version new:kernels_pallas/cema.py --version new_ss1:kernels_pallas/cema.py:summary_split=1 \
      --rounds 4 --json "$OUT/ab_versions.json"
  python experiments/gpu_checks/ab_cema_versions.py --smoke --version new:kernels_pallas/cema.py   # CPU

Runs on different machines differ by a few percent (clocks under the power cap), so a change that
is not a config field is timed against its predecessor here, in one process: each --version loads
the file as its own module and runs its cema_pallas at its own default_config (with the given
fields replaced) on bench_ops' shape. Outputs are checked against the first version's, and the
programs are timed in interleaved rounds like ab_cema_configs.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

from experiments.gpu_checks.ab_cema_configs import OUTPUTS, parse_variant  # noqa: E402
from experiments.gpu_checks.cema_problem import (  # noqa: E402
    as_float64, benchmark_problem, interleaved_medians, relative_difference)


def load_version(label: str, path: str):
  """The file at `path` as a fresh module (its own copies of every function and dataclass)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--version {label}: no file {path!r}.")
  spec = importlib.util.spec_from_file_location(f"cema_version_{label}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
  spec.loader.exec_module(module)
  return module


def parse_version(text: str, shape: tuple[int, int, int, int], smoke: bool = False) -> tuple[str, object, object]:
  """'label:path[:field=value,...]' -> (label, module, config at that version's default_config for
  shape (B, L, D, N), with the smoke problem's tiling if smoke, then the given fields replaced)."""
  label, _, rest = text.partition(":")
  path, _, fields = rest.partition(":")
  if not label or not path:
    raise ValueError(f"--version wants 'label:path[:field=value,...]'; got {text!r}.")
  module = load_version(label, path)
  config = module.default_config(*shape)
  if smoke:  # the smoke problem's tiling, on this version's dataclass
    config = dataclasses.replace(config, block_d=4, bwd_block_d=4, num_warps=1, bwd_num_warps=1, num_chunks=3)
  if fields:
    config = parse_variant(f"{label}:{fields}", config)[1]
  return label, module, config


def fwd_bwd_program(module, config, w: jax.Array):
  def value_and_grads(x, coeffs, omega):
    y, vjp = jax.vjp(lambda x, c, om: module.cema_pallas(x, c, om, config=config), x, coeffs, omega)
    return y, vjp(w.astype(y.dtype))
  return jax.jit(value_and_grads)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--version", action="append", default=[], help="label:path[:field=value,...]")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--json", default=None)
  parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shape, no timing")
  args = parser.parse_args(argv)
  if not args.version:
    parser.error("give at least one --version label:path")
  x, coeffs, omega, w, _, shape = benchmark_problem(args.smoke)
  programs, rows, reference = {}, [], None
  for text in args.version:
    label, module, config = parse_version(text, shape, args.smoke)
    start = time.perf_counter()
    programs[label] = fwd_bwd_program(module, config, w)
    values = as_float64(jax.block_until_ready(programs[label](x, coeffs, omega)))
    seconds = time.perf_counter() - start
    reference = values if reference is None else reference
    diffs = {name: relative_difference(a, b) for name, a, b in zip(OUTPUTS, values, reference)}
    rows.append({"version": label, "source": text, "config": dataclasses.asdict(config),
                 "compile_and_first_run_s": seconds, "vs_first": diffs})
    print(f"{label}: compiled and ran in {seconds:.1f} s; largest difference from the first "
          f"{max(diffs.values()):.2e}", flush=True)
  if args.rounds and not args.smoke:
    timing = interleaved_medians(programs, (x, coeffs, omega), args.rounds)
    first = rows[0]["version"]
    print(f"{'version':<16} {'fwd+bwd ms':>10} {'vs ' + first:>12}")
    for row in rows:
      row["fwdbwd_median_ms"] = timing[row["version"]]["median_ms"]
      row["rounds_ms"] = timing[row["version"]]["rounds_ms"]
      row["speedup_vs_first"] = timing[first]["median_ms"] / row["fwdbwd_median_ms"]
      print(f"{row['version']:<16} {row['fwdbwd_median_ms']:10.3f} {row['speedup_vs_first']:12.3f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "shape": list(shape),
                 "rounds": args.rounds, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
