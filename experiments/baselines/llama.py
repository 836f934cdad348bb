"""A Llama-style decoder Transformer in Flax linen: the baseline Megalodon is measured against.

Architecture (Touvron et al. 2023): token embedding -> N x [x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x))]
-> RMSNorm -> linear head. Attention is causal softmax attention over the whole sequence with rotary
positions (RoPE, rotate-half layout) and optional grouped-query attention; the MLP is SwiGLU,
W_down (silu(W_gate x) * W_up x). No biases anywhere. Logits are returned in float32.

The attention core is `jax.nn.dot_product_attention(..., is_causal=True)`, with cuDNN flash attention
on GPU (bf16) and the XLA reference elsewhere, so the baseline is as fast as the stock JAX stack
allows. Unlike Megalodon, its decoding cache holds every past key and value, so decode memory grows
linearly with the context (`init_cache`, `cache_bytes`).

Presets `llama200M` and `llama1.3B` match the parameter counts of Megalodon's `mega200M` and
`mega1.3B` (vocab 32000) to within 0.5%; `LlamaConfig.matching` sizes the MLP for any other target.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_jax.config import ConfigError
from megalodon_jax.ops import dense as dense_ops
from megalodon_jax.ops.logits import output_logits

ATTENTION_IMPLS = ("auto", "cudnn", "xla")
DECODE_ATTENTION_IMPLS = ("xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")

Cache = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of the Llama baseline.

  num_kv_heads: key/value heads (grouped-query attention); None means num_heads (plain MHA).
  dtype: compute dtype of matmuls and activations; norms, softmax statistics and RoPE angles are
    float32 regardless. param_dtype: storage dtype of the parameters.
  attention_impl: "auto" picks cuDNN flash attention on GPU when dtype is bfloat16 and XLA otherwise.
  decode_attention_impl: core used when a KV cache is passed. "cudnn" is used only for single-token
    steps (masking by key length); multi-token prefill into a cache always uses XLA with a mask.
  remat_policy: activation checkpointing of each block: "none", "full" (save only block inputs),
    "dots" (save every matmul output), "dots_no_batch" (save matmuls without batch dims, i.e. the
    projections but not attention scores).
  scan_layers: apply the blocks with `nn.scan` (one compiled block; parameters stacked on a leading
    layer axis), which compiles deep models faster.
  """

  vocab_size: int = 32000
  num_layers: int = 12
  model_dim: int = 1024
  num_heads: int = 16
  num_kv_heads: int | None = None
  ffn_hidden_dim: int = 2816
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  decode_attention_impl: str = "xla"
  remat_policy: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    validate(self)

  @property
  def head_dim(self) -> int:
    return self.model_dim // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def replace(self, **changes: Any) -> "LlamaConfig":
    """A copy with some fields changed (validated again)."""
    names = {f.name for f in dataclasses.fields(self)}
    unknown = set(changes) - names
    if unknown:
      raise ConfigError(f"unknown LlamaConfig field(s) {sorted(unknown)}; valid fields are {sorted(names)}")
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def matching(cls, n_params: int, *, num_layers: int, model_dim: int, num_heads: int,
               num_kv_heads: int | None = None, vocab_size: int = 32000, tie_embeddings: bool = False,
               multiple_of: int = 128, **overrides: Any) -> "LlamaConfig":
    """A config whose parameter count is as close to `n_params` as the MLP width allows.

    Depth, width and heads are given; the SwiGLU hidden size F is solved for and rounded to the
    nearest multiple of `multiple_of` (kernel-friendly shapes), so the count lands within
    3 * num_layers * model_dim * multiple_of / 2 of the target.
    """
    probe = cls(vocab_size=vocab_size, num_layers=num_layers, model_dim=model_dim, num_heads=num_heads,
                num_kv_heads=num_kv_heads, ffn_hidden_dim=multiple_of, tie_embeddings=tie_embeddings,
                **overrides)
    without_mlp = count_params(probe) - num_layers * 3 * model_dim * multiple_of
    per_unit = num_layers * 3 * model_dim * multiple_of  # parameters per `multiple_of` of F
    units = round((n_params - without_mlp) / per_unit)
    if units < 1:
      raise ConfigError(
          f"cannot reach {n_params:,} parameters with num_layers={num_layers}, model_dim={model_dim}: "
          f"attention, norms and embeddings alone already hold {without_mlp:,}. Use fewer layers or a "
          "smaller model_dim.")
    return probe.replace(ffn_hidden_dim=units * multiple_of)


