"""CEMA Pallas kernels (interpret mode) against a float64 numpy recurrence and the lax.scan reference.

Shapes are tiny and deliberately odd: L is not a multiple of the time tile or of the time chunk,
D not a multiple of the channel block, and N is split over lanes.  Segment resets fall inside
chunks, on chunk boundaries and right after them.  Each kernel configuration is compiled once
(values and all gradients from one jitted value_and_grad) and shared by the tests of that case.
The Triton lowering of the GPU kernels at the preset shape is checked with jax.export (no GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax

from kernels_pallas import cema as K
from megalodon_jax.ops.cema import CemaCoefficients, cema_coefficients

B, L, D, N = 2, 21, 6, 8
# Tiny tiles so the tails are exercised: 21 = 10 * 2 + 1 steps, 6 = 4 + 2 channels; the backward
# splits the orders over other lanes (N / 4 per lane instead of N / 2) than the forward.
# The XLA combine over chunks (pallas_combine=False) is the base here; the *_pallas_combine cases
# below run the default Pallas combine and totals kernels against it.
SMALL = K.CemaKernelConfig(block_d=4, block_t=2, split=2, num_chunks=1, bwd_block_d=4,
                           bwd_split=4, num_warps=1, bwd_num_warps=1, pallas_combine=False)
# Three chunks of 8, 8 and 5 steps (the last one two tiles and a remainder step).
CHUNKED = dataclasses.replace(SMALL, num_chunks=3)
CHUNK = 8
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
  # The loss reads h_last (a cotangent G for the final state); without it the backward sees a
  # symbolic zero and runs the kernel without the g part of the adjoint.
  use_state: bool = True


CASES = {
    # The training path: chunked, no segments, no h0, only y differentiated.
    "chunked": Case("chunked", use_h0=False, use_segments=False, config=CHUNKED, use_state=False),
    "chunked_h0_segments": Case("chunked_h0_segments", use_h0=True, use_segments=True,
                                config=CHUNKED),
    # The backward's chunk summaries in the forward's tiling (N / 2 orders per lane, where the
    # backward scan has N / 4).
    "chunked_segments_bwd_summary_tiling": Case(
        "chunked_segments_bwd_summary_tiling", use_h0=False, use_segments=True,
        config=dataclasses.replace(CHUNKED, bwd_summary_tiling="forward")),
    # One chunk, bf16 input, and every tile through the reset-multiply steps.
    "one_chunk_bf16": Case("one_chunk_bf16", use_h0=True, use_segments=True, x_dtype="bfloat16",
                           config=dataclasses.replace(SMALL, reset_branch=False)),
    # Blocked chunk summaries (CemaKernelConfig.summary_block): tiles of 4 steps as 1 block of 4
    # or (next case) 2 blocks of 2; the last chunk of 5 steps ends with a step-by-step
    # remainder.  With segments, tiles with a reset run step by step, clean ones blocked.  This
    # case also sums each step's orders in one chain (sum_chains=1).
    "chunked_summary_block4": Case("chunked_summary_block4", use_h0=False, use_segments=False,
                                   config=dataclasses.replace(CHUNKED, block_t=4,
                                                              summary_block=4, sum_chains=1),
                                   use_state=False),
    "chunked_h0_segments_summary_block2_split4": Case(
        "chunked_h0_segments_summary_block2_split4", use_h0=True, use_segments=True,
        config=dataclasses.replace(CHUNKED, block_t=4, summary_block=2, summary_split=4)),
    # CemaKernelConfig.pallas_combine: every chunk's starting state (forward s, backward u and,
    # with h_last differentiated, g) from one small Pallas kernel instead of XLA loops. The
    # training path; then resets, h0 and g, whose walk starts across the shorter last chunk (5
    # steps, its own decay); then summaries on other lanes than both scans (1 per channel, where
    # the forward has 2 and the backward 4); then equal chunks of 7 steps (one decay for g).
    "chunked_pallas_combine": Case("chunked_pallas_combine", use_h0=False, use_segments=False,
                                   config=dataclasses.replace(CHUNKED, pallas_combine=True),
                                   use_state=False),
    "chunked_h0_segments_pallas_combine": Case(
        "chunked_h0_segments_pallas_combine", use_h0=True, use_segments=True,
        config=dataclasses.replace(CHUNKED, pallas_combine=True)),
    "chunked_segments_pallas_combine_summary_split1": Case(
        "chunked_segments_pallas_combine_summary_split1", use_h0=False, use_segments=True,
        config=dataclasses.replace(CHUNKED, summary_split=1, pallas_combine=True)),
    "equal_chunks_h0_pallas_combine": Case(
        "equal_chunks_h0_pallas_combine", use_h0=True, use_segments=False,
        config=dataclasses.replace(SMALL, block_t=1, num_chunks=3, pallas_combine=True)),
    # One chunk: no combine, but the backward's totals kernel still reduces the scan's outputs
    # (no lagged walk; the firsts for h0 and g).
    "one_chunk_bf16_pallas_combine": Case(
        "one_chunk_bf16_pallas_combine", use_h0=True, use_segments=True, x_dtype="bfloat16",
        config=dataclasses.replace(SMALL, reset_branch=False, pallas_combine=True)),
    # CemaKernelConfig.fwd_pairs: the forward scan two steps at a time in reset-free tiles of 4
    # (tiles with a reset, and the last chunk's fifth step, step by step), with resets and h0; then
    # the training path with one lane per channel and one sum chain.
    "chunked_h0_segments_fwd_pairs": Case(
        "chunked_h0_segments_fwd_pairs", use_h0=True, use_segments=True,
        config=dataclasses.replace(CHUNKED, block_t=4, fwd_pairs=True)),
    "chunked_fwd_pairs_split1": Case(
        "chunked_fwd_pairs_split1", use_h0=False, use_segments=False, use_state=False,
        config=dataclasses.replace(CHUNKED, fwd_pairs=True, split=1, sum_chains=1, pallas_combine=True)),
    # CemaKernelConfig.bwd_pairs: the backward scan two steps at a time in reset-free tiles of 4,
    # with resets, h0 and the shorter last chunk's odd remainder step (tiles with a reset and the
    # remainder step by step, carrying u' halved); then the training path (Pallas combine and
    # totals, 2 lanes a channel); then a loss that reads h_last, whose g part turns the pairs off.
    "chunked_h0_segments_bwd_pairs": Case(
        "chunked_h0_segments_bwd_pairs", use_h0=True, use_segments=True, use_state=False,
        config=dataclasses.replace(CHUNKED, block_t=4, bwd_pairs=True)),
    "chunked_bwd_pairs_split2": Case(
        "chunked_bwd_pairs_split2", use_h0=False, use_segments=False, use_state=False,
        config=dataclasses.replace(CHUNKED, bwd_pairs=True, bwd_split=2, sum_chains=2,
                                   pallas_combine=True)),
    "chunked_h0_bwd_pairs_with_g": Case(
        "chunked_h0_bwd_pairs_with_g", use_h0=True, use_segments=False,
        config=dataclasses.replace(CHUNKED, bwd_pairs=True, pallas_combine=True)),
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
    inputs["segment_ids"] = segments_with_resets_at(inputs["segment_ids"], {0: (1, CHUNK, 2 * CHUNK + 1),
                                                                           1: (CHUNK + 1, 2 * CHUNK)})
  return inputs


def segments_with_resets_at(seg: np.ndarray, resets: dict) -> np.ndarray:
  """Adds a reset (new id from there on) at the given steps of each row: t = 1, the first step of
  a chunk (its incoming state is dropped) and the step after a chunk start."""
  seg = seg.copy()
  for row, steps in resets.items():
    for t in steps:
      seg[row, t:] += 1
  return seg


def jax_loss(fn, case: Case, inputs: dict):
  """Loss(params) = sum(w_y * y) + Re sum(w_h * h_last), returning (loss, (y, h_last))."""
  x_dtype = jnp.dtype(case.x_dtype)

  def loss(params):
    coeffs = cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
    y, h_last = fn(params["x"].astype(x_dtype), coeffs, params["omega"], params.get("h0"),
                   segment_ids=inputs["segment_ids"], return_state=True)
    total = jnp.sum(inputs["w_y"] * y)
    if case.use_state:
      total = total + jnp.sum(jnp.real(inputs["w_h"] * h_last))
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


def np_loss(case: Case, inputs: dict, params: dict) -> float:
  p, q, eta = np_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
  keep = np_keep(inputs["segment_ids"], B, L)
  y, h_last = np_cema(params["x"], p, q, eta, params["omega"].reshape(-1), params.get("h0"), keep)
  total = np.sum(inputs["w_y"] * y)
  if case.use_state:
    total = total + np.sum(np.real(inputs["w_h"] * h_last))
  return float(total)


def directional_fd(case: Case, inputs: dict, direction: dict, eps: float = 1e-5) -> float:
  """Central finite difference of the float64 loss along `direction`."""
  base = {n: np.asarray(v, np.complex128 if np.iscomplexobj(v) else np.float64)
          for n, v in params_of(inputs).items()}
  plus = {n: v + eps * direction.get(n, 0) for n, v in base.items()}
  minus = {n: v - eps * direction.get(n, 0) for n, v in base.items()}
  return (np_loss(case, inputs, plus) - np_loss(case, inputs, minus)) / (2 * eps)


def grad_dot(grads: dict, direction: dict) -> float:
  """First-order change of the loss along direction from JAX cotangents (Re(ct * v))."""
  return float(sum(np.sum(np.real(grads[n].astype(np.complex128) * direction[n]))
                   for n in direction))


# ----------------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------------

def test_reference_matches_float64():
  case = CASES["chunked_h0_segments"]
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
    expected = directional_fd(case, inputs, {param: direction})
    got = grad_dot(grads, {param: direction})
    scale = np.sum(np.abs(grads[param]) * np.abs(direction))
    assert abs(got - expected) <= RTOL * scale, (param, got, expected)


@pytest.mark.parametrize("name", ["chunked", "chunked_h0_segments", "one_chunk_bf16"])
def test_pallas_combine_matches_the_xla_combine(name):
  """The combine and totals kernels run the XLA loops' float32 operations per chunk step in
  the same order (sums over chunks and batch in their own order): values, final state and every
  gradient agree to a few float32 roundings."""
  _, y, h_last, grads = run_case(name, "kernel")
  _, y_c, h_c, grads_c = run_case(name + "_pallas_combine", "kernel")
  assert rel_err(y_c, y) < 1e-6 and rel_err(h_c, h_last) < 1e-6
  for param in grads:
    assert rel_err(grads_c[param], grads[param]) < 1e-6, param


def test_pallas_combine_on_the_chunk_plan():
  """The combine kernel alone against the XLA loops it replaces, on one chunk plan: forward (h0,
  flags) and reverse (zero start; g start with the last chunk's own decay), summaries and states
  on different lanes per channel. The summaries hold the walked chunks only (0 .. C - 2 forward,
  1 .. C - 1 in reverse), so a wrong slot would read another chunk's."""
  rng = np.random.default_rng(5)
  batch, count, dim, ndim = 2, 5, 6, 8
  cplx = lambda *shape: jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape),  # noqa: E731
                                    jnp.complex64)
  local, start = cplx(batch, count, dim, ndim), cplx(batch, dim, ndim)
  decay, first = 0.9 * cplx(dim, ndim) / 2, 0.9 * cplx(dim, ndim) / 2
  flags = jnp.asarray(rng.random((batch, count)) < 0.7, jnp.float32)
  natural = lambda planes, split: K._from_lanes(lax.complex(*planes), dim, split)  # noqa: E731
  for s_in, s_out in ((2, 2), (4, 1), (1, 8)):
    planes = K._lane_planes(local[:, :-1], s_in)
    got = natural(K._combine_states(planes, s_in, decay, flags, start, s_out, batch=batch,
                                    count=count, reverse=False, interpret=True, block=16), s_out)
    want, cur = [start], start
    for c in range(count - 1):
      cur = K._times(flags, c, decay * cur) + local[:, c]
      want.append(cur)
    np.testing.assert_allclose(got, jnp.stack(want, 1), rtol=1e-6, atol=1e-6)
    planes = K._lane_planes(local[:, 1:], s_in)
    got = natural(K._combine_states(planes, s_in, decay, flags, None, s_out, batch=batch,
                                    count=count, reverse=True, interpret=True), s_out)
    want, cur = [jnp.zeros_like(start)], None
    for c in range(count - 1, 0, -1):
      cur = local[:, c] if cur is None else K._times(flags, c, decay * cur) + local[:, c]
      want.insert(0, cur)
    np.testing.assert_allclose(got, jnp.stack(want, 1), rtol=1e-6, atol=1e-6)
    got = natural(K._combine_states(None, s_in, decay, flags, start, s_out, batch=batch,
                                    count=count, reverse=True, interpret=True, first_decay=first),
                  s_out)
    want, cur = [start], start
    for c in range(count - 1, 0, -1):
      cur = K._times(flags, c, (first if c == count - 1 else decay) * cur)
      want.insert(0, cur)
    np.testing.assert_allclose(got, jnp.stack(want, 1), rtol=1e-6, atol=1e-6)


