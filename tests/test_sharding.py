"""Mesh construction, logical-axis rules, parameter/optimiser shardings, and the acceptance check:
the loss and gradients of a small model on 8 simulated devices, for several meshes
(data, fsdp, sequence, tensor), equal the single-device values (float32, relative error < 1e-5),
with packed sequences (segment ids, padding) and several attention chunks per sequence slice.

On real devices (MEGALODON_TEST_PLATFORM=gpu, see conftest.py) the mesh sweep adapts to the device
count: 8 devices run the CPU sweep; any other count n >= 2 puts all n devices on each axis in turn.
Tests written for exactly 8 devices skip elsewhere, saying so.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from megalodon_jax import config as config_lib
from megalodon_jax import model as model_lib
from megalodon_jax import sharding
from megalodon_jax.config import ConfigError
from megalodon_jax.sharding import partitioning
from megalodon_jax.training import train_step as step_lib

TOL = 1e-5
DEVICES = jax.device_count()
ON_CPU = jax.default_backend() == "cpu"

needs_8_devices = pytest.mark.skipif(DEVICES != 8, reason=f"written for exactly 8 devices; this host has {DEVICES} "
                                     "(the CPU run simulates 8)")


def assert_close(got, want, tol=TOL, what=""):
  got, want = np.asarray(got), np.asarray(want)
  error, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
  assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol} x max |reference| {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# The mesh.
# ---------------------------------------------------------------------------------------------

@needs_8_devices
@pytest.mark.parametrize("sizes,expected", [
    ({}, (8, 1, 1, 1)),
    ({"data": 2, "fsdp": 2, "sequence": 2}, (2, 2, 2, 1)),
    ({"data": 1, "sequence": -1}, (1, 1, 8, 1)),
    ({"data": -1, "sequence": 2, "tensor": 2}, (2, 1, 2, 2)),
    ({"data": 1, "fsdp": -1, "tensor": 4}, (1, 2, 1, 4)),
])
def test_mesh_sizes(sizes, expected):
  mesh = sharding.create_mesh(sizes)
  assert mesh.axis_names == sharding.MESH_AXES
  assert tuple(mesh.shape.values()) == expected
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize("sizes,message", [
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 3}, "multiply to 3"),
    ({"data": -1, "tensor": 3}, "multiple of 3"),
    ({"data": 0}, "positive integers or -1"),
    ({"dcn_data": 2}, "across-slice"),  # one process: one slice
])
def test_mesh_errors(sizes, message):
  with pytest.raises(ConfigError, match=message):
    sharding.create_mesh(sizes)


def test_hybrid_mesh_keeps_within_slice_axes_inside_a_host():
  """dcn_data=2 over two hosts of 4 devices: the within-host axes never cross hosts."""
  devices = [types.SimpleNamespace(id=i, process_index=i // 4, platform="cpu", device_kind="cpu")
             for i in range(8)]
  config = {"data": 1, "sequence": 2, "tensor": -1, "dcn_data": -1}
  assert sharding.mesh_shape(config, devices).as_dict() == {"data": 2, "fsdp": 1, "sequence": 2, "tensor": 2}
  grid = sharding.device_grid(config, devices)
  assert grid.shape == (2, 1, 2, 2)
  for host in range(2):
    assert {d.process_index for d in grid[host].flat} == {host}


# ---------------------------------------------------------------------------------------------
# Rules and shardings.
# ---------------------------------------------------------------------------------------------

def test_rules_round_trip_and_errors():
  assert sharding.rules_from_config(sharding.rules_to_config()) == sharding.DEFAULT_RULES
  rules = dict(sharding.rules_from_config({"embed": "fsdp,tensor", "vocab": ""}))
  assert rules["embed"] == ("fsdp", "tensor") and rules["vocab"] is None and rules["batch"] == ("data", "fsdp")
  with pytest.raises(ConfigError, match="unknown logical axis"):
    sharding.rules_from_config({"hidden": "tensor"})
  with pytest.raises(ConfigError, match="not a mesh axis"):
    sharding.rules_from_config({"embed": "model"})


@needs_8_devices
def test_logical_spec_drops_axes_that_do_not_divide():
  mesh = sharding.create_mesh({"data": 2, "fsdp": 4})
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_spec((16, 32), ("batch", "length"), mesh, rules) == P(("data", "fsdp"), None)
  assert sharding.logical_spec((4, 32), ("batch", "length"), mesh, rules) == P("data", None)
  assert sharding.logical_spec((3, 32), ("batch", "length"), mesh, rules) == P(None, None)
  mesh = sharding.create_mesh({"data": 1, "tensor": 8})
  assert sharding.logical_spec((128, 260), ("embed", "vocab"), mesh, rules) == P(None, None)  # 260 % 8
  assert sharding.logical_spec((128, 256), ("embed", "vocab"), mesh, rules) == P(None, "tensor")


def test_every_parameter_has_logical_axes():
  for scan in (False, True):
    cfg = config_lib.preset("tiny_swiglu", scan_layers=scan)
    axes = model_lib.param_logical_axes(cfg)
    shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, P))
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    assert len(flat_axes) == len(leaves)
    for names, (path, shape) in zip(flat_axes, leaves):
      assert len(names) == len(shape.shape), (path, names, shape.shape)
      assert all(n is None or n in sharding.LOGICAL_AXES for n in names), (path, names)
      assert any(n is not None for n in names), (path, names)  # every parameter can be sharded somehow
      stacked = scan and jax.tree_util.keystr(path[:1]) == "['layers']"
      assert (names[0] == "layers") == stacked, (path, names)


@needs_8_devices
def test_parameters_and_adam_moments_are_sharded_fsdp_and_tensor():
  cfg = config_lib.preset("tiny")
  par = sharding.Parallelism(sharding.create_mesh({"data": 1, "fsdp": 2, "tensor": 4}))
  params_sh = partitioning.param_shardings(cfg, par)
  mega = params_sh["layers_0"]["mega"]
  assert mega["wz"]["kernel"].spec == P("fsdp", "tensor")          # D over fsdp, Z over tensor
  assert mega["wv"]["kernel"].spec == P("fsdp", "tensor")          # V over tensor
  assert mega["wh2"]["kernel"].spec == P("tensor", "fsdp")
  assert mega["wh1"]["kernel"].spec == P("tensor", "fsdp")
  assert mega["cema"]["alpha"].spec == P("fsdp", None, None)
  assert params_sh["layers_0"]["nffn"]["fc1"]["kernel"].spec == P("fsdp", "tensor")  # F over tensor
  assert params_sh["embed"]["embedding"].spec == P("tensor", "fsdp")  # vocab over tensor

  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, mask=lambda p: jax.tree.map(
      lambda x: x.ndim > 1, p)))
  abstract = jax.eval_shape(lambda r: step_lib.init_train_state(model_lib.init_params(cfg, r), optimizer, r),
                            jax.random.key(0))
  state_sh = partitioning.train_state_shardings(abstract, params_sh, par)
  adam = state_sh.opt_state[1][0]
  for moments in (adam.mu, adam.nu):
    assert moments["layers_0"]["mega"]["wz"]["kernel"].spec == P("fsdp", "tensor")
  assert adam.count.spec == P() and state_sh.step.spec == P() and state_sh.rng.spec == P()


# ---------------------------------------------------------------------------------------------
# Loss and gradients on many meshes equal the single-device values.
# ---------------------------------------------------------------------------------------------

B, L = 8, 128  # 16 steps (2 chunks of 8) per slice on sequence=8


def packed_batch(rng, vocab):
  """Rows of L + 1 segment ids: documents that end at slice boundaries (multiples of 16) and
  inside slices, an id reused by a later run, one row of a single document, trailing padding."""
  seg = np.ones((B, L + 1), np.int32)
  seg[0, 16:] = 2
  seg[0, 64:] = 1
  seg[1, 5:] = 2
  seg[1, 40:] = 3
  seg[1, 120:] = 0
  for row in range(2, B - 1):
    cuts = np.sort(rng.choice(np.arange(1, L), size=3, replace=False))
    for i, cut in enumerate(cuts):
      seg[row, cut:] = i + 2
  tokens = rng.integers(1, vocab, (B, L + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg[:, :-1],
          "loss_mask": ((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)).astype(np.float32)}


def mean_loss(cfg):
  def loss(params, batch):
    logits = model_lib.MegalodonLM(cfg).apply({"params": params}, batch["inputs"], batch["segment_ids"])
    nll, count = step_lib.cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return nll / count
  return loss


# Compile at LLVM -O0 on the CPU: these checks are about values, and it halves the compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0} if ON_CPU else {}

CONFIGS = {
    # One layer, sequential CEMA: the cheapest model to compile, for the mesh sweep.
    "small": config_lib.preset("tiny", num_layers=1, cema_method="sequential"),
    # Two scanned layers ('layers' axis).
    "scanned": config_lib.preset("tiny", scan_layers=True, cema_method="sequential"),
    # The default CEMA path on CPU ('auto' = chunked); tests/test_sequence_parallel.py covers it fast.
    "default": config_lib.preset("tiny"),
}


def compiled(fn, *args):
  return fn.lower(*args).compile(compiler_options=FAST_COMPILE)


class References(dict):
  """Parameters, batch and single-device (no mesh) loss and gradients per config, made on first use."""

  def __missing__(self, name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(1234)
    params = model_lib.init_params(cfg, jax.random.key(7))
    batch = packed_batch(rng, cfg.vocab_size)
    fn = jax.jit(jax.value_and_grad(mean_loss(cfg)))
    loss, grads = compiled(fn, params, batch)(params, batch)
    self[name] = (params, batch, float(loss), jax.device_get(grads))
    return self[name]


@pytest.fixture(scope="module")
def references():
  return References()


# The sweep on 8 devices (the simulated CPU run): mixed meshes, both combine schedules.
EIGHT_DEVICE_CASES = [
    ("small", (8, 1, 1, 1), "all_gather"),
    ("small", (2, 2, 2, 1), "all_gather"),
    ("small", (1, 1, 8, 1), "all_gather"),
    ("small", (2, 1, 2, 2), "all_gather"),
    ("scanned", (1, 1, 4, 2), "doubling"),
    pytest.param("scanned", (1, 2, 1, 4), "all_gather", marks=pytest.mark.slow),
    pytest.param("scanned", (2, 2, 2, 1), "doubling", marks=pytest.mark.slow),
    pytest.param("small", (1, 8, 1, 1), "all_gather", marks=pytest.mark.slow),
    pytest.param("default", (2, 1, 2, 2), "all_gather", marks=pytest.mark.slow),
]


def one_axis(axis: str, size: int) -> tuple[int, ...]:
  """Mesh sizes with `size` devices on `axis` and 1 elsewhere."""
  return tuple(size if a == axis else 1 for a in sharding.MESH_AXES)


def mesh_cases(count: int) -> list:
  """8 devices: EIGHT_DEVICE_CASES. n >= 2 other devices (real GPUs): every axis alone over all n,
  the scanned model with the 'doubling' combine, and the default config (on a GPU: the Pallas
  kernels inside shard_map) with the sequence split."""
  if count == 8:
    return EIGHT_DEVICE_CASES
  if count < 2:
    return [pytest.param("small", (1, 1, 1, 1), "all_gather",
                         marks=pytest.mark.skip(reason=f"needs at least 2 devices, found {count}"))]
  cases = [("small", one_axis(axis, count), "all_gather") for axis in sharding.MESH_AXES]
  cases.append(("scanned", one_axis("sequence", count), "doubling"))
  cases.append(("default", one_axis("sequence", count), "all_gather"))
  return cases


@pytest.mark.parametrize("name,sizes,combine", mesh_cases(DEVICES))
def test_loss_and_gradients_match_single_device(references, name, sizes, combine):
  cfg = CONFIGS[name]
  params, batch, loss_ref, grads_ref = references[name]
  mesh = sharding.create_mesh(dict(zip(sharding.MESH_AXES, sizes)), jax.devices()[:math.prod(sizes)])
  par = sharding.Parallelism(mesh, sharding.DEFAULT_RULES, combine)
  params_sh = partitioning.param_shardings(cfg, par)
  batch_sh = par.sharding((B, L), ("batch", "length"))
  step = partitioning.jit_sharded(jax.value_and_grad(mean_loss(cfg)), par, in_shardings=(params_sh, batch_sh),
                                  out_shardings=(partitioning.replicated(par), params_sh))
  params = jax.device_put(params, params_sh)
  batch = jax.device_put(batch, batch_sh)
  loss, grads = compiled(step, params, batch)(params, batch)
  assert abs(float(loss) - loss_ref) <= TOL * abs(loss_ref)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads_ref)]
  for path, got, want, sh in zip(paths, jax.tree.leaves(grads), jax.tree.leaves(grads_ref),
                                 jax.tree.leaves(params_sh)):
    assert got.sharding.is_equivalent_to(sh, got.ndim), path
    assert_close(got, want, what=path)
