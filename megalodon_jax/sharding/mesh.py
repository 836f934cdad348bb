"""The device mesh: axes (data, fsdp, sequence, tensor), sizes from the config, -1 = the rest.

Each axis has a size inside a slice (ICI: the fast network of one TPU slice, or one GPU host)
and a size across slices (DCN: the data-centre network between slices or hosts). The mesh axis
is their product; devices are laid out so that the ICI part of every axis stays inside a slice.
Axes are ordered by how much they communicate (tensor the most), as `mesh_utils` expects.

  mesh = create_mesh(config.mesh)                     # a jax.sharding.Mesh over all devices
  mesh = create_mesh({"data": 2, "sequence": 4})      # a dict of sizes works too (rest are 1)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from megalodon_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """Resolved sizes (no -1 left): ici[i] * dcn[i] is the size of mesh axis MESH_AXES[i]."""
  ici: tuple[int, ...]
  dcn: tuple[int, ...]

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(i * d for i, d in zip(self.ici, self.dcn))

  def as_dict(self) -> dict[str, int]:
    return dict(zip(MESH_AXES, self.sizes))


def _get(config: Any, key: str, default: int) -> int:
  if isinstance(config, Mapping):
    return config.get(key, default)
  return getattr(config, key, default) if hasattr(config, key) else default


def _resolve(sizes: Sequence[int], total: int, where: str, names: Sequence[str]) -> tuple[int, ...]:
  """Replaces one -1 by total / product(others); checks the product equals `total`."""
  sizes = list(sizes)
  for name, size in zip(names, sizes):
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{name}={size!r}: mesh axis sizes must be positive integers or -1 (the rest)")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ConfigError(f"at most one {where} mesh size may be -1, got -1 for "
                      f"{', '.join('mesh.' + names[i] for i in free)}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if total % fixed:
      raise ConfigError(f"the {where} mesh sizes {dict(zip(names, sizes))} need a multiple of {fixed} devices, "
                        f"but there are {total}; change the sizes so that their product divides {total}")
    sizes[free[0]] = total // fixed
  if math.prod(sizes) != total:
    raise ConfigError(f"the {where} mesh sizes {dict(zip(names, sizes))} multiply to {math.prod(sizes)}, but there "
                      f"are {total} {'devices per slice' if where == 'within-slice' else 'slices'}; set one of "
                      "them to -1 to take the rest")
  return tuple(int(s) for s in sizes)


def _granules(devices: Sequence[Any]) -> tuple[str, int]:
  """('slice_index' | 'process_index', count): the units the across-slice (DCN) axes span."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  if None not in slices and len(slices) > 1:
    return "slice_index", len(slices)
  return "process_index", len({d.process_index for d in devices})


def mesh_shape(config: Any, devices: Sequence[Any] | None = None) -> MeshShape:
  """Resolves config sizes (data, fsdp, sequence, tensor and dcn_<axis>) against the devices.

  config: the `mesh` ConfigDict, a dict, or any object with those attributes (missing = 1, and
  data = -1 when absent). Across-slice sizes of all 1 mean a single slice: the within-slice sizes
  then cover all devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  ici = [_get(config, a, -1 if a == "data" else 1) for a in MESH_AXES]
  dcn = [_get(config, f"dcn_{a}", 1) for a in MESH_AXES]
  dcn_names = [f"dcn_{a}" for a in MESH_AXES]
  if all(d == 1 for d in dcn):
    return MeshShape(_resolve(ici, len(devices), "within-slice", MESH_AXES), (1,) * len(MESH_AXES))
  _, count = _granules(devices)
  dcn = _resolve(dcn, count, "across-slice", dcn_names)
  return MeshShape(_resolve(ici, len(devices) // count, "within-slice", MESH_AXES), dcn)


def device_grid(config: Any = None, devices: Sequence[Any] | None = None) -> np.ndarray:
  """The devices arranged as the mesh: an array of shape `mesh_shape(config, devices).sizes`.

  Within a slice the devices are placed by `mesh_utils.create_device_mesh` (topology-aware on
  TPU); with across-slice sizes, `create_hybrid_device_mesh` puts the DCN part of every axis
  across slices (TPU slice_index) or, where devices have no slices, across processes (hosts).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape({} if config is None else config, devices)
  if all(d == 1 for d in shape.dcn):
    try:
      return mesh_utils.create_device_mesh(shape.ici, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      # Unusual topologies (e.g. a sub-slice) that the TPU layout helper cannot tile: plain order.
      return np.asarray(devices).reshape(shape.ici)
  attribute, _ = _granules(devices)
  return mesh_utils.create_hybrid_device_mesh(shape.ici, shape.dcn, devices,
                                              process_is_granule=attribute == "process_index",
                                              allow_split_physical_axes=True)


def create_mesh(config: Any = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh with axes MESH_AXES from the config's sizes (see `mesh_shape` and `device_grid`)."""
  return Mesh(device_grid(config, devices), MESH_AXES)


def describe(mesh: Mesh) -> str:
  """'data=2 fsdp=1 sequence=2 tensor=2 (8 devices, 2 processes)'."""
  processes = len({d.process_index for d in mesh.devices.flat})
  sizes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
  return f"{sizes} ({mesh.devices.size} devices, {processes} process{'es' if processes > 1 else ''})"
