"""kernels_pallas.cema_summary_mma: the forward's chunk summaries on mma.sync fragments.

In the interpreter the mma is emulated on whole tiles (by the PTX fragment layout); `-m gpu` on an
H100/H200 runs the compiled kernel (inline mma.sync) against the same float64 sums.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels_pallas import cema as K
from kernels_pallas import cema_summary_mma as M
from megalodon_jax.ops.cema import cema_coefficients


def _q(dim: int, seed: int) -> np.ndarray:
  """[D, 16] complex128 values of complex64 (what the kernels are given), |q| in (0.5, 0.999)."""
  rng = np.random.default_rng(seed)
  q = rng.uniform(0.5, 0.999, (dim, M.ORDERS)) * np.exp(1j * rng.uniform(0, np.pi, (dim, M.ORDERS)))
  return q.astype(np.complex64).astype(np.complex128)


def _tables(q: np.ndarray):
  powers = q[None] ** np.arange(M.STEP + 1)[:, None, None]
  return M.fragment_tables(jnp.asarray(powers.real, jnp.float32), jnp.asarray(powers.imag, jnp.float32))


def _float64_summaries(x: np.ndarray, q: np.ndarray) -> np.ndarray:
  """S[b, c, n, d] = sum_l q^(T - 1 - l) x[b, c T + l, d] over the 16 chunks, float64."""
  batch, length, dim = x.shape
  steps = length // M.CHUNKS
  weights = q[:, :, None] ** (steps - 1 - np.arange(steps))[None, None, :]
  return np.einsum("dnt,bctd->bcnd", weights, x.astype(np.float64).reshape(batch, M.CHUNKS, steps, dim))


def test_fragment_tables_follow_the_ptx_fragment_layout():
  """Built element by element from the PTX m16n8k16 B layout (lane (g, t), register r: rows k =
  2t + 8r and 2t + 8r + 1 of column g, low half first), against fragment_tables' reshapes."""
  dim = 8
  q = _q(dim, 0)
  btab, q16 = map(np.asarray, _tables(q))
  powers = q[None] ** np.arange(M.STEP + 1)[:, None, None]
  for p_index, part in [(0, "hi"), (1, "mid"), (2, "lo")]:
    for n in range(4):
      for r in range(2):
        for g in range(8):
          for t in range(4):
            for d in range(dim):
              col, words = 8 * n + g, []
              for k in (2 * t + 8 * r, 2 * t + 8 * r + 1):
                value = powers[M.STEP - 1 - k, d, col // 2]
                value = np.float32(value.real if col % 2 == 0 else value.imag)
                hi = np.float32(value.astype(ml_dtypes.bfloat16))
                mid = np.float32(np.float32(value - hi).astype(ml_dtypes.bfloat16))
                lo = np.float32(np.float32(value - hi - mid).astype(ml_dtypes.bfloat16))
                chosen = {"hi": hi, "mid": mid, "lo": lo}[part]
                words.append(int(np.asarray(chosen, ml_dtypes.bfloat16).view(np.uint16)))
              want = words[0] | (words[1] << 16)
              assert int(btab[p_index, n, r, d // 4, g, t, d % 4]) == want, (part, n, r, g, t, d)
  for n in range(4):
    for t in range(4):
      for d in range(dim):
        value = np.complex64(powers[M.STEP, d, 4 * n + t])
        assert q16[n, 0, d // 4, 3, t, d % 4] == value.real and q16[n, 1, d // 4, 5, t, d % 4] == value.imag


@pytest.mark.parametrize("batch,dim,steps", [(1, 16, 16), (2, 32, 48)])
def test_summary_planes_match_float64(batch, dim, steps):
  """Interpreter (emulated mma): every chunk's summary against a float64 sum, |q| up to 0.999."""
  q = _q(dim, 1)
  x = np.random.default_rng(2).standard_normal((batch, M.CHUNKS * steps, dim)).astype(ml_dtypes.bfloat16)
  re, im = M.summary_planes(jnp.asarray(x), *_tables(q), interpret=True)
  want = _float64_summaries(x, q)
  got = np.asarray(re) + 1j * np.asarray(im)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


def _coefficients(dim: int, seed: int):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  return cema_coefficients(normal(dim, M.ORDERS, 1), normal(dim, M.ORDERS, 1), normal(dim, 1, 1),
                           normal(dim, M.ORDERS, 2)), normal(dim)


def _config(length: int, dim: int, **changes) -> K.CemaKernelConfig:
  base = K.default_config(2, length, dim, M.ORDERS)
  return dataclasses.replace(base, **{"num_chunks": M.CHUNKS, "block_t": 16, "summary_block_t": 16, **changes})


@pytest.mark.parametrize("chunks,steps", [(16, 32), (32, 16)])
def test_cema_with_mma_summaries_matches_the_fma_summaries_and_the_reference(chunks, steps):
  """cema_pallas (interpreter) with summary_mma on: y and every gradient against the FMA-summary
  kernels and the sequential reference, at B = 2, D = 16, N = 16, with 16 chunks of 32 steps and
  with 32 chunks of 16 (folded into the kernel's batch)."""
  batch, length, dim = 2, chunks * steps, 16
  coeffs, omega = _coefficients(dim, 3)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((batch, length, dim)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((batch, length, dim)), jnp.float32)

  def grads(fn):  # (y, gradients of sum(w y) by x, p, q, eta, omega)
    def loss(x, p, q, eta, omega):
      y = fn(x, type(coeffs)(p, q, eta), omega)
      return jnp.sum(w * y), y
    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, *coeffs, omega)
    return y, g

  mma_cfg = _config(length, dim, summary_mma=True, num_chunks=chunks)
  assert K._mma_plan(mma_cfg, K._plan(length, mma_cfg)) and K._plan(length, mma_cfg).count == chunks
  mma = grads(functools.partial(K.cema_pallas, interpret=True, config=mma_cfg))
  fma = grads(functools.partial(K.cema_pallas, interpret=True,
                                config=_config(length, dim, summary_mma=False, num_chunks=chunks)))
  ref = grads(K.cema_reference)
  for got, other, want in zip(jax.tree.leaves(mma), jax.tree.leaves(fma), jax.tree.leaves(ref)):
    # dx is bf16 (x's dtype): one bf16 step from the reference's rounding is allowed there.
    tol = 2.0 ** -8 if got.dtype == jnp.bfloat16 else 2e-5
    got, other, want = (np.asarray(v.astype(jnp.complex64) if jnp.iscomplexobj(v) else v.astype(jnp.float32))
                        for v in (got, other, want))
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(got, other, rtol=0, atol=1e-6 * scale)


def test_mma_summaries_only_where_they_apply(monkeypatch):
  """The forward takes the mma kernel for bf16 x without segment ids at 16 chunks, and the FMA
  kernel for float32 x, with segment ids, or at another chunk count; the backward never."""
  assert M.use_mma_summaries()  # the GPU's once-per-process check runs the kernel: before counting
  calls = []
  real = M.summary_planes
  monkeypatch.setattr(M, "summary_planes", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
  batch, length, dim = 1, M.CHUNKS * 16, 16
  coeffs, omega = _coefficients(dim, 5)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((batch, length, dim)), jnp.float32)
  seg = jnp.zeros((batch, length), jnp.int32).at[:, length // 2:].set(1)

  def run(x, config, segment_ids=None):
    calls.clear()
    fwd = lambda x: jnp.sum(K.cema_pallas(x, coeffs, omega, segment_ids=segment_ids, interpret=True,  # noqa: E731
                                          config=config))
    jax.make_jaxpr(jax.grad(fwd))(x)  # tracing is enough: the kernels are chosen while tracing
    return len(calls)

  cfg = _config(length, dim, summary_mma=True)
  assert run(x.astype(jnp.bfloat16), cfg) == 1
  assert run(x, cfg) == 0
  assert run(x.astype(jnp.bfloat16), cfg, seg) == 0
  assert run(x.astype(jnp.bfloat16), dataclasses.replace(cfg, num_chunks=8)) == 0
  assert run(x.astype(jnp.bfloat16), dataclasses.replace(cfg, num_chunks=12)) == 0
  assert run(x.astype(jnp.bfloat16), dataclasses.replace(cfg, summary_mma=False)) == 0


def test_the_gpu_check_accepts_a_correct_kernel_and_rejects_a_wrong_one(monkeypatch):
  """use_mma_summaries' once-per-process check, run here with the emulated kernel standing in for
  the compiled one: it passes, and a kernel whose output is off fails it with a warning."""
  real = M.summary_planes
  monkeypatch.setattr(M, "summary_planes", lambda x, b, q, interpret: real(x, b, q, interpret=True))
  assert M._check_on.__wrapped__("gpu") is True

  def wrong(x, b, q, interpret):
    re, im = real(x, b, q, interpret=True)
    return re, im.at[:, 3].multiply(1.001)

  monkeypatch.setattr(M, "summary_planes", wrong)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert M._check_on.__wrapped__("gpu") is False
  assert any("disagree" in str(w.message) for w in caught)


@pytest.mark.gpu
def test_compiled_mma_summaries_match_float64_on_the_gpu():
  """Compiled (inline mma.sync): the kernel's check passes and the summaries at D = 256, T = 256
  match a float64 sum (run with MEGALODON_TEST_PLATFORM=gpu on an sm_80+ GPU)."""
  if jax.default_backend() != "gpu":
    pytest.fail("needs a GPU (run with MEGALODON_TEST_PLATFORM=gpu)")
  assert M.use_mma_summaries()
  dim, steps = 256, 256
  q = _q(dim, 7)
  x = np.random.default_rng(8).standard_normal((1, M.CHUNKS * steps, dim)).astype(ml_dtypes.bfloat16)
  re, im = jax.jit(functools.partial(M.summary_planes, interpret=False))(jnp.asarray(x), *_tables(q))
  want = _float64_summaries(x, q)
  np.testing.assert_allclose(np.asarray(re) + 1j * np.asarray(im), want, rtol=0,
                             atol=2e-6 * np.abs(want).max())
