"""Multi-host runs on localhost: two processes x 4 CPU devices (jax.distributed, gloo collectives).

Fast: the sequence-parallel CEMA and TimestepNorm with the sequence axis ACROSS the two processes
(cross-process all-gather / ppermute and their transposes) against the unsharded ops; per-process
rows assembled into global arrays; loader states gathered from both processes; an Orbax checkpoint
written by both processes and restored by this (one) process on another mesh.

Slow (the acceptance run): the real training loop (training/loop.py) runs the Shakespeare smoke config three times:
  A  one process x 8 devices, mesh (data 2, fsdp 2, sequence 2), 8 steps;
  B  two processes x 4 devices, across-host data 2 x within-host (sequence 2, tensor 2), 8 steps,
     checkpoints at steps 5 and 8 written by both processes;
  C  one process x 8 devices on A's mesh, resuming from B's step-5 checkpoint, steps 6..8.
B's losses equal A's (the same global batches: mesh.loader_shards=2 in every run), and C continues
with the same losses. Only process 0 logs.

This file is also the worker: `python tests/test_multiprocess.py MODE WORKDIR DEVICES JSON_ARGS`.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # LLVM -O0: about half the CPU compile time
STEPS = 8


def _config(overrides: dict):
  from configs import shakespeare_char
  c = shakespeare_char.get_config("smoke")
  c.model.cema_method = "sequential"  # the cheapest CEMA to compile; the sharding is what is tested
  c.data.batch_size = 8
  c.data.eval_batch_size = 256  # a few large evaluation batches
  c.train.steps = STEPS
  c.train.log_every = 1
  c.train.eval_every = 0
  c.checkpoint.every = 5
  c.mesh.loader_shards = 2
  for dotted, value in overrides.items():
    node = c
    *parents, leaf = dotted.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c


def _start_worker(devices: int):
  sys.path.insert(0, ROOT)
  from megalodon_jax.xla_flags import cpu_flags
  os.environ["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *cpu_flags()])
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  try:  # gloo is the default CPU collectives in the jax versions we use; be explicit where it is an option
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):
    pass
  return jax


def _loop_worker(workdir: str, overrides: dict) -> None:
  import jax
  from megalodon_jax.training import loop
  summary = loop.train_and_evaluate(_config(overrides), workdir)
  print(f"WORKER process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices, "
        f"steps {summary['start_step']}..{summary['step']}", flush=True)


# Shapes of the fast check: 4 sequence slices of 16 steps (2 per process), batch over data (2).
B, L, D, N, G = 4, 64, 8, 4, 2


def _inputs():
  """Deterministic inputs, the same in every process."""
  rng = np.random.default_rng(42)
  x = rng.standard_normal((B, L, D)).astype(np.float32)
  alpha = rng.normal(0.0, 0.5, (D, N, 1)).astype(np.float32)
  alpha[:2] = -5.0  # slow channels: the state matters across slices
  theta = rng.normal(0.0, 1.0, (D, 1, 1)).astype(np.float32)
  gamma = rng.normal(0.0, 1.0, (D, N, 2)).astype(np.float32)
  omega = rng.normal(0.0, 0.3, (D,)).astype(np.float32)
  seg = np.ones((B, L), np.int32)
  seg[0, 32:] = 2  # a document boundary on the process boundary
  seg[1, 20:] = 2
  seg[1, 50:] = 0  # padding
  weights = rng.standard_normal((B, L, D)).astype(np.float32)
  return x, (alpha, alpha.copy(), theta, gamma, omega), seg, weights


def _objective(sharded_ops: bool):
  """Value and gradients (x, CEMA parameters, norm weight) of CEMA(TimestepNorm(x)) . weights."""
  import jax
  import jax.numpy as jnp
  from megalodon_jax.ops import cema as cema_ops
  from megalodon_jax.ops import timestep_norm as tsn_ops
  from megalodon_jax.sharding import sequence_parallel as sp
  cema_fn = sp.cema if sharded_ops else cema_ops.cema
  tsn_fn = sp.timestep_norm if sharded_ops else tsn_ops.timestep_norm

  def objective(x, params, norm_weight, seg, weights):
    alpha, delta, theta, gamma, omega = params
    y, _ = tsn_fn(x, norm_weight, norm_weight, num_groups=G, padding_mask=seg == 0, segment_ids=seg,
                  method="associative" if sharded_ops else "sequential")
    y = cema_fn(y, cema_ops.cema_coefficients(alpha, delta, theta, gamma), omega, method="chunked" if sharded_ops
                else "sequential", segment_ids=seg, chunk=4)
    return jnp.sum(y * weights), y

  return jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)


def _reference():
  import jax
  import jax.numpy as jnp
  x, params, seg, weights = _inputs()
  device = jax.local_devices()[0]
  args = jax.device_put((x, params, jnp.zeros((D,), jnp.float32), seg, weights), device)
  fn = jax.jit(_objective(False))
  return jax.device_get(fn.lower(*args).compile(compiler_options=FAST_COMPILE)(*args))


class _CountingIterator:
  """A stand-in data iterator: batches of its shard id, a position as its state."""

  def __init__(self, shard: int, rows: int):
    self.shard, self.rows, self.position = shard, rows, 0

  def __next__(self):
    self.position += 1
    return {"inputs": np.full((self.rows, 16), self.shard * 100 + self.position, np.int32)}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def _ops_worker(workdir: str, args: dict) -> None:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from megalodon_jax import sharding
  from megalodon_jax.config import ConfigError
  from megalodon_jax.sharding import distributed, partitioning
  from megalodon_jax.training import checkpoint

  assert distributed.initialize(args["coordinator"], 2, args["process_id"])
  me = jax.process_index()
  # The sequence axis: 2 slices inside each process x 2 processes; the batch over data inside.
  mesh = sharding.create_mesh({"data": 2, "sequence": 2, "dcn_sequence": 2})
  assert {d.process_index for d in mesh.devices[:, :, :2].flat} == {0}
  x, params, seg, weights = _inputs()
  (value_ref, y_ref), grads_ref = _reference()
  replicated = NamedSharding(mesh, P())
  put = lambda a, sh: jax.make_array_from_callback(a.shape, sh, lambda index: a[index])
  for combine in ("all_gather", "doubling"):
    par = sharding.Parallelism(mesh, sharding.DEFAULT_RULES, combine)
    rows = par.sharding((B, L), ("batch", "length"))
    features = par.sharding((B, L, D), ("batch", "length", None))
    x_g, seg_g, weights_g = put(x, features), put(seg, rows), put(weights, features)
    params_g = jax.tree.map(lambda a: put(a, replicated), params)
    norm_g = put(np.zeros((D,), np.float32), replicated)
    fn = partitioning.jit_sharded(_objective(True), par, out_shardings=replicated)
    args = (x_g, params_g, norm_g, seg_g, weights_g)
    (value, y), grads = fn.lower(*args).compile(compiler_options=FAST_COMPILE)(*args)
    np.testing.assert_allclose(float(value), float(value_ref), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(jax.device_get((y, grads))), jax.tree.leaves((y_ref, grads_ref))):
      assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), combine
  with pytest.raises(ConfigError, match="part of each sequence"):
    distributed.process_rows(rows, (B, L))  # per-host loading needs whole sequences per host

  # Per-process rows: rows of an [8, 16] batch split over the sequence axis (across processes).
  batch_sh = NamedSharding(mesh, P("sequence", None))
  start, stop = distributed.process_rows(batch_sh, (8, 16))
  assert (start, stop) == (4 * me, 4 * me + 4)
  loader = distributed.ShardedLoader(lambda k, shards: _CountingIterator(k, 8 // shards), global_rows=8,
                                     rows=(start, stop), loader_shards=4)
  for _ in range(me + 1):
    local = next(loader)
  batch = distributed.global_batch(local, {"inputs": batch_sh}, 8)
  total = jax.jit(lambda b: jnp.sum(b["inputs"]), out_shardings=replicated)(batch)
  expected = 16 * 2 * sum(100 * k + 1 for k in (0, 1)) + 16 * 2 * sum(100 * k + 2 for k in (2, 3))
  assert int(total) == expected, (int(total), expected)
  data_state = loader.get_state()
  assert data_state == {"loader_shards": 4, "loaders": {"0": {"position": 1}, "1": {"position": 1},
                                                         "2": {"position": 2}, "3": {"position": 2}}}

  saver = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=True)
  saver.save(3, {"y": y, "grads": grads, "x": x_g}, data_state, wait=True)
  saver.close()
  print(f"OPS WORKER {me} OK", flush=True)


def _worker(mode: str, workdir: str, devices: str, args: str) -> None:
  _start_worker(int(devices))
  if mode == "loop":
    _loop_worker(workdir, json.loads(args))
  else:
    _ops_worker(workdir, json.loads(args))


# ---------------------------------------------------------------------------------------------
# The test (the launcher).
# ---------------------------------------------------------------------------------------------

def _launch(workdir, devices: int, overrides: dict, process_count: int = 1, mode: str = "loop") -> list[str]:
  """Runs the worker in `process_count` processes; returns their outputs; fails on error/timeout."""
  import portpicker
  port = portpicker.pick_unused_port()
  procs = []
  try:
    for i in range(process_count):
      if mode == "ops":
        extra = {"coordinator": f"localhost:{port}", "process_id": i}
      else:
        extra = {} if process_count == 1 else {"mesh.coordinator_address": f"localhost:{port}",
                                               "mesh.num_processes": process_count, "mesh.process_id": i}
      procs.append(subprocess.Popen(
          [sys.executable, __file__, mode, str(workdir), str(devices), json.dumps({**overrides, **extra})],
          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + TIMEOUT_S
    outputs = []
    for p in procs:
      out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      outputs.append(out)
    for i, (p, out) in enumerate(zip(procs, outputs)):
      assert p.returncode == 0, f"process {i} failed (exit {p.returncode}):\n{out[-6000:]}"
    return outputs
  finally:
    for p in procs:  # on any failure or timeout: no orphans
      if p.poll() is None:
        p.kill()
        p.wait()


def _train_losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from megalodon_jax import data
  path = tmp_path_factory.mktemp("tfds")
  data.prepare_shakespeare(path)  # built once here, not raced by the workers
  return str(path)


def test_sequence_parallel_across_processes_and_checkpoint_restore(tmp_path):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from megalodon_jax import sharding
  from megalodon_jax.training import checkpoint

  outputs = _launch(tmp_path, 4, {}, process_count=2, mode="ops")
  assert "OPS WORKER 0 OK" in outputs[0] and "OPS WORKER 1 OK" in outputs[1]

  # The two processes' checkpoint, restored here (one process, 8 devices) on another mesh.
  mesh = sharding.create_mesh({"data": 2, "fsdp": 4})
  (value_ref, y_ref), grads_ref = _reference()
  x, *_ = _inputs()
  shapes = {"y": y_ref, "grads": grads_ref, "x": x}
  shard = NamedSharding(mesh, P("fsdp"))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard if a.shape[0] % 4 == 0
                                                         else NamedSharding(mesh, P())), shapes)
  reader = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"), async_save=False)
  step, state, data_state = reader.restore_latest(abstract)
  reader.close()
  assert step == 3 and data_state["loaders"]["3"] == {"position": 2}
  assert state["y"].sharding.is_equivalent_to(shard, 3)
  np.testing.assert_array_equal(jax.device_get(state["x"]), x)
  for got, want in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(shapes)):
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


@pytest.mark.slow
def test_two_hosts_train_like_one_and_checkpoints_move_between_topologies(tmp_path, data_dir):
  one_host_mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.sequence": 2, "mesh.tensor": 1}
  two_host_mesh = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.sequence": 2, "mesh.tensor": 2, "mesh.dcn_data": 2}
  common = {"data.data_dir": data_dir}

  run_a, run_b, run_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
  _launch(run_a, 8, {**common, **one_host_mesh})
  outputs = _launch(run_b, 4, {**common, **two_host_mesh}, process_count=2)
  assert "WORKER process 0 of 2, 8 devices, steps 0..8" in outputs[0]
  assert "WORKER process 1 of 2, 8 devices, steps 0..8" in outputs[1]
  assert "validation" in outputs[0] and "validation" not in outputs[1]  # process 0 logs, alone

  losses_a, losses_b = _train_losses(run_a), _train_losses(run_b)
  assert sorted(losses_b) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert losses_b[step] == pytest.approx(losses_a[step], rel=1e-5), step
  assert len(set(round(v, 4) for v in losses_a.values())) == STEPS  # the batches do differ

  # Resume B's step-5 checkpoint in one process on another mesh; it must continue exactly like A.
  shutil.copytree(run_b / "checkpoints", run_c / "checkpoints")
  shutil.rmtree(run_c / "checkpoints" / str(STEPS))
  output = _launch(run_c, 8, {**common, **one_host_mesh})[0]
  assert "resumed from step 5" in output
  losses_c = _train_losses(run_c)
  assert sorted(losses_c) == [6, 7, 8]
  for step in (6, 7, 8):
    assert losses_c[step] == pytest.approx(losses_a[step], rel=1e-5), step


if __name__ == "__main__":
  _worker(*sys.argv[1:])
