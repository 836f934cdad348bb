"""Orbax checkpoints: async saves, keep the last K, restore the newest readable one.

A checkpoint holds the TrainState and the data iterator's state (JSON), so a resumed run sees
exactly the batches it would have seen. Orbax writes into a temporary directory and renames it
when complete, so a save cut short by a crash is never listed; a finished checkpoint that has since
been damaged fails to restore, and `restore_latest` then falls back to the previous one, saying so.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Wraps an Orbax CheckpointManager for (train state, data state) pairs."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def save(self, step: int, state: Any, data_state: dict | None = None, *, wait: bool = False) -> None:
    """Starts saving (asynchronously unless wait=True). Called by every process."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
    self._manager.save(step, args=args, force=True)
    if wait:
      self._manager.wait_until_finished()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores one step into the structure (and shardings) of `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"] or {})

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data state) of the newest checkpoint that restores, or None if there is none.

    Unreadable checkpoints are skipped with a warning naming the step and the error.
    """
    for step in reversed(self.steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as error:  # noqa: BLE001 - any failure to read means: try an older one
        message = (f"checkpoint at step {step} in {self.directory} could not be restored "
                   f"({type(error).__name__}: {str(error)[:300]}); falling back to an earlier checkpoint")
        log.warning(message)
        continue
      return step, state, data_state
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
