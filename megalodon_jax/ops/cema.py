"""Complex exponential moving average (CEMA, SPEC §2): coefficients and evaluation paths.

Per channel d and order n:  h_t = q * h_{t-1} + p * x_t  (complex state),
y_t = Re(sum_n eta_n h_t,n) + omega_d x_t.  All math runs in float32 / complex64.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class CemaCoefficients(NamedTuple):
  """p: [D, N] float32 input scale; q: [D, N] complex64 decay (|q| < 1); eta: [D, N] complex64."""
  p: jax.Array
  q: jax.Array
  eta: jax.Array


def cema_coefficients(alpha: jax.Array, delta: jax.Array, theta: jax.Array,
                      gamma: jax.Array) -> CemaCoefficients:
  """Coefficients from the stored parameters.

  alpha, delta: [D, N, 1] (or [D, N]); theta: [D, 1, 1] (or [D]); gamma: [D, N, 2] (real, imag).
  p = sigmoid(alpha); q = (1 - sigmoid(alpha) sigmoid(delta)) exp(i n phi_d) with
  phi_d = sigmoid(theta_d) 2 pi / N, n = 1..N; eta = (gamma_re + i gamma_im) / sqrt(N).
  """
  dim, ndim = gamma.shape[0], gamma.shape[1]
  alpha = jax.nn.sigmoid(alpha.astype(jnp.float32).reshape(dim, ndim))
  delta = jax.nn.sigmoid(delta.astype(jnp.float32).reshape(dim, ndim))
  phi = jax.nn.sigmoid(theta.astype(jnp.float32).reshape(dim, 1)) * (2.0 * math.pi / ndim)
  angle = phi * jnp.arange(1, ndim + 1, dtype=jnp.float32)[None, :]
  magnitude = 1.0 - alpha * delta
  q = jax.lax.complex(magnitude * jnp.cos(angle), magnitude * jnp.sin(angle))
  gamma = gamma.astype(jnp.float32) / math.sqrt(ndim)
  eta = jax.lax.complex(gamma[..., 0], gamma[..., 1])
  return CemaCoefficients(p=alpha, q=q, eta=eta)


METHODS = ("sequential", "associative", "fft", "chunked", "blocked", "pallas")
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Accurate powers q^t.
#
# Why not exp(t * log q) in float32: the phase t * angle(q) is off by about t * eps radians, and
# angle(q) itself (atan2 of the float32 components) is off by about eps, which again grows by t.
# At t = 1e6 that is ~0.1 rad. Splitting t into high/low parts fixes the first error but not the
# second: the stored q is a pair of float32 numbers, and its powers are what the recurrence
# (sequential scan) actually applies, so the FFT kernel must match powers of that exact value.
# It matters well before 1e6: with |q| = 1 - 1e-3 the kernel's mass sits at lags ~1e3, where an
# atan2-rounded phase is already off by ~1e-4 relative.
#
# Choice: exponentiation by squaring of the stored complex64 q in double-float arithmetic (each
# real number a pair hi + lo of float32, ~44 significant bits). Squaring doubles a relative error,
# so q^(2^k) carries about 2^k * 2^-44; at t = 2^20 that is ~1e-7, i.e. float32-accurate phase and
# magnitude for t up to ~1M (and ~1e-4 at 1e9). No angle is ever formed, so there is no
# reduction modulo 2*pi to get wrong. Magnitudes need no rescaling: |q| <= 1, so every partial
# product is at least as large as the result and underflow only happens where the result itself
# is below float32 range.
#
# The double-float products are built only from exact float32 products of 12-bit halves (split by
# masking mantissa bits, not by Veltkamp's multiply-by-4097), so fused multiply-adds that a
# compiler may form (e.g. XLA:GPU) cannot change any result. Sums use Knuth's two-sum.
#
# Cost: powers for t < L are formed as q^(T j) * q^l with T ~ sqrt(L): the double-float work is
# on ~2 sqrt(L) exponents per (d, n), all in ONE rolled loop (one masked multiply per bit, by the
# square q^(2^b) formed once per (d, n), so XLA emits few kernels: an unrolled chain of these
# small elementwise ops takes minutes to compile). On a GPU the loop is slow: 6 ms at D=1024,
# L=16384 on an H200 with two stacked products per bit (the form before the squares were hoisted;
# the current form is unmeasured there); kernels_pallas.cema.power_tables_pallas builds the same
# tables in one kernel (_power_tables(impl="pallas")). The rest is one complex64 multiply per
# entry, and the kernel K_t never materialises [D, N, L]: it is an einsum of the two tables.
# ---------------------------------------------------------------------------------------------

_MANTISSA_HIGH_BITS = 0xFFFFF000  # sign, exponent and the top 11 stored mantissa bits


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a = hi + lo exactly, hi and lo with at most 12 significant bits each."""
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
  hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(_MANTISSA_HIGH_BITS), jnp.float32)
  return hi, a - hi


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """s + e == a + b exactly, s = fl(a + b) (Knuth)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _fast_two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """s + e == a + b exactly, assuming |a| >= |b| (Dekker)."""
  s = a + b
  return s, b - (s - a)


def _df_mul(x, y):
  """Double-float product (hi, lo) * (hi, lo), ~2^-44 relative; every float32 product is exact."""
  ah, al = _split(x[0])
  bh, bl = _split(y[0])
  s, e1 = _two_sum(ah * bh, ah * bl)
  s, e2 = _two_sum(s, al * bh)
  tail = (e1 + e2) + (al * bl + (x[0] * y[1] + x[1] * y[0]))
  return _fast_two_sum(s, tail)


def _df_add(x, y):
  s, e = _two_sum(x[0], y[0])
  return _fast_two_sum(s, e + (x[1] + y[1]))


def _dfc_mul(z, w):
  """Complex double-float product. z, w: (hi, lo), each [2, ...] with axis 0 = (re, im).

  The four real products run as one stacked double-float product, the two sums as one.
  """
  a = tuple(jnp.concatenate([part, part]) for part in z)  # zr zi zr zi
  b = tuple(jnp.concatenate([part, part[::-1]]) for part in w)  # wr wi wi wr
  ph, pl = _df_mul(a, b)  # zr wr, zi wi, zr wi, zi wr
  sign = jnp.array([-1.0, 1.0], jnp.float32).reshape((2,) + (1,) * (ph.ndim - 1))
  return _df_add((ph[0::2], pl[0::2]), (ph[1::2] * sign, pl[1::2] * sign))


def _dfc_power(q: jax.Array, exponents: jax.Array, bits: int):
  """q^e by binary exponentiation: q [...] complex64, exponents [K] int32 in [0, 2^bits)
  -> double-float (hi, lo), each [2, ..., K] (axis 0: re, im).

  The squares q^(2^b) depend on q only, so they are formed once on q's shape (a scan of
  `bits` double-float squarings); the rolled loop over the bits then multiplies each entry's
  result by q^(2^b) where its bit b is set: one double-float product per bit on [..., K]
  instead of two stacked ones (the same values except in the last bits of entries below ~1e-28,
  where the low parts are subnormal).
  """
  shape = q.shape + exponents.shape
  q_pair = (jnp.stack([jnp.real(q), jnp.imag(q)]), jnp.zeros((2,) + q.shape, jnp.float32))
  _, squares = jax.lax.scan(lambda base, _: (_dfc_mul(base, base), base), q_pair, None, length=bits)
  one = jnp.zeros((2,) + shape, jnp.float32).at[0].set(1.0)

  def body(bit, carry):
    result, rest = carry
    square = tuple(jax.lax.dynamic_index_in_dim(part, bit, keepdims=False)[..., None] for part in squares)
    ph, pl = _dfc_mul(result, square)
    take = (rest & 1) == 1
    return (jnp.where(take, ph, result[0]), jnp.where(take, pl, result[1])), rest >> 1

  result, _ = jax.lax.fori_loop(0, bits, body, ((one, jnp.zeros((2,) + shape, jnp.float32)), exponents))
  return result


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _exact_powers(q: jax.Array, exponents: jax.Array, bits: int) -> jax.Array:
  """q^e: q [...] complex64, exponents [K] int32 -> [..., K] complex64."""
  hi, lo = _dfc_power(q, exponents, bits)
  return jax.lax.complex(hi[0] + lo[0], hi[1] + lo[1])


@_exact_powers.defjvp
def _exact_powers_jvp(bits, primals, tangents):
  # d q^e = e q^(e-1) dq = e q^e (dq / q); |q| > 0 for every q built by cema_coefficients.
  q, exponents = primals
  dq = tangents[0]
  powers = _exact_powers(q, exponents, bits)
  safe_q = jnp.where(q == 0, jnp.ones_like(q), q)
  ratio = jnp.where(q == 0, jnp.zeros_like(q), dq / safe_q)
  return powers, (powers * exponents.astype(jnp.float32).astype(powers.dtype)) * ratio[..., None]


def _is_static_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class _PowerTables(NamedTuple):
  """q^t = high[t // block] * low[t % block] (relative to `offset`), plus requested extras."""
  high: jax.Array   # [..., J] complex64: q^(offset + block j)
  low: jax.Array    # [..., T] complex64: q^l, l < block
  extra: jax.Array  # [..., E] complex64: q^e for the requested static e
  block: int


def _power_blocks(length: int) -> tuple[int, int]:
  """(T, J): t = T j + l with l < T and j < J covers 0..length-1; T a power of 2 near sqrt."""
  block = 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(length)))))
  return block, -(-length // block)


POWER_IMPLS = ("xla", "pallas")


def _power_tables(q: jax.Array, length: int, offset: int | jax.Array = 0,
                  extra: tuple[int, ...] = (), impl: str = "xla") -> _PowerTables:
  """All powers a path needs, from one double-float loop.

  impl: "xla" (the rolled loop below) or "pallas" (kernels_pallas.cema.power_tables_pallas: one
  kernel, the same accuracy; on a GPU, or interpreted on the CPU; the XLA loop on a TPU and for a
  traced offset, which the kernel does not take)."""
  if impl not in POWER_IMPLS:
    raise ValueError(f"unknown power-table impl {impl!r}; valid: {', '.join(POWER_IMPLS)}")
  block, count = _power_blocks(length)
  if impl == "pallas" and _is_static_int(offset) and jax.default_backend() != "tpu":
    if offset < 0:
      raise ValueError(f"offset must be >= 0 (|q| < 1 makes negative powers blow up), got {offset}")
    from kernels_pallas import cema as cema_kernels  # lazy: Pallas is optional at import time
    tables = functools.partial(cema_kernels.power_tables_pallas,
                               interpret=jax.default_backend() == "cpu")
    q = jnp.asarray(q).astype(jnp.complex64)
    high, low = tables(q, block, count, int(offset))
    extras = [tables(q, 1, 1, int(e))[0] for e in extra]
    extra_powers = jnp.concatenate(extras, axis=-1) if extras else jnp.zeros(q.shape + (0,), jnp.complex64)
    return _PowerTables(high=high, low=low, extra=extra_powers, block=block)
  low = np.arange(block)
  high = block * np.arange(count)
  fixed = np.asarray(extra, np.int64)
  if _is_static_int(offset):
    if offset < 0:
      raise ValueError(f"offset must be >= 0 (|q| < 1 makes negative powers blow up), got {offset}")
    exponents = np.concatenate([low, offset + high, fixed])
    if exponents.max() >= 2**31:
      raise ValueError(f"exponent {exponents.max()} does not fit in int32")
    bits = max(1, int(exponents.max()).bit_length())
    exponents = jnp.asarray(exponents, jnp.int32)
  else:
    exponents = jnp.concatenate([jnp.asarray(low, jnp.int32),
                                 jnp.asarray(offset, jnp.int32) + jnp.asarray(high, jnp.int32),
                                 jnp.asarray(fixed, jnp.int32)])
    bits = 31
  powers = _exact_powers(jnp.asarray(q).astype(jnp.complex64), exponents, bits)
  return _PowerTables(high=powers[..., block:block + count], low=powers[..., :block],
                      extra=powers[..., block + count:], block=block)


def _expand(tables: _PowerTables, length: int) -> jax.Array:
  """[..., length] complex64 from the two tables (one complex64 product per entry)."""
  out = tables.high[..., :, None] * tables.low[..., None, :]
  return out.reshape(*out.shape[:-2], -1)[..., :length]


def _check_length(length) -> None:
  if not _is_static_int(length) or length < 1:
    raise ValueError(f"length must be a static Python int >= 1, got {length!r}")


def cema_powers(q: jax.Array, length: int, offset: int | jax.Array = 0, impl: str = "xla") -> jax.Array:
  """Accurate q^(offset + t) for t < length (see the comment above _split).

  q: [D, N] (any shape) complex; length: static int >= 1; offset: int >= 0, static or a traced
  int32 scalar (offset + length < 2^31); impl: POWER_IMPLS (see _power_tables). Returns
  [D, N, length] complex64. Differentiable in q.
  """
  _check_length(length)
  return _expand(_power_tables(q, length, offset, impl=impl), length)


def _complex_einsum_real(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """Re(einsum(a, b)) for complex a, b in float32 (full precision, no TF32).

  With one contracted axis, Re(a b) = [Re a, Im a] . [Re b, -Im b] is ONE real einsum over that
  axis doubled, so the [..., L, D]-sized result is written (and, for the gradient, read) once
  rather than as two products and their difference."""
  operands, out = spec.split("->")
  spec_a, spec_b = operands.split(",")
  contracted = [c for c in spec_a if c in spec_b and c not in out]
  if len(contracted) != 1:
    return (jnp.einsum(spec, jnp.real(a), jnp.real(b), precision=_HIGHEST)
            - jnp.einsum(spec, jnp.imag(a), jnp.imag(b), precision=_HIGHEST))
  axis_a, axis_b = spec_a.index(contracted[0]), spec_b.index(contracted[0])
  stacked_a = jnp.concatenate([jnp.real(a), jnp.imag(a)], axis=axis_a)
  stacked_b = jnp.concatenate([jnp.real(b), -jnp.imag(b)], axis=axis_b)
  return jnp.einsum(spec, stacked_a, stacked_b, precision=_HIGHEST)


def _complex_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum of complex a, b as four float32 einsums (full precision)."""
  ar, ai, br, bi = jnp.real(a), jnp.imag(a), jnp.real(b), jnp.imag(b)
  re = (jnp.einsum(spec, ar, br, precision=_HIGHEST) - jnp.einsum(spec, ai, bi, precision=_HIGHEST))
  im = (jnp.einsum(spec, ar, bi, precision=_HIGHEST) + jnp.einsum(spec, ai, br, precision=_HIGHEST))
  return jax.lax.complex(re, im)


def _kernel_from_tables(coeffs: CemaCoefficients, tables: _PowerTables, length: int) -> jax.Array:
  weights = (coeffs.p * coeffs.eta)[..., None] * tables.high  # [D, N, J]
  kernel = _complex_einsum_real("dnj,dnl->djl", weights, tables.low)
  return kernel.reshape(kernel.shape[0], -1)[:, :length]


def cema_kernel(coeffs: CemaCoefficients, length: int) -> jax.Array:
  """K_t = Re(sum_n p_n eta_n q_n^t) for t < length: [D, length] float32.

  Formed as an einsum of q^(T j) and q^l tables (t = T j + l), never as a [D, N, L] array.
  """
  _check_length(length)
  _dims(coeffs)
  return _kernel_from_tables(coeffs, _power_tables(coeffs.q, length), length)


# ---------------------------------------------------------------------------------------------
# Inputs, validation and segment bookkeeping.
# ---------------------------------------------------------------------------------------------

def _dims(coeffs: CemaCoefficients) -> tuple[int, int]:
  if coeffs.p.ndim != 2 or coeffs.q.shape != coeffs.p.shape or coeffs.eta.shape != coeffs.p.shape:
    raise ValueError(
        "coeffs must hold p, q, eta of equal shape [D, N] (build them with cema_coefficients), got "
        f"p{tuple(coeffs.p.shape)} q{tuple(coeffs.q.shape)} eta{tuple(coeffs.eta.shape)}")
  return coeffs.p.shape


def _check_x(x: jax.Array, dim: int) -> None:
  if x.ndim != 3:
    raise ValueError(f"x must be [batch, length, dim], got shape {tuple(x.shape)}")
  if x.shape[-1] != dim:
    raise ValueError(
        f"x has {x.shape[-1]} channels (last dim) but the CEMA coefficients have D={dim}; "
        "pass x as [batch, length, dim] with dim matching the parameters")
  if x.shape[1] < 1:
    raise ValueError("x has length 0; CEMA needs at least one step")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a floating dtype (float32 or bfloat16), got {x.dtype}")


def _check_h0(h0: jax.Array | None, batch: int, dim: int, order: int) -> jax.Array | None:
  if h0 is None:
    return None
  if tuple(h0.shape) != (batch, dim, order):
    raise ValueError(
        f"h0 must be the complex state [batch, D, N] = {(batch, dim, order)}, "
        f"got {tuple(h0.shape)}")
  return jnp.asarray(h0).astype(jnp.complex64)


def _check_omega(omega: jax.Array, dim: int) -> jax.Array:
  omega = jnp.asarray(omega)
  if omega.shape not in ((dim,), (dim, 1)):
    raise ValueError(f"omega must have shape [D] or [D, 1] with D={dim}, got {tuple(omega.shape)}")
  return omega.reshape(dim).astype(jnp.float32)


def _run_index(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array | None:
  """[B, L] int32: how many resets happened at or before t (0 until the first new run).

  A new run starts where the id differs from the previous step's; t = 0 never resets, so the
  first run continues from h0. Runs, not ids, decide what is connected: ids 1 1 2 2 1 1 are three
  documents.
  """
  if segment_ids is None:
    return None
  if tuple(segment_ids.shape) != (batch, length):
    raise ValueError(
        f"segment_ids must be [batch, length] = {(batch, length)}, got {tuple(segment_ids.shape)}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype}")
  resets = segment_ids[:, 1:] != segment_ids[:, :-1]
  resets = jnp.concatenate([jnp.zeros((batch, 1), bool), resets], axis=1)
  return jnp.cumsum(resets.astype(jnp.int32), axis=1)


class _Inputs(NamedTuple):
  x: jax.Array          # [B, L, D] float32
  omega: jax.Array      # [D] float32
  h0: jax.Array | None  # [B, D, N] complex64
  run: jax.Array | None  # [B, L] int32 (see _run_index)


def _prepare(x, coeffs, omega, h0, segment_ids) -> _Inputs:
  dim, order = _dims(coeffs)
  _check_x(x, dim)
  batch, length, _ = x.shape
  return _Inputs(x=x.astype(jnp.float32), omega=_check_omega(omega, dim),
                 h0=_check_h0(h0, batch, dim, order), run=_run_index(segment_ids, batch, length))


def _readout(h: jax.Array, eta: jax.Array) -> jax.Array:
  """Re(sum_n eta_n h_n): h [..., D, N] -> [..., D] float32."""
  return jnp.sum(jnp.real(eta) * jnp.real(h) - jnp.imag(eta) * jnp.imag(h), axis=-1)


def _finish(y, h_last, return_state):
  return (y, h_last) if return_state else y


# ---------------------------------------------------------------------------------------------
# Path 1: sequential scan (the reference).
# ---------------------------------------------------------------------------------------------

def cema_sequential(x: jax.Array, coeffs: CemaCoefficients, omega: jax.Array,
                    h0: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
                    return_state: bool = False):
  """h_t = q h_{t-1} + p x_t by lax.scan over time (one step per iteration).

  x: [B, L, D] float; coeffs: [D, N]; omega: [D] or [D, 1]; h0: [B, D, N] complex or None;
  segment_ids: [B, L] int or None. Returns y: [B, L, D] float32, and h_L: [B, D, N] complex64
  when return_state.
  """
  inp = _prepare(x, coeffs, omega, h0, segment_ids)
  batch, length, dim = inp.x.shape
  order = coeffs.p.shape[1]
  h = jnp.zeros((batch, dim, order), jnp.complex64) if inp.h0 is None else inp.h0
  xs = jnp.swapaxes(inp.x, 0, 1)  # [L, B, D]
  resets = None if inp.run is None else jnp.swapaxes(
      jnp.diff(inp.run, axis=1, prepend=0) > 0, 0, 1)  # [L, B]

  def step(h, inputs):
    x_t, reset_t = inputs
    decayed = coeffs.q * h
    if reset_t is not None:
      decayed = jnp.where(reset_t[:, None, None], jnp.zeros_like(decayed), decayed)
    h = decayed + coeffs.p * x_t[..., None]
    return h, _readout(h, coeffs.eta) + inp.omega * x_t

  h_last, ys = jax.lax.scan(step, h, (xs, resets))
  return _finish(jnp.swapaxes(ys, 0, 1), h_last, return_state)


# ---------------------------------------------------------------------------------------------
# Path 2: associative scan over affine maps h -> a h + b.
# ---------------------------------------------------------------------------------------------
#
# The elements are (a, b) with (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2). Every a is a power of
# q (q^m for a span of m steps without reset) or 0 (a reset inside the span), so a is carried as
# its exponent m (-1 for 0) and applied through an accurate table of q^m. Multiplying the a's in
# complex64 instead is exact algebra but poor numerics: all a_t are the same number, so the tree
# forms q^(2^k) by repeated squaring and its rounding errors add up coherently (~2^k eps, not
# ~sqrt(2^k) eps as in the sequential scan); at L = 8192 with |q| = 1 - 1e-3 that alone costs
# ~1e-5 relative error in h.


def _compose(powers: jax.Array, first, second):
  """(m1, b1) then (m2, b2): h -> q^m2 (q^m1 h + b1) + b2; m = -1 encodes a = 0 (a reset).

  powers: [D, N, L+1] = q^0..q^L; m: [B, S] int32; b: [B, S, D, N] complex64.
  """
  m1, b1 = first
  m2, b2 = second
  a2 = jnp.moveaxis(jnp.take(powers, jnp.maximum(m2, 0), axis=-1, mode="clip"), (0, 1), (2, 3))
  a2 = jnp.where((m2 >= 0)[..., None, None], a2, jnp.zeros_like(a2))
  return jnp.where((m1 < 0) | (m2 < 0), -1, m1 + m2), a2 * b1 + b2


def cema_associative(x: jax.Array, coeffs: CemaCoefficients, omega: jax.Array,
                     h0: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
                     return_state: bool = False):
  """Parallel prefix (lax.associative_scan) over (a_t, b_t) = (q, p x_t); a reset sets a_t = 0.

  Same signature and results as cema_sequential; O(log L) depth, [B, L, D, N] complex memory
  plus a [D, N, L+1] table of powers (see the comment above _compose).
  """
  inp = _prepare(x, coeffs, omega, h0, segment_ids)
  batch, length, _ = inp.x.shape
  powers = cema_powers(coeffs.q, length + 1)
  steps = jnp.ones((batch, length), jnp.int32)  # a_t = q^1
  if inp.run is not None:
    reset = jnp.diff(inp.run, axis=1, prepend=0) > 0
    steps = jnp.where(reset, -1, steps)  # a_t = 0
  b = (coeffs.p * inp.x[..., None]).astype(jnp.complex64)  # [B, L, D, N]
  if inp.h0 is not None:
    b = b.at[:, 0].add(coeffs.q * inp.h0)  # t = 0 never resets
  _, h = jax.lax.associative_scan(functools.partial(_compose, powers), (steps, b), axis=1)
  y = _readout(h, coeffs.eta) + inp.omega * inp.x
  return _finish(y, h[:, -1], return_state)


# ---------------------------------------------------------------------------------------------
# Closed forms: initial-state term and final state.
# ---------------------------------------------------------------------------------------------

def _state_from_tables(h0: jax.Array, coeffs: CemaCoefficients, tables: _PowerTables,
                       length: int, run: jax.Array | None) -> jax.Array:
  # Re(sum_n (eta q h0)_n q_n^t): the extra q is folded into the [B, D, N] weights.
  batch, dim, _ = h0.shape
  weights = (coeffs.eta * coeffs.q * h0)[..., None] * tables.high  # [B, D, N, J]
  out = _complex_einsum_real("bdnj,dnl->bjld", weights, tables.low)
  out = out.reshape(batch, -1, dim)[:, :length]
  if run is not None:
    out = jnp.where((run == 0)[..., None], out, 0.0)
  return out


def cema_state_contribution(h0: jax.Array, coeffs: CemaCoefficients, length: int,
                            segment_ids: jax.Array | None = None, powers: str = "xla") -> jax.Array:
  """Re(sum_n eta_n q_n^(t+1) h0_n) for t < length: [B, L, D] float32.

  h0: [B, D, N] complex; segment_ids: [B, L] int or None. Zero from the first reset on (the
  state is dropped there). powers: how the power tables are built (POWER_IMPLS).
  """
  _check_length(length)
  dim, order = _dims(coeffs)
  h0 = jnp.asarray(h0)
  if h0.ndim != 3:
    raise ValueError(f"h0 must be the complex state [batch, D, N], got shape {tuple(h0.shape)}")
  h0 = _check_h0(h0, h0.shape[0], dim, order)
  run = _run_index(segment_ids, h0.shape[0], length)
  return _state_from_tables(h0, coeffs, _power_tables(coeffs.q, length, impl=powers), length, run)


def _final_from_tables(x: jax.Array, coeffs: CemaCoefficients, tables: _PowerTables,
                       h0: jax.Array | None, run: jax.Array | None) -> jax.Array:
  """x: [B, L, D] float32; tables for length L with extra = (L,)."""
  batch, length, dim = x.shape
  if run is not None:
    x = jnp.where((run == run[:, -1:])[..., None], x, 0.0)
  block, count = tables.block, tables.high.shape[-1]
  # t = L-1-j = T i + l: reverse time, pad to J*T steps (zeros add nothing) and fold.
  reversed_x = jnp.pad(jnp.flip(x, axis=1), ((0, 0), (0, count * block - length), (0, 0)))
  reversed_x = reversed_x.reshape(batch, count, block, dim)  # [B, J, T, D]
  inner = jax.lax.complex(
      jnp.einsum("dnl,bjld->bdnj", jnp.real(tables.low), reversed_x, precision=_HIGHEST),
      jnp.einsum("dnl,bjld->bdnj", jnp.imag(tables.low), reversed_x, precision=_HIGHEST))
  h = coeffs.p * _complex_einsum("bdnj,dnj->bdn", inner, tables.high)
  if h0 is not None:
    carried = tables.extra[..., 0] * h0  # q^L h0
    if run is not None:
      carried = jnp.where((run[:, -1] == 0)[:, None, None], carried, jnp.zeros_like(carried))
    h = h + carried
  return h


def cema_final_state(x: jax.Array, coeffs: CemaCoefficients, h0: jax.Array | None = None,
                     segment_ids: jax.Array | None = None) -> jax.Array:
  """h_L = sum_j q^(L-1-j) p x_j + q^L h0 in closed form: [B, D, N] complex64.

  x: [B, L, D]; with segment_ids only the last run contributes, and h0 only if there is no reset.
  Computed as two einsums over t = L-1-j = T i + l, never forming [D, N, L].
  """
  dim, order = _dims(coeffs)
  _check_x(x, dim)
  batch, length, _ = x.shape
  h0 = _check_h0(h0, batch, dim, order)
  run = _run_index(segment_ids, batch, length)
  tables = _power_tables(coeffs.q, length, extra=(length,))
  return _final_from_tables(x.astype(jnp.float32), coeffs, tables, h0, run)


def _table_power(tables: _PowerTables, q: jax.Array, exponent: int) -> jax.Array:
  """q^exponent [...] from tables with block * count >= exponent (at most two more products).

  exponent = block j + l with j < count reads high[j] low[l]; exponent = block count (a power-of-2
  length) is high[count - 1] low[block - 1] q. Each factor is float32-accurate, so the product is
  within a few float32 roundings of q^exponent at any exponent.
  """
  block, count = tables.block, tables.high.shape[-1]
  j, l = divmod(exponent, block)
  if j < count:
    return tables.high[..., j] * tables.low[..., l]
  if (j, l) != (count, 0):
    raise ValueError(f"exponent {exponent} is beyond the tables' {block * count} steps")
  return tables.high[..., count - 1] * tables.low[..., block - 1] * q.astype(jnp.complex64)


def cema_slice_summary(x: jax.Array, coeffs: CemaCoefficients, segment_ids: jax.Array | None = None,
                       powers: str = "xla") -> tuple[jax.Array, jax.Array]:
  """What one slice of a sequence hands on: (h_L [B, D, N], q^L [D, N]), both complex64.

  x: [B, L, D]. h_L is the state after the slice from a zero state (with segment_ids only the last
  run contributes), in closed form like cema_final_state; q^L carries an earlier state across the
  slice. One power-table build (powers: POWER_IMPLS) gives both, without running the scan. With
  powers="pallas" (off TPU, where cema_summary.supported) the whole summary is
  kernels_pallas.cema_summary.slice_summary_planes: the tables, the per-chunk sums weighted by
  q^(block j) and one custom VJP.
  """
  dim, order = _dims(coeffs)
  _check_x(x, dim)
  batch, length, _ = x.shape
  run = _run_index(segment_ids, batch, length)
  block, count = _power_blocks(length)
  if powers == "xla" or jax.default_backend() == "tpu" or not _summary_kernel_takes(dim, order, block):
    tables = _power_tables(coeffs.q, length, impl=powers)
    decay = _table_power(tables, coeffs.q, length)
    return _final_from_tables(x.astype(jnp.float32), coeffs, tables, None, run), decay
  from kernels_pallas import cema_summary  # lazy: Pallas is optional at import time
  if run is not None:
    x = jnp.where((run == run[:, -1:])[..., None], x, jnp.zeros_like(x))
  # Zeros in front make the length count * block and add nothing; chunk j then ends block
  # (count - 1 - j) steps before the last, so the kernel weights it by q^(block (count - 1 - j)).
  x = jnp.pad(x, ((0, 0), (count * block - length, 0), (0, 0)))
  # p scales h inside the kernel's VJP, which keeps h anyway: p * h outside kept h and p broadcast
  # to [B, D, N] complex for its backward, two more values per layer under a layer scan.
  h_re, h_im, decay = cema_summary.slice_summary_planes(x, coeffs.q, block, length,
                                                        interpret=jax.default_backend() == "cpu",
                                                        scale=coeffs.p)
  return jnp.swapaxes(jax.lax.complex(h_re, h_im), 1, 2), decay


def _summary_kernel_takes(dim: int, order: int, block: int) -> bool:
  from kernels_pallas import cema_summary  # lazy: Pallas is optional at import time
  return cema_summary.supported(dim, order, block)


# ---------------------------------------------------------------------------------------------
# Path 3: FFT convolution with the Vandermonde kernel.
# ---------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def cema_fft(x: jax.Array, coeffs: CemaCoefficients, omega: jax.Array,
             h0: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
             return_state: bool = False):
  """y = causal_conv(x, K) + Re(sum_n eta_n q_n^(t+1) h0_n) + omega x, FFT size 2 next_pow2(L).

  Same signature as cema_sequential. Cannot reset state inside a sequence (segment_ids).
  """
  if segment_ids is not None:
    raise ValueError(
        "the FFT path cannot reset state at segment boundaries (it is one convolution over the "
        "whole sequence); use method 'blocked', 'chunked', 'associative' or 'sequential' with "
        "segment_ids")
  inp = _prepare(x, coeffs, omega, h0, None)
  length = inp.x.shape[1]
  tables = _power_tables(coeffs.q, length, extra=(length,))
  n_fft = 2 * _next_pow2(length)
  kernel = _kernel_from_tables(coeffs, tables, length)  # [D, L]
  x_f = jnp.fft.rfft(inp.x, n=n_fft, axis=1)  # [B, F, D]
  k_f = jnp.fft.rfft(kernel, n=n_fft, axis=-1).T  # [F, D]
  y = jnp.fft.irfft(x_f * k_f, n=n_fft, axis=1)[:, :length].astype(jnp.float32)
  y = y + inp.omega * inp.x
  if inp.h0 is not None:
    y = y + _state_from_tables(inp.h0, coeffs, tables, length, None)
  h_last = _final_from_tables(inp.x, coeffs, tables, inp.h0, None) if return_state else None
  return _finish(y, h_last, return_state)


# ---------------------------------------------------------------------------------------------
# Path 4: chunked (dense inside a chunk, scan across chunks).
# ---------------------------------------------------------------------------------------------

class _ChunkOperators(NamedTuple):
  """Linear maps of one chunk of T steps (built once, shared by every chunk)."""
  toeplitz: jax.Array     # [D, T, T] float32: K[t - s] for s <= t, else 0 (input -> output)
  readout: jax.Array      # [D, N, T] complex64: eta q^(t+1) (incoming state -> output)
  into_state: jax.Array   # [D, N, T] complex64: p q^(T-1-s) (input -> state at the chunk end)
  powers: jax.Array       # [D, N, T+1] complex64: q^0 .. q^T


def _chunk_operators(coeffs: CemaCoefficients, chunk: int) -> _ChunkOperators:
  powers = cema_powers(coeffs.q, chunk + 1)
  weights = (coeffs.p * coeffs.eta)[..., None] * powers[..., :chunk]
  kernel = jnp.sum(jnp.real(weights), axis=1)  # [D, T]: K_t = Re(sum_n p eta q^t)
  lag = jnp.arange(chunk)[:, None] - jnp.arange(chunk)[None, :]
  toeplitz = jnp.where(lag >= 0, kernel[:, jnp.clip(lag, 0)], 0.0)
  return _ChunkOperators(toeplitz=toeplitz, readout=coeffs.eta[..., None] * powers[..., 1:],
                         into_state=coeffs.p[..., None] * jnp.flip(powers[..., :chunk], axis=-1),
                         powers=powers)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _masked_toeplitz(toeplitz: jax.Array, same_run: jax.Array, x: jax.Array,
                     precision) -> jax.Array:
  """sum_s K[t-s] [same run] x_s: [B, T, D] (B may fold batch and chunks together).

  toeplitz: [D, T, T]; same_run: [B, T, T] bool; x: [B, T, D]; precision: the einsum's (static).
  Rematerialised in the backward pass so the [B, D, T, T] product is not kept for every chunk.
  """
  return jnp.einsum("dts,bts,bsd->btd", toeplitz, same_run.astype(jnp.float32), x,
                    precision=precision)


def _chunk_step(ops: _ChunkOperators, coeffs: CemaCoefficients, h: jax.Array, x: jax.Array,
                last: jax.Array, run: jax.Array | None, run_before: jax.Array | None):
  """One chunk. h: [B, D, N] state before the chunk; x: [B, T, D]; last: int32 scalar, the
  chunk position whose state is returned (T-1, or the last real step of a padded final chunk);
  run: [B, T] run index (see _run_index) or None; run_before: [B] run index before the chunk.
  Returns (h at position `last`, y [B, T, D] without the omega x term).
  """
  steps = x.shape[1]
  decay = jnp.take(ops.powers, last + 1, axis=-1, mode="clip")  # q^(last + 1): [D, N]
  if run is None:
    y = jnp.einsum("dts,bsd->btd", ops.toeplitz, x, precision=_HIGHEST)
    y = y + _complex_einsum_real("bdn,dnt->btd", h, ops.readout)
    carried = decay * h
  else:
    y = _masked_toeplitz(ops.toeplitz, run[:, :, None] == run[:, None, :], x, _HIGHEST)
    continues = (run == run_before[:, None])[..., None]  # no reset in [chunk start, t]
    y = y + jnp.where(continues, _complex_einsum_real("bdn,dnt->btd", h, ops.readout), 0.0)
    last_run = jnp.take(run, last, axis=1, mode="clip")
    x = jnp.where((run == last_run[:, None])[..., None], x, 0.0)
    carried = jnp.where((last_run == run_before)[:, None, None], decay * h, jnp.zeros_like(h))
  # The state at `last` sees x_s through q^(last - s). Shifting x right by T-1-last turns that
  # into the fixed end-of-chunk operator (no per-chunk gathered operator to store for backward).
  shifted = jax.lax.dynamic_slice_in_dim(jnp.pad(x, ((0, 0), (steps, 0), (0, 0))), last + 1,
                                         steps, axis=1)
  injected = jax.lax.complex(
      jnp.einsum("dns,bsd->bdn", jnp.real(ops.into_state), shifted, precision=_HIGHEST),
      jnp.einsum("dns,bsd->bdn", jnp.imag(ops.into_state), shifted, precision=_HIGHEST))
  return carried + injected, y


class _Chunked(NamedTuple):
  inp: _Inputs
  ops: _ChunkOperators
  chunk: int            # T (at most L)
  count: int            # J = ceil(L / T)
  xs: jax.Array         # [B, J, T, D] float32, zero-padded to whole chunks


def _chunked_inputs(x, coeffs, omega, h0, segment_ids, chunk) -> _Chunked:
  """Validated inputs cut into chunks of T = min(chunk, L) steps, with the chunk operators."""
  if not _is_static_int(chunk) or chunk < 1:
    raise ValueError(f"chunk must be a static int >= 1, got {chunk!r}")
  inp = _prepare(x, coeffs, omega, h0, segment_ids)
  batch, length, dim = inp.x.shape
  chunk = min(chunk, length)
  count = -(-length // chunk)
  xs = jnp.pad(inp.x, ((0, 0), (0, count * chunk - length), (0, 0))).reshape(batch, count, chunk, dim)
  return _Chunked(inp, _chunk_operators(coeffs, chunk), chunk, count, xs)


class _ChunkRuns(NamedTuple):
  runs: jax.Array    # [B, J, T] int32 run index per step (see _run_index); padding joins the last run
  before: jax.Array  # [B, J] int32 run index just before each chunk (0 before the first)


def _chunk_runs(run: jax.Array, chunk: int, count: int) -> _ChunkRuns:
  """run: [B, L] from _run_index, cut like _chunked_inputs cuts x (T = chunk, J = count).

  A step t of chunk j continues the state entering the chunk iff runs[t] == before[j]; steps s and
  t of one chunk are connected iff runs[s] == runs[t]; the chunk holds a reset iff its last step's
  run differs from before[j].
  """
  batch, length = run.shape
  before = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), run[:, :-1]], axis=1)[:, ::chunk]
  runs = jnp.pad(run, ((0, 0), (0, count * chunk - length)), mode="edge")
  return _ChunkRuns(runs.reshape(batch, count, chunk), before)


def cema_chunked(x: jax.Array, coeffs: CemaCoefficients, omega: jax.Array,
                 h0: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
                 return_state: bool = False, chunk: int = 64):
  """Dense [T, T] Toeplitz work inside chunks of T = chunk steps, lax.scan across chunks.

  Same signature as cema_sequential plus `chunk` (a sequence shorter than `chunk` is one chunk).
  When L is not a multiple of T the input is zero-padded at the end to whole chunks, and the
  state returned by the last chunk is the state at its last REAL step (each chunk is told which
  position to report), so padding changes neither y[:, :L] nor h_L. (Simply carrying the state
  through the padded steps would keep decaying it by q per step.)
  """
  inp, ops, chunk, count, xs = _chunked_inputs(x, coeffs, omega, h0, segment_ids, chunk)
  batch, length, dim = inp.x.shape
  order = coeffs.p.shape[1]
  pad = count * chunk - length
  h = jnp.zeros((batch, dim, order), jnp.complex64) if inp.h0 is None else inp.h0
  lasts = jnp.full((count,), chunk - 1, jnp.int32).at[-1].set(chunk - 1 - pad)
  xs = jnp.moveaxis(xs, 1, 0)
  runs = befores = None
  if inp.run is not None:
    chunk_runs = _chunk_runs(inp.run, chunk, count)
    runs = jnp.moveaxis(chunk_runs.runs, 1, 0)  # [count, B, T]
    befores = jnp.moveaxis(chunk_runs.before, 1, 0)  # [count, B]

  def body(h, chunk_inputs):
    return _chunk_step(ops, coeffs, h, *chunk_inputs)

  h, ys = jax.lax.scan(body, h, (xs, lasts, runs, befores))
  y = jnp.moveaxis(ys, 0, 1).reshape(batch, count * chunk, dim)[:, :length]
  y = y + inp.omega * inp.x
  return _finish(y, h, return_state)


# ---------------------------------------------------------------------------------------------
# Path 5: blocked (path 4's chunk operators applied to every chunk at once, as matmuls).
# ---------------------------------------------------------------------------------------------
# Path 4 walks the chunks with lax.scan, so each step multiplies a [T, T] operator by one
# chunk's [T] column per channel: matrix-vector work. The operators are the same for every
# chunk, so all chunks can go through them together as one batched matmul per channel
# ([T, T] x [T, J]); only the chunk-end states need a scan, over J = L / T elements. That is
# the form tensor cores (and TPU matrix units) can run.

def _chunk_state_scan(injected: jax.Array, decay: jax.Array, h0: jax.Array | None,
                      fresh: jax.Array | None = None) -> jax.Array:
  """States entering each chunk: H_0 = h0 (or 0), H_{j+1} = decay_j H_j + injected_j.

  injected: [B, J, D, N] complex64 (chunk j's input carried to its end from a zero state);
  decay: [D, N] complex64 (q^T); fresh: [B, J] bool or None, chunks holding a reset (decay_j = 0:
  their end state does not depend on what came before). Returns [B, J, D, N] complex64.
  """
  count = injected.shape[1]
  if h0 is not None:  # h0 enters as an extra element before the first chunk
    injected = jnp.concatenate([h0[:, None], injected], axis=1)
    if fresh is not None:
      fresh = jnp.concatenate([jnp.zeros_like(fresh[:, :1]), fresh], axis=1)
  decays = jnp.broadcast_to(decay, (1,) + injected.shape[1:])
  if fresh is not None:
    decays = jnp.where(fresh[..., None, None], jnp.zeros_like(decays), decays)

  def combine(first, second):
    (a1, b1), (a2, b2) = first, second
    return a1 * a2, a2 * b1 + b2

  _, ends = jax.lax.associative_scan(combine, (decays, injected), axis=1)
  if h0 is None:
    ends = jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends], axis=1)
  return ends[:, :count]


def _blocked_toeplitz(ops: _ChunkOperators, xs: jax.Array, runs: _ChunkRuns | None,
                      precision) -> jax.Array:
  """sum_s K[t-s] x_s within each chunk, over steps of t's run only: [B, J, T, D].

  xs: [B, J, T, D]. Without runs it is one batched matmul. With runs the [T, T] operator is masked
  per chunk, which is no matmul any more: the masked [D, T, T] product goes chunk by chunk through
  lax.map (rematerialised for the backward pass). All at once, XLA:CPU formed the whole
  [B J, D, T, T] product in memory: the path took ~45 / ~95 ms fwd / fwd+bwd at B=1, L=4096,
  D=64, N=16, T=64 on a 2-core CPU, against ~4 / ~14 ms chunk by chunk.
  """
  if runs is None:
    return jnp.einsum("dts,bjsd->bjtd", ops.toeplitz, xs, precision=precision)
  batch, count, chunk, dim = xs.shape
  same_run = runs.runs[..., :, None] == runs.runs[..., None, :]  # [B, J, T, T]

  def one_chunk(inputs):
    same, x = inputs
    return _masked_toeplitz(ops.toeplitz, same[None], x[None], precision)[0]

  y = jax.lax.map(one_chunk, (same_run.reshape(batch * count, chunk, chunk),
                              xs.reshape(batch * count, chunk, dim)))
  return y.reshape(batch, count, chunk, dim)


def _blocked_injected(ops: _ChunkOperators, xs: jax.Array, runs: _ChunkRuns | None, order: int,
                      precision) -> jax.Array:
  """Each chunk's end state from a zero start: [B, J, D, N] complex64 (xs: [B, J, T, D]).

  With runs only the chunk's last run reaches its end (an earlier reset dropped the rest).
  """
  if runs is not None:
    xs = jnp.where((runs.runs == runs.runs[..., -1:])[..., None], xs, 0.0)
  # Complex operators as stacked real ones: [D, 2N, T] rows (real parts, imaginary parts).
  into = jnp.concatenate([jnp.real(ops.into_state), jnp.imag(ops.into_state)], axis=1)
  injected = jnp.einsum("dks,bjsd->bjdk", into, xs, precision=precision)
  return jax.lax.complex(injected[..., :order], injected[..., order:])


def _blocked_readout(ops: _ChunkOperators, states: jax.Array, runs: _ChunkRuns | None,
                     precision) -> jax.Array:
  """Re(sum_n eta q^(t+1) H_j) for every step t of chunk j: [B, J, T, D] float32.

  states: [B, J, D, N] complex64, the states entering the chunks. With runs the entering state
  reaches only the steps before the chunk's first reset.
  """
  readout = jnp.concatenate([jnp.real(ops.readout), -jnp.imag(ops.readout)], axis=1)
  stacked = jnp.concatenate([jnp.real(states), jnp.imag(states)], axis=-1)
  y = jnp.einsum("dkt,bjdk->bjtd", readout, stacked, precision=precision)
  if runs is not None:
    y = jnp.where((runs.runs == runs.before[..., None])[..., None], y, 0.0)
  return y


def cema_blocked(x: jax.Array, coeffs: CemaCoefficients, omega: jax.Array,
                 h0: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
                 return_state: bool = False, chunk: int = 64,
                 precision=_HIGHEST):
  """CEMA with every chunk at once: y = Toeplitz(K) x within chunks plus the incoming state.

  Same signature as cema_sequential plus `chunk` (T) and `precision` (the matmuls' precision or
  dot algorithm; HIGHEST keeps float32). x: [B, L, D]; L is zero-padded to whole chunks (the
  Toeplitz maps are causal, so padding changes no real step; the final state is taken in closed
  form). With segment_ids the Toeplitz operator is masked to same-run steps (a loop over the
  chunks, see _blocked_toeplitz), the into-state operator sees only each chunk's last run, the
  entering state reaches only the steps before a chunk's first reset, and a chunk holding a reset
  has decay 0 in the scan over chunk-end states.
  """
  inp, ops, chunk, count, xs = _chunked_inputs(x, coeffs, omega, h0, segment_ids, chunk)
  batch, length, dim = inp.x.shape
  order = coeffs.p.shape[1]
  runs = None if inp.run is None else _chunk_runs(inp.run, chunk, count)
  fresh = None if runs is None else runs.runs[..., -1] != runs.before  # [B, J]
  y = _blocked_toeplitz(ops, xs, runs, precision)
  injected = _blocked_injected(ops, xs, runs, order, precision)
  states = _chunk_state_scan(injected, ops.powers[..., chunk], inp.h0, fresh)
  y = y + _blocked_readout(ops, states, runs, precision)
  y = y.reshape(batch, count * chunk, dim)[:, :length] + inp.omega * inp.x
  h_last = cema_final_state(inp.x, coeffs, inp.h0, segment_ids) if return_state else None
  return _finish(y, h_last, return_state)


# ---------------------------------------------------------------------------------------------
# Dispatcher.
# ---------------------------------------------------------------------------------------------

def cema(x: jax.Array, coeffs: CemaCoefficients, omega: jax.Array, h0: jax.Array | None = None,
         *, method: str = "chunked", segment_ids: jax.Array | None = None,
         return_state: bool = False, chunk: int = 64):
  """CEMA by one of METHODS; all give the same y [B, L, D] float32 (and h_L when return_state)."""
  kwargs = dict(segment_ids=segment_ids, return_state=return_state)
  if method == "sequential":
    return cema_sequential(x, coeffs, omega, h0, **kwargs)
  if method == "associative":
    return cema_associative(x, coeffs, omega, h0, **kwargs)
  if method == "fft":
    return cema_fft(x, coeffs, omega, h0, **kwargs)
  if method == "chunked":
    return cema_chunked(x, coeffs, omega, h0, chunk=chunk, **kwargs)
  if method == "blocked":
    return cema_blocked(x, coeffs, omega, h0, chunk=chunk, **kwargs)
  if method == "pallas":
    from kernels_pallas import cema as cema_kernels  # lazy: Pallas is optional at import time
    return cema_kernels.cema_pallas(x, coeffs, omega, h0, **kwargs)
  raise ValueError(f"unknown CEMA method {method!r}; valid methods: {', '.join(METHODS)}")
