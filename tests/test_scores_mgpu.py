"""kernels_pallas/scores_mgpu.py on the CPU: its reference, the kernel itself (interpreted), its lowering.

What can be checked without a GPU:
  * the dense reference against the real thing, the Triton scores kernel `_tr_scores` in interpret
    mode, for 'bounded' (with rows whose bound fails and rows whose bound holds) and 'twopass';
  * the Mosaic GPU kernel under Mosaic GPU's interpreter (jax._src.pallas.mosaic_gpu.interpret:
    warpgroups as threads, barriers, TMA and wgmma simulated, a happens-before race detector)
    against the reference. The interpreter of jax 0.10.2 lacks three things this kernel uses; the
    `_interpreter` fixture (tests/mgpu_interpreter.py) supplies them for the test's duration: wgmma
    on a transposed operand (`transpose_ref`), plgpu.load (a plain load here), and a CPU rule for
    layout_cast (the identity: layouts are register arrangements, meaningless off the GPU). It runs wgmma synchronously, so it
    checks the barrier protocol, indexing, masks and statistics, not the asynchronous wgmma waits;
  * the lowering for CUDA (Pallas -> Mosaic GPU, with its layout and transform checks) at the
    benchmark shape into one Mosaic GPU custom call;
  * unsupported inputs raise ValueError.
A gpu-marked test compares the compiled kernel with the Triton kernel on a Hopper GPU.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import chunk_attention as ca
from kernels_pallas import scores_mgpu as sm
from tests.mgpu_lowering import lowered_attention_module as _lowered_attention_module
from tests.mgpu_lowering import capture_smem_requests

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_HOT = 30.0  # a query row scaled by this has a bound far (> 64 in base 2) above its diagonal maximum


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _visited(n_chunks: int, chunk: int, block: int) -> np.ndarray:
  """[n*C, C] bool: entries of the tiles at or below each chunk's block diagonal."""
  tile = np.arange(chunk) // block
  return np.tile(tile[None, :] <= tile[:, None], (n_chunks, 1))


