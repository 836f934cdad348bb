"""The benchmark scripts end to end in --smoke mode (tiny shapes, CPU, interpreted kernels), plus
the arithmetic they report: cost models against brute-force counts, derived columns against the
raw measurements, the memory-fit and out-of-memory paths."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.baselines import llama as llama_lib
from experiments.benchmarks import bench_decode, bench_ops, bench_train
from megalodon_jax import config as mega_config


def load_results(directory: pathlib.Path, name: str) -> dict:
  files = sorted(directory.glob(f"*_{name}.json"))
  assert len(files) == 1, f"expected one {name} results file in {directory}, found {files}"
  return json.loads(files[0].read_text())


def tsn_kernel_installed() -> bool:
  return bench_train._kernel_available("kernels_pallas.timestep_norm")


# ---------------------------------------------------------------------------------------------
# bench_ops
# ---------------------------------------------------------------------------------------------

def test_bench_ops_smoke_runs_every_op_and_writes_consistent_rows(tmp_path):
  rows = bench_ops.main(["--smoke", "--results-dir", str(tmp_path), "--cema-impls", "pallas,blocked"])
  saved = load_results(tmp_path, "ops")
  assert saved["rows"] == json.loads(json.dumps(rows))  # what was printed is what was written
  assert [c["ceiling"] for c in saved["metadata"]["ceilings"]] == ["copy_bandwidth", "read_bandwidth", "write_bandwidth",
                                                             "matmul_peak", "fp32_fma_rate_xla", "fp32_fma_rate"]
  assert all(c["value"] > 0 for c in saved["metadata"]["ceilings"])
  got = {(r["op"], r["impl"]) for r in rows}
  assert got == {("cema", "pallas"), ("cema", "blocked"), ("timestep_norm", "pallas"),
                 ("timestep_norm", "associative"), ("chunk_attention", "pallas"), ("chunk_attention", "xla")}
  for row in rows:
    if row["op"] == "timestep_norm" and row["impl"] == "pallas" and not tsn_kernel_installed():
      assert "timestep_norm" in row["fwd_error"] and "fwd_ms" not in row
      continue
    assert "error" not in row and "fwd_error" not in row and "fwdbwd_error" not in row, row
    for name in ("fwd", "fwdbwd"):
      assert 0 < row[f"{name}_p10_ms"] <= row[f"{name}_ms"] <= row[f"{name}_p90_ms"]
      assert row[f"{name}_floor_ms"] > 0
      assert row[f"{name}_x_floor"] == pytest.approx(row[f"{name}_ms"] / row[f"{name}_floor_ms"])
    assert row["fwdbwd_floor_ms"] > row["fwd_floor_ms"]  # the backward pass only adds work
    assert "fwd_released_ms" not in row and "target_met" not in row  # published numbers are for full shapes
    if row["impl"] == bench_ops.XLA_REFERENCE[row["op"]]:
      assert row["fwdbwd_speedup_vs_xla"] == 1.0
    else:
      ref = next(r for r in rows if r["op"] == row["op"] and r["impl"] == bench_ops.XLA_REFERENCE[row["op"]])
      assert row["fwdbwd_speedup_vs_xla"] == pytest.approx(ref["fwdbwd_ms"] / row["fwdbwd_ms"])
  attention = next(r for r in rows if r["op"] == "chunk_attention" and r["impl"] == "xla")
  s = bench_ops.SMOKE_SHAPES
  flops = 3 * bench_ops.attention_flops_fwd(1, s.attn_chunks, s.attn_chunk, s.attn_heads, s.attn_dk, s.attn_dv)
  assert attention["fwdbwd_tflops"] == pytest.approx(flops / (attention["fwdbwd_ms"] * 1e-3) / 1e12)


def test_fma_chain_kernel_computes_the_chains_it_counts():
  """The FMA-rate kernel (interpreted) does `chains` x `chain` multiply-adds per element."""
  n, chain, chains = 256, 16, 3
  x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
  ab = np.array([0.9, 0.01], np.float32)
  got = bench_ops.fma_chain_kernel(n, chain, chains=chains, block=128, interpret=True)(x, ab)
  ys = x[None, :].astype(np.float64) + 1e-3 * np.arange(chains)[:, None]
  for _ in range(chain):
    ys = ys * 0.9 + 0.01
  np.testing.assert_allclose(np.asarray(got), ys.sum(0), rtol=1e-5, atol=1e-5)


def test_attention_flops_match_a_brute_force_count():
  chunks, chunk, heads, dk, dv = 3, 5, 2, 4, 6
  pairs = sum(1 for q in range(chunk) for k in range(chunk) if k <= q) * chunks * heads
  assert bench_ops.attention_flops_fwd(2, chunks, chunk, heads, dk, dv) == 2 * pairs * 2 * (dk + dv)


def test_released_numbers_and_targets_attach_to_the_published_shapes_only():
  ceilings = bench_ops.Ceilings(copy_gb_per_s=4000.0, matmul_tflops=800.0, fma_per_s=30e12)
  shapes = bench_ops.Shapes(cema_lengths=(32768,))
  case = bench_ops.cema_cases(shapes, ["pallas"], bench_ops.KernelMode())[0]
  row = {"fwd_ms": 2.0, "fwdbwd_ms": 2.4}
  bench_ops._add_derived(row, case, ceilings)
  assert row["fwd_released_ms"] == 10.12 and row["fwdbwd_released_ms"] == 25.06
  assert row["fwdbwd_speedup_vs_released"] == pytest.approx(25.06 / 2.4)
  assert row["target_fwdbwd_ms"] == 2.5 and row["target_met"] is True
  # The fp32 FMA bound dominates CEMA: 26 FMAs per (t, d, n) at 30e12 FMA/s.
  elems = 32768 * 4096 * 16
  assert row["fwdbwd_floor_kind"] == "fp32_fma"
  assert row["fwdbwd_floor_ms"] == pytest.approx(26 * elems / 30e12 * 1e3)
  memory_ms = 32768 * 4096 * 14 / 4000e9 * 1e3
  assert ceilings.floor_ms(case.cost, "fwdbwd")[0] > memory_ms


def test_noise_generators_are_standard_and_in_range():
  z = np.asarray(jax.jit(lambda: bench_ops.noise_normal(3, (200, 500)))())
  assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02
  assert abs(np.mean(np.abs(z) < 1.0) - 0.6827) < 0.01  # the normal's one-sigma mass
  other = np.asarray(jax.jit(lambda: bench_ops.noise_normal(4, (200, 500)))())
  assert abs(np.corrcoef(z.ravel(), other.ravel())[0, 1]) < 0.02
  tokens = np.asarray(jax.jit(lambda: bench_ops.noise_tokens(1, (4, 1000), 37))())
  assert tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() < 37
  counts = np.bincount(tokens.ravel(), minlength=37)
  assert counts.min() > 0.6 * counts.mean()


def test_kernel_config_overrides_are_parsed_and_checked():
  from kernels_pallas import cema as cema_kernels
  config = bench_ops.kernel_config(cema_kernels.CemaKernelConfig, "num_chunks=4, split=1")
  assert (config.num_chunks, config.split) == (4, 1)
  # A variant of the shape's default changes only the fields it names (the class defaults would
  # silently drop the default's time chunks).
  base = cema_kernels.default_config(1, 32768, 4096, 16)
  variant = bench_ops.kernel_config(cema_kernels.CemaKernelConfig, "ptx_shuffle=false", base)
  assert variant == dataclasses.replace(base, ptx_shuffle=False) and variant.num_chunks > 1
  assert bench_ops.parse_overrides("fwd_impl=flash,prefetch=false") == {"fwd_impl": "flash", "prefetch": False}
  with pytest.raises(ValueError, match="unknown CemaKernelConfig"):
    bench_ops.kernel_config(cema_kernels.CemaKernelConfig, "blok_d=8")
  with pytest.raises(ValueError, match="name=value"):
    bench_ops.parse_overrides("block_t")


def test_variants_add_labelled_pallas_rows_next_to_their_op_and_carry_their_tiling():
  args = bench_ops.parse_args(["--smoke", "--ops", "cema,chunk_attention", "--cema-impls", "chunked",
                               "--variant", "cema:block_t=4", "--variant", "cema:blok_t=4"])
  cases = bench_ops.build_cases(args, bench_ops.kernel_mode(args))
  assert [(c.op, c.impl) for c in cases] == [
      ("cema", "chunked"), ("cema", "pallas[block_t=4]"), ("cema", "pallas[blok_t=4]"),
      ("chunk_attention", "pallas"), ("chunk_attention", "xla")]
  primals, _ = bench_ops.build_inputs(cases[1], abstract=True)
  jax.eval_shape(cases[1].fn, *primals)  # a valid override traces
  with pytest.raises(ValueError, match="unknown CemaKernelConfig field"):
    jax.eval_shape(cases[2].fn, *primals)  # the variant's own overrides reach the kernel call


# ---------------------------------------------------------------------------------------------
# bench_train
# ---------------------------------------------------------------------------------------------

def test_bench_train_smoke_measures_both_models_with_the_same_step(tmp_path):
  rows = bench_train.main(["--smoke", "--shapes", "2x16", "--results-dir", str(tmp_path)])
  saved = load_results(tmp_path, "train")
  assert saved["rows"] == json.loads(json.dumps(rows))
  assert [(r["arch"], r["shape"]) for r in rows] == [("llama", "2x16"), ("megalodon", "2x16")]
  peak = saved["metadata"]["matmul_peak_tflops"]
  assert peak > 0
  for row in rows:
    assert "error" not in row, row
    vocab = 64  # both tiny presets
    assert 0.5 * math.log(vocab) < row["loss"] < 1.5 * math.log(vocab)  # near chance at initialisation
    assert row["tokens_per_s"] == pytest.approx(2 * 16 / (row["step_ms"] * 1e-3))
    assert row["mfu_measured_peak"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / (peak * 1e12))
    assert row["mfu_989"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 989e12)
    assert row["mem_gib"] > 0 and row["compile_s"] > 0
  llama, mega = rows
  assert llama["flops_per_token"] == llama_lib.flops_per_token(llama_lib.preset("tiny"), 16)
  assert mega["mega_over_llama"] == pytest.approx(mega["tokens_per_s"] / llama["tokens_per_s"])
  causal = bench_train.megalodon_flops_per_token_causal(mega_config.preset("tiny"), 16)
  assert mega["mfu_measured_peak_causal"] == pytest.approx(causal * mega["tokens_per_s"] / (peak * 1e12))
  assert mega["impls"] == "cema=blocked tsn=associative attn=xla"  # 'auto' on a CPU


@pytest.mark.parametrize("name", ["tiny", "tiny_swiglu", "mega1.3B"])
def test_megalodon_flops_are_counted_the_way_the_llama_baseline_counts(name):
  from megalodon_jax.model import init_params
  cfg = mega_config.preset(name)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  # Matmul weights from the parameter tree: every Dense kernel and the head (or the tied embedding).
  kernels = sum(math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
                if path[-1].key == "kernel")
  tied = math.prod(params["embed"]["embedding"].shape) if cfg.share_emb else 0
  assert bench_train.megalodon_matmul_params(cfg) == kernels + tied
  # Attention by brute force: query i of a chunk sees i + 1 keys, 2 Z + 2 V FLOPs per pair.
  seq = 2 * cfg.chunk_size
  pairs_per_token = sum(i + 1 for i in range(cfg.chunk_size)) / cfg.chunk_size
  attention = 3 * cfg.num_layers * pairs_per_token * 2 * (cfg.z_dim + cfg.value_dim)
  cema = 3 * cfg.num_layers * 10 * cfg.model_dim * cfg.cema_ndim
  expected = 6 * (kernels + tied) + attention + cema
  # The closed form takes C / 2 keys per query where the brute force has (C + 1) / 2.
  assert bench_train.megalodon_flops_per_token_causal(cfg, seq) == pytest.approx(expected, rel=1.0 / cfg.chunk_size)
  llama = llama_lib.preset("tiny")
  llama_attention = 3 * llama.num_layers * 2 * llama.model_dim * seq  # the same causal convention
  assert llama_lib.flops_per_token(llama, seq) == 6 * llama_lib.count_matmul_params(llama) + llama_attention


def fake_args(**overrides) -> argparse.Namespace:
  args = bench_train.parse_args(["--smoke"])
  return argparse.Namespace(**{**vars(args), **overrides})


def test_out_of_memory_rows_are_reported_and_retried_with_the_asked_policy(monkeypatch):
  calls = []

  def run_row(spec, args, row):
    calls.append(spec.remat)
    row["compile_s"] = 1.0
    if spec.remat == "none":
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99.00GiB.")
    row["tokens_per_s"] = 5.0
    return row

  monkeypatch.setattr(bench_train, "run_row", run_row)
  spec = bench_train.RowSpec("tiny", "megalodon", 1, 32, "none")
  rows = bench_train.measure(spec, fake_args(oom_remat="save_cema_attention"))
  assert calls == ["none", "save_cema_attention"]
  assert rows[0]["error"].startswith("OOM: RuntimeError") and "99.00GiB" in rows[0]["error"]
  assert rows[0]["compile_s"] == 1.0 and "tokens_per_s" not in rows[0]  # what was measured before the failure
  assert rows[1]["remat"] == "save_cema_attention" and "error" not in rows[1] and rows[1]["tokens_per_s"] == 5.0
  # Llama has no CEMA to save: it retries by recomputing everything. Without --oom-remat: no retry.
  calls.clear()
  llama = bench_train.measure(bench_train.RowSpec("tiny", "llama", 1, 32, "none"),
                              fake_args(oom_remat="save_cema_attention"))
  assert calls == ["none", "full"] and llama[1]["remat"] == "full"
  calls.clear()
  assert len(bench_train.measure(spec, fake_args(oom_remat=""))) == 1 and calls == ["none"]


def test_other_failures_are_reported_without_retry(monkeypatch):
  def run_row(spec, args, row):
    raise ValueError("lowering failed\nsecond line")

  monkeypatch.setattr(bench_train, "run_row", run_row)
  rows = bench_train.measure(bench_train.RowSpec("tiny", "megalodon", 1, 32, "none"), fake_args(oom_remat="full"))
  assert [r["error"] for r in rows] == ["ValueError: lowering failed"]


def test_train_targets_and_ratios():
  rows = [
      {"size": "1.3B", "arch": "llama", "shape": "1x32768", "tokens_per_s": 30_000.0, "model_tflops": 300.0},
      {"size": "1.3B", "arch": "megalodon", "shape": "1x32768", "tokens_per_s": 45_000.0, "model_tflops": 400.0},
      {"size": "1.3B", "arch": "llama", "shape": "8x4096", "tokens_per_s": 50_000.0, "model_tflops": 420.0},
  ]
  for row in rows:
    bench_train.add_derived(row, matmul_tflops=800.0)
  bench_train.add_ratios(rows)
  mega = rows[1]
  assert mega["mega_over_llama"] == 1.5 and mega["target_ratio_met"] is True
  assert mega["x_released"] == pytest.approx(45_000 / 32_050)
  assert mega["target_met"] is False  # target 48,000 tok/s
  assert rows[2]["mfu_measured_peak"] == pytest.approx(420 / 800) and rows[2]["target_met"] is True
  assert "target_met" not in rows[0]  # the Llama fairness check is at 8x4096 only


# ---------------------------------------------------------------------------------------------
# bench_decode
# ---------------------------------------------------------------------------------------------

def test_bench_decode_smoke_memory_flat_for_megalodon_and_linear_for_llama(tmp_path):
  rows = bench_decode.main(["--smoke", "--results-dir", str(tmp_path)])
  saved = load_results(tmp_path, "decode")
  assert saved["rows"] == json.loads(json.dumps(rows))
  assert "no prefill" in saved["metadata"]["decode_note"]
  assert [(r["arch"], r["context"]) for r in rows] == [("llama", 12), ("llama", 40), ("megalodon", 12),
                                                       ("megalodon", 40)]
  for row in rows:
    assert "error" not in row, row
    assert row["tokens_per_s"] == pytest.approx(2 / (row["ms_per_step"] * 1e-3))
  llama = [r for r in rows if r["arch"] == "llama"]
  mega = [r for r in rows if r["arch"] == "megalodon"]
  steps = 1 + 2 * 2  # smoke: warmup 1, iters 2 x inner 2
  cfg = llama_lib.preset("tiny", dtype="bfloat16")
  for row in llama:  # keys and values of context + steps positions (rounded up to 128), plus the int32 index
    assert bench_decode.llama_cache_length(row["context"], steps) == 128
    assert row["cache_gib"] * 2**30 == llama_lib.cache_bytes(cfg, 2, 128) + 4
  assert mega[0]["cache_gib"] == mega[1]["cache_gib"]  # constant in the context
  for row in mega:
    assert row["ms_per_step"] == max(row["ms_per_step_empty_chunk"], row["ms_per_step_full_chunk"])
    other = next(r for r in llama if r["context"] == row["context"])
    assert row["mega_over_llama"] == pytest.approx(row["tokens_per_s"] / other["tokens_per_s"])
  counts = mega_config.preset("tiny").chunk_size
  assert mega[0]["chunk_counts"] == f"empty={12 % counts} full={counts - steps}"


def test_megalodon_cache_is_built_as_after_context_tokens():
  cfg = mega_config.preset("tiny")
  cache = bench_decode.megalodon_cache(cfg, batch=3, context=1000, count=5)
  assert int(cache.count) == 5
  for state in [layer.norm for layer in cache.layers] + [cache.final_norm]:
    np.testing.assert_array_equal(np.asarray(state.count), [1000] * 3)
    np.testing.assert_array_equal(np.asarray(state.var), np.ones((3, cfg.norm_num_groups)))
  empty = bench_decode.mega_cache.init_cache(cfg, 3)
  assert bench_decode.tree_bytes(cache) == bench_decode.tree_bytes(empty)


def test_llama_rows_that_cannot_fit_are_reported_without_running(monkeypatch):
  monkeypatch.setattr(bench_train, "device_capacity_bytes", lambda: 1 << 20)
  args = bench_decode.parse_args(["--smoke"])
  row = bench_decode.llama_row("tiny", "tiny", 64, 100_000, args, {}, ["xla"])
  assert row["error"].startswith("OOM (not run): KV cache") and "tokens_per_s" not in row
  length = bench_decode.llama_cache_length(100_000, bench_decode.total_steps(args))
  assert length == 100_096 and length % 128 == 0
  assert row["cache_gib"] * 2**30 == llama_lib.cache_bytes(llama_lib.preset("tiny", dtype="bfloat16"), 64, length)


def test_llama_baseline_uses_the_fastest_attention_core_probed_at_32k(monkeypatch, tmp_path):
  speed = {"cudnn": 2.0, "xla": 3.0}
  calls = []

  def fake_time(row, preset, batch, context, args, params_cache, impl):
    calls.append((impl, batch, context))
    if impl == "cudnn" and batch == 16:
      raise RuntimeError("cuDNN does not support this")
    row[f"compile_s_{impl}"] = 1.0
    row[f"ms_per_step_{impl}"] = speed[impl]

  monkeypatch.setattr(bench_decode, "_time_llama_impl", fake_time)
  rows = bench_decode.main(["--smoke", "--archs", "llama", "--batches", "1", "--contexts", "4096,32768",
                            "--llama-decode-attention", "cudnn,xla", "--results-dir", str(tmp_path)])
  # The probe (batch 1, 32K) times both cores; the other rows use only the faster one.
  assert calls == [("cudnn", 1, 32768), ("xla", 1, 32768), ("cudnn", 1, 4096)]
  assert [r["context"] for r in rows] == [32768, 4096]
  assert rows[0]["impls"] == "decode_attn=cudnn" and rows[0]["ms_per_step"] == 2.0
  assert rows[0]["ms_per_step_xla"] == 3.0 and rows[0]["tokens_per_s"] == pytest.approx(1 / 2e-3)
  # A core that fails leaves the row to the others; the row fails only if all do.
  row = bench_decode.llama_row("tiny", "tiny", 16, 64, bench_decode.parse_args(["--smoke"]), {}, ["cudnn", "xla"])
  assert row["impls"] == "decode_attn=xla" and row["error_cudnn"].startswith("cudnn: RuntimeError")
  assert "error" not in row
  row = bench_decode.llama_row("tiny", "tiny", 16, 64, bench_decode.parse_args(["--smoke"]), {}, ["cudnn"])
  assert row["error"] == "cudnn: RuntimeError: cuDNN does not support this" and "tokens_per_s" not in row


def test_scanned_initialisation_gives_the_unrolled_parameter_layout():
  mega = mega_config.preset("tiny", scan_layers=True)
  from megalodon_jax.model import init_params
  scanned = jax.eval_shape(lambda: bench_decode.unstack_layers(init_params(mega, jax.random.key(0)),
                                                                mega.num_layers))
  unrolled = jax.eval_shape(lambda: init_params(mega.replace(scan_layers=False), jax.random.key(0)))
  assert jax.tree.structure(scanned) == jax.tree.structure(unrolled)
  assert jax.tree.leaves(scanned) == jax.tree.leaves(unrolled)  # shapes and dtypes
  cfg = llama_lib.preset("tiny", scan_layers=True)
  tokens = jnp.zeros((1, 4), jnp.int32)
  init = lambda c: llama_lib.Llama(c).init(jax.random.key(0), tokens)["params"]
  stacked = jax.eval_shape(lambda: init(cfg))
  layers = jax.eval_shape(lambda: init(cfg.replace(scan_layers=False)))
  split = jax.eval_shape(lambda p: bench_decode.unstack_layers(p, cfg.num_layers), stacked)
  assert jax.tree.structure(split) == jax.tree.structure(layers) and jax.tree.leaves(split) == jax.tree.leaves(layers)
  # Values: layer i of the unrolled layout is slice i of the stack.
  params = {"layers": {"w": jnp.arange(6.0).reshape(3, 2)}, "embed": jnp.ones(2)}
  out = bench_decode.unstack_layers(params, 3)
  np.testing.assert_array_equal(out["layers_2"]["w"], [4.0, 5.0])
  assert set(out) == {"embed", "layers_0", "layers_1", "layers_2"}


# ---------------------------------------------------------------------------------------------
# bench_scaling
# ---------------------------------------------------------------------------------------------

def test_bench_scaling_smoke_data_and_sequence_parallel_match_one_device(tmp_path):
  """Two compiles at a time (the GPU call's path); the data- and sequence-parallel steps start from
  the same parameters and tokens as one device, so their first losses agree."""
  from experiments.benchmarks import bench_scaling
  rows = bench_scaling.main(["--smoke", "--modes", "data,sequence", "--devices", "1,2", "--compile-workers", "2",
                             "--results-dir", str(tmp_path)])
  files = list(tmp_path.glob("*_cpux8_scaling.json"))  # the device count is in the name
  assert len(files) == 1
  saved = json.loads(files[0].read_text())
  assert saved["rows"] == json.loads(json.dumps(rows))
  assert [(r["mode"], r["devices"], r["shape"]) for r in rows] == [
      ("data", 1, "2x32"), ("data", 2, "4x32"), ("sequence", 1, "1x64"), ("sequence", 2, "1x64")]
  for row in rows:
    assert "error" not in row, row
    batch, length = (int(v) for v in row["shape"].split("x"))
    assert row["tokens_per_s"] == pytest.approx(batch * length / (row["step_ms"] * 1e-3))
    assert row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"] / row["devices"])
    assert row["mem_gib"] > 0 and row["compile_s"] > 0
    assert 0.5 * math.log(64) < row["first_loss"] < 1.5 * math.log(64)
  data1, data2, seq1, seq2 = rows
  assert data2["mesh"].startswith("data=2 fsdp=1 sequence=1") and seq2["mesh"].startswith("data=1 fsdp=1 sequence=2")
  assert data2["efficiency"] == pytest.approx(data2["tokens_per_s_per_gpu"] / data1["tokens_per_s"])
  assert seq2["efficiency"] == pytest.approx(seq2["tokens_per_s_per_gpu"] / seq1["tokens_per_s"])
  assert data2["first_loss_rel_diff"] < 1e-5  # the n=1 batch on each device: the same mean
  assert seq2["first_loss_rel_diff"] < 1e-3  # bf16 activations, slices combined in another order
  assert data2["target"] == "efficiency >= 90%" and seq2["target"] == "efficiency >= 85%"
  assert seq2["combine_ms_per_layer"] > 0 and "combine_ms_per_layer" not in data2
  assert seq2["combine_pct_of_step"] == pytest.approx(100 * 2 * seq2["combine_ms_per_layer"] / seq2["step_ms"])


def test_bench_scaling_rows_and_out_of_memory_retry(monkeypatch):
  from experiments.benchmarks import bench_scaling
  args = bench_scaling.parse_args(["--smoke", "--devices", "1,2,4", "--single-remat", "full",
                                   "--oom-remat", "save_cema_attention"])
  specs = bench_scaling.row_specs(args)
  assert [(s.mode, s.devices, s.batch, s.length, s.remat) for s in specs] == [
      ("data", 1, 2, 32, "full"), ("data", 2, 4, 32, "none"), ("data", 4, 8, 32, "none"),
      ("sequence", 1, 1, 64, "full"), ("sequence", 2, 1, 64, "none"), ("sequence", 4, 1, 64, "none"),
      ("long", 4, 1, 256, "none")]
  calls = []

  def run_row(step, args, row):
    calls.append(step.spec.remat)
    if step.spec.remat == "none":
      raise MemoryError("RESOURCE_EXHAUSTED (predicted): the step needs 200 GiB")
    return row.update(step_ms=1.0, tokens_per_s=256e3, tokens_per_s_per_gpu=64e3, compile_s=1.0, first_loss=4.0)

  monkeypatch.setattr(bench_scaling, "compile_step", lambda step: step)
  monkeypatch.setattr(bench_scaling, "run_row", run_row)
  rows = bench_scaling.measure(specs[-1], args)
  assert calls == ["none", "save_cema_attention"]
  assert rows[0]["error"].startswith("OOM: ") and "error" not in rows[1]
  assert [r["remat"] for r in rows] == ["none", "save_cema_attention"]


def test_scaling_efficiency_prefers_a_baseline_with_the_same_remat():
  from experiments.benchmarks import bench_scaling
  def row(devices, remat, tok_s, shape="1x64"):
    return {"size": "tiny", "mode": "sequence", "devices": devices, "shape": shape, "remat": remat,
            "tokens_per_s": tok_s, "tokens_per_s_per_gpu": tok_s / devices, "first_loss": 4.0, "loss": 3.0}
  rows = [row(1, "full", 100.0), row(1, "none", 150.0), row(2, "none", 270.0), row(2, "dots", 180.0)]
  bench_scaling.add_efficiency(rows)
  assert rows[2]["efficiency"] == pytest.approx(0.9) and rows[2]["baseline_remat"] == "none"
  assert rows[2]["target_met"] is True
  assert rows[3]["efficiency"] == pytest.approx(0.9) and rows[3]["baseline_remat"] == "full"


def test_bench_scaling_append_keeps_earlier_rows_and_replaces_remeasured_ones(tmp_path, monkeypatch):
  from experiments.benchmarks import bench_scaling

  def measure(spec, args, step=None):
    tok_s = 100.0 * spec.devices * (0.9 if spec.devices > 1 else 1.0)
    return [{**bench_scaling.base_row(spec), "tokens_per_s": tok_s, "tokens_per_s_per_gpu": tok_s / spec.devices,
             "step_ms": 1.0, "compile_s": 1.0, "first_loss": 4.0, "loss": 3.0}]

  monkeypatch.setattr(bench_scaling, "measure", measure)
  common = ["--smoke", "--results-dir", str(tmp_path), "--name", "scaling_test", "--append"]
  bench_scaling.main(common + ["--modes", "sequence", "--devices", "1"])
  rows = bench_scaling.main(common + ["--modes", "sequence", "--devices", "1,2"])
  assert [(r["mode"], r["devices"]) for r in rows] == [("sequence", 1), ("sequence", 2)]
  assert rows[1]["efficiency"] == pytest.approx(0.9)
  saved = json.loads(next(tmp_path.glob("*_scaling-test.json")).read_text())
  assert len(saved["rows"]) == 2


def test_device_loop_decodes_the_same_tokens_and_cache_as_the_host_loop():
  from megalodon_jax.model import MegalodonLM, init_params
  cfg = bench_decode.megalodon_config("tiny", bench_decode.parse_args(["--smoke"]))
  model = MegalodonLM(cfg)
  params = init_params(cfg, jax.random.key(1))
  apply = lambda p, cache, tokens: model.apply({"params": p}, tokens, cache=cache)
  steps = cfg.chunk_size + 3  # crosses a chunk boundary: the loop must carry the cache's count
  fresh = lambda: (bench_decode.megalodon_cache(cfg, 2, 16, 2), jnp.asarray([[3], [7]], jnp.int32))
  state, host_tokens = fresh(), []
  step = bench_decode.greedy_step(apply)
  for _ in range(steps):
    state, host_logits = step(state, params)
    host_tokens.append(np.asarray(state[1]))  # the next call donates state
  (cache, tokens), logits = bench_decode.greedy_loop(apply, steps)(fresh(), params)
  np.testing.assert_array_equal(tokens, host_tokens[-1])
  assert len({int(t[0, 0]) for t in host_tokens}) > 1  # greedy tokens change: the check is not vacuous
  np.testing.assert_allclose(logits, host_logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(state[0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_train_summary_says_how_far_a_missed_target_is():
  missed = {"arch": "megalodon", "size": "200M", "shape": "1x32768", "tokens_per_s": 189_000.0,
            "model_tflops": 300.0}
  met = {"arch": "megalodon", "size": "1.3B", "shape": "8x4096", "tokens_per_s": 50_000.0, "model_tflops": 400.0}
  for row in (missed, met):
    bench_train.add_derived(row, matmul_tflops=680.0)
  assert missed["of_target"] == pytest.approx(189_000 / 252_000) and not missed["target_met"]
  lines = bench_train.summary_lines([missed, met], 680.0)
  assert any("200M 1x32768 >= 252,000 tok/s: NOT met (189,000 tok/s is 75.0% of it; 33.3% short)" in l
             for l in lines), lines
  assert any(l.endswith("1.3B 8x4096 >= 49,000 tok/s: MET") for l in lines), lines
