"""Pallas kernels for Megalodon's chunked causal softmax attention (SPEC §4).

The function is exactly `megalodon_jax.ops.attention.chunked_attention_xla`: the sequence is cut
into chunks of C steps, a query sees the keys of its own chunk at or before it (and, with packed
sequences, only keys with its segment id), scores are `scale * q.k` with scale 1.0 by default (no
1/sqrt(d)), the softmax runs in float32 and the probabilities are cast to v.dtype before they
multiply v. Blocks above the diagonal and blocks of other chunks are never visited.

Why the GPU kernels are not one flash-attention kernel. Megalodon's value heads are 8x wider
than its q/k heads (dk 256, dv 2048). A flash kernel keeps a [block_q, dv] float32 accumulator in
registers; at dv 2048 that does not fit, so dv must be tiled over the grid, and then every dv tile
recomputes Q K^T (8 times with 256-wide tiles), and the backward pass needs the full dv
contraction dO V^T before dS exists. So the GPU path computes every product exactly once, as
GEMM-shaped kernels over the visited (query block, key block) tiles of each chunk, passing the
[block_q, block_k] probability tiles through HBM:

  forward   1. scores, two passes over the visited key blocks of a query block: the row maxima m
               of S = Q K^T (float32, base 2), then S again and the tiles P~ = exp2(S - m) stored
               with the row sums l (lse = m + log2 l; 1 / l kept for step 2).
            2. block-causal matmul over dv tiles: O_i = (1 / l_i) sum_j P~_ij V_j (the division
               once, after the loop). (KernelConfig(fwd_scores='online'): one pass with running
               maxima per key block instead, which step 2 applies to every tile inside its loop.)
  backward  3. per visited tile: S, P = exp2(S - lse), dP = dO V^T (full dv), dS = P (dP - delta);
               stores P and dS tiles (delta = rowsum(O * dO) from XLA, or on Hopper from programs of
               the Mosaic GPU tiles kernel of their own, beside the tiles: KernelConfig.delta_impl).
            4. dV = P^T dO, dK = dS^T Q (block-causal transposed matmuls), dQ = dS K.
  The matmuls of steps 2 and 4 may use finer tiles than the kernels that wrote the tiles (they
  read only tiles those kernels visited); step 3 wants wide tiles (its cost is streaming dO and V).

Per chunk and head that is C^2 (dk + dv) FLOPs forward and C^2 (3 dk + 2 dv) backward (causal
halves), the minimum, at the cost of a transient [B, H, L, C] buffer (one in the forward pass, two
in the backward pass; the XLA path materialises more). A flash forward without the buffer
(online softmax, dv tiled over the grid) is available as `KernelConfig(fwd_impl="flash")`; it is
also the kernel of `cached_chunk_attention` (decoding / prefill).

TPU (Mosaic): VMEM holds a [block_q, dv] float32 accumulator easily, so those kernels are plain
flash-attention-2 (forward with online softmax; backward dK/dV kernel and dQ kernel), following
the idioms of jax.experimental.pallas.ops.tpu.flash_attention (lane-broadcast statistics,
clamped index maps for skipped blocks, scratch accumulators).

Dispatch: `jax.default_backend()` 'gpu' -> Triton kernels, 'tpu' -> Mosaic kernels, anything
else -> the Triton kernels in interpret mode (slow; for tests). `platform=` overrides this.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from kernels_pallas.triton_backend import plgpu
import jax.numpy as jnp
import numpy as np

from megalodon_jax.ops import attention as xla_attention

# A large finite negative score for masked entries: keeps every max/exp finite (no inf - inf).
_MASK = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)
# fwd_scores='bounded': the largest exponent (base 2) of a stored P~ tile entry.
_BOUND_MARGIN = 64.0
_LANES = 128
_SUBLANES = 8
_PLATFORMS = ("triton", "mosaic")


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tile sizes and launch parameters. They change speed, not results (beyond rounding).

  block_q, block_k: rows of the query / key tiles. GPU: powers of 2 >= 16. TPU: multiples of 8
    (of 128 on real hardware); chunks are padded to a multiple of max(block_q, block_k).
  bwd_block_q, bwd_block_k: GPU only; the same for the backward kernels (None: 128 at 16 bits).
  mm_block_q, mm_block_k, bwd_mm_block_q, bwd_mm_block_k: GPU only; tiles of the block matmuls
    (forward P V; backward dV, dK, dQ) when they differ from those of the kernel that wrote the
    probability tiles (None: the same). They must divide the writer's tiles, so that every tile
    a matmul reads lies inside a tile the writer visited.
  block_d: GPU only; width of the output feature tiles of the block matmuls and of the dv tiles
    of the flash forward.
  block_c: GPU only; width of the feature chunks over which dO V^T (the dv contraction) is done.
  block_qk: GPU only; the same for Q K^T (dk). When it covers dk the query tile is loaded once and
    held across the key loop.
  block_r: GPU only; reduction step of the block matmuls (a power of 2 dividing block_q, block_k).
  num_warps, num_stages: Triton launch parameters of every GPU kernel (None: per kernel, below).
  scores_warps, scores_stages, matmul_warps, matmul_stages, tiles_warps, tiles_stages: the same for
    one GPU kernel family only (the forward scores kernel; the block matmuls of both passes; the
    backward tiles kernel). None: num_warps / num_stages, else a heuristic.
  fwd_impl: GPU forward, 'blocks' (Q K^T once, probability tiles through HBM) or 'flash' (online
    softmax with dv tiled over the grid; no [B, H, L, C] buffer, Q K^T recomputed per dv tile).
  fwd_scores: GPU 'blocks' forward. 'twopass': the scores kernel finds the row maxima first, then
    stores P~ = exp2(S - row max) and the block matmul divides its output rows by the row sums
    (Q K^T twice, nothing rescaled inside the matmul loop). 'online': one pass with running maxima
    per key block, which the matmul applies to every probability tile before multiplying.
    'bounded': 'twopass' whose first pass skips the off-diagonal key blocks of a query block when
    the Cauchy-Schwarz bound |q| max|k| of every row is within 2^64 of the row's diagonal maximum
    (exact up to rounding either way; without segment ids, where it runs as 'twopass'; costs an
    XLA pass over q and k). The default: on an H200 (C=2048, dk=256, dv=2048, bf16) its scores
    pass took 0.45-0.51 ms against 0.57-0.63 for 'twopass' in the same runs.
  bwd_order: GPU backward tiles kernel, 'dp_first' (dO V^T, then S: only one [bq, bk] accumulator
    is live during the long dv loop) or 's_first' (S and P first, P held while dP accumulates).
  delta_impl: GPU backward, delta = rowsum(O dO) by an XLA reduction ('xla'), a Pallas kernel
    ('pallas'), or programs of the Mosaic GPU tiles kernel of their own ('tiles': `bwd_tiles_mgpu(...,
    out=, delta_ctas=)`, ~14 of its 132 on an H200, where that kernel runs on its persistent schedule;
    XLA elsewhere). 'auto' (the default): the environment variable MEGALODON_ATTENTION_DELTA if set, else
    'tiles' (so XLA off Hopper). On an H200 'tiles' made the op 1.0% faster in two interleaved A/Bs,
    3.881 against 3.921 ms over 21 rounds and 3.871 against 3.926 over 15, the tiles kernel 1.34-1.37 ms
    against 1.42 for XLA's delta plus the kernel (2026-12-01).
  matmul_impl: GPU block matmuls (the forward's P V, the backward's dV, dK, dQ): Pallas Triton
    ('triton') or the warp-specialised TMA + wgmma Mosaic GPU kernel (kernels_pallas.block_matmul_mgpu;
    'mgpu', Hopper only) wherever its shapes allow (128 x 128 probability tiles, chunk a multiple of
    128, feature widths a multiple of 128, 16-bit inputs; the Triton kernel elsewhere, and always in
    the interpreter). 'auto' (the default): 'mgpu' on a compute-capability 9.0 GPU, else 'triton';
    the environment variable MEGALODON_ATTENTION_MATMUL=triton|mgpu overrides 'auto' (A/B runs of
    whole models). On an H200 at C=2048, dk 256, dv 2048: 4.360 against 4.644 ms fwd+bwd in one
    bench_ops run, P V 0.938 against 1.069 ms, dV 0.967 against 1.114 (2026-11-30).
    The Mosaic GPU matmuls run their persistent schedule (one program per SM): the op 3.968 against
    4.103 ms with one program per work item, faster in 16 of 17 interleaved rounds (2026-11-30).
    dV and dK share one launch where dv and dk have the same d-tile width (256 or 128): the op 4.002
    and 4.032 against 4.047 and 4.051 ms for two launches in two interleaved A/Bs, bit-identical
    (2026-12-01); MEGALODON_ATTENTION_MATMUL_PAIR=0 splits them (A/B runs).
    MEGALODON_ATTENTION_MATMUL_PERSISTENT=<programs> changes the count (0: one program per item).
  tiles_impl: GPU backward tiles kernel (S, P, dP, dS per visited tile): Pallas Triton ('triton') or
    the Mosaic GPU kernel (kernels_pallas.bwd_tiles_mgpu; 'mgpu', Hopper only) where its shapes allow
    (128 x 128 backward tiles, chunk a multiple of 128, dk and dv multiples of 64, one 16-bit dtype, no
    segment ids; Triton elsewhere and in the interpreter). It forms dS from the float32 P, as
    bwd_order='dp_first' (bwd_order does not apply to it). 'auto' (the default): 'mgpu' on a
    compute-capability 9.0 GPU, else 'triton'; MEGALODON_ATTENTION_TILES=triton|mgpu overrides 'auto'.
    The Mosaic GPU kernel runs its persistent schedule (one program per SM, a 5-stage ring): on an
    H200 at C=2048, dk 256, dv 2048, 1.117 against 1.460 ms for Triton (2026-11-30).
    MEGALODON_ATTENTION_TILES_PERSISTENT=<programs> (0: one tile per program, 1.272 ms) and
    MEGALODON_ATTENTION_TILES_STAGES=<ring depth> change that for A/B runs.
  scores_impl: GPU forward scores with fwd_scores 'bounded' or 'twopass': Pallas Triton ('triton') or
    the warp-specialised TMA + wgmma Mosaic GPU kernel (kernels_pallas.scores_mgpu; 'mgpu', Hopper
    only) where its shapes allow (128 x 128 score tiles, chunk a multiple of 128, dk a multiple of 64
    up to 256, 16-bit q, k and v, no segment ids; the Triton kernel elsewhere, and always in the
    interpreter). 'auto' (the default): 'mgpu' on a compute-capability 9.0 GPU, else 'triton'; the
    environment variable MEGALODON_ATTENTION_SCORES=triton|mgpu overrides 'auto'. On an H200 at
    C=2048, dk 256: bounded scores 0.353 against 0.470 ms (2026-11-30).
    MEGALODON_ATTENTION_SCORES_OVERLAP=1 (the software-pipelined consumers),
    MEGALODON_ATTENTION_SCORES_STAGES=<ring depth> and MEGALODON_ATTENTION_SCORES_P_BUFFERS=2 change
    its schedule for A/B runs.
  """
  block_q: int | None = None
  block_k: int | None = None
  bwd_block_q: int | None = None
  bwd_block_k: int | None = None
  mm_block_q: int | None = None
  mm_block_k: int | None = None
  bwd_mm_block_q: int | None = None
  bwd_mm_block_k: int | None = None
  block_d: int | None = None
  block_c: int | None = None
  block_qk: int | None = None
  block_r: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  scores_warps: int | None = None
  scores_stages: int | None = None
  matmul_warps: int | None = None
  matmul_stages: int | None = None
  tiles_warps: int | None = None
  tiles_stages: int | None = None
  fwd_impl: str = "blocks"
  fwd_scores: str = "bounded"
  bwd_order: str = "dp_first"
  delta_impl: str = "auto"
  matmul_impl: str = "auto"
  tiles_impl: str = "auto"
  scores_impl: str = "auto"


