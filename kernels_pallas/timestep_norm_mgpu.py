"""TimestepNorm forward (SPEC §3) as a Pallas Mosaic GPU kernel: one pass over x, one program per slab.

Semantics are those of megalodon_jax.ops.timestep_norm for the case without padding mask or segment
ids (callers keep kernels_pallas/timestep_norm.py for those): per group g of K = D / G features and
step t, with n_t = n0 + t + 1, m_t / v_t the mean / population variance of the step's K features,
  delta = m_t - mu_{t-1};  mu_t = mu_{t-1} + delta / n_t
  var_t = (n_{t-1} var_{t-1} + v_t) / n_t + delta^2 n_{t-1} / n_t^2
  y_t   = (x_t - mu_t) rsqrt(var_t + eps) w^ + b                       (w^ = weight + 1)
Outputs: y [B, L, D] (x.dtype), the running mu_t and rsqrt(var_t + eps) [B, G, L] float32 (what the
backward consumes) and the final (mean, var) [B, G]. All statistics are float32.

Design. Program (b, g) owns the column slab x[b, :, g K:(g + 1) K] and walks it in time order in
tiles of T steps ([T, K], T = block_t), carrying the running (count, mean, var): x is read once,
y written once, with no summary pass and no look-back. At B = 1, G = 64 only 64 programs run, so
each must stream its slab at ~1/64 of the card's bandwidth (the slab-walk probe moved y = f(x) at
3.6 TB/s this way) while doing the statistics, which is what the structure below is for.

  * W compute warpgroups (`compute_wgs`, no producer warpgroup): warpgroup k takes tiles k, k + W,
    k + 2W, ... Each owns a ring of `stages` shared-memory slots of [T, K] (128-byte swizzle) and
    issues its own TMA loads. With y_store="tma" y is written back into the slot the tile came
    from (every thread rewrites exactly the elements it read: in place is race-free) and leaves by
    TMA; the slot is refilled once that store has read it, a tile later (loads run stages - 1
    tiles ahead). With y_store="direct" y goes from registers to global memory and the slot is
    refilled as soon as the tile is in registers (stages tiles ahead).
  * Everything about a tile that does not need the carry runs first: the step moments, and the
    tile's prefix sums of (m_t - c, v_t + (m_t - c)^2) relative to a shift c known without the
    carry (below). Only then does warpgroup k wait for the carry of the tile before (written by
    warpgroup k - 1 into shared memory: the running mean / var of that tile's last step, the same
    vectors that go to mu_run), merge, publish its own carry and normalise. The chain of carries
    costs one short merge per tile; the rest of the W tiles in flight overlaps it.
  * Prefix sums on the tensor cores (Mosaic GPU has no scan). The prefix over the T steps of a tile
    is P = Ltri V with Ltri [T, T] lower-triangular ones and V [T, 16] bf16 holding the two float32
    step quantities split into three bf16 pieces each (hi + mid + lo == value, exactly). Row block
    r (64 steps) is P_r = L64 V_r + J V_{<r} (L64 the 64 x 64 lower triangle, J ones): one or two
    wgmma with A in registers (0/1 constants, exact in bf16; no shared-memory reads for A) and V
    in shared memory (32-byte swizzle). Products are exact and the accumulation is float32, so P is
    a float32 sum (rounded per 16-step k chunk); the three pieces' sums are then added.
  * Register layouts: "wgmma" (the WGMMA layout: 4-byte shared-memory accesses, conflict-free on
    the 128-byte swizzle) or "wide" (WGMMA_UPCAST_4X: 8 consecutive features per thread, 16-byte
    accesses with 2-way bank conflicts, and 16-byte global stores for y_store="direct"). Both have
    the wgmma accumulator's per-step ("row") layout, so step vectors feed the prefix and come back
    without relayout. Every thread holds 4 steps (each replicated over a quad of lanes) and 16
    features of each.
  * Synchronisation: Pallas' automatic barriers around every shared-memory store are off by default
    (auto_barriers=False). What needs ordering is ordered explicitly: the shift's, V's and y's
    stores are each followed by commit_smem (fence + warpgroup barrier) before anyone else (other
    threads, the tensor cores, TMA) reads them; buffers are rewritten only after such a barrier
    has followed their last read (V after the wgmma wait, the step vectors two tiles later after
    the TMA store's read wait, a slot after its store's read wait); carries pass between
    warpgroups through an mbarrier (arrive releases, wait acquires).

Numerics. Within a tile the sums are relative to a shift c: the running mean after this
warpgroup's previous tile (the carry of tile i - W + 1; with W = 1 the carried mean itself, as in
kernels_pallas/timestep_norm.py), and in each warpgroup's first tile, which has no previous one,
the tile's first step mean m_0. With n = n_c + j + 1 after step j of the tile and (n_c, mu_c,
var_c) the carry, Pd_j / Pq_j the prefix sums of (m - c) / (v + (m - c)^2):
  * later tiles: sd = n_c (mu_c - c) + Pd_j, sq = n_c (var_c + (mu_c - c)^2) + Pq_j,
    mu = c + sd / n, n var = sq - sd^2 / n. The subtraction loses log2(sq / (n var)) =
    log2(1 + (mu - c)^2 / var) bits, and if c was the running mean k steps earlier, at count n',
    (mu - c)^2 / var <= k / n' (the k steps since moved the mean by (mu - c) only as far as
    their own spread around it allows: n var >= n' D^2 (1 + n' / k), D = mu - c). Here
    k <= W T and n' >= T (n' = n0 + (i - W + 1) T), so at most log2(1 + W) bits in the
    second round of tiles and fewer after; typically nothing.
  * first tiles: mean_j = c + Pd_j / (j + 1), M2_j = Pq_j - Pd_j^2 / (j + 1) (the tile's own
    statistics), merged with the carry by Chan's formula (non-negative terms). With c = m_0 (an
    observation in every prefix of the tile) M2_j >= (m_0 - mean_j)^2, so Pq_j <= (j + 2) M2_j
    and M2_j loses at most log2(j + 2) <= 7 bits (~1e-5 relative), whatever the mean's size or
    drift. That worst case needs a step far from the rest at the start of one of the first W
    tiles (e.g. an outlier at t = 0 with no prior state); a single shift cannot serve every
    prefix of such a tile, and the Triton kernel's tile-mean shift does worse at its first steps.
The carry of a tile is its last step's running statistics, so the final state is mu_run[..., -1]
exactly. Counts are float32 (exact below 2**24 steps); the caller computes the integer count.
1 / n is rsqrt(n)^2 refined by a Newton step (an IEEE division costs ~10 instructions); rsqrt is
the hardware's approximate one (approx_math, relative error ~1e-7).

Per-tile work of one warpgroup (T = 128, K = 64, per thread, instruction estimates, "wgmma" layout
and TMA stores): tile load 32 (4-byte) + conversion 64; sums of x and of squared deviations
2 x 64 + 2 x (8 shuffles + 8 adds); centring 64; the shift: one scalar load (the first tile: a
store, a barrier and a load); the bf16 split of (d, q) ~50, V's column selects ~40, its store and
fence ~15; three wgmma (M 64, N 16, K 64: ~50 tensor-core cycles, asynchronous); the prefix
reduction over V's columns ~90; the merge ~25 per step = 100; step vectors to shared memory ~15;
y = ((x - m) rstd + (m - mu) rstd) w^ + b: 2 FMA per element = 128; conversion 32 and store 32;
TMA issue and loop ~30. About 900 instructions per thread, so ~900 issue cycles of the SM's four
schedulers per tile whatever W is (the "wide" layout saves ~50); at B=1 L=32768 D=4096 G=64
(256 tiles per program) that is ~0.12 ms at 1.98 GHz against the data-movement floor of
~0.15 ms. One warpgroup alone would expose every latency of its tile (barriers, shuffles, the
wgmma, the carry); W = 2-3 interleave two or three tiles. Shared-memory traffic per tile: TMA in
16 KiB, loads 16, y stores 16, TMA out 16 (none of the last two with y_store="direct"), V ~10:
~74 KiB, ~600 of the ~1,150 cycles a tile may take.
Which setting wins is for experiments/gpu_checks/probe_tsn_mgpu.py to say.

Shared memory (T = 128, K = 64, bf16, W = 2, stages 6): ring 2 x 6 x 16 KiB = 192 KiB; V 2 x 4 KiB;
step vectors 2 x 3 KiB; shift 1 KiB; parameters and states 3 KiB; reduction scratch 2 KiB: ~213 KiB.
`smem_bytes` counts it (a test holds it to the lowered kernel's request); `_check` refuses what
does not fit 227 KiB.

Restrictions (anything else raises ValueError in `_check`, so a dispatcher can fall back; see
`supported`): no padding mask or segment ids; x bfloat16 or float16; K a multiple of 64 with
block_t * K <= 8192 (the tile lives in registers); L a multiple of block_t (64 or 128); D % G == 0.

Checked on the CPU (tests/test_timestep_norm_mgpu.py): under Mosaic GPU's interpreter against a
float64 recurrence (the interpreter's wgmma takes every operand for a shared-memory ref; the tests'
fixture adds A in registers), and lowered for CUDA at the benchmark shape under jax 0.10.2 and
0.11.2. Not yet run on a GPU.

API (written against jax 0.10.2, run on 0.11.2): plgpu.kernel with warpgroups, mbarriers, TMA
copies, wgmma with A in registers and an indexed accumulator, row reductions, broadcasts with
layout_cast hints, scalar loads and stores of shared memory, CompilerParams(approx_math,
unsafe_no_auto_barriers).
"""

