"""Decoding speed and memory: Megalodon's constant-size cache against a Llama KV cache, same run.

Per row (model size x batch x context x architecture): tokens/s of greedy single-token decoding
(one jitted step: forward of one token per sequence, cache update in place, argmax of the logits
fed to the next step), and device memory (parameters, cache, the step's buffers).

Caches are BUILT DIRECTLY, not prefilled: the cost of a decode step does not depend on how the
cache was filled, only on its shape and fill level, and prefilling 128K tokens through the model
would cost more device time than the whole benchmark. Megalodon: the per-layer cache (current
chunk's keys/values, CEMA state, TimestepNorm state with count = context) with the chunk position
count = context % chunk_size ("empty" fill: the brief's setting; every context here is a multiple
of the chunk, so the chunk buffer is empty) and, timed with the same compiled step, count =
chunk_size - steps ("full": the chunk buffer nearly full, the most attention work); the headline
tokens/s is the slower of the two. Llama: a KV cache of context + steps positions (rounded up
to a multiple of 128) with index = context. Its decode attention core is cuDNN (masking by key
length) or XLA (attends to every position with a mask): with both asked for (the default), both
are timed at batch 1 / 32K and the faster one is used for all rows of that size, so the
baseline is the best the stock stack offers.

Models: the presets of bench_train (mega200M / llama200M, mega1.3B / llama1.3B), bf16 parameters
and compute, layers unrolled (scan_layers=False) so that every layer's cache is its own buffer,
updated in place through donation.

Timing: `--warmup` steps, then the median over `--iters` samples of the mean time of `--inner`
consecutive steps, waited for with block_until_ready. `--loop host` (default): one jitted call per
step, queued back to back by Python, as a token-by-token generation loop does (a batch-1 step can
then be bound by the host's dispatch); `--loop device`: the `--inner` steps of a sample in one
jitted lax.fori_loop (decoding.generate_on_device). Megalodon decodes as decoding.generate does
(--mega-decode default: decoding.fuse_decode_params + fused_forward_one with decoding.default_fused_settings
of the batch; other fused-* names pick the settings, see parse_mega_impl; `model` times
MegalodonLM.apply on the stored parameters). Both architectures are timed the same way. Rows that fail or cannot fit print a reason; the run goes on. Results are
rewritten to experiments/results/<date>_<device>_decode.json after every row.

  python -m experiments.benchmarks.bench_decode                      # 2 sizes x batch 1, 16 x 4K/32K/128K
  python -m experiments.benchmarks.bench_decode --sizes 1.3B --batches 1 --contexts 32768
  python -m experiments.benchmarks.bench_decode --smoke              # tiny models on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import re
import time
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from experiments.baselines import llama as llama_lib
from experiments.benchmarks import bench_ops, bench_train, harness
from megalodon_jax import cache as mega_cache
from megalodon_jax import config as mega_config

ARCHS = ("llama", "megalodon")
TARGET_CONTEXT = 32768
TARGET_MEGA_OVER_LLAMA = 2.0
# Leave room for the step's temporaries and the allocator when deciding that a cache cannot fit.
FIT_FRACTION = 0.92
LLAMA_CACHE_MULTIPLE = 128


@dataclasses.dataclass
class Timing:
  ms_per_step: float
  p10_ms: float
  p90_ms: float
  logits_finite: bool


# --------------------------------------------------------------------------------------------
# Steps and timing
# --------------------------------------------------------------------------------------------

def greedy_step(apply: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]) -> Callable:
  """step((cache, tokens [B, 1]), params) -> ((cache, next tokens), logits [B, V]); cache donated."""

  def step(state, params):
    cache, tokens = state
    logits, cache = apply(params, cache, tokens)
    last = logits[:, -1]
    next_tokens = jnp.argmax(last, axis=-1).astype(jnp.int32)[:, None]
    return (cache, next_tokens), last

  return jax.jit(step, donate_argnums=(0,))


def greedy_loop(apply: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]], steps: int) -> Callable:
  """loop((cache, tokens [B, 1]), params) -> ((cache, tokens), logits [B, V]): `steps` greedy steps
  in one jitted lax.fori_loop, i.e. the generation loop on the device with no host dispatch
  between tokens; cache donated."""

  def loop(state, params):
    def body(_, carry):
      (cache, tokens), _ = carry
      logits, cache = apply(params, cache, tokens)
      last = logits[:, -1]
      return (cache, jnp.argmax(last, axis=-1).astype(jnp.int32)[:, None]), last

    last = jax.eval_shape(lambda: apply(params, *state)[0][:, -1])
    return lax.fori_loop(0, steps, body, (state, jnp.zeros(last.shape, last.dtype)))

  return jax.jit(loop, donate_argnums=(0,))


def decode_fn(apply: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]], args: argparse.Namespace) -> Callable:
  """The jitted function a row times: one step (--loop host) or --inner steps (--loop device)."""
  return greedy_loop(apply, args.inner) if args.loop == "device" else greedy_step(apply)


def _steps_per_call(args: argparse.Namespace) -> int:
  return args.inner if args.loop == "device" else 1


def time_decode(compiled: Callable, state: Any, params: Any, *, warmup: int, iters: int,
                inner: int, steps_per_call: int = 1) -> tuple[Timing, Any]:
  """Runs warmup + iters * inner steps threaded through `state`; per-sample mean of `inner` steps.

  steps_per_call: steps one call of `compiled` makes (1 for greedy_step; `inner` for greedy_loop,
  which then is called once per sample)."""
  calls = max(inner // steps_per_call, 1)
  logits = None
  for _ in range(-(-warmup // steps_per_call)):
    state, logits = compiled(state, params)
  jax.block_until_ready((state, logits))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(calls):
      state, logits = compiled(state, params)
    jax.block_until_ready((state, logits))
    times.append((time.perf_counter() - start) * 1e3 / (calls * steps_per_call))
  stats = harness.summarize_times(times)
  finite = bool(jnp.all(jnp.isfinite(logits)))
  return Timing(stats["median_ms"], stats["p10_ms"], stats["p90_ms"], finite), state


def total_steps(args: argparse.Namespace) -> int:
  """Steps one row decodes (warm-up included): the cache must have room for them."""
  warmup = -(-args.warmup // args.inner) * args.inner if args.loop == "device" else args.warmup
  return warmup + args.iters * args.inner


def tree_bytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------
# Models and caches
# --------------------------------------------------------------------------------------------

def megalodon_config(preset: str, args: argparse.Namespace) -> mega_config.MegalodonConfig:
  return mega_config.preset(preset, dtype=args.dtype, param_dtype=args.param_dtype, scan_layers=False,
                            cema_method=args.cema_method, attention_impl=args.attention_impl,
                            timestep_norm_impl=_tsn_impl(args.timestep_norm_impl))


def _tsn_impl(requested: str) -> str:
  from megalodon_jax.ops import backend
  if (requested == "auto" and backend.has_accelerator()
      and not bench_train._kernel_available("kernels_pallas.timestep_norm")):
    return "xla"
  return requested


MEGA_DECODE_IMPLS = ("model", "fused-mask", "fused-barrier", "fused-mask-shifted", "fused-barrier-shifted",
                     "fused-mask-pallas", "fused-mask-shifted-pallas", "fused-barrier-pallas", "fused-mask-scores",
                     "fused-mask-pallas-scores", "fused-mask-shifted-pallas-scores", "fused-mask-t-shifted",
                     "fused-dot-shifted", "fused-reduce-shifted", "fused-pallas-shifted", "fused-dot-shifted-scores",
                     "fused-reduce-shifted-scores", "fused-pallas-shifted-scores", "fused-dot-shifted-pallas-scores",
                     "fused-reduce-shifted-pallas-scores", "fused-pallas-shifted-pallas-scores",
                     "fused-mask-shifted-attend", "fused-dot-shifted-attend", "fused-dot-shifted-pallas-attend",
                     "fused-pallas-shifted-pallas-attend")


def default_mega_impl(batch: int) -> str:
  """The fused impl name of decoding.default_fused_settings(batch): what generate runs on this backend."""
  from megalodon_jax import decoding
  s = decoding.default_fused_settings(batch)
  flags = [("t", s.transpose and s.dup not in decoding.TRANSPOSED_DUPS), ("fold", s.fold_norm),
           ("shifted", s.stats == "shifted"),
           ("pallas", s.cema == "pallas"), ("scores", s.scores == "pallas"),
           ("attend" + "x".join(map(str, s.attend_blocks)), s.scores == "attend"),
           ("res", s.fuse_residual), ("ffn", s.ffn_kernel), (f"tsn{s.tsn_groups}", s.tsn_groups > 0),
           ("headt", s.head_rows), ("mergev", s.merge_v), ("final", s.final_kernel)]
  return "-".join(["fused", s.dup] + [name for name, on in flags if on])


def parse_mega_impl(impl: str) -> dict[str, Any]:
  """A fused impl name, fused-<dup>[-t][-fold][-shifted][-pallas][-scores|-attend][-res], as fused_forward_one's
  settings.

  dup: decoding.DUP_MODES (dot / reduce / pallas read the kernels transposed; -t transposes them for
  mask / barrier too); -fold: the FFN LayerNorm folded into fc_in; -shifted: one-pass norm moments; -pallas: TimestepNorm + CEMA in
  kernels_pallas.decode_step; -scores: attention scores + new key in kernels_pallas.decode_step;
  -attend: the whole attention + new key and value in kernels_pallas.decode_step.attend_step
  (-attend<K>x<D>x<S>: with block_k K, block_d D, sub_d S); -res: the residual adds and the FFN norm's
  moments in Pallas (fused_forward_one(fuse_residual=True); needs -fold -pallas and -scores or -attend);
  -ffn: fc_in's product, norm and activation in one Pallas kernel (ffn_kernel); -tsn<G>: G norm groups per TimestepNorm/CEMA program
  (tsn_groups); -headt: the logits from the transposed output kernel (fuse_decode_params(head_rows=True));
  -mergev: wv's and w_mx's products as one row reduction (fuse_decode_params(merge_v=True)); -final: the
  final TimestepNorm in one Pallas kernel (final_kernel).
  """
  from megalodon_jax import decoding
  parts = impl.split("-")
  # attend<K>x<D>x<S>: attend_step with block_k K, block_d D, sub_d S.
  blocks = [f for f in parts[2:] if re.fullmatch(r"attend\d+x\d+x\d+", f)]
  tsn = [f for f in parts[2:] if re.fullmatch(r"tsn\d+", f)]
  flags = ["attend" if f in blocks else "tsn" if f in tsn else f for f in parts[2:]]
  if (len(parts) < 2 or parts[0] != "fused" or parts[1] not in decoding.DUP_MODES
      or flags != [f for f in ("t", "fold", "shifted", "pallas", "scores", "attend", "res", "ffn", "tsn", "headt", "mergev", "final")
                   if f in flags]
      or ("scores" in flags and "attend" in flags)):
    raise ValueError(f"unknown Megalodon decode impl {impl!r}; choose from {MEGA_DECODE_IMPLS} "
                     "(fused-<dup>[-t][-fold][-shifted][-pallas][-scores|-attend][-res][-ffn][-tsn<G>][-headt][-mergev][-final])")
  return {"dup": parts[1], "stats": "shifted" if "shifted" in flags else "two_pass",
          "cema": "pallas" if "pallas" in flags else "xla",
          "scores": "pallas" if "scores" in flags else "attend" if "attend" in flags else "xla",
          "transpose": "t" in flags or parts[1] in decoding.TRANSPOSED_DUPS,
          "attend_blocks": tuple(int(v) for v in blocks[0][len("attend"):].split("x")) if blocks else (),
          "fold_norm": "fold" in flags, "fuse_residual": "res" in flags, "ffn_kernel": "ffn" in flags,
          "tsn_groups": int(tsn[0][3:]) if tsn else 0, "head_rows": "headt" in flags,
          "merge_v": "mergev" in flags, "final_kernel": "final" in flags}


def megalodon_apply(cfg: mega_config.MegalodonConfig, impl: str) -> tuple[Callable, Callable, Callable]:
  """(apply(p, cache, tokens [B, 1]) -> (logits [B, 1, V], cache), prepare(params) -> p,
  prepare_cache(model cache) -> the cache apply reads) of a decode impl.

  model: MegalodonLM.apply on the stored parameters (decoding.decode_step's path); fused-...:
  decoding.fused_forward_one on decoding.fuse_decode_params with parse_mega_impl's settings (with
  -pallas the cache's CEMA states are split into float32 pairs; with -scores z's features and the
  cached keys are permuted).
  """
  from megalodon_jax import decoding
  if impl == "model":
    from megalodon_jax.model import MegalodonLM
    model = MegalodonLM(cfg)
    return ((lambda p, cache, tokens: model.apply({"params": p}, tokens, cache=cache)), (lambda params: params),
            (lambda cache: cache))
  settings = parse_mega_impl(impl)
  dup, stats, cema, scores = (settings[k] for k in ("dup", "stats", "cema", "scores"))

  def apply(p, cache, tokens):
    logits, cache = decoding.fused_forward_one(p, cfg, tokens[:, 0], cache, dup, stats, cema, scores,
                                               settings["attend_blocks"], settings["fuse_residual"],
                                               ffn_kernel=settings["ffn_kernel"], tsn_groups=settings["tsn_groups"],
                                               final_kernel=settings["final_kernel"])
    return logits[:, None], cache

  def prepare_cache(cache):
    cache = decoding.split_cema_state(cache) if cema == "pallas" else cache
    return decoding.permute_keys(cache, cfg) if scores != "xla" else cache

  def prepare(params):
    return decoding.fuse_decode_params(params, cfg, permute_z=scores != "xla", transpose=settings["transpose"],
                                       fold_norm=settings["fold_norm"], head_rows=settings["head_rows"],
                                       merge_v=settings["merge_v"])

  return apply, prepare, prepare_cache


def megalodon_cache(cfg: mega_config.MegalodonConfig, batch: int, context: int, count: int) -> mega_cache.ModelCache:
  """A cache as after `context` tokens, `count` of them in the current chunk.

  TimestepNorm states count `context` steps with mean 0 and variance 1 (a plausible running
  state); CEMA states and keys/values are zero (values do not change the step's cost).
  """
  empty = mega_cache.init_cache(cfg, batch)
  seen = lambda s: s._replace(count=jnp.full((batch,), context, jnp.int32), var=jnp.ones_like(s.var))
  layers = tuple(layer._replace(norm=seen(layer.norm)) for layer in empty.layers)
  return mega_cache.ModelCache(layers=layers, final_norm=seen(empty.final_norm),
                               count=jnp.asarray(count, jnp.int32))


def llama_config(preset: str, args: argparse.Namespace, decode_attention: str = "xla") -> llama_lib.LlamaConfig:
  # attention_impl only matters without a cache (here: parameter initialisation).
  return llama_lib.preset(preset, dtype=args.dtype, param_dtype=args.param_dtype, scan_layers=False,
                          attention_impl="xla", decode_attention_impl=decode_attention)


def llama_cache_length(context: int, extra: int) -> int:
  """Positions of the KV cache: context + extra, rounded up to a multiple of 128 (attention
  kernels tile the key axis; the few unused positions cost < 0.4% at 32K)."""
  return -(-(context + extra) // LLAMA_CACHE_MULTIPLE) * LLAMA_CACHE_MULTIPLE


def llama_cache(cfg: llama_lib.LlamaConfig, batch: int, context: int, extra: int) -> dict[str, Any]:
  """A KV cache of llama_cache_length(context, extra) positions, `context` of them already written."""
  cache = llama_lib.init_cache(cfg, batch, llama_cache_length(context, extra))
  cache["index"] = jnp.asarray(context, jnp.int32)
  return cache


def first_tokens(batch: int) -> jax.Array:
  """[B, 1] int32: the token every sequence decodes first."""
  return jnp.ones((batch, 1), jnp.int32)


def unstack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
  """Parameters of a model with scanned layers ("layers": leaves with a leading layer axis) in
  the layout of the same model with unrolled layers ("layers_0", "layers_1", ...)."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], params["layers"])
  return out


def init_unrolled(init_scanned: Callable[[jax.Array], Any], num_layers: int) -> Any:
  """Initialises through the scanned model (one layer body to compile instead of num_layers) and
  returns the unrolled layout the decode step uses."""
  return jax.jit(lambda rng: unstack_layers(init_scanned(rng), num_layers))(jax.random.key(0))


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------

def _base_row(size: str, arch: str, batch: int, context: int) -> dict[str, Any]:
  return {"size": size, "arch": arch, "batch": batch, "context": context}


def _compile(step: Callable, state: Any, params: Any) -> tuple[Any, float, int | None]:
  start = time.perf_counter()
  compiled = step.lower(state, params).compile()
  return compiled, round(time.perf_counter() - start, 1), bench_train.compiled_bytes(compiled)


def _memory_fields(params: Any, cache: Any, step_bytes: int | None) -> dict[str, Any]:
  fields = {"params_gib": tree_bytes(params) / 2**30, "cache_gib": tree_bytes(cache) / 2**30}
  live = harness.memory_in_use_bytes()
  if live is not None:
    fields["live_gib"] = live / 2**30
  if step_bytes is not None:
    fields["step_mem_gib"] = step_bytes / 2**30
  return fields


def megalodon_rows(size: str, preset: str, batch: int, contexts: list[int], args: argparse.Namespace,
                   params_cache: dict[str, Any]) -> list[dict[str, Any]]:
  """One compile for all contexts: the step's shapes do not depend on the context.
  params_cache: {preset: params}, shared by the batch sizes of one model size."""
  from megalodon_jax.model import init_params as mega_init
  cfg = megalodon_config(preset, args)
  impls = bench_train.megalodon_impls(cfg)
  if preset not in params_cache:
    params_cache.clear()
    # The XLA paths and scanned layers make the same parameters with a much smaller program to compile.
    init_cfg = cfg.replace(cema_method="chunked", attention_impl="xla", timestep_norm_impl="xla",
                           scan_layers=True)
    params_cache[preset] = init_unrolled(lambda rng: mega_init(init_cfg, rng), cfg.num_layers)
  rows = []
  for decode_impl in getattr(args, "mega_decode", ["model"]):
    decode_impl = default_mega_impl(batch) if decode_impl == "default" else decode_impl
    try:
      rows += _megalodon_impl_rows(size, cfg, batch, contexts, args, params_cache[preset], impls, decode_impl)
    except Exception as err:  # noqa: BLE001 - e.g. the compile failed: every context fails
      for context in contexts:
        row = {**_base_row(size, "megalodon", batch, context), "impls": f"{impls} decode={decode_impl}"}
        _record_failure(row, err, args)
        rows.append(row)
  return rows


def _megalodon_impl_rows(size: str, cfg: mega_config.MegalodonConfig, batch: int, contexts: list[int],
                         args: argparse.Namespace, stored_params: Any, impls: str,
                         decode_impl: str) -> list[dict[str, Any]]:
  """The rows of one decode impl (see megalodon_apply): one compile for all contexts."""
  apply, prepare, prepare_cache = megalodon_apply(cfg, decode_impl)
  params = prepare(stored_params)
  step = decode_fn(apply, args)
  chunk, steps = cfg.chunk_size, total_steps(args)
  abstract_state = jax.eval_shape(lambda: (prepare_cache(megalodon_cache(cfg, batch, 0, 0)), first_tokens(batch)))
  compiled, compile_s, step_bytes = _compile(step, abstract_state, params)
  if decode_impl != "model":
    impls = f"{impls} decode={decode_impl}"
  rows = []
  for context in contexts:
    row = {**_base_row(size, "megalodon", batch, context), "impls": impls, "compile_s": compile_s}
    try:
      fills = {"empty": context % chunk, "full": max(chunk - steps, 0)}
      for fill, count in fills.items():
        state = (prepare_cache(megalodon_cache(cfg, batch, context, count)), first_tokens(batch))  # donated
        row.update(_memory_fields(params, state[0], step_bytes))
        timing, state = time_decode(compiled, state, params, warmup=args.warmup, iters=args.iters,
                                    inner=args.inner, steps_per_call=_steps_per_call(args))
        if not timing.logits_finite:
          raise FloatingPointError(f"non-finite logits with the chunk {fill}")
        row[f"ms_per_step_{fill}_chunk"] = timing.ms_per_step
        row[f"tokens_per_s_{fill}_chunk"] = batch / (timing.ms_per_step * 1e-3)
        del state
      row["ms_per_step"] = max(row[f"ms_per_step_{fill}_chunk"] for fill in fills)
      row["tokens_per_s"] = batch / (row["ms_per_step"] * 1e-3)
      row["chunk_counts"] = f"empty={fills['empty']} full={fills['full']}"
    except Exception as err:  # noqa: BLE001 - one failing row must not end the run
      _record_failure(row, err, args)
    rows.append(row)
  del params, compiled
  return rows


def llama_row(size: str, preset: str, batch: int, context: int, args: argparse.Namespace,
              params_cache: dict[str, Any], impls: Sequence[str]) -> dict[str, Any]:
  """One compile per context and attention impl (the cache length is part of the step's shape).

  With several `impls` (decode attention cores, e.g. cudnn and xla) each is timed and the row
  reports the fastest (ms_per_step_<impl> keeps every one). params_cache: {preset: params}.
  """
  row = _base_row(size, "llama", batch, context)
  extra = total_steps(args)
  cfg = llama_config(preset, args)
  need = llama_lib.cache_bytes(cfg, batch, llama_cache_length(context, extra))
  params_bytes = llama_lib.count_params(cfg) * jnp.dtype(args.param_dtype).itemsize
  capacity = bench_train.device_capacity_bytes()
  row["cache_gib"] = need / 2**30
  if capacity is not None and need + params_bytes > FIT_FRACTION * capacity:
    row["error"] = (f"OOM (not run): KV cache {need / 2**30:.1f} GiB + params {params_bytes / 2**30:.1f} GiB "
                    f"> {FIT_FRACTION:.0%} of the device's {capacity / 2**30:.1f} GiB")
    return row
  errors = []
  for impl in impls:
    try:
      _time_llama_impl(row, preset, batch, context, args, params_cache, impl)
    except Exception as err:  # noqa: BLE001 - try the other impl; the row fails only if all do
      _record_failure(row, err, args)
      errors.append(f"{impl}: {row.pop('error')}")
      row[f"error_{impl}"] = errors[-1]
  timed = [impl for impl in impls if f"ms_per_step_{impl}" in row]
  if not timed:
    row["error"] = "; ".join(errors)
    return row
  best = min(timed, key=lambda impl: row[f"ms_per_step_{impl}"])
  row.update(impls=f"decode_attn={best}", ms_per_step=row[f"ms_per_step_{best}"],
             tokens_per_s=batch / (row[f"ms_per_step_{best}"] * 1e-3), compile_s=row[f"compile_s_{best}"])
  return row


def _time_llama_impl(row: dict[str, Any], preset: str, batch: int, context: int, args: argparse.Namespace,
                     params_cache: dict[str, Any], impl: str) -> None:
  """Compiles and times the Llama decode step with decode attention `impl`; fills row[..._<impl>]."""
  cfg = llama_config(preset, args, impl)
  model = llama_lib.Llama(cfg)
  if preset not in params_cache:
    params_cache.clear()
    scanned = llama_lib.Llama(cfg.replace(scan_layers=True))
    params_cache[preset] = init_unrolled(
        lambda rng: scanned.init(rng, jnp.zeros((1, 8), jnp.int32))["params"], cfg.num_layers)
  params = params_cache[preset]
  step = decode_fn(lambda p, cache, tokens: model.apply({"params": p}, tokens, cache), args)
  state = (llama_cache(cfg, batch, context, total_steps(args)), first_tokens(batch))
  compiled, row[f"compile_s_{impl}"], step_bytes = _compile(step, state, params)
  row.update(_memory_fields(params, state[0], step_bytes))
  timing, state = time_decode(compiled, state, params, warmup=args.warmup, iters=args.iters, inner=args.inner,
                              steps_per_call=_steps_per_call(args))
  del state, compiled
  if not timing.logits_finite:
    raise FloatingPointError("non-finite logits")
  row[f"ms_per_step_{impl}"] = timing.ms_per_step


def _record_failure(row: dict[str, Any], err: BaseException, args: argparse.Namespace) -> None:
  if args.verbose:
    traceback.print_exc()
  row["error"] = ("OOM: " if bench_train.is_oom(err) else "") + bench_ops.failure(err)


def add_ratios(rows: list[dict[str, Any]]) -> None:
  """mega_over_llama on Megalodon rows: tokens/s over the Llama row of the same size, batch, context."""
  for row in rows:
    if row["arch"] != "megalodon" or "tokens_per_s" not in row:
      continue
    match = [r for r in rows if r["arch"] == "llama" and "tokens_per_s" in r
             and all(r[k] == row[k] for k in ("size", "batch", "context"))]
    if match:
      row["mega_over_llama"] = row["tokens_per_s"] / match[0]["tokens_per_s"]
      if row["context"] == TARGET_CONTEXT:
        row["target"] = f">= {TARGET_MEGA_OVER_LLAMA:g}x Llama"
        row["target_met"] = row["mega_over_llama"] >= TARGET_MEGA_OVER_LLAMA
    elif any(r["arch"] == "llama" and "error" in r and all(r[k] == row[k] for k in ("size", "batch", "context"))
             for r in rows):
      row["mega_over_llama_note"] = "Llama did not fit or failed at this size"


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("size", "arch", "batch", "context", "impls", "ms_per_step", "tokens_per_s",
                 "tokens_per_s_empty_chunk", "tokens_per_s_full_chunk", "params_gib", "cache_gib", "live_gib",
                 "step_mem_gib", "compile_s", "mega_over_llama", "target", "target_met", "error")

NOTE = ("caches built directly (no prefill; a decode step's cost depends only on the cache's shape and "
        "fill): Megalodon count = context % chunk ('empty') and chunk - steps ('full'), headline = slower; "
        "Llama KV cache of context + steps positions (rounded up to 128) with index = context, decode "
        "attention core = the fastest of those asked for, chosen at batch 1 / 32K")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--sizes", default="200M,1.3B", help="comma-separated subset of 200M,1.3B")
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--contexts", default="4096,32768,131072")
  parser.add_argument("--archs", default="llama,megalodon")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--cema-method", default="auto", choices=mega_config.CEMA_METHODS)
  parser.add_argument("--attention-impl", default="auto", choices=mega_config.ATTENTION_IMPLS)
  parser.add_argument("--timestep-norm-impl", default="auto", choices=mega_config.TIMESTEP_NORM_IMPLS)
  parser.add_argument("--llama-decode-attention", default=None,
                      help=f"comma-separated subset of {llama_lib.DECODE_ATTENTION_IMPLS} (default cudnn,xla; "
                           "xla with --smoke); with several, all are timed at one setting (batch 1 / 32K) and "
                           "the fastest is used for every row")
  parser.add_argument("--mega-decode", default="default",
                      help=f"comma-separated Megalodon decode impls, each timed in its own rows: {MEGA_DECODE_IMPLS} "
                           "(model: the model's apply; fused-*: decoding.fuse_decode_params + fused_forward_one, see "
                           "parse_mega_impl; default: what decoding.generate / generate_on_device run for the batch "
                           "on this backend, decoding.default_fused_settings)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--inner", type=int, default=8, help="consecutive steps per timed sample")
  parser.add_argument("--loop", default="host", choices=["host", "device"],
                      help="host: one jitted call per token, queued by Python (a streaming generate); "
                           "device: --inner tokens per call in one jitted lax.fori_loop (no host dispatch "
                           "between tokens); both architectures are timed the same way")
  parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (seconds)")
  parser.add_argument("--results-dir", default=None)
  parser.add_argument("--name", default="decode")
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)
  args.size_table = bench_train.SMOKE_SIZES if args.smoke else bench_train.SIZES
  if args.smoke:
    args.sizes = "tiny"
    args.llama_decode_attention = args.llama_decode_attention or "xla"  # cuDNN needs a GPU
    args.batches = "2" if args.batches == "1,16" else args.batches
    args.contexts = "12,40" if args.contexts == "4096,32768,131072" else args.contexts
    args.warmup, args.iters, args.inner = 1, 2, 2
  args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
  unknown = set(args.sizes) - set(args.size_table)
  if unknown:
    parser.error(f"--sizes: unknown {sorted(unknown)}; choose from {sorted(args.size_table)}")
  args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
  args.contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
  args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
  args.mega_decode = [m.strip() for m in args.mega_decode.split(",") if m.strip()]
  if not args.mega_decode:
    parser.error(f"--mega-decode: name at least one of {MEGA_DECODE_IMPLS}")
  for impl in args.mega_decode:
    try:
      _ = impl in ("model", "default") or parse_mega_impl(impl)
    except ValueError as err:
      parser.error(f"--mega-decode: {err}")
  args.llama_decode_attention = [a.strip() for a in (args.llama_decode_attention or "cudnn,xla").split(",")
                                 if a.strip()]
  if not args.llama_decode_attention or set(args.llama_decode_attention) - set(llama_lib.DECODE_ATTENTION_IMPLS):
    parser.error(f"--llama-decode-attention must be a subset of {llama_lib.DECODE_ATTENTION_IMPLS}")
  if set(args.archs) - set(ARCHS) or min(args.batches + args.contexts) < 1:
    parser.error(f"--archs must be a subset of {ARCHS}; batches and contexts positive")
  return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  print(f"bench_decode on {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"{args.warmup} warm-up steps, median of {args.iters} x {args.inner} steps\nnote: {NOTE}", flush=True)
  meta = {"decode_settings": {k: v for k, v in vars(args).items() if k != "size_table"}, "decode_note": NOTE}
  rows: list[dict[str, Any]] = []

  def emit(new_rows):
    for row in new_rows:
      rows.append(row)
      add_ratios(rows)
      print(_row_line(row), flush=True)
    harness.write_results(args.name, rows, meta, results_dir=args.results_dir, print_table=False)

  for size in args.sizes:
    mega_preset, llama_preset = args.size_table[size]
    # One model at a time, its parameters shared by its rows (so live memory is that model's).
    params: dict[str, Any] = {}
    if "llama" in args.archs:
      impls = args.llama_decode_attention
      settings = [(b, c) for b in args.batches for c in args.contexts]
      if len(impls) > 1:
        # Probe every attention core at one setting (32K if asked for), keep the fastest for the rest.
        probe = (args.batches[0], TARGET_CONTEXT if TARGET_CONTEXT in args.contexts else args.contexts[0])
        row = llama_row(size, llama_preset, *probe, args, params, impls)
        emit([row])
        impls = [row["impls"].split("=")[1]] if "impls" in row else impls
        settings.remove(probe)
      for batch, context in settings:
        emit([llama_row(size, llama_preset, batch, context, args, params, impls)])
        jax.clear_caches()
    params.clear()
    gc.collect()
    if "megalodon" in args.archs:
      for batch in args.batches:
        try:
          emit(megalodon_rows(size, mega_preset, batch, args.contexts, args, params))
        except Exception as err:  # noqa: BLE001 - e.g. the compile failed: every context fails
          failed = [_base_row(size, "megalodon", batch, c) for c in args.contexts]
          for row in failed:
            _record_failure(row, err, args)
          emit(failed)
        jax.clear_caches()
        gc.collect()
    params.clear()
    gc.collect()
  path = harness.write_results(args.name, rows, meta, results_dir=args.results_dir, print_table=False)
  print(f"\n== {args.name}: greedy decoding, Megalodon (constant-size cache) vs Llama (KV cache)")
  print(harness.format_table([{k: r[k] for k in TABLE_COLUMNS if k in r} for r in rows]))
  for row in rows:
    if "target_met" in row:
      print(f"target {row['size']} batch {row['batch']} context {row['context']}: Megalodon/Llama "
            f"{row['mega_over_llama']:.2f}x {'MET' if row['target_met'] else 'NOT met'} ({row['target']}"
            + ("" if row["target_met"] else
               f"; {row['mega_over_llama'] / TARGET_MEGA_OVER_LLAMA:.1%} of it") + ")")
  print(f"note: {NOTE}\n-> {path}", flush=True)
  return rows


def _row_line(row: dict[str, Any]) -> str:
  head = f"{row['arch']:9s} {row['size']:5s} batch {row['batch']:3d} context {row['context']:7d}"
  if "error" in row:
    return f"{head} | failed: {row['error']}"
  parts = [f"{row['impls']}", f"{row['ms_per_step']:.3f} ms/step, {row['tokens_per_s']:,.0f} tok/s"]
  if "mega_over_llama" in row:
    parts.append(f"{row['mega_over_llama']:.2f}x Llama")
  for key, label in (("cache_gib", "cache"), ("params_gib", "params"), ("live_gib", "in use")):
    if key in row:
      parts.append(f"{label} {row[key]:.3f} GiB")
  parts.append(f"compile {row.get('compile_s', '-')} s")
  return f"{head} | " + ", ".join(parts)


if __name__ == "__main__":
  main()
