"""Pallas chunked attention (kernels_pallas/chunk_attention.py) in interpret mode on CPU.

Every kernel family (GPU/Triton 'blocks' and 'flash' forwards, TPU/Mosaic flash-2) is checked
against two independent references: the XLA path (`chunk_attention_reference`) and a float64
numpy dense attention with an explicit [L, L] mask, whose gradients are written out by hand.
Interpret mode compiles slowly, so every case is one jitted (out, dq, dk, dv) function compiled
with XLA's backend optimisations off, and shapes are tiny.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import chunk_attention as ca
from megalodon_jax.config import ConfigError
from megalodon_jax.ops import attention as xla_attention

# Interpret-mode kernels are large while loops; XLA's backend optimisations only cost compile time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ----------------------------------------------------------------------------------------------
# float64 numpy references


def _dense_mask(length: int, chunk_size: int, segment_ids: np.ndarray | None, batch: int) -> np.ndarray:
  """[B, L, L] bool: same chunk, key at or before query, same segment."""
  chunk = min(length, chunk_size)
  pos = np.arange(length)
  mask = (pos[:, None] // chunk == pos[None, :] // chunk) & (pos[None, :] <= pos[:, None])
  mask = np.broadcast_to(mask, (batch, length, length))
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def _softmax_probs(q, k, mask, scale):
  """q: [B, Lq, H, dk], k: [B, Lk, H, dk], mask: [B, Lq, Lk] -> probabilities [B, H, Lq, Lk]."""
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  scores = np.where(mask[:, None], scores, -np.inf)
  scores = scores - scores.max(axis=-1, keepdims=True)
  probs = np.exp(scores)
  return probs / probs.sum(axis=-1, keepdims=True)


def dense_attention_f64(q, k, v, d_out, mask, scale):
  """Output and hand-written gradients (dq, dk, dv) of masked softmax attention in float64."""
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  probs = _softmax_probs(q, k, mask, scale)
  out = np.einsum("bhqk,bkhd->bqhd", probs, v)
  d_probs = np.einsum("bqhd,bkhd->bhqk", d_out, v)
  d_scores = probs * (d_probs - (probs * d_probs).sum(axis=-1, keepdims=True)) * scale
  dq = np.einsum("bhqk,bkhd->bqhd", d_scores, k)
  dk = np.einsum("bhqk,bqhd->bkhd", d_scores, q)
  dv = np.einsum("bhqk,bqhd->bkhd", probs, d_out)
  return out, dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Compiled functions shared across tests


def _vjp_fn(attention, chunk_size, scale):
  def fn(q, k, v, segment_ids, d_out):
    out, vjp = jax.vjp(lambda q_, k_, v_: attention(q_, k_, v_, chunk_size=chunk_size,
                                                    segment_ids=segment_ids, scale=scale), q, k, v)
    return (out, *vjp(d_out))
  return fn


@functools.lru_cache(maxsize=None)
def _compiled_kernel_vjp(platform, config, chunk_size, scale, avals):
  attention = functools.partial(ca.chunk_attention, platform=platform, config=config, interpret=True)
  lowered = jax.jit(_vjp_fn(attention, chunk_size, scale)).lower(*avals)
  return lowered.compile(compiler_options=_FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _compiled_reference_vjp(chunk_size, scale, avals):
  return jax.jit(_vjp_fn(ca.chunk_attention_reference, chunk_size, scale)).lower(*avals).compile()


def _avals(*arrays):
  return tuple(None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)


def _random_inputs(rng, batch, length, heads, dk, dv, dtype, with_segments):
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  q, k = normal(batch, length, heads, dk), normal(batch, length, heads, dk)
  v, d_out = normal(batch, length, heads, dv), normal(batch, length, heads, dv)
  segment_ids = jnp.asarray(rng.integers(0, 3, size=(batch, length)), jnp.int32) if with_segments else None
  return q, k, v, d_out, segment_ids


def _rel_err(actual, expected) -> float:
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-6))


def _check_against_references(rng, platform, *, batch, length, heads, dk, dv, chunk_size, config,
                              segments=False, dtype=jnp.float32, scale=1.0):
  q, k, v, d_out, segment_ids = _random_inputs(rng, batch, length, heads, dk, dv, dtype, segments)
  avals = _avals(q, k, v, segment_ids, d_out)
  got = _compiled_kernel_vjp(platform, config, chunk_size, scale, avals)(q, k, v, segment_ids, d_out)
  ref = _compiled_reference_vjp(chunk_size, scale, avals)(q, k, v, segment_ids, d_out)
  seg_np = None if segment_ids is None else np.asarray(segment_ids)
  exact = dense_attention_f64(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                              d_out.astype(jnp.float32), _dense_mask(length, chunk_size, seg_np, batch), scale)
  assert got[0].shape == (batch, length, heads, dv) and got[0].dtype == v.dtype
  for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, ref, exact):
    assert g.dtype == r.dtype, name
    # bf16: inputs are exact in both, but P is rounded to bf16 before P V (as in the reference).
    tol_ref, tol_exact = (1e-5, 1e-5) if dtype == jnp.float32 else (2e-2, 3e-2)
    assert _rel_err(g, r) < tol_ref, (name, _rel_err(g, r))
    assert _rel_err(g, e) < tol_exact, (name, _rel_err(g, e))
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name


# ----------------------------------------------------------------------------------------------
# Chunked attention: values and gradients

_TRITON_CASES = {
    # several chunks, batch > 1, two heads, dk != dv
    "chunks_heads": dict(batch=2, length=64, heads=2, dk=16, dv=32, chunk_size=32,
                         config=ca.KernelConfig(block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=16)),
    # L < C (one chunk of 40): masked tail rows, block_q != block_k, scale != 1
    "short_tail": dict(batch=1, length=40, heads=1, dk=16, dv=32, chunk_size=64, scale=0.7,
                       config=ca.KernelConfig(block_q=32, block_k=16, bwd_block_q=16, bwd_block_k=32)),
    # L = 48 < C: the 16-row reduction steps divide L but the 32-row tiles do not
    "steps_divide_tiles_do_not": dict(batch=1, length=48, heads=1, dk=16, dv=32, chunk_size=64,
                                      config=ca.KernelConfig(block_q=16, block_k=32, bwd_block_q=32,
                                                             bwd_block_k=16, block_r=16)),
    # odd chunk size (24, not a multiple of the tiles), dv not a power of 2, packed segments
    "odd_chunks_segments": dict(batch=1, length=48, heads=2, dk=16, dv=48, chunk_size=24, segments=True,
                                config=ca.KernelConfig(block_q=16, block_k=32, bwd_block_q=32, bwd_block_k=16, block_d=32)),
    # one chunk (L == C) in bfloat16; default backward tiles (capped at the chunk: 32 x 32)
    "one_chunk_bf16": dict(batch=1, length=32, heads=2, dk=16, dv=32, chunk_size=32, dtype=jnp.bfloat16,
                           scale=0.5, config=ca.KernelConfig(block_q=16, block_k=16)),
    # the one-pass forward (running maxima per key tile, applied inside the P V matmul)
    "online_scores": dict(batch=1, length=48, heads=2, dk=16, dv=48, chunk_size=24, segments=True,
                          config=ca.KernelConfig(block_q=16, block_k=32, bwd_block_q=16, bwd_block_k=16,
                                                 fwd_scores="online")),
    # block matmuls on finer tiles than the kernels that wrote the probability tiles (tails of
    # 40 % 32 rows, segments), backward with S and P before dP, delta from the Pallas kernel
    "reader_tiles_s_first": dict(batch=1, length=80, heads=1, dk=16, dv=48, chunk_size=40, segments=True,
                                 config=ca.KernelConfig(block_q=32, block_k=32, mm_block_q=16, mm_block_k=16,
                                                        bwd_block_q=32, bwd_block_k=32, bwd_mm_block_q=16,
                                                        bwd_mm_block_k=32, block_r=16, block_d=32,
                                                        bwd_order="s_first", delta_impl="pallas")),
    # s_first in bfloat16 (P is held in bf16 across the dv loop), scale != 1
    "s_first_bf16": dict(batch=1, length=64, heads=2, dk=16, dv=32, chunk_size=32, dtype=jnp.bfloat16,
                         scale=0.6, config=ca.KernelConfig(block_q=16, block_k=16, bwd_block_q=16,
                                                           bwd_block_k=32, bwd_order="s_first")),
    # the plain two-pass forward (row maxima over every key block first)
    "twopass_scores": dict(batch=2, length=80, heads=2, dk=16, dv=32, chunk_size=40,
                           config=ca.KernelConfig(block_q=16, block_k=16, fwd_scores="twopass")),
    # first pass on the diagonal key blocks only when the score bound allows (q tail rows)
    "bounded_scores": dict(batch=2, length=80, heads=2, dk=16, dv=32, chunk_size=40,
                           config=ca.KernelConfig(block_q=16, block_k=16, fwd_scores="bounded")),
    # the buffer-free flash forward, with segments and tails
    "flash_forward": dict(batch=1, length=48, heads=2, dk=16, dv=48, chunk_size=24, segments=True,
                          config=ca.KernelConfig(block_q=32, block_k=16, bwd_block_q=16, bwd_block_k=16, block_d=32,
                                                 fwd_impl="flash")),
}


@pytest.mark.parametrize("case", list(_TRITON_CASES))
def test_triton_kernels_match_references(rng, case):
  _check_against_references(rng, "triton", **_TRITON_CASES[case])


_MOSAIC_CASES = {
    # lane-aligned head dims: q/k/v viewed as [B, L, H*d] without a transpose; segments
    "packed_layout_segments": dict(batch=1, length=32, heads=2, dk=128, dv=128, chunk_size=16, segments=True,
                                   config=ca.KernelConfig(block_q=16, block_k=16)),
    # small head dims (transposed layout), chunk of 24 padded to 32, dk != dv
    "padded_chunks": dict(batch=2, length=48, heads=2, dk=16, dv=32, chunk_size=24, scale=0.7,
                          config=ca.KernelConfig(block_q=16, block_k=16)),
}


@pytest.mark.parametrize("case", list(_MOSAIC_CASES))
def test_mosaic_kernels_match_references(rng, case):
  _check_against_references(rng, "mosaic", **_MOSAIC_CASES[case])


# ----------------------------------------------------------------------------------------------
# Cached (decode / prefill) attention


@functools.lru_cache(maxsize=None)
def _compiled_cached(platform, config, avals):
  fn = functools.partial(ca.cached_chunk_attention, platform=platform, config=config, interpret=True)
  return jax.jit(fn).lower(*avals).compile(compiler_options=_FAST_COMPILE)


@pytest.mark.parametrize("platform", ["triton", "mosaic"])
@pytest.mark.parametrize("steps", [1, 5])
def test_cached_attention_matches_references(rng, platform, steps):
  batch, cache_len, heads, dk, dv = 2, 40, 2, 16, 32
  q = jnp.asarray(rng.normal(size=(batch, steps, heads, dk)), jnp.float32)
  # Stale entries past the new keys hold random values: they must not leak into the output.
  k_buf = jnp.asarray(rng.normal(size=(batch, cache_len, heads, dk)), jnp.float32)
  v_buf = jnp.asarray(rng.normal(size=(batch, cache_len, heads, dv)), jnp.float32)
  config = ca.KernelConfig(block_q=16, block_k=16)
  run = _compiled_cached(platform, config, _avals(q, k_buf, v_buf, jnp.int32(0)))
  for start in sorted({0, 7, cache_len - steps}):  # start is traced: one compilation for all
    got = run(q, k_buf, v_buf, jnp.int32(start))
    ref = ca.cached_chunk_attention_reference(q, k_buf, v_buf, start)
    positions = start + np.arange(steps)
    mask = np.broadcast_to(np.arange(cache_len)[None, :] <= positions[:, None], (batch, steps, cache_len))
    exact = np.einsum("bhqk,bkhd->bqhd", _softmax_probs(np.asarray(q, np.float64), np.asarray(k_buf, np.float64),
                                                         mask, 1.0), np.asarray(v_buf, np.float64))
    assert got.shape == (batch, steps, heads, dv)
    assert _rel_err(got, ref) < 1e-5, start
    assert _rel_err(got, exact) < 1e-5, start


def test_cached_attention_equals_rows_of_chunk_attention(rng):
  """Prefill of a chunk's first T steps gives the rows of full chunked attention over them."""
  batch, steps, cache_len, heads, dk, dv = 2, 5, 40, 2, 16, 32  # shapes of the test above: no recompile
  k = jnp.asarray(rng.normal(size=(batch, steps, heads, dk)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(batch, steps, heads, dv)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(batch, steps, heads, dk)), jnp.float32)
  stale = lambda d: jnp.asarray(rng.normal(size=(batch, cache_len - steps, heads, d)), jnp.float32)
  k_buf = jnp.concatenate([k, stale(dk)], axis=1)
  v_buf = jnp.concatenate([v, stale(dv)], axis=1)
  config = ca.KernelConfig(block_q=16, block_k=16)
  got = _compiled_cached("triton", config, _avals(q, k_buf, v_buf, jnp.int32(0)))(q, k_buf, v_buf, jnp.int32(0))
  full = ca.chunk_attention_reference(q, k, v, chunk_size=cache_len)
  assert _rel_err(got, full) < 1e-5


