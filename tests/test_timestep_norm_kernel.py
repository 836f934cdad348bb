"""Pallas TimestepNorm kernels (interpreted on CPU) against the plain-JAX reference.

Shapes are deliberately odd: L = 37 is not a multiple of any tile, D / G = 6 features per group
is not a power of 2 (the kernels pad it to 8 and mask), and the time splits do not divide the
tiles evenly. The tiled GPU design (KernelConfig.tiled) runs with tiles of 8 and 16 steps, 2 and 4
groups per program and scan chunks of 2 and 4 tiles (5 or 3 tiles: the last chunk is partial).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kernels_pallas import timestep_norm as K
from megalodon_jax.ops import timestep_norm as tsn

B, L, D, G = 2, 37, 24, 4

# (backend, config): the Triton (GPU) variant with its options, and the Mosaic (TPU) variant
# with a tile that does not divide L and one longer than L (a single whole-sequence block).
CONFIGS = {
    "tile8": ("triton", K.KernelConfig(block_t=8)),
    "tile16_splits3_cumsum_ahead3": ("triton", K.KernelConfig(block_t=16, time_splits=3, cumsum=True,
                                                              prefetch=3)),
    "tile8_splits2_noprefetch": ("triton", K.KernelConfig(block_t=8, time_splits=2, prefetch=0)),
    "mosaic_tile8": ("mosaic", K.KernelConfig(block_t=8)),
    "mosaic_tile64": ("mosaic", K.KernelConfig(block_t=64)),
    "tiled_t8_gb2_c2": ("triton", K.KernelConfig(tiled=K.TiledConfig(block_t=8, groups_per_block=2,
                                                                     scan_chunk=2, scan_groups=2))),
    "tiled_t16_gb4_c4": ("triton", K.KernelConfig(tiled=K.TiledConfig(block_t=16, groups_per_block=4,
                                                                      scan_chunk=4))),
    # The step-wise backward: per-step kernels on 2 groups (4 without segment_ids), passes over
    # x and dy in tiles of 8 steps x 4 groups, 3 tiles per dx program (5 tiles: a partial one).
    "steps_t16_p8": ("triton", K.KernelConfig(tiled=K.TiledConfig(
        block_t=16, groups_per_block=2, scan_chunk=4, scan_groups=2, backward="steps",
        step_groups=4, pass_block_t=8, pass_groups=4, pass_tiles=3))),
    # The same with the group blocks as the fastest launch axis (grid (G / Gb, tiles, B)).
    "steps_t16_p8_groups_fastest": ("triton", K.KernelConfig(tiled=K.TiledConfig(
        block_t=16, groups_per_block=2, scan_chunk=4, scan_groups=2, backward="steps",
        step_groups=4, pass_block_t=8, pass_groups=2, pass_tiles=3, groups_fastest=True))),
}
TILED = "tiled_t8_gb2_c2"
STEPS = "steps_t16_p8"


def make_inputs(rng, *, pad=True, segments=True, carry=True, dtype=np.float32):
  x = (3.0 + 2.0 * rng.standard_normal((B, L, D))).astype(dtype)
  w = (0.3 * rng.standard_normal(D)).astype(np.float32)
  b = (0.3 * rng.standard_normal(D)).astype(np.float32)
  mask = seg = state = None
  if pad:
    mask = rng.random((B, L)) < 0.2
    mask[0, :2] = True
    mask[1, 16:32] = True   # Whole tiles (and a whole time split of tile8_splits2) padded.
    mask[1, -3:] = True     # Padded tail.
  if segments:
    seg = np.cumsum(rng.random((B, L)) < 0.12, axis=1).astype(np.int32)
    seg[0, :6] = seg[0, 0]  # The carried state of row 0 stays in use for a few steps.
    seg[0, 16:] += 5        # A reset exactly at a tile / split boundary.
    seg[0, 9:] += 3         # ... and one in the middle of a tile.
  if carry:
    state = tsn.TimestepNormState(
        count=np.array([6, 0], np.int32),   # Row 1: count 0 with a nonzero mean/var.
        mean=(3.0 + rng.standard_normal((B, G))).astype(np.float32),
        var=(1.0 + rng.random((B, G))).astype(np.float32))
  return x, w, b, mask, seg, state


def run(fn, config, x, w, b, mask, seg, state):
  """config: a CONFIGS key (or None for the references)."""
  backend, config = CONFIGS[config] if config else (None, None)
  return fn(x, w, b, num_groups=G, state=state, padding_mask=mask, segment_ids=seg, config=config,
            backend=backend)


def max_rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


CASES = {"everything": {}, "plain": {"pad": False, "segments": False, "carry": False},
         "no_segments": {"segments": False}}


@pytest.mark.parametrize("config,case", [(c, "everything") for c in CONFIGS]
                         + [("tile16_splits3_cumsum_ahead3", "plain"), ("tiled_t16_gb4_c4", "plain"),
                            (TILED, "no_segments"), ("tiled_t16_gb4_c4", "no_segments")])
def test_forward_matches_reference(rng, config, case):
  opts = CASES[case]
  args = make_inputs(rng, **opts)
  y, state = run(K.timestep_norm_pallas, config, *args)
  y_ref, state_ref = run(K.timestep_norm_reference, None, *args)
  assert y.dtype == jnp.float32 and y.shape == (B, L, D)
  assert max_rel(y, y_ref) < 1e-5
  np.testing.assert_array_equal(state.count, state_ref.count)
  assert state.count.dtype == jnp.int32
  np.testing.assert_allclose(state.mean, state_ref.mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.var, state_ref.var, rtol=1e-5, atol=1e-6)
  if args[3] is not None:
    assert np.all(np.asarray(y)[args[3]] == 0.0)   # Padded steps are exactly 0.


def loss_and_grads(fn, config, x, w, b, mask, seg, state, rng_weights):
  """Gradients of a random linear functional of (y, new mean, new var) w.r.t. every input."""
  wy, wm, wv = rng_weights

  def loss(x, w, b, mean, var):
    y, new = run(fn, config, x, w, b, mask, seg, state._replace(mean=mean, var=var))
    return (jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(new.mean * wm)
            + jnp.sum(new.var * wv))
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, w, b, state.mean, state.var)


def sequential_reference(x, w, b, *, config, backend, **kwargs):
  """The op's sequential scan: the same semantics as timestep_norm_reference, compiles faster."""
  del config, backend
  return tsn.timestep_norm(x, w, b, method="sequential", **kwargs)


