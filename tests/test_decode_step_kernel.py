"""kernels_pallas.decode_step: one TimestepNorm + CEMA step equals ops.timestep_norm and ops.cema."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import decode_step
from megalodon_jax.ops import attention, norms, rope
from megalodon_jax.ops import cema as cema_ops
from megalodon_jax.ops import timestep_norm as tsn

B, G, K, N = 2, 4, 8, 4
D = G * K
EPS = 1e-5


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  x = (normal(B, D) * 2.0 + 0.5).astype(jnp.bfloat16)
  state = tsn.TimestepNormState(jnp.asarray([5, 0], jnp.int32), normal(B, G), jnp.abs(normal(B, G)) + 0.1)
  weight, bias = normal(D) * 0.2, normal(D) * 0.2
  coeffs = cema_ops.cema_coefficients(normal(D, N, 1), normal(D, N, 1), normal(D, 1, 1), normal(D, N, 2))
  omega = normal(D) * 0.3
  h0 = jax.lax.complex(normal(B, D, N), normal(B, D, N))
  return x, state, weight, bias, coeffs, omega, h0


def _oracle(x, state, weight, bias, coeffs, omega, h0):
  """The library ops, step by step: TimestepNorm (sequential), CEMA (sequential), sum of y^2 per group."""
  x_tsn, new_state = tsn.timestep_norm(x[:, None], weight, bias, num_groups=G, eps=EPS, state=state,
                                       method="sequential")
  y, h = cema_ops.cema_sequential(x_tsn, coeffs, omega, h0, return_state=True)
  y = y[:, 0]
  sumsq = jnp.sum(jnp.square(y).reshape(B, G, K), axis=-1)
  return x_tsn[:, 0], y, sumsq, new_state, h


def _kernel_args(x, state, weight, bias, coeffs, omega, h0):
  per_group = lambda a: a.reshape((G, K) + a.shape[1:])
  return (x.reshape(B, G, K), state.count[:, None], state.mean, state.var, per_group(weight), per_group(bias),
          per_group(coeffs.p), per_group(jnp.real(coeffs.q)), per_group(jnp.imag(coeffs.q)),
          per_group(jnp.real(coeffs.eta)), per_group(jnp.imag(coeffs.eta)), per_group(omega),
          jnp.real(h0).reshape(B, G, K, N), jnp.imag(h0).reshape(B, G, K, N))


@pytest.mark.parametrize("which", ["reference", "kernel_1_group", "kernel_2_groups"])
def test_step_equals_the_library_ops(inputs, which):
  x_tsn, y, sumsq, state, h = _oracle(*inputs)
  args = _kernel_args(*inputs)
  if which == "reference":
    got = decode_step.tsn_cema_step_reference(*args, eps=EPS)
  else:
    got = decode_step.tsn_cema_step(*args, eps=EPS, groups_per_block=int(which.split("_")[1]))
  g_xt, g_y, g_ss, g_count, g_mean, g_var, g_re, g_im = got
  np.testing.assert_array_equal(np.asarray(g_count[:, 0]), np.asarray(state.count))
  assert g_xt.dtype == x_tsn.dtype
  # x_tsn is rounded to bf16: allow one bf16 ulp where float32 rounding flips it.
  np.testing.assert_allclose(np.asarray(g_xt.reshape(B, D), np.float32), np.asarray(x_tsn, np.float32),
                             rtol=8e-3, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_mean), np.asarray(state.mean), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_var), np.asarray(state.var), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_y.reshape(B, D)), np.asarray(y), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_ss), np.asarray(sumsq), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_re.reshape(B, D, N)), np.asarray(jnp.real(h)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_im.reshape(B, D, N)), np.asarray(jnp.imag(h)), rtol=1e-5, atol=1e-5)


def test_kernel_equals_its_reference_exactly_enough(inputs):
  args = _kernel_args(*inputs)
  for got, want in zip(decode_step.tsn_cema_step(*args, eps=EPS), decode_step.tsn_cema_step_reference(*args, eps=EPS)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-6, atol=2e-6)


def test_count_state_is_written_in_place_and_the_rest_is_unchanged(inputs):
  """count_state: a second buffer of the same counts gets count + 1 (the kernel never reads it)."""
  args = _kernel_args(*inputs)
  plain = decode_step.tsn_cema_step(*args, eps=EPS, groups_per_block=2)
  sentinel = jnp.full_like(args[1], -7)  # whatever the buffer held before is overwritten, not read
  shared = decode_step.tsn_cema_step(*args, eps=EPS, groups_per_block=2, count_state=sentinel)
  np.testing.assert_array_equal(np.asarray(shared[3]), np.asarray(args[1]) + 1)
  for got, want in zip(shared, plain):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  lowered = jax.jit(lambda *a: decode_step.tsn_cema_step(*a[:-1], eps=EPS, interpret=False, count_state=a[-1])).trace(
      *args, sentinel).lower(lowering_platforms=("cuda",))
  assert "tsn_cema_step" in lowered.as_text()
  with pytest.raises(ValueError, match="count_state must be like count"):
    decode_step.tsn_cema_step(*args, eps=EPS, count_state=sentinel[:, :0])


def test_kernel_lowers_for_cuda(inputs):
  """The Triton path lowers (cross-lowering from the CPU; no GPU needed)."""
  args = _kernel_args(*inputs)
  lowered = jax.jit(lambda *a: decode_step.tsn_cema_step(*a, eps=EPS, interpret=False)).trace(*args).lower(
      lowering_platforms=("cuda",))
  assert "tsn_cema_step" in lowered.as_text()


def test_bad_shapes_are_rejected(inputs):
  args = list(_kernel_args(*inputs))
  with pytest.raises(ValueError, match="groups_per_block=3 must divide"):
    decode_step.tsn_cema_step(*args, eps=EPS, groups_per_block=3)
  args[6] = args[6][:, :, :2]
  with pytest.raises(ValueError, match="p must have shape"):
    decode_step.tsn_cema_step(*args, eps=EPS)


def test_default_groups_per_block():
  assert decode_step.default_groups_per_block(64, 32, 16) == 2  # mega1.3B: 32 programs per sequence
  assert decode_step.default_groups_per_block(4, 8, 4) == 4
  assert decode_step.default_groups_per_block(6, 64, 16) == 1


# --- qk_scores_step -------------------------------------------------------------------------

C, H, DZ = 16, 2, 8


def _permutation():
  per_head = np.concatenate([np.arange(0, DZ, 2), np.arange(1, DZ, 2)])
  return (np.arange(H)[:, None] * DZ + per_head[None]).reshape(-1), per_head


@pytest.mark.parametrize("batch,count,block_k", [(1, 0, 4), (1, 9, 4), (2, 15, 8), (2, 5, 16)])
def test_scores_step_equals_the_model_attention_math(batch, count, block_k):
  """Natural layout through the library ops (rms_norm, apply_rope, cached_attention_xla's scores)
  against the kernel and its reference on the permuted layout."""
  rng = np.random.default_rng(count)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  bf16 = jnp.bfloat16
  extra = 6  # more columns after z, as in the fused projection
  proj = normal(batch + 1, H * DZ + extra).astype(bf16)  # one spare row, as the masked second row
  bias = normal(H * DZ).astype(bf16)
  scale, shift = normal(2, H * DZ) * 0.2 + 0.4, normal(2, H * DZ) * 0.2
  keys = normal(batch, C, H, DZ).astype(bf16)
  # Natural layout, model math (layers/mega_attention.py).
  z = (proj[:batch, :H * DZ] + bias).reshape(batch, 1, H, DZ)
  z = norms.rms_norm(z.astype(jnp.float32), None, EPS)
  sc, sh = scale.reshape(2, H, DZ), shift.reshape(2, H, DZ)
  position = jnp.asarray([[count]], jnp.int32)
  q = rope.apply_rope((z * sc[0] + sh[0]).astype(bf16), position)
  k = rope.apply_rope((z * sc[1] + sh[1]).astype(bf16), position)
  want_keys = jax.lax.dynamic_update_slice(keys, k, (0, count, 0, 0))
  want = jnp.einsum("bqhd,bkhd->bhqk", q, want_keys, preferred_element_type=jnp.float32)[:, :, 0]
  want = jnp.where(jnp.arange(C) <= count, want, -jnp.inf)
  # Permuted layout.
  perm, per_head = _permutation()
  args = (jnp.concatenate([proj[:, perm], proj[:, H * DZ:]], axis=1), bias[perm], scale[:, perm], shift[:, perm],
          rope.rope_frequencies(DZ), keys[..., per_head], jnp.asarray([count], jnp.int32))
  for scores, new_keys in (decode_step.qk_scores_step(*args, eps=EPS, block_k=block_k),
                           decode_step.qk_scores_step_reference(*args, eps=EPS)):
    np.testing.assert_array_equal(np.isfinite(np.asarray(scores)), np.isfinite(np.asarray(want)))
    finite = np.isfinite(np.asarray(want))
    np.testing.assert_allclose(np.asarray(scores)[finite], np.asarray(want)[finite], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(new_keys[..., np.argsort(per_head)], np.float32),
                               np.asarray(want_keys, np.float32), rtol=1e-2, atol=1e-2)


def test_scores_kernel_equals_its_reference_and_lowers_for_cuda():
  rng = np.random.default_rng(7)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  args = (normal(2, H * DZ + 4).astype(jnp.bfloat16), normal(H * DZ).astype(jnp.bfloat16), normal(2, H * DZ),
          normal(2, H * DZ), jnp.abs(normal(DZ // 2)), normal(1, C, H, DZ).astype(jnp.bfloat16),
          jnp.asarray([6], jnp.int32))
  got = decode_step.qk_scores_step(*args, eps=EPS, block_k=4)
  want = decode_step.qk_scores_step_reference(*args, eps=EPS)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))
  lowered = jax.jit(lambda *a: decode_step.qk_scores_step(*a, eps=EPS, interpret=False)).trace(*args).lower(
      lowering_platforms=("cuda",))
  assert "qk_scores_step" in lowered.as_text()
  with pytest.raises(ValueError, match="must divide the chunk"):
    decode_step.qk_scores_step(*args, eps=EPS, block_k=3)


@pytest.mark.parametrize("block_n,block_k,k_steps", [(16, 32, 1), (32, 16, 3), (16, 16, 12)])
def test_gemv_partials_sum_to_the_product(block_n, block_k, k_steps):
  """x [K] times w_t [N, K] (bf16) as split-K partials: each partial and their sum against float64."""
  rng = np.random.default_rng(block_n + k_steps)
  n, k = 64, 192
  x = jnp.asarray(rng.normal(size=k), jnp.bfloat16)
  w_t = jnp.asarray(rng.normal(size=(n, k)), jnp.bfloat16)
  got = np.asarray(decode_step.gemv_partials(x, w_t, block_n=block_n, block_k=block_k, k_steps=k_steps))
  span = block_k * k_steps
  x64, w64 = np.asarray(x, np.float64), np.asarray(w_t, np.float64)
  want = np.stack([w64[:, j:j + span] @ x64[j:j + span] for j in range(0, k, span)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got.sum(0), w64 @ x64, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(decode_step.gemv_partials_reference(x, w_t, span)), want, rtol=1e-5, atol=1e-4)


def test_gemv_partials_checks_blocks_and_lowers_for_cuda():
  x, w_t = jnp.ones((4864,), jnp.bfloat16), jnp.ones((2048, 4864), jnp.bfloat16)
  assert decode_step.default_gemv_blocks(2048, 4864) == (128, 256)
  lowered = jax.jit(lambda a, b: decode_step.gemv_partials(a, b, interpret=False)).trace(x, w_t).lower(
      lowering_platforms=("cuda",))
  assert "gemv_partials" in lowered.as_text()
  with pytest.raises(ValueError, match="power of 2 dividing"):
    decode_step.gemv_partials(x[:96], w_t[:64, :96], block_n=16, block_k=64)
  with pytest.raises(ValueError, match="k_steps=5"):
    decode_step.gemv_partials(x[:96], w_t[:64, :96], block_n=16, block_k=32, k_steps=5)
  with pytest.raises(ValueError, match="x must be"):
    decode_step.gemv_partials(x[:32], w_t[:64, :96])


@pytest.mark.parametrize("count,block_k,block_d,sub_d,options", [
    (0, 4, 32, 8, {}), (6, 4, 16, None, {}), (13, 8, 16, 8, {}), (C - 1, 4, 32, None, {}),
    (0, 4, 32, 8, {"preload": True}), (11, 4, 16, 8, {"preload": True}),
    (9, 4, 32, None, {"tiles": 2}), (C - 1, 2, 16, None, {"tiles": 4, "preload": True}),
    (5, 2, 32, None, {"tiles": 8, "preload": True}), (C - 2, 2, 32, None, {"tiles": 8, "preload": 3}),
    (0, 16, 16, None, {"mma": True, "dz": 32}),
    (C - 1, 16, 32, None, {"mma": True, "dz": 32}), (10, 16, 16, None, {"mma": True, "dz": 32}),
    (40, 16, 16, None, {"mma": True, "tiles": 2, "preload": True, "chunk": 64, "dz": 32}),
    (63, 16, 32, None, {"mma": True, "tiles": 2, "chunk": 64, "dz": 32})])
def test_attend_step_equals_dense_attention_with_the_new_entries(count, block_k, block_d, sub_d, options):
  """The block-split attention + attend_combine against a dense float64 softmax attention over the
  cache with the new key (from q/k as the model makes them) and value written at `count`: one tile
  per program (values in sub_d chunks, loads issued first with preload) and a loop over `tiles`
  tiles with an online softmax (the next `preload` tiles prefetched); mma: both products as matrix
  products (bf16 operands, the probabilities split in two bf16 parts)."""
  options = dict(options)
  chunk = options.pop("chunk", C)
  dz = options.pop("dz", DZ)  # mma: the scores' tensor-core product contracts dz / 2 >= 16 features
  rng = np.random.default_rng(count + block_k)
  dv = 32
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  args = (normal(B, H * dz + 4).astype(jnp.bfloat16), normal(H * dz).astype(jnp.bfloat16), normal(2, H * dz),
          normal(2, H * dz), jnp.abs(normal(dz // 2)), normal(B, chunk, H, dz).astype(jnp.bfloat16),
          normal(B, chunk, H, dv).astype(jnp.bfloat16), normal(B, H, dv).astype(jnp.bfloat16),
          jnp.asarray([count], jnp.int32))
  stats, acc, keys, values = decode_step.attend_step(*args, eps=EPS, block_k=block_k, block_d=block_d, sub_d=sub_d,
                                                     **options)
  span = block_k * options.get("tiles", 1)
  assert stats.shape == (B, H, chunk // span, 2) and acc.shape == (B, H, chunk // span, dv)
  got = np.asarray(decode_step.attend_combine(stats, acc))
  # The scores kernel's keys (its q/k are checked against the model's ops above); values by hand.
  scores_ref, keys_ref = decode_step.qk_scores_step_reference(*args[:6], args[-1], eps=EPS)
  np.testing.assert_array_equal(np.asarray(keys, np.float32), np.asarray(keys_ref, np.float32))
  want_values = np.asarray(args[6], np.float64).copy()
  want_values[:, count] = np.asarray(args[7], np.float64)
  np.testing.assert_array_equal(np.asarray(values, np.float64), want_values)
  s = np.asarray(scores_ref, np.float64)[..., :count + 1]
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhk,bkhd->bhd", p, want_values[:, :count + 1])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Blocks past count contribute nothing (m = -inf, l = 0, acc = 0).
  past = np.arange(chunk // span) * span > count
  assert np.all(np.asarray(stats)[:, :, past, 0] == -np.inf) and np.all(np.asarray(acc)[:, :, past] == 0)


@pytest.mark.parametrize("options", [{}, {"preload": True, "sub_d": 256, "num_warps": 8},
                                     {"block_k": 16, "block_d": 512, "tiles": 4, "preload": True},
                                     {"block_k": 16, "block_d": 1024, "mma": True}])
def test_attend_step_lowers_for_cuda(options):
  """mega1.3B's shapes (C 2048, H 2, dz 256, dv 2048): the Triton path lowers for each kernel form."""
  lowered = jax.jit(lambda *a: decode_step.attend_step(*a, eps=EPS, interpret=False, **options)).trace(
      *_mega_attend_args()).lower(lowering_platforms=("cuda",))
  assert "attend_step" in lowered.as_text()


def _mega_attend_args():
  return (jnp.zeros((1, 6656), jnp.bfloat16), jnp.zeros((512,), jnp.bfloat16), jnp.zeros((2, 512)),
          jnp.zeros((2, 512)), jnp.zeros((128,)), jnp.zeros((1, 2048, 2, 256), jnp.bfloat16),
          jnp.zeros((1, 2048, 2, 2048), jnp.bfloat16), jnp.zeros((1, 2, 2048), jnp.bfloat16),
          jnp.zeros((1,), jnp.int32))


def test_attend_step_checks_shapes():
  args = _mega_attend_args()
  with pytest.raises(ValueError, match="v_new"):
    decode_step.attend_step(*args[:7], args[7][:, :, :8], args[8], eps=EPS)
  with pytest.raises(ValueError, match="block_d"):
    decode_step.attend_step(*args, eps=EPS, block_d=96)
  with pytest.raises(ValueError, match="tiles"):
    decode_step.attend_step(*args, eps=EPS, block_k=32, tiles=3)
  with pytest.raises(ValueError, match="mma needs"):
    decode_step.attend_step(*args, eps=EPS, block_k=8, mma=True)
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  small = (normal(B, H * DZ + 4).astype(jnp.bfloat16), normal(H * DZ).astype(jnp.bfloat16), normal(2, H * DZ),
           normal(2, H * DZ), jnp.abs(normal(DZ // 2)), normal(B, C, H, DZ).astype(jnp.bfloat16),
           normal(B, C, H, 32).astype(jnp.bfloat16), normal(B, H, 32).astype(jnp.bfloat16), jnp.asarray([3], jnp.int32))
  with pytest.raises(ValueError, match=f"head dim >= 32 \\(got {DZ}"):  # wrong values on a GPU, not an error
    decode_step.attend_step(*small, eps=EPS, block_k=16, block_d=16, mma=True)


def test_attend_combine_pallas_equals_the_xla_combine():
  """The Pallas combine against attend_combine (float64 numpy of the same formula) on block stats
  with blocks past count (m = -inf, l = 0, acc = 0), and its cuda lowering at mega1.3B's shapes."""
  rng = np.random.default_rng(11)
  m = rng.normal(size=(2, H, 8)) * 3
  l = np.abs(rng.normal(size=(2, H, 8))) + 0.5
  acc = rng.normal(size=(2, H, 8, 32))
  m[:, :, 5:], l[:, :, 5:], acc[:, :, 5:] = -np.inf, 0.0, 0.0
  stats = jnp.asarray(np.stack([m, l], -1), jnp.float32)
  got = decode_step.attend_combine_pallas(stats, jnp.asarray(acc, jnp.float32), block_d=16)
  weight = np.exp(m - m.max(-1, keepdims=True))
  want = np.einsum("bhn,bhnd->bhd", weight, acc) / (weight * l).sum(-1)[..., None]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(decode_step.attend_combine(stats, jnp.asarray(acc, jnp.float32))), want,
                             rtol=1e-5, atol=1e-6)
  lowered = jax.jit(lambda s, a: decode_step.attend_combine_pallas(s, a, interpret=False)).trace(
      jnp.zeros((1, 2, 64, 2)), jnp.zeros((1, 2, 64, 2048))).lower(lowering_platforms=("cuda",))
  assert "attend_combine" in lowered.as_text()
  with pytest.raises(ValueError, match="block_d"):
    decode_step.attend_combine_pallas(stats, jnp.asarray(acc, jnp.float32), block_d=12)


@pytest.mark.parametrize("count,options", [(11, {"block_k": 4, "block_d": 16, "tiles": 2, "preload": 1}),
                                           (0, {"block_k": 4, "block_d": 32, "sub_d": 8, "preload": True})])
def test_attend_step_with_value_activation_and_deferred_rms_norm(count, options):
  """v_bias: the kernel makes v = silu(raw + bias) itself; sumsq: z's product is of the unnormalised y
  and inv = rsqrt(sum(sumsq) / D + eps) multiplies it (returned for the other columns). Against
  float64 numpy for inv and v, and a dense float64 attention over the kernel's keys and values."""
  rng = np.random.default_rng(count + 5)
  dv, groups, dim = 32, 4, 64
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  raw_v, v_bias = normal(B, H, dv).astype(jnp.bfloat16), normal(H * dv).astype(jnp.bfloat16)
  sumsq = jnp.abs(normal(B, groups)) * 8.0
  args = (normal(B, H * DZ + 4).astype(jnp.bfloat16), normal(H * DZ).astype(jnp.bfloat16), normal(2, H * DZ),
          normal(2, H * DZ), jnp.abs(normal(DZ // 2)), normal(B, C, H, DZ).astype(jnp.bfloat16),
          normal(B, C, H, dv).astype(jnp.bfloat16), raw_v, jnp.asarray([count], jnp.int32))
  stats, acc, keys, values, inv = decode_step.attend_step(*args, eps=EPS, v_bias=v_bias, sumsq=sumsq, rms_dim=dim,
                                                          **options)
  want_inv = 1.0 / np.sqrt(np.asarray(sumsq, np.float64).sum(-1, keepdims=True) / dim + EPS)
  np.testing.assert_allclose(np.asarray(inv), want_inv, rtol=1e-6)
  t = np.asarray(raw_v, np.float64) + np.asarray(v_bias, np.float64).reshape(H, dv)
  want_v = t / (1.0 + np.exp(-t))
  np.testing.assert_allclose(np.asarray(values[:, count], np.float64), want_v, rtol=8e-3, atol=1e-6)  # bf16 ulp
  others = np.arange(C) != count
  np.testing.assert_array_equal(np.asarray(values[:, others], np.float32), np.asarray(args[6][:, others], np.float32))
  scores, want_keys = decode_step.qk_scores_step_reference(*args[:6], args[-1], eps=EPS, z_scale=inv)
  np.testing.assert_array_equal(np.asarray(keys, np.float32), np.asarray(want_keys, np.float32))
  s = np.asarray(scores, np.float64)[..., :count + 1]
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhk,bkhd->bhd", p, np.asarray(values, np.float64)[:, :count + 1])
  np.testing.assert_allclose(np.asarray(decode_step.attend_combine(stats, acc)), want, rtol=1e-4, atol=1e-4)
  ref = decode_step.attend_step_reference(*args, eps=EPS, v_bias=v_bias, sumsq=sumsq, rms_dim=dim)
  np.testing.assert_allclose(np.asarray(ref[0]), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(ref[2], np.float32), np.asarray(values, np.float32))
  with pytest.raises(ValueError, match="sumsq"):
    decode_step.attend_step(*args, eps=EPS, sumsq=sumsq)
  lowered = jax.jit(lambda *a: decode_step.attend_step(*a[:-2], eps=EPS, interpret=False, v_bias=a[-2], sumsq=a[-1],
                                                       rms_dim=dim, **options)).trace(*args, v_bias, sumsq).lower(
      lowering_platforms=("cuda",))
  assert "attend_step" in lowered.as_text()




# --- tsn_cema_step with a residual addend ---------------------------------------------------


@pytest.mark.parametrize("dtype,count_state", [(jnp.bfloat16, True), (jnp.float32, False)])
def test_residual_addend_is_added_as_xla_adds_it(inputs, dtype, count_state):
  """x + residual in the kernel: the sum bitwise equal to (x + residual).astype(x.dtype), and every
  other result equal to the plain kernel's on that sum (so the step is the step of the sum)."""
  x, *rest = inputs
  rng = np.random.default_rng(11)
  args = list(_kernel_args(x.astype(dtype), *rest))
  addend = jnp.asarray(rng.normal(size=args[0].shape) * 3.0, dtype)
  total = (args[0] + addend).astype(dtype)
  extra = dict(count_state=jnp.copy(args[1])) if count_state else {}
  got = decode_step.tsn_cema_step(*args, eps=EPS, groups_per_block=2, residual=addend, **extra)
  assert len(got) == 9 and got[-1].dtype == dtype
  np.testing.assert_array_equal(np.asarray(got[-1], np.float32), np.asarray(total, np.float32))
  plain = decode_step.tsn_cema_step(total, *args[1:], eps=EPS, groups_per_block=2, **extra)
  for g, w in zip(got[:8], plain):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  want = decode_step.tsn_cema_step_reference(*args, eps=EPS, residual=addend)
  np.testing.assert_array_equal(np.asarray(want[-1], np.float32), np.asarray(total, np.float32))
  for g, w in zip(got[:8], want[:8]):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=8e-3, atol=2e-5)
  with pytest.raises(ValueError, match="residual must have x's shape"):
    decode_step.tsn_cema_step(*args, eps=EPS, residual=addend[:, :2])


@pytest.mark.parametrize("with_residual", [False, True])
def test_y_scale_scales_the_output_but_not_its_sums_of_squares(inputs, with_residual):
  """y_scale: y times the scale in x's dtype (as the XLA expression (y * scale).astype(dtype) of the
  float32 y), the sums of squares and every other result those of the unscaled kernel; with a residual too."""
  x, *rest = inputs
  args = list(_kernel_args(x, *rest))
  groups, k = args[0].shape[1:]
  scale = jnp.asarray(np.random.default_rng(12).uniform(0.5, 1.5, size=(groups, k)), jnp.float32)
  extra = dict(residual=jnp.asarray(np.random.default_rng(13).normal(size=args[0].shape), args[0].dtype)) \
      if with_residual else {}
  got = decode_step.tsn_cema_step(*args, eps=EPS, groups_per_block=2, y_scale=scale, **extra)
  plain = decode_step.tsn_cema_step(*args, eps=EPS, groups_per_block=2, **extra)
  assert got[1].dtype == args[0].dtype and plain[1].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got[1], np.float32),
                                np.asarray((plain[1] * scale).astype(args[0].dtype), np.float32))
  for i, (g, w) in enumerate(zip(got, plain)):
    if i != 1:
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  with pytest.raises(ValueError, match="y_scale must be"):
    decode_step.tsn_cema_step(*args, eps=EPS, y_scale=scale[:, :2])
  lowered = jax.jit(lambda *a: decode_step.tsn_cema_step(*a, eps=EPS, interpret=False, y_scale=scale, **extra)
                    ).trace(*args).lower(lowering_platforms=("cuda",))
  assert "tsn_cema_step" in lowered.as_text()


def test_residual_addend_lowers_for_cuda(inputs):
  args = _kernel_args(*inputs)
  lowered = jax.jit(lambda *a: decode_step.tsn_cema_step(*a[:-2], eps=EPS, interpret=False, count_state=a[-2],
                                                         residual=a[-1])).trace(*args, args[1], args[0]).lower(
      lowering_platforms=("cuda",))
  assert "tsn_cema_step" in lowered.as_text()


# --- residual_moments ------------------------------------------------------------------------

RM_Z, RM_V, RM_D = 16, 24, 32  # the w_mx product's columns: [z | r | h1]; h1 starts at 40 (not a multiple of D)


def _residual_inputs(batch, dtype, seed):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  raw = normal(batch, RM_Z + RM_V + RM_D).astype(dtype)
  bias = normal(RM_V + RM_D).astype(dtype)
  # An offset much larger than the spread: the shifted moments must not lose it.
  return raw, bias, normal(batch, RM_D).astype(dtype), (normal(batch, RM_D) + 40.0).astype(dtype)


@pytest.mark.parametrize("dtype,with_inv", [(jnp.bfloat16, False), (jnp.bfloat16, True), (jnp.float32, True)])
def test_residual_moments_equal_the_block_tail_math(dtype, with_inv):
  """y bitwise as the XLA expression rounds it, mean / variance against float64 numpy of that y."""
  raw, bias, wh2, x = _residual_inputs(2, dtype, seed=int(with_inv))
  inv = jnp.asarray([[0.5], [1.7]], jnp.float32) if with_inv else None
  y, mean, var = decode_step.residual_moments(raw, bias, wh2, x, raw_offset=RM_Z + RM_V, bias_offset=RM_V, inv=inv)
  h = raw[:, RM_Z + RM_V:]
  b = bias[RM_V:]
  h1 = (h + b) if inv is None else (h.astype(jnp.float32) * inv + b.astype(jnp.float32)).astype(dtype)
  want_y = ((h1 + wh2) + x).astype(dtype)
  assert y.dtype == dtype and mean.shape == var.shape == (2, 1)
  if dtype == jnp.bfloat16 or inv is None:
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want_y, np.float32))
  else:  # float32 with a scale: XLA may contract the product and the bias add into an FMA
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-6, atol=1e-6)
  y64 = np.asarray(y, np.float64)
  np.testing.assert_allclose(np.asarray(mean)[:, 0], y64.mean(-1), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(var)[:, 0], y64.var(-1), rtol=1e-5, atol=1e-5)
  for g, w in zip((y, mean, var), decode_step.residual_moments_reference(raw, bias, wh2, x, raw_offset=RM_Z + RM_V,
                                                                          bias_offset=RM_V, inv=inv)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-6, atol=1e-6)
  # The shift y[0] picked out of the row instead of recomputed: the same y, moments to float32 rounding.
  alt = decode_step.residual_moments(raw, bias, wh2, x, raw_offset=RM_Z + RM_V, bias_offset=RM_V, inv=inv,
                                     first_by_reduction=True)
  np.testing.assert_array_equal(np.asarray(alt[0], np.float32), np.asarray(y, np.float32))
  for g, w in zip(alt[1:], (mean, var)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_residual_moments_lower_for_cuda_and_check_shapes():
  """mega1.3B's shapes: h1 at column 4608 of the 6656-column product, its bias at 4096 of [r | h1]."""
  raw, bias = jnp.zeros((1, 6656), jnp.bfloat16), jnp.zeros((6144,), jnp.bfloat16)
  row = jnp.zeros((1, 2048), jnp.bfloat16)
  for inv in (None, jnp.ones((1, 1), jnp.float32)):
    lowered = jax.jit(lambda *a, inv=inv: decode_step.residual_moments(
        *a, raw_offset=4608, bias_offset=4096, inv=inv, interpret=False)).trace(raw, bias, row, row).lower(
        lowering_platforms=("cuda",))
    assert "residual_moments" in lowered.as_text()
  raw, bias, wh2, x = _residual_inputs(2, jnp.float32, seed=3)
  with pytest.raises(ValueError, match="raw must be"):
    decode_step.residual_moments(raw, bias, wh2, x, raw_offset=RM_Z + RM_V + 1, bias_offset=RM_V)
  with pytest.raises(ValueError, match="bias must be"):
    decode_step.residual_moments(raw, bias, wh2, x, raw_offset=RM_Z + RM_V, bias_offset=RM_V + 1)
  with pytest.raises(ValueError, match="inv must be"):
    decode_step.residual_moments(raw, bias, wh2, x, raw_offset=RM_Z + RM_V, bias_offset=RM_V, inv=jnp.ones((2,)))
  with pytest.raises(ValueError, match="power of 2"):
    decode_step.residual_moments(raw[:, :-8], bias[:-8], wh2[:, :24], x[:, :24], raw_offset=RM_Z + RM_V,
                                 bias_offset=RM_V)


@pytest.mark.parametrize("scaled", [False, True])
def test_attend_combine_pallas_gate(scaled):
  """gate: the combined attention times silu(scale raw + bias), the gate read from a column offset of
  a wider product (the w_mx output) and the bias from the front of a longer one; float64 numpy."""
  rng = np.random.default_rng(12)
  dv, offset = 32, 16
  m, l = rng.normal(size=(2, H, 8)), np.abs(rng.normal(size=(2, H, 8))) + 0.5
  acc = rng.normal(size=(2, H, 8, dv))
  stats = jnp.asarray(np.stack([m, l], -1), jnp.float32)
  raw = jnp.asarray(rng.normal(size=(2, offset + H * dv + 8)), jnp.bfloat16)
  bias = jnp.asarray(rng.normal(size=H * dv + 8), jnp.bfloat16)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, size=(2, 1)), jnp.float32)
  got = decode_step.attend_combine_pallas(stats, jnp.asarray(acc, jnp.float32), block_d=16, out_dtype=jnp.bfloat16,
                                          gate=raw, gate_bias=bias, gate_scale=scale if scaled else None,
                                          gate_offset=offset)
  weight = np.exp(m - m.max(-1, keepdims=True))
  attn = np.einsum("bhn,bhnd->bhd", weight, acc) / (weight * l).sum(-1)[..., None]
  t = np.asarray(raw, np.float64)[:, offset:offset + H * dv] * (np.asarray(scale) if scaled else 1.0)
  t = t + np.asarray(bias, np.float64)[:H * dv]
  want = attn * (t / (1.0 + np.exp(-t))).reshape(2, H, dv)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-2, atol=2e-2)  # bf16 roundings
  assert got.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="gate must be"):
    decode_step.attend_combine_pallas(stats, jnp.asarray(acc, jnp.float32), block_d=16, gate=raw, gate_bias=bias,
                                      gate_offset=8)


