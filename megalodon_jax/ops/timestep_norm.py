"""TimestepNorm (SPEC §3): causal cumulative group normalisation with a carried state.

Features are split into G groups of K = D / G. At every step t the group mean m_t and population
variance v_t over the K features of that step are merged into running statistics as ONE
observation (Welford / Chan), and the step is normalised with the merged statistics:

  n' = n + 1;  delta = m_t - mu;  mu' = mu + delta / n'
  var' = (n var + v_t) / n' + delta^2 n / n'^2
  y_t = (x_t - mu') rsqrt(var' + eps) (w + 1) + b

Padded steps leave the statistics unchanged and output exactly 0. With `segment_ids` (packed
sequences) the statistics restart at count 0 at the first step t > 0 of every new run of equal ids.
Statistics are float32 whatever the input dtype.

The running statistics are prefix "sums" under `merge_stats`, an associative operator on
(count, mean, var) summaries, so they can be computed by a sequential scan (the reference), by a
parallel associative scan (the XLA fast path), or by the fused Pallas kernel; sequence-parallel
code combines per-shard summaries with the same operator.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

METHODS = ("sequential", "associative", "pallas")


class TimestepNormState(NamedTuple):
  """Running statistics per sequence and group.

  count: [B] int32 observations (steps) merged so far (shared by all groups of a sequence);
  mean, var: [B, G] float32 mean and population variance of everything merged so far.
  """
  count: jax.Array
  mean: jax.Array
  var: jax.Array


def initial_state(batch: int, num_groups: int) -> TimestepNormState:
  """The default prior: count 0, so its (zero) mean and variance carry no weight."""
  return TimestepNormState(count=jnp.zeros((batch,), jnp.int32),
                           mean=jnp.zeros((batch, num_groups), jnp.float32),
                           var=jnp.zeros((batch, num_groups), jnp.float32))


def merge_stats(a, b) -> TimestepNormState:
  """Chan's parallel merge of two (count, mean, var) summaries (population variance).

  a, b: anything with fields count [...], mean [..., G], var [..., G] (the count has the leading
  shape of mean without its group axis; leading shapes broadcast). The result summarises the
  union of both sets of observations. Associative; a zero-count `b` leaves `a` bit-for-bit
  unchanged, a zero-count `a` yields `b`, and when both counts are 0 the result is `a`.
  """
  na = jnp.asarray(a.count)
  nb = jnp.asarray(b.count)
  n = na + nb
  dtype = jnp.result_type(a.mean, b.mean)
  nf = n.astype(dtype)[..., None]
  nbf = nb.astype(dtype)[..., None]
  # Weight of b. The inner where keeps the division finite (and its gradient NaN-free) at n == 0.
  wb = jnp.where(nf > 0, nbf / jnp.where(nf > 0, nf, 1.0), 0.0)
  wa = 1.0 - wb
  delta = b.mean - a.mean
  mean = a.mean + wb * delta
  var = wa * a.var + wb * b.var + (wa * wb) * (delta * delta)
  return TimestepNormState(count=n, mean=mean, var=var)


def _segmented_merge(a, b):
  """Segmented version of merge_stats on (reset, count, mean, var): b restarts at its reset flag."""
  a_reset, a_count, a_mean, a_var = a
  b_reset, b_count, b_mean, b_var = b
  merged = merge_stats(TimestepNormState(a_count, a_mean, a_var),
                       TimestepNormState(b_count, b_mean, b_var))
  keep_b = b_reset[..., None]
  return (a_reset | b_reset,
          jnp.where(b_reset, b_count, merged.count),
          jnp.where(keep_b, b_mean, merged.mean),
          jnp.where(keep_b, b_var, merged.var))


def check_inputs(x: jax.Array, weight: jax.Array, bias: jax.Array, num_groups: int,
                 state: TimestepNormState | None, padding_mask: jax.Array | None,
                 segment_ids: jax.Array | None) -> None:
  """Raises ValueError describing the first malformed argument (shared with the Pallas kernel)."""
  if x.ndim != 3:
    raise ValueError(f"x must be [batch, length, dim], got shape {x.shape}")
  batch, length, dim = x.shape
  if num_groups <= 0 or dim % num_groups:
    raise ValueError(f"dim={dim} must be divisible by num_groups={num_groups}; "
                     "choose num_groups among the divisors of the model dim")
  for name, p in (("weight", weight), ("bias", bias)):
    if p.shape != (dim,):
      raise ValueError(f"{name} must have shape ({dim},) to match x's last dim, got {p.shape}")
  for name, m in (("padding_mask", padding_mask), ("segment_ids", segment_ids)):
    if m is not None and m.shape != (batch, length):
      raise ValueError(f"{name} must have shape (batch, length) = {(batch, length)}, got {m.shape}")
  if padding_mask is not None and padding_mask.dtype != jnp.bool_:
    raise ValueError(f"padding_mask must be bool (True = padded step), got {padding_mask.dtype}")
  if segment_ids is not None and not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype}")
  if state is not None:
    want = ((batch,), (batch, num_groups), (batch, num_groups))
    got = tuple(jnp.shape(s) for s in state)
    if got != want:
      raise ValueError(f"state (count, mean, var) must have shapes {want}, got {got}; "
                       "build one with initial_state(batch, num_groups)")


def stats_dtype(x: jax.Array) -> jnp.dtype:
  """float32 for float32/bfloat16 inputs; float64 inputs (gradient checks under x64) keep float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def step_stats(x: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
  """x: [B, L, D] -> per-step group mean and population variance, each [B, L, G] float32."""
  batch, length, dim = x.shape
  xg = x.astype(stats_dtype(x)).reshape(batch, length, num_groups, dim // num_groups)
  mean = jnp.mean(xg, axis=-1)
  var = jnp.mean(jnp.square(xg - mean[..., None]), axis=-1)
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def weighted_stats(x: jax.Array, num_groups: int, weight: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The union of the steps where `weight` holds, each step one observation of its group mean and
  variance (what a sequence slice hands on): count [B] int32, mean [B, G], var [B, G] (zero
  where count is 0). x: [B, L, D]; weight: [B, L] bool.

  mean = sum_t w_t m_t / n and var = sum_t w_t (v_t + (m_t - mean)^2) / n, with m_t, v_t the step
  statistics and n = sum_t w_t. Its gradient is one elementwise pass (custom VJP):
    dx[t, g, c] = w_t / (n S) (dmean_g + 2 dvar_g (x[t, g, c] - mean_g))      (S = D / G)
  (the terms through m_t and mean cancel), so the backward keeps x as it came (no float32 copy)
  and XLA fuses it with whatever adds to dx.
  """
  count, mean, var, _ = _weighted_stats(x, num_groups, weight)
  return count, mean, var


def _weighted_stats(x, num_groups, weight):
  step_mean, step_var = step_stats(x, num_groups)
  count = jnp.sum(weight, axis=1).astype(jnp.int32)
  w = weight.astype(step_mean.dtype)[..., None]
  denom = jnp.maximum(count, 1).astype(step_mean.dtype)[:, None]
  mean = jnp.sum(w * step_mean, axis=1) / denom
  var = jnp.sum(w * (step_var + jnp.square(step_mean - mean[:, None])), axis=1) / denom
  return count, mean, var, denom


def _weighted_stats_fwd(x, num_groups, weight):
  count, mean, var, denom = _weighted_stats(x, num_groups, weight)
  return (count, mean, var), (x, weight, mean, denom)


def _weighted_stats_bwd(num_groups, residuals, cotangents):
  x, weight, mean, denom = residuals
  _, dmean, dvar = cotangents
  batch, length, dim = x.shape
  dtype = mean.dtype
  scale = weight.astype(dtype)[:, :, None, None] / (denom * (dim // num_groups))[:, None, :, None]
  xg = x.astype(dtype).reshape(batch, length, num_groups, dim // num_groups)
  dx = scale * (dmean[:, None, :, None] + 2.0 * dvar[:, None, :, None] * (xg - mean[:, None, :, None]))
  return dx.reshape(x.shape).astype(x.dtype), None


weighted_stats.defvjp(_weighted_stats_fwd, _weighted_stats_bwd)


def reset_flags(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
  """[B, L] bool: True where the statistics restart (first step t > 0 of a new run of ids)."""
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.bool_)
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros((batch, 1), jnp.bool_), change], axis=1)


def _prefix_sequential(state: TimestepNormState, valid, reset, mean, var):
  """lax.scan over time: the reference recurrence. Returns per-step mean/var [B, L, G] and state."""
  zero = jax.tree.map(jnp.zeros_like, state)

  def step(carry, inputs):
    valid_t, reset_t, m_t, v_t = inputs
    carry = jax.tree.map(lambda z, c: jnp.where(_bcast(reset_t, c), z, c), zero, carry)
    obs = TimestepNormState(valid_t.astype(jnp.int32), m_t, v_t)
    carry = merge_stats(carry, obs)
    return carry, (carry.mean, carry.var)

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  final, (mu, sigma2) = jax.lax.scan(
      step, state, (time_major(valid), time_major(reset), time_major(mean), time_major(var)))
  return jnp.moveaxis(mu, 0, 1), jnp.moveaxis(sigma2, 0, 1), final


def _bcast(flag, like):
  """flag: [B] -> broadcastable against `like` ([B] or [B, G])."""
  return flag.reshape(flag.shape + (1,) * (like.ndim - flag.ndim))


def _prefix_associative(state: TimestepNormState, valid, reset, mean, var):
  """lax.associative_scan with the segmented merge; the incoming state is folded into step 0."""
  count = valid.astype(jnp.int32)
  first = merge_stats(state, TimestepNormState(count[:, 0], mean[:, 0], var[:, 0]))
  count = count.at[:, 0].set(first.count)
  mean = mean.at[:, 0].set(first.mean)
  var = var.at[:, 0].set(first.var)
  _, n, mu, sigma2 = jax.lax.associative_scan(_segmented_merge, (reset, count, mean, var), axis=1)
  final = TimestepNormState(n[:, -1], mu[:, -1], sigma2[:, -1])
  return mu, sigma2, final


def timestep_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, *, num_groups: int,
                  eps: float = 1e-5, state: TimestepNormState | None = None,
                  padding_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  method: str = "associative") -> tuple[jax.Array, TimestepNormState]:
  """Causal cumulative group norm.

  x: [B, L, D] float32 or bfloat16; weight, bias: [D] (weight is the stored offset, applied as
  weight + 1); state: TimestepNormState (count [B], mean [B, G], var [B, G]) before step 0, or None
  for initial_state; padding_mask: [B, L] bool, True = padded step; segment_ids: [B, L] int.
  method: "sequential" (lax.scan reference), "associative" (parallel scan, default XLA path) or
  "pallas" (fused kernel, kernels_pallas/timestep_norm.py).
  Returns y: [B, L, D] in x.dtype and the state after the last step.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  check_inputs(x, weight, bias, num_groups, state, padding_mask, segment_ids)
  if method == "pallas":
    from kernels_pallas.timestep_norm import timestep_norm_pallas  # Lazy: Pallas is optional.
    return timestep_norm_pallas(x, weight, bias, num_groups=num_groups, eps=eps, state=state,
                                padding_mask=padding_mask, segment_ids=segment_ids)
  if state is None:
    state = initial_state(x.shape[0], num_groups)
  return _timestep_norm_xla(x, weight, bias, state, padding_mask, segment_ids, num_groups=num_groups,
                            eps=eps, method=method)


@functools.partial(jax.jit, static_argnames=("num_groups", "eps", "method"))
def _timestep_norm_xla(x, weight, bias, state, padding_mask, segment_ids, *, num_groups, eps, method):
  """The XLA paths (jitted so that eager callers do not run the scan op by op)."""
  batch, length, _ = x.shape
  dtype = stats_dtype(x)
  state = TimestepNormState(jnp.asarray(state.count, jnp.int32), jnp.asarray(state.mean, dtype),
                            jnp.asarray(state.var, dtype))
  valid = (jnp.ones((batch, length), jnp.bool_) if padding_mask is None else ~padding_mask)
  reset = reset_flags(segment_ids, batch, length)
  step_mean, step_var = step_stats(x, num_groups)
  # Padded steps become zero-count observations: exact identities of merge_stats.
  step_mean = jnp.where(valid[..., None], step_mean, 0.0)
  step_var = jnp.where(valid[..., None], step_var, 0.0)
  prefix = _prefix_sequential if method == "sequential" else _prefix_associative
  mu, sigma2, final = prefix(state, valid, reset, step_mean, step_var)
  y = normalize(x, mu, sigma2, weight, bias, valid, eps)
  return y, final


def normalize(x: jax.Array, mu: jax.Array, sigma2: jax.Array, weight: jax.Array, bias: jax.Array,
              valid: jax.Array, eps: float) -> jax.Array:
  """x: [B, L, D]; mu, sigma2: [B, L, G]; valid: [B, L] -> y [B, L, D] in x.dtype (0 where padded)."""
  batch, length, dim = x.shape
  groups = mu.shape[-1]
  dtype = mu.dtype
  xg = x.astype(dtype).reshape(batch, length, groups, dim // groups)
  yg = (xg - mu[..., None]) * jax.lax.rsqrt(sigma2 + eps)[..., None]
  y = yg.reshape(batch, length, dim) * (weight.astype(dtype) + 1.0) + bias.astype(dtype)
  return jnp.where(valid[..., None], y, 0.0).astype(x.dtype)
