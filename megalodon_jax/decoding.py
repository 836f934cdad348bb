"""Incremental decoding: prefill of any length, a jit-compiled single step, sampling (SPEC §5).

Memory is constant in the number of tokens: the cache (cache.py) holds one chunk of keys/values
and fixed-size recurrent states. `prefill` splits its input so that every piece either stays
inside the current chunk or covers whole chunks from a chunk boundary, the two forms the model
accepts with a cache.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from megalodon_jax.cache import LayerCache, ModelCache, init_cache
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.model import MegalodonLM


@functools.lru_cache(maxsize=None)
def _apply_with_cache(config: MegalodonConfig):
  model = MegalodonLM(config)

  def apply(params, tokens, cache):
    return model.apply({"params": params}, tokens, cache=cache)

  return jax.jit(apply, donate_argnums=(2,))


def prefill_pieces(length: int, count: int, chunk_size: int) -> list[int]:
  """Lengths of the pieces `prefill` feeds: finish the open chunk, then whole chunks, then the rest."""
  pieces = []
  if count and length:
    first = min(chunk_size - count, length)
    pieces.append(first)
    length -= first
  whole = (length // chunk_size) * chunk_size
  if whole:
    pieces.append(whole)
  if length - whole:
    pieces.append(length - whole)
  return pieces


def prefill(params: Any, config: MegalodonConfig, tokens: jax.Array,
            cache: ModelCache | None = None) -> tuple[jax.Array, ModelCache]:
  """Feeds tokens [B, k] (any k >= 0) through the model. Returns (logits [B, k, V], cache).

  The cache passed in is consumed (its buffers are donated).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  batch, length = tokens.shape
  cache = init_cache(config, batch) if cache is None else cache
  apply = _apply_with_cache(config)
  outputs, start = [], 0
  for piece in prefill_pieces(length, int(cache.count), config.chunk_size):
    logits, cache = apply(params, tokens[:, start:start + piece], cache)
    outputs.append(logits)
    start += piece
  if not outputs:
    return jnp.zeros((batch, 0, config.vocab_size), jnp.float32), cache
  return jnp.concatenate(outputs, axis=1), cache


def decode_step(params: Any, config: MegalodonConfig, token: jax.Array,
                cache: ModelCache) -> tuple[jax.Array, ModelCache]:
  """One token per sequence: token [B] -> (logits [B, V], new cache). jit-compiled once per config."""
  logits, cache = _apply_with_cache(config)(params, jnp.asarray(token, jnp.int32).reshape(-1, 1), cache)
  return logits[:, 0], cache


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """logits: [B, V] -> token ids [B]. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set whose probability reaches top_p (always at least the best token).
    keep = cumulative - jax.nn.softmax(sorted_logits, axis=-1) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


DECODE_IMPLS = ("fused", "model")


class FusedSettings(NamedTuple):
  """How the fused decode step runs (see fused_forward_one) and the layouts it needs: transpose and
  scores='pallas' (permute_z) are fuse_decode_params options; cema / scores 'pallas' change the
  cache's layout (to_fused_cache)."""
  dup: str = "mask"
  stats: str = "shifted"
  cema: str = "xla"
  scores: str = "xla"
  transpose: bool = False
  # scores='attend': decode_step.attend_step's form, see attend_options; () = its defaults.
  attend_blocks: tuple[int, ...] = ()
  fold_norm: bool = False  # fuse_decode_params(fold_norm=...)
  # The residual adds in Pallas (fused_forward_one(fuse_residual=True)); needs cema='pallas', scores
  # 'pallas' / 'attend' and fold_norm.
  fuse_residual: bool = False
  # The FFN's first product with its norm and activation in one Pallas kernel (fused_forward_one(ffn_kernel=...)).
  ffn_kernel: bool = False
  # TimestepNorm/CEMA kernel groups per program (fused_forward_one(tsn_groups=...)); 0: its default.
  tsn_groups: int = 0
  head_rows: bool = False  # fuse_decode_params(head_rows=...)
  merge_v: bool = False  # fuse_decode_params(merge_v=...)
  # The final TimestepNorm (+ the last residual add and the count) in one Pallas kernel.
  final_kernel: bool = False


# The GPU defaults, from same-run H200 measurements at context 32K, device loop (bench_decode; Llama of
# the same size with cuDNN decode attention in the same process):
#   batch 1 (2026-11-29, session 5, main at d65d5c2, this default alternating with session 4's in one run):
#     mega200M 0.484 / 0.492 ms per token (2.06x / 2.03x Llama) against 0.506 / 0.523; mega1.3B 1.471 /
#     1.495 (2.13x / 2.10x) against 1.540 / 1.545. Added to session 4's: [wv | w_mx] as one row reduction
#     (merge_v), the final TimestepNorm as one kernel (final_kernel), the LM head as a row reduction
#     (head_rows), one norm group per TimestepNorm/CEMA program (tsn_groups=1). Then (7e28fe0, the same
#     alternation) fc_in's product, norm and SiLU in one kernel (ffn_kernel, 4 rows per program): mega200M
#     0.466 / 0.468 ms (2.08x / 2.07x Llama 0.971) against 0.482 / 0.487; mega1.3B 1.444 / 1.457 (2.12x /
#     2.10x Llama 3.060) against 1.456 / 1.516. This default at 6bfac1f against session 4's, alternating:
#     mega200M 0.463 / 0.489 ms (2.17x / 2.05x Llama 1.004) against 0.531 / 0.527; mega1.3B 1.445 / 1.503
#     (2.14x / 2.06x Llama 3.096) against 1.554 / 1.613; 104 kernels per token at 200M (131 before).
#   batch 1 (session 4, mega1.3B, one run): 1.510 ms per token = 2.04x Llama (3.087 ms), 251 kernels per
#     token: attend_step's looped 8 x 1024 form with v's bias + SiLU and the deferred RMS normalisation
#     in it, the gate in the Pallas combine, and the residual adds in Pallas (fuse_residual); without
#     fuse_residual 1.525 ms; the earlier default (attend32x1024x256 with XLA's gate, SiLU and norm
#     kernels, 369 kernels per token) 1.672 ms.
#   batch > 1: at 16, 4.039 ms = 5.91x Llama (23.87 ms); fuse_residual there is slower (4.076 vs 4.035 ms in
#     one run), attend_step 4.33 ms (round 3 of session 3) and the first default 5.42 ms.
GPU_FUSED_SETTINGS = {1: FusedSettings(dup="reduce", stats="shifted", cema="pallas", scores="attend", transpose=True,
                                       fold_norm=True, fuse_residual=True, ffn_kernel=True, tsn_groups=1, head_rows=True,
                                       merge_v=True, final_kernel=True),
                      "batched": FusedSettings(dup="dot", stats="shifted", cema="pallas", scores="pallas", transpose=True,
                                               fold_norm=True)}


def default_fused_settings(batch: int) -> FusedSettings:
  """The settings `generate` uses for `batch` sequences: GPU_FUSED_SETTINGS on a GPU (the single-row
  form only matters at batch 1); elsewhere the XLA paths (Pallas would run in its interpreter)."""
  from megalodon_jax.ops import backend
  if jax.default_backend() != "gpu" or not backend.gpu_kernels_usable():
    return FusedSettings()
  return GPU_FUSED_SETTINGS[1 if batch == 1 else "batched"]


def settings_of(fused: Any, batch: int) -> FusedSettings:
  """The settings for fuse_decode_params output `fused`: its layout decides transpose and scores, the
  rest is default_fused_settings(batch)'s (a transposed-only single-row form falls back to 'mask')."""
  default = default_fused_settings(batch)
  transpose = "w_mx_t" in fused["layers"][0] or "w_vmx_t" in fused["layers"][0]
  dup = default.dup if transpose or default.dup not in TRANSPOSED_DUPS else "mask"
  scores = default.scores if default.scores != "xla" else "pallas"
  fold_norm = "ffn_colsum" in fused["layers"][0]
  # fuse_residual needs the fold and the permuted layout (scores 'pallas' / 'attend'): off for other params.
  fuse_residual = default.fuse_residual and fold_norm and "rope_freqs" in fused and default.cema == "pallas"
  return default._replace(dup=dup, transpose=transpose, scores=scores if "rope_freqs" in fused else "xla",
                          fold_norm=fold_norm, fuse_residual=fuse_residual, head_rows="head_t" in fused,
                          merge_v="w_vmx_t" in fused["layers"][0])


