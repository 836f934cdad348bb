"""CEMA scan as Pallas kernels (SPEC §2): forward and backward, GPU (Triton) and TPU (Mosaic).

Per channel d and order n (state [B, D, N] complex):
  h_t = k_t q h_{t-1} + p x_t,   y_t = Re(sum_n eta_n h_t,n) + omega_d x_t,
with k_t = 0 at the first step t > 0 of a new segment (the state restarts) and 1 elsewhere; at
t = 0 the state continues from h0.  Complex numbers travel through the kernels as separate
float32 real / imaginary arrays because Pallas has no complex dtype.

Three passes, all O(1) memory per step beyond their inputs and outputs (no [B, L, D, N] tensor):
  * forward scan: writes y (and the final state).  The state is kept divided by p (s = h / p) so
    the update is s = k q s + x with no per-order multiply by p; eta p weights the output.
  * reverse scan (backward for x): the adjoint w_t (JAX cotangent of h_t) obeys
    w_t = k_{t+1} q w_{t+1} + eta dy_t, and dx_t = omega dy_t + sum_n p Re(w_t,n).  It also gives
    the cotangents of p (sum_t x_t Re w_t), omega (sum_t dy_t x_t) and h0 (q w_0).
  * parameter scan (backward for q and eta): forward-mode tangents, all running forward in time,
    so no stored states are needed: v = s (= h / p), z = dv/dq with z_t = k_t (q z_{t-1} + v_{t-1});
    ct(eta) = p sum_t dy_t v_t and ct(q) = eta p sum_t dy_t z_t + G p z_{L-1}, G = ct(h_last).

GPU (Triton): one program per (batch, channel block[, time chunk]); a program walks its time
range in tiles of `block_t` statically unrolled steps, prefetching the next tile's inputs while
it computes the current one.  All register arrays are 1-D lane vectors of one layout (no dynamic
indexing); each channel's N orders are spread over `split` lanes, N / split orders per lane, so
the per-step sum over n is an in-register sum plus log2(split) lane shuffles.  Optionally the time
axis is cut into `num_chunks` chunks run in parallel: a first pass finds every chunk's local final
state from zero, a tiny XLA combine gives each chunk its true starting state, and a second pass
produces the outputs (worth it only when batch * dim is too small to fill the GPU).

TPU (Mosaic): grid (batch, channel block, time tile) with the time axis sequential, the state in
VMEM scratch as [N, block_d] tiles (orders on sublanes, channels on lanes).

Both families share the per-step algebra (_fwd_update, _rev_update, _param_update).  cema_pallas
dispatches on jax.default_backend(): "tpu" -> Mosaic kernels, anything else -> Triton kernels, in
the Pallas interpreter when the backend is CPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from megalodon_jax.ops.cema import CemaCoefficients

# p is folded into the state (s = h / p); p below this floor is treated as the floor so that
# h0 / p stays finite.  Only affects channels whose input scale is already below 1e-30.
_P_FLOOR = 1e-30

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Input checking and the plain-JAX reference.
# ----------------------------------------------------------------------------------------------

def _normalize_inputs(x: Array, coeffs: CemaCoefficients, omega: Array, h0: Array | None,
                      segment_ids: Array | None):
  """Checks shapes; returns (p [D,N] f32, q [D,N] c64, eta [D,N] c64, omega [D] f32, h0, keep).

  keep: [B, L] float32 (1 where the state carries over, 0 where a new segment starts) or None.
  """
  if x.ndim != 3:
    raise ValueError(f"x must be [batch, length, dim]; got shape {x.shape}.")
  batch, length, dim = x.shape
  if length < 1:
    raise ValueError("x must have at least one time step.")
  if not isinstance(coeffs, CemaCoefficients):
    raise TypeError("coeffs must be a CemaCoefficients (see megalodon_jax.ops.cema.cema_coefficients).")
  p = jnp.asarray(coeffs.p)
  if p.ndim != 2 or p.shape[0] != dim:
    raise ValueError(f"coeffs.p must be [dim={dim}, N]; got shape {p.shape}.")
  ndim = p.shape[1]
  for name in ("q", "eta"):
    arr = getattr(coeffs, name)
    if tuple(arr.shape) != (dim, ndim):
      raise ValueError(f"coeffs.{name} must be [{dim}, {ndim}] like coeffs.p; got {tuple(arr.shape)}.")
  omega = jnp.asarray(omega)
  if omega.size != dim or omega.ndim not in (1, 2):
    raise ValueError(f"omega must be [dim] or [dim, 1] with dim={dim}; got shape {omega.shape}.")
  if h0 is not None and tuple(h0.shape) != (batch, dim, ndim):
    raise ValueError(f"h0 must be [batch, dim, N] = {(batch, dim, ndim)}; got {tuple(h0.shape)}.")
  keep = None
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    if tuple(seg.shape) != (batch, length):
      raise ValueError(f"segment_ids must be [batch, length] = {(batch, length)}; got {tuple(seg.shape)}.")
    same = seg[:, 1:] == seg[:, :-1]
    keep = jnp.concatenate([jnp.ones((batch, 1), bool), same], axis=1).astype(jnp.float32)
  q = jnp.asarray(coeffs.q).astype(jnp.complex64)
  eta = jnp.asarray(coeffs.eta).astype(jnp.complex64)
  h0 = None if h0 is None else jnp.asarray(h0).astype(jnp.complex64)
  return (p.astype(jnp.float32), q, eta, omega.reshape(dim).astype(jnp.float32), h0, keep)


def cema_reference(x: Array, coeffs: CemaCoefficients, omega: Array, h0: Array | None = None, *,
                   segment_ids: Array | None = None, return_state: bool = False):
  """Sequential lax.scan CEMA: the semantics the kernels must match.

  x: [batch, length, dim] (any float dtype; computed in float32); coeffs: CemaCoefficients with
  p [dim, N], q, eta [dim, N] complex; omega: [dim] or [dim, 1]; h0: [batch, dim, N] complex64 or
  None (zeros); segment_ids: [batch, length] ints or None.
  Returns y [batch, length, dim] float32, and with return_state also h_last [batch, dim, N] c64.
  """
  p, q, eta, omega, h0, keep = _normalize_inputs(x, coeffs, omega, h0, segment_ids)
  batch, length, dim = x.shape
  x32 = x.astype(jnp.float32)
  if h0 is None:
    h0 = jnp.zeros((batch, dim, p.shape[1]), jnp.complex64)
  if keep is None:
    keep = jnp.ones((batch, length), jnp.float32)

  def step(h, inputs):
    x_t, k_t = inputs  # [B, D], [B]
    h = (k_t[:, None, None] * q) * h + p * x_t[..., None]
    y_t = jnp.sum(eta.real * h.real - eta.imag * h.imag, axis=-1) + omega * x_t
    return h, y_t

  h_last, ys = lax.scan(step, h0, (jnp.swapaxes(x32, 0, 1), keep.T))
  y = jnp.swapaxes(ys, 0, 1)
  return (y, h_last) if return_state else y


# ----------------------------------------------------------------------------------------------
# Kernel configuration.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CemaKernelConfig:
  """Tiling of the three scan passes.

  block_d: channels per program of the forward and reverse scans (block_d * split lanes).
  block_t: time steps per unrolled tile (inputs of the next tile are prefetched).
  split: lanes per channel in the forward / reverse scans (N / split orders per lane).
  num_chunks: parallel time chunks of the forward / reverse scans (1 = one sequential walk).
  param_block_d, param_split: the same for the parameter-gradient scan (no output sum over n).
  num_warps: warps per program on GPU.
  tpu_block_d, tpu_block_t: lane and time block of the TPU kernels (multiples of 128 and 16
    on hardware unless they cover the whole axis).
  """
  block_d: int = 32
  block_t: int = 16
  split: int = 4
  num_chunks: int = 1
  param_block_d: int = 32
  param_split: int = 4
  num_warps: int = 4
  tpu_block_d: int = 128
  tpu_block_t: int = 256

  def validate(self, ndim: int) -> "CemaKernelConfig":
    for name in ("block_d", "block_t", "split", "param_block_d", "param_split", "num_warps"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"CemaKernelConfig.{name} must be a power of two; got {value}.")
    for name in ("split", "param_split"):
      if ndim % getattr(self, name):
        raise ValueError(f"CemaKernelConfig.{name}={getattr(self, name)} must divide N={ndim}.")
    if self.tpu_block_d < 1 or self.tpu_block_t < 1:
      raise ValueError("CemaKernelConfig.tpu_block_d and tpu_block_t must be positive.")
    if self.num_chunks < 1:
      raise ValueError(f"CemaKernelConfig.num_chunks must be >= 1; got {self.num_chunks}.")
    return self


def default_config(batch: int, length: int, dim: int, ndim: int) -> CemaKernelConfig:
  """A tiling that keeps every lane of an H100/H200-class GPU busy for typical shapes."""
  split = 4 if ndim % 4 == 0 else (2 if ndim % 2 == 0 else 1)
  return CemaKernelConfig(split=split, param_split=split)


# ----------------------------------------------------------------------------------------------
# Data layout helpers: [D, N] coefficients -> [G, D * S] lane vectors (n = g * S + j, lane d*S+j).
# ----------------------------------------------------------------------------------------------

def _to_lanes(a: Array, split: int) -> Array:
  """[..., D, N] -> [..., G, D * split] with G = N / split; order n = g * split + j."""
  *lead, dim, ndim = a.shape
  groups = ndim // split
  a = a.reshape(*lead, dim, groups, split)
  a = jnp.moveaxis(a, -2, -3)  # [..., G, D, S]
  return a.reshape(*lead, groups, dim * split)


def _from_lanes(a: Array, dim: int, split: int) -> Array:
  """Inverse of _to_lanes: [..., G, D * split] -> [..., D, N]."""
  *lead, groups, _ = a.shape
  a = a.reshape(*lead, groups, dim, split)
  a = jnp.moveaxis(a, -3, -2)  # [..., D, G, S]
  return a.reshape(*lead, dim, groups * split)


def _lane_omega(omega: Array, split: int) -> Array:
  """omega [D] -> [D * split] with omega on lane j = 0 of each channel, 0 elsewhere."""
  lanes = jnp.zeros((omega.shape[0], split), jnp.float32).at[:, 0].set(omega)
  return lanes.reshape(-1)


def _complex_power(q: Array, exponent: int) -> Array:
  """q ** exponent for a static positive integer exponent, by repeated squaring in complex64."""
  result = None
  base = q
  while exponent:
    if exponent & 1:
      result = base if result is None else result * base
    exponent >>= 1
    if exponent:
      base = base * base
  return jnp.ones_like(q) if result is None else result



# ----------------------------------------------------------------------------------------------
# Step algebra shared by the GPU and TPU kernels.  Arrays are any broadcast-compatible float32
# shapes: on GPU one group of lanes [block_d * split] per call, on TPU a whole [N, block_d] tile
# with the per-step input as a [1, block_d] row.  k is the reset flag (None: no segments).
# ----------------------------------------------------------------------------------------------

def _fwd_update(sr, si, x, k, qre, qim):
  """Folded state s_t = k q s_{t-1} + x_t (real and imaginary parts)."""
  if k is not None:
    sr, si = k * sr, k * si
  # Written so that each line contracts to two FMAs.
  return (x - qim * si) + qre * sr, qim * sr + qre * si


def _fwd_output(acc, sr, si, cre, cim):
  """acc + Re(c s) with c = eta p."""
  return (acc + cre * sr) - cim * si


def _rev_update(er, ei, dy, k, ere, eim, qre, qim):
  """Adjoint in E-form: w_t = k_{t+1} E_{t+1} + eta dy_t, E_t = q w_t.  Returns (w, E)."""
  if k is not None:
    er, ei = k * er, k * ei
  wr = er + ere * dy
  wi = ei + eim * dy
  return wr, wi, qre * wr - qim * wi, qre * wi + qim * wr


def _param_update(vr, vi, zr, zi, x, k, qre, qim):
  """v_t = k q v_{t-1} + x_t and its q-tangent z_t = k (q z_{t-1} + v_{t-1})."""
  if k is not None:
    vr, vi, zr, zi = k * vr, k * vi, k * zr, k * zi
  znr = (vr - qim * zi) + qre * zr
  zni = (vi + qim * zr) + qre * zi
  vnr = (x - qim * vi) + qre * vr
  vni = qim * vr + qre * vi
  return vnr, vni, znr, zni

# ----------------------------------------------------------------------------------------------
# GPU (Triton) kernels.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _ScanSpec:
  """Static description of one scan-kernel launch."""
  mode: str            # "fwd" | "rev" | "param"
  emit: bool           # write per-step outputs (False: only the final state, for chunk pass 1)
  has_init: bool       # read an initial state (else zeros)
  has_keep: bool       # segment resets present
  length: int          # L
  dim: int             # D
  groups: int          # G = N / split
  split: int           # S
  block_d: int
  block_t: int
  chunk: int           # time steps per chunk (== length when there is one chunk)
  in_names: tuple[str, ...]
  out_names: tuple[str, ...]


def _run_tiles(spec: _ScanSpec, length, carry, load_fn: Callable, step_fn: Callable):
  """Walks `length` steps in tiles of block_t unrolled steps, prefetching the next tile.

  load_fn(step, valid) -> per-step inputs (loads masked by `valid`);
  step_fn(carry, inputs, step) -> carry.
  """
  tile = spec.block_t
  n_tiles = length // tile
  rem = length - n_tiles * tile

  def tile_body(i, state):
    carry, pre = state
    valid = (i + 1) < n_tiles
    nxt = tuple(load_fn((i + 1) * tile + s, valid) for s in range(tile))
    for s in range(tile):
      carry = step_fn(carry, pre[s], i * tile + s)
    return carry, nxt

  pre = tuple(load_fn(s, n_tiles > 0) for s in range(tile))
  carry, _ = lax.fori_loop(0, n_tiles, tile_body, (carry, pre))

  def rem_body(r, carry):
    step = n_tiles * tile + r
    return step_fn(carry, load_fn(step, True), step)

  return lax.fori_loop(0, rem, rem_body, carry)


def _lane_sum(acc: Array, spec: _ScanSpec) -> Array:
  """[block_d * S] lane partial sums -> [block_d] per-channel sums."""
  if spec.split == 1:
    return acc
  return jnp.sum(acc.reshape(spec.block_d, spec.split), axis=1)


def _gpu_scan_kernel(*refs, spec: _ScanSpec):
  """One program: batch b, channel block blk, time chunk c (see _ScanSpec for the modes)."""
  names = spec.in_names + spec.out_names
  r = dict(zip(names, refs))
  b, blk, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lanes = spec.block_d * spec.split
  lane = jnp.arange(lanes, dtype=jnp.int32)
  flat = blk * lanes + lane
  d_lane = blk * spec.block_d + lane // spec.split
  lmask = d_lane < spec.dim
  d_out = blk * spec.block_d + jnp.arange(spec.block_d, dtype=jnp.int32)
  omask = d_out < spec.dim
  groups = range(spec.groups)
  reverse = spec.mode == "rev"

  def coef(name):
    return [plgpu.load(r[name].at[g, flat], mask=lmask, other=0.0) for g in groups]

  def init(name):
    if not spec.has_init:
      return [jnp.zeros((lanes,), jnp.float32) for _ in groups]
    return [plgpu.load(r[name].at[b, c, g, flat], mask=lmask, other=0.0) for g in groups]

  t_lo = c * spec.chunk
  length = jnp.minimum(spec.chunk, spec.length - t_lo)

  def time_of(step):
    return spec.length - 1 - (t_lo + step) if reverse else t_lo + step

  def load_row(name, step, valid):
    row = plgpu.load(r[name].at[b, time_of(step), d_lane], mask=lmask & valid, other=0.0)
    return row.astype(jnp.float32)

  def load_keep(step, valid):
    if not spec.has_keep:
      return None
    return plgpu.load(r["keep"].at[b, time_of(step)], mask=valid, other=1.0)

  qre, qim = coef("qre"), coef("qim")

  if spec.mode == "fwd":
    if spec.emit:
      cre, cim = coef("cre"), coef("cim")
      om = plgpu.load(r["om"].at[flat], mask=lmask, other=0.0)

    def load_fn(step, valid):
      return load_row("x", step, valid), load_keep(step, valid)

    def step_fn(carry, inputs, step):
      sr, si = carry
      x, k = inputs
      acc = om * x if spec.emit else None
      new_r, new_i = [], []
      for g in groups:
        nr, ni = _fwd_update(sr[g], si[g], x, k, qre[g], qim[g])
        if spec.emit:
          acc = _fwd_output(acc, nr, ni, cre[g], cim[g])
        new_r.append(nr)
        new_i.append(ni)
      if spec.emit:
        y = _lane_sum(acc, spec)
        plgpu.store(r["y"].at[b, time_of(step), d_out], y.astype(r["y"].dtype), mask=omask)
      return new_r, new_i

    sr, si = _run_tiles(spec, length, (init("ire"), init("iim")), load_fn, step_fn)
    for g in groups:
      plgpu.store(r["fre"].at[b, c, g, flat], sr[g], mask=lmask)
      plgpu.store(r["fim"].at[b, c, g, flat], si[g], mask=lmask)

  elif spec.mode == "rev":
    ere, eim = coef("ere"), coef("eim")
    if spec.emit:
      pp = coef("p")
      om = plgpu.load(r["om"].at[flat], mask=lmask, other=0.0)

    def load_fn(step, valid):
      dy = load_row("dy", step, valid)
      x = load_row("x", step, valid) if spec.emit else None
      return dy, x, load_keep(step, valid)

    def step_fn(carry, inputs, step):
      er_, ei_, ctp, ctom = carry
      dy, x, k = inputs
      acc = om * dy if spec.emit else None
      out_r, out_i, out_p = [], [], []
      for g in groups:
        wr, _, nr, ni = _rev_update(er_[g], ei_[g], dy, k, ere[g], eim[g], qre[g], qim[g])
        if spec.emit:
          acc = acc + pp[g] * wr
          out_p.append(ctp[g] + x * wr)
        out_r.append(nr)
        out_i.append(ni)
      if spec.emit:
        dx = _lane_sum(acc, spec)
        plgpu.store(r["dx"].at[b, time_of(step), d_out], dx.astype(r["dx"].dtype), mask=omask)
        ctom = ctom + dy * x
      return out_r, out_i, out_p, ctom

    zeros = [jnp.zeros((lanes,), jnp.float32) for _ in groups]
    carry = (init("ire"), init("iim"), zeros if spec.emit else [],
             jnp.zeros((lanes,), jnp.float32) if spec.emit else None)
    er_, ei_, ctp, ctom = _run_tiles(spec, length, carry, load_fn, step_fn)
    for g in groups:
      plgpu.store(r["fre"].at[b, c, g, flat], er_[g], mask=lmask)
      plgpu.store(r["fim"].at[b, c, g, flat], ei_[g], mask=lmask)
      if spec.emit:
        plgpu.store(r["ctp"].at[b, c, g, flat], ctp[g], mask=lmask)
    if spec.emit:
      plgpu.store(r["ctom"].at[b, c, flat], ctom, mask=lmask)

  elif spec.mode == "param":

    def load_fn(step, valid):
      return load_row("x", step, valid), load_row("dy", step, valid), load_keep(step, valid)

    def step_fn(carry, inputs, step):
      vr, vi, zr, zi, avr, avi, azr, azi = carry
      x, dy, k = inputs
      out = [[] for _ in range(8)]
      for g in groups:
        vnr, vni, znr, zni = _param_update(vr[g], vi[g], zr[g], zi[g], x, k, qre[g], qim[g])
        for slot, value in enumerate((vnr, vni, znr, zni, avr[g] + dy * vnr, avi[g] + dy * vni,
                                      azr[g] + dy * znr, azi[g] + dy * zni)):
          out[slot].append(value)
      return tuple(out)

    zeros = lambda: [jnp.zeros((lanes,), jnp.float32) for _ in groups]  # noqa: E731
    carry = (init("ire"), init("iim"), zeros(), zeros(), zeros(), zeros(), zeros(), zeros())
    vr, vi, zr, zi, avr, avi, azr, azi = _run_tiles(spec, length, carry, load_fn, step_fn)
    for g in groups:
      for name, value in (("avr", avr), ("avi", avi), ("azr", azr), ("azi", azi), ("zlr", zr),
                          ("zli", zi)):
        plgpu.store(r[name].at[b, c, g, flat], value[g], mask=lmask)
  else:
    raise ValueError(f"unknown scan mode {spec.mode!r}")


def _launch(spec: _ScanSpec, batch: int, num_chunks: int, inputs: dict[str, Array],
            out_shapes: dict[str, jax.ShapeDtypeStruct], *, interpret: bool, num_warps: int,
            name: str):
  """Runs _gpu_scan_kernel over the grid (batch, channel blocks, chunks)."""
  grid = (batch, pl.cdiv(spec.dim, spec.block_d), num_chunks)
  kernel = functools.partial(_gpu_scan_kernel, spec=spec)
  outs = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shapes[n] for n in spec.out_names),
      grid=grid,
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      name=name,
  )(*(inputs[n] for n in spec.in_names))
  return dict(zip(spec.out_names, outs))


# ----------------------------------------------------------------------------------------------
# GPU pass orchestration (chunk split / combine, layouts) for the three scans.
# ----------------------------------------------------------------------------------------------

def _chunking(length: int, block_t: int, num_chunks: int) -> tuple[int, int]:
  """(chunk length, number of chunks): chunks are whole tiles except possibly the last."""
  num_chunks = max(1, min(num_chunks, pl.cdiv(length, block_t)))
  if num_chunks == 1:
    return length, 1
  chunk = pl.cdiv(pl.cdiv(length, num_chunks), block_t) * block_t
  return chunk, pl.cdiv(length, chunk)


def _chunk_keep(keep: Array | None, chunk: int, num_chunks: int) -> Array | None:
  """[B, L] keep flags (in scan order) -> [B, C] product over each chunk (1: no reset inside)."""
  if keep is None:
    return None
  batch, length = keep.shape
  pad = chunk * num_chunks - length
  keep = jnp.pad(keep, ((0, 0), (0, pad)), constant_values=1.0)
  return jnp.prod(keep.reshape(batch, num_chunks, chunk), axis=-1)


def _combine_chunks(local: Array, decay: Array, keep_chunks: Array | None,
                    start: Array | None) -> Array:
  """Starting state of every chunk from chunk-local final states.

  local: [B, C, G, DS] complex, each chunk's final state from a zero start; decay: [G, DS]
  complex q ** chunk; keep_chunks: [B, C] or None; start: [B, G, DS] complex or None (zeros).
  Returns [B, C, G, DS]: start_0 = start, start_{c+1} = decay * keep_c * start_c + local_c.
  """
  batch, num_chunks = local.shape[:2]
  current = jnp.zeros_like(local[:, 0]) if start is None else start
  starts = [current]
  for c in range(num_chunks - 1):
    factor = decay[None]
    if keep_chunks is not None:
      factor = factor * keep_chunks[:, c, None, None]
    current = factor * current + local[:, c]
    starts.append(current)
  return jnp.stack(starts, axis=1)


def _split_complex(a: Array) -> tuple[Array, Array]:
  return jnp.real(a).astype(jnp.float32), jnp.imag(a).astype(jnp.float32)


def _gpu_scan_with_chunks(mode: str, cfg: CemaKernelConfig, seq_inputs: dict[str, Array],
                          coef_inputs: dict[str, Array], keep: Array | None,
                          start: Array | None, emit_shapes: dict[str, jax.ShapeDtypeStruct],
                          q_lanes: Array, *, batch: int, length: int, dim: int, groups: int,
                          interpret: bool):
  """Forward ("fwd") or reverse ("rev") scan, optionally split into parallel time chunks.

  start: [B, G, DS] complex initial state or None.  keep: [B, L] flags in scan order, indexed by
  original time (the kernel reverses the index for "rev").  Returns the emit outputs plus
  "fre"/"fim" ([B, C, G, DS] final state of every chunk) and the chunk count.
  """
  chunk, num_chunks = _chunking(length, cfg.block_t, cfg.num_chunks)
  split = cfg.split
  lanes_total = dim * split
  state_shape = lambda c: jax.ShapeDtypeStruct((batch, c, groups, lanes_total), jnp.float32)  # noqa: E731
  seq_names = tuple(seq_inputs)
  keep_names = ("keep",) if keep is not None else ()
  base = dict(seq_inputs, **coef_inputs)
  if keep is not None:
    base["keep"] = keep

  def spec(emit, has_init, in_names, out_names):
    return _ScanSpec(mode=mode, emit=emit, has_init=has_init, has_keep=keep is not None,
                     length=length, dim=dim, groups=groups, split=split, block_d=cfg.block_d,
                     block_t=cfg.block_t, chunk=chunk, in_names=in_names, out_names=out_names)

  coef_names = tuple(coef_inputs)
  if num_chunks == 1:
    starts = None if start is None else start[:, None]
  else:
    # Pass 1: every chunk's final state from a zero start (no outputs, only the scanned input).
    first_seq = seq_names[:1]
    first_coefs = tuple(n for n in coef_names if n in ("qre", "qim", "ere", "eim"))
    sp = spec(False, False, first_seq + keep_names + first_coefs, ("fre", "fim"))
    out = _launch(sp, batch, num_chunks, base,
                  {"fre": state_shape(num_chunks), "fim": state_shape(num_chunks)},
                  interpret=interpret, num_warps=cfg.num_warps, name=f"cema_{mode}_chunk_states")
    local = lax.complex(out["fre"], out["fim"])
    scan_keep = None if keep is None else (keep[:, ::-1] if mode == "rev" else keep)
    # The scan's first step never resets (k_0 = 1), and chunk 0's factor is never used.
    keep_chunks = _chunk_keep(scan_keep, chunk, num_chunks)
    decay = _complex_power(q_lanes, chunk)
    starts = _combine_chunks(local, decay, keep_chunks, start)
  inputs = dict(base)
  init_names = ()
  if starts is not None:
    inputs["ire"], inputs["iim"] = _split_complex(starts)
    init_names = ("ire", "iim")
  out_shapes = dict(emit_shapes, fre=state_shape(num_chunks), fim=state_shape(num_chunks))
  for name in ("ctp",):
    if name in out_shapes:
      out_shapes[name] = state_shape(num_chunks)
  if "ctom" in out_shapes:
    out_shapes["ctom"] = jax.ShapeDtypeStruct((batch, num_chunks, lanes_total), jnp.float32)
  sp = spec(True, starts is not None, seq_names + keep_names + coef_names + init_names,
            tuple(emit_shapes) + ("fre", "fim"))
  out = _launch(sp, batch, num_chunks, inputs, out_shapes, interpret=interpret,
                num_warps=cfg.num_warps, name=f"cema_{mode}_scan")
  return out, num_chunks


def _folded_p(p: Array) -> Array:
  return jnp.maximum(p, _P_FLOOR)


def _gpu_forward(x, keep, p, q, eta, omega, h0, cfg: CemaKernelConfig, interpret: bool):
  """y [B, L, D] f32 and h_last [B, D, N] c64 via the folded-state forward scan."""
  batch, length, dim = x.shape
  ndim = p.shape[1]
  split = cfg.split
  groups = ndim // split
  pf = _folded_p(p)
  c = eta * pf
  q_lanes = _to_lanes(q, split)
  coefs = {}
  coefs["qre"], coefs["qim"] = _split_complex(q_lanes)
  coefs["cre"], coefs["cim"] = _split_complex(_to_lanes(c, split))
  coefs["om"] = _lane_omega(omega, split)
  start = None if h0 is None else _to_lanes(h0 / pf, split)
  out, num_chunks = _gpu_scan_with_chunks(
      "fwd", cfg, {"x": x}, coefs, keep, start,
      {"y": jax.ShapeDtypeStruct((batch, length, dim), jnp.float32)}, q_lanes,
      batch=batch, length=length, dim=dim, groups=groups, interpret=interpret)
  s_last = lax.complex(out["fre"][:, -1], out["fim"][:, -1])
  h_last = pf * _from_lanes(s_last, dim, split)
  return out["y"], h_last


def _gpu_reverse(dy, x, keep, p, q, eta, omega, g_last, cfg: CemaKernelConfig, interpret: bool):
  """Adjoint scan: dx (x.dtype), ct_p [D, N], ct_omega [D], ct_h0 [B, D, N] c64."""
  batch, length, dim = x.shape
  ndim = p.shape[1]
  split = cfg.split
  groups = ndim // split
  # w_t = k_{t+1} q w_{t+1} + ...: the reset flag seen at original time t is keep[t + 1]; the
  # last step receives ct(h_last) unscaled.
  keep_rev = None
  if keep is not None:
    keep_rev = jnp.concatenate([keep[:, 1:], jnp.ones((batch, 1), jnp.float32)], axis=1)
  q_lanes = _to_lanes(q, split)
  coefs = {}
  coefs["qre"], coefs["qim"] = _split_complex(q_lanes)
  coefs["ere"], coefs["eim"] = _split_complex(_to_lanes(eta, split))
  coefs["p"] = _to_lanes(p, split)
  coefs["om"] = _lane_omega(omega, split)
  start = _to_lanes(g_last, split)
  emit_shapes = {
      "dx": jax.ShapeDtypeStruct((batch, length, dim), x.dtype),
      "ctp": None,
      "ctom": None,
  }
  out, num_chunks = _gpu_scan_with_chunks(
      "rev", cfg, {"dy": dy, "x": x}, coefs, keep_rev, start, emit_shapes, q_lanes,
      batch=batch, length=length, dim=dim, groups=groups, interpret=interpret)
  ct_h0 = _from_lanes(lax.complex(out["fre"][:, -1], out["fim"][:, -1]), dim, split)
  ct_p = _from_lanes(jnp.sum(out["ctp"], axis=(0, 1)), dim, split)
  ct_omega = jnp.sum(out["ctom"], axis=(0, 1)).reshape(dim, split)[:, 0]
  return out["dx"], ct_p, ct_omega, ct_h0


def _gpu_param(x, dy, keep, p, q, eta, h0, g_last, cfg: CemaKernelConfig, interpret: bool):
  """Forward-mode parameter scan: ct_q [D, N] c64 and ct_eta [D, N] c64."""
  batch, length, dim = x.shape
  ndim = p.shape[1]
  split = cfg.param_split
  groups = ndim // split
  pf = _folded_p(p)
  inputs = {"x": x, "dy": dy}
  in_names = ["x", "dy"]
  if keep is not None:
    inputs["keep"] = keep
    in_names.append("keep")
  inputs["qre"], inputs["qim"] = _split_complex(_to_lanes(q, split))
  in_names += ["qre", "qim"]
  if h0 is not None:
    start = _to_lanes(h0 / pf, split)[:, None]
    inputs["ire"], inputs["iim"] = _split_complex(start)
    in_names += ["ire", "iim"]
  out_names = ("avr", "avi", "azr", "azi", "zlr", "zli")
  shape = jax.ShapeDtypeStruct((batch, 1, groups, dim * split), jnp.float32)
  spec = _ScanSpec(mode="param", emit=True, has_init=h0 is not None, has_keep=keep is not None,
                   length=length, dim=dim, groups=groups, split=split,
                   block_d=cfg.param_block_d, block_t=cfg.block_t, chunk=length,
                   in_names=tuple(in_names), out_names=out_names)
  out = _launch(spec, batch, 1, inputs, {n: shape for n in out_names}, interpret=interpret,
                num_warps=cfg.num_warps, name="cema_param_scan")
  back = lambda re, im: _from_lanes(lax.complex(out[re][:, 0], out[im][:, 0]), dim, split)  # noqa: E731
  acc_v, acc_z, z_last = back("avr", "avi"), back("azr", "azi"), back("zlr", "zli")
  ct_eta = pf * jnp.sum(acc_v, axis=0)
  ct_q = pf * (eta * jnp.sum(acc_z, axis=0) + jnp.sum(g_last * z_last, axis=0))
  return ct_q, ct_eta


# ----------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels: grid (batch, channel block, time tile) with the time axis sequential and
# the state in VMEM scratch; orders on sublanes ([N, block_d] tiles), channels on lanes.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TpuSpec:
  mode: str
  has_init: bool
  has_keep: bool
  length: int
  block_t: int
  in_names: tuple[str, ...]
  out_names: tuple[str, ...]


def _tpu_scan_kernel(*refs, spec: _TpuSpec):
  n_io = len(spec.in_names) + len(spec.out_names)
  r = dict(zip(spec.in_names + spec.out_names, refs[:n_io]))
  scratch = refs[n_io:]
  t = pl.program_id(2)
  n_t = pl.num_programs(2)
  reverse = spec.mode == "rev"
  tile = (n_t - 1 - t) if reverse else t
  n_valid = jnp.minimum(spec.block_t, spec.length - tile * spec.block_t)
  coef = lambda name: r[name][...]  # noqa: E731
  qre, qim = coef("qre"), coef("qim")

  if spec.mode == "fwd":
    state = scratch[:2]
    stage_x = scratch[2]
  elif spec.mode == "rev":
    state = scratch[:4]  # E re / im, ct_p, ct_omega
    stage_x, stage_dy, stage_dx = scratch[4:7]
  else:
    state = scratch[:8]  # v, z (re / im), sum dy v, sum dy z (re / im)
    stage_x, stage_dy = scratch[8:10]

  @pl.when(t == 0)
  def _init():
    for ref in state:
      ref[...] = jnp.zeros(ref.shape, jnp.float32)
    if spec.has_init:
      state[0][...] = r["ire"][...]
      state[1][...] = r["iim"][...]

  stage_x[...] = r["x"][...].astype(jnp.float32)
  if spec.mode != "fwd":
    stage_dy[...] = r["dy"][...].astype(jnp.float32)

  def row(ref, s):
    return ref[pl.ds(s, 1), :]

  def keep(s):
    return r["keep"][pl.ds(s, 1), :] if spec.has_keep else None

  def index(i):
    return n_valid - 1 - i if reverse else i

  if spec.mode == "fwd":
    cre, cim, om = coef("cre"), coef("cim"), coef("om")

    def body(i, carry):
      s = index(i)
      x = row(stage_x, s)
      sr, si = _fwd_update(*carry, x, keep(s), qre, qim)
      y = jnp.sum(_fwd_output(0.0, sr, si, cre, cim), axis=0, keepdims=True) + om * x
      r["y"][pl.ds(s, 1), :] = y.astype(r["y"].dtype)
      return sr, si

  elif spec.mode == "rev":
    ere, eim, pp, om = coef("ere"), coef("eim"), coef("p"), coef("om")

    def body(i, carry):
      er, ei, ctp, ctom = carry
      s = index(i)
      x, dy = row(stage_x, s), row(stage_dy, s)
      wr, _, er, ei = _rev_update(er, ei, dy, keep(s), ere, eim, qre, qim)
      stage_dx[pl.ds(s, 1), :] = jnp.sum(pp * wr, axis=0, keepdims=True) + om * dy
      return er, ei, ctp + x * wr, ctom + dy * x

  else:

    def body(i, carry):
      vr, vi, zr, zi, avr, avi, azr, azi = carry
      s = index(i)
      x, dy = row(stage_x, s), row(stage_dy, s)
      vr, vi, zr, zi = _param_update(vr, vi, zr, zi, x, keep(s), qre, qim)
      return (vr, vi, zr, zi, avr + dy * vr, avi + dy * vi, azr + dy * zr, azi + dy * zi)

  carry = tuple(ref[...] for ref in state)
  carry = lax.fori_loop(0, n_valid, body, carry)
  for ref, value in zip(state, carry):
    ref[...] = value
  if spec.mode == "rev":
    r["dx"][...] = stage_dx[...].astype(r["dx"].dtype)

  @pl.when(t == n_t - 1)
  def _final():
    if spec.mode == "fwd":
      r["fre"][...], r["fim"][...] = state[0][...], state[1][...]
    elif spec.mode == "rev":
      r["fre"][...], r["fim"][...] = state[0][...], state[1][...]
      r["ctp"][...] = state[2][...]
      r["ctom"][...] = state[3][...]
    else:
      for name, ref in zip(("zlr", "zli", "avr", "avi", "azr", "azi"), state[2:4] + state[4:]):
        r[name][...] = ref[...]


def _tpu_launch(spec: _TpuSpec, inputs: dict[str, Array], out_shapes: dict, *, batch: int,
                dim: int, ndim: int, cfg: CemaKernelConfig, interpret: bool, name: str):
  """Runs _tpu_scan_kernel over (batch, channel blocks, time tiles)."""
  from jax.experimental.pallas import tpu as pltpu  # Mosaic only; imported where used.
  block_d = dim if dim <= cfg.tpu_block_d else cfg.tpu_block_d
  block_t = spec.block_t
  n_t = pl.cdiv(spec.length, block_t)
  reverse = spec.mode == "rev"
  tile = (lambda t: n_t - 1 - t) if reverse else (lambda t: t)
  seq_spec = pl.BlockSpec((None, block_t, block_d), lambda b, d, t: (b, tile(t), d))
  keep_spec = pl.BlockSpec((None, block_t, 1), lambda b, d, t: (b, tile(t), 0))
  coef_spec = pl.BlockSpec((ndim, block_d), lambda b, d, t: (0, d))
  row_spec = pl.BlockSpec((1, block_d), lambda b, d, t: (0, d))
  state_spec = pl.BlockSpec((None, ndim, block_d), lambda b, d, t: (b, 0, d))
  vec_state_spec = pl.BlockSpec((None, 1, block_d), lambda b, d, t: (b, 0, d))

  def spec_of(n):
    if n in ("x", "dy", "y", "dx"):
      return seq_spec
    if n == "keep":
      return keep_spec
    if n == "om":
      return row_spec
    if n in ("ire", "iim") or n in ("fre", "fim", "ctp", "zlr", "zli", "avr", "avi", "azr", "azi"):
      return state_spec
    if n == "ctom":
      return vec_state_spec
    return coef_spec

  vmem = lambda *shape: pltpu.VMEM(shape, jnp.float32)  # noqa: E731
  n_state = {"fwd": 2, "rev": 3, "param": 8}[spec.mode]
  scratch = [vmem(ndim, block_d) for _ in range(n_state)]
  if spec.mode == "rev":
    scratch.append(vmem(1, block_d))  # ct_omega
  n_stage = {"fwd": 1, "rev": 3, "param": 2}[spec.mode]
  scratch += [vmem(block_t, block_d) for _ in range(n_stage)]
  grid = (batch, pl.cdiv(dim, block_d), n_t)
  outs = pl.pallas_call(
      functools.partial(_tpu_scan_kernel, spec=spec),
      out_shape=tuple(out_shapes[n] for n in spec.out_names),
      grid=grid,
      in_specs=[spec_of(n) for n in spec.in_names],
      out_specs=tuple(spec_of(n) for n in spec.out_names),
      scratch_shapes=scratch,
      interpret=interpret,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      name=name,
  )(*(inputs[n] for n in spec.in_names))
  return dict(zip(spec.out_names, outs))


def _tpu_block_t(length: int, cfg: CemaKernelConfig) -> int:
  return length if length <= cfg.tpu_block_t else cfg.tpu_block_t


def _tpu_common(x, keep, q, ndim):
  """Inputs shared by the TPU passes: [N, D] coefficient planes and the [B, L, 1] keep flags."""
  inputs = {"qre": jnp.real(q).T.astype(jnp.float32), "qim": jnp.imag(q).T.astype(jnp.float32)}
  names = []
  if keep is not None:
    inputs["keep"] = keep[..., None]
    names.append("keep")
  return inputs, names


def _state_planes(h: Array) -> tuple[Array, Array]:
  """[B, D, N] complex -> two [B, N, D] float32 planes."""
  h = jnp.swapaxes(h, 1, 2)
  return _split_complex(h)


def _from_planes(re: Array, im: Array) -> Array:
  return jnp.swapaxes(lax.complex(re, im), 1, 2)


def _tpu_forward(x, keep, p, q, eta, omega, h0, cfg: CemaKernelConfig, interpret: bool):
  batch, length, dim = x.shape
  ndim = p.shape[1]
  pf = _folded_p(p)
  inputs, names = _tpu_common(x, keep, q, ndim)
  c = eta * pf
  inputs.update(x=x, cre=jnp.real(c).T, cim=jnp.imag(c).T, om=omega[None])
  names = ["x", *names, "qre", "qim", "cre", "cim", "om"]
  if h0 is not None:
    inputs["ire"], inputs["iim"] = _state_planes(h0 / pf)
    names += ["ire", "iim"]
  spec = _TpuSpec("fwd", h0 is not None, keep is not None, length, _tpu_block_t(length, cfg),
                  tuple(names), ("y", "fre", "fim"))
  state = jax.ShapeDtypeStruct((batch, ndim, dim), jnp.float32)
  out = _tpu_launch(spec, inputs, {"y": jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                   "fre": state, "fim": state},
                    batch=batch, dim=dim, ndim=ndim, cfg=cfg, interpret=interpret,
                    name="cema_fwd_scan_tpu")
  return out["y"], pf * _from_planes(out["fre"], out["fim"])


def _tpu_reverse(dy, x, keep, p, q, eta, omega, g_last, cfg: CemaKernelConfig, interpret: bool):
  batch, length, dim = x.shape
  ndim = p.shape[1]
  keep_rev = None
  if keep is not None:
    keep_rev = jnp.concatenate([keep[:, 1:], jnp.ones((batch, 1), jnp.float32)], axis=1)
  inputs, names = _tpu_common(x, keep_rev, q, ndim)
  inputs.update(dy=dy, x=x, ere=jnp.real(eta).T.astype(jnp.float32),
                eim=jnp.imag(eta).T.astype(jnp.float32), p=p.T, om=omega[None])
  inputs["ire"], inputs["iim"] = _state_planes(g_last)
  names = ["dy", "x", *names, "qre", "qim", "ere", "eim", "p", "om", "ire", "iim"]
  spec = _TpuSpec("rev", True, keep is not None, length, _tpu_block_t(length, cfg), tuple(names),
                  ("dx", "fre", "fim", "ctp", "ctom"))
  state = jax.ShapeDtypeStruct((batch, ndim, dim), jnp.float32)
  out = _tpu_launch(spec, inputs, {"dx": jax.ShapeDtypeStruct(x.shape, x.dtype), "fre": state,
                                   "fim": state, "ctp": state,
                                   "ctom": jax.ShapeDtypeStruct((batch, 1, dim), jnp.float32)},
                    batch=batch, dim=dim, ndim=ndim, cfg=cfg, interpret=interpret,
                    name="cema_rev_scan_tpu")
  ct_h0 = _from_planes(out["fre"], out["fim"])
  return out["dx"], jnp.sum(out["ctp"], axis=0).T, jnp.sum(out["ctom"], axis=(0, 1)), ct_h0


def _tpu_param(x, dy, keep, p, q, eta, h0, g_last, cfg: CemaKernelConfig, interpret: bool):
  batch, length, dim = x.shape
  ndim = p.shape[1]
  pf = _folded_p(p)
  inputs, names = _tpu_common(x, keep, q, ndim)
  inputs.update(x=x, dy=dy)
  names = ["x", "dy", *names, "qre", "qim"]
  if h0 is not None:
    inputs["ire"], inputs["iim"] = _state_planes(h0 / pf)
    names += ["ire", "iim"]
  out_names = ("zlr", "zli", "avr", "avi", "azr", "azi")
  spec = _TpuSpec("param", h0 is not None, keep is not None, length, _tpu_block_t(length, cfg),
                  tuple(names), out_names)
  state = jax.ShapeDtypeStruct((batch, ndim, dim), jnp.float32)
  out = _tpu_launch(spec, inputs, {n: state for n in out_names}, batch=batch, dim=dim,
                    ndim=ndim, cfg=cfg, interpret=interpret, name="cema_param_scan_tpu")
  acc_v = _from_planes(out["avr"], out["avi"])
  acc_z = _from_planes(out["azr"], out["azi"])
  z_last = _from_planes(out["zlr"], out["zli"])
  ct_eta = pf * jnp.sum(acc_v, axis=0)
  ct_q = pf * (eta * jnp.sum(acc_z, axis=0) + jnp.sum(g_last * z_last, axis=0))
  return ct_q, ct_eta


# ----------------------------------------------------------------------------------------------
# custom_vjp core and the public entry point.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Static:
  cfg: CemaKernelConfig
  interpret: bool
  platform: str  # "gpu" or "tpu": which kernel family


def _forward_impl(st: _Static, x, keep, p, q, eta, omega, h0):
  if st.platform == "tpu":
    return _tpu_forward(x, keep, p, q, eta, omega, h0, st.cfg, st.interpret)
  return _gpu_forward(x, keep, p, q, eta, omega, h0, st.cfg, st.interpret)


def _backward_impl(st: _Static, x, keep, p, q, eta, omega, h0, dy, g_last):
  if st.platform == "tpu":
    dx, ct_p, ct_omega, ct_h0 = _tpu_reverse(dy, x, keep, p, q, eta, omega, g_last, st.cfg,
                                             st.interpret)
    ct_q, ct_eta = _tpu_param(x, dy, keep, p, q, eta, h0, g_last, st.cfg, st.interpret)
  else:
    dx, ct_p, ct_omega, ct_h0 = _gpu_reverse(dy, x, keep, p, q, eta, omega, g_last, st.cfg,
                                             st.interpret)
    ct_q, ct_eta = _gpu_param(x, dy, keep, p, q, eta, h0, g_last, st.cfg, st.interpret)
  return dx, ct_p, ct_q, ct_eta, ct_omega, ct_h0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cema_core(st: _Static, x, keep, p, q, eta, omega, h0):
  return _forward_impl(st, x, keep, p, q, eta, omega, h0)


def _cema_core_fwd(st: _Static, x, keep, p, q, eta, omega, h0):
  out = _forward_impl(st, x, keep, p, q, eta, omega, h0)
  return out, (x, keep, p, q, eta, omega, h0)


def _cema_core_bwd(st: _Static, residuals, cotangents):
  x, keep, p, q, eta, omega, h0 = residuals
  dy, g_last = cotangents
  dy = dy.astype(jnp.float32)
  g_last = g_last.astype(jnp.complex64)
  dx, ct_p, ct_q, ct_eta, ct_omega, ct_h0 = _backward_impl(st, x, keep, p, q, eta, omega, h0,
                                                           dy, g_last)
  keep_ct = None if keep is None else jnp.zeros_like(keep)
  h0_ct = None if h0 is None else ct_h0.astype(h0.dtype)
  return (dx.astype(x.dtype), keep_ct, ct_p.astype(p.dtype), ct_q.astype(q.dtype),
          ct_eta.astype(eta.dtype), ct_omega.astype(omega.dtype), h0_ct)


_cema_core.defvjp(_cema_core_fwd, _cema_core_bwd)


def _resolve_platform(platform: str | None) -> str:
  if platform is not None:
    if platform not in ("gpu", "tpu"):
      raise ValueError(f"kernel platform must be 'gpu' or 'tpu'; got {platform!r}.")
    return platform
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def cema_pallas(x: Array, coeffs: CemaCoefficients, omega: Array, h0: Array | None = None, *,
                segment_ids: Array | None = None, return_state: bool = False,
                interpret: bool | None = None, block_d: int | None = None,
                block_t: int | None = None, config: CemaKernelConfig | None = None,
                platform: str | None = None):
  """CEMA with Pallas kernels, differentiable (custom VJP) in x, coeffs, omega and h0.

  x: [batch, length, dim] float32 or bfloat16; coeffs: CemaCoefficients (p [dim, N] f32, q and
  eta [dim, N] complex64); omega: [dim] or [dim, 1]; h0: [batch, dim, N] complex64 or None;
  segment_ids: [batch, length] ints or None (the state restarts where the id changes).
  Returns y [batch, length, dim] float32, and with return_state also h_last [batch, dim, N] c64.

  interpret: run the kernels in the Pallas interpreter (default: only when the backend is CPU).
  block_d / block_t / config: tiling overrides (see CemaKernelConfig).  platform: "gpu" (Triton
  kernels) or "tpu" (Mosaic kernels); defaults to the default backend's family.
  """
  p, q, eta, omega_v, h0, keep = _normalize_inputs(x, coeffs, omega, h0, segment_ids)
  if x.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f"x must be float32 or bfloat16; got {x.dtype}. Cast it first.")
  batch, length, dim = x.shape
  ndim = p.shape[1]
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  cfg = config if config is not None else default_config(batch, length, dim, ndim)
  overrides = {}
  if block_d is not None:
    overrides.update(block_d=block_d, param_block_d=block_d)
  if block_t is not None:
    overrides["block_t"] = block_t
  cfg = dataclasses.replace(cfg, **overrides).validate(ndim)
  st = _Static(cfg=cfg, interpret=bool(interpret), platform=_resolve_platform(platform))
  y, h_last = _cema_core(st, x, keep, p, q, eta, omega_v, h0)
  return (y, h_last) if return_state else y