@pytest.mark.parametrize("batch,block_n", [(1, 16), (2, 8)])
def test_gemv_rows_equals_the_product(batch, block_n):
  """x [B, K] times w_t [N, K] (bf16), whole rows per program: against float64 and the reference."""
  rng = np.random.default_rng(batch)
  n, k = 48, 128
  x = jnp.asarray(rng.normal(size=(batch, k)), jnp.bfloat16)
  w_t = jnp.asarray(rng.normal(size=(n, k)), jnp.bfloat16)
  got = np.asarray(decode_step.gemv_rows(x, w_t, block_n=block_n, out_dtype=jnp.float32))
  want = np.asarray(x, np.float64) @ np.asarray(w_t, np.float64).T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(decode_step.gemv_rows_reference(x, w_t, jnp.float32)), want, rtol=1e-5,
                             atol=1e-4)
  rounded = decode_step.gemv_rows(x, w_t, block_n=block_n)  # x's dtype
  assert rounded.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(rounded, np.float64), want, rtol=1e-2, atol=1e-2)


def _ffn_inputs(batch, rows, k, seed):
  rng = np.random.default_rng(seed)
  y = jnp.asarray(rng.normal(size=(batch, k)) + 0.5, jnp.bfloat16)
  w_t = jnp.asarray(rng.normal(size=(rows, k)) / np.sqrt(k), jnp.bfloat16)
  colsum = jnp.sum(w_t.astype(jnp.float32), axis=1)
  bias0 = jnp.asarray(rng.normal(size=rows), jnp.float32)
  yf = np.asarray(y, np.float64)
  mean = jnp.asarray(yf.mean(1, keepdims=True), jnp.float32)
  var = jnp.asarray(yf.var(1, keepdims=True), jnp.float32)
  return y, w_t, colsum, bias0, mean, var