@pytest.fixture(scope="module")
def grad_case():
  """Inputs, output weights and reference gradients shared by the gradient tests."""
  return make_grad_case(segments=True)


def make_grad_case(segments: bool):
  rng = np.random.default_rng(1234)
  args = make_inputs(rng, segments=segments)
  weights = (rng.standard_normal((B, L, D)).astype(np.float32),
             rng.standard_normal((B, G)).astype(np.float32),
             rng.standard_normal((B, G)).astype(np.float32))
  return args, weights, loss_and_grads(sequential_reference, None, *args, weights)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "tile8"])
def test_gradients_match_reference(grad_case, config):
  check_gradients(grad_case, config)


@pytest.mark.parametrize("config", [TILED, "tiled_t16_gb4_c4", STEPS])
def test_tiled_gradients_without_segments(config):
  """The tiled design's scans take a separate path (prefix sums) without segment_ids."""
  check_gradients(make_grad_case(segments=False), config)


def check_gradients(case, config):
  args, weights, want = case
  got = loss_and_grads(K.timestep_norm_pallas, config, *args, weights)
  for name, g, r in zip(("x", "weight", "bias", "mean", "var"), got, want):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    assert max_rel(g, r) < 2e-5, name
  assert np.max(np.abs(np.asarray(got[0])[args[3]])) == 0.0   # No gradient into padded steps.
  assert np.max(np.abs(np.asarray(want[3]))) > 1e-2           # The carried state does matter.


