"""The Megalodon language model: blocks, the LM, parameter initialisation (SPEC §1, §6)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_jax.cache import LayerCache, ModelCache
from megalodon_jax.config import MegalodonConfig, check_sequence_length
from megalodon_jax.layers import initializers
from megalodon_jax.layers.ffn import NormalizedFFN
from megalodon_jax.layers.mega_attention import MovingAverageGatedAttention
from megalodon_jax.layers.timestep_norm import TimestepNorm
from megalodon_jax.ops import backend, rope
from megalodon_jax.ops.logits import output_logits
from megalodon_jax.sharding.rules import constrain, partitioned

ACTIVATION = ("batch", "length", "act_embed")  # logical axes of the residual stream [B, L, D]

_policies = jax.checkpoint_policies
_KERNEL_OUTPUTS = ("cema_out", "attention_out")  # the costly scan and attention (checkpoint_name)
_NORM_OUTPUTS = ("tsn_out", "cema_norm_out", "qk_norm_out", "ffn_norm_out")
REMAT_POLICIES = {
    "full": _policies.nothing_saveable,
    "dots": _policies.checkpoint_dots,
    "dots_no_batch": _policies.dots_with_no_batch_dims_saveable,
    "save_cema_attention": _policies.save_only_these_names(*_KERNEL_OUTPUTS),
    # Every projection output as well: the backward recomputes only elementwise work and norms.
    "save_dots_cema_attention": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _policies.save_only_these_names(*_KERNEL_OUTPUTS)),
    # And the four normalisation outputs, whose reductions (TimestepNorm's scan above all) the
    # backward would otherwise recompute (mega1.3B on an H200: 78 GiB, 1% faster than without).
    "save_dots_norms_cema_attention": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable,
        _policies.save_only_these_names(*_KERNEL_OUTPUTS, *_NORM_OUTPUTS)),
}

# Primitives whose outputs remat_policy "recompute_elementwise" recomputes in the backward
# instead of storing: elementwise maps, casts and layout changes (none reduces over an axis or
# mixes rows).
RECOMPUTED_PRIMITIVES = frozenset({
    "abs", "add", "add_any", "and", "broadcast_in_dim", "ceil", "clamp", "complex", "concatenate", "conj",
    "convert_element_type", "copy", "copy_p", "cos", "div", "eq", "erf", "exp", "exp2", "expand_dims",
    "floor", "ge", "gt", "imag", "integer_pow", "iota", "le", "log", "log1p", "logistic", "lt", "max",
    "min", "mul", "name", "ne", "neg", "not", "or", "pad", "pow", "real", "rem", "reshape", "rev", "round",
    "rsqrt", "select_n", "sharding_constraint", "sign", "sin", "slice", "sqrt", "square", "squeeze", "stack",
    "stop_gradient", "sub", "tan", "tanh", "transpose",
})
# checkpoint_name values that "recompute_elementwise" stores although elementwise: the first hop's
# output y = h + x is one [B, L, D] tensor, its sources (the wh1 and wh2 outputs) are two.
STORED_NAMES = frozenset({"mega_out"})


def recompute_elementwise(prim, *avals, **params) -> bool:
  """Checkpoint policy "recompute_elementwise": store everything but elementwise results.

  Stored: the outputs of matmuls, of the Pallas kernels (CEMA, TimestepNorm, attention) together
  with their forward residuals, so no kernel's forward runs again in the backward, of reductions
  (norm statistics), scans, and the first hop's output (STORED_NAMES). Recomputed in the backward,
  where XLA fuses them into the consumers that need them: elementwise chains (bias adds, silu,
  the r gate, rotary, q/k affine maps, normalised values, residual adds, casts).

  Stored per layer of mega200M at 1x32768 (bf16): 838 MiB, against 3019 MiB under "none" (which
  keeps silu's linearisation points, the gated product and float32 normalised values, largely
  the same [L, 2048] GEMM output in three or four forms) and 816 MiB under
  save_dots_cema_attention (which re-runs TimestepNorm's forward and the attention's score pass
  in the backward). Under nn.scan each stored tensor costs a write into a stacked buffer, that
  buffer's zero-fill and a copy back out in the backward loop: the H200 train step (bench_train)
  took 124.0 ms with this policy, against 147.8-150 ms with "none" and 134.0 ms with
  save_dots_cema_attention (those two measured before main's kernel updates of 2026-11-29).
  Without differentiation nothing is recomputed.

  Complex values cannot be stored (jax.checkpoint rounds every stored floating residual with
  reduce_precision, which rejects complex64 in jax 0.10): operations on complex inputs are
  recomputed, except `real` and `imag`, whose float outputs are stored in their place (CEMA's
  chunk states as its kernel takes them, so the complex recurrence behind them is not redone).
  """
  if any(jnp.issubdtype(getattr(a, "dtype", jnp.float32), jnp.complexfloating) for a in avals):
    return prim.name in ("real", "imag")
  if prim.name == "name":
    return params.get("name") in STORED_NAMES
  return prim.name not in RECOMPUTED_PRIMITIVES


REMAT_POLICIES["recompute_elementwise"] = recompute_elementwise


def rescale_init(config: MegalodonConfig, layer_id: int) -> float | None:
  return 0.1 * (0.5 ** layer_id) if config.rescale_nffn else None


class MegalodonBlock(nn.Module):
  """Two-hop residual block: y = MEGA(x) (includes + x); out = x + FFN(LayerNorm(y)).

  Called as (x, layer_cache, positions, segment_ids, cache_count) -> (out, new_layer_cache), the
  shape `nn.scan` needs. x: [B, L, D].
  """
  config: MegalodonConfig
  layer_id: int = 0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, layer_cache: LayerCache | None, positions, segment_ids, cache_count):
    cfg = self.config
    y, new_cache = MovingAverageGatedAttention(cfg, name="mega")(
        x, positions, segment_ids=segment_ids, cache=layer_cache, cache_count=cache_count,
        deterministic=self.deterministic)
    out = NormalizedFFN(cfg.ffn_hidden_dim, cfg.swiglu, rescale_init(cfg, self.layer_id), cfg.norm_eps,
                        cfg.dropout, cfg.hidden_dropout, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                        name="nffn")(y, x, self.deterministic)
    return out, new_cache


def _block_class(config: MegalodonConfig):
  if config.remat_policy == "none":
    return MegalodonBlock
  return nn.remat(MegalodonBlock, policy=REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers)


class _OutputHead(nn.Module):
  """x: [B, L, D] -> float32 logits [B, L, V] (matmul accumulated in float32)."""
  vocab_size: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", partitioned(initializers.embedding(x.shape[-1]), ("embed", "vocab")),
                        (x.shape[-1], self.vocab_size), self.param_dtype)
    return output_logits(x, kernel, self.dtype)


class MegalodonLM(nn.Module):
  """tokens -> embedding (* sqrt(D) optionally) -> blocks -> TimestepNorm -> head; float32 logits.

  Call: model.apply({"params": p}, tokens, segment_ids=None, cache=None, deterministic=True)
    tokens: [B, L] int; segment_ids: [B, L] int (packed documents; 0 = padding) or None.
    Without a cache returns logits [B, L, V]; with a ModelCache returns (logits, new_cache).
  With a cache, L must satisfy count + L <= C, or count == 0 and L a multiple of C (the decoding
  helpers in decoding.py split inputs that way).
  """
  config: MegalodonConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None, *,
               cache: ModelCache | None = None, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length] integers, got shape {tokens.shape}")
    if segment_ids is not None and segment_ids.shape != tokens.shape:
      raise ValueError(f"segment_ids shape {segment_ids.shape} must equal tokens shape {tokens.shape}")
    length = tokens.shape[1]
    if cache is None:
      check_sequence_length(cfg, length)
    elif length > cfg.chunk_size and length % cfg.chunk_size:
      raise ValueError(f"with a cache, feed at most chunk_size={cfg.chunk_size} steps or whole chunks; "
                       f"got {length} (use decoding.prefill, which splits the input)")

    embed = nn.Embed(cfg.vocab_size, cfg.model_dim,
                     embedding_init=partitioned(initializers.embedding(cfg.model_dim), ("vocab", "embed")),
                     dtype=dtype, param_dtype=pdtype, name="embed")
    x = constrain(embed(tokens), ACTIVATION)
    if cfg.scale_emb:
      x = x * jnp.asarray(math.sqrt(cfg.model_dim), dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)

    count = jnp.zeros((), jnp.int32) if cache is None else cache.count
    positions = rope.chunk_positions(length, cfg.chunk_size, segment_ids, offset=count)
    layer_caches = None if cache is None else cache.layers
    block = _block_class(cfg)
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_layers = scanned(cfg, 0, deterministic, name="layers")(x, layer_caches, positions, segment_ids, count)
    else:
      new_layers = []
      for i in range(cfg.num_layers):
        layer_cache = None if cache is None else layer_caches[i]
        x, new_layer = block(cfg, i, deterministic, name=f"layers_{i}")(x, layer_cache, positions, segment_ids, count)
        x = constrain(x, ACTIVATION)
        new_layers.append(new_layer)
      new_layers = tuple(new_layers)

    padding_mask = None if segment_ids is None else segment_ids == 0
    x, final_state = TimestepNorm(cfg.norm_num_groups, cfg.norm_eps, backend.timestep_norm_method(cfg.timestep_norm_impl, length),
                                  pdtype, name="final_norm")(
        x, None if cache is None else cache.final_norm, padding_mask=padding_mask, segment_ids=segment_ids)
    if cfg.share_emb:
      logits = output_logits(x, embed.embedding.T, dtype)
    else:
      logits = _OutputHead(cfg.vocab_size, dtype, pdtype, name="output")(x)
    logits = constrain(logits, ("batch", "length", "vocab"))
    if cache is None:
      return logits
    new_count = ((count + length) % cfg.chunk_size).astype(jnp.int32)
    return logits, ModelCache(layers=new_layers, final_norm=final_state, count=new_count)


def init_params(config: MegalodonConfig, rng: jax.Array, length: int | None = None) -> Any:
  """Initialised parameters (float `config.param_dtype`), as the release initialises them.

  With scan_layers the per-layer FFN rescale (0.1 * 0.5**layer_id) cannot come from one shared
  initialiser, so it is written in here. Plain arrays: the logical axis names the parameters are
  created with are in `param_logical_axes`.
  """
  params = jax.jit(lambda r: nn.unbox(_init_boxed(config, r, length)))(rng)
  if config.scan_layers and config.rescale_nffn:
    alphas = jnp.stack([jnp.full((config.model_dim,), rescale_init(config, i)) for i in range(config.num_layers)])
    params["layers"]["nffn"]["alpha"] = alphas.astype(params["layers"]["nffn"]["alpha"].dtype)
  return params


def _init_boxed(config: MegalodonConfig, rng: jax.Array, length: int | None) -> Any:
  """Parameters as nn.LogicallyPartitioned boxes (values and logical axis names)."""
  length = min(config.chunk_size, 8) if length is None else length
  tokens = jnp.zeros((1, length), jnp.int32)
  return MegalodonLM(config).init({"params": rng}, tokens)["params"]


def param_logical_axes(config: MegalodonConfig) -> Any:
  """The params tree with a PartitionSpec of logical axis names per leaf (nothing is allocated)."""
  boxed = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0), None))
  return nn.get_partition_spec(boxed)


def param_count(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