@pytest.mark.parametrize("swiglu,batch", [(False, 1), (True, 1), (False, 2)])
def test_ffn_in_step_equals_layer_norm_product_and_activation(swiglu, batch):
  """The folded form (y @ W' - mean colsum) rstd + bias0 then SiLU (or SwiGLU) against float64 of the
  unfolded LayerNorm(y) @ W' + bias0 (bf16-level: the kernel rounds u and the activation to bf16),
  and against its plain-JAX reference to float32 rounding."""
  width, k = 32, 64
  rows = 2 * width if swiglu else width
  y, w_t, colsum, bias0, mean, var = _ffn_inputs(batch, rows, k, seed=batch + swiglu)
  got = decode_step.ffn_in_step(y, w_t, colsum, bias0, mean, var, eps=EPS, swiglu=swiglu, block_n=8)
  assert got.shape == (batch, width) and got.dtype == jnp.bfloat16
  ref = decode_step.ffn_in_step_reference(y, w_t, colsum, bias0, mean, var, eps=EPS, swiglu=swiglu)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-6)
  assert np.mean(np.asarray(got, np.float32) == np.asarray(ref, np.float32)) > 0.9
  yf = np.asarray(y, np.float64)
  normed = (yf - yf.mean(1, keepdims=True)) / np.sqrt(yf.var(1, keepdims=True) + EPS)
  u = normed @ np.asarray(w_t, np.float64).T + np.asarray(bias0, np.float64)
  silu = lambda t: t / (1 + np.exp(-t))
  want = silu(u[:, :width]) * u[:, width:] if swiglu else silu(u)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=3e-2, atol=3e-2)