# ----------------------------------------------------------------------------------------------
# Native lowering (no GPU/TPU here): jax.export lowers for another platform without compiling, which
# runs the Pallas -> Triton IR and Pallas -> Mosaic lowerings with all their checks (power-of-2
# shapes, supported primitives, TPU block tiling). It cannot catch compiler resource limits.

_NATIVE_CHECKS = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
                  jax.export.DisabledSafetyCheck.custom_call("tpu_custom_call")]


def _lower_natively(fn, target, *avals):
  exported = jax.export.export(jax.jit(fn), platforms=[target], disabled_checks=_NATIVE_CHECKS)(*avals)
  return exported.mlir_module()


@pytest.mark.parametrize("platform,heads,dk,dv,fwd_impl", [
    ("triton", 2, 256, 2048, "blocks"),  # the SPEC preset head sizes
    ("triton", 2, 256, 2048, "flash"),
    ("triton", 1, 48, 80, "blocks"),  # head dims that are not powers of 2 (masked feature tails)
    ("mosaic", 2, 256, 2048, "blocks"),  # lane-aligned heads: packed [B, L, H*d] layout
    ("mosaic", 2, 64, 96, "blocks"),  # small heads: transposed layout
])
@pytest.mark.parametrize("segments", [False, True])
def test_kernels_lower_natively(host_without_hopper, platform, heads, dk, dv, fwd_impl, segments):
  batch, length, chunk = 1, 512, 256
  target = {"triton": "cuda", "mosaic": "tpu"}[platform]
  config = ca.KernelConfig(fwd_impl=fwd_impl)
  q = jax.ShapeDtypeStruct((batch, length, heads, dk), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((batch, length, heads, dv), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((batch, length), jnp.int32) if segments else None
  attention = functools.partial(ca.chunk_attention, platform=platform, config=config, interpret=False)
  module = _lower_natively(_vjp_fn(attention, chunk, 1.0), target, q, q, v, seg, v)
  kernel_call = {"triton": "__gpu$xla.gpu.triton", "mosaic": "tpu_custom_call"}[platform]
  # Every kernel of the forward and backward passes, not an XLA fallback.
  expected = {"mosaic": 3, "triton": 6 if fwd_impl == "blocks" else 5}[platform]
  assert module.count(kernel_call) == expected

  cached = functools.partial(ca.cached_chunk_attention, platform=platform, config=config, interpret=False)
  for steps in (1, 16):
    module = _lower_natively(cached, target, jax.ShapeDtypeStruct((batch, steps, heads, dk), jnp.bfloat16),
                             jax.ShapeDtypeStruct((batch, chunk, heads, dk), jnp.bfloat16),
                             jax.ShapeDtypeStruct((batch, chunk, heads, dv), jnp.bfloat16),
                             jax.ShapeDtypeStruct((), jnp.int32))
    assert kernel_call in module


# ----------------------------------------------------------------------------------------------
# Model entry point and errors


def test_model_dispatch_calls_the_kernel(rng):
  """megalodon_jax.ops.attention.chunked_attention(impl='pallas') runs this kernel (default tiles)."""
  q, k, v, _, segment_ids = _random_inputs(rng, 1, 32, 1, 16, 32, jnp.float32, with_segments=True)
  fn = jax.jit(functools.partial(xla_attention.chunked_attention, chunk_size=16, impl="pallas"))
  got = fn.lower(q, k, v, segment_ids=segment_ids).compile(compiler_options=_FAST_COMPILE)(
      q, k, v, segment_ids=segment_ids)
  want = xla_attention.chunked_attention_xla(q, k, v, chunk_size=16, segment_ids=segment_ids)
  assert _rel_err(got, want) < 1e-5


def test_length_not_multiple_of_chunk_raises():
  q = jnp.zeros((1, 48, 1, 16))
  with pytest.raises(ConfigError, match="multiple"):
    ca.chunk_attention(q, q, q, chunk_size=32)


@pytest.mark.parametrize("bad", ["k_shape", "v_rank", "segments", "block"])
def test_bad_inputs_raise(bad):
  q = jnp.zeros((1, 32, 2, 16))
  k, v, kwargs = q, jnp.zeros((1, 32, 2, 8)), {}
  if bad == "k_shape":
    k = jnp.zeros((1, 32, 2, 8))
  elif bad == "v_rank":
    v = jnp.zeros((1, 32, 16))
  elif bad == "segments":
    kwargs = dict(segment_ids=jnp.zeros((1, 31), jnp.int32))
  else:
    kwargs = dict(block_q=24, platform="triton")
  with pytest.raises(ValueError):
    ca.chunk_attention(q, k, v, chunk_size=32, **kwargs)


@pytest.mark.parametrize("far_score", [60.0, 200.0])
def test_bounded_scores_with_far_off_diagonal_maxima(far_score):
  """fwd_scores='bounded' when the diagonal maximum lies far (base 2) below the row maximum.

  Queries 16..31 and key 0 point along e_1 with |q| |k_0| log2(e) = far_score; the other keys are
  tiny, so the diagonal blocks' maximum is ~0 and the bound equals the true maximum. At 60 (within
  the margin) the first pass skips key block 0 and the tiles hold P~ up to 2^60; at 200 it must
  not (exp2(200) overflows float32). Both must give the float64 softmax.
  """
  rng = np.random.default_rng(7)
  length, dk, dv = 32, 16, 16
  q = rng.normal(size=(1, length, 1, dk)) * 0.05
  k = rng.normal(size=(1, length, 1, dk)) * 0.05
  q[0, 16:, 0, :] = 0.0
  q[0, 16:, 0, 0] = 6.0
  k[0, 0, 0, :] = 0.0
  k[0, 0, 0, 0] = far_score / ca._LOG2E / 6.0
  v, d_out = rng.normal(size=(1, length, 1, dv)), rng.normal(size=(1, length, 1, dv))
  q, k, v, d_out = (jnp.asarray(x, jnp.float32) for x in (q, k, v, d_out))
  config = ca.KernelConfig(block_q=16, block_k=16, fwd_scores="bounded")
  got = _compiled_kernel_vjp("triton", config, length, 1.0, _avals(q, k, v, None, d_out))(q, k, v, None, d_out)
  exact = dense_attention_f64(q, k, v, d_out, _dense_mask(length, length, None, 1), 1.0)
  for name, g, e in zip(("out", "dq", "dk", "dv"), got, exact):
    assert _rel_err(g, e) < 1e-5, (name, _rel_err(g, e))


@pytest.mark.parametrize("config,match", [
    (ca.KernelConfig(block_q=16, mm_block_q=32), "must divide"),
    (ca.KernelConfig(block_k=32, mm_block_k=16, fwd_scores="online"), "online"),
    (ca.KernelConfig(bwd_block_k=16, bwd_mm_block_k=32), "must divide"),
    (ca.KernelConfig(fwd_scores="twice"), "fwd_scores"),
    (ca.KernelConfig(bwd_order="ds_first"), "bwd_order"),
    (ca.KernelConfig(delta_impl="triton"), "delta_impl"),
])
def test_bad_tilings_raise(config, match):
  q = jnp.zeros((1, 64, 1, 16))
  with pytest.raises(ValueError, match=match):
    ca.chunk_attention(q, q, q, chunk_size=64, config=config, platform="triton")


def test_cached_bad_start_raises():
  q = jnp.zeros((1, 4, 1, 16))
  buf = jnp.zeros((1, 8, 1, 16))
  with pytest.raises(ValueError, match="overruns"):
    ca.cached_chunk_attention(q, buf, buf, 6)


def test_gpu_check_sweep_tilings_are_valid():
  """Every tiling the GPU check script sweeps builds a plan at the preset shape (no GPU needed),
  and its writer/reader tiles nest, so a sweep never loses a GPU run to a bad entry."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "gpu_checks" / "check_chunk_attention.py"
  spec = importlib.util.spec_from_file_location("check_chunk_attention", path)
  check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(check)
  args = check.parse_args([])
  for name, overrides in check.SWEEP.items():
    config = check.config_for(args, overrides)
    plan = ca._triton_plan(config, False, 1.0, args.batch, args.heads, args.chunks, args.chunk_size,
                           args.chunk_size, args.dk, args.dv, jnp.bfloat16)
    for writer, reader in ((plan.geom, plan.mm_geom), (plan.bwd_geom, plan.bwd_mm_geom)):
      assert writer.bq % reader.bq == 0 and writer.bk % reader.bk == 0, name
      assert reader.row_pitch == writer.cpq, name
