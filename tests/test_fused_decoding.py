"""fuse_decode_params + fused_decode_step give the model's decode step (and so the full forward)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_jax import decoding, model as model_lib
from megalodon_jax.config import preset
from megalodon_jax.model import MegalodonLM

CFGS = {"tiny": preset("tiny"), "tiny_swiglu": preset("tiny_swiglu")}


@functools.lru_cache(maxsize=None)
def _setup(name):
  cfg = CFGS[name]
  params = model_lib.init_params(cfg, jax.random.key(1))
  # Non-zero norm offsets, q/k affine and biases, so that a mixed-up parameter shows.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])
  return cfg, params


@pytest.fixture(scope="module", params=sorted(CFGS))
def setup(request):
  return _setup(request.param)


def _full_logits(cfg, params, tokens):
  """Full-sequence forward over whole chunks, cut back to the tokens' length (causal)."""
  length = tokens.shape[1]
  chunks = -(-length // cfg.chunk_size)
  padded = np.concatenate([tokens, np.zeros((tokens.shape[0], chunks * cfg.chunk_size - length), tokens.dtype)], 1)
  return np.asarray(MegalodonLM(cfg).apply({"params": params}, jnp.asarray(padded))[:, :length])


# The 'barrier' form (never a default) runs in the slow set only: its cases were the slowest here.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name,batch,dup,stats,cema,scores,transpose", [
    ("tiny", 1, "mask", "two_pass", "xla", "xla", False),
    pytest.param("tiny", 1, "barrier", "two_pass", "xla", "xla", False, marks=_SLOW),
    ("tiny", 2, "mask", "two_pass", "xla", "xla", False), ("tiny", 1, "mask", "shifted", "xla", "xla", False),
    ("tiny", 1, "mask", "two_pass", "pallas", "xla", False), ("tiny", 1, "mask", "two_pass", "xla", "pallas", False),
    pytest.param("tiny_swiglu", 2, "barrier", "shifted", "xla", "xla", False, marks=_SLOW),
    ("tiny_swiglu", 1, "mask", "shifted", "pallas", "pallas", False),
    ("tiny_swiglu", 2, "mask", "two_pass", "pallas", "pallas", False),
    ("tiny", 1, "pallas", "shifted", "pallas", "attend", True), ("tiny_swiglu", 2, "dot", "shifted", "xla", "attend", True),
    ("tiny_swiglu", 1, "reduce", "shifted", "pallas", "attend", "fold"),
    ("tiny", 1, "reduce", "shifted", "pallas", "attend", "fold_res"),  # inv from attend_step into residual_moments
    ("tiny_swiglu", 1, "reduce", "shifted", "pallas", "attend", "fold_res_knobs"),
    ("tiny", 1, "rows", "shifted", "pallas", "attend", "fold_res_knobs"),  # every product by gemv_rows
    ("tiny_swiglu", 2, "dot", "shifted", "pallas", "pallas", "fold_res")])
