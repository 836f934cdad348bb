"""GPU check of the CEMA Pallas kernels: accuracy against references and timings against floors.

Run on a GPU machine from the repository root:
    python experiments/gpu_checks/check_cema.py                 # B=1, D=4096, N=16, L=16384,32768
    python experiments/gpu_checks/check_cema.py --sweep         # also time alternative tilings
    python experiments/gpu_checks/check_cema.py --sweep --parallel 9 --lengths 32768 --json out/s.json
        # one process per tiling: all compile side by side (about a minute each), then each
        # times alone; logs and JSON per tiling next to out/s.json
    python experiments/gpu_checks/check_cema.py --cpu           # tiny end-to-end run (interpret)

Prints, per length: relative errors of the kernel against the lax.scan reference (values, final
state, gradients of x / alpha / delta / theta / gamma / omega) and against a float64 numpy
recurrence on a few channels; then times (median of --iters after warm-up, block_until_ready)
of the kernel forward and forward+backward for each configuration (one row per configuration,
printed as soon as it is timed; the backward column is their difference).  The first
configuration also gets a per-pass breakdown: forward chunk summaries ("local"), the whole
forward, backward chunk summaries and the whole backward (given the forward's residuals).
Optionally XLA baselines (the lax.scan reference and a jax.lax.associative_scan CEMA) and the
memory floor (a bf16 -> f32 copy of x, the traffic of reading x once and writing y once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks import harness  # noqa: E402
from kernels_pallas import cema as K  # noqa: E402
from megalodon_jax.ops.cema import cema_coefficients  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Inputs and helpers.
# ----------------------------------------------------------------------------------------------

def make_params(dim: int, ndim: int, seed: int) -> dict:
  """SPEC §2 initialisation (alpha, delta ~ N(0, 0.2); theta from the log-spaced frequencies)."""
  rng = np.random.default_rng(seed)
  freqs = np.exp(-np.arange(1, dim + 1) * math.log(dim) / dim)
  freqs = rng.permutation(freqs)
  gamma = np.stack([rng.normal(size=(dim, ndim)), np.zeros((dim, ndim))], axis=-1)
  return {
      "alpha": jnp.asarray(rng.normal(0, 0.2, (dim, ndim, 1)), jnp.float32),
      "delta": jnp.asarray(rng.normal(0, 0.2, (dim, ndim, 1)), jnp.float32),
      "theta": jnp.asarray(np.log(freqs / (1 - freqs)).reshape(dim, 1, 1), jnp.float32),
      "gamma": jnp.asarray(gamma, jnp.float32),
      "omega": jnp.asarray(np.clip(rng.normal(0, 0.25, (dim, 1)), -1, 1), jnp.float32),
  }


def rel_err(a, b) -> float:
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  num = jnp.max(jnp.abs(a.astype(jnp.complex64) - b.astype(jnp.complex64)))
  den = jnp.maximum(jnp.max(jnp.abs(b.astype(jnp.complex64))), 1e-30)
  return float(num / den)


# Set by --timing-lock: processes of one --parallel sweep compile side by side but time one at a
# time, holding an exclusive lock on this file.
_TIMING_LOCK: str | None = None


def timing_lock():
  return harness.exclusive_file_lock(_TIMING_LOCK)


# Set in --parallel children while they compile: bench() only runs each function once.
_WARM_ONLY = False


def bench(fn, *args, iters: int, warmup: int = 2) -> float:
  """Median wall time in ms of fn(*args) (already jitted), after warm-up.

  The first call (which compiles) runs outside the timing lock, the rest inside it.
  """
  jax.block_until_ready(fn(*args))
  if _WARM_ONLY:
    return float("nan")
  with timing_lock():
    for _ in range(warmup - 1):
      jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def numpy_cema64(x, p, q, eta, omega):
  """Float64 recurrence for a handful of channels: x [B, L, d], coefficients [d, N]."""
  batch, length, dim = x.shape
  h = np.zeros((batch, dim, p.shape[1]), np.complex128)
  y = np.zeros((batch, length, dim))
  for t in range(length):
    h = q * h + p * x[:, t, :, None]
    y[:, t] = np.real(np.sum(eta * h, axis=-1)) + omega * x[:, t]
  return y


def assoc_scan_cema(x, coeffs, omega):
  """Plain-XLA baseline: associative scan over (a, b) pairs on the [B, L, D, N] complex state."""
  xf = x.astype(jnp.float32)
  a = jnp.broadcast_to(coeffs.q, xf.shape + coeffs.q.shape[-1:])
  b = coeffs.p * xf[..., None]

  def combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2

  _, h = jax.lax.associative_scan(combine, (a, b.astype(jnp.complex64)), axis=1)
  return jnp.sum(jnp.real(coeffs.eta * h), axis=-1) + omega.reshape(-1) * xf


def loss_fn(fn, w):
  def loss(x, params):
    coeffs = cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
    return jnp.sum(w * fn(x, coeffs, params["omega"]))
  return loss


# ----------------------------------------------------------------------------------------------
# Checks.
# ----------------------------------------------------------------------------------------------

def accuracy(x, params, w, kernel, args) -> dict:
  coeffs = cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
  ref_state = jax.jit(lambda x, c, o: K.cema_reference(x, c, o, return_state=True))
  ker_state = jax.jit(lambda x, c, o: kernel(x, c, o, return_state=True))
  y_r, h_r = ref_state(x, coeffs, params["omega"])
  y_k, h_k = ker_state(x, coeffs, params["omega"])
  out = {"y": rel_err(y_k, y_r), "h_last": rel_err(h_k, h_r)}
  # Float64 truth on a few channels (numpy loop; cheap for 8 channels).
  chans = min(8, x.shape[-1])
  xs = np.asarray(x[:, :, :chans].astype(jnp.float32), np.float64)
  y64 = numpy_cema64(xs, np.asarray(coeffs.p[:chans], np.float64),
                     np.asarray(coeffs.q[:chans], np.complex128),
                     np.asarray(coeffs.eta[:chans], np.complex128),
                     np.asarray(params["omega"][:chans, 0], np.float64))
  out["y_vs_f64[:8ch]"] = rel_err(np.asarray(y_k[:, :, :chans], np.float64), y64)
  out["ref_vs_f64[:8ch]"] = rel_err(np.asarray(y_r[:, :, :chans], np.float64), y64)
  del y_r, h_r, y_k, h_k
  if not args.skip_ref_grads:
    g_k = jax.jit(jax.grad(loss_fn(kernel, w), argnums=(0, 1)))(x, params)
    g_r = jax.jit(jax.grad(loss_fn(K.cema_reference, w), argnums=(0, 1)))(x, params)
    out["grad_x"] = rel_err(g_k[0].astype(jnp.float32), g_r[0].astype(jnp.float32))
    for name in ("alpha", "delta", "theta", "gamma", "omega"):
      out[f"grad_{name}"] = rel_err(g_k[1][name], g_r[1][name])
  return out


def timings(x, params, w, kernel, args) -> dict:
  coeffs = cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
  omega = params["omega"]
  out = {}
  fwd = jax.jit(lambda x, c, o: kernel(x, c, o))
  out["kernel_fwd"] = bench(fwd, x, coeffs, omega, iters=args.iters)
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn(kernel, w), argnums=(0, 1)))
  out["kernel_fwd_bwd"] = bench(fwd_bwd, x, params, iters=args.iters)
  out["bwd_by_difference"] = out["kernel_fwd_bwd"] - out["kernel_fwd"]
  return out


def local_pass(x, q, cfg, *, reverse: bool, interpret: bool):
  """The chunk-summary kernel alone (what the forward / backward launch first)."""
  plan = K._plan(x.shape[1], cfg)
  # The backward's summaries use the tiling that CemaKernelConfig.bwd_summary_tiling names
  # (and both use summary_split / summary_block when set).
  own = reverse and cfg.bwd_summary_tiling == "backward"
  return K._chunk_summaries(
      x, None, q, cfg, plan, reverse=reverse, split=cfg.bwd_split if own else cfg.split,
      block_d=cfg.bwd_block_d if own else cfg.block_d,
      num_warps=cfg.bwd_num_warps if own else cfg.num_warps, interpret=interpret, name="local")


def pass_timings(x, params, w, cfg, args) -> dict:
  """Per-pass times of the GPU kernel family for one configuration."""
  coeffs = cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
  p, q, eta = coeffs.p, coeffs.q, coeffs.eta
  om = params["omega"].reshape(-1)
  interp = args.cpu
  dy = jnp.asarray(w, jnp.float32)
  out = {}
  if K._plan(x.shape[1], cfg).count > 1:
    out["pass_fwd_local"] = bench(jax.jit(lambda x: local_pass(x, q, cfg, reverse=False,
                                                               interpret=interp)),
                                  x, iters=args.iters)
  forward = jax.jit(lambda x: K._gpu_forward(x, None, p, q, eta, om, None, cfg, interp))
  out["pass_fwd"] = bench(forward, x, iters=args.iters)
  _, _, residuals = forward(x)
  if K._plan(x.shape[1], cfg).count > 1:
    out["pass_bwd_local"] = bench(jax.jit(lambda d: local_pass(d, q, cfg, reverse=True,
                                                               interpret=interp)),
                                  dy, iters=args.iters)
  backward = jax.jit(lambda x, dy, residuals: K._gpu_backward(
      x, None, p, q, eta, om, None, dy, None, residuals, cfg, interp))
  out["pass_bwd"] = bench(backward, x, dy, residuals, iters=args.iters)
  return out


def summaries_only(names: list[str], base_cfg, args) -> None:
  """Times only the chunk-summary kernels (forward on x, reverse on dy) of each configuration
  and checks their results against the first configuration's: a cheap A/B of summary variants
  (the scans do not change with summary_block / summary_split), with short compiles."""
  results = {}
  params = make_params(base_cfg_dim(args), args.order, seed=0)
  coeffs = cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
  for length in args.lengths or [32768]:
    rng = np.random.default_rng(length)
    dim = base_cfg_dim(args)
    x = jnp.asarray(rng.normal(size=(args.batch, length, dim)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(args.batch, length, dim)), jnp.float32)
    print(f"\n=== summaries only: B={args.batch} L={length} D={dim} N={args.order} ===")
    print(f"{'config':>22s} | {'fwd_local ms':>12s} | {'bwd_local ms':>12s} | rel diff vs {names[0]} (fwd, bwd)")
    first = None
    row = {}
    for name in names:
      try:
        cfg = dataclasses.replace(base_cfg, **SWEEP.get(name, {})).validate(args.order)
        fwd = jax.jit(lambda x, cfg=cfg: local_pass(x, coeffs.q, cfg, reverse=False, interpret=args.cpu))
        bwd = jax.jit(lambda d, cfg=cfg: local_pass(d, coeffs.q, cfg, reverse=True, interpret=args.cpu))
        t_f = bench(fwd, x, iters=args.iters)
        t_b = bench(bwd, dy, iters=args.iters)
        out = (fwd(x), bwd(dy))
        if first is None:
          first, diff = out, (0.0, 0.0)
        else:
          diff = (rel_err(out[0], first[0]), rel_err(out[1], first[1]))
        print(f"{name:>22s} | {t_f:12.3f} | {t_b:12.3f} | {diff[0]:.2e}, {diff[1]:.2e}", flush=True)
        row[name] = {"fwd_local": t_f, "bwd_local": t_b, "rel_diff_fwd": diff[0],
                     "rel_diff_bwd": diff[1], "config": dataclasses.asdict(cfg)}
      except Exception as err:  # noqa: BLE001
        print(f"{name:>22s} | failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
        row[name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
      results[str(length)] = row
      write_json(args.json, results)


def base_cfg_dim(args) -> int:
  return args.dim or (12 if args.cpu else 4096)


def baselines(x, params, w, args) -> dict:
  coeffs = cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
  omega = params["omega"]
  out = {}
  copy = jax.jit(lambda x: x.astype(jnp.float32))  # read x (bf16) once, write y-sized f32 once
  out["memory_floor_fwd(copy x->f32)"] = bench(copy, x, iters=args.iters)
  big = jnp.ones((64 * 1024 * 1024,), jnp.float32)  # 256 MiB
  t_copy = bench(jax.jit(lambda a: a * 1.0001), big, iters=args.iters)
  out["copy_bandwidth_GBps"] = 2 * big.size * 4 / (t_copy * 1e-3) / 1e9
  few = max(3, args.iters // 5)
  ref = jax.jit(lambda x, c, o: K.cema_reference(x, c, o))
  out["xla_scan_fwd"] = bench(ref, x, coeffs, omega, iters=few, warmup=1)
  if not args.skip_ref_grads:
    ref_bwd = jax.jit(jax.value_and_grad(loss_fn(K.cema_reference, w), argnums=(0, 1)))
    out["xla_scan_fwd_bwd"] = bench(ref_bwd, x, params, iters=few, warmup=1)
  for name, fn in (("xla_assoc_fwd", jax.jit(lambda x, c, o: assoc_scan_cema(x, c, o))),):
    try:
      out[name] = bench(fn, x, coeffs, omega, iters=few, warmup=1)
    except Exception as err:  # noqa: BLE001 - report OOM and move on
      out[name] = f"failed: {type(err).__name__}"
  try:
    assoc_bwd = jax.jit(jax.value_and_grad(loss_fn(assoc_scan_cema, w), argnums=(0, 1)))
    out["xla_assoc_fwd_bwd"] = bench(assoc_bwd, x, params, iters=few, warmup=1)
  except Exception as err:  # noqa: BLE001
    out["xla_assoc_fwd_bwd"] = f"failed: {type(err).__name__}"
  return out


# Most promising first (a time limit may cut the sweep short); each entry replaces fields of
# default_config(B, L, D, N), which at B=1, D=4096, L=32768 has 16 chunks, one lane per channel in
# the forward (block_d 128) and two in the backward (block_d 64), 4 warps, tiles of 16 steps.
SWEEP = {
    "default": {},
    "no_shuffle": {"ptx_shuffle": False},
    "f_s2bd64": {"split": 2, "block_d": 64},
    "f_s2bd64_c8": {"split": 2, "block_d": 64, "num_chunks": 8},
    "f_s2bd64_b_s4bd32": {"split": 2, "block_d": 64, "bwd_split": 4, "bwd_block_d": 32},
    "f_s2bd64_b_s4bd32_c8": {"split": 2, "block_d": 64, "bwd_split": 4, "bwd_block_d": 32,
                             "num_chunks": 8},
    "f_s2bd64_b_s4bd32_c32": {"split": 2, "block_d": 64, "bwd_split": 4, "bwd_block_d": 32,
                              "num_chunks": 32},
    "f_s4bd32_b_s4bd32_c8": {"split": 4, "block_d": 32, "bwd_split": 4, "bwd_block_d": 32,
                             "num_chunks": 8},
    "bd32_w1_c8": {"block_d": 32, "num_warps": 1, "bwd_block_d": 32, "bwd_num_warps": 2,
                   "num_chunks": 8},
    "chunks32": {"num_chunks": 32},
    "bwd_split1_bd32_w1": {"bwd_split": 1, "bwd_block_d": 32, "bwd_num_warps": 1},
    "bd32_w1": {"block_d": 32, "num_warps": 1, "bwd_block_d": 32, "bwd_num_warps": 2},
    "chunks8": {"num_chunks": 8},
    "t8": {"block_t": 8},
    "bwd_split4_bd32": {"bwd_split": 4, "bwd_block_d": 32},
    "split2_bd64": {"split": 2, "block_d": 64},
    "chunks64": {"num_chunks": 64},
    # The previous default's tiling, now time-parallel (4 orders per lane, 32 channels/program).
    "split4_bd32_chunks4": {"split": 4, "block_d": 32, "bwd_split": 4, "bwd_block_d": 32,
                            "num_chunks": 4},
    "one_chunk": {"num_chunks": 1},
    # Blocked chunk summaries (CemaKernelConfig.summary_block S, summary_split lanes per
    # channel): 2 S + 2 multiply-adds per S steps and order instead of 4 S.  SASS (Triton 3.9,
    # sm_90a) loop instructions per step and order, fwd / bwd summaries: default 4.4 / 4.8.
    "plain_summaries": {"summary_block": 0, "summary_split": 0},  # the default before 2026-11-29
    "sb4": {"summary_block": 4, "summary_split": 0},                                      # 2.9 / 3.3
    "sb4_ss2": {"summary_block": 4, "summary_split": 2},              # 3.3 / 3.3
    "sb8_ss2": {"summary_block": 8, "summary_split": 2},              # 3.1 / 3.1
    "sb8_ss4": {"summary_block": 8, "summary_split": 4},              # 3.9 / 3.9
    "sb16_ss4": {"summary_block": 16, "summary_split": 4},            # 3.8 / 3.9
    # The combines over chunks (forward s, backward u and g) as one Pallas kernel each.
    "pallas_combine": {"pallas_combine": True},
    "xla_combine": {"pallas_combine": False},
}


def fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.3e}" if (value < 1e-2 or value > 1e4) else f"{value:.3f}"
  return str(value)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cpu", action="store_true", help="tiny shapes, Pallas interpret mode")
  parser.add_argument("--lengths", type=int, nargs="*", default=None)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dim", type=int, default=None)
  parser.add_argument("--order", type=int, default=16)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--sweep", action="store_true", help="also time the tilings in SWEEP")
  parser.add_argument("--configs", nargs="*", default=None, help="names from SWEEP to time")
  parser.add_argument("--skip-ref-grads", action="store_true",
                      help="skip reference gradients (the lax.scan VJP stores [B, L, D, N] states)")
  parser.add_argument("--skip-baselines", action="store_true")
  parser.add_argument("--skip-passes", action="store_true",
                      help="no per-pass breakdown for the first configuration")
  parser.add_argument("--json", default=None, help="also write all numbers to this file")
  parser.add_argument("--skip-accuracy", action="store_true", help="timings only")
  parser.add_argument("--accuracy-configs", nargs="*", default=(),
                      help="names from SWEEP whose values and gradients are also checked against "
                           "the references (the default configuration always is)")
  parser.add_argument("--parallel", type=int, default=0,
                      help="run each configuration in its own process, this many at once: they "
                           "compile side by side (the kernels take about a minute each) and "
                           "time one at a time")
  parser.add_argument("--summaries-only", action="store_true",
                      help="time only the chunk-summary kernels of each configuration and compare "
                           "their results with the first configuration's (quick compiles)")
  parser.add_argument("--timing-lock", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--go-file", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  global _TIMING_LOCK, _WARM_ONLY
  _TIMING_LOCK = args.timing_lock
  sys.stdout.reconfigure(line_buffering=True)  # every row reaches a log even if the run is cut

  if args.cpu:
    lengths = args.lengths or [37]
    dim = args.dim or 12
    args.order = min(args.order, 8)
    args.iters = min(args.iters, 2)
  else:
    lengths = args.lengths or [16384, 32768]
    dim = args.dim or 4096
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  base_cfg = K.default_config(args.batch, max(lengths), dim, args.order)
  if args.cpu:
    base_cfg = dataclasses.replace(base_cfg, block_d=4, block_t=4, bwd_block_d=4, num_warps=1,
                                   bwd_num_warps=1, num_chunks=3)
  names = ["default"]
  if args.sweep:
    names = list(SWEEP)
  if args.configs:
    names = args.configs
  unknown = [name for name in args.accuracy_configs if name not in SWEEP]
  if unknown:
    raise SystemExit(f"--accuracy-configs: unknown configuration(s) {unknown}; choose from {sorted(SWEEP)}")
  if args.summaries_only:
    summaries_only(names, base_cfg, args)
    return
  if args.parallel > 0:
    run_parallel(names, args)
    return
  results = {}
  params = make_params(dim, args.order, seed=0)
  for length in lengths:
    rng = np.random.default_rng(length)
    x = jnp.asarray(rng.normal(size=(args.batch, length, dim)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(args.batch, length, dim)), jnp.float32)
    row = {"B": args.batch, "L": length, "D": dim, "N": args.order}
    print(f"\n=== B={args.batch} L={length} D={dim} N={args.order} (x bf16) ===")
    cfg = base_cfg
    kernel = lambda *a, cfg=cfg, **k: K.cema_pallas(*a, config=cfg, interpret=args.cpu, **k)  # noqa: E731
    try:
      acc = {} if args.skip_accuracy else accuracy(x, params, w, kernel, args)
    except Exception:  # noqa: BLE001 - keep going to the timings; print why
      traceback.print_exc()
      acc = {"error": "see traceback"}
    print("accuracy (max |kernel - ref| / max |ref|):")
    for key, value in acc.items():
      print(f"  {key:>22s}: {fmt(value)}")
    row["accuracy"] = acc
    for name in args.accuracy_configs:
      # Same inputs and references as the default's check: a flag's kernels are judged alike.
      named = dataclasses.replace(base_cfg, **SWEEP[name]).validate(args.order)
      named_kernel = lambda *a, cfg=named, **k: K.cema_pallas(*a, config=cfg, interpret=args.cpu, **k)  # noqa: E731
      try:
        named_acc = accuracy(x, params, w, named_kernel, args)
      except Exception:  # noqa: BLE001 - keep going; print why
        traceback.print_exc()
        named_acc = {"error": "see traceback"}
      print(f"accuracy of {name}:")
      for key, value in named_acc.items():
        print(f"  {key:>22s}: {fmt(value)}")
      row[f"accuracy_{name}"] = named_acc
    if not args.skip_baselines:
      base = baselines(x, params, w, args)
      floor = base["memory_floor_fwd(copy x->f32)"]
      print("baselines (ms unless noted):")
      for key, value in base.items():
        print(f"  {key:>32s}: {fmt(value)}")
      row["baselines"] = base
    else:
      floor = None
    print(f"{'config':>22s} | {'fwd ms':>8s} | {'fwd+bwd ms':>10s} | {'bwd ms':>8s} | fwd/floor",
          flush=True)
    row["configs"] = {}
    for index, name in enumerate(names):
      cfg = dataclasses.replace(base_cfg, **SWEEP.get(name, {})).validate(args.order)
      kernel = lambda *a, cfg=cfg, **k: K.cema_pallas(*a, config=cfg, interpret=args.cpu, **k)  # noqa: E731
      try:
        if args.go_file:
          # Compile everything (filling the persistent cache) while the other children do the
          # same, then time only once every child is compiled: no compile-time kernel launches
          # or host load during anyone's timings.
          _WARM_ONLY = True
          timings(x, params, w, kernel, args)
          if index == 0 and not args.skip_passes:
            pass_timings(x, params, w, cfg, args)
          _WARM_ONLY = False
          open(args.ready_file, "w").close()
          while not os.path.exists(args.go_file):
            time.sleep(1)
        tm = timings(x, params, w, kernel, args)
        if index == 0 and not args.skip_passes:
          tm.update(pass_timings(x, params, w, cfg, args))
      except Exception as err:  # noqa: BLE001
        print(f"{name:>22s} | failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
        row["configs"][name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
        continue
      ratio = f"{tm['kernel_fwd'] / floor:.1f}x" if floor else "-"
      print(f"{name:>22s} | {tm['kernel_fwd']:8.3f} | {tm['kernel_fwd_bwd']:10.3f} | "
            f"{tm['bwd_by_difference']:8.3f} | {ratio}", flush=True)
      passes = {k: v for k, v in tm.items() if k.startswith("pass_")}
      if passes:
        print(" " * 25 + "passes (ms): " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in passes.items()),
              flush=True)
      row["configs"][name] = dict(tm, config=dataclasses.asdict(cfg))
      results[str(length)] = row
      write_json(args.json, results)
    results[str(length)] = row
  if args.json:
    write_json(args.json, results)
    print(f"\nwrote {args.json}")


def run_parallel(names: list[str], args) -> None:
  """One child process per configuration (at most args.parallel at once); merges their JSON.

  The first configuration's child also checks accuracy (unless --skip-accuracy); every child
  times its per-pass breakdown (unless --skip-passes).
  """
  workdir = os.path.abspath(os.path.dirname(args.json) if args.json else ".")
  os.makedirs(workdir, exist_ok=True)
  lock = os.path.join(workdir, "check_cema.timing.lock")
  passthrough = ["--batch", str(args.batch), "--order", str(args.order), "--iters", str(args.iters),
                 "--skip-baselines", "--timing-lock", lock]
  if args.lengths:
    passthrough += ["--lengths", *map(str, args.lengths)]
  if args.dim:
    passthrough += ["--dim", str(args.dim)]
  for flag in ("skip_ref_grads", "skip_passes", "cpu"):
    if getattr(args, flag):
      passthrough.append("--" + flag.replace("_", "-"))
  env = dict(os.environ)
  # Children compile each function twice (a warm-up pass, then the timed pass with new jit
  # objects); the second compile is a persistent-cache hit.
  env.setdefault("JAX_COMPILATION_CACHE_DIR",
                 os.path.join(tempfile.gettempdir(), "check_cema_jax_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  indexed = list(enumerate(names))
  for wave_start in range(0, len(indexed), args.parallel):
    wave = indexed[wave_start:wave_start + args.parallel]
    go_file = os.path.join(workdir, f"check_cema.go.{wave_start}")
    running = []
    for index, name in wave:
      extra = [] if index == 0 and not args.skip_accuracy else ["--skip-accuracy"]
      out_json = os.path.join(workdir, f"check_cema.{name}.json")
      log_path = os.path.join(workdir, f"check_cema.{name}.log")
      ready = os.path.join(workdir, f"check_cema.{name}.ready")
      cmd = [sys.executable, os.path.abspath(__file__), "--configs", name, "--json", out_json,
             "--ready-file", ready, "--go-file", go_file, *passthrough, *extra]
      log = open(log_path, "w")
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
      running.append((name, proc, log, ready, log_path))
      print(f"started {name}", flush=True)
    started = time.time()
    while running:
      time.sleep(1)
      if not os.path.exists(go_file) and all(
          os.path.exists(item[3]) or item[1].poll() is not None for item in running):
        print(f"all compiled after {time.time() - started:.0f} s; timing", flush=True)
        open(go_file, "w").close()
      for item in list(running):
        name, proc, log, _, log_path = item
        if proc.poll() is not None:
          log.close()
          running.remove(item)
          print(f"--- {name} (exit {proc.returncode}) ---", flush=True)
          with open(log_path) as f:
            lines = f.read().splitlines()
          keep = [l for l in lines if " | " in l or "passes" in l or ":" in l and "e-" in l]
          print("\n".join(keep[-12:] if proc.returncode == 0 else lines[-20:]), flush=True)
  merged = {}
  for name in names:
    path = os.path.join(workdir, f"check_cema.{name}.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      for length, row in json.load(f).items():
        into = merged.setdefault(length, {k: v for k, v in row.items() if k != "configs"})
        if row.get("accuracy"):
          into["accuracy"] = row["accuracy"]
        into.setdefault("configs", {}).update(row.get("configs", {}))
  print("\nsummary (ms):")
  print(f"{'L':>6s} {'config':>28s} | {'fwd':>7s} | {'fwd+bwd':>7s} | passes")
  for length, row in merged.items():
    for name, tm in row.get("configs", {}).items():
      if "error" in tm:
        print(f"{length:>6s} {name:>28s} | failed: {tm['error'][:120]}")
        continue
      passes = ", ".join(f"{k[5:]} {v:.3f}" for k, v in tm.items() if k.startswith("pass_"))
      print(f"{length:>6s} {name:>28s} | {tm['kernel_fwd']:7.3f} | {tm['kernel_fwd_bwd']:7.3f} | "
            f"{passes}")
  write_json(args.json, merged)


def write_json(path: str | None, results: dict) -> None:
  """Rewritten after every timed configuration, so a run cut short keeps what it measured."""
  if path:
    with open(path, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
