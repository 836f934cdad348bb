"""Forward scores of chunked attention as a Pallas Mosaic GPU kernel: the P~ tiles, 1 / l and lse.

Same inputs, outputs and semantics as `chunk_attention._tr_scores(plan, q, k, p_dtype, None)` with
fwd_scores='bounded' (bound given) or 'twopass' (bound None) at square 128 tiles (block_q == block_k
== 128; the Triton default at 16 bits), without segment ids:

  S = (Q_i K_j^T) * scale * log2(e)         query block i, key block j <= i of one chunk (base 2)
  m = row max of S over the diagonal block  if every row r of block i has bound[r] - m[r] <= 64
      row max of S over all j <= i          otherwise ('twopass': always)
  P~_ij = exp2(S_ij - m)                    masked entries (key after query) 0; stored in p_dtype
  l = row sum of P~ (float32, unrounded)    l := 1 where l == 0
  rscale = 1 / l, lse = m + log2(l)         [B, H, L] float32 each

q, k [B, L, H, dk]; bound [B, H, L] float32 (`chunk_attention._score_bound`: |q_r| max|k| |scale2|
with headroom) or None; p_buf [B, H, L, C] with the tiles at or below each chunk's block diagonal
written and the others left as they were (undefined). Restricted to C % 128 == 0, dk % 64 == 0,
dk <= 256, 16-bit q, k and P~, L % C == 0; `_check` raises ValueError otherwise (callers then use
the Triton kernel).

Why Mosaic GPU. On an H200 at B=1, 16 chunks of 2048, 4 heads, dk 256 the Triton scores kernel
takes 0.32-0.47 ms for ~0.08 TFLOP of Q K^T and 256 MiB of P~ stores, about 0.15 ms of work. Here
TMA streams K into swizzled shared memory, wgmma computes S, and the P~ tiles leave by TMA stores,
each warpgroup doing one thing at a time while the others run.

Structure of one program (CTA of 3 warpgroups):
  * grid (B * H, n_chunks, pairs), launched pair-fastest (Mosaic GPU makes the last grid axis
    CUDA's x): the programs of one (chunk, batch, head) run together and read its K (1 MiB at the
    benchmark shape) from L2. A program owns two query blocks of one chunk, i = nbq - 1 - p, then
    i' = p (with odd nbq the middle block pairs with itself and is done once): query block i visits
    i + 1 key blocks, so every program visits nbq + 1 of them.
  * warpgroups 0 and 1 (consumers) own 64 rows each of the current query block: Q [64, dk] in
    shared memory (TMA-loaded at the block's start), an S accumulator [64, 128] float32 in registers.
  * warpgroup 2 (producer) streams the K tiles of the block's schedule through a ring of `stages`
    slots of [128 keys, 64 features] (a K tile is dk / 64 slots), each slot guarded by a `loaded`
    barrier (TMA) and a `consumed` barrier (both consumers arrive after their wgmma read it).

Schedule of query block i (one K tile per step):
  1. K_i, the diagonal: S masked (key <= query), m = row max. With a bound: each consumer writes
     bound - m of its 64 rows to shared memory and arrives on a barrier; both then read all 128
     gaps and reduce them to one decision, `fail` = some row's gap > 64 (and i > 0: block 0 has
     nothing but its diagonal). Consumer 0 also writes `fail` to a shared flag and arrives on a
     second barrier, which only the producer waits on. Without a bound, fail = i > 0.
     If not fail, m is final: P~_ii is computed from the S still in registers and stored now.
  2. K_0 .. K_{i-1}: if not fail, P~_ij with the final m (the whole block is done after i + 1 steps:
     Q K^T once per tile, as a one-pass kernel); if fail, pass 1 continues: m = max(m, row max).
  3. only if fail: K_0 .. K_i again, P~_ij with the final m (masked on the diagonal).
  The producer streams steps 1 and 2 without knowing the decision (the same tiles either way) and
  waits for the flag only before step 3, by when consumer 0 has long written it: the ring never
  stalls on the decision. Then rscale and lse of the block's rows go out through shared memory.

Consumers release a ring slot as soon as the wgmma reading it has finished (progressive
`wgmma_wait(n)` over the dk / 64 slots of a tile). P~ tiles leave through one [64, 128] staging
buffer per consumer: the TMA store of tile j reads it while the wgmma of tile j + 1 runs.

Both consumers wait for the same K tile, so left alone they may issue their wgmma together, finish
together and then both spend the tile's exp2 and stores (about half a wgmma's time, MUFU-bound) with
the tensor cores idle. `pingpong=True` makes them take turns (a pair of barriers passes the turn
once a warpgroup's wgmma has one 64-feature step left), so that one's exp2 / stores run under the
other's wgmma, as FlashAttention-3 does. Which is faster is for the probe to say.

`overlap=True` instead pipelines each consumer's own tiles (FlashAttention-3's intra-warpgroup
overlap): a consumer holds the S of one tile as a plain [64, 128] float32 value while the wgmma of
the next accumulates into a second, in-flight accumulator (64 + 64 registers per thread of the 232
the consumers get). A run of tiles goes: issue the wgmma of tile j + 1; exp2 / row sums / P~ store
(or the row max, in pass 1) of tile j from registers, the tensor cores busy meanwhile; wait for tile
j + 1 (the progressive `wgmma_wait(n)` releasing its ring slots, as above: only one accumulator is
ever in flight, so the counts are unchanged), keep its S; and the run's last tile's work after the
loop. Where the bound holds the block is one run from the diagonal (P~ emitted once m is decided,
under the wgmma of K_0) over K_0 .. K_{i-1}; after a failed bound the rest of pass 1 is a run from
the diagonal (row maxima; the diagonal's again, which changes nothing) and pass 2 a second run from
K_0 (its first wgmma waited for at once). The decision exchange itself is not overlapped. The
producer, the ring steps and the slot barriers are those of the serial schedule. Slots are freed
only once the work under the wgmma is done (the waits come after it): a later refill than the
serial schedule's, which deeper rings absorb. P~ staging: the store of tile j - 1 has had the rest
of tile j's wgmma and tile j's exp2 to read its buffer before tile j's P~ is written there;
`p_buffers=2` alternates two buffers per consumer (each block emits exactly i + 1 tiles either way,
so the buffer of a tile is fixed by its place in the program's sequence), at 32 KiB more.

Trade-offs left open (for measurements to settle): each K tile serves 128 query rows, so K comes
from L2 at 64 KiB per 128 x 128 tile; at 0.1 ms for the benchmark shape that is ~5.5 TB/s of L2
reads on top of 2.7 TB/s of P~ stores. If the kernel turns out L2-bound, giving each consumer a
whole 128-row query block (two blocks per K tile: 256 rows, half the K traffic; Q then takes
128 KiB and the two consumers' schedules differ) is the next step. Q of a program's second block
is loaded when the first block is done, its latency not hidden (no room for a second Q buffer
beside a ring of more than 2 slots).

Shared memory (dk 256, bf16, stages 6): Q 2 * 64 * 256 * 2 = 64 KiB, ring 6 * 128 * 64 * 2 =
96 KiB, P~ staging 2 * 64 * 128 * 2 = 32 KiB, row vectors (bounds, gaps, rscale / lse) 2.5 KiB,
flags, barriers and alignment ~1 KiB, Mosaic GPU's reduction scratch 2 KiB: 199.2 KiB (203,984 bytes
requested by the lowered kernel) of the H200's 227 KiB. `smem_bytes` counts it (a test holds it to
the lowered kernel's request); `_check` refuses configurations over 227 KiB (stages 8 at dk 256; with
p_buffers=2, 32 KiB more, stages 6: stages 5 asks 220,352 bytes). overlap adds no shared memory.

Measured on an H200 (experiments/gpu_checks/probe_mgpu_scores.py, 2026-11-30): bounded 0.295-0.313 ms
against Triton's 0.405 (stages 4-6; ping-pong consumers 0.35-0.37, slower), twopass 0.377 against
0.497; inside the whole op's check 0.339-0.353 against 0.44-0.47 ms, with the op's errors unchanged.
Checked on the CPU (tests/test_scores_mgpu.py): the dense reference against the Triton kernel
(interpreted); this kernel under Mosaic GPU's own interpreter (threads, barriers, TMA, wgmma
simulated) against the reference at small shapes; its lowering for CUDA at the benchmark shape.
overlap and p_buffers=2 (2026-12): checked so (also lowered under jax 0.11.2), not yet timed; the
interpreter runs wgmma synchronously, so whether ptxas keeps the wgmma asynchronous across the work
(no "wgmma serialized" warning under MOSAIC_GPU_DUMP_PTXAS=1) is for the GPU to show.

API (written against jax 0.10.2, to run under 0.11.2): the calls of block_matmul_mgpu.py and of
jax's attention_mgpu example (broadcasted_iota with a WGMMA layout, row reductions, exp2), plus
scalar loads and stores of shared memory and the reduction of a column-layout vector
(Layout.WGMMA.reduce(0), replicated over the warps, so no cross-warp scratch is involved).
Not passed on purpose: a kernel `name` (0.10.2's plgpu.kernel rejects it).
"""