def _check_positive_int(cfg: LlamaConfig, *names: str) -> None:
  for name in names:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_choice(cfg: LlamaConfig, name: str, options: tuple[str, ...]) -> None:
  if getattr(cfg, name) not in options:
    raise ConfigError(f"{name} must be one of {options}, got {getattr(cfg, name)!r}")


def validate(cfg: LlamaConfig) -> None:
  """Raises ConfigError naming the first invalid field of `cfg`."""
  _check_positive_int(cfg, "vocab_size", "num_layers", "model_dim", "num_heads", "ffn_hidden_dim")
  if cfg.num_kv_heads is not None:
    _check_positive_int(cfg, "num_kv_heads")
  if cfg.model_dim % cfg.num_heads:
    raise ConfigError(f"num_heads={cfg.num_heads} must divide model_dim={cfg.model_dim} (heads split the width)")
  if cfg.head_dim % 2:
    raise ConfigError(f"head_dim = model_dim/num_heads = {cfg.head_dim} must be even: RoPE rotates pairs")
  if cfg.num_heads % cfg.kv_heads:
    raise ConfigError(
        f"num_kv_heads={cfg.kv_heads} must divide num_heads={cfg.num_heads}: each key/value head serves "
        "an equal group of query heads")
  if cfg.norm_eps <= 0 or cfg.init_std <= 0:
    raise ConfigError(f"norm_eps and init_std must be positive, got {cfg.norm_eps} and {cfg.init_std}")
  if cfg.rope_base <= 1:
    raise ConfigError(f"rope_base must be > 1, got {cfg.rope_base}")
  _check_choice(cfg, "dtype", DTYPES)
  _check_choice(cfg, "param_dtype", DTYPES)
  _check_choice(cfg, "attention_impl", ATTENTION_IMPLS)
  _check_choice(cfg, "decode_attention_impl", DECODE_ATTENTION_IMPLS)
  _check_choice(cfg, "remat_policy", REMAT_POLICIES)


