"""Benchmark plumbing: timing statistics, results files, memory queries, the shared train step and
the measured ceilings."""

from __future__ import annotations

import datetime
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.baselines import llama as L
from experiments.benchmarks import floors, harness


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def check_ordered_stats(stats, iters):
  times = stats["times_ms"]
  assert len(times) == iters and all(t > 0 for t in times)
  assert stats["min_ms"] <= stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["max_ms"]
  assert stats["min_ms"] == min(times) and stats["max_ms"] == max(times)
  assert stats["median_ms"] == pytest.approx(sorted(times)[iters // 2] if iters % 2 else
                                             (sorted(times)[iters // 2 - 1] + sorted(times)[iters // 2]) / 2)


def test_time_fn_returns_ordered_stats_and_calls_as_asked():
  add = jax.jit(lambda x: x + 1.0)
  calls = []

  def fn(x):
    calls.append(1)
    return add(x)

  stats = harness.time_fn(fn, jnp.ones((64,)), warmup=2, iters=5, inner=3)
  check_ordered_stats(stats, iters=5)
  assert len(calls) == 2 + 5 * 3
  assert (stats["warmup"], stats["iters"], stats["inner"]) == (2, 5, 3)


class Pending:
  """Stands in for an asynchronously dispatched result: ready only `delay` seconds after the call
  returned, and only for whoever waits for it (jax.block_until_ready calls this method)."""

  def __init__(self, delay: float):
    self.delay = delay

  def block_until_ready(self):
    time.sleep(self.delay)
    return self


def test_time_fn_waits_for_asynchronous_results():
  stats = harness.time_fn(lambda: Pending(0.03), warmup=1, iters=3)
  check_ordered_stats(stats, iters=3)
  assert 30.0 <= stats["median_ms"] < 1000.0
  fast = harness.time_fn(jax.jit(lambda x: x + 1), jnp.ones((4,)), warmup=1, iters=3)
  assert fast["median_ms"] < 20.0


def test_time_stateful_waits_for_asynchronous_results():
  stats, state = harness.time_stateful(lambda s: (s + 1, Pending(0.03)), 0, warmup=1, iters=3)
  assert state == 4
  assert 30.0 <= stats["median_ms"] < 1000.0


def test_time_stateful_threads_a_donated_state():
  step = jax.jit(lambda state, x: (state + x, jnp.sum(state)), donate_argnums=(0,))
  stats, state = harness.time_stateful(step, jnp.zeros((8,)), jnp.full((8,), 2.0), warmup=2, iters=3)
  check_ordered_stats(stats, iters=3)
  np.testing.assert_array_equal(np.asarray(state), np.full((8,), 2.0 * 5))


def test_bad_counts_are_rejected():
  with pytest.raises(ValueError, match="iters >= 1"):
    harness.time_fn(lambda: None, iters=0)


def test_throughput_helpers():
  assert harness.tokens_per_second(4096, 2.0) == pytest.approx(2_048_000)
  # 1e9 FLOPs/token at 5e5 tokens/s is 5e14 FLOP/s: half of a 1000 TFLOP/s peak.
  assert harness.mfu(1e9, 5e5, 1000.0) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Device memory
# ---------------------------------------------------------------------------------------------

class FakeDevice:
  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    if isinstance(self._stats, Exception):
      raise self._stats
    return self._stats


def test_memory_queries_read_allocator_stats_or_return_none():
  device = FakeDevice({"peak_bytes_in_use": 7 << 20, "bytes_in_use": 3 << 20})
  assert harness.peak_memory_bytes(device) == 7 << 20
  assert harness.memory_in_use_bytes(device) == 3 << 20
  assert harness.peak_memory_bytes(FakeDevice(None)) is None
  assert harness.peak_memory_bytes(FakeDevice({})) is None
  assert harness.memory_in_use_bytes(FakeDevice(RuntimeError("no stats on this backend"))) is None


# ---------------------------------------------------------------------------------------------
# Results files
# ---------------------------------------------------------------------------------------------

def reject_constant(name):
  raise ValueError(f"non-standard JSON constant {name}")


def test_write_results_writes_valid_json_with_metadata(tmp_path, capsys):
  rows = [
      {"model": "llama", "seq_len": np.int64(2048), "median_ms": np.float32(12.5), "ratio": float("nan")},
      {"model": "megalodon", "seq_len": 4096, "median_ms": jnp.asarray(3.25), "times_ms": [1.0, 2.0]},
  ]
  path = harness.write_results("Train step 200M", rows, {"batch": 4, "dtype": "bfloat16"},
                               results_dir=tmp_path)
  today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
  assert path.parent == tmp_path
  assert path.name == f"{today}_{harness.device_kind()}_train-step-200m.json"
  data = json.loads(path.read_text(), parse_constant=reject_constant)
  meta = data["metadata"]
  assert data["name"] == "Train step 200M"
  assert meta["date"].startswith(today)
  assert meta["jax_version"] == jax.__version__
  assert meta["backend"] == jax.default_backend()
  assert meta["device_kind"] == jax.devices()[0].device_kind
  assert re.fullmatch(r"[0-9a-f]{40}", meta["git_commit"])  # the tests run inside a git checkout
  assert meta["batch"] == 4 and meta["dtype"] == "bfloat16"
  assert data["rows"] == [
      {"model": "llama", "seq_len": 2048, "median_ms": 12.5, "ratio": None},
      {"model": "megalodon", "seq_len": 4096, "median_ms": 3.25, "times_ms": [1.0, 2.0]},
  ]
  printed = capsys.readouterr().out
  assert "megalodon" in printed and str(path) in printed


def test_write_results_refuses_to_overwrite_run_metadata(tmp_path):
  with pytest.raises(ValueError, match="jax_version"):
    harness.write_results("x", [{"a": 1}], {"jax_version": "mine"}, results_dir=tmp_path, print_table=False)
  with pytest.raises(ValueError, match="no letters or digits"):
    harness.write_results("//", [{"a": 1}], results_dir=tmp_path, print_table=False)
  assert not list(tmp_path.iterdir())


def test_format_table_aligns_columns():
  rows = [{"name": "a", "ms": 1.5}, {"name": "longer name", "ms": 1234.5678, "note": "x"}]
  lines = harness.format_table(rows).splitlines()
  assert lines[0].split() == ["name", "ms", "note"]
  assert len(lines) == 4
  # Each column starts at the same offset on every line; numbers are right-aligned.
  name_width = len("longer name")
  assert all(line[name_width:name_width + 2] == "  " for line in lines)
  ms_ends = {lines[0].index("ms") + 2, lines[2].index("1.5") + 3, lines[3].index("1234.6") + 6}
  assert len(ms_ends) == 1


# ---------------------------------------------------------------------------------------------
# Train step
# ---------------------------------------------------------------------------------------------

def bigram_apply(params, inputs, bias=None):
  """A bigram LM: logits[b, t] = W[inputs[b, t]] (+ bias)."""
  logits = params["w"][inputs]
  return logits if bias is None else logits + bias


def numpy_bigram_step(w, inputs, targets, weights, bias, lr):
  """float64 loss and SGD update of the bigram model, with the closed-form softmax gradient."""
  logits = w[inputs] + bias
  logits = logits - logits.max(-1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  nll = -np.log(np.take_along_axis(probs, targets[..., None], -1)[..., 0])
  loss = (nll * weights).sum() / weights.sum()
  dlogits = probs.copy()
  np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], -1) - 1, -1)
  dlogits *= (weights / weights.sum())[..., None]
  grad = np.zeros_like(w)
  np.add.at(grad, inputs.reshape(-1), dlogits.reshape(-1, w.shape[1]))
  return loss, w - lr * grad, np.linalg.norm(grad)


@pytest.mark.parametrize("with_weights", [False, True])
def test_train_step_matches_closed_form_sgd(with_weights, rng):
  vocab, lr = 11, 0.5
  w = rng.standard_normal((vocab, vocab))
  inputs = rng.integers(0, vocab, (3, 6))
  targets = rng.integers(0, vocab, (3, 6))
  bias = rng.standard_normal(vocab)
  weights = (rng.random((3, 6)) < 0.7).astype(np.float64) if with_weights else np.ones((3, 6))
  batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets), "bias": jnp.asarray(bias, jnp.float32)}
  if with_weights:
    batch["weights"] = jnp.asarray(weights, jnp.float32)
  step = harness.make_train_step(bigram_apply, optax.sgd(lr))
  params = {"w": jnp.asarray(w, jnp.float32)}
  new_params, _, metrics = step(params, optax.sgd(lr).init(params), batch)
  loss, new_w, grad_norm = numpy_bigram_step(w, inputs, targets, weights, bias, lr)
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norm, rtol=1e-5)
  assert float(metrics["tokens"]) == weights.sum()
  np.testing.assert_allclose(np.asarray(new_params["w"]), new_w, rtol=1e-5, atol=1e-6)


