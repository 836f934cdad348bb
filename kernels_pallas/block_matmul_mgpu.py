"""Block-causal matmuls of chunked attention as a Pallas Mosaic GPU kernel: the forward's
Y = rowscale * (P~ V) and (transpose_m) the backward's dV = P^T dO, dK = dS^T Q.

Same inputs, outputs and semantics as `chunk_attention._tr_block_matmul(plan, m_buf, x, None, None,
out_dtype, rscale)` for square tiles (block_q == block_k == `block`, chunk a multiple of block, no
segment ids, no padding tails):

  Y[b, n*C + i*bq + r, h, d] = rscale[b, h, n*C + i*bq + r]
                               * sum_{j <= i} sum_c M[b, h, n*C + i*bq + r, j*bk + c] X[b, n*C + j*bk + c, h, d]

M [B, H, n*C, C] holds the probability tiles (only tiles at or below each chunk's block diagonal
are read, so the others may hold anything, NaN included); X [B, L, H, dv]; rscale [B, H, L] float32
(1 / row sums) or None.

Why Mosaic GPU. The Triton kernel reaches 490-580 TFLOP/s on an H200 (cp.async loads, no warp
specialisation); cuBLAS reaches 680-720 on large matmuls. This kernel uses what cuBLAS uses: TMA
loads into swizzled shared memory, wgmma, and a producer warpgroup that runs ahead of two consumer
warpgroups through a ring of `stages` buffers guarded by mbarriers.

Structure of one program (CTA of 3 warpgroups):
  * work items: one d tile of width block_d of one (chunk, batch, head) and TWO query blocks,
    i = p and i' = nbq - 1 - p (the pair p). Query block i visits i + 1 key blocks, so the pair visits
    nbq + 1 of them whatever p is: every item is the same work (no tail of long items), and the
    producer streams both blocks' tiles through one ring without draining it in between. (With odd
    nbq the middle block pairs with itself and is done once: a shorter item.) The pipeline is written
    by hand (as in jax's attention_mgpu example) rather than with
    `plgpu.emit_pipeline_warp_specialized` because the trip count is dynamic (it depends on p) and
    the accumulator must be flushed to HBM between the two query blocks; the hand-written ring
    keeps loading across that flush.
  * grid schedule (persistent_ctas=None, the default): one program per item, grid
    (B * H, n_chunks, pairs * d_tiles), launched tile-fastest (Mosaic GPU makes the last grid axis
    CUDA's x): the 64 programs of one (chunk, batch, head) share its M rows and X columns in L2.
    (With the tiles axis first, the grid ran bh-fastest: 28% L2 hits, DRAM-bound at 3.7 TB/s,
    1.42 ms.) The persistent schedule (below) runs the same items in the same order.
  * warpgroup 2 (producer): for every ring step, waits until both consumers released the ring slot,
    then TMA-loads the [block, tk] tile of M and the [tk, block_d] tile of X (X viewed as 2-D
    [B*L, H*dv]: rows of head h are strided, the column offset h*dv + d0 selects the head).
  * warpgroups 0, 1 (consumers): each owns half of the d tile ([block, block_d / 2] float32
    accumulator in registers), issues wgmma on the shared M tile and its half of the X tile and
    releases the slot ('immediate': once the wgmma finished; 'lagged': one step later, one wgmma
    kept in flight). After a query block: scale the rows by rscale, cast, store through shared
    memory by TMA (epi_cols columns a round; a round waits until the previous store has read the
    staging buffer).
  * row scales: two slots per consumer ([block] float32 each), used in turn by the program's output
    blocks; at the start of a block the next block's rows (the item's second block, else the next
    item's first) are TMA-loaded into the other slot, so they land under a whole block of wgmma.
  * ring, drain, accumulation and staged stores are the same code in both schedules (`ring_load`,
    `ring_accumulate`, `store_rows`, `mgpu_ring.ring_drain`); the schedules differ only in which
    items a program takes (`body`'s `item` and `over_items`).

Persistent schedule (`persistent_ctas=P`; chunk_attention runs it with P = the SM count, 4 stages). With one
item per program (4096 programs at the benchmark shape, ~31 waves of one CTA per SM: 226 KiB of
shared memory) every program pays its own prologue (the ring's first loads, the first row scales)
and epilogue (the last block's flush, TMA store and its wait) with nothing to overlap them. Instead
P programs (grid (P,)) take the items of the grid schedule's order (bh, chunk, then tile =
d tile * pairs + pair; `_persistent_item` decodes a global index with divisions by constants):
program c does items c, c + P, c + 2P, ..., so at any moment the P programs are on ~P consecutive
items, the same one to three chunk-heads as the grid's waves (same L2 working set). Per program:
  * the producer's ring step counter runs on across items (carried through the item loop: items of
    odd nbq's middle pair are shorter), so it loads the next item's tiles as soon as slots are
    released, while the consumers scale and store the last block; the final drain is once per
    program;
  * the consumers keep their accumulators per block as in the grid schedule and go from a block's
    TMA store straight to the next block's wgmma; the staging buffer is rewritten only after
    `wait_smem_to_gmem(0, wait_read_only=True)` (the previous store has read it);
  * row-scale slots alternate by the running count of output blocks (the item loop carries its
    parity); a slot is refilled by TMA only after its last read into registers, which the previous
    block's stores' commit_smem (proxy fence, warpgroup barrier) orders before the TMA write; each
    row-scale barrier sees one load per wait, in order;
  * item counts differ by at most one (4096 items over 132 programs: 32 or 31 each); a program beyond
    the item count does nothing.
Measured on an H200 (2026-11-30), the whole attention op with all four matmuls on this schedule
(P = 132) against the grid, interleaved: 3.968 against 4.103 ms (faster in 16 of 17 rounds) and
3.995 against 4.069 (11 rounds), outputs bit-identical. Not yet probed kernel by kernel:
experiments/gpu_checks/probe_mgpu_matmul.py --only persistent (P = 132 and 264, 3 and 4 stages,
forward and transposed); chunk_attention's A/B switch MEGALODON_ATTENTION_MATMUL_PERSISTENT=<programs>.

Two products in one launch (`second=(m_buf2, x2)`, transposed and persistent only): the backward's
dK = dS^T Q runs in dV = P^T dO's launch. An item's d tile index runs over the first product's d tiles,
then the second's (dv / block_d + dk / block_d a chunk-head: 8 + 1 at the benchmark shape), so one
global order holds both; the producer picks its TMA sources and the consumers their output by the
item (two branches on one traced flag, the same ring and staging). Why: 4096 dV items over 132
programs leave the last round with 4 busy programs (32 rounds for 31.03 of work), dK's 512 items 4
rounds for 3.88; together 4608 items take 35 rounds for 34.9, and there is one launch less. On an
H200 (2026-12-01, interleaved A/Bs of the whole op, outputs bit-identical): 4.002 against 4.047 ms
over 15 rounds and 4.032 against 4.051 over 25 with the order reversed
(`gpu_checks/2026-12-01_nvidia-h200_ab_matmul_pair{,_reversed}.json`).

Shared memory (bf16; the H200 allows 227 KiB a block): ring stages * (block * 64 + 64 * block_d) * 2 B
(48 KiB a stage at block 128, block_d 256), staging 2 * block * epi_cols * 2 B, row scales
2 warpgroups * 2 slots * block * 4 B (2 KiB), barriers. At block 128, block_d 256: 3 stages with
128-column stores 210 KiB; 4 stages with 64-column stores (chunk_attention's) 226 KiB (231552 B, a
lowering test pins it). The persistent schedule adds nothing.

CPU: Mosaic GPU kernels cannot run here, but they lower: `jax.export.export(..., platforms=["cuda"])`
runs the Pallas -> Mosaic GPU lowering (layouts, transforms, barrier and TMA shapes, the
shared-memory total against 227 KiB) and embeds the module in a `mosaic_gpu_v2` custom call (no
safety check needs disabling). The kernel also runs under Mosaic GPU's CPU interpreter
(tests/mgpu_interpreter.py: barriers, TMA offsets, item order, row-scale slots, races; wgmma
synchronous). Compilation to PTX, registers and TMA descriptor checks happen only on the GPU.

API (written against jax 0.10.2, to run under 0.11.2): only calls that jax's own attention_mgpu and
hopper_matmul_mgpu examples use in both versions (plgpu.kernel with thread_name, run_scoped with
collective_axes="wg", copy_gmem_to_smem with a barrier, Barrier(num_arrivals, num_barriers), ACC,
wgmma / wgmma_wait, load(..., layout=Layout.WGMMA.reduce(1)), set_max_registers). Not passed on
purpose: a kernel `name` (0.10.2's plgpu.kernel forwards it to the Mesh, which rejects it).
On an H200 (experiments/gpu_checks/probe_mgpu_matmul.py, 2026-11-30; B=1, 16 chunks of 2048, 4 heads,
dv 2048, bf16; chunk_attention's defaults since): P V 0.947 ms (580 TFLOP/s) against 1.11 for the
Triton kernel, P^T dO 0.985 against 1.10, errors equal to Triton's against the float32 reference.
What mattered was the launch order: with the tiles axis first the grid ran bh-fastest, the tiles
that share a chunk-head's data ran apart, and the kernel was DRAM-bound (ncu: 28% L2 hits,
3.7 TB/s, 1.42 ms). A deeper ring (4 stages, room made by 64-column output stores) and freeing each
slot as soon as its wgmma finished gave the rest.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels_pallas import mgpu_ring

# The custom-call target the Mosaic GPU lowering emits (what a lowering test looks for).
MOSAIC_GPU_CALL = "mosaic_gpu_v2"
_TK = 64  # reduction step: 64 bf16 = 128 bytes, the widest TMA swizzle
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


def block_causal_matmul_reference(m_buf: jax.Array, x: jax.Array, rscale: jax.Array | None, chunk: int,
                                  block: int, transpose_m: bool = False) -> jax.Array:
  """Dense float32 reference: m_buf [B, H, n*C, C], x [B, n*C, H, dv], rscale [B, H, n*C] -> [B, n*C, H, dv].

  Tiles above a chunk's block diagonal are excluded with `where` (they may hold garbage, NaN included).
  transpose_m: each chunk's (masked) M transposed, Y = M^T X (rscale must be None).
  """
  batch, heads, rows, cols = m_buf.shape
  n_chunks = rows // chunk
  if cols != chunk or rows != n_chunks * chunk or chunk % block:
    raise ValueError(f"m_buf {m_buf.shape} does not hold {chunk}-row chunks of {block}-tiles")
  tile = jnp.arange(chunk) // block
  visible = tile[None, :] <= tile[:, None]  # [C, C]: key block at or before query block
  m = m_buf.reshape(batch, heads, n_chunks, chunk, chunk).astype(jnp.float32)
  m = jnp.where(visible, m, 0.0)
  xs = x.reshape(batch, n_chunks, chunk, heads, x.shape[-1]).astype(jnp.float32)
  if transpose_m:
    if rscale is not None:
      raise ValueError("transpose_m takes no rscale")
    m = jnp.swapaxes(m, -1, -2)
  y = jnp.einsum("bhnqk,bnkhd->bnqhd", m, xs, precision=lax.Precision.HIGHEST)
  if rscale is not None:
    scale = rscale.astype(jnp.float32).reshape(batch, heads, n_chunks, chunk).transpose(0, 2, 3, 1)
    y = y * scale[..., None]
  return y.reshape(batch, n_chunks * chunk, heads, x.shape[-1])


def _check(m_buf, x, rscale, chunk: int, block: int, block_d: int, stages: int):
  """Shapes this kernel supports (anything else: ValueError, nothing is padded)."""
  if m_buf.ndim != 4 or x.ndim != 4:
    raise ValueError(f"m_buf [B, H, n*C, C] and x [B, L, H, dv] expected, got {m_buf.shape}, {x.shape}")
  batch, length, heads, width = x.shape
  if chunk <= 0 or length % chunk:
    raise ValueError(f"sequence length {length} is not a multiple of chunk {chunk}")
  if m_buf.shape != (batch, heads, length, chunk):
    raise ValueError(f"m_buf {m_buf.shape} != (B, H, L, chunk) = {(batch, heads, length, chunk)} "
                     "(chunk must be a multiple of block: no padded tile rows)")
  if block not in (64, 128):
    raise ValueError(f"block {block} unsupported: 64 or 128 (wgmma rows are multiples of 64; "
                     "a 256-row float32 accumulator does not fit the registers)")
  if chunk % block:
    raise ValueError(f"chunk {chunk} is not a multiple of block {block}")
  if block_d not in (128, 256):
    raise ValueError(f"block_d {block_d} unsupported: 128 or 256 (two warpgroups of 64 or 128 columns)")
  if width % block_d:
    raise ValueError(f"feature width {width} is not a multiple of block_d {block_d}")
  if jnp.dtype(m_buf.dtype) != jnp.dtype(x.dtype) or jnp.dtype(x.dtype) not in map(jnp.dtype, _SUPPORTED_DTYPES):
    raise ValueError(f"m_buf and x must share a 16-bit float dtype, got {m_buf.dtype}, {x.dtype}")
  if rscale is not None and (rscale.shape != (batch, heads, length) or rscale.dtype != jnp.float32):
    raise ValueError(f"rscale must be float32 {(batch, heads, length)}, got {rscale.dtype} {rscale.shape}")
  if stages < 2:
    raise ValueError(f"stages {stages} < 2")


def _persistent_item(g, n_chunks: int, n_pairs: int, n_dt: int):
  """Global work item g of the persistent order -> (bh, chunk n, pair, d tile).

  The grid schedule's order: chunk-heads bh major, then chunk, then its tile index fastest, itself
  d tile major and pair minor (tile = dt * n_pairs + pair). Divisions by constants, no table.
  Non-negative scalars in (traced int32, Python ints or integer arrays), the same out.
  """
  per_ch = n_pairs * n_dt
  ch, tile = lax.div(g, per_ch), lax.rem(g, per_ch)
  return lax.div(ch, n_chunks), lax.rem(ch, n_chunks), lax.rem(tile, n_pairs), lax.div(tile, n_pairs)


def persistent_schedule(batch: int, heads: int, n_chunks: int, chunk: int, block: int, width: int, block_d: int,
                        ctas: int):
  """(total work items, items of each program [ctas]) of the persistent schedule: program c does
  global items c, c + ctas, ... (Python ints; the kernel computes its own count the same way)."""
  total = batch * heads * n_chunks * ((chunk // block + 1) // 2) * (width // block_d)
  return total, [(total - c + ctas - 1) // ctas for c in range(ctas)]


class _Item(NamedTuple):
  """One work item (a query-block pair of one d tile of one chunk-head) as traced int32 scalars."""
  b: jax.Array
  h: jax.Array
  n: jax.Array  # chunk
  blk1: jax.Array  # output block p
  blk2: jax.Array  # output block nbq - 1 - p
  steps1: jax.Array  # ring steps of blk1
  steps2: jax.Array  # ring steps of blk2 (0 for the middle block of odd nbq, done once as blk1)
  m_row0: jax.Array  # row of the chunk's first query in the 2-D view of M
  x_row0: jax.Array  # row of the chunk's first key / query in the 2-D views of X and Y
  col0: jax.Array  # first column of the d tile in the 2-D views of X and Y
  second: jax.Array | bool = False  # a d tile of the second product (`second=`), else of the first


def block_causal_matmul_mgpu(m_buf: jax.Array, x: jax.Array, rscale: jax.Array | None, *, chunk: int,
                             block: int, block_d: int = 256, stages: int = 3, out_dtype=None,
                             release: str = "lagged", epi_cols: int | None = None,
                             transpose_m: bool = False, persistent_ctas: int | None = None,
                             second: tuple[jax.Array, jax.Array] | None = None,
                             interpret=None) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Y = rowscale * block-causal(M) @ X on a Hopper GPU (Pallas Mosaic GPU).

  m_buf [B, H, n*C, C] (C = chunk), x [B, n*C, H, dv], rscale [B, H, n*C] float32 or None
  -> [B, n*C, H, dv] in out_dtype (default x.dtype). block: the square tile (64 or 128); block_d: the
  output columns of one program (split between two consumer warpgroups); stages: ring depth.
  interpret: passed to plgpu.kernel (the tests run the kernel under Mosaic GPU's CPU interpreter).
  release: 'lagged' keeps one wgmma in flight and frees a ring slot one step late (the producer then
  runs stages - 1 steps ahead); 'immediate' waits for each step's wgmma and frees its slot at once
  (stages steps ahead, as jax's Hopper matmul example). epi_cols: columns of each output store
  through shared memory (default: the warpgroup's block_d / 2); 64 halves the staging buffer, which
  makes room for a fourth ring stage at block 128, block_d 256.
  transpose_m: Y = block-causal(M)^T @ X instead (the backward's dV = P^T dO and dK = dS^T Q):
  output row block j of a chunk sums over query blocks i >= j of M[i, j]^T X[i]; rscale must be None.
  persistent_ctas: launch this many programs (e.g. the SM count) that share all work items (query-block
  pair, d tile, chunk-head) in one global order, program c taking items c, c + persistent_ctas, ...;
  each program's ring streams on from item to item ("Persistent schedule" in the module docstring).
  None: one program per work item (the grid schedule).
  second: (m_buf2, x2), a second transposed product of the same chunks (the backward's dK = dS^T Q
  beside dV = P^T dO) run in the same launch: its d tiles follow the first product's in each
  chunk-head's items, so one persistent order covers both (no second launch, and the last round's
  idle programs once instead of twice). Needs transpose_m, no rscale, persistent_ctas, x2 [B, L, H, d2]
  with d2 a multiple of block_d. Returns (Y, Y2), Y2 = block-causal(M2)^T @ X2.
  """
  if transpose_m and rscale is not None:
    raise ValueError("transpose_m=True takes no rscale (the backward's transposed products have none)")
  if release not in ("lagged", "immediate"):
    raise ValueError(f"release must be 'lagged' or 'immediate', got {release!r}")
  if persistent_ctas is not None and (isinstance(persistent_ctas, bool) or not isinstance(persistent_ctas, int)
                                      or persistent_ctas < 1):
    raise ValueError(f"persistent_ctas {persistent_ctas!r}: use None (one program per work item) or an int >= 1 "
                     "(e.g. the SM count, 132 on an H200)")
  from jax.experimental.pallas import mosaic_gpu as plgpu  # Mosaic GPU: imported only when used

  _check(m_buf, x, rscale, chunk, block, block_d, stages)
  if second is not None:
    if not transpose_m or rscale is not None or persistent_ctas is None:
      raise ValueError("second= (a second product in the same launch) needs transpose_m=True, rscale=None and "
                       "persistent_ctas")
    m_buf2, x_b = second
    if m_buf2.shape != m_buf.shape or x_b.shape[:3] != x.shape[:3] or x_b.dtype != x.dtype:
      raise ValueError(f"second=: m_buf {m_buf2.shape} and x {x_b.shape} {x_b.dtype} must match the first "
                       f"product's chunks ({m_buf.shape}, {x.shape[:3]}, {x.dtype})")
    _check(m_buf2, x_b, None, chunk, block, block_d, stages)
  batch, length, heads, width = x.shape
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  n_chunks = length // chunk
  nbq = chunk // block
  n_pairs = (nbq + 1) // 2
  n_dt1 = width // block_d  # d tiles of the first product
  width2 = 0 if second is None else second[1].shape[-1]
  n_dt = n_dt1 + width2 // block_d  # and of both
  total_items = batch * heads * n_chunks * n_pairs * n_dt  # the persistent schedule's
  wn = block_d // 2  # columns per consumer warpgroup
  epi = epi_cols or wn
  if wn % epi or epi % 64:
    raise ValueError(f"epi_cols {epi_cols} must be a multiple of 64 dividing block_d / 2 = {wn}")
  kpb = block // _TK  # ring steps per key block
  dtype = x.dtype
  itemsize = jnp.dtype(dtype).itemsize

  def swizzled(minor_elems: int, size: int):
    swizzle = plgpu.find_swizzle(minor_elems * size * 8)
    return (plgpu.TilingTransform((8, swizzle // size)), plgpu.SwizzleTransform(swizzle))

  in_transforms = swizzled(_TK, itemsize)
  out_transforms = swizzled(epi, out_dtype.itemsize)

  # 2-D views (free reshapes of contiguous arrays): TMA boxes then take (row, column) offsets.
  m2 = m_buf.reshape(batch * heads * length, chunk)
  x2 = x.reshape(batch * length, heads * width)

  def make_item(bh, n, pair, dt) -> _Item:
    def blocks_of(blk):  # input blocks summed into output block blk: j <= blk, or i >= blk transposed
      return nbq - blk if transpose_m else blk + 1

    b, h = lax.div(bh, heads), lax.rem(bh, heads)
    blk1, blk2 = pair, nbq - 1 - pair
    col0, is2 = h * width + dt * block_d, False
    if second is not None:
      is2 = dt >= n_dt1
      col0 = jnp.where(is2, h * width2 + (dt - n_dt1) * block_d, col0)
    return _Item(b=b, h=h, n=n, blk1=blk1, blk2=blk2, steps1=blocks_of(blk1) * kpb,
                 steps2=jnp.where(blk2 != blk1, blocks_of(blk2) * kpb, 0),  # odd nbq: the middle block once
                 m_row0=bh * length + n * chunk, x_row0=b * length + n * chunk, col0=col0, second=is2)

  # The ring and the staged stores, shared by both schedules. scoped = ((m_smem, x_smem, out_smem,
  # rs_smem), (m_bar, x_bar, consumed, rs_bar)); ring step g uses slot g % stages.
  def ring_load(scoped, g, m_src, x_src):
    """Producer: TMA m_src and x_src into step g's slot, once both consumers released it."""
    (m_smem, x_smem, _, _), (m_bar, x_bar, consumed, _) = scoped
    slot = lax.rem(g, stages)

    @pl.when(g >= stages)
    def _():
      plgpu.barrier_wait(consumed.at[slot])

    plgpu.copy_gmem_to_smem(m_src, m_smem.at[slot], m_bar.at[slot])
    plgpu.copy_gmem_to_smem(x_src, x_smem.at[slot], x_bar.at[slot])

  def ring_accumulate(scoped, wg, g0, n_steps):
    """Consumer: sum over ring steps g0 .. g0 + n_steps - 1 of M tile @ my half of the X tile:
    [block, wn] float32. Every step's slot is released once (both release modes)."""
    (m_smem, x_smem, _, _), (m_bar, x_bar, consumed, _) = scoped

    def run(acc_ref):
      @pl.loop(0, n_steps)
      def _step(k):
        g = g0 + k
        slot = lax.rem(g, stages)
        plgpu.barrier_wait(m_bar.at[slot])
        plgpu.barrier_wait(x_bar.at[slot])
        a = plgpu.transpose_ref(m_smem.at[slot], (1, 0)) if transpose_m else m_smem.at[slot]
        plgpu.wgmma(acc_ref, a, x_smem.at[slot].at[:, pl.ds(wg * wn, wn)])
        if release == "immediate":
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(consumed.at[slot])
        else:
          # One wgmma stays in flight; the one before it has finished reading its slot.
          plgpu.wgmma_wait(1)

          @pl.when(k > 0)
          def _():
            plgpu.barrier_arrive(consumed.at[lax.rem(g - 1, stages)])

      if release == "lagged":
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(consumed.at[lax.rem(g0 + n_steps - 1, stages)])
      return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC((block, wn), jnp.float32))

  def store_rows(scoped, wg, value, dst_ref, rows, col0):
    """Consumer: value [block, wn] (out_dtype) -> dst_ref[rows, col0 : col0 + wn], epi columns a
    round through the warpgroup's staging buffer."""
    out_buf = scoped[0][2].at[wg]
    for e in range(wn // epi):
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous store (maybe the last item's) read out_buf
      out_buf[...] = value[:, e * epi:(e + 1) * epi]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_buf, dst_ref.at[rows, pl.ds(col0 + e * epi, epi)])

  def on_product(it: _Item, fn, first_refs, second_refs):
    """fn(*refs) with the refs of the item's product (a branch on the item when there are two)."""
    if second is None:
      fn(*first_refs)
      return
    pl.when(it.second)(lambda: fn(*second_refs))
    pl.when(jnp.logical_not(it.second))(lambda: fn(*first_refs))

  def body(m_ref, x_ref, rs_ref, y_ref, scoped, m2_ref=None, x2_ref=None, y2_ref=None):
    rs_smem, rs_bar = scoped[0][3], scoped[1][3]  # the ring and staging: ring_* and store_rows
    wg = lax.axis_index("wg")
    if persistent_ctas is None:  # one item per program, from the grid
      n_items = 1

      def item(u):
        del u
        tile = lax.axis_index("tile")
        return make_item(lax.axis_index("bh"), lax.axis_index("chunk"), lax.rem(tile, n_pairs),
                         lax.div(tile, n_pairs))
    else:  # items cta, cta + P, ... of the global order
      cta = lax.axis_index("cta")
      n_items = lax.div(total_items - cta + (persistent_ctas - 1), persistent_ctas)  # 0 for idle programs

      def item(u):
        return make_item(*_persistent_item(cta + u * persistent_ctas, n_chunks, n_pairs, n_dt))

    def over_items(fn, init):
      """carry = fn(u, carry) over this program's items u: one call, or a loop (persistent)."""
      if persistent_ctas is None:
        return fn(0, init)
      return pl.loop(0, n_items, init_carry=init)(fn)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def item_loads(u, g0):
        """The item's ring steps g0, g0 + 1, ...: blk1's input range, then blk2's, no gap."""
        it = item(u)

        @pl.loop(0, it.steps1 + it.steps2)
        def _step(k):
          second = k >= it.steps1
          oblk = jnp.where(second, it.blk2, it.blk1)  # output block
          kk = jnp.where(second, k - it.steps1, k)  # ring step within the output block's input range
          if transpose_m:  # input rows: queries from block oblk on; M tile [TK queries, block keys]
            r = oblk * block + kk * _TK
            m_rows, m_cols = pl.ds(it.m_row0 + r, _TK), pl.ds(oblk * block, block)
          else:  # input rows: keys from 0; M tile [block queries, TK keys]
            r = kk * _TK
            m_rows, m_cols = pl.ds(it.m_row0 + oblk * block, block), pl.ds(r, _TK)
          on_product(it, lambda m, x: ring_load(scoped, g0 + k, m.at[m_rows, m_cols],
                                                x.at[pl.ds(it.x_row0 + r, _TK), pl.ds(it.col0, block_d)]),
                     (m_ref, x_ref), (m2_ref, x2_ref))

        return g0 + it.steps1 + it.steps2

      # The ring runs on across items: drained once per program, not per item.
      mgpu_ring.ring_drain(scoped[1][2], over_items(item_loads, jnp.int32(0)), stages)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")

      def load_rs(slot, it: _Item, qblk):
        """Row scales of output block qblk of item `it` -> my rs slot `slot` (TMA, rs_bar)."""
        plgpu.copy_gmem_to_smem(rs_ref.at[it.b, it.h, pl.ds(it.n * chunk + qblk * block, block)],
                                rs_smem.at[wg, slot], rs_bar.at[wg * 2 + slot])

      def load_next_rs(slot, u):
        """The first block's row scales of the program's next item, if there is one."""
        if persistent_ctas is None:
          return

        @pl.when(u + 1 < n_items)
        def _():
          nxt = item(u + 1)
          load_rs(slot, nxt, nxt.blk1)

      def query_block(slot, it: _Item, qblk, g0, n_steps):
        acc = ring_accumulate(scoped, wg, g0, n_steps)
        if rs_ref is not None:
          plgpu.barrier_wait(rs_bar.at[wg * 2 + slot])
          scale = plgpu.load(rs_smem.at[wg, slot], (), layout=plgpu.Layout.WGMMA.reduce(1))
          acc = acc * lax.broadcast_in_dim(scale, acc.shape, [0])
        on_product(it, lambda y: store_rows(scoped, wg, acc.astype(out_dtype), y, pl.ds(it.x_row0 + qblk * block, block),
                                            it.col0 + wg * wn), (y_ref,), (y2_ref,))

      def item_blocks(u, carry):
        """The item's one or two output blocks. Row scales alternate between the two rs slots by the
        program's running count of output blocks (`slot` is its parity): at the start of a block the
        next block's rows (this item's blk2, else the next item's blk1) go to the other slot, last read
        (into registers) by the previous block's epilogue, whose stores' commit_smem (proxy fence,
        warpgroup barrier) orders that read before this TMA write. Each rs barrier then sees one load
        per wait, in order."""
        g0, slot = carry
        it = item(u)
        has2 = it.steps2 > 0
        if rs_ref is not None:
          @pl.when(has2)
          def _():
            load_rs(1 - slot, it, it.blk2)

          @pl.when(jnp.logical_not(has2))
          def _():
            load_next_rs(1 - slot, u)

        query_block(slot, it, it.blk1, g0, it.steps1)

        @pl.when(has2)
        def _():
          if rs_ref is not None:
            load_next_rs(slot, u)
          query_block(1 - slot, it, it.blk2, g0 + it.steps1, it.steps2)

        return g0 + it.steps1 + it.steps2, jnp.where(has2, slot, 1 - slot)

      if rs_ref is not None:  # the program's first block: issued first, it lands while the ring fills
        if persistent_ctas is None:
          first = item(0)
          load_rs(0, first, first.blk1)
        else:
          @pl.when(n_items > 0)
          def _():
            first = item(0)
            load_rs(0, first, first.blk1)

      over_items(item_blocks, (jnp.int32(0), jnp.int32(0)))
      plgpu.wait_smem_to_gmem(0)

  def entry(m_ref, x_ref, *refs):
    extra = {}
    if second is not None:  # inputs m, x, m2, x2; outputs y, y2
      m2_ref, x2_ref, y_ref, y2_ref = refs
      rs_ref, extra = None, dict(m2_ref=m2_ref, x2_ref=x2_ref, y2_ref=y2_ref)
    else:
      rs_ref, y_ref = (None, refs[0]) if rscale is None else refs
    pl.run_scoped(
        lambda *scoped: body(m_ref, x_ref, rs_ref, y_ref, scoped, **extra),
        (plgpu.SMEM((stages, _TK, block) if transpose_m else (stages, block, _TK), dtype,
                    transforms=in_transforms),
         plgpu.SMEM((stages, _TK, block_d), dtype, transforms=in_transforms),
         plgpu.SMEM((2, block, epi), out_dtype, transforms=out_transforms),
         plgpu.SMEM((2, 2, block), jnp.float32)),
        (plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_arrivals=2, num_barriers=stages),
         plgpu.Barrier(num_barriers=4)),
        collective_axes="wg",
    )

  out_type = jax.ShapeDtypeStruct((batch * length, heads * width), out_dtype)
  if second is not None:
    out_type = (out_type, jax.ShapeDtypeStruct((batch * length, heads * width2), out_dtype))
  kernel = plgpu.kernel(
      entry,
      out_type=out_type,
      # Mosaic GPU launches the LAST grid axis fastest (CUDA's x; Pallas Triton launches the first):
      # the tiles of one (chunk, batch, head), which share its M rows and X columns, run together.
      # Persistent: P programs walk the same order (`_persistent_item`).
      grid=(batch * heads, n_chunks, n_pairs * n_dt) if persistent_ctas is None else (persistent_ctas,),
      grid_names=("bh", "chunk", "tile") if persistent_ctas is None else ("cta",),
      num_threads=3,
      thread_name="wg",
      **({} if interpret is None else {"interpret": interpret}),
  )
  if second is not None:
    y, y2 = kernel(m2, x2, second[0].reshape(m2.shape), second[1].reshape(batch * length, heads * width2))
    return y.reshape(batch, length, heads, width), y2.reshape(batch, length, heads, width2)
  args = (m2, x2) if rscale is None else (m2, x2, rscale)
  return kernel(*args).reshape(batch, length, heads, width)
