"""Single-pass TimestepNorm backward (SPEC §3) as a Pallas Mosaic GPU kernel: one program per
(sequence, group) walks time in reverse, reading x and dy once and writing dx once.

Semantics are those of megalodon_jax.ops.timestep_norm without padding or segments. Per group of
K features, with n_t = n0 + t + 1, step mean m_t and population variance v_t over the K features:
  delta_t = m_t - mu_{t-1};  mu_t = mu_{t-1} + delta_t / n_t
  var_t = (n_{t-1} var_{t-1} + v_t) / n_t + delta_t^2 n_{t-1} / n_t^2
  y_t = (x_t - mu_t) r_t w^ + b,  r_t = rsqrt(var_t + eps),  w^ = weight + 1
with (mu_{-1}, var_{-1}) = (mu0, var0). The forward saves mu_run[b, g, t] = mu_t and
rstd_run[b, g, t] = r_t (float32); this kernel needs nothing else of the forward (not mu0, var0:
see "Reverse recurrence").

Reverse recurrence (derived for this kernel; the same closed form as kernels_pallas/timestep_norm.py's
_step_adjoints, written with adjoints normalised by the counts). Let xh_t = (x_t - mu_t) r_t (per
feature), the per-step sums over the group's features s1_t = sum dy w^, s2_t = sum dy w^ xh,
se_t = sum xh, and
  lm_t = -r_t s1_t / n_t          (the adjoint of mu_t from y_t alone, over n_t)
  lv_t = -r_t^2 s2_t / (2 n_t)    (the same for var_t)
  z_t = 2 delta_t / n_t = 2 e_t / n_{t-1},  e_t = m_t - mu_t = se_t / (K r_t)   (0 when n_{t-1} = 0)
(delta_t = e_t n_t / n_{t-1} follows from mu_t = mu_{t-1} + delta_t / n_t; e_t from the sum of xh
has no cancellation at large means, unlike m_t - mu_{t-1} from two rounded float32 values.)
The adjoints of the running statistics after step t, divided by n_t, are H_var_t and H_mu_t:
  H_var_t = lv_t + A_var_t,   H_mu_t = lm_t + A_mu_t,
  A_var_{t-1} = H_var_t,      A_mu_{t-1} = H_mu_t - z_t H_var_t,
from A_mu_{L-1} = g_mu / n_{L-1}, A_var_{L-1} = g_var / n_{L-1} (the final state's cotangents), and
  dx_t = r_t w^ dy_t + H_mu_t / K + 2 H_var_t / (K r_t) xh_t
  dw = sum_t dy_t xh_t,  db = sum_t dy_t,  d_mu0 = n0 A_mu_{-1},  d_var0 = n0 A_var_{-1}.
(The terms through m_t and v_t combine: (H_mu + 2 e H_var) / K + 2 H_var (x - m) / K =
H_mu / K + 2 H_var (x - mu) / K.) mu0 and var0 enter only through mu_t and r_t, so the kernel
does not read them; with n0 = 0 both state adjoints are 0.

Per tile (T = block_t steps, read as T / 64 blocks of 64 steps; a warpgroup's K / wgs features as
column chunks of up to 64, each a [64, cols] register block):
  1. x, dy -> float32 in registers (WGMMA layout: a thread holds 2 rows x cols / 4 columns of a
     block);
     xh = x r - mu r (one FMA), dyw = dy w^; row sums se, s1, s2 (in-thread adds, 2 shuffle rounds);
     dw, db partials accumulate in registers ([64, cols] per chunk, summed over rows at the end).
  2. Suffix sums of lv, then of q = lm - z H_var, over each 64-step block: Mosaic GPU has no scan,
     so a row vector goes through shared memory into the column layout (a store, one warpgroup
     barrier, a load), is broadcast over a [64, 64] block, masked (s >= t) and summed along rows
     (S_t = sum_s [s >= t] a_s): with the mask held in registers as float 0 / 1 (mask_regs, 32
     registers), one FMA per element; else an iota compare and a select, then an add. A block's
     total (for the blocks before it, and the carry) is the sum of the column-layout copy
     (replicated over warps: in-thread adds and 2 shuffle rounds).
     Round 1 (lv) needs no carry; round 2 (q) needs A_var, known after round 1. Two warpgroup
     barriers per tile whatever T (and two more around the ring: the dx slot's wait, the commit).
  3. dx = r dyw + H_mu / K + (2 H_var / (K r)) xh, cast, stored into the ring's dx slot.
  The carry (A_mu, A_var) and the dw / db partials are the loop carry over tiles.
Cycle estimate (one warpgroup, K = 64, per thread of the 128 and per 64-step block): 32 elements
of ~13 instructions (x and dy: one shared load per element together and 2 conversions; 9
FMA-class ops: xh, dyw, three row sums, dw, db, two for dx; half a conversion and half a store
back) ~ 420; the two scan rounds ~2 x 40 (mask_regs: 32 FMA, in-thread sums, shuffles; ~70 with
compare and select) plus stores, loads and totals ~ 120; ~550 issue slots per warp (one warp per
SM sub-partition: latencies hidden only by ILP) for 64 steps that TMA moves in ~820-900 cycles at
3.3 TB/s over 64 SMs. The critical path of a tile (loads, row sums, two shared-memory round
trips, dx) is ~600-900 cycles; the prefetched tiles (stages) cover TMA latency. (Counted from the
lowered module: per 128-step tile ~390 vector adds, ~240 multiplies, 48 shuffles, 6 barriers.)
Whether ptxas contracts the multiply-adds into FFMA decides ~20% of that; the SASS will tell.

Two warpgroups (wgs = 2): each takes half of the group's features ([T, K / 2] boxes, its own ring,
TMA loads and stores), so each does half of the per-element work with half the registers. After
the row sums, each writes its partial per-step sums (se, s1, s2) to shared memory, arrives on an
mbarrier and adds the other's (slots alternate with the tile's parity); from there both run the
same scans on bitwise the same sums (the addition commutes), so their carries agree without
further exchange. Per warp and 64-step block ~210 + 120 issue slots, two warps per sub-partition:
more instructions per SM than one warpgroup (the scans run twice) but twice the warps to hide
latency, and half the registers for the tile (room for the mask).

Tiles in parallel (tile_wgs = W of 2 to 4, wgs = 1): with one warpgroup per SM (64 programs on
132 SMs at B = 1, G = 64) every dependent instruction of a tile's chain is exposed (measured ~2,600
cycles per 64-step tile against ~550 issue slots). Instead W warpgroups work on different tiles:
warpgroup w takes tiles w, w + W, w + 2W, ... of the reverse walk (its own TMA ring of `stages`
slots: stages x W tiles in flight; with W not dividing the tiles the last warpgroups take one
fewer, a dynamic trip count). The recurrence through a tile is affine in the carry entering
it (A_mu, A_var), so all but a few FMAs per step need no carry (_TileMath.prepare): the row sums,
dw / db, then three suffix sums within the tile, lv and z (one shared-memory round trip) and
u = lm - z sv (another), give per step sv, P = su + z sv and Q = z - sz with
  H_var_t = sv_t + A_var,   H_mu_t = P_t + A_var Q_t + A_mu,
and the tile's totals Lv, U, Z with the carry leaving it A_var' = A_var + Lv, A_mu' = A_mu + U -
A_var Z. Only then does warpgroup w wait for the carry (an mbarrier per receiving warpgroup; two
floats in shared memory, stored by every thread, each arriving with release semantics, read after
the wait's acquire), compute the outgoing carry (two scalar FMAs), hand it to warpgroup w + 1 mod W
at once (the serial chain: wait, two loads, two FMAs, two stores, arrive) and write dx (an
elementwise pass with per-step coefficients). Warpgroup 0 hands the final state's cotangents to
itself before the walk; the last tile hands nothing on. A hand-over slot is rewritten for the
receiver's next tile only after the receiver has read it (the next write follows the receiver's
own hand-over through the chain). dw, db partials stay per warpgroup and are summed outside the
kernel; d_mu0, d_var0 come from warpgroup (n_tiles - 1) mod W (it holds the walk's last tile). The final column
sums through Mosaic GPU's shared reduction scratch take turns (warpgroup w after w - 1).
Registers (per thread, T = 64, K = 64): the dw, db partials 64, w^ 16 (the column vector), the
per-step vectors ~12, the elementwise pass's temporaries ~20-40. W = 2 (255 a thread) also holds xh
and dyw across the wait (64) and the mask (32): 176 counted, 253 measured (no spills; so ~77 for
everything else where ptxas has room). W = 3 (384 threads: 168 a thread) and W = 4 (128) re-read
x and dy from the ring for dx and w^ from shared memory at every use (reload_tile; one multiply,
two conversions, two shared loads more per element and 4 vector loads of w^ per use) and make the
mask by compare and select: W = 3 counts 64 (partials) + ~12 (row vectors: r, mu r, sv, P, Q,
1 / r, the step's n) + 3 x 16 (round 1's column vectors, if ptxas keeps all three loaded) + ~20-30
(addresses, loop state, the elementwise temporaries: x, dy packed, xh, dyw for a few elements at
a time) ~ 145-155 of 168. W = 4 spilled 500-700 bytes at 128 with w^ held (measured): 16 fewer
now. Issue slots per 64-step tile rise by the third suffix sum (~40-70) and, with reload, ~5 per
element (~160); with W warps per SM sub-partition the latencies overlap across tiles.

Pipeline (per warpgroup, written out rather than plgpu.emit_pipeline, whose run_scoped buffers
cannot be per-warpgroup in a multi-warpgroup kernel): a ring of `stages` slots of x, dy [T, K /
wgs] (a 128- or 64-byte swizzle), mu, rstd [T]; slot s is refilled by TMA for tile i + stages once
tile i's compute is done (a warpgroup barrier orders the reads before the refill); dx goes to two
buffers (one with one stage) whatever the ring's depth and leaves by a TMA store; a buffer is
rewritten only after its previous store has read it (wait_smem_to_gmem(1)). (8 KiB a buffer at
T = 64, K = 64 bf16: W = 3 fits 3 stages, W = 2 fits 5.)

Grid (B, G), last axis fastest: the programs of one sequence run together; tiles are walked in
reverse time order (tile n_tiles - 1 - i at step i).

Unsupported (ValueError from `_check`, so that a dispatcher can fall back to the Triton kernels of
kernels_pallas/timestep_norm.py): padding masks, segment ids, K = D / G not a multiple of 64, L not
a multiple of block_t, block_t not a multiple of 64 or over 256, tile_wgs > 1 with wgs = 2, fewer
tiles than tile_wgs, dtypes other than bfloat16 / float16 / float32, shared memory over 227 KiB.

Outputs: dx [B, L, D] in x.dtype, dw [D] and db [D] float32 (per-program partials [B, G, K] summed
over B outside the kernel), d_mu0, d_var0 [B, G] float32.

Status: W = 1 and wgs = 2 timed on an H200 (B = 1, L = 32768, D = 4096, G = 64 bf16): 0.673 ms at
T = 64 with 4 stages, against 0.479 ms for the current two-pass backward and a 0.234-0.256 ms floor
(the same bytes walked without math); dx, dw, db and the state adjoints agree with it (wgs = 2's
dw, db were wrong before its reduction turns were added; not yet re-run). tile_wgs > 1: checked on
the CPU (tests/test_timestep_norm_mgpu_bwd.py: Mosaic GPU's interpreter against jax.vjp of the
reference op in float64, and lowering for CUDA at the benchmark shape under jax 0.10.2 and 0.11.2);
the probe experiments/gpu_checks/probe_tsn_mgpu_bwd.py times (block_t, stages, wgs, tile_wgs)
variants against the current backward and the floor. tile_wgs = 2 (e9075c6, H200): T = 64 with
2-4 stages 0.403-0.415 ms (253 registers, no spills); tile_wgs = 4: 0.73-0.85 ms (128 registers,
500-700 bytes of spills). tile_wgs = 3 (168 registers) with reload: the CPU only so far. Not wired
into timestep_norm.py's dispatch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

# The custom-call target the Mosaic GPU lowering emits (what a lowering test looks for).
MOSAIC_GPU_CALL = "mosaic_gpu_v2"
_COLS = 64  # features per TMA box and register block: 128 bytes of bf16, the widest swizzle
_ROWS = 64  # steps per register block: one [64, 64] WGMMA-layout array
_SMEM_LIMIT = 227 * 1024  # H100 / H200 shared memory per block
_SMEM_SLACK = 7168  # barriers, alignment of the buffers (up to 1 KiB each), Mosaic GPU's reduction scratch (2 KiB)
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_MAX_BLOCK_T = 256  # a TMA box has at most 256 rows
# Per program: A_mu, A_var at the last step, n0, then padding: Mosaic GPU copies multiples of 128 bytes.
_INIT = 32


def _load(ref, layout):
  """plgpu.load of a whole shared-memory ref into `layout` (jax 0.10.2 needs the index `()`; 0.11.2
  deprecates passing it)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  idx = inspect.signature(plgpu.load).parameters["idx"]
  if idx.default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _recip(a):
  """1 / a for a > 0 as rsqrt(a)^2: with approx_math one MUFU op and a multiply (~3e-7 relative)."""
  ra = lax.rsqrt(a)
  return ra * ra


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shape of one launch. Each of the `wgs` warpgroups of a program owns K / wgs features of
  the group, read as `chunks` column blocks of `cols` features (a TMA box and a register block)."""
  batch: int
  length: int
  groups: int
  k: int
  dtype: object
  block_t: int
  stages: int
  wgs: int
  mask_regs: bool
  tile_wgs: int = 1
  reload_tile: bool = False

  @property
  def threads(self) -> int:
    """Warpgroups per program (one of wgs, tile_wgs is 1)."""
    return self.wgs * self.tile_wgs

  @property
  def cols(self) -> int:
    return min(_COLS, self.k // self.wgs)

  @property
  def chunks(self) -> int:
    return self.k // (self.wgs * self.cols)

  @property
  def n_tiles(self) -> int:
    return self.length // self.block_t

  @property
  def dx_slots(self) -> int:
    return _dx_slots(self.stages)

  @property
  def blocks(self) -> int:
    return self.block_t // _ROWS

  @property
  def itemsize(self) -> int:
    return jnp.dtype(self.dtype).itemsize


def _dx_slots(stages: int) -> int:
  """dx buffers per warpgroup: two (the tile being written and the one whose TMA store may still
  read its buffer) whatever the input ring's depth; one with one stage."""
  return min(stages, 2)