@dataclasses.dataclass(frozen=True)
class _Geom:
  """Static geometry of one call. Rows of a chunk n are n*q_len .. n*q_len + q_len - 1."""
  batch: int
  heads: int
  n_chunks: int
  q_len: int  # queries per chunk
  k_len: int  # keys per chunk
  dk: int
  dv: int
  bq: int
  bk: int
  pitch: int = 0  # rows per chunk of the tile buffer this geometry reads (0: its own cpq)

  @property
  def row_pitch(self) -> int:
    return self.pitch or self.cpq

  @property
  def nbq(self) -> int:
    return _cdiv(self.q_len, self.bq)

  @property
  def nbk(self) -> int:
    return _cdiv(self.k_len, self.bk)

  @property
  def cpq(self) -> int:
    """Rows per chunk of the probability-tile buffers (chunk padded to whole query blocks)."""
    return self.nbq * self.bq

  @property
  def cpk(self) -> int:
    return self.nbk * self.bk


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one attention call (hashable: a custom_vjp nondiff argument)."""
  platform: str
  interpret: bool
  scale: float
  geom: _Geom  # forward tiles
  bwd_geom: _Geom | None = None  # backward tiles (None: as the forward)
  mm_geom: _Geom | None = None  # forward block matmul (None: as geom)
  bwd_mm_geom: _Geom | None = None  # backward block matmuls (None: as bwd_geom)
  block_d: int = 0
  block_c: int = 0
  block_qk: int = 0
  block_r: int = 0
  launch: tuple = ()  # ((kernel family, num_warps or None, num_stages or None), ...)
  fwd_impl: str = "blocks"
  fwd_scores: str = "bounded"
  bwd_order: str = "dp_first"
  delta_impl: str = "xla"
  matmul_impl: str = "triton"
  tiles_impl: str = "triton"
  scores_impl: str = "triton"
  packed: bool = False  # Mosaic: q/k/v viewed as [B, L, H*d] (else transposed to [B*H, L, d])


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _default_platform() -> str:
  return "mosaic" if jax.default_backend() == "tpu" else "triton"


def _resolve_platform(platform: str | None, interpret: bool | None) -> tuple[str, bool]:
  platform = _default_platform() if platform is None else platform
  if platform not in _PLATFORMS:
    raise ValueError(f"platform must be one of {_PLATFORMS} or None (auto), got {platform!r}")
  if interpret is None:
    native = {"triton": "gpu", "mosaic": "tpu"}[platform]
    interpret = jax.default_backend() != native
  return platform, bool(interpret)


def _gpu_block(requested: int | None, default: int, length: int, name: str) -> int:
  block = default if requested is None else requested
  if not _is_pow2(block) or block < 16:
    raise ValueError(f"{name}={block}: GPU tiles must be powers of 2 >= 16 (Triton); pick 16, 32, 64, ...")
  # No point in tiles longer than the (power-of-2 rounded) chunk.
  return min(block, max(16, _next_pow2(length)))


def _gpu_feature_block(requested: int | None, default: int, width: int, name: str) -> int:
  block = default if requested is None else requested
  if not _is_pow2(block) or block < 16:
    raise ValueError(f"{name}={block}: must be a power of 2 >= 16")
  return min(block, max(16, _next_pow2(width)))


def _tpu_block(requested: int | None, length: int, name: str) -> int:
  block = 128 if requested is None else requested
  if block % _SUBLANES:
    raise ValueError(f"{name}={block}: TPU tiles must be multiples of {_SUBLANES} (of 128 on real TPUs)")
  if requested is None:
    block = min(block, _cdiv(length, _SUBLANES) * _SUBLANES)
  return block


# ----------------------------------------------------------------------------------------------
# Public API


def chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_size: int,
                    segment_ids: jax.Array | None = None, scale: float = 1.0,
                    block_q: int | None = None, block_k: int | None = None,
                    interpret: bool | None = None, config: KernelConfig | None = None,
                    platform: str | None = None) -> jax.Array:
  """Chunked causal softmax attention; differentiable in q, k and v.

  q, k: [B, L, H, dk]; v: [B, L, H, dv]; segment_ids: [B, L] int (a query attends only keys with
  its id) -> [B, L, H, dv] in v.dtype. If L <= chunk_size the sequence is one chunk; otherwise L
  must be a multiple of chunk_size. block_q/block_k override `config`'s tile rows (forward and
  backward). interpret: None runs the kernels natively on their platform and interpreted
  elsewhere. platform: None (from jax.default_backend()), 'triton' (GPU) or 'mosaic' (TPU).
  """
  _check_qkv(q, k, v)
  batch, length, heads, dk = q.shape
  dv = v.shape[-1]
  n_chunks, chunk_len = xla_attention.num_chunks(length, chunk_size)
  if segment_ids is not None:
    if segment_ids.shape != (batch, length) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be an integer array of shape [batch, length] = {(batch, length)}, "
                       f"got {segment_ids.dtype}{segment_ids.shape}")
    segment_ids = segment_ids.astype(jnp.int32)
  platform, interpret = _resolve_platform(platform, interpret)
  config = _with_tiles(config, block_q, block_k)
  _check_choices(config)
  if platform == "triton":
    _check_gpu_head_dims(dk, dv, interpret)
    plan = _triton_plan(config, interpret, float(scale), batch, heads, n_chunks, chunk_len, chunk_len,
                        dk, dv, q.dtype)
    return _attention(plan, q, k, v, segment_ids)
  return _mosaic_chunk_attention(config, interpret, float(scale), q, k, v, segment_ids, n_chunks, chunk_len)


def cached_chunk_attention(q: jax.Array, k_buf: jax.Array, v_buf: jax.Array, start: jax.Array | int, *,
                           scale: float = 1.0, block_q: int | None = None, block_k: int | None = None,
                           interpret: bool | None = None, config: KernelConfig | None = None,
                           platform: str | None = None) -> jax.Array:
  """Attention of T new queries to the keys of the current chunk (decoding / prefill); forward only.

  q: [B, T, H, dk] at chunk positions start..start+T-1 (start: int or traced int scalar);
  k_buf: [B, C, H, dk], v_buf: [B, C, H, dv] already hold the new keys/values at [start, start+T);
  entries past start+T-1 are stale and masked. Returns [B, T, H, dv] in v_buf.dtype.
  """
  if (q.ndim != 4 or k_buf.ndim != 4 or v_buf.ndim != 4 or k_buf.shape[0] != q.shape[0]
      or k_buf.shape[2:] != q.shape[2:] or v_buf.shape[:3] != k_buf.shape[:3]):
    raise ValueError("expected q: [B, T, H, dk], k_buf: [B, C, H, dk], v_buf: [B, C, H, dv], "
                     f"got q{q.shape} k_buf{k_buf.shape} v_buf{v_buf.shape}")
  batch, steps, heads, dk = q.shape
  cache_len, dv = k_buf.shape[1], v_buf.shape[-1]
  if steps > cache_len:
    raise ValueError(f"{steps} new queries do not fit in a chunk buffer of {cache_len} steps")
  if isinstance(start, int) and not 0 <= start <= cache_len - steps:
    raise ValueError(f"start={start} with {steps} new queries overruns the chunk buffer of {cache_len} steps")
  start = jnp.asarray(start, jnp.int32)
  if start.ndim:
    raise ValueError(f"start must be a scalar, got shape {start.shape}")
  platform, interpret = _resolve_platform(platform, interpret)
  config = _with_tiles(config, block_q, block_k)
  if platform == "triton":
    _check_gpu_head_dims(dk, dv, interpret)
    plan = _triton_plan(config, interpret, float(scale), batch, heads, 1, steps, cache_len, dk, dv,
                        q.dtype, cached=True)
    out, _ = _tr_flash_forward(plan, q, k_buf, v_buf, None, start, save_lse=False)
    return out
  return _mosaic_cached_attention(config, interpret, float(scale), q, k_buf, v_buf, start)


def chunk_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_size: int,
                              segment_ids: jax.Array | None = None, scale: float = 1.0,
                              block_q: int | None = None, block_k: int | None = None,
                              interpret: bool | None = None, config: KernelConfig | None = None,
                              platform: str | None = None) -> jax.Array:
  """Plain-JAX reference with `chunk_attention`'s signature (tiling arguments are ignored)."""
  del block_q, block_k, interpret, config, platform
  return xla_attention.chunked_attention_xla(q, k, v, chunk_size=chunk_size, segment_ids=segment_ids,
                                             scale=scale)


def cached_chunk_attention_reference(q: jax.Array, k_buf: jax.Array, v_buf: jax.Array,
                                     start: jax.Array | int, *, scale: float = 1.0,
                                     block_q: int | None = None, block_k: int | None = None,
                                     interpret: bool | None = None, config: KernelConfig | None = None,
                                     platform: str | None = None) -> jax.Array:
  """Plain-JAX reference with `cached_chunk_attention`'s signature (tiling arguments are ignored)."""
  del block_q, block_k, interpret, config, platform
  return xla_attention.cached_attention_xla(q, k_buf, v_buf, start, scale=scale)


def _check_choices(config: KernelConfig) -> None:
  for name, allowed in (("fwd_impl", ("blocks", "flash")), ("fwd_scores", ("twopass", "online", "bounded")),
                        ("bwd_order", ("dp_first", "s_first")), ("delta_impl", ("auto", "xla", "pallas", "tiles")),
                        ("matmul_impl", ("auto", "triton", "mgpu")), ("tiles_impl", ("auto", "triton", "mgpu")),
                        ("scores_impl", ("auto", "triton", "mgpu"))):
    if getattr(config, name) not in allowed:
      raise ValueError(f"KernelConfig.{name} must be one of {allowed}, got {getattr(config, name)!r}")


def _with_tiles(config: KernelConfig | None, block_q: int | None, block_k: int | None) -> KernelConfig:
  """block_q/block_k arguments set the tiles of both passes (unless the config sets bwd_* itself)."""
  config = KernelConfig() if config is None else config
  return dataclasses.replace(config, block_q=block_q or config.block_q, block_k=block_k or config.block_k,
                             bwd_block_q=config.bwd_block_q or block_q, bwd_block_k=config.bwd_block_k or block_k)


# Pallas lowers a dot straight to Triton's tt.dot, without the front end's check that every dimension
# is >= 16; decode_step's tensor-core form returned wrong values on an H200 with 4-feature products.
MIN_GPU_HEAD_DIM = 16


def gpu_head_dims_supported(dk: int, dv: int) -> bool:
  """Whether the compiled GPU kernels take these head dims (their products contract dk and dv)."""
  return dk >= MIN_GPU_HEAD_DIM and dv >= MIN_GPU_HEAD_DIM


def _check_gpu_head_dims(dk: int, dv: int, interpret: bool) -> None:
  if not interpret and not gpu_head_dims_supported(dk, dv):
    raise ValueError(f"the GPU attention kernels need q/k and v head dims >= {MIN_GPU_HEAD_DIM} (got {dk} and "
                     f"{dv}); use the XLA path (attention_impl='xla', or 'auto', which picks it) or interpret=True")


def _check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(
        "expected q, k: [batch, length, heads, qk_dim] of equal shape and v: [batch, length, heads, v_dim], "
        f"got q{q.shape} k{k.shape} v{v.shape}")


# ----------------------------------------------------------------------------------------------
# custom_vjp shared by both platforms


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: _Plan, q, k, v, segment_ids):
  return _attention_fwd(plan, q, k, v, segment_ids)[0]


def _attention_fwd(plan: _Plan, q, k, v, segment_ids):
  if plan.platform == "triton":
    if plan.fwd_impl == "flash":
      out, lse = _tr_flash_forward(plan, q, k, v, segment_ids, None, save_lse=True)
    else:
      out, lse = _tr_blocks_forward(plan, q, k, v, segment_ids)
  else:
    out, lse = _mosaic_forward(plan, q, k, v, segment_ids, None, save_lse=True)
  return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(plan: _Plan, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  if plan.platform == "triton" and plan.delta_impl in ("auto", "tiles") and _mgpu_delta_in_tiles(
      plan, q, k, v, d_out, segment_ids):
    delta = None  # programs of the Mosaic GPU tiles kernel compute it from out
  elif plan.platform == "triton" and plan.delta_impl == "pallas":
    delta = _tr_delta(plan, out, d_out)
  else:
    delta = _delta(out, d_out)
  if plan.platform == "triton":
    dq, dk, dv = _tr_backward(plan, q, k, v, segment_ids, lse, delta, d_out, out)
  else:
    dq, dk, dv = _mosaic_backward(plan, q, k, v, segment_ids, lse, delta, d_out)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _delta(out, d_out):
  """delta_i = rowsum(O_i * dO_i) = sum_j P_ij dP_ij: [B, L, H, dv] twice -> [B, H, L] float32.

  One fused XLA reduction over the contiguous feature axis; the small result is transposed after
  (the einsum form reduced across a transposed layout and took 0.8 ms on an H200 at L=32768).
  """
  return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)


