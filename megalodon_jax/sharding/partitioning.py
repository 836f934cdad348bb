"""Shardings of parameters, optimiser state and batches, and the jitted sharded steps.

Parameters are sharded by their logical axis names (model.param_logical_axes) under the rules;
optimiser-state leaves that mirror a parameter (Adam's moments) get that parameter's sharding,
everything else (step counters, scalars, the dropout key) is replicated. Batches are [B, L]
arrays sharded as ('batch', 'length').

  par = Parallelism(create_mesh(config.mesh), rules_from_config(config.mesh.rules))
  params_sh = param_shardings(model_cfg, par)
  state_sh = train_state_shardings(jax.eval_shape(init_fn, rng), params_sh, par)
  step = jit_sharded(train_step, par, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, par.replicated))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from megalodon_jax import model as model_lib
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.sharding import rules as rules_lib

BATCH_KEYS = ("inputs", "targets", "segment_ids", "loss_mask")


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def replicated(par: rules_lib.Parallelism) -> NamedSharding:
  return NamedSharding(par.mesh, P())


def param_shardings(config: MegalodonConfig, par: rules_lib.Parallelism) -> Any:
  """The params tree with a NamedSharding per leaf, from the logical names and the rules."""
  logical = model_lib.param_logical_axes(config)
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  return jax.tree.map(lambda names, shape: par.sharding(shape.shape, tuple(names)), logical, shapes,
                      is_leaf=_is_spec)


def _path_key(entry: Any) -> str:
  return jax.tree_util.keystr((entry,))


def mirror_shardings(tree: Any, params: Any, params_sharding: Any, default: NamedSharding) -> Any:
  """Shardings for a tree whose leaves may mirror parameters (e.g. optax state).

  A leaf whose path ends with a parameter's path and has that parameter's shape takes the
  parameter's sharding; any other leaf gets `default`. tree, params: pytrees of arrays or
  ShapeDtypeStructs.
  """
  table = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params_sharding)):
    table[tuple(_path_key(e) for e in path)] = (tuple(leaf.shape), sharding)
  longest = max((len(k) for k in table), default=0)

  def pick(path, leaf):
    keys = tuple(_path_key(e) for e in path)
    for size in range(min(longest, len(keys)), 0, -1):
      match = table.get(keys[-size:])
      if match is not None and match[0] == tuple(getattr(leaf, "shape", ())):
        return match[1]
    return default

  return jax.tree_util.tree_map_with_path(pick, tree)


def train_state_shardings(abstract_state: Any, params_sharding: Any, par: rules_lib.Parallelism) -> Any:
  """A TrainState of shardings: params as given, optimiser moments like their parameters, rest replicated."""
  default = replicated(par)
  params = abstract_state.params
  return type(abstract_state)(**{
      name: (params_sharding if name == "params" else mirror_shardings(value, params, params_sharding, default))
      for name, value in abstract_state._asdict().items()})


def batch_shardings(par: rules_lib.Parallelism, rows: int, length: int,
                    keys: Sequence[str] = BATCH_KEYS) -> dict[str, NamedSharding]:
  """{key: sharding} of [rows, length] batch arrays: rows over the 'batch' rule, steps over 'length'."""
  sharding = par.sharding((rows, length), ("batch", "length"))
  return {key: sharding for key in keys}


def with_shardings(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings (what Orbax restores into)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def jit_sharded(fn: Callable, par: rules_lib.Parallelism, *, in_shardings: Any = None, out_shardings: Any,
                donate_argnums: Sequence[int] = ()) -> Callable:
  """jax.jit of `fn` traced under the Parallelism (so the model shards itself) with the shardings.

  in_shardings None: the arguments keep the shardings they come with (committed global arrays).
  """

  def traced(*args):
    with rules_lib.use(par):
      return fn(*args)

  kwargs = {} if in_shardings is None else {"in_shardings": in_shardings}
  return jax.jit(traced, out_shardings=out_shardings, donate_argnums=tuple(donate_argnums), **kwargs)


def describe_params(params_sharding: Any, params: Any) -> Mapping[str, str]:
  """{path: 'shape -> spec'} for logging and tests."""
  out = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params_sharding)):
    out[jax.tree_util.keystr(path)] = f"{tuple(leaf.shape)} -> {sharding.spec}"
  return out