def test_gemv_rows_and_ffn_in_step_lower_for_cuda_and_check_shapes():
  """mega200M's fc_in (2560 x 1024) lowers for CUDA; bad shapes are named."""
  y, w_t, colsum, bias0, mean, var = _ffn_inputs(1, 2560, 1024, seed=0)
  lowered = jax.jit(lambda *a: decode_step.ffn_in_step(*a, eps=EPS, interpret=False)).trace(
      y, w_t, colsum, bias0, mean, var).lower(lowering_platforms=("cuda",))
  assert "ffn_in_step" in lowered.as_text()
  lowered = jax.jit(lambda a, b: decode_step.gemv_rows(a, b, interpret=False)).trace(y, w_t).lower(
      lowering_platforms=("cuda",))
  assert "gemv_rows" in lowered.as_text()
  assert decode_step.default_gemv_rows_block(4864, 2048) == 4 and decode_step.default_gemv_rows_block(6, 64) == 2
  with pytest.raises(ValueError, match="same K"):
    decode_step.gemv_rows(y[:, :512], w_t)
  with pytest.raises(ValueError, match="block_n=12"):
    decode_step.gemv_rows(y, w_t, block_n=12)
  with pytest.raises(ValueError, match="even count"):
    decode_step.ffn_in_step(y, w_t[:7], colsum[:7], bias0[:7], mean, var, eps=EPS, swiglu=True)
  with pytest.raises(ValueError, match="colsum and bias0"):
    decode_step.ffn_in_step(y, w_t, colsum[:8], bias0, mean, var, eps=EPS)
  with pytest.raises(ValueError, match="mean and var"):
    decode_step.ffn_in_step(y, w_t, colsum, bias0, mean[0], var, eps=EPS)
