"""kernels_pallas/bwd_tiles_mgpu.py on the CPU: its reference, its schedule, its lowering for CUDA, its checks.

What can be checked without a GPU:
  * the kernel itself under Mosaic GPU's CPU interpreter (tests/mgpu_interpreter.py: warpgroups as
    threads, barriers and TMA simulated, races detected, wgmma synchronous) against the reference;
  * the float32 reference against the Triton tiles kernel (`chunk_attention._tr_bwd_tiles`,
    interpret mode) on visited tiles, with lse / delta computed in float64 numpy, and the lse
    convention (base 2) against the Triton forward's;
  * the kernel's span schedule (pure index arithmetic, shared by producer and consumers) visits every
    tile at or below each chunk's block diagonal exactly once, with equal work per program;
  * the kernel lowers for CUDA (Pallas -> Mosaic GPU: layouts, wgmma shapes, barriers, and the
    shared-memory limit) at the benchmark shape into one Mosaic GPU custom call;
  * unsupported shapes raise ValueError.
The gpu-marked test compiles and runs it on a Hopper GPU against both.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import bwd_tiles_mgpu as bt
from kernels_pallas import chunk_attention as ca
from tests.mgpu_lowering import lowered_attention_module as _lowered_attention_module

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _stats64(q, k, v, d_out, chunk: int, scale: float):
  """lse (base 2) and delta = rowsum(O dO) in float64 numpy: [B, H, L] each, as float32."""
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  batch, length, heads, _ = q.shape
  n = length // chunk
  split = lambda x: x.reshape(batch, n, chunk, heads, x.shape[-1])  # noqa: E731
  s = np.einsum("bnqhd,bnkhd->bhnqk", split(q), split(k)) * scale * math.log2(math.e)
  causal = np.tril(np.ones((chunk, chunk), bool))
  s = np.where(causal, s, -np.inf)
  m = s.max(-1, keepdims=True)
  lse = m + np.log2(np.exp2(s - m).sum(-1, keepdims=True))
  out = np.einsum("bhnqk,bnkhd->bnqhd", np.exp2(s - lse), split(v)).reshape(v.shape)
  delta = np.sum(out * d_out, axis=-1).transpose(0, 2, 1)
  return jnp.asarray(lse[..., 0].reshape(batch, heads, length), jnp.float32), jnp.asarray(delta, jnp.float32)


def _visited_err(got, want, chunk: int, block: int) -> float:
  """max |got - want| / max |want| over the entries of visited tiles."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  mask = np.tile(np.asarray(bt.visited_tiles(chunk, block)), (got.shape[2] // chunk, 1))
  diff = np.where(mask, np.abs(got - want), 0.0)
  return float(diff.max() / max(np.abs(np.where(mask, want, 0.0)).max(), 1e-30))


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _inputs(rng, batch, length, heads, dk, dv, dtype):
  normal = lambda *shape: rng.standard_normal(shape)  # noqa: E731
  q, k = (jnp.asarray(normal(batch, length, heads, dk) * dk ** -0.25, dtype) for _ in range(2))
  v, d_out = (jnp.asarray(normal(batch, length, heads, dv), dtype) for _ in range(2))
  return q, k, v, d_out


def test_reference_matches_triton_tiles_kernel(rng):
  """Reference = the Triton tiles kernel (interpreted) on visited tiles; P rows sum to 1."""
  batch, heads, n_chunks, chunk, dk, dv, block = 1, 2, 2, 32, 16, 32, 16
  length = n_chunks * chunk
  q, k, v, d_out = _inputs(rng, batch, length, heads, dk, dv, jnp.float32)
  config = ca.KernelConfig(block_q=block, block_k=block, bwd_block_q=block, bwd_block_k=block)
  results = {}
  for scale in (1.0, 0.7):
    lse, delta = _stats64(q, k, v, d_out, chunk, scale)
    plan = ca._triton_plan(config, True, scale, batch, heads, n_chunks, chunk, chunk, dk, dv, jnp.float32)
    plan = dataclasses.replace(plan, geom=plan.bwd_geom)  # as _tr_backward calls it
    assert (plan.geom.bq, plan.geom.bk) == (block, block)

    def both(q, k, v, d_out, lse, delta, plan=plan, scale=scale):
      return (ca._tr_bwd_tiles(plan, q, k, v, None, lse, delta, d_out),
              bt.bwd_tiles_reference(q, k, v, d_out, lse, delta, chunk, scale, block=block))

    args = (q, k, v, d_out, lse, delta)
    results[scale] = jax.jit(both).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)
  for scale, ((p_tr, ds_tr), (p_ref, ds_ref)) in results.items():
    assert p_ref.shape == ds_ref.shape == p_tr.shape == (batch, heads, length, chunk)
    assert _visited_err(p_tr, p_ref, chunk, block) < 1e-5, scale
    assert _visited_err(ds_tr, ds_ref, chunk, block) < 1e-5, scale
    # lse is the base-2 log of the row sums of exp2(S): every row of P is a distribution
    np.testing.assert_allclose(np.asarray(p_ref).sum(-1), 1.0, rtol=1e-5)
    # and entries outside the visited tiles are zero in the reference
    outside = ~np.tile(np.asarray(bt.visited_tiles(chunk, block)), (n_chunks, 1))
    assert not np.any(np.asarray(p_ref)[..., outside]) and not np.any(np.asarray(ds_ref)[..., outside])


