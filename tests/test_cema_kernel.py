"""CEMA Pallas kernels (interpret mode) against a float64 numpy recurrence and the lax.scan reference.

Shapes are tiny and deliberately odd: L is not a multiple of the time tile, D not a multiple of
the channel block, and N is split over lanes.  Each kernel configuration is compiled once (values
and all gradients from one jitted value_and_grad) and shared by the tests of that case.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import cema as K
from megalodon_jax.ops.cema import CemaCoefficients, cema_coefficients

B, L, D, N = 2, 21, 6, 8
# Tiny tiles so the tails are exercised: 21 = 5 * 4 + 1 steps, 6 = 4 + 2 channels.
SMALL = K.CemaKernelConfig(block_d=4, block_t=4, split=2, num_chunks=1, param_block_d=2,
                           param_split=4, num_warps=1)
# XLA's CPU backend at -O0 compiles the interpreted kernels about twice as fast.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Independent float64 numpy model.
# ----------------------------------------------------------------------------------------------

def np_coefficients(alpha, delta, theta, gamma):
  """SPEC §2 coefficient formulas in float64."""
  sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
  dim, ndim = gamma.shape[:2]
  p = sig(alpha.reshape(dim, ndim))
  phi = sig(theta.reshape(dim, 1)) * 2 * math.pi / ndim
  q = (1 - p * sig(delta.reshape(dim, ndim))) * np.exp(1j * phi * np.arange(1, ndim + 1))
  eta = (gamma[..., 0] + 1j * gamma[..., 1]) / math.sqrt(ndim)
  return p, q, eta


def np_keep(segment_ids, batch, length):
  if segment_ids is None:
    return np.ones((batch, length))
  seg = np.asarray(segment_ids)
  keep = np.ones((batch, length))
  keep[:, 1:] = seg[:, 1:] == seg[:, :-1]
  return keep


def np_cema(x, p, q, eta, omega, h0, keep):
  """Sequential recurrence in float64 / complex128: y [B, L, D], h_last [B, D, N]."""
  batch, length, dim = x.shape
  h = np.zeros((batch, dim, p.shape[1]), np.complex128) if h0 is None else h0.astype(np.complex128)
  y = np.zeros((batch, length, dim))
  for t in range(length):
    h = keep[:, t, None, None] * q * h + p * x[:, t, :, None]
    y[:, t] = np.real(np.sum(eta * h, axis=-1)) + omega * x[:, t]
  return y, h


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ----------------------------------------------------------------------------------------------
# Cases: inputs, one compiled value_and_grad per case.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  use_h0: bool
  use_segments: bool
  x_dtype: str = "float32"
  config: K.CemaKernelConfig = SMALL
  platform: str = "gpu"


CASES = {
    "plain": Case("plain", use_h0=False, use_segments=False),
    "h0_segments": Case("h0_segments", use_h0=True, use_segments=True),
    "chunked_bf16": Case("chunked_bf16", use_h0=True, use_segments=True, x_dtype="bfloat16",
                         config=dataclasses.replace(SMALL, num_chunks=3)),
    # The Mosaic (TPU) kernel family, interpreted: 21 = 2 * 8 + 5 steps, 6 = 4 + 2 channels.
    "tpu_h0_segments": Case("tpu_h0_segments", use_h0=True, use_segments=True, platform="tpu",
                            config=dataclasses.replace(SMALL, tpu_block_d=4, tpu_block_t=8)),
}

PARAM_NAMES = ("x", "alpha", "delta", "theta", "gamma", "omega", "h0")


def make_inputs(case: Case, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  if case.x_dtype == "bfloat16":
    # Values exactly representable in bfloat16, so float64 sees the same input.
    x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  inputs = {
      "x": x,
      "alpha": rng.normal(0, 0.5, (D, N, 1)).astype(np.float32),
      "delta": rng.normal(0, 0.5, (D, N, 1)).astype(np.float32),
      "theta": rng.normal(0, 1.0, (D, 1, 1)).astype(np.float32),
      "gamma": rng.normal(0, 1.0, (D, N, 2)).astype(np.float32),
      "omega": rng.normal(0, 0.5, (D, 1)).astype(np.float32),
      "h0": (rng.normal(size=(B, D, N)) + 1j * rng.normal(size=(B, D, N))).astype(np.complex64)
            if case.use_h0 else None,
      "segment_ids": np.cumsum(rng.random((B, L)) < 0.15, axis=1).astype(np.int32)
                     if case.use_segments else None,
      "w_y": rng.normal(size=(B, L, D)).astype(np.float32),
      "w_h": (rng.normal(size=(B, D, N)) + 1j * rng.normal(size=(B, D, N))).astype(np.complex64),
  }
  if case.use_segments:
    inputs["segment_ids"][0, 1] = inputs["segment_ids"][0, 0] + 1  # a reset at t = 1 for sure
    inputs["segment_ids"][0, 2:] += 1
  return inputs


def jax_loss(fn, case: Case, inputs: dict):
  """Loss(params) = sum(w_y * y) + Re sum(w_h * h_last), returning (loss, (y, h_last))."""
  x_dtype = jnp.dtype(case.x_dtype)

  def loss(params):
    coeffs = cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
    y, h_last = fn(params["x"].astype(x_dtype), coeffs, params["omega"], params.get("h0"),
                   segment_ids=inputs["segment_ids"], return_state=True)
    total = jnp.sum(inputs["w_y"] * y) + jnp.sum(jnp.real(inputs["w_h"] * h_last))
    return total, (y, h_last)

  return loss


def params_of(inputs: dict) -> dict:
  names = [n for n in PARAM_NAMES if inputs.get(n) is not None]
  return {n: jnp.asarray(inputs[n]) for n in names}


@functools.lru_cache(maxsize=None)
def run_case(name: str, which: str):
  """(loss, y, h_last, grads) of the kernel ("kernel") or the reference ("reference")."""
  case = CASES[name]
  inputs = make_inputs(case)
  if which == "kernel":
    fn = functools.partial(K.cema_pallas, interpret=True, config=case.config,
                           platform=case.platform)
  else:
    fn = K.cema_reference
  grad_fn = jax.value_and_grad(jax_loss(fn, case, inputs), has_aux=True)
  params = params_of(inputs)
  compiled = jax.jit(grad_fn).lower(params).compile(compiler_options=_FAST_COMPILE)
  (loss, (y, h_last)), grads = compiled(params)
  grads = {k: np.asarray(v.astype(jnp.complex64) if jnp.iscomplexobj(v) else v.astype(jnp.float32))
           for k, v in grads.items()}
  return float(loss), np.asarray(y), np.asarray(h_last), grads


def np_loss(inputs: dict, params: dict) -> float:
  p, q, eta = np_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
  keep = np_keep(inputs["segment_ids"], B, L)
  y, h_last = np_cema(params["x"], p, q, eta, params["omega"].reshape(-1), params.get("h0"), keep)
  return float(np.sum(inputs["w_y"] * y) + np.sum(np.real(inputs["w_h"] * h_last)))


def directional_fd(inputs: dict, direction: dict, eps: float = 1e-5) -> float:
  """Central finite difference of the float64 loss along `direction`."""
  base = {n: np.asarray(v, np.complex128 if np.iscomplexobj(v) else np.float64)
          for n, v in params_of(inputs).items()}
  plus = {n: v + eps * direction.get(n, 0) for n, v in base.items()}
  minus = {n: v - eps * direction.get(n, 0) for n, v in base.items()}
  return (np_loss(inputs, plus) - np_loss(inputs, minus)) / (2 * eps)


def grad_dot(grads: dict, direction: dict) -> float:
  """First-order change of the loss along direction from JAX cotangents (Re(ct * v))."""
  return float(sum(np.sum(np.real(grads[n].astype(np.complex128) * direction[n]))
                   for n in direction))


# ----------------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------------

def test_reference_matches_float64():
  case = CASES["h0_segments"]
  inputs = make_inputs(case, seed=3)
  coeffs = cema_coefficients(*(jnp.asarray(inputs[n]) for n in ("alpha", "delta", "theta", "gamma")))
  y, h_last = K.cema_reference(jnp.asarray(inputs["x"]), coeffs, jnp.asarray(inputs["omega"]),
                               jnp.asarray(inputs["h0"]), segment_ids=inputs["segment_ids"],
                               return_state=True)
  p, q, eta = np_coefficients(inputs["alpha"], inputs["delta"], inputs["theta"], inputs["gamma"])
  y64, h64 = np_cema(inputs["x"].astype(np.float64), p, q, eta, inputs["omega"].reshape(-1),
                     inputs["h0"], np_keep(inputs["segment_ids"], B, L))
  assert rel_err(y, y64) < RTOL
  assert rel_err(h_last, h64) < RTOL


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_values_match_float64(name):
  case = CASES[name]
  inputs = make_inputs(case)
  _, y, h_last, _ = run_case(name, "kernel")
  p, q, eta = np_coefficients(inputs["alpha"], inputs["delta"], inputs["theta"], inputs["gamma"])
  y64, h64 = np_cema(inputs["x"].astype(np.float64), p, q, eta, inputs["omega"].reshape(-1),
                     inputs["h0"], np_keep(inputs["segment_ids"], B, L))
  assert y.dtype == np.float32 and y.shape == (B, L, D)
  assert h_last.dtype == np.complex64 and h_last.shape == (B, D, N)
  assert rel_err(y, y64) < RTOL
  assert rel_err(h_last, h64) < RTOL


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_grads_match_reference(name):
  loss_k, y_k, h_k, grads_k = run_case(name, "kernel")
  loss_r, y_r, h_r, grads_r = run_case(name, "reference")
  assert rel_err(y_k, y_r) < RTOL and rel_err(h_k, h_r) < RTOL
  assert abs(loss_k - loss_r) <= RTOL * abs(loss_r)
  assert set(grads_k) == set(grads_r)
  for param in grads_r:
    assert grads_k[param].dtype == grads_r[param].dtype, param
    # With bfloat16 x both sides round dx to bfloat16; allow a rounding flip.
    tol = 1e-2 if (param == "x" and CASES[name].x_dtype == "bfloat16") else RTOL
    assert rel_err(grads_k[param], grads_r[param]) < tol, param


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_grads_match_float64_finite_differences(name):
  case = CASES[name]
  inputs = make_inputs(case)
  _, _, _, grads = run_case(name, "kernel")
  rng = np.random.default_rng(7)
  for param in grads:
    shape = np.shape(inputs[param])
    direction = rng.normal(size=shape)
    if np.iscomplexobj(inputs[param]):
      direction = direction + 1j * rng.normal(size=shape)
    if param == "x" and case.x_dtype == "bfloat16":
      continue  # the kernel's dx is rounded to bfloat16; checked against the reference instead
    expected = directional_fd(inputs, {param: direction})
    got = grad_dot(grads, {param: direction})
    scale = np.sum(np.abs(grads[param]) * np.abs(direction))
    assert abs(got - expected) <= RTOL * scale, (param, got, expected)


def test_bf16_input_gradient_is_rounded_float32_gradient():
  _, _, _, grads = run_case("chunked_bf16", "kernel")
  _, _, _, grads_r = run_case("chunked_bf16", "reference")
  assert grads["x"].dtype == np.float32  # cast back to the float32 parameter by the test's astype
  assert rel_err(grads["x"], grads_r["x"]) < 1e-2  # bfloat16 rounding of dx


def test_every_step_a_new_segment_is_memoryless():
  """With a reset at every step, y_t = (sum_n p Re eta + omega) x_t for t > 0 (only t=0 sees h0)."""
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(1, 9, 4)), jnp.float32)
  coeffs = cema_coefficients(jnp.asarray(rng.normal(size=(4, 4, 1)), jnp.float32),
                             jnp.asarray(rng.normal(size=(4, 4, 1)), jnp.float32),
                             jnp.asarray(rng.normal(size=(4, 1, 1)), jnp.float32),
                             jnp.asarray(rng.normal(size=(4, 4, 2)), jnp.float32))
  omega = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(1, 4, 4)) + 1j * rng.normal(size=(1, 4, 4)), jnp.complex64)
  seg = jnp.arange(9, dtype=jnp.int32)[None]
  cfg = K.CemaKernelConfig(block_d=4, block_t=2, split=2, param_split=2, param_block_d=2)
  y = K.cema_pallas(x, coeffs, omega, h0, segment_ids=seg, interpret=True, config=cfg)
  gain = jnp.sum(coeffs.p * jnp.real(coeffs.eta), axis=-1) + omega
  np.testing.assert_allclose(y[0, 1:], gain * x[0, 1:], rtol=1e-5, atol=1e-6)
  first = jnp.sum(jnp.real(coeffs.eta * (coeffs.q * h0[0] + coeffs.p * x[0, 0, :, None])), -1)
  np.testing.assert_allclose(y[0, 0], first + omega * x[0, 0], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_helpful_errors():
  coeffs = CemaCoefficients(jnp.ones((4, 4)), jnp.full((4, 4), 0.5 + 0j, jnp.complex64),
                            jnp.ones((4, 4), jnp.complex64))
  x = jnp.ones((1, 5, 4))
  with pytest.raises(ValueError, match=r"\[batch, length, dim\]"):
    K.cema_pallas(jnp.ones((5, 4)), coeffs, jnp.ones(4))
  with pytest.raises(ValueError, match="h0 must be"):
    K.cema_pallas(x, coeffs, jnp.ones(4), jnp.zeros((1, 4, 3), jnp.complex64))
  with pytest.raises(ValueError, match="segment_ids must be"):
    K.cema_pallas(x, coeffs, jnp.ones(4), segment_ids=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="omega must be"):
    K.cema_pallas(x, coeffs, jnp.ones(3))
  with pytest.raises(TypeError, match="float32 or bfloat16"):
    K.cema_pallas(x.astype(jnp.float16), coeffs, jnp.ones(4))
  with pytest.raises(ValueError, match="must divide N"):
    K.cema_pallas(x, coeffs, jnp.ones(4), config=K.CemaKernelConfig(split=8))
  with pytest.raises(ValueError, match="power of two"):
    K.cema_pallas(x, coeffs, jnp.ones(4), block_d=3)


def test_complex_power_matches_numpy():
  q = jnp.asarray([0.9 * np.exp(0.3j), 0.5 * np.exp(-1.1j), 0.999 + 0.0j], jnp.complex64)
  for exponent in (1, 2, 7, 64, 1000):
    want = np.asarray(q, np.complex128) ** exponent
    np.testing.assert_allclose(np.asarray(K._complex_power(q, exponent)), want, rtol=2e-5, atol=1e-7)


def test_lane_layout_round_trip():
  a = jnp.arange(3 * 8, dtype=jnp.float32).reshape(3, 8)
  lanes = K._to_lanes(a, 2)
  assert lanes.shape == (4, 6)
  # n = g * split + j sits at lane d * split + j of group g.
  assert float(lanes[1, 2 * 2 + 1]) == float(a[2, 1 * 2 + 1])
  np.testing.assert_array_equal(K._from_lanes(lanes, 3, 2), a)
