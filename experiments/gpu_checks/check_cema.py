"""GPU check of the CEMA Pallas kernels: accuracy against references and timings against floors.

Run on a GPU machine from the repository root:
    python experiments/gpu_checks/check_cema.py                 # B=1, D=4096, N=16, L=16384,32768
    python experiments/gpu_checks/check_cema.py --sweep         # also time alternative tilings
    python experiments/gpu_checks/check_cema.py --cpu           # tiny end-to-end run (interpret)

Prints, per length: relative errors of the kernel against the lax.scan reference (values, final
state, gradients of x / alpha / delta / theta / gamma / omega) and against a float64 numpy
recurrence on a few channels; then times (median of --iters after warm-up, block_until_ready)
of the kernel forward and forward+backward, of the per-pass kernels, of XLA baselines (the
lax.scan reference and a jax.lax.associative_scan CEMA) and of the memory floor (a bf16 -> f32
copy of x, the traffic of reading x once and writing y once, timed in the same run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

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


def bench(fn, *args, iters: int, warmup: int = 2) -> float:
  """Median wall time in ms of fn(*args) (already jitted), after warm-up."""
  for _ in range(warmup):
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


def timings(x, params, w, kernel, cfg, args) -> dict:
  coeffs = cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
  omega = params["omega"]
  out = {}
  fwd = jax.jit(lambda x, c, o: kernel(x, c, o))
  out["kernel_fwd"] = bench(fwd, x, coeffs, omega, iters=args.iters)
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn(kernel, w), argnums=(0, 1)))
  out["kernel_fwd_bwd"] = bench(fwd_bwd, x, params, iters=args.iters)
  # Per-pass breakdown (the internal passes, on the already-prepared coefficients).
  p, q, eta = coeffs.p, coeffs.q, coeffs.eta
  om = omega.reshape(-1)
  interp = args.cpu
  dy = jnp.asarray(w, jnp.float32)
  g0 = jnp.zeros((x.shape[0], x.shape[2], p.shape[1]), jnp.complex64)
  passes = {
      "pass_fwd": jax.jit(lambda x: K._gpu_forward(x, None, p, q, eta, om, None, cfg, interp)),
      "pass_rev": jax.jit(lambda x: K._gpu_reverse(dy, x, None, p, q, eta, om, g0, cfg, interp)),
      "pass_param": jax.jit(lambda x: K._gpu_param(x, dy, None, p, q, eta, None, g0, cfg, interp)),
  }
  for name, fn in passes.items():
    out[name] = bench(fn, x, iters=args.iters)
  return out


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


SWEEP = {
    "default": {},
    "t8": {"block_t": 8},
    "t32": {"block_t": 32},
    "bd16": {"block_d": 16, "param_block_d": 16},
    "bd64_w8": {"block_d": 64, "param_block_d": 64, "num_warps": 8},
    "split2": {"split": 2, "param_split": 2},
    "split8_param8": {"split": 8, "param_split": 8},
    "chunks2": {"num_chunks": 2},
    "chunks4_split1_bd128": {"split": 1, "block_d": 128, "num_chunks": 4},
    "chunks8_split1_bd128": {"split": 1, "block_d": 128, "num_chunks": 8},
    "param_split2": {"param_split": 2},
    "param_split8": {"param_split": 8},
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
  parser.add_argument("--json", default=None, help="also write all numbers to this file")
  args = parser.parse_args()

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
    base_cfg = dataclasses.replace(base_cfg, block_d=4, block_t=4, param_block_d=4, num_warps=1)
  names = ["default"]
  if args.sweep:
    names = list(SWEEP)
  if args.configs:
    names = args.configs
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
      acc = accuracy(x, params, w, kernel, args)
    except Exception:  # noqa: BLE001 - keep going to the timings; print why
      traceback.print_exc()
      acc = {"error": "see traceback"}
    print("accuracy (max |kernel - ref| / max |ref|):")
    for key, value in acc.items():
      print(f"  {key:>22s}: {fmt(value)}")
    row["accuracy"] = acc
    if not args.skip_baselines:
      base = baselines(x, params, w, args)
      floor = base["memory_floor_fwd(copy x->f32)"]
      print("baselines (ms unless noted):")
      for key, value in base.items():
        print(f"  {key:>32s}: {fmt(value)}")
      row["baselines"] = base
    else:
      floor = None
    print(f"{'config':>22s} | {'fwd ms':>8s} | {'fwd+bwd ms':>10s} | {'pass fwd':>8s} | "
          f"{'pass rev':>8s} | {'pass param':>10s} | fwd/floor")
    row["configs"] = {}
    for name in names:
      cfg = dataclasses.replace(base_cfg, **SWEEP.get(name, {})).validate(args.order)
      kernel = lambda *a, cfg=cfg, **k: K.cema_pallas(*a, config=cfg, interpret=args.cpu, **k)  # noqa: E731
      try:
        tm = timings(x, params, w, kernel, cfg, args)
      except Exception as err:  # noqa: BLE001
        print(f"{name:>22s} | failed: {type(err).__name__}: {str(err)[:300]}")
        row["configs"][name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
        continue
      ratio = f"{tm['kernel_fwd'] / floor:.1f}x" if floor else "-"
      print(f"{name:>22s} | {tm['kernel_fwd']:8.3f} | {tm['kernel_fwd_bwd']:10.3f} | "
            f"{tm['pass_fwd']:8.3f} | {tm['pass_rev']:8.3f} | {tm['pass_param']:10.3f} | {ratio}")
      row["configs"][name] = dict(tm, config=dataclasses.asdict(cfg))
    results[str(length)] = row
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