def test_train_step_names_missing_batch_keys():
  step = harness.make_train_step(bigram_apply, optax.sgd(0.1), donate=False)
  params = {"w": jnp.zeros((4, 4))}
  with pytest.raises(KeyError, match="targets"):
    step(params, optax.sgd(0.1).init(params), {"inputs": jnp.zeros((1, 2), jnp.int32)})


def test_adamw_decays_matrices_only():
  params = {"w": jnp.full((2, 3), 2.0), "scale": jnp.full((3,), 2.0)}
  opt = harness.adamw(0.1, weight_decay=0.5)

  @jax.jit
  def one_step(params):
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    return optax.apply_updates(params, updates)

  new = one_step(params)
  np.testing.assert_allclose(np.asarray(new["w"]), 2.0 * (1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new["scale"]), 2.0)


def test_train_step_fits_a_batch_with_the_llama_baseline(rng):
  cfg = L.preset("tiny", num_layers=1)
  model = L.Llama(cfg)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  # Initialisation under jit: eagerly it would compile every primitive separately.
  params = jax.jit(model.init)(jax.random.key(0), batch["inputs"])["params"]
  opt = harness.adamw(3e-2, weight_decay=0.0)
  step = harness.make_train_step(lambda p, x: model.apply({"params": p}, x), opt)
  losses = []

  def stateful(state, batch):
    params, opt_state, metrics = step(*state, batch)
    losses.append(metrics["loss"])
    return (params, opt_state), metrics

  stats, _ = harness.time_stateful(stateful, (params, jax.jit(opt.init)(params)), batch, warmup=2, iters=28)
  check_ordered_stats(stats, iters=28)
  losses = np.asarray(losses)
  # Small init: the first loss is close to uniform guessing; 30 steps on one batch memorise it.
  assert abs(losses[0] - np.log(cfg.vocab_size)) < 0.05
  assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------