# Presets sized to Megalodon's (SPEC §6). Head dims 64/128 are the ones cuDNN flash attention is
# fastest at; F follows Llama's ~8/3 * D rule, nudged so that total counts match.
PRESETS: dict[str, dict[str, Any]] = {
    # 219,702,272 parameters, mega200M has 220,627,968 (-0.42%).
    "llama200M": dict(num_layers=12, model_dim=1024, num_heads=16, ffn_hidden_dim=2816),
    # 1,345,423,360 parameters, mega1.3B has 1,342,832,640 (+0.19%).
    "llama1.3B": dict(num_layers=24, model_dim=2048, num_heads=16, ffn_hidden_dim=5504),
    # Test shape: grouped-query attention (4 query heads share 2 key/value heads).
    "tiny": dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, ffn_hidden_dim=48),
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
  """A named preset with optional field overrides."""
  if name not in PRESETS:
    raise ConfigError(f"unknown Llama preset {name!r}; available presets: {sorted(PRESETS)}")
  return LlamaConfig(**{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------
# Sizes and FLOPs
# --------------------------------------------------------------------------------------------

def _layer_matmul_params(cfg: LlamaConfig) -> int:
  d, hd = cfg.model_dim, cfg.head_dim
  attention = d * cfg.num_heads * hd + 2 * d * cfg.kv_heads * hd + cfg.num_heads * hd * d
  mlp = 3 * d * cfg.ffn_hidden_dim
  return attention + mlp


def count_params(cfg: LlamaConfig) -> int:
  """Number of parameters, from shapes alone (equals the initialised model's count)."""
  d = cfg.model_dim
  per_layer = _layer_matmul_params(cfg) + 2 * d  # two RMSNorm scales
  head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
  return cfg.num_layers * per_layer + cfg.vocab_size * d + d + head


def count_matmul_params(cfg: LlamaConfig) -> int:
  """Parameters that take part in a matmul per token: all block projections and the head.

  The embedding lookup is a gather, not a matmul, so the table counts only once (as the head)
  when the embeddings are tied and not at all for the input side when they are not.
  """
  return cfg.num_layers * _layer_matmul_params(cfg) + cfg.vocab_size * cfg.model_dim


def flops_per_token(cfg: LlamaConfig, seq_len: int, *, training: bool = True) -> float:
  """Model FLOPs per token for MFU: matmuls plus causal attention.

  Matmuls: 2 FLOPs per multiply-add and parameter in the forward pass, twice that in the backward
  pass (gradients of inputs and of weights), so 6 * N_matmul for training and 2 * N_matmul for a
  forward pass. Attention: per layer and token the scores q.k and the weighted sum p.v cost
  2 * heads * head_dim FLOPs per key each; causal attention is counted once, i.e. a query sees on
  average seq_len / 2 keys, giving 2 * heads * head_dim * seq_len forward (the PaLM formula
  12 * layers * D * seq_len for training, halved for causality). Norms, RoPE and softmax are left out.
  """
  attention_fwd = cfg.num_layers * 2 * cfg.num_heads * cfg.head_dim * seq_len
  if training:
    return 6.0 * count_matmul_params(cfg) + 3.0 * attention_fwd
  return 2.0 * count_matmul_params(cfg) + attention_fwd


def cache_bytes(cfg: LlamaConfig, batch: int, max_len: int) -> int:
  """Bytes of the KV cache for `batch` sequences of up to `max_len` tokens (grows with max_len)."""
  itemsize = jnp.dtype(_jnp_dtype(cfg.dtype)).itemsize
  return 2 * cfg.num_layers * batch * max_len * cfg.kv_heads * cfg.head_dim * itemsize


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

def _jnp_dtype(name: str) -> Any:
  return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def resolve_attention_impl(cfg: LlamaConfig, backend: str | None = None) -> str:
  """The `implementation=` passed to jax.nn.dot_product_attention for training/forward passes."""
  backend = backend or jax.default_backend()
  if cfg.attention_impl == "auto":
    use_cudnn = backend == "gpu" and cfg.dtype == "bfloat16" and cfg.head_dim <= 128 and cfg.head_dim % 8 == 0
    return "cudnn" if use_cudnn else "xla"
  if cfg.attention_impl == "cudnn" and cfg.dtype != "bfloat16":
    raise ConfigError(
        "attention_impl='cudnn' needs dtype='bfloat16': cuDNN flash attention has no float32 kernel. "
        "Set dtype='bfloat16' or attention_impl='xla' (or 'auto').")
  return cfg.attention_impl


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """x: [B, L, H, d]; positions: [B or 1, L] int -> x rotated by RoPE (rotate-half layout).

  Feature i of the first half and feature i of the second half form one pair, rotated by
  positions * base^(-2i/d). Angles and the rotation are float32; the result has x's dtype.
  """
  half = x.shape[-1] // 2
  freqs = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B, L, 1, d/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
  """x: [..., D] -> x / rms(x) * scale (scale init 1), statistics in float32."""

  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def _dense(cfg: LlamaConfig, features, *, name: str, axis=-1, out_proj: bool = False) -> nn.DenseGeneral:
  # dense_ops.dot_general: the same batch-1 decoding fix as Megalodon's projections (a fair baseline).
  # Projections that write into the residual stream start smaller (GPT-2 / Megatron scaling), so
  # the stream's variance does not grow with depth at initialisation.
  std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if out_proj else cfg.init_std
  return nn.DenseGeneral(features=features, axis=axis, use_bias=False, dtype=_jnp_dtype(cfg.dtype),
                         param_dtype=_jnp_dtype(cfg.param_dtype),
                         kernel_init=nn.initializers.normal(std), dot_general=dense_ops.dot_general, name=name)


def _cached_attention(cfg: LlamaConfig, q: jax.Array, k: jax.Array, v: jax.Array, layer_cache: Cache,
                      index: jax.Array) -> tuple[jax.Array, Cache]:
  """Writes k, v at [index, index + L) of the cache and attends to every key up to each query.

  q: [B, L, H, d]; k, v: [B, L, K, d]; layer_cache {"k", "v"}: [B, S, K, d]; index: int32 scalar.
  The caller keeps index + L <= S (dynamic_update_slice would clamp the write position otherwise).
  """
  start = (0, index, 0, 0)
  k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
  v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
  length, max_len = q.shape[1], k_all.shape[1]
  if cfg.decode_attention_impl == "cudnn" and length == 1:
    valid = jnp.full((q.shape[0],), index + 1, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(q, k_all, v_all, key_value_seq_lengths=valid, implementation="cudnn")
  else:
    query_pos = index + jnp.arange(length, dtype=jnp.int32)
    mask = jnp.arange(max_len, dtype=jnp.int32)[None, :] <= query_pos[:, None]  # [L, S]
    out = jax.nn.dot_product_attention(q, k_all, v_all, mask=mask[None, None], implementation="xla")
  return out, {"k": k_all, "v": v_all}


class Attention(nn.Module):
  """Causal (grouped-query) self-attention with RoPE; optional KV cache."""

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, layer_cache: Cache | None,
               index: jax.Array | None) -> tuple[jax.Array, Cache | None]:
    """x: [B, L, D]; positions: [1, L] -> ([B, L, D], updated layer cache or None)."""
    cfg = self.cfg
    q = _dense(cfg, (cfg.num_heads, cfg.head_dim), name="q_proj")(x)
    k = _dense(cfg, (cfg.kv_heads, cfg.head_dim), name="k_proj")(x)
    v = _dense(cfg, (cfg.kv_heads, cfg.head_dim), name="v_proj")(x)
    q = apply_rope(q, positions, cfg.rope_base)
    k = apply_rope(k, positions, cfg.rope_base)
    if layer_cache is None:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=resolve_attention_impl(cfg))
      new_cache = None
    else:
      out, new_cache = _cached_attention(cfg, q, k, v, layer_cache, index)
    return _dense(cfg, cfg.model_dim, axis=(-2, -1), out_proj=True, name="o_proj")(out), new_cache


class SwiGLU(nn.Module):
  """x: [..., D] -> W_down (silu(W_gate x) * W_up x): [..., D]."""

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    gate = _dense(cfg, cfg.ffn_hidden_dim, name="gate_proj")(x)
    up = _dense(cfg, cfg.ffn_hidden_dim, name="up_proj")(x)
    return _dense(cfg, cfg.model_dim, out_proj=True, name="down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
  """One pre-norm decoder layer: x + Attn(RMSNorm(x)), then + SwiGLU(RMSNorm(x))."""

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, layer_cache: Cache | None,
               index: jax.Array | None) -> tuple[jax.Array, Cache | None]:
    """x: [B, L, D] -> ([B, L, D], updated layer cache or None). Signature fits nn.scan."""
    cfg = self.cfg
    norm = functools.partial(RMSNorm, cfg.norm_eps, _jnp_dtype(cfg.dtype), _jnp_dtype(cfg.param_dtype))
    h, new_cache = Attention(cfg, name="attn")(norm(name="attn_norm")(x), positions, layer_cache, index)
    x = x + h
    x = x + SwiGLU(cfg, name="mlp")(norm(name="mlp_norm")(x))
    return x, new_cache


_REMAT_POLICY: dict[str, Callable[..., bool] | None] = {
    "full": None,  # jax.checkpoint without a policy saves nothing but the block's inputs
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_class(cfg: LlamaConfig) -> type[nn.Module]:
  if cfg.remat_policy == "none":
    return Block
  # Under scan, CSE across iterations cannot defeat remat, and prevent_cse would only slow it down.
  return nn.remat(Block, policy=_REMAT_POLICY[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


class Llama(nn.Module):
  """The Llama decoder. tokens [B, L] int -> logits [B, L, vocab] float32.

  With `cache` (from `init_cache`), the L tokens are placed at positions cache["index"] + [0, L)
  and the call returns (logits, new cache): prefill (L > 1) and single-step decoding (L = 1).
  """

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, cache: Cache | None = None):
    cfg = self.cfg
    dtype, param_dtype = _jnp_dtype(cfg.dtype), _jnp_dtype(cfg.param_dtype)
    embed = nn.Embed(cfg.vocab_size, cfg.model_dim, embedding_init=nn.initializers.normal(cfg.init_std),
                     dtype=dtype, param_dtype=param_dtype, name="embed")
    x = embed(tokens)
    length = tokens.shape[1]
    index = None if cache is None else cache["index"]
    positions = jnp.arange(length, dtype=jnp.int32)[None, :]
    if index is not None:
      positions = positions + index
    layer_caches = None if cache is None else cache["layers"]
    x, new_layers = self._blocks(x, positions, layer_caches, index)
    x = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = output_logits(x, embed.embedding.T, dtype)
    else:
      head = self.param("lm_head", nn.initializers.normal(cfg.init_std), (cfg.model_dim, cfg.vocab_size),
                        param_dtype)
      logits = output_logits(x, head, dtype)
    if cache is None:
      return logits
    return logits, {"layers": new_layers, "index": index + length}

  def _blocks(self, x, positions, layer_caches, index):
    cfg = self.cfg
    block = _block_class(cfg)
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, 0, nn.broadcast), length=cfg.num_layers)
      return scanned(cfg, name="layers")(x, positions, layer_caches, index)
    new_layers = []
    for i in range(cfg.num_layers):
      x, layer_cache = block(cfg, name=f"layers_{i}")(
          x, positions, None if layer_caches is None else layer_caches[i], index)
      new_layers.append(layer_cache)
    return x, (None if layer_caches is None else tuple(new_layers))


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

def init_cache(cfg: LlamaConfig, batch: int, max_len: int) -> Cache:
  """An empty KV cache for `batch` sequences of up to `max_len` tokens.

  {"layers": per-layer {"k", "v"}: [B, S, K, d] (a tuple of layers, or one dict with a leading layer
  axis when cfg.scan_layers), "index": int32 scalar, the number of tokens already written}.
  Its size, `cache_bytes(cfg, batch, max_len)`, grows linearly with max_len.
  """
  if batch <= 0 or max_len <= 0:
    raise ConfigError(f"batch and max_len must be positive, got batch={batch}, max_len={max_len}")
  shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
  dtype = _jnp_dtype(cfg.dtype)
  if cfg.scan_layers:
    stacked = (cfg.num_layers,) + shape
    layers: Any = {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
  else:
    layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers))
  return {"layers": layers, "index": jnp.zeros((), jnp.int32)}