def test_stats_convention_is_the_triton_forward_lse(rng):
  """The float64 lse used above is what chunk_attention's Triton forward saves for the backward."""
  batch, heads, n_chunks, chunk, dk, dv = 1, 2, 2, 32, 16, 32
  q, k, v, _ = _inputs(rng, batch, n_chunks * chunk, heads, dk, dv, jnp.float32)
  config = ca.KernelConfig(block_q=16, block_k=16)
  plan = ca._triton_plan(config, True, 1.0, batch, heads, n_chunks, chunk, chunk, dk, dv, jnp.float32)
  fwd = jax.jit(lambda q, k, v: ca._tr_blocks_forward(plan, q, k, v, None))
  _, lse = fwd.lower(q, k, v).compile(compiler_options=_FAST_COMPILE)(q, k, v)
  want, _ = _stats64(q, k, v, v, chunk, 1.0)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nbq", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("kb", [1, 2])
def test_span_schedule_covers_each_visited_tile_once(nbq, kb):
  """Producer and consumers share `_span`: every tile (i, j <= i) once, nbq + 1 key blocks per program
  (the middle one of odd nbq: its own), no span above the diagonal or outside the chunk."""
  seen = np.zeros((nbq, nbq), int)
  for pair in range((nbq + 1) // 2):
    blk1, spans1, blk2, spans2 = (int(x) for x in bt._pair_spans(pair, nbq, kb))
    work = 0
    for t in range(spans1 + spans2):
      i, j0, count = (int(x) for x in bt._span(t, spans1, blk1, blk2, kb))
      assert 1 <= count <= kb and 0 <= j0 and j0 + count - 1 <= i < nbq
      assert i == (blk1 if t < spans1 else blk2)
      seen[i, j0:j0 + count] += 1
      work += count
    assert work == (nbq + 1 if blk1 != blk2 else blk1 + 1)
  np.testing.assert_array_equal(seen, np.tril(np.ones((nbq, nbq), int)))


def test_second_blocks_walk_down_in_step():
  """At key-block step tau every program of a chunk-head in its second query block is at key block
  nbq - tau (spans of one key block): the programs that share K_j, V_j read them together."""
  nbq = 16
  for pair in range(nbq // 2):
    blk1, spans1, blk2, spans2 = (int(x) for x in bt._pair_spans(pair, nbq, 1))
    for t in range(spans1, spans1 + spans2):
      _, j0, _ = (int(x) for x in bt._span(t, spans1, blk1, blk2, 1))
      assert j0 == nbq - t


@pytest.mark.parametrize("batch,heads,n_chunks,nbq,ctas", [
    (1, 2, 2, 3, 4), (2, 1, 3, 4, 7), (1, 1, 1, 1, 3), (1, 4, 16, 16, 132), (1, 4, 16, 16, 264)])
def test_persistent_order_covers_each_visited_tile_once(batch, heads, n_chunks, nbq, ctas):
  """`_persistent_tile` over all programs' tiles: every visited tile of every chunk-head exactly once,
  chunk-heads in grid order, within one the one-span programs' order (pair major, then its walk);
  programs' tile counts differ by at most one."""
  total, counts = bt.persistent_schedule(batch, heads, n_chunks, nbq * bt.BLOCK, ctas)
  assert total == batch * heads * n_chunks * nbq * (nbq + 1) // 2 and sum(counts) == total
  assert max(counts) - min(counts) <= 1 and min(counts) >= 0
  g = np.concatenate([c + np.arange(count) * ctas for c, count in enumerate(counts)])
  bh, n, i, j = (np.asarray(x) for x in bt._persistent_tile(jnp.asarray(g, jnp.int32), n_chunks, nbq))
  assert ((0 <= bh) & (bh < batch * heads) & (0 <= n) & (n < n_chunks) & (0 <= j) & (j <= i) & (i < nbq)).all()
  seen = np.zeros((batch * heads, n_chunks, nbq, nbq), int)
  np.add.at(seen, (bh, n, i, j), 1)
  np.testing.assert_array_equal(seen, np.broadcast_to(np.tril(np.ones((nbq, nbq), int)), seen.shape))
  # the global order itself: the grid's (bh, chunk, pair, span) order with one span per program
  order = [(b, c, *(int(x) for x in bt._span(t, spans1, blk1, blk2, 1)[:2]))
           for b in range(batch * heads) for c in range(n_chunks) for pair in range((nbq + 1) // 2)
           for blk1, spans1, blk2, spans2 in [tuple(int(x) for x in bt._pair_spans(pair, nbq, 1))]
           for t in range(spans1 + spans2)]
  by_g = sorted(zip(g.tolist(), zip(bh.tolist(), n.tolist(), i.tolist(), j.tolist())))
  assert [tile for _, tile in by_g] == order


_BENCH = dict(batch=1, length=32768, heads=4, dk=256, dv=2048, chunk=2048)


def _export(batch, length, heads, dk, dv, chunk, dtype=jnp.bfloat16, **kwargs):
  q = jax.ShapeDtypeStruct((batch, length, heads, dk), dtype)
  v = jax.ShapeDtypeStruct((batch, length, heads, dv), dtype)
  stat = jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)
  fn = lambda q, k, v, d_out, lse, delta: bt.bwd_tiles_mgpu(q, k, v, d_out, lse, delta, chunk=chunk,  # noqa: E731
                                                             **kwargs)
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(q, q, v, v, stat, stat)


@pytest.mark.parametrize("shape,kwargs", [
    (_BENCH, dict(block_k=128, stages=4)),  # 162 KiB of shared memory
    (_BENCH, dict(block_k=128, stages=6)),  # 226 KiB
    (_BENCH, dict(block_k=256, stages=3)),  # 178 KiB
    (_BENCH, dict(block_k=256, stages=4)),  # 226 KiB
    (dict(batch=2, length=768, heads=2, dk=64, dv=128, chunk=384, dtype=jnp.float16),
     dict(block_k=256, stages=2, scale=0.5)),  # odd nbq (3): a middle block paired with itself
    (dict(batch=1, length=256, heads=1, dk=128, dv=64, chunk=128), dict(block_k=128, stages=3, scale=0.25)),
    (_BENCH, dict(block_k=128, stages=4, persistent_ctas=132)),  # persistent: one program per SM
    (_BENCH, dict(block_k=128, stages=6, persistent_ctas=264)),  # 226 KiB: stat slots reuse the 2 KiB
    (dict(batch=2, length=768, heads=2, dk=64, dv=128, chunk=384, dtype=jnp.float16),
     dict(block_k=128, stages=2, scale=0.5, persistent_ctas=5)),
])
def test_kernel_lowers_for_cuda(shape, kwargs):
  exported = _export(**shape, **kwargs)
  assert exported.mlir_module().count(f"custom_call @{bt.MOSAIC_GPU_CALL}(") == 1
  dims = (shape["batch"], shape["heads"], shape["length"], shape["chunk"])
  dtype = shape.get("dtype", jnp.bfloat16)
  assert [(a.shape, a.dtype) for a in exported.out_avals] == [(dims, dtype)] * 2


def test_shared_memory_limit_is_checked_when_lowering():
  """The docstring's count: block_k 256 with 5 stages needs 274 KiB, over the H200's 227 KiB."""
  with pytest.raises(ValueError, match="exceeds available shared memory"):
    _export(**_BENCH, block_k=256, stages=5)


@pytest.mark.parametrize("change,message", [
    (dict(segment_ids=True), "segment_ids are not supported"),
    (dict(chunk=192, length=384), "not a multiple of 128"),
    (dict(length=1000), "not a multiple of chunk"),
    (dict(dk=96), "multiples of 64"),
    (dict(dv=160), "multiples of 64"),
    (dict(dtype=jnp.float32), "16-bit float"),
    (dict(v_dtype=jnp.float16), "16-bit float"),
    (dict(stat_dtype=jnp.bfloat16), "lse must be float32"),
    (dict(block_k=192), "block_k 192 unsupported"),
    (dict(stages=1), "stages 1 < 2"),
    (dict(persistent_ctas=0), "persistent_ctas 0"),
    (dict(persistent_ctas=2.0), "persistent_ctas 2.0"),
    (dict(persistent_ctas=4, block_k=256), "persistent_ctas needs block_k=128"),
    (dict(persistent_ctas=4, spans_per_program=1), "exclude each other"),
])
def test_unsupported_shapes_raise(change, message):
  batch, heads = 1, 2
  length, chunk = change.get("length", 512), change.get("chunk", 256)
  dk, dv, dtype = change.get("dk", 64), change.get("dv", 128), change.get("dtype", jnp.bfloat16)
  q = jax.ShapeDtypeStruct((batch, length, heads, dk), dtype)
  v = jax.ShapeDtypeStruct((batch, length, heads, dv), change.get("v_dtype", dtype))
  stat = jax.ShapeDtypeStruct((batch, heads, length), change.get("stat_dtype", jnp.float32))
  seg = jnp.zeros((batch, length), jnp.int32) if change.get("segment_ids") else None
  kwargs = {key: change[key] for key in ("block_k", "stages", "spans_per_program", "persistent_ctas")
            if key in change}
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda q, k, v, do, lse, delta: bt.bwd_tiles_mgpu(q, k, v, do, lse, delta, chunk=chunk,
                                                                    segment_ids=seg, **kwargs),
                   q, q, v, v, stat, stat)


@pytest.mark.parametrize("tiles_impl,matmul_impl,chunk,length,segments,dtype,expected", [
    ("mgpu", "mgpu", 256, 512, False, jnp.bfloat16, 5),  # P V, the tiles, dV, dK, dQ
    ("mgpu", "triton", 256, 512, False, jnp.bfloat16, 1),  # the tiles kernel alone
    ("mgpu", "triton", 256, 512, True, jnp.bfloat16, 0),  # segment ids: the Triton tiles kernel
    ("mgpu", "mgpu", 192, 576, False, jnp.bfloat16, 0),  # chunk not a multiple of 128: Triton throughout
    ("mgpu", "mgpu", 256, 512, False, jnp.float32, 0),  # float32 inputs: Triton throughout
    ("auto", "triton", 256, 512, False, jnp.bfloat16, 0),  # 'auto' is Triton off Hopper (the CPU here)
])
def test_chunk_attention_sends_tiles_to_mosaic_gpu(host_without_hopper, monkeypatch, tiles_impl, matmul_impl, chunk, length, segments,
                                                    dtype, expected):
  monkeypatch.delenv("MEGALODON_ATTENTION_TILES", raising=False)
  config = ca.KernelConfig(matmul_impl=matmul_impl, tiles_impl=tiles_impl)
  module = _lowered_attention_module(config, chunk, length, segments, dtype)
  assert module.count(f"custom_call @{bt.MOSAIC_GPU_CALL}(") == expected


def test_auto_tiles_is_mgpu_on_hopper_only_and_follows_the_environment(host_without_hopper, monkeypatch):
  monkeypatch.delenv("MEGALODON_ATTENTION_TILES", raising=False)
  assert ca._resolve_kernel_impl("tiles", "auto") == "triton"  # the CPU is no Hopper GPU
  monkeypatch.setattr(ca, "_is_hopper", lambda: True)
  assert ca._resolve_kernel_impl("tiles", "auto") == "mgpu"
  monkeypatch.setattr(ca, "_is_hopper", lambda: False)
  assert ca._resolve_kernel_impl("tiles", "mgpu") == "mgpu"
  monkeypatch.setenv("MEGALODON_ATTENTION_TILES", "mgpu")
  assert ca._resolve_kernel_impl("tiles", "auto") == "mgpu"
  assert ca._resolve_kernel_impl("tiles", "triton") == "triton"  # an explicit choice wins
  module = _lowered_attention_module(ca.KernelConfig(matmul_impl="triton"), 256, 512)
  assert module.count(f"custom_call @{bt.MOSAIC_GPU_CALL}(") == 1
  monkeypatch.setenv("MEGALODON_ATTENTION_TILES", "cuda")
  with pytest.raises(ValueError, match="MEGALODON_ATTENTION_TILES='cuda'"):
    ca._resolve_kernel_impl("tiles", "auto")
  with pytest.raises(ValueError, match="tiles_impl"):
    ca.chunk_attention(*(jnp.zeros((1, 128, 1, 64)),) * 3, chunk_size=128, config=ca.KernelConfig(tiles_impl="x"))


def test_chunk_attention_computes_delta_in_the_tiles_kernel_by_default(host_without_hopper, monkeypatch):
  """delta_impl 'auto' (the default): where the Mosaic GPU tiles kernel runs on its persistent schedule, 14
  of its 132 programs compute delta from the forward's output and XLA's pass goes;
  MEGALODON_ATTENTION_DELTA_CTAS sets how many; MEGALODON_ATTENTION_DELTA=xla, delta_impl='xla' or too few
  persistent programs bring XLA's pass back."""
  for name in ("MEGALODON_ATTENTION_DELTA", "MEGALODON_ATTENTION_DELTA_CTAS", "MEGALODON_ATTENTION_TILES_PERSISTENT"):
    monkeypatch.delenv(name, raising=False)
  xla_deltas, tiles_calls = [], []
  real_delta, real_tiles = ca._delta, bt.bwd_tiles_mgpu
  monkeypatch.setattr(ca, "_delta", lambda o, d: (xla_deltas.append(1), real_delta(o, d))[1])
  monkeypatch.setattr(bt, "bwd_tiles_mgpu", lambda *a, **kw: (tiles_calls.append(kw), real_tiles(*a, **kw))[1])

  def lower(config=ca.KernelConfig(matmul_impl="triton", tiles_impl="mgpu")):
    xla_deltas.clear()
    module = _lowered_attention_module(config, 256, 512)
    assert module.count(f"custom_call @{bt.MOSAIC_GPU_CALL}(") == 1
    return len(xla_deltas), tiles_calls[-1].get("out") is not None, tiles_calls[-1].get("delta_ctas")

  assert lower() == (0, True, 14)
  monkeypatch.setenv("MEGALODON_ATTENTION_DELTA_CTAS", "3")
  assert lower() == (0, True, 3)
  monkeypatch.setenv("MEGALODON_ATTENTION_TILES_PERSISTENT", "3")  # no program left for the tiles
  assert lower() == (1, False, 0)
  monkeypatch.delenv("MEGALODON_ATTENTION_TILES_PERSISTENT")
  monkeypatch.setenv("MEGALODON_ATTENTION_DELTA", "xla")
  assert lower() == (1, False, 0)
  monkeypatch.delenv("MEGALODON_ATTENTION_DELTA")
  assert lower(ca.KernelConfig(matmul_impl="triton", tiles_impl="mgpu", delta_impl="xla")) == (1, False, 0)
  monkeypatch.setenv("MEGALODON_ATTENTION_DELTA", "fused")
  with pytest.raises(ValueError, match="MEGALODON_ATTENTION_DELTA='fused'"):
    lower()


@pytest.mark.parametrize("sms,delta_ctas,takes", [(132, 14, True), (114, 12, True), (20, 2, True), (8, 1, True),
                                                   (1, 1, False)])
def test_delta_programs_scale_with_the_sm_count(host_without_hopper, monkeypatch, sms, delta_ctas, takes):
  """14 delta programs per 132 SMs, at least one, and the kernel only where programs are left for the tiles
  (a one-SM device computes delta in XLA)."""
  for name in ("MEGALODON_ATTENTION_DELTA_CTAS", "MEGALODON_ATTENTION_TILES_PERSISTENT"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(ca, "_sm_count", lambda: sms)
  monkeypatch.setattr(ca, "_mgpu_tiles_takes", lambda *args: True)
  assert ca._delta_ctas() == delta_ctas
  assert ca._mgpu_delta_in_tiles(None, None, None, None, None, None) is takes


def test_persistent_schedule_follows_the_environment(host_without_hopper, monkeypatch):
  """The op's tiles call: the persistent schedule with one program per SM and 5 stages by default;
  MEGALODON_ATTENTION_TILES_PERSISTENT=<int> sets the programs (0: one tile per program, 4 stages)
  and MEGALODON_ATTENTION_TILES_STAGES=<int> the ring depth; anything else says what to set."""
  monkeypatch.setenv("MEGALODON_ATTENTION_TILES_PERSISTENT", "5")  # through the op: it lowers for CUDA
  module = _lowered_attention_module(ca.KernelConfig(matmul_impl="triton", tiles_impl="mgpu"), 256, 512)
  assert module.count(f"custom_call @{bt.MOSAIC_GPU_CALL}(") == 1
  calls = []
  monkeypatch.setattr(bt, "bwd_tiles_mgpu", lambda *args, **kwargs: calls.append(kwargs))
  monkeypatch.setattr(ca, "_sm_count", lambda: 132)  # the CPU has none
  plan = ca._triton_plan(ca.KernelConfig(), False, 0.5, 1, 2, 2, 256, 256, 64, 128, jnp.bfloat16)
  run = lambda: ca._mgpu_bwd_tiles(plan, *(None,) * 6)  # noqa: E731
  for value, ctas in ((None, 132), ("", 132), ("0", None), ("7", 7)):
    if value is None:
      monkeypatch.delenv("MEGALODON_ATTENTION_TILES_PERSISTENT", raising=False)
    else:
      monkeypatch.setenv("MEGALODON_ATTENTION_TILES_PERSISTENT", value)
    run()
    assert calls[-1].get("persistent_ctas") == ctas, value
    assert calls[-1]["block_k"] == 128 and calls[-1]["scale"] == 0.5
    assert calls[-1].get("spans_per_program") == (1 if ctas is None else None)
    assert calls[-1]["stages"] == (4 if ctas is None else 5)
  for value, stages in (("", 5), ("6", 6), ("3", 3)):  # the ring depth, either schedule
    monkeypatch.setenv("MEGALODON_ATTENTION_TILES_STAGES", value)
    run()
    assert calls[-1]["stages"] == stages and calls[-1]["persistent_ctas"] == 7, value
  for name, bad in (("MEGALODON_ATTENTION_TILES_PERSISTENT", ("-1", "sm", "1.5")),
                    ("MEGALODON_ATTENTION_TILES_STAGES", ("0", "-3", "sm", "1.5"))):
    for value in bad:
      monkeypatch.setenv(name, value)
      with pytest.raises(ValueError, match=f"{name}={value!r}: set it"):
        run()
      monkeypatch.setenv(name, "4")


@pytest.mark.gpu
@pytest.mark.parametrize("chunk,length,block_k,stages,scale,per_program,ctas", [
    (512, 1024, 128, 4, 1.0, None, None),
    (512, 1024, 128, 4, 1.0, 2, None),
    (512, 1024, 256, 3, 1.0, None, None),
    (384, 768, 256, 4, 0.5, 1, None),  # odd number of query blocks; short spans in both halves of the pairs
    (384, 768, 128, 6, 0.5, 3, None),
    (512, 1024, 128, 4, 1.0, None, 7),  # persistent: 40 tiles over 7 programs (6 or 5 each)
    (384, 768, 128, 3, 0.5, None, 132),  # persistent, more programs than the 48 tiles
    (2048, 4096, 128, 4, 1.0, None, 132),  # persistent at the benchmark's chunk: 1088 tiles over 132
])
def test_mosaic_gpu_tiles_match_reference_and_triton_on_hopper(rng, chunk, length, block_k, stages, scale,
                                                              per_program, ctas):
  """Compiled on the GPU: P and dS on visited tiles against the float32 reference, and as close to it
  as the Triton tiles kernel in the same order (run with -m gpu on a Hopper GPU): 128-key spans form dS
  from the float32 P (Triton's default 'dp_first'), 256-key spans from P as stored ('s_first')."""
  if not ca._is_hopper():
    pytest.fail("needs a compute-capability 9.0 GPU (run with MEGALODON_TEST_PLATFORM=gpu on an H100/H200)")
  batch, heads, dk, dv = 2, 2, 128, 256
  q, k, v, d_out = _inputs(rng, batch, length, heads, dk, dv, jnp.bfloat16)
  lse, delta = _stats64(q, k, v, d_out, chunk, scale)
  n_chunks = length // chunk
  order = "dp_first" if block_k == bt.BLOCK else "s_first"
  plan = ca._triton_plan(ca.KernelConfig(bwd_order=order), False, scale, batch, heads, n_chunks, chunk, chunk,
                         dk, dv, jnp.bfloat16)
  plan = dataclasses.replace(plan, geom=plan.bwd_geom)
  assert (plan.geom.bq, plan.geom.bk) == (bt.BLOCK, bt.BLOCK) and plan.bwd_order == order
  args = (q, k, v, d_out, lse, delta)
  mgpu = jax.jit(lambda *a: bt.bwd_tiles_mgpu(*a, chunk=chunk, scale=scale, block_k=block_k, stages=stages,
                                              spans_per_program=per_program, persistent_ctas=ctas))(*args)
  triton = jax.jit(lambda q, k, v, do, lse, delta: ca._tr_bwd_tiles(plan, q, k, v, None, lse, delta, do))(*args)
  ref = jax.jit(lambda *a: bt.bwd_tiles_reference(*a, chunk, scale))(*args)
  for name, got, tri, want in zip(("p", "ds"), mgpu, triton, ref):
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    err, tri_err = _visited_err(got, want, chunk, bt.BLOCK), _visited_err(tri, want, chunk, bt.BLOCK)
    assert err < 2e-2, (name, err)
    assert err <= 1.5 * tri_err + 2e-3, (name, err, tri_err)


@pytest.mark.gpu
def test_chunk_attention_with_mosaic_gpu_tiles_matches_xla_on_hopper(rng):
  """Compiled on the GPU: chunk_attention's values and gradients with tiles_impl='mgpu' against the
  float32 XLA path, as close as with the Triton tiles kernel (run with -m gpu on a Hopper GPU)."""
  if not ca._is_hopper():
    pytest.fail("needs a compute-capability 9.0 GPU (run with MEGALODON_TEST_PLATFORM=gpu on an H100/H200)")
  from megalodon_jax.ops import attention as xla_attention
  batch, length, heads, dk, dv, chunk = 1, 1024, 2, 128, 256, 512
  q, k, v, d_out = _inputs(rng, batch, length, heads, dk, dv, jnp.bfloat16)

  def run(attend, *args):
    def fwd_bwd(q, k, v, d_out):
      out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, chunk_size=chunk), q, k, v)
      return out, *vjp(d_out)
    fn = jax.jit(fwd_bwd)
    return fn.lower(*args).as_text(), fn(*args)

  up = lambda x: x.astype(jnp.float32)  # noqa: E731
  _, exact = run(xla_attention.chunked_attention_xla, up(q), up(k), up(v), up(d_out))
  errors = {}
  for impl in ("mgpu", "triton"):
    config = ca.KernelConfig(matmul_impl="triton", scores_impl="triton", tiles_impl=impl)  # only difference
    text, got = run(lambda *a, config=config, **kw: ca.chunk_attention(*a, config=config, **kw), q, k, v, d_out)
    assert (bt.MOSAIC_GPU_CALL in text) == (impl == "mgpu"), impl
    errors[impl] = [_rel_err(g, e) for g, e in zip(got, exact)]
  for name, mgpu, triton in zip(("out", "dq", "dk", "dv"), errors["mgpu"], errors["triton"]):
    assert mgpu < 2e-2, (name, mgpu)
    assert mgpu <= 1.25 * triton + 1e-3, (name, mgpu, triton)