from __future__ import annotations

import math

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

# The custom-call target the Mosaic GPU lowering emits (what a lowering test looks for).
MOSAIC_GPU_CALL = "mosaic_gpu_v2"
BLOCK = 128  # query and key tile: two consumer warpgroups of 64 rows; the P~ tile is BLOCK x BLOCK
_ROWS = 64  # query rows per consumer warpgroup (one wgmma M)
_TK = 64  # features per ring slot: 64 x 16 bits = 128 bytes, the widest TMA swizzle
_SMEM_LIMIT = 227 * 1024  # H100 / H200 shared memory per block
_REDUCTION_SCRATCH = 128 * 4 * 4  # Mosaic GPU's default reduction_scratch_bytes, reserved per kernel
_SMEM_SLACK = 2048  # barriers and alignment: the lowered kernel asks 1,224 bytes more than the buffers
# As chunk_attention's (a test checks they agree): the masked score and the bound's margin (base 2).
_MASK = -0.7 * float(np.finfo(np.float32).max)
_BOUND_MARGIN = 64.0
_LOG2E = math.log2(math.e)
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


def scores_reference(q: jax.Array, k: jax.Array, chunk: int, scale: float, block: int = BLOCK,
                     bound: jax.Array | None = None):
  """Dense float32 reference: q, k [B, L, H, dk], bound [B, H, L] or None -> (p_buf, rscale, lse).

  p_buf [B, H, L, C] float32 (P~ at or below each chunk's diagonal, 0 elsewhere, tiles above the
  block diagonal included); rscale, lse [B, H, L] float32. `block`: the query / key tile whose
  diagonal block decides m (as the Triton kernel's block_q == block_k).
  """
  batch, length, heads, width = q.shape
  n_chunks = length // chunk
  if length % chunk or chunk % block or k.shape != q.shape:
    raise ValueError(f"q {q.shape}, k {k.shape}: need equal shapes, L % chunk == 0, chunk % block == 0")
  split = lambda x: x.astype(jnp.float32).reshape(batch, n_chunks, chunk, heads, width)  # noqa: E731
  s = jnp.einsum("bnqhd,bnkhd->bhnqk", split(q), split(k), precision=lax.Precision.HIGHEST)
  s = s * (scale * _LOG2E)
  pos = jnp.arange(chunk)
  causal = pos[None, :] <= pos[:, None]  # [C, C]: key at or before query
  diagonal = causal & ((pos[None, :] // block) == (pos[:, None] // block))
  full_max = jnp.max(jnp.where(causal, s, _MASK), axis=-1)  # [B, H, n, C]
  m = full_max
  if bound is not None:
    diag_max = jnp.max(jnp.where(diagonal, s, _MASK), axis=-1)
    gap = (bound.reshape(batch, heads, n_chunks, chunk) - diag_max).reshape(
        batch, heads, n_chunks, chunk // block, block)
    holds = jnp.repeat(jnp.max(gap, axis=-1) <= _BOUND_MARGIN, block, axis=-1)
    m = jnp.where(holds, diag_max, full_max)
  p = jnp.where(causal, jnp.exp2(s - m[..., None]), 0.0)
  l = jnp.sum(p, axis=-1)
  l = jnp.where(l > 0.0, l, 1.0)
  rows = (batch, heads, length)
  return p.reshape(batch, heads, length, chunk), (1.0 / l).reshape(rows), (m + jnp.log2(l)).reshape(rows)


def smem_bytes(dk: int, stages: int, itemsize: int = 2, p_buffers: int = 1) -> int:
  """Shared memory of one program (see the module docstring), rounded up for barriers and alignment."""
  q = 2 * _ROWS * dk * itemsize
  ring = stages * BLOCK * _TK * itemsize
  staging = 2 * p_buffers * _ROWS * BLOCK * itemsize
  rows = (2 * 2 * _ROWS + 2 * BLOCK + 2 * 2 * 2 * _ROWS) * 4  # bounds, gaps, rscale / lse
  return q + ring + staging + rows + 2 * 4 + _REDUCTION_SCRATCH + _SMEM_SLACK


def _check(q, k, bound, chunk: int, p_dtype, stages: int, segment_ids, p_buffers: int = 1,
           overlap: bool = False, pingpong: bool = False) -> None:
  """Shapes this kernel supports (anything else: ValueError saying what to change; nothing is padded)."""
  if segment_ids is not None:
    raise ValueError("segment ids are not supported by the Mosaic GPU scores kernel: use the Triton "
                     "kernel (chunk_attention._tr_scores) for packed sequences")
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"q and k must both be [B, L, H, dk] of one shape, got {q.shape} and {k.shape}")
  batch, length, heads, width = q.shape
  if chunk <= 0 or chunk % BLOCK:
    raise ValueError(f"chunk {chunk} is not a multiple of {BLOCK}: use a chunk size that is (or the "
                     "Triton scores kernel)")
  if length % chunk:
    raise ValueError(f"sequence length {length} is not a multiple of chunk {chunk}: pad the sequence "
                     "to whole chunks (or use the Triton scores kernel)")
  if width % _TK or width > 4 * _TK:
    raise ValueError(f"dk {width} unsupported: a multiple of {_TK} up to {4 * _TK} (use the Triton "
                     "scores kernel otherwise)")
  supported = tuple(map(jnp.dtype, _SUPPORTED_DTYPES))
  if jnp.dtype(q.dtype) not in supported or k.dtype != q.dtype:
    raise ValueError(f"q and k must share a 16-bit float dtype (bfloat16 or float16), got {q.dtype}, "
                     f"{k.dtype}: cast them, or use the Triton scores kernel")
  if jnp.dtype(p_dtype) not in supported:
    raise ValueError(f"p_dtype {jnp.dtype(p_dtype)} unsupported: bfloat16 or float16")
  if bound is not None and (bound.shape != (batch, heads, length) or bound.dtype != jnp.float32):
    raise ValueError(f"bound must be float32 {(batch, heads, length)} (chunk_attention._score_bound), "
                     f"got {bound.dtype} {bound.shape}")
  kpt = width // _TK
  if stages < kpt:
    raise ValueError(f"stages {stages} < dk / {_TK} = {kpt}: the ring must hold one whole K tile")
  if p_buffers not in (1, 2):
    raise ValueError(f"p_buffers {p_buffers} unsupported: 1 or 2 P~ staging buffers per consumer")
  if overlap and pingpong:
    raise ValueError("overlap and pingpong are two different schedules: choose one")
  need = smem_bytes(width, stages, jnp.dtype(q.dtype).itemsize, p_buffers)
  if need > _SMEM_LIMIT:
    raise ValueError(f"stages {stages} at dk {width} with {p_buffers} P~ staging buffer(s) needs {need / 1024:.1f} "
                     f"KiB of shared memory, over {_SMEM_LIMIT // 1024} KiB: use fewer stages")


def chunk_scores_mgpu(q: jax.Array, k: jax.Array, bound: jax.Array | None, *, chunk: int, scale: float,
                      p_dtype=None, stages: int = 6, approx_math: bool = True, pingpong: bool = False,
                      overlap: bool = False, p_buffers: int = 1, uniform_decision: bool = True,
                      segment_ids=None, k_scale: jax.Array | None = None, interpret=None):
  """The forward scores of chunked attention on a Hopper GPU (Pallas Mosaic GPU).

  q, k [B, L, H, dk] (16-bit), bound [B, H, L] float32 (fwd_scores='bounded') or None ('twopass')
  -> p_buf [B, H, L, C] in p_dtype (default q.dtype; only the tiles at or below each chunk's block
  diagonal are written), rscale [B, H, L] float32, lse [B, H, L] float32 (base 2).
  stages: ring slots of [128, 64]; at least dk / 64. approx_math: exp2 / log2 by the hardware's
  approximate instructions (ex2.approx; Triton's exp2 is __nv_exp2f, of the same accuracy class).
  pingpong: the consumers take turns on the tensor cores (a warpgroup issues a tile's wgmma only
  after the other's has all but finished), so that one's exp2 / stores overlap the other's wgmma
  instead of both warpgroups running them in lockstep.
  overlap: each consumer software-pipelines its own tiles (FlashAttention-3's intra-warpgroup
  overlap): it issues the wgmma of the next K tile before the exp2 / row sums / P~ store of the tile
  whose S it holds in registers, and waits for that wgmma only afterwards (see the module docstring).
  Not with pingpong.
  p_buffers: P~ staging buffers per consumer (1 or 2); with 2 the P~ of consecutive tiles alternate
  between them, so a tile's staging write never waits for the TMA store of the tile before it.
  uniform_decision: broadcast the bound decision from lane 0 of each warp (shfl.sync.idx) before it sets
  the trip counts of the loops around the wgmma, so that ptxas sees those loops' branches as warp-uniform
  (without it ptxas serialises every wgmma of the bounded kernel: warning C7520). False: the old
  lowering, kept for A/B runs. No effect without a bound or under the interpreter.
  k_scale: [B, H, n_chunks] float32 with bound None: the kernel forms the bound itself as
  |q_r| k_scale + 1e-3 (`chunk_attention._score_bound`'s with k_scale = max |k| over the chunk times
  |scale2| (1 + 1e-3)), |q_r| from the diagonal of Q Q^T by wgmma on the Q block already in shared
  memory: no XLA pass over q (64 MiB at the benchmark shape, ~20 us on an H200). chunk_attention's
  default since 2026-12-01: the op 4.093 against 4.106 ms over 20 interleaved rounds, outputs
  bit-identical (gpu_checks/2026-12-01_nvidia-h200_ab_scores_inner_bound.json).
  interpret: passed to plgpu.kernel (tests run the kernel under Mosaic GPU's CPU interpreter).
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu  # Mosaic GPU: imported only when used

  if k_scale is not None:
    if bound is not None:
      raise ValueError("pass bound (computed outside) or k_scale (the bound formed inside), not both")
    want = (q.shape[0], q.shape[2], q.shape[1] // chunk if chunk > 0 else 0)
    if k_scale.shape != want or k_scale.dtype != jnp.float32:
      raise ValueError(f"k_scale must be float32 [B, H, n_chunks] = {want}, got {k_scale.dtype} {k_scale.shape}")

  p_dtype = jnp.dtype(p_dtype or q.dtype)
  _check(q, k, bound, chunk, p_dtype, stages, segment_ids, p_buffers, overlap, pingpong)
  batch, length, heads, width = q.shape
  n_chunks = length // chunk
  nbq = chunk // BLOCK
  n_pairs = (nbq + 1) // 2
  kpt = width // _TK  # ring slots per K tile
  scale2 = scale * _LOG2E
  bounded = bound is not None or k_scale is not None
  inner_bound = k_scale is not None  # the bound formed in the kernel from |q_r| and k_scale
  dtype = q.dtype

  def swizzled(minor_elems: int, size: int):
    swizzle = plgpu.find_swizzle(minor_elems * size * 8)
    return (plgpu.TilingTransform((8, swizzle // size)), plgpu.SwizzleTransform(swizzle))

  in_transforms = swizzled(_TK, jnp.dtype(dtype).itemsize)
  p_transforms = swizzled(BLOCK, p_dtype.itemsize)
  row_layout = plgpu.Layout.WGMMA.reduce(1)  # a vector over the rows of a WGMMA-layout array

  def warp_uniform(flag):
    """flag (bool scalar) as lane 0 of the warp holds it, which ptxas then knows is warp-uniform.

    Why: the bound decision is a row-max reduction of values read from shared memory (shuffles,
    selects): equal on every thread, but ptxas cannot prove it, so the loops whose trip counts it sets
    look divergent to it, and a wgmma on a divergent path gets a compiler-inserted warpgroup arrive
    and is serialised (ptxas C7520: each wgmma waits for the one before). A shfl.sync.idx from a fixed
    lane is the idiom ptxas recognises as uniform (Mosaic GPU's warpgroup_idx and CUTLASS's
    canonical_warp_idx_sync use it). The value is unchanged: every lane already holds lane 0's.
    """
    if not (bounded and uniform_decision) or interpret is not None:  # the interpreter has no inline_mgpu
      return flag
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    scalar = plgpu.Layout.WG_SPLAT(shape=())

    @plgpu.inline_mgpu(arg_types=(scalar,), return_type=plgpu.ShapeDtypeStruct((), jnp.int32, layout=scalar))
    def bcast(_, x):
      return mgpu.FragmentedArray.splat(mgpu_utils._warp_bcast(x.registers.item()), (), is_signed=True)

    return bcast(flag.astype(jnp.int32)) != 0

  # 2-D views (free reshapes of contiguous arrays): TMA boxes then take (row, column) offsets.
  q2 = q.reshape(batch * length, heads * width)
  k2 = k.reshape(batch * length, heads * width)

  def body(q_ref, k_ref, bound_ref, p_ref, rscale_ref, lse_ref, scoped):
    (q_smem, k_smem, p_smem, bound_smem, gap_smem, stat_smem, flag_smem), barriers = scoped
    q_bar, k_bar, consumed, bound_bar, dec_bar, flag_bar, turn = barriers
    pair = lax.axis_index("pair")
    n = lax.axis_index("chunk")
    bh = lax.axis_index("bh")
    b = lax.div(bh, heads)
    h = lax.rem(bh, heads)
    wg = lax.axis_index("wg")
    blocks = (nbq - 1 - pair, pair)  # the long query block first
    second = pair != nbq - 1 - pair  # odd nbq: the middle block only once
    qk_row0 = b * length + n * chunk  # row of this chunk's first query / key in q2, k2
    col0 = h * width
    stat_row0 = n * chunk  # this chunk's first row in rscale / lse / bound [b, h, :]
    p_row0 = bh * length + n * chunk  # this chunk's first row in the 2-D p_buf view

    def slot_of(g):
      return lax.rem(g, stages)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def load_tile(t, j):  # K tile j of the chunk into the slots of ring step t
        for c in range(kpt):
          g = t * kpt + c
          slot = slot_of(g)

          @pl.when(g >= stages)
          def _():
            plgpu.barrier_wait(consumed.at[slot])

          plgpu.copy_gmem_to_smem(k_ref.at[pl.ds(qk_row0 + j * BLOCK, BLOCK), pl.ds(col0 + c * _TK, _TK)],
                                  k_smem.at[slot], k_bar.at[slot])

      def stream(which: int, blk, t0, active):
        """The K tiles of query block blk from ring step t0 (none unless active); the next free step."""
        @pl.loop(0, jnp.where(active, blk + 1, 0))
        def _phase1(t):  # the diagonal, then K_0 .. K_{blk-1} (whatever the decision)
          load_tile(t0 + t, jnp.where(t == 0, blk, t - 1))

        if bounded:
          @pl.when(active)
          def _():
            plgpu.barrier_wait(flag_bar.at[which])

          fail = active & (flag_smem[which] != 0)
        else:
          fail = active & (blk > 0)
        n_again = jnp.where(fail, blk + 1, 0)

        @pl.loop(0, n_again)
        def _phase2(t):  # pass 2 after a failed bound: K_0 .. K_blk again
          load_tile(t0 + blk + 1 + t, t)

        return t0 + jnp.where(active, blk + 1, 0) + n_again

      t_end = stream(1, blocks[1], stream(0, blocks[0], 0, True), second)
      g_end = t_end * kpt

      # Wait out the last releases so that no barrier is left mid-phase when the CTA exits.
      @pl.loop(jnp.maximum(g_end - stages, 0), g_end)
      def _drain(g):
        plgpu.barrier_wait(consumed.at[slot_of(g)])

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      q_buf = q_smem.at[wg]

      def issue(acc_ref, t):
        """Starts S += Q K^T on the accumulator from the K tile at ring step t (asynchronous: kpt groups)."""
        if pingpong:  # our turn: the other warpgroup's previous wgmma has (all but) finished
          @pl.when((wg == 1) | (t > 0))  # consumer 0 starts
          def _():
            plgpu.barrier_wait(turn.at[wg])

        for c in range(kpt):
          slot = slot_of(t * kpt + c)
          plgpu.barrier_wait(k_bar.at[slot])
          a = q_buf if kpt == 1 else q_buf.at[:, pl.ds(c * _TK, _TK)]
          plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))

      def release(t):
        """Waits for the wgmma groups of ring step t, freeing each slot as soon as its group is done."""
        for c in range(kpt):
          plgpu.wgmma_wait(kpt - 1 - c)
          plgpu.barrier_arrive(consumed.at[slot_of(t * kpt + c)])
          if pingpong and c == max(kpt - 2, 0):  # one 64-feature step left (or none): hand over
            plgpu.barrier_arrive(turn.at[1 - wg])

      def scores(t):
        """S = Q K^T * scale2 [64, 128] float32 from the K tile at ring step t (its slots freed)."""
        def run(acc_ref):
          issue(acc_ref, t)
          release(t)
          return acc_ref[...]

        return pl.run_scoped(run, plgpu.ACC((_ROWS, BLOCK), jnp.float32)) * scale2

      def pipelined(t_first, count, s_first, work, carry):
        """The overlapped schedule over a run of tiles: s_first [64, 128] (scaled S already in registers),
        then the K tiles of ring steps t_first .. t_first + count - 1.

        work(i, s, carry) -> carry processes the run's tile i (0: s_first). Step i issues the wgmma of
        ring step t_first + i, runs work(i, ...) on the S of the tile before it while the tensor cores
        compute, then waits for the wgmma (freeing the slots) and keeps its S for the next step. Only
        one accumulator is in flight at a time (the other S is a plain value), so the wgmma_wait counts
        are those of `scores`. work(count, ...) on the run's last tile follows the loop, with nothing
        left to hide it under. Returns the carry.
        """
        def step(i, state):
          s_prev, carry = state

          def run(acc_ref):
            issue(acc_ref, t_first + i)
            carry_out = work(i, s_prev, carry)  # under the wgmma just issued
            release(t_first + i)
            return acc_ref[...], carry_out

          s, carry = pl.run_scoped(run, plgpu.ACC((_ROWS, BLOCK), jnp.float32))
          return s * scale2, carry

        s_last, carry = lax.fori_loop(0, count, step, (s_first, carry))
        return work(count, s_last, carry)

      def masked(s, offset):
        """Keys after their query -> _MASK; offset = (query block - key block) * BLOCK."""
        # Built where used (from the lane index): held across the loops they would take 128 registers.
        rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
        cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        return jnp.where(cols <= rows + (wg * _ROWS + offset), s, _MASK)

      def row_max(s):
        return jnp.max(s, axis=1)

      def emit(s, m, l, j, row0, e):
        """P~ = exp2(S - m) to the P~ buffer's tile (row0, key block j); returns l + its row sums.

        e: the tile's place in this program's sequence of P~ tiles (alternates the staging buffers)."""
        p = jnp.exp2(s - lax.broadcast_in_dim(m, s.shape, [0]))
        l = l + jnp.sum(p, axis=1)
        if p_buffers == 1:
          p_stage = p_smem.at[wg]
        else:
          p_stage = p_smem.at[wg * p_buffers + lax.rem(e, p_buffers)]
        # The store that last read this buffer is done reading it: p_buffers - 1 newer ones may still run
        # (stores finish in order; the rscale / lse stores between blocks only make this stricter).
        plgpu.wait_smem_to_gmem(p_buffers - 1, wait_read_only=True)
        p_stage[...] = p.astype(p_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(p_stage, p_ref.at[pl.ds(p_row0 + row0, _ROWS), pl.ds(j * BLOCK, BLOCK)])
        return l

      def q_norms():
        """|q_r| of my 64 rows [64]: the diagonal of Q Q^T, one wgmma group on the Q block in shared memory."""
        def run(acc_ref):
          for c in range(kpt):
            a = q_buf if kpt == 1 else q_buf.at[:, pl.ds(c * _TK, _TK)]
            plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(a, (1, 0)))
          plgpu.wgmma_wait(0)
          return acc_ref[...]

        qq = pl.run_scoped(run, plgpu.ACC((_ROWS, _ROWS), jnp.float32))
        diagonal = (plgpu.broadcasted_iota(jnp.int32, qq.shape, 0, layout=plgpu.Layout.WGMMA)
                    == plgpu.broadcasted_iota(jnp.int32, qq.shape, 1, layout=plgpu.Layout.WGMMA))
        # sqrt as exp2(log2(x) / 2): Mosaic GPU lowers no sqrt; the approximate forms' relative error
        # (~1e-6) is far inside the bound's 1e-3 headroom, and |q_r| = 0 gives exp2(-inf) = 0.
        return jnp.exp2(0.5 * jnp.log2(jnp.sum(jnp.where(diagonal, qq, 0.0), axis=1)))

      def decide(which: int, bar, blk, m, bnd=None):
        """Step 1's decision from the diagonal's row max m [64]: whether the block needs pass 2.
        bnd: the rows' bound when formed in the kernel, else it comes from bound_ref."""
        if not bounded:
          return blk > 0
        if bnd is None:
          plgpu.barrier_wait(bound_bar.at[bar])
          bnd = plgpu.load(bound_smem.at[wg, which], (), layout=row_layout)
        gap_smem.at[which, pl.ds(wg * _ROWS, _ROWS)][...] = bnd - m
        plgpu.barrier_arrive(dec_bar.at[which])
        plgpu.barrier_wait(dec_bar.at[which])  # both warpgroups' gaps are in gap_smem
        gaps = plgpu.load(gap_smem.at[which], (), layout=plgpu.Layout.WGMMA.reduce(0))
        # As Triton: the bound holds when max(gap) <= margin (a NaN gap fails it).
        fail = warp_uniform((blk > 0) & jnp.logical_not(jnp.max(gaps) <= _BOUND_MARGIN))

        @pl.when(wg == 0)
        def _():
          flag_smem[which] = fail.astype(jnp.int32)
          plgpu.barrier_arrive(flag_bar.at[which])

        return fail

      def serial_tiles(blk, t0, s, m, fail, row0, e0, zeros):
        """Steps 1-3 of the block, each tile's S waited for before its exp2 / P~ store. Returns (m, l)."""
        # m is final: the diagonal's P~ from the S in registers (a 0- or 1-trip loop carries l).
        l = lax.fori_loop(0, jnp.where(fail, 0, 1), lambda _, l: emit(s, m, l, blk, row0, e0), zeros)

        # 2. K_0 .. K_{blk-1}: more of pass 1 after a failed bound, else pass 2 with the final m.
        m = lax.fori_loop(0, jnp.where(fail, blk, 0),
                          lambda j, m: jnp.maximum(m, row_max(scores(t0 + 1 + j))), m)
        l = lax.fori_loop(0, jnp.where(fail, 0, blk),
                          lambda j, l: emit(scores(t0 + 1 + j), m, l, j, row0, e0 + 1 + j), l)
        # 3. after a failed bound: pass 2 over K_0 .. K_blk (the mask only bites on the diagonal).
        l = lax.fori_loop(
            0, jnp.where(fail, blk + 1, 0),
            lambda j, l: emit(masked(scores(t0 + 1 + blk + j), (blk - j) * BLOCK), m, l, j, row0, e0 + j), l)
        return m, l

      def overlapped_tiles(blk, t0, s, m, fail, row0, e0, zeros):
        """Steps 1-3 of the block software-pipelined (`pipelined`). Returns (m, l)."""
        def one_pass(_, l):  # the bound holds: the diagonal's P~, then K_0 .. K_{blk-1}'s, one run
          return pipelined(t0 + 1, blk, s, lambda i, s, l: emit(s, m, l, jnp.where(i == 0, blk, i - 1), row0, e0 + i),
                           l)

        def two_passes(_, ml):  # the bound failed: the rest of pass 1 (row maxima), then pass 2
          m, l = ml
          # Tile 0 of this run is the diagonal again: its maximum is m's already (max is idempotent).
          m = pipelined(t0 + 1, blk, s, lambda i, s, m: jnp.maximum(m, row_max(s)), m)
          # Pass 2 over K_0 .. K_blk (the mask only bites on the diagonal); its first tile has nothing
          # to hide under (the previous run's last work is a row max).
          l = pipelined(t0 + 2 + blk, blk, scores(t0 + 1 + blk),
                        lambda j, s, l: emit(masked(s, (blk - j) * BLOCK), m, l, j, row0, e0 + j), l)
          return m, l

        l = lax.fori_loop(0, jnp.where(fail, 0, 1), one_pass, zeros)
        return lax.fori_loop(0, jnp.where(fail, 1, 0), two_passes, (m, l))

      def query_block(which: int, blk, t0, e0):
        """Query block blk from ring step t0, its P~ tiles numbered from e0 (each block has blk + 1 of them,
        either way): its P~ tiles, rscale and lse. Returns the next ring step."""
        row0 = blk * BLOCK + wg * _ROWS  # this warpgroup's first row within the chunk
        bar = wg * 2 + which
        if bounded and not inner_bound:  # issued first: it lands while the diagonal's wgmma runs
          plgpu.copy_gmem_to_smem(bound_ref.at[b, h, pl.ds(stat_row0 + row0, _ROWS)],
                                  bound_smem.at[wg, which], bound_bar.at[bar])
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(qk_row0 + row0, _ROWS), pl.ds(col0, width)], q_buf,
                                q_bar.at[bar])
        plgpu.barrier_wait(q_bar.at[bar])
        # the bound |q_r| k_scale + 1e-3, formed before the diagonal's S takes its registers
        bnd = q_norms() * plgpu.load(bound_ref.at[b, h, n], ()) + 1e-3 if inner_bound else None

        s = masked(scores(t0), 0)  # 1. the diagonal
        m = row_max(s)
        fail = decide(which, bar, blk, m, bnd)
        zeros = plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), row_layout)
        m, l = (overlapped_tiles if overlap else serial_tiles)(blk, t0, s, m, fail, row0, e0, zeros)

        l = jnp.where(l > 0.0, l, 1.0)  # as Triton (a row sees at least its own key, so l >= 1)
        stat = stat_smem.at[wg, which]
        stat.at[0][...] = 1.0 / l
        stat.at[1][...] = m + jnp.log2(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stat.at[0], rscale_ref.at[b, h, pl.ds(stat_row0 + row0, _ROWS)])
        plgpu.copy_smem_to_gmem(stat.at[1], lse_ref.at[b, h, pl.ds(stat_row0 + row0, _ROWS)])
        return t0 + 1 + blk + jnp.where(fail, blk + 1, 0)

      t1 = query_block(0, blocks[0], 0, 0)

      @pl.when(second)
      def _():
        query_block(1, blocks[1], t1, blocks[0] + 1)

      if pingpong:  # consumer 1's last hand-over (both run the same number of tiles)
        @pl.when(wg == 0)
        def _():
          plgpu.barrier_wait(turn.at[0])

      plgpu.wait_smem_to_gmem(0)

  def entry(q_ref, k_ref, *refs):
    bound_ref, p_ref, rscale_ref, lse_ref = refs if bounded else (None, *refs)
    pl.run_scoped(
        lambda *scoped: body(q_ref, k_ref, bound_ref, p_ref, rscale_ref, lse_ref, scoped),
        (plgpu.SMEM((2, _ROWS, width), dtype, transforms=in_transforms),
         plgpu.SMEM((stages, BLOCK, _TK), dtype, transforms=in_transforms),
         plgpu.SMEM((2 * p_buffers, _ROWS, BLOCK), p_dtype, transforms=p_transforms),  # [wg * p_buffers + e]
         plgpu.SMEM((2, 2, _ROWS), jnp.float32),  # bounds [warpgroup, which block]
         plgpu.SMEM((2, BLOCK), jnp.float32),  # gaps of both warpgroups [which block]
         plgpu.SMEM((2, 2, 2, _ROWS), jnp.float32),  # rscale, lse [warpgroup, which block]
         plgpu.SMEM((2,), jnp.int32)),  # the bound decisions [which block]
        (plgpu.Barrier(num_barriers=4),  # Q [warpgroup * 2 + which]
         plgpu.Barrier(num_barriers=stages),  # ring slot loaded
         plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # ring slot consumed
         plgpu.Barrier(num_barriers=4),  # bounds [warpgroup * 2 + which]
         plgpu.Barrier(num_arrivals=2, num_barriers=2),  # both gaps written [which]
         plgpu.Barrier(num_barriers=2),  # decision flag written [which]
         plgpu.Barrier(num_barriers=2)),  # pingpong: consumer [index] may issue its wgmma
        collective_axes="wg",
    )

  rows_out = jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)
  kernel = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((batch * heads * length, chunk), p_dtype), rows_out, rows_out),
      # Mosaic GPU launches the LAST grid axis fastest (CUDA's x): the pairs of one (chunk, batch,
      # head), which all read that chunk's K, run together.
      grid=(batch * heads, n_chunks, n_pairs),
      grid_names=("bh", "chunk", "pair"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=approx_math),
      **({} if interpret is None else {"interpret": interpret}),
  )
  args = (q2, k2) if not bounded else (q2, k2, k_scale if inner_bound else bound)
  p2, rscale, lse = kernel(*args)
  return p2.reshape(batch, heads, length, chunk), rscale, lse