def test_copy_bandwidth_counts_read_and_write():
  result = floors.measure_copy_bandwidth(1 << 20, warmup=1, iters=3, inner=2)
  assert result["bytes_moved"] == 2 << 20
  assert result["gb_per_s"] == pytest.approx(result["bytes_moved"] / (result["median_ms"] * 1e-3) / 1e9)
  with pytest.raises(ValueError, match="smaller than one"):
    floors.measure_copy_bandwidth(2)


def test_read_and_write_bandwidth_count_one_direction():
  read = floors.measure_read_bandwidth(1 << 20, warmup=1, iters=3, inner=2)
  write = floors.measure_write_bandwidth(1 << 20, warmup=1, iters=3, inner=2)
  for result in (read, write):
    assert result["bytes_moved"] == 1 << 20
    assert result["gb_per_s"] == pytest.approx(result["bytes_moved"] / (result["median_ms"] * 1e-3) / 1e9)
  with pytest.raises(ValueError, match="smaller than one"):
    floors.measure_write_bandwidth(2)


def test_matmul_peak_counts_two_n_cubed():
  result = floors.measure_matmul_peak(64, warmup=1, iters=3, inner=2)
  assert result["flops"] == 2 * 64**3
  assert result["tflops"] == pytest.approx(result["flops"] / (result["median_ms"] * 1e-3) / 1e12)