def test_fused_steps_equal_the_full_forward(name, batch, dup, stats, cema, scores, transpose):
  """transpose "fold": transposed kernels and the FFN norm folded into fc_in; "fold_res": that and the
  residual adds in Pallas (fuse_residual; tiny_swiglu scales the FFN output by ffn_alpha first);
  "fold_res_knobs": that with fc_in's product, norm and activation in one kernel, one norm group per
  TimestepNorm/CEMA program and the logits from the transposed output kernel (ffn_kernel, tsn_groups,
  head_rows), the final norm in one kernel (final_kernel), and with dup 'reduce' wv's and w_mx's
  products as one (merge_v)."""
  cfg, params = _setup(name)
  length = 2 * cfg.chunk_size + 3  # crosses two chunk boundaries while decoding
  tokens = np.random.default_rng(batch).integers(0, cfg.vocab_size, size=(batch, length))
  full = _full_logits(cfg, params, tokens)
  prompt = 3
  logits, cache = decoding.prefill(params, cfg, tokens[:, :prompt])
  fused = decoding.fuse_decode_params(params, cfg, permute_z=scores != "xla", transpose=bool(transpose),
                                      fold_norm=str(transpose).startswith("fold"),
                                      head_rows=transpose == "fold_res_knobs",
                                      merge_v=transpose == "fold_res_knobs" and dup == "reduce")
  knobs = {"ffn_kernel": True, "tsn_groups": 1, "final_kernel": True} if transpose == "fold_res_knobs" else {}
  if cema == "pallas":
    cache = decoding.split_cema_state(cache)
  if scores != "xla":
    cache = decoding.permute_keys(cache, cfg)
  outputs = [np.asarray(logits)]
  for t in range(prompt, length):
    step, cache = decoding.fused_decode_step(fused, cfg, tokens[:, t], cache, dup=dup, stats=stats, cema=cema,
                                              scores=scores, fuse_residual=str(transpose).startswith("fold_res"),
                                              **knobs)
    outputs.append(np.asarray(step)[:, None])
  got = np.concatenate(outputs, axis=1)
  np.testing.assert_allclose(got, full, atol=2e-4, rtol=0)
  assert int(cache.count) == length % cfg.chunk_size
  if cema == "pallas" or scores != "xla":  # the cache converts back to the model's layout: prefill continues
    cache = decoding.join_cema_state(cache) if cema == "pallas" else cache
    cache = decoding.unpermute_keys(cache, cfg) if scores != "xla" else cache
    more, _ = decoding.prefill(params, cfg, tokens[:, :2], cache)
    want = _full_logits(cfg, params, np.concatenate([tokens, tokens[:, :2]], axis=1))[:, length:]
    np.testing.assert_allclose(np.asarray(more), want, atol=2e-4, rtol=0)


def test_fused_step_matches_the_model_step_and_cache(setup):
  """One step from the same cache: logits and every cache leaf equal to float32 rounding."""
  cfg, params = setup
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(1, cfg.chunk_size + 2))
  _, cache = decoding.prefill(params, cfg, tokens[:, :-1])
  copy = jax.tree.map(jnp.copy, cache)
  want_logits, want_cache = decoding.decode_step(params, cfg, tokens[:, -1], cache)
  got_logits, got_cache = decoding.fused_decode_step(decoding.fuse_decode_params(params, cfg), cfg,
                                                     tokens[:, -1], copy)
  np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=2e-5, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dup", ["dot", "reduce", "pallas", "mask"])
def test_single_row_forms_of_transposed_kernels_match_the_model_step(dup):
  """Each single-row product over [N, K] kernels: the model step's logits and cache, one step."""
  cfg, params = _setup("tiny_swiglu")
  tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(1, cfg.chunk_size + 3))
  _, cache = decoding.prefill(params, cfg, tokens[:, :-1])
  copy = jax.tree.map(jnp.copy, cache)
  want_logits, want_cache = decoding.decode_step(params, cfg, tokens[:, -1], cache)
  fused = decoding.fuse_decode_params(params, cfg, transpose=True)
  layer = fused["layers"][0]
  assert "w_mx" not in layer and layer["fc2_t"].shape == (cfg.model_dim, cfg.ffn_hidden_dim)
  got_logits, got_cache = decoding.fused_decode_step(fused, cfg, tokens[:, -1], copy, dup=dup)
  np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=2e-5, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_fuse_decode_params_of_scanned_layers_equal_unrolled():
  cfg = CFGS["tiny"]
  scanned_cfg = cfg.replace(scan_layers=True)
  scanned = model_lib.init_params(scanned_cfg, jax.random.key(3))
  unrolled = {k: v for k, v in scanned.items() if k != "layers"}
  for i in range(cfg.num_layers):
    unrolled[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], scanned["layers"])
  a = decoding.fuse_decode_params(scanned, scanned_cfg)
  b = decoding.fuse_decode_params(unrolled, cfg)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fused_step_rejects_bad_arguments(setup):
  cfg, params = setup
  fused = decoding.fuse_decode_params(params, cfg)
  _, cache = decoding.prefill(params, cfg, np.zeros((1, 2), np.int32))
  with pytest.raises(ValueError, match="dup must be one of"):
    decoding.fused_forward_one(fused, cfg, jnp.zeros((1,), jnp.int32), cache, dup="copy")
  with pytest.raises(ValueError, match="split_cema_state"):
    decoding.fused_forward_one(fused, cfg, jnp.zeros((1,), jnp.int32), cache, cema="pallas")
  with pytest.raises(ValueError, match="permute_z=True"):
    decoding.fused_forward_one(fused, cfg, jnp.zeros((1,), jnp.int32), cache, scores="pallas")
  with pytest.raises(ValueError, match="transpose=True"):
    decoding.fused_forward_one(fused, cfg, jnp.zeros((1,), jnp.int32), cache, dup="reduce")
  with pytest.raises(ValueError, match="stats must be one of"):
    decoding.fused_forward_one(fused, cfg, jnp.zeros((1,), jnp.int32), cache, stats="welford")
  with pytest.raises(ValueError, match="fuse_residual=True needs"):
    decoding.fused_forward_one(fused, cfg, jnp.zeros((1,), jnp.int32), cache, fuse_residual=True)