def to_fused_cache(cache: ModelCache, config: MegalodonConfig, settings: FusedSettings) -> ModelCache:
  """The model's cache in the layout fused_forward_one reads with `settings` (layers unstacked,
  CEMA states split for cema='pallas', keys permuted for scores='pallas')."""
  cache = unstack_cache(cache)
  cache = split_cema_state(cache) if settings.cema == "pallas" else cache
  return permute_keys(cache, config) if settings.scores != "xla" else cache


def from_fused_cache(cache: ModelCache, config: MegalodonConfig, settings: FusedSettings) -> ModelCache:
  """Inverse of to_fused_cache: the model's cache layout (stacked again for scan_layers)."""
  cache = unpermute_keys(cache, config) if settings.scores != "xla" else cache
  cache = join_cema_state(cache) if settings.cema == "pallas" else cache
  return stack_cache(cache) if config.scan_layers else cache


@functools.lru_cache(maxsize=None)
def _cache_converter(config: MegalodonConfig, settings: FusedSettings, inverse: bool):
  convert = from_fused_cache if inverse else to_fused_cache
  return jax.jit(lambda cache: convert(cache, config, settings))


@functools.lru_cache(maxsize=None)
def _sample_loop(config: MegalodonConfig, steps: int, temperature: float, top_k: int, top_p: float,
                 decode_impl: str = "fused", settings: FusedSettings | None = None):
  """jit of (params, token [B], cache, rng) -> (tokens [B, steps], cache, rng): `steps` tokens, each
  fed back, in one lax.scan. The rng is split once per token, as the one-token loop always did.

  decode_impl 'fused': params are fuse_decode_params's, the cache is in to_fused_cache's layout
  and each step is fused_forward_one with `settings`; 'model': the stored params and the model's
  cache through MegalodonLM.apply."""
  model = MegalodonLM(config)

  def forward(params, token, cache):
    if decode_impl == "fused":
      return fused_forward_one(params, config, token, cache, settings.dup, settings.stats, settings.cema,
                               settings.scores, settings.attend_blocks, settings.fuse_residual,
                               ffn_kernel=settings.ffn_kernel, tsn_groups=settings.tsn_groups,
                               final_kernel=settings.final_kernel)
    logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
    return logits[:, 0], cache

  def loop(params, token, cache, rng):
    def body(carry, _):
      token, cache, rng = carry
      logits, cache = forward(params, token, cache)
      rng, sub = jax.random.split(rng)
      nxt = sample_logits(logits, sub, temperature, top_k, top_p)
      return (nxt, cache, rng), nxt

    (_, cache, rng), tokens = jax.lax.scan(body, (token, cache, rng), None, length=steps)
    return tokens.T, cache, rng

  return jax.jit(loop, donate_argnums=(2,))


def unstack_cache(cache: ModelCache) -> ModelCache:
  """A scanned-layers cache (one LayerCache with a leading layer axis) as a tuple of LayerCaches."""
  if not isinstance(cache.layers, LayerCache):  # already a tuple of LayerCaches
    return cache
  count = jax.tree.leaves(cache.layers)[0].shape[0]
  return cache._replace(layers=tuple(jax.tree.map(lambda leaf, i=i: leaf[i], cache.layers) for i in range(count)))


def stack_cache(cache: ModelCache) -> ModelCache:
  """Inverse of unstack_cache: the layout of a model with scan_layers=True."""
  return cache._replace(layers=jax.tree.map(lambda *xs: jnp.stack(xs), *cache.layers))


def _loop_setup(params: Any, config: MegalodonConfig, decode_impl: str, fused_params: Any,
                settings: FusedSettings | None, batch: int) -> tuple[Any, FusedSettings | None]:
  """(the loop's params, its FusedSettings or None for 'model')."""
  if decode_impl not in DECODE_IMPLS:
    raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {decode_impl!r}")
  if decode_impl == "model":
    return params, None
  if fused_params is None:
    settings = settings or default_fused_settings(batch)
    fused_params = fuse_decode_params(params, config, permute_z=settings.scores != "xla",
                                      transpose=settings.transpose, fold_norm=settings.fold_norm,
                                      head_rows=settings.head_rows, merge_v=settings.merge_v)
  settings = settings or settings_of(fused_params, batch)
  if any(name in fused_params["layers"][0] for name in ("w_mx_t", "w_vmx_t")) != settings.transpose:
    raise ValueError(f"fused_params are {'' if settings.transpose else 'not '}expected transposed by {settings}: "
                     f"make them with fuse_decode_params(..., transpose={settings.transpose})")
  return fused_params, settings


def _first_token(params, config, prompt, rng, temperature, top_k, top_p):
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"prompt must be [batch, k] with k >= 1 tokens, got shape {prompt.shape}")
  logits, cache = prefill(params, config, prompt)
  rng, sub = jax.random.split(rng)
  return sample_logits(logits[:, -1], sub, temperature, top_k, top_p), cache, rng


def generate(params: Any, config: MegalodonConfig, prompt: np.ndarray | jax.Array, max_new_tokens: int,
             rng: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_token: int | None = None, tokens_per_call: int = 1, decode_impl: str = "fused",
             fused_params: Any = None, fused_settings: FusedSettings | None = None) -> Iterator[np.ndarray]:
  """Streams sampled tokens: yields [B] int arrays, one per step. prompt: [B, k] with k >= 1.

  tokens_per_call > 1 samples that many tokens per device call (`generate_on_device`'s loop) and
  yields them one by one: the same tokens for the same rng, without a host round trip per token;
  at a stop token up to tokens_per_call - 1 tokens are computed for nothing.

  decode_impl: 'fused' (default) decodes through fuse_decode_params / fused_forward_one (fewer,
  larger kernels; see GPU_FUSED_SETTINGS for the measured speed), 'model' through
  MegalodonLM.apply on the stored parameters. Both give the full forward's logits (to float32
  rounding in float32). fused_settings: how the fused step runs (default: default_fused_settings
  of the batch, or settings_of the fused_params given). fused_params: fuse_decode_params's output
  in the layout the settings need, if the caller has it already (otherwise it is computed once
  per call). The prompt is always prefilled through the model.
  """
  if tokens_per_call < 1:
    raise ValueError(f"tokens_per_call must be >= 1, got {tokens_per_call}")
  batch = np.shape(prompt)[0]
  loop_params, settings = _loop_setup(params, config, decode_impl, fused_params, fused_settings, batch)
  token, cache, rng = _first_token(params, config, prompt, rng, temperature, top_k, top_p)
  if settings is not None:  # once: the cache stays in the fused layout (it is not returned)
    cache = _cache_converter(config, settings, False)(cache)
  loop = _sample_loop(config, int(tokens_per_call), float(temperature), int(top_k), float(top_p), decode_impl,
                      settings)
  pending = np.asarray(token)[:, None]
  produced = 0
  while True:
    for host in pending.T:
      yield host
      produced += 1
      if produced == max_new_tokens or (stop_token is not None and np.all(host == stop_token)):
        return
    tokens, cache, rng = loop(loop_params, jnp.asarray(pending[:, -1]), cache, rng)
    pending = np.asarray(tokens)