def _backward_totals_xla(out, local, decay, q, flags, *, dim, split, has_g):
  """The XLA code the totals kernel replaces (_gpu_backward without pallas_combine), per batch:
  sums over chunks, the lagged walk from the last chunk with its correction, the firsts."""
  nat = lambda re, im: K._from_lanes(lax.complex(out[re], out[im]), dim, split)  # noqa: E731
  count = out["are"].shape[1]

  def lagged(kernel_final):
    values = [None] * count
    values[-1] = jnp.zeros_like(kernel_final[:, 0])
    for c in range(count - 1, 0, -1):
      values[c - 1] = K._times(flags.bwd, c, decay * values[c]) + kernel_final[:, c]
    if count == 1:
      return kernel_final[:, 0], 0.0
    final = K._times(flags.bwd, 0, decay * values[0]) + kernel_final[:, 0]
    correction = 0.0
    for c in range(count):
      correction = correction + K._times(flags.after, c, values[c]) * local[:, c]
    return final, correction

  v_final, v_corr = lagged(nat("vre", "vim"))
  want = {"acc_a": jnp.sum(nat("are", "aim"), axis=(0, 1)),
          "acc_b": jnp.sum(jnp.sum(nat("bre", "bim"), axis=1) + q * v_corr, axis=0),
          "ct_omega": jnp.sum(out["ctom"], axis=(0, 1)).reshape(dim, split)[:, 0],
          "u_first": nat("ure", "uim")[:, 0], "v_final": v_final}
  if has_g:
    f_final, f_corr = lagged(nat("fgre", "fgim"))
    want.update(acc_bg=jnp.sum(jnp.sum(nat("bgre", "bgim"), axis=1) + f_corr, axis=0),
                pg=jnp.sum(K._from_lanes(out["pg"], dim, split), axis=(0, 1)),
                q_g_first=nat("egre", "egim")[:, 0], f_final=f_final)
  return want


