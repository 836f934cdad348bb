"""TimestepNorm in one pass each way on Hopper: the Mosaic GPU forward and backward joined by a custom VJP.

Forward (kernels_pallas/timestep_norm_mgpu.py) and backward (kernels_pallas/timestep_norm_mgpu_bwd.py) each
walk every (sequence, group) column slab once in time order (reverse for the backward), carrying the running
statistics or their adjoint; x is read once by the forward, x and dy once by the backward. The forward saves
the running mean and rsqrt(var + eps) of every step, [B, G, L] float32 each (1/16 of x's bytes at K = 64),
which is all the backward needs beside x.

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
from megalodon_jax.ops import timestep_norm as tsn_ops

ENV = "MEGALODON_TSN_SINGLE_PASS"
# Tilings measured on an H200 at B=1, L=32768, D=4096, G=64 bf16 (experiments/gpu_checks/probe_tsn_mgpu*.py,
# session 15): forward 4 warpgroups on 64-step tiles, 6 slots each; backward 2 warpgroups on 64-step tiles.
# strict_sync: the forward without it wrote wrong per-step outputs on the GPU in some tilings (W2 T128 S4, W3 T128
# S4, auto-barriers; never in W4 T64 S6, twice) and right ones with it; the cause is not found, so the full
# TMA-store waits stay on (0.248 against 0.230 ms for the forward alone).
FWD_OPTIONS = dict(block_t=64, stages=6, compute_wgs=4, strict_sync=True)
BWD_OPTIONS = dict(block_t=64, stages=4, tile_wgs=2)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _core(x, w_hat, bias, n0, mu0, var0, num_groups, eps, interpret):
  (y, mean, var), _ = _core_fwd(x, w_hat, bias, n0, mu0, var0, num_groups, eps, interpret)
  return y, mean, var


def _core_fwd(x, w_hat, bias, n0, mu0, var0, num_groups, eps, interpret):
  y, mu_run, rstd_run, mean, var = fwd_kernel.timestep_norm_fwd_mgpu(
      x, w_hat, bias, n0, mu0, var0, num_groups=num_groups, eps=eps, interpret=interpret or None, **FWD_OPTIONS)
  return (y, mean, var), (x, w_hat, mu_run, rstd_run, n0, mu0, var0)


def _core_bwd(num_groups, eps, interpret, residuals, cotangents):
  x, w_hat, mu_run, rstd_run, n0, mu0, var0 = residuals
  dy, g_mu, g_var = cotangents
  dx, dw, db, d_mu0, d_var0 = bwd_kernel.timestep_norm_bwd_mgpu(
      x, dy.astype(x.dtype), w_hat, mu_run, rstd_run, n0, mu0, var0, g_mu.astype(jnp.float32),
      g_var.astype(jnp.float32), num_groups=num_groups, eps=eps, interpret=interpret or False, **BWD_OPTIONS)
  return dx, dw, db, jnp.zeros_like(n0), d_mu0, d_var0


_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.jit, static_argnames=("num_groups", "eps", "interpret"))
def timestep_norm_single_pass(x: jax.Array, weight: jax.Array, bias: jax.Array, state: tsn_ops.TimestepNormState,
                              *, num_groups: int, eps: float, interpret=None):
  """x: [B, L, D] (16-bit); weight, bias: [D]; state: count [B], mean / var [B, G] -> (y [B, L, D], state).

  Differentiable in x, weight, bias and the state's mean and var (as timestep_norm_pallas). interpret: Mosaic GPU
  interpreter parameters (tests on the CPU), or None on a GPU.
  """
  batch, length, _ = x.shape
  w_hat = weight.astype(jnp.float32) + 1.0
  n0 = jnp.asarray(state.count, jnp.int32).astype(jnp.float32)
  y, mean, var = _core(x, w_hat, bias.astype(jnp.float32), n0, jnp.asarray(state.mean, jnp.float32),
                       jnp.asarray(state.var, jnp.float32), num_groups, eps, interpret)
  count = jnp.asarray(state.count, jnp.int32) + length
  return y, tsn_ops.TimestepNormState(count=count, mean=mean.reshape(batch, num_groups),
                                      var=var.reshape(batch, num_groups))