from __future__ import annotations

import functools
import inspect

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

# The custom-call target the Mosaic GPU lowering emits (what a lowering test looks for).
MOSAIC_GPU_CALL = "mosaic_gpu_v2"
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
_BLOCK_TS = (64, 128)
_ROWS = 64  # rows of one wgmma M block
_PIECES = 16  # columns of the prefix operand V (6 used): 16 bf16 = 32 bytes, the smallest wgmma swizzle
_SMEM_LIMIT = 227 * 1024  # H100 / H200 shared memory per block
_REDUCTION_SCRATCH = 128 * 4 * 4  # Mosaic GPU's default reduction scratch, reserved per kernel
_SMEM_SLACK = 1024  # alignment
_TILE_LAYOUTS = ("wgmma", "wide")
_Y_STORES = ("tma", "direct")
# Rows of the per-step staging buffer [.., 3, T]: what goes to mu_run, rstd_run, and the carry's var.
_MU, _RSTD, _VAR = 0, 1, 2
# Floats per (sequence, group) row of the incoming / final state arrays: TMA copies here move whole
# multiples of 128 bytes.
_STATE = 32


def smem_bytes(block_t: int, k: int, stages: int, compute_wgs: int, itemsize: int = 2) -> int:
  """Shared memory of one program (module docstring): the buffers (Mosaic GPU rounds each to 1 KiB),
  barriers, the reduction scratch and some slack."""
  buffers = (compute_wgs * stages * block_t * k * itemsize,  # x / y ring
             compute_wgs * block_t * _PIECES * 2,  # prefix operands V
             compute_wgs * 2 * 3 * block_t * 4,  # step vectors
             compute_wgs * block_t * 4,  # step means (shift)
             6 * k * 2, _STATE * 4, _STATE * 4)  # parameters, incoming and final state
  rounded = sum(-(-size // 1024) * 1024 for size in buffers)
  barriers = 8 * (compute_wgs * stages + compute_wgs + 1)
  return rounded + barriers + _REDUCTION_SCRATCH + _SMEM_SLACK


def _check(x_shape, dtype, num_groups: int, block_t: int, stages: int, compute_wgs: int,
           tile_layout: str = "wgmma", y_store: str = "tma", padding_mask=None, segment_ids=None) -> None:
  """Shapes and options this kernel supports (anything else: ValueError saying what to change)."""
  if padding_mask is not None or segment_ids is not None:
    raise ValueError("padding masks and segment ids are not supported by the Mosaic GPU TimestepNorm "
                     "forward: use kernels_pallas.timestep_norm for them")
  if len(x_shape) != 3:
    raise ValueError(f"x must be [batch, length, dim], got shape {tuple(x_shape)}")
  _, length, dim = x_shape
  if num_groups <= 0 or dim % num_groups:
    raise ValueError(f"dim={dim} must be divisible by num_groups={num_groups}")
  k = dim // num_groups
  if k % 64:
    raise ValueError(f"features per group K = {k} is not a multiple of 64 (Mosaic GPU TimestepNorm "
                     "tiles are [block_t, K] with 128-byte rows): use kernels_pallas.timestep_norm")
  if block_t not in _BLOCK_TS:
    raise ValueError(f"block_t must be one of {_BLOCK_TS}, got {block_t}")
  if block_t * k > 128 * 64:
    raise ValueError(f"block_t * K = {block_t * k} > 8192: the tile would not fit in registers; "
                     "use block_t=64 (or kernels_pallas.timestep_norm)")
  if length % block_t:
    raise ValueError(f"sequence length {length} is not a multiple of block_t={block_t}: use a "
                     "block_t dividing it, or kernels_pallas.timestep_norm")
  if jnp.dtype(dtype) not in tuple(map(jnp.dtype, _SUPPORTED_DTYPES)):
    raise ValueError(f"x must be bfloat16 or float16 for the Mosaic GPU TimestepNorm, got {jnp.dtype(dtype)}")
  if y_store not in _Y_STORES:
    raise ValueError(f"y_store must be one of {_Y_STORES}, got {y_store!r}")
  if tile_layout not in _TILE_LAYOUTS:
    raise ValueError(f"tile_layout must be one of {_TILE_LAYOUTS}, got {tile_layout!r}")
  if not 1 <= compute_wgs <= 4:
    raise ValueError(f"compute_wgs must be in [1, 4], got {compute_wgs}")
  if stages < 2 or compute_wgs * stages > 32:
    raise ValueError(f"stages must be >= 2 with compute_wgs * stages <= 32 (one mbarrier array), "
                     f"got stages={stages}, compute_wgs={compute_wgs}")
  need = smem_bytes(block_t, k, stages, compute_wgs, jnp.dtype(dtype).itemsize)
  if need > _SMEM_LIMIT:
    raise ValueError(f"block_t={block_t}, stages={stages}, compute_wgs={compute_wgs} need "
                     f"{need / 1024:.1f} KiB of shared memory, over {_SMEM_LIMIT // 1024} KiB: use fewer stages")


def supported(x_shape, dtype, num_groups: int, *, block_t: int = 128, stages: int = 6,
              compute_wgs: int = 2, padding_mask=None, segment_ids=None) -> bool:
  """Whether timestep_norm_fwd_mgpu takes these inputs (for a dispatcher; see `_check`)."""
  try:
    _check(x_shape, dtype, num_groups, block_t, stages, compute_wgs, padding_mask=padding_mask,
           segment_ids=segment_ids)
  except ValueError:
    return False
  return True


def _load(ref, layout):
  """plgpu.load of a whole ref into `layout`. jax 0.10.2 takes the index as a required argument,
  0.11.2 deprecates passing it (and the CPU interpreter's stand-in takes the 0.10.2 form)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # Mosaic GPU: imported only when used

  idx = inspect.signature(plgpu.load).parameters.get("idx")
  if idx is not None and idx.default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _split3(a):
  """a: float32 -> (hi, mid, lo), each exactly representable in bf16, hi + mid + lo == a exactly.

  Truncation by bit masks: hi keeps a's top 8 significant bits, mid the next 8 of the remainder,
  lo the rest (at most 8 significant bits are left)."""
  def trunc(u):
    bits = lax.bitcast_convert_type(u, jnp.int32) & jnp.int32(-65536)  # 0xFFFF0000
    return lax.bitcast_convert_type(bits, jnp.float32)
  hi = trunc(a)
  rest = a - hi
  mid = trunc(rest)
  return hi, mid, rest - mid


@functools.partial(jax.jit, static_argnames=("num_groups", "eps", "block_t", "stages", "compute_wgs",
                                             "tile_layout", "y_store", "auto_barriers", "strict_sync",
                                             "interpret"))
def timestep_norm_fwd_mgpu(x: jax.Array, w_hat: jax.Array, bias: jax.Array, n0: jax.Array, mu0: jax.Array,
                           var0: jax.Array, *, num_groups: int, eps: float, block_t: int = 128,
                           stages: int = 6, compute_wgs: int = 2, tile_layout: str = "wgmma",
                           y_store: str = "tma", auto_barriers: bool = False, strict_sync: bool = False,
                           interpret=None):
  """TimestepNorm forward on a Hopper GPU (Pallas Mosaic GPU), single pass over x.

  x: [B, L, D] bfloat16 / float16; w_hat (= weight + 1), bias: [D] float32; n0: [B] float32 prior
  count; mu0, var0: [B, G] float32 prior mean / variance (ignored where n0 == 0).
  Returns (y [B, L, D] x.dtype, mu_run [B, G, L] float32, rstd_run [B, G, L] float32,
  mean [B, G] float32, var [B, G] float32): the running mean and rsqrt(var + eps) after each step and
  the statistics after the last step.
  block_t: steps per tile (64 or 128); stages: ring slots per compute warpgroup (loads run
  stages - 1 tiles ahead); compute_wgs: warpgroups taking tiles in turn; tile_layout: "wide"
  (16-byte shared-memory accesses, 2-way bank conflicts) or "wgmma" (4-byte, conflict-free).
  y_store: "tma" (y written into the tile's slot, stored by TMA; the slot is refilled a tile later)
  or "direct" (y stored from registers to global memory, 16 bytes a thread with the wide layout;
  the slot is refilled as soon as the tile is in registers).
  auto_barriers: let Pallas put a warpgroup barrier around every shared-memory store (False: the
  kernel's own commit_smem calls order everything; see "Synchronisation" in the module docstring).
  strict_sync: a diagnostic (on the H200 some settings wrote wrong per-step outputs
    while the final state is right). Every tile's TMA stores are waited for in full (not just
    their reads) before any buffer is reused, and the step vectors are fenced and barriered before
    the carry is published. If a failing setting passes with it, the fault is in the store / reuse
    ordering; if not, it is elsewhere (layouts, the lowering).
  interpret: passed to plgpu.kernel (tests run the kernel under Mosaic GPU's CPU interpreter).
  No padding mask / segment ids (ValueError).
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu  # Mosaic GPU: imported only when used

  _check(x.shape, x.dtype, num_groups, block_t, stages, compute_wgs, tile_layout, y_store)
  if tile_layout == "wide" and not interpret:
    # On the H200 the wide layout wrote NaN into y, mu_run and rstd_run even with strict_sync (session 15,
    # experiments/results/gpu_checks/2026-11-30_nvidia-h200_probe_tsn_mgpu_fwd.json); correct only in the interpreter.
    raise ValueError("tile_layout='wide' gives wrong results on the GPU (a bug not yet found): use "
                     "tile_layout='wgmma' (the default)")
  batch, length, dim = x.shape
  groups = num_groups
  k = dim // groups
  t = block_t
  n_tiles = length // t
  wgs = compute_wgs
  dtype = x.dtype
  inv_k = 1.0 / k

  def swizzled(minor_elems: int, size: int):
    swizzle = plgpu.find_swizzle(minor_elems * size * 8)
    return (plgpu.TilingTransform((8, swizzle // size)), plgpu.SwizzleTransform(swizzle))

  tile_transforms = swizzled(64, jnp.dtype(dtype).itemsize)  # 128-byte rows of 64 features
  mma_transforms = swizzled(_PIECES, 2)  # 32-byte swizzle: the prefix operand V [T, 16]
  wide = tile_layout == "wide"
  direct = y_store == "direct"
  tile_lay = plgpu.Layout.WGMMA_UPCAST_4X if wide else plgpu.Layout.WGMMA
  row_lay = plgpu.Layout.WGMMA.reduce(1)  # per-step vectors: the same for both tile layouts
  col_lay = tile_lay.reduce(0)  # per-feature vectors

  x2 = x.reshape(batch * length, dim)
  # w^ and bias as three exact bf16 pieces each: 16-byte loads of the wide layout's per-feature
  # vectors (8 consecutive features per thread) cannot move float32 from unswizzled shared memory.
  wb = jnp.stack([piece for p in (w_hat, bias) for piece in _split3(p.astype(jnp.float32))])
  wb = wb.astype(jnp.bfloat16)  # [6, D], exact
  state0 = jnp.stack([jnp.broadcast_to(n0.astype(jnp.float32)[:, None], (batch, groups)),
                      mu0.astype(jnp.float32), var0.astype(jnp.float32)], axis=-1)
  state0 = jnp.pad(state0, ((0, 0), (0, 0), (0, _STATE - 3))).reshape(batch * groups, _STATE)

  def bcast_rows(v):
    """[T] per-step vector -> [T, K] in the tile's register layout."""
    return plgpu.layout_cast(lax.broadcast_in_dim(v, (t, k), (0,)), tile_lay)

  def bcast_cols(v):
    """[K] per-feature vector -> [T, K] in the tile's register layout."""
    return plgpu.layout_cast(lax.broadcast_in_dim(v, (t, k), (1,)), tile_lay)

  def body(x_ref, wb_ref, st0_ref, y_ref, mu_ref, rstd_ref, fin_ref, scoped):
    (ring, v_smem, stage, shift_smem, par_smem, init_smem, fin_smem), barriers = scoped
    loaded, carried, params = barriers
    b = lax.axis_index("b")
    g = lax.axis_index("g")
    wg = lax.axis_index("wg")
    bg = b * groups + g
    steps = lax.div(n_tiles - wg + wgs - 1, wgs)  # tiles of this warpgroup: wg, wg + W, ...

    def tile_of(j):
      return j * wgs + wg

    def slot_of(j):
      return wg * stages + lax.rem(j, stages)

    def x_tile(ref, j):
      return ref.at[pl.ds(b * length + tile_of(j) * t, t), pl.ds(g * k, k)]

    def load(j):
      plgpu.copy_gmem_to_smem(x_tile(x_ref, j), ring.at[slot_of(j)], loaded.at[slot_of(j)])

    @pl.when(wg == 0)
    def _():
      plgpu.copy_gmem_to_smem(wb_ref.at[:, pl.ds(g * k, k)], par_smem, params.at[0])
      plgpu.copy_gmem_to_smem(st0_ref.at[bg], init_smem, params.at[0])

    for j in range(stages):  # the ring's first loads
      @pl.when(j < steps)
      def _():
        load(j)

    plgpu.barrier_wait(params.at[0])
    n0_f = init_smem[0]

    # The carry before tile 0 sits where the carry of tile "-1" would: warpgroup W - 1, buffer 1.
    @pl.when(wg == wgs - 1)
    def _():
      stage[wgs - 1, 1, _MU, t - 1] = init_smem[1]
      stage[wgs - 1, 1, _VAR, t - 1] = init_smem[2]
      if wgs > 1:
        plgpu.barrier_arrive(carried.at[0])

    w_b, b_b = (bcast_cols(sum(_load(par_smem.at[3 * p + i], col_lay).astype(jnp.float32) for i in range(3)))
                for p in range(2))
    rows = plgpu.broadcasted_iota(jnp.int32, (t,), 0, layout=row_lay)
    cnt = (rows + 1).astype(jnp.float32)  # steps of the tile up to and including each row
    inv_cnt = 1.0 / cnt

    def tile_step(j, first: bool):
      """Tile j of this warpgroup. first: its first tile (a static flag: the shift differs)."""
      i = tile_of(j)
      slot = slot_of(j)
      buf = lax.rem(j, 2)
      plgpu.barrier_wait(loaded.at[slot])
      xf = _load(ring.at[slot], tile_lay).astype(jnp.float32)
      m = jnp.sum(xf, axis=1) * inv_k
      xc = xf - bcast_rows(m)
      v = jnp.sum(xc * xc, axis=1) * inv_k

      if first:  # the shift: the tile's first step mean (row 0 lives in warp 0: through shared memory)
        shift_smem.at[wg][...] = m
        plgpu.commit_smem()
        c = shift_smem[wg, 0]
      else:  # the running mean after this warpgroup's previous tile (its last step vectors)
        c = stage[wg, 1 - buf, _MU, t - 1]
      d = m - c
      pd, pq = _prefix_sums(d, v + d * d, v_smem.at[wg], t)
      if direct:  # the tile is in registers (V's barrier passed every thread's loads): refill its slot
        @pl.when(j + stages < steps)
        def _():
          load(j + stages)

      # The carry: the running statistics after the previous tile's last step.
      if wgs > 1:
        plgpu.barrier_wait(carried.at[wg])
      prev = i - 1 + wgs  # (tile - 1) + W >= 0
      prev_wg = lax.rem(prev, wgs)
      prev_buf = lax.rem(lax.div(prev, wgs) + 1, 2)  # buffer (step of tile i - 1) % 2
      mu_c = stage[prev_wg, prev_buf, _MU, t - 1]
      var_c = stage[prev_wg, prev_buf, _VAR, t - 1]
      n_c = n0_f + (i * t).astype(jnp.float32)
      if first:
        mu, var = _merge_tile(pd, pq, c, cnt, inv_cnt, n_c, mu_c, var_c)
      else:
        mu, var = _merge_shifted(pd, pq, c, cnt, n_c, mu_c, var_c)
      rstd = lax.rsqrt(var + eps)

      out = stage.at[wg, buf]
      out.at[_MU][...] = mu
      out.at[_RSTD][...] = rstd
      out.at[_VAR][...] = var
      if strict_sync:
        plgpu.commit_smem()
      if wgs > 1:
        @pl.when(i + 1 < n_tiles)
        def _():
          plgpu.barrier_arrive(carried.at[lax.rem(wg + 1, wgs)])

      # y = (x - mu) rstd w^ + b = ((x - m) rstd + (m - mu) rstd) w^ + b: two FMAs per element.
      y = (xc * bcast_rows(rstd) + bcast_rows((m - mu) * rstd)) * w_b + b_b
      if direct:
        x_tile(y_ref, j)[...] = y.astype(dtype)
      else:
        ring.at[slot][...] = y.astype(dtype)  # in place: each thread rewrites what it read
      plgpu.commit_smem()
      if not direct:
        plgpu.copy_smem_to_gmem(ring.at[slot], x_tile(y_ref, j), commit_group=False)
      plgpu.copy_smem_to_gmem(out.at[_MU], mu_ref.at[b, g, pl.ds(i * t, t)], commit_group=False)
      plgpu.copy_smem_to_gmem(out.at[_RSTD], rstd_ref.at[b, g, pl.ds(i * t, t)], commit_group=False)
      plgpu.commit_smem_to_gmem_group()

      # The previous tile's stores have read their buffers (step vectors, and y's slot): refill it.
      if strict_sync:  # diagnostic: every store of this tile finished (reads and writes) before any reuse
        plgpu.wait_smem_to_gmem(0)
      if not first:
        if not strict_sync:
          plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        if not direct:
          @pl.when(j - 1 + stages < steps)
          def _():
            load(j - 1 + stages)

    # The first tile is peeled off (its shift comes from the tile itself); the loop takes the rest.
    @pl.when(steps > 0)
    def _():
      tile_step(0, True)

    @pl.loop(1, steps)
    def _(j):
      tile_step(j, False)

    last_wg = (n_tiles - 1) % wgs

    @pl.when(wg == last_wg)
    def _():
      last_buf = ((n_tiles - 1) // wgs) % 2
      fin_smem[0] = stage[last_wg, last_buf, _MU, t - 1]
      fin_smem[1] = stage[last_wg, last_buf, _VAR, t - 1]
      fin_smem[2] = n0_f + float(length)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(fin_smem, fin_ref.at[bg])

    plgpu.wait_smem_to_gmem(0)

  def entry(x_ref, wb_ref, st0_ref, y_ref, mu_ref, rstd_ref, fin_ref):
    pl.run_scoped(
        lambda *scoped: body(x_ref, wb_ref, st0_ref, y_ref, mu_ref, rstd_ref, fin_ref, scoped),
        (plgpu.SMEM((wgs * stages, t, k), dtype, transforms=tile_transforms),  # x / y ring
         plgpu.SMEM((wgs, t, _PIECES), jnp.bfloat16, transforms=mma_transforms),  # prefix V operand
         plgpu.SMEM((wgs, 2, 3, t), jnp.float32),  # mu / rstd / var per step [warpgroup, buffer]
         plgpu.SMEM((wgs, t), jnp.float32),  # step means (for the shift)
         plgpu.SMEM((6, k), jnp.bfloat16),  # w^, bias of the group (three pieces each)
         plgpu.SMEM((_STATE,), jnp.float32),  # incoming (count, mean, var, padding)
         plgpu.SMEM((_STATE,), jnp.float32)),  # final (mean, var, count, padding)
        (plgpu.Barrier(num_barriers=wgs * stages),  # ring slot loaded
         plgpu.Barrier(num_barriers=wgs),  # carry for warpgroup [index] written
         plgpu.Barrier(num_arrivals=2, num_barriers=1)),  # parameters, incoming state
        collective_axes="wg",
    )

  rows_out = jax.ShapeDtypeStruct((batch, groups, length), jnp.float32)
  kernel = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((batch * length, dim), dtype), rows_out, rows_out,
                jax.ShapeDtypeStruct((batch * groups, _STATE), jnp.float32)),
      # Mosaic GPU launches the LAST grid axis fastest: the groups of a sequence run together and
      # read whole rows of x between them.
      grid=(batch, groups),
      grid_names=("b", "g"),
      num_threads=wgs,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=not auto_barriers),
      **({} if interpret is None else {"interpret": interpret}),
  )
  y2, mu_run, rstd_run, fin = kernel(x2, wb, state0)
  fin = fin.reshape(batch, groups, _STATE)
  return y2.reshape(batch, length, dim), mu_run, rstd_run, fin[..., 0], fin[..., 1]


def _prefix_sums(d, q, v_ref, t: int):
  """In-tile inclusive prefix sums of two [T] float32 step vectors, on the tensor cores.

  d, q: [T] (row layout); v_ref: [T, 16] bf16 scratch (32-byte swizzle). V's columns 0-2 hold d's
  bf16 pieces, 3-5 q's. Row block r (64 steps) of P = Ltri V is L64 V_r + J V_{<r} (J all ones):
  both A operands live in registers (no shared-memory traffic for them); the pieces are summed after.
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu  # Mosaic GPU: imported only when used

  wgmma_lay = plgpu.Layout.WGMMA
  pieces = (*_split3(d), *_split3(q))
  cols = plgpu.broadcasted_iota(jnp.int32, (t, _PIECES), 1, layout=wgmma_lay)
  v = jnp.zeros((t, _PIECES), jnp.float32)
  for idx, piece in enumerate(pieces):
    v = jnp.where(cols == idx, lax.broadcast_in_dim(piece, (t, _PIECES), (0,)), v)
  v_ref[...] = v.astype(jnp.bfloat16)
  plgpu.commit_smem()  # V's stores visible to the tensor cores (and all threads past them)

  r_idx = plgpu.broadcasted_iota(jnp.int32, (_ROWS, _ROWS), 0, layout=wgmma_lay)
  c_idx = plgpu.broadcasted_iota(jnp.int32, (_ROWS, _ROWS), 1, layout=wgmma_lay)
  lower = jnp.where(c_idx <= r_idx, 1.0, 0.0).astype(jnp.bfloat16)

  def run(acc):
    for r in range(t // _ROWS):
      blk = acc.at[pl.ds(r * _ROWS, _ROWS)]
      if r:
        ones = plgpu.layout_cast(jnp.ones((_ROWS, r * _ROWS), jnp.bfloat16), wgmma_lay)
        plgpu.wgmma(blk, ones, v_ref.at[pl.ds(0, r * _ROWS)])
      plgpu.wgmma(blk, lower, v_ref.at[pl.ds(r * _ROWS, _ROWS)])
    plgpu.wgmma_wait(0)
    return acc[...]

  p = pl.run_scoped(run, plgpu.ACC((t, _PIECES), jnp.float32))
  pd = jnp.sum(jnp.where(cols < 3, p, 0.0), axis=1)
  pq = jnp.sum(jnp.where((cols >= 3) & (cols < 6), p, 0.0), axis=1)
  return pd, pq


def _merge_tile(pd, pq, c, cnt, inv_cnt, n_c, mu_c, var_c):
  """Running (mean, var) after each step of a tile [T]: the carry (n_c, mu_c, var_c) merged (Chan)
  with the tile's first j + 1 steps, whose prefix sums pd, pq are relative to c = the tile's first
  step mean. The tile's own M2 (the only subtraction) loses at most log2(j + 2) bits (module
  docstring); the merge adds non-negative terms. Used for each warpgroup's first tile."""
  has = n_c > 0
  mu_c = jnp.where(has, mu_c, c)  # a zero-count prior carries no weight (and no stale mean)
  var_c = jnp.where(has, var_c, 0.0)
  off = pd * inv_cnt  # mean_j - c
  m2 = jnp.maximum(pq - pd * off, 0.0)
  delta = off + (c - mu_c)  # mean_j - mu_c
  inv_n = _reciprocal(n_c + cnt)
  frac = cnt * inv_n  # (j + 1) / n
  mu = mu_c + delta * frac
  var = (n_c * var_c + m2 + delta * delta * (n_c * frac)) * inv_n
  return mu, var


def _merge_shifted(pd, pq, c, cnt, n_c, mu_c, var_c):
  """As _merge_tile, with every sum relative to c, a running mean of an earlier step (n_c > 0):
  sd = sum of (m - c), sq = sum of (v + (m - c)^2) over all steps so far, n var = sq - sd^2 / n.
  That subtraction loses log2(1 + k / n') bits at most, k steps after the one whose running mean
  c is (count n'); the module docstring has the bound."""
  e = mu_c - c
  sd = n_c * e + pd
  sq = n_c * (var_c + e * e) + pq
  inv_n = _reciprocal(n_c + cnt)
  off = sd * inv_n  # mu - c
  return c + off, jnp.maximum(sq - sd * off, 0.0) * inv_n


def _reciprocal(n):
  """1 / n for n >= 1 without an IEEE division (~10 instructions each): the hardware's rsqrt squared
  (relative error ~2**-22) and one Newton step, accurate to about an ulp."""
  r = lax.rsqrt(n)
  inv = r * r
  return inv + inv * (1.0 - n * inv)