@pytest.mark.parametrize("config", ["tile8_splits2_noprefetch", TILED, "tiled_t16_gb4_c4"])
def test_all_padded_passes_the_state_through(rng, config):
  """A fully padded sequence: output 0 and the state unchanged bit for bit (even with count 0)."""
  x, w, b, _, _, state = make_inputs(rng, pad=False, segments=False)
  mask = np.ones((B, L), bool)
  y, new = run(K.timestep_norm_pallas, config, x, w, b, mask, None, state)
  assert np.all(np.asarray(y) == 0.0)
  for got, want in zip(new, state):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("config", [pytest.param("tile8_splits2_noprefetch", marks=pytest.mark.slow),
                                    TILED, "tiled_t16_gb4_c4", STEPS])
def test_all_padded_passes_the_gradient_through(rng, config):
  """The gradient w.r.t. the incoming state is the gradient w.r.t. the outgoing one (the tiled
  design chains adjoints divided by the count, so count 0 is a special case there)."""
  x, w, b, _, _, state = make_inputs(rng, pad=False, segments=False)
  mask = np.ones((B, L), bool)
  wm, wv = rng.standard_normal((2, B, G)).astype(np.float32)

  def loss(m, v):
    new = run(K.timestep_norm_pallas, config, x, w, b, mask, None, state._replace(mean=m, var=v))[1]
    return jnp.sum(new.mean * wm) + jnp.sum(new.var * wv)
  grads = jax.grad(loss, argnums=(0, 1))(state.mean, state.var)
  np.testing.assert_allclose(grads[0], wm, rtol=1e-6)
  np.testing.assert_allclose(grads[1], wv, rtol=1e-6)


@pytest.mark.parametrize("config", ["tile8", TILED])
def test_two_pieces_equal_one_pass(rng, config):
  x, w, b, mask, seg, state = make_inputs(rng)
  cut = 20
  seg[:, cut] = seg[:, cut - 1]   # No reset at the cut: statistics continue across it.
  seg[:, cut + 1:] = np.maximum(seg[:, cut + 1:], seg[:, cut:cut + 1])
  y, new = run(K.timestep_norm_pallas, config, x, w, b, mask, seg, state)
  y1, s1 = run(K.timestep_norm_pallas, config, x[:, :cut], w, b, mask[:, :cut], seg[:, :cut], state)
  y2, s2 = run(K.timestep_norm_pallas, config, x[:, cut:], w, b, mask[:, cut:], seg[:, cut:], s1)
  np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(s2.count, new.count)
  np.testing.assert_allclose(s2.mean, new.mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s2.var, new.var, rtol=1e-5, atol=1e-6)