def test_floors_script_writes_every_ceiling(tmp_path):
  floors.main(["--small", "--iters", "2", "--results-dir", str(tmp_path)])
  (path,) = tmp_path.glob("*_floors.json")
  data = json.loads(path.read_text(), parse_constant=reject_constant)
  by_name = {row["ceiling"]: row for row in data["rows"]}
  assert set(by_name) == {"copy_bandwidth", "read_bandwidth", "write_bandwidth", "matmul_peak"}
  assert all(row["value"] > 0 for row in by_name.values())
  assert data["metadata"]["matmul_n"] == 512


def test_git_commit_prefers_the_environment(monkeypatch):
  monkeypatch.setenv("GIT_COMMIT", "abc1234")
  assert harness.git_commit() == {"git_commit": "abc1234", "git_dirty": None}
  monkeypatch.delenv("GIT_COMMIT")
  assert re.fullmatch(r"[0-9a-f]{40}", harness.git_commit()["git_commit"])


def test_kernel_totals_by_name_count_and_sum_in_first_launch_order():
  """The GPU trace tools' per-name totals (launches, microseconds), against a direct count."""
  from experiments.gpu_checks import profile_train_step as trace_tools
  rng = np.random.default_rng(0)
  names = [str(n) for n in rng.choice(["gemv", "attend_step", "combine", "tsn"], size=60)]
  kernels = [{"name": n, "ts": float(t), "dur": float(d)}
             for n, t, d in zip(names, rng.permutation(60) * 10.0, rng.uniform(1.0, 5.0, size=60))]
  got = trace_tools.totals_by_name(kernels)
  first_seen = []
  for k in sorted(kernels, key=lambda k: k["ts"]):
    if k["name"] not in first_seen:
      first_seen.append(k["name"])
  assert list(got) == first_seen
  for name in first_seen:
    mine = [k["dur"] for k in kernels if k["name"] == name]
    assert got[name][0] == len(mine) and got[name][1] == pytest.approx(sum(mine))


