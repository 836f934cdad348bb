"""CEMA scan as Pallas kernels (SPEC §2): forward and backward, GPU (Triton) and TPU (Mosaic).

Per channel d and order n (state [B, D, N] complex):
  h_t = k_t q h_{t-1} + p x_t,   y_t = Re(sum_n eta_n h_t,n) + omega_d x_t,
with k_t = 0 at the first step t > 0 of a new segment (the state restarts) and 1 elsewhere; at
t = 0 the state continues from h0.  Complex numbers travel through the kernels as separate
float32 real / imaginary arrays because Pallas has no complex dtype.

GPU (Triton) family: two scans, both time-parallel, all O(1) memory per step beyond their inputs
and outputs (no [B, L, D, N] tensor).
  * forward: the state is kept divided by p (s = h / p) so the update is s = k q s + x with no
    per-order multiply by p; eta p weights the output.
  * backward: ONE reverse-time scan gives every cotangent.  With the cotangent of the final state
    G = ct(h_last), the adjoint w_t = ct(h_t) is w = eta u + g where
        u_t = k_{t+1} q u_{t+1} + dy_t            (real input: the adjoint without eta or G)
        g_t = k_{t+1} q g_{t+1},  g_{L-1} = G     (only when G is not a symbolic zero)
    and the lagged sums u'_t = k_{t+1} (q u'_{t+1} + u_{t+1}) (same for g') carry the q-gradient:
        dx_t   = omega dy_t + sum_n p Re(w_t)
        ct_p   = sum_t x_t Re(w_t) = Re(eta A) + sum_t x_t Re(g_t),   A = sum_t x_t u_t
        ct_eta = sum_t dy_t h_t = p A + q h0 u_0
        ct_q   = sum_t k_t w_t h_{t-1} = p (eta sum_t x_t u'_t + sum_t x_t g'_t)
                 + h0 (eta (u_0 + q u'_0) + g_0 + q g'_0)
        ct_h0  = q w_0
    (JAX's convention: dL = Re(ct * d(param)).)  No forward state is needed, so the backward
    neither stores nor recomputes h; there is no separate parameter pass.
Time parallelism: the sequence is cut into `num_chunks` chunks, one program per (batch, channel
block, chunk).  A cheap first pass ("local") finds every chunk's final state from a zero start
(s for the forward, u for the backward); a combine over chunks, with q^chunk from double-float
powers (megalodon_jax.ops.cema), gives each chunk its true starting state (by default one small
Pallas kernel per combine, and one more for the backward's totals over chunks;
CemaKernelConfig.pallas_combine=False does the same in XLA loops); the main pass then runs every
chunk from it.  The lagged sums u' (and g') start each chunk at zero; their
true values differ by q^i U'_in at step i, whose contribution to sum_t x_t u'_t is U'_in times
q times the forward pass's chunk-local state, kept as a residual.  So the backward's first pass
only needs u, and the forward and backward share one chunk partition of time.

A program walks its chunk in tiles of `block_t` statically unrolled steps, prefetching the next
tile's inputs while it computes the current one.  Register arrays are 1-D lane vectors of one
layout (no dynamic indexing); each channel's N orders are spread over `split` lanes, N / split
orders per lane, so the per-step sum over n is an in-register sum (plus log2(split) lane
shuffles).  With segment ids, each tile first checks for resets and runs reset-free tiles without
the per-step reset multiplies.

TPU (Mosaic) family: grid (batch, channel block, time tile) with the time axis sequential, the
state in VMEM scratch as [N, block_d] tiles (orders on sublanes, channels on lanes); three
passes (forward, adjoint, forward-mode parameter tangents v = s, z = dv/dq).

Both families share the per-step algebra (_fwd_update, ...).  cema_pallas dispatches on
jax.default_backend(): "tpu" -> Mosaic kernels, anything else -> Triton kernels, in the Pallas
interpreter when the backend is CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values
from jax.experimental import pallas as pl
from kernels_pallas import cema_summary_mma
from kernels_pallas.triton_backend import plgpu

from megalodon_jax.ops.cema import CemaCoefficients
# Double-float complex product (exact float32 partial products, so FMA contraction cannot change
# it); the accurate-power scheme of ops.cema, reused for the chunk decays q^chunk.
from megalodon_jax.ops.cema import _df_add, _df_mul, _dfc_mul

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

# Programs a GPU pass should have to keep every SM busy: about four resident programs on each of
# the 132 SMs of an H100/H200 (a scan step is a short dependent chain, so several warps per
# scheduler hide its latency).
_TARGET_PROGRAMS = 512
# default_config never makes chunks shorter than this: a chunk's first-pass summary and its share
# of the XLA combine cost about as much as this many steps.
_MIN_CHUNK = 256
_MAX_CHUNKS = 64


@dataclasses.dataclass(frozen=True)
class CemaKernelConfig:
  """Tiling of the scan kernels.

  block_d, split, num_warps: channels per program (block_d * split lanes), lanes per channel
    (N / split orders per lane) and warps per program of the forward scans.
  bwd_block_d, bwd_split, bwd_num_warps: the same for the backward scan, which carries more
    state per order (u, u', two complex accumulators), so fewer orders per lane keep it in
    registers.
  block_t: time steps per statically unrolled tile (the next tile's inputs load meanwhile).
  bwd_block_t: the same for the backward scan alone (0: block_t). Its prefetched tile of dy and x
    is part of its register count, which sets how many programs share an SM. A power of two; with
    more steps than block_t, a chunk's steps after its last whole tile run one at a time.
  num_chunks: parallel time chunks of both scans (1 = one sequential walk per program); fewer are
    used when the sequence has fewer than num_chunks tiles.
  reset_branch: with segment_ids, run tiles without a reset through a copy of the step code that
    skips the per-step reset multiplies.
  ptx_fma: write the GPU kernels' multiply-adds as PTX fma.rn.f32 (inline assembly). Triton code
    compiled through XLA does not contract a * b + c into one FMA: an fp32 chain kernel runs at
    30 TFLOP/s as multiply + add and at 58-60 as PTX FMAs on an H200 (bench_ops ceilings), and
    these scans are arithmetic-bound. Ignored in the interpreter and on TPU.
  ptx_shuffle: with split > 1, sum each channel's lanes with PTX butterfly shuffles and store the
    row from the channel's first lane. Triton's own reduction returns a [block_d] row in another
    layout, and converting it back for the store goes through shared memory with two block-wide
    barriers per time step (seen in the SASS of the backward scan). Needs one lane per thread
    (block_d * split == 32 * num_warps); other tilings keep the reduction. Ignored in the
    interpreter and on TPU.
  bwd_summary_tiling: "forward" or "backward": which tiling (block_d, split, num_warps or their
    bwd_ counterparts) the backward's chunk summaries use (they carry only u, as light as the
    forward's summaries). At B=1 L=32768 on an H200, in one run: D=4096 3.668 / 3.669 ms fwd+bwd
    (forward / backward tiling), D=2048 2.063 / 1.983 ms; ncu showed the backward tiling running
    them in 1.3 waves at D=4096, which costs no more than the forward tiling's lower occupancy.
  summary_block: S > 1 computes the chunk summaries (both passes) in blocks of S steps: the state
    after a block is q^S s + sum_j q^(S-1-j) x_j, with the powers q^1..q^S precomputed, so a
    block costs 2 S + 2 multiply-adds per order instead of 4 S (the plain step's complex
    multiply). It holds 2 S coefficient registers per order, so S and the orders per lane
    (summary_split) trade registers. 0 or 1: one step at a time. S must divide block_t; tiles
    with a segment reset, and a chunk's steps after its last whole tile, run step by step.
  summary_block_t: time steps per prefetched tile of both chunk-summary kernels (0: block_t). The
    summaries do ~2.5 multiply-adds per step and order against the scans' 6-14, so one tile of
    lookahead hides less of the load latency there (ncu: long-scoreboard stalls of 0.9-1.2 cycles
    per issued instruction in the summaries, 0.2 in the backward scan). A power of two that
    summary_block divides; a chunk's steps after its last whole tile run step by step. On an
    H200 at B=1, L=32768, D=4096 (bench_ops, 10 calls a sample, one run): 0 (16-step tiles) 3.193,
    32 3.162, 64 3.209 ms fwd+bwd (experiments/results/2026-11-30_nvidia-h200_ops-cema-summary-tiles.json);
    after bounded_offsets, 32 was 1.0-1.1% faster than 16 in four interleaved A/Bs, and
    default_config sets it.
  summary_split: lanes per channel of both chunk-summary kernels (their results leave in
    natural layout, so their tiling is free); 0 keeps the pass's own split. The program keeps
    its number of lanes (block_d * split of the tiling it replaces).
  sum_chains: independent accumulation chains of each step's sum over orders in the forward and
    backward scans. Each chain beyond the first costs a multiply to start it and an add to
    combine it, per step and lane; fewer chains make the sum a longer dependent run (2 N / split
    multiply-adds), which the next step's independent state updates can hide.
  pallas_powers: the double-float power table (summary powers, chunk decays, fwd_pairs' q^2; one
    for both passes, _power_exponents) as one Pallas kernel (_accurate_powers_pallas); False: XLA's
    unrolled chain (_accurate_powers, tens of small kernels), the same values. powers_block: lanes
    per program of that kernel (256 programs at D = 4096, N = 16 with 256; q^chunk is a
    13-squaring dependent chain per lane). When each table had its own kernel, with 1024 (64
    programs, half the SMs idle) the largest table took 54 us, and fwd+bwd read 2.751
    against 2.672 ms for 256 and 2.677 for 128 in an interleaved A/B on an H200
    (experiments/results/gpu_checks/2026-11-30_nvidia-h200_ab_cema_powers_block.json).
  pallas_combine: the combine over chunks that gives each chunk its starting state (the forward's
    s entering each chunk; the backward's u entering each chunk from the end) as ONE small Pallas
    kernel (_combine_states) reading the chunk-summary kernel's lane planes and writing the main
    scan's, in place of a per-chunk XLA loop and the layout conversions around it (~a dozen small
    XLA kernels, each a launch at B = 1). The same float32 operations in the same order. Also,
    for any number of chunks, the backward's work after its scan (sums over chunks and batch,
    the lagged walk over chunks and its correction, the firsts for h0) as ONE kernel
    (_backward_totals) reading the scan's lane planes and writing natural [D, N] totals; the
    same operations per chunk step, the sums over chunks and batch in its own order. On by
    default since session 11: on an H200 at B=1, L=32768, D=4096 it gave the same values and
    gradients as the XLA combine (errors against the references equal to four digits) and
    3.347 against 3.453 ms fwd+bwd in one run
    (experiments/results/2026-11-29_nvidia-h200_ops-cema-combine-ab2.json).
  fwd_pairs: the forward scan advances two steps at a time in tiles without a reset: the state
    two steps on is q^2 s + q x_t + x_(t+1), and y_t comes from the earlier state as Re(c q s) plus
    the lane's sum of Re(c) times x_t, so a pair costs 10 multiply-adds per order instead of 12,
    for 4 more coefficient registers per order (q^2 from the double-float power kernel, c q).
    Needs block_t >= 2; GPU only (the TPU kernels and the interpreter's TPU path ignore it). On in
    default_config since session 19 (compiled values checked on an H200).
  bwd_pairs: the backward scan advances two steps at a time in tiles without a reset and without
    the final-state cotangent g: u two steps back is q^2 u + q dy_(t+1) + dy_t, the later step's
    dx comes from the carried u through c q (plus the lane's sum of Re(c) times dy_(t+1)), u'
    is carried halved (u'/2 two steps back is q^2 u'/2 + q u + dy_(t+1) / 2, so no 2q), and the
    parameter sums split into x_t u_t, x_t u'_t/2 and two second sums x_(t+1) u_(t+2),
    x_(t+1) u'_(t+2)/2, combined with q once per chunk. A pair costs 26 multiply-adds per order
    instead of 28, for 8 more registers per order (q^2, c q, the two second sums). Needs
    block_t >= 2 (bwd_block_t when set); GPU only.
  summary_mma: the forward's chunk summaries on the tensor cores (kernels_pallas.cema_summary_mma:
    mma.sync on per-lane fragments, Horner's rule over 16-step blocks, the powers as three bf16
    parts) where it applies: bf16 x, no segment ids, N = 16, equal chunks numbering a multiple of
    16, D a multiple of 16, and on a GPU after its once-per-process check; elsewhere the FMA
    summaries. Timed at the benchmark shape (16 chunks); more chunks fold into the kernel's batch.
    The power table then holds q^1 .. q^16. The backward's summaries stay FMA kernels (their
    float32 cotangent is not exact in bf16).
  bounded_offsets: mask the GPU scans' dynamic row indices (batch, channel block, a tile's first
    step) to the power of two above their range, which changes no valid index but lets LLVM prove
    that the int32 row offsets do not overflow; the step within the tile then becomes a constant
    of the load's address (see _bounded). Without it each row load costs an IADD3, a LEA and a
    LEA.HI.X (offline SASS for sm_90a, Triton 3.9, per 16 steps: chunk summaries 428 -> 376
    instructions, forward scan 1515 -> 1420, backward summaries 426 -> 371, backward scan
    2171 -> 2047). Ignored on TPU.
  tpu_block_d, tpu_block_t: lane and time block of the TPU kernels (multiples of 128 and 16 on
    hardware unless they cover the whole axis).
  """
  block_d: int = 128
  block_t: int = 16
  split: int = 1
  num_warps: int = 4
  bwd_block_d: int = 64
  bwd_split: int = 2
  bwd_num_warps: int = 4
  bwd_block_t: int = 0
  num_chunks: int = 1
  reset_branch: bool = True
  ptx_fma: bool = True
  ptx_shuffle: bool = True
  bwd_summary_tiling: str = "backward"
  summary_block: int = 0
  summary_block_t: int = 0
  summary_split: int = 0
  sum_chains: int = 4
  pallas_powers: bool = True
  powers_block: int = 256
  pallas_combine: bool = True
  fwd_pairs: bool = False
  bwd_pairs: bool = False
  summary_mma: bool = False
  bounded_offsets: bool = True
  tpu_block_d: int = 128
  tpu_block_t: int = 256

  def validate(self, ndim: int) -> "CemaKernelConfig":
    for name in ("block_d", "block_t", "split", "num_warps", "bwd_block_d", "bwd_split",
                 "bwd_num_warps", "powers_block"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"CemaKernelConfig.{name} must be a power of two; got {value}.")
    if self.bwd_block_t < 0 or self.bwd_block_t & (self.bwd_block_t - 1):
      raise ValueError(f"CemaKernelConfig.bwd_block_t must be 0 or a power of two; got {self.bwd_block_t}.")
    for name in ("split", "bwd_split"):
      if ndim % getattr(self, name):
        raise ValueError(f"CemaKernelConfig.{name}={getattr(self, name)} must divide N={ndim}.")
    if self.tpu_block_d < 1 or self.tpu_block_t < 1:
      raise ValueError("CemaKernelConfig.tpu_block_d and tpu_block_t must be positive.")
    if self.bwd_summary_tiling not in ("forward", "backward"):
      raise ValueError("CemaKernelConfig.bwd_summary_tiling must be 'forward' or 'backward'; "
                       f"got {self.bwd_summary_tiling!r}.")
    if self.num_chunks < 1:
      raise ValueError(f"CemaKernelConfig.num_chunks must be >= 1; got {self.num_chunks}.")
    if self.summary_block < 0 or (self.summary_block > 1 and self.block_t % self.summary_block):
      raise ValueError(f"CemaKernelConfig.summary_block={self.summary_block} must be 0, 1 or a "
                       f"divisor of block_t={self.block_t}.")
    if self.summary_block_t:
      if self.summary_block_t < 0 or self.summary_block_t & (self.summary_block_t - 1) or (
          self.summary_block > 1 and self.summary_block_t % self.summary_block):
        raise ValueError(f"CemaKernelConfig.summary_block_t={self.summary_block_t} must be 0 or a "
                         f"power of two that summary_block={self.summary_block} divides.")
    if self.sum_chains < 1:
      raise ValueError(f"CemaKernelConfig.sum_chains must be >= 1; got {self.sum_chains}.")
    if self.fwd_pairs and self.block_t < 2:
      raise ValueError(f"CemaKernelConfig.fwd_pairs needs block_t >= 2; got {self.block_t}. "
                       "Set fwd_pairs=False for one-step tiles.")
    if self.bwd_pairs and (self.bwd_block_t or self.block_t) < 2:
      raise ValueError(f"CemaKernelConfig.bwd_pairs needs backward tiles of >= 2 steps; got "
                       f"bwd_block_t={self.bwd_block_t}, block_t={self.block_t}. Set "
                       "bwd_pairs=False for one-step tiles.")
    if self.summary_split:
      if self.summary_split & (self.summary_split - 1) or ndim % self.summary_split:
        raise ValueError(f"CemaKernelConfig.summary_split={self.summary_split} must be 0 or a "
                         f"power of two dividing N={ndim}.")
    return self


def _largest_split(ndim: int, cap: int) -> int:
  """Largest power of two <= cap dividing ndim."""
  split = 1
  while split * 2 <= cap and ndim % (split * 2) == 0:
    split *= 2
  return split


def default_config(batch: int, length: int, dim: int, ndim: int) -> CemaKernelConfig:
  """Tiling for an H100/H200-class GPU: enough (batch, channel block, chunk) programs to fill it.

  One lane per channel in the forward and in the blocked chunk summaries (all N orders in
  registers, no lane shuffles), two in the backward; time chunks are added until about
  _TARGET_PROGRAMS programs exist, but never shorter than _MIN_CHUNK steps (short sequences run as one chunk).
  """
  # Blocked chunk summaries, 4 steps per block on 2 lanes per channel: on an H200 at B=1,
  # L=32768, D=4096 they took 0.588 / 0.594 ms (forward / backward summaries) against 0.631 /
  # 0.673 step by step (experiments/results/gpu_checks/2026-11-29_nvidia-h200_cema_summaries_ab.json).
  # fwd_pairs: on an H200 at that shape fwd+bwd 3.098 against 3.176 ms step by step over three
  # interleaved rounds, y within 2.8e-7 of the stepwise forward's
  # (experiments/results/gpu_checks/2026-11-30_nvidia-h200_cema_fwd_pairs_check.json).
  # 32-step summary tiles: 1.0-1.1% faster fwd+bwd than 16 in each of four interleaved A/Bs
  # (experiments/results/gpu_checks/2026-11-30_nvidia-h200_ab_cema_{bounded_offsets,after_bounded,bwd_block_t}.json).
  # All N orders on one lane in the chunk summaries (summary_split=1): 0.6-1.3% faster fwd+bwd than
  # two lanes in three interleaved A/Bs on H200s, with 43 instructions per channel and step against
  # 46.5 in the offline SASS (254 registers: two programs an SM, where two lanes ran three)
  # (experiments/results/gpu_checks/2026-11-30_nvidia-h200_ab_cema_{ss1,summary_warps,versions}.json).
  # The forward's chunk summaries on the tensor cores (summary_mma) where they apply: fwd+bwd 2.588
  # against 2.614 ms over five interleaved rounds on an H200
  # (experiments/results/gpu_checks/2026-11-30_nvidia-h200_ab_cema_summary_mma.json).
  # bwd_pairs with 8-step backward tiles (255 registers without spills in the offline SASS, where
  # 16-step tiles spill): fwd+bwd 2.491 against 2.600 ms over five interleaved rounds on an H200
  # (experiments/results/gpu_checks/2026-11-30_nvidia-h200_ab_cema_bwd_pairs.json).
  base = CemaKernelConfig(bwd_split=_largest_split(ndim, 2), summary_block=4, summary_split=1,
                          summary_block_t=32, fwd_pairs=True, summary_mma=True, bwd_pairs=True,
                          bwd_block_t=8)
  programs = batch * pl.cdiv(dim, base.block_d)
  wanted = pl.cdiv(_TARGET_PROGRAMS, programs)
  chunks = max(1, min(wanted, length // _MIN_CHUNK, _MAX_CHUNKS))
  return dataclasses.replace(base, num_chunks=chunks)


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

# ----------------------------------------------------------------------------------------------
# Step algebra shared by the GPU and TPU kernels.  Arrays are any broadcast-compatible float32
# shapes: on GPU one group of lanes [block_d * split] per call, on TPU a whole [N, block_d] tile
# with the per-step input as a [1, block_d] row.  k is the reset flag (None: no segments).
# ----------------------------------------------------------------------------------------------

def _plain_fma(a, b, c):
  """a * b + c (the compiler may or may not contract it)."""
  return a * b + c


def _ptx_fma(a, b, c):
  """a * b + c as one PTX fma.rn.f32 (GPU Triton kernels only; see CemaKernelConfig.ptx_fma)."""
  shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
  args = [jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for v in (a, b, c)]
  return plgpu.elementwise_inline_asm(
      "fma.rn.f32 $0, $1, $2, $3;", args=args, constraints="=r,r,r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])[0]


def _fwd_update(sr, si, x, k, qre, qim, fma=_plain_fma):
  """Folded state s_t = k q s_{t-1} + x_t (real and imaginary parts): two FMAs per part."""
  if k is not None:
    sr, si = k * sr, k * si
  return fma(qre, sr, fma(-qim, si, x)), fma(qim, sr, qre * si)


def _fwd_output(acc, sr, si, cre, cim, fma=_plain_fma):
  """acc + Re(c s) (c = eta p in the forward, p eta in the backward); acc None starts a sum."""
  if acc is None:
    return fma(-cim, si, cre * sr)
  return fma(-cim, si, fma(cre, sr, acc))


def _rev_update(er, ei, dy, k, ere, eim, qre, qim, fma=_plain_fma):
  """Adjoint in E-form: w_t = k_{t+1} E_{t+1} + eta dy_t, E_t = q w_t.  Returns (w, E)."""
  if k is not None:
    er, ei = k * er, k * ei
  wr = fma(ere, dy, er)
  wi = fma(eim, dy, ei)
  return wr, wi, fma(-qim, wi, qre * wr), fma(qim, wr, qre * wi)


def _block_update(sr, si, xs, pw_re, pw_im, fma=_plain_fma):
  """Real part of S = len(xs) reset-free steps of s = q s + x at once:
  Re(q^S s) + x_{S-1} + sum_{j < S-1} Re(q^(S-1-j)) x_j, with pw[m] = q^(m+1).

  One multiply-add per step (the powers are precomputed), two per block for q^S s.
  """
  S = len(xs)
  acc = fma(pw_re[S - 1], sr, fma(-pw_im[S - 1], si, xs[S - 1]))
  for j in range(S - 1):
    acc = fma(pw_re[S - 2 - j], xs[j], acc)
  return acc


def _block_update_im(sr, si, xs, pw_re, pw_im, fma=_plain_fma):
  """Imaginary part of _block_update: Im(q^S s) + sum_{j < S-1} Im(q^(S-1-j)) x_j."""
  S = len(xs)
  acc = fma(pw_im[S - 1], sr, pw_re[S - 1] * si)
  for j in range(S - 1):
    acc = fma(pw_im[S - 2 - j], xs[j], acc)
  return acc


def _param_update(vr, vi, zr, zi, x, k, qre, qim, fma=_plain_fma):
  """v_t = k q v_{t-1} + x_t and its q-tangent z_t = k (q z_{t-1} + v_{t-1})."""
  if k is not None:
    vr, vi, zr, zi = k * vr, k * vi, k * zr, k * zi
  znr = fma(qre, zr, fma(-qim, zi, vr))
  zni = fma(qre, zi, fma(qim, zr, vi))
  vnr = fma(qre, vr, fma(-qim, vi, x))
  vni = fma(qim, vr, qre * vi)
  return vnr, vni, znr, zni


# ----------------------------------------------------------------------------------------------
# Accurate chunk decays.
# ----------------------------------------------------------------------------------------------

def _accurate_powers(q: Array, exponents: tuple[int, ...]) -> Array:
  """q ** e for static integers e >= 0: q [...] complex -> [..., len(exponents)] complex64.

  Square-and-multiply on the stored complex64 q in double-float arithmetic (ops.cema explains the
  scheme): about 2^-44 relative error per squaring, so q^2048 keeps float32 accuracy where plain
  complex64 squaring drifts by ~2048 eps.  Unrolled over the (static) exponent bits, so XLA fuses
  it into a few elementwise kernels (no device loop).
  """
  exps = np.asarray(exponents, np.int64)
  if exps.ndim != 1 or exps.size == 0 or exps.min() < 0:
    raise ValueError(f"exponents must be non-negative integers; got {exponents}.")
  q = jnp.asarray(q).astype(jnp.complex64)
  shape = (2,) + q.shape + (exps.size,)
  base = (jnp.broadcast_to(jnp.stack([jnp.real(q), jnp.imag(q)])[..., None], shape),
          jnp.zeros(shape, jnp.float32))
  result = (jnp.zeros(shape, jnp.float32).at[0].set(1.0), jnp.zeros(shape, jnp.float32))
  bits = max(1, int(exps.max()).bit_length())
  for bit in range(bits):
    take = ((exps >> bit) & 1).astype(bool)
    if take.any():
      hi, lo = _dfc_mul(result, base)
      result = (jnp.where(take, hi, result[0]), jnp.where(take, lo, result[1]))
    if bit + 1 < bits:
      base = _dfc_mul(base, base)
  return lax.complex(result[0][0] + result[1][0], result[0][1] + result[1][1])


def _dfc_mul_parts(zr, zi, wr, wi):
  """_dfc_mul on separate (hi, lo) parts, z = zr + i zi, w = wr + i wi: the same float32 operations
  (so the same values) without the stacking, which a kernel's 1-D registers do not need."""
  ii = _df_mul(zi, wi)
  return _df_add(_df_mul(zr, wr), (-ii[0], -ii[1])), _df_add(_df_mul(zr, wi), _df_mul(zi, wr))