def _register_budget(threads: int) -> int:
  """Registers a thread may hold without spilling: 255, or the 64 K of the SM over the program's
  threads (170 with 3 warpgroups, which ptxas rounds down to 168; 128 with 4)."""
  return min(255, 65536 // (128 * threads))


def _default_reload_tile(tile_wgs: int) -> bool:
  """Whether dx re-reads x and dy (and w^ at every use) from shared memory instead of keeping xh,
  dyw (and w^) in registers across the wait for the carry: with 3 or 4 tile warpgroups (168 or 128
  registers a thread) the 64 a thread of a [64, 64] tile's xh and dyw do not fit beside the 64 of
  the dw, db partials."""
  return tile_wgs >= 3


def _default_mask_regs(block_t: int, k: int, wgs: int, tile_wgs: int = 1, reload_tile: bool = False) -> bool:
  """Whether the 32 mask registers fit beside the tile's: xh and dyw stay in registers from the row
  sums to dx (2 T (K / wgs) / 128 per thread, unless reload_tile) and the dw, db partials take
  2 x 64 (K / wgs) / 128; allow 168 of 255 (the rest: w^, row vectors, addresses, temporaries), or
  with more than two warpgroups the budget less 80 (W = 2 at T = 64 with the mask used 253 a
  thread: 176 counted, ~77 for the rest; w^ is then re-read, see reload_tile). True for T = 64 with
  one warpgroup, T <= 128 with two (K = 64), T = 64 with two tile warpgroups; False with three
  (64 + 32 + 80 > 170) or four."""
  held = 0 if reload_tile else 2 * block_t * (k // wgs)
  per_thread = (held + 2 * _ROWS * (k // wgs)) // 128
  threads = wgs * tile_wgs
  return per_thread + 32 <= (168 if threads <= 2 else _register_budget(threads) - 80)


def smem_bytes(block_t: int, stages: int, k: int, itemsize: int, wgs: int = 1, tile_wgs: int = 1) -> int:
  """Shared memory of one program: per stage and warpgroup its x, dy tiles [block_t, K / wgs] and
  the mu, rstd rows; per warpgroup its dx buffers (_dx_slots), the scan vectors, w^, the initial
  carry, the carry handed over and the outputs; the exchange of per-step sums between warpgroups."""
  blocks, threads = block_t // _ROWS, wgs * tile_wgs
  per_stage = threads * (2 * block_t * (k // wgs) * itemsize + 2 * block_t * 4)
  dx = threads * _dx_slots(stages) * block_t * (k // wgs) * itemsize
  per_wg = (k // wgs + _INIT + 2 + 3 * blocks * _ROWS + (2 * (k // wgs) + min(k // wgs, _COLS))) * 4
  exchange = 2 * wgs * 3 * block_t * 4 if wgs > 1 else 0
  return stages * per_stage + dx + threads * per_wg + exchange + _SMEM_SLACK


def _check(x, dy, w_hat, mu_run, rstd_run, n0, g_mu, g_var, *, num_groups: int, block_t: int,
           stages: int, wgs: int, tile_wgs: int, padding_mask, segment_ids) -> None:
  """Configurations this kernel supports (anything else: ValueError naming what to change)."""
  if padding_mask is not None:
    raise ValueError("padding masks are not supported by the Mosaic GPU TimestepNorm backward: use "
                     "the Triton kernels (kernels_pallas/timestep_norm.py)")
  if segment_ids is not None:
    raise ValueError("segment ids are not supported by the Mosaic GPU TimestepNorm backward: use the "
                     "Triton kernels (kernels_pallas/timestep_norm.py)")
  if x.ndim != 3 or dy.shape != x.shape or dy.dtype != x.dtype:
    raise ValueError(f"x and dy must be [B, L, D] of one shape and dtype, got {x.dtype}{x.shape}, "
                     f"{dy.dtype}{dy.shape}")
  batch, length, dim = x.shape
  if jnp.dtype(x.dtype) not in tuple(map(jnp.dtype, _SUPPORTED_DTYPES)):
    raise ValueError(f"x dtype {x.dtype} unsupported: bfloat16, float16 or float32")
  if num_groups <= 0 or dim % num_groups or (dim // num_groups) % _COLS:
    raise ValueError(f"D = {dim} over num_groups = {num_groups}: the features per group must be a "
                     f"multiple of {_COLS} (use the Triton kernels otherwise)")
  if wgs not in (1, 2):
    raise ValueError(f"wgs (compute warpgroups per program) must be 1 or 2, got {wgs}")
  if tile_wgs not in (1, 2, 3, 4):
    raise ValueError(f"tile_wgs (warpgroups on different tiles) must be 1 to 4, got {tile_wgs}")
  if tile_wgs > 1 and wgs > 1:
    raise ValueError("tile_wgs > 1 needs wgs = 1 (warpgroups split either tiles or features)")
  if block_t <= 0 or block_t % _ROWS or block_t > _MAX_BLOCK_T:
    raise ValueError(f"block_t {block_t} is not a multiple of {_ROWS} up to {_MAX_BLOCK_T}")
  if length % block_t:
    raise ValueError(f"sequence length {length} is not a multiple of block_t {block_t} (use the "
                     "Triton kernels, or a block_t dividing it)")
  if length // block_t < tile_wgs:
    raise ValueError(f"{length // block_t} tiles of {block_t} steps: fewer than tile_wgs = {tile_wgs} "
                     "warpgroups")
  if stages < 1:
    raise ValueError(f"stages must be >= 1, got {stages}")
  want = {"w_hat": (w_hat, (dim,)), "mu_run": (mu_run, (batch, num_groups, length)),
          "rstd_run": (rstd_run, (batch, num_groups, length)), "n0": (n0, (batch,)),
          "g_mu": (g_mu, (batch, num_groups)), "g_var": (g_var, (batch, num_groups))}
  for name, (value, shape) in want.items():
    if tuple(value.shape) != shape:
      raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
  for name in ("mu_run", "rstd_run"):
    if want[name][0].dtype != jnp.float32:
      raise ValueError(f"{name} must be float32, got {want[name][0].dtype}")
  need = smem_bytes(block_t, stages, dim // num_groups, jnp.dtype(x.dtype).itemsize, wgs, tile_wgs)
  if need > _SMEM_LIMIT:
    raise ValueError(f"block_t {block_t} with {stages} stages needs {need / 1024:.1f} KiB of shared "
                     f"memory, over {_SMEM_LIMIT // 1024} KiB: use fewer stages or a smaller block_t")


def timestep_norm_bwd_mgpu(x, dy, w_hat, mu_run, rstd_run, n0, mu0, var0, g_mu, g_var, *,
                           num_groups: int, eps: float, block_t: int = 128, stages: int = 4,
                           wgs: int = 1, tile_wgs: int = 1, mask_regs: bool | None = None,
                           reload_tile: bool | None = None, padding_mask=None, segment_ids=None,
                           interpret=False):
  """TimestepNorm's backward in one pass over x and dy (Pallas Mosaic GPU, Hopper).

  x, dy: [B, L, D] (bfloat16, float16 or float32; dy as x); w_hat: [D] float32 (weight + 1);
  mu_run, rstd_run: [B, G, L] float32, the running mean and rsqrt(var + eps) after every step;
  n0: [B] float32 count of the prior state; mu0, var0: [B, G] the prior mean / var (unused: the
  gradients do not depend on them beyond mu_run / rstd_run); g_mu, g_var: [B, G] float32
  cotangents of the final state's mean and var. eps: unused (rstd_run has it).
  block_t: steps per tile (a multiple of 64 dividing L); stages: TMA ring depth of each warpgroup
  (tiles in flight: stages x warpgroups);
  wgs: compute warpgroups per program (1, or 2 splitting the group's features);
  tile_wgs: warpgroups per program working on different tiles (1 to 4; wgs must then be 1, and
  there must be at least tile_wgs tiles): warpgroup w takes tiles w, w + W, ... of the reverse walk, does
  all that does not need the carry, then takes the carry from warpgroup w - 1, hands its own to
  w + 1 and writes dx (see "Tiles in parallel").
  mask_regs: hold the suffix-sum mask in registers (32 a thread; one FMA per masked element instead
  of a compare and a select); None: when the tile's own registers leave room (see _default_mask_regs).
  reload_tile: (tile_wgs > 1) dx re-reads x and dy from shared memory instead of holding xh and dyw
  in registers across the carry wait, and w^ is read from shared memory at every use; None: with 3
  or 4 tile warpgroups (_default_reload_tile).
  padding_mask, segment_ids: must be None (ValueError otherwise: use the Triton kernels).
  interpret: Mosaic GPU interpreter parameters (tests) or False.
  Returns dx [B, L, D] in x.dtype, dw [D], db [D], d_mu0 [B, G], d_var0 [B, G] (float32).
  """
  del mu0, var0, eps
  _check(x, dy, w_hat, mu_run, rstd_run, n0, g_mu, g_var, num_groups=num_groups, block_t=block_t,
         stages=stages, wgs=wgs, tile_wgs=tile_wgs, padding_mask=padding_mask, segment_ids=segment_ids)
  batch, length, dim = x.shape
  if reload_tile is None:
    reload_tile = _default_reload_tile(tile_wgs)
  reload_tile = bool(reload_tile) and tile_wgs > 1
  if mask_regs is None:
    mask_regs = _default_mask_regs(block_t, dim // num_groups, wgs, tile_wgs, reload_tile)
  plan = _Plan(batch, length, num_groups, dim // num_groups, x.dtype, block_t, stages, wgs,
               bool(mask_regs), tile_wgs, reload_tile)
  n0 = n0.astype(jnp.float32)
  n_last = (n0 + length)[:, None]
  init = jnp.stack([g_mu.astype(jnp.float32) / n_last, g_var.astype(jnp.float32) / n_last,
                    jnp.broadcast_to(n0[:, None], (batch, num_groups))], axis=-1)
  init = jnp.pad(init, ((0, 0), (0, 0), (0, _INIT - 3)))                      # [B, G, _INIT]
  w4 = w_hat.astype(jnp.float32).reshape(num_groups, wgs, plan.chunks, plan.cols)
  dx, parts = _build_kernel(plan, interpret)(x, dy, mu_run, rstd_run, w4, init)
  # parts [B, G, warpgroups, 2 chunks + 1, cols]: with wgs = 2 the feature order is (g, wg, chunk,
  # col); with tile_wgs > 1 every warpgroup has partials of all K features (summed here). The state
  # adjoints: those of the warpgroup holding the walk's last tile ((n_tiles - 1) mod tile_wgs; with
  # wgs = 2 both hold the same).
  chunks = plan.chunks
  dw, db = parts[:, :, :, :chunks], parts[:, :, :, chunks:2 * chunks]
  if tile_wgs > 1:
    dw, db = (jnp.sum(a, axis=2, keepdims=True) for a in (dw, db))
  dw, db = (jnp.sum(a, axis=0).reshape(dim) for a in (dw, db))
  last = (plan.n_tiles - 1) % tile_wgs if tile_wgs > 1 else -1
  return dx, dw, db, parts[:, :, last, 2 * chunks, 0], parts[:, :, last, 2 * chunks, 1]


def _build_kernel(plan: _Plan, interpret):
  """The plgpu.kernel: (x, dy, mu_run, rstd_run, w4, init) -> (dx, parts)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # Mosaic GPU: imported only when used

  p = plan
  swizzle = plgpu.find_swizzle(p.cols * p.itemsize * 8)
  tile_transforms = (plgpu.TilingTransform((8, swizzle // p.itemsize)), plgpu.SwizzleTransform(swizzle))
  n_ring = p.threads * p.stages * p.chunks   # [T, cols] tiles per ring array
  n_dx = p.threads * p.dx_slots * p.chunks
  xch_shape = (2, p.wgs, 3, p.blocks, _ROWS) if p.wgs > 1 else (1, 1, 1, 1, _ROWS)   # (unused at 1)

  def kernel(x_ref, dy_ref, mu_ref, rstd_ref, w_ref, init_ref, dx_ref, parts_ref):
    gmem = (x_ref, dy_ref, mu_ref, rstd_ref, w_ref, init_ref, dx_ref, parts_ref)
    pl.run_scoped(
        lambda *scoped: _program(p, plgpu, gmem, *scoped),
        (plgpu.SMEM((n_ring, p.block_t, p.cols), p.dtype, transforms=tile_transforms),   # x
         plgpu.SMEM((n_ring, p.block_t, p.cols), p.dtype, transforms=tile_transforms),   # dy
         plgpu.SMEM((n_dx, p.block_t, p.cols), p.dtype, transforms=tile_transforms),     # dx
         plgpu.SMEM((p.threads * p.stages, 2, p.block_t), jnp.float32),                  # mu, rstd
         plgpu.SMEM((p.threads, p.chunks, p.cols), jnp.float32),                         # w^
         plgpu.SMEM((p.threads, _INIT), jnp.float32),                                    # carry in
         plgpu.SMEM((p.threads, 3 * p.blocks, _ROWS), jnp.float32),                      # scans
         plgpu.SMEM(xch_shape, jnp.float32),                                             # exchange
         plgpu.SMEM((p.threads, 2), jnp.float32),                                        # carry handed over
         plgpu.SMEM((p.threads, 2 * p.chunks + 1, p.cols), jnp.float32)),                # outputs
        (plgpu.Barrier(num_arrivals=2 * p.chunks + 2, num_barriers=p.threads * p.stages),  # tile loaded
         plgpu.Barrier(num_arrivals=2, num_barriers=p.threads),                          # w^, carry in
         plgpu.Barrier(num_arrivals=p.wgs, num_barriers=2),                              # sums exchanged
         plgpu.Barrier(num_arrivals=1, num_barriers=p.tile_wgs),                         # carry handed over
         plgpu.Barrier(num_arrivals=1, num_barriers=max(p.threads - 1, 1))),             # wg w reduced
        collective_axes="wg",
    )

  out_type = (jax.ShapeDtypeStruct((p.batch, p.length, p.groups * p.k), p.dtype),
              jax.ShapeDtypeStruct((p.batch, p.groups, p.threads, 2 * p.chunks + 1, p.cols), jnp.float32))
  return plgpu.kernel(
      kernel, out_type=out_type,
      # Mosaic GPU launches the LAST grid axis fastest: the groups of one sequence run together.
      grid=(p.batch, p.groups), grid_names=("b", "g"), num_threads=p.threads, thread_name="wg",
      # No automatic warpgroup barriers around every shared-memory store (two per store: ~16 of the
      # 22 barriers of a tile at T = 128). Every cross-thread use of shared memory here is ordered
      # explicitly: scan vectors by commit_smem between store and load (and the later barriers of
      # the tile before a slot is rewritten), dx slots by wait_smem_to_gmem before and commit_smem
      # after the writes, the exchange and the handed-over carry by mbarriers (release / acquire per
      # thread) and their slots' reuse rules, the outputs by commit_smem. approx_math: rsqrt.approx
      # (see _recip).
      compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=True, approx_math=True),
      **({"interpret": interpret} if interpret else {}),
  )


def _program(p: _Plan, plgpu, gmem, smem, barriers):
  """One warpgroup of the program of (b, g): its ring of tiles, walked in reverse time order."""
  x_ref, dy_ref, mu_ref, rstd_ref, w_ref, init_ref, dx_ref, parts_ref = gmem
  x_ring, dy_ring, dx_ring, row_ring, w_smem, init_smem, scan_smem, xch_smem, hand_smem, out_smem = smem
  loaded, prologue, exchanged, handed, reduced = barriers
  b, g, wg = lax.axis_index("b"), lax.axis_index("g"), lax.axis_index("wg")
  fw = wg if p.wgs > 1 else 0         # which part of the features (wgs = 2)
  tw = wg if p.tile_wgs > 1 else 0    # which tiles of the walk: tw, tw + tile_wgs, ...
  layout = plgpu.Layout.WGMMA
  col_layout = layout.reduce(0)   # a vector over the columns, replicated over warps
  plgpu.copy_gmem_to_smem(w_ref.at[g, fw], w_smem.at[wg], prologue.at[wg])
  plgpu.copy_gmem_to_smem(init_ref.at[b, g], init_smem.at[wg], prologue.at[wg])
  plgpu.barrier_wait(prologue.at[wg])
  if p.reload_tile:   # w^ (16 registers a thread per chunk) read from shared memory at every use
    w_cols = lambda c: _load(w_smem.at[wg, c], col_layout)  # noqa: E731
  else:
    w_held = [_load(w_smem.at[wg, c], col_layout) for c in range(p.chunks)]
    w_cols = w_held.__getitem__
  a_mu0, a_var0, n0 = init_smem[wg, 0], init_smem[wg, 1], init_smem[wg, 2]
  # Tiles of this warpgroup (tw, tw + W, ... below n_tiles): with W not dividing n_tiles the last
  # warpgroups take one fewer (a traced count; the loop's trip count is then dynamic).
  max_local = -(-p.n_tiles // p.tile_wgs)
  n_local = max_local if p.n_tiles % p.tile_wgs == 0 else (p.n_tiles - tw + p.tile_wgs - 1) // p.tile_wgs

  def ring(slot, c):
    return (wg * p.stages + slot) * p.chunks + c

  def dx_buf(k, c):
    return (wg * p.dx_slots + lax.rem(k, p.dx_slots)) * p.chunks + c

  def tile_cols(c):
    return pl.ds((g * p.wgs * p.chunks + fw * p.chunks + c) * p.cols, p.cols)

  def walk_steps(k):
    """The steps of this warpgroup's k-th tile: tile n_tiles - 1 - i of the sequence, i = k W + w."""
    return pl.ds((p.n_tiles - 1 - (k * p.tile_wgs + tw)) * p.block_t, p.block_t)

  def fetch(k, slot):
    """TMA loads of this warpgroup's k-th tile into ring slot `slot`."""
    steps = walk_steps(k)
    bar = loaded.at[wg * p.stages + slot]
    for c in range(p.chunks):
      plgpu.copy_gmem_to_smem(x_ref.at[b, steps, tile_cols(c)], x_ring.at[ring(slot, c)], bar)
      plgpu.copy_gmem_to_smem(dy_ref.at[b, steps, tile_cols(c)], dy_ring.at[ring(slot, c)], bar)
    plgpu.copy_gmem_to_smem(mu_ref.at[b, g, steps], row_ring.at[wg * p.stages + slot, 0], bar)
    plgpu.copy_gmem_to_smem(rstd_ref.at[b, g, steps], row_ring.at[wg * p.stages + slot, 1], bar)

  for k in range(min(p.stages, max_local)):
    if isinstance(n_local, int):
      fetch(k, k)
    else:
      pl.when(k < n_local)(functools.partial(fetch, k, k))
  tiles = _TileMath(p, plgpu, w_cols, n0, scan_smem.at[wg], xch_smem, exchanged, wg)

  def hand(to, a_mu, a_var):
    """The carry (A_mu, A_var) after a tile, to the warpgroup of the next tile of the walk. Every
    thread stores the same two floats and arrives (release); the receiver's threads wait (acquire).
    Slot `to` is rewritten for the receiver's next tile only after the receiver has read it: the
    next carry into `to` follows, through the chain of hand-overs, the receiver's own hand-over,
    which follows its read (W >= 2)."""
    hand_smem[to, 0] = a_mu
    hand_smem[to, 1] = a_var
    plgpu.barrier_arrive(handed.at[to])

  if p.tile_wgs > 1:
    # The walk's first tile takes the final state's cotangents: warpgroup 0 hands them to itself.
    @pl.when(tw == 0)
    def _():
      hand(0, a_mu0, a_var0)

  def step(k, carry):
    slot = lax.rem(k, p.stages)
    plgpu.barrier_wait(loaded.at[wg * p.stages + slot])
    plgpu.wait_smem_to_gmem(p.dx_slots - 1, wait_read_only=True)   # dx buffer's last store has read it
    refs = ([x_ring.at[ring(slot, c)] for c in range(p.chunks)],
            [dy_ring.at[ring(slot, c)] for c in range(p.chunks)],
            row_ring.at[wg * p.stages + slot], [dx_ring.at[dx_buf(k, c)] for c in range(p.chunks)])
    i = k * p.tile_wgs + tw   # the tile's place in the walk
    if p.tile_wgs == 1:
      carry = tiles(i, refs, carry)
    else:
      _, _, dw_acc, db_acc = carry
      dw_acc, db_acc = list(dw_acc), list(db_acc)
      pre = tiles.prepare(i, refs, dw_acc, db_acc)   # all that does not need the carry
      plgpu.barrier_wait(handed.at[tw])
      a_mu, a_var = hand_smem[tw, 0], hand_smem[tw, 1]
      a_mu_out, a_var_out = tiles.carry_out(pre, a_mu, a_var)

      @pl.when(i + 1 < p.n_tiles)   # first, since the next warpgroup waits on it (none after the last)
      def _():
        hand(lax.rem(tw + 1, p.tile_wgs), a_mu_out, a_var_out)

      tiles.finish(pre, refs, a_mu, a_var)
      carry = (a_mu_out, a_var_out, tuple(dw_acc), tuple(db_acc))
    plgpu.commit_smem()   # dx written, the input slot read by every thread of the warpgroup
    steps = walk_steps(k)
    for c in range(p.chunks):
      plgpu.copy_smem_to_gmem(dx_ring.at[dx_buf(k, c)], dx_ref.at[b, steps, tile_cols(c)],
                              commit_group=False)
    plgpu.commit_smem_to_gmem_group()

    @pl.when(k + p.stages < n_local)
    def _():
      fetch(k + p.stages, slot)

    return carry

  zeros = plgpu.layout_cast(jnp.zeros((_ROWS, p.cols), jnp.float32), layout)
  carry = (a_mu0, a_var0, (zeros,) * p.chunks, (zeros,) * p.chunks)
  a_mu, a_var, dw_acc, db_acc = lax.fori_loop(0, n_local, step, carry)
  out = out_smem.at[wg]
  # The column sums reduce across warps through Mosaic GPU's one reduction scratch buffer, which
  # all warpgroups share: with several, they take turns (warpgroup w after w - 1). (The CPU
  # interpreter does not model that buffer; this ordering is by reading, not by test.)
  if p.threads > 1:
    @pl.when(wg > 0)
    def _():
      plgpu.barrier_wait(reduced.at[wg - 1])

  for c in range(p.chunks):
    out.at[c][...] = jnp.sum(dw_acc[c], axis=0)
    out.at[p.chunks + c][...] = jnp.sum(db_acc[c], axis=0)
  if p.threads > 1:
    @pl.when(wg < p.threads - 1)
    def _():
      plgpu.barrier_arrive(reduced.at[wg])

  # [d_mu0, d_var0, 0, ...] as one vector store (separate scalar stores into a row just written
  # would race between threads: no automatic barriers, see _build_kernel). With tile_wgs > 1 only
  # the last warpgroup's (it holds the walk's last tile) is used.
  idx = plgpu.broadcasted_iota(jnp.int32, (p.cols,), 0, layout=col_layout)
  out.at[2 * p.chunks][...] = jnp.where(idx == 0, n0 * a_mu, jnp.where(idx == 1, n0 * a_var, 0.0))
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out, parts_ref.at[b, g, wg])
  plgpu.wait_smem_to_gmem(0)


class _TileMath:
  """The reverse recurrence through one tile (see the module docstring), for one warpgroup."""

  def __init__(self, p: _Plan, plgpu, w_cols, n0, scan_smem, xch_smem, exchanged, wg):
    self.p, self.plgpu, self.w_cols, self.n0 = p, plgpu, w_cols, n0
    self.scan_smem, self.xch_smem, self.exchanged, self.wg = scan_smem, xch_smem, exchanged, wg
    self.layout = plgpu.Layout.WGMMA
    self.row_layout = self.layout.reduce(1)   # a vector over the steps (rows) of a block
    self.col_layout = self.layout.reduce(0)
    # mask_regs: the [64, 64] suffix mask as float 0 / 1 made once and held in registers (32 per
    # thread), so that a masked sum is one FMA per element; else an iota compare and a select.
    self.upper = self.suffix_mask(1.0, 0.0) if p.mask_regs else None

  def suffix_mask(self, inside, outside):
    """[t, s] = inside where s >= t (step s at or after step t), else outside (WGMMA layout)."""
    rows = self.plgpu.broadcasted_iota(jnp.int32, (_ROWS, _ROWS), 0, layout=self.layout)
    cols = self.plgpu.broadcasted_iota(jnp.int32, (_ROWS, _ROWS), 1, layout=self.layout)
    return jnp.where(cols >= rows, inside, outside)

  def bcast_rows(self, vec, cols):
    return lax.broadcast_in_dim(vec, (_ROWS, cols), [0])

  def __call__(self, i, refs, carry):
    p = self.p
    x_s, dy_s, rows_s, dx_s = refs
    a_mu, a_var, dw_acc, db_acc = carry
    dw_acc, db_acc = list(dw_acc), list(db_acc)
    blocks, sums = [], []
    for j in range(p.blocks):
      blk, blk_sums = self.block_sums(j, x_s, dy_s, rows_s, dw_acc, db_acc)
      blocks.append(blk)
      sums.append(blk_sums)
    if p.wgs > 1:
      sums = self.exchange(i, sums)
    tile = p.n_tiles - 1 - i
    terms = [self.step_terms(tile, j, blocks[j][0], *sums[j]) for j in range(p.blocks)]
    # Round 1: suffix sums of lv within each block; the blocks after a block add their totals.
    sv, lv_tot = zip(*[self.suffix(lv, j) for j, (_, lv, _, _) in enumerate(terms)])
    a_var_blk = self.carry_back(a_var, lv_tot)
    h_var = [sv[j] + a_var_blk[j] for j in range(p.blocks)]
    # Round 2: suffix sums of q = lm - z H_var.
    q = [lm - z * h_var[j] for j, (lm, _, z, _) in enumerate(terms)]
    sq, q_tot = zip(*[self.suffix(q[j], p.blocks + j) for j in range(p.blocks)])
    a_mu_blk = self.carry_back(a_mu, q_tot)
    for j, (r, xh_c, dyw_c) in enumerate(blocks):
      h_mu = sq[j] + terms[j][2] * h_var[j] + a_mu_blk[j]
      shift = self.bcast_rows(h_mu * (1.0 / p.k), p.cols)
      scale = self.bcast_rows(h_var[j] * (2.0 / p.k) * terms[j][3], p.cols)
      r_b = self.bcast_rows(r, p.cols)
      for c in range(p.chunks):
        dx = r_b * dyw_c[c] + shift + scale * xh_c[c]
        dx_s[c].at[pl.ds(j * _ROWS, _ROWS)][...] = dx.astype(p.dtype)
    return (a_mu_blk[0] + q_tot[0], a_var_blk[0] + lv_tot[0], tuple(dw_acc), tuple(db_acc))

  # Tiles in parallel (tile_wgs > 1): the recurrence through a tile is affine in the carry that
  # enters it, so everything but a few FMAs per step is computed before the carry is known.
  def prepare(self, i, refs, dw_acc, db_acc):
    """The carry-free part of the walk's i-th tile (dw_acc, db_acc accumulated in place): per step
    sv (the suffix sum of lv within the tile), P and Q with H_var = sv + A_var and
    H_mu = P + A_var Q + A_mu, and the tile's totals (Lv, U, Z) with A_var' = A_var + Lv and
    A_mu' = A_mu + U - A_var Z for the carry leaving it (the carry entering is A_mu, A_var).

    From the module docstring with a_t the suffix sums within the tile and the carry added:
    H_var_t = sv_t + A_var; q_t = lm_t - z_t H_var_t = u_t - z_t A_var with u = lm - z sv; so
    H_mu_t = A_mu + sum_{s >= t} q_s + z_t H_var_t = (su_t + z_t sv_t) + A_var (z_t - sz_t) + A_mu.
    Three suffix sums (lv and z together, then u) instead of two, none waiting for the carry."""
    p = self.p
    x_s, dy_s, rows_s, _ = refs
    blocks, sums = [], []
    for j in range(p.blocks):
      blk, blk_sums = self.block_sums(j, x_s, dy_s, rows_s, dw_acc, db_acc, keep=not p.reload_tile)
      blocks.append(blk)
      sums.append(blk_sums)
    tile = p.n_tiles - 1 - i
    terms = [self.step_terms(tile, j, blocks[j][0], *sums[j]) for j in range(p.blocks)]
    nb = p.blocks
    # Round 1: lv and z of every block through shared memory at once (one warpgroup barrier).
    scans = self.suffixes([t[1] for t in terms] + [t[2] for t in terms], list(range(2 * nb)))
    sv, lv_tot = self.within_tile([scans[j] for j in range(nb)])
    sz, z_tot = self.within_tile([scans[nb + j] for j in range(nb)])
    # Round 2: u = lm - z sv.
    u = [terms[j][0] - terms[j][2] * sv[j] for j in range(nb)]
    su, u_tot = self.within_tile(self.suffixes(u, list(range(2 * nb, 3 * nb))))
    coef = [(sv[j], su[j] + terms[j][2] * sv[j], terms[j][2] - sz[j], terms[j][3]) for j in range(nb)]
    return blocks, coef, (lv_tot, u_tot, z_tot)

  def carry_out(self, pre, a_mu, a_var):
    """The carry leaving the tile from the one entering it (two scalar FMAs: the serial part)."""
    lv_tot, u_tot, z_tot = pre[2]
    return a_mu + u_tot - a_var * z_tot, a_var + lv_tot

  def finish(self, pre, refs, a_mu, a_var):
    """dx of the tile given the carry entering it, into the ring's dx slot."""
    p = self.p
    x_s, dy_s, rows_s, dx_s = refs
    blocks, coef, _ = pre
    for j, (r, mur, xh_c, dyw_c) in enumerate(blocks):
      sv, pc, qc, inv_r = coef[j]
      h_mu = pc + a_var * qc + a_mu
      shift = self.bcast_rows(h_mu * (1.0 / p.k), p.cols)
      scale = self.bcast_rows((sv + a_var) * (2.0 / p.k) * inv_r, p.cols)
      r_b = self.bcast_rows(r, p.cols)
      for c in range(p.chunks):
        if p.reload_tile:   # x and dy again from the ring (the slot is refilled only after this)
          xh_c[c], dyw_c[c] = self.xh_dyw(j, c, x_s, dy_s, r_b, self.bcast_rows(mur, p.cols))[:2]
        dx = r_b * dyw_c[c] + shift + scale * xh_c[c]
        dx_s[c].at[pl.ds(j * _ROWS, _ROWS)][...] = dx.astype(p.dtype)

  def suffixes(self, vecs, slots):
    """Inclusive suffix sums of row vectors over their 64 steps and their totals (scalars), as
    `suffix` but with one warpgroup barrier for all of them."""
    for vec, slot in zip(vecs, slots):
      self.scan_smem.at[slot][...] = vec
    self.plgpu.commit_smem()
    return [self.masked_sum(_load(self.scan_smem.at[slot], self.col_layout)) for slot in slots]

  def within_tile(self, scans):
    """Per-block suffix sums and totals -> suffix sums within the tile (later blocks' totals
    added) and the tile's total."""
    sums, tots = zip(*scans)
    out, after = list(sums), None
    for j in range(self.p.blocks - 1, -1, -1):
      if after is not None:
        out[j] = sums[j] + after
      after = tots[j] if after is None else after + tots[j]
    return out, after

  def block_sums(self, j, x_s, dy_s, rows_s, dw_acc, db_acc, keep=True):
    """Steps j*64 .. j*64+63: xh, dyw per chunk (kept: the registers are then live until dx), the
    per-step sums over this warpgroup's features (se, s1, s2) and the dw, db partials (accumulated
    in place)."""
    p = self.p
    steps = pl.ds(j * _ROWS, _ROWS)
    mu = _load(rows_s.at[0, steps], self.row_layout)
    r = _load(rows_s.at[1, steps], self.row_layout)
    mur = mu * r
    r_b = self.bcast_rows(r, p.cols)
    mur_b = self.bcast_rows(mur, p.cols)
    se = s1 = s2 = None
    xh_c, dyw_c = [], []
    for c in range(p.chunks):
      xh, dyw, dyf = self.xh_dyw(j, c, x_s, dy_s, r_b, mur_b)
      parts = (jnp.sum(xh, axis=1), jnp.sum(dyw, axis=1), jnp.sum(dyw * xh, axis=1))
      se, s1, s2 = parts if se is None else (se + parts[0], s1 + parts[1], s2 + parts[2])
      dw_acc[c] = dw_acc[c] + dyf * xh
      db_acc[c] = db_acc[c] + dyf
      xh_c.append(xh if keep else None)
      dyw_c.append(dyw if keep else None)
    if p.tile_wgs == 1:
      return (r, xh_c, dyw_c), (se, s1, s2)
    return (r, mur, xh_c, dyw_c), (se, s1, s2)

  def xh_dyw(self, j, c, x_s, dy_s, r_b, mur_b):
    """xh, dyw and dy (float32) of chunk c of block j from the ring."""
    p = self.p
    steps = pl.ds(j * _ROWS, _ROWS)
    xf = _load(x_s[c].at[steps], self.layout).astype(jnp.float32)
    dyf = _load(dy_s[c].at[steps], self.layout).astype(jnp.float32)
    xh = xf * r_b - mur_b
    dyw = dyf * lax.broadcast_in_dim(self.w_cols(c), (_ROWS, p.cols), [1])
    return xh, dyw, dyf

  def exchange(self, i, sums):
    """Per-step sums over the whole group: each warpgroup adds the other's (through shared memory;
    slots alternate with the tile's parity so that a slot is rewritten only after both read it).
    The addition commutes, so both warpgroups hold bitwise the same sums, scans and carries."""
    slot = lax.rem(i, 2)
    mine = self.xch_smem.at[slot, self.wg]
    for j, blk_sums in enumerate(sums):
      for q, vec in enumerate(blk_sums):
        mine.at[q, j][...] = vec
    self.plgpu.barrier_arrive(self.exchanged.at[slot])
    self.plgpu.barrier_wait(self.exchanged.at[slot])
    theirs = self.xch_smem.at[slot, 1 - self.wg]
    return [tuple(vec + _load(theirs.at[q, j], self.row_layout) for q, vec in enumerate(blk_sums))
            for j, blk_sums in enumerate(sums)]

  def step_terms(self, tile, j, r, se, s1, s2):
    """lm, lv, z and 1 / r of the block's steps (row vectors; see the module docstring).

    Reciprocals as squared approximate rsqrt (MUFU, ~3e-7 relative; approx_math): an IEEE division
    is ~10 instructions with a slow path, and there are three per step."""
    p = self.p
    in_block = self.plgpu.broadcasted_iota(jnp.int32, (_ROWS,), 0, layout=self.row_layout)
    n = self.n0 + (tile * p.block_t + j * _ROWS + in_block + 1).astype(jnp.float32)
    inv_n = _recip(n)
    inv_r = lax.rsqrt(r * r)
    lm = -r * s1 * inv_n
    lv = -0.5 * r * r * s2 * inv_n
    z = jnp.where(n > 1.0, (2.0 / p.k) * se * inv_r * _recip(jnp.maximum(n - 1.0, 1.0)), 0.0)
    return lm, lv, z, inv_r

  def suffix(self, vec, slot):
    """Inclusive suffix sums of a row vector over its 64 steps, and its total (a scalar): the
    vector goes through shared memory into the column layout, is spread over [64, 64] (t, s),
    masked to s >= t and summed along s."""
    self.scan_smem.at[slot][...] = vec
    self.plgpu.commit_smem()   # (a warpgroup barrier: the stores are visible to all threads)
    return self.masked_sum(_load(self.scan_smem.at[slot], self.col_layout))

  def masked_sum(self, col):
    """Suffix sums (row layout) and total of a vector over 64 steps held in the column layout."""
    spread = lax.broadcast_in_dim(col, (_ROWS, _ROWS), [1])
    masked = self.upper * spread if self.upper is not None else self.suffix_mask(spread, 0.0)
    return jnp.sum(masked, axis=1), jnp.sum(col)

  def carry_back(self, after_tile, totals):
    """The adjoint arriving at each block from after it: the tile's carry plus later blocks' totals."""
    out = [after_tile] * self.p.blocks
    for j in range(self.p.blocks - 2, -1, -1):
      out[j] = out[j + 1] + totals[j + 1]
    return out