@pytest.mark.parametrize("count", [5, 1])
def test_backward_totals_on_the_chunk_plan(count):
  """The totals kernel alone against the XLA code it replaces: every total and first, with and
  without resets and the g part, the forward's chunk-local states on other lanes per channel
  than the scan's planes, a partial last block of entries (48 = 32 + 16) and one chunk (no walk).
  The kernel gets the forward's summaries of chunks 0 .. C - 2 only; the XLA code, all C (the
  last one times the zero lagged sum entering it)."""
  rng = np.random.default_rng(9)
  batch, dim, ndim = 2, 6, 8
  cplx = lambda *shape: jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape),  # noqa: E731
                                    jnp.complex64)
  local, decay, q = cplx(batch, count, dim, ndim), 0.45 * cplx(dim, ndim), 0.45 * cplx(dim, ndim)
  keep = jnp.asarray(rng.random((batch, 8 * count)) < 0.8, jnp.float32)
  plan = K._Plan(8, count, 8)
  for split, local_split in ((2, 4), (4, 1)):
    planes = lambda: jnp.asarray(rng.normal(size=(batch, count, ndim // split, dim * split)),  # noqa: E731
                                 jnp.float32)
    out = {n: planes() for n in ("ure", "uim", "vre", "vim", "are", "aim", "bre", "bim", "egre",
                                 "egim", "fgre", "fgim", "pg", "bgre", "bgim")}
    out["ctom"] = jnp.asarray(rng.normal(size=(batch, count, dim * split)), jnp.float32)
    for flags in (K._chunk_flags(keep, plan), K._chunk_flags(None, plan)):
      for has_g in (False, True):
        want = _backward_totals_xla(out, local, decay, q, flags, dim=dim, split=split,
                                    has_g=has_g)
        got = K._backward_totals(out, K._lane_planes(local[:, :-1], local_split) if count > 1 else None,
                                 local_split, decay if count > 1 else None, q, flags,
                                 batch=batch, count=count, dim=dim, split=split, has_g=has_g,
                                 has_h0=True, interpret=True, block=32, prefetch=2)
        assert set(got) == set(want)
        for key in want:
          np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-5, err_msg=key)
        # Without h0 only the batch totals leave.
        lean = K._backward_totals(out, K._lane_planes(local[:, :-1], local_split) if count > 1 else None,
                                  local_split, decay if count > 1 else None, q, flags,
                                  batch=batch, count=count, dim=dim, split=split, has_g=has_g,
                                  has_h0=False, interpret=True)
        assert not {"u_first", "v_final", "q_g_first", "f_final"} & set(lean)
        for key in lean:
          np.testing.assert_allclose(lean[key], want[key], rtol=1e-6, atol=1e-5, err_msg=key)


def test_summaries_skip_the_chunk_no_combine_reads():
  """The chunk-summary kernels run over C - 1 chunks: the forward's skip the last chunk, the
  backward's the first (_summary_chunks). Each kept chunk's summary equals, bit for bit, the one
  of a launch over every chunk, with segment resets, B = 3, a shorter last chunk (8 + 8 + 8 + 3
  steps), step by step and in blocks."""
  rng = np.random.default_rng(23)
  batch, length, dim, ndim = 3, 27, 6, 4
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  keep = jnp.asarray(np_keep(segments_with_resets_at(np.zeros((batch, length), np.int32),
                                                     {0: (1, 8, 17), 2: (9, 24)}), batch, length), jnp.float32)
  mags = rng.uniform(0.5, 0.95, (dim, ndim))
  q = jnp.asarray(mags * np.exp(1j * rng.uniform(-np.pi, np.pi, (dim, ndim))), jnp.complex64)
  for summary_block in (0, 2):
    cfg = dataclasses.replace(CHUNKED, block_t=4, num_chunks=4, summary_block=summary_block)
    plan = K._plan(length, cfg)
    assert plan == K._Plan(8, 4, 3)
    for reverse, first in ((False, 0), (True, 1)):
      assert K._summary_chunks(plan, reverse) == (first, 3)
      flags = K._reverse_keep(keep) if reverse else keep
      args = dict(reverse=reverse, split=2, block_d=2, num_warps=1, interpret=True, name="summaries")
      every = K._chunk_summaries(x, flags, q, cfg, plan, all_chunks=True, **args)
      kept = K._chunk_summaries(x, flags, q, cfg, plan, **args)
      assert every.shape[1] == 4 and kept.shape[1] == 3
      np.testing.assert_array_equal(np.asarray(kept), np.asarray(every[:, first:first + 3]))
  assert K._summary_chunks(K._Plan(21, 1, 21), True) == (0, 1)


@pytest.mark.parametrize("pallas_combine", [True, False])
def test_skipped_summaries_keep_values_and_gradients(monkeypatch, pallas_combine):
  """End to end with the summaries of C - 1 chunks: h0, segment resets (one on a chunk's first
  step), the g part (the loss reads h_last), B = 3 and four chunks of 8, 8, 8 and 3 steps. y,
  h_last and every gradient match the lax.scan reference; both summary launches cover 3 chunks."""
  rng = np.random.default_rng(29)
  batch, length, dim, ndim = 3, 27, 6, 4
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  p = jnp.asarray(rng.uniform(0.1, 1.0, (dim, ndim)), jnp.float32)
  q = jnp.asarray(rng.uniform(0.5, 0.95, (dim, ndim)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (dim, ndim))),
                  jnp.complex64)
  eta = jnp.asarray(rng.normal(size=(dim, ndim)) + 1j * rng.normal(size=(dim, ndim)), jnp.complex64)
  omega = jnp.asarray(rng.normal(size=dim), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(batch, dim, ndim)) + 1j * rng.normal(size=(batch, dim, ndim)), jnp.complex64)
  seg = jnp.asarray(segments_with_resets_at(np.zeros((batch, length), np.int32), {0: (1, 8, 17), 2: (9, 24)}))
  w, w_h = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((batch, length, dim), (batch, dim, ndim)))
  cfg = dataclasses.replace(CHUNKED, block_t=4, num_chunks=4, summary_block=2, pallas_combine=pallas_combine)
  chunks = []
  launch = K._launch

  def recording_launch(spec, batch, num_chunks, *args, **kwargs):
    if spec.mode == "local":
      chunks.append((spec.reverse, spec.chunk_offset, num_chunks))
    return launch(spec, batch, num_chunks, *args, **kwargs)

  monkeypatch.setattr(K, "_launch", recording_launch)

  def run(fn):
    def loss(x, p, q, eta, omega, h0):
      y, h_last = fn(x, CemaCoefficients(p, q, eta), omega, h0, segment_ids=seg, return_state=True)
      return jnp.sum(w * y) + jnp.sum(w_h * jnp.real(h_last)), (y, h_last)
    (_, aux), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(x, p, q, eta, omega, h0)
    return [np.asarray(v) for v in (*aux, *grads)]

  got = run(functools.partial(K.cema_pallas, interpret=True, config=cfg))
  assert sorted(chunks) == [(False, 0, 3), (True, 1, 3)]
  want = run(K.cema_reference)
  for name, a, b in zip(("y", "h_last", "dx", "dp", "dq", "deta", "domega", "dh0"), got, want):
    assert rel_err(a, b) < RTOL, name


def test_bf16_input_gradient_is_rounded_float32_gradient():
  _, _, _, grads = run_case("one_chunk_bf16", "kernel")
  _, _, _, grads_r = run_case("one_chunk_bf16", "reference")
  assert grads["x"].dtype == np.float32  # cast back to the float32 parameter by the test's astype
  assert rel_err(grads["x"], grads_r["x"]) < 1e-2  # bfloat16 rounding of dx


def test_every_step_a_new_segment_is_memoryless():
  """With a reset at every step, y_t = (sum_n p Re eta + omega) x_t for t > 0 (only t=0 sees h0),
  also across the three chunks (4 + 4 + 1 steps): no state crosses a chunk boundary."""
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(1, 9, 4)), jnp.float32)
  coeffs = cema_coefficients(jnp.asarray(rng.normal(size=(4, 4, 1)), jnp.float32),
                             jnp.asarray(rng.normal(size=(4, 4, 1)), jnp.float32),
                             jnp.asarray(rng.normal(size=(4, 1, 1)), jnp.float32),
                             jnp.asarray(rng.normal(size=(4, 4, 2)), jnp.float32))
  omega = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(1, 4, 4)) + 1j * rng.normal(size=(1, 4, 4)), jnp.complex64)
  seg = jnp.arange(9, dtype=jnp.int32)[None]
  cfg = K.CemaKernelConfig(block_d=4, block_t=2, split=2, bwd_split=2, bwd_block_d=2, num_chunks=3)
  run = jax.jit(lambda x, coeffs, omega, h0: K.cema_pallas(x, coeffs, omega, h0, segment_ids=seg,
                                                             interpret=True, config=cfg))
  y = run.lower(x, coeffs, omega, h0).compile(compiler_options=_FAST_COMPILE)(x, coeffs, omega, h0)
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
  with pytest.raises(ValueError, match="bwd_summary_tiling must be 'forward' or 'backward'"):
    K.cema_pallas(x, coeffs, jnp.ones(4), config=K.CemaKernelConfig(bwd_summary_tiling="fwd"))


