"""The Llama baseline against an independent float64 numpy implementation, its decode path against
its own full forward pass, its size formulas against initialised parameters, and its FLOPs formula
against the matmuls actually traced."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.baselines import llama as L
from megalodon_jax import config as mega_config
from megalodon_jax.config import ConfigError

TINY = L.preset("tiny")  # grouped-query: 4 query heads, 2 key/value heads
TINY_TIED_MHA = TINY.replace(num_kv_heads=None, tie_embeddings=True)
TINY_SCAN = TINY.replace(scan_layers=True)


# ---------------------------------------------------------------------------------------------
# float64 numpy reference
# ---------------------------------------------------------------------------------------------

def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, base):
  """x: [L, H, d]. Pairs (x[i], x[i + d/2]) rotated as complex numbers by pos * base^(-2i/d)."""
  length, _, d = x.shape
  half = d // 2
  z = x[..., :half] + 1j * x[..., half:]
  theta = np.arange(length)[:, None] * base ** (-2.0 * np.arange(half) / d)[None, :]
  z = z * np.exp(1j * theta)[:, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def np_attention(q, k, v):
  """q: [L, H, d]; k, v: [L, K, d] -> [L, H, d], causal, query head h reads kv head h // (H/K)."""
  length, heads, d = q.shape
  group = heads // k.shape[1]
  out = np.zeros_like(q)
  future = np.triu(np.ones((length, length), dtype=bool), k=1)
  for h in range(heads):
    scores = q[:, h] @ k[:, h // group].T / np.sqrt(d)
    scores[future] = -np.inf
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out[:, h] = p @ v[:, h // group]
  return out


def np_llama(params, tokens, cfg):
  """params: the model's (unstacked) parameter tree as float64 numpy; tokens: [B, L] -> logits."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  silu = lambda a: a / (1.0 + np.exp(-a))
  logits = []
  for seq in np.asarray(tokens):
    x = p["embed"]["embedding"][seq]
    for i in range(cfg.num_layers):
      layer = p[f"layers_{i}"]
      attn = layer["attn"]
      h = np_rms_norm(x, layer["attn_norm"]["scale"], cfg.norm_eps)
      q = np_rope(np.einsum("ld,dhk->lhk", h, attn["q_proj"]["kernel"]), cfg.rope_base)
      k = np_rope(np.einsum("ld,dhk->lhk", h, attn["k_proj"]["kernel"]), cfg.rope_base)
      v = np.einsum("ld,dhk->lhk", h, attn["v_proj"]["kernel"])
      x = x + np.einsum("lhk,hkd->ld", np_attention(q, k, v), attn["o_proj"]["kernel"])
      mlp = layer["mlp"]
      h = np_rms_norm(x, layer["mlp_norm"]["scale"], cfg.norm_eps)
      x = x + (silu(h @ mlp["gate_proj"]["kernel"]) * (h @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
    x = np_rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]
    logits.append(x @ head)
  return np.stack(logits)


def unstack_layers(params, cfg):
  """A scanned model's parameters ({"layers": leading layer axis}) in the unrolled layout."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(cfg.num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda a: a[i], stacked)
  return params


# ---------------------------------------------------------------------------------------------
# Shared model pieces (one compilation per config across tests)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def forward_fn(cfg: L.LlamaConfig):
  model = L.Llama(cfg)
  return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


@functools.lru_cache(maxsize=None)
def decode_fn(cfg: L.LlamaConfig):
  return L.make_decode_step(L.Llama(cfg))


def random_params(cfg: L.LlamaConfig, rng: np.random.Generator, length: int = 8):
  """Initialised parameter shapes refilled with O(1) random values, so logits and attention
  weights are far from uniform and every term of the math shows in the output."""
  shapes = jax.eval_shape(lambda: L.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, length), jnp.int32)))
  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:  # norm scales around 1
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(leaf.shape), jnp.float32)
    fan_in = leaf.shape[-2] if leaf.ndim >= 2 else 1
    if "embedding" in name:
      fan_in = 1
    elif "o_proj" in name:
      fan_in = leaf.shape[-3] * leaf.shape[-2]
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def random_tokens(cfg, rng, batch=2, length=8):
  return jnp.asarray(rng.integers(0, cfg.vocab_size, size=(batch, length)), jnp.int32)