def _powers_kernel(qre_ref, qim_ref, re_out, im_out, *, exponents: tuple[int, ...]):
  """q^e for every static e of exponents, per lane: square-and-multiply in double-float registers."""
  zero = jnp.zeros_like(qre_ref[...])
  base = ((qre_ref[...], zero), (qim_ref[...], zero))
  results = [((zero + 1.0, zero), (zero, zero)) for _ in exponents]
  bits = max(1, max(exponents).bit_length())
  for bit in range(bits):
    for i, e in enumerate(exponents):
      if (e >> bit) & 1:
        results[i] = _dfc_mul_parts(*results[i], *base)
    if bit + 1 < bits:
      base = _dfc_mul_parts(*base, *base)
  for i, (re, im) in enumerate(results):
    re_out[i, :] = re[0] + re[1]
    im_out[i, :] = im[0] + im[1]


def _accurate_powers_pallas(q: Array, exponents: tuple[int, ...], *, interpret: bool,
                            block: int = 1024) -> Array:
  """_accurate_powers as ONE Pallas kernel (lanes over q's entries): XLA runs the reference's
  unrolled double-float chain as tens of small kernels (~0.2 ms of a CEMA fwd+bwd at D = 4096).
  The same float32 operations, so the same values up to the compiler's contraction of the low-part
  products into fused multiply-adds (see ops.cema). Each exponent's chain is its own (the squares
  q^(2^k) are shared, the same values for any exponent set), so a power does not depend on which
  other exponents share the call."""
  re, im = _accurate_power_planes_pallas(q, exponents, interpret=interpret, block=block)
  return jnp.moveaxis(lax.complex(re, im), 0, -1).reshape(jnp.shape(q) + (re.shape[0],))