# ----------------------------------------------------------------------------------------------
# GPU (Pallas Triton): plan and shared helpers


def _triton_plan(config: KernelConfig, interpret: bool, scale: float, batch: int, heads: int,
                 n_chunks: int, q_len: int, k_len: int, dk: int, dv: int, dtype, cached: bool = False) -> _Plan:
  """Default tiles sized for an H100/H200 SM (227 KiB shared memory, 64K registers) at bf16.

  The forward and backward kernels share nothing but lse, so their tiles are chosen apart: the
  forward holds a [block_q, dk] Q tile and double-buffers [block_k, dk] K tiles (64-row keys keep
  that near 128 KiB at dk 256); the backward tile kernel and the matmuls want square 128 tiles.
  """
  wide = jnp.dtype(dtype).itemsize >= 4  # float32 runs on CUDA cores with 2x the bytes: smaller tiles
  flash = config.fwd_impl == "flash"
  if cached:  # few queries: small query tiles, more dv tiles for parallelism
    bq = _gpu_block(config.block_q, 64, q_len, "block_q")
    bk = _gpu_block(config.block_k, 64, k_len, "block_k")
    block_d = _gpu_feature_block(config.block_d, 128, dv, "block_d")
  else:
    bq = _gpu_block(config.block_q, 64 if wide else 128, q_len, "block_q")
    # 128-key score tiles read back by 64-key matmul tiles: on an H200 (C=2048, dk=256,
    # dv=2048) the scores pass took 0.45 against 0.63 ms with 64-key tiles for both.
    bk = _gpu_block(config.block_k, 64 if (wide or flash) else 128, k_len, "block_k")
    block_d = _gpu_feature_block(config.block_d, 64 if wide else (128 if flash else 256), max(dk, dv), "block_d")
  bwd_bq = _gpu_block(config.bwd_block_q, 64 if wide else 128, q_len, "bwd_block_q")
  bwd_bk = _gpu_block(config.bwd_block_k, 64 if wide else 128, k_len, "bwd_block_k")
  block_c = _gpu_feature_block(config.block_c, 32 if wide else 64, max(dk, dv), "block_c")
  # Q K^T in one step when dk is small enough: the Q tile then stays put across the key loop.
  block_qk = _gpu_feature_block(config.block_qk, 64 if wide else 256, dk, "block_qk")
  block_r = config.block_r if config.block_r is not None else (32 if wide else 64)
  if not _is_pow2(block_r) or block_r < 16:
    raise ValueError(f"block_r={block_r}: must be a power of 2 >= 16")
  geom = _Geom(batch, heads, n_chunks, q_len, k_len, dk, dv, bq, bk)
  bwd_geom = _Geom(batch, heads, n_chunks, q_len, k_len, dk, dv, bwd_bq, bwd_bk)
  mm_block_k = config.mm_block_k
  if (mm_block_k is None and config.block_k is None and config.fwd_scores != "online"
      and not (wide or flash or cached)):
    mm_block_k = 64
  mm_geom = _reader_geom(geom, config.mm_block_q, mm_block_k, "mm_block")
  bwd_mm_geom = _reader_geom(bwd_geom, config.bwd_mm_block_q, config.bwd_mm_block_k, "bwd_mm_block")
  if config.fwd_scores == "online" and (mm_geom.bq, mm_geom.bk) != (bq, bk):
    raise ValueError("fwd_scores='online' stores running maxima per key tile: mm_block_q/mm_block_k must "
                     "equal block_q/block_k (or use fwd_scores='twopass')")
  block_r = min(block_r, mm_geom.bq, mm_geom.bk, bwd_mm_geom.bq, bwd_mm_geom.bk)
  # Four pipeline stages in the backward tiles kernel (its long dv loop): 1.42 against 1.69 ms
  # with the heuristic's 3 on an H200 at bf16, C=2048, dv=2048.
  tiles_stages = config.tiles_stages or config.num_stages or (None if wide else 4)
  launch = tuple((family, getattr(config, f"{family}_warps") or config.num_warps,
                  tiles_stages if family == "tiles" else getattr(config, f"{family}_stages") or config.num_stages)
                 for family in ("scores", "matmul", "tiles"))
  launch += (("flash", config.num_warps, config.num_stages),)
  return _Plan("triton", interpret, scale, geom, bwd_geom=bwd_geom, mm_geom=mm_geom, bwd_mm_geom=bwd_mm_geom,
               block_d=block_d, block_c=block_c,
               block_qk=block_qk, block_r=block_r, launch=launch, fwd_impl=config.fwd_impl,
               fwd_scores=config.fwd_scores, bwd_order=config.bwd_order,
               delta_impl=_resolve_delta_impl(config.delta_impl),
               matmul_impl=_resolve_kernel_impl("matmul", config.matmul_impl),
               tiles_impl=_resolve_kernel_impl("tiles", config.tiles_impl),
               scores_impl=_resolve_kernel_impl("scores", config.scores_impl))


def _reader_geom(writer: _Geom, block_q: int | None, block_k: int | None, name: str) -> _Geom:
  """Geometry of a block matmul reading the tile buffer written with `writer`'s tiles."""
  bq = _gpu_block(block_q, writer.bq, writer.q_len, name + "_q")
  bk = _gpu_block(block_k, writer.bk, writer.k_len, name + "_k")
  if writer.bq % bq or writer.bk % bk:
    raise ValueError(f"{name}_q/{name}_k = {bq}/{bk} must divide the tiles {writer.bq}/{writer.bk} of the "
                     "kernel that writes the probability tiles (a matmul may only read tiles it wrote)")
  return dataclasses.replace(writer, bq=bq, bk=bk, pitch=writer.cpq)


def _tr_params(plan: _Plan, family: str, warps: int, stages: int) -> plgpu.CompilerParams:
  """Launch parameters of one kernel family: the config's choice, else the given heuristic."""
  chosen_warps, chosen_stages = next(((w, st) for f, w, st in plan.launch if f == family), (None, None))
  return plgpu.CompilerParams(num_warps=chosen_warps or warps, num_stages=chosen_stages or stages)


def _tr_warps(*tile_elems: int) -> int:
  return 8 if max(tile_elems) >= 128 * 128 else 4


def _rows_spec(x) -> pl.BlockSpec:
  """[B, L, H, d] array; the kernel sees the [L, d] rows of one (batch, head): grid ends in (b, h)."""
  _, length, _, width = x.shape
  return pl.BlockSpec((None, length, None, width), lambda *g: (g[-2], 0, g[-1], 0))


def _bh_spec(shape) -> pl.BlockSpec:
  """[B, H, ...] array; the kernel sees the [...] part of one (batch, head)."""
  rest = tuple(shape[2:])
  return pl.BlockSpec((None, None, *rest), lambda *g: (g[-2], g[-1]) + (0,) * len(rest))


def _seg_spec(segment_ids) -> pl.BlockSpec | None:
  if segment_ids is None:
    return None
  return pl.BlockSpec((None, segment_ids.shape[1]), lambda *g: (g[-2], 0))


def _iota(n: int) -> jax.Array:
  return jnp.arange(n, dtype=jnp.int32)


class _Rows:
  """A tile of `size` rows starting at chunk position `start` of a chunk holding `length` rows.

  `masked` is static: False when every tile of this size divides the chunk exactly, so loads and
  stores go without a row mask (Triton then vectorises them without having to prove anything).
  """

  def __init__(self, start, size: int, length: int, step_divides: bool):
    self.start, self.size = start, size
    self.idx = start + _iota(size)
    self.valid = self.idx < length
    self.masked = not step_divides

  def load_mask(self):
    return self.valid if self.masked else None


def _tile_mask(row_mask, col0, cols: int, width: int):
  """Row mask (or None) combined with the feature-tail mask (only when cols does not divide width)."""
  col_mask = None if width % cols == 0 else (col0 + _iota(cols)) < width
  if row_mask is None and col_mask is None:
    return None
  if col_mask is None:
    return jnp.broadcast_to(row_mask[:, None], (row_mask.shape[0], cols))
  if row_mask is None:
    return col_mask[None, :]
  return row_mask[:, None] & col_mask[None, :]


def _tr_load(ref, row0, rows: _Rows, col0, cols: int, width: int) -> jax.Array:
  """[rows, cols] tile of a [L, width] ref at (row0, col0); masked-off entries read 0."""
  mask = _tile_mask(rows.load_mask(), col0, cols, width)
  block = ref.at[pl.ds(row0, rows.size), pl.ds(col0, cols)]
  return plgpu.load(block) if mask is None else plgpu.load(block, mask=mask, other=0.0)


def _tr_store(ref, row0, rows: _Rows, col0, value, width: int) -> None:
  mask = _tile_mask(rows.load_mask(), col0, value.shape[1], width)
  plgpu.store(ref.at[pl.ds(row0, rows.size), pl.ds(col0, value.shape[1])], value, mask=mask)


def _tr_abt(a_ref, a_row0, a_rows: _Rows, b_ref, b_row0, b_rows: _Rows, width: int, chunk: int,
            a_tile=None) -> jax.Array:
  """A[rows_a] @ B[rows_b]^T contracted over `width` features in chunks: [a.size, b.size] f32.

  a_tile: A's rows already loaded (one chunk covering the whole width).
  """
  steps = _cdiv(width, chunk)

  def step(c, acc):
    a = a_tile if a_tile is not None else _tr_load(a_ref, a_row0, a_rows, c * chunk, chunk, width)
    b = _tr_load(b_ref, b_row0, b_rows, c * chunk, chunk, width)
    return acc + plgpu.dot(a, b, trans_b=True)

  acc = jnp.zeros((a_rows.size, b_rows.size), jnp.float32)
  if steps == 1:
    return step(0, acc)
  if a_tile is not None:
    raise ValueError("a preloaded tile must cover the whole contraction")
  return lax.fori_loop(0, steps, step, acc)


def _tr_q_tile(q_ref, q_row0, q_rows: _Rows, g: _Geom, chunk: int):
  """The query tile, loaded once before the key loop when Q K^T takes one step."""
  return _tr_load(q_ref, q_row0, q_rows, 0, chunk, g.dk) if chunk >= g.dk else None


def _tr_mask(q_pos, k_pos, q_valid, k_valid, q_seg, k_seg) -> jax.Array:
  mask = (k_pos[None, :] <= q_pos[:, None]) & q_valid[:, None] & k_valid[None, :]
  if q_seg is not None:
    mask = mask & (q_seg[:, None] == k_seg[None, :])
  return mask


def _tr_load_seg(seg_ref, row0, rows: _Rows):
  if seg_ref is None:
    return None
  block = seg_ref.at[pl.ds(row0, rows.size)]
  return plgpu.load(block) if not rows.masked else plgpu.load(block, mask=rows.valid, other=0)


def _tr_key_blocks(i, g: _Geom, q_offset=0):
  """Key blocks visited by query block i: those with a key at or before its last query."""
  return jnp.minimum(lax.div(q_offset + (i + 1) * g.bq + g.bk - 1, g.bk), g.nbk)


def _q_rows(i, g: _Geom) -> _Rows:
  return _Rows(i * g.bq, g.bq, g.q_len, g.q_len % g.bq == 0)


def _k_rows(j, g: _Geom) -> _Rows:
  return _Rows(j * g.bk, g.bk, g.k_len, g.k_len % g.bk == 0)


# ----------------------------------------------------------------------------------------------
# GPU kernels


