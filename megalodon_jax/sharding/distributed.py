"""Multi-host (multi-controller) support: one program per host, JAX's distributed runtime.

Every host runs the same program. `initialize` joins the hosts (jax.distributed.initialize:
automatic on TPU pods, SLURM and Open MPI; explicit coordinator address / process count / id
otherwise). Each host then loads only the rows of the global batch its devices hold
(`process_rows`, `ShardedLoader`) and `global_batch` assembles the global jax.Arrays from the
per-host pieces (jax.make_array_from_process_local_data). Checkpoints are written and read by
every host (Orbax); logs come from process 0 only.

Data loading is split into K 'loader shards' (mesh.loader_shards; 0 = one per distinct row block,
i.e. per data-parallel host). Shard k reads documents k, k+K, ... and contributes rows
[k B/K, (k+1) B/K) of every global batch of B rows; a host runs the shards of its rows. With a
fixed K the global batches do not depend on the number of hosts, so a run can be resumed on a
different topology and see the same data (the data state holds every shard's position).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from megalodon_jax.config import ConfigError

log = logging.getLogger(__name__)

INITIALIZE_MODES = ("auto", "always", "never")


def _env_int(name: str, default: int = 1) -> int:
  try:
    return int(os.environ.get(name, default))
  except ValueError:
    return default


def cluster_detected() -> bool:
  """Whether the environment looks like a multi-process job jax.distributed can configure itself.

  SLURM with several tasks, Open MPI with several ranks, or a multi-host Cloud TPU (several worker
  hostnames, or a multi-slice MEGASCALE coordinator).
  """
  if "SLURM_JOB_ID" in os.environ and _env_int("SLURM_NTASKS", _env_int("SLURM_NPROCS")) > 1:
    return True
  if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
    return True
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1 or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def is_initialized() -> bool:
  """Whether jax.distributed.initialize has run in this process."""
  check = getattr(jax.distributed, "is_initialized", None)
  if check is not None:
    return bool(check())
  from jax._src import distributed as _state  # older/newer releases without the public helper
  return getattr(_state.global_state, "client", None) is not None


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, *,
               mode: str = "auto", local_device_ids: Any = None, timeout_s: int = 300) -> bool:
  """Joins the multi-controller runtime if this is a multi-process run; returns whether it is.

  Must run before anything touches a JAX backend. With a coordinator address (host:port of
  process 0) the process count and id are required; without one, mode 'auto' initialises when
  `cluster_detected()` (TPU pod, SLURM, Open MPI: JAX finds the values itself), 'always' always
  does, 'never' never does. Idempotent.
  """
  if mode not in INITIALIZE_MODES:
    raise ConfigError(f"mesh.initialize must be one of {INITIALIZE_MODES}, got {mode!r}")
  if is_initialized():
    return True
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(
          f"with mesh.coordinator_address={coordinator_address!r} set, mesh.num_processes (got {num_processes}) "
          f"and mesh.process_id (got {process_id}, must be in [0, num_processes)) are required")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)
    return True
  if mode == "always" or (mode == "auto" and cluster_detected()):
    jax.distributed.initialize(local_device_ids=local_device_ids, initialization_timeout=timeout_s)
    return True
  return False


def initialize_from_config(mesh_config: Any) -> bool:
  """`initialize` with config.mesh's coordinator_address, num_processes, process_id, initialize."""
  get = (lambda k, d: mesh_config.get(k, d)) if hasattr(mesh_config, "get") else (
      lambda k, d: getattr(mesh_config, k, d))
  return initialize(get("coordinator_address", "") or "", int(get("num_processes", 0) or 0),
                    int(get("process_id", -1)), mode=get("initialize", "auto") or "auto")


