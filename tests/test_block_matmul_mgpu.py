"""kernels_pallas/block_matmul_mgpu.py on the CPU: its reference, the kernel in Mosaic GPU's
interpreter, its lowering for CUDA, its shape checks, and chunk_attention's dispatch to it.

  * the dense reference against the real thing: the probability tiles and row scales written by the
    Triton 'twopass' scores kernel (interpret mode), multiplied by the reference, must give
    chunked attention (XLA path) and agree with the Triton block matmul that normally consumes them;
  * the kernel itself under Mosaic GPU's CPU interpreter (tests/mgpu_interpreter.py: warpgroups as
    threads, barriers, TMA and wgmma simulated, races detected) against the reference;
  * the kernel lowers for CUDA (Pallas -> Mosaic GPU lowering with its layout, wgmma-shape and
    transform checks) at the benchmark shape into one Mosaic GPU custom call;
  * unsupported shapes raise ValueError;
  * the persistent schedule (persistent_ctas): its item order covers every work item once in the
    grid's order, the kernel matches the reference in the interpreter (programs wrapping around the
    order, idle programs), lowers at the benchmark shape with the grid schedule's shared memory, and
    MEGALODON_ATTENTION_MATMUL_PERSISTENT reaches it from chunk_attention.
gpu-marked tests compare chunk_attention with these matmuls against the XLA path, and the persistent
schedule against the reference and the grid schedule, on a Hopper GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import block_matmul_mgpu as bm
from kernels_pallas import chunk_attention as ca
from tests.mgpu_lowering import lowered_attention_module as _lowered_attention_module
from megalodon_jax.ops import attention as xla_attention

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _tiles_plan(batch, heads, n_chunks, chunk, dk, dv, block, dtype):
  """A Triton plan with square `block` tiles for the scores kernel and the block matmul (interpreted)."""
  config = ca.KernelConfig(block_q=block, block_k=block, fwd_scores="twopass")
  plan = ca._triton_plan(config, True, 1.0, batch, heads, n_chunks, chunk, chunk, dk, dv, dtype)
  assert (plan.mm_geom.bq, plan.mm_geom.bk) == (block, block)
  return plan


def _poison_unvisited(p_buf, chunk: int, block: int):
  """NaN in every tile above a chunk's block diagonal: neither consumer may read them."""
  tile = np.arange(chunk) // block
  above = np.tile(tile[None, :] > tile[:, None], (p_buf.shape[2] // chunk, 1))  # [n*C, C]
  return jnp.where(above, jnp.nan, p_buf)


def test_reference_is_attention_on_real_tiles(rng):
  batch, heads, n_chunks, chunk, dk, dv, block = 1, 2, 2, 32, 16, 48, 16
  length = n_chunks * chunk
  q, k = (jnp.asarray(rng.standard_normal((batch, length, heads, dk)), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((batch, length, heads, dv)), jnp.float32)
  plan = _tiles_plan(batch, heads, n_chunks, chunk, dk, dv, block, jnp.float32)

  def both(q, k, v):
    p_buf, rscale, _ = ca._tr_scores(plan, q, k, v.dtype, None)
    p_buf = _poison_unvisited(p_buf, chunk, block)
    ref = bm.block_causal_matmul_reference(p_buf, v, rscale, chunk, block)
    mm_plan = dataclasses.replace(plan, geom=plan.mm_geom)
    triton = ca._tr_block_matmul(mm_plan, p_buf, v, None, None, jnp.float32, rscale)
    return ref, triton

  ref, triton = jax.jit(both).lower(q, k, v).compile(compiler_options=_FAST_COMPILE)(q, k, v)
  want = xla_attention.chunked_attention_xla(q, k, v, chunk_size=chunk)
  assert ref.shape == want.shape == (batch, length, heads, dv)
  assert np.all(np.isfinite(np.asarray(ref)))
  assert _rel_err(ref, want) < 1e-5
  assert _rel_err(ref, triton) < 1e-5


def test_reference_is_block_causal_without_scale(rng):
  """Random tiles, no row scale: the reference equals a numpy loop over visited tiles only."""
  batch, heads, n_chunks, chunk, dv, block = 2, 1, 2, 8, 4, 4
  length = n_chunks * chunk
  m_buf = rng.standard_normal((batch, heads, length, chunk)).astype(np.float32)
  x = rng.standard_normal((batch, length, heads, dv)).astype(np.float32)
  want = np.zeros((batch, length, heads, dv))
  for b, h, n, i in np.ndindex(batch, heads, n_chunks, chunk // block):
    rows = slice(n * chunk + i * block, n * chunk + (i + 1) * block)
    for j in range(i + 1):
      tile = m_buf[b, h, rows, j * block:(j + 1) * block].astype(np.float64)
      want[b, rows, h] += tile @ x[b, n * chunk + j * block:n * chunk + (j + 1) * block, h]
  got = bm.block_causal_matmul_reference(_poison_unvisited(jnp.asarray(m_buf), chunk, block), jnp.asarray(x),
                                         None, chunk, block)
  assert _rel_err(got, want) < 1e-6


def test_transposed_reference_is_the_triton_tmatmul(rng):
  """transpose_m: the reference equals the backward's Triton dV = P^T dO on random visited tiles."""
  batch, heads, n_chunks, chunk, dv, block = 1, 2, 2, 32, 48, 16
  length = n_chunks * chunk
  m_buf = _poison_unvisited(jnp.asarray(rng.standard_normal((batch, heads, length, chunk)), jnp.float32),
                            chunk, block)
  x = jnp.asarray(rng.standard_normal((batch, length, heads, dv)), jnp.float32)
  config = ca.KernelConfig(block_q=block, block_k=block, bwd_block_q=block, bwd_block_k=block)
  plan = ca._triton_plan(config, True, 1.0, batch, heads, n_chunks, chunk, chunk, 16, dv, jnp.float32)
  mm_plan = dataclasses.replace(plan, geom=plan.bwd_mm_geom)
  assert (mm_plan.geom.bq, mm_plan.geom.bk) == (block, block)  # it reads only the visited tiles

  def both(m, x):
    return (bm.block_causal_matmul_reference(m, x, None, chunk, block, transpose_m=True),
            ca._tr_block_tmatmul(mm_plan, m, x, jnp.float32))

  ref, triton = jax.jit(both).lower(m_buf, x).compile(compiler_options=_FAST_COMPILE)(m_buf, x)
  assert np.all(np.isfinite(np.asarray(ref)))
  assert _rel_err(ref, triton) < 1e-5
  # and a float64 loop: key block j of a chunk sums M[i, j]^T x[i] over query blocks i >= j
  m64, x64 = np.asarray(m_buf, np.float64), np.asarray(x, np.float64)
  want = np.zeros((batch, length, heads, dv))
  for b, h, n, j in np.ndindex(batch, heads, n_chunks, chunk // block):
    cols = slice(j * block, (j + 1) * block)
    for i in range(j, chunk // block):
      rows = slice(n * chunk + i * block, n * chunk + (i + 1) * block)
      want[b, n * chunk + j * block:n * chunk + (j + 1) * block, h] += m64[b, h, rows, cols].T @ x64[b, rows, h]
  assert _rel_err(ref, want) < 1e-6


@pytest.mark.parametrize("block,block_d,with_scale,extra", [
    (128, 256, True, {}), (64, 256, True, {}), (128, 128, False, {}),
    (128, 256, True, dict(stages=4, epi_cols=64, release="immediate")),
    (128, 256, False, dict(stages=4, epi_cols=64, release="immediate", transpose_m=True)),
    (128, 256, False, dict(transpose_m=True)),
])
def test_kernel_lowers_for_cuda(block, block_d, with_scale, extra):
  """The benchmark shape (B=1, 16 chunks of 2048, 4 heads, dv 2048, bf16) lowers to one Mosaic GPU call."""
  batch, n_chunks, chunk, heads, dv = 1, 16, 2048, 4, 2048
  length = n_chunks * chunk
  m_buf = jax.ShapeDtypeStruct((batch, heads, length, chunk), jnp.bfloat16)
  x = jax.ShapeDtypeStruct((batch, length, heads, dv), jnp.bfloat16)
  rscale = jax.ShapeDtypeStruct((batch, heads, length), jnp.float32) if with_scale else None
  fn = lambda m, x, r: bm.block_causal_matmul_mgpu(m, x, r, chunk=chunk, block=block, block_d=block_d,  # noqa: E731
                                                   **extra)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(m_buf, x, rscale)
  module = exported.mlir_module()
  assert module.count(f"custom_call @{bm.MOSAIC_GPU_CALL}(") == 1
  assert exported.out_avals[0].shape == (batch, length, heads, dv)
  assert exported.out_avals[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("change,message", [
    (dict(block=32), "block 32 unsupported"),
    (dict(block=256), "block 256 unsupported"),
    (dict(block_d=192), "block_d 192 unsupported"),
    (dict(chunk=192), "not a multiple of block"),
    (dict(dv=384), "not a multiple of block_d"),
    (dict(dtype=jnp.float32), "16-bit float"),
    (dict(rows=2 * 256 + 64), "m_buf"),
])
def test_unsupported_shapes_raise(change, message):
  chunk, block, block_d, dv = change.get("chunk", 256), change.get("block", 128), change.get("block_d", 256), change.get("dv", 512)
  length = 2 * chunk
  dtype = change.get("dtype", jnp.bfloat16)
  m_buf = jax.ShapeDtypeStruct((1, 2, change.get("rows", length), chunk), dtype)
  x = jax.ShapeDtypeStruct((1, length, 2, dv), dtype)
  rscale = jax.ShapeDtypeStruct((1, 2, length), jnp.float32)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda m, x, r: bm.block_causal_matmul_mgpu(m, x, r, chunk=chunk, block=block, block_d=block_d),
                   m_buf, x, rscale)


@pytest.mark.parametrize("chunk,length,segments,dtype,expected", [
    (256, 512, False, jnp.bfloat16, 4),  # P V, dV, dK, dQ
    (256, 512, True, jnp.bfloat16, 4),  # segments only change the scores and tiles kernels
    (192, 576, False, jnp.bfloat16, 0),  # chunk not a multiple of 128: Triton throughout
    (256, 512, False, jnp.float32, 0),  # float32 inputs: Triton throughout
])
def test_chunk_attention_sends_block_matmuls_to_mosaic_gpu(host_without_hopper, chunk, length, segments, dtype, expected):
  module = _lowered_attention_module(ca.KernelConfig(matmul_impl="mgpu"), chunk, length, segments, dtype)
  assert module.count(f"custom_call @{bm.MOSAIC_GPU_CALL}(") == expected
  default = _lowered_attention_module(ca.KernelConfig(), chunk, length, segments, dtype)
  assert default.count(f"custom_call @{bm.MOSAIC_GPU_CALL}(") == 0


def test_chunk_attention_runs_dv_and_dk_in_one_launch(host_without_hopper, monkeypatch):
  """With dk and dv both multiples of 256 (one d-tile width), the backward's dV and dK are one Mosaic GPU
  launch (P V, dV + dK, dQ: 3 calls); MEGALODON_ATTENTION_MATMUL_PAIR=0 splits them again (4), as does a
  dk of another width (the module's default dk 128 beside dv 256: test above)."""
  config = ca.KernelConfig(matmul_impl="mgpu")
  monkeypatch.delenv("MEGALODON_ATTENTION_MATMUL_PAIR", raising=False)
  assert _lowered_attention_module(config, dk=256, dv=512).count(f"custom_call @{bm.MOSAIC_GPU_CALL}(") == 3
  monkeypatch.setenv("MEGALODON_ATTENTION_MATMUL_PAIR", "0")
  assert _lowered_attention_module(config, dk=256, dv=512).count(f"custom_call @{bm.MOSAIC_GPU_CALL}(") == 4


def test_auto_matmul_is_triton_off_hopper_and_follows_the_environment(host_without_hopper, monkeypatch):
  monkeypatch.delenv("MEGALODON_ATTENTION_MATMUL", raising=False)
  assert ca._resolve_kernel_impl("matmul", "auto") == "triton"  # the CPU is no Hopper GPU
  assert ca._resolve_kernel_impl("matmul", "mgpu") == "mgpu"
  monkeypatch.setenv("MEGALODON_ATTENTION_MATMUL", "mgpu")
  assert ca._resolve_kernel_impl("matmul", "auto") == "mgpu"
  assert ca._resolve_kernel_impl("matmul", "triton") == "triton"  # an explicit choice wins
  module = _lowered_attention_module(ca.KernelConfig(), 256, 512, False, jnp.bfloat16)
  assert module.count(f"custom_call @{bm.MOSAIC_GPU_CALL}(") == 4
  monkeypatch.setenv("MEGALODON_ATTENTION_MATMUL", "cutlass")
  with pytest.raises(ValueError, match="MEGALODON_ATTENTION_MATMUL='cutlass'"):
    ca._resolve_kernel_impl("matmul", "auto")


@pytest.mark.gpu
@pytest.mark.parametrize("segments", [False, True])
def test_mosaic_gpu_matmuls_match_the_reference_on_hopper(rng, segments):
  """Compiled on the GPU: chunk_attention's values and gradients with the Mosaic GPU block matmuls
  against the float32 XLA path, as close as with the Triton ones (run with -m gpu on a Hopper GPU)."""
  if not ca._is_hopper():
    pytest.fail("needs a compute-capability 9.0 GPU (run with MEGALODON_TEST_PLATFORM=gpu on an H100/H200)")
  batch, length, heads, dk, dv, chunk = 1, 1024, 2, 128, 256, 512
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)  # noqa: E731
  q, k = normal(batch, length, heads, dk) * dk ** -0.25, normal(batch, length, heads, dk) * dk ** -0.25
  v, d_out = normal(batch, length, heads, dv), normal(batch, length, heads, dv)
  seg = jnp.asarray(np.sort(rng.integers(0, 4, (batch, length))), jnp.int32) if segments else None

  def run(attend, *args):
    def fwd_bwd(q, k, v, d_out):
      out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, chunk_size=chunk, segment_ids=seg), q, k, v)
      return out, *vjp(d_out)
    fn = jax.jit(fwd_bwd)
    return fn.lower(*args).as_text(), fn(*args)

  up = lambda x: x.astype(jnp.float32)  # noqa: E731
  _, exact = run(xla_attention.chunked_attention_xla, up(q), up(k), up(v), up(d_out))
  errors = {}
  for impl in ("mgpu", "triton"):
    # the other two kernels pinned to Triton: the block matmuls are the only difference
    config = ca.KernelConfig(matmul_impl=impl, tiles_impl="triton", scores_impl="triton")
    attend = functools.partial(ca.chunk_attention, config=config)
    text, got = run(attend, q, k, v, d_out)
    assert (bm.MOSAIC_GPU_CALL in text) == (impl == "mgpu"), impl
    errors[impl] = [_rel_err(g, e) for g, e in zip(got, exact)]
  for name, mgpu, triton in zip(("out", "dq", "dk", "dv"), errors["mgpu"], errors["triton"]):
    assert mgpu < 2e-2, (name, mgpu)
    assert mgpu <= 1.25 * triton + 1e-3, (name, mgpu, triton)


@pytest.fixture
def mgpu_interpreter(monkeypatch):
  from tests.mgpu_interpreter import mosaic_gpu_interpreter
  yield from mosaic_gpu_interpreter(monkeypatch)


@pytest.mark.parametrize("transpose_m,release,stages,epi_cols", [
    (False, "immediate", 4, 64),  # the chunk_attention default (with the row scale)
    (False, "lagged", 2, None),  # a ring of two slots, one wgmma kept in flight
    (True, "immediate", 3, 64),  # dV = P^T dO
])
def test_kernel_matches_the_reference_in_the_interpreter(rng, mgpu_interpreter, transpose_m, release, stages,
                                                         epi_cols):
  """The kernel itself, run by Mosaic GPU's CPU interpreter (warpgroups as threads, barriers and
  TMA simulated, race detector on): 2 chunks of 384 (three query blocks: pairs (0, 2) and the
  middle block alone), 2 heads, two 256-wide feature tiles; NaN in every unvisited tile."""
  params, gpu_callbacks = mgpu_interpreter
  batch, heads, n_chunks, chunk, dv, block = 1, 2, 2, 384, 512, 128
  length = n_chunks * chunk
  m_buf = _poison_unvisited(jnp.asarray(rng.random((batch, heads, length, chunk)), jnp.bfloat16), chunk, block)
  x = jnp.asarray(rng.standard_normal((batch, length, heads, dv)), jnp.bfloat16)
  rscale = None if transpose_m else jnp.asarray(rng.random((batch, heads, length)) + 0.5, jnp.float32)
  got = bm.block_causal_matmul_mgpu(m_buf, x, rscale, chunk=chunk, block=block, block_d=256, stages=stages,
                                    release=release, epi_cols=epi_cols, transpose_m=transpose_m,
                                    interpret=params)
  assert not gpu_callbacks.get_races().races_found
  want = bm.block_causal_matmul_reference(m_buf, x, rscale, chunk, block, transpose_m=transpose_m)
  assert got.shape == want.shape and got.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(got, np.float32)))
  assert _rel_err(got, want) < 1e-2  # the output is rounded to bf16


@pytest.mark.parametrize("batch,heads,n_chunks,nbq,n_dt,ctas", [
    (1, 2, 2, 3, 2, 3), (2, 1, 3, 4, 1, 7), (1, 1, 1, 1, 1, 3), (1, 2, 2, 3, 1, 8),
    (1, 4, 16, 16, 8, 132), (1, 4, 16, 16, 8, 264)])
def test_persistent_order_covers_each_item_once(batch, heads, n_chunks, nbq, n_dt, ctas):
  """`_persistent_item` over all programs' items: every (chunk-head, pair, d tile) exactly once, in the
  grid schedule's order (bh, then chunk, then its tile index, d tile major and pair minor); the
  programs' item counts differ by at most one (ctas beyond the item count: idle programs)."""
  block, block_d = 128, 128
  n_pairs = (nbq + 1) // 2
  total, counts = bm.persistent_schedule(batch, heads, n_chunks, nbq * block, block, n_dt * block_d, block_d,
                                         ctas)
  assert total == batch * heads * n_chunks * n_pairs * n_dt and sum(counts) == total
  assert max(counts) - min(counts) <= 1 and min(counts) >= 0
  g = np.concatenate([c + np.arange(count) * ctas for c, count in enumerate(counts)])
  bh, n, pair, dt = (np.asarray(x) for x in bm._persistent_item(jnp.asarray(g, jnp.int32), n_chunks, n_pairs,
                                                                  n_dt))
  assert ((0 <= bh) & (bh < batch * heads) & (0 <= n) & (n < n_chunks) & (0 <= pair) & (pair < n_pairs)
          & (0 <= dt) & (dt < n_dt)).all()
  seen = np.zeros((batch * heads, n_chunks, n_pairs, n_dt), int)
  np.add.at(seen, (bh, n, pair, dt), 1)
  np.testing.assert_array_equal(seen, 1)
  order = [(b, c, tile % n_pairs, tile // n_pairs)
           for b in range(batch * heads) for c in range(n_chunks) for tile in range(n_pairs * n_dt)]
  by_g = sorted(zip(g.tolist(), zip(bh.tolist(), n.tolist(), pair.tolist(), dt.tolist())))
  assert [item for _, item in by_g] == order


@pytest.mark.parametrize("transpose_m,with_scale,block_d,stages,release,epi_cols,ctas", [
    (False, True, 256, 4, "immediate", 64, 1),  # the op's configuration; one program does all 8 items
    (False, True, 128, 2, "lagged", None, 3),  # 16 items over 3 programs (6, 5, 5); a two-slot ring
    (True, False, 256, 3, "immediate", 64, 3),  # dV = P^T dO: 8 items over 3 (3, 3, 2)
    (False, False, 256, 2, "immediate", None, 11),  # 8 items over 11 programs: three idle
])
def test_persistent_kernel_matches_the_reference_in_the_interpreter(rng, mgpu_interpreter, transpose_m, with_scale,
                                                                    block_d, stages, release, epi_cols, ctas):
  """persistent_ctas under Mosaic GPU's CPU interpreter (race detector on): 2 heads x 2 chunks of 384
  (three query blocks: pair (0, 2), then the middle block alone, so the rs slots' parity flips
  mid-program), dv 256; programs wrap around the item order, crossing chunks and heads mid-program."""
  params, gpu_callbacks = mgpu_interpreter
  batch, heads, n_chunks, chunk, dv, block = 1, 2, 2, 384, 256, 128
  length = n_chunks * chunk
  m_buf = _poison_unvisited(jnp.asarray(rng.random((batch, heads, length, chunk)), jnp.bfloat16), chunk, block)
  x = jnp.asarray(rng.standard_normal((batch, length, heads, dv)), jnp.bfloat16)
  rscale = jnp.asarray(rng.random((batch, heads, length)) + 0.5, jnp.float32) if with_scale else None
  got = bm.block_causal_matmul_mgpu(m_buf, x, rscale, chunk=chunk, block=block, block_d=block_d, stages=stages,
                                    release=release, epi_cols=epi_cols, transpose_m=transpose_m,
                                    persistent_ctas=ctas, interpret=params)
  assert not gpu_callbacks.get_races().races_found
  want = bm.block_causal_matmul_reference(m_buf, x, rscale, chunk, block, transpose_m=transpose_m)
  assert got.shape == want.shape and got.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(got, np.float32)))
  assert _rel_err(got, want) < 1e-2  # the output is rounded to bf16


