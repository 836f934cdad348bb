"""SM clock, power and throttle reasons while chunked attention, CEMA or a plain matmul runs back to back.

  python experiments/gpu_checks/clocks_under_load.py --seconds 8 --json /tmp/clocks.json
  python experiments/gpu_checks/clocks_under_load.py --workloads cema matmul

Why: kernels that win alone can fail to move the whole op (2026-11-30: the cluster-multicast block
matmul, 10% faster alone, changed the op by 0.3%), and back-to-back attention runs ~10% slower than
single calls. If the card sits at its power limit under the op, the SM clock, not the kernels' latency
hiding, sets the pace, and only doing less work (bytes moved, instructions issued) helps. This runs
each workload for --seconds while `nvidia-smi -lms` samples the clocks, and prints per workload the
time per call and the median / minimum SM clock, power draw and the throttle reasons seen.
Workloads: the attention op fwd+bwd at bench_ops' shape, the CEMA kernel fwd+bwd at bench_ops'
shape (D=4096, N=16, L=32768: float32 FMA-bound, so its floor depends on the clock too), and an
8192^3 bf16 matmul (the matmul-peak ceiling) for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import chunk_attention as ca

_QUERY = "clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active"


def _attention_workload():
  batch, n_chunks, chunk, heads, dk, dv = 1, 16, 2048, 4, 256, 2048
  length = n_chunks * chunk
  keys = jax.random.split(jax.random.key(0), 4)
  q = (jax.random.normal(keys[0], (batch, length, heads, dk)) * dk ** -0.25).astype(jnp.bfloat16)
  k = (jax.random.normal(keys[1], (batch, length, heads, dk)) * dk ** -0.25).astype(jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, length, heads, dv)).astype(jnp.bfloat16)
  d_out = jax.random.normal(keys[3], (batch, length, heads, dv)).astype(jnp.bfloat16)

  @jax.jit
  def fwd_bwd(q, k, v, d_out):
    out, vjp = jax.vjp(lambda q, k, v: ca.chunk_attention(q, k, v, chunk_size=chunk), q, k, v)
    return out, *vjp(d_out)

  return fwd_bwd, (q, k, v, d_out)


def _cema_workload():
  from experiments.benchmarks import bench_ops
  from kernels_pallas import cema as cema_kernels
  from megalodon_jax.ops import cema as cema_ops
  batch, length, dim, order = 1, 32768, 4096, 16
  params = {name: jnp.asarray(value) for name, value in bench_ops._cema_params(dim, order, seed=3).items()}
  x = jax.random.normal(jax.random.key(2), (batch, length, dim)).astype(jnp.bfloat16)
  d_y = jax.random.normal(jax.random.key(3), (batch, length, dim), jnp.float32)
  config = cema_kernels.default_config(batch, length, dim, order)

  def forward(x, params):
    coeffs = cema_ops.cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
    return cema_kernels.cema_pallas(x, coeffs, params["omega"].reshape(-1), config=config)

  @jax.jit
  def fwd_bwd(x, params, d_y):
    y, vjp = jax.vjp(forward, x, params)
    return y, vjp(d_y)

  return fwd_bwd, (x, params, d_y)


def _matmul_workload():
  a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
  return jax.jit(lambda a: a @ a), (a,)


def _sample_clocks(seconds: float, fn, inputs) -> tuple[list[list[str]], float, int]:
  """Runs fn back to back for `seconds` under nvidia-smi sampling: (samples, ms per call, calls)."""
  smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={_QUERY}", "--format=csv,noheader,nounits", "-lms", "100"],
                         stdout=subprocess.PIPE, text=True)
  try:
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      for _ in range(5):
        out = fn(*inputs)
      jax.block_until_ready(out)
      calls += 5
    elapsed = time.perf_counter() - start
  finally:
    smi.terminate()
  lines = smi.communicate()[0].strip().splitlines()
  return [[field.strip() for field in line.split(",")] for line in lines if line.strip()], elapsed / calls * 1e3, calls


_WORKLOADS = {"attention": ("attention fwd+bwd", _attention_workload), "cema": ("cema fwd+bwd", _cema_workload),
              "matmul": ("matmul 8192^3", _matmul_workload)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seconds", type=float, default=8.0)
  parser.add_argument("--json", default=None)
  parser.add_argument("--workloads", nargs="+", choices=sorted(_WORKLOADS), default=["attention", "matmul"])
  args = parser.parse_args()
  rows = []
  for name, make in [("idle", None)] + [_WORKLOADS[w] for w in args.workloads]:
    if make is None:
      fn, inputs = (lambda: jnp.zeros(())), ()
    else:
      fn, inputs = make()
      jax.block_until_ready(fn(*inputs))  # compile and warm up outside the sampled window
    samples, ms, calls = _sample_clocks(args.seconds if make else 2.0, fn, inputs)
    numeric = np.array([[float(x) for x in s[:5]] for s in samples if len(s) >= 6], dtype=np.float64)
    reasons = sorted({s[5] for s in samples if len(s) >= 6})
    row = {"workload": name, "ms_per_call": None if make is None else round(ms, 3), "calls": calls,
           "samples": len(numeric), "sm_mhz_median": float(np.median(numeric[:, 0])),
           "sm_mhz_min": float(np.min(numeric[:, 0])), "power_w_median": float(np.median(numeric[:, 2])),
           "power_limit_w": float(numeric[0, 3]), "temp_c_max": float(np.max(numeric[:, 4])),
           "throttle_reasons": reasons}
    rows.append(row)
    print(f"{name:20s} {str(row['ms_per_call']):>9s} ms/call  SM {row['sm_mhz_median']:.0f} MHz (min "
          f"{row['sm_mhz_min']:.0f})  power {row['power_w_median']:.0f} / {row['power_limit_w']:.0f} W  "
          f"{row['temp_c_max']:.0f} C  throttle {reasons}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
