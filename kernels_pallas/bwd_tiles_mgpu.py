"""The backward "tiles" kernel of chunked attention as a Pallas Mosaic GPU kernel (Hopper: TMA, wgmma,
warp specialisation). The Hopper default since 2026-11-30: on an H200 at C=2048, dk 256, dv 2048,
1.117 ms against the Triton kernel's 1.460 in one run (persistent schedule, 132 programs, 5 stages;
one tile per program with 4 stages 1.272; probe_mgpu_matmul.py).

Same inputs, outputs and semantics as `chunk_attention._tr_bwd_tiles` with 128 x 128 tiles and no
segment ids. For every chunk n (C consecutive positions; attention is causal within a chunk), head h
and visited tile (query block i, key block j <= i) of 128 x 128:

  S  = Q_i K_j^T * (scale * log2 e)           contracted over dk
  P  = exp2(S - lse_i), 0 where key position > query position (only inside diagonal tiles)
  dP = dO_i V_j^T                              contracted over dv (the long loop: dv 2048)
  dS = P (dP - delta_i) * scale
  p_buf[b, h, n*C + i*128 + r, j*128 + c] = P[r, c], ds_buf likewise with dS (both in the input dtype)

q, k [B, L, H, dk]; v, d_out [B, L, H, dv]; lse, delta [B, H, L] float32. lse is base 2 (the log2
of the row sums of exp2(S)), as the Triton forward writes it. Tiles above a chunk's block diagonal
are not written (their contents are undefined; no consumer reads them). With 128-key spans dS is
computed from the float32 P, as the Triton default bwd_order='dp_first'; 256-key spans use P as
stored (rounded to the input dtype, as 's_first'), for registers: one more rounding of P, of the
order of the rounding of the stored dS itself.

Why the shape of the work. Per visited 128 x 128 tile the Triton kernel streams Q_i, dO_i, K_j, V_j
(1.18 MB at dk 256, dv 2048, bf16) for 75.5 MFLOP: 64 FLOP per byte. At its measured 456 TFLOP/s
(1.44 ms on an H200) that is 7.1 TB/s out of L2, about what the Mosaic GPU block matmul sustains
(580 TFLOP/s at 85 FLOP/B = 6.8 TB/s). If that is the ceiling, a TMA + wgmma rewrite of the same
128 x 128 tiles gains little; `block_k=256` pairs two key blocks into one 128 x 256 span, so one
dO_i / Q_i chunk serves 256 keys: 48 KiB per step for 4.2 MFLOP, 85 FLOP/B (as the block matmul;
84 on average with the short spans below). Its cost is registers: a consumer warpgroup holds a
[64, 256] float32 accumulator (128 registers a thread) and, across the dv loop, P as stored
([64, 256] bf16: 64 registers), which is why P is held in the input dtype. block_k=128 is the plain
128 x 128 version (64 + 64 registers: P stays float32, so dS matches Triton's default 'dp_first'). On
the H200 the 128-key spans won (1.253 against 1.49-1.61 ms for 256-key spans): the L2 sustains the
128 x 128 tiles' 64 FLOP/B once the working set fits (below).

Programs per chunk-head (measured). Giving each program a whole pair walk (nbq + 1 spans) makes only
nbq / 2 programs per chunk-head: 132 SMs then hold ~16 chunk-heads at once, whose Q, K, V, dO rows
(18.9 MB each at the benchmark shape) do not fit the 50 MB L2. Under ncu that kernel was DRAM-bound
(4.1 TB/s, 28% L2 hits, 1.73 ms; Triton 77% hits). `spans_per_program` cuts each walk into groups of
spans, one program per group (grid axis `group`, launched fastest): with one span per program a
chunk-head has 8 * 17 = 136 programs and runs alone, as the Triton grid's (key, query) tiles do.
1 span: 1.253 ms, 2: 1.270, 4: 1.357, whole walks: 1.734.

Persistent schedule (`persistent_ctas=P`; the op's choice, P = the SM count, 5 stages: 1.117 ms
against 1.272 for one tile per program in one run; 3 stages 1.348, 4 1.241, 6 1.213, 264 programs
1.249). With one tile per program every CTA pays
its own prologue (stat loads, the ring's first `stages` loads) and epilogue (the dS stores) with
nothing to overlap them: one CTA fits on an SM (registers, ~162 KiB of shared memory). Instead P
programs (grid (P,)) take the visited tiles of all chunk-heads in one global order: chunk-heads as the
grid above launches them (bh, then chunk), within one the one-span programs' order (pair, then its
walk); `_persistent_tile` decodes a global index with divisions by constants. Program c does tiles
c, c + P, c + 2P, ...: at any moment the P programs are on ~P consecutive tiles, one or two
chunk-heads, so the L2 working set is that of `spans_per_program=1`. Per program:
  * the producer's ring step is u * spt + s for its local tile u: the ring runs on across tiles, the
    next tile's loads issued as soon as slots are released, while the consumers finish the last
    tile's dv steps and stores; the final drain is once per program;
  * the row statistics alternate between the two stat slots (those `body` uses for a pair's two
    query blocks) by u % 2; at the start of tile u a consumer issues tile u + 1's loads into the other
    slot (read into registers at the start of tile u - 1, ordered before this TMA by that tile's
    stores' commit_smem) and waits for its own slot: one load per wait on each slot's barriers;
  * stores keep alternating their two staging buffers (two 64-column rounds per store);
  * tile counts differ by at most one; a program beyond the tile count does nothing.
block_k 128 only (one tile a step of the schedule).

Structure of one program (CTA of 3 warpgroups, grid (B * H, n_chunks, pairs, groups), groups fastest,
then pairs; with whole walks per program, as first written, the group axis has length 1):
  * Mosaic GPU launches the LAST grid axis fastest (CUDA's x): the `pairs` programs of one
    (chunk, batch, head) run together and share its K and V rows in L2 (block_matmul_mgpu.py: with
    the wrong order that kernel was DRAM-bound).
  * A program owns the query blocks p and nbq - 1 - p of its chunk-head (nbq = C / 128). Block i
    visits i + 1 key blocks, so the pair visits nbq + 1 whatever p is: all programs do the same work.
    (Odd nbq: the middle block pairs with itself and is done once.) The first block walks its key
    blocks upwards from 0, the second downwards from its diagonal: at step tau (in key blocks) every
    program of a chunk-head is then at key block tau (first blocks) or nbq - tau (second blocks), so
    the programs that share K_j, V_j read them at about the same time.
  * Spans: the key blocks of a query block are walked in spans of block_k keys (1 or 2 key blocks).
    With block_k=256 and an odd number of visited key blocks one span holds a single block (a
    128-wide span; its code path is a second copy of the 256-wide one with static shapes).
  * Warpgroup 2 (producer, 40 registers): per span, dk / 64 steps of (Q_i[:, 64 cols], K_span[:, 64
    cols]), then dv / 64 steps of (dO_i[:, 64 cols], V_span[:, 64 cols]), through a ring of `stages`
    slots: slot = step % stages, a TMA per operand, each with its own barrier (lhs_bar, rhs_bar);
    before reusing a slot it waits for both consumers' release (consumed, 2 arrivals). 2-D views
    ([B*L, H*d]) make every TMA box a (row, column) offset: column h*d + c selects the head.
  * Warpgroups 0, 1 (consumers, 232 registers): warpgroup w owns query rows 64w..64w+63 of the block
    (wgmma M = 64): per step a wgmma of its 64 rows of the lhs slot against the rhs slot read
    transposed (`transpose_ref`: K^T and V^T come from the same [keys, 64] tiles), waited for at
    once and the slot released (jax's 'immediate' release, the fastest in block_matmul_mgpu.py).
    After the dk steps: P = exp2(S * scale log2 e - lse), the causal mask (one integer comparison
    against a per-span offset; it only bites on the diagonal), P cast, stored; after the dv steps:
    dS = P (dP - delta) * scale, cast, stored. P goes out before the dv loop, so its store overlaps it.
  * Row statistics: each consumer TMA-loads its 64 rows of lse and delta for both of its query blocks
    at the start (4 copies, 4 barriers), waits for them when the block starts, and reads them with
    the WGMMA.reduce(1) layout (a [64] vector matching the accumulator's rows), broadcast per span.
  * Stores: through two [64, 64] staging buffers per warpgroup, alternating; before writing one,
    `wait_smem_to_gmem(1, wait_read_only=True)` makes sure the store issued two rounds ago (the last
    one from that buffer) has read it. Every store has an even number of 64-column rounds (2 or 4),
    so the alternation never breaks across stores.

Delta on programs of its own (`out=O, delta=None, delta_ctas=N`; persistent schedule only). delta_i
= rowsum(O_i dO_i) is otherwise a separate XLA pass before this kernel (1.07 GB at the benchmark shape,
~0.29 ms at the memory floor on an H200 under the power cap, ~7% of the op), memory-bound while this
kernel is compute-bound. Here programs 0 .. N - 1 of the P do nothing but delta: they take the query
blocks (chunk-head, i) in the tiles' chunk-head order (block g = n + t N for program n), stream O_i and
dO_i through the same ring ([128, 64] slots, the Q and K halves of a step), each consumer summing O * dO
of its 64 rows, then store the block's delta rows and raise its global semaphore. Programs N .. P - 1
run the persistent tile schedule above over P - N programs; each tile's producer waits for its block's
semaphore halfway through its dv loads and hands the rows to the consumers through a shared-memory
slot (one a tile parity) for dS. The delta programs start with the tiles and stream at ~60-70 GB/s
each, so N ~ 14 of 132 keep ahead after the first chunk-head (measured on an H200, 2026-12-01: the
kernel 1.341-1.371 ms at N = 16 / 12 against 1.42 for XLA's delta + this kernel; 8 are too few, 1.91;
24 take too many SMs from the tiles, 1.51). Semaphores live in global memory and persist across calls,
so they only grow: a call reads the epoch (its call count, also a semaphore) at the start, waits for
epoch + 1, and the last program to finish advances the epoch. Waits go one way only (tiles on delta
programs, which never wait), and the delta programs have the lowest indices, so they are placed on SMs
first; still, every program must be able to be resident at once (at most one a SM). Earlier forms
(branches `attn-fused-delta-sem`, `attn-diag-delta`: delta streamed by tile programs between or
beside their tiles) were slower: one SM's stream is latency-bound and took ring slots from the tiles.

Shared memory (bf16; H200: 227 KiB per block):
  ring      stages * (128 * 64 + block_k * 64) * 2 B = stages * 32 KiB (block_k 128) or 48 KiB (256)
  staging   2 warpgroups * 2 buffers * 64 * 64 * 2 B = 32 KiB
  stats     2 warpgroups * 2 query blocks * 2 (lse, delta) * 64 * 4 B = 2 KiB
  block_k 128: 4 stages 162 KiB, 6 stages 226 KiB; block_k 256: 3 stages 178 KiB, 4 stages 226 KiB
  (226 KiB is what block_matmul_mgpu's measured 4-stage configuration uses).
  delta programs (delta_ctas): lse only in the stats (1 KiB) and 1 KiB of delta slots: 5 stages 194 KiB.
Registers are not checked here (ptxas decides on the GPU); block_k=256 may spill.

Not done (next steps if the GPU shows the need): the two consumers run in lockstep, so the tensor
cores idle while both compute exp2 and store (estimated at 5% of a span at block_k 256); FA3-style
ping-pong (one warpgroup's epilogue under the other's wgmma, a schedule barrier) would hide it.
Q_i could stay resident in shared memory across a query block's spans (64 KiB at dk 256; saves dk /
(dk + dv) = 11% of the lhs stream), which the 226 KiB configurations have no room for.

CPU: Mosaic GPU kernels cannot run here. `jax.export.export(..., platforms=["cuda"])` runs the
Pallas -> Mosaic GPU lowering (layouts, wgmma shapes, transforms, barriers) into one `mosaic_gpu_v2`
custom call; it also checks the shared-memory total against the H200's 227 KiB (a test pins the count
above). The kernel itself also runs on the CPU under Mosaic GPU's interpreter, completed for the
transposed wgmma operand by tests/mgpu_interpreter.py (barriers, TMA offsets, masks and the epilogue
against the float32 reference; wgmma runs synchronously there). Register allocation, PTX, TMA
descriptors and the asynchronous wgmma waits are only checked on the GPU.

API (written against jax 0.10.2, to run under 0.11.2): the calls block_matmul_mgpu.py uses, plus
`plgpu.broadcasted_iota(..., layout=plgpu.Layout.WGMMA)` and `plgpu.CompilerParams(approx_math=True)`
(as jax's attention_mgpu example; both present in 0.10.2 and in a jax snapshot at 0.11.1.dev;
approximate exp2, as Triton's exp2). No kernel `name` is passed to plgpu.kernel (0.10.2 rejects it).
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels_pallas import mgpu_ring

MOSAIC_GPU_CALL = "mosaic_gpu_v2"  # the custom-call target of the Mosaic GPU lowering
BLOCK = 128  # query block, key block (the tile buffers' tiles)
_HALF = 64  # query rows per consumer warpgroup (wgmma M)
_TK = 64  # contraction step: 64 bf16 = 128 bytes, the widest TMA swizzle
_EPI = 64  # columns per output store round
_LOG2E = math.log2(math.e)
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


def visited_tiles(chunk: int, block: int = BLOCK) -> jax.Array:
  """[C, C] bool: entry (query r, key c) of a chunk lies in a visited tile (key block <= query block)."""
  tile = jnp.arange(chunk) // block
  return tile[None, :] <= tile[:, None]


def bwd_tiles_reference(q: jax.Array, k: jax.Array, v: jax.Array, d_out: jax.Array, lse: jax.Array,
                        delta: jax.Array, chunk: int, scale: float = 1.0, block: int = BLOCK):
  """Dense float32 reference of the tile buffers: -> (p_buf, ds_buf), each [B, H, L, C] float32.

  q, k [B, L, H, dk]; v, d_out [B, L, H, dv]; lse (base 2), delta [B, H, L]. Entries outside the
  visited block x block tiles are 0 (they are above the diagonal, where the causal mask zeroes P and
  dS anyway; the kernels leave them undefined, so compare visited tiles only: `visited_tiles`).
  """
  batch, length, heads, _ = q.shape
  if chunk <= 0 or length % chunk or chunk % block:
    raise ValueError(f"length {length} must be a multiple of chunk {chunk}, itself a multiple of block {block}")
  n_chunks = length // chunk
  hi = lax.Precision.HIGHEST

  def chunks(x):  # [B, L, H, d] -> [B, n, C, H, d] float32
    return x.astype(jnp.float32).reshape(batch, n_chunks, chunk, heads, x.shape[-1])

  def rows(stat):  # [B, H, L] -> [B, H, n, C, 1]
    return stat.astype(jnp.float32).reshape(batch, heads, n_chunks, chunk)[..., None]

  s = jnp.einsum("bnqhd,bnkhd->bhnqk", chunks(q), chunks(k), precision=hi) * (scale * _LOG2E)
  pos = jnp.arange(chunk)
  keep = (pos[None, :] <= pos[:, None]) & visited_tiles(chunk, block)  # [C queries, C keys]
  p = jnp.where(keep, jnp.exp2(s - rows(lse)), 0.0)
  dp = jnp.einsum("bnqhd,bnkhd->bhnqk", chunks(d_out), chunks(v), precision=hi)
  ds = p * (dp - rows(delta)) * scale
  shape = (batch, heads, length, chunk)
  return p.reshape(shape), ds.reshape(shape)


def _span(t, spans1, blk1, blk2, kb: int):
  """Span t of a program -> (query block i, lowest key block j0, number of key blocks in it).

  The first spans1 spans belong to query block blk1 and walk its key blocks 0..blk1 upwards in
  spans of kb blocks (the last may be short); the rest belong to blk2 and walk blk2..0 downwards
  (the last may be short). Scalars in, scalars out: works on traced int32 and on Python ints.
  """
  second = t >= spans1
  m = jnp.where(second, t - spans1, t)
  i = jnp.where(second, blk2, blk1)
  up_lo = m * kb
  down_hi = i - m * kb
  down_lo = jnp.maximum(down_hi - (kb - 1), 0)
  j0 = jnp.where(second, down_lo, up_lo)
  count = jnp.where(second, down_hi - down_lo + 1, jnp.minimum(kb, i + 1 - up_lo))
  return i, j0, count


def _pair_spans(pair, nbq: int, kb: int):
  """Query blocks of program `pair` and their span counts: (blk1, spans1, blk2, spans2)."""
  blk1 = pair
  blk2 = nbq - 1 - pair
  spans1 = (blk1 + kb) // kb  # ceil((blk1 + 1) / kb)
  spans2 = jnp.where(blk2 != blk1, (blk2 + kb) // kb, 0)  # odd nbq: the middle block once
  return blk1, spans1, blk2, spans2


def _persistent_tile(g, n_chunks: int, nbq: int):
  """Global tile g of the persistent order -> (bh, chunk n, query block i, key block j).

  Chunk-heads in grid order (bh major, then chunk); within one the order of one-span programs:
  pair major, then the pair's walk (`_pair_spans`, `_span` with 128-key spans). Every pair walks
  nbq + 1 tiles except the middle block of odd nbq ((nbq + 1) / 2, the last pair), so the pair is
  l // (nbq + 1) of the chunk-head's tile l: divisions by constants, no table. Non-negative scalars
  in (traced int32, Python ints or integer arrays), the same out.
  """
  per_ch = nbq * (nbq + 1) // 2
  ch, l = lax.div(g, per_ch), lax.rem(g, per_ch)
  pair, t = lax.div(l, nbq + 1), lax.rem(l, nbq + 1)
  blk1, spans1, blk2, _ = _pair_spans(pair, nbq, 1)
  i, j, _ = _span(t, spans1, blk1, blk2, 1)
  return lax.div(ch, n_chunks), lax.rem(ch, n_chunks), i, j


def persistent_schedule(batch: int, heads: int, n_chunks: int, chunk: int, ctas: int):
  """(total tiles, tiles of each program [ctas]) of the persistent schedule: program c does global
  tiles c, c + ctas, ... (Python ints; the kernel computes its own count the same way)."""
  nbq = chunk // BLOCK
  total = batch * heads * n_chunks * nbq * (nbq + 1) // 2
  return total, [(total - c + ctas - 1) // ctas for c in range(ctas)]


def _check(q, k, v, d_out, lse, delta, segment_ids, chunk: int, block_k: int, stages: int) -> None:
  """Shapes this kernel supports; anything else is a ValueError saying what to change."""
  if segment_ids is not None:
    raise ValueError("segment_ids are not supported by the Mosaic GPU tiles kernel: pass None, or use the "
                     "Triton kernel (chunk_attention._tr_bwd_tiles) for packed sequences")
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3] or d_out.shape != v.shape:
    raise ValueError(f"expected q, k [B, L, H, dk] and v, d_out [B, L, H, dv], got q{q.shape} k{k.shape} "
                     f"v{v.shape} d_out{d_out.shape}")
  batch, length, heads, dk = q.shape
  dv = v.shape[-1]
  if chunk <= 0 or length % chunk:
    raise ValueError(f"sequence length {length} is not a multiple of chunk {chunk}: pad the sequence or use "
                     "the Triton kernel")
  if chunk % BLOCK:
    raise ValueError(f"chunk {chunk} is not a multiple of {BLOCK} (the kernel's tile; no padded tiles): "
                     "use the Triton kernel for this chunk size")
  if dk % _TK or dv % _TK:
    raise ValueError(f"dk {dk} and dv {dv} must be multiples of {_TK} (the TMA / wgmma contraction step)")
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v, d_out)}
  if len(dtypes) != 1 or dtypes.pop() not in map(jnp.dtype, _SUPPORTED_DTYPES):
    raise ValueError(f"q, k, v, d_out must share a 16-bit float dtype (bfloat16 or float16), got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}, {d_out.dtype}")
  for name, stat in (("lse", lse), ("delta", delta)):
    if stat is None:  # delta computed by the kernel (out=)
      continue
    if stat.shape != (batch, heads, length) or stat.dtype != jnp.float32:
      raise ValueError(f"{name} must be float32 [B, H, L] = {(batch, heads, length)}, got {stat.dtype} "
                       f"{stat.shape}")
  if block_k not in (BLOCK, 2 * BLOCK):
    raise ValueError(f"block_k {block_k} unsupported: {BLOCK} or {2 * BLOCK}")
  if stages < 2:
    raise ValueError(f"stages {stages} < 2: the ring needs at least two slots")


def bwd_tiles_mgpu(q: jax.Array, k: jax.Array, v: jax.Array, d_out: jax.Array, lse: jax.Array,
                   delta: jax.Array | None, *, chunk: int, scale: float = 1.0, segment_ids=None,
                   block_k: int = BLOCK, stages: int = 4, spans_per_program: int | None = None,
                   persistent_ctas: int | None = None, out: jax.Array | None = None, delta_ctas: int = 0,
                   interpret=None):
  """P and dS tile buffers of chunked attention's backward on a Hopper GPU (Pallas Mosaic GPU).

  q, k [B, L, H, dk]; v, d_out [B, L, H, dv] (one 16-bit dtype); lse (base 2), delta [B, H, L]
  float32 -> (p_buf, ds_buf), each [B, H, L, chunk] in the input dtype; tiles above each chunk's
  block diagonal are left unwritten. block_k: keys per span (128, or 256 = two key blocks per
  wgmma, see the module docstring); stages: ring depth (shared memory: the module docstring).
  spans_per_program: how many spans of a pair's walk one program does (None: the whole walk). Fewer
  means more programs per chunk-head, so fewer chunk-heads in flight and their Q, K, V, dO rows stay
  in L2 ("Programs per chunk-head" in the module docstring).
  persistent_ctas: launch this many programs (e.g. the SM count) that share all visited tiles of all
  chunk-heads in one global order, program c taking tiles c, c + persistent_ctas, ...; each program's
  ring streams on from tile to tile ("Persistent schedule" in the module docstring). block_k 128 only,
  and not with spans_per_program. None: one program per span group (the grid above).
  segment_ids must be None (a ValueError otherwise, as for every unsupported shape).
  out, delta_ctas: the forward's output O [B, L, H, dv] with delta=None: delta_ctas of the
  persistent_ctas programs (1 .. persistent_ctas - 1; persistent_ctas at most the GPU's SM count) compute
  delta = rowsum(O dO) while the others run the tiles ("Delta on programs of its own" in the module
  docstring), and the call returns (p_buf, ds_buf, delta [B, H, L] float32).
  """
  fused = out is not None
  if fused == (delta is not None):
    raise ValueError("pass exactly one of delta (rowsum(O dO) computed outside) and out (the forward's output: "
                     "the kernel computes delta from it)")
  _check(q, k, v, d_out, lse, delta, segment_ids, chunk, block_k, stages)
  if fused:
    if out.shape != d_out.shape or out.dtype != d_out.dtype:
      raise ValueError(f"out must be the forward's output, shaped and typed as d_out {d_out.dtype}{d_out.shape}, "
                       f"got {out.dtype}{out.shape}")
    if persistent_ctas is None:
      raise ValueError("out (delta computed in the kernel) needs the persistent schedule: pass persistent_ctas "
                       "(the SM count, 132 on an H200) and delta_ctas")
    if isinstance(delta_ctas, bool) or not isinstance(delta_ctas, int) or not 0 < delta_ctas < persistent_ctas:
      raise ValueError(f"delta_ctas {delta_ctas!r}: with out=, give 1 .. persistent_ctas - 1 = {persistent_ctas - 1} "
                       "programs that compute delta (about 14 of 132 on an H200)")
  elif delta_ctas:
    raise ValueError("delta_ctas needs out= (the forward's output, from which those programs compute delta)")
  if spans_per_program is not None and spans_per_program < 1:
    raise ValueError(f"spans_per_program {spans_per_program} < 1: use None (a pair's whole walk) or >= 1")
  if persistent_ctas is not None:
    if isinstance(persistent_ctas, bool) or not isinstance(persistent_ctas, int) or persistent_ctas < 1:
      raise ValueError(f"persistent_ctas {persistent_ctas!r}: use None or an int >= 1 (e.g. the SM count, 132 "
                       "on an H200)")
    if block_k != BLOCK:
      raise ValueError(f"persistent_ctas needs block_k={BLOCK} (one 128 x 128 tile per step of the schedule), "
                       f"got block_k={block_k}")
    if spans_per_program is not None:
      raise ValueError("persistent_ctas and spans_per_program exclude each other (a persistent program's tiles "
                       "are one span each): pass spans_per_program=None")
  from jax.experimental.pallas import mosaic_gpu as plgpu  # Mosaic GPU: imported only when used

  batch, length, heads, dk = q.shape
  dv = v.shape[-1]
  dtype = q.dtype
  n_chunks = length // chunk
  nbq = chunk // BLOCK
  n_pairs = (nbq + 1) // 2
  kb = block_k // BLOCK  # key blocks per full span
  kq, kv = dk // _TK, dv // _TK  # ring steps of a span: Q K^T, then dO V^T
  # the longest pair's walk (Python ints: _pair_spans' arithmetic with the middle block counted once)
  max_spans = max((p + kb) // kb + ((nbq - 1 - p + kb) // kb if nbq - 1 - p != p else 0) for p in range(n_pairs))
  per_program = max_spans if spans_per_program is None else min(spans_per_program, max_spans)
  n_groups = -(-max_spans // per_program)
  spt = kq + kv
  total_tiles = batch * heads * n_chunks * nbq * (nbq + 1) // 2  # the persistent schedule's
  n_ch = batch * heads * n_chunks  # chunk-heads
  scale2 = scale * _LOG2E
  swizzle = plgpu.find_swizzle(_TK * jnp.dtype(dtype).itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(swizzle))

  # 2-D views (free reshapes of contiguous arrays): TMA boxes then take (row, column) offsets.
  q2, k2 = q.reshape(batch * length, heads * dk), k.reshape(batch * length, heads * dk)
  v2, do2 = v.reshape(batch * length, heads * dv), d_out.reshape(batch * length, heads * dv)

  # The ring, shared by both schedules. scoped = ((lhs_smem, rhs_smem, out_smem, stat_smem),
  # (lhs_bar, rhs_bar, consumed, stat_bar)); ring step g uses slot g % stages.
  def ring_load(scoped, g, lhs_src, rhs_src, width: int):
    """Producer: TMA lhs_src [128, 64] and rhs_src [width, 64] into step g's slot, once it is free."""
    (lhs_smem, rhs_smem, _, _), (lhs_bar, rhs_bar, consumed, _) = scoped
    slot = lax.rem(g, stages)

    @pl.when(g >= stages)
    def _():
      plgpu.barrier_wait(consumed.at[slot])

    rhs_dst = rhs_smem.at[slot] if width == block_k else rhs_smem.at[slot].at[pl.ds(0, width)]
    plgpu.copy_gmem_to_smem(lhs_src, lhs_smem.at[slot], lhs_bar.at[slot])
    plgpu.copy_gmem_to_smem(rhs_src, rhs_dst, rhs_bar.at[slot])

  def ring_drain(scoped, total):
    """Producer: wait out the last releases of `total` steps (mgpu_ring.ring_drain)."""
    mgpu_ring.ring_drain(scoped[1][2], total, stages)

  def ring_accumulate(scoped, g0, n_steps, width: int, row_off):
    """Consumer: sum over ring steps g0 .. g0 + n_steps - 1 of lhs[my 64 rows] @ rhs[:width]^T:
    [64, width] float32. Each step's wgmma is waited for at once and its slot released."""
    (lhs_smem, rhs_smem, _, _), (lhs_bar, rhs_bar, consumed, _) = scoped

    def run(acc_ref):
      @pl.loop(0, n_steps)
      def _step(s):
        slot = lax.rem(g0 + s, stages)
        plgpu.barrier_wait(lhs_bar.at[slot])
        plgpu.barrier_wait(rhs_bar.at[slot])
        rhs = rhs_smem.at[slot] if width == block_k else rhs_smem.at[slot].at[pl.ds(0, width)]
        plgpu.wgmma(acc_ref, lhs_smem.at[slot].at[pl.ds(row_off, _HALF)], plgpu.transpose_ref(rhs, (1, 0)))
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(consumed.at[slot])

      return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC((_HALF, width), jnp.float32))

  def store_rows(scoped, wg, value, dst_ref, rows, col0):
    """Consumer: value [64, width] (input dtype) -> dst_ref[rows, col0 : col0 + width], through the
    warpgroup's two staging buffers in turn (every store has an even number of 64-column rounds)."""
    out_smem = scoped[0][2]
    for e in range(value.shape[1] // _EPI):
      buf = out_smem.at[wg, e % 2]
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store two rounds back has read buf
      buf[...] = value[:, e * _EPI:(e + 1) * _EPI]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(buf, dst_ref.at[rows, pl.ds(col0 + e * _EPI, _EPI)])

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, p_ref, ds_ref, scoped):
    if persistent_ctas is not None:
      return persistent_body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, p_ref, ds_ref, scoped)
    stat_smem, stat_bar = scoped[0][3], scoped[1][3]  # the ring and staging: ring_* and store_rows
    bh = lax.axis_index("bh")
    n = lax.axis_index("chunk")
    b = lax.div(bh, heads)
    h = lax.rem(bh, heads)
    wg = lax.axis_index("wg")
    blk1, spans1, blk2, spans2 = _pair_spans(lax.axis_index("pair"), nbq, kb)
    # This program's spans of the pair's walk: [t_lo, t_hi) (empty for the last groups of short walks).
    t_lo = lax.axis_index("group") * per_program
    t_hi = jnp.minimum(t_lo + per_program, spans1 + spans2)
    n_spans = jnp.maximum(t_hi - t_lo, 0)
    x_row0 = b * length + n * chunk  # this chunk's first row in q2, k2, v2, do2
    buf_row0 = bh * length + n * chunk  # and in the tile buffers

    def widths():  # (static width, predicate on the span's key-block count) of each code path
      if kb == 1:
        return ((BLOCK, None),)
      return ((2 * BLOCK, lambda count: count == 2), (BLOCK, lambda count: count == 1))

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      load = functools.partial(ring_load, scoped)

      def span_loads(u, i, j0, width: int):
        q_rows = pl.ds(x_row0 + i * BLOCK, BLOCK)
        k_rows = pl.ds(x_row0 + j0 * BLOCK, width)
        g0 = u * spt  # ring steps count from this program's first span

        @pl.loop(0, kq)
        def _qk(s):
          cols = pl.ds(h * dk + s * _TK, _TK)
          load(g0 + s, q_ref.at[q_rows, cols], k_ref.at[k_rows, cols], width)

        @pl.loop(0, kv)
        def _dov(s):
          cols = pl.ds(h * dv + s * _TK, _TK)
          load(g0 + kq + s, do_ref.at[q_rows, cols], v_ref.at[k_rows, cols], width)

      @pl.loop(0, n_spans)
      def _spans(u):
        i, j0, count = _span(t_lo + u, spans1, blk1, blk2, kb)
        for width, pred in widths():
          if pred is None:
            span_loads(u, i, j0, width)
          else:
            pl.when(pred(count))(lambda width=width: span_loads(u, i, j0, width))

      ring_drain(scoped, n_spans * spt)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      row_off = wg * _HALF  # this warpgroup's first row within a query block

      def stat_barrier(which: int, s: int):
        return stat_bar.at[wg * 4 + which * 2 + s]

      def load_stats(which: int, blk):  # issued up front: they land while the ring fills
        rows = pl.ds(n * chunk + blk * BLOCK + row_off, _HALF)
        for s, ref in enumerate((lse_ref, delta_ref)):
          plgpu.copy_gmem_to_smem(ref.at[b, h, rows], stat_smem.at[wg, which, s], stat_barrier(which, s))

      # [t_lo, t_hi) meets the first query block's spans [0, spans1) and/or the second's [spans1, ...).
      first_lo, first_hi = t_lo, jnp.minimum(t_hi, spans1)
      second_lo, second_hi = jnp.maximum(t_lo, spans1), t_hi

      @pl.when(first_hi > first_lo)
      def _():
        load_stats(0, blk1)

      @pl.when(second_hi > second_lo)
      def _():
        load_stats(1, blk2)

      def accumulate(g0, n_steps, width: int):
        return ring_accumulate(scoped, g0, n_steps, width, row_off)

      def store(value, dst_ref, i, j0):
        """value [64, width] (input dtype) -> my rows of tile row block i, columns from key block j0."""
        store_rows(scoped, wg, value, dst_ref, pl.ds(buf_row0 + i * BLOCK + row_off, _HALF), j0 * BLOCK)

      def span(t, i, j0, lse, delta, width: int):
        shape = (_HALF, width)
        g0 = (t - t_lo) * spt
        s = accumulate(g0, kq, width)
        q_pos = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
        k_pos = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
        # key j0*128 + c is visible to query i*128 + row_off + r iff c <= r + (i - j0)*128 + row_off:
        # always off the diagonal (i > j0 + width/128 - 1 there), causal on it.
        visible = k_pos <= q_pos + ((i - j0) * BLOCK + row_off)
        p = jnp.where(visible, jnp.exp2(s * scale2 - lax.broadcast_in_dim(lse, shape, [0])), 0.0)
        store(p.astype(dtype), p_ref, i, j0)
        if width > BLOCK:  # held as stored across the dv loop: 64 registers a thread, not 128
          p = p.astype(dtype)
        dp = accumulate(g0 + kq, kv, width)
        ds = p.astype(jnp.float32) * (dp - lax.broadcast_in_dim(delta, shape, [0]))
        if scale != 1.0:
          ds = ds * scale
        store(ds.astype(dtype), ds_ref, i, j0)

      def query_block(which: int, t0, count):
        for s in range(2):
          plgpu.barrier_wait(stat_barrier(which, s))
        lse = plgpu.load(stat_smem.at[wg, which, 0], (), layout=plgpu.Layout.WGMMA.reduce(1))
        delta = plgpu.load(stat_smem.at[wg, which, 1], (), layout=plgpu.Layout.WGMMA.reduce(1))

        @pl.loop(t0, t0 + count)
        def _spans(t):
          i, j0, n_blocks = _span(t, spans1, blk1, blk2, kb)
          for width, pred in widths():
            if pred is None:
              span(t, i, j0, lse, delta, width)
            else:
              pl.when(pred(n_blocks))(lambda width=width: span(t, i, j0, lse, delta, width))

      @pl.when(first_hi > first_lo)
      def _():
        query_block(0, first_lo, first_hi - first_lo)

      @pl.when(second_hi > second_lo)
      def _():
        query_block(1, second_lo, second_hi - second_lo)

      plgpu.wait_smem_to_gmem(0)

  def tile_loads(scoped, refs, b, h, n, i, j, g0, halfway=None):
    """Producer (persistent schedules): tile (i, j) of chunk n of (b, h) into ring steps g0 .. g0 + spt - 1:
    Q_i, K_j over dk, then dO_i, V_j over dv; `halfway()`, if given, runs halfway through the dv steps.
    refs: (q_ref, k_ref, v_ref, do_ref), the 2-D views."""
    q_ref, k_ref, v_ref, do_ref = refs
    load = functools.partial(ring_load, scoped, width=BLOCK)
    x_row0 = b * length + n * chunk
    q_rows, k_rows = pl.ds(x_row0 + i * BLOCK, BLOCK), pl.ds(x_row0 + j * BLOCK, BLOCK)

    @pl.loop(0, kq)
    def _qk(s):
      cols = pl.ds(h * dk + s * _TK, _TK)
      load(g0 + s, q_ref.at[q_rows, cols], k_ref.at[k_rows, cols])

    def dov(lo, hi):
      @pl.loop(lo, hi)
      def _dov(s):
        cols = pl.ds(h * dv + s * _TK, _TK)
        load(g0 + kq + s, do_ref.at[q_rows, cols], v_ref.at[k_rows, cols])

    if halfway is None:
      dov(0, kv)
    else:
      dov(0, kv // 2)
      halfway()
      dov(kv // 2, kv)

  def tile_probs(s, lse, i, j, row_off):
    """Consumer: P of my 64 rows of tile (i, j) (persistent schedules) from S = Q_i K_j^T [64, 128]
    float32 and the rows' lse [64] (base 2)."""
    shape = (_HALF, BLOCK)
    q_pos = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
    k_pos = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    visible = k_pos <= q_pos + ((i - j) * BLOCK + row_off)  # as in `body`: bites on the diagonal only
    return jnp.where(visible, jnp.exp2(s * scale2 - lax.broadcast_in_dim(lse, shape, [0])), 0.0)

  def tile_ds(p, dp, delta):
    """Consumer: dS = P (dP - delta) * scale of my 64 rows: [64, 128] float32 each, delta [64]."""
    ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [0]))
    return ds * scale if scale != 1.0 else ds

  def persistent_body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, p_ref, ds_ref, scoped):
    """`body` for the persistent schedule: this program's tiles are c, c + P, ... of the global order
    (`_persistent_tile`), one 128 x 128 span each; ring steps count on across them (step u * spt + s
    of local tile u), so the producer fills the ring with the next tile while the consumers finish one."""
    stat_smem, stat_bar = scoped[0][3], scoped[1][3]  # the ring and staging: ring_* and store_rows
    wg = lax.axis_index("wg")
    cta = lax.axis_index("cta")
    n_tiles = lax.div(total_tiles - cta + (persistent_ctas - 1), persistent_ctas)  # 0 for idle programs

    def tile(u):  # local tile u -> (b, h, this chunk's first row in q2 etc., in the buffers, i, j)
      bh, n, i, j = _persistent_tile(cta + u * persistent_ctas, n_chunks, nbq)
      return lax.div(bh, heads), lax.rem(bh, heads), n, bh * length + n * chunk, i, j

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      @pl.loop(0, n_tiles)
      def _tiles(u):
        b, h, n, _, i, j = tile(u)
        tile_loads(scoped, (q_ref, k_ref, v_ref, do_ref), b, h, n, i, j, u * spt)

      ring_drain(scoped, n_tiles * spt)  # once per program: the ring runs on across its tiles

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      row_off = wg * _HALF

      def stat_barrier(slot, s: int):
        return stat_bar.at[wg * 4 + slot * 2 + s]

      def load_stats(slot, u):
        """My 64 rows of lse, delta for local tile u -> stat slot `slot` (alternating: u % 2)."""
        b, h, n, _, i, _ = tile(u)
        rows = pl.ds(n * chunk + i * BLOCK + row_off, _HALF)
        for s, ref in enumerate((lse_ref, delta_ref)):
          plgpu.copy_gmem_to_smem(ref.at[b, h, rows], stat_smem.at[wg, slot, s], stat_barrier(slot, s))

      def accumulate(g0, n_steps):
        return ring_accumulate(scoped, g0, n_steps, BLOCK, row_off)

      def store(value, dst_ref, rows, j):  # two rounds per store: the buffers alternate across tiles too
        store_rows(scoped, wg, value, dst_ref, rows, j * BLOCK)

      @pl.when(n_tiles > 0)
      def _():
        load_stats(0, 0)

      @pl.loop(0, n_tiles)
      def _tiles(u):
        slot = lax.rem(u, 2)

        # The next tile's stats go to the other slot, last read (into registers) at the start of tile
        # u - 1: that tile's stores since (commit_smem: proxy fence, warpgroup barrier) order the
        # read before this TMA write. Each slot's barriers then see one load per wait, in order.
        @pl.when(u + 1 < n_tiles)
        def _():
          load_stats(1 - slot, u + 1)

        for s in range(2):
          plgpu.barrier_wait(stat_barrier(slot, s))
        lse = plgpu.load(stat_smem.at[wg, slot, 0], (), layout=plgpu.Layout.WGMMA.reduce(1))
        delta = plgpu.load(stat_smem.at[wg, slot, 1], (), layout=plgpu.Layout.WGMMA.reduce(1))
        _, _, _, buf_row0, i, j = tile(u)
        rows = pl.ds(buf_row0 + i * BLOCK + row_off, _HALF)
        g0 = u * spt
        p = tile_probs(accumulate(g0, kq), lse, i, j, row_off)
        store(p.astype(dtype), p_ref, rows, j)
        store(tile_ds(p, accumulate(g0 + kq, kv), delta).astype(dtype), ds_ref, rows, j)

      plgpu.wait_smem_to_gmem(0)

  def streamed_delta_body(q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref, p_ref, ds_ref, delta_ref, scoped, extra):
    """Delta on programs of its own (`delta_ctas`): programs cta < delta_ctas stream O_i and dO_i of query
    blocks (chunk-head, i) in order through the ring, sum O * dO and store delta, raising the block's
    semaphore; programs cta >= delta_ctas run the persistent tiles (`_persistent_tile` over the others),
    every tile waiting for its block's delta (the producer polls halfway through its dv loads)."""
    delta_smem, (delta_bar, pair_bar) = extra
    (lhs_smem, rhs_smem, _, stat_smem), (lhs_bar, rhs_bar, consumed, stat_bar) = scoped
    wg = lax.axis_index("wg")
    cta = lax.axis_index("cta")
    n_blocks = n_ch * nbq
    tile_ctas = persistent_ctas - delta_ctas
    is_delta = cta < delta_ctas
    tcta = jnp.maximum(cta - delta_ctas, 0)
    n_items = jnp.where(is_delta, lax.div(n_blocks - cta + (delta_ctas - 1), delta_ctas),
                        lax.div(total_tiles - tcta + (tile_ctas - 1), tile_ctas))
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    if interpret is None:  # the interpreter runs programs one after another, the delta programs first
      sems = pl.get_global(plgpu.SemaphoreType.REGULAR((n_blocks + 2,)))
      epoch_sem, done_sem = sems.at[n_blocks], sems.at[n_blocks + 1]
    else:
      sems = None

    def delta_item(u):  # a delta program's item u -> (b, h, chunk n, chunk-head, i)
      g = cta + u * delta_ctas
      ch, i = lax.div(g, nbq), lax.rem(g, nbq)
      bh = lax.div(ch, n_chunks)
      return lax.div(bh, heads), lax.rem(bh, heads), lax.rem(ch, n_chunks), ch, i

    def tile(u):  # a tile program's tile u -> (b, h, chunk n, chunk-head, i, j)
      bh, n, i, j = _persistent_tile(tcta + u * tile_ctas, n_chunks, nbq)
      return lax.div(bh, heads), lax.rem(bh, heads), n, bh * n_chunks + n, i, j

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      load = functools.partial(ring_load, scoped, width=BLOCK)
      target = None if sems is None else pl.semaphore_read(epoch_sem) + 1

      @pl.when(is_delta)
      def _delta_loads():
        def run(u, carry):
          b, h, n, _, i = delta_item(u)
          rows = pl.ds(b * length + n * chunk + i * BLOCK, BLOCK)

          @pl.loop(0, kv)
          def _step(s):
            cols = pl.ds(h * dv + s * _TK, _TK)
            load(u * kv + s, o_ref.at[rows, cols], do_ref.at[rows, cols])

          return carry

        lax.fori_loop(0, n_items, run, 0)
        ring_drain(scoped, n_items * kv)

      @pl.when(jnp.logical_not(is_delta))
      def _tile_loads():
        def run(u, carry):
          b, h, n, ch, i, j = tile(u)

          def fetch_delta():  # the block's delta, once its delta program raised the semaphore
            slot = lax.rem(u, 2)
            if sems is not None:
              plgpu.semaphore_wait(sems.at[ch * nbq + i], target, decrement=False, memory_scope="gpu")
            delta_smem.at[slot][...] = plgpu.load(delta_ref.at[b, h, pl.ds(n * chunk + i * BLOCK, BLOCK)], ())
            plgpu.barrier_arrive(delta_bar.at[slot])

          tile_loads(scoped, (q_ref, k_ref, v_ref, do_ref), b, h, n, i, j, u * spt, halfway=fetch_delta)
          return carry

        lax.fori_loop(0, n_items, run, 0)
        ring_drain(scoped, n_items * spt)

      if sems is not None:  # this program is done; the last one advances the epoch
        plgpu.semaphore_signal(done_sem, 1, memory_scope="gpu")

        @pl.when(cta == 0)
        def _advance():
          plgpu.semaphore_wait(done_sem, persistent_ctas, memory_scope="gpu")  # back to 0
          plgpu.semaphore_signal(epoch_sem, 1, memory_scope="gpu")

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      row_off = wg * _HALF
      mine = pl.ds(row_off, _HALF)

      @pl.when(is_delta)
      def _delta_sums():
        def run(u, carry):
          b, h, n, ch, i = delta_item(u)

          def step(s, dsum):
            slot = lax.rem(u * kv + s, stages)
            plgpu.barrier_wait(lhs_bar.at[slot])
            plgpu.barrier_wait(rhs_bar.at[slot])
            out = plgpu.load(lhs_smem.at[slot].at[mine], (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
            d_out = plgpu.load(rhs_smem.at[slot].at[mine], (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
            plgpu.barrier_arrive(consumed.at[slot])
            return dsum + jnp.sum(out * d_out, axis=1)

          dsum = lax.fori_loop(0, kv, step, plgpu.layout_cast(jnp.zeros((_HALF,), jnp.float32), row_layout))
          delta_ref.at[b, h, pl.ds(n * chunk + i * BLOCK + row_off, _HALF)][...] = dsum
          plgpu.barrier_arrive(pair_bar)  # both halves stored before the signal
          plgpu.barrier_wait(pair_bar)
          if sems is not None:
            @pl.when(wg == 0)
            def _publish():
              plgpu.semaphore_signal(sems.at[ch * nbq + i], 1, memory_scope="gpu")

          return carry

        lax.fori_loop(0, n_items, run, 0)

      @pl.when(jnp.logical_not(is_delta))
      def _tiles():
        def load_lse(slot, u):  # my 64 rows of lse for tile u -> stat slot `slot` (u % 2)
          b, h, n, _, i, _ = tile(u)
          plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(n * chunk + i * BLOCK + row_off, _HALF)],
                                  stat_smem.at[wg, slot], stat_bar.at[wg * 2 + slot])

        @pl.when(n_items > 0)
        def _():
          load_lse(0, 0)

        def run(u, carry):
          slot = lax.rem(u, 2)

          @pl.when(u + 1 < n_items)  # the other slot was read at the start of tile u - 1 (see persistent_body)
          def _():
            load_lse(1 - slot, u + 1)

          plgpu.barrier_wait(stat_bar.at[wg * 2 + slot])
          lse = plgpu.load(stat_smem.at[wg, slot], (), layout=row_layout)
          b, h, n, _, i, j = tile(u)
          rows = pl.ds((b * heads + h) * length + n * chunk + i * BLOCK + row_off, _HALF)
          g0 = u * spt
          p = tile_probs(ring_accumulate(scoped, g0, kq, BLOCK, row_off), lse, i, j, row_off)
          store_rows(scoped, wg, p.astype(dtype), p_ref, rows, j * BLOCK)
          dp = ring_accumulate(scoped, g0 + kq, kv, BLOCK, row_off)
          plgpu.barrier_wait(delta_bar.at[slot])
          delta = plgpu.load(delta_smem.at[slot].at[mine], (), layout=row_layout)
          store_rows(scoped, wg, tile_ds(p, dp, delta).astype(dtype), ds_ref, rows, j * BLOCK)
          return carry

        lax.fori_loop(0, n_items, run, 0)

      plgpu.wait_smem_to_gmem(0)

  def entry(*refs):
    if fused:
      pl.run_scoped(
          lambda smem, bars: streamed_delta_body(*refs, (smem[:4], bars[:4]), (smem[4], bars[4:])),
          (plgpu.SMEM((stages, BLOCK, _TK), dtype, transforms=transforms),
           plgpu.SMEM((stages, block_k, _TK), dtype, transforms=transforms),
           plgpu.SMEM((2, 2, _HALF, _EPI), dtype, transforms=transforms),
           plgpu.SMEM((2, 2, _HALF), jnp.float32),  # lse [wg, slot]
           plgpu.SMEM((2, BLOCK), jnp.float32)),  # the tiles' delta, one slot per tile parity
          (plgpu.Barrier(num_barriers=stages),
           plgpu.Barrier(num_barriers=stages),
           plgpu.Barrier(num_arrivals=2, num_barriers=stages),
           plgpu.Barrier(num_barriers=4),
           plgpu.Barrier(num_barriers=2),
           plgpu.Barrier(num_arrivals=2)),  # a delta item's two consumers: both halves stored
          collective_axes="wg",
      )
      return
    pl.run_scoped(
        lambda *scoped: body(*refs, scoped),
        (plgpu.SMEM((stages, BLOCK, _TK), dtype, transforms=transforms),
         plgpu.SMEM((stages, block_k, _TK), dtype, transforms=transforms),
         plgpu.SMEM((2, 2, _HALF, _EPI), dtype, transforms=transforms),
         plgpu.SMEM((2, 2, 2, _HALF), jnp.float32)),
        (plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_arrivals=2, num_barriers=stages),
         plgpu.Barrier(num_barriers=8)),
        collective_axes="wg",
    )

  tile_type = jax.ShapeDtypeStruct((batch * heads * length, chunk), dtype)
  kernel = plgpu.kernel(
      entry,
      out_type=(tile_type, tile_type) + ((jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),) if fused else ()),
      # The last grid axis runs fastest: a chunk-head's programs run together (see the docstring).
      grid=(batch * heads, n_chunks, n_pairs, n_groups) if persistent_ctas is None else (persistent_ctas,),
      grid_names=("bh", "chunk", "pair", "group") if persistent_ctas is None else ("cta",),
      num_threads=3,
      thread_name="wg",
      # Mosaic GPU reserves 2 KiB of shared memory for cross-warp reductions wherever a kernel reduces;
      # delta's row sums stay within a warp, and the 5-stage ring with the O slots needs that space.
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **({} if interpret is None else {"interpret": interpret}),
  )
  shape = (batch, heads, length, chunk)
  if fused:
    p_buf, ds_buf, delta = kernel(q2, k2, v2, do2, out.reshape(batch * length, heads * dv), lse)
    return p_buf.reshape(shape), ds_buf.reshape(shape), delta
  p_buf, ds_buf = kernel(q2, k2, v2, do2, lse, delta)
  return p_buf.reshape(shape), ds_buf.reshape(shape)