def generate_on_device(params: Any, config: MegalodonConfig, prompt: np.ndarray | jax.Array,
                       max_new_tokens: int, rng: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, decode_impl: str = "fused", fused_params: Any = None,
                       fused_settings: FusedSettings | None = None) -> tuple[jax.Array, ModelCache]:
  """The tokens `generate` would stream, made in one jitted lax.scan: [B, max_new_tokens] and the cache
  (in the model's layout).

  No host round trip per token (the host only launches the loop), which is how a server decodes
  (see GPU_FUSED_SETTINGS for the speed of the default decode_impl='fused'; arguments as in
  `generate`). No early stop: run it in pieces, or use `generate` with tokens_per_call, to stop at
  a stop token. Compiled once per (config, max_new_tokens, sampling settings, decode_impl,
  fused settings).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  batch = np.shape(prompt)[0]
  loop_params, settings = _loop_setup(params, config, decode_impl, fused_params, fused_settings, batch)
  first, cache, rng = _first_token(params, config, prompt, rng, temperature, top_k, top_p)
  if max_new_tokens == 1:
    return first[:, None], cache
  loop = _sample_loop(config, max_new_tokens - 1, float(temperature), int(top_k), float(top_p), decode_impl,
                      settings)
  if settings is not None:
    cache = _cache_converter(config, settings, False)(cache)
  rest, cache, _ = loop(loop_params, first, cache, rng)
  if settings is not None:
    cache = _cache_converter(config, settings, True)(cache)
  return jnp.concatenate([first[:, None], rest], axis=1), cache


# ---------------------------------------------------------------------------------------------
# Fused decoding: one token per sequence through a decode-time parameter layout.
#
# The model's decode step (`decode_step`) runs the training modules on a length-1 input: every
# step recomputes the CEMA coefficients and affine offsets from the stored parameters, feeds each
# projection a row duplicated behind an optimisation barrier (ops/dense.py: the copy is one kernel
# per product, and the barrier stops XLA from fusing the normalisation that makes the row into
# the GEMM), and leaves three products that share an input to XLA's dot merger. On an H200 the
# mega1.3B step at batch 1 is ~27 kernels per layer, ~20 of them tiny (launch-bound, ~1.2 us).
# `fuse_decode_params` moves the per-step parameter work out of the step once; `fused_decode_step`
# does the same math on [B, D] rows with one GEMM for the products of mx (wz | wr | wh1) and, for
# a single sequence, a second row made by multiplying the row by a runtime 0/1 mask (a parameter
# XLA cannot see through), so the product stays a GEMM without a barrier and the producer of the
# row can fuse into it.
#
# The mask-row GEMM reads the weights at ~2.2 TB/s (XLA's Triton GEMM for two rows). Stored
# transposed, [N, K] (transpose=True), a single row times a kernel is a row reduction over the
# contiguous K axis (dup 'reduce', or 'dot', which XLA strength-reduces to the same for kernels
# under 10M elements): ~3.1 TB/s, what XLA's reduction kernel reads at (experiments/gpu_checks/
# probe_gemv.py). The rest of a layer is kernel count: Pallas kernels for TimestepNorm + CEMA
# (states updated in place) and for the token's whole attention (decode_step.attend_step), and
# the FFN's LayerNorm folded into fc_in (fold_norm=True).
# ---------------------------------------------------------------------------------------------

DUP_MODES = ("barrier", "mask", "dot", "reduce", "pallas", "rows")
# Single-row forms that read the projection kernels transposed, [N, K] (fuse_decode_params(transpose=True)).
TRANSPOSED_DUPS = ("dot", "reduce", "pallas", "rows")
# The projection kernels of a layer in decode layout (stored as `<name>_t` [N, K] when transposed).
PROJECTIONS = ("wv", "w_mx", "wh2", "fc_in", "fc2")


def _layer_params(params: Any, config: MegalodonConfig, index: int) -> Any:
  if config.scan_layers:
    return jax.tree.map(lambda leaf: leaf[index], params["layers"])
  return params[f"layers_{index}"]


def _z_permutation(config: MegalodonConfig) -> np.ndarray:
  """Indices that reorder z's features per head to [even features | odd features] (RoPE's pairs as halves)."""
  dz = config.z_head_dim
  per_head = np.concatenate([np.arange(0, dz, 2), np.arange(1, dz, 2)])
  return (np.arange(config.num_heads)[:, None] * dz + per_head[None, :]).reshape(-1)


def _fuse_layer(layer: Any, config: MegalodonConfig, permute_z: bool = False,
                transpose: bool = False, fold_norm: bool = False, merge_v: bool = False) -> dict[str, Any]:
  """One block's parameters in decode layout (see fuse_decode_params)."""
  from megalodon_jax.ops import cema as cema_ops
  dtype = jnp.dtype(config.dtype)
  f32 = jnp.float32
  mega, ffn = layer["mega"], layer["nffn"]
  cema = mega["cema"]
  coeffs = cema_ops.cema_coefficients(cema["alpha"], cema["delta"], cema["theta"], cema["gamma"])
  heads, dz = config.num_heads, config.z_head_dim
  gamma = mega["gamma"].reshape(2, heads, dz).astype(f32)
  fc_in = ffn["fc1"]["kernel"]
  if config.swiglu:
    fc_in = jnp.concatenate([fc_in, ffn["fc3"]["kernel"]], axis=1)
  out = {
      "tsn_weight": mega["timenorm"]["weight"], "tsn_bias": mega["timenorm"]["bias"],
      "cema_p": coeffs.p, "cema_q": coeffs.q, "cema_eta": coeffs.eta,
      "cema_omega": cema["omega"].reshape(-1).astype(f32),
      "rms_scale": mega["rmsnorm"]["weight"].astype(f32) + 1.0,
      # The three products of mx as one: columns [wz | wr | wh1].
      "w_mx": jnp.concatenate([mega["wz"]["kernel"], mega["wr"]["kernel"], mega["wh1"]["kernel"]],
                              axis=1).astype(dtype),
      "b_mx": jnp.concatenate([mega["wz"]["bias"], mega["wr"]["bias"], mega["wh1"]["bias"]]).astype(dtype),
      "qk_scale": (gamma + 1.0) / math.sqrt(dz),
      "qk_shift": mega["beta"].reshape(2, heads, dz).astype(f32),
      "wv": mega["wv"]["kernel"].astype(dtype), "bv": mega["wv"]["bias"].astype(dtype),
      "wh2": mega["wh2"]["kernel"].astype(dtype),
      "ffn_weight": ffn["norm"]["weight"], "ffn_bias": ffn["norm"]["bias"],
      "fc_in": fc_in.astype(dtype), "fc2": ffn["fc2"]["kernel"].astype(dtype),
  }
  if "alpha" in ffn:
    out["ffn_alpha"] = ffn["alpha"]
  if permute_z:
    perm = _z_permutation(config)
    columns = np.concatenate([perm, np.arange(config.z_dim, out["w_mx"].shape[1])])
    out["w_mx"], out["b_mx"] = out["w_mx"][:, columns], out["b_mx"][columns]
    out["qk_scale"] = out["qk_scale"].reshape(2, -1)[:, perm].reshape(2, heads, dz)
    out["qk_shift"] = out["qk_shift"].reshape(2, -1)[:, perm].reshape(2, heads, dz)
  # The same CEMA/TimestepNorm parameters per norm group, real and imaginary parts apart, for the
  # Pallas step kernel (kernels_pallas/decode_step.py): [G, K, N] and [G, K].
  groups = config.norm_num_groups
  per_group = lambda a: a.reshape((groups, a.shape[0] // groups) + a.shape[1:])
  out["split"] = {
      "p": per_group(coeffs.p), "q_re": per_group(jnp.real(coeffs.q)), "q_im": per_group(jnp.imag(coeffs.q)),
      "eta_re": per_group(jnp.real(coeffs.eta)), "eta_im": per_group(jnp.imag(coeffs.eta)),
      "omega": per_group(out["cema_omega"]), "tsn_weight": per_group(out["tsn_weight"]),
      "tsn_bias": per_group(out["tsn_bias"]),
  }
  if fold_norm:
    # The FFN's LayerNorm scale folded into fc_in's rows (see _folded_norm_fc_in); the column sums of
    # the rounded kernel, so that subtracting the mean matches the product the step computes.
    w = fc_in.astype(f32)
    folded = ((ffn["norm"]["weight"].astype(f32) + 1.0)[:, None] * w).astype(dtype)
    out["fc_in"] = folded
    out["ffn_colsum"] = jnp.sum(folded.astype(f32), axis=0)
    out["ffn_bias0"] = ffn["norm"]["bias"].astype(f32) @ w
  # The bias of z and that of [r | h1] apart: slicing b_mx in the step is a kernel of its own.
  out["b_z"], out["b_rh"] = out["b_mx"][:config.z_dim], out["b_mx"][config.z_dim:]
  if transpose:
    for name in PROJECTIONS:
      out[f"{name}_t"] = out.pop(name).T
  if merge_v:
    out["w_vmx_t"] = jnp.concatenate([out.pop("wv_t"), out.pop("w_mx_t")], axis=0)
  return out


def fuse_decode_params(params: Any, config: MegalodonConfig, permute_z: bool = False,
                       transpose: bool = False, fold_norm: bool = False, head_rows: bool = False,
                       merge_v: bool = False) -> dict[str, Any]:
  """The model's parameters in the layout `fused_decode_step` reads; compute once per generation.

  Per layer: CEMA coefficients (p, q, eta, as ops.cema.cema_coefficients makes them every step),
  norm scales as stored + 1 in float32, the q/k affine maps, projection kernels cast to the
  compute dtype, [wz | wr | wh1] concatenated (and [fc1 | fc3] with SwiGLU). The values are those
  the model computes from `params`, so the fused step gives the model's logits up to the
  accumulation order of the products. Works with scanned or unrolled layers.

  permute_z: z's features per head in [even | odd] order (wz's columns, its bias, the q/k affine
  maps) plus the RoPE frequencies, the layout of the Pallas scores kernel (scores="pallas"; the
  cache's keys must then be permute_keys's).

  transpose: the projection kernels (PROJECTIONS) stored transposed, [N, K] under `<name>_t`:
  contiguous along the reduction, the layout of the single-row forms TRANSPOSED_DUPS (a row
  reduction reads each weight once, coalesced); 'mask' and 'barrier' and batches > 1 read it too.

  fold_norm: the FFN LayerNorm's scale folded into fc_in (plus fc_in's column sums and the norm's
  bias times fc_in): the step multiplies the block's output itself and normalises the product
  (one kernel fewer per layer; equal to the norm-then-product up to bf16 rounding).

  head_rows: the output kernel transposed, [V, D] in the compute dtype under "head_t" instead of
  "head" (one row's logits as a row reduction, see fused_forward_one; more rows a GEMM over it).

  merge_v (needs transpose and permute_z): wv's and w_mx's transposed kernels as one, [V + P, K]
  under "w_vmx_t" (rows [wv | z | r | h1]), for the single-row step with scores='attend': the two
  products of one layer read different rows (x_tsn, mx) but need not wait for each other, and one
  row reduction reads both kernels (one launch, ramp and tail instead of two).
  """
  from megalodon_jax.ops import rope
  dtype = jnp.dtype(config.dtype)
  if merge_v and not (transpose and permute_z):
    raise ValueError("merge_v=True needs transpose=True and permute_z=True (the single-row step with scores='attend')")
  fuse = jax.jit(lambda layer: _fuse_layer(layer, config, permute_z, transpose, fold_norm, merge_v))
  embedding = params["embed"]["embedding"]
  head = embedding.T if config.share_emb else params["output"]["kernel"]
  extra = {"rope_freqs": rope.rope_frequencies(config.z_head_dim, config.rope_base)} if permute_z else {}
  # head_rows: the output kernel transposed INSTEAD of as stored (no second copy of the largest matrix).
  extra.update({"head_t": head.T.astype(dtype)} if head_rows else {"head": head})
  return {
      **extra,
      "embed": embedding,
      "final_weight": params["final_norm"]["weight"], "final_bias": params["final_norm"]["bias"],
      # Row mask of the single-sequence products (dup="mask"): a parameter, so XLA cannot fold it.
      "row_mask": jnp.asarray([1, 0], dtype),
      "layers": tuple(fuse(_layer_params(params, config, i)) for i in range(config.num_layers)),
  }


def _rows_matmul(x: jax.Array, w: jax.Array, row_mask: jax.Array, dup: str, transposed: bool = False,
                 out_dtype=None) -> jax.Array:
  """x: [B, K] @ w: [K, N] (or w: [N, K] when transposed) -> [B, N] in out_dtype (default x's dtype).

  Batch > 1 is a plain GEMM. A single row is, by dup: 'barrier' / 'mask' a GEMM of two rows (see
  above); with the transposed kernel 'dot' a dot_general that XLA strength-reduces to a row
  reduction (one kernel that reads each weight once, contiguous along K), 'reduce' that row
  reduction written out (float32 products summed; elementwise producers of x can fuse into it),
  'pallas' kernels_pallas.decode_step.gemv_partials (split-K tiles) and the sum of its partials,
  'rows' decode_step.gemv_rows (whole rows per program, one kernel).
  """
  from megalodon_jax.ops import dense as dense_ops
  out_dtype = x.dtype if out_dtype is None else out_dtype
  pref = None if out_dtype == x.dtype else out_dtype
  dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
  if x.shape[0] != 1:
    if transposed:
      return jax.lax.dot_general(x, w, dims, preferred_element_type=pref)
    return dense_ops.dot_general(x, w, dims, preferred_element_type=pref)
  if dup == "barrier":
    return dense_ops.dot_general(x, w, dims, preferred_element_type=pref)
  if dup == "mask":
    doubled = x * row_mask[:, None].astype(x.dtype)  # [2, K]: x and 0 * x
    return jax.lax.dot_general(doubled, w, dims, preferred_element_type=pref)[:1]
  if not transposed:
    raise ValueError(f"dup={dup!r} reads the kernels transposed: use fuse_decode_params(..., transpose=True)")
  if dup == "dot":
    return jax.lax.dot_general(x, w, dims, preferred_element_type=pref)
  if dup == "reduce":
    return jnp.sum(x.astype(jnp.float32) * w.astype(jnp.float32), axis=-1)[None].astype(out_dtype)
  from kernels_pallas import decode_step
  if dup == "rows":
    return decode_step.gemv_rows(x, w, out_dtype=out_dtype)
  return jnp.sum(decode_step.gemv_partials(x[0], w), axis=0)[None].astype(out_dtype)


def _project(x: jax.Array, lp: dict[str, Any], name: str, row_mask: jax.Array, dup: str, out_dtype=None) -> jax.Array:
  """x: [B, K] times the layer's projection kernel `name` (either layout) -> [B, N] in out_dtype (x's)."""
  if f"{name}_t" in lp:
    return _rows_matmul(x, lp[f"{name}_t"], row_mask, dup, transposed=True, out_dtype=out_dtype)
  return _rows_matmul(x, lp[name], row_mask, dup, out_dtype=out_dtype)


def _probs_times_values(probs: jax.Array, value: jax.Array, row_mask: jax.Array, dup: str) -> jax.Array:
  """probs: [B, H, C] float32, value: [B, C, H, dv] -> [B, H, dv]: the second einsum of
  ops.attention.cached_attention_xla, one query per sequence kept a matrix product."""
  probs = probs.astype(value.dtype)
  if probs.shape[0] == 1 and dup != "barrier":
    doubled = probs[0][:, None, :] * row_mask[None, :, None].astype(value.dtype)  # [H, 2, C]
    return jnp.einsum("hqk,khd->qhd", doubled, value[0])[:1]
  doubled = jax.lax.optimization_barrier(jnp.concatenate([probs[:, :, None], probs[:, :, None]], axis=2))
  return jnp.einsum("bhqk,bkhd->bqhd", doubled, value)[:, 0]


def _attend_one(q: jax.Array, key: jax.Array, value: jax.Array, count: jax.Array, row_mask: jax.Array,
                dup: str, impl: str) -> jax.Array:
  """q: [B, H, dk] at chunk position count; key/value: [B, C, H, d] (new entry written) -> [B, H, dv]."""
  from megalodon_jax.ops import attention
  if q.shape[0] != 1 or dup == "barrier":
    return attention.cached_attention(q[:, None], key, value, count, impl=impl)[:, 0]
  # ops.attention.cached_attention_xla's math with the masked second query instead of a barrier.
  doubled = q[0][None] * row_mask[:, None, None].astype(q.dtype)  # [2, H, dk]
  scores = jnp.einsum("qhd,khd->hqk", doubled, key[0], preferred_element_type=jnp.float32)
  mask = jnp.arange(key.shape[1]) <= count
  scores = jnp.where(mask[None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("hqk,khd->qhd", probs.astype(value.dtype), value[0])[:1]


def _timestep_norm_step(x: jax.Array, state, weight: jax.Array, bias: jax.Array, num_groups: int,
                        eps: float):
  """x: [B, D] one step -> (normalised x [B, D] in x.dtype, new state); ops.timestep_norm's math."""
  from megalodon_jax.ops import timestep_norm as tsn
  x3 = x[:, None]
  mean, var = tsn.step_stats(x3, num_groups)
  new = tsn.merge_stats(state, tsn.TimestepNormState(jnp.ones_like(state.count), mean[:, 0], var[:, 0]))
  valid = jnp.ones(x3.shape[:2], jnp.bool_)
  y = tsn.normalize(x3, new.mean[:, None], new.var[:, None], weight, bias, valid, eps)
  return y[:, 0], new


def _timestep_norm_step_shifted(x: jax.Array, state, weight: jax.Array, bias: jax.Array, num_groups: int,
                                eps: float):
  """`_timestep_norm_step` with the step's moments in one pass, shifted by the running mean.

  Two-pass statistics (mean, then the variance around it) are two dependent reductions, i.e. two
  kernels on a GPU; the sums of x - mu and (x - mu)^2 are sibling reductions of one input (one
  kernel). Shifting by the running mean mu keeps the cancellation in E[d^2] - E[d]^2 small, and
  mu' - mu = E[d] is the Chan update's delta directly.
  """
  from megalodon_jax.ops import timestep_norm as tsn
  batch, dim = x.shape
  xg = x.astype(jnp.float32).reshape(batch, num_groups, dim // num_groups)
  d = xg - state.mean[..., None]
  shift = jnp.mean(d, axis=-1)  # step mean - mu
  step_var = jnp.maximum(jnp.mean(d * d, axis=-1) - shift * shift, 0.0)
  count = state.count + 1
  wb = (1.0 / count.astype(jnp.float32))[:, None]
  wa = 1.0 - wb
  mean = state.mean + wb * shift
  var = wa * state.var + wb * step_var + (wa * wb) * (shift * shift)
  y = (xg - mean[..., None]) * jax.lax.rsqrt(var + eps)[..., None]
  y = y.reshape(batch, dim) * (weight.astype(jnp.float32) + 1.0) + bias.astype(jnp.float32)
  return y.astype(x.dtype), tsn.TimestepNormState(count, mean, var)


def _layer_norm_shifted(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """ops.norms.layer_norm with mean and variance in one pass (sibling reductions), shifted by x[..., 0]."""
  xf = x.astype(jnp.float32)
  d = xf - xf[..., :1]
  shift = jnp.mean(d, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(d * d, axis=-1, keepdims=True) - shift * shift, 0.0)
  y = (d - shift) * jax.lax.rsqrt(var + eps)
  return (y * (weight.astype(jnp.float32) + 1.0) + bias.astype(jnp.float32)).astype(x.dtype)


STATS_MODES = ("two_pass", "shifted")
CEMA_MODES = ("xla", "pallas")
# Attention of the new token: XLA; 'pallas' the scores and the new key by kernels_pallas.decode_step.qk_scores_step
# (softmax and the value product in XLA); 'attend' all of it, new value included, by decode_step.attend_step.
SCORES_MODES = ("xla", "pallas", "attend")


def split_cema_state(cache: ModelCache) -> ModelCache:
  """The cache with every layer's CEMA state [B, D, N] complex64 as a (real, imag) float32 pair,
  the layout `fused_decode_step(..., cema="pallas")` reads and writes (Pallas has no complex)."""
  layers = tuple(layer._replace(cema=(jnp.real(layer.cema), jnp.imag(layer.cema))) for layer in cache.layers)
  return cache._replace(layers=layers)


def join_cema_state(cache: ModelCache) -> ModelCache:
  """Inverse of split_cema_state: the model's cache layout again (for prefill or the model's step)."""
  layers = tuple(layer._replace(cema=jax.lax.complex(*layer.cema)) for layer in cache.layers)
  return cache._replace(layers=layers)


def permute_keys(cache: ModelCache, config: MegalodonConfig) -> ModelCache:
  """The cache with every layer's keys [B, C, H, dz] in fuse_decode_params(permute_z=True)'s feature order."""
  perm = _z_permutation(config)[:config.z_head_dim]
  return cache._replace(layers=tuple(layer._replace(key=layer.key[..., perm]) for layer in cache.layers))


def unpermute_keys(cache: ModelCache, config: MegalodonConfig) -> ModelCache:
  """Inverse of permute_keys: the model's key layout again."""
  inverse = np.argsort(_z_permutation(config)[:config.z_head_dim])
  return cache._replace(layers=tuple(layer._replace(key=layer.key[..., inverse]) for layer in cache.layers))


def _tsn_cema_pallas(lp: dict[str, Any], config: MegalodonConfig, x: jax.Array, cache: LayerCache,
                     shared_count: jax.Array | None = None, defer_rms: bool = False,
                     residual: jax.Array | None = None, groups_per_block: int = 0):
  """TimestepNorm + CEMA + RMSNorm statistics by kernels_pallas.decode_step: (x_tsn, mx, norm, cema,
  sumsq, x).

  shared_count [B]: the steps every layer's TimestepNorm has merged (the final norm's count, updated
  after the layers): the kernel reads it and writes count + 1 into the layer's own count in place.
  defer_rms: mx = y * rms_scale WITHOUT the RMS normalisation, scaled by the kernel (an elementwise
  producer in XLA would be recomputed for every row of the w_mx product: +4 us per layer on the H200;
  no reduction kernel and no normalisation kernel either) and sumsq [B, G] the per-group
  sums of y^2 from which attend_step makes inv (see its sumsq); else mx normalised, sumsq None.
  residual [B, D]: the block input is (x + residual).astype(x.dtype), added by the kernel (the previous
  block's deferred residual add, see fused_forward_one(fuse_residual=True)); the last result is the
  block input (the sum, or x itself without a residual)."""
  from kernels_pallas import decode_step
  from megalodon_jax.ops import timestep_norm as tsn
  batch, dim = x.shape
  groups, order = config.norm_num_groups, config.cema_ndim
  sp = lp["split"]
  h_re, h_im = cache.cema
  state = (batch, groups, dim // groups, order)
  grouped = lambda a: None if a is None else a.reshape(batch, groups, -1)
  x_tsn, y, sumsq, count, mean, var, h_re, h_im, *block_input = decode_step.tsn_cema_step(
      grouped(x), (cache.norm.count if shared_count is None else shared_count)[:, None],
      cache.norm.mean, cache.norm.var, sp["tsn_weight"], sp["tsn_bias"], sp["p"], sp["q_re"], sp["q_im"],
      sp["eta_re"], sp["eta_im"], sp["omega"], h_re.reshape(state), h_im.reshape(state), eps=config.norm_eps,
      groups_per_block=groups_per_block or None,
      count_state=None if shared_count is None else cache.norm.count[:, None], residual=grouped(residual),
      y_scale=lp["rms_scale"].reshape(groups, -1) if defer_rms else None)
  x = block_input[0].reshape(batch, dim) if block_input else x
  y = y.reshape(batch, dim)
  norm = tsn.TimestepNormState(count[:, 0], mean, var)
  cema = (h_re.reshape(batch, dim, order), h_im.reshape(batch, dim, order))
  if defer_rms:
    return x_tsn.reshape(batch, dim), y.astype(jnp.dtype(config.dtype)), norm, cema, sumsq, x
  inv = jax.lax.rsqrt(jnp.sum(sumsq, axis=-1, keepdims=True) / dim + config.norm_eps)
  mx = (y * inv * lp["rms_scale"]).astype(jnp.dtype(config.dtype))
  return x_tsn.reshape(batch, dim), mx, norm, cema, None, x


def _layer_step(lp: dict[str, Any], config: MegalodonConfig, x: jax.Array, cache: LayerCache,
                count: jax.Array, row_mask: jax.Array, dup: str, stats: str,
                cema: str = "xla", scores: str = "xla", rope_freqs: jax.Array | None = None,
                attend_blocks: tuple[int, ...] = (), shared_count: jax.Array | None = None,
                residual: jax.Array | None = None, fuse_residual: bool = False, ffn_kernel: bool = False,
                tsn_groups: int = 0) -> tuple[Any, LayerCache]:
  """One block for one token: x [B, D] (compute dtype) -> (block output [B, D], new layer cache).

  fuse_residual: the block output is the pair (FFN output, block input) whose sum the next block's
  TimestepNorm kernel makes (its `residual`: the block input is x + residual)."""
  from megalodon_jax.ops import norms, rope
  cfg = config
  dtype = jnp.dtype(cfg.dtype)
  batch = x.shape[0]
  heads, dz, dv = cfg.num_heads, cfg.z_head_dim, cfg.v_head_dim
  matmul = lambda a, name, out_dtype=None: _project(a, lp, name, row_mask, dup, out_dtype)

  sumsq = None
  if cema == "pallas":
    defer_rms = scores == "attend" and attend_fuses(attend_blocks)
    x_tsn, mx, norm_state, h, sumsq, x = _tsn_cema_pallas(lp, cfg, x, cache, shared_count, defer_rms, residual,
                                                          tsn_groups)
  else:
    tsn_step = _timestep_norm_step_shifted if stats == "shifted" else _timestep_norm_step
    x_tsn, norm_state = tsn_step(x, cache.norm, lp["tsn_weight"], lp["tsn_bias"], cfg.norm_num_groups,
                                 cfg.norm_eps)
    # CEMA, one step of ops.cema.cema_sequential.
    xf = x_tsn.astype(jnp.float32)
    h = lp["cema_q"] * cache.cema + lp["cema_p"] * xf[..., None]
    eta = lp["cema_eta"]
    x_cema = jnp.sum(jnp.real(eta) * jnp.real(h) - jnp.imag(eta) * jnp.imag(h), axis=-1) + lp["cema_omega"] * xf
    mx = (norms.rms_norm(x_cema, None, cfg.norm_eps) * lp["rms_scale"]).astype(dtype)

  if scores != "xla":
    return _layer_rest_pallas_scores(lp, cfg, x, x_tsn, mx, cache, count, row_mask, dup, stats, norm_state, h,
                                     rope_freqs, scores, attend_blocks, sumsq, fuse_residual, ffn_kernel)
  proj = matmul(mx, "w_mx") + lp["b_mx"]
  z, r, h1 = jnp.split(proj, [cfg.z_dim, cfg.z_dim + cfg.value_dim], axis=-1)
  z = norms.rms_norm(z.reshape(batch, heads, dz).astype(jnp.float32), None, cfg.norm_eps)
  q = (z * lp["qk_scale"][0] + lp["qk_shift"][0]).astype(dtype)
  k = (z * lp["qk_scale"][1] + lp["qk_shift"][1]).astype(dtype)
  position = (count % cfg.chunk_size)[None, None]
  q = rope.apply_rope(q[:, None], position, cfg.rope_base)[:, 0]
  k = rope.apply_rope(k[:, None], position, cfg.rope_base)[:, 0]
  v = jax.nn.silu(matmul(x_tsn, "wv") + lp["bv"]).reshape(batch, heads, dv)
  r = jax.nn.silu(r)
  start = (0, count, 0, 0)
  key = jax.lax.dynamic_update_slice(cache.key, k[:, None].astype(cache.key.dtype), start)
  value = jax.lax.dynamic_update_slice(cache.value, v[:, None].astype(cache.value.dtype), start)
  attn = _attend_one(q, key, value, count, row_mask, dup, cfg.attention_impl)
  return _block_tail(lp, cfg, x, attn, r, h1, matmul, stats), LayerCache(key, value, h, norm_state)


ATTEND_FIELDS = ("block_k", "block_d", "sub_d", "num_warps", "tiles", "preload", "num_stages", "fuse")


def attend_fuses(attend_blocks: tuple[int, ...]) -> bool:
  """Whether scores='attend' also takes v's bias + SiLU and (cema='pallas') the block's RMS
  normalisation into attend_step (attend_step's v_bias and sumsq): for the default form (), or
  the 'fuse' field of an explicit one. Each removes small XLA kernels from every layer (the
  v = silu(. + bv) fusion; the sum of the RMS statistics and the normalisation of mx)."""
  return not attend_blocks or (len(attend_blocks) >= 8 and bool(attend_blocks[7]))


def attend_options(attend_blocks: tuple[int, ...], chunk: int, dv: int) -> tuple[dict[str, Any], str]:
  """(decode_step.attend_step keyword arguments, combine 'xla' | 'pallas') of FusedSettings.attend_blocks.

  () = decode_step.default_attend_form(chunk, dv) (the measured batch-1 default); otherwise
  (block_k, block_d, sub_d[, num_warps, tiles, preload, num_stages, fuse]) with attend_step's own
  defaults for the fields left out and XLA's combine: sub_d > 0 the elementwise form (values in
  sub_d-feature chunks), sub_d = 0 the tensor-core form (mma=True); fuse: see attend_fuses.
  bench_decode's '-attend<K>x<D>x<S>' spells the first three (e.g. attend32x1024x256, the form and
  the XLA kernels around it before the looped one, bias + SiLU and RMS normalisation in XLA)."""
  from kernels_pallas import decode_step
  if not attend_blocks:
    options = dict(decode_step.default_attend_form(chunk, dv))
    return options, options.pop("combine", "xla")
  if len(attend_blocks) > len(ATTEND_FIELDS):
    raise ValueError(f"attend_blocks {attend_blocks} has more than the {len(ATTEND_FIELDS)} fields {ATTEND_FIELDS}")
  options = dict(zip(ATTEND_FIELDS, (int(v) for v in attend_blocks)))
  options.pop("fuse", None)
  options["mma"] = options.get("sub_d") == 0
  if options["mma"]:
    options["sub_d"] = None
  return options, "xla"


def _attend_combined(block_stats: jax.Array, acc: jax.Array, combine: str, dtype) -> jax.Array:
  """attend_step's blocks merged ('pallas': one Pallas kernel, 'xla': an XLA fusion) -> [B, H, dv] in dtype."""
  from kernels_pallas import decode_step
  if combine == "pallas":
    return decode_step.attend_combine_pallas(block_stats, acc, out_dtype=dtype)
  return decode_step.attend_combine(block_stats, acc).astype(dtype)


def _layer_rest_pallas_scores(lp, cfg, x, x_tsn, mx, cache, count, row_mask, dup, stats, norm_state, h, rope_freqs,
                              scores_mode="pallas", attend_blocks=(), sumsq=None, fuse_residual=False,
                              ffn_kernel=False):
  """_layer_step from mx on, with the attention scores and the new key ('pallas') or the whole attention
  and the new key and value ('attend') by kernels_pallas.decode_step. sumsq: mx is not normalised
  (_tsn_cema_pallas(defer_rms=True)), attend_step applies the normalisation (needs attend_fuses)."""
  from kernels_pallas import decode_step
  batch = x.shape[0]
  matmul = lambda a, name, out_dtype=None: _project(a, lp, name, row_mask, dup, out_dtype)
  z_dim = cfg.z_dim
  merged = "w_vmx_t" in lp
  base = cfg.value_dim if merged else 0  # the w_mx product's first column in raw
  if merged:
    if batch != 1 or dup != "reduce" or scores_mode != "attend" or sumsq is None:
      raise ValueError("merged [wv | w_mx] kernels (fuse_decode_params(merge_v=True)) are for one sequence with "
                       f"dup='reduce', scores='attend' and cema='pallas'; got batch {batch}, dup={dup!r}, "
                       f"scores={scores_mode!r}, cema {'pallas' if sumsq is not None else 'xla'}")
    raw = _merged_product(x_tsn, mx, lp["w_vmx_t"], cfg.value_dim)  # [1, V + P]: [v | z | r | h1]
  else:
    raw = matmul(mx, "w_mx")  # [B, P]
  qk = (raw, lp["b_z"], lp["qk_scale"].reshape(2, z_dim), lp["qk_shift"].reshape(2, z_dim), rope_freqs)
  value_shape = (batch, cfg.num_heads, cfg.v_head_dim)
  inv, gated = None, False
  if scores_mode == "attend" and attend_fuses(attend_blocks):
    # The new value's bias + SiLU (and with sumsq the RMS normalisation of mx) inside attend_step.
    options, combine = attend_options(attend_blocks, cache.value.shape[1], cache.value.shape[-1])
    rms = {} if sumsq is None else {"sumsq": sumsq, "rms_dim": x.shape[-1]}
    v_raw = raw if merged else matmul(x_tsn, "wv").reshape(value_shape)
    outs = decode_step.attend_step(*qk, cache.key, cache.value, v_raw, count.reshape(1), eps=cfg.norm_eps,
                                   v_bias=lp["bv"], proj_offset=base, **rms, **options)
    block_stats, acc, key, value = outs[:4]
    inv = outs[4] if sumsq is not None else None
    block_d = min(64, cfg.v_head_dim)
    if combine == "pallas" and z_dim % block_d == 0 and cfg.v_head_dim % block_d == 0:
      # The gate silu(r) applied by the combine kernel (r read from the product in place): the gate is
      # no XLA kernel of its own, and the wh2 product reads the gated output as it is.
      attn = decode_step.attend_combine_pallas(block_stats, acc, block_d=block_d, out_dtype=x.dtype, gate=raw,
                                               gate_bias=lp["b_rh"], gate_scale=inv, gate_offset=base + z_dim)
      gated = True
    else:
      attn = _attend_combined(block_stats, acc, combine, x.dtype)
  elif scores_mode == "attend":
    if sumsq is not None:
      raise ValueError("a deferred RMS normalisation (sumsq) needs attend_fuses(attend_blocks)")
    v = jax.nn.silu(matmul(x_tsn, "wv") + lp["bv"]).reshape(value_shape)
    options, combine = attend_options(attend_blocks, cache.value.shape[1], cache.value.shape[-1])
    block_stats, acc, key, value = decode_step.attend_step(*qk, cache.key, cache.value, v.astype(cache.value.dtype),
                                                           count.reshape(1), eps=cfg.norm_eps, **options)
    attn = _attend_combined(block_stats, acc, combine, x.dtype)
  else:
    v = jax.nn.silu(matmul(x_tsn, "wv") + lp["bv"]).reshape(value_shape)
    scores, key = decode_step.qk_scores_step(*qk, cache.key, count.reshape(1), eps=cfg.norm_eps)
    value = jax.lax.dynamic_update_slice(cache.value, v[:, None].astype(cache.value.dtype), (0, count, 0, 0))
    attn = _probs_times_values(jax.nn.softmax(scores, axis=-1), value, row_mask, dup)
  rh = raw[:, base + z_dim:]
  if inv is not None:  # the normalisation of mx, applied to the product: elementwise, fused into r's and h1's users
    rh = (inv * rh.astype(jnp.float32) + lp["b_rh"].astype(jnp.float32)).astype(raw.dtype)
  else:
    rh = rh + lp["b_rh"]
  r, h1 = jnp.split(rh, [cfg.value_dim], axis=-1)
  gate = jnp.ones((), x.dtype) if gated else jax.nn.silu(r)  # gated: already applied (x 1 folds away)
  out = _block_tail(lp, cfg, x, attn, gate, h1, matmul, stats, raw if fuse_residual else None, inv, ffn_kernel, base)
  return out, LayerCache(key, value, h, norm_state)


def _folded_norm_fc_in(lp, cfg, y, matmul, moments=None):
  """LayerNorm(y) @ fc_in with the norm's scale folded into the kernel (fuse_decode_params(fold_norm=True)):
  rstd (y @ W' - mean colsum(W')) + bias @ fc_in, W' = diag(weight + 1) fc_in. The product reads y
  as it is, so the normalisation is no kernel of its own; the moments (one shifted pass) run beside it,
  or come as `moments` (mean, var [B, 1] float32, decode_step.residual_moments's)."""
  if moments is None:
    yf = y.astype(jnp.float32)
    d = yf - yf[..., :1]
    shift = jnp.mean(d, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(d * d, axis=-1, keepdims=True) - shift * shift, 0.0)
    mean = yf[..., :1] + shift
  else:
    mean, var = moments
  raw = matmul(y, "fc_in", jnp.float32)  # [B, F] float32: the mean is subtracted after the product
  return ((raw - mean * lp["ffn_colsum"]) * jax.lax.rsqrt(var + cfg.norm_eps) + lp["ffn_bias0"]).astype(y.dtype)


def _merged_product(x_tsn: jax.Array, mx: jax.Array, w_t: jax.Array, v_width: int) -> jax.Array:
  """[x_tsn @ wv | mx @ w_mx] [1, V + P] from the merged kernel w_t [V + P, K] (fuse_decode_params(merge_v=True)):
  one row reduction whose row n reads x_tsn (n < V) or mx (a select XLA fuses into the reduction)."""
  rows = jnp.arange(w_t.shape[0])[:, None] < v_width
  x_rows = jnp.where(rows, x_tsn[0][None, :], mx[0][None, :])  # [V + P, K], never materialised
  return jnp.sum(x_rows.astype(jnp.float32) * w_t.astype(jnp.float32), axis=-1)[None].astype(mx.dtype)


def _block_tail(lp, cfg, x, attn, r, h1, matmul, stats, raw=None, inv=None, ffn_kernel=False, raw_base=0):
  """attn: [B, H, dv] -> block output [B, D]: gate, wh2, residual, normalised FFN, residual.

  raw [B, P] (the w_mx product before its bias), with fold_norm: the block's residual add and the FFN
  norm's moments in one Pallas kernel (decode_step.residual_moments, which reads h1 out of raw), and
  the FFN's residual add left to the next block: returns the pair (FFN output, x). inv [B, 1] float32
  (with raw): mx was not normalised, h1 = inv * raw_h + b_h (attend_step's inv). ffn_kernel (with raw
  and transposed kernels): fc_in's product, its norm and the activation by decode_step.ffn_in_step.
  raw_base: the w_mx product's first column in raw (merged [wv | w_mx] products)."""
  from megalodon_jax.ops import norms
  batch = x.shape[0]
  attn = attn.reshape(batch, cfg.value_dim) * r
  moments = None
  if raw is not None:
    from kernels_pallas import decode_step
    y, *moments = decode_step.residual_moments(raw, lp["b_rh"], matmul(attn, "wh2"), x, inv=inv,
                                               raw_offset=raw_base + cfg.z_dim + cfg.value_dim,
                                               bias_offset=cfg.value_dim)
  else:
    y = ((h1 + matmul(attn, "wh2")) + x).astype(x.dtype)

  if ffn_kernel:
    from kernels_pallas import decode_step
    hidden = decode_step.ffn_in_step(y, lp["fc_in_t"], lp["ffn_colsum"], lp["ffn_bias0"], *moments, eps=cfg.norm_eps,
                                     swiglu=cfg.swiglu)
  elif "ffn_colsum" in lp:
    hidden = _folded_norm_fc_in(lp, cfg, y, matmul, moments)
  else:
    layer_norm = _layer_norm_shifted if stats == "shifted" else norms.layer_norm
    u = layer_norm(y, lp["ffn_weight"], lp["ffn_bias"], cfg.norm_eps)
    hidden = matmul(u, "fc_in")
  if ffn_kernel:
    pass  # activated in the kernel
  elif cfg.swiglu:
    gate, up = jnp.split(hidden, 2, axis=-1)
    hidden = jax.nn.silu(gate) * up
  else:
    hidden = jax.nn.silu(hidden)
  out = matmul(hidden, "fc2")
  if "ffn_alpha" in lp:
    out = out * lp["ffn_alpha"].astype(out.dtype)
  if raw is not None:
    return out, x  # added by the next block's TimestepNorm kernel (or after the last block)
  return (out + x).astype(x.dtype)


def fused_forward_one(fused: dict[str, Any], config: MegalodonConfig, token: jax.Array, cache: ModelCache,
                      dup: str = "mask", stats: str = "shifted", cema: str = "xla",
                      scores: str = "xla", attend_blocks: tuple[int, ...] = (),
                      fuse_residual: bool = False, ffn_kernel: bool = False,
                      tsn_groups: int = 0, final_kernel: bool = False) -> tuple[jax.Array, ModelCache]:
  """Not jitted: token [B] int -> (logits [B, V] float32, new cache); the math of `fused_decode_step`.

  For use inside a caller's jit (e.g. a generation loop); cache layers must be a tuple (unrolled).
  fuse_residual: a block's residual add and its FFN norm's moments by decode_step.residual_moments,
  and its FFN residual add by the next block's TimestepNorm kernel (two XLA kernels fewer per layer;
  the same values); needs cema='pallas', scores 'pallas' or 'attend' and fold_norm params.
  ffn_kernel: fc_in's product, the FFN norm and the activation in one Pallas kernel
  (decode_step.ffn_in_step; needs fuse_residual and transposed kernels). tsn_groups: norm groups per program of the TimestepNorm/CEMA kernel (cema='pallas'; 0: its
  default). Params with "head_t" (fuse_decode_params(head_rows=True)): the logits as a row reduction
  over the transposed output kernel. final_kernel: the last residual add, the final TimestepNorm and
  its count update in one Pallas kernel (decode_step.final_norm_step).
  """
  from megalodon_jax.ops.logits import output_logits
  if isinstance(cache.layers, LayerCache) or not cache.layers:
    raise ValueError("fused decoding needs a cache with one LayerCache per layer (init_cache of a config "
                     "with scan_layers=False); convert a scanned one with unstack_cache")
  if dup not in DUP_MODES:
    raise ValueError(f"dup must be one of {DUP_MODES}, got {dup!r}")
  if dup in TRANSPOSED_DUPS and not any(name in fused["layers"][0] for name in ("w_mx_t", "w_vmx_t")):
    raise ValueError(f"dup={dup!r} reads the projection kernels transposed: make the params with "
                     "fuse_decode_params(..., transpose=True)")
  if stats not in STATS_MODES:
    raise ValueError(f"stats must be one of {STATS_MODES}, got {stats!r}")
  if cema not in CEMA_MODES:
    raise ValueError(f"cema must be one of {CEMA_MODES}, got {cema!r}")
  if scores not in SCORES_MODES:
    raise ValueError(f"scores must be one of {SCORES_MODES}, got {scores!r}")
  if (scores != "xla") != ("rope_freqs" in fused):
    raise ValueError(f"scores={scores!r}: 'pallas' and 'attend' need fuse_decode_params(..., permute_z=True) (and permute_keys on the "
                     "cache); scores='xla' needs the default permute_z=False")
  if (cema == "pallas") != isinstance(cache.layers[0].cema, tuple):
    raise ValueError("cema='pallas' needs the cache's CEMA states as (real, imag) pairs and 'xla' the model's "
                     "complex64 states: convert with split_cema_state / join_cema_state")
  if fuse_residual and (cema != "pallas" or scores == "xla" or "ffn_colsum" not in fused["layers"][0]):
    raise ValueError("fuse_residual=True needs cema='pallas', scores='pallas' or 'attend' and "
                     f"fuse_decode_params(..., fold_norm=True); got cema={cema!r}, scores={scores!r}, fold_norm="
                     f"{'ffn_colsum' in fused['layers'][0]}")
  if ffn_kernel and (not fuse_residual or "fc_in_t" not in fused["layers"][0]):
    raise ValueError("ffn_kernel=True needs fuse_residual=True (the FFN norm's moments from residual_moments) and "
                     "transposed kernels (fuse_decode_params(..., transpose=True))")
  cfg = config
  dtype = jnp.dtype(cfg.dtype)
  x = jnp.take(fused["embed"], token, axis=0).astype(dtype)  # [B, D]
  if cfg.scale_emb:
    x = x * jnp.asarray(math.sqrt(cfg.model_dim), dtype)
  count = cache.count
  layers = []
  residual = None  # fuse_residual: the previous block's input, still to be added to x
  for lp, layer_cache in zip(fused["layers"], cache.layers):
    # Every layer's TimestepNorm has merged as many steps as the final norm (updated after the layers).
    x, new_layer = _layer_step(lp, cfg, x, layer_cache, count, fused["row_mask"], dup, stats, cema, scores,
                               fused.get("rope_freqs"), tuple(attend_blocks), cache.final_norm.count, residual,
                               fuse_residual, ffn_kernel, tsn_groups)
    if fuse_residual:
      x, residual = x
    layers.append(new_layer)
  if final_kernel:
    from kernels_pallas import decode_step
    from megalodon_jax.ops import timestep_norm as tsn
    batch, groups = x.shape[0], cfg.norm_num_groups
    grouped = lambda a: a.reshape(batch, groups, -1)
    norm = cache.final_norm
    x, final_count, mean, var = decode_step.final_norm_step(
        grouped(x), norm.count[:, None], norm.mean, norm.var, grouped(fused["final_weight"][None])[0],
        grouped(fused["final_bias"][None])[0], eps=cfg.norm_eps,
        residual=None if residual is None else grouped(residual))
    x = x.reshape(batch, -1)
    final_state = tsn.TimestepNormState(final_count[:, 0], mean, var)
  else:
    if residual is not None:
      x = (x + residual).astype(dtype)
    tsn_step = _timestep_norm_step_shifted if stats == "shifted" else _timestep_norm_step
    x, final_state = tsn_step(x, cache.final_norm, fused["final_weight"], fused["final_bias"],
                              cfg.norm_num_groups, cfg.norm_eps)
  if "head_t" in fused and x.shape[0] == 1:  # [V, D]: read once, contiguous along D (as dup='reduce')
    logits = jnp.sum(x.astype(dtype).astype(jnp.float32)[:, None, :] * fused["head_t"].astype(jnp.float32), axis=-1)
  elif "head_t" in fused:
    logits = jax.lax.dot_general(x.astype(dtype), fused["head_t"].astype(dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
  else:
    logits = output_logits(x, fused["head"], dtype)
  new_count = ((count + 1) % cfg.chunk_size).astype(jnp.int32)
  return logits, ModelCache(layers=tuple(layers), final_norm=final_state, count=new_count)


@functools.lru_cache(maxsize=None)
def _fused_step(config: MegalodonConfig, dup: str, stats: str, cema: str, scores: str, attend_blocks: tuple,
                fuse_residual: bool = False, ffn_kernel: bool = False, tsn_groups: int = 0,
                final_kernel: bool = False):
  return jax.jit(lambda fused, token, cache: fused_forward_one(fused, config, token, cache, dup, stats, cema, scores,
                                                               attend_blocks, fuse_residual, ffn_kernel, tsn_groups,
                                                               final_kernel),
                 donate_argnums=(2,))


def fused_decode_step(fused: dict[str, Any], config: MegalodonConfig, token: jax.Array, cache: ModelCache,
                      dup: str = "mask", stats: str = "shifted", cema: str = "xla",
                      scores: str = "xla", attend_blocks: tuple[int, ...] = (),
                      fuse_residual: bool = False, ffn_kernel: bool = False,
                      tsn_groups: int = 0, final_kernel: bool = False) -> tuple[jax.Array, ModelCache]:
  """`decode_step` through `fuse_decode_params(params, config)`: token [B] -> (logits [B, V], cache).

  The cache (unrolled layers) is consumed. dup: how a single sequence's row becomes a GEMM
  ('mask': a second, masked row; 'barrier': ops.dense's barrier, as the model does). stats: the
  TimestepNorm/LayerNorm moments as the model computes them ('two_pass') or in one shifted pass
  ('shifted': fewer kernels, same values up to float32 rounding of the variance). cema: the
  TimestepNorm + CEMA + RMSNorm statistics of each block in XLA ('xla') or in one Pallas kernel
  ('pallas'; the cache's CEMA states must then be split_cema_state's float32 pairs). scores: the
  attention scores and the new key in XLA or in one Pallas kernel ('pallas'), or the whole attention
  with the new key and value in one ('attend'); both need fuse_decode_params(..., permute_z=True) and
  a permute_keys cache (attend_blocks: attend_step's form, see attend_options; () for its defaults).
  dup 'dot' / 'reduce' / 'pallas' need fuse_decode_params(..., transpose=True). fuse_residual, ffn_kernel,
  tsn_groups, final_kernel: see fused_forward_one.
  """
  return _fused_step(config, dup, stats, cema, scores, tuple(attend_blocks), bool(fuse_residual), bool(ffn_kernel),
                     int(tsn_groups), bool(final_kernel))(
      fused, jnp.asarray(token, jnp.int32).reshape(-1), cache)
