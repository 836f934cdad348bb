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

Per tile (T = block_t steps, read as T / 64 blocks of [64, 64] features; K / 64 column chunks):
  1. x, dy -> float32 in registers (WGMMA layout: a thread holds 2 rows x 16 columns of a block);
     xh = x r - mu r (one FMA), dyw = dy w^; row sums se, s1, s2 (in-thread adds, 2 shuffle rounds);
     dw, db partials accumulate in registers ([64, 64] per chunk, summed over rows once at the end).
  2. Suffix sums of lv, then of q = lm - z H_var, over each 64-step block: Mosaic GPU has no scan,
     so a row vector goes through shared memory into the column layout (a store, one warpgroup
     barrier, a load), is broadcast over a [64, 64] block, masked (s >= t) and summed along rows
     (S_t = sum_s [s >= t] a_s). A block's total (for the blocks before it, and the carry) is the sum
     of the column-layout copy (replicated over warps: in-thread adds and 2 shuffle rounds).
     Round 1 (lv) needs no carry; round 2 (q) needs A_var, known after round 1. Two barriers per
     tile whatever T.
  3. dx = r dyw + H_mu / K + (2 H_var / (K r)) xh, cast, stored into the pipeline's output slot.
  The carry (A_mu, A_var) and the dw / db partials are emit_pipeline's loop carry.
Cycle estimate (one warpgroup, T = 128, K = 64, per thread of the 128): ~13 instructions per
element (2 shared loads per 2 elements, 2 conversions, 8 FMA-class ops, a conversion and store
back) over 64 elements ~ 850, the two scan rounds ~4 x 70 (select + add over a [64, 64] block,
in-thread sums, shuffles) plus conversions ~ 350: ~1,200 issue slots per warp for a tile that
TMA moves in ~1,800 cycles at 3.3 TB/s over 64 SMs. The critical path (loads, row sums, two smem
round trips, dx) is ~600-900 cycles; prefetched tiles (stages) cover TMA latency.

Grid (B, G), last axis fastest: the programs of one sequence run together. Inputs stream through
plgpu.emit_pipeline in reverse time order (BlockSpec index maps n_tiles - 1 - i), TMA into
128-byte-swizzled shared memory; dx leaves by TMA from the pipeline's output slots.

Unsupported (ValueError from `_check`, so that a dispatcher can fall back to the Triton kernels of
kernels_pallas/timestep_norm.py): padding masks, segment ids, K = D / G not a multiple of 64, L not
a multiple of block_t, block_t not a multiple of 64, dtypes other than bfloat16 / float16 /
float32, shared memory over 227 KiB.

