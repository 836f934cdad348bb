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
  * grid (B * H, n_chunks, pairs * d_tiles), launched tile-fastest (Mosaic GPU makes the last grid
    axis CUDA's x): the 64 programs of one (chunk, batch, head) share its M rows and X columns in
    L2. (With the tiles axis first, the grid ran bh-fastest: 28% L2 hits, DRAM-bound at 3.7 TB/s,
    1.42 ms.) A program owns one d tile of width block_d of one
    (chunk, batch, head) and TWO query blocks, i = p and i' = nbq - 1 - p. Query block i visits
    i + 1 key blocks, so the pair visits nbq + 1 of them whatever p is: every program does the same
    work (no tail of long programs), and the producer streams both blocks' tiles through one ring
    without draining it in between. (With odd nbq the middle block pairs with itself and is done
    once.) The pipeline is written by hand (as in jax's attention_mgpu example) rather than with
    `plgpu.emit_pipeline_warp_specialized` because the trip count is dynamic (it depends on p) and
    the accumulator must be flushed to HBM between the two query blocks; the hand-written ring
    keeps loading across that flush.
  * warpgroup 2 (producer): for every step, waits until both consumers released the ring slot,
    then TMA-loads the [block, tk] tile of M and the [tk, block_d] tile of X (X viewed as 2-D
    [B*L, H*dv]: rows of head h are strided, the column offset h*dv + d0 selects the head).
  * warpgroups 0, 1 (consumers): each owns half of the d tile ([block, block_d / 2] float32
    accumulator in registers), issues wgmma on the shared M tile and its half of the X tile, keeps
    one wgmma in flight and releases the previous step's slot. After a query block: scale the rows
    by rscale (TMA-loaded into shared memory at the block's start), cast, store through shared
    memory by TMA.

Shared memory at the defaults (block 128, block_d 256, tk 64, 3 stages): 3 * 48 KiB ring + 64 KiB
output staging = 208 KiB of the H200's 227 KiB.

CPU: Mosaic GPU kernels cannot run here, but they lower: `jax.export.export(..., platforms=["cuda"])`
runs the Pallas -> Mosaic GPU lowering (layouts, transforms, barrier and TMA shapes) and embeds the
module in a `mosaic_gpu_v2` custom call (no safety check needs disabling). Compilation to PTX,
shared-memory limits and TMA descriptor checks happen only on the GPU.

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

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

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


def block_causal_matmul_mgpu(m_buf: jax.Array, x: jax.Array, rscale: jax.Array | None, *, chunk: int,
                             block: int, block_d: int = 256, stages: int = 3, out_dtype=None,
                             release: str = "lagged", epi_cols: int | None = None,
                             transpose_m: bool = False, interpret=None) -> jax.Array:
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
  """
  if transpose_m and rscale is not None:
    raise ValueError("transpose_m=True takes no rscale (the backward's transposed products have none)")
  if release not in ("lagged", "immediate"):
    raise ValueError(f"release must be 'lagged' or 'immediate', got {release!r}")
  from jax.experimental.pallas import mosaic_gpu as plgpu  # Mosaic GPU: imported only when used

  _check(m_buf, x, rscale, chunk, block, block_d, stages)
  batch, length, heads, width = x.shape
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  n_chunks = length // chunk
  nbq = chunk // block
  n_pairs = (nbq + 1) // 2
  n_dt = width // block_d
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

  def body(m_ref, x_ref, rs_ref, y_ref, scoped):
    (m_smem, x_smem, out_smem, rs_smem), (m_bar, x_bar, consumed, rs_bar) = scoped
    tile = lax.axis_index("tile")
    pair = lax.rem(tile, n_pairs)
    d0 = lax.div(tile, n_pairs) * block_d
    n = lax.axis_index("chunk")
    bh = lax.axis_index("bh")
    b = lax.div(bh, heads)
    h = lax.rem(bh, heads)
    wg = lax.axis_index("wg")
    blk1 = pair
    blk2 = nbq - 1 - pair

    def blocks_of(blk):  # input blocks summed into output block blk: j <= blk, or i >= blk transposed
      return nbq - blk if transpose_m else blk + 1

    steps1 = blocks_of(blk1) * kpb
    steps2 = jnp.where(blk2 != blk1, blocks_of(blk2) * kpb, 0)  # odd nbq: the middle block only once
    total = steps1 + steps2
    m_row0 = bh * length + n * chunk  # row of this chunk's first query in m2
    x_row0 = b * length + n * chunk  # row of this chunk's first key / query in x2 and y2
    col0 = h * width + d0

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      @pl.loop(0, total)
      def _step(g):
        slot = lax.rem(g, stages)
        second = g >= steps1
        oblk = jnp.where(second, blk2, blk1)  # output block
        k = jnp.where(second, g - steps1, g)  # ring step within the output block's input range

        @pl.when(g >= stages)
        def _():
          plgpu.barrier_wait(consumed.at[slot])

        if transpose_m:  # input rows: queries from block oblk on; M tile [TK queries, block keys]
          r = oblk * block + k * _TK
          m_src = m_ref.at[pl.ds(m_row0 + r, _TK), pl.ds(oblk * block, block)]
        else:  # input rows: keys from 0; M tile [block queries, TK keys]
          r = k * _TK
          m_src = m_ref.at[pl.ds(m_row0 + oblk * block, block), pl.ds(r, _TK)]
        plgpu.copy_gmem_to_smem(m_src, m_smem.at[slot], m_bar.at[slot])
        plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(x_row0 + r, _TK), pl.ds(col0, block_d)],
                                x_smem.at[slot], x_bar.at[slot])

      # Wait out the last releases so that no barrier is left mid-phase when the CTA exits.
      @pl.loop(jnp.maximum(total - stages, 0), total)
      def _drain(g):
        plgpu.barrier_wait(consumed.at[lax.rem(g, stages)])

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")

      def query_block(which: int, qblk, step0, n_steps):
        rs_buf = rs_smem.at[wg, which]
        if rs_ref is not None:  # issued first: it lands while the block's wgmma run
          plgpu.copy_gmem_to_smem(rs_ref.at[b, h, pl.ds(n * chunk + qblk * block, block)], rs_buf,
                                  rs_bar.at[wg * 2 + which])

        def accumulate(acc_ref):
          @pl.loop(0, n_steps)
          def _step(k):
            g = step0 + k
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
            plgpu.barrier_arrive(consumed.at[lax.rem(step0 + n_steps - 1, stages)])
          return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((block, wn), jnp.float32))
        if rs_ref is not None:
          plgpu.barrier_wait(rs_bar.at[wg * 2 + which])
          scale = plgpu.load(rs_buf, (), layout=plgpu.Layout.WGMMA.reduce(1))
          acc = acc * lax.broadcast_in_dim(scale, acc.shape, [0])
        out_buf = out_smem.at[wg]
        acc = acc.astype(out_dtype)
        for e in range(wn // epi):
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous store has read out_buf
          out_buf[...] = acc[:, e * epi:(e + 1) * epi]
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(out_buf, y_ref.at[pl.ds(x_row0 + qblk * block, block),
                                                    pl.ds(col0 + wg * wn + e * epi, epi)])

      query_block(0, blk1, 0, steps1)

      @pl.when(steps2 > 0)
      def _():
        query_block(1, blk2, steps1, steps2)

      plgpu.wait_smem_to_gmem(0)

  def entry(m_ref, x_ref, *refs):
    rs_ref, y_ref = (None, refs[0]) if rscale is None else refs
    pl.run_scoped(
        lambda *scoped: body(m_ref, x_ref, rs_ref, y_ref, scoped),
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

  kernel = plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((batch * length, heads * width), out_dtype),
      # Mosaic GPU launches the LAST grid axis fastest (CUDA's x; Pallas Triton launches the first):
      # the tiles of one (chunk, batch, head), which share its M rows and X columns, run together.
      grid=(batch * heads, n_chunks, n_pairs * n_dt),
      grid_names=("bh", "chunk", "tile"),
      num_threads=3,
      thread_name="wg",
      **({} if interpret is None else {"interpret": interpret}),
  )
  args = (m2, x2) if rscale is None else (m2, x2, rscale)
  return kernel(*args).reshape(batch, length, heads, width)