def test_step_kernels_split_a_two_gpu_trace_by_device_and_category(tmp_path):
  """check_sequence_parallel.step_kernels on a synthetic two-GPU perfetto trace: per device, busy
  time per step and per category (NCCL kernels as collectives, not fusions), host events ignored."""
  import gzip
  import json
  from experiments.gpu_checks import check_sequence_parallel as csp
  events = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": n}}
            for p, n in ((1, "/device:GPU:0"), (2, "/device:GPU:1"), (3, "/host:CPU"))]
  events += [{"ph": "M", "name": "thread_name", "pid": p, "tid": 7, "args": {"name": "Stream #14(compute)"}}
             for p in (1, 2, 3)]
  durations = {1: {"ncclDevKernel_AllReduce_Sum_f32_RING_LL": [30.0, 50.0], "cema_scan_fwd": [100.0],
                   "loop_add_fusion": [20.0]},
               2: {"ncclDevKernel_AllGather_RING_LL": [40.0], "cema_scan_fwd": [120.0]},
               3: {"host_work": [999.0]}}
  ts = 0.0
  for pid, by_name in durations.items():
    for name, durs in by_name.items():
      for dur in durs:
        events.append({"ph": "X", "pid": pid, "tid": 7, "name": name, "ts": ts, "dur": dur})
        ts += dur
  (tmp_path / "plugins").mkdir()
  with gzip.open(tmp_path / "plugins" / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  got = csp.step_kernels(str(tmp_path), steps=2)
  assert set(got) == {"/device:GPU:0", "/device:GPU:1"}
  gpu0, gpu1 = got["/device:GPU:0"], got["/device:GPU:1"]
  assert gpu0["busy_ms"] == pytest.approx(200.0 / 2 / 1e3) and gpu1["busy_ms"] == pytest.approx(160.0 / 2 / 1e3)
  assert gpu0["by_category_ms"] == pytest.approx({"collective": 0.04, "cema": 0.05, "fusion": 0.01})
  assert gpu1["by_category_ms"] == pytest.approx({"collective": 0.02, "cema": 0.06})
  assert "collective 0.04" in csp.step_kernels_lines(got)


def test_kernel_time_by_source_line_from_a_compiled_module():
  """profile_train_step.hlo_sources on a real compiled module (this jaxlib's metadata format):
  forward and backward instructions map to this file's lines; by_source groups a synthetic trace
  of those instructions by line and source_excess subtracts the even share."""
  import inspect

  import jax
  import jax.numpy as jnp
  from experiments.gpu_checks import profile_train_step as pts

  def f(x, w):
    y = jnp.tanh(x @ w)
    return jnp.sum(y * y)

  line = inspect.getsourcelines(f)[1]
  text = jax.jit(jax.grad(f, argnums=(0, 1))).lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile().as_text()
  sources = pts.hlo_sources(text)
  here = f"test_bench_harness.py:{line + 1}"  # the tanh(x @ w) line
  ours = {name: key for name, key in sources.items() if here in key}
  assert any(key.startswith("fwd ") for key in ours.values()), sources
  assert any(key.startswith("bwd ") for key in ours.values()), sources
  fwd_op = next(n for n, k in ours.items() if k.startswith("fwd "))
  bwd_op = next(n for n, k in ours.items() if k.startswith("bwd "))
  kernels = [{"name": "k1", "dur": 30.0, "args": {"hlo_op": fwd_op}},
             {"name": "k2", "dur": 50.0, "args": {"hlo_op": fwd_op}},
             {"name": bwd_op.replace(".", "_") if "." in bwd_op else bwd_op, "dur": 20.0, "args": {}},
             {"name": "ncclDevKernel_AllReduce", "dur": 10.0, "args": {}}]
  rows = {r["source"]: r for r in pts.by_source(kernels, sources, steps=2, top=10)}
  assert rows[sources[fwd_op]]["ms"] == pytest.approx(80.0 / 2 / 1e3)
  assert rows[sources[fwd_op]]["calls"] == 1.0
  assert rows[sources[bwd_op]]["ms"] == pytest.approx(20.0 / 2 / 1e3)
  assert rows["(no metadata) collective"]["ms"] == pytest.approx(10.0 / 2 / 1e3)
  single = [{"source": "a", "ms": 4.0}, {"source": "b", "ms": 2.0}]
  parallel = [{"source": "a", "ms": 2.5}, {"source": "c", "ms": 1.0}]
  excess = pts.source_excess(single, parallel, devices=2, top=5)
  assert [(r["source"], r["excess_ms"]) for r in excess] == [("c", 1.0), ("a", 0.5), ("b", -1.0)]


def test_exclusive_file_lock_excludes_other_holders(tmp_path):
  """While one holder is inside the block, a second open of the file cannot take the lock; after
  the block it can. None takes no lock and creates no file."""
  import fcntl

  path = tmp_path / "timing.lock"
  with harness.exclusive_file_lock(str(path)):
    with open(path, "a") as other:
      with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
  with open(path, "a") as other:
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    fcntl.flock(other, fcntl.LOCK_UN)
  with harness.exclusive_file_lock(None):
    pass
  assert sorted(p.name for p in tmp_path.iterdir()) == ["timing.lock"]