def _export_bench(persistent_ctas, transpose_m: bool, stages: int = 4, epi_cols: int | None = 64):
  """block_causal_matmul_mgpu at the benchmark shape (B=1, 16 chunks of 2048, 4 heads, dv 2048, bf16),
  exported for CUDA; the row scale with the forward product only."""
  batch, n_chunks, chunk, heads, dv = 1, 16, 2048, 4, 2048
  length = n_chunks * chunk
  m_buf = jax.ShapeDtypeStruct((batch, heads, length, chunk), jnp.bfloat16)
  x = jax.ShapeDtypeStruct((batch, length, heads, dv), jnp.bfloat16)
  rscale = None if transpose_m else jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)
  fn = lambda m, x, r: bm.block_causal_matmul_mgpu(m, x, r, chunk=chunk, block=128, block_d=256,  # noqa: E731
                                                   stages=stages, epi_cols=epi_cols, release="immediate",
                                                   transpose_m=transpose_m, persistent_ctas=persistent_ctas)
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(m_buf, x, rscale)


def _smem_bytes(monkeypatch, **kwargs) -> int:
  """The kernel's shared-memory total, as Mosaic GPU's lowering counts it (it reports the count when
  over its limit: the limit is set to one byte here)."""
  from jax.experimental.mosaic.gpu import core as mgpu_core
  with monkeypatch.context() as patch, pytest.raises(ValueError, match="exceeds available shared memory") as err:
    patch.setattr(mgpu_core, "_SMEM_SIZE_BOUND", 1)
    _export_bench(**kwargs)
  return int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))