@pytest.fixture
def mgpu_interpreter(monkeypatch):
  from tests.mgpu_interpreter import mosaic_gpu_interpreter
  yield from mosaic_gpu_interpreter(monkeypatch)


@pytest.mark.parametrize("chunk,block_k,stages,scale,per_program", [
    (384, 128, 3, 1.0, None),  # three query blocks: pairs (0, 2) and the middle block alone
    (384, 256, 2, 0.5, None),  # 256-key spans, the last of a walk a single key block; a two-slot ring
    (512, 128, 2, 1.0, 2),  # walks split across programs, one program's spans in both query blocks
    (384, 256, 2, 1.0, 1),  # one span per program; the middle block's program groups partly empty
])
def test_kernel_matches_the_reference_in_the_interpreter(rng, mgpu_interpreter, chunk, block_k, stages, scale,
                                                         per_program):
  """The kernel itself, run by Mosaic GPU's CPU interpreter (warpgroups as threads, barriers and
  TMA simulated, race detector on; wgmma synchronous), against the float32 reference."""
  params, gpu_callbacks = mgpu_interpreter
  batch, heads, dk, dv = 1, 1, 64, 128
  q, k, v, d_out = _inputs(rng, batch, chunk, heads, dk, dv, jnp.bfloat16)
  lse, delta = _stats64(q, k, v, d_out, chunk, scale)
  p_buf, ds_buf = bt.bwd_tiles_mgpu(q, k, v, d_out, lse, delta, chunk=chunk, scale=scale, block_k=block_k,
                                    stages=stages, spans_per_program=per_program, interpret=params)
  assert not gpu_callbacks.get_races().races_found
  p_ref, ds_ref = bt.bwd_tiles_reference(q, k, v, d_out, lse, delta, chunk, scale)
  assert p_buf.dtype == ds_buf.dtype == jnp.bfloat16 and p_buf.shape == p_ref.shape
  assert _visited_err(p_buf, p_ref, chunk, bt.BLOCK) < 1e-2  # P rounded to bf16
  # dS from P as stored (bf16) for 256-key spans (the Triton kernel's s_first), else from float32 P
  assert _visited_err(ds_buf, ds_ref, chunk, bt.BLOCK) < (2e-2 if block_k > bt.BLOCK else 1e-2)


