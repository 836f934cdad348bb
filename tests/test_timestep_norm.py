"""TimestepNorm (SPEC §3): the XLA paths against a float64 numpy transcription of the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from megalodon_jax.ops import timestep_norm as tsn

METHODS = ("sequential", "associative")
B, L, D, G = 2, 40, 24, 4


def numpy_timestep_norm(x, weight, bias, num_groups, eps=1e-5, state=None, padding_mask=None,
                        segment_ids=None):
  """Step-by-step float64 transcription of SPEC §3 (Welford, one observation per step)."""
  x = np.asarray(x, np.float64)
  batch, length, dim = x.shape
  k = dim // num_groups
  y = np.zeros_like(x)
  if state is None:
    count, mean, var = np.zeros(batch, np.int64), np.zeros((batch, num_groups)), np.zeros((batch, num_groups))
  else:
    count, mean, var = (np.array(s, np.float64) for s in state)
    count = count.astype(np.int64)
  scale = np.asarray(weight, np.float64) + 1.0
  shift = np.asarray(bias, np.float64)
  for b in range(batch):
    n, mu, s2 = int(count[b]), mean[b].copy(), var[b].copy()
    for t in range(length):
      if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
        n, mu, s2 = 0, np.zeros(num_groups), np.zeros(num_groups)
      if padding_mask is not None and padding_mask[b, t]:
        continue
      xg = x[b, t].reshape(num_groups, k)
      m_t, v_t = xg.mean(-1), xg.var(-1)
      n1 = n + 1
      delta = m_t - mu
      mu = mu + delta / n1
      s2 = (n * s2 + v_t) / n1 + delta ** 2 * n / n1 ** 2
      n = n1
      y[b, t] = ((xg - mu[:, None]) / np.sqrt(s2[:, None] + eps)).reshape(dim) * scale + shift
    count[b], mean[b], var[b] = n, mu, s2
  return y, (count, mean, var)


def make_inputs(rng, batch=B, length=L, dim=D, groups=G, *, pad=False, segments=False, carry=False,
                offset=3.0):
  x = (offset + 2.0 * rng.standard_normal((batch, length, dim))).astype(np.float32)
  weight = (0.3 * rng.standard_normal(dim)).astype(np.float32)
  bias = (0.3 * rng.standard_normal(dim)).astype(np.float32)
  mask = (rng.random((batch, length)) < 0.25) if pad else None
  if pad:
    mask[0, :3] = True      # Padded start (count stays at the prior's).
    mask[-1, -4:] = True    # Padded tail.
  seg = None
  if segments:
    seg = np.cumsum(rng.random((batch, length)) < 0.15, axis=1).astype(np.int32)
    seg[0, 5] = seg[0, 4] + 7   # A one-step segment.
    seg[0, 6:] += 8
  state = None
  if carry:
    state = tsn.TimestepNormState(
        count=np.array([5, 0][:batch] + [3] * max(0, batch - 2), np.int32),
        mean=(offset + rng.standard_normal((batch, groups))).astype(np.float32),
        var=(1.0 + rng.random((batch, groups))).astype(np.float32))
  return x, weight, bias, mask, seg, state


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


@pytest.fixture(scope="module")
def jitted():
  """One jit per (method, num_groups) taking every optional input (neutral values stand in for
  absent ones, which the reference treats as absent), so that the tests share compilations."""
  cache = {}

  def get(method, groups=G):
    if (method, groups) not in cache:
      fn = jax.jit(lambda x, w, b, state, mask, seg: tsn.timestep_norm(
          x, w, b, num_groups=groups, state=state, padding_mask=mask, segment_ids=seg, method=method))

      def call(x, w, b, state, mask, seg):
        batch, length, _ = x.shape
        state = tsn.initial_state(batch, groups) if state is None else state
        mask = np.zeros((batch, length), bool) if mask is None else mask
        seg = np.zeros((batch, length), np.int32) if seg is None else seg
        return fn(x, w, b, state, mask, seg)
      cache[method, groups] = call
    return cache[method, groups]
  return get


CASES = {
    "padding": {"pad": True},
    "carried_state": {"carry": True},
    "segments": {"segments": True},
    "everything": {"pad": True, "segments": True, "carry": True},
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_numpy_reference(jitted, rng, method, case):
  x, w, b, mask, seg, state = make_inputs(rng, **CASES[case])
  y, new_state = jitted(method)(x, w, b, state, mask, seg)
  y_ref, (n_ref, mu_ref, var_ref) = numpy_timestep_norm(x, w, b, G, state=state, padding_mask=mask,
                                                        segment_ids=seg)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  assert rel_err(y, y_ref) < 1e-5
  np.testing.assert_array_equal(new_state.count, n_ref)
  assert new_state.count.dtype == jnp.int32
  assert rel_err(new_state.mean, mu_ref) < 1e-5
  assert rel_err(new_state.var, var_ref) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_optional_inputs_absent(rng, method):
  x, w, b, _, _, _ = make_inputs(rng)
  y, new_state = tsn.timestep_norm(x, w, b, num_groups=G, method=method)
  y_ref, (n_ref, _, var_ref) = numpy_timestep_norm(x, w, b, G)
  assert rel_err(y, y_ref) < 1e-5
  np.testing.assert_array_equal(new_state.count, n_ref)
  assert rel_err(new_state.var, var_ref) < 1e-5


def test_long_sequence_large_offset_methods_agree(jitted, rng):
  """Many steps, a mean far from 0, resets and padding: float32 statistics still match float64,
  and the sequential and associative scans agree closely."""
  x, w, b, mask, seg, state = make_inputs(rng, length=160, offset=30.0, pad=True, segments=True,
                                          carry=True)
  y_ref, (_, _, var_ref) = numpy_timestep_norm(x, w, b, G, state=state, padding_mask=mask,
                                               segment_ids=seg)
  y_seq, s_seq = jitted("sequential")(x, w, b, state, mask, seg)
  y_asc, s_asc = jitted("associative")(x, w, b, state, mask, seg)
  for y, s in ((y_seq, s_seq), (y_asc, s_asc)):
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(s.var, var_ref) < 1e-4
  np.testing.assert_allclose(y_asc, y_seq, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_two_pieces_equal_one_pass(jitted, rng, method):
  x, w, b, mask, seg, state = make_inputs(rng, pad=True, segments=True, carry=True)
  split = L // 2
  seg[:, split] = seg[:, split - 1]  # Statistics continue across the cut (no reset at t = 0).
  seg[:, split + 1:] = np.maximum(seg[:, split + 1:], seg[:, split:split + 1])
  y_full, s_full = jitted(method)(x, w, b, state, mask, seg)
  y1, s1 = jitted(method)(x[:, :split], w, b, state, mask[:, :split], seg[:, :split])
  y2, s2 = jitted(method)(x[:, split:], w, b, s1, mask[:, split:], seg[:, split:])
  np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y_full, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(s2.count, s_full.count)
  np.testing.assert_allclose(s2.mean, s_full.mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s2.var, s_full.var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_padded_steps_are_zero_and_keep_the_state(jitted, rng, method):
  x, w, b, _, _, state = make_inputs(rng, carry=True)
  state = state._replace(count=np.array([4, 0], np.int32))  # Count 0 with nonzero mean/var too.
  mask = np.zeros((B, L), bool)
  cut = L // 2
  mask[:, cut:] = True
  mask[1, :] = True                                          # A fully padded sequence.
  x[:, cut:] = 1e4 * rng.standard_normal((B, L - cut, D))    # Garbage under the padding.
  y, new_state = jitted(method)(x, w, b, state, mask, None)
  y = np.asarray(y)
  assert np.all(y[mask] == 0.0)
  _, before = jitted(method)(x[:, :cut], w, b, state, mask[:, :cut], None)
  np.testing.assert_array_equal(new_state.count, before.count)
  if method == "sequential":  # One merge per step in order: padded steps change nothing, bit for bit.
    np.testing.assert_array_equal(new_state.mean, before.mean)
    np.testing.assert_array_equal(new_state.var, before.var)
  else:  # The scan's merge tree depends on the length, so the rounding may differ by an ulp.
    np.testing.assert_allclose(new_state.mean, before.mean, rtol=1e-6)
    np.testing.assert_allclose(new_state.var, before.var, rtol=1e-6)
  np.testing.assert_array_equal(new_state.mean[1], state.mean[1])
  np.testing.assert_array_equal(new_state.var[1], state.var[1])


def numpy_stats(data):
  return len(data), data.mean(0) if len(data) else np.zeros(data.shape[1:]), \
      data.var(0) if len(data) else np.zeros(data.shape[1:])


@pytest.mark.parametrize("sizes", [(3, 5, 7), (1, 1, 1), (0, 4, 2), (6, 0, 3), (2, 9, 0)])
def test_merge_stats_associative_and_exact(rng, sizes):
  groups = 3
  parts = [5.0 + 3.0 * rng.standard_normal((n, groups)) for n in sizes]

  def summary(data):
    n, mean, var = numpy_stats(data)
    return tsn.TimestepNormState(jnp.array([n], jnp.int32), jnp.array(mean[None], jnp.float32),
                                 jnp.array(var[None], jnp.float32))
  a, b, c = (summary(p) for p in parts)
  left = tsn.merge_stats(tsn.merge_stats(a, b), c)
  right = tsn.merge_stats(a, tsn.merge_stats(b, c))
  n, mean, var = numpy_stats(np.concatenate(parts))
  for got in (left, right):
    assert int(got.count[0]) == n
    np.testing.assert_allclose(got.mean[0], mean, rtol=1e-6)
    np.testing.assert_allclose(got.var[0], var, rtol=1e-5)
  np.testing.assert_allclose(left.mean, right.mean, rtol=1e-6)
  np.testing.assert_allclose(left.var, right.var, rtol=1e-6)


def test_merge_stats_zero_counts():
  a = tsn.TimestepNormState(jnp.array([0, 4]), jnp.array([[2.0], [1.0]]), jnp.array([[3.0], [0.5]]))
  empty = tsn.TimestepNormState(jnp.array([0, 0]), jnp.zeros((2, 1)), jnp.zeros((2, 1)))
  right = tsn.merge_stats(a, empty)        # An empty right operand is an exact identity.
  for got, want in zip(right, a):
    np.testing.assert_array_equal(got, want)
  left = tsn.merge_stats(empty, a)         # An empty left operand gives the right one (if non-empty).
  np.testing.assert_array_equal(left.mean[1], a.mean[1])
  np.testing.assert_array_equal(left.var[1], a.var[1])
  assert np.all(np.isfinite(np.asarray(jax.grad(
      lambda m: tsn.merge_stats(empty, a._replace(mean=m)).mean.sum())(a.mean))))


@pytest.mark.parametrize("method", METHODS)
def test_gradients(rng, method):
  """check_grads (float64) w.r.t. x, weight, bias and the incoming state's mean and var."""
  batch, length, dim, groups = 2, 9, 6, 2
  x, w, b, mask, seg, state = make_inputs(rng, batch, length, dim, groups, pad=True, segments=True,
                                          carry=True, offset=1.0)
  mask[0, :3] = False  # Keep the carried state alive for a few steps of sequence 0.
  seg[0, :4] = seg[0, 0]
  with jax.enable_x64(True):
    count = jnp.asarray(state.count)
    weights = jnp.asarray(rng.standard_normal((batch, length, dim)))
    weights_s = jnp.asarray(rng.standard_normal((2, batch, groups)))

    def f(x, w, b, mean, var):
      y, s = tsn.timestep_norm(x, w, b, num_groups=groups, state=tsn.TimestepNormState(count, mean, var),
                               padding_mask=jnp.asarray(mask), segment_ids=jnp.asarray(seg), method=method)
      return jnp.sum(y * weights) + jnp.sum(s.mean * weights_s[0]) + jnp.sum(s.var * weights_s[1])

    args = tuple(jnp.asarray(a, jnp.float64) for a in (x, w, b, state.mean, state.var))
    grads = jax.grad(f, argnums=(3, 4))(*args)
    assert all(float(jnp.abs(g).max()) > 1e-3 for g in grads)  # The carried state matters.
    check_grads(f, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_bfloat16_input(jitted, rng):
  x, w, b, mask, seg, state = make_inputs(rng, pad=True, carry=True)
  xb = jnp.asarray(x, jnp.bfloat16)
  y, new_state = jitted("associative")(xb, w, b, state, mask, seg)
  assert y.dtype == jnp.bfloat16 and new_state.mean.dtype == jnp.float32
  y_ref, (_, _, var_ref) = numpy_timestep_norm(np.asarray(xb.astype(jnp.float32)), w, b, G, state=state,
                                               padding_mask=mask)
  assert rel_err(y.astype(jnp.float32), y_ref) < 1e-2
  assert rel_err(new_state.var, var_ref) < 1e-5  # The statistics stay float32.


def test_errors():
  x = jnp.zeros((2, 5, 12))
  w = jnp.zeros(12)
  with pytest.raises(ValueError, match="divisible by num_groups"):
    tsn.timestep_norm(x, w, w, num_groups=5)
  with pytest.raises(ValueError, match=r"\[batch, length, dim\]"):
    tsn.timestep_norm(x[0], w, w, num_groups=4)
  with pytest.raises(ValueError, match="weight must have shape"):
    tsn.timestep_norm(x, w[:6], w, num_groups=4)
  with pytest.raises(ValueError, match="padding_mask must have shape"):
    tsn.timestep_norm(x, w, w, num_groups=4, padding_mask=jnp.zeros((2, 4), bool))
  with pytest.raises(ValueError, match="segment_ids must have shape"):
    tsn.timestep_norm(x, w, w, num_groups=4, segment_ids=jnp.zeros((5, 2), jnp.int32))
  with pytest.raises(ValueError, match="state"):
    tsn.timestep_norm(x, w, w, num_groups=4, state=tsn.initial_state(2, 3))
  with pytest.raises(ValueError, match="method"):
    tsn.timestep_norm(x, w, w, num_groups=4, method="fft")


def test_weighted_stats_values_and_closed_form_gradient(rng):
  """weighted_stats (a sequence slice's statistics for sequence parallelism): values against
  float64 numpy over the weighted steps, and its closed-form backward against check_grads'
  finite differences (float64), with a row whose weights are all zero."""
  batch, length, dim, groups = 3, 11, 12, 3
  x = 2.0 + 1.5 * rng.standard_normal((batch, length, dim))
  weight = rng.random((batch, length)) < 0.6
  weight[1] = False
  weight[2, -1] = True
  count, mean, var = tsn.weighted_stats(jnp.asarray(x, jnp.float32), groups, jnp.asarray(weight))
  for b in range(batch):
    steps = x[b][weight[b]].reshape(-1, groups, dim // groups)
    assert int(count[b]) == len(steps)
    if len(steps) == 0:
      np.testing.assert_array_equal(mean[b], 0.0)
      np.testing.assert_array_equal(var[b], 0.0)
      continue
    m_t, v_t = steps.mean(-1), steps.var(-1)
    np.testing.assert_allclose(mean[b], m_t.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[b], (v_t + (m_t - m_t.mean(0)) ** 2).mean(0), rtol=1e-5, atol=1e-6)
  with jax.enable_x64(True):
    w_mean = jnp.asarray(rng.standard_normal((batch, groups)))
    w_var = jnp.asarray(rng.standard_normal((batch, groups)))

    def f(x):
      _, mean, var = tsn.weighted_stats(x, groups, jnp.asarray(weight))
      return jnp.sum(mean * w_mean) + jnp.sum(var * w_var)

    x64 = jnp.asarray(x, jnp.float64)
    check_grads(f, (x64,), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)
    dx = jax.grad(f)(x64)
    np.testing.assert_array_equal(dx[1], 0.0)  # no weighted step: no gradient
    assert float(jnp.abs(dx[0]).max()) > 1e-3