@pytest.mark.parametrize("ctas,transpose_m,stages,epi_cols", [
    (132, False, 4, 64), (132, True, 4, 64), (264, False, 3, None), (264, True, 3, None)])
def test_persistent_kernel_lowers_for_cuda(monkeypatch, ctas, transpose_m, stages, epi_cols):
  """The persistent schedule at the benchmark shape lowers to one Mosaic GPU call, with the grid
  schedule's shared memory (no buffer added: the row scales alternate the same two slots per
  warpgroup): 4 stages with 64-column stores 4 * 48 KiB ring + 2 * 16 KiB staging + 2 KiB row scales
  + barriers, under the H200's 227 KiB."""
  exported = _export_bench(ctas, transpose_m, stages, epi_cols)
  assert exported.mlir_module().count(f"custom_call @{bm.MOSAIC_GPU_CALL}(") == 1
  assert exported.out_avals[0].shape == (1, 16 * 2048, 4, 2048) and exported.out_avals[0].dtype == jnp.bfloat16
  smem = _smem_bytes(monkeypatch, persistent_ctas=ctas, transpose_m=transpose_m, stages=stages, epi_cols=epi_cols)
  assert smem == _smem_bytes(monkeypatch, persistent_ctas=None, transpose_m=transpose_m, stages=stages,
                             epi_cols=epi_cols)
  staging = 2 * 128 * (epi_cols or 128) * 2
  assert stages * 48 * 1024 + staging + 2 * 2 * 128 * 4 <= smem < stages * 48 * 1024 + staging + 2048 + 256
  assert smem <= 227 * 1024


