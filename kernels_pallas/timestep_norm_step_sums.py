"""Per-tile sums of TimestepNorm over one half of every sequence (Pallas Triton, GPU), with their plain-JAX
references.

The single-pass kernels (timestep_norm_single_pass.py) can split every sequence in two halves in time and run
both halves at once (twice the programs: at B = 1, G = 64 they would otherwise fill 64 of an H200's 132 SMs).
The second half's forward then needs the statistics after the first half, and the first half's backward the
adjoint the second half sends back. Both are sums over a range of steps of quantities that need only each step's
own features (and, for the adjoint, the saved running statistics), so one plain pass gives them:

  tile_moments: per tile of T steps and group, the mean and population variance of the steps' group means m_t
    and variances v_t taken as observations (M = mean_t m_t, V = mean_t (v_t + (m_t - M)^2)); equal counts
    per tile make the merge over tiles two plain means.
  tile_adjoint_sums: per tile and group, with n_t = n_mid + t the running count (t counted from the start of the
    half, 1-based), r_t / mu_t the saved running rsqrt(var + eps) / mean, s1_t = sum_k dy w^ and
    s2_t = sum_k dy w^ (x - mu_t) over the group's features, l_mu = -r s1 and l_var = -r^3 s2 / 2:
      a = sum_t l_var_t / n_t,   b = sum_t (l_mu_t - 2 (mu_t - mu_mid) l_var_t) / n_t.

Each program reads one [T, Gb, K] tile of x (and dy) and writes one number per group and output, so the pass
runs at the card's read bandwidth with nothing written back but the sums. x, dy: [B, L, D] (viewed
[B, L, G, K], a free reshape); outputs [B, tiles, G] float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class Tiling:
  """block_t: steps per program (power of 2); block_groups: groups per program (a power of 2, at most G's largest
  power-of-2 divisor); num_warps: Triton warps per program."""
  block_t: int = 64
  block_groups: int = 4
  num_warps: int = 4


DEFAULT = Tiling()


def _check(x_shape, num_groups: int, tiling: Tiling) -> None:
  _, length, dim = x_shape
  if num_groups <= 0 or dim % num_groups:
    raise ValueError(f"dim={dim} must be divisible by num_groups={num_groups}")
  k = dim // num_groups
  if k & (k - 1):
    raise ValueError(f"the step sums kernels need K = D / G a power of 2, got {k}")
  if length % (2 * tiling.block_t):
    raise ValueError(f"L={length} must be a multiple of 2 x {tiling.block_t} steps (whole tiles in each half)")


def _layout(x_shape, num_groups: int, tiling: Tiling, first_tile: int):
  batch, length, dim = x_shape
  t = tiling.block_t
  gb = min(tiling.block_groups, num_groups & -num_groups)  # a power of 2 dividing G
  seq = pl.BlockSpec((None, t, gb, dim // num_groups), lambda b, g, i: (b, i + first_tile, g, 0))
  sums = pl.BlockSpec((None, None, gb), lambda b, g, i: (b, i, g))
  tiles = length // 2 // t
  grid = (batch, num_groups // gb, tiles)
  return grid, gb, seq, sums, jax.ShapeDtypeStruct((batch, tiles, num_groups), jnp.float32)


def _call(kernel, grid, in_specs, out_specs, out_shape, name, tiling: Tiling, interpret):
  kwargs = {}
  if not interpret:
    from kernels_pallas.triton_backend import plgpu
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=1)
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        interpret=bool(interpret), name=name, **kwargs)


def _moments_kernel(x_ref, mean_ref, var_ref):
  x = x_ref[...].astype(jnp.float32)               # [T, Gb, K]
  m = jnp.mean(x, axis=-1)                         # [T, Gb]
  v = jnp.mean(jnp.square(x - m[:, :, None]), axis=-1)
  mean = jnp.mean(m, axis=0)                       # [Gb]
  mean_ref[...] = mean
  var_ref[...] = jnp.mean(v + jnp.square(m - mean[None]), axis=0)


def _adjoint_kernel(x_ref, dy_ref, w_ref, mu_ref, rstd_ref, n_mid_ref, mu_mid_ref, a_ref, b_ref, *, block_t: int):
  x = x_ref[...].astype(jnp.float32)               # [T, Gb, K]
  dyw = dy_ref[...].astype(jnp.float32) * w_ref[...][None]
  mu = mu_ref[...].T                               # [Gb, T] saved -> [T, Gb]
  rstd = rstd_ref[...].T
  s1 = jnp.sum(dyw, axis=-1)                       # [T, Gb]
  s2 = jnp.sum(dyw * (x - mu[:, :, None]), axis=-1)
  l_mu = -rstd * s1
  l_var = -0.5 * rstd * rstd * rstd * s2
  steps = (pl.program_id(2) * block_t + 1 + jnp.arange(block_t, dtype=jnp.int32)).astype(jnp.float32)
  inv_n = 1.0 / (n_mid_ref[...][None] + steps[:, None])       # [T, Gb]
  a_ref[...] = jnp.sum(l_var * inv_n, axis=0)
  b_ref[...] = jnp.sum((l_mu - 2.0 * (mu - mu_mid_ref[...][None]) * l_var) * inv_n, axis=0)


@functools.partial(jax.jit, static_argnames=("num_groups", "tiling", "interpret"))
def tile_moments(x: jax.Array, *, num_groups: int, tiling: Tiling = DEFAULT, interpret: bool = False):
  """x: [B, L, D] -> (M, V) [B, tiles, G] float32 for the tiles of the first half of every sequence."""
  _check(x.shape, num_groups, tiling)
  batch, length, dim = x.shape
  grid, _, seq, sums, out_shape = _layout(x.shape, num_groups, tiling, 0)
  x4 = x.reshape(batch, length, num_groups, dim // num_groups)
  return _call(_moments_kernel, grid, [seq], [sums, sums], [out_shape] * 2, "timestep_norm_half_moments", tiling,
               interpret)(x4)


@functools.partial(jax.jit, static_argnames=("num_groups", "tiling", "interpret"))
def tile_adjoint_sums(x: jax.Array, dy: jax.Array, w_hat: jax.Array, mu_run: jax.Array, rstd_run: jax.Array,
                      n_mid: jax.Array, mu_mid: jax.Array, *, num_groups: int, tiling: Tiling = DEFAULT,
                      interpret: bool = False):
  """(a, b) [B, tiles, G] float32 (module docstring) for the tiles of the second half of every sequence.

  x, dy: [B, L, D]; w_hat: [D] float32; mu_run, rstd_run: [2B, G, L / 2] float32, the running statistics of
  both halves as the split kernels return them (sequence b's second half at row 2b + 1); n_mid: [B] float32
  count and mu_mid: [B, G] float32 mean of the state the second half starts from.
  """
  _check(x.shape, num_groups, tiling)
  batch, length, dim = x.shape
  half = length // 2
  if dy.shape != x.shape or w_hat.shape != (dim,):
    raise ValueError(f"dy must have x's shape {x.shape} and w_hat ({dim},); got {dy.shape}, {w_hat.shape}")
  for name, a in (("mu_run", mu_run), ("rstd_run", rstd_run)):
    if a.shape != (2 * batch, num_groups, half):
      raise ValueError(f"{name} must be [2B, G, L / 2] = {(2 * batch, num_groups, half)}, got {a.shape}")
  t = tiling.block_t
  grid, gb, seq, sums, out_shape = _layout(x.shape, num_groups, tiling, half // t)
  k = dim // num_groups
  feat = pl.BlockSpec((gb, k), lambda b, g, i: (g, 0))
  stats = pl.BlockSpec((None, gb, t), lambda b, g, i: (2 * b + 1, g, i))
  per_group = pl.BlockSpec((None, gb), lambda b, g, i: (b, g))
  n_mid = jnp.broadcast_to(n_mid.astype(jnp.float32)[:, None], (batch, num_groups))
  x4, dy4 = (a.reshape(batch, length, num_groups, k) for a in (x, dy))
  return _call(functools.partial(_adjoint_kernel, block_t=t), grid,
               [seq, seq, feat, stats, stats, per_group, per_group], [sums, sums], [out_shape] * 2,
               "timestep_norm_half_adjoint", tiling, interpret)(
                   x4, dy4, w_hat.astype(jnp.float32).reshape(num_groups, k), mu_run, rstd_run, n_mid,
                   mu_mid.astype(jnp.float32))


def tile_moments_reference(x, *, num_groups: int, block_t: int = DEFAULT.block_t):
  """Plain-JAX tile_moments."""
  batch, length, dim = x.shape
  xg = x[:, :length // 2].astype(jnp.float32).reshape(batch, -1, block_t, num_groups, dim // num_groups)
  m = jnp.mean(xg, axis=-1)                        # [B, tiles, T, G]
  v = jnp.mean(jnp.square(xg - m[..., None]), axis=-1)
  mean = jnp.mean(m, axis=2)
  return mean, jnp.mean(v + jnp.square(m - mean[:, :, None]), axis=2)


def tile_adjoint_sums_reference(x, dy, w_hat, mu_run, rstd_run, n_mid, mu_mid, *, num_groups: int,
                                block_t: int = DEFAULT.block_t):
  """Plain-JAX tile_adjoint_sums."""
  batch, length, dim = x.shape
  half = length // 2
  shape = (batch, half, num_groups, dim // num_groups)
  xg = x[:, half:].astype(jnp.float32).reshape(shape)
  dyw = (dy[:, half:].astype(jnp.float32) * w_hat.astype(jnp.float32)).reshape(shape)
  mu = jnp.swapaxes(mu_run[1::2], 1, 2)           # [B, L / 2, G]
  rstd = jnp.swapaxes(rstd_run[1::2], 1, 2)
  s1 = jnp.sum(dyw, axis=-1)
  s2 = jnp.sum(dyw * (xg - mu[..., None]), axis=-1)
  l_mu, l_var = -rstd * s1, -0.5 * rstd ** 3 * s2
  inv_n = 1.0 / (n_mid[:, None, None] + jnp.arange(1, half + 1, dtype=jnp.float32)[None, :, None])
  a = l_var * inv_n
  b = (l_mu - 2.0 * (mu - mu_mid[:, None]) * l_var) * inv_n
  tiles = lambda v: jnp.sum(v.reshape(batch, -1, block_t, num_groups), axis=2)  # noqa: E731
  return tiles(a), tiles(b)