def test_bfloat16(rng):
  x, w, b, mask, seg, state = make_inputs(rng)
  xb = jnp.asarray(x, jnp.bfloat16)
  config = "tile16_splits3_cumsum_ahead3"
  y, new = run(K.timestep_norm_pallas, config, xb, w, b, mask, seg, state)
  y_ref, new_ref = run(K.timestep_norm_reference, None, xb, w, b, mask, seg, state)
  assert y.dtype == jnp.bfloat16
  assert max_rel(y.astype(jnp.float32), y_ref.astype(jnp.float32)) < 1e-2
  np.testing.assert_allclose(new.var, new_ref.var, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_gradient(rng):
  x, w, b, mask, seg, state = make_inputs(rng)
  xb = jnp.asarray(x, jnp.bfloat16)
  config = "tile16_splits3_cumsum_ahead3"
  dx = jax.grad(lambda x: jnp.sum(run(K.timestep_norm_pallas, config, x, w, b, mask, seg,
                                      state)[0].astype(jnp.float32)))(xb)
  dx_ref = jax.grad(lambda x: jnp.sum(run(sequential_reference, None, x, w, b, mask, seg,
                                          state)[0].astype(jnp.float32)))(xb)
  assert dx.dtype == jnp.bfloat16
  assert max_rel(dx.astype(jnp.float32), dx_ref.astype(jnp.float32)) < 2e-2


@pytest.mark.parametrize("cumsum,segments", [(True, False), (False, True)])
def test_lowers_to_triton(cumsum, segments):
  """The forward and backward kernels lower to Triton IR for a CUDA target (no GPU needed):
  catches primitives or shapes that the Pallas Triton backend does not support."""
  config = K.KernelConfig(block_t=64, time_splits=2, cumsum=cumsum)

  def grads(x, w, b, mask, seg):
    def loss(x, w, b):
      y, new = K.timestep_norm_pallas(x, w, b, num_groups=4, padding_mask=mask,
                                      segment_ids=seg if segments else None, interpret=False,
                                      config=config)
      return jnp.sum(y.astype(jnp.float32)) + jnp.sum(new.var)
    return jax.grad(loss, argnums=(0, 1, 2))(x, w, b)
  shapes = (jax.ShapeDtypeStruct((1, 300, 256), jnp.bfloat16), jax.ShapeDtypeStruct((256,), jnp.float32),
            jax.ShapeDtypeStruct((256,), jnp.float32), jax.ShapeDtypeStruct((1, 300), jnp.bool_),
            jax.ShapeDtypeStruct((1, 300), jnp.int32))
  exported = export.export(
      jax.jit(grads), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
  text = exported.mlir_module()
  for name in ("timestep_norm_fwd", "timestep_norm_fwd_summary", "timestep_norm_bwd",
               "timestep_norm_bwd_summary"):
    assert f'name = "{name}"' in text, name


@pytest.mark.parametrize("segments,backward", [(False, "tiles"), (True, "tiles"), (True, "steps")])
def test_tiled_lowers_to_triton(segments, backward):
  """The tiled design's kernels lower to Triton IR for a CUDA target (no GPU needed), at the
  target's group width (64 features) with 4 groups per program."""
  config = K.KernelConfig(tiled=K.TiledConfig(block_t=64, groups_per_block=4, scan_chunk=4,
                                              backward=backward, pass_block_t=32, pass_groups=1,
                                              pass_tiles=3))

  def fwd_and_grads(x, w, b, mask, seg):
    def loss(x, w, b):
      y, new = K.timestep_norm_pallas(x, w, b, num_groups=8, padding_mask=mask,
                                      segment_ids=seg if segments else None, interpret=False,
                                      config=config)
      return jnp.sum(y.astype(jnp.float32)) + jnp.sum(new.var), y
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w, b)
  shapes = (jax.ShapeDtypeStruct((2, 300, 512), jnp.bfloat16), jax.ShapeDtypeStruct((512,), jnp.float32),
            jax.ShapeDtypeStruct((512,), jnp.float32), jax.ShapeDtypeStruct((2, 300), jnp.bool_),
            jax.ShapeDtypeStruct((2, 300), jnp.int32))
  exported = export.export(
      jax.jit(fwd_and_grads), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
  text = exported.mlir_module()
  names = ["tiled_bwd_scan", "tiled_fwd_summary", "tiled_fwd_scan", "tiled_fwd"]
  names += (["tiled_bwd_summary", "tiled_bwd"] if backward == "tiles" else
            ["steps_bwd_sums", "steps_bwd_maps", "steps_bwd_coefficients", "steps_bwd_apply"])
  assert set(re.findall(r'name = "timestep_norm_(\w+)"', text)) == set(names)


def welford_float64(x, num_groups, eps=1e-5):
  """Step-by-step float64 TimestepNorm without weight, bias, padding or carried state."""
  x = np.asarray(x, np.float64)
  batch, length, dim = x.shape
  xg = x.reshape(batch, length, num_groups, dim // num_groups)
  y = np.zeros_like(xg)
  for b in range(batch):
    n, mu, var = 0, np.zeros(num_groups), np.zeros(num_groups)
    for t in range(length):
      m_t, v_t = xg[b, t].mean(-1), xg[b, t].var(-1)
      n += 1
      delta = m_t - mu
      mu = mu + delta / n
      var = ((n - 1) * var + v_t) / n + delta ** 2 * (n - 1) / n ** 2
      y[b, t] = (xg[b, t] - mu[:, None]) / np.sqrt(var[:, None] + eps)
  return y.reshape(batch, length, dim)


def test_tiled_has_no_catastrophic_cancellation(rng):
  """A large offset (1000 sigma) and a drift of the mean along time (30 sigma): the tiled design's
  sums about the carried means keep float32 accuracy (sums of squares about 0 would lose ~6
  digits to cancellation)."""
  x = 1000.0 + rng.standard_normal((B, L, D)) + np.linspace(0.0, 30.0, L)[None, :, None]
  x = x.astype(np.float32)
  zeros = np.zeros(D, np.float32)
  y, _ = K.timestep_norm_pallas(x, zeros, zeros, num_groups=G,
                                config=CONFIGS[TILED][1])
  want = welford_float64(x, G)
  # float32 inputs of magnitude 1000 carry absolute errors ~6e-5: so does any float32 method.
  assert np.max(np.abs(np.asarray(y, np.float64) - want)) < 2e-3


def test_op_dispatches_to_the_kernel(rng):
  """megalodon_jax.ops.timestep_norm(method="pallas") runs this kernel (interpreted on CPU)."""
  x, w, b, mask, seg, state = make_inputs(rng)
  y, new = tsn.timestep_norm(x, w, b, num_groups=G, state=state, padding_mask=mask,
                             segment_ids=seg, method="pallas")
  y_ref, new_ref = run(sequential_reference, None, x, w, b, mask, seg, state)
  assert max_rel(y, y_ref) < 1e-5
  np.testing.assert_array_equal(new.count, new_ref.count)
  np.testing.assert_allclose(new.var, new_ref.var, rtol=1e-5)


def test_lowers_to_mosaic():
  """The TPU variant lowers to Mosaic for a TPU target (no TPU needed)."""
  config = K.KernelConfig(block_t=128)

  def grads(x, w, b, mask, seg):
    def loss(x, w, b):
      y, new = K.timestep_norm_pallas(x, w, b, num_groups=8, padding_mask=mask, segment_ids=seg,
                                      interpret=False, config=config, backend="mosaic")
      return jnp.sum(y.astype(jnp.float32)) + jnp.sum(new.var)
    return jax.grad(loss, argnums=(0, 1, 2))(x, w, b)
  shapes = (jax.ShapeDtypeStruct((2, 300, 512), jnp.bfloat16), jax.ShapeDtypeStruct((512,), jnp.float32),
            jax.ShapeDtypeStruct((512,), jnp.float32), jax.ShapeDtypeStruct((2, 300), jnp.bool_),
            jax.ShapeDtypeStruct((2, 300), jnp.int32))
  text = export.export(jax.jit(grads), platforms=["tpu"])(*shapes).mlir_module()
  assert text.count("tpu_custom_call") == 2


def test_config_and_input_errors():
  with pytest.raises(ValueError, match="block_t"):
    K.KernelConfig(block_t=48)
  with pytest.raises(ValueError, match="time_splits"):
    K.KernelConfig(time_splits=0)
  with pytest.raises(ValueError, match="prefetch"):
    K.KernelConfig(prefetch=-1)
  with pytest.raises(ValueError, match="block_t must be a power of 2"):
    K.TiledConfig(block_t=48)
  with pytest.raises(ValueError, match="groups_per_block"):
    K.TiledConfig(groups_per_block=3)
  with pytest.raises(ValueError, match="'tiles' or 'steps'"):
    K.TiledConfig(backward="chunks")
  with pytest.raises(ValueError, match="pass_block_t"):
    K.TiledConfig(pass_block_t=24)
  with pytest.raises(ValueError, match="pass_block_t must be >= 8"):
    K.TiledConfig(pass_block_t=4)
  with pytest.raises(ValueError, match="pass_tiles"):
    K.TiledConfig(pass_tiles=0)
  x = jnp.zeros((2, 5, 12))
  with pytest.raises(ValueError, match="divisible by num_groups"):
    K.timestep_norm_pallas(x, jnp.zeros(12), jnp.zeros(12), num_groups=5)
  with pytest.raises(ValueError, match="backend"):
    K.timestep_norm_pallas(x, jnp.zeros(12), jnp.zeros(12), num_groups=4, backend="cuda")
  with pytest.raises(ValueError, match="Mosaic"):
    K.timestep_norm_pallas(x, jnp.zeros(12), jnp.zeros(12), num_groups=4, backend="mosaic",
                           config=K.KernelConfig(tiled=K.TiledConfig()))
