"""How fast can a few programs stream TimestepNorm-shaped column slabs? (GPU probe, one short call.)

  python3 experiments/gpu_checks/probe_slab_stream.py --json OUT.json

A single-pass TimestepNorm walks each (sequence, group) column slab x[b, :, 64 g : 64 (g + 1)] in time
order with no look-back, so at B=1, G=64 only 64 programs run, one per SM. That design pays only if
64 SMs can move the bytes near the card's rate. This probe times the bare data movement of such
walks, with no statistics: y = 1.5 x over [L, D] bf16 (the forward's bytes) and dx = x + dy (the
backward's), one program per slab (optionally each slab split into S time ranges), in Pallas on
Triton (a fori_loop of masked tile loads that Triton pipelines) and on Mosaic GPU (a sequential grid
axis pipelined by TMA). Reference rows: XLA's fused elementwise pass over the same arrays.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton
from jax.experimental.pallas import mosaic_gpu as plgpu

from experiments.benchmarks.harness import time_fn




def _triton_walk(arrays, *, width, tile, splits, warps, stages):
  """One program per (slab, time range); fori_loop over tiles of [tile, width]."""
  length, dim = arrays[0].shape
  steps = length // (tile * splits)

  def kernel(*refs):
    *in_refs, out_ref = refs
    g, s = pl.program_id(0), pl.program_id(1)

    def body(i, carry):
      rows = pl.ds((s * steps + i) * tile, tile)
      cols = pl.ds(g * width, width)
      vals = [plgpu_triton.load(r.at[rows, cols]).astype(jnp.float32) for r in in_refs]
      out = vals[0] * 1.5 if len(vals) == 1 else vals[0] + vals[1]
      plgpu_triton.store(out_ref.at[rows, cols], out.astype(out_ref.dtype))
      return carry

    lax.fori_loop(0, steps, body, 0)

  return pl.pallas_call(
      kernel, grid=(dim // width, splits),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * len(arrays),
      out_specs=pl.BlockSpec(memory_space=pl.ANY),
      out_shape=jax.ShapeDtypeStruct((length, dim), jnp.bfloat16),
      compiler_params=plgpu_triton.CompilerParams(num_warps=warps, num_stages=stages),
      name="slab_walk_triton")(*arrays)


def _mgpu_walk(arrays, *, width, tile, splits, concurrent):
  """One program per (slab, time range); plgpu.emit_pipeline over its tiles (TMA loads and stores)."""
  length, dim = arrays[0].shape
  steps = length // (tile * splits)
  n_in = len(arrays)

  def kernel(*refs):
    in_gmem, out_gmem = refs[:n_in], refs[n_in]
    g, s = lax.axis_index("g"), lax.axis_index("s")

    def step(_, *smem):
      vals = [r[...].astype(jnp.float32) for r in smem[:n_in]]
      out = vals[0] * 1.5 if n_in == 1 else vals[0] + vals[1]
      smem[n_in][...] = out.astype(jnp.bfloat16)

    spec = plgpu.BlockSpec((tile, width), lambda i: (s * steps + i, g))
    plgpu.emit_pipeline(step, grid=(steps,), in_specs=[spec] * n_in, out_specs=[spec],
                        max_concurrent_steps=concurrent)(*in_gmem, out_gmem)

  return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((length, dim), jnp.bfloat16),
                      grid=(dim // width, splits), grid_names=("g", "s"))(*arrays)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default=None)
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--dim", type=int, default=4096)
  args = parser.parse_args()
  kx, kd = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (args.length, args.dim), jnp.bfloat16)
  dy = jax.random.normal(kd, (args.length, args.dim), jnp.bfloat16)
  gb = 1e9
  rows = []

  def record(name, fn, arrays, want):
    entry = {"name": name}
    try:
      out = fn(*arrays)
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))))
      stats = time_fn(fn, *arrays, warmup=3, iters=15, inner=10)
      nbytes = (len(arrays) + 1) * x.size * 2
      entry.update(median_ms=stats["median_ms"], tb_per_s=nbytes / gb / 1e3 / (stats["median_ms"] * 1e-3),
                   max_err=err)
      print(f"{name:48s} {stats['median_ms']:8.4f} ms  {entry['tb_per_s']:6.2f} TB/s  err {err:.1e}", flush=True)
    except Exception as e:  # noqa: BLE001  (a variant that fails to lower is a finding, not a crash)
      entry["failure"] = f"{type(e).__name__}: {str(e)[:600]}"
      print(f"{name:48s} FAILED {entry['failure'][:300]}", flush=True)
    rows.append(entry)

  fwd_want = (x.astype(jnp.float32) * 1.5).astype(jnp.bfloat16)
  bwd_want = (x.astype(jnp.float32) + dy.astype(jnp.float32)).astype(jnp.bfloat16)
  for kind, arrays, want in (("fwd", (x,), fwd_want), ("bwd", (x, dy), bwd_want)):
    if kind == "fwd":
      xla = jax.jit(lambda a: (a.astype(jnp.float32) * 1.5).astype(jnp.bfloat16))
    else:
      xla = jax.jit(lambda a, b: (a.astype(jnp.float32) + b.astype(jnp.float32)).astype(jnp.bfloat16))
    record(f"{kind} xla elementwise", xla, arrays, want)
    for splits in (1, 2):
      for tile, concurrent in ((64, 4), (128, 4), (128, 6), (256, 3), (256, 4)):
        fn = jax.jit(functools.partial(_mgpu_walk, width=64, tile=tile, splits=splits, concurrent=concurrent))
        record(f"{kind} mgpu S{splits} T{tile} c{concurrent}", lambda *a, fn=fn: fn(list(a)), arrays, want)
      for tile, warps, stages in ((64, 4, 4), (128, 4, 4), (128, 8, 4), (256, 8, 3)):
        fn = jax.jit(functools.partial(_triton_walk, width=64, tile=tile, splits=splits, warps=warps,
                                       stages=stages))
        record(f"{kind} triton S{splits} T{tile} w{warps} st{stages}", lambda *a, fn=fn: fn(list(a)), arrays,
               want)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__,
                 "shape": {"L": args.length, "D": args.dim, "slab_width": 64}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
