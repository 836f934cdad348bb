"""TimestepNorm in one pass each way on Hopper: the Mosaic GPU forward and backward joined by a custom VJP.

Forward (kernels_pallas/timestep_norm_mgpu.py) and backward (kernels_pallas/timestep_norm_mgpu_bwd.py) each
walk every (sequence, group) column slab once in time order (reverse for the backward), carrying the running
statistics or their adjoint; x is read once by the forward, x and dy once by the backward. The forward saves
the running mean and rsqrt(var + eps) of every step, [B, G, L] float32 each (1/16 of x's bytes at K = 64),
which is all the backward needs beside x.

Two halves at once (time_splits, MEGALODON_TSN_TIME_SPLITS): one program per column slab leaves an H200 half idle
at B = 1, G = 64 (64 programs, 132 SMs). With splits=2 each sequence is run as two sequences of L / 2 steps in one
launch of each kernel. The second half's forward starts from the state after the first half, which a plain pass
over the first half sums (timestep_norm_step_sums.tile_moments, merged into the prior with merge_stats); the first
half's backward starts from the adjoint the second half sends back, which a plain pass over the second half sums in
closed form (tile_adjoint_sums, see _adjoint_at_half). That costs one extra read of half of x forward and of half
of x and dy backward, and buys twice the programs: 0.532 against 0.641 ms fwd+bwd on an H200 (session 16).

`timestep_norm_pallas` (kernels_pallas/timestep_norm.py) sends calls here on a compute-capability 9.x GPU
when `supported` says the shapes fit (no padding mask, no segment ids, K a multiple of 64, L a multiple of the
tiles); MEGALODON_TSN_SINGLE_PASS=0 keeps the two-pass Triton kernels, =1 makes an unsupported call an error
instead of a silent fallback. Same semantics and state contract as megalodon_jax.ops.timestep_norm.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from kernels_pallas import timestep_norm_mgpu as fwd_kernel
from kernels_pallas import timestep_norm_mgpu_bwd as bwd_kernel
from kernels_pallas import timestep_norm_step_sums as step_sums
from megalodon_jax.ops import timestep_norm as tsn_ops

ENV = "MEGALODON_TSN_SINGLE_PASS"
# Tilings measured on an H200 at B=1, L=32768, D=4096, G=64 bf16 (experiments/gpu_checks/probe_tsn_mgpu*.py,
# session 15): forward 4 warpgroups on 64-step tiles, 6 slots each; backward 2 warpgroups on 64-step tiles.
# strict_sync: the forward without it wrote wrong per-step outputs on the GPU in some tilings (W2 T128 S4, W3 T128
# S4, auto-barriers; never in W4 T64 S6, twice) and right ones with it; the cause is not found, so the full
# TMA-store waits stay on (0.248 against 0.230 ms for the forward alone).
FWD_OPTIONS = dict(block_t=64, stages=6, compute_wgs=4, strict_sync=True)
BWD_OPTIONS = dict(block_t=64, stages=4, tile_wgs=2)
SPLITS_ENV = "MEGALODON_TSN_TIME_SPLITS"
# Tilings of the half-sequence sums (experiments/gpu_checks/probe_tsn_half_sums.py on an H200, session 16): the
# moments 0.054-0.058 ms at 64 steps x 4 groups; the adjoint sums 0.099 ms at 32 steps x 2 groups, 2 warps, against
# 0.123-0.131 at 64 x 4 (the saved statistics' [Gb, T] blocks are transposed in registers).
HALF_MOMENTS_TILING = step_sums.Tiling(block_t=64, block_groups=4, num_warps=4)
HALF_ADJOINT_TILING = step_sums.Tiling(block_t=32, block_groups=2, num_warps=2)
# A half must hold whole tiles of both kernels and of the step sums.
_SPLIT_QUANTUM = max(FWD_OPTIONS["block_t"], BWD_OPTIONS["block_t"], HALF_MOMENTS_TILING.block_t,
                     HALF_ADJOINT_TILING.block_t)


def mode() -> str:
  """'auto' (unset), 'off' (0) or 'force' (1), from MEGALODON_TSN_SINGLE_PASS."""
  value = os.environ.get(ENV, "")
  if value in ("", "auto"):
    return "auto"
  if value in ("0", "1"):
    return "off" if value == "0" else "force"
  raise ValueError(f"{ENV}={value!r}: use 0 (two-pass Triton kernels), 1 (single pass, errors if unsupported) "
                   "or leave it unset")


def _on_hopper() -> bool:
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def why_not(x_shape, dtype, num_groups: int, padding_mask, segment_ids) -> str | None:
  """None when the single-pass kernels take this call, else the reason (for errors under MEGALODON_TSN_SINGLE_PASS=1)."""
  if not _on_hopper():
    return "needs a compute-capability 9.x (Hopper) GPU"
  if padding_mask is not None or segment_ids is not None:
    return "padding masks and segment ids are handled only by the two-pass Triton kernels"
  try:
    fwd_kernel._check(x_shape, dtype, num_groups, FWD_OPTIONS["block_t"], FWD_OPTIONS["stages"],
                      FWD_OPTIONS["compute_wgs"], padding_mask=None, segment_ids=None)
    batch, length, dim = x_shape
    groups = (batch, num_groups)
    spec = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    bwd_kernel._check(spec(x_shape, dtype), spec(x_shape, dtype), spec((dim,)), spec((*groups, length)),
                      spec((*groups, length)), spec((batch,)), spec(groups), spec(groups), num_groups=num_groups,
                      block_t=BWD_OPTIONS["block_t"], stages=BWD_OPTIONS["stages"], wgs=1,
                      tile_wgs=BWD_OPTIONS["tile_wgs"], padding_mask=None, segment_ids=None)
  except ValueError as e:
    return str(e)
  return None


def time_splits(batch: int, length: int, dim: int, num_groups: int) -> int:
  """How many consecutive time ranges each sequence is cut into (1 or 2), from MEGALODON_TSN_TIME_SPLITS or,
  unset, 2 when twice the B * G programs still fit one wave on the GPU's SMs, L splits into whole tiles and
  K = D / G is a power of 2 (the step sums' tiles)."""
  value = os.environ.get(SPLITS_ENV, "")
  if value not in ("", "auto", "1", "2"):
    raise ValueError(f"{SPLITS_ENV}={value!r}: use 1, 2 or leave it unset (auto)")
  k = dim // num_groups
  fits = length % (2 * _SPLIT_QUANTUM) == 0 and k & (k - 1) == 0
  if value in ("1", "2"):
    if value == "2" and not fits:
      raise ValueError(f"{SPLITS_ENV}=2 needs L a multiple of {2 * _SPLIT_QUANTUM} steps and K = D / G a power "
                       f"of 2, got L={length}, K={k}")
    return int(value)
  return 2 if fits and 2 * batch * num_groups <= _sm_count() else 1


def _sm_count() -> int:
  """Streaming multiprocessors of the first device (132 on an H200; 132 where the device does not say)."""
  return getattr(jax.devices()[0], "core_count", None) or 132


def _stack_halves(first, second):
  """[B, ...] twice -> [2B, ...] with each sequence's first half before its second (x.reshape(2B, L / 2, D)'s order)."""
  return jnp.stack([first, second], axis=1).reshape(-1, *first.shape[1:])


def _halves(a):
  """[2B, ...] -> (first halves [B, ...], second halves [B, ...])."""
  a = a.reshape(-1, 2, *a.shape[1:])
  return a[:, 0], a[:, 1]


def _state_after_first_half(x, n0, mu0, var0, num_groups, interpret):
  """The running (count, mean, var) [B], [B, G] after the first half of x [B, L, D], merged into the prior, from
  per-tile moments of the half (each step one observation, as the kernels merge them; equal counts per tile)."""
  half = x.shape[1] // 2
  tile_mean, tile_var = step_sums.tile_moments(x, num_groups=num_groups, tiling=HALF_MOMENTS_TILING,
                                               interpret=interpret)  # [B, tiles, G]
  mean = jnp.mean(tile_mean, axis=1)
  var = jnp.mean(tile_var + jnp.square(tile_mean - mean[:, None]), axis=1)
  merged = tsn_ops.merge_stats(tsn_ops.TimestepNormState(n0, mu0, var0),
                               tsn_ops.TimestepNormState(jnp.full_like(n0, half), mean, var))
  return merged.count, merged.mean, merged.var


def _adjoint_at_half(x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid, g_mu, g_var, num_groups, interpret):
  """The cotangent (d mean, d var) [B, G] of the running statistics after the first half of x: what the second
  half's loss (its y through dy, and the final state through g_mu, g_var) sends back to them.

  x, dy: [B, L, D]; mu_run, rstd_run: [2B, G, L / 2], both halves' running statistics (the second half's at odd
  rows); n_mid [B], mu_mid [B, G]: the state the second half starts from. With n_t = n_mid + t (t = 1 .. L / 2)
  the running count, the per-step adjoints l_mu = -r_t sum dy w^ and l_var = -r_t^3 / 2 sum dy w^ (x - mu_t)
  plus the final-state cotangents at the last step, and the running sums A_t = n_mid mu_mid + sum m_s,
  B_t = n_mid (var_mid + mu_mid^2) + sum (v_s + m_s^2) (so mu_t = A_t / n_t, var_t = B_t / n_t - mu_t^2):
    d var_mid = n_mid sum_t l_var_t / n_t
    d mu_mid  = n_mid sum_t (l_mu_t - 2 (mu_t - mu_mid) l_var_t) / n_t
  (mu_t - mu_mid rather than mu_t, so nothing cancels when the mean is large against the spread). The sums over
  steps are step_sums.tile_adjoint_sums; the final-state terms are added here.
  """
  half = x.shape[1] // 2
  a, b = step_sums.tile_adjoint_sums(x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid, num_groups=num_groups,
                                     tiling=HALF_ADJOINT_TILING, interpret=interpret)
  inv_n_end = 1.0 / (n_mid + half)[:, None]
  mu_end = mu_run[1::2, :, -1]
  d_var = n_mid[:, None] * (jnp.sum(a, axis=1) + g_var * inv_n_end)
  d_mu = n_mid[:, None] * (jnp.sum(b, axis=1) + (g_mu - 2.0 * (mu_end - mu_mid) * g_var) * inv_n_end)
  return d_mu, d_var


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _core(x, w_hat, bias, n0, mu0, var0, num_groups, eps, interpret, splits):
  (y, mean, var), _ = _core_fwd(x, w_hat, bias, n0, mu0, var0, num_groups, eps, interpret, splits)
  return y, mean, var


def _core_fwd(x, w_hat, bias, n0, mu0, var0, num_groups, eps, interpret, splits):
  batch, length, dim = x.shape
  if splits == 2:
    # Both halves of every sequence at once, as 2B sequences of L / 2 steps; the second starts from the state
    # after the first, summed by a plain pass over the first half.
    mid = _state_after_first_half(x, n0, mu0, var0, num_groups, interpret is not None)
    xs = x.reshape(2 * batch, length // 2, dim)
    n0s, mu0s, var0s = (_stack_halves(a, b) for a, b in zip((n0, mu0, var0), mid))
  else:
    xs, n0s, mu0s, var0s = x, n0, mu0, var0
  y, mu_run, rstd_run, mean, var = fwd_kernel.timestep_norm_fwd_mgpu(
      xs, w_hat, bias, n0s, mu0s, var0s, num_groups=num_groups, eps=eps, interpret=interpret or None,
      **FWD_OPTIONS)
  if splits == 2:
    y = y.reshape(batch, length, dim)
    mean, var = _halves(mean.reshape(2 * batch, num_groups))[1], _halves(var.reshape(2 * batch, num_groups))[1]
  return (y, mean, var), (x, w_hat, mu_run, rstd_run, n0s, mu0s, var0s)


def _core_bwd(num_groups, eps, interpret, splits, residuals, cotangents):
  x, w_hat, mu_run, rstd_run, n0s, mu0s, var0s = residuals
  dy, g_mu, g_var = cotangents
  dy = dy.astype(x.dtype)
  g_mu, g_var = (jnp.asarray(g, jnp.float32).reshape(x.shape[0], num_groups) for g in (g_mu, g_var))
  batch, length, dim = x.shape
  xs, dys = x, dy
  if splits == 2:
    # The first half's final state gets the adjoint the second half sends back, summed by a plain pass over
    # the second half, so both halves' reverse walks run at once.
    g_mid = _adjoint_at_half(x, dy, w_hat, mu_run, rstd_run, _halves(n0s)[1], _halves(mu0s)[1], g_mu, g_var,
                             num_groups, interpret is not None)
    g_mu, g_var = _stack_halves(g_mid[0], g_mu), _stack_halves(g_mid[1], g_var)
    xs, dys = x.reshape(2 * batch, length // 2, dim), dy.reshape(2 * batch, length // 2, dim)
  dx, dw, db, d_mu0, d_var0 = bwd_kernel.timestep_norm_bwd_mgpu(
      xs, dys, w_hat, mu_run, rstd_run, n0s, mu0s, var0s, g_mu, g_var, num_groups=num_groups, eps=eps,
      interpret=interpret or False, **BWD_OPTIONS)
  if splits == 2:
    dx = dx.reshape(batch, length, dim)
    d_mu0, d_var0 = _halves(d_mu0)[0], _halves(d_var0)[0]
  n0 = n0s if splits == 1 else _halves(n0s)[0]
  return dx, dw, db, jnp.zeros_like(n0), d_mu0, d_var0


_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.jit, static_argnames=("num_groups", "eps", "interpret", "splits"))
def timestep_norm_single_pass(x: jax.Array, weight: jax.Array, bias: jax.Array, state: tsn_ops.TimestepNormState,
                              *, num_groups: int, eps: float, interpret=None, splits: int | None = None):
  """x: [B, L, D] (16-bit); weight, bias: [D]; state: count [B], mean / var [B, G] -> (y [B, L, D], state).

  Differentiable in x, weight, bias and the state's mean and var (as timestep_norm_pallas). interpret: Mosaic GPU
  interpreter parameters (tests on the CPU), or None on a GPU. splits: time ranges per sequence run at once (1 or
  2; None: time_splits(...)).
  """
  batch, length, dim = x.shape
  if splits is None:
    splits = time_splits(batch, length, dim, num_groups)
  if splits not in (1, 2) or (splits == 2 and length % (2 * _SPLIT_QUANTUM)):
    raise ValueError(f"splits={splits}: use 1, or 2 with L a multiple of {2 * _SPLIT_QUANTUM} (got L={length})")
  w_hat = weight.astype(jnp.float32) + 1.0
  n0 = jnp.asarray(state.count, jnp.int32).astype(jnp.float32)
  y, mean, var = _core(x, w_hat, bias.astype(jnp.float32), n0, jnp.asarray(state.mean, jnp.float32),
                       jnp.asarray(state.var, jnp.float32), num_groups, eps, interpret, splits)
  count = jnp.asarray(state.count, jnp.int32) + length
  return y, tsn_ops.TimestepNormState(count=count, mean=mean.reshape(batch, num_groups),
                                      var=var.reshape(batch, num_groups))