def test_accurate_powers_match_float64():
  """Chunk decays q^chunk keep float32 accuracy for |q| near 1 and long chunks (plain complex64
  squaring drifts by ~chunk * eps there)."""
  rng = np.random.default_rng(5)
  mags = np.array([0.9999, 0.99999, 0.999, 0.9, 0.5])
  q = jnp.asarray(mags * np.exp(1j * rng.uniform(-np.pi, np.pi, mags.size)), jnp.complex64)
  exponents = (0, 1, 7, 2048, 4097, 32768)
  got = np.asarray(jax.jit(lambda q: K._accurate_powers(q, exponents)).lower(q).compile(
      compiler_options=_FAST_COMPILE)(q))
  want = np.asarray(q, np.complex128)[:, None] ** np.asarray(exponents)[None, :]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
  with pytest.raises(ValueError, match="non-negative"):
    K._accurate_powers(q, (-1,))


def test_chunk_plan_and_short_sequences():
  assert K._plan(L, CHUNKED) == K._Plan(chunk=8, count=3, last=5)
  assert K._plan(L, SMALL) == K._Plan(chunk=L, count=1, last=L)
  # Chunks are at least one tile: 9 steps hold two tiles of 4, so at most two chunks.
  tiles4 = dataclasses.replace(SMALL, block_t=4, num_chunks=3)
  assert K._plan(9, tiles4) == K._Plan(chunk=8, count=2, last=1)
  assert K._plan(3, tiles4).count == 1
  assert K._plan(32768, dataclasses.replace(SMALL, block_t=16, num_chunks=16)) == K._Plan(2048, 16, 2048)


def test_default_config_fills_the_gpu_and_falls_back_to_one_chunk():
  preset = K.default_config(1, 32768, 4096, 16).validate(16)
  programs = 4096 // preset.block_d * preset.num_chunks
  assert preset.num_chunks > 1 and programs >= K._TARGET_PROGRAMS
  assert K._plan(32768, preset).chunk >= K._MIN_CHUNK
  assert K.default_config(1, 300, 4096, 16).num_chunks == 1  # too short to cut
  assert K.default_config(16, 32768, 4096, 16).num_chunks == 1  # batch * blocks fill it already
  assert K.default_config(1, 32768, 24, 3).validate(3).bwd_split == 1  # odd N, few channels
  assert K.default_config(1, 32768, 24, 3).num_chunks == K._MAX_CHUNKS


@pytest.mark.parametrize("pallas_combine", [False, True])
def test_gpu_kernels_lower_to_triton_at_preset_shape(pallas_combine):
  """jax.export for CUDA runs the real Pallas -> Triton lowering on CPU: every pass of the value
  and gradient (chunk summaries, forward scan, backward scan with the g part and resets) at
  B=1, L=32768, D=4096, N=16 with the default configuration (and with pallas_combine: three
  combine kernels, forward s, backward u and g, and the backward's totals kernel)."""
  cfg = dataclasses.replace(K.default_config(1, 32768, 4096, 16), pallas_combine=pallas_combine)

  def value_and_grads(x, p, q, eta, omega, seg, h0, w):
    def loss(x, p, q, eta, omega, h0):
      y, h_last = K.cema_pallas(x, CemaCoefficients(p, q, eta), omega, h0, segment_ids=seg,
                                return_state=True, interpret=False, platform="gpu", config=cfg)
      return jnp.sum(w * y) + jnp.sum(jnp.real(h_last))
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))(x, p, q, eta, omega, h0)

  batch, length, dim, ndim = 1, 32768, 4096, 16
  spec = jax.ShapeDtypeStruct
  avals = (spec((batch, length, dim), jnp.bfloat16), spec((dim, ndim), jnp.float32),
           spec((dim, ndim), jnp.complex64), spec((dim, ndim), jnp.complex64),
           spec((dim,), jnp.float32), spec((batch, length), jnp.int32),
           spec((batch, dim, ndim), jnp.complex64), spec((batch, length, dim), jnp.float32))
  exported = export.export(
      jax.jit(value_and_grads), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*avals)
  text = exported.mlir_module()
  # Four scans (chunk summaries and main pass, each direction) and ONE double-float power table
  # for both passes (the summary powers q^1..q^S, the chunk decay q^chunk and, with fwd_pairs, on
  # in the default tiling, the paired forward's q^2; the backward takes it as a residual).
  assert cfg.fwd_pairs
  assert text.count("__gpu$xla.gpu.triton") == 5 + 4 * pallas_combine
  assert text.count('name = "cema_powers"') == 1
  assert text.count('name = "cema_combine"') == 3 * pallas_combine
  assert text.count('name = "cema_bwd_totals"') == pallas_combine
  for name in ("cema_fwd_chunk_states", "cema_fwd_scan", "cema_bwd_chunk_states", "cema_bwd_scan"):
    assert name in text, name
  # The multiply-adds are PTX FMAs (CemaKernelConfig.ptx_fma): XLA's Triton pipeline would
  # otherwise leave them as separate multiplies and adds, half the arithmetic rate.
  assert "fma.rn.f32" in text


