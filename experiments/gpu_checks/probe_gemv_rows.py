"""Batch-1 decode products: XLA's row reduction vs the single-kernel Pallas GEMV (gemv_rows), and the
FFN's first product with its norm and activation in XLA vs one kernel (ffn_in_step).

For each of a size's projection shapes (w_t [N, K], bf16) this chains --count products with distinct
weights (more bytes than the L2 holds, as a decode step's layers; separate arrays, so that no slice
of a stacked one is copied for a custom call) through optimisation barriers (each product waits for
the one before, so that XLA cannot fuse them horizontally as it did in the first version, 0.17
kernels per product) and reports, from a jax.profiler trace, the kernel time and kernels per product:

  reduce                 decoding's dup='reduce': sum(x * w_t, -1) in float32, one XLA row reduction
  rows:n<BN>:w<W>        decode_step.gemv_rows with block_n BN, W warps
  ffn_xla                (fc_in only) the reduction, then decoding's epilogue (folded norm, SiLU)
  ffn:n<BN>:w<W>         (fc_in only) decode_step.ffn_in_step

Values are checked against the 'reduce' / 'ffn_xla' variants.

  python experiments/gpu_checks/probe_gemv_rows.py --size 200M --json "$OUT/gemv_rows.json"
  python experiments/gpu_checks/probe_gemv_rows.py --smoke     # CPU interpreter, values only
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

EPS = 1e-5
# (name, N, K) of the transposed kernels; fc_in is [F, D].
SHAPES = {"200M": [("w_mx", 3328, 1024), ("wv", 2048, 1024), ("wh2", 1024, 2048), ("fc_in", 2560, 1024),
                   ("fc2", 1024, 2560)],
          "1.3B": [("w_mx", 6656, 2048), ("wv", 4096, 2048), ("wh2", 2048, 4096), ("fc_in", 4864, 2048),
                   ("fc2", 2048, 4864)],
          "smoke": [("fc_in", 64, 32), ("wh2", 32, 64)]}
ROWS_VARIANTS = "rows:n8:w4,rows:n16:w4,rows:n16:w8,rows:n32:w8"
FFN_VARIANTS = "ffn:n8:w4,ffn:n16:w4,ffn:n16:w8,ffn:n32:w8"


def _options(variant: str) -> dict:
  flags = variant.split(":")[1:]
  return {"block_n": int(flags[0][1:]), "num_warps": int(flags[1][1:])}


def product_fn(variant: str):
  from kernels_pallas import decode_step
  if variant == "reduce":
    return lambda x, w: jnp.sum(x.astype(jnp.float32) * w.astype(jnp.float32), axis=-1)[None].astype(x.dtype)
  if variant == "ffn_xla":
    def ffn(x, w, colsum, bias0, mean, var):
      raw = jnp.sum(x.astype(jnp.float32) * w.astype(jnp.float32), axis=-1)[None]
      return jax.nn.silu(((raw - mean * colsum) * jax.lax.rsqrt(var + EPS) + bias0).astype(x.dtype))
    return ffn
  if variant.startswith("ffn:"):
    return lambda *a: decode_step.ffn_in_step(*a, eps=EPS, **_options(variant))
  return lambda x, w: decode_step.gemv_rows(x, w, **_options(variant))


def chain_fn(variant: str):
  step = product_fn(variant)

  def chain(xs, ws, *extra):
    outs, prev = [], None
    for x, w in zip(xs, ws):
      if prev is not None:
        x, prev = jax.lax.optimization_barrier((x, prev))  # this product after the one before
      prev = step(x, w, *extra)
      outs.append(prev)
    return outs

  return jax.jit(chain)


def run_variant(variant: str, args, data, want) -> dict:
  from experiments.gpu_checks.probe_residual_moments import kernel_summary
  fn = chain_fn(variant)
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*data))
  row = {"variant": variant, "compile_s": round(time.perf_counter() - start, 2)}
  row["max_rel_err"] = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                                 / (float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-30)) for a, b in zip(out, want))
  if args.smoke:
    return row
  for _ in range(args.warmup):
    out = fn(*data)
  jax.block_until_ready(out)
  trace_dir = os.path.join(args.trace_dir, variant.replace(":", "_"))
  shutil.rmtree(trace_dir, ignore_errors=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.calls):
      out = fn(*data)
    jax.block_until_ready(out)
  row.update(kernel_summary(trace_dir, args.calls * args.count))
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="200M", choices=sorted(SHAPES))
  parser.add_argument("--rows_variants", default=ROWS_VARIANTS)
  parser.add_argument("--ffn_variants", default=FFN_VARIANTS)
  parser.add_argument("--count", type=int, default=12)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--trace_dir", default="/tmp/gemv_rows_trace")
  parser.add_argument("--json", default=None)
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args()
  if args.smoke:
    args.size, args.count = "smoke", 2
  print(f"jax {jax.__version__} {jax.devices()[0].device_kind}; size {args.size}, {args.count} products per call",
        flush=True)
  rows = []
  for name, n, k in SHAPES[args.size]:
    keys = jax.random.split(jax.random.key(n + k), 6)
    xs = tuple(jax.random.normal(kx, (1, k)).astype(jnp.bfloat16) for kx in jax.random.split(keys[0], args.count))
    ws = tuple((jax.random.normal(kw, (n, k)) / k ** 0.5).astype(jnp.bfloat16)
               for kw in jax.random.split(keys[1], args.count))
    data = (xs, ws)
    variants = ["reduce"] + args.rows_variants.split(",")
    if name == "fc_in":
      colsum = jnp.sum(ws[0].astype(jnp.float32), axis=1)
      data = (xs, ws, colsum, jax.random.normal(keys[2], (n,)), jnp.full((1, 1), 0.1), jnp.full((1, 1), 1.3))
      variants = ["ffn_xla"] + args.ffn_variants.split(",")
    want = None
    for variant in variants:
      try:
        if want is None:
          want = jax.block_until_ready(chain_fn(variant)(*data))
        row = run_variant(variant, args, data, want)
      except Exception as err:  # noqa: BLE001 - report and go on with the next variant
        row = {"variant": variant, "error": f"{type(err).__name__}: {str(err)[:300]}"}
      row.update(product=name, n=n, k=k, mbytes=2 * n * k / 1e6)
      rows.append(row)
      if "error" in row:
        print(f"{name:6s} {variant:14s} ERROR {row['error']}", flush=True)
        continue
      us = row.get("us_per_call", float("nan"))
      print(f"{name:6s} N={n:5d} K={k:5d} {variant:14s} {us:6.2f} us  {row['mbytes'] / us if us == us else 0:5.2f} "
            f"TB/s  kernels {row.get('kernels_per_call', float('nan')):4.2f}  rel err {row['max_rel_err']:.1e}",
            flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
