"""Which form of a decode projection reads its weights fastest? Kernel times of one-row products.

A batch-1 decode step of mega1.3B reads 2.4 GB of projection weights per token; at the H200's
~4 TB/s that is ~0.6 ms, but the step's GEMMs took ~1.19 ms. This probe times, per kernel from a
jax.profiler trace, the products of the decode shapes (x [B, K] times a bf16 weight, float32
accumulation) in several forms:

  maskrow_kn   x doubled to [2, K] by a runtime 0/1 row mask, times w [K, N] (today's decode GEMM)
  dot_kn       lax.dot_general(x [1, K], w [K, N]) (XLA's dot strength reduction applies)
  dot_nk       lax.dot_general(x [1, K], w_t [N, K]) contracting both minor axes
  maskrow_nk   the masked [2, K] rows times w_t [N, K]
  reduce_nk    sum(x[None, :] * w_t, axis=-1) in float32 (a row reduction; producers of x fuse in)
  prologue_nk  reduce_nk with x = xs * scale (an elementwise producer) to see if it stays one kernel
  pallas_nk[:BNxBK[xSTEPS]]  kernels_pallas.decode_step.gemv_partials (split-K tiles of STEPS x BK
               columns, 0 = all of K) + the sum of the partials
  read_nk      sum(w_t, axis=-1): only the weight read (the best a row-reduction kernel reads at)
  gemm_kn / gemm_nk  (batch > 1) x [B, K] @ w [K, N] and x contracted with w_t [N, K]

Each variant is one jit of `--count` products of distinct weights (a layer stack's worth), so
the trace's kernel sum divided by --count is the time of one product; TB/s = weight bytes over
that time. Every variant's result is checked against a float32 reference. The products are
independent, so XLA may merge several row reductions into one kernel (kernels per product < 1):
the time per product is still the weights' read time, as in a decode step where they run one by
one (there: 5.6-6.4 us per 16.8-19.9 MB, ~3.1 TB/s, H200 2026-11-29).

H200, jax 0.11.2 (2026-11-29, wv K=2048 N=4096): maskrow_kn 7.5 us (2.2 TB/s), dot_kn 25.7 (0.65),
dot_nk 5.3 (3.15), reduce_nk 5.3 (3.16), prologue_nk 5.4, read_nk 5.5 (3.05), pallas_nk 9.3 / 8.1
(1.8-2.1, 3 kernels); batch 16: gemm_kn 8.1 us, gemm_nk 8.6 us.

  python experiments/gpu_checks/probe_gemv.py --json "$OUT/gemv.json"
  python experiments/gpu_checks/probe_gemv.py --smoke      # tiny shapes on the CPU
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

# (name, K, N): mega1.3B's per-layer decode products.
SHAPES = (("wv", 2048, 4096), ("w_mx", 2048, 6656), ("wh2", 4096, 2048), ("fc1", 2048, 4864),
          ("fc2", 4864, 2048))
SMOKE_SHAPES = (("a", 256, 128), ("b", 128, 256))
DIMS_KN = (((1,), (0,)), ((), ()))
DIMS_NK = (((1,), (1,)), ((), ()))
F32 = jnp.float32


def _maskrow(x, w, mask, dims):
  doubled = x * mask[:, None].astype(x.dtype)
  return jax.lax.dot_general(doubled, w, dims, preferred_element_type=F32)[:1]


def product(variant: str, x: jax.Array, w: jax.Array, mask: jax.Array, scale: jax.Array) -> jax.Array:
  """x: [B, K] bf16; w: [K, N] (variants *_kn) or [N, K] (*_nk) -> [B, N] float32 (read_nk: [1, N])."""
  if variant == "maskrow_kn":
    return _maskrow(x, w, mask, DIMS_KN)
  if variant == "maskrow_nk":
    return _maskrow(x, w, mask, DIMS_NK)
  if variant in ("dot_kn", "gemm_kn"):
    return jax.lax.dot_general(x, w, DIMS_KN, preferred_element_type=F32)
  if variant in ("dot_nk", "gemm_nk"):
    return jax.lax.dot_general(x, w, DIMS_NK, preferred_element_type=F32)
  if variant == "reduce_nk":
    return jnp.sum(x[:, None, :].astype(F32) * w[None].astype(F32), axis=-1)
  if variant == "prologue_nk":
    xs = (x.astype(F32) * scale).astype(x.dtype)
    return jnp.sum(xs[:, None, :].astype(F32) * w[None].astype(F32), axis=-1)
  if variant.startswith("pallas_nk"):
    from kernels_pallas import decode_step
    blocks = [int(v) for v in variant.split(":")[1].split("x")] if ":" in variant else [None, None]
    k_steps = blocks[2] if len(blocks) > 2 else 1
    k_steps = x.shape[-1] // blocks[1] if k_steps == 0 else k_steps  # 0: all of K in one program
    rows = [decode_step.gemv_partials(x[b], w, block_n=blocks[0], block_k=blocks[1], k_steps=k_steps).sum(0)
            for b in range(x.shape[0])]
    return jnp.stack(rows)
  if variant == "read_nk":
    return jnp.sum(w.astype(F32), axis=-1)[None]
  raise ValueError(f"unknown variant {variant!r}")


def stack_fn(variant: str):
  """jit of (xs [C, B, K], weights tuple of C, mask [2], scale [K]) -> tuple of C products."""

  def f(xs, weights, mask, scale):
    return tuple(product(variant, xs[i], w, mask, scale) for i, w in enumerate(weights))

  return jax.jit(f)


def kernel_summary(trace_dir: str, calls: int, count: int) -> dict:
  from experiments.gpu_checks import profile_train_step as trace_tools
  kernels = trace_tools.device_kernels(trace_tools.load_trace_events(trace_dir))
  if not kernels:
    return {"trace_error": "no GPU kernels in the trace (CPU run?)"}
  by_name = trace_tools.totals_by_name(kernels)
  per = calls * count
  return {"us_per_product": sum(k["dur"] for k in kernels) / per, "kernels_per_product": len(kernels) / per,
          "kernels": [{"name": n[:100], "per_product": c / per, "us": d / per} for n, (c, d) in by_name.items()]}


def run_variant(variant: str, name: str, k: int, n: int, batch: int, args, data) -> dict:
  xs, w_kn, w_nk, mask, scale = data
  weights = w_nk if "_nk" in variant else w_kn
  fn = stack_fn(variant)
  start = time.perf_counter()
  out = jax.block_until_ready(fn(xs, weights, mask, scale))
  row = {"shape": name, "K": k, "N": n, "batch": batch, "variant": variant,
         "compile_s": round(time.perf_counter() - start, 2)}
  # Check the first product against a float32 reference.
  x0 = np.asarray(xs[0].astype(F32))
  if variant == "prologue_nk":
    x0 = np.asarray((xs[0].astype(F32) * scale).astype(xs.dtype).astype(F32))
  w0 = np.asarray(w_kn[0].astype(F32))
  want = w0.sum(0)[None] if variant == "read_nk" else x0 @ w0
  got = np.asarray(out[0])
  row["max_rel_err"] = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))
  for _ in range(args.warmup):
    out = fn(xs, weights, mask, scale)
  jax.block_until_ready(out)
  trace_dir = os.path.join(args.trace_dir, f"{name}_{batch}_{variant}")
  shutil.rmtree(trace_dir, ignore_errors=True)
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.calls):
      out = fn(xs, weights, mask, scale)
    jax.block_until_ready(out)
  row["host_us_per_product"] = (time.perf_counter() - start) * 1e6 / (args.calls * args.count)
  row.update(kernel_summary(trace_dir, args.calls, args.count))
  if "us_per_product" in row:
    row["tbps"] = k * n * 2 / (row["us_per_product"] * 1e-6) / 1e12
  return row


def make_data(k: int, n: int, batch: int, count: int):
  rng = jax.random.key(k * 100003 + n)
  kx, kw = jax.random.split(rng)
  xs = jax.random.normal(kx, (count, batch, k), F32).astype(jnp.bfloat16)
  make = jax.jit(lambda key: tuple(
      (jax.random.normal(jax.random.fold_in(key, i), (k, n), F32) / np.sqrt(k)).astype(jnp.bfloat16)
      for i in range(count)))
  w_kn = make(kw)
  w_nk = jax.jit(lambda ws: tuple(w.T for w in ws))(w_kn)
  mask = jnp.asarray([1, 0], jnp.bfloat16)
  scale = jnp.linspace(0.5, 1.5, k, dtype=F32)
  return xs, w_kn, w_nk, mask, scale


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="maskrow_kn,dot_kn,dot_nk,reduce_nk,prologue_nk,read_nk,pallas_nk,pallas_nk:32x256")
  parser.add_argument("--batch-variants", default="gemm_kn,gemm_nk")
  parser.add_argument("--batches", default="1,16", help="batch 1 runs --variants, others --batch-variants")
  parser.add_argument("--count", type=int, default=24)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--trace_dir", default="/tmp/gemv_trace")
  parser.add_argument("--json", default=None)
  parser.add_argument("--smoke", action="store_true")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  if args.smoke:
    args.count, args.calls, args.warmup = 3, 2, 1
  print(f"jax {jax.__version__} {jax.devices()[0].device_kind}", flush=True)
  rows = []
  for name, k, n in shapes:
    for batch in (int(b) for b in args.batches.split(",")):
      variants = (args.variants if batch == 1 else args.batch_variants).split(",")
      try:
        data = make_data(k, n, batch, args.count)
      except Exception as err:  # noqa: BLE001
        print(f"{name} batch {batch}: data failed: {type(err).__name__}: {err}"[:300], flush=True)
        continue
      for variant in variants:
        try:
          row = run_variant(variant, name, k, n, batch, args, data)
        except Exception as err:  # noqa: BLE001 - one failing variant must not end the probe
          row = {"shape": name, "K": k, "N": n, "batch": batch, "variant": variant,
                 "error": f"{type(err).__name__}: {err}"[:300]}
        rows.append(row)
        if "error" in row:
          print(f"{name:5s} K={k:5d} N={n:5d} B={batch:2d} {variant:17s} FAILED {row['error']}", flush=True)
        else:
          top = max(row.get("kernels", [{"name": "-", "us": 0}]), key=lambda kk: kk["us"])
          print(f"{name:5s} K={k:5d} N={n:5d} B={batch:2d} {variant:17s} {row.get('us_per_product', 0):7.2f} us "
                f"{row.get('tbps', 0):5.2f} TB/s  kernels {row.get('kernels_per_product', 0):4.1f}  "
                f"err {row['max_rel_err']:.1e}  host {row['host_us_per_product']:6.1f} us  "
                f"compile {row['compile_s']} s  main: {top['name'][:50]}", flush=True)
      del data
      jax.clear_caches()
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
