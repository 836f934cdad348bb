"""Probe: the single-pass Mosaic GPU TimestepNorm forward (kernels_pallas/timestep_norm_mgpu.py) on a
Hopper GPU, against today's forward and the data-movement floor. One short call (< 2 min):

  python3 experiments/gpu_checks/probe_tsn_mgpu.py --json OUT.json
  python3 experiments/gpu_checks/probe_tsn_mgpu.py --cpu     # smoke run: tiny shape, interpreted

At B=1, L=32768, D=4096, G=64, bf16, with a carried incoming state (count 1000), it times (harness
time_fn: warmup 3, 15 samples of 10 back-to-back calls, so the host's dispatch is hidden):
  * the current default forward (kernels_pallas.timestep_norm.timestep_norm_pallas, no gradient);
  * XLA's associative-scan forward (ops.timestep_norm, method="associative");
  * the floor: 64 Mosaic GPU programs streaming y = 1.5 x over the same column slabs
    (probe_slab_stream._mgpu_walk, tiles of 128 steps, 6 in flight: 0.148 ms on 2026-11-30);
  * the new kernel in several settings (block_t, stages, compute warpgroups, register layout, how y
    is stored, Pallas' automatic barriers).
For each setting it records the errors against the current kernel (y, final mean / var) and against
XLA's float32 running statistics (mu_run, rstd_run). A setting that fails to lower or compile is
recorded with its error instead of stopping the run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import traceback

if "--cpu" in sys.argv:
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # threads for the interpreter
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.benchmarks.harness import time_fn  # noqa: E402
from experiments.gpu_checks.probe_slab_stream import _mgpu_walk  # noqa: E402
from kernels_pallas import timestep_norm as tsn_kernel  # noqa: E402
from kernels_pallas import timestep_norm_mgpu as tm  # noqa: E402
from megalodon_jax.ops import timestep_norm as tsn  # noqa: E402

EPS = 1e-5
# (name, options of timestep_norm_fwd_mgpu). Shared memory: W=2 fits up to 6 stages at T=128,
# W=3 up to 4.
VARIANTS = (
    ("W2 T128 S6 wgmma tma (default)", dict()),
    ("W2 T128 S4 wgmma tma", dict(stages=4)),
    ("W2 T128 S4 wgmma tma strict-sync", dict(stages=4, strict_sync=True)),
    ("W2 T128 S6 wgmma tma auto-barriers", dict(auto_barriers=True)),
    ("W2 T128 S6 wide direct strict-sync", dict(tile_layout="wide", y_store="direct", strict_sync=True)),
    ("W3 T128 S4 wgmma tma", dict(compute_wgs=3, stages=4)),
    ("W3 T128 S4 wgmma tma strict-sync", dict(compute_wgs=3, stages=4, strict_sync=True)),
    ("W4 T64 S6 wgmma tma", dict(block_t=64, compute_wgs=4, stages=6)),
    ("W4 T64 S6 wgmma tma strict-sync", dict(block_t=64, compute_wgs=4, stages=6, strict_sync=True)),
)


def _inputs(batch, length, dim, groups):
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  x = (0.3 + jax.random.normal(keys[0], (batch, length, dim), jnp.float32)
       * (0.5 + jax.random.uniform(keys[1], (dim,)))).astype(jnp.bfloat16)
  weight = 0.1 * jax.random.normal(keys[2], (dim,), jnp.float32)
  bias = 0.1 * jax.random.normal(keys[3], (dim,), jnp.float32)
  state = tsn.TimestepNormState(jnp.full((batch,), 1000, jnp.int32),
                                0.3 + 0.1 * jax.random.normal(keys[4], (batch, groups), jnp.float32),
                                1.0 + 0.2 * jax.random.uniform(keys[5], (batch, groups), jnp.float32))
  return x, weight, bias, state


def _xla_running_stats(x, state, groups):
  """XLA's float32 running (mu [B, G, L], rstd [B, G, L]) by the associative scan."""
  batch, length, _ = x.shape
  mean, var = tsn.step_stats(x, groups)
  valid = jnp.ones((batch, length), jnp.bool_)
  reset = jnp.zeros((batch, length), jnp.bool_)
  mu, sigma2, _ = tsn._prefix_associative(state, valid, reset, mean, var)
  return jnp.moveaxis(mu, 1, 2), jnp.moveaxis(jax.lax.rsqrt(sigma2 + EPS), 1, 2)


def _max_abs(a, b) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def _max_rel(a, b) -> float:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.max(jnp.abs(a - b) / jnp.maximum(jnp.abs(b), 1e-6)))


@contextlib.contextmanager
def _cpu_interpreter():
  """--cpu: Mosaic GPU's CPU interpreter as the tests complete it (tests/mgpu_interpreter.py)."""
  from tests.mgpu_interpreter import mosaic_gpu_interpreter

  class Patch:  # the part of pytest's monkeypatch the fixture uses
    def __init__(self):
      self.undo = []

    def setattr(self, obj, name, value):
      self.undo.append((obj, name, getattr(obj, name)))
      setattr(obj, name, value)

  patch = Patch()
  fixture = mosaic_gpu_interpreter(patch)
  params, _ = next(fixture)
  try:
    yield params
  finally:
    fixture.close()
    for obj, name, value in reversed(patch.undo):
      setattr(obj, name, value)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default=None)
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--groups", type=int, default=64)
  parser.add_argument("--cpu", action="store_true", help="smoke run: L=512 D=128 G=2, interpreted")
  args = parser.parse_args()
  with _cpu_interpreter() if args.cpu else contextlib.nullcontext(None) as interpret:
    _run(args, interpret)


