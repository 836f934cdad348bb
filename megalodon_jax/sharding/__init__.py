"""Scaling past one device: a device mesh, logical-axis sharding rules, sequence parallelism for
the recurrences, and multi-host (multi-controller) support.

  mesh = create_mesh(config.mesh)                      # axes data, fsdp, sequence, tensor
  par = Parallelism(mesh, rules_from_config(config.mesh.rules), config.mesh.sequence_combine)
  with use(par):                                       # while tracing: the model shards itself
    ...

See mesh.py, rules.py, sequence_parallel.py, partitioning.py and distributed.py.
"""

from megalodon_jax.sharding.mesh import MESH_AXES, MeshShape, create_mesh, describe, device_grid, mesh_shape
from megalodon_jax.sharding.rules import (
    DEFAULT_RULES,
    LOGICAL_AXES,
    Parallelism,
    constrain,
    current,
    logical_spec,
    partitioned,
    rules_from_config,
    rules_to_config,
    use,
)

__all__ = [
    "DEFAULT_RULES",
    "LOGICAL_AXES",
    "MESH_AXES",
    "MeshShape",
    "Parallelism",
    "constrain",
    "create_mesh",
    "current",
    "describe",
    "device_grid",
    "logical_spec",
    "mesh_shape",
    "partitioned",
    "rules_from_config",
    "rules_to_config",
    "use",
]