@pytest.mark.parametrize("batch,heads,chunk,length,stages,ctas", [
    (1, 2, 384, 768, 2, 4),  # 24 tiles over 4 programs (6 each), two heads of two chunks
    (1, 1, 384, 768, 3, 5),  # 12 tiles over 5: 3, 3, 2, 2, 2, crossing the chunk boundary mid-walk
    (1, 1, 256, 256, 2, 5),  # 3 tiles over 5 programs: two idle
])
def test_persistent_kernel_matches_the_reference_in_the_interpreter(rng, mgpu_interpreter, batch, heads, chunk,
                                                                    length, stages, ctas):
  """persistent_ctas: programs wrap around the global tile order several times (stat slots and ring
  steps alternate across tiles and chunk-heads), with unequal or zero tile counts."""
  params, gpu_callbacks = mgpu_interpreter
  dk, dv, scale = 64, 128, 0.5
  q, k, v, d_out = _inputs(rng, batch, length, heads, dk, dv, jnp.bfloat16)
  lse, delta = _stats64(q, k, v, d_out, chunk, scale)
  p_buf, ds_buf = bt.bwd_tiles_mgpu(q, k, v, d_out, lse, delta, chunk=chunk, scale=scale, stages=stages,
                                    persistent_ctas=ctas, interpret=params)
  assert not gpu_callbacks.get_races().races_found
  p_ref, ds_ref = bt.bwd_tiles_reference(q, k, v, d_out, lse, delta, chunk, scale)
  assert _visited_err(p_buf, p_ref, chunk, bt.BLOCK) < 1e-2
  assert _visited_err(ds_buf, ds_ref, chunk, bt.BLOCK) < 1e-2