def _run(args, interpret) -> None:
  batch, length, dim, groups = 1, args.length, args.dim, args.groups
  variants, timing = VARIANTS, dict(warmup=3, iters=15, inner=10)
  if interpret is not None:
    length, dim, groups = 512, 128, 2
    variants, timing = VARIANTS[:1] + VARIANTS[4:5] + VARIANTS[2:3], dict(warmup=1, iters=1, inner=1)
  x, weight, bias, state = _inputs(batch, length, dim, groups)
  rows = []
  header = {"device": str(jax.devices()[0]), "jax": jax.__version__,
            "shape": {"B": batch, "L": length, "D": dim, "G": groups, "dtype": "bfloat16"}}
  print(f"device {jax.devices()[0]}, jax {jax.__version__}; B{batch} L{length} D{dim} G{groups} bf16", flush=True)

  def timed(name, fn, *fn_args, extra=None):
    entry = {"name": name}
    try:
      out = jax.block_until_ready(fn(*fn_args))
      if extra is not None:
        entry.update(extra(out))
      stats = time_fn(fn, *fn_args, **timing)
      entry["median_ms"] = stats["median_ms"]
      entry["min_ms"] = stats.get("min_ms")
      errs = {k: v for k, v in entry.items() if k.startswith("err")}
      print(f"{name:44s} {stats['median_ms']:8.4f} ms  " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()),
            flush=True)
    except Exception as e:  # noqa: BLE001  (a variant that fails to lower or compile is a finding)
      entry["failure"] = f"{type(e).__name__}: {str(e)[:1500]}"
      entry["traceback"] = traceback.format_exc()[-3000:]
      print(f"{name:44s} FAILED {entry['failure'][:400]}", flush=True)
    rows.append(entry)
    if args.json:  # after every row: a setting that hangs the GPU leaves the earlier rows on disk
      with open(args.json, "w") as f:
        json.dump({**header, "rows": rows}, f, indent=1)
    return entry

  current = jax.jit(lambda x, w, b, s: tsn_kernel.timestep_norm_pallas(x, w, b, num_groups=groups, eps=EPS,
                                                                         state=s))
  xla = jax.jit(lambda x, w, b, s: tsn.timestep_norm(x, w, b, num_groups=groups, eps=EPS, state=s,
                                                     method="associative"))
  y_cur, state_cur = jax.block_until_ready(current(x, weight, bias, state))
  mu_xla, rstd_xla = jax.block_until_ready(jax.jit(functools.partial(_xla_running_stats, groups=groups))(x, state))
  timed("current fwd (timestep_norm_pallas)", current, x, weight, bias, state)
  timed("xla associative fwd", xla, x, weight, bias, state,
        extra=lambda out: {"err_y_vs_current": _max_abs(out[0], y_cur)})
  if interpret is None:
    walk = jax.jit(functools.partial(_mgpu_walk, width=64, tile=128, splits=1, concurrent=6))
    timed("floor: slab walk y=1.5x (mgpu T128 c6)", lambda a: walk([a]), x.reshape(length, dim))

  w_hat = weight + 1.0
  n0 = state.count.astype(jnp.float32)

  def errors(out):
    y, mu_run, rstd_run, mean_f, var_f = out
    return {"err_y_vs_current": _max_abs(y, y_cur), "err_y_rel_vs_current": _max_rel(y, y_cur),
            "err_mu_run_vs_xla": _max_abs(mu_run, mu_xla), "err_rstd_run_rel_vs_xla": _max_rel(rstd_run, rstd_xla),
            "err_mean_vs_current": _max_abs(mean_f, state_cur.mean),
            "err_var_rel_vs_current": _max_rel(var_f, state_cur.var), **_bad_steps(mu_run, mu_xla)}

  def _bad_steps(mu_run, want):
    """Where mu_run is wrong ([B, G, L] -> which steps, groups and tile positions): a diagnostic for races."""
    bad = ~(jnp.abs(mu_run - want) <= 1e-3)  # NaN counts as bad
    steps = np.flatnonzero(np.asarray(jnp.any(bad, axis=(0, 1))))
    groups_bad = np.flatnonzero(np.asarray(jnp.any(bad, axis=(0, 2))))
    if steps.size == 0:
      return {"bad_steps": 0}
    return {"bad_steps": int(steps.size), "bad_groups": int(groups_bad.size), "first_bad_steps": steps[:8].tolist(),
            "last_bad_steps": steps[-8:].tolist(), "bad_step_mod_128": sorted(set((steps % 128).tolist()))[:16],
            "bad_tile_mod_8": sorted(set(((steps // 64) % 8).tolist()))}

  for name, options in variants:
    fn = jax.jit(functools.partial(tm.timestep_norm_fwd_mgpu, num_groups=groups, eps=EPS, interpret=interpret,
                                   **options))
    entry = timed(f"mgpu {name}", fn, x, w_hat, bias, n0, state.mean, state.var, extra=errors)
    entry["options"] = options
  if args.json:
    with open(args.json, "w") as f:
      json.dump({**header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
