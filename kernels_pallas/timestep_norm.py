"""Fused Pallas kernels for TimestepNorm (SPEC §3), forward and backward (jax.custom_vjp).

Semantics are those of megalodon_jax.ops.timestep_norm (read its docstring); this module only
changes how the statistics are evaluated.

Design (one program per (sequence, group) and time split; groups and batches are in the grid):
  * Forward: the program walks its time range in tiles of T steps, carrying the running
    (count, mean, var) of its group. Per tile it reads x once, forms the per-step group mean and
    variance, turns them into running statistics with masked [T, T] prefix sums (shifted by the
    carried mean so nothing cancels catastrophically), writes y once and merges the tile into the
    carry. The carry at the start of every tile and the tile's shift (16 bytes) are saved for
    the backward.
  * Backward: the same tiles in reverse order, carrying the adjoint (d mean, d var) of the running
    statistics. Per tile it reads x and dy once, recomputes the statistics from the saved carry,
    solves the reverse recurrence of the Welford merges in closed form (it telescopes into
    reverse prefix sums weighted by the counts), writes dx once and accumulates the per-feature
    weight/bias gradients; the adjoint left at the start is the gradient of the incoming state.
  * Optional time splits (time_splits=S > 1): S programs per (sequence, group) cover consecutive
    ranges. A summary pre-pass (forward: the range's (count, mean, var); backward: the range's
    affine adjoint map) plus an O(S) combine in XLA give each range its carry. This buys
    parallelism when batch * groups is small, at the price of one extra read of x (and dy).
  Bytes with S = 1: forward reads x, writes y; backward reads x and dy, writes dx; the rest is
  O(B G L / T).

Backward in closed form. Within a tile and a segment, with n_t the running count after step t,
m_t the step mean, mu_t / r_t the running mean / rsqrt(var + eps), delta_t = m_t - mu_{t-1},
e_t = m_t - mu_t and the local adjoints of y_t, l_mu_t = -r_t sum_k dy w^ and
l_var_t = -r_t^3 / 2 sum_k dy w^ (x - mu_t), the adjoints of the running (mean, var) are
  G_var_t = n_t SV_t + P_t U_var,   SV_t = sum_{s>=t} l_var_s / n_s
  G_mu_t  = n_t (sum_{s>=t} l_mu_s / n_s - sum_{s>t} 2 delta_s SV_s / n_s)
            + P_t (U_mu - U_var sum_{s>t} 2 delta_s / n_s)
where (U_mu, U_var) is the adjoint arriving from after the tile and P_t = n_t / n_end is the
product of (1 - 1/n) along the rest of the segment; then
  dx_t = r_t w^ dy_t + (G_mu_t + 2 e_t G_var_t) / (n_t K) + 2 G_var_t (x_t - m_t) / (n_t K).

Numerics: the release adds Kahan compensation to its step-by-step Welford updates; here every
tile is summed relative to a shift (the carried mean) and merged into the carry with Chan's
formula, so rounding grows with the number of tiles, not of steps. Counts inside the kernels are
float32 (exact below 2**24 steps); the returned count is computed exactly in int32 outside.

Tiled GPU design (KernelConfig(tiled=TiledConfig(...)); see its section below): for a few long
sequences, one program per (sequence, time tile, block of groups) instead: a summary pass, a
small scan over tiles and a main pass (forward: x read twice; backward: x and dy read twice).
Same semantics, API and features; the per-tile math is the code shared above. The GPU default
(GPU_DEFAULT) uses its step-wise backward (TiledConfig.backward="steps", see "Step-wise
backward"): two plain passes over x and dy around small kernels on per-step sums. (Single-pass
variants that chain tiles by a decoupled look-back were tried: Triton on an H200 rejected their
atomics, so they were dropped; branch tsn2 has them.)

Backends: "triton" (GPU; one program per (sequence, group, split), tiles read with masked loads,
power-of-2 tile shapes) and "mosaic" (TPU; one program per sequence holding all groups, Pallas
pipelines [T, D] blocks along a sequential time grid axis, group and time sums are matmuls). Both
share the per-tile math below and run through the Pallas interpreter on CPU (interpret=True is
the default there). The Mosaic variant has only been run interpreted and lowered for a TPU
target, not compiled on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from megalodon_jax.ops import timestep_norm as tsn_ops

TimestepNormState = tsn_ops.TimestepNormState

# Per tile, the forward saves for the backward: the carried (count, mean, var) and the shift.
_SAVED = 4

# Bits of the per-step flags array handed to the kernels.
_VALID = 1
_RESET = 2


@dataclasses.dataclass(frozen=True)
class TiledConfig:
  """Tunables of the tiled GPU design (see "GPU tiled design" below).

  block_t: time steps per tile (power of 2); groups_per_block: groups per program (power of 2;
  capped by the largest power of 2 dividing num_groups); num_warps: Triton warps of the per-tile
  kernels; scan_chunk: tiles merged per step of the (sequential) scans over tiles (power of 2);
  scan_groups: groups per program of those scans; scan_warps: their Triton warps (and those of
  the per-step kernels). backward: "tiles" (per tile, summary and main kernels that each
  recompute the statistics and reverse recurrence on the [T, Gb, K] tile) or "steps" (two plain
  passes over x and dy around small kernels on per-step sums; see "Step-wise backward");
  step_groups: groups per program of the step-wise backward's per-step kernels; pass_block_t,
  pass_groups: tile shape (steps, groups) of its two passes over x and dy (0: block_t,
  groups_per_block); pass_tiles: consecutive tiles per program of the second pass (dx), which
  accumulates dw, db over them in registers (fewer partial sums to write and add up);
  groups_fastest: launch the per-tile kernels with the group blocks as the fastest grid axis
  (CUDA's x), so that programs resident at the same time read whole [D] rows of x between them,
  instead of walking down one group block's column of tiles (the time axis fastest)."""
  block_t: int = 64
  groups_per_block: int = 2
  num_warps: int = 4
  scan_chunk: int = 64
  scan_groups: int = 16
  scan_warps: int = 4
  backward: str = "tiles"
  step_groups: int = 16
  pass_block_t: int = 0
  pass_groups: int = 0
  pass_tiles: int = 1
  groups_fastest: bool = False

  def __post_init__(self):
    if self.backward not in ("tiles", "steps"):
      raise ValueError(f"TiledConfig.backward must be 'tiles' or 'steps', got {self.backward!r}")
    for name in ("block_t", "groups_per_block", "scan_chunk", "scan_groups", "num_warps",
                 "scan_warps", "step_groups"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"TiledConfig.{name} must be a power of 2, got {value}")
    if self.pass_tiles < 1:
      raise ValueError(f"TiledConfig.pass_tiles must be >= 1, got {self.pass_tiles}")
    for name in ("pass_block_t", "pass_groups"):
      value = getattr(self, name)
      if value < 0 or value & (value - 1):
        raise ValueError(f"TiledConfig.{name} must be 0 (as the tile kernels) or a power of 2, "
                         f"got {value}")
    if self.block_t < 8 or 0 < self.pass_block_t < 8:
      raise ValueError(f"TiledConfig.block_t and pass_block_t must be >= 8, got {self.block_t} "
                       f"and {self.pass_block_t}")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tunables. block_t: time steps per tile (power of 2); num_warps/num_stages: Triton launch
  parameters; time_splits: programs per (sequence, group) along time (1 = single pass);
  prefetch: how many tiles the Triton loops load ahead of the one they compute (kept in
  registers; more tiles in flight hide more memory latency; 0 = load when needed);
  cumsum: running sums within a tile by scans instead of masked [T, T] reductions (used only
  without segment_ids); tiled: a TiledConfig selects the tiled GPU design (parallel over time
  tiles; Triton backend only) instead of the per-(sequence, group) walk, whose tunables are then
  unused."""
  # Defaults: the fastest correct row of the H200 sweep of 2026-11-28 (B1 L32768 D4096 G64 bf16:
  # fwd 0.51 ms, fwd+bwd 1.92 ms; the XLA associative scan took 0.68 / 1.55 ms in the same run).
  block_t: int = 128
  num_warps: int = 8
  num_stages: int = 1
  time_splits: int = 4
  prefetch: int = 2
  cumsum: bool = True
  tiled: TiledConfig | None = None

  def __post_init__(self):
    if self.block_t < 8 or self.block_t & (self.block_t - 1):
      raise ValueError(f"block_t must be a power of 2 >= 8, got {self.block_t}")
    if self.time_splits < 1:
      raise ValueError(f"time_splits must be >= 1, got {self.time_splits}")
    if not 0 <= int(self.prefetch) <= 8:
      raise ValueError(f"prefetch must be a number of tiles in [0, 8], got {self.prefetch}")


# --------------------------------------------------------------------------------------------
# Per-tile math shared by all kernels. A tile is [T, C] (T steps, C features). Per-step
# quantities ("rows") and carries have backend-specific shapes, hidden behind a small `ops`
# object: the GPU kernels handle one group per program (rows [T], carries scalars); the TPU
# kernel handles all G groups of a sequence (rows [T, G], carries [1, G], per-step flags
# [T, 1]) and does group sums and time sums as matmuls. Everything is float32.
# --------------------------------------------------------------------------------------------


def _tsum(mask, rows):
  """out[t] = sum_s mask[t, s] * rows[s]  (a masked prefix / suffix sum; mask: [T, T] bool)."""
  return jnp.sum(jnp.where(mask, rows[None, :], 0.0), axis=1)


@dataclasses.dataclass(frozen=True)
class _VectorSums:
  """Running sums of [T] rows along a tile, restricted to the step's segment (GPU).

  same: [T, T] bool (steps in the same segment) or None (no resets). With use_cumsum (only
  without resets) the sums are scans (O(T)); otherwise masked [T, T] reductions (O(T^2), but
  made of nothing more than selects and row sums)."""
  same: jax.Array | None
  use_cumsum: bool

  def prefix(self, rows):
    """Inclusive: sum over s <= t."""
    if self.use_cumsum:
      return jnp.cumsum(rows, axis=0)
    return _tsum(self._mask(lambda s, t: s <= t, rows), rows)

  def suffix(self, rows):
    """Inclusive: sum over s >= t."""
    if self.use_cumsum:
      return jnp.sum(rows) - jnp.cumsum(rows, axis=0) + rows
    return _tsum(self._mask(lambda s, t: s >= t, rows), rows)

  def suffix_strict(self, rows):
    """Exclusive: sum over s > t."""
    if self.use_cumsum:
      return jnp.sum(rows) - jnp.cumsum(rows, axis=0)
    return _tsum(self._mask(lambda s, t: s > t, rows), rows)

  def _mask(self, cmp, rows):
    idx = jnp.arange(rows.shape[0])
    mask = cmp(idx[None, :], idx[:, None])
    return mask if self.same is None else mask & self.same


class _GpuOps:
  """Rows [T] for one group; carries are scalars."""

  def __init__(self, tile: int, kp: int, k: int):
    self.tile = tile
    self.colmask = (jnp.arange(kp) < k)[None, :]

  def steps(self):
    return jnp.arange(self.tile)

  def gsum(self, a):
    return jnp.sum(a, axis=1)

  def gbcast(self, rows):
    return rows[:, None]

  def rowmask(self, flags):
    return flags[:, None]

  def rsum(self, rows):
    return jnp.sum(rows)

  def colsum(self, a):
    return jnp.sum(a, axis=0)

  def segments(self, reset, segmented: bool, use_cumsum: bool):
    """(segment number of each step within the tile or None, running-sum helper)."""
    if not segmented:
      return None, _VectorSums(same=None, use_cumsum=use_cumsum)
    reset_f = jnp.where(reset, 1.0, 0.0)
    idx = self.steps()
    segno = jnp.cumsum(reset_f) if use_cumsum else _tsum(idx[None, :] <= idx[:, None], reset_f)
    return segno, _VectorSums(same=segno[:, None] == segno[None, :], use_cumsum=False)


def _dot(a, b, dims=((1,), (0,))):
  return lax.dot_general(a, b, (dims, ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class _MatrixSums:
  """Running sums of [T, G] rows as matmuls with M = (s <= t) & same segment (TPU)."""
  lower: jax.Array   # [T, T] float32 0/1

  def prefix(self, rows):
    return _dot(self.lower, rows)

  def suffix(self, rows):
    return _dot(self.lower, rows, ((0,), (0,)))   # M^T rows: same-segment steps s >= t.

  def suffix_strict(self, rows):
    return self.suffix(rows) - rows


class _TpuOps:
  """Rows [T, G] for all groups of a sequence; carries [1, G]; per-step flags [T, 1].

  onehot: [D, G] float32 group membership of the features."""

  def __init__(self, tile: int, onehot):
    self.tile = tile
    self.onehot = onehot
    self.colmask = None

  def steps(self):
    return lax.broadcasted_iota(jnp.int32, (self.tile, 1), 0)

  def gsum(self, a):
    return _dot(a, self.onehot)

  def gbcast(self, rows):
    return _dot(rows, self.onehot, ((1,), (1,)))

  def rowmask(self, flags):
    return flags

  def rsum(self, rows):
    return jnp.sum(rows, axis=0, keepdims=True)

  def colsum(self, a):
    return jnp.sum(a, axis=0, keepdims=True)

  def segments(self, reset, segmented: bool, use_cumsum: bool):
    del use_cumsum
    t = self.tile
    row = lax.broadcasted_iota(jnp.int32, (t, t), 0)
    col = lax.broadcasted_iota(jnp.int32, (t, t), 1)
    lower = jnp.where(col <= row, 1.0, 0.0)
    if not segmented:
      return None, _MatrixSums(lower)
    reset_f = jnp.where(reset, 1.0, 0.0)                              # [T, 1]
    segno = _dot(lower, reset_f)                                      # [T, 1]
    # Resets strictly after s and at or before t: (lower diag(reset) strictly_upper)[t, s].
    between = _dot(_dot(lower, jnp.where(row == col, reset_f, 0.0)), jnp.where(row > col, 1.0, 0.0))
    return segno, _MatrixSums(jnp.where((col <= row) & (between == 0.0), 1.0, 0.0))


def _safe_inv(a):
  return jnp.where(a > 0, 1.0 / jnp.where(a > 0, a, 1.0), 0.0)


@dataclasses.dataclass
class _TileStats:
  """Statistics of one tile. Rows: m, v (step mean/var), cnt, sd (running count and shifted sum),
  mu, var, rstd (running statistics after each step); c: the shift subtracted
  before summing (saved for the backward); segment flags."""
  m: jax.Array
  v: jax.Array
  cnt: jax.Array
  sd: jax.Array
  mu: jax.Array
  var: jax.Array
  rstd: jax.Array
  c: jax.Array
  sums: object                  # Running sums within segments (_VectorSums / _MatrixSums).
  first: jax.Array | bool       # rows: step continues the carried statistics (no reset before it).
  last: jax.Array | bool        # rows: step is in the tile's last segment.
  no_reset: jax.Array | bool    # carry-shaped: no reset anywhere in the tile.
  n_valid: jax.Array | None     # carry-shaped: number of valid steps (None when not needed).
  is_last_row: jax.Array


def _tile_stats(ops, xf, valid, reset, carry, *, k: int, eps: float, segmented: bool,
                use_cumsum: bool, shift=None):
  """xf: [T, C] float32 (0 in padded columns); valid, reset: step flags; carry: (n, mu, var);
  shift: the forward's shift when recomputing in the backward (None: choose it)."""
  m, v = _step_moments(ops, xf, k)
  return _stats_from_moments(ops, m, v, valid, reset, carry, eps=eps, segmented=segmented,
                             use_cumsum=use_cumsum, shift=shift)


def _step_moments(ops, xf, k: int):
  """(mean, population variance) of every step's features: rows. xf: [T, C] float32."""
  inv_k = 1.0 / k
  m = ops.gsum(xf) * inv_k
  xc = xf - ops.gbcast(m)
  sq_dev = xc * xc
  if ops.colmask is not None:
    sq_dev = jnp.where(ops.colmask, sq_dev, 0.0)
  return m, ops.gsum(sq_dev) * inv_k


def _stats_from_moments(ops, m, v, valid, reset, carry, *, eps: float, segmented: bool,
                        use_cumsum: bool, shift=None):
  """_tile_stats from the steps' moments (rows m, v) instead of the tile itself."""
  n_c, mu_c, var_c = carry
  is_last_row = ops.steps() == ops.tile - 1
  validf = jnp.where(valid, 1.0, 0.0)
  n_valid = None
  if shift is None:
    # The carried mean, or (nothing carried yet) the mean of this tile's valid steps.
    n_valid = ops.rsum(validf)
    tile_mean = ops.rsum(jnp.where(valid, m, 0.0)) / jnp.maximum(n_valid, 1.0)
    shift = jnp.where(n_c > 0, mu_c, tile_mean)
  c = shift
  mc = m - c
  d = jnp.where(valid, mc, 0.0)
  q = jnp.where(valid, v + mc * mc, 0.0)
  segno, sums = ops.segments(reset, segmented, use_cumsum)
  if segmented:
    first = segno == 0
    seg_end = ops.rsum(jnp.where(is_last_row, segno, 0.0))
    last = segno == seg_end
    no_reset = seg_end == 0
  else:
    first, last, no_reset = True, True, True
  n0 = jnp.where(first, n_c, 0.0)
  cnt = sums.prefix(validf) + n0
  sd = sums.prefix(d) + n0 * (mu_c - c)
  sq = sums.prefix(q) + n0 * (var_c + (mu_c - c) * (mu_c - c))
  has = cnt > 0
  inv = _safe_inv(cnt)
  off = sd * inv
  mu = jnp.where(has, c + off, jnp.where(first, mu_c, 0.0))
  var = jnp.where(has, jnp.maximum(sq * inv - off * off, 0.0), jnp.where(first, var_c, 0.0))
  rstd = lax.rsqrt(var + eps)
  return _TileStats(m=m, v=v, cnt=cnt, sd=sd, mu=mu, var=var, rstd=rstd, c=c, sums=sums,
                    first=first, last=last, no_reset=no_reset, n_valid=n_valid,
                    is_last_row=is_last_row)


def _last(ops, st: _TileStats, rows):
  return ops.rsum(jnp.where(st.is_last_row, rows, 0.0))


def _tile_carry_out(ops, st: _TileStats, carry):
  """Running statistics after the tile's last row; a fully padded tile passes the carry through
  bit for bit (as padded steps do in the XLA op)."""
  keep = st.no_reset & (st.n_valid == 0)
  return tuple(jnp.where(keep, old, _last(ops, st, new))
               for old, new in zip(carry, (st.cnt, st.mu, st.var)))


def _tile_output(ops, st: _TileStats, xf, w_hat, bias, valid):
  """y: [T, C] (0 on padded steps). w_hat, bias: broadcastable to [T, C]."""
  y = (xf - ops.gbcast(st.mu)) * ops.gbcast(st.rstd) * w_hat + bias
  return jnp.where(ops.rowmask(valid), y, 0.0)


class _TileGrads(NamedTuple):
  """What one tile's reverse recurrence yields (see _tile_backward)."""
  dx: jax.Array
  dw: jax.Array
  db: jax.Array
  out_mu: jax.Array
  out_var: jax.Array
  alpha: jax.Array
  beta: jax.Array
  a_mu: jax.Array     # The adjoint map divided by the carried count (used by the tiled design):
  a_var: jax.Array    # out = n_c (a_mu, a_var) + alpha (u_mu - z0 u_var, u_var).
  z0: jax.Array


def _tile_backward(ops, st: _TileStats, xf, dy, w_hat, valid, carry, u_mu, u_var, *,
                   k: int) -> _TileGrads:
  """Reverse recurrence through one tile.

  xf, dy: [T, C] float32 (0 in padded columns); w_hat: broadcastable to [T, C] (weight + 1, 0 in
  padded columns); carry: the forward (n, mu, var) before the tile; u_mu, u_var: adjoint of the
  statistics after the tile's last row from everything later. Returns dx [T, C], the tile's
  per-feature dw, db, the adjoint of the statistics before the tile (mu, var), and the tile's
  adjoint map coefficients (alpha, beta): before = (alpha u_mu + beta u_var + .., alpha u_var + ..).
  """
  r_b = ops.gbcast(st.rstd)
  dyw = dy * w_hat
  xmu = xf - ops.gbcast(st.mu)
  adj = _step_adjoints(ops, st, ops.gsum(dyw), ops.gsum(dyw * xmu), valid, carry, u_mu, u_var,
                       k=k)
  dx = r_b * dyw + ops.gbcast(adj.g_m) + ops.gbcast(adj.g_v) * (xf - ops.gbcast(st.m))
  keep = ops.rowmask(valid)
  if ops.colmask is not None:
    keep = keep & ops.colmask
  dx = jnp.where(keep, dx, 0.0)
  dw = ops.colsum(jnp.where(keep, dy * xmu * r_b, 0.0))
  db = ops.colsum(jnp.where(keep, dy, 0.0))
  return _TileGrads(dx=dx, dw=dw, db=db, out_mu=adj.out_mu, out_var=adj.out_var, alpha=adj.alpha,
                    beta=-adj.alpha * adj.z0, a_mu=adj.a_mu, a_var=adj.a_var, z0=adj.z0)


class _StepAdjoints(NamedTuple):
  """The reverse recurrence through one tile, per step and for the tile as a whole."""
  g_m: jax.Array      # rows: through the running statistics, step t adds to its dx
  g_v: jax.Array      # g_m + g_v (x - m_t), beside the direct r w^ dy.
  out_mu: jax.Array   # Adjoint of the statistics before the tile.
  out_var: jax.Array
  alpha: jax.Array
  a_mu: jax.Array
  a_var: jax.Array
  z0: jax.Array


def _step_adjoints(ops, st: _TileStats, s_dyw, s_dyw_xmu, valid, carry, u_mu, u_var, *,
                   k: int) -> _StepAdjoints:
  """The part of _tile_backward that needs only per-step sums over the group's features (rows):
  s_dyw = sum dy w^, s_dyw_xmu = sum dy w^ (x - mu_t)."""
  n_c = carry[0]
  # Local adjoints of each step's running (mean, var) from its own output y_t.
  l_mu = jnp.where(valid, -st.rstd * s_dyw, 0.0)
  l_var = jnp.where(valid, -0.5 * st.rstd * st.rstd * st.rstd * s_dyw_xmu, 0.0)
  validf = jnp.where(valid, 1.0, 0.0)
  inv = jnp.where(valid, _safe_inv(st.cnt), 0.0)
  # delta_t = m_t - (running mean before step t); irrelevant (0) when nothing came before.
  cnt_ex = st.cnt - validf
  d = jnp.where(valid, st.m - st.c, 0.0)
  delta = jnp.where(valid & (cnt_ex > 0), (st.m - st.c) - (st.sd - d) * _safe_inv(cnt_ex), 0.0)
  two_d = 2.0 * delta * inv
  # Adjoints telescope: prod (1 - 1/n_u) over a run of steps is n_t / n_s.
  sv = st.sums.suffix(l_var * inv)
  sm = st.sums.suffix(l_mu * inv)
  w_acc = st.sums.suffix_strict(two_d * sv)
  z_acc = st.sums.suffix_strict(two_d)
  n_end = _last(ops, st, st.cnt)

  def ratio(a):  # prod of (1 - 1/n) from after `a` to the tile end; 1 if no valid step follows.
    return jnp.where(n_end > 0, a / jnp.where(n_end > 0, n_end, 1.0), 1.0)

  p = jnp.where(st.last, ratio(st.cnt), 0.0)
  g_mu = st.cnt * (sm - w_acc) + p * (u_mu - u_var * z_acc)
  g_var = st.cnt * sv + p * u_var
  e = st.m - st.mu
  inv_k = 1.0 / k
  g_m = inv * (g_mu + 2.0 * e * g_var) * inv_k
  g_v = 2.0 * inv_k * inv * g_var
  # The statistics before the tile ("row -1") belong to the first segment's chain.
  first = st.first
  sm0 = ops.rsum(jnp.where(first, l_mu * inv, 0.0))
  sv0 = ops.rsum(jnp.where(first, l_var * inv, 0.0))
  w0 = ops.rsum(jnp.where(first, two_d * sv, 0.0))
  z0 = ops.rsum(jnp.where(first, two_d, 0.0))
  alpha = jnp.where(st.no_reset, ratio(n_c), 0.0)
  out_mu = n_c * (sm0 - w0) + alpha * (u_mu - u_var * z0)
  out_var = n_c * sv0 + alpha * u_var
  return _StepAdjoints(g_m=g_m, g_v=g_v, out_mu=out_mu, out_var=out_var, alpha=alpha,
                       a_mu=sm0 - w0, a_var=sv0, z0=z0)


# --------------------------------------------------------------------------------------------
# GPU (Triton) kernels: whole-sequence blocks per (sequence, group); tiles are read with masked
# loads (power-of-2 tile shapes, masked tails).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Dims:
  length: int
  groups: int
  k: int           # features per group
  kp: int          # k rounded up to a power of 2
  tile: int        # T
  tiles: int       # tiles per split
  has_flags: bool
  segmented: bool
  gb: int = 1      # groups per program (tiled design)


def _tile_rows(dims: _Dims, tile_idx):
  """(slice of the tile's rows, [T] mask of the rows inside the sequence). The backward's
  prefetch asks for tile -1, so both ends are masked."""
  t0 = tile_idx * dims.tile
  steps = t0 + jnp.arange(dims.tile)
  return pl.ds(t0, dims.tile), (steps >= 0) & (steps < dims.length)


def _load_raw(dims: _Dims, seq_refs, flags_ref, tile_idx):
  """Loads one tile as stored: ([T, Kp] per ref in seq_refs, flags [T] int32 or None).

  Raw values (not yet decoded) are what the prefetching loops carry to the next iteration."""
  from kernels_pallas.triton_backend import plgpu
  rows, in_range = _tile_rows(dims, tile_idx)
  colmask = jnp.arange(dims.kp) < dims.k
  tiles = tuple(
      plgpu.load(ref.at[rows, :], mask=in_range[:, None] & colmask[None, :], other=0.0,
                 eviction_policy="evict_first") for ref in seq_refs)
  flags = None
  if dims.has_flags:
    flags = plgpu.load(flags_ref.at[rows], mask=in_range, other=0)
  return tiles, flags


def _decode(dims: _Dims, tile_idx, raw):
  """-> (tuple of [T, Kp] float32 tiles, valid [T] bool, reset [T] bool)."""
  tiles, flags = raw
  _, in_range = _tile_rows(dims, tile_idx)
  tiles = tuple(t.astype(jnp.float32) for t in tiles)
  if flags is None:
    return tiles, in_range, jnp.zeros((dims.tile,), jnp.bool_)
  return tiles, in_range & ((flags & _VALID) != 0), in_range & ((flags & _RESET) != 0)


def _store_tile(dims: _Dims, ref, tile_idx, value):
  from kernels_pallas.triton_backend import plgpu
  rows, in_range = _tile_rows(dims, tile_idx)
  colmask = jnp.arange(dims.kp) < dims.k
  plgpu.store(ref.at[rows, :], value.astype(ref.dtype), mask=in_range[:, None] & colmask[None, :])


def _next_tile(queue, load, tile_idx, ahead_idx):
  """(raw tile to compute now, updated queue). queue holds the raw tiles loaded ahead, oldest
  first; the load of tile ahead_idx is issued before the current tile is used, so up to
  len(queue) + 1 tiles are in flight while computing."""
  if not queue:
    return load(tile_idx), queue
  return queue[0], queue[1:] + (load(ahead_idx),)


def _fwd_kernel(*refs, dims: _Dims, eps: float, summary: bool, prefetch: int, cumsum: bool):
  """Forward over one time split of one (sequence, group).

  Inputs: x [L, Kp], (w_hat, bias [Kp] unless summary), carry-in n, mu, var (scalars),
  (flags [L]). Outputs: (y [L, Kp] and, per tile, the carry before it and its shift
  [tiles] x 4, unless summary), carry-out n, mu, var (scalars).
  """
  from kernels_pallas.triton_backend import plgpu
  refs = list(refs)
  x_ref = refs.pop(0)
  if not summary:
    w_ref, b_ref = refs.pop(0), refs.pop(0)
  n_ref, mu_ref, var_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  flags_ref = refs.pop(0) if dims.has_flags else None
  if not summary:
    y_ref, saved_refs = refs.pop(0), [refs.pop(0) for _ in range(_SAVED)]
  n_out, mu_out, var_out = refs
  colmask = jnp.arange(dims.kp) < dims.k
  if not summary:
    w_hat = plgpu.load(w_ref, mask=colmask, other=0.0)
    bias = plgpu.load(b_ref, mask=colmask, other=0.0)
  first_tile = pl.program_id(1) * dims.tiles
  load = functools.partial(_load_raw, dims, (x_ref,), flags_ref)
  ops = _GpuOps(dims.tile, dims.kp, dims.k)

  def body(j, state):
    carry, queue = state
    tile_idx = first_tile + j
    raw, queue = _next_tile(queue, load, tile_idx, tile_idx + prefetch)
    (xf,), valid, reset = _decode(dims, tile_idx, raw)
    st = _tile_stats(ops, xf, valid, reset, carry, k=dims.k, eps=eps, segmented=dims.segmented,
                     use_cumsum=cumsum)
    if not summary:
      for ref, value in zip(saved_refs, (*carry, st.c)):
        plgpu.store(ref.at[j], value)
      _store_tile(dims, y_ref, tile_idx,
                  _tile_output(ops, st, xf, w_hat[None, :], bias[None, :], valid))
    return _tile_carry_out(ops, st, carry), queue

  carry = (n_ref[...], mu_ref[...], var_ref[...])
  init = (carry, tuple(load(first_tile + d) for d in range(prefetch)))
  (n, mu, var), _ = lax.fori_loop(0, dims.tiles, body, init)
  n_out[...], mu_out[...], var_out[...] = n, mu, var


def _bwd_kernel(*refs, dims: _Dims, eps: float, summary: bool, prefetch: int, cumsum: bool):
  """Backward over one time split of one (sequence, group), tiles in reverse order.

  Inputs: x, dy [L, Kp], w_hat [Kp], saved carries and shifts [tiles] x 4, adjoint after the split
  u_mu, u_var (scalars), (flags [L]). Outputs: dx [L, Kp], dw, db [Kp] and the adjoint before the
  split (scalars); in summary mode only the split's adjoint map: v_mu, v_var, alpha, beta with
  before = (alpha u_mu + beta u_var + v_mu, alpha u_var + v_var).
  """
  from kernels_pallas.triton_backend import plgpu
  refs = list(refs)
  x_ref, dy_ref, w_ref = refs[:3]
  saved_refs = refs[3:3 + _SAVED]
  umu_ref, uvar_ref = refs[3 + _SAVED:5 + _SAVED]
  refs = refs[5 + _SAVED:]
  flags_ref = refs.pop(0) if dims.has_flags else None
  colmask = jnp.arange(dims.kp) < dims.k
  w_hat = plgpu.load(w_ref, mask=colmask, other=0.0)
  first_tile = pl.program_id(1) * dims.tiles
  load = functools.partial(_load_raw, dims, (x_ref, dy_ref), flags_ref)
  ops = _GpuOps(dims.tile, dims.kp, dims.k)

  def body(j, state):
    u, maps, acc, queue = state
    local = dims.tiles - 1 - j
    tile_idx = first_tile + local
    raw, queue = _next_tile(queue, load, tile_idx, tile_idx - prefetch)
    (xf, dy), valid, reset = _decode(dims, tile_idx, raw)
    *carry, shift = (ref[local] for ref in saved_refs)
    st = _tile_stats(ops, xf, valid, reset, carry, k=dims.k, eps=eps, segmented=dims.segmented,
                     use_cumsum=cumsum, shift=shift)
    dx, dw, db, out_mu, out_var, alpha, beta = _tile_backward(
        ops, st, xf, dy, w_hat[None, :], valid, carry, u[0], u[1], k=dims.k)[:7]
    if summary:
      a_acc, b_acc = maps
      maps = (alpha * a_acc, alpha * b_acc + beta * a_acc)
    else:
      _store_tile(dims, refs[0], tile_idx, dx)
      acc = (acc[0] + dw, acc[1] + db)
    return (out_mu, out_var), maps, acc, queue

  zeros = jnp.zeros((dims.kp,), jnp.float32)
  u0 = (jnp.float32(0.0), jnp.float32(0.0)) if summary else (umu_ref[...], uvar_ref[...])
  init = (u0, (jnp.float32(1.0), jnp.float32(0.0)), (zeros, zeros),
          tuple(load(first_tile + dims.tiles - 1 - d) for d in range(prefetch)))
  (u_mu, u_var), (alpha, beta), (dw, db), _ = lax.fori_loop(0, dims.tiles, body, init)
  if summary:
    vmu_ref, vvar_ref, alpha_ref, beta_ref = refs
    vmu_ref[...], vvar_ref[...], alpha_ref[...], beta_ref[...] = u_mu, u_var, alpha, beta
  else:
    _, dw_ref, db_ref, omu_ref, ovar_ref = refs
    plgpu.store(dw_ref, dw, mask=colmask)
    plgpu.store(db_ref, db, mask=colmask)
    omu_ref[...], ovar_ref[...] = u_mu, u_var



# --------------------------------------------------------------------------------------------
# Triton pallas_call wrappers. Arrays: x4/y4/dy4/dx4 [B, L, G, K]; w_hat, bias [G, K];
# per-program scalars [B*G, S]; saved carries and shifts 4 x [B*G, S, tiles]; flags [B, L]
# int32; dw, db
# partials [B*G, S, K]. Grid (B*G, S).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one call."""
  dims: _Dims
  batch: int
  splits: int
  eps: float
  config: KernelConfig
  interpret: bool
  backend: str


def _block_specs(spec: _Spec):
  d, groups = spec.dims, spec.dims.groups
  seq = pl.BlockSpec((None, d.length, None, d.kp), lambda bg, s: (bg // groups, 0, bg % groups, 0))
  feat = pl.BlockSpec((None, d.kp), lambda bg, s: (bg % groups, 0))
  scalar = pl.BlockSpec((None, None), lambda bg, s: (bg, s))
  saved = pl.BlockSpec((None, None, d.tiles), lambda bg, s: (bg, s, 0))
  flags = pl.BlockSpec((None, d.length), lambda bg, s: (bg // groups, 0))
  partial = pl.BlockSpec((None, None, d.kp), lambda bg, s: (bg, s, 0))
  return seq, feat, scalar, saved, flags, partial


def _call(spec: _Spec, kernel, in_specs, out_specs, out_shape, name):
  from kernels_pallas.triton_backend import plgpu
  cfg = spec.config
  return pl.pallas_call(
      kernel, grid=(spec.batch * spec.dims.groups, spec.splits), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, interpret=spec.interpret, name=name,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def _fwd_call(spec: _Spec, x4, w_hat, bias, n_in, mu_in, var_in, flags, *, summary: bool):
  seq, feat, scalar, saved, flag_spec, _ = _block_specs(spec)
  d = spec.dims
  programs = (spec.batch * d.groups, spec.splits)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args, in_specs = [x4], [seq]
  if not summary:
    args += [w_hat, bias]
    in_specs += [feat, feat]
  args += [n_in, mu_in, var_in]
  in_specs += [scalar] * 3
  if d.has_flags:
    args.append(flags)
    in_specs.append(flag_spec)
  out_shape, out_specs = [], []
  if not summary:
    out_shape += ([jax.ShapeDtypeStruct(x4.shape, x4.dtype)]
                  + [f32(programs + (d.tiles,))] * _SAVED)
    out_specs += [seq] + [saved] * _SAVED
  out_shape += [f32(programs)] * 3
  out_specs += [scalar] * 3
  kernel = functools.partial(_fwd_kernel, dims=d, eps=spec.eps, summary=summary,
                             prefetch=int(spec.config.prefetch), cumsum=spec.config.cumsum)
  name = "timestep_norm_fwd_summary" if summary else "timestep_norm_fwd"
  return _call(spec, kernel, in_specs, out_specs, out_shape, name)(*args)


def _bwd_call(spec: _Spec, x4, dy4, w_hat, saved, u_mu, u_var, flags, *, summary: bool):
  seq, feat, scalar, saved_spec, flag_spec, partial = _block_specs(spec)
  d = spec.dims
  programs = (spec.batch * d.groups, spec.splits)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = [x4, dy4, w_hat, *saved, u_mu, u_var]
  in_specs = [seq, seq, feat] + [saved_spec] * _SAVED + [scalar] * 2
  if d.has_flags:
    args.append(flags)
    in_specs.append(flag_spec)
  if summary:
    out_shape, out_specs = [f32(programs)] * 4, [scalar] * 4
  else:
    out_shape = ([jax.ShapeDtypeStruct(x4.shape, x4.dtype)] + [f32(programs + (d.k,))] * 2
                 + [f32(programs)] * 2)
    out_specs = [seq, partial, partial, scalar, scalar]
  kernel = functools.partial(_bwd_kernel, dims=d, eps=spec.eps, summary=summary,
                             prefetch=int(spec.config.prefetch), cumsum=spec.config.cumsum)
  name = "timestep_norm_bwd_summary" if summary else "timestep_norm_bwd"
  return _call(spec, kernel, in_specs, out_specs, out_shape, name)(*args)


def _split_has_reset(spec: _Spec, flags):
  """[B*G, S] bool: the split contains a reset (its summary must not merge with what precedes)."""
  d = spec.dims
  span = d.tiles * d.tile
  reset = (flags & _RESET) != 0
  reset = jnp.pad(reset, ((0, 0), (0, spec.splits * span - d.length)))
  any_reset = jnp.any(reset.reshape(spec.batch, spec.splits, span), axis=-1)
  return jnp.repeat(any_reset, d.groups, axis=0)


def _split_carries(spec: _Spec, x4, n0, mu0, var0, flags):
  """Carry-in (n, mu, var) [B*G, S] of every split: summaries of the splits, merged in order."""
  if spec.splits == 1:
    return n0[:, None], mu0[:, None], var0[:, None]
  zeros = jnp.zeros((spec.batch * spec.dims.groups, spec.splits), jnp.float32)
  n_s, mu_s, var_s = _fwd_call(spec, x4, None, None, zeros, zeros, zeros, flags, summary=True)
  has_reset = (_split_has_reset(spec, flags) if spec.dims.has_flags
               else jnp.zeros(n_s.shape, jnp.bool_))
  carries = [(n0, mu0, var0)]
  for s in range(spec.splits - 1):
    prev = TimestepNormState(*carries[-1])
    here = TimestepNormState(n_s[:, s], mu_s[:, s][:, None], var_s[:, s][:, None])
    merged = tsn_ops.merge_stats(TimestepNormState(prev.count, prev.mean[:, None], prev.var[:, None]),
                                 here)
    cut = has_reset[:, s]
    carries.append((jnp.where(cut, here.count, merged.count),
                    jnp.where(cut, here.mean[:, 0], merged.mean[:, 0]),
                    jnp.where(cut, here.var[:, 0], merged.var[:, 0])))
  return tuple(jnp.stack(c, axis=1) for c in zip(*carries))


def _split_adjoints(spec: _Spec, x4, dy4, w_hat, saved, g_mu, g_var, flags):
  """Adjoint (mu, var) [B*G, S] of the statistics at the end of every split."""
  if spec.splits == 1:
    return g_mu[:, None], g_var[:, None]
  zeros = jnp.zeros((spec.batch * spec.dims.groups, spec.splits), jnp.float32)
  v_mu, v_var, alpha, beta = _bwd_call(spec, x4, dy4, w_hat, saved, zeros, zeros, flags,
                                       summary=True)
  u = [(g_mu, g_var)]
  for s in range(spec.splits - 1, 0, -1):
    u_mu, u_var = u[-1]
    u.append((alpha[:, s] * u_mu + beta[:, s] * u_var + v_mu[:, s], alpha[:, s] * u_var + v_var[:, s]))
  u = u[::-1]
  return jnp.stack([a for a, _ in u], axis=1), jnp.stack([b for _, b in u], axis=1)


def _triton_forward(spec: _Spec, x4, w_hat, bias, n0, mu0, var0, flags):
  """-> y4, mean and var after the last step [B*G], residuals for the backward."""
  n_in, mu_in, var_in = _split_carries(spec, x4, n0, mu0, var0, flags)
  y4, *saved, _, mu_o, var_o = _fwd_call(spec, x4, w_hat, bias, n_in, mu_in, var_in, flags,
                                         summary=False)
  return y4, mu_o[:, -1], var_o[:, -1], tuple(saved)


def _triton_backward(spec: _Spec, x4, dy4, w_hat, saved, g_mu, g_var, flags):
  """-> dx4, d w_hat [G, K], d bias [G, K], d mean0, d var0 [B*G]."""
  u_mu, u_var = _split_adjoints(spec, x4, dy4, w_hat, saved, g_mu, g_var, flags)
  dx4, dw, db, o_mu, o_var = _bwd_call(spec, x4, dy4, w_hat, saved, u_mu, u_var, flags,
                                       summary=False)
  groups, k = spec.dims.groups, spec.dims.k
  dw = dw.reshape(spec.batch, groups, spec.splits, k).sum(axis=(0, 2))
  db = db.reshape(spec.batch, groups, spec.splits, k).sum(axis=(0, 2))
  return dx4, dw, db, o_mu[:, 0], o_var[:, 0]


# --------------------------------------------------------------------------------------------
# GPU tiled design (KernelConfig.tiled): parallel over (sequence, time tile, block of groups),
# for short batches of long sequences where one program per (sequence, group) leaves the GPU idle.
#
# Forward, three kernels:
#   summary: one program per (sequence, tile, block of Gb groups) reduces its [T, Gb, K] tile to
#     the (count, mean, var) of the tile's last segment (about the tile's own mean);
#   scan: one program per (sequence, block of groups) walks the tiles in chunks of C and merges
#     the summaries (shifted sums about the carried mean within a chunk, as the steps of a tile
#     are merged), storing every tile's incoming (count, mean, var) and the final state;
#   main: one program per (sequence, tile, block of groups) recomputes the tile's running
#     statistics from its incoming carry (the per-tile math of the serial kernels) and writes y.
# Backward, the same three steps on adjoints. Divided by the carried count, the adjoint map of a
# tile without resets is before/n_c = (a_mu + U_mu/n_end - z0 U_var/n_end, a_var + U_var/n_end)
# (see _tile_backward: alpha = n_c/n_end), so with Û = U/n the chain over tiles is a pair of
# suffix sums that stop at resets:
#   summary: per tile (a_mu, a_var, z0) from x, dy and the saved incoming carry;
#   scan: Û after every tile (reverse walk in chunks);
#   main: dx from U = n_end Û, and the tile's partial dw, db (summed in XLA).
# Bytes: the forward reads x twice and writes y, the backward reads x and dy twice and writes dx;
# the rest is O(B G L / T). Residuals: the incoming (count, mean, var) of every tile [B, tiles, G]
# and the final count.
# Arrays: x4, y4, dy4, dx4 [B, L, G, K]; w_hat, bias [G, K]; per-tile statistics [B, tiles, G]
# float32; per-tile reset flags [B, tiles] int32; per-sequence statistics [B, G]; dw, db
# partials [B, tiles, G, K].
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ColumnSums:
  """Running sums of [T, W] rows along axis 0 within segments (tiled GPU design).

  same: [T, T] bool (steps in the same segment), or None without resets (then scans)."""
  same: jax.Array | None

  def prefix(self, rows):
    if self.same is None:
      return jnp.cumsum(rows, axis=0)
    return self._masked(lambda s, t: s <= t, rows)

  def suffix(self, rows):
    if self.same is None:
      return jnp.sum(rows, axis=0, keepdims=True) - jnp.cumsum(rows, axis=0) + rows
    return self._masked(lambda s, t: s >= t, rows)

  def suffix_strict(self, rows):
    if self.same is None:
      return jnp.sum(rows, axis=0, keepdims=True) - jnp.cumsum(rows, axis=0)
    return self._masked(lambda s, t: s > t, rows)

  def _masked(self, cmp, rows):
    idx = jnp.arange(rows.shape[0])
    mask = cmp(idx[None, :], idx[:, None]) & self.same            # [t, s]
    return _masked_rowsum(mask, rows)


def _masked_rowsum(mask, rows):
  """out[i] = sum_j mask[i, j] rows[j]; mask: [C, C] bool, rows: [C, W]."""
  return jnp.sum(jnp.where(mask[:, :, None], rows[None, :, :], 0.0), axis=1)


class _BlockOps:
  """Rows [T, Gb] for a block of Gb groups; carries [Gb]; per-step flags [T, 1] (tiled GPU)."""

  def __init__(self, tile: int, kp: int, k: int):
    self.tile = tile
    self.colmask = (jnp.arange(kp) < k)[None, None, :]

  def steps(self):
    return jnp.arange(self.tile)[:, None]

  def gsum(self, a):
    return jnp.sum(a, axis=2)

  def gbcast(self, rows):
    return rows[:, :, None]

  def rowmask(self, flags):
    return flags[:, :, None]

  def rsum(self, rows):
    return jnp.sum(rows, axis=0)

  def colsum(self, a):
    return jnp.sum(a, axis=0)

  def segments(self, reset, segmented: bool, use_cumsum: bool):
    del use_cumsum
    if not segmented:
      return None, _ColumnSums(None)
    segno = jnp.cumsum(jnp.where(reset, 1.0, 0.0), axis=0)               # [T, 1]
    return segno, _ColumnSums(segno == segno.reshape(1, self.tile))


def _pow2_divisor(n: int, cap: int) -> int:
  """The largest power of 2 that divides n, at most cap."""
  return min(n & -n, cap)


def _tiled_masks(dims: _Dims, tile_idx):
  """(rows slice, [T] rows inside the sequence, [T, Gb, Kp] load/store mask)."""
  t0 = tile_idx * dims.tile
  in_range = t0 + jnp.arange(dims.tile) < dims.length
  cols = jnp.arange(dims.kp) < dims.k
  mask = jnp.broadcast_to(in_range[:, None, None] & cols[None, None, :],
                          (dims.tile, dims.gb, dims.kp))
  return pl.ds(t0, dims.tile), in_range, mask


def _tiled_inputs(dims: _Dims, tile_idx, refs, flags_ref):
  """Tiles [T, Gb, Kp] float32 (0 outside the sequence and in padded columns) of every ref in
  refs ([L, Gb, Kp] blocks; flags [L]), and valid, reset [T, 1] bool. One indexer per access:
  Triton lowers no chained ref.at views."""
  from kernels_pallas.triton_backend import plgpu
  rows, in_range, mask = _tiled_masks(dims, tile_idx)
  tiles = tuple(plgpu.load(ref.at[rows, :, :], mask=mask, other=0.0,
                           eviction_policy="evict_first").astype(jnp.float32) for ref in refs)
  if flags_ref is None:
    return tiles, in_range[:, None], jnp.zeros((dims.tile, 1), jnp.bool_)
  flags = plgpu.load(flags_ref.at[rows], mask=in_range, other=0)
  valid = in_range & ((flags & _VALID) != 0)
  reset = in_range & ((flags & _RESET) != 0)
  return tiles, valid[:, None], reset[:, None]


def _tiled_store(dims: _Dims, ref, tile_idx, value):
  """Stores a [T, Gb, Kp] tile into ref ([L, Gb, Kp])."""
  from kernels_pallas.triton_backend import plgpu
  rows, _, mask = _tiled_masks(dims, tile_idx)
  plgpu.store(ref.at[rows, :, :], value.astype(ref.dtype), mask=mask)


# Per-step arrays are stored group-major ([B, G, L]: a tile's steps of one group are contiguous),
# so that a program with few groups still reads and writes whole 32-byte sectors.


def _row_mask(dims: _Dims, tile_idx):
  """(steps slice, [W, T] mask of the steps inside the sequence) for per-step arrays [W, L]."""
  t0 = tile_idx * dims.tile
  in_range = t0 + jnp.arange(dims.tile) < dims.length
  return pl.ds(t0, dims.tile), jnp.broadcast_to(in_range[None, :], (dims.gb, dims.tile))


def _store_rows(dims: _Dims, ref, tile_idx, value):
  """Stores per-step values [T, W] of this tile into ref ([W, L], float32)."""
  from kernels_pallas.triton_backend import plgpu
  steps, mask = _row_mask(dims, tile_idx)
  plgpu.store(ref.at[:, steps], value.T, mask=mask)


def _load_rows(dims: _Dims, ref, tile_idx):
  """This tile's per-step values [T, W] of ref ([W, L]; 0 past the end)."""
  from kernels_pallas.triton_backend import plgpu
  steps, mask = _row_mask(dims, tile_idx)
  return plgpu.load(ref.at[:, steps], mask=mask, other=0.0).T


def _load_features(dims: _Dims, ref):
  """[Gb, Kp] float32 per-feature parameters (0 in padded columns)."""
  from kernels_pallas.triton_backend import plgpu
  mask = jnp.broadcast_to((jnp.arange(dims.kp) < dims.k)[None, :], (dims.gb, dims.kp))
  return plgpu.load(ref, mask=mask, other=0.0)


def _tile_summary(ops: _BlockOps, m, v, valid):
  """(count [1], mean [Gb], var [Gb]) of a tile's valid steps, without resets, from the steps'
  moments m, v [T, Gb]: the pooled mean and population variance, summed about the tile's mean."""
  n = ops.rsum(jnp.where(valid, 1.0, 0.0))
  inv_n = _safe_inv(n)
  mean = ops.rsum(jnp.where(valid, m, 0.0)) * inv_n
  dm = m - mean
  var = ops.rsum(jnp.where(valid, v + dm * dm, 0.0)) * inv_n
  return n, mean, var


def _tiled_fwd_summary_kernel(*refs, dims: _Dims, moments: bool):
  """Inputs x [L, Gb, Kp], (flags [L]); outputs the tile's count, mean, var [Gb] and, with
  moments, every step's mean and variance over the group's features (m, v [Gb, L], this tile's
  rows)."""
  x_ref = refs[0]
  flags_ref = refs[1] if dims.has_flags else None
  n_ref, mu_ref, var_ref = refs[-5:-2] if moments else refs[-3:]
  ops = _BlockOps(dims.tile, dims.kp, dims.k)
  i = pl.program_id(1)
  (xf,), valid, reset = _tiled_inputs(dims, i, (x_ref,), flags_ref)
  m, v = _step_moments(ops, xf, dims.k)
  if dims.segmented:
    zero = jnp.zeros((dims.gb,), jnp.float32)
    carry = (zero, zero, zero)
    st = _stats_from_moments(ops, m, v, valid, reset, carry, eps=1.0, segmented=True,
                             use_cumsum=False)
    summary = _tile_carry_out(ops, st, carry)
  else:
    summary = _tile_summary(ops, m, v, valid)
  for ref, value in zip((n_ref, mu_ref, var_ref), summary):
    ref[...] = jnp.broadcast_to(value, (dims.gb,))
  if moments:
    for ref, value in zip(refs[-2:], (m, v)):
      _store_rows(dims, ref, i, value)


def _tiled_fwd_kernel(*refs, dims: _Dims, eps: float):
  """Inputs x [L, Gb, Kp], w_hat, bias [Gb, Kp], the tile's incoming n, mu, var [Gb], (flags
  [L]); output y [L, Gb, Kp] (this tile's rows)."""
  x_ref, w_ref, b_ref, n_ref, mu_ref, var_ref = refs[:6]
  flags_ref = refs[6] if dims.has_flags else None
  y_ref = refs[-1]
  ops = _BlockOps(dims.tile, dims.kp, dims.k)
  i = pl.program_id(1)
  (xf,), valid, reset = _tiled_inputs(dims, i, (x_ref,), flags_ref)
  carry = (n_ref[...], mu_ref[...], var_ref[...])
  st = _tile_stats(ops, xf, valid, reset, carry, k=dims.k, eps=eps, segmented=dims.segmented,
                   use_cumsum=True)
  y = _tile_output(ops, st, xf, _load_features(dims, w_ref)[None], _load_features(dims, b_ref)[None],
                   valid)
  _tiled_store(dims, y_ref, i, y)


def _tiled_bwd_summary_kernel(*refs, dims: _Dims, eps: float):
  """Inputs x, dy [L, Gb, Kp], w_hat [Gb, Kp], the tile's incoming n, mu, var [Gb], (flags
  [L]); outputs the tile's adjoint map a_mu, a_var, z0 [Gb] (see _TileGrads)."""
  x_ref, dy_ref, w_ref, n_ref, mu_ref, var_ref = refs[:6]
  flags_ref = refs[6] if dims.has_flags else None
  amu_ref, avar_ref, z_ref = refs[-3:]
  ops = _BlockOps(dims.tile, dims.kp, dims.k)
  (xf, dy), valid, reset = _tiled_inputs(dims, pl.program_id(1), (x_ref, dy_ref), flags_ref)
  carry = (n_ref[...], mu_ref[...], var_ref[...])
  st = _tile_stats(ops, xf, valid, reset, carry, k=dims.k, eps=eps, segmented=dims.segmented,
                   use_cumsum=True)
  zero = jnp.zeros((dims.gb,), jnp.float32)
  g = _tile_backward(ops, st, xf, dy, _load_features(dims, w_ref)[None], valid, carry, zero, zero,
                     k=dims.k)
  for ref, value in zip((amu_ref, avar_ref, z_ref), (g.a_mu, g.a_var, g.z0)):
    ref[...] = jnp.broadcast_to(value, (dims.gb,))


def _tiled_bwd_kernel(*refs, dims: _Dims, eps: float):
  """Inputs x, dy [L, Gb, Kp], w_hat [Gb, Kp], the tile's incoming n, mu, var [Gb], the
  adjoint after the tile divided by the count there (mu, var) [Gb], (flags [L]); outputs dx
  [L, Gb, Kp] (this tile's rows) and the tile's dw, db [Gb, Kp]."""
  from kernels_pallas.triton_backend import plgpu
  x_ref, dy_ref, w_ref, n_ref, mu_ref, var_ref, umu_ref, uvar_ref = refs[:8]
  flags_ref = refs[8] if dims.has_flags else None
  dx_ref, dw_ref, db_ref = refs[-3:]
  ops = _BlockOps(dims.tile, dims.kp, dims.k)
  i = pl.program_id(1)
  (xf, dy), valid, reset = _tiled_inputs(dims, i, (x_ref, dy_ref), flags_ref)
  carry = (n_ref[...], mu_ref[...], var_ref[...])
  st = _tile_stats(ops, xf, valid, reset, carry, k=dims.k, eps=eps, segmented=dims.segmented,
                   use_cumsum=True)
  n_end = _last(ops, st, st.cnt)
  g = _tile_backward(ops, st, xf, dy, _load_features(dims, w_ref)[None], valid, carry,
                     n_end * umu_ref[...], n_end * uvar_ref[...], k=dims.k)
  _tiled_store(dims, dx_ref, i, g.dx)
  mask = jnp.broadcast_to((jnp.arange(dims.kp) < dims.k)[None, :], (dims.gb, dims.kp))
  plgpu.store(dw_ref, g.dw, mask=mask)
  plgpu.store(db_ref, g.db, mask=mask)


def _stats_from_sums(cnt, sd, sq, first, carry, c):
  """Running statistics from sums merged after the carry (n, mu, var): cnt, sd = sum n (mean -
  c), sq = sum n (var + (mean - c)^2) over merged summaries; first: the carry is part of it (no
  reset in between). Nothing merged: the carry bit for bit (after a reset: zeros)."""
  n_c, mu_c, var_c = carry
  dc = mu_c - c
  n0 = jnp.where(first, n_c, 0.0)
  total = cnt + n0
  inv = _safe_inv(total)
  off = (sd + n0 * dc) * inv
  mu = c + off
  var = jnp.maximum((sq + n0 * (var_c + dc * dc)) * inv - off * off, 0.0)
  keep = first & (cnt == 0)
  empty = total == 0
  return (jnp.where(keep, n_c, total), jnp.where(keep, mu_c, jnp.where(empty, 0.0, mu)),
          jnp.where(keep, var_c, jnp.where(empty, 0.0, var)))


def _merge_chunk(n, mu, var, reset, carry):
  """Merges a chunk of tile summaries into the running statistics (forward scan over tiles).

  n, mu, var: [C, W] summaries (a tile with a reset summarises its last segment); reset: [C, 1]
  bool (the tile contains a reset) or None; carry: (n, mu, var) [W] before the chunk. Sums are
  taken about the carried mean (the chunk's mean when nothing is carried), as in _tile_stats.
  Returns the statistics before every tile ([C, W] each) and after the chunk ([W] each)."""
  n_c, mu_c, _ = carry
  chunk_mean = jnp.sum(n * mu, axis=0) * _safe_inv(jnp.sum(n, axis=0))
  c = jnp.where(n_c > 0, mu_c, chunk_mean)
  dm = mu - c
  terms = (n, n * dm, n * (var + dm * dm))
  if reset is None:
    before = [jnp.cumsum(a, axis=0) - a for a in terms]
    after = [jnp.sum(a, axis=0) for a in terms]
    first_before = first_after = True
  else:
    r = jnp.where(reset, 1.0, 0.0)                       # [C, 1]
    segno = jnp.cumsum(r, axis=0)                        # Resets up to and including each tile.
    seg_before = segno - r                               # The segment of the statistics before it.
    idx = jnp.arange(n.shape[0])
    same = (idx[None, :] < idx[:, None]) & (segno.reshape(1, -1) == seg_before)   # [i, j]
    seg_end = jnp.sum(r, axis=0)
    in_last = segno == seg_end
    before = [_masked_rowsum(same, a) for a in terms]
    after = [jnp.sum(jnp.where(in_last, a, 0.0), axis=0) for a in terms]
    first_before, first_after = seg_before == 0, seg_end == 0
  return (_stats_from_sums(*before, first_before, carry, c),
          _stats_from_sums(*after, first_after, carry, c))


def _chain_chunk(a_mu, a_var, z, reset, carry):
  """Chains the adjoint maps of a chunk of tiles (backward scan over tiles, adjoints divided by
  the count). Tile j maps the adjoint after it, U, to the one before it:
    (a_mu_j + [no reset in j] (U_mu - z_j U_var),  a_var_j + [no reset in j] U_var).
  a_mu, a_var, z: [C, W]; reset: [C, 1] bool or None; carry: (mu, var) [W] after the chunk.
  Returns the adjoints after every tile ([C, W] each) and before the chunk ([W] each)."""
  u_mu, u_var = carry
  if reset is None:
    def strict(a):   # sum over j > i
      return jnp.sum(a, axis=0, keepdims=True) - jnp.cumsum(a, axis=0)
    total = functools.partial(jnp.sum, axis=0)
    reach = reach0 = True
    no_reset = 1.0
  else:
    r = jnp.where(reset, 1.0, 0.0)                       # [C, 1]
    cum = jnp.cumsum(r, axis=0)
    idx = jnp.arange(a_mu.shape[0])
    # j > i with no reset in tiles i+1 .. j-1 (tile j's own first segment still counts).
    chain = (idx[None, :] > idx[:, None]) & ((cum - r).reshape(1, -1) == cum)
    strict = functools.partial(_masked_rowsum, chain)
    from_start = (cum - r) == 0                          # Reached from before the chunk.
    total = lambda a: jnp.sum(jnp.where(from_start, a, 0.0), axis=0)
    r_end = jnp.sum(r, axis=0)
    reach = cum == r_end                                 # No reset after tile i in the chunk.
    reach0 = r_end == 0
    no_reset = 1.0 - r
  var_after = strict(a_var) + jnp.where(reach, u_var, 0.0)
  b = a_mu - no_reset * z * var_after
  mu_after = strict(b) + jnp.where(reach, u_mu, 0.0)
  before = (total(b) + jnp.where(reach0, u_mu, 0.0), total(a_var) + jnp.where(reach0, u_var, 0.0))
  return (mu_after, var_after), before


def _scan_loads(tiles: int, chunk: int, width: int, c, refs, rflag_ref):
  """Chunk c of [tiles, W] refs as [C, W] (0 past the end), its reset flags [C, 1] or None, and
  (rows, mask) for storing."""
  from kernels_pallas.triton_backend import plgpu
  rows = pl.ds(c * chunk, chunk)
  ok = c * chunk + jnp.arange(chunk) < tiles
  mask = jnp.broadcast_to(ok[:, None], (chunk, width))
  values = tuple(plgpu.load(ref.at[rows, :], mask=mask, other=0.0) for ref in refs)
  reset = None
  if rflag_ref is not None:
    reset = (plgpu.load(rflag_ref.at[rows], mask=ok, other=0) != 0)[:, None]
  return values, reset, rows, mask


def _tiled_fwd_scan_kernel(*refs, tiles: int, chunk: int, width: int, segmented: bool):
  """Inputs per-tile n, mu, var [tiles, W], (tile resets [tiles]), initial n, mu, var [W];
  outputs every tile's incoming n, mu, var [tiles, W] and the final n, mu, var [W]."""
  from kernels_pallas.triton_backend import plgpu
  refs = list(refs)
  summary_refs = refs[:3]
  rflag_ref = refs[3] if segmented else None
  init_refs = refs[3 + segmented:6 + segmented]
  carry_refs, final_refs = refs[-6:-3], refs[-3:]

  def body(c, carry):
    summary, reset, rows, mask = _scan_loads(tiles, chunk, width, c, summary_refs, rflag_ref)
    before, after = _merge_chunk(*summary, reset, carry)
    for ref, value in zip(carry_refs, before):
      plgpu.store(ref.at[rows, :], value, mask=mask)
    return after

  carry = tuple(ref[...] for ref in init_refs)
  carry = lax.fori_loop(0, pl.cdiv(tiles, chunk), body, carry)
  for ref, value in zip(final_refs, carry):
    ref[...] = value


def _tiled_bwd_scan_kernel(*refs, tiles: int, chunk: int, width: int, segmented: bool):
  """Inputs per-tile a_mu, a_var, z0 [tiles, W], (tile resets [tiles]), the final adjoint
  divided by the final count (mu, var) [W]; outputs the adjoint after every tile divided by the
  count there (mu, var) [tiles, W] and the one before the first tile (mu, var) [W]."""
  from kernels_pallas.triton_backend import plgpu
  refs = list(refs)
  map_refs = refs[:3]
  rflag_ref = refs[3] if segmented else None
  g_refs = refs[3 + segmented:5 + segmented]
  after_refs, first_refs = refs[-4:-2], refs[-2:]
  chunks = pl.cdiv(tiles, chunk)

  def body(j, carry):
    maps, reset, rows, mask = _scan_loads(tiles, chunk, width, chunks - 1 - j, map_refs, rflag_ref)
    after, before = _chain_chunk(*maps, reset, carry)
    for ref, value in zip(after_refs, after):
      plgpu.store(ref.at[rows, :], value, mask=mask)
    return before

  carry = lax.fori_loop(0, chunks, body, tuple(ref[...] for ref in g_refs))
  for ref, value in zip(first_refs, carry):
    ref[...] = value


def _tiled_shapes(spec: _Spec):
  """(groups per program of the tile kernels, of the scans, tiles per scan chunk)."""
  cfg, d = spec.config.tiled, spec.dims
  return (d.gb, _pow2_divisor(d.groups, cfg.scan_groups),
          min(cfg.scan_chunk, pl.next_power_of_2(d.tiles)))


def _tiled_call(spec: _Spec, kernel, grid, in_specs, out_specs, out_shape, name, warps):
  from kernels_pallas.triton_backend import plgpu
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=spec.interpret, name=name,
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1))


def _tile_call(spec: _Spec, kernel, args, kinds, out_kinds, out_dtype, name, dims=None,
               warps=None):
  """A per-tile kernel over the grid (B, tiles, G / Gb) of dims (default spec.dims). kinds /
  out_kinds name each argument's layout: "seq" [B, L, G, K], "feat" [G, K], "tstat" [B, tiles,
  G], "flags" [B, L], "partial" [B, tiles, G, K], "step" [B, G, L] float32."""
  d = dims or spec.dims
  gb, kp = d.gb, d.kp
  specs = {
      "seq": pl.BlockSpec((None, d.length, gb, kp), lambda b, i, j: (b, 0, j, 0)),
      "feat": pl.BlockSpec((gb, kp), lambda b, i, j: (j, 0)),
      "tstat": pl.BlockSpec((None, None, gb), lambda b, i, j: (b, i, j)),
      "flags": pl.BlockSpec((None, d.length), lambda b, i, j: (b, 0)),
      "partial": pl.BlockSpec((None, None, gb, kp), lambda b, i, j: (b, i, j, 0)),
      "step": pl.BlockSpec((None, gb, d.length), lambda b, i, j: (b, j, 0)),
  }
  shapes = {
      "seq": jax.ShapeDtypeStruct((spec.batch, d.length, d.groups, d.k), out_dtype),
      "tstat": jax.ShapeDtypeStruct((spec.batch, d.tiles, d.groups), jnp.float32),
      "partial": jax.ShapeDtypeStruct((spec.batch, d.tiles, d.groups, d.k), jnp.float32),
      "step": jax.ShapeDtypeStruct((spec.batch, d.groups, d.length), jnp.float32),
  }
  keep = [(a, k) for a, k in zip(args, kinds) if a is not None]
  grid = (spec.batch, d.tiles, d.groups // gb)
  in_specs, out_specs = [specs[k] for _, k in keep], [specs[k] for k in out_kinds]
  if spec.config.tiled.groups_fastest:
    # Grid (G / Gb, tiles, B): the kernels read the tile from program_id(1) either way.
    grid = grid[::-1]
    swap = lambda s: pl.BlockSpec(s.block_shape, lambda j, i, b, f=s.index_map: f(b, i, j))  # noqa: E731
    in_specs, out_specs = [swap(s) for s in in_specs], [swap(s) for s in out_specs]
  return _tiled_call(spec, kernel, grid, in_specs, out_specs, [shapes[k] for k in out_kinds], name,
                     warps or spec.config.tiled.num_warps)(*[a for a, _ in keep])


def _scan_call(spec: _Spec, kernel, tile_args, rflags, seq_args, n_tile_out, n_seq_out, name):
  """A scan over tiles with the grid (B, G / W): tile_args [B, tiles, G], rflags [B, tiles] or
  None, seq_args [B, G]; outputs n_tile_out arrays [B, tiles, G] and n_seq_out [B, G]."""
  d = spec.dims
  _, width, chunk = _tiled_shapes(spec)
  tile_spec = pl.BlockSpec((None, d.tiles, width), lambda b, j: (b, 0, j))
  seq_spec = pl.BlockSpec((None, width), lambda b, j: (b, j))
  args = list(tile_args) + ([rflags] if rflags is not None else []) + list(seq_args)
  in_specs = ([tile_spec] * len(tile_args)
              + ([pl.BlockSpec((None, d.tiles), lambda b, j: (b, 0))] if rflags is not None else [])
              + [seq_spec] * len(seq_args))
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out_shape = ([f32((spec.batch, d.tiles, d.groups))] * n_tile_out
               + [f32((spec.batch, d.groups))] * n_seq_out)
  kernel = functools.partial(kernel, tiles=d.tiles, chunk=chunk, width=width,
                             segmented=rflags is not None)
  return _tiled_call(spec, kernel, (spec.batch, d.groups // width), in_specs,
                     [tile_spec] * n_tile_out + [seq_spec] * n_seq_out, out_shape, name,
                     spec.config.tiled.scan_warps)(*args)


def _tile_resets(spec: _Spec, flags):
  """[B, tiles] int32: 1 where the tile contains a reset; None without segment_ids."""
  d = spec.dims
  if not d.segmented:
    return None
  reset = (flags & _RESET) != 0
  reset = jnp.pad(reset, ((0, 0), (0, d.tiles * d.tile - d.length)))
  return jnp.any(reset.reshape(spec.batch, d.tiles, d.tile), axis=-1).astype(jnp.int32)


def _tiled_forward(spec: _Spec, x4, w_hat, bias, n0, mu0, var0, flags):
  """-> y4, mean and var after the last step [B*G], residuals for the backward."""
  d = spec.dims
  per_seq = lambda a: a.reshape(spec.batch, d.groups)
  flags = flags if d.has_flags else None
  moments = spec.config.tiled.backward == "steps"
  summary = _tile_call(spec, functools.partial(_tiled_fwd_summary_kernel, dims=d, moments=moments),
                       (x4, flags), ("seq", "flags"), ("tstat",) * 3 + ("step",) * (2 * moments),
                       x4.dtype, "timestep_norm_tiled_fwd_summary")
  summary, steps = summary[:3], tuple(summary[3:])
  cn, cmu, cvar, n_end, mu_end, var_end = _scan_call(
      spec, _tiled_fwd_scan_kernel, summary, _tile_resets(spec, flags),
      (per_seq(n0), per_seq(mu0), per_seq(var0)), 3, 3, "timestep_norm_tiled_fwd_scan")
  y4 = _tile_call(spec, functools.partial(_tiled_fwd_kernel, dims=d, eps=spec.eps),
                  (x4, w_hat, bias, cn, cmu, cvar, flags),
                  ("seq", "feat", "feat", "tstat", "tstat", "tstat", "flags"), ("seq",), x4.dtype,
                  "timestep_norm_tiled_fwd")[0]
  return y4, mu_end.reshape(-1), var_end.reshape(-1), (cn, cmu, cvar, n_end) + steps


def _tiled_backward(spec: _Spec, x4, dy4, w_hat, saved, g_mu, g_var, flags):
  """-> dx4, d w_hat [G, K], d bias [G, K], d mean0, d var0 [B*G]."""
  if spec.config.tiled.backward == "steps":
    return _steps_backward(spec, x4, dy4, w_hat, saved, g_mu, g_var, flags)
  d = spec.dims
  cn, cmu, cvar, n_end = saved
  flags = flags if d.has_flags else None
  per_seq = lambda a: a.reshape(spec.batch, d.groups)
  seq_tstat = ("seq", "seq", "feat", "tstat", "tstat", "tstat")
  maps = _tile_call(spec, functools.partial(_tiled_bwd_summary_kernel, dims=d, eps=spec.eps),
                    (x4, dy4, w_hat, cn, cmu, cvar, flags), seq_tstat + ("flags",),
                    ("tstat",) * 3, x4.dtype, "timestep_norm_tiled_bwd_summary")
  resets = _tile_resets(spec, flags)
  u_mu, u_var, b_mu, b_var = _chain_tile_maps(spec, maps, n_end, resets, g_mu, g_var)
  dx4, dw, db = _tile_call(spec, functools.partial(_tiled_bwd_kernel, dims=d, eps=spec.eps),
                           (x4, dy4, w_hat, cn, cmu, cvar, u_mu, u_var, flags),
                           seq_tstat + ("tstat", "tstat", "flags"), ("seq", "partial", "partial"),
                           x4.dtype, "timestep_norm_tiled_bwd")
  return (dx4, jnp.sum(dw, axis=(0, 1)), jnp.sum(db, axis=(0, 1)),
          *_incoming_adjoint(spec, cn, n_end, resets, g_mu, g_var, b_mu, b_var))


def _chain_tile_maps(spec: _Spec, maps, n_end, resets, g_mu, g_var):
  """The backward scan over tiles: (adjoint after every tile divided by the count there (mu, var)
  [B, tiles, G], the one before the first tile (mu, var) [B, G])."""
  per_seq = lambda a: a.reshape(spec.batch, spec.dims.groups)
  # Adjoints are chained divided by the count; the final count is 0 only when the last segment
  # is all padding, and then nothing before it depends on the final state through a valid step.
  inv_end = _safe_inv(n_end)
  return _scan_call(spec, _tiled_bwd_scan_kernel, maps, resets,
                    (per_seq(g_mu) * inv_end, per_seq(g_var) * inv_end), 2, 2,
                    "timestep_norm_tiled_bwd_scan")


def _incoming_adjoint(spec: _Spec, cn, n_end, resets, g_mu, g_var, b_mu, b_var):
  """d mean0, d var0 [B*G] from the chained adjoint before the first tile, b_mu, b_var [B, G]."""
  per_seq = lambda a: a.reshape(spec.batch, spec.dims.groups)
  # A sequence without valid steps or resets passes the final adjoint to the incoming state
  # unchanged (count 0 included); otherwise it is the carried count times the chained adjoint.
  n0 = cn[:, 0]
  through = n_end == 0
  if resets is not None:
    through &= ~jnp.any(resets != 0, axis=1)[:, None]
  d_mu0 = jnp.where(through, per_seq(g_mu), n0 * b_mu)
  d_var0 = jnp.where(through, per_seq(g_var), n0 * b_var)
  return d_mu0.reshape(-1), d_var0.reshape(-1)


# --------------------------------------------------------------------------------------------
# Step-wise backward of the tiled design (TiledConfig.backward="steps"). The statistics and
# their adjoints depend on x and dy only through per-step sums over each group's features, so
# the backward is split into two passes over x and dy that do nothing else, and small kernels
# on per-step arrays [B, G, L] (float32, 1/K of the traffic) in between:
#   sums: one program per (sequence, tile, block of Gb groups): per step s1 = sum dy w^ and
#     s3 = sum dy w^ (x - m) (m: the step's mean; no running statistics needed);
#   maps: one program per (sequence, tile, block of Gs groups): the running statistics from the
#     forward's per-step moments (m, v, saved by the forward summary) and the tile's incoming
#     carry, then the tile's adjoint map (as _tiled_bwd_summary_kernel, from the sums);
#   scan: the backward scan over tiles (_tiled_bwd_scan_kernel);
#   coefficients: as maps, with the adjoint after the tile: per step a = rstd, bv = g_v,
#     c = g_m + g_v (mu - m), mu (0 on padded steps) so that dx = a w^ dy + bv (x - mu) + c;
#   apply: one program per (sequence, tile, block of Gb groups): dx, and the tile's partial
#     dw = sum a dy (x - mu), db = sum dy over steps with a != 0 (valid steps: rstd > 0).
# The two passes are plain reductions / elementwise maps with one layout: no running sums or
# reverse recurrences over the [T, Gb, K] tiles, which cost the all-in-one kernels their
# registers and barriers. The forward's per-step moments add 2/K of x's bytes to its traffic.
# --------------------------------------------------------------------------------------------


def _steps_bwd_sums_kernel(x_ref, dy_ref, w_ref, s1_ref, s3_ref, *, dims: _Dims):
  """Inputs x, dy [L, Gb, Kp], w_hat [Gb, Kp]; outputs per step s1 = sum dy w^ and
  s3 = sum dy w^ (x - m) over each group's features (s1, s3 [Gb, L], this tile's rows)."""
  ops = _BlockOps(dims.tile, dims.kp, dims.k)
  i = pl.program_id(1)
  (xf, dy), _, _ = _tiled_inputs(dims, i, (x_ref, dy_ref), None)
  dyw = dy * _load_features(dims, w_ref)[None]     # 0 in padded columns and past the end.
  m = ops.gsum(xf) * (1.0 / dims.k)
  _store_rows(dims, s1_ref, i, ops.gsum(dyw))
  _store_rows(dims, s3_ref, i, ops.gsum(dyw * (xf - ops.gbcast(m))))


def _steps_bwd_adjoint_kernel(*refs, dims: _Dims, eps: float, summary: bool):
  """Inputs per-step m, v, s1, s3 [Gs, L], the tile's incoming n, mu, var [Gs], (unless summary:
  the adjoint after the tile divided by the count there (mu, var) [Gs]), (flags [L]). Outputs
  the tile's adjoint map a_mu, a_var, z0 [Gs] (summary) or the per-step coefficients a, bv, c,
  mu [Gs, L] (this tile's rows; see the section comment)."""
  refs = list(refs)
  m_ref, v_ref, s1_ref, s3_ref, n_ref, mu_ref, var_ref = refs[:7]
  umu_ref, uvar_ref = (None, None) if summary else refs[7:9]
  flags_ref = refs[7 + 2 * (not summary)] if dims.has_flags else None
  outs = refs[-3:] if summary else refs[-4:]
  ops = _BlockOps(dims.tile, 1, 1)
  i = pl.program_id(1)
  m, v, s1, s3 = (_load_rows(dims, ref, i) for ref in (m_ref, v_ref, s1_ref, s3_ref))
  _, valid, reset = _tiled_inputs(dims, i, (), flags_ref)
  carry = (n_ref[...], mu_ref[...], var_ref[...])
  st = _stats_from_moments(ops, m, v, valid, reset, carry, eps=eps, segmented=dims.segmented,
                           use_cumsum=True)
  s2 = s3 + (m - st.mu) * s1                         # sum dy w^ (x - mu_t)
  if summary:
    zero = jnp.zeros((dims.gb,), jnp.float32)
    adj = _step_adjoints(ops, st, s1, s2, valid, carry, zero, zero, k=dims.k)
    for ref, value in zip(outs, (adj.a_mu, adj.a_var, adj.z0)):
      ref[...] = jnp.broadcast_to(value, (dims.gb,))
    return
  n_end = _last(ops, st, st.cnt)
  adj = _step_adjoints(ops, st, s1, s2, valid, carry, n_end * umu_ref[...], n_end * uvar_ref[...],
                       k=dims.k)
  coefs = (st.rstd, adj.g_v, adj.g_m + adj.g_v * (st.mu - st.m), st.mu)
  for ref, value in zip(outs, coefs):
    _store_rows(dims, ref, i, jnp.where(valid, value, 0.0))


def _steps_bwd_apply_kernel(x_ref, dy_ref, w_ref, a_ref, bv_ref, c_ref, mu_ref, dx_ref, dw_ref,
                            db_ref, *, dims: _Dims, per_program: int):
  """Inputs x, dy [L, Gb, Kp], w_hat [Gb, Kp], per-step coefficients a, bv, c, mu [Gb, L];
  outputs dx [L, Gb, Kp] (the rows of this program's per_program tiles) and their dw, db
  [Gb, Kp]. Tiles past the end are fully masked."""
  from kernels_pallas.triton_backend import plgpu
  w_hat = _load_features(dims, w_ref)[None]
  first = pl.program_id(1) * per_program

  def body(r, acc):
    i = first + r
    (xf, dy), _, _ = _tiled_inputs(dims, i, (x_ref, dy_ref), None)
    a, bv, c, mu = (_load_rows(dims, ref, i)[:, :, None] for ref in (a_ref, bv_ref, c_ref, mu_ref))
    xm = xf - mu
    _tiled_store(dims, dx_ref, i, a * w_hat * dy + bv * xm + c)
    # Elementwise sums over the program's tiles; reduced over steps once at the end.
    return acc[0] + a * dy * xm, acc[1] + jnp.where(a != 0.0, dy, 0.0)

  zeros = jnp.zeros((dims.tile, dims.gb, dims.kp), jnp.float32)
  dw, db = lax.fori_loop(0, per_program, body, (zeros, zeros))
  mask = jnp.broadcast_to((jnp.arange(dims.kp) < dims.k)[None, :], (dims.gb, dims.kp))
  plgpu.store(dw_ref, jnp.sum(dw, axis=0), mask=mask)
  plgpu.store(db_ref, jnp.sum(db, axis=0), mask=mask)


def _steps_dims(spec: _Spec) -> _Dims:
  """Dims of the per-step kernels: the forward's tiles, step_groups groups per program (at most
  groups_per_block with segment_ids: masked [T, T, Gs] sums)."""
  cfg, d = spec.config.tiled, spec.dims
  cap = cfg.groups_per_block if d.segmented else cfg.step_groups
  return dataclasses.replace(d, gb=_pow2_divisor(d.groups, cap))


def _pass_dims(spec: _Spec, per_program: int = 1) -> _Dims:
  """Dims of the step-wise backward's passes over x and dy (pass_block_t x pass_groups tiles;
  tiles counts programs along time, each covering per_program tiles)."""
  cfg, d = spec.config.tiled, spec.dims
  tile = d.tile
  if cfg.pass_block_t:
    tile = min(cfg.pass_block_t, max(8, pl.next_power_of_2(d.length)))
  gb = _pow2_divisor(d.groups, cfg.pass_groups) if cfg.pass_groups else d.gb
  return dataclasses.replace(d, tile=tile, gb=gb,
                             tiles=pl.cdiv(pl.cdiv(d.length, tile), per_program))


def _steps_backward(spec: _Spec, x4, dy4, w_hat, saved, g_mu, g_var, flags):
  """-> dx4, d w_hat [G, K], d bias [G, K], d mean0, d var0 [B*G] (step-wise design)."""
  d = spec.dims
  cn, cmu, cvar, n_end, m, v = saved
  flags = flags if d.has_flags else None
  sd = _steps_dims(spec)
  warps = spec.config.tiled.scan_warps
  pd = _pass_dims(spec)
  s1, s3 = _tile_call(spec, functools.partial(_steps_bwd_sums_kernel, dims=pd), (x4, dy4, w_hat),
                      ("seq", "seq", "feat"), ("step", "step"), x4.dtype,
                      "timestep_norm_steps_bwd_sums", dims=pd)
  step_in = (m, v, s1, s3, cn, cmu, cvar)
  step_kinds = ("step",) * 4 + ("tstat",) * 3
  maps = _tile_call(spec, functools.partial(_steps_bwd_adjoint_kernel, dims=sd, eps=spec.eps,
                                            summary=True),
                    step_in + (flags,), step_kinds + ("flags",), ("tstat",) * 3, x4.dtype,
                    "timestep_norm_steps_bwd_maps", dims=sd, warps=warps)
  resets = _tile_resets(spec, flags)
  u_mu, u_var, b_mu, b_var = _chain_tile_maps(spec, maps, n_end, resets, g_mu, g_var)
  coefs = _tile_call(spec, functools.partial(_steps_bwd_adjoint_kernel, dims=sd, eps=spec.eps,
                                             summary=False),
                     step_in + (u_mu, u_var, flags), step_kinds + ("tstat", "tstat", "flags"),
                     ("step",) * 4, x4.dtype, "timestep_norm_steps_bwd_coefficients", dims=sd,
                     warps=warps)
  per_program = min(spec.config.tiled.pass_tiles, pd.tiles)
  ad = _pass_dims(spec, per_program)
  dx4, dw, db = _tile_call(spec, functools.partial(_steps_bwd_apply_kernel, dims=pd,
                                                   per_program=per_program),
                           (x4, dy4, w_hat, *coefs), ("seq", "seq", "feat") + ("step",) * 4,
                           ("seq", "partial", "partial"), x4.dtype, "timestep_norm_steps_bwd_apply",
                           dims=ad)
  return (dx4, jnp.sum(dw, axis=(0, 1)), jnp.sum(db, axis=(0, 1)),
          *_incoming_adjoint(spec, cn, n_end, resets, g_mu, g_var, b_mu, b_var))


# --------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels: grid (B, time tiles); each program holds all G groups of one tile of
# one sequence ([T, D] blocks, pipelined by Pallas), with the carry in VMEM scratch across the
# sequential time axis. Group and time sums are matmuls. time_splits, prefetch, num_warps and
# num_stages do not apply. Arrays: x, y, dy, dx [B, L, D]; w_hat, bias [1, D]; onehot [D, G];
# per-sequence statistics [B, 1, G]; saved carries and shifts [B, tiles, 4, G]; flags
# [B, L, 1] int32;
# dw, db [B, 1, D].
# --------------------------------------------------------------------------------------------


def _mosaic_tile_inputs(dims: _Dims, tile_idx, x_refs, flags_ref):
  """Tiles as float32 (rows past the end zeroed: edge blocks hold garbage), valid, reset [T, 1]."""
  steps = tile_idx * dims.tile + lax.broadcasted_iota(jnp.int32, (dims.tile, 1), 0)
  in_range = steps < dims.length
  tiles = tuple(jnp.where(in_range, ref[...].astype(jnp.float32), 0.0) for ref in x_refs)
  if flags_ref is None:
    return tiles, in_range, jnp.zeros((dims.tile, 1), jnp.bool_)
  flags = flags_ref[...]
  return tiles, in_range & ((flags & _VALID) != 0), in_range & ((flags & _RESET) != 0)


def _mosaic_fwd_kernel(*refs, dims: _Dims, eps: float):
  refs = list(refs)
  x_ref, w_ref, b_ref, onehot_ref, n_ref, mu_ref, var_ref = refs[:7]
  flags_ref = refs[7] if dims.has_flags else None
  y_ref, saved_ref, mu_out, var_out, carry_ref = refs[-5:]
  i = pl.program_id(1)

  @pl.when(i == 0)
  def _():
    carry_ref[0:1, :] = n_ref[...]
    carry_ref[1:2, :] = mu_ref[...]
    carry_ref[2:3, :] = var_ref[...]

  carry = (carry_ref[0:1, :], carry_ref[1:2, :], carry_ref[2:3, :])
  ops = _TpuOps(dims.tile, onehot_ref[...])
  (xf,), valid, reset = _mosaic_tile_inputs(dims, i, (x_ref,), flags_ref)
  st = _tile_stats(ops, xf, valid, reset, carry, k=dims.k, eps=eps, segmented=dims.segmented,
                   use_cumsum=False)
  saved_ref[0:3, :] = carry_ref[...]
  saved_ref[3:4, :] = st.c
  y_ref[...] = _tile_output(ops, st, xf, w_ref[...], b_ref[...], valid).astype(y_ref.dtype)
  n, mu, var = _tile_carry_out(ops, st, carry)
  carry_ref[0:1, :], carry_ref[1:2, :], carry_ref[2:3, :] = n, mu, var

  @pl.when(i == pl.num_programs(1) - 1)
  def _():
    mu_out[...] = mu
    var_out[...] = var


def _mosaic_bwd_kernel(*refs, dims: _Dims, eps: float):
  refs = list(refs)
  x_ref, dy_ref, w_ref, onehot_ref, saved_ref, gmu_ref, gvar_ref = refs[:7]
  flags_ref = refs[7] if dims.has_flags else None
  dx_ref, dw_ref, db_ref, omu_ref, ovar_ref, u_ref = refs[-6:]
  i = pl.program_id(1)
  tile_idx = pl.num_programs(1) - 1 - i

  @pl.when(i == 0)
  def _():
    u_ref[0:1, :] = gmu_ref[...]
    u_ref[1:2, :] = gvar_ref[...]
    dw_ref[...] = jnp.zeros_like(dw_ref)
    db_ref[...] = jnp.zeros_like(db_ref)

  ops = _TpuOps(dims.tile, onehot_ref[...])
  (xf, dy), valid, reset = _mosaic_tile_inputs(dims, tile_idx, (x_ref, dy_ref), flags_ref)
  carry = (saved_ref[0:1, :], saved_ref[1:2, :], saved_ref[2:3, :])
  st = _tile_stats(ops, xf, valid, reset, carry, k=dims.k, eps=eps, segmented=dims.segmented,
                   use_cumsum=False, shift=saved_ref[3:4, :])
  dx, dw, db, out_mu, out_var = _tile_backward(
      ops, st, xf, dy, w_ref[...], valid, carry, u_ref[0:1, :], u_ref[1:2, :], k=dims.k)[:5]
  dx_ref[...] = dx.astype(dx_ref.dtype)
  dw_ref[...] += dw
  db_ref[...] += db
  u_ref[0:1, :] = out_mu
  u_ref[1:2, :] = out_var

  @pl.when(i == pl.num_programs(1) - 1)
  def _():
    omu_ref[...] = out_mu
    ovar_ref[...] = out_var


def _mosaic_call(spec: _Spec, kernel, in_specs, out_specs, out_shape, scratch, name):
  from jax.experimental.pallas import tpu as pltpu
  d = spec.dims
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=0, grid=(spec.batch, d.tiles), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM(scratch, jnp.float32)])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=spec.interpret, name=name,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")))


def _mosaic_specs(spec: _Spec, reverse: bool):
  d = spec.dims
  dim, groups, n = d.groups * d.k, d.groups, d.tiles
  tile = (lambda b, i: (b, n - 1 - i, 0)) if reverse else (lambda b, i: (b, i, 0))
  seq = pl.BlockSpec((None, d.tile, dim), tile)
  flags = pl.BlockSpec((None, d.tile, 1), tile)
  row = pl.BlockSpec((1, dim), lambda b, i: (0, 0))
  onehot = pl.BlockSpec((dim, groups), lambda b, i: (0, 0))
  stats = pl.BlockSpec((None, 1, groups), lambda b, i: (b, 0, 0))
  saved = pl.BlockSpec((None, None, _SAVED, groups),
                       (lambda b, i: (b, n - 1 - i, 0, 0)) if reverse else (lambda b, i: (b, i, 0, 0)))
  per_seq = pl.BlockSpec((None, 1, dim), lambda b, i: (b, 0, 0))
  return seq, flags, row, onehot, stats, saved, per_seq


def _onehot(dims: _Dims):
  return (jnp.arange(dims.groups * dims.k)[:, None] // dims.k
          == jnp.arange(dims.groups)[None, :]).astype(jnp.float32)


def _mosaic_forward(spec: _Spec, x, w_hat, bias, n0, mu0, var0, flags):
  d = spec.dims
  seq, flag_spec, row, onehot, stats, saved, _ = _mosaic_specs(spec, reverse=False)
  args = [x, w_hat, bias, _onehot(d), n0, mu0, var0]
  in_specs = [seq, row, row, onehot, stats, stats, stats]
  if d.has_flags:
    args.append(flags)
    in_specs.append(flag_spec)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),
               f32((spec.batch, d.tiles, _SAVED, d.groups)),
               f32(n0.shape), f32(n0.shape)]
  kernel = functools.partial(_mosaic_fwd_kernel, dims=d, eps=spec.eps)
  y, saved_carries, mu_out, var_out = _mosaic_call(
      spec, kernel, in_specs, [seq, saved, stats, stats], out_shape, (3, d.groups),
      "timestep_norm_fwd")(*args)
  return y, mu_out, var_out, saved_carries


def _mosaic_backward(spec: _Spec, x, dy, w_hat, saved_carries, g_mu, g_var, flags):
  d = spec.dims
  seq, flag_spec, row, onehot, stats, saved, per_seq = _mosaic_specs(spec, reverse=True)
  args = [x, dy, w_hat, _onehot(d), saved_carries, g_mu, g_var]
  in_specs = [seq, seq, row, onehot, saved, stats, stats]
  if d.has_flags:
    args.append(flags)
    in_specs.append(flag_spec)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  dim = d.groups * d.k
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), f32((spec.batch, 1, dim)),
               f32((spec.batch, 1, dim)), f32(g_mu.shape), f32(g_mu.shape)]
  kernel = functools.partial(_mosaic_bwd_kernel, dims=d, eps=spec.eps)
  dx, dw, db, o_mu, o_var = _mosaic_call(
      spec, kernel, in_specs, [seq, per_seq, per_seq, stats, stats], out_shape, (2, d.groups),
      "timestep_norm_bwd")(*args)
  return dx, jnp.sum(dw, axis=0), jnp.sum(db, axis=0), o_mu, o_var