def _accurate_power_planes_pallas(q: Array, exponents: tuple[int, ...], *, interpret: bool,
                                  block: int = 1024) -> tuple[Array, Array]:
  """_accurate_powers_pallas in the kernel's own layout: float32 planes (re, im) [E, size of q],
  row i holding q^exponents[i] for q's entries in their (row-major) order."""
  exps = tuple(int(e) for e in exponents)
  if not exps or min(exps) < 0:
    raise ValueError(f"exponents must be non-negative integers; got {exponents}.")
  q = jnp.asarray(q).astype(jnp.complex64).reshape(-1)
  size = q.shape[0]
  while size % block:
    block //= 2
  lanes = pl.BlockSpec((block,), lambda i: (i,))
  out = pl.BlockSpec((len(exps), block), lambda i: (0, i))
  plane = jax.ShapeDtypeStruct((len(exps), size), jnp.float32)
  kwargs = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=1)}
  re, im = pl.pallas_call(
      functools.partial(_powers_kernel, exponents=exps), grid=(size // block,), in_specs=[lanes, lanes],
      out_specs=[out, out], out_shape=[plane, plane], interpret=interpret, name="cema_powers", **kwargs,
  )(jnp.real(q), jnp.imag(q))
  return re, im


def _binary_power_parts(q, exponent: int):
  """q^exponent (static) by square-and-multiply on (hi, lo) parts, as _powers_kernel does."""
  zero = jnp.zeros_like(q[0][0])
  result, base = ((zero + 1.0, zero), (zero, zero)), q
  bits = max(1, exponent.bit_length())
  for bit in range(bits):
    if (exponent >> bit) & 1:
      result = _dfc_mul_parts(*result, *base)
    if bit + 1 < bits:
      base = _dfc_mul_parts(*base, *base)
  return result


def _tables_kernel(qre_ref, qim_ref, high_re, high_im, low_re, low_im, *, block: int, count: int,
                   offset: int):
  """Per lane: low[l] = q^l (l < block) and high[j] = q^(offset + block j) (j < count), each by
  running double-float products along the table (low: times q; high: times q^block), so the
  kernel is a short loop rather than one unrolled chain per entry. Grid axis 1 picks the table:
  the two walks run in parallel programs (each is a dependent chain)."""
  zero = jnp.zeros_like(qre_ref[...])
  q = ((qre_ref[...], zero), (qim_ref[...], zero))

  def walk(start, step, n, re_out, im_out):
    def body(i, cur):
      (rh, rl), (ih, il) = cur
      re_out[pl.ds(i, 1), :] = (rh + rl)[None, :]
      im_out[pl.ds(i, 1), :] = (ih + il)[None, :]
      return _dfc_mul_parts(*cur, *step)
    lax.fori_loop(0, n, body, start)

  @pl.when(pl.program_id(1) == 0)
  def _():
    walk(((zero + 1.0, zero), (zero, zero)), q, block, low_re, low_im)

  @pl.when(pl.program_id(1) == 1)
  def _():
    walk(_binary_power_parts(q, offset), _binary_power_parts(q, block), count, high_re, high_im)


def _table_exponents(block: int, count: int, offset: int) -> np.ndarray:
  return np.concatenate([offset + block * np.arange(count), np.arange(block)])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def power_tables_pallas(q: Array, block: int, count: int, offset: int = 0,
                        interpret: bool = False) -> tuple[Array, Array]:
  """(high [..., count], low [..., block]) complex64: q^(offset + block j) and q^l, as
  megalodon_jax.ops.cema._power_tables(q, length, offset) returns them, in ONE Pallas kernel.

  q: [...] complex (|q| <= 1); block, count, offset: static ints >= 0 (block, count >= 1).
  Double-float products along each table: the error grows with the exponent (~e 2^-44 relative,
  like the XLA reference's squarings), float32-accurate up to exponents of ~2^20. At mega200M's
  D=1024, N=16 for L=16384 (what sequence parallelism's state correction needs per layer) on an
  H200: 0.075 ms of device time, against 6.1 ms for the reference's rolled XLA loop in the form it
  had then (two stacked double-float products per bit on every entry). Differentiable in q
  (custom JVP: d q^e = e q^e dq / q, as the reference)."""
  shape = q.shape
  q = jnp.asarray(q).astype(jnp.complex64).reshape(-1)
  high_re, high_im, low_re, low_im = power_table_planes(jnp.real(q), jnp.imag(q), block, count, offset, interpret)
  to_table = lambda re, im: jnp.moveaxis(lax.complex(re, im), 0, -1).reshape(shape + (re.shape[0],))  # noqa: E731
  return to_table(high_re, high_im), to_table(low_re, low_im)


def power_table_planes(qre: Array, qim: Array, block: int, count: int, offset: int = 0,
                       interpret: bool = False) -> tuple[Array, Array, Array, Array]:
  """power_tables_pallas on float32 planes, in the kernel's own layout and not differentiable:
  qre, qim [S] -> (high re, high im [count, S], low re, low im [block, S]). For callers that
  want the tables as planes with q's entries minor (e.g. q laid out [N, D] and flattened)."""
  if block < 1 or count < 1 or offset < 0:
    raise ValueError(f"power tables need block >= 1, count >= 1 and offset >= 0; got {block}, {count}, {offset}.")
  if offset + block * (count - 1) >= 2**31:
    raise ValueError(f"exponent {offset + block * (count - 1)} does not fit in int32")
  size = qre.shape[0]
  lanes = 128  # 2 x size / 128 programs (256 at mega200M) of dependent chains of block or count
  while size % lanes:
    lanes //= 2
  lane_spec = pl.BlockSpec((lanes,), lambda i, t: (i,))
  plane = lambda rows: (pl.BlockSpec((rows, lanes), lambda i, t: (0, i)),  # noqa: E731
                        jax.ShapeDtypeStruct((rows, size), jnp.float32))
  (high_spec, high_shape), (low_spec, low_shape) = plane(count), plane(block)
  kwargs = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=2, num_stages=1)}
  return tuple(pl.pallas_call(
      functools.partial(_tables_kernel, block=block, count=count, offset=offset),
      grid=(size // lanes, 2), in_specs=[lane_spec, lane_spec],
      out_specs=[high_spec, high_spec, low_spec, low_spec],
      out_shape=[high_shape, high_shape, low_shape, low_shape], interpret=interpret,
      name="cema_power_tables", **kwargs,
  )(qre.astype(jnp.float32), qim.astype(jnp.float32)))


@power_tables_pallas.defjvp
def _power_tables_pallas_jvp(block, count, offset, interpret, primals, tangents):
  (q,), (dq,) = primals, tangents
  high, low = power_tables_pallas(q, block, count, offset, interpret)
  safe_q = jnp.where(q == 0, jnp.ones_like(q), q)
  ratio = jnp.where(q == 0, jnp.zeros_like(q), dq / safe_q)[..., None]
  exps = _table_exponents(block, count, offset).astype(np.float32)
  high_e, low_e = jnp.asarray(exps[:count], jnp.complex64), jnp.asarray(exps[count:], jnp.complex64)
  return (high, low), (high * high_e * ratio, low * low_e * ratio)


def _power_table(q: Array, exponents: tuple[int, ...], cfg: "CemaKernelConfig",
                 interpret: bool) -> tuple[Array, Array]:
  """q^e [D, N] for each static e of exponents, as float32 planes (re, im) [E, D * N] (row i:
  q^exponents[i], entries in q's order d * N + n), by CemaKernelConfig.pallas_powers: one Pallas
  kernel, or XLA's unrolled chain (the same values, each exponent computed on its own)."""
  if cfg.pallas_powers:
    return _accurate_power_planes_pallas(q, exponents, interpret=interpret, block=cfg.powers_block)
  table = _accurate_powers(q, exponents)  # [D, N, E]
  return _split_complex(jnp.moveaxis(table, -1, 0).reshape(len(exponents), -1))


# ----------------------------------------------------------------------------------------------
# GPU (Triton) kernels.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _ScanSpec:
  """Static description of one scan-kernel launch.

  mode "local": s = k q s + x from zero over each chunk; writes only each chunk's final state.
    Program c walks time chunk c + chunk_offset and writes its state at c (_summary_chunks).
  mode "fwd": the forward scan from each chunk's starting state; writes y and final states.
  mode "bwd": the reverse-time adjoint scan (see the module docstring); writes dx and per-chunk
    final states and accumulators.
  """
  mode: str
  reverse: bool        # walk each chunk from its last step to its first
  has_init: bool       # read each chunk's starting state (else zeros)
  has_keep: bool       # segment resets present ("keep" holds the per-step flag)
  has_g: bool          # bwd: carry the final-state cotangent part g of the adjoint
  reset_branch: bool
  length: int          # L
  dim: int             # D
  groups: int          # N / split orders per lane
  split: int           # lanes per channel
  block_d: int
  block_t: int
  chunk: int           # time steps per chunk (== length when there is one chunk)
  ptx_fma: bool        # multiply-adds as PTX FMAs (compiled GPU kernels only)
  ptx_shuffle: bool    # per-channel lane sums as PTX shuffles (needs one lane per thread)
  in_names: tuple[str, ...]
  out_names: tuple[str, ...]
  summary_block: int = 0  # mode "local": steps per blocked update (CemaKernelConfig.summary_block)
  sum_chains: int = 4     # accumulation chains of the per-step sum over orders
  pair_steps: bool = False  # modes "fwd" / "bwd": two steps per update in reset-free tiles
                            # (fwd_pairs / bwd_pairs; never with has_g)
  bounded_offsets: bool = True  # CemaKernelConfig.bounded_offsets
  batch: int = 0          # B (set by _launch; bounds the batch index in row addresses)
  chunk_offset: int = 0   # mode "local": the time chunk of program c is c + chunk_offset


@dataclasses.dataclass(frozen=True)
class _Step:
  """A step of a chunk's walk, base + offset: base traced (a tile's first step, or a step after the
  last whole tile), offset static.

  The two stay apart until the row address is formed (_gpu_scan_kernel's time_of), so the static
  offset ends up as a constant of the address: see _bounded.
  """
  base: Array
  offset: int = 0

  def __add__(self, k: int) -> "_Step":
    return _Step(self.base, self.offset + k)


def _bounded(value: Array, limit: int) -> Array:
  """value & (2^k - 1) for the smallest 2^k >= limit: the identity for value in [0, limit).

  Pallas' Triton lowering forms row offsets in int32 for arrays under 4 GiB and sign-extends them,
  so LLVM may split a step's constant out of the address (and ptxas fold it into the load's
  immediate) only if it can prove that no int32 add on the way overflows. The mask gives it the
  bound on each dynamic index; without it every row load costs an IADD3, a LEA and a LEA.HI.X.
  Values outside [0, limit) reach it only from masked-off prefetches, where any address will do.
  """
  return lax.bitwise_and(value, jnp.int32(pl.next_power_of_2(max(limit, 1)) - 1))


def _run_tiles(spec: _ScanSpec, length, carry, load_fn: Callable, step_fn: Callable,
               block_fn: Callable | None = None, block: int = 1):
  """Walks `length` steps in tiles of block_t unrolled steps, prefetching the next tile.

  load_fn(step, valid) -> tuple of per-step inputs whose last entry is the reset flag (or None);
  step_fn(carry, inputs_without_flag, step, flag_or_None) -> carry.
  block_fn(carry, [inputs_without_flag] * block, step) -> carry, if given, advances `block`
  reset-free steps from `step` at once; it runs the tiles that have no reset (block divides block_t).
  """
  tile = spec.block_t
  n_tiles = length // tile
  rem = length - n_tiles * tile

  def run(carry, inputs, first, use_keep):
    if block_fn is not None and not use_keep:
      for s in range(0, tile, block):
        carry = block_fn(carry, [tuple(inputs[s + j][:-1]) for j in range(block)], first + s)
      return carry
    for s in range(tile):
      *data, k = inputs[s]
      carry = step_fn(carry, data, first + s, k if use_keep else None)
    return carry

  def tile_body(i, state):
    carry, pre = state
    valid = (i + 1) < n_tiles
    nxt = tuple(load_fn(_Step((i + 1) * tile, s), valid) for s in range(tile))
    first = _Step(i * tile)
    if spec.has_keep and spec.reset_branch:
      # The flag is uniform over the program, so this branch never diverges inside a warp.
      clean = functools.reduce(jnp.minimum, [inputs[-1] for inputs in pre]) > 0.5
      carry = lax.cond(clean, lambda c: run(c, pre, first, False),
                       lambda c: run(c, pre, first, True), carry)
    else:
      carry = run(carry, pre, first, spec.has_keep)
    return carry, nxt

  pre = tuple(load_fn(_Step(jnp.int32(0), s), n_tiles > 0) for s in range(tile))
  carry, _ = lax.fori_loop(0, n_tiles, tile_body, (carry, pre))

  def rem_body(r, carry):
    step = _Step(n_tiles * tile + r)
    *data, k = load_fn(step, True)
    return step_fn(carry, data, step, k)

  return lax.fori_loop(0, rem, rem_body, carry)


def _use_shuffle(cfg: CemaKernelConfig, split: int, block_d: int, num_warps: int,
                 interpret: bool) -> bool:
  """Whether a scan's lane sums can be PTX shuffles: compiled, split > 1, one lane per thread."""
  return (cfg.ptx_shuffle and not interpret and split > 1
          and block_d * split == 32 * num_warps)


def _ptx_shuffle_xor(a: Array, mask: int) -> Array:
  """The value held by lane (lane ^ mask) of the same warp (PTX shfl.sync.bfly).

  Valid only when each thread holds exactly one element of `a` in lane order, which
  _use_shuffle guarantees (a [32 * num_warps] vector gets one element per thread).
  """
  return plgpu.elementwise_inline_asm(
      f"shfl.sync.bfly.b32 $0, $1, {mask}, 0x1f, 0xffffffff;", args=[a], constraints="=r,r",
      pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])[0]