@pytest.mark.parametrize("value,message", [
    (0, "persistent_ctas 0"), (-3, "persistent_ctas -3"), (2.0, "persistent_ctas 2.0"), (True, "persistent_ctas True"),
    ("132", "persistent_ctas '132'")])
def test_persistent_ctas_must_be_a_positive_int(value, message):
  chunk, length = 256, 512
  m_buf = jax.ShapeDtypeStruct((1, 2, length, chunk), jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, length, 2, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda m, x: bm.block_causal_matmul_mgpu(m, x, None, chunk=chunk, block=128,
                                                            persistent_ctas=value), m_buf, x)


def test_persistent_schedule_follows_the_environment(monkeypatch):
  """Every Mosaic GPU block matmul of the op runs the persistent schedule with one program per SM by
  default; MEGALODON_ATTENTION_MATMUL_PERSISTENT=<programs> sets the count (0: the grid schedule);
  anything else says what to set."""
  monkeypatch.setenv("MEGALODON_ATTENTION_MATMUL_PERSISTENT", "5")  # through the op: it lowers for CUDA
  config = ca.KernelConfig(matmul_impl="mgpu", tiles_impl="triton", scores_impl="triton")
  module = _lowered_attention_module(config, 256, 512)
  assert module.count(f"custom_call @{bm.MOSAIC_GPU_CALL}(") == 4
  monkeypatch.setenv("MEGALODON_ATTENTION_MATMUL_PERSISTENT", "0")
  assert module != _lowered_attention_module(config, 256, 512)  # other Mosaic GPU modules: the grid schedule
  calls = []
  monkeypatch.setattr(bm, "block_causal_matmul_mgpu", lambda *args, **kwargs: calls.append(kwargs))
  monkeypatch.setattr(ca, "_sm_count", lambda: 132)  # the CPU has none
  geom = ca._triton_plan(ca.KernelConfig(), False, 1.0, 1, 2, 2, 256, 256, 64, 256, jnp.bfloat16).geom
  x = jax.ShapeDtypeStruct((1, 512, 2, 256), jnp.bfloat16)
  for value, ctas in ((None, 132), ("", 132), ("0", None), ("7", 7)):
    if value is None:
      monkeypatch.delenv("MEGALODON_ATTENTION_MATMUL_PERSISTENT", raising=False)
    else:
      monkeypatch.setenv("MEGALODON_ATTENTION_MATMUL_PERSISTENT", value)
    for transpose_m in (False, True):
      ca._mgpu_block_matmul(None, x, None, geom, transpose_m=transpose_m)
      assert calls[-1]["persistent_ctas"] == ctas and calls[-1]["transpose_m"] == transpose_m, value
      assert (calls[-1]["stages"], calls[-1]["epi_cols"], calls[-1]["release"]) == (4, 64, "immediate")
  for bad in ("-1", "sm", "1.5"):
    monkeypatch.setenv("MEGALODON_ATTENTION_MATMUL_PERSISTENT", bad)
    with pytest.raises(ValueError, match=f"MEGALODON_ATTENTION_MATMUL_PERSISTENT={bad!r}: set it"):
      ca._mgpu_block_matmul(None, x, None, geom, transpose_m=False)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk,length,heads,dv,stages,transpose_m,with_scale,ctas", [
    (2048, 4096, 2, 512, 4, False, True, 132),  # the op's configuration at the benchmark's chunk: 32 items
    (2048, 4096, 2, 512, 4, True, False, 132),
    (384, 1536, 3, 1024, 3, False, True, 7),  # odd nbq, 64 items over 7 programs (10 or 9 each)
    (384, 1536, 3, 1024, 3, True, False, 7),
    (2048, 8192, 4, 2048, 4, False, True, 264),  # 1024 items over 264 programs (two waves of 132 SMs)
])
def test_persistent_kernel_matches_the_reference_on_hopper(rng, chunk, length, heads, dv, stages, transpose_m,
                                                            with_scale, ctas):
  """Compiled on the GPU: the persistent schedule against the float32 reference and the grid schedule
  (bit-identical: each output block sums the same wgmmas in the same order); run with -m gpu on a
  Hopper GPU."""
  if not ca._is_hopper():
    pytest.fail("needs a compute-capability 9.0 GPU (run with MEGALODON_TEST_PLATFORM=gpu on an H100/H200)")
  batch, block = 1, 128
  m_buf = jnp.asarray(rng.random((batch, heads, length, chunk), np.float32) / 64, jnp.bfloat16)
  m_buf = _poison_unvisited(m_buf, chunk, block)
  x = jnp.asarray(rng.standard_normal((batch, length, heads, dv), np.float32), jnp.bfloat16)
  rscale = jnp.asarray(rng.random((batch, heads, length), np.float32) + 0.5) if with_scale else None
  kwargs = dict(chunk=chunk, block=block, block_d=256, stages=stages, epi_cols=64, release="immediate",
                transpose_m=transpose_m)
  got = jax.jit(lambda m, x, r: bm.block_causal_matmul_mgpu(m, x, r, persistent_ctas=ctas, **kwargs))(m_buf, x,
                                                                                                       rscale)
  grid = jax.jit(lambda m, x, r: bm.block_causal_matmul_mgpu(m, x, r, **kwargs))(m_buf, x, rscale)
  want = jax.jit(lambda m, x, r: bm.block_causal_matmul_reference(m, x, r, chunk, block,
                                                                  transpose_m=transpose_m))(m_buf, x, rscale)
  assert got.dtype == jnp.bfloat16 and got.shape == want.shape
  assert bool(jnp.all(jnp.isfinite(got.astype(jnp.float32))))
  assert _rel_err(got, want) < 1e-2
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(grid, np.float32))


