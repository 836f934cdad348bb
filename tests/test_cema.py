"""CEMA evaluation paths (SPEC §2) against a float64 numpy recurrence and against each other.

Compilation dominates the run time on CPU, so every test goes through a few shared jitted
functions (`_forward` and its VJP) and reuses the same shapes where it can.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from megalodon_jax.ops import cema as cema_ops
from megalodon_jax.ops.cema import (
    CemaCoefficients, cema, cema_coefficients, cema_final_state, cema_kernel, cema_powers,
    cema_state_contribution)

PATHS = ("sequential", "associative", "fft", "chunked", "blocked")
RESETTABLE = ("sequential", "associative", "chunked", "blocked")
TOL = 1e-5  # relative error ||y - ref|| / ||ref|| required in float32


# ---------------------------------------------------------------------------------------------
# Independent reference and problem generation.
# ---------------------------------------------------------------------------------------------

def reference(x, coeffs, omega, h0=None, segment_ids=None):
  """The recurrence of SPEC §2, one step at a time in float64/complex128.

  x: [B, L, D]; coeffs: CemaCoefficients (any array type); omega: [D]; h0: [B, D, N] or None;
  segment_ids: [B, L] or None (a new run at t > 0 drops the state). Returns (y, h_L).
  """
  x = np.asarray(x, np.float64)
  p = np.asarray(coeffs.p, np.float64)
  q = np.asarray(coeffs.q, np.complex128)
  eta = np.asarray(coeffs.eta, np.complex128)
  omega = np.asarray(omega, np.float64).reshape(-1)
  batch, length, dim = x.shape
  h = np.zeros((batch, dim, p.shape[1]), np.complex128) if h0 is None else np.asarray(
      h0, np.complex128).copy()
  y = np.zeros((batch, length, dim))
  for t in range(length):
    decay = np.broadcast_to(q, h.shape).copy()
    if segment_ids is not None and t > 0:
      decay[np.asarray(segment_ids)[:, t] != np.asarray(segment_ids)[:, t - 1]] = 0.0
    h = decay * h + p * x[:, t, :, None]
    y[:, t] = np.real(np.sum(eta * h, axis=-1)) + omega * x[:, t]
  return y, h


def rel_err(value, ref) -> float:
  value, ref = np.asarray(value), np.asarray(ref)
  return float(np.linalg.norm(value - ref) / np.linalg.norm(ref))


def init_params(rng, dim, order, slow_channels=0, gaps=(1e-3, 1e-4), complex_gamma=False):
  """Stored parameters drawn as in SPEC §2; the first `slow_channels` channels get
  |q| = 1 - gap, cycling through `gaps`. The init has Im(gamma) = 0; complex_gamma draws it like
  the real part (as after training), so the Im(eta) Im(h) term of the readout is exercised.

  Returns (alpha [D,N,1], delta [D,N,1], theta [D,1,1], gamma [D,N,2], omega [D,1]) float32.
  """
  alpha = rng.normal(0.0, 0.2, (dim, order, 1))
  delta = rng.normal(0.0, 0.2, (dim, order, 1))
  ratio = rng.permutation(np.exp(-np.arange(1, dim + 1) * np.log(dim) / dim))
  theta = np.log(ratio / (1.0 - ratio)).reshape(dim, 1, 1)
  gamma_imag = rng.normal(0.0, 1.0, (dim, order)) if complex_gamma else np.zeros((dim, order))
  gamma = np.stack([rng.normal(0.0, 1.0, (dim, order)), gamma_imag], axis=-1)
  omega = rng.normal(0.0, 0.25, (dim, 1))
  while np.any(np.abs(omega) > 1.0):  # truncated normal on [-1, 1]
    omega = np.where(np.abs(omega) > 1.0, rng.normal(0.0, 0.25, omega.shape), omega)
  # |q| = 1 - sigmoid(alpha) sigmoid(delta): alpha = 0 and sigmoid(delta) = 2 (1 - |q|).
  for d, gap in zip(range(slow_channels), list(gaps) * dim):
    alpha[d] = 0.0
    delta[d] = np.log(2 * gap / (1.0 - 2 * gap))
  return tuple(jnp.asarray(a, jnp.float32) for a in (alpha, delta, theta, gamma, omega))


def random_state(rng, batch, dim, order):
  shape = (batch, dim, order)
  return jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape), jnp.complex64)


def coefficients(params) -> CemaCoefficients:
  return cema_coefficients(*params[:4])


# ---------------------------------------------------------------------------------------------
# Shared jitted entry points.
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("method", "chunk"))
def _forward(params, x, h0, segment_ids, *, method, chunk=16):
  """(y, h_L) of one path; params = (alpha, delta, theta, gamma, omega)."""
  return cema(x, coefficients(params), params[4], h0, method=method, segment_ids=segment_ids,
              return_state=True, chunk=chunk)


def _outputs(method, segment_ids=None, chunk=16):
  """f(alpha, delta, theta, gamma, omega, x, Re h0, Im h0) -> (y, Re h_L, Im h_L), all real.

  Built on the jitted _forward, so check_grads and _gradients of the same shapes share compiled
  functions (JAX caches the linearisation and transpose of a jitted function).
  """
  def f(alpha, delta, theta, gamma, omega, x, h0_re, h0_im):
    y, h = _forward((alpha, delta, theta, gamma, omega), x, jax.lax.complex(h0_re, h0_im),
                    segment_ids, method=method, chunk=chunk)
    return y, jnp.real(h), jnp.imag(h)
  return f


def _args(params, x, h0):
  return (*params, x, jnp.real(h0), jnp.imag(h0))


def _gradients(method, params, x, h0, segment_ids, y_weight, h_weight, chunk=16):
  """Gradients of sum(y w_y) + sum(Re h_L w_re + Im h_L w_im) w.r.t. every input of _outputs.

  Returns a tuple (alpha, delta, theta, gamma, omega, x, Re h0, Im h0) of numpy arrays.
  """
  _, pullback = jax.vjp(_outputs(method, segment_ids, chunk), *_args(params, x, h0))
  return tuple(np.asarray(g) for g in pullback((y_weight, h_weight[0], h_weight[1])))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


# A standard problem used by most tests: B=2, L=100, D=4 (|q| = 1 - 1e-3 and 1 - 1e-4 in two
# channels), N=4, complex gamma, chunk 16 (6 full chunks and a tail of 4).
B, L, D, N = 2, 100, 4, 4


@functools.lru_cache(maxsize=None)
def standard_problem():
  rng = np.random.default_rng(1234)
  params = init_params(rng, D, N, slow_channels=2, complex_gamma=True)
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  h0 = random_state(rng, B, D, N)
  # Row 0: runs 5 | 7 | 5 (ids repeat, runs do not), a boundary exactly at the chunk start 32.
  # Row 1: a reset at t=1, then at 50.
  seg = np.zeros((B, L), np.int32)
  seg[0, :32], seg[0, 32:61], seg[0, 61:] = 5, 7, 5
  seg[1, 0], seg[1, 1:50], seg[1, 50:] = 0, 1, 2
  return params, x, h0, jnp.asarray(seg)



@functools.lru_cache(maxsize=None)
def long_problem(length=8192):
  """B=1, L=8192, D=4 (|q| = 1 - 1e-3 in two channels), N=2; no initial state.

  Returns (params, x, y, h_L). With |q| = 1 - 1e-4 over 8192 steps the float32 sequential scan
  itself drifts to ~6e-6 from float64 (a random walk of roundings over ~1e4 effective steps), too
  close to the 1e-5 bar for a stable test; with 1 - 1e-3 it is ~3e-6. (The other paths stay at
  ~1e-7 to ~1e-6 either way.)
  """
  rng = np.random.default_rng(length)
  params = init_params(rng, D, 2, slow_channels=2, gaps=(1e-3, 1e-3))
  x = jnp.asarray(rng.normal(size=(1, length, D)), jnp.float32)
  y_ref, h_ref = reference(x, coefficients(params), params[4])
  return params, x, y_ref, h_ref


# ---------------------------------------------------------------------------------------------
# Every path against the float64 reference.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", PATHS)
def test_paths_match_reference(method):
  """Standard problem with an initial state: y and h_L against float64 and the sequential scan."""
  params, x, h0, _ = standard_problem()
  y_ref, h_ref = reference(x, coefficients(params), params[4], h0)
  y, h = _forward(params, x, h0, None, method=method)
  assert y.dtype == jnp.float32 and y.shape == (B, L, D)
  assert h.dtype == jnp.complex64 and h.shape == (B, D, N)
  assert rel_err(y, y_ref) < TOL
  assert rel_err(h, h_ref) < TOL
  y_seq, h_seq = _forward(params, x, h0, None, method="sequential")
  assert rel_err(y, y_seq) < TOL
  assert rel_err(h, h_seq) < TOL


@pytest.mark.parametrize("method", PATHS)
def test_long_sequence_without_initial_state(method):
  """L = 8192 with |q| up to 1 - 1e-4 and h0 = None; chunk 64 divides L."""
  params, x, y_ref, h_ref = long_problem()
  y, h = _forward(params, x, None, None, method=method, chunk=64)
  assert rel_err(y, y_ref) < TOL
  assert rel_err(h, h_ref) < TOL
  if method != "sequential":
    y_seq, h_seq = _forward(params, x, None, None, method="sequential", chunk=64)
    assert rel_err(y, y_seq) < TOL
    assert rel_err(h, h_seq) < TOL


def test_slow_channels_are_slow():
  """The problems really contain |q| close to 1 (else the checks above are weak)."""
  for params, gaps in ((standard_problem()[0], (1e-3, 1e-4)), (long_problem()[0], (1e-3, 1e-3))):
    magnitude = np.abs(np.asarray(coefficients(params).q))
    np.testing.assert_allclose(magnitude[0], 1 - gaps[0], rtol=1e-6)
    np.testing.assert_allclose(magnitude[1], 1 - gaps[1], rtol=1e-6)
    assert magnitude[2:].max() < 0.9


@pytest.mark.parametrize("chunk", [128, pytest.param(1, marks=pytest.mark.slow)])
def test_chunk_sizes(chunk):
  """One chunk longer than the sequence (and, slow, chunks of one step), with resets and h0."""
  params, x, h0, seg = standard_problem()
  y_ref, h_ref = reference(x, coefficients(params), params[4], h0, seg)
  y, h = _forward(params, x, h0, seg, method="chunked", chunk=chunk)
  assert rel_err(y, y_ref) < TOL
  assert rel_err(h, h_ref) < TOL


def test_single_step():
  """L = 1: h_1 = q h0 + p x_0 for every path (one jit for all four)."""
  params, x, h0, _ = standard_problem()
  x1 = x[:, :1]
  outputs = jax.jit(lambda params, x, h0: [
      cema(x, coefficients(params), params[4], h0, method=m, return_state=True) for m in PATHS])(
          params, x1, h0)
  y_ref, h_ref = reference(x1, coefficients(params), params[4], h0)
  for method, (y, h) in zip(PATHS, outputs):
    assert rel_err(y, y_ref) < TOL, method
    assert rel_err(h, h_ref) < TOL, method


# ---------------------------------------------------------------------------------------------
# Segment ids.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", RESETTABLE)
def test_segments_match_reference(method):
  params, x, h0, seg = standard_problem()
  y_ref, h_ref = reference(x, coefficients(params), params[4], h0, seg)
  y, h = _forward(params, x, h0, seg, method=method)
  assert rel_err(y, y_ref) < TOL
  assert rel_err(h, h_ref) < TOL
  # The reference really resets: without segment ids the outputs differ a lot.
  y_joined, _ = reference(x, coefficients(params), params[4], h0)
  assert rel_err(y_joined, y_ref) > 1e-2


@pytest.mark.parametrize("method", RESETTABLE)
def test_documents_are_isolated(method):
  """Changing other documents' inputs (and h0) leaves a document's outputs and gradients as they
  were, bit for bit."""
  params, x, h0, seg = standard_problem()
  doc = np.zeros((B, L), bool)
  doc[0, 32:61] = True  # row 0, second run
  rng = np.random.default_rng(7)
  x_other = jnp.where(doc[..., None], x, jnp.asarray(rng.normal(size=x.shape), jnp.float32))
  h0_other = random_state(rng, B, D, N)
  y, _ = _forward(params, x, h0, seg, method=method)
  y2, _ = _forward(params, x_other, h0_other, seg, method=method)
  np.testing.assert_array_equal(np.asarray(y)[doc], np.asarray(y2)[doc])
  assert np.abs(np.asarray(y)[~doc] - np.asarray(y2)[~doc]).max() > 1e-2  # the rest did change

  y_weight = jnp.asarray(doc[..., None] * rng.normal(size=(B, L, D)), jnp.float32)
  h_weight = jnp.zeros((2, B, D, N), jnp.float32)
  grads = _gradients(method, params, x, h0, seg, y_weight, h_weight)
  grads2 = _gradients(method, params, x_other, h0_other, seg, y_weight, h_weight)
  for g, g2 in zip(grads[:5], grads2[:5]):  # the stored parameters
    if jax.default_backend() == "gpu":
      # Sums over every step: XLA's GPU reductions are not deterministic (the associative path
      # passes bit for bit with --xla_gpu_deterministic_ops, which the chunked and blocked paths'
      # small GEMMs cannot compile with on jax 0.11.2), so equal to float32 rounding only.
      np.testing.assert_allclose(g, g2, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(g))))
    else:
      np.testing.assert_array_equal(g, g2)
  np.testing.assert_array_equal(grads[5][doc], grads2[5][doc])  # x inside the document
  np.testing.assert_array_equal(grads[5][~doc], 0.0)  # x elsewhere
  np.testing.assert_array_equal(grads[6], 0.0)  # h0 cannot reach a later document
  np.testing.assert_array_equal(grads[7], 0.0)


@pytest.mark.parametrize("method", RESETTABLE)
def test_document_at_offset_matches_document_alone(method):
  params, _, _, _ = standard_problem()
  rng = np.random.default_rng(11)
  document = rng.normal(size=(40, D))
  # Row 0: the document alone at t = 0 (zero initial state), then another document.
  # Row 1: another document, the document at offset 30 (not a chunk boundary), a third one.
  xs = rng.normal(size=(B, L, D))
  xs[0, :40] = document
  xs[1, 30:70] = document
  seg = np.zeros((B, L), np.int32)
  seg[0, 40:] = 1
  seg[1, 30:70], seg[1, 70:] = 1, 2
  h0 = jnp.zeros((B, D, N), jnp.complex64)
  y, _ = _forward(params, jnp.asarray(xs, jnp.float32), h0, jnp.asarray(seg), method=method)
  y = np.asarray(y)
  assert rel_err(y[1, 30:70], y[0, :40]) < TOL
  y_ref, _ = reference(document[None], coefficients(params), params[4])
  assert rel_err(y[0, :40], y_ref[0]) < TOL


def test_fft_rejects_segment_ids():
  params, x, h0, seg = standard_problem()
  with pytest.raises(ValueError, match="FFT path cannot reset.*'blocked', 'chunked', "
                                       "'associative' or 'sequential'"):
    cema(x, coefficients(params), params[4], h0, method="fft", segment_ids=seg)


@pytest.mark.parametrize("chunk", [1, 7, 64, 500])
def test_blocked_any_chunk_matches_reference(chunk):
  """Chunks of one step, an odd size with a padded tail, and one chunk longer than L."""
  params, x, h0, _ = standard_problem()
  y, h = _forward(params, x, h0, None, method="blocked", chunk=chunk)
  y_ref, h_ref = reference(x, coefficients(params), params[4], h0)
  assert rel_err(y, y_ref) < TOL
  assert rel_err(h, h_ref) < TOL


# Resets where the blocked path's per-chunk bookkeeping could slip (with chunk 16 / 8): row 0 at
# the chunk start 16, twice more inside that chunk (20, 27), mid-chunk at 61, inside the padded
# tail chunk (97) and at the last step (99); row 1 at t = 1 and 50, each run spanning several
# chunks; row 2 three one-step runs in one chunk (33, 34, 35) and a reset at the chunk start 64;
# row 3 none at all (h0 reaches every step while the other rows reset).
PACKED_RESETS = ((16, 20, 27, 61, 97, 99), (1, 50), (33, 34, 35, 64), ())


@functools.lru_cache(maxsize=None)
def packed_problem():
  """The standard problem's parameters with B=4 rows of x, h0 and the resets of PACKED_RESETS.

  Ids alternate 0/1 between runs, so equal ids come back: only runs count.
  """
  params = standard_problem()[0]
  rng = np.random.default_rng(4321)
  batch = len(PACKED_RESETS)
  x = jnp.asarray(rng.normal(size=(batch, L, D)), jnp.float32)
  h0 = random_state(rng, batch, D, N)
  resets = np.zeros((batch, L), np.int32)
  for row, steps in enumerate(PACKED_RESETS):
    resets[row, list(steps)] = 1
  return params, x, h0, jnp.asarray(np.cumsum(resets, axis=1) % 2, jnp.int32)


@pytest.mark.parametrize("chunk", [1, 8, 16, 128])
def test_blocked_packed_layouts_match_reference(chunk):
  """y and h_L against float64, and every gradient against the sequential scan's: chunks of one
  step (every reset starts a fresh chunk), 8 and 16 (a padded tail of 4), one chunk longer than L
  (every reset inside it)."""
  params, x, h0, seg = packed_problem()
  y_ref, h_ref = reference(x, coefficients(params), params[4], h0, seg)
  y, h = _forward(params, x, h0, seg, method="blocked", chunk=chunk)
  assert rel_err(y, y_ref) < TOL
  assert rel_err(h, h_ref) < TOL
  for row in range(len(PACKED_RESETS)):  # each layout on its own, not hidden by the others
    assert rel_err(y[row], y_ref[row]) < TOL, row
    assert rel_err(h[row], h_ref[row]) < TOL, row
  rng = np.random.default_rng(chunk)
  y_weight = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  h_weight = jnp.asarray(rng.normal(size=(2,) + h0.shape), jnp.float32)
  expected = _gradients("sequential", params, x, h0, seg, y_weight, h_weight)
  grads = _gradients("blocked", params, x, h0, seg, y_weight, h_weight, chunk=chunk)
  names = ("alpha", "delta", "theta", "gamma", "omega", "x", "Re h0", "Im h0")
  for name, g, g_seq in zip(names, grads, expected):
    assert rel_err(g, g_seq) < TOL, name
  # h0 reaches row 0 until 16 and row 2 until 33, row 1 only at t = 0, row 3 everywhere.
  assert np.all(grads[6] != 0.0) and np.all(grads[7] != 0.0)


def test_blocked_packed_gradients_by_finite_differences():
  """Reverse mode of the blocked path with resets against central differences (chunk 8)."""
  params, x, h0, seg = packed_problem()
  _check_grads_of("blocked", params, x, h0, chunk=8, segment_ids=seg)


# ---------------------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------------------

def _check_grads_of(method, params, x, h0, chunk, tol=2e-3, segment_ids=None):
  """check_grads of (y, Re h_L, Im h_L) w.r.t. alpha, delta, theta, gamma, omega, x, h0 (re, im)."""
  # float32 central differences: truncation error grows like eps^2 (the phase of q^t moves by up
  # to ~t n dphi / dtheta ~ 1e2 per unit theta here), round-off like 1e-7 |f| / eps. eps = 2e-4
  # balances them at ~3e-4 relative on the standard problem (1e-3 gives ~4e-3, 1e-4 ~4e-4).
  check_grads(_outputs(method, segment_ids, chunk=chunk), _args(params, x, h0), order=1, modes=["rev"],
              eps=2e-4, atol=tol, rtol=tol)


@pytest.mark.parametrize("method", PATHS)
def test_check_grads(method):
  """Reverse mode against finite differences on the standard problem (chunk 16, tail of 4)."""
  params, x, h0, _ = standard_problem()
  _check_grads_of(method, params, x, h0, chunk=16)


@pytest.mark.parametrize("segments", [False, True])
def test_gradients_agree_with_sequential(segments):
  params, x, h0, seg = standard_problem()
  seg = seg if segments else None
  rng = np.random.default_rng(5)
  y_weight = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  h_weight = jnp.asarray(rng.normal(size=(2, B, D, N)), jnp.float32)
  expected = _gradients("sequential", params, x, h0, seg, y_weight, h_weight)
  names = ("alpha", "delta", "theta", "gamma", "omega", "x", "Re h0", "Im h0")
  for method in RESETTABLE[1:] if segments else PATHS[1:]:
    grads = _gradients(method, params, x, h0, seg, y_weight, h_weight)
    assert rel_err(_flat(grads), _flat(expected)) < TOL, method
    for name, g, g_seq in zip(names, grads, expected):
      assert rel_err(g, g_seq) < TOL, (method, name)


# ---------------------------------------------------------------------------------------------
# Input dtypes, dispatch and validation.
# ---------------------------------------------------------------------------------------------

def test_bfloat16_input():
  params, x, h0, _ = standard_problem()
  x_bf16 = x.astype(jnp.bfloat16)
  y, h = _forward(params, x_bf16, h0, None, method="chunked")
  y32, h32 = _forward(params, x_bf16.astype(jnp.float32), h0, None, method="chunked")
  assert y.dtype == jnp.float32 and h.dtype == jnp.complex64
  np.testing.assert_allclose(y, y32, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(h, h32, rtol=1e-6, atol=1e-6)
  y_ref, _ = reference(x_bf16.astype(jnp.float32), coefficients(params), params[4], h0)
  assert rel_err(y, y_ref) < TOL
  for method in PATHS:  # dtypes of every path, by abstract evaluation (no compilation)
    y_shape, h_shape = jax.eval_shape(
        lambda x: cema(x, coefficients(params), params[4], h0, method=method, return_state=True),
        x_bf16)
    assert (y_shape.dtype, y_shape.shape) == (jnp.float32, (B, L, D)), method
    assert (h_shape.dtype, h_shape.shape) == (jnp.complex64, (B, D, N)), method


def test_dispatch_and_omega_shapes():
  """cema(method=m) traces to exactly the path function m; omega [D] and [D, 1] agree."""
  params, x, h0, _ = standard_problem()
  coeffs = coefficients(params)
  omega = params[4]
  paths = {"sequential": cema_ops.cema_sequential, "associative": cema_ops.cema_associative,
           "fft": cema_ops.cema_fft, "chunked": cema_ops.cema_chunked,
           "blocked": cema_ops.cema_blocked}
  trace = lambda fn: str(jax.make_jaxpr(lambda x: fn(x, coeffs, omega, h0))(x))
  direct = {method: trace(fn) for method, fn in paths.items()}
  assert len(set(direct.values())) == len(paths)  # the paths really differ
  for method in paths:
    assert trace(functools.partial(cema, method=method)) == direct[method], method
  assert trace(cema) == direct["chunked"]  # the default
  y_col, _ = _forward(params, x, h0, None, method="sequential")
  y_vec, _ = _forward((*params[:4], omega.reshape(D)), x, h0, None, method="sequential")
  np.testing.assert_array_equal(y_col, y_vec)


def test_bad_inputs_raise_clear_errors():
  params, x, h0, seg = standard_problem()
  coeffs = coefficients(params)
  omega = params[4]
  with pytest.raises(ValueError, match="x has 3 channels.*D=4"):
    cema(x[..., :3], coeffs, omega)
  with pytest.raises(ValueError, match=r"x must be \[batch, length, dim\]"):
    cema(x[0], coeffs, omega)
  with pytest.raises(ValueError, match=r"h0 must be the complex state \[batch, D, N\]"):
    cema(x, coeffs, omega, h0[:, :, :2])
  with pytest.raises(ValueError, match="omega must have shape"):
    cema(x, coeffs, omega[:2])
  with pytest.raises(ValueError, match="segment_ids must be"):
    cema(x, coeffs, omega, segment_ids=seg[:, :50])
  with pytest.raises(ValueError, match="unknown CEMA method 'scan'.*sequential, associative, fft, "
                                       "chunked, blocked, pallas"):
    cema(x, coeffs, omega, method="scan")
  with pytest.raises(ValueError, match="chunk must be"):
    cema(x, coeffs, omega, chunk=0)
  with pytest.raises(ValueError, match="offset must be >= 0"):
    cema_powers(coeffs.q, 4, offset=-1)
  with pytest.raises(ValueError, match="length must be"):
    cema_kernel(coeffs, 0)



@pytest.mark.parametrize("impl", cema_ops.POWER_IMPLS)
@pytest.mark.parametrize("length", [64, 50, 1])
def test_slice_summary(impl, length):
  """cema_slice_summary: the float64 recurrence's state from zero and float64's q^L, at a
  power-of-2 length (q^L beyond the tables' last entry), an odd one, and one step; Pallas tables
  interpreted."""
  params, x, _, seg = standard_problem()
  coeffs = coefficients(params)
  x, seg = x[:, :length], seg[:, :length]
  for segment_ids in (None, seg):
    h, decay = jax.jit(functools.partial(cema_ops.cema_slice_summary, powers=impl))(x, coeffs, segment_ids)
    assert h.shape == (B, D, N) and h.dtype == jnp.complex64 and decay.shape == (D, N)
    assert rel_err(h, reference(x, coeffs, params[4], None, segment_ids)[1]) < TOL
    _assert_powers_close(decay, _powers_reference(coeffs.q, np.array(length))[..., 0], rtol=1e-6)

# ---------------------------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------------------------

def _powers_reference(q, exponents):
  """q^t in float64 through the polar form (phase t * angle good to ~1e-16 t)."""
  q = np.asarray(q, np.complex128)[..., None]
  return np.exp(exponents * (np.log(np.abs(q)) + 1j * np.angle(q)))


def _hard_q():
  """[2, 4] complex64: |q| from 1 - 1e-7 (barely decays by t = 1e6) down to 0.5."""
  rng = np.random.default_rng(17)
  magnitude = np.array([[1 - 1e-7, 1 - 1e-6, 1 - 3e-6, 1 - 1e-5],
                        [1 - 1e-3, 0.9, 0.5, 1 - 2e-6]])
  angle = rng.uniform(-np.pi, np.pi, magnitude.shape)
  angle[0, 0] = 3.0  # |angle| near pi: the largest absolute rounding of the angle itself
  return jnp.asarray(magnitude * np.exp(1j * angle), jnp.complex64)


def _assert_powers_close(value, ref, rtol=1e-5):
  value, ref = np.asarray(value), np.asarray(ref)
  big = np.abs(ref) > 1e-30  # where float32 still represents the value
  assert np.all(np.isfinite(value))
  np.testing.assert_array_less(np.abs(value - ref)[big] / np.abs(ref)[big], rtol)
  np.testing.assert_array_less(np.abs(value)[~big], 1e-29)


def test_powers_accurate_to_one_million():
  q = _hard_q()
  length = 1_000_001
  powers = jax.jit(cema_powers, static_argnums=1)(q, length)
  assert powers.shape == (2, 4, length) and powers.dtype == jnp.complex64
  t = np.arange(length)
  _assert_powers_close(powers, _powers_reference(q, t))
  # Ablation: the naive float32 exp(t log q) is far off, so the check above has teeth.
  tail = t[-1000:]
  naive = np.exp(tail * np.log(np.asarray(q))[..., None].astype(np.complex64))
  assert np.abs(naive[0] / _powers_reference(q[0], tail) - 1).max() > 1e-2


def test_powers_with_static_and_traced_offset():
  q = _hard_q()
  offset, length = 999_000, 1000
  expected = _powers_reference(q, offset + np.arange(length))
  both = jax.jit(lambda q, o: (cema_powers(q, length, offset=offset),
                               cema_powers(q, length, offset=o)))(q, jnp.int32(offset))
  _assert_powers_close(both[0], expected)
  _assert_powers_close(both[1], expected)


def test_powers_derivative():
  """d/dq q^(t+3) = (t+3) q^(t+2), forward and reverse mode."""
  q = _hard_q()[1]  # [4], |q| from 0.5 to 1 - 1e-3
  t = np.arange(50)
  dq = jnp.asarray(np.exp(1j * np.arange(4)), jnp.complex64)
  cotangent = jnp.asarray(np.exp(-0.5j * np.arange(200)).reshape(4, 50), jnp.complex64)

  @jax.jit
  def derivatives(q, dq, cotangent):
    _, tangent = jax.jvp(lambda q: cema_powers(q, 50, offset=3), (q,), (dq,))
    _, pullback = jax.vjp(lambda q: cema_powers(q, 50, offset=3), q)
    return tangent, pullback(cotangent)[0]

  tangent, grad = derivatives(q, dq, cotangent)
  derivative = (t + 3) * np.asarray(q, np.complex128)[:, None] ** (t + 2)  # [4, 50]
  np.testing.assert_allclose(tangent, derivative * np.asarray(dq)[:, None], rtol=1e-5, atol=1e-6)
  # JAX transposes without conjugating: for holomorphic f, pullback(c) = sum c * f'.
  expected = np.sum(np.asarray(cotangent) * derivative, axis=1)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


def test_kernel_matches_reference():
  params, _, _, _ = standard_problem()
  coeffs = coefficients(params)
  length = 3000
  kernel = jax.jit(cema_kernel, static_argnums=1)(coeffs, length)
  p = np.asarray(coeffs.p, np.float64)[..., None]
  eta = np.asarray(coeffs.eta, np.complex128)[..., None]
  expected = np.real(np.sum(p * eta * _powers_reference(coeffs.q, np.arange(length)), axis=1))
  assert kernel.shape == (D, length) and kernel.dtype == jnp.float32
  assert rel_err(kernel, expected) < 1e-6
  # The kernel is the response of the recurrence to a unit impulse.
  impulse = np.zeros((1, length, D))
  impulse[0, 0] = 1.0
  response, _ = reference(impulse, coeffs, np.zeros(D))
  assert rel_err(np.asarray(kernel).T, response[0]) < 1e-6


@jax.jit
def _closed_forms(params, x, h0, segment_ids):
  coeffs = coefficients(params)
  return (cema_state_contribution(h0, coeffs, x.shape[1], segment_ids=segment_ids),
          cema_final_state(x, coeffs, h0, segment_ids))


def test_state_contribution_and_final_state():
  """With segment ids (without them, the FFT path uses the same code and is tested above)."""
  params, x, h0, seg = standard_problem()
  coeffs = coefficients(params)
  contribution, final = _closed_forms(params, x, h0, seg)
  # With x = 0 the recurrence's output is exactly the initial-state term.
  zero_input, _ = reference(np.zeros(x.shape), coeffs, np.zeros(D), h0, seg)
  assert contribution.shape == (B, L, D) and contribution.dtype == jnp.float32
  assert rel_err(contribution, zero_input) < TOL
  contribution = np.asarray(contribution)  # row 1 resets at t = 1: h0 reaches only t = 0
  assert np.all(contribution[1, 1:] == 0.0) and np.all(contribution[1, 0] != 0.0)
  assert final.shape == (B, D, N) and final.dtype == jnp.complex64
  assert rel_err(final, reference(x, coeffs, params[4], h0, seg)[1]) < TOL
  # Row 0's last run (t >= 61) shares its id with the first run: only the run counts.
  x_first_run_changed = x.at[0, :32].set(0.0)
  _, final_changed = _closed_forms(params, x_first_run_changed, h0, seg)
  np.testing.assert_array_equal(final_changed, final)


# ---------------------------------------------------------------------------------------------
# Larger problems (excluded from the default run).
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["associative", "fft", "chunked", "blocked"])
def test_long_sequence_matches_sequential(method):
  rng = np.random.default_rng(99)
  params = init_params(rng, 16, 16, slow_channels=4)
  x = jnp.asarray(rng.normal(size=(2, 65536, 16)), jnp.float32)
  h0 = random_state(rng, 2, 16, 16)
  y_seq, h_seq = _forward(params, x, h0, None, method="sequential", chunk=64)
  y, h = _forward(params, x, h0, None, method=method, chunk=64)
  assert rel_err(y, y_seq) < TOL
  assert rel_err(h, h_seq) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("method", PATHS)
def test_check_grads_larger(method):
  rng = np.random.default_rng(31)
  params = init_params(rng, 4, 8, slow_channels=2)
  x = jnp.asarray(rng.normal(size=(2, 300, 4)), jnp.float32)
  _check_grads_of(method, params, x, random_state(rng, 2, 4, 8), chunk=64, tol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("method", RESETTABLE)
@pytest.mark.parametrize("chunk", [7, 32, 100])
def test_more_chunk_sizes_with_segments(method, chunk):
  params, x, h0, seg = standard_problem()
  y_ref, h_ref = reference(x, coefficients(params), params[4], h0, seg)
  y, h = _forward(params, x, h0, seg, method=method, chunk=chunk)
  assert rel_err(y, y_ref) < TOL
  assert rel_err(h, h_ref) < TOL


@pytest.mark.parametrize("spec,shape_a,shape_b", [
    ("bdnj,dnl->bjld", (2, 5, 4, 3), (5, 4, 7)),   # one contracted axis: the stacked real einsum
    ("bdn,dnt->btd", (2, 5, 4), (5, 4, 6)),
    ("dnj,dnj->d", (5, 4, 3), (5, 4, 3)),          # two contracted axes: two real einsums
])
def test_complex_einsum_real_matches_complex128(spec, shape_a, shape_b):
  from megalodon_jax.ops.cema import _complex_einsum_real
  rng = np.random.default_rng(3)
  a = rng.normal(size=shape_a) + 1j * rng.normal(size=shape_a)
  b = rng.normal(size=shape_b) + 1j * rng.normal(size=shape_b)
  got = _complex_einsum_real(spec, jnp.asarray(a, jnp.complex64), jnp.asarray(b, jnp.complex64))
  want = np.real(np.einsum(spec, a, b))
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