# ---------------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [TINY, TINY_TIED_MHA, TINY_SCAN], ids=["gqa", "tied_mha", "scan"])
def test_forward_matches_float64_numpy(cfg, rng):
  params = random_params(cfg, rng)
  tokens = random_tokens(cfg, rng)
  logits = forward_fn(cfg)(params, tokens)
  assert logits.dtype == jnp.float32
  flat = unstack_layers(params, cfg) if cfg.scan_layers else params
  expected = np_llama(flat, tokens, cfg)
  assert np.std(expected) > 0.5  # the check below is not dominated by tiny logits
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_tracks_float32(rng):
  cfg = TINY
  params = random_params(cfg, rng)
  tokens = random_tokens(cfg, rng)
  exact = np.asarray(forward_fn(cfg)(params, tokens))
  low = forward_fn(cfg.replace(dtype="bfloat16"))(params, tokens)
  assert low.dtype == jnp.float32  # logits are float32 even with bf16 compute
  rel = np.linalg.norm(np.asarray(low) - exact) / np.linalg.norm(exact)
  assert 0 < rel < 0.05, rel


@functools.lru_cache(maxsize=None)
def loss_and_grads(cfg: L.LlamaConfig):
  """Loss and gradients on fixed random inputs (seeded once, so configs that differ only in remat
  policy see the same parameters and the no-remat baseline is computed once)."""
  rng = np.random.default_rng(7)
  params = random_params(cfg.replace(remat_policy="none"), rng)
  tokens = random_tokens(cfg, rng)
  model = L.Llama(cfg)
  loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, tokens))[..., 0])
  return jax.jit(jax.value_and_grad(loss))(params)


def check_remat(policy: str, scan: bool) -> None:
  base = TINY.replace(scan_layers=scan, num_layers=1)  # remat wraps each block alike: one suffices
  loss0, g0 = loss_and_grads(base)
  loss1, g1 = loss_and_grads(base.replace(remat_policy=policy))
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_remat_keeps_loss_and_gradients():
  check_remat("full", scan=False)


@pytest.mark.slow
@pytest.mark.parametrize("policy, scan", [("full", True), ("dots", False), ("dots", True), ("dots_no_batch", False),
                                          ("dots_no_batch", True)])
def test_remat_keeps_loss_and_gradients_other_combinations(policy, scan):
  check_remat(policy, scan)


# ---------------------------------------------------------------------------------------------
# KV-cache decoding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [TINY, TINY_SCAN], ids=["unrolled", "scan"])
def test_step_by_step_decode_equals_forward(cfg, rng):
  params = random_params(cfg, rng)
  tokens = random_tokens(cfg, rng, length=7)
  full = np.asarray(forward_fn(cfg)(params, tokens))
  cache = L.init_cache(cfg, batch=2, max_len=10)  # longer than needed: unused slots must be masked
  steps = []
  for t in range(tokens.shape[1]):
    logits, cache = decode_fn(cfg)(params, cache, tokens[:, t:t + 1])
    steps.append(np.asarray(logits))
  assert int(cache["index"]) == tokens.shape[1]
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_prefill_then_decode_equals_forward(rng):
  cfg = TINY
  params = random_params(cfg, rng)
  tokens = random_tokens(cfg, rng, length=8)
  full = np.asarray(forward_fn(cfg)(params, tokens))
  cache = L.init_cache(cfg, batch=2, max_len=8)
  prefill, cache = decode_fn(cfg)(params, cache, tokens[:, :5])
  outs = [np.asarray(prefill)]
  for t in range(5, 8):
    logits, cache = decode_fn(cfg)(params, cache, tokens[:, t:t + 1])
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, TINY_SCAN.replace(dtype="bfloat16")], ids=["unrolled", "scan_bf16"])
def test_cache_bytes_grow_linearly_with_context(cfg):
  for max_len in (16, 32):
    cache = L.init_cache(cfg, batch=3, max_len=max_len)
    actual = sum(leaf.nbytes for leaf in jax.tree.leaves(cache["layers"]))
    assert L.cache_bytes(cfg, 3, max_len) == actual
    assert L.cache_capacity(cache) == max_len
  assert L.cache_bytes(cfg, 3, 32) == 2 * L.cache_bytes(cfg, 3, 16)


# ---------------------------------------------------------------------------------------------
# Sizes, presets and FLOPs
# ---------------------------------------------------------------------------------------------

