"""The single-pass TimestepNorm backward in Mosaic GPU against the current backward (GPU probe, < 2 min).

  python3 experiments/gpu_checks/probe_tsn_mgpu_bwd.py --json OUT.json [--dump ptxas|all] | tee LOG

At B=1, L=32768, D=4096, G=64 bf16 (SPEC §3's benchmark shape), times (harness.time_fn, warmup 3,
iters 15, inner 10; device time per call):
  * "current": the backward of kernels_pallas.timestep_norm.timestep_norm_pallas at its GPU default
    (jax.vjp's function applied to a fixed cotangent: backward only);
  * "mgpu T.. s.. w.. t.. mask|select [reload]": kernels_pallas.timestep_norm_mgpu_bwd for a few
    (block_t, stages per warpgroup, wgs: 1, or 2 splitting each group's 64 features into halves,
    tile_wgs: 1 to 4 warpgroups on different tiles handing the carry on; the suffix mask held in
    registers or made by compare and select; reload: dx re-reads x and dy, w^ is re-read at every
    use), with the small XLA ops around it (its inputs mu_run / rstd_run are made once, untimed, by
    the XLA associative scan, as the single-pass forward would save them);
  * "floor": the slab walk dx = x + dy of probe_slab_stream (64 Mosaic GPU programs, the same
    bytes and access pattern with no arithmetic).
For every new variant: max relative errors (max |a - b| / max |b|) of dx, dw, db and of the state's
adjoints against the current kernel (both run with a prior state of count 5 and nonzero cotangents
of the final state, so every output is exercised). A variant that fails (lowering, shared memory,
runtime) is recorded with its error instead of stopping the probe. --dump ptxas: Mosaic GPU prints ptxas's
report (registers, spills) of every kernel it compiles to stdout, after the "compiling <variant>"
line; --dump all: also the PTX and SASS (large: redirect to a file). (Not MOSAIC_GPU_DUMP_TO: it
also dumps the MLIR before and after every pass, hundreds of MB for these unrolled bodies.)
--interpret: a CPU smoke test of this script at small shapes (the new kernel under Mosaic GPU's
interpreter; times meaningless).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def _parse():
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default=None)
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--groups", type=int, default=64)
  parser.add_argument("--variants", default="64x4x1t2,64x5x1t2,64x2x1t3,64x3x1t3,64x3x1t3m,64x3x1t3k,64x2x1t4",
                      help="comma-separated block_t x stages x wgs [t tile_wgs] [flags]: stages per "
                      "warpgroup (tiles in flight: stages x tile_wgs); flags 's': the suffix mask by compare "
                      "and select, 'm': in registers (default: the kernel's choice); 'r': dx re-reads x and "
                      "dy from the ring and w^ at every use, 'k': keeps xh, dyw, w^ in registers (tile_wgs > 1; "
                      "default: re-read with 3 or 4)")
  parser.add_argument("--dump", choices=("none", "ptxas", "all"), default="none",
                      help="Mosaic GPU compiler reports on stdout (ptxas -v; all: PTX and SASS too)")
  parser.add_argument("--interpret", action="store_true", help="CPU smoke test (interpreter)")
  return parser.parse_args()


ARGS = _parse()
if ARGS.dump != "none":  # read by Mosaic GPU when it compiles a kernel
  os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
  if ARGS.dump == "all":
    os.environ.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_SASS="1")
if ARGS.interpret:
  os.environ["JAX_PLATFORMS"] = "cpu"
  # The interpreter runs each warpgroup as an XLA CPU execution blocking in its barrier waits; the
  # CPU client's thread pool grows with the host devices, and with fewer threads than warpgroups
  # (2 cores, tile_wgs = 4) the programs deadlock (tests/conftest.py sets the same).
  from megalodon_jax.xla_flags import add_xla_flags
  add_xla_flags("--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks.harness import time_fn  # noqa: E402
from experiments.gpu_checks.probe_slab_stream import _mgpu_walk  # noqa: E402
from kernels_pallas import timestep_norm as tsn_kernel  # noqa: E402
from kernels_pallas import timestep_norm_mgpu_bwd as mgpu_bwd  # noqa: E402
from megalodon_jax.ops import timestep_norm as tsn  # noqa: E402

EPS = 1e-5
PRIOR_COUNT = 5


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def _inputs(length: int, dim: int, groups: int):
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  x = jax.random.normal(keys[0], (1, length, dim), jnp.bfloat16)
  dy = jax.random.normal(keys[1], (1, length, dim), jnp.bfloat16)
  weight = 0.1 * jax.random.normal(keys[2], (dim,), jnp.float32)
  bias = 0.1 * jax.random.normal(keys[3], (dim,), jnp.float32)
  g_mu = jax.random.normal(keys[4], (1, groups), jnp.float32)
  g_var = jax.random.normal(keys[5], (1, groups), jnp.float32)
  state = tsn.TimestepNormState(jnp.full((1,), PRIOR_COUNT, jnp.int32),
                                jax.random.normal(keys[6], (1, groups), jnp.float32),
                                0.5 + jax.random.uniform(keys[7], (1, groups), jnp.float32))
  return x, dy, weight, bias, g_mu, g_var, state


@functools.partial(jax.jit, static_argnames=("groups",))
def _saved_stats(x, state, *, groups: int):
  """mu_run, rstd_run [B, G, L] float32 from the XLA associative scan."""
  batch, length, _ = x.shape
  mean, var = tsn.step_stats(x, groups)
  valid = jnp.ones((batch, length), jnp.bool_)
  mu, sigma2, _ = tsn._prefix_associative(state, valid, jnp.zeros_like(valid), mean, var)
  return jnp.moveaxis(mu, 1, 2), jnp.moveaxis(jax.lax.rsqrt(sigma2 + EPS), 1, 2)


def _current_backward(x, weight, bias, state, groups: int, interpret: bool):
  """(jitted backward taking (vjp_fn, cotangents), vjp_fn) of the current Pallas kernel."""
  def forward(x, weight, bias, mean0, var0):
    prior = tsn.TimestepNormState(state.count, mean0, var0)
    y, final = tsn_kernel.timestep_norm_pallas(x, weight, bias, num_groups=groups, eps=EPS, state=prior,
                                               interpret=interpret)
    return y, final.mean, final.var

  _, vjp_fn = jax.vjp(forward, x, weight, bias, state.mean, state.var)
  # vjp_fn is a pytree (its residuals are leaves): passed as an argument, not baked in as constants.
  return jax.jit(lambda fn, cts: fn(cts)), vjp_fn


def main() -> None:
  length, dim, groups = ARGS.length, ARGS.dim, ARGS.groups
  interpret_params = None
  if ARGS.interpret:
    import pytest
    from tests.mgpu_interpreter import mosaic_gpu_interpreter
    interpreter = mosaic_gpu_interpreter(pytest.MonkeyPatch())
    interpret_params, _ = next(interpreter)
  timing = dict(warmup=3, iters=15, inner=10) if not ARGS.interpret else dict(warmup=0, iters=1, inner=1)
  x, dy, weight, bias, g_mu, g_var, state = _inputs(length, dim, groups)
  rows = []

  def record(name, fn, args, extra=None):
    entry = {"name": name, **(extra or {})}
    print(f"compiling {name}", flush=True)
    try:
      out = jax.block_until_ready(fn(*args))
      stats = time_fn(fn, *args, **timing)
      entry["median_ms"] = stats["median_ms"]
      entry["p10_ms"], entry["p90_ms"] = stats["p10_ms"], stats["p90_ms"]
      rows.append(entry)
      print(f"{name:40s} {stats['median_ms']:8.4f} ms", flush=True)
      return out
    except Exception as e:  # noqa: BLE001  (a variant that fails is a finding, not a crash)
      entry["failure"] = f"{type(e).__name__}: {str(e)[:800]}"
      rows.append(entry)
      print(f"{name:40s} FAILED {entry['failure'][:300]}", flush=True)
      return None

  backward, vjp_fn = _current_backward(x, weight, bias, state, groups, ARGS.interpret)
  cts = (dy, g_mu, g_var)
  want = record("current (timestep_norm_pallas vjp)", backward, (vjp_fn, cts))
  mu_run, rstd_run = _saved_stats(x, state, groups=groups)
  w_hat = weight + 1.0
  n0 = state.count.astype(jnp.float32)
  for variant in ARGS.variants.split(","):
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:t(\d+))?([smrk]*)", variant)
    if match is None:
      raise SystemExit(f"variant {variant!r}: block_t x stages x wgs [t tile_wgs] [s|m] [r|k]")
    block_t, stages, wgs, tile_wgs = (int(v or 1) for v in match.groups()[:4])
    flags = match.group(5)
    reload_tile = tile_wgs > 1 and ("r" in flags or ("k" not in flags and mgpu_bwd._default_reload_tile(tile_wgs)))
    mask_regs = ("m" in flags or ("s" not in flags and mgpu_bwd._default_mask_regs(
        block_t, dim // groups, wgs, tile_wgs, reload_tile)))
    fn = jax.jit(functools.partial(mgpu_bwd.timestep_norm_bwd_mgpu, num_groups=groups, eps=EPS,
                                   block_t=block_t, stages=stages, wgs=wgs, tile_wgs=tile_wgs,
                                   mask_regs=mask_regs, reload_tile=reload_tile,
                                   interpret=interpret_params or False))
    args = (x, dy, w_hat, mu_run, rstd_run, n0, state.mean, state.var, g_mu, g_var)
    name = (f"mgpu T{block_t} s{stages} w{wgs} t{tile_wgs} {'mask' if mask_regs else 'select'}"
            f"{' reload' if reload_tile else ''}")
    got = record(name, fn, args, {"block_t": block_t, "stages": stages, "wgs": wgs, "tile_wgs": tile_wgs,
                                  "mask_regs": mask_regs, "reload_tile": reload_tile})
    if got is not None and want is not None:
      dx, dw, db, d_mu0, d_var0 = got
      errs = {"dx": _rel_err(dx, want[0]), "dw": _rel_err(dw, want[1]), "db": _rel_err(db, want[2]),
              "d_mu0": _rel_err(d_mu0, want[3]), "d_var0": _rel_err(d_var0, want[4])}
      rows[-1]["errors"] = errs
      print("    errors vs current: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
  if not ARGS.interpret:
    for tile in (64, 128):
      walk = jax.jit(functools.partial(_mgpu_walk, width=64, tile=tile, splits=1, concurrent=4))
      record(f"floor walk T{tile} c4", lambda a, b, walk=walk: walk([a, b]), (x[0], dy[0]))
  if ARGS.json:
    with open(ARGS.json, "w") as f:
      json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__,
                 "shape": {"B": 1, "L": length, "D": dim, "G": groups, "dtype": "bfloat16"}, "rows": rows},
                f, indent=1)


if __name__ == "__main__":
  main()
