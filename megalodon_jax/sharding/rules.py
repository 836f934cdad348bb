"""Logical axis names, the rules that map them to mesh axes, and the active parallel context.

Every parameter of the model is created with logical axis names (`nn.with_logical_partitioning`)
and key activations are constrained by logical names (`constrain`). Rules map a logical name to
mesh axes; they live in the experiment config (`config.mesh.rules`, one string per logical name:
comma-separated mesh axes, '' for replicated), so a layout change is a command-line flag:

  --config.mesh.rules.embed=fsdp,tensor

Logical names (D model dim, Z shared q/k dim, V value dim, F FFN dim, N CEMA order):
  batch, length          activation batch and sequence
  act_embed              activation feature dim D (replicated by default)
  embed                  D of parameters (FSDP axis)
  embed_tensor           the input D of wh1 (row-parallel, like wh2's V)
  qk, value, mlp, vocab  Z, V, F and vocabulary of parameters and activations (tensor parallel)
  heads                  attention heads of q, k, v activations
  cema_order             N of CEMA parameters
  layers                 the stacked layer axis of `scan_layers`

A dimension whose size is not a multiple of its mesh axes is left unsharded (`logical_spec`), so a
rule never makes a shape invalid; e.g. a vocabulary of 260 stays whole on tensor=8.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from megalodon_jax.config import ConfigError
from megalodon_jax.sharding.mesh import MESH_AXES

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Data parallel over (data, fsdp); parameters sharded over fsdp on D (ZeRO-3 style) and over
# tensor on heads / Z / V / F / vocabulary (Megatron style); sequence over the sequence axis.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("embed_tensor", "tensor"),
    ("heads", "tensor"),
    ("qk", "tensor"),
    ("value", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("cema_order", None),
    ("layers", None),
)

LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)
SEQUENCE_COMBINES = ("all_gather", "doubling")


def rules_to_config(rules: Rules = DEFAULT_RULES) -> dict[str, str]:
  """{logical name: 'axis,axis' or ''}: the form stored in config.mesh.rules."""
  def text(axes: MeshAxes) -> str:
    if axes is None:
      return ""
    return axes if isinstance(axes, str) else ",".join(axes)
  return {name: text(axes) for name, axes in rules}


def rules_from_config(values: Mapping[str, str] | Sequence[tuple[str, MeshAxes]] | None) -> Rules:
  """Rules from config.mesh.rules ({name: 'a,b'}); names not given keep DEFAULT_RULES.

  Raises ConfigError for unknown logical names or mesh axes.
  """
  if values is None:
    return DEFAULT_RULES
  if hasattr(values, "to_dict"):
    values = values.to_dict()
  items = list(values.items()) if isinstance(values, Mapping) else list(values)
  given: dict[str, MeshAxes] = {}
  for name, axes in items:
    if name not in LOGICAL_AXES:
      raise ConfigError(f"mesh.rules.{name}: unknown logical axis; valid names are {list(LOGICAL_AXES)}")
    if isinstance(axes, str):
      parts = tuple(a.strip() for a in axes.split(",") if a.strip())
    elif axes is None:
      parts = ()
    else:
      parts = tuple(axes)
    for axis in parts:
      if axis not in MESH_AXES:
        raise ConfigError(f"mesh.rules.{name}={axes!r}: {axis!r} is not a mesh axis; use some of {list(MESH_AXES)}")
    given[name] = None if not parts else parts[0] if len(parts) == 1 else parts
  return tuple((name, given.get(name, default)) for name, default in DEFAULT_RULES)


def _axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_spec(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules: Rules) -> P:
  """PartitionSpec of an array with logical axis `names` under `rules` (flax's resolution order).

  Mesh axes of size 1 are dropped, and so are trailing mesh axes of a dimension whose size they do
  not divide (the dimension stays whole, or sharded over the axes that do divide it).
  """
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match the array rank {len(shape)} (shape {tuple(shape)})")
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  out = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    kept = [a for a in _axes_tuple(axes) if mesh.shape[a] > 1]
    while kept and size % math.prod(mesh.shape[a] for a in kept):
      kept.pop()
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def spec_axes(spec: P) -> tuple[str, ...]:
  """All mesh axes a PartitionSpec uses."""
  return tuple(a for entry in spec for a in _axes_tuple(entry))


@dataclasses.dataclass(frozen=True)
class Parallelism:
  """A mesh, logical rules and the sequence-parallel combine: what the model needs to shard itself.

  sequence_combine: how per-shard CEMA/TimestepNorm summaries are combined across the sequence
  axis: 'all_gather' (one all-gather, depth 1) or 'doubling' (log2 P rounds of ppermute).
  """
  mesh: Mesh
  rules: Rules = DEFAULT_RULES
  sequence_combine: str = "all_gather"

  def __post_init__(self):
    if self.sequence_combine not in SEQUENCE_COMBINES:
      raise ConfigError(f"mesh.sequence_combine must be one of {SEQUENCE_COMBINES}, got {self.sequence_combine!r}")
    missing = set(MESH_AXES) - set(self.mesh.axis_names)
    if missing:
      raise ConfigError(f"the mesh needs the axes {MESH_AXES} (create it with sharding.create_mesh); "
                        f"missing {sorted(missing)}")

  def spec(self, shape: Sequence[int], names: Sequence[str | None]) -> P:
    return logical_spec(shape, names, self.mesh, self.rules)

  def sharding(self, shape: Sequence[int], names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(shape, names))

  @property
  def sequence_axis(self) -> str | None:
    """The mesh axis the 'length' logical axis maps to (None when replicated or of size 1)."""
    axes = [a for a in _axes_tuple(dict(self.rules).get("length")) if self.mesh.shape[a] > 1]
    if len(axes) > 1:
      raise ConfigError(f"mesh.rules.length must name one mesh axis for sequence parallelism, got {axes}")
    return axes[0] if axes else None


_ACTIVE: contextvars.ContextVar[Parallelism | None] = contextvars.ContextVar("megalodon_parallelism", default=None)


def current() -> Parallelism | None:
  """The Parallelism set by `use`, or None (single-device semantics, no constraints).

  A mesh of one device counts as none: the model then traces exactly as without a mesh.
  """
  par = _ACTIVE.get()
  return None if par is None or par.mesh.devices.size == 1 else par


@contextlib.contextmanager
def use(parallelism: Parallelism | None) -> Iterator[Parallelism | None]:
  """Makes the model shard itself while tracing inside this context (None: no sharding)."""
  token = _ACTIVE.set(parallelism)
  try:
    yield parallelism
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names under the active Parallelism; identity without one."""
  par = current()
  if par is None:
    return x
  return jax.lax.with_sharding_constraint(x, par.sharding(x.shape, names))


def partitioned(init, names: Sequence[str | None]):
  """An initialiser whose parameters carry logical axis names (nn.with_logical_partitioning)."""
  return nn.with_logical_partitioning(init, tuple(names))