def _assert_matches_reference(outputs, q, k, chunk: int, scale: float, bound):
  """The kernel's (p_buf, rscale, lse) against the float32 reference on the visited tiles."""
  p_buf, rscale, lse = outputs
  rp, rrs, rlse = sm.scores_reference(q, k, chunk, scale, sm.BLOCK, bound)
  assert p_buf.shape == rp.shape and p_buf.dtype == jnp.bfloat16
  visited = _visited(q.shape[1] // chunk, chunk, sm.BLOCK)
  got, want = np.where(visited, np.asarray(p_buf, np.float32), 0.0), np.where(visited, rp, 0.0)
  # Relative to each row's largest entry: bf16 rounding of P~ (and of q, k's products in the MMA).
  row_max = np.max(np.abs(want), axis=-1, keepdims=True)
  assert float(np.max(np.abs(got - want) / row_max)) < 8e-3
  assert _rel_err(rscale, rrs) < 1e-5
  assert _rel_err(lse, rlse) < 1e-5


def _inputs(rng, batch, length, heads, dk, dtype, hot_rows=()):
  normal = lambda: rng.standard_normal((batch, length, heads, dk)) * dk ** -0.25  # noqa: E731
  q, k = normal(), normal()
  for b, row, h in hot_rows:
    q[b, row, h] *= _HOT
  return jnp.asarray(q, dtype), jnp.asarray(k, dtype)


def _decisions(q, k, bound, chunk: int, block: int, scale: float) -> np.ndarray:
  """[B, H, n, nbq] bool: whether the bound holds for each query block (block 0 excluded: it has only
  its diagonal, so both branches give the same m)."""
  batch, length, heads, dk = q.shape
  n = length // chunk
  qf = np.asarray(q, np.float64).reshape(batch, n, chunk, heads, dk)
  kf = np.asarray(k, np.float64).reshape(batch, n, chunk, heads, dk)
  s = np.einsum("bnqhd,bnkhd->bhnqk", qf, kf) * scale * sm._LOG2E
  pos = np.arange(chunk)
  diag = (pos[None, :] <= pos[:, None]) & (pos[None, :] // block == pos[:, None] // block)
  gap = np.asarray(bound, np.float64).reshape(batch, heads, n, chunk) - np.where(diag, s, -np.inf).max(-1)
  return (gap.reshape(batch, heads, n, chunk // block, block).max(-1) <= sm._BOUND_MARGIN)[..., 1:]


def test_constants_are_chunk_attentions():
  assert (sm._MASK, sm._BOUND_MARGIN, sm._LOG2E) == (ca._MASK, ca._BOUND_MARGIN, ca._LOG2E)


@pytest.mark.parametrize("mode,hot_rows", [
    ("bounded", ((0, 40, 1), (0, 27, 0))),  # hot rows fail the bound in two blocks; the others hold
    ("twopass", ((0, 40, 1),)),
])
def test_reference_matches_the_triton_kernel(rng, mode, hot_rows):
  """The dense reference against `_tr_scores` (interpreted) at 16 x 16 tiles: visited P~ tiles, 1 / l, lse."""
  batch, heads, n_chunks, chunk, dk, block, scale = 1, 2, 2, 32, 16, 16, 0.7
  length = n_chunks * chunk
  q, k = _inputs(rng, batch, length, heads, dk, jnp.float32, hot_rows)
  plan = ca._triton_plan(ca.KernelConfig(block_q=block, block_k=block, fwd_scores=mode), True, scale, batch,
                         heads, n_chunks, chunk, chunk, dk, dk, jnp.float32)
  assert (plan.geom.bq, plan.geom.bk) == (block, block)
  bound = ca._score_bound(q, k, plan.geom, scale * ca._LOG2E) if mode == "bounded" else None
  if bound is not None:
    holds = _decisions(q, k, bound, chunk, block, scale)
    assert holds.any() and not holds.all()  # both branches of the kernel's m are exercised

  def both(q, k):
    return ca._tr_scores(plan, q, k, jnp.float32, None), sm.scores_reference(q, k, chunk, scale, block, bound)

  (tp, trs, tlse), (rp, rrs, rlse) = jax.jit(both).lower(q, k).compile(compiler_options=_FAST_COMPILE)(q, k)
  visited = _visited(n_chunks, chunk, block)
  assert _rel_err(np.where(visited, tp, 0.0), np.where(visited, rp, 0.0)) < 1e-5
  assert np.all(np.asarray(rp)[:, :, ~visited] == 0.0)  # the reference zeroes the unvisited tiles
  assert _rel_err(trs, rrs) < 1e-5
  assert _rel_err(tlse, rlse) < 1e-5
  if mode == "bounded":  # where the bound holds, m is the diagonal maximum and P~ may exceed 1
    assert float(np.max(rp)) > 1.0


@pytest.fixture
def _interpreter(monkeypatch):
  """Mosaic GPU's CPU interpreter, completed for our kernels (tests/mgpu_interpreter.py)."""
  from tests.mgpu_interpreter import mosaic_gpu_interpreter
  yield from mosaic_gpu_interpreter(monkeypatch)


@pytest.mark.parametrize("mode,chunk,dk,stages,schedule,hot_rows", [
    # Two programs: pairs (3, 0) and (2, 1). A hot row fails block 2's bound, so program 1 runs the
    # failed branch and then block 1 (bound holding) from the ring step after it; dk 128: two ring
    # slots per K tile, and 2 stages: a ring of exactly one tile.
    ("bounded", 512, 128, 2, dict(pingpong=True), ((0, 300, 0),)),
    # Odd block count: pairs (2, 0) and (1, 1), the middle block done once; one slot per K tile.
    ("twopass", 384, 64, 3, {}, ()),
    # Two staging buffers, serial schedule: a failed first block (2), then block 1 from the next buffer.
    ("bounded", 512, 128, 3, dict(p_buffers=2), ((0, 300, 0),)),
    # The overlapped schedule (each consumer's next wgmma issued before the current tile's exp2):
    # every bound holds, so every block is one pipelined run (block 0's has no wgmma to overlap);
    ("bounded", 512, 128, 2, dict(overlap=True), ()),
    # the failed branch (pass 1's row maxima, then pass 2, both pipelined) in block 2, then block 1;
    ("bounded", 512, 128, 2, dict(overlap=True), ((0, 300, 0),)),
    # failed first blocks of both programs (3, then 0; 2, then 1 holding), two staging buffers, dk 64;
    ("bounded", 512, 64, 3, dict(overlap=True, p_buffers=2), ((0, 450, 0), (0, 300, 0))),
    # a failed second block (1, after 2 held) with two staging buffers;
    ("bounded", 512, 128, 4, dict(overlap=True, p_buffers=2), ((0, 200, 0),)),
    # twopass: every block but 0 is two runs; an odd block count.
    ("twopass", 384, 64, 3, dict(overlap=True), ()),
    ("twopass", 512, 128, 2, dict(overlap=True, p_buffers=2), ()),
])
def test_kernel_matches_the_reference_in_the_interpreter(rng, _interpreter, mode, chunk, dk, stages, schedule,
                                                         hot_rows):
  params, gpu_callbacks = _interpreter
  batch, heads, n_chunks, scale = 1, 1, 1, 0.7
  length = n_chunks * chunk
  q, k = _inputs(rng, batch, length, heads, dk, jnp.bfloat16, hot_rows)
  g = ca._Geom(batch, heads, n_chunks, chunk, chunk, dk, dk, sm.BLOCK, sm.BLOCK)
  bound = ca._score_bound(q, k, g, scale * ca._LOG2E) if mode == "bounded" else None
  if bound is not None:
    holds = _decisions(q, k, bound, chunk, sm.BLOCK, scale)
    # Hot rows fail their blocks' bounds (both branches of m exercised); without them every bound holds.
    assert holds.any() and holds.all() != bool(hot_rows)
    hot_blocks = {row // sm.BLOCK for _, row, _ in hot_rows}
    assert {blk for blk in range(1, chunk // sm.BLOCK) if not holds[0, 0, 0, blk - 1]} == hot_blocks
  p_buf, rscale, lse = sm.chunk_scores_mgpu(q, k, bound, chunk=chunk, scale=scale, stages=stages,
                                            interpret=params, **schedule)
  assert not gpu_callbacks.get_races().races_found
  _assert_matches_reference((p_buf, rscale, lse), q, k, chunk, scale, bound)


@pytest.mark.parametrize("batch,length,heads,dk,chunk,dtype,p_dtype,bounded,schedule", [
    (1, 32768, 4, 256, 2048, jnp.bfloat16, None, True, {}),  # the benchmark shape
    (1, 32768, 4, 256, 2048, jnp.bfloat16, None, True, dict(pingpong=True)),
    (1, 32768, 4, 256, 2048, jnp.bfloat16, None, False, {}),
    (2, 768, 2, 64, 384, jnp.float16, jnp.bfloat16, True, {}),  # odd block count: a middle block done once
    # The overlapped schedule (the names hold "overlap": run alone with -k overlap under another jax).
    (1, 32768, 4, 256, 2048, jnp.bfloat16, None, True, dict(overlap=True)),
    (1, 32768, 4, 256, 2048, jnp.bfloat16, None, False, dict(overlap=True)),
    (1, 32768, 4, 256, 2048, jnp.bfloat16, None, True, dict(overlap=True, stages=5, p_buffers=2)),
    (1, 32768, 4, 256, 2048, jnp.bfloat16, None, True, dict(stages=5, p_buffers=2)),
], ids=lambda x: "-".join(f"{k}{'' if v is True else v}" for k, v in x.items()) if isinstance(x, dict) else None)
def test_kernel_lowers_for_cuda(monkeypatch, batch, length, heads, dk, chunk, dtype, p_dtype, bounded, schedule):
  """One Mosaic GPU call with the right outputs, asking for no more shared memory than smem_bytes counts."""
  smem_requests, captured = capture_smem_requests(monkeypatch)
  q = jax.ShapeDtypeStruct((batch, length, heads, dk), dtype)
  bound = jax.ShapeDtypeStruct((batch, heads, length), jnp.float32) if bounded else None
  fn = lambda q, k, b: sm.chunk_scores_mgpu(q, k, b, chunk=chunk, scale=1.0, p_dtype=p_dtype,  # noqa: E731
                                            **schedule)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(q, q, bound)
  assert exported.mlir_module().count(f"custom_call @{sm.MOSAIC_GPU_CALL}(") == 1
  p_aval, rscale_aval, lse_aval = exported.out_avals
  assert (p_aval.shape, p_aval.dtype) == ((batch, heads, length, chunk), jnp.dtype(p_dtype or dtype))
  assert rscale_aval.shape == lse_aval.shape == (batch, heads, length)
  assert rscale_aval.dtype == lse_aval.dtype == jnp.float32
  assert len(smem_requests) == captured  # one kernel launch (when the module could be seen)
  for request in smem_requests:
    budget = sm.smem_bytes(dk, schedule.get("stages", 6), p_buffers=schedule.get("p_buffers", 1))
    assert int(request) <= budget <= sm._SMEM_LIMIT


def _kernel_module(monkeypatch, schedule, bounded=True) -> str | None:
  """The Mosaic GPU module of the kernel at a small shape, as serialised into its call (None if unreachable)."""
  modules = []
  try:
    from jax.experimental.mosaic.gpu import core as mosaic_core
    serde = mosaic_core._run_serde_pass
  except (ImportError, AttributeError):  # private: another jax may not have it
    return None

  def capture(module, **kwargs):
    if kwargs.get("serialize"):
      modules.append(str(module))
    return serde(module, **kwargs)

  monkeypatch.setattr(mosaic_core, "_run_serde_pass", capture)
  q = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
  bound = jax.ShapeDtypeStruct((1, 2, 1024), jnp.float32) if bounded else None
  jax.export.export(jax.jit(lambda q, k, b: sm.chunk_scores_mgpu(q, k, b, chunk=512, scale=1.0, stages=4, **schedule)),
                    platforms=["cuda"])(q, q, bound)
  assert len(modules) == 1
  return modules[0]


@pytest.mark.parametrize("overlap", [False, True])
def test_bound_decision_is_broadcast_from_lane_0(monkeypatch, overlap):
  """uniform_decision: one shfl.sync idx per query block (two per program) on the bound decision, which
  ptxas then treats as warp-uniform (no divergent branch around the wgmma: no C7520 serialisation);
  uniform_decision=False lowers as before (the A/B baseline); twopass has nothing to broadcast."""
  idx = lambda module: module.count("nvvm.shfl.sync idx")  # noqa: E731
  new = _kernel_module(monkeypatch, dict(overlap=overlap))
  if new is None:
    pytest.skip("this jax's Mosaic GPU module is not reachable")
  old = _kernel_module(monkeypatch, dict(overlap=overlap, uniform_decision=False))
  assert idx(new) == idx(old) + 2
  unnamed = lambda module: re.sub(r"entry_\d+", "entry", module)  # noqa: E731 - kernel names are numbered per process
  twopass = _kernel_module(monkeypatch, dict(overlap=overlap), bounded=False)
  assert unnamed(twopass) == unnamed(_kernel_module(monkeypatch, dict(overlap=overlap, uniform_decision=False),
                                                    bounded=False))


@pytest.mark.parametrize("change,message", [
    (dict(chunk=192, length=384), "chunk 192 is not a multiple of 128"),
    (dict(length=640), "sequence length 640 is not a multiple of chunk 256"),
    (dict(dk=96), "dk 96 unsupported"),
    (dict(dk=320), "dk 320 unsupported"),
    (dict(dtype=jnp.float32), "16-bit float"),
    (dict(p_dtype=jnp.float32), "p_dtype float32 unsupported"),
    (dict(bound_shape=(1, 2, 256)), "bound must be float32"),
    (dict(stages=1), "stages 1 < dk / 64 = 2"),
    (dict(dk=256, stages=8), "KiB of shared memory"),
    (dict(dk=256, stages=6, p_buffers=2), "2 P~ staging buffer"),  # 5 stages fit with two buffers
    (dict(p_buffers=3), "p_buffers 3 unsupported"),
    (dict(overlap=True, pingpong=True), "overlap and pingpong"),
    (dict(segment_ids=True), "segment ids are not supported"),
])
def test_unsupported_inputs_raise(change, message):
  chunk, length, dk = change.get("chunk", 256), change.get("length", 512), change.get("dk", 128)
  dtype = change.get("dtype", jnp.bfloat16)
  q = jax.ShapeDtypeStruct((1, length, 2, dk), dtype)
  bound = jax.ShapeDtypeStruct(change.get("bound_shape", (1, 2, length)), jnp.float32)
  seg = jnp.zeros((1, length), jnp.int32) if change.get("segment_ids") else None
  with pytest.raises(ValueError, match=message):
    schedule = {key: change[key] for key in ("p_buffers", "overlap", "pingpong") if key in change}
    jax.eval_shape(lambda q, k, b: sm.chunk_scores_mgpu(q, k, b, chunk=chunk, scale=1.0, stages=change.get("stages", 4),
                                                        p_dtype=change.get("p_dtype"), segment_ids=seg, **schedule),
                   q, q, bound)


def test_shared_memory_count():
  """The module docstring's count at dk 256, 6 stages; 8 stages would not fit an H200 (227 KiB)."""
  assert 195 * 1024 < sm.smem_bytes(256, 6) < 205 * 1024
  assert sm.smem_bytes(256, 7) <= sm._SMEM_LIMIT < sm.smem_bytes(256, 8)
  # A second P~ staging buffer per consumer costs 32 KiB: 5 stages at most.
  assert sm.smem_bytes(256, 5, p_buffers=2) <= sm._SMEM_LIMIT < sm.smem_bytes(256, 6, p_buffers=2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,schedule", [
    ("bounded", {}), ("bounded", dict(pingpong=True)), ("twopass", {}),
    ("bounded", dict(overlap=True)), ("twopass", dict(overlap=True)),
    ("bounded", dict(overlap=True, stages=5, p_buffers=2)),
], ids=lambda x: "-".join(f"{k}{'' if v is True else v}" for k, v in x.items()) if isinstance(x, dict) else None)
def test_mosaic_gpu_scores_match_triton_on_hopper(rng, mode, schedule):
  """Compiled on the GPU: the kernel against the Triton scores kernel and the reference (run with -m gpu
  on a Hopper GPU)."""
  if not ca._is_hopper():
    pytest.fail("needs a compute-capability 9.0 GPU (run with MEGALODON_TEST_PLATFORM=gpu on an H100/H200)")
  batch, heads, n_chunks, chunk, dk, scale = 1, 2, 2, 512, 128, 0.7
  length = n_chunks * chunk
  q, k = _inputs(rng, batch, length, heads, dk, jnp.bfloat16, ((0, 300, 1), (0, 700, 0)))
  plan = ca._triton_plan(ca.KernelConfig(fwd_scores=mode), False, scale, batch, heads, n_chunks, chunk, chunk,
                         dk, dk, jnp.bfloat16)
  assert (plan.geom.bq, plan.geom.bk) == (sm.BLOCK, sm.BLOCK)
  bound = ca._score_bound(q, k, plan.geom, scale * ca._LOG2E) if mode == "bounded" else None
  if bound is not None:
    holds = _decisions(q, k, bound, chunk, sm.BLOCK, scale)
    assert holds.any() and not holds.all()
  got = jax.jit(lambda q, k, b: sm.chunk_scores_mgpu(q, k, b, chunk=chunk, scale=scale, **schedule))(q, k, bound)
  triton = jax.jit(lambda q, k: ca._tr_scores(plan, q, k, jnp.bfloat16, None))(q, k)
  ref = sm.scores_reference(q, k, chunk, scale, sm.BLOCK, bound)
  visited = _visited(n_chunks, chunk, sm.BLOCK)
  tile = lambda p: np.where(visited, np.asarray(p, np.float32), 0.0)  # noqa: E731
  row_max = np.max(np.abs(tile(ref[0])), axis=-1, keepdims=True)
  assert float(np.max(np.abs(tile(got[0]) - tile(triton[0])) / row_max)) < 8e-3
  assert float(np.max(np.abs(tile(got[0]) - tile(ref[0])) / row_max)) < 8e-3
  for mine, theirs, exact in zip(got[1:], triton[1:], ref[1:]):
    assert _rel_err(mine, theirs) < 1e-4
    assert _rel_err(mine, exact) < 1e-4


@pytest.mark.parametrize("change,expected", [
    ({}, 1),  # bounded (the default)
    (dict(fwd_scores="twopass"), 1),
    (dict(fwd_scores="online"), 0),  # running maxima per tile: Triton only
    (dict(segments=True), 0),  # segment ids: Triton
    (dict(chunk=192, length=576), 0),  # chunk not a multiple of 128
    (dict(dtype=jnp.float32), 0),
    (dict(block_k=64), 0),  # 128 x 64 score tiles
])
def test_chunk_attention_sends_scores_to_mosaic_gpu(host_without_hopper, change, expected):
  change = dict(change)
  shape = {key: change.pop(key) for key in ("chunk", "length", "segments", "dtype") if key in change}
  # Triton block matmuls: the only Mosaic GPU call left is the scores kernel's.
  config = ca.KernelConfig(scores_impl="mgpu", matmul_impl="triton", **change)
  module = _lowered_attention_module(config, **shape)
  assert module.count(f"custom_call @{sm.MOSAIC_GPU_CALL}(") == expected


def test_auto_scores_are_mgpu_on_hopper_only_and_follow_the_environment(host_without_hopper, monkeypatch):
  monkeypatch.delenv("MEGALODON_ATTENTION_SCORES", raising=False)
  assert ca._resolve_kernel_impl("scores", "auto") == "triton"  # the CPU is no Hopper GPU
  monkeypatch.setattr(ca, "_is_hopper", lambda: True)
  assert ca._resolve_kernel_impl("scores", "auto") == "mgpu"
  monkeypatch.setattr(ca, "_is_hopper", lambda: False)
  default = _lowered_attention_module(ca.KernelConfig(matmul_impl="triton"))
  assert default.count(f"custom_call @{sm.MOSAIC_GPU_CALL}(") == 0
  assert ca._resolve_kernel_impl("scores", "mgpu") == "mgpu"
  monkeypatch.setenv("MEGALODON_ATTENTION_SCORES", "mgpu")
  assert ca._resolve_kernel_impl("scores", "auto") == "mgpu"
  assert ca._resolve_kernel_impl("scores", "triton") == "triton"  # an explicit choice wins
  module = _lowered_attention_module(ca.KernelConfig(matmul_impl="triton"))
  assert module.count(f"custom_call @{sm.MOSAIC_GPU_CALL}(") == 1
  monkeypatch.setenv("MEGALODON_ATTENTION_SCORES", "cutlass")
  with pytest.raises(ValueError, match="MEGALODON_ATTENTION_SCORES='cutlass'"):
    ca._resolve_kernel_impl("scores", "auto")
  with pytest.raises(ValueError, match="scores_impl"):
    ca.chunk_attention(jnp.zeros((1, 256, 1, 64)), jnp.zeros((1, 256, 1, 64)), jnp.zeros((1, 256, 1, 64)),
                       chunk_size=256, config=ca.KernelConfig(scores_impl="cuda"))


@pytest.mark.parametrize("env,expected", [
    ({}, dict(stages=4, overlap=False, p_buffers=1, uniform_decision=True)),  # the defaults
    ({"OVERLAP": "1"}, dict(stages=4, overlap=True, p_buffers=1, uniform_decision=True)),
    ({"OVERLAP": "0", "STAGES": "4"}, dict(stages=4, overlap=False, p_buffers=1, uniform_decision=True)),
    # 6 stages would not fit beside two staging buffers
    ({"OVERLAP": "1", "P_BUFFERS": "2"}, dict(stages=5, overlap=True, p_buffers=2, uniform_decision=True)),
    ({"UNIFORM": "0"}, dict(stages=4, overlap=False, p_buffers=1, uniform_decision=False)),
    ({"UNIFORM": "1", "STAGES": "6"}, dict(stages=6, overlap=False, p_buffers=1, uniform_decision=True)),
    ({"OVERLAP": "2"}, "must be 0 or 1"),
    ({"P_BUFFERS": "3"}, "1 or 2"),
    ({"STAGES": "0"}, "MEGALODON_ATTENTION_SCORES_STAGES='0'"),
])
def test_chunk_attention_passes_the_scores_schedule_switches(host_without_hopper, monkeypatch, env, expected):
  """MEGALODON_ATTENTION_SCORES_{OVERLAP,STAGES,P_BUFFERS,UNIFORM} reach chunk_scores_mgpu (read when traced)."""
  for name in ("OVERLAP", "STAGES", "P_BUFFERS", "UNIFORM"):
    monkeypatch.delenv(f"MEGALODON_ATTENTION_SCORES_{name}", raising=False)
  for name, value in env.items():
    monkeypatch.setenv(f"MEGALODON_ATTENTION_SCORES_{name}", value)
  calls, kernel = [], sm.chunk_scores_mgpu

  def spy(*args, **kwargs):
    calls.append({key: kwargs[key] for key in ("stages", "overlap", "p_buffers", "uniform_decision")})
    return kernel(*args, **kwargs)

  monkeypatch.setattr(sm, "chunk_scores_mgpu", spy)
  config = ca.KernelConfig(scores_impl="mgpu", matmul_impl="triton")
  if isinstance(expected, str):
    with pytest.raises(ValueError, match=re.escape(expected)):
      _lowered_attention_module(config)
    return
  module = _lowered_attention_module(config)
  assert module.count(f"custom_call @{sm.MOSAIC_GPU_CALL}(") == 1
  assert calls == [expected]


@pytest.mark.parametrize("chunk,dk,stages,schedule,hot_rows", [
    (512, 128, 2, {}, ()),  # every bound holds
    (512, 128, 2, {}, ((0, 300, 0),)),  # block 2 fails its bound: pass 1's maxima, then pass 2
    (384, 64, 3, dict(overlap=True), ((0, 200, 0),)),  # the overlapped schedule, an odd block count
])
def test_bound_formed_in_the_kernel_matches_the_reference_in_the_interpreter(rng, _interpreter, chunk, dk, stages,
                                                                             schedule, hot_rows):
  """k_scale: the kernel forms the bound |q_r| k_scale + 1e-3 itself (|q_r| from Q Q^T's diagonal by wgmma)
  and takes the same decisions as with chunk_attention's XLA bound: the float32 reference with that bound."""
  params, gpu_callbacks = _interpreter
  batch, heads, n_chunks, scale = 1, 2, 2, 0.7
  length = n_chunks * chunk
  q, k = _inputs(rng, batch, length, heads, dk, jnp.bfloat16, hot_rows)
  g = ca._Geom(batch, heads, n_chunks, chunk, chunk, dk, dk, sm.BLOCK, sm.BLOCK)
  bound = ca._score_bound(q, k, g, scale * ca._LOG2E)
  holds = _decisions(q, k, bound, chunk, sm.BLOCK, scale)
  assert holds.any() and holds.all() != bool(hot_rows)
  k_scale = ca._key_scale(k, g, scale * ca._LOG2E)
  p_buf, rscale, lse = sm.chunk_scores_mgpu(q, k, None, chunk=chunk, scale=scale, stages=stages, k_scale=k_scale,
                                            interpret=params, **schedule)
  assert not gpu_callbacks.get_races().races_found
  _assert_matches_reference((p_buf, rscale, lse), q, k, chunk, scale, bound)


def test_bound_formed_in_the_kernel_lowers_for_cuda():
  """k_scale at the benchmark shape: one Mosaic GPU call, no bound array in."""
  q = jax.ShapeDtypeStruct((1, 32768, 4, 256), jnp.bfloat16)
  k_scale = jax.ShapeDtypeStruct((1, 4, 16), jnp.float32)
  fn = lambda q, k, s: sm.chunk_scores_mgpu(q, k, None, chunk=2048, scale=1.0, stages=4, k_scale=s)  # noqa: E731
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(q, q, k_scale)
  assert exported.mlir_module().count(f"custom_call @{sm.MOSAIC_GPU_CALL}(") == 1


@pytest.mark.parametrize("change,message", [
    (dict(both=True), "not both"), (dict(shape=(1, 2, 3)), "k_scale must be float32")])
def test_key_scale_is_checked(change, message):
  q = jnp.zeros((1, 512, 2, 64), jnp.bfloat16)
  k_scale = jnp.zeros(change.get("shape", (1, 2, 2)), jnp.float32)
  bound = jnp.zeros((1, 2, 512), jnp.float32) if change.get("both") else None
  with pytest.raises(ValueError, match=message):
    sm.chunk_scores_mgpu(q, q, bound, chunk=256, scale=1.0, k_scale=k_scale)


@pytest.mark.gpu
def test_bound_formed_in_the_kernel_matches_the_xla_bound_on_hopper(rng):
  """Compiled on the GPU: the scores with k_scale (bound formed in the kernel) equal those with the XLA
  bound (the same decisions: some blocks fail, some hold), and match the reference."""
  if not ca._is_hopper():
    pytest.fail("needs a compute-capability 9.0 GPU (run with MEGALODON_TEST_PLATFORM=gpu on an H100/H200)")
  batch, heads, n_chunks, chunk, dk, scale = 1, 2, 2, 512, 128, 0.7
  length = n_chunks * chunk
  q, k = _inputs(rng, batch, length, heads, dk, jnp.bfloat16, ((0, 300, 1), (0, 700, 0)))
  g = ca._Geom(batch, heads, n_chunks, chunk, chunk, dk, dk, sm.BLOCK, sm.BLOCK)
  bound = ca._score_bound(q, k, g, scale * ca._LOG2E)
  holds = _decisions(q, k, bound, chunk, sm.BLOCK, scale)
  assert holds.any() and not holds.all()
  inner = jax.jit(lambda q, k, s: sm.chunk_scores_mgpu(q, k, None, chunk=chunk, scale=scale, stages=4, k_scale=s))(
      q, k, ca._key_scale(k, g, scale * ca._LOG2E))
  outer = jax.jit(lambda q, k, b: sm.chunk_scores_mgpu(q, k, b, chunk=chunk, scale=scale, stages=4))(q, k, bound)
  visited = _visited(n_chunks, chunk, sm.BLOCK)
  for mine, theirs in zip(inner, outer):
    mine, theirs = np.asarray(mine, np.float32), np.asarray(theirs, np.float32)
    if mine.ndim == 4:
      mine, theirs = np.where(visited, mine, 0.0), np.where(visited, theirs, 0.0)
    np.testing.assert_array_equal(mine, theirs)
