"""Kernel time of a block's residual add + the FFN norm's moments (decode, batch 1): XLA vs Pallas.

decoding._block_tail with fold_norm computes y = (h1 + wh2 out) + x and the shifted moments of y
(_folded_norm_fc_in): two XLA kernels per layer. decoding.fused_forward_one(fuse_residual=True) runs
them as one Pallas kernel, kernels_pallas.decode_step.residual_moments (h1 read out of the w_mx
product). This probe chains --count calls (y feeds the next call's x, as layers do) at mega1.3B's
shapes (D = 2048; product [1, 6656], h1 at column 4608) and reports, from a jax.profiler trace,
the kernel time and kernels per call:

  xla                       the expressions of _block_tail / _folded_norm_fc_in
  pallas:w<W>[:reduce]      residual_moments with num_warps W (':reduce': y[0] picked out of the
                            row by a masked sum, the first version, instead of its own loads)

Every variant's y, mean and var are checked against the XLA variant's.

  python experiments/gpu_checks/probe_residual_moments.py --json "$OUT/resmom.json"
  python experiments/gpu_checks/probe_residual_moments.py --smoke    # the CPU (interpreter), values only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

Z, V, D = 512, 4096, 2048  # mega1.3B: the w_mx product's columns [z | r | h1]
VARIANTS = "xla,pallas:w1,pallas:w2,pallas:w4,pallas:w8,pallas:w4:reduce"


def _xla(raw, bias, wh2, x):
  h1 = raw[:, Z + V:] + bias[V:]
  y = ((h1 + wh2) + x).astype(x.dtype)
  yf = y.astype(jnp.float32)
  d = yf - yf[:, :1]
  shift = jnp.mean(d, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(d * d, axis=-1, keepdims=True) - shift * shift, 0.0)
  return y, yf[:, :1] + shift, var


def chain_fn(variant: str, count: int):
  from kernels_pallas import decode_step
  if variant == "xla":
    step = _xla
  else:
    flags = variant.split(":")[1:]
    warps = int(flags[0][1:])
    step = lambda *a: decode_step.residual_moments(*a, raw_offset=Z + V, bias_offset=V, num_warps=warps,
                                                   first_by_reduction="reduce" in flags)

  def chain(raws, bias, wh2s, x):
    outs = []
    for i in range(count):
      x, mean, var = step(raws[i], bias, wh2s[i], x)
      outs += [mean, var]
    return x, outs

  return jax.jit(chain)


def kernel_summary(trace_dir: str, per: int) -> dict:
  from experiments.gpu_checks import profile_train_step as trace_tools
  kernels = trace_tools.device_kernels(trace_tools.load_trace_events(trace_dir))
  if not kernels:
    return {"trace_error": "no GPU kernels in the trace (CPU run?)"}
  by_name = trace_tools.totals_by_name(kernels)
  return {"us_per_call": sum(k["dur"] for k in kernels) / per, "kernels_per_call": len(kernels) / per,
          "kernels": [{"name": n[:80], "per_call": c / per, "us": d / per} for n, (c, d) in by_name.items()]}


def run_variant(variant: str, args, data, want) -> dict:
  fn = chain_fn(variant, args.count)
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*data))
  row = {"variant": variant, "compile_s": round(time.perf_counter() - start, 2)}
  row["y_max_err"] = float(jnp.max(jnp.abs(out[0].astype(jnp.float32) - want[0].astype(jnp.float32))))
  row["moments_max_err"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(out[1], want[1]))
  if args.smoke:
    return row
  for _ in range(args.warmup):
    out = fn(*data)
  jax.block_until_ready(out)
  trace_dir = os.path.join(args.trace_dir, variant.replace(":", "_"))
  shutil.rmtree(trace_dir, ignore_errors=True)
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.calls):
      out = fn(*data)
    jax.block_until_ready(out)
  row["host_us_per_call"] = (time.perf_counter() - start) * 1e6 / (args.calls * args.count)
  row.update(kernel_summary(trace_dir, args.calls * args.count))
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", default=VARIANTS)
  parser.add_argument("--count", type=int, default=24)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--trace_dir", default="/tmp/resmom_trace")
  parser.add_argument("--json", default=None)
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args()
  if args.smoke:
    args.count = 2
  keys = jax.random.split(jax.random.key(0), 4)
  bf = jnp.bfloat16
  data = (jax.random.normal(keys[0], (args.count, 1, Z + V + D)).astype(bf), jax.random.normal(keys[1], (V + D,)).astype(bf),
          jax.random.normal(keys[2], (args.count, 1, D)).astype(bf), (jax.random.normal(keys[3], (1, D)) + 3).astype(bf))
  want = jax.block_until_ready(chain_fn("xla", args.count)(*data))
  print(f"jax {jax.__version__} {jax.devices()[0].device_kind}", flush=True)
  rows = []
  for variant in args.variants.split(","):
    try:
      row = run_variant(variant, args, data, want)
    except Exception as err:  # noqa: BLE001 - report and go on with the next variant
      row = {"variant": variant, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    rows.append(row)
    if "error" in row:
      print(f"{variant:20s} ERROR {row['error']}", flush=True)
      continue
    main_kernels = ", ".join(f"{k['name'][:40]} {k['us']:.2f}" for k in row.get("kernels", []) if k["per_call"] >= 0.5)
    print(f"{variant:20s} {row.get('us_per_call', float('nan')):6.2f} us/call  kernels/call "
          f"{row.get('kernels_per_call', float('nan')):4.2f}  host {row.get('host_us_per_call', float('nan')):6.2f} us  "
          f"err y {row['y_max_err']:.1e} moments {row['moments_max_err']:.1e}  [{main_kernels}]", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