def _lane_sum(acc: Array, spec: _ScanSpec) -> Array:
  """[block_d * S] lane partial sums -> per-channel sums.

  Returns [block_d] (one per channel), or with spec.ptx_shuffle the [block_d * S] lane vector
  in which every lane holds its channel's sum (butterfly over the S lanes of a channel, which
  are adjacent threads of one warp).
  """
  if spec.split == 1:
    return acc
  if spec.ptx_shuffle:
    width = 1
    while width < spec.split:
      acc = acc + _ptx_shuffle_xor(acc, width)
      width *= 2
    return acc
  return jnp.sum(acc.reshape(spec.block_d, spec.split), axis=1)


def _chain_add(chains: list, g: int, value_fn: Callable) -> None:
  """chains[g % len] <- value_fn(chains[g % len]) (value_fn(None) starts a chain)."""
  j = g % len(chains)
  chains[j] = value_fn(chains[j])


def _chains_total(chains: list) -> Array:
  values = [c for c in chains if c is not None]
  while len(values) > 1:
    values = [a + b for a, b in zip(values[0::2], values[1::2])] + values[len(values) // 2 * 2:]
  return values[0]


def _gpu_scan_kernel(*refs, spec: _ScanSpec):
  """One program: batch b, channel block blk, time chunk c (see _ScanSpec for the modes)."""
  r = dict(zip(spec.in_names + spec.out_names, refs))
  bound = _bounded if spec.bounded_offsets else (lambda value, limit: value)
  b = bound(pl.program_id(0), spec.batch) if spec.batch else pl.program_id(0)
  blk, c = bound(pl.program_id(1), pl.cdiv(spec.dim, spec.block_d)), pl.program_id(2)
  lanes = spec.block_d * spec.split
  lane = jnp.arange(lanes, dtype=jnp.int32)
  flat = blk * lanes + lane
  d_lane = blk * spec.block_d + lane // spec.split
  lmask = d_lane < spec.dim
  d_out = blk * spec.block_d + jnp.arange(spec.block_d, dtype=jnp.int32)
  omask = d_out < spec.dim
  first_lane = lmask & (lane % spec.split == 0)
  groups = range(spec.groups)
  t_lo = (c + spec.chunk_offset) * spec.chunk
  n_steps = jnp.minimum(spec.chunk, spec.length - t_lo)
  n_chains = min(spec.sum_chains, spec.groups)
  fma = _ptx_fma if spec.ptx_fma else _plain_fma

  def time_of(step: _Step):
    # Valid steps have base within [0, L) either way; the static offset stays outside the mask.
    if spec.reverse:
      return bound(t_lo + n_steps - 1 - step.base, spec.length) - step.offset
    return bound(t_lo + step.base, spec.length) + step.offset

  def coef(name):
    return [plgpu.load(r[name].at[g, flat], mask=lmask, other=0.0) for g in groups]

  def lane_coef(name):
    return plgpu.load(r[name].at[flat], mask=lmask, other=0.0)

  def zeros():
    return [jnp.zeros((lanes,), jnp.float32) for _ in groups]

  def state_in(name):
    if not spec.has_init:
      return zeros()
    return [plgpu.load(r[name].at[b, c, g, flat], mask=lmask, other=0.0) for g in groups]

  def state_out(name, values):
    for g in groups:
      plgpu.store(r[name].at[b, c, g, flat], values[g], mask=lmask)

  def load_row(name, step, valid):
    row = plgpu.load(r[name].at[b, time_of(step), d_lane], mask=lmask & valid, other=0.0)
    return row.astype(jnp.float32)

  def load_keep(step, valid):
    if not spec.has_keep:
      return None
    return plgpu.load(r["keep"].at[b, time_of(step)], mask=valid, other=1.0)

  def store_row(name, step, chains):
    value = _lane_sum(_chains_total(chains), spec).astype(r[name].dtype)
    if spec.ptx_shuffle:
      # Every lane holds its channel's sum; the channel's first lane writes it.
      plgpu.store(r[name].at[b, time_of(step), d_lane], value, mask=first_lane)
    else:
      plgpu.store(r[name].at[b, time_of(step), d_out], value, mask=omask)

  qre, qim = coef("qre"), coef("qim")

  if spec.mode == "local":

    def load_fn(step, valid):
      return load_row("x", step, valid), load_keep(step, valid)

    def step_fn(carry, data, step, k):
      sr, si = carry
      (x,) = data
      new = [_fwd_update(sr[g], si[g], x, k, qre[g], qim[g], fma) for g in groups]
      return [v[0] for v in new], [v[1] for v in new]

    block_fn, block = None, 1
    if spec.summary_block > 1:
      block = spec.summary_block
      # powers[m][g] = q^(m + 1), m = 0..block-1 (loaded once; q is fixed per channel and order).
      pw_re = [[plgpu.load(r["pwre"].at[m, g, flat], mask=lmask, other=0.0) for g in groups]
               for m in range(block)]
      pw_im = [[plgpu.load(r["pwim"].at[m, g, flat], mask=lmask, other=0.0) for g in groups]
               for m in range(block)]

      def block_fn(carry, datas, step):
        del step
        sr, si = carry
        xs = [data[0] for data in datas]
        new_r, new_i = [], []
        for g in groups:
          new_r.append(_block_update(sr[g], si[g], xs, [w[g] for w in pw_re],
                                     [w[g] for w in pw_im], fma))
          new_i.append(_block_update_im(sr[g], si[g], xs, [w[g] for w in pw_re],
                                        [w[g] for w in pw_im], fma))
        return new_r, new_i

    sr, si = _run_tiles(spec, n_steps, (zeros(), zeros()), load_fn, step_fn, block_fn, block)
    state_out("fre", sr)
    state_out("fim", si)

  elif spec.mode == "fwd":
    cre, cim, om = coef("cre"), coef("cim"), lane_coef("om")

    def load_fn(step, valid):
      return load_row("x", step, valid), load_keep(step, valid)

    def step_fn(carry, data, step, k):
      sr, si = carry
      (x,) = data
      chains = [om * x] + [None] * (n_chains - 1)
      new_r, new_i = [], []
      for g in groups:
        nr, ni = _fwd_update(sr[g], si[g], x, k, qre[g], qim[g], fma)
        _chain_add(chains, g,
                   lambda acc, nr=nr, ni=ni, g=g: _fwd_output(acc, nr, ni, cre[g], cim[g], fma))
        new_r.append(nr)
        new_i.append(ni)
      store_row("y", step, chains)
      return new_r, new_i

    block_fn, block = None, 1
    if spec.pair_steps:
      block = 2
      q2re, q2im, cqre, cqim = coef("q2re"), coef("q2im"), coef("cqre"), coef("cqim")
      omk = om + lane_coef("k0")  # y_t's direct term: (omega + this lane's sum of Re(c)) x_t

      def block_fn(carry, datas, step):
        sr, si = carry
        (x0,), (x1,) = datas
        first = [omk * x0] + [None] * (n_chains - 1)
        second = [om * x1] + [None] * (n_chains - 1)
        new_r, new_i = [], []
        for g in groups:
          # y_t = Re(c q s_(t-1)) + Re(c) x_t: no need for s_t itself.
          _chain_add(first, g, lambda acc, g=g: _fwd_output(acc, sr[g], si[g], cqre[g], cqim[g], fma))
          # s_(t+1) = q^2 s_(t-1) + q x_t + x_(t+1)
          nr = fma(q2re[g], sr[g], fma(-q2im[g], si[g], fma(qre[g], x0, x1)))
          ni = fma(q2im[g], sr[g], fma(q2re[g], si[g], qim[g] * x0))
          _chain_add(second, g,
                     lambda acc, nr=nr, ni=ni, g=g: _fwd_output(acc, nr, ni, cre[g], cim[g], fma))
          new_r.append(nr)
          new_i.append(ni)
        store_row("y", step, first)
        store_row("y", step + 1, second)
        return new_r, new_i

    sr, si = _run_tiles(spec, n_steps, (state_in("s0re"), state_in("s0im")), load_fn, step_fn,
                        block_fn, block)
    state_out("fre", sr)
    state_out("fim", si)

  elif spec.mode == "bwd":
    cre, cim, om = coef("cre"), coef("cim"), lane_coef("om")
    pp = coef("p") if spec.has_g else None
    pairs = spec.pair_steps
    # With pairs the carried u' is halved (w = u'/2) in every step form, so that the pair update
    # needs no 2q; the second sums (x_(t+1) u_(t+2), x_(t+1) w_(t+2), x_(t+1) dy_(t+1)) are
    # folded into the accumulators once, after the walk.

    def load_fn(step, valid):
      return load_row("dy", step, valid), load_row("x", step, valid), load_keep(step, valid)

    def step_fn(carry, data, step, k):
      u, v, acc_a, acc_b, ctom, gpart, second = carry
      dy, x = data
      chains = [om * dy] + [None] * (n_chains - 1)
      nu, nv, na, nb = ([[], []] for _ in range(4))
      ng = [[] for _ in range(7)]
      for g in groups:
        ur, ui, vr, vi = u[0][g], u[1][g], v[0][g], v[1][g]
        if k is not None:
          ur, ui, vr, vi = k * ur, k * ui, k * vr, k * vi
        # u' = q u' + u uses u of the later step; then u = q u + dy.
        ir, ii = (0.5 * ur, 0.5 * ui) if pairs else (ur, ui)  # what enters u' (halved with pairs)
        vr, vi = (fma(qre[g], vr, fma(-qim[g], vi, ir)), fma(qre[g], vi, fma(qim[g], vr, ii)))
        ur, ui = _fwd_update(ur, ui, dy, None, qre[g], qim[g], fma)
        _chain_add(chains, g,
                   lambda acc, ur=ur, ui=ui, g=g: _fwd_output(acc, ur, ui, cre[g], cim[g], fma))
        for out, value in zip((nu[0], nu[1], nv[0], nv[1]), (ur, ui, vr, vi)):
          out.append(value)
        na[0].append(fma(x, ur, acc_a[0][g]))
        na[1].append(fma(x, ui, acc_a[1][g]))
        nb[0].append(fma(x, vr, acc_b[0][g]))
        nb[1].append(fma(x, vi, acc_b[1][g]))
        if spec.has_g:
          # E-form: e = q g_{t+1} and f = q g'_{t+1} + g_{t+1}, so g_t = k e and g'_t = k f.
          er, ei, fr, fi, acc_p, acc_gr, acc_gi = (part[g] for part in gpart)
          gr, gi, hr, hi = (er, ei, fr, fi) if k is None else (k * er, k * ei, k * fr, k * fi)
          _chain_add(chains, g, lambda acc, gr=gr, g=g: pp[g] * gr if acc is None else fma(pp[g], gr, acc))
          for out, value in zip(ng, (fma(-qim[g], gi, qre[g] * gr), fma(qim[g], gr, qre[g] * gi),
                                     fma(qre[g], hr, fma(-qim[g], hi, gr)),
                                     fma(qre[g], hi, fma(qim[g], hr, gi)),
                                     fma(x, gr, acc_p), fma(x, hr, acc_gr), fma(x, hi, acc_gi))):
            out.append(value)
      store_row("dx", step, chains)
      return nu, nv, na, nb, fma(dy, x, ctom), ng if spec.has_g else gpart, second

    block_fn, block = None, 1
    if pairs:
      block = 2
      q2re, q2im, cqre, cqim = coef("q2re"), coef("q2im"), coef("cqre"), coef("cqim")
      omk = om + lane_coef("k0")  # dx_(t+1)'s direct term: (omega + the lane's sum of Re(c)) dy

      def block_fn(carry, datas, step):
        u, w, acc_a, acc_b, ctom, gpart, (a1, b1, s1) = carry
        (dy1, x1), (dy0, x0) = datas  # the walk is reversed: the later step (t + 1) comes first
        later = [omk * dy1] + [None] * (n_chains - 1)
        earlier = [om * dy0] + [None] * (n_chains - 1)
        half_dy1 = 0.5 * dy1
        nu, nw, na, nb, na1, nb1 = ([[], []] for _ in range(6))
        for g in groups:
          ur, ui, wr, wi = u[0][g], u[1][g], w[0][g], w[1][g]  # u_(t+2), u'_(t+2) / 2
          # dx_(t+1) = Re(c q u_(t+2)) + Re(c) dy_(t+1): no need for u_(t+1) itself.
          _chain_add(later, g,
                     lambda acc, ur=ur, ui=ui, g=g: _fwd_output(acc, ur, ui, cqre[g], cqim[g], fma))
          # u_t = q^2 u_(t+2) + q dy_(t+1) + dy_t
          nur = fma(q2re[g], ur, fma(-q2im[g], ui, fma(qre[g], dy1, dy0)))
          nui = fma(q2im[g], ur, fma(q2re[g], ui, qim[g] * dy1))
          _chain_add(earlier, g,
                     lambda acc, nur=nur, nui=nui, g=g: _fwd_output(acc, nur, nui, cre[g], cim[g], fma))
          # u'_t / 2 = q^2 u'_(t+2) / 2 + q u_(t+2) + dy_(t+1) / 2
          nwr = fma(q2re[g], wr, fma(-q2im[g], wi, fma(qre[g], ur, fma(-qim[g], ui, half_dy1))))
          nwi = fma(q2im[g], wr, fma(q2re[g], wi, fma(qre[g], ui, qim[g] * ur)))
          for out, value in zip(
              (nu[0], nu[1], nw[0], nw[1], na[0], na[1], nb[0], nb[1], na1[0], na1[1], nb1[0], nb1[1]),
              (nur, nui, nwr, nwi, fma(x0, nur, acc_a[0][g]), fma(x0, nui, acc_a[1][g]),
               fma(x0, nwr, acc_b[0][g]), fma(x0, nwi, acc_b[1][g]), fma(x1, ur, a1[0][g]),
               fma(x1, ui, a1[1][g]), fma(x1, wr, b1[0][g]), fma(x1, wi, b1[1][g]))):
            out.append(value)
        store_row("dx", step, later)
        store_row("dx", step + 1, earlier)
        ctom = fma(dy0, x0, fma(dy1, x1, ctom))
        return nu, nw, na, nb, ctom, gpart, (na1, nb1, fma(dy1, x1, s1))

    u0 = [state_in("u0re"), state_in("u0im")]
    gpart = []
    if spec.has_g:
      gpart = [[plgpu.load(r[n].at[b, c, g, flat], mask=lmask, other=0.0) for g in groups]
               for n in ("e0re", "e0im")] + [zeros() for _ in range(5)]
    second = ([zeros(), zeros()], [zeros(), zeros()], jnp.zeros((lanes,), jnp.float32)) if pairs else ()
    carry = (u0, [zeros(), zeros()], [zeros(), zeros()], [zeros(), zeros()],
             jnp.zeros((lanes,), jnp.float32), gpart, second)
    u, v, acc_a, acc_b, ctom, gpart, second = _run_tiles(spec, n_steps, carry, load_fn, step_fn,
                                                         block_fn, block)
    if pairs:
      # sum_t x_t u_t = A + q A1 + S1 and sum_t x_t u'_t = 2 (B + q B1) + A1 (B, B1 in halves).
      (a1r, a1i), (b1r, b1i), s1 = second
      acc_a = ([fma(qre[g], a1r[g], fma(-qim[g], a1i[g], acc_a[0][g] + s1)) for g in groups],
               [fma(qre[g], a1i[g], fma(qim[g], a1r[g], acc_a[1][g])) for g in groups])
      acc_b = ([2.0 * fma(qre[g], b1r[g], fma(-qim[g], b1i[g], acc_b[0][g])) + a1r[g] for g in groups],
               [2.0 * fma(qre[g], b1i[g], fma(qim[g], b1r[g], acc_b[1][g])) + a1i[g] for g in groups])
      v = ([2.0 * value for value in v[0]], [2.0 * value for value in v[1]])
    for name, values in (("ure", u[0]), ("uim", u[1]), ("vre", v[0]), ("vim", v[1]),
                         ("are", acc_a[0]), ("aim", acc_a[1]), ("bre", acc_b[0]),
                         ("bim", acc_b[1])):
      state_out(name, values)
    plgpu.store(r["ctom"].at[b, c, flat], ctom, mask=lmask)
    if spec.has_g:
      for name, values in zip(("egre", "egim", "fgre", "fgim", "pg", "bgre", "bgim"), gpart):
        state_out(name, values)
  else:
    raise ValueError(f"unknown scan mode {spec.mode!r}")


def _launch(spec: _ScanSpec, batch: int, num_chunks: int, inputs: dict[str, Array],
            out_shapes: dict[str, jax.ShapeDtypeStruct], *, interpret: bool, num_warps: int,
            name: str) -> dict[str, Array]:
  """Runs _gpu_scan_kernel over the grid (batch, channel blocks, chunks)."""
  grid = (batch, pl.cdiv(spec.dim, spec.block_d), num_chunks)
  spec = dataclasses.replace(spec, batch=batch)
  outs = pl.pallas_call(
      functools.partial(_gpu_scan_kernel, spec=spec),
      out_shape=tuple(out_shapes[n] for n in spec.out_names),
      grid=grid,
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      name=name,
  )(*(inputs[n] for n in spec.in_names))
  return dict(zip(spec.out_names, outs))


# ----------------------------------------------------------------------------------------------
# GPU pass orchestration: chunk plan, combines across chunks, cotangent assembly.
# ----------------------------------------------------------------------------------------------

class _Plan(NamedTuple):
  chunk: int   # steps per chunk (all but the last)
  count: int   # number of chunks
  last: int    # steps of the last chunk (1..chunk)


def _plan(length: int, cfg: CemaKernelConfig) -> _Plan:
  """Chunks of whole tiles (except possibly the last), at least one tile each."""
  tile = max(cfg.block_t, 1)
  count = max(1, min(cfg.num_chunks, length // tile))
  if count == 1:
    return _Plan(length, 1, length)
  chunk = pl.cdiv(pl.cdiv(length, count), tile) * tile
  count = pl.cdiv(length, chunk)
  return _Plan(chunk, count, length - (count - 1) * chunk)


def _power_exponents(cfg: CemaKernelConfig, plan: _Plan) -> tuple[int, ...]:
  """The exponents of the ONE power table the GPU passes share (_power_table), in its row order.

  Rows 0 .. S - 1: q^1 .. q^S for the blocked chunk summaries of both passes (the summary kernels
  read those rows); then, unless already there, q^chunk (the decay across a chunk, for the
  combines and the backward's totals), q^last (the shorter last chunk's, for the backward's g
  walk) and q^2 (fwd_pairs, bwd_pairs); with
  summary_mma on a plan it can take, q^1 .. q^16 after the summary rows. The forward computes it
  once and hands it to the backward as a residual; empty: no table.
  """
  exps = []
  if plan.count > 1:
    if cfg.summary_block > 1:
      exps += range(1, cfg.summary_block + 1)
    if _mma_plan(cfg, plan):
      exps += range(1, cema_summary_mma.STEP + 1)
    exps += [plan.chunk, plan.last]
  if cfg.fwd_pairs or cfg.bwd_pairs:
    exps.append(2)
  return tuple(dict.fromkeys(exps))  # first occurrences, in order


def _table_power(table: tuple[Array, Array], exps: tuple[int, ...], exponent: int,
                 shape: tuple[int, ...]) -> Array:
  """q^exponent [*shape] complex64 from the power table's planes (exps: its _power_exponents)."""
  row = exps.index(exponent)
  return lax.complex(table[0][row], table[1][row]).reshape(shape)


class _Residuals(NamedTuple):
  """What the GPU backward takes from the GPU forward besides the inputs (custom-VJP residuals).

  local: the forward's chunk summaries of chunks 0 .. C - 2 (_summary_chunks): lane planes (re,
    im) [B, C - 1, N / S, D * S] f32 with pallas_combine (S = summary_split or split), else
    [B, C - 1, D, N] c64; None for one chunk.
  powers: the power table (re, im) [E, D * N] f32, row i = q^(_power_exponents(cfg, plan)[i]);
    None when that is empty. The backward's summaries read q^1 .. q^S from it, its combines and
    totals the decays, so the backward launches no power kernel.
  """
  local: tuple[Array, Array] | Array | None
  powers: tuple[Array, Array] | None


class _Flags(NamedTuple):
  """Per-chunk reset bookkeeping, all [B, C] float32 (1 = no reset) or None without segments."""
  fwd: Array | None    # prod_{t in c} k_t: the state entering chunk c survives it (forward)
  bwd: Array | None    # prod_{t in c} k_{t+1}: the same for the reverse scan (k_L = 1)
  after: Array | None  # k at the first step after chunk c (1 for the last chunk)


def _reverse_keep(keep: Array) -> Array:
  """[B, L] k_t -> k_{t+1} (k_L = 1): the flag the reverse scan applies at time t."""
  return jnp.concatenate([keep[:, 1:], jnp.ones((keep.shape[0], 1), keep.dtype)], axis=1)


def _chunk_flags(keep: Array | None, plan: _Plan) -> _Flags:
  if keep is None:
    return _Flags(None, None, None)
  batch, length = keep.shape
  pad = plan.chunk * plan.count - length

  def per_chunk(flags):
    flags = jnp.pad(flags, ((0, 0), (0, pad)), constant_values=1.0)
    return jnp.prod(flags.reshape(batch, plan.count, plan.chunk), axis=-1)

  after = jnp.concatenate([keep[:, plan.chunk::plan.chunk][:, :plan.count - 1],
                           jnp.ones((batch, 1), keep.dtype)], axis=1)
  return _Flags(per_chunk(keep), per_chunk(_reverse_keep(keep)), after)


def _times(flag: Array | None, c: int, value: Array) -> Array:
  """value [B, D, N] times the [B] flags of chunk c (no-op without segments)."""
  return value if flag is None else flag[:, c, None, None] * value


def _split_complex(a: Array) -> tuple[Array, Array]:
  return jnp.real(a).astype(jnp.float32), jnp.imag(a).astype(jnp.float32)


def _folded_p(p: Array) -> Array:
  return jnp.maximum(p, _P_FLOOR)


def _lane_planes(a: Array, split: int) -> tuple[Array, Array]:
  """[..., D, N] complex -> two [..., G, D * split] float32 lane planes."""
  return _split_complex(_to_lanes(a, split))


def _natural(out: dict[str, Array], re: str, im: str, dim: int, split: int) -> Array:
  """Kernel lane planes [B, C, G, DS] -> [B, C, D, N] complex64."""
  return _from_lanes(lax.complex(out[re], out[im]), dim, split)


def _summary_chunks(plan: _Plan, reverse: bool, all_chunks: bool = False) -> tuple[int, int]:
  """(first, count): the chunks first .. first + count - 1 whose summaries are computed.

  The combine over chunks carries a state across every chunk but the one its walk ends on, so
  that chunk's summary is never read: the forward's last chunk (its final state comes from the
  main scan; the backward's lagged correction multiplies it by the lagged sum entering the last
  chunk, which is zero) and the backward's first (u entering chunk 0 is all the scan needs; the
  h0 and g terms come from the scan's own outputs). So C - 1 chunks: 0 .. C - 2 forward, 1 .. C - 1
  in reverse. all_chunks: every chunk (for tests and probes).
  """
  if all_chunks or plan.count == 1:
    return 0, plan.count
  return int(reverse), plan.count - 1


def _chunk_summaries(x: Array, keep: Array | None, q: Array, cfg: CemaKernelConfig, plan: _Plan,
                     *, reverse: bool, split: int, block_d: int, num_warps: int, interpret: bool,
                     name: str, all_chunks: bool = False,
                     powers: tuple[Array, Array] | None = None) -> Array:
  """The chunks' final states of s = k q s + x from a zero start (mode "local").

  x: [B, L, D] (the forward's x, or the backward's dy with reverse=True and keep holding the
  reverse scan's flags); q: [D, N] c64.  split / block_d / num_warps: the tiling of the pass it
  serves, replaced by CemaKernelConfig.summary_split when that is set. powers: a power table
  (_power_table) whose rows 0 .. S - 1 hold q^1 .. q^S, for summary_block S > 1 (None: its own).
  Returns [B, C', D, N] complex64: slot i holds chunk first + i of _summary_chunks (C' = C - 1
  chunks, the ones a combine reads; with all_chunks every chunk).
  """
  (re, im), split = _chunk_summary_planes(x, keep, q, cfg, plan, reverse=reverse, split=split,
                                          block_d=block_d, num_warps=num_warps,
                                          interpret=interpret, name=name, all_chunks=all_chunks,
                                          powers=powers)
  return _natural({"fre": re, "fim": im}, "fre", "fim", x.shape[2], split)


def _mma_plan(cfg: CemaKernelConfig, plan: _Plan) -> bool:
  """Whether the chunk plan fits the forward's mma summaries (the inputs are checked at the call)."""
  return (cfg.summary_mma and plan.count % cema_summary_mma.CHUNKS == 0 and plan.last == plan.chunk
          and plan.chunk % cema_summary_mma.STEP == 0)


def _mma_summary_planes(x: Array, q: Array, cfg: CemaKernelConfig, plan: _Plan,
                        powers: tuple[Array, Array], first: int, count: int,
                        interpret: bool) -> tuple[Array, Array]:
  """The forward's summaries of chunks first .. first + count - 1 by cema_summary_mma, in the FMA
  kernel's lane planes at one lane per channel: (re, im) [B, count, N, D] f32."""
  dim, ndim = q.shape
  exps = _power_exponents(cfg, plan)
  rows = [exps.index(e) for e in range(1, cema_summary_mma.STEP + 1)]
  ones = jnp.ones((1, dim, ndim), jnp.float32)
  p_re = jnp.concatenate([ones, powers[0][jnp.asarray(rows)].reshape(-1, dim, ndim)])  # [17, D, N]
  p_im = jnp.concatenate([0 * ones, powers[1][jnp.asarray(rows)].reshape(-1, dim, ndim)])
  re, im = cema_summary_mma.summary_planes(x, *cema_summary_mma.fragment_tables(p_re, p_im),
                                           interpret=interpret, chunks=plan.count)
  return re[:, first:first + count], im[:, first:first + count]


def _chunk_summary_planes(x: Array, keep: Array | None, q: Array, cfg: CemaKernelConfig,
                          plan: _Plan, *, reverse: bool, split: int, block_d: int, num_warps: int,
                          interpret: bool, name: str, all_chunks: bool = False,
                          powers: tuple[Array, Array] | None = None) -> tuple[tuple[Array, Array], int]:
  """_chunk_summaries in the kernel's lane layout: ((re, im) [B, C', G, D * S'] f32, S')."""
  batch, length, dim = x.shape
  ndim = q.shape[1]
  if (not reverse and powers is not None and _mma_plan(cfg, plan)
      and cema_summary_mma.supported(x, ndim, plan.count, plan.chunk, plan.last, keep is not None)
      and cema_summary_mma.use_mma_summaries()):
    first, count = _summary_chunks(plan, reverse, all_chunks)
    return _mma_summary_planes(x, q, cfg, plan, powers, first, count, interpret), 1
  if cfg.summary_split:
    lanes = block_d * split
    split = cfg.summary_split
    block_d = max(1, lanes // split)
  groups = ndim // split
  block = cfg.summary_block if cfg.summary_block > 1 else 0
  inputs = {"x": x}
  if keep is not None:
    inputs["keep"] = keep
  inputs["qre"], inputs["qim"] = _lane_planes(q, split)
  if block:
    if powers is None:
      powers = _power_table(q, tuple(range(1, block + 1)), cfg, interpret)
    # Rows 0 .. S - 1 of the table: q^1 .. q^S as [S, D, N].
    powers = lax.complex(powers[0][:block], powers[1][:block]).reshape(block, dim, ndim)
    inputs["pwre"], inputs["pwim"] = _lane_planes(powers, split)
  first, count = _summary_chunks(plan, reverse, all_chunks)
  spec = _ScanSpec(mode="local", reverse=reverse, has_init=False, has_keep=keep is not None,
                   has_g=False, reset_branch=cfg.reset_branch, length=length, dim=dim,
                   groups=groups, split=split, block_d=block_d,
                   block_t=cfg.summary_block_t or cfg.block_t,
                   chunk=plan.chunk, ptx_fma=cfg.ptx_fma and not interpret, ptx_shuffle=False,
                   in_names=tuple(inputs), out_names=("fre", "fim"), summary_block=block,
                   bounded_offsets=cfg.bounded_offsets, chunk_offset=first)
  state = jax.ShapeDtypeStruct((batch, count, groups, dim * split), jnp.float32)
  out = _launch(spec, batch, count, inputs, {"fre": state, "fim": state},
                interpret=interpret, num_warps=num_warps, name=name)
  return (out["fre"], out["fim"]), split


@dataclasses.dataclass(frozen=True)
class _CombineSpec:
  """Static description of one _combine_states launch (see there)."""
  count: int        # C chunks
  dim: int          # D
  ndim: int         # N
  in_split: int     # lanes per channel of the summary planes
  out_split: int    # lanes per channel of the starting-state planes
  block: int        # state entries per program
  reverse: bool     # walk the chunks from the last to the first
  has_local: bool   # chunk summaries present (else a pure decay of the start), C - 1 of them
  has_flags: bool   # per-chunk survival flags present
  has_start: bool   # the first chunk's state is given (else zero)
  first_decay: bool  # the first carry of the walk has its own decay (a shorter last chunk)


def _combine_kernel(*refs, spec: _CombineSpec):
  """One program: batch b, a block of `spec.block` entries of the output lane layout.

  Walks the chunks in order (reversed for the backward), cur <- flag_c (decay cur) + local_c,
  storing cur as the state entering the next chunk. Entries are independent, so a program may
  hold any subset; it takes a contiguous range of the OUTPUT layout so that the stores (C of them
  per entry) are coalesced, and gathers the summaries from their own layout when the splits differ.
  """
  names = ((("lre", "lim") if spec.has_local else ()) + ("decre", "decim")
           + (("fdre", "fdim") if spec.first_decay else ())
           + (("flags",) if spec.has_flags else ()) + (("hre", "him") if spec.has_start else ())
           + ("ore", "oim"))
  r = dict(zip(names, refs))
  b, blk = pl.program_id(0), pl.program_id(1)
  dim, ndim, s_in, s_out = spec.dim, spec.ndim, spec.in_split, spec.out_split
  out_pos = blk * spec.block + jnp.arange(spec.block, dtype=jnp.int32)
  mask = out_pos < dim * ndim
  # Output lane layout [G_out, D * S_out]: (g, d * S_out + j) holds order n = g * S_out + j.
  d = (out_pos % (dim * s_out)) // s_out
  n = (out_pos // (dim * s_out)) * s_out + out_pos % s_out
  in_pos = (n // s_in) * (dim * s_in) + d * s_in + n % s_in
  natural = d * ndim + n

  def natural_plane(name):
    return plgpu.load(r[name].at[natural], mask=mask, other=0.0)

  decay = natural_plane("decre"), natural_plane("decim")
  if spec.has_start:
    cur = (plgpu.load(r["hre"].at[b, natural], mask=mask, other=0.0),
           plgpu.load(r["him"].at[b, natural], mask=mask, other=0.0))
  else:
    cur = (jnp.zeros((spec.block,), jnp.float32), jnp.zeros((spec.block,), jnp.float32))
  # The walk is a dependent chain of C short steps: its loads (which do not depend on it) all go
  # out first, so the chain waits for one memory latency rather than one per chunk. C <= 64, so
  # the static unroll stays small; a program holds one entry per thread (see _combine_states).
  # Chunk indices are traced scalars: plgpu.load/store take no Python int next to a traced index.
  order = list(range(spec.count))[::-1] if spec.reverse else list(range(spec.count))
  index = {c: jnp.int32(c) for c in order}
  walk = order[:-1]  # the chunks carried across, in walk order
  flags = [plgpu.load(r["flags"].at[b, index[c]]) for c in walk] if spec.has_flags else None
  # The summaries hold the walked chunks only (_summary_chunks): chunk c at slot c, or c - 1 in
  # reverse (the walk ends on chunk 0, which has none).
  slot = {c: jnp.int32(c - 1 if spec.reverse else c) for c in walk}
  local = ([(plgpu.load(r["lre"].at[b, slot[c], in_pos], mask=mask, other=0.0),
             plgpu.load(r["lim"].at[b, slot[c], in_pos], mask=mask, other=0.0)) for c in walk]
           if spec.has_local else None)
  decays = [decay] * len(walk)
  if spec.first_decay and walk:
    decays[0] = natural_plane("fdre"), natural_plane("fdim")

  def store(c, value):
    plgpu.store(r["ore"].at[b, index[c], out_pos], value[0], mask=mask)
    plgpu.store(r["oim"].at[b, index[c], out_pos], value[1], mask=mask)

  store(order[0], cur)
  for i, c in enumerate(walk):
    (cr, ci), (dr, di) = cur, decays[i]
    # As the XLA loop: decay * cur (complex), then the flag, then + local.
    nr = dr * cr - di * ci
    ni = dr * ci + di * cr
    if flags is not None:
      nr, ni = flags[i] * nr, flags[i] * ni
    if local is not None:
      nr, ni = nr + local[i][0], ni + local[i][1]
    cur = nr, ni
    store(order[i + 1], cur)


def _combine_states(local: tuple[Array, Array] | None, in_split: int, decay: Array,
                    flags: Array | None, start: Array | None, out_split: int, *, batch: int,
                    count: int, reverse: bool, interpret: bool, first_decay: Array | None = None,
                    block: int = 128, num_warps: int = 4) -> tuple[Array, Array]:
  """The state entering every chunk, from the chunk summaries, as one Pallas kernel.

  local: lane planes [B, C - 1, N / in_split, D * in_split] f32 (re, im) of the final states from
  a zero start of the chunks the walk carries across (_summary_chunks: slot c holds chunk c, or
  c + 1 with reverse), or None (zeros); decay: [D, N] c64, the decay across one chunk; flags:
  [B, C] f32 (chunk c's survival flag, applied to the state carried across it) or None; start:
  [B, D, N] c64 or None (zero), the state entering the first chunk of the walk; first_decay:
  [D, N] c64 or None, the decay across the first chunk of the walk when it differs.
  With F_c chunk c's summary (local[:, c] forward, local[:, c - 1] reverse):
  Forward: out[0] = start, out[c + 1] = flags[c] (decay out[c]) + F_c.
  reverse: out[C - 1] = start, out[c - 1] = flags[c] (decay out[c]) + F_c.
  Returns lane planes [B, C, N / out_split, D * out_split] f32 (re, im).
  block = 32 num_warps: one entry per thread, so the C prefetched summaries (2 C registers) fit
  for any C <= _MAX_CHUNKS, and B D N / 128 programs (512 at D = 4096, N = 16) spread the
  latency-bound walk over the whole GPU.
  """
  dim, ndim = decay.shape
  size = dim * ndim
  block = min(block, pl.next_power_of_2(size))
  spec = _CombineSpec(count=count, dim=dim, ndim=ndim, in_split=in_split, out_split=out_split,
                      block=block, reverse=reverse, has_local=local is not None,
                      has_flags=flags is not None, has_start=start is not None,
                      first_decay=first_decay is not None)
  if local is not None and local[0].shape[:2] != (batch, count - 1):
    raise ValueError(f"combine: summaries of {count - 1} chunks expected; got shape {local[0].shape}.")
  inputs = [] if local is None else [a.reshape(batch, count - 1, size) for a in local]
  inputs += list(_split_complex(decay.reshape(-1)))
  if first_decay is not None:
    inputs += list(_split_complex(first_decay.reshape(-1)))
  if flags is not None:
    inputs.append(flags.astype(jnp.float32))
  if start is not None:
    inputs += list(_split_complex(start.reshape(batch, size)))
  plane = jax.ShapeDtypeStruct((batch, count, size), jnp.float32)
  kwargs = {} if interpret else {
      "compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=1)}
  ore, oim = pl.pallas_call(
      functools.partial(_combine_kernel, spec=spec), out_shape=(plane, plane),
      grid=(batch, pl.cdiv(size, block)), interpret=interpret, name="cema_combine", **kwargs,
  )(*inputs)
  shape = (batch, count, ndim // out_split, dim * out_split)
  return ore.reshape(shape), oim.reshape(shape)


@dataclasses.dataclass(frozen=True)
class _TotalsSpec:
  """Static description of one _backward_totals launch (see there)."""
  batch: int        # B
  count: int        # C chunks
  dim: int          # D
  ndim: int         # N
  split: int        # lanes per channel of the backward scan's planes
  local_split: int  # lanes per channel of the forward's chunk-local states (count > 1)
  block: int        # entries of the scan's lane layout per program
  prefetch: int     # chunks whose loads are issued together before their arithmetic
  has_g: bool       # the g part of the adjoint (ct(h_last) given)
  has_h0: bool      # per-batch firsts (u_0, lagged finals, q g_0) for the h0 terms and ct_h0
  has_flags: bool   # segment resets (per-chunk flags)
  in_names: tuple[str, ...]
  out_names: tuple[str, ...]


def _totals_kernel(*refs, spec: _TotalsSpec):
  """One program: a block of `spec.block` entries (d, n) of the backward scan's lane layout.

  Reads every chunk's outputs of the backward scan for those entries and writes, in natural
  [D * N] order, the totals _gpu_backward's cotangents need (see _backward_totals). The batch is
  walked inside the program (a sum over it), so the grid covers the channels only.
  """
  r = dict(zip(spec.in_names + spec.out_names, refs))
  blk = pl.program_id(0)
  dim, ndim, s, s_loc, count = spec.dim, spec.ndim, spec.split, spec.local_split, spec.count
  row = dim * s
  pos = blk * spec.block + jnp.arange(spec.block, dtype=jnp.int32)
  mask = pos < dim * ndim
  # Scan lane layout [G, D * S]: (g, d * S + j) holds order n = g * S + j of channel d.
  lane = pos % row
  d = lane // s
  n = (pos // row) * s + lane % s
  # Masked-off entries (past D N) keep their own out-of-range position rather than one that
  # aliases a real entry (the interpreter's masked stores write back what they read).
  natural = jnp.where(mask, d * ndim + n, pos)
  local_pos = (n // s_loc) * (dim * s_loc) + d * s_loc + n % s_loc
  # ct_omega: the scan's per-lane sum of dy x [B, C, D * S], read by the programs of group 0;
  # it leaves at natural (d, n) like the rest (column n = 0 is the first lane of channel d), as a
  # masked store to a [D] vector would share addresses between masked-off lanes.
  om_mask = pos < row
  index = [jnp.int32(c) for c in range(count)]  # traced chunk indices (see _combine_kernel)
  zero = jnp.zeros((spec.block,), jnp.float32)

  def load(name, b, c, at=pos, m=mask):
    return plgpu.load(r[name].at[b, index[c], at], mask=m, other=0.0)

  def pair(prefix, b, c, at=pos):
    return load(prefix + "re", b, c, at), load(prefix + "im", b, c, at)

  def cmul(a, z):
    # As XLA's complex product, in the combine kernel's operand order.
    return a[0] * z[0] - a[1] * z[1], a[0] * z[1] + a[1] * z[0]

  def cadd(a, z):
    return a[0] + z[0], a[1] + z[1]

  def groups(order):
    return [order[i:i + spec.prefetch] for i in range(0, len(order), spec.prefetch)]

  def chunk_sums(b, names):
    """sum over chunks c = 0, 1, ... (ascending, as a sequential reduce) of each named plane."""
    sums = {name: None for name in names}
    for group in groups(list(range(count))):
      data = {c: {name: load(name, b, c, m=om_mask if name == "ctom" else mask) for name in names}
              for c in group}
      for c in group:
        for name in names:
          sums[name] = data[c][name] if sums[name] is None else sums[name] + data[c][name]
    return sums

  def lagged(b, prefix, decay, flags, after):
    """The lagged walk of _gpu_backward.lagged: (final, correction) for one batch row."""
    cur = corr = None  # cur: the lagged sum entering chunk c (None: zero, at the last chunk)
    # The forward's summaries stop at chunk C - 2 (slot c = chunk c): the last chunk's would be
    # multiplied by the zero lagged sum entering it.
    for group in groups(list(range(count - 1, -1, -1))):
      data = {c: (pair(prefix, b, c), pair("l", b, c, local_pos) if c < count - 1 else None)
              for c in group}
      for c in group:
        kernel_final, local = data[c]
        if cur is not None:
          carried = cur if after is None else (after[c] * cur[0], after[c] * cur[1])
          term = cmul(carried, local)
          corr = term if corr is None else cadd(corr, term)
        # Chunk c's own lagged sum plus the decayed, flagged one entering it from later chunks.
        carried = None if cur is None else cmul(decay, cur)
        if carried is not None and flags is not None:
          carried = flags[c] * carried[0], flags[c] * carried[1]
        cur = kernel_final if carried is None else cadd(carried, kernel_final)
    return cur, corr

  walk = count > 1
  if walk:
    decay = tuple(plgpu.load(r[name].at[natural], mask=mask, other=0.0)
                  for name in ("decre", "decim"))
    q = tuple(plgpu.load(r[name].at[natural], mask=mask, other=0.0) for name in ("qre", "qim"))
  sum_names = ("are", "aim", "bre", "bim", "ctom") + (("pg", "bgre", "bgim") if spec.has_g else ())

  def per_batch(b, totals):
    sums = chunk_sums(b, sum_names)
    flags = after = None
    if walk and spec.has_flags:
      flags = [plgpu.load(r["flags"].at[b, index[c]]) for c in range(count)]
      after = [plgpu.load(r["after"].at[b, index[c]]) for c in range(count)]
    acc_a = sums["are"], sums["aim"]
    acc_b = sums["bre"], sums["bim"]
    if walk:
      v_final, v_corr = lagged(b, "v", decay, flags, after)
      acc_b = cadd(acc_b, cmul(q, v_corr))       # X_c = q F_c for u'
    elif spec.has_h0:
      v_final = pair("v", b, 0)
    parts = [acc_a, acc_b, (sums["ctom"],)]
    firsts = []
    if spec.has_h0:
      firsts += [pair("u", b, 0), v_final]
    if spec.has_g:
      acc_bg = sums["bgre"], sums["bgim"]
      if walk:
        f_final, f_corr = lagged(b, "fg", decay, flags, after)
        acc_bg = cadd(acc_bg, f_corr)              # X_c = F_c in E-form
      elif spec.has_h0:
        f_final = pair("fg", b, 0)
      parts += [(sums["pg"],), acc_bg]
      if spec.has_h0:
        firsts += [pair("eg", b, 0), f_final]
    # Per-batch values leave as they are; the rest is summed over the batch (b ascending).
    names = iter(spec.out_names[len(totals):])
    for value in firsts:
      for v in value:
        plgpu.store(r[next(names)].at[b, natural], v, mask=mask)
    flat = [v for value in parts for v in value]
    return tuple(t + v for t, v in zip(totals, flat))

  n_totals = 5 + (3 if spec.has_g else 0)
  totals = tuple(zero for _ in range(n_totals))
  if spec.batch == 1:
    totals = per_batch(jnp.int32(0), totals)
  else:
    totals = lax.fori_loop(0, spec.batch, per_batch, totals)
  for name, value in zip(spec.out_names[:n_totals], totals):
    plgpu.store(r[name].at[natural], value, mask=mask)


def _backward_totals(out: dict[str, Array], local: tuple[Array, Array] | None, local_split: int,
                     decay: Array | None, q: Array, flags: _Flags, *, batch: int, count: int,
                     dim: int, split: int, has_g: bool, has_h0: bool, interpret: bool,
                     block: int = 128, num_warps: int = 4, prefetch: int = 8) -> dict[str, Array]:
  """Everything _gpu_backward needs from the backward scan's per-chunk outputs, as one kernel.

  out: the scan's planes [B, C, N / split, D * split] f32 (ure .. bim, the g ones) and ctom
  [B, C, D * split]; local: the forward's chunk-local states of chunks 0 .. C - 2 (its summaries,
  _summary_chunks) as lane planes [B, C - 1, N / local_split, D * local_split] f32 (re, im),
  decay: [D, N] c64 (both None for one chunk); q: [D, N] c64.
  Returns natural-layout totals (XLA's order of operations per chunk step; sums over chunks and
  batch ascending, the lagged correction in the walk's order, last chunk first, where XLA adds
  it first chunk first):
    acc_a [D, N] c64   sum_b sum_c A          acc_b  sum_b (sum_c B + q v_corr)
    ct_omega [D] f32   sum_b sum_c (dy x) on each channel's first lane
  with has_g:  pg [D, N] f32 sum_b sum_c,   acc_bg  sum_b (sum_c B_g + f_corr)
  with has_h0 ([B, D, N] c64): u_first, v_final, and with has_g q_g_first, f_final.
  v_final / v_corr (f_*: the same for g') are _gpu_backward's lagged walk over chunks.
  The grid covers D N / block programs (512 at D = 4096, N = 16 with block 128), each walking
  the batch; `prefetch` chunks' loads go out before their arithmetic (the walk is a dependent
  chain, so a group waits for one memory latency).
  """
  ndim = q.shape[1]
  size = dim * ndim
  block = min(block, pl.next_power_of_2(size))
  plane = lambda a: a.reshape(batch, count, -1)  # noqa: E731
  inputs = {n: plane(out[n]) for n in ("are", "aim", "bre", "bim", "ctom")}
  walk = count > 1
  if walk or has_h0:
    inputs.update({n: plane(out[n]) for n in ("vre", "vim")})
  if has_h0:
    inputs.update({n: plane(out[n]) for n in ("ure", "uim")})
  if has_g:
    inputs.update({n: plane(out[n]) for n in ("pg", "bgre", "bgim")})
    if walk or has_h0:
      inputs.update({n: plane(out[n]) for n in ("fgre", "fgim")})
    if has_h0:
      inputs.update({n: plane(out[n]) for n in ("egre", "egim")})
  if walk:
    if local[0].shape[:2] != (batch, count - 1):
      raise ValueError(f"totals: summaries of {count - 1} chunks expected; got shape {local[0].shape}.")
    inputs["lre"], inputs["lim"] = (a.reshape(batch, count - 1, -1) for a in local)
    inputs["decre"], inputs["decim"] = _split_complex(decay.reshape(-1))
    inputs["qre"], inputs["qim"] = _split_complex(q.reshape(-1))
    if flags.bwd is not None:
      inputs["flags"] = flags.bwd.astype(jnp.float32)
      inputs["after"] = flags.after.astype(jnp.float32)
  total = jax.ShapeDtypeStruct((size,), jnp.float32)
  first = jax.ShapeDtypeStruct((batch, size), jnp.float32)
  shapes = {"atre": total, "atim": total, "btre": total, "btim": total,
            "ctom_t": total}
  if has_g:
    shapes.update(pg_t=total, bgtre=total, bgtim=total)
  if has_h0:
    shapes.update(ufre=first, ufim=first, vfre=first, vfim=first)
    if has_g:
      shapes.update(qgre=first, qgim=first, ffre=first, ffim=first)
  spec = _TotalsSpec(batch=batch, count=count, dim=dim, ndim=ndim, split=split,
                     local_split=local_split, block=block, prefetch=prefetch, has_g=has_g,
                     has_h0=has_h0, has_flags=walk and flags.bwd is not None,
                     in_names=tuple(inputs), out_names=tuple(shapes))
  kwargs = {} if interpret else {
      "compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=1)}
  res = pl.pallas_call(
      functools.partial(_totals_kernel, spec=spec), out_shape=tuple(shapes.values()),
      grid=(pl.cdiv(size, block),), interpret=interpret, name="cema_bwd_totals", **kwargs,
  )(*inputs.values())
  res = dict(zip(shapes, res))

  def cplx(re, im, *lead):
    return lax.complex(res[re], res[im]).reshape(*lead, dim, ndim)

  totals = {"acc_a": cplx("atre", "atim"), "acc_b": cplx("btre", "btim"),
            "ct_omega": res["ctom_t"].reshape(dim, ndim)[:, 0]}
  if has_g:
    totals.update(pg=res["pg_t"].reshape(dim, ndim), acc_bg=cplx("bgtre", "bgtim"))
  if has_h0:
    totals.update(u_first=cplx("ufre", "ufim", batch), v_final=cplx("vfre", "vfim", batch))
    if has_g:
      totals.update(q_g_first=cplx("qgre", "qgim", batch), f_final=cplx("ffre", "ffim", batch))
  return totals


def _gpu_forward(x, keep, p, q, eta, omega, h0, cfg: CemaKernelConfig, interpret: bool):
  """Forward scan: y [B, L, D] f32, h_last [B, D, N] c64, and the backward's _Residuals (the
  chunk summaries of chunks 0 .. C - 2 and the power table)."""
  batch, length, dim = x.shape
  ndim = p.shape[1]
  plan = _plan(length, cfg)
  split = cfg.split
  groups = ndim // split
  pf = _folded_p(p)
  coefs = dict(zip(("qre", "qim"), _lane_planes(q, split)))
  keep_in = {} if keep is None else {"keep": keep}
  keep_names = tuple(keep_in)
  state = jax.ShapeDtypeStruct((batch, plan.count, groups, dim * split), jnp.float32)

  def spec(mode, has_init, in_names, out_names):
    return _ScanSpec(mode=mode, reverse=False, has_init=has_init, has_keep=keep is not None,
                     has_g=False, reset_branch=cfg.reset_branch, length=length, dim=dim,
                     groups=groups, split=split, block_d=cfg.block_d, block_t=cfg.block_t,
                     chunk=plan.chunk, in_names=in_names, out_names=out_names,
                     ptx_fma=cfg.ptx_fma and not interpret, sum_chains=cfg.sum_chains,
                     ptx_shuffle=_use_shuffle(cfg, split, cfg.block_d, cfg.num_warps, interpret),
                     pair_steps=cfg.fwd_pairs and mode == "fwd", bounded_offsets=cfg.bounded_offsets)

  start = None if h0 is None else h0 / pf[None]
  # Every power of q both passes use, in one kernel (the backward takes the table as a residual).
  exps = _power_exponents(cfg, plan)
  powers = _power_table(q, exps, cfg, interpret) if exps else None
  local = s0 = None  # s0: lane planes of the state entering each chunk (None: zeros)
  decay = _table_power(powers, exps, plan.chunk, (dim, ndim)) if plan.count > 1 else None
  if plan.count > 1 and cfg.pallas_combine:
    planes, local_split = _chunk_summary_planes(
        x, keep, q, cfg, plan, reverse=False, split=split, block_d=cfg.block_d,
        num_warps=cfg.num_warps, interpret=interpret, name="cema_fwd_chunk_states", powers=powers)
    s0 = _combine_states(planes, local_split, decay, _chunk_flags(keep, plan).fwd, start, split,
                         batch=batch, count=plan.count, reverse=False, interpret=interpret)
    # The backward's residual stays in the summary kernel's lane planes: the backward's totals
    # kernel reads them there (_backward_totals), with no layout conversion in between.
    local = planes
  elif plan.count > 1:
    local = _chunk_summaries(x, keep, q, cfg, plan, reverse=False, split=split,
                             block_d=cfg.block_d, num_warps=cfg.num_warps, interpret=interpret,
                             name="cema_fwd_chunk_states", powers=powers)
    flags = _chunk_flags(keep, plan)
    current = jnp.zeros_like(local[:, 0]) if start is None else start
    starts = [current]
    for c in range(plan.count - 1):
      current = _times(flags.fwd, c, decay * current) + local[:, c]
      starts.append(current)
    s0 = _lane_planes(jnp.stack(starts, axis=1), split)
  elif start is not None:
    s0 = _lane_planes(start[:, None], split)
  inputs = dict(x=x, **keep_in, **coefs)
  inputs["cre"], inputs["cim"] = _lane_planes(eta * pf, split)
  inputs["om"] = _lane_omega(omega, split)
  pair_names = ()
  if cfg.fwd_pairs:
    inputs["q2re"], inputs["q2im"] = _lane_planes(_table_power(powers, exps, 2, (dim, ndim)), split)
    inputs["cqre"], inputs["cqim"] = _lane_planes(eta * pf * q, split)
    inputs["k0"] = jnp.sum(inputs["cre"], axis=0)  # per lane: its orders' Re(c) summed
    pair_names = ("q2re", "q2im", "cqre", "cqim", "k0")
  init_names = ()
  if s0 is not None:
    inputs["s0re"], inputs["s0im"] = s0
    init_names = ("s0re", "s0im")
  names = ("x",) + keep_names + ("qre", "qim", "cre", "cim", "om") + pair_names + init_names
  out = _launch(spec("fwd", bool(init_names), names, ("y", "fre", "fim")), batch, plan.count,
                inputs, {"y": jax.ShapeDtypeStruct(x.shape, jnp.float32), "fre": state,
                         "fim": state},
                interpret=interpret, num_warps=cfg.num_warps, name="cema_fwd_scan")
  s_last = _from_lanes(lax.complex(out["fre"][:, -1], out["fim"][:, -1]), dim, split)
  return out["y"], pf * s_last, _Residuals(local=local, powers=powers)


def _gpu_backward(x, keep, p, q, eta, omega, h0, dy, g_last, res: _Residuals,
                  cfg: CemaKernelConfig, interpret: bool):
  """One reverse scan for every cotangent (module docstring).

  dy: [B, L, D] f32; g_last: [B, D, N] c64 or None (a symbolic zero); res: the forward's
  _Residuals (chunk summaries, power table).  Returns dx (x.dtype), ct_p [D, N], ct_q, ct_eta
  [D, N] c64, ct_omega [D], ct_h0 [B, D, N] c64 (None with pallas_combine and no h0: nothing
  reads it).
  """
  batch, length, dim = x.shape
  ndim = p.shape[1]
  plan = _plan(length, cfg)
  split = cfg.bwd_split
  groups = ndim // split
  has_g = g_last is not None
  keep_rev = None if keep is None else _reverse_keep(keep)
  keep_in = {} if keep is None else {"keep": keep_rev}
  keep_names = tuple(keep_in)
  flags = _chunk_flags(keep, plan)
  coefs = dict(zip(("qre", "qim"), _lane_planes(q, split)))
  state = jax.ShapeDtypeStruct((batch, plan.count, groups, dim * split), jnp.float32)
  last = plan.count - 1

  def spec(mode, has_init, in_names, out_names):
    return _ScanSpec(mode=mode, reverse=True, has_init=has_init, has_keep=keep is not None,
                     has_g=has_g and mode == "bwd", reset_branch=cfg.reset_branch,
                     length=length, dim=dim, groups=groups, split=split,
                     block_d=cfg.bwd_block_d, block_t=cfg.bwd_block_t or cfg.block_t, chunk=plan.chunk,
                     in_names=in_names, out_names=out_names, ptx_fma=cfg.ptx_fma and not interpret,
                     sum_chains=cfg.sum_chains,
                     ptx_shuffle=_use_shuffle(cfg, split, cfg.bwd_block_d, cfg.bwd_num_warps,
                                              interpret), bounded_offsets=cfg.bounded_offsets,
                     pair_steps=pairs and mode == "bwd")

  pairs = cfg.bwd_pairs and not has_g
  local, powers = res
  exps = _power_exponents(cfg, plan)  # the forward's table: no power kernel here
  decay = _table_power(powers, exps, plan.chunk, (dim, ndim)) if plan.count > 1 else None
  # Decay across chunk c (its own length), applied from the later chunk to the earlier one.
  decays = [decay] * plan.count
  if plan.count > 1 and has_g and plan.last != plan.chunk:
    decays[last] = _table_power(powers, exps, plan.last, (dim, ndim))

  def run_back(incoming, part_of, flag):
    """in[c - 1] = flag_c decay_c in[c] + part_of(c) from in[last]; returns in[0..last].

    part_of(c): chunk c's own part [B, D, N] (asked for c = last .. 1 only), or None for none."""
    values = [None] * plan.count
    values[last] = incoming
    for c in range(last, 0, -1):
      carried = None if values[c] is None else _times(flag, c, decays[c] * values[c])
      part = part_of(c)
      values[c - 1] = part if carried is None else (carried if part is None else carried + part)
    return values

  inputs = dict(dy=dy, x=x, **keep_in, **coefs)
  init_names = ()
  u_in = [None] * plan.count
  if plan.count > 1:
    # The chunk summaries leave the kernel in natural layout, so their tiling is free
    # (CemaKernelConfig.bwd_summary_tiling).
    forward_tiling = cfg.bwd_summary_tiling == "forward"
    summary_args = dict(reverse=True, split=cfg.split if forward_tiling else split,
                        block_d=cfg.block_d if forward_tiling else cfg.bwd_block_d,
                        num_warps=cfg.num_warps if forward_tiling else cfg.bwd_num_warps,
                        interpret=interpret, name="cema_bwd_chunk_states", powers=powers)
    if cfg.pallas_combine:
      # u entering the last chunk is zero, so its decay (decays[last]) never enters.
      planes, summary_split = _chunk_summary_planes(dy, keep_rev, q, cfg, plan, **summary_args)
      inputs["u0re"], inputs["u0im"] = _combine_states(
          planes, summary_split, decay, flags.bwd, None, split, batch=batch, count=plan.count,
          reverse=True, interpret=interpret)
    else:
      summaries = _chunk_summaries(dy, keep_rev, q, cfg, plan, **summary_args)
      u_in = run_back(None, lambda c: summaries[:, c - 1], flags.bwd)  # chunks 1 .. C - 1
      u_in[last] = jnp.zeros_like(u_in[0])
      inputs["u0re"], inputs["u0im"] = _lane_planes(jnp.stack(u_in, axis=1), split)
    init_names = ("u0re", "u0im")
  inputs["cre"], inputs["cim"] = _lane_planes(eta * p, split)
  inputs["om"] = _lane_omega(omega, split)
  names = ("dy", "x") + keep_names + ("qre", "qim", "cre", "cim", "om") + init_names
  if pairs:
    inputs["q2re"], inputs["q2im"] = _lane_planes(_table_power(powers, exps, 2, (dim, ndim)), split)
    inputs["cqre"], inputs["cqim"] = _lane_planes(eta * p * q, split)
    inputs["k0"] = jnp.sum(inputs["cre"], axis=0)  # per lane: its orders' Re(c) summed
    names += ("q2re", "q2im", "cqre", "cqim", "k0")
  out_names = ("dx", "ure", "uim", "vre", "vim", "are", "aim", "bre", "bim", "ctom")
  out_shapes = {n: state for n in out_names}
  out_shapes["dx"] = jax.ShapeDtypeStruct(x.shape, x.dtype)
  out_shapes["ctom"] = jax.ShapeDtypeStruct((batch, plan.count, dim * split), jnp.float32)
  if has_g:
    inputs["p"] = _to_lanes(p, split)
    if cfg.pallas_combine and plan.count > 1:
      inputs["e0re"], inputs["e0im"] = _combine_states(
          None, split, decay, flags.bwd, g_last, split, batch=batch, count=plan.count,
          reverse=True, interpret=interpret,
          first_decay=None if decays[last] is decay else decays[last])
    else:
      eg_in = run_back(g_last, lambda c: None, flags.bwd)
      inputs["e0re"], inputs["e0im"] = _lane_planes(jnp.stack(eg_in, axis=1), split)
    names += ("p", "e0re", "e0im")
    g_names = ("egre", "egim", "fgre", "fgim", "pg", "bgre", "bgim")
    out_names += g_names
    out_shapes.update({n: state for n in g_names})
  out = _launch(spec("bwd", bool(init_names), names, out_names), batch, plan.count, inputs,
                out_shapes, interpret=interpret, num_warps=cfg.bwd_num_warps,
                name="cema_bwd_scan")
  if cfg.pallas_combine:
    # Every per-chunk output of the scan reduced to natural [D, N] totals (and per-batch firsts
    # with h0) in one kernel; what is left are the few [D, N] elementwise operations below, the
    # same expressions as the XLA path's.
    t = _backward_totals(out, local, cfg.summary_split or cfg.split, decay, q, flags,
                         batch=batch, count=plan.count, dim=dim, split=split, has_g=has_g,
                         has_h0=h0 is not None, interpret=interpret)
    ct_p = jnp.real(eta * t["acc_a"])
    ct_q = p * eta * t["acc_b"]
    if has_g:
      ct_p = ct_p + t["pg"]
      ct_q = ct_q + p * t["acc_bg"]
    ct_eta = p * t["acc_a"]
    ct_h0 = None  # only with h0 (_cema_core_bwd drops it otherwise)
    if h0 is not None:
      u_first = t["u_first"]                                         # u_0
      h0_factor = eta * (u_first + q * t["v_final"])                 # w_0 + q w'_0 without g
      ct_h0 = q * (eta * u_first)                                    # q w_0 without g
      if has_g:
        h0_factor = h0_factor + t["f_final"]                         # g_0 + q g'_0
        ct_h0 = ct_h0 + t["q_g_first"]                               # q g_0
      ct_eta = ct_eta + q * jnp.sum(h0 * u_first, axis=0)
      ct_q = ct_q + jnp.sum(h0 * h0_factor, axis=0)
    return out["dx"], ct_p, ct_q, ct_eta, t["ct_omega"], ct_h0

  nat = functools.partial(_natural, out, dim=dim, split=split)

  def lagged(kernel_final):
    """True lagged sums entering each chunk (in[c]) and after time 0 (in[-1]), plus the
    correction sum_c after_c in[c] F_c to the kernel's sum_t x_t (lagged) of zero-start chunks."""
    values = run_back(jnp.zeros_like(kernel_final[:, 0]), lambda c: kernel_final[:, c], flags.bwd)
    before = _times(flags.bwd, 0, decays[0] * values[0]) if plan.count > 1 else 0.0
    final = before + kernel_final[:, 0]
    correction = 0.0
    # in[last] is zero, so the last chunk adds nothing (and the forward kept no F for it).
    for c in range(plan.count - 1):
      correction = correction + _times(flags.after, c, values[c]) * local[:, c]
    return final, correction

  acc_a = jnp.sum(nat("are", "aim"), axis=1)                         # [B, D, N]
  v_final, v_corr = lagged(nat("vre", "vim"))
  acc_b = jnp.sum(nat("bre", "bim"), axis=1) + q * v_corr            # X_c = q F_c for u'
  u_first = nat("ure", "uim")[:, 0]                                  # u_0
  w_first = eta * u_first                                            # w_0 without g
  h0_factor = eta * (u_first + q * v_final)                          # w_0 + q w'_0 without g
  ct_p = jnp.real(eta * jnp.sum(acc_a, axis=0))
  ct_q = p * eta * jnp.sum(acc_b, axis=0)
  if has_g:
    f_final, f_corr = lagged(nat("fgre", "fgim"))
    acc_bg = jnp.sum(nat("bgre", "bgim"), axis=1) + f_corr            # X_c = F_c in E-form
    ct_p = ct_p + jnp.sum(_from_lanes(out["pg"], dim, split), axis=(0, 1))
    ct_q = ct_q + p * jnp.sum(acc_bg, axis=0)
    h0_factor = h0_factor + f_final                                  # g_0 + q g'_0
    q_g_first = nat("egre", "egim")[:, 0]                            # q g_0
  ct_eta = p * jnp.sum(acc_a, axis=0)
  ct_h0 = q * w_first + (q_g_first if has_g else 0.0)
  if h0 is not None:
    ct_eta = ct_eta + q * jnp.sum(h0 * u_first, axis=0)
    ct_q = ct_q + jnp.sum(h0 * h0_factor, axis=0)
  ct_omega = jnp.sum(out["ctom"], axis=(0, 1)).reshape(dim, split)[:, 0]
  return out["dx"], ct_p, ct_q, ct_eta, ct_omega, ct_h0


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
  """(y, h_last, residuals for the backward)."""
  if st.platform == "tpu":
    y, h_last = _tpu_forward(x, keep, p, q, eta, omega, h0, st.cfg, st.interpret)
    return y, h_last, ()
  return _gpu_forward(x, keep, p, q, eta, omega, h0, st.cfg, st.interpret)


def _backward_impl(st: _Static, x, keep, p, q, eta, omega, h0, dy, g_last, extra):
  if st.platform == "tpu":
    if g_last is None:
      g_last = jnp.zeros((x.shape[0],) + p.shape, jnp.complex64)
    dx, ct_p, ct_omega, ct_h0 = _tpu_reverse(dy, x, keep, p, q, eta, omega, g_last, st.cfg,
                                             st.interpret)
    ct_q, ct_eta = _tpu_param(x, dy, keep, p, q, eta, h0, g_last, st.cfg, st.interpret)
    return dx, ct_p, ct_q, ct_eta, ct_omega, ct_h0
  return _gpu_backward(x, keep, p, q, eta, omega, h0, dy, g_last, extra, st.cfg, st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cema_core(st: _Static, x, keep, p, q, eta, omega, h0):
  y, h_last, _ = _forward_impl(st, x, keep, p, q, eta, omega, h0)
  return y, h_last


def _cema_core_fwd(st: _Static, *primals):
  # symbolic_zeros: primals arrive wrapped with their `perturbed` bits.
  args = custom_vjp_primal_tree_values(primals)
  y, h_last, extra = _forward_impl(st, *args)
  return (y, h_last), (args, extra)


def _cema_core_bwd(st: _Static, residuals, cotangents):
  (x, keep, p, q, eta, omega, h0), extra = residuals
  dy, g_last = cotangents
  # An unused output arrives as a symbolic zero: a zero dy is materialised (rare), a zero
  # ct(h_last) (the usual training case) removes the g part of the adjoint from the kernel.
  if isinstance(dy, SymbolicZero):
    dy = jnp.zeros(x.shape, jnp.float32)
  dy = dy.astype(jnp.float32)
  g_last = None if isinstance(g_last, SymbolicZero) else g_last.astype(jnp.complex64)
  dx, ct_p, ct_q, ct_eta, ct_omega, ct_h0 = _backward_impl(st, x, keep, p, q, eta, omega, h0,
                                                           dy, g_last, extra)
  keep_ct = None if keep is None else jnp.zeros_like(keep)
  h0_ct = None if h0 is None else ct_h0.astype(h0.dtype)
  return (dx.astype(x.dtype), keep_ct, ct_p.astype(p.dtype), ct_q.astype(q.dtype),
          ct_eta.astype(eta.dtype), ct_omega.astype(omega.dtype), h0_ct)


_cema_core.defvjp(_cema_core_fwd, _cema_core_bwd, symbolic_zeros=True)


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

  interpret: run the kernels in the Pallas interpreter (default: off the kernels' own platform).
  block_d / block_t / config: tiling overrides (see CemaKernelConfig; block_d sets the channel
  block of both the forward and the backward scan).  platform: "gpu" (Triton kernels) or "tpu"
  (Mosaic kernels); defaults to the default backend's family.
  """
  p, q, eta, omega_v, h0, keep = _normalize_inputs(x, coeffs, omega, h0, segment_ids)
  if x.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f"x must be float32 or bfloat16; got {x.dtype}. Cast it first.")
  batch, length, dim = x.shape
  ndim = p.shape[1]
  kernel_platform = _resolve_platform(platform)
  if interpret is None:  # natively on the kernels' own platform, interpreted anywhere else
    interpret = jax.default_backend() != kernel_platform
  cfg = config if config is not None else default_config(batch, length, dim, ndim)
  overrides = {}
  if block_d is not None:
    overrides.update(block_d=block_d, bwd_block_d=block_d)
  if block_t is not None:
    overrides["block_t"] = block_t
    if cfg.summary_block > 1 and block_t % cfg.summary_block:
      overrides["summary_block"] = 0  # the preset's blocks do not fit the tile asked for
  cfg = dataclasses.replace(cfg, **overrides).validate(ndim)
  st = _Static(cfg=cfg, interpret=bool(interpret), platform=kernel_platform)
  y, h_last = _cema_core(st, x, keep, p, q, eta, omega_v, h0)
  return (y, h_last) if return_state else y