Outputs: dx [B, L, D] in x.dtype, dw [D] and db [D] float32 (per-program partials [B, G, K] summed
over B outside the kernel), d_mu0, d_var0 [B, G] float32.
"""

from __future__ import annotations

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
_SMEM_SLACK = 6144  # barriers, 1 KiB alignment of swizzled buffers, Mosaic GPU's reduction scratch (2 KiB)
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
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


def smem_bytes(block_t: int, stages: int, chunks: int, itemsize: int) -> int:
  """Shared memory of one program: per stage x, dy, dx tiles [block_t, K] and mu, rstd rows."""
  per_stage = 3 * block_t * chunks * _COLS * itemsize + 2 * block_t * 4
  scratch = (chunks * _COLS + _INIT + 2 * (block_t // _ROWS) * _ROWS + (2 * chunks + 1) * _COLS) * 4
  return stages * per_stage + scratch + _SMEM_SLACK


def _check(x, dy, w_hat, mu_run, rstd_run, n0, g_mu, g_var, *, num_groups: int, block_t: int,
           stages: int, padding_mask, segment_ids) -> None:
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
  if block_t <= 0 or block_t % _ROWS:
    raise ValueError(f"block_t {block_t} is not a multiple of {_ROWS}")
  if length % block_t:
    raise ValueError(f"sequence length {length} is not a multiple of block_t {block_t} (use the "
                     "Triton kernels, or a block_t dividing it)")
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
  need = smem_bytes(block_t, stages, dim // num_groups // _COLS, jnp.dtype(x.dtype).itemsize)
  if need > _SMEM_LIMIT:
    raise ValueError(f"block_t {block_t} with {stages} stages needs {need / 1024:.1f} KiB of shared "
                     f"memory, over {_SMEM_LIMIT // 1024} KiB: use fewer stages or a smaller block_t")


def timestep_norm_bwd_mgpu(x, dy, w_hat, mu_run, rstd_run, n0, mu0, var0, g_mu, g_var, *,
                           num_groups: int, eps: float, block_t: int = 128, stages: int = 4,
                           padding_mask=None, segment_ids=None, interpret=False):
  """TimestepNorm's backward in one pass over x and dy (Pallas Mosaic GPU, Hopper).

  x, dy: [B, L, D] (bfloat16, float16 or float32; dy as x); w_hat: [D] float32 (weight + 1);
  mu_run, rstd_run: [B, G, L] float32, the running mean and rsqrt(var + eps) after every step;
  n0: [B] float32 count of the prior state; mu0, var0: [B, G] the prior mean / var (unused: the
  gradients do not depend on them beyond mu_run / rstd_run); g_mu, g_var: [B, G] float32
  cotangents of the final state's mean and var. eps: unused (rstd_run has it).
  block_t: steps per tile (a multiple of 64 dividing L); stages: tiles in flight (TMA ring depth).
  padding_mask, segment_ids: must be None (ValueError otherwise: use the Triton kernels).
  interpret: Mosaic GPU interpreter parameters (tests) or False.
  Returns dx [B, L, D] in x.dtype, dw [D], db [D], d_mu0 [B, G], d_var0 [B, G] (float32).
  """
  del mu0, var0, eps
  _check(x, dy, w_hat, mu_run, rstd_run, n0, g_mu, g_var, num_groups=num_groups, block_t=block_t,
         stages=stages, padding_mask=padding_mask, segment_ids=segment_ids)
  batch, length, dim = x.shape
  groups = num_groups
  chunks = dim // groups // _COLS
  n0 = n0.astype(jnp.float32)
  n_last = (n0 + length)[:, None]
  init = jnp.stack([g_mu.astype(jnp.float32) / n_last, g_var.astype(jnp.float32) / n_last,
                    jnp.broadcast_to(n0[:, None], (batch, groups))], axis=-1)
  init = jnp.pad(init, ((0, 0), (0, 0), (0, _INIT - 3)))                      # [B, G, _INIT]
  w3 = w_hat.astype(jnp.float32).reshape(groups, chunks, _COLS)
  kernel = _build_kernel(batch, length, groups, chunks, x.dtype, block_t, stages, interpret)
  dx, parts = kernel(x, dy, mu_run, rstd_run, w3, init)
  dw = jnp.sum(parts[:, :, :chunks], axis=0).reshape(dim)
  db = jnp.sum(parts[:, :, chunks:2 * chunks], axis=0).reshape(dim)
  return dx, dw, db, parts[:, :, 2 * chunks, 0], parts[:, :, 2 * chunks, 1]


def _build_kernel(batch: int, length: int, groups: int, chunks: int, dtype, block_t: int,
                  stages: int, interpret):
  """The plgpu.kernel: (x, dy, mu_run, rstd_run, w3, init) -> (dx, parts [B, G, 2 chunks + 1, 64])."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # Mosaic GPU: imported only when used

  n_tiles = length // block_t
  blocks = block_t // _ROWS
  k = chunks * _COLS
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(_COLS * itemsize * 8)
  tile_transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
  layout = plgpu.Layout.WGMMA
  row_layout = layout.reduce(1)   # a vector over the steps (rows) of a block
  col_layout = layout.reduce(0)   # a vector over the features (columns), replicated over warps

  def kernel(x_ref, dy_ref, mu_ref, rstd_ref, w_ref, init_ref, dx_ref, parts_ref,
             w_smem, init_smem, vec_smem, parts_smem, bar):
    b = lax.axis_index("b")
    g = lax.axis_index("g")
    plgpu.copy_gmem_to_smem(w_ref.at[g], w_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(init_ref.at[b, g], init_smem, bar.at[0])
    plgpu.barrier_wait(bar.at[0])
    w_cols = [_load(w_smem.at[c], col_layout) for c in range(chunks)]
    a_mu0, a_var0, n0 = init_smem[0], init_smem[1], init_smem[2]
    rows = plgpu.broadcasted_iota(jnp.int32, (_ROWS, _COLS), 0, layout=layout)
    cols = plgpu.broadcasted_iota(jnp.int32, (_ROWS, _COLS), 1, layout=layout)
    upper = cols >= rows   # [t, s]: step s at or after step t (suffix sums)
    step_in_block = plgpu.broadcasted_iota(jnp.int32, (_ROWS,), 0, layout=row_layout)

    def suffix(vec, slot):
      """Inclusive suffix sums of a row vector over its 64 steps, and its total (a scalar)."""
      vec_smem.at[slot][...] = vec
      plgpu.commit_smem()   # (a warpgroup barrier: the stores are visible to all threads)
      col = _load(vec_smem.at[slot], col_layout)
      spread = lax.broadcast_in_dim(col, (_ROWS, _COLS), [1])
      return jnp.sum(jnp.where(upper, spread, 0.0), axis=1), jnp.sum(col)

    def tile_body(indices, *refs):
      x_s, dy_s = refs[:chunks], refs[chunks:2 * chunks]
      mu_s, r_s = refs[2 * chunks], refs[2 * chunks + 1]
      dx_s = refs[2 * chunks + 2:3 * chunks + 2]
      a_mu, a_var, dw_acc, db_acc = refs[3 * chunks + 2]
      tile = n_tiles - 1 - indices[0]
      dw_acc, db_acc = list(dw_acc), list(db_acc)
      per_block = []
      for j in range(blocks):
        steps = pl.ds(j * _ROWS, _ROWS)
        mu = _load(mu_s.at[steps], row_layout)
        r = _load(r_s.at[steps], row_layout)
        r_b = lax.broadcast_in_dim(r, (_ROWS, _COLS), [0])
        mur_b = lax.broadcast_in_dim(mu * r, (_ROWS, _COLS), [0])
        se = s1 = s2 = None
        xh_c, dyw_c = [], []
        for c in range(chunks):
          xf = _load(x_s[c].at[steps], layout).astype(jnp.float32)
          dyf = _load(dy_s[c].at[steps], layout).astype(jnp.float32)
          xh = xf * r_b - mur_b
          dyw = dyf * lax.broadcast_in_dim(w_cols[c], (_ROWS, _COLS), [1])
          parts = (jnp.sum(xh, axis=1), jnp.sum(dyw, axis=1), jnp.sum(dyw * xh, axis=1))
          se, s1, s2 = parts if se is None else (se + parts[0], s1 + parts[1], s2 + parts[2])
          dw_acc[c] = dw_acc[c] + dyf * xh
          db_acc[c] = db_acc[c] + dyf
          xh_c.append(xh)
          dyw_c.append(dyw)
        t = (tile * block_t + j * _ROWS + step_in_block).astype(jnp.float32)
        n = n0 + t + 1.0
        inv_n = 1.0 / n
        lm = -r * s1 * inv_n
        lv = -0.5 * r * r * s2 * inv_n
        z = jnp.where(n > 1.0, (2.0 / k) * se / (r * jnp.maximum(n - 1.0, 1.0)), 0.0)
        per_block.append((r, lm, lv, z, xh_c, dyw_c))
      # Round 1: suffix sums of lv within each block; the blocks after a block add their totals.
      sv, lv_tot = zip(*[suffix(blk[2], j) for j, blk in enumerate(per_block)])
      a_var_blk = [None] * blocks
      a_var_blk[-1] = a_var
      for j in range(blocks - 2, -1, -1):
        a_var_blk[j] = a_var_blk[j + 1] + lv_tot[j + 1]
      h_var = [sv[j] + a_var_blk[j] for j in range(blocks)]
      # Round 2: suffix sums of q = lm - z H_var.
      q = [blk[1] - blk[3] * h_var[j] for j, blk in enumerate(per_block)]
      sq, q_tot = zip(*[suffix(q[j], blocks + j) for j in range(blocks)])
      a_mu_blk = [None] * blocks
      a_mu_blk[-1] = a_mu
      for j in range(blocks - 2, -1, -1):
        a_mu_blk[j] = a_mu_blk[j + 1] + q_tot[j + 1]
      for j, (r, _, _, z, xh_c, dyw_c) in enumerate(per_block):
        h_mu = sq[j] + z * h_var[j] + a_mu_blk[j]
        shift = lax.broadcast_in_dim(h_mu * (1.0 / k), (_ROWS, _COLS), [0])
        scale = lax.broadcast_in_dim(h_var[j] * (2.0 / k) / r, (_ROWS, _COLS), [0])
        r_b = lax.broadcast_in_dim(r, (_ROWS, _COLS), [0])
        for c in range(chunks):
          dx = r_b * dyw_c[c] + shift + scale * xh_c[c]
          dx_s[c].at[pl.ds(j * _ROWS, _ROWS)][...] = dx.astype(dtype)
      return (a_mu_blk[0] + q_tot[0], a_var_blk[0] + lv_tot[0], tuple(dw_acc), tuple(db_acc))

    def tile_spec(c):
      return plgpu.BlockSpec((None, block_t, _COLS), lambda i: (b, n_tiles - 1 - i, g * chunks + c),
                             transforms=tile_transforms)

    row_spec = plgpu.BlockSpec((None, None, block_t), lambda i: (b, g, n_tiles - 1 - i))
    zeros = plgpu.layout_cast(jnp.zeros((_ROWS, _COLS), jnp.float32), layout)
    carry = (a_mu0, a_var0, (zeros,) * chunks, (zeros,) * chunks)
    a_mu, a_var, dw_acc, db_acc = plgpu.emit_pipeline(
        tile_body, grid=(n_tiles,),
        in_specs=[tile_spec(c) for c in range(chunks)] * 2 + [row_spec, row_spec],
        out_specs=[tile_spec(c) for c in range(chunks)],
        max_concurrent_steps=stages, init_carry=carry,
    )(*([x_ref] * chunks), *([dy_ref] * chunks), mu_ref, rstd_ref, *([dx_ref] * chunks))
    for c in range(chunks):
      parts_smem.at[c][...] = jnp.sum(dw_acc[c], axis=0)
      parts_smem.at[chunks + c][...] = jnp.sum(db_acc[c], axis=0)
    parts_smem.at[2 * chunks][...] = plgpu.layout_cast(jnp.zeros((_COLS,), jnp.float32), col_layout)
    parts_smem[2 * chunks, 0] = n0 * a_mu
    parts_smem[2 * chunks, 1] = n0 * a_var
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(parts_smem, parts_ref.at[b, g])
    plgpu.wait_smem_to_gmem(0)

  out_type = (jax.ShapeDtypeStruct((batch, length, groups * k), dtype),
              jax.ShapeDtypeStruct((batch, groups, 2 * chunks + 1, _COLS), jnp.float32))
  scratch = (plgpu.SMEM((chunks, _COLS), jnp.float32),
             plgpu.SMEM((_INIT,), jnp.float32),
             plgpu.SMEM((2 * blocks, _ROWS), jnp.float32),
             plgpu.SMEM((2 * chunks + 1, _COLS), jnp.float32),
             plgpu.Barrier(num_arrivals=2, num_barriers=1))
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch,
      # Mosaic GPU launches the LAST grid axis fastest: the groups of one sequence run together.
      grid=(batch, groups), grid_names=("b", "g"),
      **({"interpret": interpret} if interpret else {}),
  )
