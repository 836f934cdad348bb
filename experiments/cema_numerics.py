"""How accurate and how fast is each way of computing CEMA? Measures it on the current device.

  python -m experiments.cema_numerics --preset=ci                       # ~30 s on a CPU (CI)
  python -m experiments.cema_numerics --preset=cpu --out_dir=experiments/results --plot_dir=docs/images
  python -m experiments.cema_numerics --preset=full --out_dir=$OUT      # GPU; stops at --budget_s=270
  python -m experiments.cema_numerics --from_json=<results.json> --plot_dir=/tmp/plots   # re-plot

The full preset does not fit one 270 s budget on an H200 (the Pallas kernel alone compiles for
about 60 s per length), so the committed H200 results are three runs merged: the preset as is,
then `--lengths=65536,262144 --bf16_lengths=65536 --budget_s=330` and `--lengths=1048576
--bf16_lengths=1048576 --budget_s=330` side by side on two GPUs, then
  python -m experiments.cema_numerics --from_json=a.json,b.json,c.json --merged_out_dir=experiments/results \
      --plot_dir=docs/images

For every CEMA path (sequential scan, associative scan, FFT convolution, chunked, Pallas kernel),
input dtype (float32, bfloat16), length and decay regime it measures the relative error
||a - ref|| / ||ref|| of the outputs y, the final state h_L and the gradients of sum(y * w)
(w random) with respect to x, p, q and eta, against a float64 reference (cema_reference.py:
a blocked sequential recurrence with closed-form gradients, x64 enabled only inside it). It also
times each path (forward, and forward + backward; warm-up, median of repeats,
block_until_ready). Writes <date>_<device>_cema_numerics.json plus _errors.csv / _timings.csv
to --out_dir and PNG plots to --plot_dir, and prints a summary.

Regimes: every entry of q has the regime's magnitude |q| (0.5 ... 1 - 1e-6) and phases spread
evenly over [0, pi] across the D x N entries (channel d holds the d-th band of phases, so the
per-channel errors in the JSON show the error against the phase). p ~ U[0.5, 1) (a valid
sigmoid(alpha) with 1 - |q| = p sigmoid(delta)), eta complex N(0, 1/(2N)) per part, omega = 0
(every path adds omega x exactly the same way; it would only dilute the relative errors). The
'init' regime uses the model's initialisation (SPEC §2) instead. Inputs x, w ~ N(0, 1).

bfloat16 rows feed the path bf16 inputs (each path computes in float32); their errors are against
the reference on the same bf16-rounded values, so they measure the path. What rounding the
inputs to bf16 costs by itself is listed separately (path 'input_rounding').
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
import pathlib
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np

PATHS = ("sequential", "associative", "fft", "chunked", "blocked", "pallas")
# Not a path of the project: the FFT path with its kernel built from q^t = exp(t log q) in
# float32, the textbook formula. Measured to show what ops.cema's accurate powers buy.
EXTRA_PATHS = ("fft_expq",)
ALL_PATHS = PATHS + EXTRA_PATHS
DTYPES = ("float32", "bfloat16")
QUANTITIES = ("y", "y_head", "h", "dx", "dp", "dq", "deta")
HEAD = 256  # y_head: the first HEAD outputs, whose size does not grow with the length
INIT = "init"

# Float32 bounds asserted by the ci preset (--check_bounds; tests/test_cema_numerics.py): for
# L <= 2048, |q| <= 1 - 1e-6, every project path. The worst cases seen there are about 10x below
# (1.0e-6 for y, 1.7e-6 for the gradient of p; see docs/cema_numerics.md).
FLOAT32_BOUNDS = {"y": 1e-5, "y_head": 1e-5, "h": 1e-5, "dx": 1e-5, "dp": 2e-5, "dq": 2e-5,
                  "deta": 2e-5}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to measure. lengths: float32 lengths; bf16_lengths: lengths also run with bf16 inputs.

  max_length: caps per path or dtype name ({'associative': 16384, 'bfloat16': 1024}); a run is
  done only if its length is within every cap that names its path or dtype.
  one_minus_q: the regimes, as 1 - |q|; init_regime adds the model-initialisation regime.
  timing: subset of ('fwd', 'fwd_bwd'); repeats: at most this many timed calls (fewer when one
  call takes long, see _timed). budget_s: stop starting runs predicted to end after this many
  seconds (0: no limit). fast_compile: compile the error runs at -O0 on CPU (5-10x faster
  compiles, slower code: 'fwd_bwd' times, which reuse them, are then not representative; 'fwd'
  times always come from a normally optimised compile).
  """
  paths: tuple[str, ...] = ALL_PATHS
  dtypes: tuple[str, ...] = DTYPES
  lengths: tuple[int, ...] = (256, 1024, 4096)
  bf16_lengths: tuple[int, ...] = (1024,)
  one_minus_q: tuple[float, ...] = (0.5, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
  init_regime: bool = True
  batch: int = 1
  dim: int = 16
  order: int = 16
  chunk: int = 64
  seed: int = 0
  max_length: tuple[tuple[str, int], ...] = ()
  timing: tuple[str, ...] = ("fwd", "fwd_bwd")
  repeats: int = 5
  budget_s: float = 0.0
  fast_compile: bool = False
  check_bounds: bool = False

  def caps(self) -> dict[str, int]:
    return dict(self.max_length)


PRESETS = {
    # CI smoke run (tests/test_cema_numerics.py): every XLA path, both dtypes, float32 bounds.
    "ci": Settings(paths=("sequential", "associative", "fft", "chunked", "blocked"), lengths=(256, 2048),
                   bf16_lengths=(256,), one_minus_q=(0.5, 1e-2, 1e-4, 1e-6), dim=8, order=8,
                   max_length=(("associative", 256),), timing=("fwd_bwd",), repeats=2,
                   fast_compile=True, check_bounds=True),
    # The CPU study behind docs/cema_numerics.md until the GPU numbers exist (~15 min, 2 cores).
    # Pallas runs in the interpreter here, so only at short lengths and without timings.
    "cpu": Settings(lengths=(256, 1024, 4096, 16384, 65536, 262144), bf16_lengths=(1024, 65536),
                    max_length=(("associative", 16384), ("pallas", 1024)), repeats=3),
    # One GPU call of about 5 minutes. Coarse lengths first, so that the budget guard drops the
    # in-between lengths, not 1M, if the device is slower than expected.
    "full": Settings(lengths=(256, 4096, 65536, 1048576, 1024, 16384, 262144),
                     bf16_lengths=(4096, 1048576), max_length=(("sequential", 65536),),
                     repeats=5, budget_s=270.0),
}


# ---------------------------------------------------------------------------------------------
# Inputs and regimes.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Regime:
  label: str
  one_minus_q: float | None  # None: the model-initialisation regime


def regimes(settings: Settings) -> list[Regime]:
  out = [Regime(f"1-|q|={v:g}", float(v)) for v in settings.one_minus_q]
  if settings.init_regime:
    out.append(Regime(INIT, None))
  return out


def regime_coefficients(regime: Regime, dim: int, order: int, seed: int):
  """(p [D, N] float32, q [D, N] complex64, eta [D, N] complex64) as numpy arrays.

  The paths and the reference use exactly these (float32-representable) values.
  """
  import jax
  from megalodon_jax.layers import initializers
  from megalodon_jax.ops.cema import cema_coefficients
  rng = np.random.default_rng([seed, 7, dim, order, 0 if regime.one_minus_q is None
                               else int(round(-1e3 * math.log10(regime.one_minus_q)))])
  if regime.one_minus_q is None:
    k_theta, k_gamma = jax.random.split(jax.random.PRNGKey(seed))
    coeffs = cema_coefficients(
        np.asarray(rng.normal(0.0, 0.2, (dim, order, 1)), np.float32),
        np.asarray(rng.normal(0.0, 0.2, (dim, order, 1)), np.float32),
        initializers.cema_theta(k_theta, (dim, 1, 1)), initializers.cema_gamma(k_gamma, (dim, order, 2)))
    return np.asarray(coeffs.p), np.asarray(coeffs.q), np.asarray(coeffs.eta)
  if not 0.0 < regime.one_minus_q <= 0.5:
    raise ValueError(f"1 - |q| must be in (0, 0.5] (|q| from 0.5 to < 1), got {regime.one_minus_q}")
  phases = np.linspace(0.0, math.pi, dim * order).reshape(dim, order)
  q = ((1.0 - regime.one_minus_q) * np.exp(1j * phases)).astype(np.complex64)
  p = rng.uniform(0.5, 1.0, (dim, order)).astype(np.float32)
  eta = ((rng.normal(size=(dim, order)) + 1j * rng.normal(size=(dim, order)))
         / math.sqrt(2 * order)).astype(np.complex64)
  return p, q, eta


def make_inputs(settings: Settings, length: int) -> tuple[np.ndarray, np.ndarray]:
  """x, w: [B, L, D] float32, N(0, 1); the same for every regime and path at this length."""
  rng = np.random.default_rng([settings.seed, length])
  shape = (settings.batch, length, settings.dim)
  return (rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------

def rel_err(value, ref) -> float:
  """||value - ref||_2 / ||ref||_2 over all entries (float64)."""
  value = np.asarray(value).astype(np.complex128 if np.iscomplexobj(value) else np.float64)
  ref = np.asarray(ref)
  scale = np.linalg.norm(ref.ravel())
  return float(np.linalg.norm((value - ref).ravel()) / scale) if scale > 0 else float("nan")


def position_windows(length: int) -> list[tuple[int, int]]:
  """[0, 256), [256, 512), [512, 1024), ... up to length (doubling windows)."""
  windows, start, end = [], 0, min(HEAD, length)
  while start < length:
    windows.append((start, end))
    start, end = end, min(2 * end, length)
  return windows


def error_record(y, h, dx, dp, dq, deta, ref) -> dict[str, Any]:
  """All error columns of one run against a Reference (plus per-window and per-channel lists)."""
  y = np.asarray(y, np.float64)
  head = min(HEAD, y.shape[1])
  diff, ref_y = y - ref.y, ref.y
  return {
      "y": rel_err(y, ref.y), "y_head": rel_err(y[:, :head], ref.y[:, :head]),
      "h": rel_err(h, ref.h), "dx": rel_err(dx, ref.dx) if dx is not None else float("nan"),
      "dp": rel_err(dp, ref.dp), "dq": rel_err(dq, ref.dq), "deta": rel_err(deta, ref.deta),
      "y_by_window": [[a, b, float(np.linalg.norm(diff[:, a:b]) / np.linalg.norm(ref_y[:, a:b]))]
                      for a, b in position_windows(y.shape[1])],
      "y_by_channel": [float(v) for v in np.linalg.norm(diff, axis=(0, 1))
                       / np.linalg.norm(ref_y, axis=(0, 1))],
  }


# ---------------------------------------------------------------------------------------------
# The paths, compiled once per (path, dtype, length).
# ---------------------------------------------------------------------------------------------

def fft_expq(x, coeffs, *, return_state: bool):
  """FFT convolution with K_t = Re(sum_n p eta exp(t log q)) in float32 (omega = 0, h0 = 0).

  x: [B, L, D]. The phase t * angle(q) and the decay t * log|q| carry t times the rounding of
  log q, so the kernel drifts at long lags. Forms [D, N, L] complex64 powers (memory ~ D N L).
  """
  import jax
  import jax.numpy as jnp
  highest = jax.lax.Precision.HIGHEST
  x = x.astype(jnp.float32)
  length = x.shape[1]
  powers = jnp.exp(jnp.log(coeffs.q)[..., None] * jnp.arange(length, dtype=jnp.float32))
  weights = (coeffs.p * coeffs.eta)[..., None]
  kernel = jnp.sum(jnp.real(weights) * jnp.real(powers) - jnp.imag(weights) * jnp.imag(powers),
                   axis=1)  # [D, L]
  n_fft = 2 * (1 << max(0, (length - 1).bit_length()))
  y = jnp.fft.irfft(jnp.fft.rfft(x, n=n_fft, axis=1) * jnp.fft.rfft(kernel, n=n_fft, axis=-1).T,
                    n=n_fft, axis=1)[:, :length]
  if not return_state:
    return y
  reversed_powers = jnp.flip(powers, axis=-1)  # q^(L-1-j)
  h = coeffs.p * jax.lax.complex(
      jnp.einsum("bld,dnl->bdn", x, jnp.real(reversed_powers), precision=highest),
      jnp.einsum("bld,dnl->bdn", x, jnp.imag(reversed_powers), precision=highest))
  return y, h


def _apply(path: str, chunk: int, x, coeffs, *, return_state: bool):
  """One CEMA path with omega = 0: x [B, L, D] -> y [B, L, D] (and h_L [B, D, N])."""
  import jax
  import jax.numpy as jnp
  from megalodon_jax.ops import cema as cema_ops
  omega = jnp.zeros((coeffs.p.shape[0],), jnp.float32)
  if path == "fft_expq":
    return fft_expq(x, coeffs, return_state=return_state)
  if path == "pallas" and jax.default_backend() == "cpu":
    # The Pallas interpreter: tiny tiles compile much faster; numerics are the kernel's.
    from kernels_pallas import cema as kernels
    cfg = kernels.CemaKernelConfig(block_d=8, block_t=2, split=1, num_warps=1, bwd_block_d=8,
                                   bwd_split=1, bwd_num_warps=1)
    return kernels.cema_pallas(x, coeffs, omega, return_state=return_state, interpret=True,
                               config=cfg)
  return cema_ops.cema(x, coeffs, omega, method=path, return_state=return_state, chunk=chunk)


def _loss(path: str, chunk: int, x, coeffs, w):
  """sum(y * w) with (y, h_L) as aux: what the error runs differentiate."""
  import jax.numpy as jnp
  y, h = _apply(path, chunk, x, coeffs, return_state=True)
  return jnp.sum(y * w), (y, h)


def _compile(fn: Callable, args: Sequence[Any], fast: bool):
  """AOT-compiles jit(fn) for args; returns (compiled, seconds)."""
  import jax
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  options = {"xla_backend_optimization_level": 0} if fast and jax.default_backend() == "cpu" else None
  compiled = lowered.compile(options) if options else lowered.compile()
  return compiled, time.perf_counter() - start


def _timed(fn: Callable, args: Sequence[Any], repeats: int) -> dict[str, Any]:
  """Median wall time of fn(*args) after one warm-up call; fewer repeats when a call is slow
  (aim: ~3 s per measurement), at least one."""
  import jax
  from experiments.benchmarks import harness
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  iters = max(1, min(repeats, int(3.0 / max(first, 1e-6))))
  stats = harness.time_fn(fn, *args, warmup=0, iters=iters)
  return {"median_ms": stats["median_ms"], "min_ms": stats["min_ms"], "iters": iters}


# ---------------------------------------------------------------------------------------------
# The study.
# ---------------------------------------------------------------------------------------------

class _Budget:
  """Predicts a run's cost from the same (path, dtype) at the largest shorter length measured
  (compile time + per-call time scaled linearly in length, times a safety factor) and refuses
  runs that would end after the budget."""

  SAFETY = 1.5

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.start = time.perf_counter()
    self.history: dict[Any, list[tuple[int, float, float]]] = {}

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def record(self, key, length: int, compile_s: float, call_s: float) -> None:
    self.history.setdefault(key, []).append((length, compile_s, call_s))

  def allows(self, key, length: int, calls: int) -> bool:
    if self.seconds <= 0:
      return True
    shorter = [h for h in self.history.get(key, []) if h[0] <= length]
    if not shorter:
      return self.elapsed() < self.seconds
    prev_len, compile_s, call_s = max(shorter)
    predicted = compile_s + calls * call_s * (length / prev_len)
    return self.elapsed() + self.SAFETY * predicted < self.seconds


def _run_allowed(settings: Settings, path: str, dtype: str, length: int) -> bool:
  caps = settings.caps()
  return all(length <= caps[k] for k in (path, dtype) if k in caps)


def _to_numpy(tree: Any) -> Any:
  """Device arrays -> numpy (bfloat16 as float32, which holds it exactly)."""
  import jax
  return jax.tree.map(lambda a: np.asarray(a.astype("float32") if a.dtype.name == "bfloat16" else a),
                      tree)


def _as_coeffs(coeffs: tuple[np.ndarray, np.ndarray, np.ndarray]):
  """(p, q, eta) numpy arrays -> CemaCoefficients of device arrays."""
  import jax.numpy as jnp
  from megalodon_jax.ops.cema import CemaCoefficients
  return CemaCoefficients(*(jnp.asarray(a) for a in coeffs))


def _measure_path(settings: Settings, path: str, dtype: str, length: int, x: np.ndarray,
                  w: np.ndarray, coeff_sets: list, refs: dict, budget: _Budget,
                  results: dict[str, Any], log: Callable[[str], None]) -> None:
  """Errors of one (path, dtype, length) over all regimes, then its timings (float32 only).

  x, w: [B, L, D] float32; coeff_sets: [(Regime, (p, q, eta))]; refs: see _references.
  Appends to results["errors"], results["timings"] or results["skipped"].
  """
  import jax
  import jax.numpy as jnp
  key = (path, dtype)
  calls = len(coeff_sets) + (4 if dtype == "float32" else 0)
  if not budget.allows(key, length, calls):
    results["skipped"].append({"path": path, "dtype": dtype, "length": length,
                               "reason": f"predicted to exceed --budget_s={settings.budget_s:g}"})
    log(f"  {path:>11} {dtype:<8} skipped (budget)")
    return
  xd = jnp.asarray(x, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  wd = jnp.asarray(w)
  fn = jax.value_and_grad(functools.partial(_loss, path, settings.chunk), argnums=(0, 1),
                          has_aux=True)
  interpreted = path == "pallas" and jax.default_backend() == "cpu"  # never timed: compile fast
  compiled, compile_s = _compile(fn, (xd, _as_coeffs(coeff_sets[0][1]), wd),
                                 settings.fast_compile or interpreted)
  call_times = []
  for regime, coeffs in coeff_sets:
    start = time.perf_counter()
    (_, (y, h)), (dx, dco) = _to_numpy(compiled(xd, _as_coeffs(coeffs), wd))
    call_times.append(time.perf_counter() - start)
    ref = refs[(regime.label, dtype)]
    row = {"path": path, "dtype": dtype, "length": length, "regime": regime.label,
           "one_minus_q": regime.one_minus_q,
           **error_record(y, h, dx, dco.p, dco.q, dco.eta, ref)}
    results["errors"].append(row)
  budget.record(key, length, compile_s, float(np.median(call_times)))
  worst = max(results["errors"][-len(coeff_sets):], key=lambda r: r["y"])
  log(f"  {path:>11} {dtype:<8} compile {compile_s:6.2f}s  call {np.median(call_times) * 1e3:9.2f}ms"
      f"  worst y err {worst['y']:.2e} ({worst['regime']})")
  if dtype != "float32" or not settings.timing:
    return
  if interpreted:
    return  # the interpreter's speed says nothing about the kernel
  coeffs = _as_coeffs(coeff_sets[0][1])
  row = {"path": path, "length": length, "dtype": dtype, "grad_compile_s": compile_s}
  if "fwd" in settings.timing:
    fwd = functools.partial(_apply, path, settings.chunk, return_state=False)
    fwd_compiled, fwd_compile_s = _compile(fwd, (xd, coeffs), fast=False)  # timed: optimise
    row.update({f"fwd_{k}": v for k, v in _timed(fwd_compiled, (xd, coeffs), settings.repeats).items()})
    row["fwd_compile_s"] = fwd_compile_s
  if "fwd_bwd" in settings.timing:
    row.update({f"fwd_bwd_{k}": v for k, v in
                _timed(compiled, (xd, coeffs, wd), settings.repeats).items()})
  results["timings"].append(row)


def _references(settings: Settings, length: int, x: np.ndarray, w: np.ndarray, coeff_sets: list,
                budget: _Budget, log: Callable[[str], None]):
  """({(regime label, dtype): Reference} for the dtypes measured at this length, the rows of the
  bf16 input-rounding effect (reference on bf16 x vs reference on float32 x), the dtypes)."""
  from experiments import cema_reference
  import ml_dtypes
  dtypes = [d for d in settings.dtypes if d == "float32" or length in settings.bf16_lengths]
  refs, rounding = {}, []
  start = time.perf_counter()
  for regime, (p, q, eta) in coeff_sets:
    base = cema_reference.reference(x, w, p, q, eta)
    refs[(regime.label, "float32")] = base
    if "bfloat16" in dtypes:
      x_bf = x.astype(ml_dtypes.bfloat16).astype(np.float32)
      ref_bf = cema_reference.reference(x_bf, w, p, q, eta, with_dx=False)._replace(dx=base.dx)
      refs[(regime.label, "bfloat16")] = ref_bf
      rounding.append({"path": "input_rounding", "dtype": "bfloat16", "length": length,
                       "regime": regime.label, "one_minus_q": regime.one_minus_q,
                       **error_record(ref_bf.y, ref_bf.h, None, ref_bf.dp, ref_bf.dq, ref_bf.deta,
                                      base)})
  seconds = time.perf_counter() - start
  budget.record("reference", length, 0.0, seconds / len(coeff_sets))
  log(f"  float64 reference: {seconds:.2f}s for {len(coeff_sets)} regimes x {dtypes}")
  return refs, rounding, dtypes


def reference_self_check(settings: Settings) -> dict[str, float]:
  """The blocked reference against a plain float64 lax.scan with autodiff (L = 1000)."""
  import jax
  import jax.numpy as jnp
  from experiments import cema_reference
  x, w = make_inputs(settings, 1000)
  p, q, eta = regime_coefficients(Regime("check", 1e-3), settings.dim, settings.order, settings.seed)
  ref = cema_reference.reference(x, w, p, q, eta)
  with jax.enable_x64(True):
    def loss(x, p, q, eta):
      def step(h, x_t):
        h = q * h + p * x_t[..., None]
        return h, jnp.sum(jnp.real(eta * h), axis=-1)
      h0 = jnp.zeros((x.shape[0],) + p.shape, jnp.complex128)
      h, ys = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
      y = jnp.swapaxes(ys, 0, 1)
      return jnp.sum(y * w), (y, h)
    args = (np.asarray(x, np.float64), np.asarray(p, np.float64), np.asarray(q, np.complex128),
            np.asarray(eta, np.complex128))
    (_, (y, h)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)
  plain = dict(y=y, h=h, dx=grads[0], dp=grads[1], dq=grads[2], deta=grads[3])
  return {k: rel_err(getattr(ref, k), np.asarray(v)) for k, v in plain.items()}


def run(settings: Settings, out_dir: str | os.PathLike | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the study; writes the JSON/CSV to out_dir after every length (if given). Returns the
  results dict (the JSON's content)."""
  import jax
  from experiments.benchmarks import harness
  _validate(settings)
  budget = _Budget(settings.budget_s)
  results = {"name": "cema_numerics", "metadata": harness.run_metadata(),
             "settings": dataclasses.asdict(settings), "errors": [], "rounding": [],
             "timings": [], "skipped": [], "failures": []}
  results["metadata"]["device"] = harness.device_kind()
  results["reference_check"] = reference_self_check(settings)
  log(f"CEMA numerics on {jax.devices()[0].device_kind} ({jax.default_backend()}); B={settings.batch} "
      f"D={settings.dim} N={settings.order}; reference self-check (max rel err vs plain float64 "
      f"scan + autodiff): {max(results['reference_check'].values()):.1e}")
  stem = None
  for length in settings.lengths:
    log(f"L = {length}")
    x, w = make_inputs(settings, length)
    coeff_sets = [(r, regime_coefficients(r, settings.dim, settings.order, settings.seed))
                  for r in regimes(settings)]
    if not budget.allows("reference", length, len(coeff_sets)):
      results["skipped"].append({"path": "*", "dtype": "*", "length": length,
                                 "reason": f"reference predicted to exceed --budget_s={settings.budget_s:g}"})
      log("  skipped (budget)")
      continue
    refs, rounding, dtypes = _references(settings, length, x, w, coeff_sets, budget, log)
    results["rounding"].extend(rounding)
    for dtype in dtypes:
      for path in settings.paths:
        if not _run_allowed(settings, path, dtype, length):
          continue
        try:
          _measure_path(settings, path, dtype, length, x, w, coeff_sets, refs, budget, results, log)
        except Exception as exc:  # one failing path must not lose the others' results
          results["failures"].append({"path": path, "dtype": dtype, "length": length,
                                      "error": f"{type(exc).__name__}: {exc}"[:2000]})
          log(f"  {path:>11} {dtype:<8} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
          traceback.print_exc()
    results["elapsed_s"] = budget.elapsed()
    if out_dir is not None:
      stem = write_results(results, out_dir)
  if stem is not None:
    log(f"results: {stem}.json, {stem.name}_errors.csv, {stem.name}_timings.csv")
  return results


def _validate(settings: Settings) -> None:
  unknown = set(settings.paths) - set(ALL_PATHS)
  if unknown:
    raise ValueError(f"unknown paths {sorted(unknown)}; choose from {', '.join(ALL_PATHS)}")
  unknown = set(settings.dtypes) - set(DTYPES)
  if unknown:
    raise ValueError(f"unknown dtypes {sorted(unknown)}; choose from {', '.join(DTYPES)}")
  if "float32" not in settings.dtypes:
    raise ValueError("dtypes must include float32 (the bf16 rows reuse its reference)")
  if not settings.lengths or min(settings.lengths) < 1:
    raise ValueError(f"lengths must be positive integers, got {settings.lengths}")
  unknown = set(settings.caps()) - set(ALL_PATHS) - set(DTYPES)
  if unknown:
    raise ValueError(f"--max_length keys {sorted(unknown)} are neither paths nor dtypes")
  unknown = set(settings.timing) - {"fwd", "fwd_bwd"}
  if unknown:
    raise ValueError(f"unknown timing modes {sorted(unknown)}; use fwd and/or fwd_bwd")
  for v in settings.one_minus_q:
    if not 0.0 < v <= 0.5:
      raise ValueError(f"--one_minus_q values must be in (0, 0.5] (|q| in [0.5, 1)), got {v}")


# ---------------------------------------------------------------------------------------------
# Output files.
# ---------------------------------------------------------------------------------------------

def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return float(f"{value:.4g}") if math.isfinite(value) else None  # 4 digits: small files
  if isinstance(value, np.integer):
    return int(value)
  return value


def results_stem(results: dict[str, Any]) -> str:
  return f"{results['metadata']['date'][:10]}_{results['metadata']['device']}_cema_numerics"


def write_results(results: dict[str, Any], out_dir: str | os.PathLike) -> pathlib.Path:
  """<out_dir>/<date>_<device>_cema_numerics.{json, _errors.csv, _timings.csv}; returns the stem."""
  directory = pathlib.Path(out_dir)
  directory.mkdir(parents=True, exist_ok=True)
  stem = directory / results_stem(results)
  stem.with_suffix(".json").write_text(_dumps(_jsonable(results)))
  table = results["errors"] + results["rounding"]
  columns = ["path", "dtype", "length", "regime", "one_minus_q", *QUANTITIES]
  _write_csv(stem.parent / f"{stem.name}_errors.csv", table, columns)
  timing_columns = []
  for row in results["timings"]:
    timing_columns.extend(k for k in row if k not in timing_columns)
  _write_csv(stem.parent / f"{stem.name}_timings.csv", results["timings"], timing_columns)
  return stem


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One results dict from runs of the same study made in pieces (e.g. the full preset split by
  length over several GPUs, or re-run with a larger --budget_s for the lengths a first run skipped).

  Rows are concatenated; a `skipped` entry is dropped where another part measured that path, dtype
  and length; settings list the union of lengths; metadata is the first part's, with
  `merged_from` recording each part's date, lengths and elapsed time. All parts must come from
  the same device and problem size (batch, dim, order, chunk, seed, regimes), or the numbers would
  not be comparable.
  """
  if not parts:
    raise ValueError("merge_results needs at least one results dict")
  same = ("batch", "dim", "order", "chunk", "seed", "one_minus_q", "init_regime")
  first = parts[0]
  for part in parts[1:]:
    if part["metadata"].get("device") != first["metadata"].get("device"):
      raise ValueError(f"cannot merge runs from different devices: {first['metadata'].get('device')} "
                       f"and {part['metadata'].get('device')}")
    for key in same:
      if part["settings"].get(key) != first["settings"].get(key):
        raise ValueError(f"cannot merge runs with different settings.{key}: "
                         f"{first['settings'].get(key)} and {part['settings'].get(key)}")
  merged = {"name": first["name"], "metadata": dict(first["metadata"]), "settings": dict(first["settings"])}
  for key in ("errors", "rounding", "timings", "failures"):
    merged[key] = [row for part in parts for row in part.get(key, [])]
  measured = {(r["path"], r["dtype"], r["length"]) for r in merged["errors"]}
  measured_lengths = {r["length"] for r in merged["errors"]}

  def still_skipped(entry):
    if entry["path"] == "*":
      return entry["length"] not in measured_lengths
    return (entry["path"], entry["dtype"], entry["length"]) not in measured

  merged["skipped"] = [e for part in parts for e in part.get("skipped", []) if still_skipped(e)]
  for key in ("lengths", "bf16_lengths"):
    values = []
    for part in parts:
      values.extend(v for v in part["settings"].get(key, []) if v not in values)
    merged["settings"][key] = values
  merged["reference_check"] = {
      q: max(part.get("reference_check", {}).get(q, 0.0) for part in parts)
      for q in first.get("reference_check", {})}
  merged["elapsed_s"] = sum(part.get("elapsed_s", 0.0) for part in parts)
  merged["metadata"]["merged_from"] = [
      {"date": part["metadata"].get("date"), "lengths": part["settings"].get("lengths"),
       "bf16_lengths": part["settings"].get("bf16_lengths"), "budget_s": part["settings"].get("budget_s"),
       "elapsed_s": part.get("elapsed_s")} for part in parts]
  return merged


def _dumps(results: dict[str, Any]) -> str:
  """JSON with one table row per line (compact, and readable in a diff)."""
  parts = []
  for key, value in results.items():
    if isinstance(value, list) and value and isinstance(value[0], dict):
      rows = ",\n".join("  " + json.dumps(row, allow_nan=False) for row in value)
      parts.append(f" {json.dumps(key)}: [\n{rows}\n ]")
    else:
      parts.append(f" {json.dumps(key)}: {json.dumps(value, allow_nan=False)}")
  return "{\n" + ",\n".join(parts) + "\n}\n"


def _write_csv(path: pathlib.Path, rows: list[dict], columns: list[str]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow([_cell(row.get(c)) for c in columns])


def _cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


# ---------------------------------------------------------------------------------------------
# Summary and bounds.
# ---------------------------------------------------------------------------------------------

def _worst(rows, quantity, path, dtype, length):
  values = [r[quantity] for r in rows if r["path"] == path and r["dtype"] == dtype
            and r["length"] == length and r[quantity] is not None and math.isfinite(r[quantity])]
  return max(values) if values else None


def summary(results: dict[str, Any]) -> str:
  """Worst-case (over regimes) float32 errors per path and length, and the timings."""
  rows = results["errors"]
  lengths = sorted({r["length"] for r in rows})
  paths = [p for p in ALL_PATHS if any(r["path"] == p for r in rows)]
  meta = results["metadata"]
  lines = [f"CEMA numerics on {meta.get('device_kind')} ({meta.get('backend')}), "
           f"jax {meta.get('jax_version')}; worst relative error over regimes, float32 inputs"]
  header = f"{'':>13}" + "".join(f"{_short(n):>9}" for n in lengths)
  for quantity in ("y", "y_head", "h", "dx", "dq"):
    lines.append(f"-- {quantity}\n{header}")
    for path in paths:
      cells = [_worst(rows, quantity, path, "float32", n) for n in lengths]
      lines.append(f"{path:>13}" + "".join(f"{c:9.1e}" if c is not None else f"{'-':>9}"
                                           for c in cells))
  bf_rows = [r for r in rows if r["dtype"] == "bfloat16"]
  if bf_rows:
    rounding = results["rounding"]
    lines.append("-- y with bfloat16 inputs (vs the reference on the same rounded inputs); "
                 "input rounding alone:")
    for n in sorted({r["length"] for r in bf_rows}):
      parts = [f"{p} {_worst(bf_rows, 'y', p, 'bfloat16', n):.1e}" for p in paths
               if _worst(bf_rows, "y", p, "bfloat16", n) is not None]
      cost = _worst(rounding, "y", "input_rounding", "bfloat16", n)
      lines.append(f"   L={_short(n)}: " + ", ".join(parts) + f"; input rounding {cost:.1e}")
  timings = results["timings"]
  if timings:
    lines.append("-- time per call, ms (forward / forward+backward), float32")
    lines.append(f"{'':>13}" + "".join(f"{_short(n):>18}" for n in lengths))
    for path in paths:
      cells = []
      for n in lengths:
        row = next((t for t in timings if t["path"] == path and t["length"] == n), None)
        cells.append("-" if row is None else "/".join(
            _ms(row.get(k)) for k in ("fwd_median_ms", "fwd_bwd_median_ms")))
      lines.append(f"{path:>13}" + "".join(f"{c:>18}" for c in cells))
  for key in ("skipped", "failures"):
    for item in results[key]:
      lines.append(f"{key}: {item}")
  return "\n".join(lines)


def _ms(value) -> str:
  if value is None:
    return "-"
  return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _short(n: int) -> str:
  for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
    if n >= size and n % size == 0:
      return f"{n // size}{unit}"
  return str(n)


def bound_violations(results: dict[str, Any],
                     bounds: dict[str, float] = FLOAT32_BOUNDS) -> list[str]:
  """Float32 errors above the bounds (and NaNs), as readable lines; [] when all pass."""
  out = []
  for r in results["errors"]:
    if r["dtype"] != "float32" or r["path"] not in PATHS:
      continue
    for quantity, bound in bounds.items():
      value = r[quantity]
      if value is None or not math.isfinite(value) or value > bound:
        out.append(f"{r['path']} L={r['length']} {r['regime']}: {quantity} error {value} > {bound}")
  return out


# ---------------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------------

COLORS = {"sequential": "tab:blue", "associative": "tab:orange", "fft": "tab:red",
          "chunked": "tab:green", "blocked": "tab:olive", "pallas": "tab:purple", "fft_expq": "tab:gray",
          "input_rounding": "black"}
MARKERS = {"sequential": "o", "associative": "s", "fft": "^", "chunked": "D", "blocked": "P", "pallas": "v",
           "fft_expq": "x", "input_rounding": "x"}
LABELS = {"y": "outputs y", "y_head": f"first {HEAD} outputs", "h": "final state h_L",
          "dx": "grad x", "dp": "grad p", "dq": "grad q", "deta": "grad eta"}


def _legend(ax) -> None:
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)


def _controlled(rows):
  return sorted({r["one_minus_q"] for r in rows if r["one_minus_q"] is not None})


def _nearest(values, target):
  return min(values, key=lambda v: abs(math.log10(v) - math.log10(target)))


def _series(rows, path, dtype, regime_q, quantity, by="length"):
  pts = sorted((r[by], r[quantity]) for r in rows
               if r["path"] == path and r["dtype"] == dtype and r[quantity] is not None
               and (regime_q is None or r["one_minus_q"] == regime_q)
               and r["one_minus_q"] is not None)
  return [p[0] for p in pts], [p[1] for p in pts]


def plot(results: dict[str, Any], plot_dir: str | os.PathLike) -> list[pathlib.Path]:
  """Writes the PNGs; returns their paths. Needs matplotlib."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  directory = pathlib.Path(plot_dir)
  directory.mkdir(parents=True, exist_ok=True)
  prefix = f"cema_numerics_{results['metadata']['device']}"
  device = f"{results['metadata'].get('device_kind')} ({results['metadata'].get('backend')})"
  rows = [r for r in results["errors"] if r["one_minus_q"] is not None]
  written = []
  paths = [p for p in ALL_PATHS if any(r["path"] == p for r in rows)]
  qs = _controlled(rows)
  if not rows:
    return written

  def save(fig, name):
    path = directory / f"{prefix}_{name}.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80)
    plt.close(fig)
    # A 256-colour palette keeps the files small (line plots need few colours).
    from PIL import Image
    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, optimize=True)
    written.append(path)

  def style(ax, xlabel, ylabel, title):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")

  # 1. Error against length, per path, for three regimes.
  quantities = ("y", "y_head", "h", "dx", "dq")
  picked = sorted({_nearest(qs, t) for t in (1e-1, 1e-3, 1e-6)}, reverse=True)
  fig, axes = plt.subplots(len(quantities), len(picked), figsize=(4 * len(picked), 2.6 * len(quantities)),
                           squeeze=False, sharey=True)
  for i, quantity in enumerate(quantities):
    for j, q in enumerate(picked):
      ax = axes[i, j]
      for path in paths:
        xs, ys = _series(rows, path, "float32", q, quantity)
        if xs:
          ax.plot(xs, ys, marker=MARKERS[path], color=COLORS[path], label=path, ms=4)
      style(ax, "length L", "relative error", f"{LABELS[quantity]}, 1-|q|={q:g}")
  _legend(axes[0, 0])
  fig.suptitle(f"CEMA float32 error vs float64 reference, by length — {device}", fontsize=10)
  fig.tight_layout()
  save(fig, "error_vs_length")

  # 2. Error against 1 - |q| at a middle and the longest length.
  lengths = sorted({r["length"] for r in rows if r["dtype"] == "float32"})
  shown = sorted({lengths[len(lengths) // 2], lengths[-1]})
  fig, axes = plt.subplots(len(quantities), len(shown), figsize=(4.5 * len(shown), 2.6 * len(quantities)),
                           squeeze=False, sharey=True)
  for i, quantity in enumerate(quantities):
    for j, n in enumerate(shown):
      ax = axes[i, j]
      for path in paths:
        pts = sorted((r["one_minus_q"], r[quantity]) for r in rows if r["path"] == path
                     and r["dtype"] == "float32" and r["length"] == n and r[quantity] is not None)
        if pts:
          ax.plot(*zip(*pts), marker=MARKERS[path], color=COLORS[path], label=path, ms=4)
      style(ax, "1 - |q|", "relative error", f"{LABELS[quantity]}, L={_short(n)}")
      ax.invert_xaxis()
  for ax in axes[0]:  # each column can hold different paths (some are skipped at some lengths)
    _legend(ax)
  fig.suptitle(f"CEMA float32 error vs |q| (|q| -> 1 to the right) — {device}", fontsize=10)
  fig.tight_layout()
  save(fig, "error_vs_q")

  # 3. Error along the sequence (doubling windows) at the longest length, two regimes.
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
  for j, q in enumerate(sorted({_nearest(qs, 1e-6), _nearest(qs, 1e-2)})):
    ax = axes[0, j]
    for path in paths:
      mine = [r for r in rows if r["path"] == path and r["dtype"] == "float32" and r["one_minus_q"] == q]
      if not mine:
        continue
      longest = max(mine, key=lambda r: r["length"])
      starts = [max(a, 1) for a, _, _ in longest["y_by_window"]]
      ax.plot(starts, [e for _, _, e in longest["y_by_window"]], marker=MARKERS[path],
              color=COLORS[path], ms=3, label=f"{path} (L={_short(longest['length'])})")
    style(ax, "position t (window start; windows double)", "relative error of y in window",
          f"y error along the sequence, 1-|q|={q:g}")
    _legend(ax)
  fig.suptitle(f"Where in the sequence the float32 error sits — {device}", fontsize=10)
  fig.tight_layout()
  save(fig, "error_vs_position")

  # 4. Error against the phase of q (channel d holds the d-th band of phases), longest length.
  q = _nearest(qs, 1e-6)
  fig, ax = plt.subplots(figsize=(6, 3.8))
  settings = results["settings"]
  count = settings["dim"] * settings["order"]
  centres = [math.pi * (d * settings["order"] + (settings["order"] - 1) / 2) / max(count - 1, 1)
             for d in range(settings["dim"])]
  for path in paths:
    mine = [r for r in rows if r["path"] == path and r["dtype"] == "float32" and r["one_minus_q"] == q]
    if mine:
      longest = max(mine, key=lambda r: r["length"])
      ax.plot(centres, longest["y_by_channel"], marker=MARKERS[path], color=COLORS[path], ms=3,
              label=f"{path} (L={_short(longest['length'])})")
  ax.set_yscale("log")
  ax.set_xlabel("phase of q (centre of the channel's band), radians")
  ax.set_ylabel("relative error of y in the channel")
  ax.set_title(f"y error against the phase of q, 1-|q|={q:g} — {device}", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  _legend(ax)
  fig.tight_layout()
  save(fig, "error_vs_phase")

  # 5. bfloat16 inputs.
  bf = [r for r in rows if r["dtype"] == "bfloat16"]
  rounding = [r for r in results["rounding"] if r["one_minus_q"] is not None]
  if bf:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), squeeze=False)
    for j, quantity in enumerate(("y", "h", "dq")):
      ax = axes[0, j]
      for path in paths:
        longest = max((x["length"] for x in bf if x["path"] == path), default=None)
        pts = sorted((r["one_minus_q"], r[quantity]) for r in bf if r["path"] == path
                     and r["length"] == longest)
        if pts:
          ax.plot(*zip(*pts), marker=MARKERS[path], color=COLORS[path], ms=4,
                  label=f"{path} (L={_short(longest)})")
      longest = max(x["length"] for x in rounding)
      pts = sorted((r["one_minus_q"], r[quantity]) for r in rounding if r["length"] == longest)
      if pts:
        ax.plot(*zip(*pts), "k--", marker="x", label=f"bf16 input rounding itself (L={_short(longest)})")
      style(ax, "1 - |q|", "relative error", f"{LABELS[quantity]}, bf16 inputs, each path's longest L")
      ax.invert_xaxis()
    _legend(axes[0, 0])
    fig.suptitle(f"bfloat16 inputs: path error vs the cost of rounding the inputs — {device}",
                 fontsize=10)
    fig.tight_layout()
    save(fig, "bf16")

  # 6. Time against length.
  timings = results["timings"]
  if timings:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for j, (key, title) in enumerate((("fwd_median_ms", "forward"),
                                      ("fwd_bwd_median_ms", "forward + backward"))):
      ax = axes[0, j]
      for path in paths:
        pts = sorted((t["length"], t[key]) for t in timings if t["path"] == path and t.get(key))
        if pts:
          ax.plot(*zip(*pts), marker=MARKERS[path], color=COLORS[path], ms=4, label=path)
      meta = results["settings"]
      style(ax, "length L", "median time per call (ms)",
            f"{title}, B={meta['batch']} D={meta['dim']} N={meta['order']}")
      _legend(ax)
    fig.suptitle(f"CEMA time per call — {device}", fontsize=10)
    fig.tight_layout()
    save(fig, "time_vs_length")
  return written


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

def define_flags(flag_values=None) -> None:
  """Defines the command-line flags on flag_values (default: absl's global FLAGS)."""
  from absl import flags
  fv = {"flag_values": flags.FLAGS if flag_values is None else flag_values}
  flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Base settings; the flags below override them.",
                    **fv)
  flags.DEFINE_list("paths", None, f"CEMA paths among {','.join(ALL_PATHS)}.", **fv)
  flags.DEFINE_list("dtypes", None, "Input dtypes: float32 and/or bfloat16.", **fv)
  flags.DEFINE_list("lengths", None, "Sequence lengths (float32), run in this order.", **fv)
  flags.DEFINE_list("bf16_lengths", None, "Lengths also run with bfloat16 inputs.", **fv)
  flags.DEFINE_list("one_minus_q", None, "Regimes as 1 - |q| (each in (0, 0.5]).", **fv)
  flags.DEFINE_bool("init_regime", None, "Add the model-initialisation regime.", **fv)
  flags.DEFINE_integer("batch", None, "Batch size B.", **fv)
  flags.DEFINE_integer("dim", None, "Channels D.", **fv)
  flags.DEFINE_integer("order", None, "CEMA order N.", **fv)
  flags.DEFINE_integer("chunk", None, "Chunk size of the chunked path.", **fv)
  flags.DEFINE_integer("seed", None, "Seed of inputs and coefficients.", **fv)
  flags.DEFINE_list("max_length", None, "Caps as name=length, name a path or dtype "
                    "(e.g. associative=16384,bfloat16=1024).", **fv)
  flags.DEFINE_list("timing", None, "Timing modes: fwd, fwd_bwd (empty: no timings).", **fv)
  flags.DEFINE_integer("repeats", None, "Timed calls per measurement (at most).", **fv)
  flags.DEFINE_float("budget_s", None, "Skip runs predicted to end after this many seconds (0: off).",
                     **fv)
  flags.DEFINE_bool("fast_compile", None, "Compile at -O0 on CPU.", **fv)
  flags.DEFINE_bool("check_bounds", None, "Fail if a float32 error exceeds FLOAT32_BOUNDS.", **fv)
  flags.DEFINE_string("out_dir", "experiments/results", "Where the JSON and CSVs go.", **fv)
  flags.DEFINE_string("plot_dir", None, "Where the PNGs go (default: out_dir; '' for no plots).", **fv)
  flags.DEFINE_list("from_json", None, "Only re-plot / summarise this results JSON; several "
                    "(comma-separated) are merged into one (see merge_results).", **fv)
  flags.DEFINE_string("merged_out_dir", None, "With several --from_json: write the merged JSON/CSVs "
                      "here.", **fv)


def settings_from_flags(flag_values) -> Settings:
  """The preset named by --preset with every explicitly given flag applied on top."""
  settings = PRESETS[flag_values.preset]
  changes = {}
  converters = {
      "paths": tuple, "dtypes": tuple, "lengths": lambda v: tuple(int(x) for x in v),
      "bf16_lengths": lambda v: tuple(int(x) for x in v),
      "one_minus_q": lambda v: tuple(float(x) for x in v), "timing": tuple,
      "max_length": lambda v: tuple((k, int(n)) for k, n in (item.split("=", 1) for item in v)),
  }
  for field in dataclasses.fields(Settings):
    value = getattr(flag_values, field.name, None)
    if value is not None:
      try:
        changes[field.name] = converters.get(field.name, lambda v: v)(value)
      except ValueError as exc:
        raise ValueError(f"--{field.name}={value!r} is malformed ({exc}); see --helpfull") from exc
  return dataclasses.replace(settings, **changes)


def main(argv) -> None:
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  flag_values = flags.FLAGS
  plot_dir = flag_values.plot_dir if flag_values.plot_dir is not None else flag_values.out_dir
  if flag_values.from_json:
    parts = [json.loads(pathlib.Path(path).read_text()) for path in flag_values.from_json]
    results = parts[0] if len(parts) == 1 else merge_results(parts)
    if flag_values.merged_out_dir:
      print(f"merged results: {write_results(results, flag_values.merged_out_dir)}.json")
    settings = None
  else:
    settings = settings_from_flags(flag_values)
    results = run(settings, flag_values.out_dir)
  if plot_dir:
    try:
      for path in plot(results, plot_dir):
        print(f"plot: {path}")
    except ImportError as exc:
      print(f"no plots ({exc}); re-plot later with --from_json")
  print(summary(results))
  if settings is not None and settings.check_bounds:
    violations = bound_violations(results)
    if violations:
      raise SystemExit("float32 errors above FLOAT32_BOUNDS:\n" + "\n".join(violations))
    print(f"all float32 errors within FLOAT32_BOUNDS {FLOAT32_BOUNDS}")


if __name__ == "__main__":
  # Before JAX is imported: the CPU flags this jaxlib accepts (megalodon_jax/xla_flags.py).
  from megalodon_jax.xla_flags import add_xla_flags, cpu_flags
  add_xla_flags(*cpu_flags())
  from absl import app as _app
  define_flags()
  _app.run(main)