@pytest.mark.parametrize("change,message", [
    (dict(delta="keep", out="give"), "exactly one of delta"),
    (dict(delta=None, out=None), "exactly one of delta"),
    (dict(delta=None, out="give"), "needs the persistent schedule"),
    (dict(delta=None, out="wrong", persistent_ctas=4), "out must be the forward's output"),
    (dict(delta=None, out="give", persistent_ctas=4, delta_ctas=0), "delta_ctas 0: with out="),
    (dict(delta=None, out="give", persistent_ctas=4, delta_ctas=4), "delta_ctas 4: with out="),
    (dict(delta=None, out="give", persistent_ctas=4, delta_ctas=True), "delta_ctas True"),
    (dict(delta="keep", out=None, persistent_ctas=4, delta_ctas=2), "delta_ctas needs out="),
])
def test_delta_in_the_kernel_argument_checks(rng, change, message):
  q, k, v, d_out = _inputs(rng, 1, 256, 1, 64, 128, jnp.bfloat16)
  stat = jnp.zeros((1, 1, 256), jnp.float32)
  out = {"give": d_out, "wrong": d_out[..., :64], None: None}[change["out"]]
  delta = stat if change["delta"] == "keep" else None
  with pytest.raises(ValueError, match=message):
    bt.bwd_tiles_mgpu(q, k, v, d_out, stat, delta, out=out, chunk=256, persistent_ctas=change.get("persistent_ctas"),
                      delta_ctas=change.get("delta_ctas", 1))