def test_pallas_combine_lowers_with_resets_h0_and_a_shorter_last_chunk():
  """The three combine kernels (forward s from h0, backward u, backward g whose first carry crosses
  the 8-step last chunk of 32 + 32 + 8 with its own decay) and the backward's totals kernel lower
  for CUDA, summaries on 2 lanes per channel where the scans have 1 and 4."""
  x = jnp.zeros((2, 72, 8), jnp.float32)
  coeffs = CemaCoefficients(jnp.full((8, 4), 0.5), jnp.full((8, 4), 0.9 + 0.1j, jnp.complex64),
                            jnp.ones((8, 4), jnp.complex64))
  h0 = jnp.zeros((2, 8, 4), jnp.complex64)
  seg = jnp.zeros((2, 72), jnp.int32)
  cfg = dataclasses.replace(K.default_config(1, 72, 8, 4), block_t=16, num_chunks=4, split=1,
                            bwd_split=4, summary_split=2, pallas_combine=True)
  assert K._plan(72, cfg) == K._Plan(32, 3, 8)

  def loss(x, h0):
    y, h_last = K.cema_pallas(x, coeffs, jnp.zeros((8,)), h0, segment_ids=seg, return_state=True,
                              interpret=False, platform="gpu", config=cfg)
    return jnp.sum(y) + jnp.sum(jnp.real(h_last))
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, h0).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count('name = "cema_combine"') == 3
  assert text.count('name = "cema_bwd_totals"') == 1

  # The training path (loss on y only, no h0, no resets): the totals kernel without g or firsts,
  # and its batch loop with B = 2.
  def train_loss(x):
    return jnp.sum(K.cema_pallas(x, coeffs, jnp.zeros((8,)), interpret=False, platform="gpu",
                                 config=cfg))
  text = jax.jit(jax.grad(train_loss)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count('name = "cema_combine"') == 2
  assert text.count('name = "cema_bwd_totals"') == 1


def test_ptx_fma_off_leaves_no_inline_assembly():
  x = jnp.zeros((1, 64, 8), jnp.float32)
  coeffs = CemaCoefficients(jnp.full((8, 4), 0.5), jnp.full((8, 4), 0.9 + 0.1j, jnp.complex64),
                            jnp.ones((8, 4), jnp.complex64))
  cfg = dataclasses.replace(K.default_config(1, 64, 8, 4), ptx_fma=False)
  run = lambda x: K.cema_pallas(x, coeffs, jnp.zeros((8,)), interpret=False, platform="gpu", config=cfg)
  text = jax.jit(run).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert "xla.gpu.triton" in text and "fma.rn.f32" not in text


def test_lane_layout_round_trip():
  a = jnp.arange(3 * 8, dtype=jnp.float32).reshape(3, 8)
  lanes = K._to_lanes(a, 2)
  assert lanes.shape == (4, 6)
  # n = g * split + j sits at lane d * split + j of group g.
  assert float(lanes[1, 2 * 2 + 1]) == float(a[2, 1 * 2 + 1])
  np.testing.assert_array_equal(K._from_lanes(lanes, 3, 2), a)


def _lowered_gpu_gradient_text(cfg) -> str:
  """The CUDA lowering (on the CPU) of the kernel's value and x-gradient at a small shape."""
  x = jnp.zeros((1, 64, 8), jnp.float32)
  coeffs = CemaCoefficients(jnp.full((8, 4), 0.5), jnp.full((8, 4), 0.9 + 0.1j, jnp.complex64),
                            jnp.ones((8, 4), jnp.complex64))
  run = lambda x: jnp.sum(K.cema_pallas(x, coeffs, jnp.zeros((8,)), interpret=False,
                                        platform="gpu", config=cfg))
  return jax.jit(jax.grad(run)).trace(x).lower(lowering_platforms=("cuda",)).as_text()


def test_lane_sums_are_ptx_shuffles_only_with_one_lane_per_thread():
  """Split channels sum their lanes with shfl.sync.bfly (CemaKernelConfig.ptx_shuffle), which is
  only valid when each thread holds one lane: block_d * split == 32 * num_warps."""
  base = dataclasses.replace(K.default_config(1, 64, 8, 4), split=2, block_d=64, bwd_split=2,
                             bwd_block_d=64, num_warps=4, bwd_num_warps=4)
  assert "shfl.sync.bfly.b32" in _lowered_gpu_gradient_text(base)
  assert "shfl.sync.bfly.b32" not in _lowered_gpu_gradient_text(
      dataclasses.replace(base, ptx_shuffle=False))
  # 64 lanes on 128 threads: every lane would be held by two threads, so no shuffles.
  assert "shfl.sync.bfly.b32" not in _lowered_gpu_gradient_text(
      dataclasses.replace(base, block_d=32, bwd_block_d=32))
  assert K._use_shuffle(base, 2, 64, 4, interpret=False)
  assert not K._use_shuffle(base, 2, 64, 4, interpret=True)
  assert not K._use_shuffle(base, 1, 128, 4, interpret=False)


def test_blocked_summaries_lower_to_triton():
  """summary_block / summary_split lower for CUDA (both chunk-summary kernels get the powers)."""
  cfg = dataclasses.replace(K.default_config(1, 64, 8, 4), block_t=16, num_chunks=4,
                            summary_block=8, summary_split=2, summary_block_t=32)
  text = _lowered_gpu_gradient_text(cfg)
  # 4 scans and one power table (see the preset-shape test), besides the default's combine kernels.
  assert cfg.fwd_pairs
  combines = text.count('name = "cema_combine"') + text.count('name = "cema_bwd_totals"')
  assert combines >= 3  # forward s, backward u, the backward's totals
  assert text.count("__gpu$xla.gpu.triton") == 5 + combines
  assert text.count('name = "cema_powers"') == 1
  assert "cema_fwd_chunk_states" in text and "cema_bwd_chunk_states" in text


@pytest.mark.parametrize("summary_block_t", [0, 32])
def test_blocked_summaries_match_float64_for_slow_decay(summary_block_t):
  """Chunk summaries in blocks of 16 against a float64 recurrence, |q| close to 1 and fast
  rotations, 3 chunks of 48 steps (the last 44: two whole tiles and a 12-step remainder), in
  both directions. With summary_block_t=32 the summaries walk 32-step tiles (the scans' 16):
  one whole tile a chunk, then a 16- or 12-step remainder step by step."""
  rng = np.random.default_rng(13)
  dim, ndim, length = 4, 4, 140
  mags = 1 - 10.0 ** rng.uniform(-5, -1, (dim, ndim))
  q = mags * np.exp(1j * rng.uniform(-np.pi, np.pi, (dim, ndim)))
  x = rng.normal(size=(1, length, dim)).astype(np.float32)
  cfg = K.CemaKernelConfig(block_d=2, block_t=16, split=2, num_warps=1, num_chunks=3,
                           summary_block=16, summary_split=4,
                           summary_block_t=summary_block_t).validate(ndim)
  plan = K._plan(length, cfg)
  assert plan == K._Plan(48, 3, 44)
  for reverse in (False, True):
    got = K._chunk_summaries(jnp.asarray(x), None, jnp.asarray(q, jnp.complex64), cfg, plan,
                             reverse=reverse, split=2, block_d=2, num_warps=1, interpret=True,
                             name="summaries", all_chunks=True)
    qs = np.asarray(jnp.asarray(q, jnp.complex64), np.complex128)
    for c in range(plan.count):
      steps = range(c * plan.chunk, min((c + 1) * plan.chunk, length))
      s = np.zeros((dim, ndim), np.complex128)
      for t in (reversed(steps) if reverse else steps):
        s = qs * s + x[0, t, :, None]
      np.testing.assert_allclose(np.asarray(got[0, c]), s, rtol=0, atol=2e-5 * np.abs(s).max())


def test_summary_and_backward_tiles_change_no_value_and_reject_bad_lengths(monkeypatch):
  """summary_block_t: the whole op (values and gradients) with 32-step summary tiles equals the
  default's 16 (same blocked updates; the chunks of 24 steps end with an 8-step remainder), and
  lengths that are not a power of two, or that summary_block does not divide, are refused."""
  rng = np.random.default_rng(21)
  dim, ndim, length = 8, 4, 96
  mags = rng.uniform(0.5, 0.999, size=(dim, ndim))
  q = jnp.asarray(mags * np.exp(1j * rng.uniform(-np.pi, np.pi, mags.shape)), jnp.complex64)
  coeffs = CemaCoefficients(jnp.asarray(rng.uniform(0.1, 1.0, (dim, ndim)), jnp.float32), q,
                            jnp.asarray(rng.normal(size=(dim, ndim)) + 1j * rng.normal(size=(dim, ndim)),
                                        jnp.complex64))
  x = jnp.asarray(rng.normal(size=(1, length, dim)), jnp.float32)
  omega = jnp.asarray(rng.normal(size=(dim,)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, length, dim)), jnp.float32)
  base = dataclasses.replace(K.default_config(1, length, dim, ndim), num_chunks=4, block_t=8,
                             summary_block=4, summary_block_t=0)

  def value_and_grads(cfg):
    loss = lambda x, c: jnp.sum(w * K.cema_pallas(x, c, omega, config=cfg))  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1))(x, coeffs)

  tiles = []  # (mode, block_t) of every scan launch: the knob must reach the summary kernels only
  launch = K._launch

  def recording_launch(spec, *args, **kwargs):
    tiles.append((spec.mode, spec.block_t))
    return launch(spec, *args, **kwargs)

  monkeypatch.setattr(K, "_launch", recording_launch)
  want = value_and_grads(base)
  assert sorted(set(tiles)) == [("bwd", 8), ("fwd", 8), ("local", 8)]
  tiles.clear()
  got = value_and_grads(dataclasses.replace(base, summary_block_t=16))
  assert sorted(set(tiles)) == [("bwd", 8), ("fwd", 8), ("local", 16)]
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=2e-6 * float(np.max(np.abs(b))))
  for bad in (24, 2, -16):
    with pytest.raises(ValueError, match="summary_block_t"):
      dataclasses.replace(base, summary_block_t=bad).validate(ndim)
  # bwd_block_t reaches the backward scan alone; 16-step tiles leave the chunks of 24 an 8-step remainder.
  for bwd_block_t in (4, 16):
    tiles.clear()
    got = value_and_grads(dataclasses.replace(base, bwd_block_t=bwd_block_t))
    assert sorted(set(tiles)) == [("bwd", bwd_block_t), ("fwd", 8), ("local", 8)]
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=2e-6 * float(np.max(np.abs(b))))
  with pytest.raises(ValueError, match="bwd_block_t"):
    dataclasses.replace(base, bwd_block_t=12).validate(ndim)


