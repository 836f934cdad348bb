"""Model-level checks: initialisation, chunk/state consistency, packed sequences, bf16."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_jax import model as model_lib
from megalodon_jax.cache import init_layer_cache
from megalodon_jax.config import preset
from megalodon_jax.model import MegalodonBlock, MegalodonLM
from megalodon_jax.ops import rope

CFG = preset("tiny")  # D=32, H=2, Z=16, V=32, F=64, N=4, C=8, G=4, vocab 64


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def forward():
  model = MegalodonLM(CFG)
  return jax.jit(lambda p, t, s=None: model.apply({"params": p}, t, s))


def test_initialisation_follows_the_release():
  cfg = preset("small")
  p = model_lib.init_params(cfg, jax.random.key(1))
  mega = p["layers_0"]["mega"]
  d, n = cfg.model_dim, cfg.cema_ndim
  # Linear layers: kaiming normal (a = sqrt 5): std 1/sqrt(3 fan_in).
  np.testing.assert_allclose(np.std(mega["wv"]["kernel"]), 1 / math.sqrt(3 * d), rtol=0.05)
  assert not np.any(mega["wv"]["bias"])
  # Embedding: truncated normal, std 1/sqrt(D) truncated at 3 std.
  emb = np.asarray(p["embed"]["embedding"])
  assert np.abs(emb).max() <= 3 / math.sqrt(d) + 1e-6
  # theta = logit(f) with f a permutation of exp(-k ln D / D).
  f = 1 / (1 + np.exp(-np.asarray(mega["cema"]["theta"]).ravel()))
  np.testing.assert_allclose(np.sort(f), np.sort(np.exp(-np.arange(1, d + 1) * math.log(d) / d)), rtol=1e-4)
  assert not np.all(np.diff(f) < 0)  # really permuted
  gamma = np.asarray(mega["cema"]["gamma"])
  assert gamma.shape == (d, n, 2) and not np.any(gamma[..., 1])
  np.testing.assert_allclose(np.std(gamma[..., 0]), 1.0, rtol=0.1)
  omega = np.asarray(mega["cema"]["omega"])
  assert np.abs(omega).max() <= 1.0 and 0.2 < np.std(omega) < 0.3
  for name in ("alpha", "delta"):
    np.testing.assert_allclose(np.std(mega["cema"][name]), 0.2, rtol=0.1)
  for zero in (mega["gamma"], mega["beta"], mega["rmsnorm"]["weight"], mega["timenorm"]["weight"]):
    assert not np.any(zero)


def test_rescale_init_per_layer():
  cfg = preset("tiny_swiglu")
  for scan in (False, True):
    p = model_lib.init_params(cfg.replace(scan_layers=scan), jax.random.key(0))
    for i in range(cfg.num_layers):
      alpha = p["layers"]["nffn"]["alpha"][i] if scan else p[f"layers_{i}"]["nffn"]["alpha"]
      np.testing.assert_allclose(alpha, 0.1 * 0.5 ** i)


def test_block_over_three_chunks_equals_chunks_joined_by_state(rng):
  """A block on L = 3C equals three separate one-chunk calls that pass CEMA/TimestepNorm state."""
  block = MegalodonBlock(CFG)
  c = CFG.chunk_size
  x = jnp.asarray(rng.normal(size=(2, 3 * c, CFG.model_dim)), jnp.float32)
  positions = rope.chunk_positions(3 * c, c)
  variables = block.init(jax.random.key(0), x, None, positions, None, jnp.int32(0))
  full, _ = block.apply(variables, x, None, positions, None, jnp.int32(0))
  layer_cache = init_layer_cache(CFG, 2)
  pieces = []
  for i in range(3):
    out, layer_cache = block.apply(variables, x[:, i * c:(i + 1) * c], layer_cache,
                                   rope.chunk_positions(c, c), None, jnp.int32(0))
    pieces.append(out)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def _doc_loss(forward, params, tokens, segs, doc, weights):
  def loss(p):
    logits = forward(p, tokens, segs)
    return jnp.sum(jnp.where((segs == doc)[..., None], logits * weights, 0.0))
  return jax.value_and_grad(loss)(params)


def test_packed_documents_do_not_interact(rng, params, forward):
  c = CFG.chunk_size
  length = 4 * c
  segs = np.zeros((1, length), np.int32)
  segs[0, :11] = 1
  segs[0, 11:27] = 2  # spans a chunk boundary, starts mid-chunk
  segs[0, 27:30] = 3  # followed by padding (0)
  tokens_a = rng.integers(1, CFG.vocab_size, size=(1, length))
  tokens_b = tokens_a.copy()
  tokens_b[segs != 2] = rng.integers(1, CFG.vocab_size, size=int(np.sum(segs != 2)))
  weights = jnp.asarray(rng.normal(size=(1, length, CFG.vocab_size)), jnp.float32)
  seg_j = jnp.asarray(segs)
  logits_a = forward(params, jnp.asarray(tokens_a), seg_j)
  logits_b = forward(params, jnp.asarray(tokens_b), seg_j)
  mask = segs[0] == 2
  np.testing.assert_allclose(logits_a[0, mask], logits_b[0, mask], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits_a[0, ~mask], logits_b[0, ~mask])  # the other documents did change
  (_, grads_a) = _doc_loss(forward, params, jnp.asarray(tokens_a), seg_j, 2, weights)
  (_, grads_b) = _doc_loss(forward, params, jnp.asarray(tokens_b), seg_j, 2, weights)
  for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    # Parameter gradients are sums over every position. On a GPU, XLA's reductions are not
    # deterministic (see tests/test_cema.py::test_documents_are_isolated), so an entry near zero
    # in a leaf of large entries can differ by the float32 rounding of the leaf's sums (seen on an
    # H200: 3.1e-6 in a leaf whose largest entry is 11.7).
    atol = 1e-6 * max(1.0, float(np.max(np.abs(ga)))) if jax.default_backend() == "gpu" else 1e-6
    np.testing.assert_allclose(ga, gb, rtol=2e-4, atol=atol)


def test_document_at_chunk_offset_equals_document_alone(rng, params, forward):
  c = CFG.chunk_size
  doc = rng.integers(1, CFG.vocab_size, size=(1, 2 * c))
  alone = forward(params, jnp.asarray(doc))
  packed = np.concatenate([rng.integers(1, CFG.vocab_size, size=(1, c)), doc, np.zeros((1, c), np.int64)], axis=1)
  segs = np.concatenate([np.full((1, c), 1), np.full((1, 2 * c), 2), np.zeros((1, c))], axis=1).astype(np.int32)
  logits = forward(params, jnp.asarray(packed), jnp.asarray(segs))
  np.testing.assert_allclose(logits[:, c:3 * c], alone, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_with_float32_params(rng, params):
  cfg = CFG.replace(dtype="bfloat16")
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, size=(2, 2 * CFG.chunk_size)))
  logits16 = jax.jit(MegalodonLM(cfg).apply)({"params": params}, tokens)
  logits32 = jax.jit(MegalodonLM(CFG).apply)({"params": params}, tokens)
  assert logits16.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  rel = np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)
  assert rel < 3e-2, rel


def test_scanned_layers_equal_unrolled(rng, params):
  from megalodon_jax import convert
  cfg_scan = CFG.replace(scan_layers=True)
  scanned = convert.from_release(convert.to_release(params, CFG), cfg_scan)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, size=(2, 2 * CFG.chunk_size)))
  a = MegalodonLM(CFG).apply({"params": params}, tokens)
  b = MegalodonLM(cfg_scan).apply({"params": scanned}, tokens)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# Every policy goes through the same named-checkpoint mechanism: the default run checks the one
# that saves nothing and the one that saves the most names; the rest run in the slow set (CI time).
@pytest.mark.parametrize("policy", ["full", pytest.param("dots", marks=pytest.mark.slow),
                                    pytest.param("save_cema_attention", marks=pytest.mark.slow),
                                    pytest.param("save_dots_cema_attention", marks=pytest.mark.slow),
                                    "save_dots_norms_cema_attention"])
def test_remat_policies_give_the_same_gradients(rng, params, policy):
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, size=(1, 2 * CFG.chunk_size)))
  def grads(cfg):
    model = MegalodonLM(cfg)
    return jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)))(params)
  for a, b in zip(jax.tree.leaves(grads(CFG)), jax.tree.leaves(grads(CFG.replace(remat_policy=policy)))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_save_dots_norms_policy_keeps_the_named_normalisations(params):
  import contextlib, io
  from jax.ad_checkpoint import print_saved_residuals
  tokens = jnp.zeros((1, 2 * CFG.chunk_size), jnp.int32)
  def saved(policy):
    model = MegalodonLM(CFG.replace(remat_policy=policy))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      print_saved_residuals(lambda p: jnp.mean(model.apply({"params": p}, tokens)), params)
    return out.getvalue()
  more, fewer = saved("save_dots_norms_cema_attention"), saved("save_dots_cema_attention")
  for name in ("tsn_out", "cema_norm_out", "qk_norm_out", "ffn_norm_out"):
    assert f"named '{name}'" in more and f"named '{name}'" not in fewer


def test_every_configurable_remat_policy_exists():
  from megalodon_jax import config as config_lib, model as model_module
  assert set(model_module.REMAT_POLICIES) | {"none"} == set(config_lib.REMAT_POLICIES)