@pytest.mark.parametrize("batch,heads,chunk,length,dv,stages,ctas,delta_ctas", [
    (1, 2, 384, 768, 128, 2, 3, 1),  # 4 chunk-heads of 3 blocks: one delta program, two tile programs
    (2, 1, 512, 512, 128, 3, 5, 2),  # 2 chunk-heads of 4 blocks over two batch rows: 2 delta, 3 tile programs
    (1, 1, 256, 256, 128, 2, 9, 4),  # more programs than work: idle delta and tile programs
])
def test_delta_on_programs_of_its_own_matches_the_reference_in_the_interpreter(rng, mgpu_interpreter, batch, heads,
                                                                               chunk, length, dv, stages, ctas,
                                                                               delta_ctas):
  """delta_ctas: programs 0 .. delta_ctas - 1 stream O and dO and store delta; the others run the tiles with
  it. The interpreter runs programs one after another, the delta programs first (no semaphores there;
  the GPU test has them)."""
  params, gpu_callbacks = mgpu_interpreter
  dk, scale = 64, 0.5
  q, k, v, d_out = _inputs(rng, batch, length, heads, dk, dv, jnp.bfloat16)
  lse, _ = _stats64(q, k, v, d_out, chunk, scale)
  out = jnp.asarray(rng.standard_normal(v.shape), jnp.bfloat16)
  want_delta = np.einsum("blhd,blhd->bhl", np.asarray(out, np.float64), np.asarray(d_out, np.float64))
  p_buf, ds_buf, delta = bt.bwd_tiles_mgpu(q, k, v, d_out, lse, None, out=out, chunk=chunk, scale=scale,
                                           stages=stages, persistent_ctas=ctas, delta_ctas=delta_ctas,
                                           interpret=params)
  assert not gpu_callbacks.get_races().races_found
  assert delta.dtype == jnp.float32 and _rel_err(delta, want_delta) < 1e-5
  p_ref, ds_ref = bt.bwd_tiles_reference(q, k, v, d_out, lse, jnp.asarray(want_delta, jnp.float32), chunk, scale)
  assert _visited_err(p_buf, p_ref, chunk, bt.BLOCK) < 1e-2
  assert _visited_err(ds_buf, ds_ref, chunk, bt.BLOCK) < 1e-2


