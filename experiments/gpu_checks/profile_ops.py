"""Which kernels make up an op's time? A profiler trace of bench_ops' cases, kernel by kernel.

Takes bench_ops' command line (ops, impls, shapes, kernel config overrides), compiles each case's
forward + backward program, runs it --warmup times, traces --calls back-to-back calls with
jax.profiler and prints, per case, every distinct GPU kernel with its calls and time per call of
the op, busy time (sum of kernel durations) and span (first start to last end; span - busy is
the time the GPU sat idle between kernels).

  python experiments/gpu_checks/profile_ops.py --ops timestep_norm --json /tmp/prof.json
  python experiments/gpu_checks/profile_ops.py --ops chunk_attention --passes fwd
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402

from experiments.benchmarks import bench_ops  # noqa: E402
from experiments.gpu_checks import profile_train_step as trace_tools  # noqa: E402


def kernel_table(kernels: list[dict], calls: int) -> dict:
  """Per distinct kernel name: calls and milliseconds per call of the op, in first-launch order."""
  if not kernels:
    return {"error": "the trace has no GPU kernels (CPU run?)"}
  kernels = sorted(kernels, key=lambda k: k["ts"])
  by_name = trace_tools.totals_by_name(kernels)
  start, end = kernels[0]["ts"], max(k["ts"] + k["dur"] for k in kernels)
  # The launch timeline of the first call: start offsets show where the GPU waited.
  per_call = len(kernels) // calls
  timeline = [{"name": k["name"][:60], "start_us": round(k["ts"] - start, 1), "dur_us": round(k["dur"], 1)}
              for k in kernels[:per_call + 2]]
  return {
      "timeline": timeline,
      "busy_ms": sum(k["dur"] for k in kernels) / calls / 1e3,
      "span_ms": (end - start) / calls / 1e3,
      "kernels_per_call": len(kernels) / calls,
      "kernels": [{"name": n[:140], "calls": c / calls, "ms": d / calls / 1e3} for n, (c, d) in by_name.items()],
  }


def profile_case(case, args: argparse.Namespace, trace_dir: str) -> dict:
  primals, ct = bench_ops.build_inputs(case)
  program = bench_ops._programs(case)[args.pass_name]  # pylint: disable=protected-access
  for _ in range(args.warmup):
    jax.block_until_ready(program(primals, ct))
  shutil.rmtree(trace_dir, ignore_errors=True)
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(args.calls):
    out = program(primals, ct)
  jax.block_until_ready(out)
  jax.profiler.stop_trace()
  table = kernel_table(trace_tools.device_kernels(trace_tools.load_trace_events(trace_dir)), args.calls)
  return {"op": case.op, "shape": case.shape, "impl": case.impl, "pass": args.pass_name, **table}


def print_table(row: dict) -> None:
  print(f"\n== {row['op']} {row['shape']} {row['impl']} ({row['pass']}) ==")
  if "error" in row:
    print("  " + row["error"])
    return
  print(f"  busy {row['busy_ms']:.4f} ms  span {row['span_ms']:.4f} ms  "
        f"{row['kernels_per_call']:.1f} kernels per call")
  for k in row["kernels"]:
    print(f"  {k['ms']:8.4f} ms  x{k['calls']:<4g} {k['name']}")
  if row["span_ms"] > 1.2 * row["busy_ms"]:
    print("  timeline of the first call (start offset, duration, us):")
    for k in row["timeline"]:
      print(f"    {k['start_us']:10.1f} {k['dur_us']:9.1f}  {k['name']}")


def main(argv=None) -> None:
  extra = argparse.ArgumentParser(add_help=False)
  extra.add_argument("--calls", type=int, default=5)
  extra.add_argument("--pass", dest="pass_name", default="fwdbwd", choices=["fwd", "fwdbwd"])
  extra.add_argument("--json", default=None)
  extra.add_argument("--trace_dir", default="/tmp/op_trace")
  ours, rest = extra.parse_known_args(argv)
  args = bench_ops.parse_args(rest)
  args.calls, args.pass_name = ours.calls, ours.pass_name
  rows = []
  for case in bench_ops.build_cases(args, bench_ops.kernel_mode(args)):
    try:
      row = profile_case(case, args, ours.trace_dir)
    except Exception as err:  # noqa: BLE001 - one failing case must not end the run
      row = {"op": case.op, "shape": case.shape, "impl": case.impl, "pass": args.pass_name,
             "error": bench_ops.failure(err)}
    print_table(row)
    rows.append(row)
    jax.clear_caches()
  if ours.json:
    with open(ours.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)
    print(f"wrote {ours.json}")


if __name__ == "__main__":
  main()
