"""kernels_pallas/timestep_norm_mgpu_bwd.py on the CPU: the kernel under Mosaic GPU's interpreter
against jax.vjp of the reference TimestepNorm (float64), its lowering for CUDA, its refusals.

The interpreter (tests/mgpu_interpreter.py) runs each warpgroup as a thread with TMA copies,
barriers and a race detector simulated; here it checks the reverse pipeline's tile order and
slots, the shared-memory round trips of the suffix sums, the carry across tiles and blocks, and the
per-program outputs. The forward's saved statistics (mu_run, rstd_run) come from a float64 Welford
walk in numpy, rounded to float32 as the forward kernel would save them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import timestep_norm_mgpu_bwd as tb
from megalodon_jax.ops import timestep_norm as tsn
from tests.mgpu_lowering import capture_smem_requests

EPS = 1e-5


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _saved_stats(x, n0, mu0, var0, groups):
  """float64 Welford over the steps -> mu_run, rstd_run [B, G, L] float32 (the forward's saves)."""
  batch, length, dim = x.shape
  xg = np.asarray(x, np.float64).reshape(batch, length, groups, dim // groups)
  m, v = xg.mean(-1), xg.var(-1)
  mu, var = np.empty((batch, length, groups)), np.empty((batch, length, groups))
  for b in range(batch):
    n, mc, vc = float(n0[b]), np.array(mu0[b], np.float64), np.array(var0[b], np.float64)
    for t in range(length):
      delta = m[b, t] - mc
      mc = mc + delta / (n + 1)
      vc = (n * vc + v[b, t]) / (n + 1) + delta * delta * n / (n + 1) ** 2
      n += 1
      mu[b, t], var[b, t] = mc, vc
  to_bgl = lambda a: np.ascontiguousarray(np.moveaxis(a, 1, 2)).astype(np.float32)  # noqa: E731
  return to_bgl(mu), to_bgl(1.0 / np.sqrt(var + EPS))


def _reference_grads(x, w, bias, dy, n0, mu0, var0, g_mu, g_var, groups):
  """jax.vjp of the sequential reference in float64: dx, dw, db, d_mu0, d_var0."""
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731

    def forward(x, w, bias, mu0, var0):
      state = tsn.TimestepNormState(jnp.asarray(n0, jnp.int32), mu0, var0)
      y, final = tsn.timestep_norm(x, w, bias, num_groups=groups, eps=EPS, state=state, method="sequential")
      return y, final.mean, final.var

    _, vjp = jax.vjp(forward, f64(x), f64(w), f64(bias), f64(mu0), f64(var0))
    return [np.asarray(a) for a in vjp((f64(dy), f64(g_mu), f64(g_var)))]


@pytest.fixture
def _interpreter(monkeypatch):
  """Mosaic GPU's CPU interpreter, completed for our kernels (tests/mgpu_interpreter.py)."""
  from tests.mgpu_interpreter import mosaic_gpu_interpreter
  yield from mosaic_gpu_interpreter(monkeypatch)


# (batch, length, dim, groups, block_t, stages, wgs, dtype, mean, n0). wgs = 2: two warpgroups split
# the group's features and exchange their per-step sums every tile (the exchange's slots and
# barriers are what the race detector watches). The suffix mask is held in registers (mask_regs)
# by default at T = 64 (one warpgroup) and with two warpgroups up to T = 128; the other cases
# select with an iota compare; "..._select" forces the latter.
CASES = {
    # Prior state on one sequence only (count 0 on the other: its state adjoints are 0).
    "f32_k64_t64": (2, 256, 128, 2, 64, 2, 1, jnp.float32, 0.0, (0, 5)),
    "f32_k64_t64_wgs2": (2, 256, 128, 2, 64, 2, 2, jnp.float32, 0.0, (0, 5)),
    "f32_k64_t64_wgs2_select": (2, 256, 128, 2, 64, 2, 2, jnp.float32, 0.0, (0, 5)),
    # Two 64-step blocks per tile: the suffix sums chain from the later block to the earlier.
    "f32_k64_t128": (2, 512, 256, 4, 128, 2, 1, jnp.float32, 0.0, (3, 0)),
    # K = 128: two 64-feature chunks per group (row sums add across chunks); with 2 warpgroups,
    # one 64-feature chunk each.
    "f32_k128_t64": (2, 256, 256, 2, 64, 2, 1, jnp.float32, 0.0, (7, 2)),
    "f32_k128_t128_wgs2": (1, 256, 256, 2, 128, 1, 2, jnp.float32, 0.0, (7,)),
    # A large mean: e_t = sum(xh) / (K r) has no cancellation where m_t - mu_{t-1} would.
    "f32_mean100": (2, 256, 128, 2, 128, 1, 1, jnp.float32, 100.0, (0, 4)),
    "bf16_k64_t128": (2, 512, 256, 4, 128, 3, 1, jnp.bfloat16, 0.0, (2, 9)),
    # 32 features per warpgroup: [T, 32] boxes with a 64-byte swizzle.
    "bf16_mean100_wgs2": (1, 256, 128, 2, 128, 3, 2, jnp.bfloat16, 100.0, (3,)),
    "bf16_mean100_n0_zero": (2, 256, 128, 2, 64, 4, 1, jnp.bfloat16, 100.0, (0, 0)),
    # tile_wgs (a last dict of keyword arguments): warpgroups on different tiles hand the carry on
    # through shared memory (slots and barriers the race detector watches); 2 or more tiles each,
    # with ring refills (stages below the tiles per warpgroup).
    "f32_k64_t64_tiles2": (2, 512, 128, 2, 64, 2, 1, jnp.float32, 0.0, (0, 5), dict(tile_wgs=2)),
    "f32_k64_t64_tiles2_reload_select": (1, 512, 128, 2, 64, 1, 1, jnp.float32, 0.0, (5,),
                                         dict(tile_wgs=2, reload_tile=True, mask_regs=False)),
    "f32_k64_t64_tiles4": (1, 512, 128, 2, 64, 1, 1, jnp.float32, 0.0, (3,), dict(tile_wgs=4)),
    "f32_k64_t64_tiles4_keep_mask": (2, 512, 128, 2, 64, 1, 1, jnp.float32, 0.0, (3, 0),
                                     dict(tile_wgs=4, reload_tile=False, mask_regs=True)),
    # K = 128 (two chunks) and two 64-step blocks per tile.
    "bf16_k128_t128_tiles2": (1, 512, 256, 2, 128, 1, 1, jnp.bfloat16, 0.0, (7,), dict(tile_wgs=2)),
    "bf16_mean100_tiles4": (2, 512, 128, 2, 64, 2, 1, jnp.bfloat16, 100.0, (0, 4), dict(tile_wgs=4)),
    # Three tile warpgroups: 7 tiles (warpgroup 0 takes 3, the others 2: a dynamic trip count, the
    # walk's last tile and the state adjoints on warpgroup 0), 6 tiles (even), 5 tiles of 128 steps
    # (the last on warpgroup 1); the default re-reads x, dy and w^ and selects the mask; "_mask"
    # holds it, "_keep" keeps xh, dyw and w^ in registers.
    "f32_k64_t64_tiles3_uneven": (2, 448, 128, 2, 64, 1, 1, jnp.float32, 0.0, (0, 5), dict(tile_wgs=3)),
    "bf16_k64_t64_tiles3_uneven": (1, 448, 128, 2, 64, 2, 1, jnp.bfloat16, 0.0, (4,), dict(tile_wgs=3)),
    "f32_k64_t64_tiles3_even_mask": (1, 384, 128, 2, 64, 1, 1, jnp.float32, 0.0, (3,),
                                     dict(tile_wgs=3, mask_regs=True)),
    "bf16_k64_t128_tiles3_keep": (1, 640, 128, 2, 128, 1, 1, jnp.bfloat16, 100.0, (7,),
                                   dict(tile_wgs=3, reload_tile=False)),
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_in_the_interpreter(rng, _interpreter, case):
  params, gpu_callbacks = _interpreter
  batch, length, dim, groups, block_t, stages, wgs, dtype, mean, n0, *extra = CASES[case]
  extra = extra[0] if extra else {"mask_regs": False if case.endswith("_select") else None}
  # Inputs rounded to the kernel's dtype first: the reference sees exactly the kernel's values.
  rounded = lambda a: np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))  # noqa: E731
  x = rounded(mean + rng.standard_normal((batch, length, dim)))
  dy = rounded(rng.standard_normal((batch, length, dim)))
  w = (0.3 * rng.standard_normal(dim)).astype(np.float32)
  bias = (0.3 * rng.standard_normal(dim)).astype(np.float32)
  n0 = np.asarray(n0, np.float32)
  mu0 = (mean + rng.standard_normal((batch, groups))).astype(np.float32)
  var0 = (0.5 + rng.random((batch, groups))).astype(np.float32)
  g_mu, g_var = (rng.standard_normal((batch, groups)).astype(np.float32) for _ in range(2))
  mu_run, rstd_run = _saved_stats(x, n0, mu0, var0, groups)

  got = tb.timestep_norm_bwd_mgpu(
      jnp.asarray(x, dtype), jnp.asarray(dy, dtype), jnp.asarray(w + 1.0), jnp.asarray(mu_run),
      jnp.asarray(rstd_run), jnp.asarray(n0), jnp.asarray(mu0), jnp.asarray(var0), jnp.asarray(g_mu),
      jnp.asarray(g_var), num_groups=groups, eps=EPS, block_t=block_t, stages=stages, wgs=wgs,
      interpret=params, **extra)
  assert not gpu_callbacks.get_races().races_found
  dx, dw, db, d_mu0, d_var0 = got
  assert dx.shape == x.shape and dx.dtype == dtype
  assert dw.shape == db.shape == (dim,) and d_mu0.shape == d_var0.shape == (batch, groups)
  want = _reference_grads(x, w, bias, dy, n0, mu0, var0, g_mu, g_var, groups)
  # float32: the kernel's float32 sums over 64-256 features and up to 512 steps against float64,
  # and mu_run / rstd_run rounded to float32 (~1e-7 relative each); seen up to 4e-6 (dw at mean
  # 100, where xh = x r - mu r subtracts two float32 products of size 100 r). bfloat16: dx is
  # rounded to bfloat16 on output (2^-9 relative per element, up to 2^-8 of the largest), the
  # float32 outputs keep float32 accuracy because the inputs are exact bfloat16 values.
  dx_tol, tol = (1e-5, 2e-5) if dtype == jnp.float32 else (8e-3, 2e-5)
  assert _rel_err(dx, want[0]) < dx_tol
  for name, mine, theirs in zip(("dw", "db", "d_mu0", "d_var0"), (dw, db, d_mu0, d_var0), want[1:]):
    assert _rel_err(mine, theirs) < tol, name
  if not n0.all():  # no prior observations: the prior state has no influence
    assert np.all(np.asarray(d_mu0)[n0 == 0] == 0.0) and np.all(np.asarray(d_var0)[n0 == 0] == 0.0)


def _shapes(batch, length, dim, groups, dtype=jnp.bfloat16):
  s, f32 = jax.ShapeDtypeStruct, jnp.float32
  return (s((batch, length, dim), dtype), s((batch, length, dim), dtype), s((dim,), f32),
          s((batch, groups, length), f32), s((batch, groups, length), f32), s((batch,), f32),
          *(s((batch, groups), f32) for _ in range(4)))


@pytest.mark.parametrize("block_t,stages,wgs,mask_regs,tile_wgs", [
    (128, 4, 1, None, 1), (64, 8, 1, None, 1), (64, 8, 1, False, 1), (128, 4, 2, None, 1),
    (256, 2, 2, None, 1), (256, 2, 2, True, 1),
    (64, 4, 1, None, 2), (64, 3, 1, False, 2), (64, 5, 1, None, 2), (64, 2, 1, None, 4), (64, 1, 1, True, 4),
    (64, 2, 1, None, 3), (64, 3, 1, None, 3), (64, 3, 1, True, 3)])
def test_kernel_lowers_for_cuda(monkeypatch, block_t, stages, wgs, mask_regs, tile_wgs):
  """At the benchmark shape: one Mosaic GPU call with the right outputs, asking for no more shared
  memory than smem_bytes counts."""
  batch, length, dim, groups = 1, 32768, 4096, 64
  smem_requests, captured = capture_smem_requests(monkeypatch)
  fn = lambda *a: tb.timestep_norm_bwd_mgpu(*a, num_groups=groups, eps=EPS, block_t=block_t,  # noqa: E731
                                            stages=stages, wgs=wgs, mask_regs=mask_regs,
                                            tile_wgs=tile_wgs)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*_shapes(batch, length, dim, groups))
  assert exported.mlir_module().count(f"custom_call @{tb.MOSAIC_GPU_CALL}(") == 1
  dx, dw, db, d_mu0, d_var0 = exported.out_avals
  assert (dx.shape, dx.dtype) == ((batch, length, dim), jnp.bfloat16)
  assert dw.shape == db.shape == (dim,) and d_mu0.shape == d_var0.shape == (batch, groups)
  assert len(smem_requests) == captured  # one kernel launch (when the module could be seen)
  for request in smem_requests:
    assert int(request) <= tb.smem_bytes(block_t, stages, dim // groups, 2, wgs, tile_wgs) <= tb._SMEM_LIMIT


@pytest.mark.parametrize("change,message", [
    (dict(padding_mask=True), "padding masks are not supported"),
    (dict(segment_ids=True), "segment ids are not supported"),
    (dict(dim=192, groups=4), "multiple of 64"),  # K = 48
    (dict(length=320), "not a multiple of block_t 128"),
    (dict(block_t=96, length=384), "block_t 96 is not a multiple of 64"),
    (dict(block_t=512, stages=1), "block_t 512 is not a multiple of 64 up to 256"),
    (dict(dtype=jnp.int32), "unsupported"),
    (dict(stages=6), "KiB of shared memory"),
    (dict(wgs=4), "wgs .compute warpgroups per program. must be 1 or 2"),
    (dict(tile_wgs=5), "tile_wgs .warpgroups on different tiles. must be 1 to 4"),
    (dict(tile_wgs=2, wgs=2), "tile_wgs > 1 needs wgs = 1"),
    (dict(tile_wgs=4, length=256, block_t=128), "2 tiles of 128 steps: fewer than tile_wgs = 4"),
    (dict(tile_wgs=4, stages=3, block_t=64), "KiB of shared memory"),
    (dict(tile_wgs=3, stages=4, block_t=64), "KiB of shared memory"),
    (dict(mu_dtype=jnp.bfloat16), "mu_run must be float32"),
])
def test_unsupported_inputs_raise(change, message):
  batch, length, dim, groups = 1, change.get("length", 512), change.get("dim", 256), change.get("groups", 4)
  args = list(_shapes(batch, length, dim, groups, change.get("dtype", jnp.bfloat16)))
  if "mu_dtype" in change:
    args[3] = jax.ShapeDtypeStruct(args[3].shape, change["mu_dtype"])
  flags = jnp.zeros((batch, length), jnp.int32)
  extra = {key: flags for key in ("padding_mask", "segment_ids") if change.get(key)}
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda *a: tb.timestep_norm_bwd_mgpu(*a, num_groups=groups, eps=EPS,
                                                        block_t=change.get("block_t", 128),
                                                        stages=change.get("stages", 4),
                                                        wgs=change.get("wgs", 1),
                                                        tile_wgs=change.get("tile_wgs", 1), **extra), *args)