def _tr_scores_kernel(q_ref, k_ref, seg_ref, p_ref, mrun_ref, lse_ref, *, g: _Geom, scale2: float,
                      chunk: int):
  """Forward step 1 for query block i of chunk n: S = Q K^T once per visited tile, online stats.

  Writes P~_ij = exp2(S_ij - m_ij) (m_ij: running row max after key block j) into the tile
  buffer [n*cpq + i*bq.., j*bk..], m_ij into mrun[j, rows], and lse (base 2) per valid row.
  """
  i = g.nbq - 1 - pl.program_id(0)  # heaviest query blocks first
  n = pl.program_id(1)
  qr = _q_rows(i, g)
  q_row0 = n * g.q_len + qr.start
  buf_row0 = n * g.cpq + qr.start
  q_seg = _tr_load_seg(seg_ref, q_row0, qr)
  q_tile = _tr_q_tile(q_ref, q_row0, qr, g, chunk)

  def body(j, carry):
    m_prev, l_prev = carry
    kr = _k_rows(j, g)
    k_row0 = n * g.k_len + kr.start
    s = _tr_abt(q_ref, q_row0, qr, k_ref, k_row0, kr, g.dk, chunk, q_tile) * scale2
    mask = _tr_mask(qr.idx, kr.idx, qr.valid, kr.valid, q_seg, _tr_load_seg(seg_ref, k_row0, kr))
    s = jnp.where(mask, s, _MASK)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
    l_new = l_prev * jnp.exp2(m_prev - m_new) + jnp.sum(p, axis=1)
    plgpu.store(p_ref.at[pl.ds(buf_row0, g.bq), pl.ds(kr.start, g.bk)], p.astype(p_ref.dtype))
    plgpu.store(mrun_ref.at[j, pl.ds(buf_row0, g.bq)], m_new)
    return m_new, l_new

  init = (jnp.full((g.bq,), _MASK, jnp.float32), jnp.zeros((g.bq,), jnp.float32))
  m, l = lax.fori_loop(0, _tr_key_blocks(i, g), body, init)
  lse = m + jnp.log2(jnp.where(l > 0.0, l, 1.0))
  plgpu.store(lse_ref.at[pl.ds(q_row0, g.bq)], lse, mask=qr.load_mask())