def initialised_count(cfg: L.LlamaConfig) -> int:
  shapes = jax.eval_shape(lambda: L.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize("cfg", [TINY, TINY_TIED_MHA, TINY_SCAN, TINY.replace(num_kv_heads=1, num_layers=3)],
                         ids=["gqa", "tied_mha", "scan", "mqa_3layers"])
def test_param_formula_equals_initialised_count(cfg):
  assert L.count_params(cfg) == initialised_count(cfg)


@pytest.mark.parametrize("name, mega", [("llama200M", "mega200M"), ("llama1.3B", "mega1.3B")])
def test_presets_match_megalodon_sizes(name, mega):
  cfg = L.preset(name, scan_layers=True)  # scanned: one block to trace
  ours, theirs = initialised_count(cfg), mega_config.count_params(mega_config.preset(mega))
  print(f"\n{name}: {ours:,} parameters; {mega}: {theirs:,} (ratio {ours / theirs:.4f})")
  assert ours == L.count_params(cfg)
  assert abs(ours / theirs - 1) < 0.03
  # The presets are exactly what `matching` picks for the Megalodon count at their depth/width.
  assert L.LlamaConfig.matching(theirs, num_layers=cfg.num_layers, model_dim=cfg.model_dim,
                                num_heads=cfg.num_heads) == L.preset(name)


def test_matching_picks_the_closest_mlp_width():
  target = 3_000_000
  cfg = L.LlamaConfig.matching(target, num_layers=4, model_dim=256, num_heads=4, vocab_size=1000,
                               multiple_of=64)
  assert cfg.ffn_hidden_dim % 64 == 0
  error = abs(L.count_params(cfg) - target)
  for other in (cfg.ffn_hidden_dim - 64, cfg.ffn_hidden_dim + 64):
    assert error <= abs(L.count_params(cfg.replace(ffn_hidden_dim=other)) - target)
  with pytest.raises(ConfigError, match="cannot reach"):
    L.LlamaConfig.matching(10_000, num_layers=4, model_dim=256, num_heads=4)


def dot_flops(jaxpr) -> int:
  """FLOPs (2 per multiply-add) of every dot_general in a jaxpr, nested jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2 * int(np.prod(out)) * int(np.prod([lhs[i] for i in lhs_contract]))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += dot_flops(inner)
  return total


@pytest.mark.parametrize("cfg", [TINY, TINY_TIED_MHA], ids=["gqa", "tied_mha"])
def test_flops_formula_matches_traced_matmuls(cfg, rng):
  batch, length = 2, 8
  params = random_params(cfg, rng, length)
  tokens = random_tokens(cfg, rng, batch, length)
  model = L.Llama(cfg)
  forward = lambda p: model.apply({"params": p}, tokens)
  traced_fwd = dot_flops(jax.make_jaxpr(forward)(params).jaxpr) / (batch * length)
  # The XLA attention path computes the full score matrix; the formula counts the causal half,
  # so the traced count exceeds it by exactly one causal attention term.
  causal_attention = cfg.num_layers * 2 * cfg.num_heads * cfg.head_dim * length
  assert traced_fwd == L.flops_per_token(cfg, length, training=False) + causal_attention
  # Training: the backward pass costs two forward passes of matmuls (input and weight gradients).
  loss = lambda p: jnp.sum(forward(p))
  traced_train = dot_flops(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr) / (batch * length)
  assert traced_train == L.flops_per_token(cfg, length, training=True) + 3 * causal_attention


# ---------------------------------------------------------------------------------------------
# Configuration checks
# ---------------------------------------------------------------------------------------------

def test_attention_implementation_choice():
  assert L.resolve_attention_impl(TINY, backend="cpu") == "xla"
  assert L.resolve_attention_impl(TINY, backend="gpu") == "xla"  # float32: no cuDNN kernel
  assert L.resolve_attention_impl(TINY.replace(dtype="bfloat16"), backend="gpu") == "cudnn"
  assert L.resolve_attention_impl(TINY.replace(dtype="bfloat16", attention_impl="xla"), backend="gpu") == "xla"
  with pytest.raises(ConfigError, match="bfloat16"):
    L.resolve_attention_impl(TINY.replace(attention_impl="cudnn"), backend="gpu")


@pytest.mark.parametrize("changes, message", [
    (dict(num_kv_heads=3), "must divide num_heads"),
    (dict(num_heads=5), "must divide model_dim"),
    (dict(model_dim=36, num_heads=4), "must be even"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(dtype="float16"), "dtype"),
    (dict(ffn_hidden_dim=0), "ffn_hidden_dim"),
    (dict(bogus=1), "unknown LlamaConfig field"),
])
def test_invalid_configs_are_rejected(changes, message):
  with pytest.raises(ConfigError, match=message):
    TINY.replace(**changes)