def test_powers_kernel_equals_the_xla_powers_and_lowers_for_cuda():
  """The chunk powers as one Pallas kernel: the XLA reference's values (the same float32 operations;
  the interpreter does not contract them) and float64's, for a block that does not divide the lanes
  at first, and a Triton lowering at mega-scale lanes."""
  rng = np.random.default_rng(6)
  mags = rng.uniform(0.3, 0.99999, size=(3, 8))
  q = jnp.asarray(mags * np.exp(1j * rng.uniform(-np.pi, np.pi, mags.shape)), jnp.complex64)
  exponents = (0, 1, 2, 3, 4, 2048, 4097)
  got = np.asarray(K._accurate_powers_pallas(q, exponents, interpret=True, block=16))
  assert got.shape == (3, 8, len(exponents))
  np.testing.assert_allclose(got, np.asarray(K._accurate_powers(q, exponents)), rtol=2e-7, atol=1e-30)
  want = np.asarray(q, np.complex128)[..., None] ** np.asarray(exponents)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
  big = jnp.full((4096, 16), 0.999 + 0.01j, jnp.complex64)
  lowered = jax.jit(lambda a: K._accurate_powers_pallas(a, (4096,), interpret=False)).trace(big).lower(
      lowering_platforms=("cuda",))
  assert "cema_powers" in lowered.as_text()
  with pytest.raises(ValueError, match="non-negative"):
    K._accurate_powers_pallas(q, (-1,), interpret=True)
  # Through the scans: the tables' block (CemaKernelConfig.powers_block) and their XLA form change nothing.
  x = jnp.asarray(rng.normal(size=(1, 64, 8)), jnp.float32)
  coeffs = CemaCoefficients(jnp.full((8, 4), 0.5), jnp.concatenate([q, q, q[:2]])[:, :4],
                            jnp.ones((8, 4), jnp.complex64))
  cfg = dataclasses.replace(K.default_config(1, 64, 8, 4), num_chunks=4, block_t=16, summary_block=4)
  base = np.asarray(K.cema_pallas(x, coeffs, jnp.zeros((8,)), config=cfg))
  for other in (dataclasses.replace(cfg, powers_block=8), dataclasses.replace(cfg, pallas_powers=False)):
    np.testing.assert_allclose(np.asarray(K.cema_pallas(x, coeffs, jnp.zeros((8,)), config=other)), base,
                               rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="powers_block must be a power of two"):
    K.cema_pallas(x, coeffs, jnp.zeros((8,)), config=dataclasses.replace(cfg, powers_block=3))


def test_one_power_table_serves_both_passes():
  """The GPU passes' powers come from ONE table (_power_exponents): q^1..q^S first (the summary
  kernels read those rows), then q^chunk, a shorter last chunk's q^last and fwd_pairs' q^2 unless
  already there; with summary_mma on a plan of 16 equal chunks, q^1..q^16 after the summary rows.
  Every row equals, bit for bit, the power computed alone (Pallas kernel and XLA chain), so
  merging the tables changes no value; the backward lowers without a power kernel."""
  cfg = dataclasses.replace(K.default_config(1, 32768, 4096, 16), summary_block=4, fwd_pairs=True)
  assert cfg.summary_mma
  assert K._power_exponents(cfg, K._Plan(2048, 16, 2048)) == tuple(range(1, 17)) + (2048,)
  cfg = dataclasses.replace(cfg, summary_mma=False)
  assert K._power_exponents(cfg, K._Plan(2048, 16, 2048)) == (1, 2, 3, 4, 2048)
  assert K._power_exponents(cfg, K._Plan(32, 3, 8)) == (1, 2, 3, 4, 32, 8)
  assert K._power_exponents(cfg, K._Plan(32, 3, 3)) == (1, 2, 3, 4, 32)
  assert K._power_exponents(dataclasses.replace(cfg, summary_block=0), K._Plan(32, 3, 8)) == (32, 8, 2)
  assert K._power_exponents(cfg, K._Plan(300, 1, 300)) == (2,)
  assert K._power_exponents(dataclasses.replace(cfg, fwd_pairs=False), K._Plan(300, 1, 300)) == (2,)  # bwd_pairs
  assert K._power_exponents(dataclasses.replace(cfg, fwd_pairs=False, bwd_pairs=False), K._Plan(300, 1, 300)) == ()

  rng = np.random.default_rng(31)
  mags = rng.uniform(0.3, 0.99999, size=(6, 4))
  q = jnp.asarray(mags * np.exp(1j * rng.uniform(-np.pi, np.pi, mags.shape)), jnp.complex64)
  exps = (1, 2, 3, 4, 2048, 5, 4097)
  for pallas_powers in (True, False):
    small = dataclasses.replace(cfg, pallas_powers=pallas_powers, powers_block=8)
    table = jax.jit(lambda q, e=exps, c=small: K._power_table(q, e, c, True))(q)
    assert table[0].shape == (len(exps), 24)
    for i, e in enumerate(exps):
      alone = jax.jit(lambda q, e=e, c=small: K._power_table(q, (e,), c, True))(q)
      np.testing.assert_array_equal(np.asarray(table[0][i]), np.asarray(alone[0][0]), err_msg=f"re q^{e}")
      np.testing.assert_array_equal(np.asarray(table[1][i]), np.asarray(alone[1][0]), err_msg=f"im q^{e}")
      # The same values through the complex helpers the power table replaced.
      if pallas_powers:
        want = K._accurate_powers_pallas(q, (e,), interpret=True, block=8)
      else:
        want = jax.jit(lambda q, e=e: K._accurate_powers(q, (e,)))(q)
      np.testing.assert_array_equal(np.asarray(K._table_power(table, exps, e, (6, 4))), np.asarray(want)[..., 0])

  # The backward alone (g part, resets, a shorter last chunk: it needs q^S, q^chunk and q^last)
  # reads them from the forward's residual.
  x = jnp.zeros((2, 72, 8), jnp.float32)
  p, q8 = jnp.full((8, 4), 0.5), jnp.full((8, 4), 0.9 + 0.1j, jnp.complex64)
  eta, keep = jnp.ones((8, 4), jnp.complex64), jnp.ones((2, 72), jnp.float32)
  small = dataclasses.replace(K.default_config(1, 72, 8, 4), block_t=16, num_chunks=4, split=1, bwd_split=4,
                              summary_split=2, pallas_combine=True)
  assert K._plan(72, small) == K._Plan(32, 3, 8)
  for pallas_combine in (True, False):
    c = dataclasses.replace(small, pallas_combine=pallas_combine)
    _, _, res = K._gpu_forward(x, keep, p, q8, eta, jnp.zeros((8,)), None, c, True)
    assert res.powers[0].shape == (6, 32)
    g = jnp.ones((2, 8, 4), jnp.complex64)
    text = jax.jit(lambda x, res, c=c: K._gpu_backward(x, keep, p, q8, eta, jnp.zeros((8,)), None, x, g, res, c,
                                                       False)).trace(x, res).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "cema_bwd_scan" in text and 'name = "cema_powers"' not in text