def _tr_scores_twopass_kernel(q_ref, k_ref, seg_ref, bound_ref, p_ref, rscale_ref, lse_ref, *, g: _Geom,
                              scale2: float, chunk: int):
  """Forward step 1, two passes over the visited key blocks of query block i of chunk n.

  Pass 1 finds the row maxima m of S = Q K^T (base 2); pass 2 recomputes S and writes
  P~_ij = exp2(S_ij - m) into the tile buffer [n*cpq + i*bq.., j*bk..]. Stores lse (base 2) and
  the row scale 1 / sum_j P~_ij that turns P~ V into the output.

  With bound_ref (rows' upper bounds of S, |q_i| max_j |k_j| |scale2|; no segment ids), pass 1
  covers only the diagonal key blocks when every valid row's bound is within _BOUND_MARGIN of
  its diagonal maximum: that maximum then serves as m (P~ <= 2^_BOUND_MARGIN, far from overflow,
  and >= 1 at the row's own diagonal maximum, so nothing underflows that matters).
  """
  i = g.nbq - 1 - pl.program_id(0)  # heaviest query blocks first
  n = pl.program_id(1)
  qr = _q_rows(i, g)
  q_row0 = n * g.q_len + qr.start
  buf_row0 = n * g.cpq + qr.start
  q_seg = _tr_load_seg(seg_ref, q_row0, qr)
  q_tile = _tr_q_tile(q_ref, q_row0, qr, g, chunk)
  n_blocks = _tr_key_blocks(i, g)
  # Without segment ids, key blocks wholly at or before the block's first query need no mask
  # (their keys are valid: they precede a query of the chunk); the rest (the diagonal) do.
  n_full = 0 if seg_ref is not None else jnp.minimum(lax.div(i * g.bq + 1, g.bk), n_blocks)

  def scores(j, masked: bool):
    kr = _k_rows(j, g)
    k_row0 = n * g.k_len + kr.start
    s = _tr_abt(q_ref, q_row0, qr, k_ref, k_row0, kr, g.dk, chunk, q_tile) * scale2
    if not masked:
      return kr, s, None
    mask = _tr_mask(qr.idx, kr.idx, qr.valid, kr.valid, q_seg, _tr_load_seg(seg_ref, k_row0, kr))
    return kr, s, mask

  def max_body(masked, j, m):
    _, s, mask = scores(j, masked)
    return jnp.maximum(m, jnp.max(s if mask is None else jnp.where(mask, s, _MASK), axis=1))

  m = jnp.full((g.bq,), _MASK, jnp.float32)
  m = lax.fori_loop(n_full, n_blocks, functools.partial(max_body, True), m)  # diagonal blocks
  n_rest = n_full
  if bound_ref is not None:
    block = bound_ref.at[pl.ds(q_row0, g.bq)]
    bound = plgpu.load(block) if not qr.masked else plgpu.load(block, mask=qr.valid, other=0.0)
    gap = jnp.max(jnp.where(qr.valid, bound - m, -1.0))
    n_rest = jnp.where(gap <= _BOUND_MARGIN, 0, n_full)
  m = lax.fori_loop(0, n_rest, functools.partial(max_body, False), m)

  def exp_body(masked, j, l):
    kr, s, mask = scores(j, masked)
    p = jnp.exp2(s - m[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    plgpu.store(p_ref.at[pl.ds(buf_row0, g.bq), pl.ds(kr.start, g.bk)], p.astype(p_ref.dtype))
    return l + jnp.sum(p, axis=1)

  l = jnp.zeros((g.bq,), jnp.float32)
  l = lax.fori_loop(0, n_full, functools.partial(exp_body, False), l)
  l = lax.fori_loop(n_full, n_blocks, functools.partial(exp_body, True), l)
  l = jnp.where(l > 0.0, l, 1.0)  # rows with no visible key (padding) get output 0
  plgpu.store(lse_ref.at[pl.ds(q_row0, g.bq)], m + jnp.log2(l), mask=qr.load_mask())
  plgpu.store(rscale_ref.at[pl.ds(q_row0, g.bq)], 1.0 / l, mask=qr.load_mask())


def _tr_block_matmul_kernel(m_ref, x_ref, mrun_ref, lse_ref, rscale_ref, y_ref, *, g: _Geom, width: int,
                            bd: int, step: int):
  """Y_i = sum_{visited j} M_ij X_j for query block i, feature tile t (block-causal matmul).

  With mrun/lse (forward, 'online' scores) the rows of M = P~ are first scaled by
  exp2(m_ij - lse_i), which turns them into the normalised probabilities. With rscale (forward,
  'twopass' scores) the rows of the result are scaled by it at the end.
  """
  t = pl.program_id(0)
  i = g.nbq - 1 - pl.program_id(1)
  n = pl.program_id(2)
  qr = _q_rows(i, g)
  buf_row0 = n * g.row_pitch + qr.start

  def row_stat(ref):
    block = ref.at[pl.ds(n * g.q_len + qr.start, g.bq)]
    return plgpu.load(block) if not qr.masked else plgpu.load(block, mask=qr.valid, other=0.0)

  if mrun_ref is not None:
    lse = row_stat(lse_ref)

  def body(s, acc):
    c0 = s * step
    m = plgpu.load(m_ref.at[pl.ds(buf_row0, g.bq), pl.ds(c0, step)])
    if mrun_ref is not None:
      m_run = plgpu.load(mrun_ref.at[lax.div(c0, g.bk), pl.ds(buf_row0, g.bq)])
      m = m.astype(jnp.float32) * jnp.exp2(m_run - lse)[:, None]
    # The steps run over whole key tiles (to cpk): rows need no mask only if the tiles divide k_len.
    xr = _Rows(c0, step, g.k_len, g.k_len % g.bk == 0)
    x = _tr_load(x_ref, n * g.k_len + c0, xr, t * bd, bd, width)
    return acc + plgpu.dot(m.astype(x.dtype), x)

  n_steps = _tr_key_blocks(i, g) * (g.bk // step)
  acc = lax.fori_loop(0, n_steps, body, jnp.zeros((g.bq, bd), jnp.float32))
  if rscale_ref is not None:
    acc = acc * row_stat(rscale_ref)[:, None]
  _tr_store(y_ref, n * g.q_len + qr.start, qr, t * bd, acc.astype(y_ref.dtype), width)


def _tr_block_tmatmul_kernel(m_ref, x_ref, y_ref, *, g: _Geom, width: int, bd: int, step: int):
  """Y_j = sum_{visited i} M_ij^T X_i for key block j, feature tile t (block-causal, transposed)."""
  t = pl.program_id(0)
  j = pl.program_id(1)
  n = pl.program_id(2)
  kr = _k_rows(j, g)
  r_start = lax.div(kr.start, g.bq) * g.bq  # first query block that sees key block j

  def body(s, acc):
    r0 = r_start + s * step
    m = plgpu.load(m_ref.at[pl.ds(n * g.row_pitch + r0, step), pl.ds(kr.start, g.bk)])
    xr = _Rows(r0, step, g.q_len, g.row_pitch == g.q_len)  # steps run to the buffer's padded rows
    x = _tr_load(x_ref, n * g.q_len + r0, xr, t * bd, bd, width)
    return acc + plgpu.dot(m.astype(x.dtype), x, trans_a=True)

  acc = lax.fori_loop(0, lax.div(g.row_pitch - r_start, step), body, jnp.zeros((g.bk, bd), jnp.float32))
  _tr_store(y_ref, n * g.k_len + kr.start, kr, t * bd, acc.astype(y_ref.dtype), width)


def _tr_bwd_tiles_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, p_ref, ds_ref, *,
                         g: _Geom, scale: float, chunk_qk: int, chunk_v: int, s_first: bool):
  """Backward step 1 for tile (i, j): P = exp2(S - lse), dP = dO V^T, dS = scale P (dP - delta)."""
  j = pl.program_id(0)
  i = pl.program_id(1)
  n = pl.program_id(2)

  @pl.when(j < _tr_key_blocks(i, g))
  def _visited():
    qr, kr = _q_rows(i, g), _k_rows(j, g)
    q_row0 = n * g.q_len + qr.start
    k_row0 = n * g.k_len + kr.start
    tile = (pl.ds(n * g.cpq + qr.start, g.bq), pl.ds(kr.start, g.bk))
    stat_mask = qr.load_mask()

    def row_stat(ref):
      block = ref.at[pl.ds(q_row0, g.bq)]
      return plgpu.load(block) if stat_mask is None else plgpu.load(block, mask=stat_mask, other=0.0)

    def probs():
      s = _tr_abt(q_ref, q_row0, qr, k_ref, k_row0, kr, g.dk, chunk_qk) * (scale * _LOG2E)
      mask = _tr_mask(qr.idx, kr.idx, qr.valid, kr.valid, _tr_load_seg(seg_ref, q_row0, qr),
                      _tr_load_seg(seg_ref, k_row0, kr))
      p = jnp.where(mask, jnp.exp2(s - row_stat(lse_ref)[:, None]), 0.0)
      plgpu.store(p_ref.at[tile], p.astype(p_ref.dtype))
      return p  # masked entries are 0, so dS = P (dP - delta) needs no mask of its own

    if s_first:  # P is stored (and its S accumulator freed) before the long dv loop starts
      # held as stored (bf16 for 16-bit inputs: half the registers across the dv loop)
      p = probs().astype(p_ref.dtype)
      dp = _tr_abt(do_ref, q_row0, qr, v_ref, k_row0, kr, g.dv, chunk_v)
    else:  # dP first: only its accumulator is live during the long dv loop (fewer registers there)
      dp = _tr_abt(do_ref, q_row0, qr, v_ref, k_row0, kr, g.dv, chunk_v)
      p = probs()
    ds = p.astype(jnp.float32) * (dp - row_stat(delta_ref)[:, None])
    if scale != 1.0:
      ds = ds * scale
    plgpu.store(ds_ref.at[tile], ds.astype(ds_ref.dtype))


def _tr_delta_kernel(o_ref, do_ref, delta_ref, *, rows: int, length: int, width: int, chunk: int):
  """delta for `rows` rows of one (batch, head): rowsum(O * dO) over the feature chunks."""
  r = _Rows(pl.program_id(0) * rows, rows, length, length % rows == 0)

  def body(c, acc):
    o = _tr_load(o_ref, r.start, r, c * chunk, chunk, width).astype(jnp.float32)
    do = _tr_load(do_ref, r.start, r, c * chunk, chunk, width).astype(jnp.float32)
    return acc + jnp.sum(o * do, axis=1)

  acc = lax.fori_loop(0, _cdiv(width, chunk), body, jnp.zeros((rows,), jnp.float32))
  plgpu.store(delta_ref.at[pl.ds(r.start, rows)], acc, mask=r.load_mask())


def _tr_flash_kernel(off_ref, q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, g: _Geom, scale2: float,
                     chunk: int, bd: int):
  """Flash forward for query block i, dv tile t of chunk n (online softmax, f32 statistics).

  Query rows of a chunk sit at chunk positions offset + 0.. (offset = `start` when decoding).
  """
  t = pl.program_id(0)
  i = g.nbq - 1 - pl.program_id(1)
  n = pl.program_id(2)
  q_off = 0 if off_ref is None else off_ref[()]
  qr = _q_rows(i, g)
  q_row0 = n * g.q_len + qr.start
  q_seg = _tr_load_seg(seg_ref, q_row0, qr)
  q_tile = _tr_q_tile(q_ref, q_row0, qr, g, chunk)

  def body(j, carry):
    acc, m_prev, l_prev = carry
    kr = _k_rows(j, g)
    k_row0 = n * g.k_len + kr.start
    s = _tr_abt(q_ref, q_row0, qr, k_ref, k_row0, kr, g.dk, chunk, q_tile) * scale2
    mask = _tr_mask(q_off + qr.idx, kr.idx, qr.valid, kr.valid, q_seg, _tr_load_seg(seg_ref, k_row0, kr))
    s = jnp.where(mask, s, _MASK)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp2(m_prev - m_new)
    p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
    l_new = l_prev * correction + jnp.sum(p, axis=1)
    v = _tr_load(v_ref, k_row0, kr, t * bd, bd, g.dv)
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, l_new

  init = (jnp.zeros((g.bq, bd), jnp.float32), jnp.full((g.bq,), _MASK, jnp.float32),
          jnp.zeros((g.bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, _tr_key_blocks(i, g, q_off), body, init)
  l = jnp.where(l > 0.0, l, 1.0)
  _tr_store(o_ref, q_row0, qr, t * bd, (acc / l[:, None]).astype(o_ref.dtype), g.dv)
  if lse_ref is not None:  # every dv tile computes the same statistics; identical writes
    plgpu.store(lse_ref.at[pl.ds(q_row0, g.bq)], m + jnp.log2(l), mask=qr.load_mask())


# ----------------------------------------------------------------------------------------------
# GPU wrappers


def _tr_blocks_forward(plan: _Plan, q, k, v, segment_ids):
  """Forward via stored probability tiles. Returns out [B, L, H, dv], lse [B, H, L] (base 2)."""
  p_buf, stats, lse = _tr_scores(plan, q, k, v.dtype, segment_ids)
  mm_plan = dataclasses.replace(plan, geom=plan.mm_geom)
  if plan.fwd_scores != "online":
    if _mgpu_takes(plan, plan.geom, p_buf, v):
      return _mgpu_block_matmul(p_buf, v, stats, plan.geom, transpose_m=False), lse
    return _tr_block_matmul(mm_plan, p_buf, v, None, None, v.dtype, rscale=stats), lse
  return _tr_block_matmul(mm_plan, p_buf, v, stats, lse, v.dtype), lse


def _tr_scores(plan: _Plan, q, k, p_dtype, segment_ids):
  """Forward step 1: P~ tiles [B, H, n*cpq, cpk], statistics, lse [B, H, L] (base 2).

  The statistics are the row scales [B, H, L] ('twopass') or the running maxima
  [B, H, nbk, n*cpq] ('online').
  """
  g = plan.geom
  if _mgpu_scores_takes(plan, q, k, p_dtype, segment_ids):
    return _mgpu_scores(plan, q, k, p_dtype)
  rows = g.n_chunks * g.cpq
  p_shape = (g.batch, g.heads, rows, g.cpk)
  lse_shape = (g.batch, g.heads, g.n_chunks * g.q_len)
  bound = None
  if plan.fwd_scores == "online":
    stats_shape = (g.batch, g.heads, g.nbk, rows)
    kernel = _tr_scores_kernel
  else:
    stats_shape = lse_shape
    kernel = _tr_scores_twopass_kernel
    if plan.fwd_scores == "bounded" and segment_ids is None:
      bound = _score_bound(q, k, g, plan.scale * _LOG2E)
  kernel = functools.partial(kernel, g=g, scale2=plan.scale * _LOG2E, chunk=plan.block_qk)
  if plan.fwd_scores == "online":
    kernel = functools.partial(_drop_bound_ref, kernel)
  return pl.pallas_call(
      kernel,
      grid=(g.nbq, g.n_chunks, g.batch, g.heads),
      in_specs=[_rows_spec(q), _rows_spec(k), _seg_spec(segment_ids),
                None if bound is None else _bh_spec(bound.shape)],
      out_specs=[_bh_spec(p_shape), _bh_spec(stats_shape), _bh_spec(lse_shape)],
      out_shape=[jax.ShapeDtypeStruct(p_shape, p_dtype), jax.ShapeDtypeStruct(stats_shape, jnp.float32),
                 jax.ShapeDtypeStruct(lse_shape, jnp.float32)],
      compiler_params=_tr_params(plan, "scores", _tr_warps(g.bq * g.bk), 2),
      interpret=plan.interpret,
      name="chunk_attention_scores",
  )(q, k, segment_ids, bound)


def _drop_bound_ref(kernel, q_ref, k_ref, seg_ref, bound_ref, *refs):
  del bound_ref
  kernel(q_ref, k_ref, seg_ref, *refs)


def _row_norms(x):
  """|x| over the feature axis in float32: [B, L, H, d] -> [B, L, H]."""
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))


def _key_scale(k, g: _Geom, scale2: float):
  """max_{j in chunk} |k_j| |scale2| (1 + 1e-3): [B, L, H, dk] -> [B, H, n_chunks] float32 (an XLA pass
  over k). The bound of query row i is |q_i| times this plus 1e-3: a hair of headroom for the rounding
  of the norms and of the MMA."""
  k_max = jnp.max(_row_norms(k).reshape(g.batch, g.n_chunks, g.k_len, g.heads), axis=2)  # [B, n, H]
  return (k_max * (abs(scale2) * (1.0 + 1e-3))).transpose(0, 2, 1)


def _score_bound(q, k, g: _Geom, scale2: float):
  """Upper bounds of every query row's scores (base 2): |q_i| max_{j in chunk} |k_j| |scale2|, with headroom.

  q, k: [B, L, H, dk] -> [B, H, L] float32 (an XLA pass over q and k, 1/8 of v's size).
  """
  q_norm = _row_norms(q).reshape(g.batch, g.n_chunks, g.q_len, g.heads).transpose(0, 3, 1, 2)  # [B, H, n, C]
  return (q_norm * _key_scale(k, g, scale2)[..., None] + 1e-3).reshape(g.batch, g.heads, g.n_chunks * g.q_len)


def _tr_block_matmul(plan: _Plan, m_buf, x, mrun, lse, out_dtype, rscale=None):
  """Y = block-causal M @ X: M [B, H, n*cpq, cpk] tiles, X [B, L, H, d] -> [B, L, H, d].

  mrun, lse: running maxima and lse that normalise M's tiles; rscale [B, H, L]: scales Y's rows.
  """
  g = plan.geom
  width = x.shape[-1]
  bd = min(plan.block_d, max(16, _next_pow2(width)))
  step = min(plan.block_r, g.bk)
  kernel = functools.partial(_tr_block_matmul_kernel, g=g, width=width, bd=bd, step=step)
  in_specs = [_bh_spec(m_buf.shape), _rows_spec(x)]
  in_specs += [None, None] if mrun is None else [_bh_spec(mrun.shape), _bh_spec(lse.shape)]
  in_specs += [None if rscale is None else _bh_spec(rscale.shape)]
  out_shape = jax.ShapeDtypeStruct((g.batch, g.n_chunks * g.q_len, g.heads, width), out_dtype)
  return pl.pallas_call(
      kernel,
      grid=(_cdiv(width, bd), g.nbq, g.n_chunks, g.batch, g.heads),
      in_specs=in_specs,
      out_specs=_rows_spec(out_shape),
      out_shape=out_shape,
      compiler_params=_tr_params(plan, "matmul", _tr_warps(g.bq * bd), 3),
      interpret=plan.interpret,
      name="chunk_attention_block_matmul",
  )(m_buf, x, mrun, lse, rscale)


def _tr_block_tmatmul(plan: _Plan, m_buf, x, out_dtype):
  """Y = block-causal M^T @ X: M [B, H, n*cpq, cpk] tiles, X [B, L, H, d] -> [B, L, H, d]."""
  g = plan.geom
  width = x.shape[-1]
  bd = min(plan.block_d, max(16, _next_pow2(width)))
  step = min(plan.block_r, g.bq)
  kernel = functools.partial(_tr_block_tmatmul_kernel, g=g, width=width, bd=bd, step=step)
  out_shape = jax.ShapeDtypeStruct((g.batch, g.n_chunks * g.k_len, g.heads, width), out_dtype)
  return pl.pallas_call(
      kernel,
      grid=(_cdiv(width, bd), g.nbk, g.n_chunks, g.batch, g.heads),
      in_specs=[_bh_spec(m_buf.shape), _rows_spec(x)],
      out_specs=_rows_spec(out_shape),
      out_shape=out_shape,
      compiler_params=_tr_params(plan, "matmul", _tr_warps(g.bk * bd), 3),
      interpret=plan.interpret,
      name="chunk_attention_block_tmatmul",
  )(m_buf, x)


def _tr_bwd_tiles(plan: _Plan, q, k, v, segment_ids, lse, delta, d_out):
  """Backward step 1: the P and dS tile buffers, [B, H, n*cpq, cpk] each."""
  g = plan.geom
  tile_shape = (g.batch, g.heads, g.n_chunks * g.cpq, g.cpk)
  # Both contractions in block_c chunks: pipelined loops with small shared-memory buffers.
  kernel = functools.partial(_tr_bwd_tiles_kernel, g=g, scale=plan.scale,
                             chunk_qk=min(plan.block_c, plan.block_qk), chunk_v=plan.block_c,
                             s_first=plan.bwd_order == "s_first")
  return pl.pallas_call(
      kernel,
      grid=(g.nbk, g.nbq, g.n_chunks, g.batch, g.heads),
      in_specs=[_rows_spec(q), _rows_spec(k), _rows_spec(v), _rows_spec(d_out), _bh_spec(lse.shape),
                _bh_spec(delta.shape), _seg_spec(segment_ids)],
      out_specs=[_bh_spec(tile_shape), _bh_spec(tile_shape)],
      out_shape=[jax.ShapeDtypeStruct(tile_shape, d_out.dtype), jax.ShapeDtypeStruct(tile_shape, q.dtype)],
      compiler_params=_tr_params(plan, "tiles", _tr_warps(g.bq * g.bk), 3),
      interpret=plan.interpret,
      name="chunk_attention_bwd_tiles",
  )(q, k, v, d_out, lse, delta, segment_ids)


def _bwd_tiles(plan: _Plan, q, k, v, segment_ids, lse, delta, d_out, out=None):
  """Backward step 1 with the backward tiles (plan.bwd_geom): the Mosaic GPU kernel where tiles_impl
  and the shapes allow, else the Triton one. -> p_buf, ds_buf [B, H, n*cpq, cpk]. delta None: the
  Mosaic GPU kernel computes it from out (`_mgpu_delta_in_tiles` said it would)."""
  if delta is None:
    return _mgpu_bwd_tiles(plan, q, k, v, lse, None, d_out, out=out)[:2]
  if _mgpu_tiles_takes(plan, q, k, v, d_out, segment_ids):
    return _mgpu_bwd_tiles(plan, q, k, v, lse, delta, d_out)
  return _tr_bwd_tiles(dataclasses.replace(plan, geom=plan.bwd_geom), q, k, v, segment_ids, lse, delta, d_out)


def _tr_backward(plan: _Plan, q, k, v, segment_ids, lse, delta, d_out, out=None):
  p_buf, ds_buf = _bwd_tiles(plan, q, k, v, segment_ids, lse, delta, d_out, out)
  mm_plan = dataclasses.replace(plan, geom=plan.bwd_mm_geom)

  def tmatmul(m_buf, x, dtype):
    if _mgpu_takes(plan, plan.bwd_geom, m_buf, x):
      return _mgpu_block_matmul(m_buf, x, None, plan.bwd_geom, transpose_m=True).astype(dtype)
    return _tr_block_tmatmul(mm_plan, m_buf, x, dtype)

  if _mgpu_pair_takes(plan, p_buf, d_out, ds_buf, q):  # dV and dK in one launch
    dv, dk = _mgpu_block_tmatmul_pair(p_buf, d_out, ds_buf, q, plan.bwd_geom)
    dv, dk = dv.astype(v.dtype), dk.astype(k.dtype)
  else:
    dv = tmatmul(p_buf, d_out, v.dtype)
    dk = tmatmul(ds_buf, q, k.dtype)
  if _mgpu_takes(plan, plan.bwd_geom, ds_buf, k):
    dq = _mgpu_block_matmul(ds_buf, k, None, plan.bwd_geom, transpose_m=False).astype(q.dtype)
  else:
    dq = _tr_block_matmul(mm_plan, ds_buf, k, None, None, q.dtype)
  return dq, dk, dv


_MGPU_BLOCK = 128  # the Mosaic GPU block matmul's square tile


_IMPL_ENV = {"matmul": "MEGALODON_ATTENTION_MATMUL", "tiles": "MEGALODON_ATTENTION_TILES",
             "scores": "MEGALODON_ATTENTION_SCORES"}


def _resolve_kernel_impl(kernel: str, choice: str) -> str:
  """KernelConfig.<kernel>_impl -> 'triton' or 'mgpu'. 'auto': the environment variable
  _IMPL_ENV[kernel] if set (A/B runs of whole models), else 'mgpu' on a Hopper (sm_90) GPU, else 'triton'."""
  if choice != "auto":
    return choice
  env = _IMPL_ENV[kernel]
  override = os.environ.get(env, "")
  if override:
    if override not in ("triton", "mgpu"):
      raise ValueError(f"{env}={override!r}: use 'triton' or 'mgpu' (or unset it)")
    return override
  return "mgpu" if _is_hopper() else "triton"


def _is_hopper() -> bool:
  """Whether the default device is a compute-capability 9.0 GPU (wgmma and TMA: Mosaic GPU's kernel)."""
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return False
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"


def _mgpu_takes(plan: _Plan, writer: _Geom, m_buf, x) -> bool:
  """Whether the Mosaic GPU block matmul replaces the Triton one for this product (see matmul_impl)."""
  if plan.matmul_impl != "mgpu" or plan.interpret:
    return False
  return (writer.bq == writer.bk == _MGPU_BLOCK and writer.q_len == writer.k_len
          and writer.q_len % _MGPU_BLOCK == 0 and x.shape[-1] % 128 == 0
          and jnp.dtype(x.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and m_buf.dtype == x.dtype and m_buf.shape == (writer.batch, writer.heads, x.shape[1], writer.q_len))


_MATMUL_PERSISTENT_ENV = "MEGALODON_ATTENTION_MATMUL_PERSISTENT"


def _mgpu_block_matmul(m_buf, x, rscale, writer: _Geom, *, transpose_m: bool):
  from kernels_pallas import block_matmul_mgpu  # Mosaic GPU: imported only when used
  # 4 ring stages with 64-column output stores, each step's wgmma waited for at once: the fastest
  # of experiments/gpu_checks/probe_mgpu_matmul.py's rows on an H200 (P V 0.947 ms against 1.11 for
  # Triton, P^T dO 0.985 against 1.10, 2026-11-30).
  # The persistent schedule, one program per SM, the ring streaming on across work items: the op
  # 3.968 against 4.103 ms with one program per item in 17 interleaved rounds on an H200 (2026-11-30,
  # gpu_checks/..._ab_matmul_persistent_r2.json). MEGALODON_ATTENTION_MATMUL_PERSISTENT=<programs>
  # for A/B runs (0: one program per work item).
  ctas = _int_env(_MATMUL_PERSISTENT_ENV, 0, "programs, e.g. 132; 0 for one program per work item")
  ctas = _sm_count() if ctas is None else ctas
  block_d = _mgpu_block_d(x)
  return block_matmul_mgpu.block_causal_matmul_mgpu(
      m_buf, x, rscale, chunk=writer.q_len, block=_MGPU_BLOCK, block_d=block_d, stages=4, epi_cols=64,
      release="immediate", transpose_m=transpose_m, persistent_ctas=ctas or None)


_MATMUL_PAIR_ENV = "MEGALODON_ATTENTION_MATMUL_PAIR"


def _mgpu_block_d(x) -> int:
  return 256 if x.shape[-1] % 256 == 0 else 128


def _mgpu_pair_takes(plan: _Plan, p_buf, d_out, ds_buf, q) -> bool:
  """Whether dV = P^T dO and dK = dS^T Q run as one Mosaic GPU launch (`block_causal_matmul_mgpu(...,
  second=)`): both on the Mosaic GPU block matmul at one d-tile width, on its persistent schedule.
  MEGALODON_ATTENTION_MATMUL_PAIR=0 runs them as two launches (A/B runs)."""
  pair = _int_env(_MATMUL_PAIR_ENV, 0, "1 for one launch, 0 for two")
  ctas = _int_env(_MATMUL_PERSISTENT_ENV, 0, "programs, e.g. 132; 0 for one program per work item")
  return (pair != 0 and ctas != 0 and _mgpu_takes(plan, plan.bwd_geom, p_buf, d_out)
          and _mgpu_takes(plan, plan.bwd_geom, ds_buf, q) and _mgpu_block_d(d_out) == _mgpu_block_d(q))


def _mgpu_block_tmatmul_pair(p_buf, d_out, ds_buf, q, writer: _Geom):
  """(dV, dK) = (P^T dO, dS^T Q) in one persistent launch: their d tiles share one item order, so the
  last round's idle programs and the launch gap come once (the settings of `_mgpu_block_matmul`)."""
  from kernels_pallas import block_matmul_mgpu  # Mosaic GPU: imported only when used
  ctas = _int_env(_MATMUL_PERSISTENT_ENV, 0, "programs, e.g. 132; 0 for one program per work item")
  return block_matmul_mgpu.block_causal_matmul_mgpu(
      p_buf, d_out, None, chunk=writer.q_len, block=_MGPU_BLOCK, block_d=_mgpu_block_d(d_out), stages=4,
      epi_cols=64, release="immediate", transpose_m=True, persistent_ctas=_sm_count() if ctas is None else ctas,
      second=(ds_buf, q))


def _mgpu_tiles_takes(plan: _Plan, q, k, v, d_out, segment_ids) -> bool:
  """Whether the Mosaic GPU backward tiles kernel replaces the Triton one (see tiles_impl)."""
  if plan.tiles_impl != "mgpu" or plan.interpret or segment_ids is not None:
    return False
  g = plan.bwd_geom
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v, d_out)}
  return (g.bq == g.bk == _MGPU_BLOCK and g.q_len == g.k_len and g.q_len % _MGPU_BLOCK == 0
          and g.dk % 64 == 0 and g.dv % 64 == 0
          and len(dtypes) == 1 and dtypes.pop() in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


_TILES_PERSISTENT_ENV = "MEGALODON_ATTENTION_TILES_PERSISTENT"
_TILES_STAGES_ENV = "MEGALODON_ATTENTION_TILES_STAGES"


def _int_env(name: str, minimum: int, example: str) -> int | None:
  """An A/B switch for whole-model runs: the integer >= minimum in environment variable `name`, None if unset."""
  value = os.environ.get(name, "")
  if not value:
    return None
  try:
    number = int(value)
  except ValueError:
    number = minimum - 1
  if number < minimum:
    raise ValueError(f"{name}={value!r}: set it to an integer >= {minimum} ({example}) or unset it")
  return number


def _sm_count() -> int:
  """Streaming multiprocessors of the first GPU (132 on an H100 / H200 SXM, also the fallback)."""
  device = jax.devices()[0]
  return (getattr(device, "core_count", None) if device.platform == "gpu" else None) or 132


def _tiles_ctas() -> int:
  """Programs of the Mosaic GPU tiles kernel's persistent schedule (0: one tile per program)."""
  ctas = _int_env(_TILES_PERSISTENT_ENV, 0, "programs, 0 for one tile per program")
  return _sm_count() if ctas is None else ctas


_DELTA_ENV = "MEGALODON_ATTENTION_DELTA"
_DELTA_CTAS_ENV = "MEGALODON_ATTENTION_DELTA_CTAS"


def _resolve_delta_impl(choice: str) -> str:
  """KernelConfig.delta_impl -> 'auto', 'xla', 'pallas' or 'tiles'. 'auto': the environment variable
  MEGALODON_ATTENTION_DELTA if set (A/B runs of whole models), else 'auto' ('tiles' where it applies)."""
  if choice != "auto":
    return choice
  override = os.environ.get(_DELTA_ENV, "")
  if override and override not in ("xla", "pallas", "tiles"):
    raise ValueError(f"{_DELTA_ENV}={override!r}: use 'xla', 'pallas' or 'tiles' (or unset it)")
  return override or "auto"


def _delta_ctas() -> int:
  """Programs of the tiles kernel that compute delta: MEGALODON_ATTENTION_DELTA_CTAS if set, else 14 per
  132 SMs (the fastest of 12, 14, 16 and 18 on an H200, 2026-12-01)."""
  n = _int_env(_DELTA_CTAS_ENV, 1, "programs that compute delta, e.g. 14")
  return max(1, round(_sm_count() * 14 / 132)) if n is None else n


def _mgpu_delta_in_tiles(plan: _Plan, q, k, v, d_out, segment_ids) -> bool:
  """Whether programs of the Mosaic GPU tiles kernel compute delta: that kernel runs on its persistent
  schedule with at most one program a SM (its programs wait for one another) and more programs than
  compute delta; else delta comes from XLA."""
  ctas = _tiles_ctas()
  return _mgpu_tiles_takes(plan, q, k, v, d_out, segment_ids) and _delta_ctas() < ctas <= _sm_count()


def _mgpu_bwd_tiles(plan: _Plan, q, k, v, lse, delta, d_out, out=None):
  from kernels_pallas import bwd_tiles_mgpu  # Mosaic GPU: imported only when used
  # The persistent schedule, one program per SM striding the global tile order with a 5-stage ring:
  # on an H200 the kernel took 1.117 ms against 1.272 for one tile per program (4 stages) and 1.460
  # for Triton, and the op 4.207 against 4.282 ms interleaved over 15 rounds (2026-11-30,
  # gpu_checks/..._probe-mgpu-bwd-tiles-stages.json, ..._ab_tiles_schedule.json).
  # A/B switches: MEGALODON_ATTENTION_TILES_PERSISTENT=<programs>, 0 for one tile per program;
  # MEGALODON_ATTENTION_TILES_STAGES=<ring depth> (at most 6 fits in shared memory).
  ctas = _tiles_ctas()
  stages = _int_env(_TILES_STAGES_ENV, 1, "the ring depth; at most 6 fits in shared memory")
  if ctas:
    return bwd_tiles_mgpu.bwd_tiles_mgpu(q, k, v, d_out, lse, delta, chunk=plan.bwd_geom.q_len, scale=plan.scale,
                                         block_k=128, stages=stages or 5, persistent_ctas=ctas, out=out,
                                         delta_ctas=0 if out is None else _delta_ctas())
  return bwd_tiles_mgpu.bwd_tiles_mgpu(q, k, v, d_out, lse, delta, chunk=plan.bwd_geom.q_len, scale=plan.scale,
                                       block_k=128, stages=stages or 4, spans_per_program=1)


def _mgpu_scores_takes(plan: _Plan, q, k, p_dtype, segment_ids) -> bool:
  """Whether the Mosaic GPU scores kernel replaces the Triton one for this call (see scores_impl)."""
  g = plan.geom
  sixteen = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return (plan.scores_impl == "mgpu" and not plan.interpret and plan.fwd_scores in ("bounded", "twopass")
          and segment_ids is None and g.bq == g.bk == _MGPU_BLOCK and g.q_len == g.k_len
          and g.q_len % _MGPU_BLOCK == 0 and g.dk % 64 == 0 and g.dk <= 256
          and jnp.dtype(q.dtype) in sixteen and k.dtype == q.dtype and jnp.dtype(p_dtype) in sixteen)


_SCORES_OVERLAP_ENV = "MEGALODON_ATTENTION_SCORES_OVERLAP"
_SCORES_STAGES_ENV = "MEGALODON_ATTENTION_SCORES_STAGES"
_SCORES_P_BUFFERS_ENV = "MEGALODON_ATTENTION_SCORES_P_BUFFERS"
_SCORES_UNIFORM_ENV = "MEGALODON_ATTENTION_SCORES_UNIFORM"
_SCORES_INNER_BOUND_ENV = "MEGALODON_ATTENTION_SCORES_INNER_BOUND"


def _mgpu_scores(plan: _Plan, q, k, p_dtype):
  """The forward scores by kernels_pallas.scores_mgpu: (P~ tiles, 1 / l, lse) as `_tr_scores`."""
  from kernels_pallas import scores_mgpu  # Mosaic GPU: imported only when used
  g = plan.geom
  # The bounded path forms the bound in the kernel from |q_r| (Q Q^T's diagonal) and XLA's key scale,
  # sparing an XLA pass over q; MEGALODON_ATTENTION_SCORES_INNER_BOUND=0 passes the whole bound instead
  # (A/B runs).
  inner = _int_env(_SCORES_INNER_BOUND_ENV, 0, "1 for the bound formed in the kernel, 0 for XLA's") != 0
  bounded = plan.fwd_scores == "bounded"
  bound = _score_bound(q, k, g, plan.scale * _LOG2E) if bounded and not inner else None
  k_scale = _key_scale(k, g, plan.scale * _LOG2E) if bounded and inner else None
  # A/B switches, untimed defaults kept: MEGALODON_ATTENTION_SCORES_OVERLAP=1 for the software-pipelined
  # consumers (scores_mgpu's overlap=True), MEGALODON_ATTENTION_SCORES_STAGES=<ring depth> (default 4) and
  # MEGALODON_ATTENTION_SCORES_P_BUFFERS=2 for two P~ staging buffers per consumer (the ring then
  # defaults to 5 stages, the deepest that fits in shared memory beside them).
  overlap = _int_env(_SCORES_OVERLAP_ENV, 0, "1 for the overlapped schedule, 0 for the serial one")
  p_buffers = _int_env(_SCORES_P_BUFFERS_ENV, 1, "1 or 2 P~ staging buffers per consumer") or 1
  if (overlap or 0) > 1 or p_buffers > 2:
    raise ValueError(f"{_SCORES_OVERLAP_ENV} must be 0 or 1 and {_SCORES_P_BUFFERS_ENV} 1 or 2 (or unset), got "
                     f"{os.environ.get(_SCORES_OVERLAP_ENV)!r} and {os.environ.get(_SCORES_P_BUFFERS_ENV)!r}")
  stages = _int_env(_SCORES_STAGES_ENV, 1, "the ring depth; at most 7 fits in shared memory at dk 256")
  # 4 stages: with the lane-0 decision the kernel took 0.283 ms against 0.294 at 6 (probe), and the op 3.991
  # against 4.023 ms over 15 interleaved rounds (gpu_checks/2026-11-30_nvidia-h200_ab_scores_uniform.json).
  stages = stages or (5 if p_buffers == 2 else 4)
  # MEGALODON_ATTENTION_SCORES_UNIFORM=0: the bound decision as before (ptxas then serialises the wgmma).
  uniform = _int_env(_SCORES_UNIFORM_ENV, 0, "0 for the old bound decision, 1 (default) for the lane-0 broadcast")
  return scores_mgpu.chunk_scores_mgpu(q, k, bound, chunk=g.q_len, scale=plan.scale, p_dtype=p_dtype,
                                       stages=stages, overlap=bool(overlap), p_buffers=p_buffers,
                                       uniform_decision=uniform is None or bool(uniform), k_scale=k_scale)


def _tr_delta(plan: _Plan, out, d_out):
  """delta = rowsum(O dO) as a Pallas kernel: out, d_out [B, L, H, dv] -> [B, H, L] float32."""
  batch, length, heads, width = out.shape
  rows = min(64, max(16, _next_pow2(length)))
  chunk = _gpu_feature_block(None, 256, width, "delta chunk")
  kernel = functools.partial(_tr_delta_kernel, rows=rows, length=length, width=width, chunk=chunk)
  shape = (batch, heads, length)
  return pl.pallas_call(
      kernel,
      grid=(_cdiv(length, rows), batch, heads),
      in_specs=[_rows_spec(out), _rows_spec(d_out)],
      out_specs=_bh_spec(shape),
      out_shape=jax.ShapeDtypeStruct(shape, jnp.float32),
      compiler_params=_tr_params(plan, "delta", 4, 3),
      interpret=plan.interpret,
      name="chunk_attention_delta",
  )(out, d_out)


def _tr_flash_forward(plan: _Plan, q, k, v, segment_ids, start, *, save_lse: bool):
  """Flash forward; start: None (chunked attention) or an int32 scalar (cached attention)."""
  g = plan.geom
  bd = plan.block_d
  lse_shape = (g.batch, g.heads, g.n_chunks * g.q_len)
  out_shape = [jax.ShapeDtypeStruct((g.batch, g.n_chunks * g.q_len, g.heads, g.dv), v.dtype)]
  out_specs = [_rows_spec(out_shape[0])]
  if save_lse:
    out_shape.append(jax.ShapeDtypeStruct(lse_shape, jnp.float32))
    out_specs.append(_bh_spec(lse_shape))
  off_spec = None if start is None else pl.BlockSpec((), lambda *g_: ())
  kernel = functools.partial(_tr_flash_kernel, g=g, scale2=plan.scale * _LOG2E, chunk=plan.block_qk, bd=bd)
  if not save_lse:
    kernel = functools.partial(_drop_lse_ref, kernel)
  outs = pl.pallas_call(
      kernel,
      grid=(_cdiv(g.dv, bd), g.nbq, g.n_chunks, g.batch, g.heads),
      in_specs=[off_spec, _rows_spec(q), _rows_spec(k), _rows_spec(v), _seg_spec(segment_ids)],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_tr_params(plan, "flash", _tr_warps(g.bq * bd), 2),
      interpret=plan.interpret,
      name="chunk_attention_flash_fwd",
  )(start, q, k, v, segment_ids)
  return (outs[0], outs[1]) if save_lse else (outs[0], None)


def _drop_lse_ref(kernel, off_ref, q_ref, k_ref, v_ref, seg_ref, o_ref):
  kernel(off_ref, q_ref, k_ref, v_ref, seg_ref, o_ref, None)


# ----------------------------------------------------------------------------------------------
# TPU (Pallas Mosaic): flash-attention-2 kernels

_TRANS_B = (((1,), (1,)), ((), ()))


def _lanes(x: jax.Array, width: int) -> jax.Array:
  """Widen lane-broadcast statistics [rows, 128] to [rows, width] (all lanes hold the same value)."""
  if width == _LANES:
    return x
  if width % _LANES == 0:
    return jnp.tile(x, (1, width // _LANES))
  if width < _LANES:
    return x[:, :width]
  raise ValueError(f"TPU kernels need feature/tile widths < 128 or multiples of 128, got {width}")


def _mosaic_mask(shape, row0, col0, qseg_ref, kseg_ref) -> jax.Array:
  rows = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = col0 + lax.broadcasted_iota(jnp.int32, shape, 1)
  mask = cols <= rows
  if qseg_ref is not None:
    q_seg = _lanes(qseg_ref[...], shape[1])  # [bq, bk]
    k_seg = kseg_ref[:1, :]  # [1, bk]
    mask = jnp.logical_and(mask, q_seg == k_seg)
  return mask


def _mosaic_fwd_kernel(off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                       *, bq: int, bk: int, nbk: int, scale: float):
  i, j = pl.program_id(3), pl.program_id(4)
  q_off = off_ref[0]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _MASK, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j * bk <= q_off + (i + 1) * bq - 1)
  def _run():
    s = lax.dot_general(q_ref[...], k_ref[...], _TRANS_B, preferred_element_type=jnp.float32)
    if scale != 1.0:
      s = s * scale
    mask = _mosaic_mask((bq, bk), q_off + i * bq, j * bk, qseg_ref, kseg_ref)
    s = jnp.where(mask, s, _MASK)
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # [bq, 128]
    p = jnp.where(mask, jnp.exp(s - _lanes(m_next, bk)), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1)[:, None]
    m_sc[...] = m_next
    v = v_ref[...]
    pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_sc[...] = acc_sc[...] * _lanes(alpha, acc_sc.shape[1]) + pv

  @pl.when(j == nbk - 1)
  def _store():
    l = l_sc[...]
    l = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc_sc[...] / _lanes(l, acc_sc.shape[1])).astype(o_ref.dtype)
    if lse_ref is not None:
      lse_ref[...] = m_sc[...] + jnp.log(l)


def _mosaic_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref,
                       dk_sc, dv_sc, *, bq: int, bk: int, nbq: int, scale: float):
  j, i = pl.program_id(3), pl.program_id(4)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when((i + 1) * bq - 1 >= j * bk)
  def _run():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = lax.dot_general(q, k, _TRANS_B, preferred_element_type=jnp.float32)
    if scale != 1.0:
      s = s * scale
    mask = _mosaic_mask((bq, bk), i * bq, j * bk, qseg_ref, kseg_ref)
    p = jnp.where(mask, jnp.exp(s - _lanes(lse_ref[...], bk)), 0.0)
    dv_sc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v, _TRANS_B, preferred_element_type=jnp.float32)
    ds = jnp.where(mask, p * (dp - _lanes(delta_ref[...], bk)), 0.0)
    if scale != 1.0:
      ds = ds * scale
    dk_sc[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  @pl.when(i == nbq - 1)
  def _store():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _mosaic_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref, dq_sc, *,
                      bq: int, bk: int, nbk: int, scale: float):
  i, j = pl.program_id(3), pl.program_id(4)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(j * bk <= (i + 1) * bq - 1)
  def _run():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = lax.dot_general(q, k, _TRANS_B, preferred_element_type=jnp.float32)
    if scale != 1.0:
      s = s * scale
    mask = _mosaic_mask((bq, bk), i * bq, j * bk, qseg_ref, kseg_ref)
    p = jnp.where(mask, jnp.exp(s - _lanes(lse_ref[...], bk)), 0.0)
    dp = lax.dot_general(do, v, _TRANS_B, preferred_element_type=jnp.float32)
    ds = jnp.where(mask, p * (dp - _lanes(delta_ref[...], bk)), 0.0)
    if scale != 1.0:
      ds = ds * scale
    dq_sc[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(j == nbk - 1)
  def _store():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------
# TPU wrappers


def _mosaic_plan(config: KernelConfig, interpret: bool, scale: float, batch: int, heads: int, n_chunks: int,
                 q_len: int, k_len: int, dk: int, dv: int) -> _Plan:
  """q_len/k_len must already be multiples of the tiles chosen by `_mosaic_tiles`."""
  bq, bk = _mosaic_tiles(config, q_len, k_len)
  # [B, L, H, d] viewed as [B, L, H*d] needs lane-aligned head slices; otherwise transpose.
  packed = heads == 1 or (dk % _LANES == 0 and dv % _LANES == 0)
  geom = _Geom(batch, heads, n_chunks, q_len, k_len, dk, dv, bq, bk)
  return _Plan("mosaic", interpret, scale, geom, packed=packed)


def _mosaic_tiles(config: KernelConfig, q_len: int, k_len: int) -> tuple[int, int]:
  return _tpu_block(config.block_q, q_len, "block_q"), _tpu_block(config.block_k, k_len, "block_k")


def _pad_chunks(x, n_chunks: int, chunk_len: int, padded_len: int):
  """[B, n*chunk_len, ...] -> [B, n*padded_len, ...], zero rows appended to every chunk."""
  if padded_len == chunk_len:
    return x
  shaped = x.reshape(x.shape[0], n_chunks, chunk_len, *x.shape[2:])
  pad = [(0, 0)] * shaped.ndim
  pad[2] = (0, padded_len - chunk_len)
  return jnp.pad(shaped, pad).reshape(x.shape[0], n_chunks * padded_len, *x.shape[2:])


def _unpad_chunks(x, n_chunks: int, chunk_len: int, padded_len: int):
  if padded_len == chunk_len:
    return x
  shaped = x.reshape(x.shape[0], n_chunks, padded_len, *x.shape[2:])[:, :, :chunk_len]
  return shaped.reshape(x.shape[0], n_chunks * chunk_len, *x.shape[2:])


def _mosaic_chunk_attention(config, interpret, scale, q, k, v, segment_ids, n_chunks, chunk_len):
  """Pads every chunk to whole tiles (outside the custom_vjp, so autodiff slices the padding off).

  Padded keys sit after every real query of their chunk, so the causal mask already hides them;
  padded query rows are dropped (their zero cotangent adds nothing to dK/dV).
  """
  bq, bk = _mosaic_tiles(config, chunk_len, chunk_len)
  padded = _cdiv(chunk_len, max(bq, bk)) * max(bq, bk)
  if padded % bq or padded % bk:
    raise ValueError(f"block_q={bq} and block_k={bk} must divide each other on TPU")
  batch, _, heads, dk = q.shape
  plan = _mosaic_plan(config, interpret, scale, batch, heads, n_chunks, padded, padded, dk, v.shape[-1])
  pad = functools.partial(_pad_chunks, n_chunks=n_chunks, chunk_len=chunk_len, padded_len=padded)
  segs = None if segment_ids is None else pad(segment_ids)
  out = _attention(plan, pad(q), pad(k), pad(v), segs)
  return _unpad_chunks(out, n_chunks, chunk_len, padded)


def _mosaic_cached_attention(config, interpret, scale, q, k_buf, v_buf, start):
  steps, cache_len = q.shape[1], k_buf.shape[1]
  bq, bk = _mosaic_tiles(config, steps, cache_len)
  q_pad = _cdiv(steps, bq) * bq
  k_pad = _cdiv(cache_len, bk) * bk
  batch, _, heads, dk = q.shape
  plan = _mosaic_plan(config, interpret, scale, batch, heads, 1, q_pad, k_pad, dk, v_buf.shape[-1])
  q = _pad_chunks(q, 1, steps, q_pad)
  k_buf = _pad_chunks(k_buf, 1, cache_len, k_pad)  # padded keys lie past every query position
  v_buf = _pad_chunks(v_buf, 1, cache_len, k_pad)
  out, _ = _mosaic_forward(plan, q, k_buf, v_buf, None, start, save_lse=False)
  return out[:, :steps]


class _MosaicLayout:
  """How [B, L, H, d] arrays are handed to the Mosaic kernels as 3-D [A, L, W] arrays."""

  def __init__(self, plan: _Plan):
    self.packed = plan.packed
    self.heads = plan.geom.heads

  def to3(self, x):
    batch, length, heads, width = x.shape
    if self.packed:  # free reshape; head h is the h-th lane-aligned column block
      return x.reshape(batch, length, heads * width)
    return x.transpose(0, 2, 1, 3).reshape(batch * heads, length, width)

  def from3(self, y, batch: int):
    if self.packed:
      return y.reshape(batch, y.shape[1], self.heads, -1)
    return y.reshape(batch, self.heads, y.shape[1], y.shape[2]).transpose(0, 2, 1, 3)

  def index(self, b, h):
    """(leading index, column block) of head h of batch element b."""
    return (b, h) if self.packed else (b * self.heads + h, 0)


def _mosaic_seg_inputs(segment_ids, q_len_total: int):
  """Lane/sublane-broadcast segment ids (the layouts Mosaic compares without relayouts)."""
  if segment_ids is None:
    return None, None
  batch = segment_ids.shape[0]
  q_seg = lax.broadcast_in_dim(segment_ids, (batch, q_len_total, _LANES), (0, 1))
  k_seg = lax.broadcast_in_dim(segment_ids, (batch, _SUBLANES, q_len_total), (0, 2))
  return q_seg, k_seg


def _mosaic_params(semantics) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _mosaic_forward(plan: _Plan, q, k, v, segment_ids, start, *, save_lse: bool):
  """Flash forward. Returns out [B, Lq, H, dv] and lse [B, H, Lq, 128] (natural log) or None."""
  g = plan.geom
  lay = _MosaicLayout(plan)
  q3, k3, v3 = lay.to3(q), lay.to3(k), lay.to3(v)
  offset = jnp.zeros((1,), jnp.int32) if start is None else jnp.reshape(start, (1,)).astype(jnp.int32)

  def visible(i, j, off_ref):
    return j * g.bk <= off_ref[0] + (i + 1) * g.bq - 1

  def q_map(b, h, n, i, j, off_ref):
    a, c = lay.index(b, h)
    return (a, n * g.nbq + i, c)

  def kv_map(b, h, n, i, j, off_ref):
    a, c = lay.index(b, h)
    # Skipped blocks re-use block 0, the first one the next query block needs: no DMA wasted.
    return (a, n * g.nbk + jnp.where(visible(i, j, off_ref), j, 0), c)

  def lse_map(b, h, n, i, j, off_ref):
    return (b, h, n * g.nbq + i, 0)

  q_seg, k_seg = _mosaic_seg_inputs(segment_ids, g.n_chunks * g.q_len)
  seg_specs = [None, None]
  if q_seg is not None:
    seg_specs = [
        pl.BlockSpec((None, g.bq, _LANES), lambda b, h, n, i, j, off: (b, n * g.nbq + i, 0)),
        pl.BlockSpec((None, _SUBLANES, g.bk),
                     lambda b, h, n, i, j, off: (b, 0, n * g.nbk + jnp.where(visible(i, j, off), j, 0))),
    ]
  rows = g.n_chunks * g.q_len
  out_shape = [jax.ShapeDtypeStruct((q3.shape[0], rows, v3.shape[2]), v.dtype)]
  out_specs = [pl.BlockSpec((None, g.bq, g.dv), q_map)]
  if save_lse:
    out_shape.append(jax.ShapeDtypeStruct((g.batch, g.heads, rows, _LANES), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, g.bq, _LANES), lse_map))
  kernel = functools.partial(_mosaic_fwd_kernel, bq=g.bq, bk=g.bk, nbk=g.nbk, scale=plan.scale)
  if not save_lse:
    kernel = functools.partial(_mosaic_drop_lse, kernel)
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(g.batch, g.heads, g.n_chunks, g.nbq, g.nbk),
          in_specs=[pl.BlockSpec((None, g.bq, g.dk), q_map), pl.BlockSpec((None, g.bk, g.dk), kv_map),
                    pl.BlockSpec((None, g.bk, g.dv), kv_map), *seg_specs],
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((g.bq, _LANES), jnp.float32), pltpu.VMEM((g.bq, _LANES), jnp.float32),
                          pltpu.VMEM((g.bq, g.dv), jnp.float32)],
      ),
      out_shape=out_shape,
      compiler_params=_mosaic_params(("parallel",) * 4 + ("arbitrary",)),
      interpret=plan.interpret,
      name="chunk_attention_fwd_tpu",
  )(offset, q3, k3, v3, q_seg, k_seg)
  out = lay.from3(outs[0], g.batch)
  return out, (outs[1] if save_lse else None)