@pytest.mark.parametrize("dv,dk,ctas", [
    (256, 128, 3),  # dV's two d tiles and dK's one per chunk-head item order, 3 programs
    (128, 256, 5),  # the second product wider than the first
])
def test_two_products_in_one_launch_match_the_reference_in_the_interpreter(rng, mgpu_interpreter, dv, dk, ctas):
  """second=: dV = P^T dO and dK = dS^T Q in one persistent launch (their d tiles in one item order)
  under Mosaic GPU's CPU interpreter (race detector on), each against its float32 reference."""
  params, gpu_callbacks = mgpu_interpreter
  batch, heads, n_chunks, chunk, block = 1, 2, 2, 384, 128
  length = n_chunks * chunk
  p_buf, ds_buf = (_poison_unvisited(jnp.asarray(rng.random((batch, heads, length, chunk)) - shift, jnp.bfloat16),
                                     chunk, block) for shift in (0.0, 0.5))
  d_out = jnp.asarray(rng.standard_normal((batch, length, heads, dv)), jnp.bfloat16)
  q = jnp.asarray(rng.standard_normal((batch, length, heads, dk)), jnp.bfloat16)
  got_dv, got_dk = bm.block_causal_matmul_mgpu(p_buf, d_out, None, chunk=chunk, block=block, block_d=128, stages=3,
                                               release="immediate", epi_cols=64, transpose_m=True,
                                               persistent_ctas=ctas, second=(ds_buf, q), interpret=params)
  assert not gpu_callbacks.get_races().races_found
  for got, m_buf, x in ((got_dv, p_buf, d_out), (got_dk, ds_buf, q)):
    want = bm.block_causal_matmul_reference(m_buf, x, None, chunk, block, transpose_m=True)
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    assert _rel_err(got, want) < 1e-2