def test_power_tables_kernel_matches_float64_and_the_xla_tables():
  """power_tables_pallas (interpreted) through ops.cema._power_tables(impl="pallas"): float64's
  powers for a static offset and extras, the XLA tables' values, their JVP and VJP, and a CUDA
  lowering. q spans |q| from 0.3 to 1 - 1e-6, so entries underflow as well as stay near 1."""
  from megalodon_jax.ops import cema as cema_ops
  rng = np.random.default_rng(7)
  mags = rng.uniform(0.3, 0.99999, size=(3, 5))
  mags[0, 0] = 1.0 - 1e-6
  q = jnp.asarray(mags * np.exp(1j * rng.uniform(-np.pi, np.pi, mags.shape)), jnp.complex64)
  q64 = np.asarray(q, np.complex128)
  length, offset, extra = 300, 70_001, (5, 4097)
  got = cema_ops._power_tables(q, length, offset, extra, impl="pallas")
  want = cema_ops._power_tables(q, length, offset, extra)
  block, count = cema_ops._power_blocks(length)
  assert (got.block, got.high.shape, got.low.shape, got.extra.shape) == (block, (3, 5, count), (3, 5, block), (3, 5, 2))
  for table, exps in ((got.high, offset + block * np.arange(count)), (got.low, np.arange(block)),
                      (got.extra, np.asarray(extra))):
    _assert_powers_close_f64(table, q64[..., None] ** exps)
  for name in ("high", "low", "extra"):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=2e-7, atol=1e-30)

  def expand(impl):
    return lambda q: cema_ops.cema_powers(q, 40, offset=3, impl=impl)
  dq = jnp.asarray(np.exp(1j * rng.uniform(-np.pi, np.pi, q.shape)), jnp.complex64)
  cotangent = jnp.asarray(rng.normal(size=(3, 5, 40)) + 1j * rng.normal(size=(3, 5, 40)), jnp.complex64)
  tangents = [jax.jvp(expand(impl), (q,), (dq,))[1] for impl in ("pallas", "xla")]
  pullbacks = [jax.vjp(expand(impl), q)[1](cotangent)[0] for impl in ("pallas", "xla")]
  derivative = (np.arange(40) + 3) * q64[..., None] ** (np.arange(40) + 2)
  np.testing.assert_allclose(tangents[0], derivative * np.asarray(dq)[..., None], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tangents[0], tangents[1], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(pullbacks[0], pullbacks[1], rtol=1e-6, atol=1e-6)

  big = jnp.full((1024, 16), 0.999 + 0.01j, jnp.complex64)
  lowered = jax.jit(lambda a: K.power_tables_pallas(a, 128, 128)).trace(big).lower(
      lowering_platforms=("cuda",))
  assert "cema_power_tables" in lowered.as_text()
  with pytest.raises(ValueError, match="offset >= 0"):
    K.power_tables_pallas(q, 4, 4, -1, True)
  with pytest.raises(ValueError, match="unknown power-table impl"):
    cema_ops._power_tables(q, 8, impl="triton")


def _assert_powers_close_f64(value, ref, rtol=1e-6):
  value, ref = np.asarray(value), np.asarray(ref)
  big = np.abs(ref) > 1e-30  # where float32 still represents the value
  assert np.all(np.isfinite(value)) and big.sum() >= 5
  np.testing.assert_array_less(np.abs(value - ref)[big] / np.abs(ref)[big], rtol)
  np.testing.assert_array_less(np.abs(value)[~big], 1e-29)


# Tiling of the slow-decay pair tests: 3 chunks, 2 lanes a channel in both scans.
_PAIRS_BASE = K.CemaKernelConfig(block_d=2, block_t=16, split=2, num_warps=1, num_chunks=3, bwd_block_d=2,
                                 bwd_split=2, bwd_num_warps=1)


def _slow_decay_problem(seed: int, length: int, dim: int = 4, ndim: int = 4):
  """|q| between 1 - 1e-1 and 1 - 1e-5 with fast rotations: (coeffs, omega [D] f64, x [1, L, D] f32, rng)."""
  rng = np.random.default_rng(seed)
  mags = 1 - 10.0 ** rng.uniform(-5, -1, (dim, ndim))
  q = mags * np.exp(1j * rng.uniform(-np.pi, np.pi, (dim, ndim)))
  p = rng.uniform(0.1, 1.0, (dim, ndim))
  eta = rng.normal(size=(dim, ndim)) + 1j * rng.normal(size=(dim, ndim))
  omega = rng.normal(size=dim)
  x = rng.normal(size=(1, length, dim)).astype(np.float32)
  coeffs = CemaCoefficients(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.complex64), jnp.asarray(eta, jnp.complex64))
  return coeffs, omega, x, rng


def _record_pair_steps(monkeypatch, mode: str) -> list:
  """The pair_steps flag of every scan launch of `mode`, in launch order."""
  pairs = []
  launch = K._launch

  def recording_launch(spec, *args, **kwargs):
    if spec.mode == mode:
      pairs.append(spec.pair_steps)
    return launch(spec, *args, **kwargs)

  monkeypatch.setattr(K, "_launch", recording_launch)
  return pairs


def test_fwd_pairs_match_float64_for_slow_decay(monkeypatch):
  """fwd_pairs (two forward steps per update, q^2 from the double-float powers) against a float64
  recurrence with |q| close to 1 and fast rotations, 3 chunks over 300 steps: as close as the
  step-by-step scan, and the forward launches really take the paired path."""
  length = 300
  coeffs, omega, x, _ = _slow_decay_problem(17, length)
  # float64 on the float32-rounded coefficients the kernels see.
  p32, q32, eta32 = (np.asarray(v, np.float64 if v.dtype == jnp.float32 else np.complex128) for v in coeffs)
  y64, _ = np_cema(x.astype(np.float64), p32, q32, eta32, omega.astype(np.float32).astype(np.float64), None,
                   np.ones((1, length)))
  pairs = _record_pair_steps(monkeypatch, "fwd")
  errors = {}
  for flag in (False, True):
    y = K.cema_pallas(jnp.asarray(x), coeffs, jnp.asarray(omega, jnp.float32), interpret=True,
                      config=dataclasses.replace(_PAIRS_BASE, fwd_pairs=flag))
    errors[flag] = rel_err(y, y64)
  assert pairs == [False, True]
  assert errors[True] < 2e-6 and errors[False] < 2e-6, errors
  with pytest.raises(ValueError, match="fwd_pairs needs block_t >= 2"):
    dataclasses.replace(_PAIRS_BASE, block_t=1, fwd_pairs=True).validate(4)


def test_bwd_pairs_match_float64_gradients_for_slow_decay(monkeypatch):
  """bwd_pairs (two backward steps per update, u' carried halved, the second sums folded in with q
  after the walk) against float64 gradients (experiments/cema_reference) with |q| close to 1 and
  fast rotations, 3 chunks over 301 steps (a remainder step), 2 lanes a channel: within a small
  factor of the step-by-step backward (both ~1e-6 here; a wrong term would be O(1)), and the
  backward scan really takes the paired path."""
  from experiments import cema_reference
  coeffs, omega, x, rng = _slow_decay_problem(23, 301)
  omega = omega.astype(np.float32)
  w = rng.normal(size=x.shape).astype(np.float32)
  # float64 on the float32-rounded coefficients the kernels see.
  ref = cema_reference.reference(x, w, *(np.asarray(v) for v in coeffs), omega)
  pairs = _record_pair_steps(monkeypatch, "bwd")
  errors = {}
  for flag in (False, True):
    cfg = dataclasses.replace(_PAIRS_BASE, bwd_pairs=flag)

    def loss(x, coeffs, omega, cfg=cfg):
      return jnp.sum(jnp.asarray(w) * K.cema_pallas(x, coeffs, omega, interpret=True, config=cfg))

    dx, dc, _ = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), coeffs, jnp.asarray(omega))
    errors[flag] = {name: rel_err(got, want) for name, got, want in (
        ("dx", dx, ref.dx), ("dp", dc.p, ref.dp), ("dq", dc.q, ref.dq), ("deta", dc.eta, ref.deta))}
  assert pairs == [False, True]
  for name, err in errors[True].items():
    assert err < max(3 * errors[False][name], 2e-6), (name, errors)
  with pytest.raises(ValueError, match="bwd_pairs needs backward tiles of >= 2 steps"):
    dataclasses.replace(_PAIRS_BASE, block_t=1, bwd_pairs=True).validate(4)