def test_key_permutation_round_trips(setup):
  cfg, params = setup
  _, cache = decoding.prefill(params, cfg, np.arange(5)[None] % cfg.vocab_size)
  permuted = decoding.permute_keys(cache, cfg)
  dz = cfg.z_head_dim
  np.testing.assert_array_equal(np.asarray(permuted.layers[0].key[..., :dz // 2]),
                                np.asarray(cache.layers[0].key[..., 0::2]))
  back = decoding.unpermute_keys(permuted, cfg)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(cache)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("impl", [pytest.param("fused-barrier", marks=_SLOW), "fused-mask-shifted-pallas-scores", "fused-dot-shifted-attend",
                                  "fused-reduce-fold-shifted-pallas-attend4x8x4-res", "fused-mask-t-fold-shifted",
                                  "fused-reduce-fold-shifted-pallas-attend-res-ffn-tsn1-headt-mergev-final"])
def test_bench_decode_impls_give_the_model_logits(impl):
  """bench_decode.megalodon_apply wires params, cache layout and step together for each impl."""
  from experiments.benchmarks import bench_decode
  cfg, params = _setup("tiny")
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(1, 6))
  _, cache = decoding.prefill(params, cfg, tokens[:, :5])
  want, _ = bench_decode.megalodon_apply(cfg, "model")[0](params, jax.tree.map(jnp.copy, cache), tokens[:, 5:])
  apply, prepare, prepare_cache = bench_decode.megalodon_apply(cfg, impl)
  got, _ = jax.jit(apply)(prepare(params), prepare_cache(cache), jnp.asarray(tokens[:, 5:]))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  for bad in ("fused-copy", "fused-dot-scores-shifted", "fused", "fused-mask-scores-attend", "fused-dot-res-fold",
              "fused-reduce-fold-shifted-pallas-attend-res-tsn1-ffn"):
    with pytest.raises(ValueError, match="unknown Megalodon decode impl"):
      bench_decode.megalodon_apply(cfg, bad)


def test_attend_options_map_the_settings_to_attend_step():
  """() is decode_step.default_attend_form (with its combine); explicit fields keep attend_step's
  defaults for the rest and XLA's combine; sub_d = 0 is the tensor-core form; the 8th field (and
  ()) moves v's bias + SiLU and the RMS normalisation into attend_step."""
  from kernels_pallas import decode_step
  form = dict(decode_step.default_attend_form(2048, 2048))
  combine = form.pop("combine", "xla")
  assert decoding.attend_options((), 2048, 2048) == (form, combine)
  assert decoding.attend_options((32, 1024, 256), 2048, 2048) == (
      {"block_k": 32, "block_d": 1024, "sub_d": 256, "mma": False}, "xla")
  assert decoding.attend_options((16, 512, 0, 8), 2048, 2048) == (
      {"block_k": 16, "block_d": 512, "sub_d": None, "num_warps": 8, "mma": True}, "xla")
  assert decoding.attend_options((8, 1024, 256, 4, 4, 1, 1, 1), 2048, 2048) == (
      {"block_k": 8, "block_d": 1024, "sub_d": 256, "num_warps": 4, "tiles": 4, "preload": 1, "num_stages": 1,
       "mma": False}, "xla")
  assert decoding.attend_fuses(()) and decoding.attend_fuses((8, 1024, 256, 4, 4, 1, 1, 1))
  assert not decoding.attend_fuses((32, 1024, 256)) and not decoding.attend_fuses((8, 1024, 256, 4, 4, 1, 1, 0))
  with pytest.raises(ValueError, match="more than the 8 fields"):
    decoding.attend_options(tuple(range(1, 10)), 2048, 2048)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_generate_on_device_fused_default_equals_the_model_path(scan_layers):
  """The default decode_impl='fused' samples the tokens the model path samples, and leaves the
  same cache (in the config's layout, scanned layers included)."""
  cfg, params = _setup("tiny")
  if scan_layers:
    cfg = cfg.replace(scan_layers=True)
    params = {**{k: v for k, v in params.items() if not k.startswith("layers_")},
              "layers": jax.tree.map(lambda *xs: jnp.stack(xs),
                                     *[params[f"layers_{i}"] for i in range(cfg.num_layers)])}
  prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 5))
  run = lambda impl: decoding.generate_on_device(params, cfg, prompt, 12, jax.random.key(1), temperature=1.0,
                                                 decode_impl=impl)
  fused_tokens, fused_cache = run("fused")
  model_tokens, model_cache = run("model")
  np.testing.assert_array_equal(np.asarray(fused_tokens), np.asarray(model_tokens))
  assert jax.tree.structure(fused_cache) == jax.tree.structure(model_cache)
  for got, want in zip(jax.tree.leaves(fused_cache), jax.tree.leaves(model_cache)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="decode_impl must be one of"):
    decoding.generate_on_device(params, cfg, prompt, 3, jax.random.key(1), decode_impl="xla")


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_with_the_gpu_settings_equals_the_model_path(batch):
  """decoding.GPU_FUSED_SETTINGS (Pallas kernels, transposed kernels, the converted cache layout) run
  here in the Pallas interpreter: the model path's tokens, streamed or on the device, and
  generate_on_device's cache back in the model's layout (scanned layers)."""
  cfg, params = _setup("tiny")
  cfg = cfg.replace(scan_layers=True)
  params = {**{k: v for k, v in params.items() if not k.startswith("layers_")},
            "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(cfg.num_layers)])}
  settings = decoding.GPU_FUSED_SETTINGS[1 if batch == 1 else "batched"]
  prompt = np.random.default_rng(8).integers(0, cfg.vocab_size, size=(batch, 5))
  kwargs = dict(temperature=1.0)
  model_tokens, model_cache = decoding.generate_on_device(params, cfg, prompt, 10, jax.random.key(2),
                                                          decode_impl="model", **kwargs)
  fused_tokens, fused_cache = decoding.generate_on_device(params, cfg, prompt, 10, jax.random.key(2),
                                                          fused_settings=settings, **kwargs)
  streamed = np.stack(list(decoding.generate(params, cfg, prompt, 10, jax.random.key(2), fused_settings=settings,
                                             tokens_per_call=4, **kwargs)), 1)
  np.testing.assert_array_equal(np.asarray(fused_tokens), np.asarray(model_tokens))
  np.testing.assert_array_equal(streamed, np.asarray(model_tokens))
  assert jax.tree.structure(fused_cache) == jax.tree.structure(model_cache)
  for got, want in zip(jax.tree.leaves(fused_cache), jax.tree.leaves(model_cache)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
  # Params made elsewhere: their layout decides; a mismatch with explicit settings is an error.
  fused = decoding.fuse_decode_params(params, cfg, transpose=True)
  assert decoding.settings_of(fused, batch).transpose
  wrong = decoding.fuse_decode_params(params, cfg, transpose=not settings.transpose)
  with pytest.raises(ValueError, match=f"transpose={settings.transpose}"):
    decoding.generate_on_device(params, cfg, prompt, 3, jax.random.key(2), fused_params=wrong, fused_settings=settings)


def test_settings_of_keeps_fuse_residual_only_where_the_params_allow_it(monkeypatch):
  """A default with fuse_residual=True (cema 'pallas', 'attend', fold): params made without the fold or
  the permuted layout turn it off (the step would reject them), fold + permuted params keep it."""
  cfg, params = _setup("tiny")
  on = decoding.FusedSettings(dup="reduce", cema="pallas", scores="attend", transpose=True, fold_norm=True,
                              fuse_residual=True)
  monkeypatch.setattr(decoding, "default_fused_settings", lambda batch: on)
  plain = decoding.fuse_decode_params(params, cfg, transpose=True)
  assert not decoding.settings_of(plain, 1).fuse_residual
  unpermuted = decoding.fuse_decode_params(params, cfg, transpose=True, fold_norm=True)
  assert not decoding.settings_of(unpermuted, 1).fuse_residual
  assert decoding.settings_of(decoding.fuse_decode_params(params, cfg, permute_z=True, transpose=True, fold_norm=True),
                              1) == on


def test_merged_value_products_are_checked():
  """merge_v params need the transposed, permuted layout and run only the single-row 'attend' step."""
  cfg, params = _setup("tiny")
  with pytest.raises(ValueError, match="merge_v=True needs transpose=True and permute_z=True"):
    decoding.fuse_decode_params(params, cfg, transpose=True, merge_v=True)
  fused = decoding.fuse_decode_params(params, cfg, permute_z=True, transpose=True, fold_norm=True, merge_v=True)
  assert "w_vmx_t" in fused["layers"][0] and "wv_t" not in fused["layers"][0]
  assert decoding.settings_of(fused, 1).merge_v
  tokens = np.zeros((2, 3), np.int32)
  _, cache = decoding.prefill(params, cfg, tokens)
  cache = decoding.permute_keys(decoding.split_cema_state(cache), cfg)
  with pytest.raises(ValueError, match="one sequence with dup='reduce'"):
    decoding.fused_forward_one(fused, cfg, jnp.zeros((2,), jnp.int32), cache, dup="reduce", cema="pallas",
                               scores="attend", fuse_residual=True)


@pytest.mark.parametrize("batch", [1, 2])
def test_transposed_head_gives_the_stored_heads_logits(batch):
  """head_rows stores only the transposed output kernel: one row reads it as a row reduction, more rows
  as a GEMM; both give the logits of the stored kernel (the path checked against the full forward)."""
  cfg, params = _setup("tiny_swiglu")  # shares the embedding as the head
  tokens = np.random.default_rng(batch).integers(0, cfg.vocab_size, size=(batch, 4))
  _, cache = decoding.prefill(params, cfg, tokens[:, :3])
  plain = decoding.fuse_decode_params(params, cfg)
  rows = decoding.fuse_decode_params(params, cfg, head_rows=True)
  assert "head" not in rows and rows["head_t"].shape == (cfg.vocab_size, cfg.model_dim)
  want, _ = decoding.fused_forward_one(plain, cfg, jnp.asarray(tokens[:, 3]), cache)
  got, _ = decoding.fused_forward_one(rows, cfg, jnp.asarray(tokens[:, 3]), cache)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