def test_two_products_in_one_launch_lower_for_cuda():
  """second= at the benchmark shape (dV with dv 2048 and dK with dk 256: 9 d tiles a chunk-head) lowers
  to one Mosaic GPU call with both outputs."""
  batch, n_chunks, chunk, heads, dv, dk = 1, 16, 2048, 4, 2048, 256
  length = n_chunks * chunk
  m_buf = jax.ShapeDtypeStruct((batch, heads, length, chunk), jnp.bfloat16)
  d_out = jax.ShapeDtypeStruct((batch, length, heads, dv), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((batch, length, heads, dk), jnp.bfloat16)
  fn = lambda p, do, ds, q: bm.block_causal_matmul_mgpu(  # noqa: E731
      p, do, None, chunk=chunk, block=128, block_d=256, stages=4, epi_cols=64, release="immediate",
      transpose_m=True, persistent_ctas=132, second=(ds, q))
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(m_buf, d_out, m_buf, q)
  assert exported.mlir_module().count(f"custom_call @{bm.MOSAIC_GPU_CALL}(") == 1
  assert [a.shape for a in exported.out_avals] == [(batch, length, heads, dv), (batch, length, heads, dk)]


@pytest.mark.parametrize("change,message", [
    (dict(transpose_m=False), "needs transpose_m=True"), (dict(persistent_ctas=None), "persistent_ctas"),
    (dict(second_x_heads=3), "must match the first")])
def test_two_products_check_their_arguments(change, message):
  batch, heads, length, chunk = 1, 2, 256, 256
  m_buf = jnp.zeros((batch, heads, length, chunk), jnp.bfloat16)
  x = jnp.zeros((batch, length, heads, 128), jnp.bfloat16)
  x2 = jnp.zeros((batch, length, change.pop("second_x_heads", heads), 128), jnp.bfloat16)
  kwargs = dict(chunk=chunk, block=128, block_d=128, transpose_m=True, persistent_ctas=4) | change
  with pytest.raises(ValueError, match=message):
    bm.block_causal_matmul_mgpu(m_buf, x, None, second=(m_buf, x2), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk,length,heads,dv,dk,ctas", [
    (2048, 8192, 4, 2048, 256, 132),  # the op's widths at a quarter of its length
    (384, 1536, 3, 512, 256, 7),  # odd nbq, few programs
])
def test_two_products_in_one_launch_match_two_launches_on_hopper(rng, chunk, length, heads, dv, dk, ctas):
  """Compiled on the GPU: dV and dK from one launch (second=) bit-identical to two launches (each output
  block sums the same wgmmas in the same order), and against the float32 reference."""
  if not ca._is_hopper():
    pytest.fail("needs a compute-capability 9.0 GPU (run with MEGALODON_TEST_PLATFORM=gpu on an H100/H200)")
  batch, block = 1, 128
  p_buf, ds_buf = (_poison_unvisited(jnp.asarray(rng.random((batch, heads, length, chunk), np.float32) / 64 - shift,
                                                 jnp.bfloat16), chunk, block) for shift in (0.0, 1 / 128))
  d_out = jnp.asarray(rng.standard_normal((batch, length, heads, dv), np.float32), jnp.bfloat16)
  q = jnp.asarray(rng.standard_normal((batch, length, heads, dk), np.float32), jnp.bfloat16)
  kwargs = dict(chunk=chunk, block=block, block_d=256, stages=4, epi_cols=64, release="immediate", transpose_m=True,
                persistent_ctas=ctas)
  got_dv, got_dk = jax.jit(lambda p, do, ds, q: bm.block_causal_matmul_mgpu(p, do, None, second=(ds, q), **kwargs))(
      p_buf, d_out, ds_buf, q)
  one = jax.jit(lambda m, x: bm.block_causal_matmul_mgpu(m, x, None, **kwargs))
  for got, m_buf, x in ((got_dv, p_buf, d_out), (got_dk, ds_buf, q)):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(one(m_buf, x), np.float32))
    want = bm.block_causal_matmul_reference(m_buf, x, None, chunk, block, transpose_m=True)
    assert _rel_err(got, want) < 1e-2