def test_bwd_pairs_lower_to_triton():
  cfg = K.default_config(1, 64, 8, 4)  # the default pairs the backward's steps in 8-step tiles
  assert cfg.bwd_pairs and cfg.bwd_block_t == 8
  text = _lowered_gpu_gradient_text(cfg)
  assert "cema_bwd_scan" in text


def test_fwd_pairs_lower_to_triton():
  cfg = dataclasses.replace(K.default_config(1, 64, 8, 4), fwd_pairs=True)
  text = _lowered_gpu_gradient_text(cfg)
  assert "cema_fwd_scan" in text and text.count('name = "cema_powers"') >= 1


@pytest.mark.parametrize("mode", ["split", "strided"])
def test_toeplitz_probe_kernel_matches_float64(mode):
  """The session-19 probe's per-channel Toeplitz kernel (experiments/gpu_checks/
  probe_cema_toeplitz_triton.py; bf16 x, the float32 kernel as three bf16 parts) in the
  interpreter against a float64 product: y[c T + t, d] = sum_{s <= t} k[d, t - s] x[c T + s, d]."""
  from experiments.gpu_checks.probe_cema_toeplitz_triton import toeplitz_pallas
  batch, block, chunks, dim = 2, 16, 4, 8
  x = jax.random.normal(jax.random.key(3), (batch, chunks * block, dim), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(jax.random.key(4), (dim, block), jnp.float32)
  y = np.asarray(toeplitz_pallas(x, k, mode=mode, block=block, ct=2, dc=4, interpret=True))
  xs = np.asarray(x, np.float64).reshape(batch, chunks, block, dim)
  kk = np.asarray(k, np.float64)
  ref = np.zeros_like(xs)
  for t in range(block):
    for s in range(t + 1):
      ref[:, :, t, :] += kk[:, t - s] * xs[:, :, s, :]
  ref = ref.reshape(batch, chunks * block, dim)
  np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.max(np.abs(ref)))


@pytest.mark.parametrize("reverse", [False, True])
def test_tensor_core_summary_probe_matches_float64(reverse):
  """The session-23 probe's chunk summaries as batched bf16 dots (experiments/gpu_checks/
  probe_cema_summary_tc.py: Horner over 16-step blocks, the powers as three bf16 parts) in the
  interpreter against a float64 sum: S[b, c, n, d] = sum_l q^(T - 1 - l) x[b, c T + l, d] (reverse:
  q^l), at B = 2 with |q| up to 0.999 and phases over (0, pi)."""
  from experiments.gpu_checks import probe_cema_summary_tc as probe
  batch, chunks, steps, dim, ndim = 2, 16, 48, 8, 16
  rng = np.random.default_rng(5)
  q = rng.uniform(0.5, 0.999, (dim, ndim)) * np.exp(1j * rng.uniform(0, np.pi, (dim, ndim)))
  q = q.astype(np.complex64).astype(np.complex128)
  x = jnp.asarray(rng.standard_normal((batch, chunks * steps, dim)), jnp.bfloat16)
  parts, q16 = probe.power_parts(q, reverse=reverse)
  re, im = probe.summary_tc(x, parts, q16, chunks=chunks, block_d=4, num_warps=4, reverse=reverse,
                            interpret=True, prefetch=2)
  ref = probe.reference(np.asarray(x, np.float64), q, chunks, reverse)
  got = np.asarray(re) + 1j * np.asarray(im)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.max(np.abs(ref)))


def test_tensor_core_summary_probe_lowers_to_a_batched_triton_dot():
  """The probe's primitive reaches Triton as one 3-D tt.dot per bf16 part and plane."""
  from experiments.gpu_checks import probe_cema_summary_tc as probe
  from jax._src.pallas.triton import pallas_call_registration as registration
  texts = []
  original = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    texts.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  spec = jax.ShapeDtypeStruct
  fn = functools.partial(probe.summary_tc, chunks=16, block_d=8, num_warps=4, reverse=False, interpret=False)
  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    jax.jit(fn).trace(spec((1, 16 * 32, 64), jnp.bfloat16), spec((64, 6, 16, 16), jnp.bfloat16),
                      spec((64, 2, 16), jnp.float32)).lower(lowering_platforms=("cuda",))
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = original
  dots = [line for line in texts[0].splitlines() if "tt.dot" in line]
  assert len(dots) == 6 and all("tensor<8x16x16xbf16>" in line for line in dots), dots


def test_bounded_index_is_the_identity_on_its_range():
  for limit in (1, 2, 5, 16, 300, 32768):
    values = jnp.arange(limit, dtype=jnp.int32)
    np.testing.assert_array_equal(K._bounded(values, limit), values)
  # The mask is the power of two above the range: 300 -> 511, so 511 stays and 512 wraps to 0.
  assert int(K._bounded(jnp.int32(511), 300)) == 511 and int(K._bounded(jnp.int32(512), 300)) == 0


@pytest.mark.parametrize("fwd_pairs", [False, True])
def test_bounded_offsets_change_no_value_or_gradient(fwd_pairs):
  """bounded_offsets masks the batch index, the channel block and each tile's first step (forward
  and reverse walks). At B=3 (batch mask 3), 3 channel blocks (mask 3), three chunks of 8, 8 and 5
  steps with resets and h0, every value and gradient equals the unmasked kernel's, and y and
  h_last match the float64 recurrence."""
  rng = np.random.default_rng(5)
  batch, length, dim, ndim = 3, 21, 6, 4
  x = rng.normal(size=(batch, length, dim)).astype(np.float32)
  p = rng.uniform(0.1, 1.0, (dim, ndim))
  q = rng.uniform(0.5, 0.95, (dim, ndim)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (dim, ndim)))
  eta = rng.normal(size=(dim, ndim)) + 1j * rng.normal(size=(dim, ndim))
  omega = rng.normal(size=dim).astype(np.float32)
  h0 = (rng.normal(size=(batch, dim, ndim)) + 1j * rng.normal(size=(batch, dim, ndim))).astype(np.complex64)
  segment_ids = segments_with_resets_at(np.zeros((batch, length), np.int32), {0: (1, 8), 2: (9, 17)})
  coeffs = CemaCoefficients(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.complex64), jnp.asarray(eta, jnp.complex64))
  w = rng.normal(size=(batch, length, dim)).astype(np.float32)
  w_h = rng.normal(size=(batch, dim, ndim)).astype(np.float32)
  base = dataclasses.replace(CHUNKED, block_d=2, bwd_block_d=2, block_t=4, split=2, bwd_split=2,
                             fwd_pairs=fwd_pairs)

  def run(cfg):
    def loss(x, h0):
      y, h_last = K.cema_pallas(x, coeffs, jnp.asarray(omega), h0, segment_ids=jnp.asarray(segment_ids),
                                return_state=True, interpret=True, config=cfg)
      return jnp.sum(w * y) + jnp.sum(w_h * jnp.real(h_last)), (y, h_last)
    (_, (y, h_last)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jnp.asarray(x), jnp.asarray(h0))
    return [np.asarray(v) for v in (y, h_last, *grads)]

  bounded = run(dataclasses.replace(base, bounded_offsets=True))
  plain = run(dataclasses.replace(base, bounded_offsets=False))
  for a, b in zip(bounded, plain):
    np.testing.assert_array_equal(a, b)
  p32, q32, eta32 = (np.asarray(v, np.float64 if v.dtype == jnp.float32 else np.complex128) for v in coeffs)
  y64, h64 = np_cema(x.astype(np.float64), p32, q32, eta32, omega.astype(np.float64), h0,
                     np_keep(segment_ids, batch, length))
  assert rel_err(bounded[0], y64) < 1e-5 and rel_err(bounded[1], h64) < 1e-5
