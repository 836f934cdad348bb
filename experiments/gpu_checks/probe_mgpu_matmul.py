"""How fast is a Pallas Mosaic GPU (TMA + wgmma, warp-specialised) matmul on this card?

The chunked-attention kernels are Pallas-Triton kernels fed by cp.async; their GEMM-shaped stages
(P V, dV = P^T dO, the backward tiles' dO V^T) run at 490-580 TFLOP/s on an H200 where XLA's
cuBLAS matmul reaches 680-720. A Mosaic GPU rewrite is the README's open route to the attention
target; this probe measures whether the building block is there: JAX's own Hopper example kernel
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`) against `jnp.dot` in the same run, bf16 in,
bf16 out, float32 accumulation, on a large square product and on attention-like products (one
chunk-head's rows against a 2048-wide operand, K = 2048).

Each row: median of --iters calls after warm-up (block_until_ready), TFLOP/s, and the largest
relative error against a float32 XLA product. Configurations that do not fit shared memory or
fail to compile are reported as errors, not dropped.

  python experiments/gpu_checks/probe_mgpu_matmul.py --results-dir "$OUT"
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import harness

SHAPES = ((8192, 8192, 8192), (32768, 2048, 2048), (4096, 2048, 2048))


def _configs():
  """Tilings as keyword dicts (the example's TuningConfig fields may change between jax versions)."""
  for (tile_m, tile_n), wg_dim in itertools.product(((128, 128), (128, 256), (256, 128)), ("N", "M")):
    yield dict(tile_m=tile_m, tile_n=tile_n, tile_k=64, max_concurrent_steps=4, epi_tile_n=64,
               epi_tile_m=64, grid_minor_dim="N", grid_tile_width=8, wg_dimension=wg_dim)


def _mgpu_fn(mgpu, fields):
  dims = {key: mgpu.MatmulDimension[value] for key, value in fields.items() if key.endswith("_dim") or key == "wg_dimension"}
  cfg = mgpu.TuningConfig(**{**fields, **dims})
  return jax.jit(lambda a, b: mgpu.matmul(a, b, None, cfg))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--results-dir", default=None)
  parser.add_argument("--name", default="probe-mgpu-matmul")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("probe_mgpu_matmul needs a Hopper GPU (Mosaic GPU kernels have no CPU path).")
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mgpu  # imports Mosaic GPU

  rows = []
  for m, n, k in SHAPES:
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
    ref = np.asarray(jnp.dot(a, b, preferred_element_type=jnp.float32))
    scale = float(np.max(np.abs(ref)))
    flops = 2.0 * m * n * k
    xla = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    candidates = [("xla_dot", "", lambda: jax.jit(xla))]
    for fields in _configs():
      label = f"{fields['tile_m']}x{fields['tile_n']} wg={fields['wg_dimension']}"
      candidates.append(("mgpu", label, lambda fields=fields: _mgpu_fn(mgpu, fields)))
    for impl, label, make in candidates:
      row = {"shape": f"{m}x{n}x{k}", "impl": impl, "config": label}
      try:
        fn = make()
        out = fn(a, b)
        row["max_rel_err"] = float(np.max(np.abs(np.asarray(out, np.float32) - ref))) / scale
        timing = harness.time_fn(fn, a, b, warmup=args.warmup, iters=args.iters)
        row["ms"] = timing["median_ms"]
        row["tflops"] = flops / (timing["median_ms"] * 1e-3) / 1e12
      except Exception as err:  # noqa: BLE001 - one failing tiling must not end the probe
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
      rows.append(row)
      print({key: (round(val, 4) if isinstance(val, float) else val) for key, val in row.items()}, flush=True)
  harness.write_results(args.name, rows, {"probe_shapes": [list(s) for s in SHAPES]},
                        results_dir=args.results_dir)


if __name__ == "__main__":
  main()