def cache_capacity(cache: Cache) -> int:
  """max_len of a cache from `init_cache`."""
  layers = cache["layers"]
  return (layers["k"].shape[2] if isinstance(layers, Mapping) else layers[0]["k"].shape[1])


def make_decode_step(model: Llama) -> Callable[[Any, Cache, jax.Array], tuple[jax.Array, Cache]]:
  """A jitted `step(params, cache, tokens[B, L]) -> (logits[B, L, V] float32, cache)`.

  The cache argument is donated, so the update happens in place; L = 1 is a decode step and
  L > 1 a prefill (each distinct L compiles once). Keep index + L <= max_len: positions past the
  end of the cache are not representable (the write would be clamped).
  """

  def step(params, cache, tokens):
    return model.apply({"params": params}, tokens, cache)

  return jax.jit(step, donate_argnums=(1,))


def check_attention_backends(seq_len: int = 256) -> bool:
  """Compares the cuDNN and XLA attention paths (forward, gradients, cached decoding) in bf16.

  Needs a GPU; prints one line per check and returns whether all passed. The tolerances are those
  of bf16 (relative L2 error below 2%).
  """
  base = LlamaConfig(vocab_size=1000, num_layers=2, model_dim=256, num_heads=4, num_kv_heads=2,
                     ffn_hidden_dim=512, dtype="bfloat16")
  tokens = jax.random.randint(jax.random.key(0), (2, seq_len), 0, base.vocab_size)
  params = jax.jit(Llama(base).init)(jax.random.key(1), tokens)["params"]

  def rel(a, b):
    a, b = [jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(t)]) for t in (a, b)]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

  def loss_and_grad(cfg):
    loss = lambda p: jnp.mean(jax.nn.logsumexp(Llama(cfg).apply({"params": p}, tokens), axis=-1))
    return jax.jit(jax.value_and_grad(loss))(params)

  def decode(cfg, steps=8):
    step, cache, outs = make_decode_step(Llama(cfg)), init_cache(cfg, 2, seq_len), []
    _, cache = step(params, cache, tokens[:, :seq_len - steps])
    for t in range(seq_len - steps, seq_len):
      logits, cache = step(params, cache, tokens[:, t:t + 1])
      outs.append(logits)
    return jnp.concatenate(outs, axis=1)

  xla, cudnn = base.replace(attention_impl="xla"), base.replace(attention_impl="cudnn")
  errors = {
      "forward logits": rel(jax.jit(Llama(cudnn).apply)({"params": params}, tokens),
                            jax.jit(Llama(xla).apply)({"params": params}, tokens)),
      "gradients": rel(loss_and_grad(cudnn)[1], loss_and_grad(xla)[1]),
      "cached decode": rel(decode(base.replace(decode_attention_impl="cudnn")), decode(base)),
      "decode vs forward": rel(decode(base), jax.jit(Llama(xla).apply)({"params": params}, tokens)[:, -8:]),
  }
  for name, error in errors.items():
    print(f"{'PASS' if error < 2e-2 else 'FAIL'}  {name:18s} relative L2 error {error:.2e}")
  return all(error < 2e-2 for error in errors.values())


def main(argv: list[str] | None = None) -> None:
  """Prints the presets' parameter counts next to the Megalodon presets they match;
  with --check-attention (GPU), also compares the cuDNN and XLA attention paths."""
  import argparse
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--check-attention", action="store_true")
  args = parser.parse_args(argv)
  from megalodon_jax import config as mega_config
  for name, mega in (("llama200M", "mega200M"), ("llama1.3B", "mega1.3B")):
    ours = count_params(preset(name))
    theirs = mega_config.count_params(mega_config.preset(mega))
    print(f"{name:10s} {ours:>15,d}   {mega:9s} {theirs:>15,d}   ratio {ours / theirs:.4f}   "
          f"train FLOPs/token @2048: {flops_per_token(preset(name), 2048):.3e}")
  if args.check_attention and not check_attention_backends():
    raise SystemExit(1)


if __name__ == "__main__":
  main()