@pytest.mark.parametrize("delta_ctas", [12, 20])
def test_delta_on_programs_of_its_own_lowers_for_cuda(delta_ctas):
  """At the benchmark shape with 132 programs, delta_ctas of them streaming delta: one Mosaic GPU call."""
  dims = {key: _BENCH[key] for key in ("batch", "length", "heads", "dk", "dv", "chunk")}
  q = jax.ShapeDtypeStruct((dims["batch"], dims["length"], dims["heads"], dims["dk"]), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((dims["batch"], dims["length"], dims["heads"], dims["dv"]), jnp.bfloat16)
  stat = jax.ShapeDtypeStruct((dims["batch"], dims["heads"], dims["length"]), jnp.float32)
  fn = lambda q, k, v, d_out, out, lse: bt.bwd_tiles_mgpu(q, k, v, d_out, lse, None, out=out,  # noqa: E731
                                                           chunk=dims["chunk"], stages=5, persistent_ctas=132,
                                                           delta_ctas=delta_ctas)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(q, q, v, v, v, stat)
  assert exported.mlir_module().count(f"custom_call @{bt.MOSAIC_GPU_CALL}(") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("chunk,length,heads,ctas,delta_ctas", [
    (2048, 16384, 4, 132, 16),  # 32 chunk-heads: the op's schedule at half its length
    (384, 3072, 4, 7, 2),  # few programs: the waits bite
])
def test_delta_on_programs_of_its_own_matches_the_unfused_kernel_on_hopper(rng, chunk, length, heads, ctas,
                                                                           delta_ctas):
  """Compiled on the GPU: delta from programs of its own (the tiles waiting on global semaphores) equals
  rowsum(O dO) to float32 rounding, and P / dS equal the unfused kernel's given that delta, in three calls in
  a row (the semaphores' epoch advances once a call)."""
  if not ca._is_hopper():
    pytest.fail("needs a compute-capability 9.0 GPU (run with MEGALODON_TEST_PLATFORM=gpu on an H100/H200)")
  batch, dk, dv, scale = 1, 128, 256, 0.5
  q, k, v, d_out = _inputs(rng, batch, length, heads, dk, dv, jnp.bfloat16)
  lse, _ = _stats64(q, k, v, d_out, chunk, scale)
  mask = np.tile(np.asarray(bt.visited_tiles(chunk, bt.BLOCK)), (length // chunk, 1))
  unfused = jax.jit(lambda *a: bt.bwd_tiles_mgpu(*a, chunk=chunk, scale=scale, stages=5, persistent_ctas=ctas))
  fused = jax.jit(lambda q, k, v, d_out, out, lse: bt.bwd_tiles_mgpu(
      q, k, v, d_out, lse, None, out=out, chunk=chunk, scale=scale, stages=5, persistent_ctas=ctas,
      delta_ctas=delta_ctas))
  for call in range(3):
    out = jnp.asarray(rng.standard_normal(v.shape), jnp.bfloat16)  # new values each call: no stale delta passes
    want_delta = np.einsum("blhd,blhd->bhl", np.asarray(out, np.float64), np.asarray(d_out, np.float64))
    p_buf, ds_buf, delta = fused(q, k, v, d_out, out, lse)
    assert _rel_err(delta, want_delta) < 1e-5, call
    for name, got, want in zip(("p", "ds"), (p_buf, ds_buf), unfused(q, k, v, d_out, lse, delta)):
      got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
      assert np.array_equal(np.where(mask, got, 0), np.where(mask, want, 0)), (name, call)