# ---------------------------------------------------------------------------------------------
# Which rows of a global batch this process holds, and global arrays from per-process rows.
# ---------------------------------------------------------------------------------------------


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """[start, stop) rows of a [B, L, ...] global array that this process's devices hold.

  Raises ConfigError when this process's devices do not hold whole rows (the sequence axis spans
  hosts) or a non-contiguous set of rows: per-host loading gives each host complete sequences.
  """
  indices = sharding.addressable_devices_indices_map(global_shape)
  rows, length = set(), global_shape[1] if len(global_shape) > 1 else None
  covered = set()
  for index in indices.values():
    r = index[0] if index else slice(None)
    rows.update(range(*r.indices(global_shape[0])))
    if length is not None:
      covered.update(range(*index[1].indices(length)))
  if length is not None and len(covered) != length:
    raise ConfigError(
        "this host's devices hold only part of each sequence: the sequence (or another length) mesh axis "
        "spans hosts. Put mesh.sequence inside a host (devices per host must be a multiple of "
        "sequence * tensor), e.g. use dcn_data/dcn_fsdp for the across-host axes.")
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ConfigError(f"this host holds a non-contiguous set of batch rows ({sorted(rows)[:8]}...); "
                      "reorder the mesh so that each host's devices hold one block of rows")
  return start, stop


def global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding],
                 global_rows: int) -> dict[str, jax.Array]:
  """Global [global_rows, ...] arrays from this process's rows (as given by `process_rows`)."""
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    out[key] = jax.make_array_from_process_local_data(shardings[key], value, (global_rows,) + value.shape[1:])
  return out


# ---------------------------------------------------------------------------------------------
# Per-process data: the loader shards of this host's rows.
# ---------------------------------------------------------------------------------------------


def _allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-serialisable `value`, in process order (a host-side all-gather)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(np.asarray(gathered), np.asarray(sizes).ravel())]


class ShardedLoader:
  """The loader shards that feed this process's rows of every global batch.

  make_iterator(shard, num_shards) -> an iterator of batch dicts of global_rows / num_shards rows
  with get_state()/set_state() (e.g. data.make_train_iterator with process_index=shard,
  process_count=num_shards and a per-shard batch size). Rows [start, stop) come from `process_rows`.
  loader_shards: K > 0, or 0 for one per row block (global_rows / (stop - start)).
  """

  def __init__(self, make_iterator: Callable[[int, int], Iterator[Mapping[str, np.ndarray]]], *,
               global_rows: int, rows: tuple[int, int], loader_shards: int = 0):
    self._make = make_iterator
    self._global_rows = global_rows
    self._rows = rows
    self._auto = loader_shards == 0
    self._build(loader_shards or global_rows // (rows[1] - rows[0]))

  def _build(self, shards: int) -> None:
    start, stop = self._rows
    if shards < 1 or self._global_rows % shards:
      raise ConfigError(f"mesh.loader_shards={shards} must divide the global batch of {self._global_rows} rows")
    per = self._global_rows // shards
    if start % per or stop % per:
      raise ConfigError(
          f"mesh.loader_shards={shards} gives shards of {per} rows, but this host holds rows [{start}, {stop}); "
          f"use a multiple of {self._global_rows // (stop - start)} loader shards")
    self.num_shards = shards
    self.shards = tuple(range(start // per, stop // per))
    self._iterators = {k: self._make(k, shards) for k in self.shards}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(self._iterators[k]) for k in self.shards]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

  def get_state(self) -> dict:
    """Every shard's position (gathered from all processes: the same dict on every process)."""
    mine = {str(k): self._iterators[k].get_state() for k in self.shards}
    merged = {}
    for states in _allgather_json(mine):
      merged.update(states)
    return {"loader_shards": self.num_shards, "loaders": merged}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "loaders" not in state:  # a checkpoint from before loader shards: one iterator's state
      if self.num_shards != 1:
        raise ConfigError("this checkpoint's data state is from a single data iterator; resume with "
                          "mesh.loader_shards=1 on one host")
      self._iterators[self.shards[0]].set_state(dict(state))
      return
    saved = int(state["loader_shards"])
    if saved != self.num_shards:
      if not self._auto:
        raise ConfigError(f"the checkpoint's data was read with mesh.loader_shards={saved}, this run uses "
                          f"{self.num_shards}; set mesh.loader_shards={saved} (or 0) to resume the same data")
      self._build(saved)
    for k in self.shards:
      self._iterators[k].set_state(state["loaders"][str(k)])
