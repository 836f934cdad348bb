"""Ceilings measured in the same run as a benchmark: memory bandwidth and dense matmul throughput.

A kernel's speed is reported against what this very device, driver and JAX build reach on the
simplest memory-bound and compute-bound programs, not against datasheet numbers (an H200 lists
4.8 TB/s and ~990 dense bf16 TFLOP/s; measured values are lower).

Run on the GPU: `python -m experiments.benchmarks.floors` (prints a table, writes
experiments/results/<date>_<device>_floors.json). `--small` gives CPU-sized shapes.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp

from experiments.benchmarks import harness


def measure_copy_bandwidth(n_bytes: int = 2 << 30, dtype: Any = jnp.float32, *, warmup: int = 3,
                           iters: int = 20, inner: int = 10) -> dict[str, Any]:
  """Device memory bandwidth from a large elementwise copy y = x + 1 of `n_bytes`.

  Counts bytes read plus bytes written (2 * n_bytes) per call. The +1 keeps XLA from turning the
  copy into an alias of its input; it adds no memory traffic. Returns the timing stats of one call
  plus {"bytes_moved", "gb_per_s"} (GB = 1e9 bytes).
  """
  itemsize = jnp.dtype(dtype).itemsize
  n = n_bytes // itemsize
  if n < 1:
    raise ValueError(f"n_bytes={n_bytes} is smaller than one {jnp.dtype(dtype).name} element")
  x = jax.random.normal(jax.random.key(0), (n,), dtype)
  copy = jax.jit(lambda a: a + jnp.ones((), a.dtype))
  stats = harness.time_fn(copy, x, warmup=warmup, iters=iters, inner=inner)
  moved = 2 * n * itemsize
  return {**stats, "bytes_moved": moved, "gb_per_s": moved / (stats["median_ms"] * 1e-3) / 1e9}


def measure_read_bandwidth(n_bytes: int = 2 << 30, dtype: Any = jnp.float32, *, warmup: int = 3,
                           iters: int = 20, inner: int = 10) -> dict[str, Any]:
  """Bytes read per second by a full reduction sum(x) over `n_bytes` (one number written).

  The copy above mixes reads and writes; passes that mostly read (a norm's statistics, a
  backward's sums) are bounded by this one. Returns timing stats plus {"bytes_moved", "gb_per_s"}.
  """
  itemsize = jnp.dtype(dtype).itemsize
  n = n_bytes // itemsize
  if n < 1:
    raise ValueError(f"n_bytes={n_bytes} is smaller than one {jnp.dtype(dtype).name} element")
  x = jax.random.normal(jax.random.key(2), (n,), dtype)
  total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  stats = harness.time_fn(total, x, warmup=warmup, iters=iters, inner=inner)
  moved = n * itemsize
  return {**stats, "bytes_moved": moved, "gb_per_s": moved / (stats["median_ms"] * 1e-3) / 1e9}


def measure_write_bandwidth(n_bytes: int = 2 << 30, dtype: Any = jnp.float32, *, warmup: int = 3,
                            iters: int = 20, inner: int = 10) -> dict[str, Any]:
  """Bytes written per second by a fill y = full(n, s) of `n_bytes` (s is an argument, so XLA
  cannot fold the fill into a constant; nothing is read). Returns timing stats plus
  {"bytes_moved", "gb_per_s"}."""
  itemsize = jnp.dtype(dtype).itemsize
  n = n_bytes // itemsize
  if n < 1:
    raise ValueError(f"n_bytes={n_bytes} is smaller than one {jnp.dtype(dtype).name} element")
  fill = jax.jit(lambda s: jnp.full((n,), s, dtype))
  stats = harness.time_fn(fill, jnp.asarray(1.5, dtype), warmup=warmup, iters=iters, inner=inner)
  moved = n * itemsize
  return {**stats, "bytes_moved": moved, "gb_per_s": moved / (stats["median_ms"] * 1e-3) / 1e9}


def measure_matmul_peak(n: int = 8192, dtype: Any = jnp.bfloat16, *, warmup: int = 3, iters: int = 20,
                        inner: int = 10) -> dict[str, Any]:
  """Dense matmul throughput: an [n, n] x [n, n] product of random normal matrices in `dtype`.

  Random data matters: GPUs run cooler (and so faster) on zeros. Output in `dtype`, accumulation
  in float32 as XLA does by default. Returns timing stats plus {"flops", "tflops"} with 2 n^3 FLOPs.
  """
  if n < 1:
    raise ValueError(f"matrix size n must be positive, got {n}")
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  stats = harness.time_fn(matmul, a, b, warmup=warmup, iters=iters, inner=inner)
  flops = 2 * n**3
  return {**stats, "n": n, "dtype": jnp.dtype(dtype).name, "flops": flops, "tflops": flops / (stats["median_ms"] * 1e-3) / 1e12}


def measure_floors(*, copy_bytes: int = 2 << 30, matmul_n: int = 8192, matmul_dtype: Any = jnp.bfloat16,
                   warmup: int = 3, iters: int = 20, inner: int = 10) -> dict[str, Any]:
  """The ceilings: {"copy_gb_per_s", "read_gb_per_s", "write_gb_per_s", "matmul_tflops", and each
  one's stats under "copy", "read", "write", "matmul"}. Benchmarks' memory floors use the copy."""
  copy = measure_copy_bandwidth(copy_bytes, warmup=warmup, iters=iters, inner=inner)
  read = measure_read_bandwidth(copy_bytes, warmup=warmup, iters=iters, inner=inner)
  write = measure_write_bandwidth(copy_bytes, warmup=warmup, iters=iters, inner=inner)
  matmul = measure_matmul_peak(matmul_n, matmul_dtype, warmup=warmup, iters=iters, inner=inner)
  return {"copy_gb_per_s": copy["gb_per_s"], "read_gb_per_s": read["gb_per_s"], "write_gb_per_s": write["gb_per_s"],
          "matmul_tflops": matmul["tflops"], "copy": copy, "read": read, "write": write, "matmul": matmul}


def floor_rows(floors: dict[str, Any]) -> list[dict[str, Any]]:
  """Table rows (without the per-iteration times) for write_results."""
  matmul = floors["matmul"]
  memory = [
      {"ceiling": f"{name}_bandwidth", "value": floors[f"{name}_gb_per_s"], "unit": "GB/s",
       "median_ms": floors[name]["median_ms"], "p10_ms": floors[name]["p10_ms"], "p90_ms": floors[name]["p90_ms"],
       "size": f"{floors[name]['bytes_moved'] / 2**30:.3g} GiB {what}"}
      for name, what in (("copy", "moved (read + write)"), ("read", "read (sum)"), ("write", "written (fill)"))
      if name in floors]
  return memory + [
      {"ceiling": "matmul_peak", "value": floors["matmul_tflops"], "unit": "TFLOP/s",
       "median_ms": matmul["median_ms"], "p10_ms": matmul["p10_ms"], "p90_ms": matmul["p90_ms"],
       "size": f"{matmul['n']}^3 {matmul['dtype']}"},
  ]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--copy-bytes", type=int, default=2 << 30)
  parser.add_argument("--matmul-n", type=int, default=8192)
  parser.add_argument("--matmul-dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--small", action="store_true", help="CPU-sized shapes (16 MiB copy, 512^3 matmul)")
  parser.add_argument("--results-dir", default=None)
  args = parser.parse_args(argv)
  copy_bytes, matmul_n = (16 << 20, 512) if args.small else (args.copy_bytes, args.matmul_n)
  floors = measure_floors(copy_bytes=copy_bytes, matmul_n=matmul_n, matmul_dtype=jnp.dtype(args.matmul_dtype),
                          iters=args.iters)
  meta = {"copy_bytes": copy_bytes, "matmul_n": matmul_n, "matmul_dtype": args.matmul_dtype,
          "timing": "median of iters samples, each the mean of 10 back-to-back calls"}
  harness.write_results("floors", floor_rows(floors), meta, results_dir=args.results_dir)


if __name__ == "__main__":
  main()