# --------------------------------------------------------------------------------------------
# custom_vjp over either backend (arguments and results in the backend's layout, except x: see
# _backend_x).
# --------------------------------------------------------------------------------------------

_BACKENDS = {"triton": (_triton_forward, _triton_backward),
             "triton_tiled": (_tiled_forward, _tiled_backward),
             "mosaic": (_mosaic_forward, _mosaic_backward)}


def _backend_x(spec: _Spec, x):
  """x [B, L, D] -> the backend's layout ([B, L, G, K] for the Triton designs).

  The reshape happens inside the custom VJP so that the residual is x as the caller passed it:
  a caller that keeps the same array for another backward (sequence parallelism's slice
  statistics) then shares one saved value instead of keeping x twice under a layer scan."""
  if spec.backend == "mosaic":
    return x
  return x.reshape(x.shape[0], x.shape[1], spec.dims.groups, spec.dims.k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tsn_core(spec: _Spec, x, w_hat, bias, n0, mu0, var0, flags):
  """x: [B, L, D]; the rest, and the results, in the backend's layout."""
  y, mu_out, var_out, _ = _BACKENDS[spec.backend][0](spec, _backend_x(spec, x), w_hat, bias, n0, mu0,
                                                     var0, flags)
  return y, mu_out, var_out


def _tsn_fwd(spec, x, w_hat, bias, n0, mu0, var0, flags):
  y, mu_out, var_out, saved = _BACKENDS[spec.backend][0](spec, _backend_x(spec, x), w_hat, bias, n0,
                                                         mu0, var0, flags)
  return (y, mu_out, var_out), (x, w_hat, n0, saved, flags)


def _tsn_bwd(spec, residuals, cotangents):
  x, w_hat, n0, saved, flags = residuals
  dy, g_mu, g_var = cotangents
  dx, dw, db, d_mu0, d_var0 = _BACKENDS[spec.backend][1](spec, _backend_x(spec, x), dy.astype(x.dtype),
                                                         w_hat, saved, g_mu, g_var, flags)
  flags_ct = None if flags is None else np.zeros(flags.shape, jax.dtypes.float0)
  return dx.reshape(x.shape), dw, db, jnp.zeros_like(n0), d_mu0, d_var0, flags_ct


_tsn_core.defvjp(_tsn_fwd, _tsn_bwd)


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------

BACKENDS = ("triton", "mosaic")


def _final_count(count0, valid, reset):
  """Exact int32 count after the last step: valid steps since the last reset (or all + prior)."""
  steps = jnp.arange(valid.shape[1])[None, :]
  last_reset = jnp.max(jnp.where(reset, steps, -1), axis=1, keepdims=True)
  since = jnp.sum(valid & (steps >= last_reset), axis=1, dtype=jnp.int32)
  return since + jnp.where(last_reset[:, 0] < 0, count0, 0)


def timestep_norm_pallas(x: jax.Array, weight: jax.Array, bias: jax.Array, *, num_groups: int,
                         eps: float = 1e-5, state: TimestepNormState | None = None,
                         padding_mask: jax.Array | None = None,
                         segment_ids: jax.Array | None = None, interpret: bool | None = None,
                         config: KernelConfig | None = None,
                         backend: str | None = None) -> tuple[jax.Array, TimestepNormState]:
  """Fused TimestepNorm; same contract as megalodon_jax.ops.timestep_norm.timestep_norm.

  x: [B, L, D]; weight, bias: [D] (weight applied as weight + 1); state: count [B], mean/var
  [B, G]; padding_mask: [B, L] bool (True = padded); segment_ids: [B, L] int.
  interpret: run the Pallas interpreter (default: off the backend's own platform, e.g. always on a CPU).
  config: KernelConfig tunables (tile size, warps, stages, time splits, prefetch, cumsum; or
  tiled=TiledConfig(...) for the tiled GPU design); None: default_config(backend) (Triton: the
  tiled design).
  backend: "triton" (GPU) or "mosaic" (TPU); default: mosaic on TPU, triton elsewhere (both run
  interpreted on CPU).
  Returns y [B, L, D] in x.dtype and the state after the last step. Differentiable (custom VJP)
  w.r.t. x, weight, bias and the incoming state's mean and var.
  """
  tsn_ops.check_inputs(x, weight, bias, num_groups, state, padding_mask, segment_ids)
  if backend is None:
    backend = "mosaic" if jax.default_backend() == "tpu" else "triton"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  native = {"triton": "gpu", "mosaic": "tpu"}[backend]
  if interpret is None:  # natively on the backend's own platform, interpreted anywhere else
    interpret = jax.default_backend() != native
  if backend == "triton" and not interpret and config is None:
    single = _single_pass_or_none(x, weight, bias, num_groups, eps, state, padding_mask, segment_ids)
    if single is not None:
      return single
  config = config or default_config(backend)
  if config.tiled is not None and backend != "triton":
    raise ValueError("KernelConfig.tiled selects a Triton (GPU) design; use backend='triton' or "
                     "leave config.tiled unset for the Mosaic backend")
  if state is None:
    state = tsn_ops.initial_state(x.shape[0], num_groups)
  return _timestep_norm_pallas(x, weight, bias, state, padding_mask, segment_ids,
                               num_groups=num_groups, eps=float(eps), interpret=bool(interpret),
                               config=config, backend=backend)


def _single_pass_or_none(x, weight, bias, num_groups, eps, state, padding_mask, segment_ids):
  """The single-pass Mosaic GPU kernels' result (kernels_pallas/timestep_norm_single_pass.py) when they take the
  call: a Hopper GPU, no padding mask or segment ids, shapes they tile; None otherwise (the Triton kernels run).
  MEGALODON_TSN_SINGLE_PASS=0 always returns None; =1 raises instead of returning None."""
  from kernels_pallas import timestep_norm_single_pass as single  # Mosaic GPU: imported only on this path
  wanted = single.mode()
  if wanted == "off":
    return None
  reason = single.why_not(x.shape, x.dtype, num_groups, padding_mask, segment_ids)
  if reason is not None:
    if wanted == "force":
      raise ValueError(f"{single.ENV}=1 but the single-pass TimestepNorm kernels cannot take this call: {reason}")
    return None
  if state is None:
    state = tsn_ops.initial_state(x.shape[0], num_groups)
  return single.timestep_norm_single_pass(x, weight, bias, state, num_groups=num_groups, eps=float(eps))


# The Triton default: the tiled design with the step-wise backward, scans over tiles in one pass
# of one group per program, and the backward's passes in tiles of 32 steps x 2 groups, 4 tiles
# per dx program. H200, B1 L32768 D4096 G64 bf16 (2026-11-29): fwd 0.292 ms, fwd+bwd 0.758 ms
# device time against 0.293 / 1.031 ms for TiledConfig() (per-tile backward); the XLA
# associative op took 0.465 / 1.264 ms. With step-major per-step arrays it was 0.316 / 0.895 ms;
# the odd-shape check (float32, padding, segments, carry) passed on the GPU.
GPU_DEFAULT = TiledConfig(backward="steps", scan_chunk=512, scan_groups=1, pass_block_t=32,
                          pass_groups=2, pass_tiles=4)


def default_config(backend: str = "triton") -> KernelConfig:
  """The configuration used when none is given. Triton: the tiled design with GPU_DEFAULT (see
  there). Mosaic: KernelConfig()."""
  return KernelConfig(tiled=GPU_DEFAULT) if backend == "triton" else KernelConfig()


def _make_spec(batch, length, dim, num_groups, eps, interpret, config, backend, has_flags,
               segmented) -> _Spec:
  k = dim // num_groups
  gb = 1
  if config.tiled is not None:
    tile = min(config.tiled.block_t, max(8, pl.next_power_of_2(length)))
    splits, tiles = 1, pl.cdiv(length, tile)
    gb = _pow2_divisor(num_groups, config.tiled.groups_per_block)
    backend = "triton_tiled"
  elif backend == "mosaic":
    # Blocks of [T, D]: T a multiple of 8, or the whole (short) sequence.
    tile = config.block_t if length >= config.block_t else length
    splits, tiles = 1, pl.cdiv(length, tile)
  else:
    tile = min(config.block_t, max(8, pl.next_power_of_2(length)))
    total_tiles = pl.cdiv(length, tile)
    splits = min(config.time_splits, total_tiles)
    tiles = pl.cdiv(total_tiles, splits)
  dims = _Dims(length=length, groups=num_groups, k=k, kp=pl.next_power_of_2(k), tile=tile,
               tiles=tiles, has_flags=has_flags, segmented=segmented, gb=gb)
  return _Spec(dims=dims, batch=batch, splits=splits, eps=eps, config=config, interpret=interpret,
               backend=backend)


@functools.partial(jax.jit, static_argnames=("num_groups", "eps", "interpret", "config", "backend"))
def _timestep_norm_pallas(x, weight, bias, state, padding_mask, segment_ids, *, num_groups, eps,
                          interpret, config, backend):
  batch, length, dim = x.shape
  has_flags = padding_mask is not None or segment_ids is not None
  spec = _make_spec(batch, length, dim, num_groups, eps, interpret, config, backend, has_flags,
                    segment_ids is not None)
  valid = jnp.ones((batch, length), jnp.bool_) if padding_mask is None else ~padding_mask
  reset = tsn_ops.reset_flags(segment_ids, batch, length)
  flags = (jnp.where(valid, _VALID, 0) | jnp.where(reset, _RESET, 0)).astype(jnp.int32)
  count0 = jnp.asarray(state.count, jnp.int32)
  mean0 = jnp.asarray(state.mean, jnp.float32)
  var0 = jnp.asarray(state.var, jnp.float32)
  w_hat = weight.astype(jnp.float32) + 1.0
  b = bias.astype(jnp.float32)
  k = dim // num_groups
  if backend == "mosaic":
    stats = lambda a: a.reshape(batch, 1, num_groups)
    n0 = jnp.broadcast_to(count0.astype(jnp.float32)[:, None, None], (batch, 1, num_groups))
    args = (x, w_hat.reshape(1, dim), b.reshape(1, dim), n0, stats(mean0), stats(var0),
            flags[..., None] if has_flags else None)
  else:
    stats = lambda a: a.reshape(batch * num_groups)
    n0 = jnp.repeat(count0.astype(jnp.float32), num_groups)
    args = (x, w_hat.reshape(num_groups, k), b.reshape(num_groups, k), n0, stats(mean0), stats(var0),
            flags if has_flags else None)
  y, mu_out, var_out = _tsn_core(spec, *args)
  new_state = TimestepNormState(count=_final_count(count0, valid, reset),
                                mean=mu_out.reshape(batch, num_groups),
                                var=var_out.reshape(batch, num_groups))
  return y.reshape(batch, length, dim), new_state


def timestep_norm_reference(x: jax.Array, weight: jax.Array, bias: jax.Array, *, num_groups: int,
                            eps: float = 1e-5, state: TimestepNormState | None = None,
                            padding_mask: jax.Array | None = None,
                            segment_ids: jax.Array | None = None, interpret: bool | None = None,
                            config: KernelConfig | None = None,
                            backend: str | None = None) -> tuple[jax.Array, TimestepNormState]:
  """Plain-JAX reference with the kernel's signature (interpret/config/backend are ignored)."""
  del interpret, config, backend
  return tsn_ops.timestep_norm(x, weight, bias, num_groups=num_groups, eps=eps, state=state,
                               padding_mask=padding_mask, segment_ids=segment_ids,
                               method="associative")