def _mosaic_drop_lse(kernel, off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, m_sc, l_sc, acc_sc):
  kernel(off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, None, m_sc, l_sc, acc_sc)


def _mosaic_backward(plan: _Plan, q, k, v, segment_ids, lse, delta, d_out):
  """lse: [B, H, L, 128] from the forward; delta: [B, H, L] float32."""
  g = plan.geom
  lay = _MosaicLayout(plan)
  q3, k3, v3, do3 = lay.to3(q), lay.to3(k), lay.to3(v), lay.to3(d_out)
  delta = jnp.broadcast_to(delta[..., None], (*delta.shape, _LANES))
  q_seg, k_seg = _mosaic_seg_inputs(segment_ids, g.n_chunks * g.q_len)
  semantics = _mosaic_params(("parallel",) * 4 + ("arbitrary",))

  # dK, dV: grid (b, h, n, key block j, query block i); skipped i (< first visible) re-use it.
  def first_q(j):
    return lax.div(j * g.bk, g.bq)

  def kv_rows(b, h, n, j, i):
    a, c = lay.index(b, h)
    return (a, n * g.nbk + j, c)

  def q_rows(b, h, n, j, i):
    a, c = lay.index(b, h)
    return (a, n * g.nbq + jnp.maximum(i, first_q(j)), c)

  def stat_rows(b, h, n, j, i):
    return (b, h, n * g.nbq + jnp.maximum(i, first_q(j)), 0)

  seg_specs = [None, None]
  if q_seg is not None:
    seg_specs = [pl.BlockSpec((None, g.bq, _LANES),
                              lambda b, h, n, j, i: (b, n * g.nbq + jnp.maximum(i, first_q(j)), 0)),
                 pl.BlockSpec((None, _SUBLANES, g.bk), lambda b, h, n, j, i: (b, 0, n * g.nbk + j))]
  dk3, dv3 = pl.pallas_call(
      functools.partial(_mosaic_dkv_kernel, bq=g.bq, bk=g.bk, nbq=g.nbq, scale=plan.scale),
      grid=(g.batch, g.heads, g.n_chunks, g.nbk, g.nbq),
      in_specs=[pl.BlockSpec((None, g.bq, g.dk), q_rows), pl.BlockSpec((None, g.bk, g.dk), kv_rows),
                pl.BlockSpec((None, g.bk, g.dv), kv_rows), pl.BlockSpec((None, g.bq, g.dv), q_rows),
                pl.BlockSpec((None, None, g.bq, _LANES), stat_rows),
                pl.BlockSpec((None, None, g.bq, _LANES), stat_rows), *seg_specs],
      out_specs=[pl.BlockSpec((None, g.bk, g.dk), kv_rows), pl.BlockSpec((None, g.bk, g.dv), kv_rows)],
      out_shape=[jax.ShapeDtypeStruct(k3.shape, k.dtype), jax.ShapeDtypeStruct(v3.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((g.bk, g.dk), jnp.float32), pltpu.VMEM((g.bk, g.dv), jnp.float32)],
      compiler_params=semantics,
      interpret=plan.interpret,
      name="chunk_attention_dkv_tpu",
  )(q3, k3, v3, do3, lse, delta, q_seg, k_seg)

  # dQ: grid (b, h, n, query block i, key block j); skipped j re-use block 0.
  def dq_visible(i, j):
    return j * g.bk <= (i + 1) * g.bq - 1

  def q_rows2(b, h, n, i, j):
    a, c = lay.index(b, h)
    return (a, n * g.nbq + i, c)

  def kv_rows2(b, h, n, i, j):
    a, c = lay.index(b, h)
    return (a, n * g.nbk + jnp.where(dq_visible(i, j), j, 0), c)

  seg_specs = [None, None]
  if q_seg is not None:
    seg_specs = [pl.BlockSpec((None, g.bq, _LANES), lambda b, h, n, i, j: (b, n * g.nbq + i, 0)),
                 pl.BlockSpec((None, _SUBLANES, g.bk),
                              lambda b, h, n, i, j: (b, 0, n * g.nbk + jnp.where(dq_visible(i, j), j, 0)))]
  dq3 = pl.pallas_call(
      functools.partial(_mosaic_dq_kernel, bq=g.bq, bk=g.bk, nbk=g.nbk, scale=plan.scale),
      grid=(g.batch, g.heads, g.n_chunks, g.nbq, g.nbk),
      in_specs=[pl.BlockSpec((None, g.bq, g.dk), q_rows2), pl.BlockSpec((None, g.bk, g.dk), kv_rows2),
                pl.BlockSpec((None, g.bk, g.dv), kv_rows2), pl.BlockSpec((None, g.bq, g.dv), q_rows2),
                pl.BlockSpec((None, None, g.bq, _LANES), lambda b, h, n, i, j: (b, h, n * g.nbq + i, 0)),
                pl.BlockSpec((None, None, g.bq, _LANES), lambda b, h, n, i, j: (b, h, n * g.nbq + i, 0)),
                *seg_specs],
      out_specs=pl.BlockSpec((None, g.bq, g.dk), q_rows2),
      out_shape=jax.ShapeDtypeStruct(q3.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((g.bq, g.dk), jnp.float32)],
      compiler_params=semantics,
      interpret=plan.interpret,
      name="chunk_attention_dq_tpu",
  )(q3, k3, v3, do3, lse, delta, q_seg, k_seg)
  return lay.from3(dq3, g.batch), lay.from3(dk3, g.batch), lay.from3(dv3, g.batch)
