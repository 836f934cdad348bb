"""The forward's CEMA chunk summaries on the tensor cores: mma.sync on fragments built in registers.

For x: [B, 16 T, D] (bf16, 16 time chunks of T steps; more chunks, in multiples of 16, fold into
the batch) and q: [D, 16] (complex), every chunk's summary from a zero start is
  S[b, c, n, d] = sum_{l < T} q[d, n]^(T - 1 - l) x[b, c T + l, d],
a per-channel product [16 chunks, T] x [T, N]. In blocks of 16 steps it is Horner's rule,
acc <- q^16 acc + X_blk P with P[k, n] = q^(15 - k), and X_blk P is one mma.sync m16n8k16 per
channel and n-tile: M = the 16 chunks, K = the block's 16 steps, N = re / im of 4 orders.

Why no transpose is needed: lane (g, t) of an mma fragment holds rows (chunks) g and g + 8 at steps
2t, 2t + 1, 2t + 8, 2t + 9 of the block. Each lane loads exactly those 8 positions, 4 consecutive
channels each (one 8-byte load), so it holds its fragment of 4 independent per-channel products.
Pairs of steps packed into 32 bits are the A registers. The B registers (the powers, three bf16
parts of each so that the product is float32-accurate; x in bf16 is exact) and the accumulators
(re and im of one order in one lane, so Horner's complex scaling is lane-local) sit in the same
per-lane tiles. Every tile is [W, 8, 4, 4], 4 contiguous elements a thread, and Triton lays such a
load out with warp w on channel group w and lane 4g + t on (g, t). The W warps of a program read
the four 8-byte quarters of the same 32-byte sectors, which the SM's L1 merges; x's rows come by
gather (index arrays) so that the channel group, not a memory axis, leads the tile.

The mma is PTX inline assembly (a primitive of this module whose Triton lowering keeps its eight
results; Pallas' elementwise_inline_asm lowering returns one; bf16 mma.sync needs sm_80 or later).
In the interpreter it is emulated on whole tiles by the PTX fragment layout. On a GPU a
once-per-process check compares the compiled kernel with a float64 sum before it is used
(use_mma_summaries), and any failure falls back to the FMA summaries.

On an H200 at B=1, L=32768, D=4096 the kernel takes 0.199 ms for all 16 chunks against 0.294 for
the FMA summary kernel in the same process (experiments/gpu_checks/probe_cema_summary_mma.py;
results/gpu_checks/2026-11-30_nvidia-h200_probe_cema_summary_mma.json). ncu: L1-bound (89% of its
throughput; one tag lookup per lane and load, 73% L1 hits), tensor pipe 25% active.
Only the forward uses it: the backward's summaries run over a float32 cotangent, which is not
exact in bf16.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.extend.core import Primitive

from kernels_pallas.triton_backend import plgpu

Array = jax.Array

CHUNKS = 16   # the mma's M: the kernel sums all 16 chunks of a sequence at once
STEP = 16     # the mma's K: steps per Horner block
ORDERS = 16   # N: 2 N = 32 columns (re / im interleaved) in 4 n-tiles of 8
_NTILES = 4
_PARTS = 3    # bf16 parts of each power: hi + mid + lo carry float32's 24 bits
_GROUP = 4    # channels a lane: 4 x 16-bit in one 8-byte load, 4 x 32-bit in one 16-byte load
WARPS = 4     # channel groups (warps) a program: 16 channels, one 32-byte sector per row

_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
_ASM = (f"{_MMA} {{$0, $1, $2, $3}}, {{$8, $9, $10, $11}}, {{$12, $13}}, {{$16, $17, $18, $19}};\n"
        f"{_MMA} {{$4, $5, $6, $7}}, {{$8, $9, $10, $11}}, {{$14, $15}}, {{$20, $21, $22, $23}};")

# ---- two m16n8k16 products sharing A, as one primitive ------------------------------------------

_mma_pair_p = Primitive("megalodon_cema_mma_pair")
_mma_pair_p.multiple_results = True
_mma_pair_p.def_abstract_eval(lambda *args: [jax.core.ShapedArray(args[0].shape, jnp.float32)] * 8)


def _register_triton_rule() -> None:
  """Lowers _mma_pair_p to one tt.elementwise_inline_asm with its eight results (private API; a
  jax without it leaves the primitive unlowerable, and use_mma_summaries then says no)."""
  try:
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering as triton_lowering
  except ImportError:
    return

  def rule(ctx, *args):
    types = [jax_mlir.aval_to_ir_type(ctx.context.mlir_ctx, aval) for aval in ctx.avals_out]
    results = tt_dialect.elementwise_inline_asm(
        types, _ASM, constraints=",".join(["=r"] * 8 + ["r"] * 16), pure=True, packed_element=1,
        args=list(args))
    return list(results)

  triton_lowering.triton_lowering_rules[_mma_pair_p] = rule


_register_triton_rule()


def _bf16_pair(u: Array) -> tuple[Array, Array]:
  """u32 tile of packed bf16 pairs -> (low, high) as float32."""
  lo = lax.bitcast_convert_type(lax.shift_left(u, jnp.uint32(16)), jnp.float32)
  hi = lax.bitcast_convert_type(lax.bitwise_and(u, jnp.uint32(0xFFFF0000)), jnp.float32)
  return lo, hi


def mma_pair_emulated(a: list, b: list, c: list) -> list:
  """The mma pair on whole tiles, by the PTX fragment layout of m16n8k16 (lane (g, t)):
  A reg r: row g + 8 (r & 1), k 2t + 8 (r >> 1) + {0, 1} (low, high half);
  B reg r: k 2t + 8 r + {0, 1}, column g;  C / D reg r: row g + 8 (r >> 1), column 2t + (r & 1).
  a: 4 u32 tiles, b: 4 (n-tile 0's two registers, then n-tile 1's), c: 8 f32 (n-tile 0's four,
  then n-tile 1's); tiles [8 g, 4 t, channels] or [W, 8, 4, 4]. Returns D as c."""
  if a[0].ndim == 4:
    warps = a[0].shape[0]
    flat = lambda v: v.transpose(1, 2, 0, 3).reshape(8, 4, _GROUP * warps)  # noqa: E731
    out = mma_pair_emulated([flat(v) for v in a], [flat(v) for v in b], [flat(v) for v in c])
    return [v.reshape(8, 4, warps, _GROUP).transpose(2, 0, 1, 3) for v in out]
  channels = a[0].shape[-1]

  def pairs(u):  # [8 g, 4 t, ch] packed -> [8 g, 8 (2t + half), ch]
    return jnp.stack(_bf16_pair(u), axis=2).reshape(8, 8, channels)

  blocks = [pairs(reg) for reg in a]
  amat = jnp.concatenate([jnp.concatenate([blocks[0], blocks[2]], axis=1),
                          jnp.concatenate([blocks[1], blocks[3]], axis=1)], axis=0)  # [row, k, ch]
  out = []
  for n in range(2):
    bmat = jnp.concatenate([pairs(b[2 * n + r]).transpose(1, 0, 2) for r in range(2)], axis=0)  # [k, col, ch]
    top = jnp.stack([c[4 * n], c[4 * n + 1]], axis=2).reshape(8, 8, channels)
    bottom = jnp.stack([c[4 * n + 2], c[4 * n + 3]], axis=2).reshape(8, 8, channels)
    dmat = jnp.concatenate([top, bottom], axis=0) + jnp.einsum(
        "mkd,knd->mnd", amat, bmat, precision=lax.Precision.HIGHEST)
    for half in (dmat[:8], dmat[8:]):
      split = half.reshape(8, 4, 2, channels)
      out += [split[:, :, 0], split[:, :, 1]]
  return out


def _mma_pair(a: list, b: list, c: list) -> list:
  return _mma_pair_p.bind(*a, *b, *c)


# ---- the kernel ---------------------------------------------------------------------------------

def _kernel(x_ref, b_ref, q16_ref, out_ref, *, nblocks: int, interpret: bool):
  """x_ref [B L, D] u16 (bf16 bits); b_ref [3, 4, 2, D / 4, 8, 4, 4] u32 (B fragments by part,
  n-tile, register, channel group); q16_ref [4, 2, D / 4, 8, 4, 4] f32 (q^16 re / im of the lane's
  order per n-tile); out_ref [B, D / 4, 4, 4, 8, 4, 4] f32 (the accumulators' fragments)."""
  bi, blk = pl.program_id(0), pl.program_id(1)
  length = x_ref.shape[0] // out_ref.shape[0]
  steps = nblocks * STEP
  g0 = blk * WARPS
  mma = mma_pair_emulated if interpret else _mma_pair
  shape = (WARPS, 8, 4, _GROUP)
  iota = lambda axis: lax.broadcasted_iota(jnp.int32, shape, axis)  # noqa: E731
  # Fragment register r = (a, e) = (r & 1, r >> 1) reads chunk 8 a + g at step 8 e + 2t + half.
  row0 = bi * length + iota(1) * steps + 2 * iota(2)
  col = (g0 + iota(0)) * _GROUP + iota(3)
  groups = pl.ds(g0, WARPS)
  bfrag = [[[b_ref[p, n, r, groups] for r in range(2)] for n in range(_NTILES)] for p in range(_PARTS)]
  q16 = [[q16_ref[n, part, groups] for part in range(2)] for n in range(_NTILES)]

  def load(i):
    kb = jnp.minimum(i, nblocks - 1)  # the prefetch past the end reloads the last block (unused)
    return [[x_ref[row0 + ((r & 1) * 8 * steps + kb * STEP + (r >> 1) * 8 + half), col]
             for half in range(2)] for r in range(4)]

  def body(i, carry):
    acc, rows = carry
    following = load(i + 1)  # issued before this block's arithmetic
    a = [lax.bitwise_or(lo.astype(jnp.uint32), lax.shift_left(hi.astype(jnp.uint32), jnp.uint32(16)))
         for lo, hi in rows]
    new = []
    for n in range(_NTILES):  # Horner: scale by q^16 first (re / im of one order sit in one lane)
      qr, qi = q16[n]
      for pair in (0, 2):
        re, im = acc[n][pair], acc[n][pair + 1]
        new += [qr * re - qi * im, qr * im + qi * re]
    acc = [new[4 * n:4 * n + 4] for n in range(_NTILES)]
    for p in range(_PARTS - 1, -1, -1):  # smallest part first
      for n in (0, 2):
        d = mma(a, bfrag[p][n] + bfrag[p][n + 1], acc[n] + acc[n + 1])
        acc[n], acc[n + 1] = d[:4], d[4:]
    return acc, following

  zero = jnp.zeros(shape, jnp.float32)
  acc, _ = lax.fori_loop(0, nblocks, body, ([[zero] * 4 for _ in range(_NTILES)], load(0)))
  for n in range(_NTILES):
    for r in range(4):
      out_ref[bi, groups, n, r] = acc[n][r]


def fragment_tables(powers_re: Array, powers_im: Array) -> tuple[Array, Array]:
  """The kernel's per-lane tables from q^0 .. q^16.

  powers_re / powers_im: [17, D, 16] float32 (row e = q^e). Returns (B fragments [3, 4, 2, D / 4,
  8, 4, 4] u32, q^16 [4, 2, D / 4, 8, 4, 4] f32); channel d sits in group d // 4, slot d % 4.
  Column j of n-tile n is order 4 n + j // 2, re (j even) or im (odd); P[k, order] = q^(15 - k);
  lane (g, t) register r holds P[2t + 8r, column g] (low half) and P[2t + 8r + 1, column g]."""
  _, dim, ndim = powers_re.shape
  p_re, p_im = powers_re[STEP - 1::-1], powers_im[STEP - 1::-1]  # [k, D, N]: q^(15 - k)
  planes = jnp.stack([p_re, p_im], axis=-1).reshape(STEP, dim, 2 * ndim)  # column 2 order + part
  parts, rest = [], planes
  for _ in range(_PARTS):  # float32 = hi + mid + lo in bf16, exactly
    # reduce_precision, not a round trip through bf16: XLA on a GPU drops f32 -> bf16 -> f32 pairs
    # (excess precision), which would leave the remainders at zero.
    part = lax.reduce_precision(rest, exponent_bits=8, mantissa_bits=7)
    rest = rest - part
    parts.append(lax.bitcast_convert_type(part.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32))
  bits = jnp.stack(parts)  # [part, k, D, col]
  # [part, k = 8 r + 2 t + half, D, col = 8 n + g] -> [part, n, r, D, g, t, half]
  bits = bits.reshape(_PARTS, 2, 4, 2, dim, _NTILES, 8).transpose(0, 5, 1, 4, 6, 2, 3)
  frag = bits[..., 0] | lax.shift_left(bits[..., 1], jnp.uint32(16))  # [part, n, r, D, g, t]
  frag = frag.reshape(_PARTS, _NTILES, 2, dim // _GROUP, _GROUP, 8, 4).transpose(0, 1, 2, 3, 5, 6, 4)
  q16 = jnp.stack([powers_re[STEP], powers_im[STEP]])  # [part, D, N]
  q16 = q16.reshape(2, dim // _GROUP, _GROUP, _NTILES, 4)  # [part, grp, j, n, t]
  q16 = jnp.broadcast_to(q16.transpose(3, 0, 1, 4, 2)[:, :, :, None], (_NTILES, 2, dim // _GROUP, 8, 4, _GROUP))
  return frag, q16


def summary_planes(x: Array, btab: Array, q16: Array, *, interpret: bool,
                   chunks: int = CHUNKS) -> tuple[Array, Array]:
  """x [B, C T, D] bf16, the tables of fragment_tables -> (re, im) [B, C, 16, D] f32: every
  chunk's summary S[b, c, n, d] from a zero start. C, a multiple of 16, is folded into the batch
  (the kernel sums 16 chunks at once)."""
  outer, length, dim = x.shape
  x = x.reshape(outer * (chunks // CHUNKS), length // (chunks // CHUNKS), dim)
  batch, length, dim = x.shape
  nblocks = length // CHUNKS // STEP
  bits = lax.bitcast_convert_type(x, jnp.uint16).reshape(batch * length, dim)
  kwargs = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=WARPS, num_stages=1)}
  frags = pl.pallas_call(
      functools.partial(_kernel, nblocks=nblocks, interpret=interpret),
      grid=(batch, dim // (_GROUP * WARPS)),
      out_shape=jax.ShapeDtypeStruct((batch, dim // _GROUP, _NTILES, 4, 8, 4, _GROUP), jnp.float32),
      interpret=interpret, name="cema_fwd_chunk_states_mma", **kwargs)(bits, btab, q16)
  # Register r: chunk g + 8 (r >> 1), re / im by r & 1; order 4 n + t; channel 4 group + j.
  f = frags.reshape(batch, dim // _GROUP, _NTILES, 2, 2, 8, 4, _GROUP)  # [b, grp, n, a, part, g, t, j]
  f = f.transpose(4, 0, 3, 5, 2, 6, 1, 7)  # [part, b, a, g, n, t, grp, j]
  f = f.reshape(2, outer, chunks, ORDERS, dim)
  return f[0], f[1]


def supported(x: Array, ndim: int, count: int, chunk: int, last: int, has_keep: bool) -> bool:
  """Whether the kernel computes these summaries: bf16 x (exact in the mma), no segment resets, N
  = 16, equal time chunks of whole 16-step blocks, 16 of them or a multiple, and 16 channels a
  program."""
  return (x.dtype == jnp.bfloat16 and not has_keep and ndim == ORDERS and count % CHUNKS == 0
          and last == chunk and chunk % STEP == 0 and x.shape[2] % (_GROUP * WARPS) == 0)


def use_mma_summaries() -> bool:
  """Whether the mma kernel may run on the default backend. Off a GPU: yes (the interpreter
  emulates the mma). On a GPU: once per process, the compiled kernel is compared with a float64
  sum on a small problem; the kernel relies on Triton's layout of its tiles (lane 4g + t holding
  fragment (g, t)), so a jax whose Triton lays them out otherwise is caught here, with one
  warning, and the FMA summaries are used instead."""
  return _check_on(jax.default_backend())


@functools.lru_cache(maxsize=None)
def _check_on(platform: str) -> bool:
  if platform != "gpu":
    return True
  rng = np.random.default_rng(0)
  dim, steps = _GROUP * WARPS * 2, STEP * 2
  q = (rng.uniform(0.5, 0.99, (dim, ORDERS)) * np.exp(1j * rng.uniform(0, np.pi, (dim, ORDERS))))
  q = q.astype(np.complex64).astype(np.complex128)
  powers = q[None] ** np.arange(STEP + 1)[:, None, None]
  x = rng.standard_normal((1, CHUNKS * steps, dim)).astype(ml_dtypes.bfloat16)
  weights = q[:, :, None] ** (steps - 1 - np.arange(steps))[None, None, :]  # [D, N, T]
  want = np.einsum("dnt,bctd->bcnd", weights, x.astype(np.float64).reshape(1, CHUNKS, steps, dim))

  def run(p_re, p_im, xs):
    re, im = summary_planes(xs, *fragment_tables(p_re, p_im), interpret=False)
    return re, im

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      args = (powers.real.astype(np.float32), powers.imag.astype(np.float32), x)
      # A compiled executable runs eagerly even when this is reached while a model is traced.
      compiled = jax.jit(run).lower(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)).compile()
      re, im = compiled(*args)
      got = np.asarray(re) + 1j * np.asarray(im)
  except Exception as error:  # noqa: BLE001 -- whatever failed, the FMA summaries remain
    warnings.warn(f"CEMA's mma chunk summaries failed their check on this GPU ({type(error).__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else ''}); using the FMA summaries.",
                  RuntimeWarning, stacklevel=2)
    return False
  if not np.abs(got - want).max() <= 1e-5 * np.abs(want).max():
    warnings.warn("CEMA's mma chunk summaries disagree with a float64 sum on this GPU (Triton laid "
                  "the fragment tiles out differently?); using the FMA summaries.",
                  RuntimeWarning, stacklevel=2)
    return False
  return True
