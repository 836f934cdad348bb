"""XLA_FLAGS for CPU runs, set before JAX is imported (this module imports no JAX).

XLA aborts the process on a flag it does not know, and the CPU flags we use have come and gone
between jaxlib releases (`--xla_cpu_use_fusion_emitters` is gone in jaxlib 0.11), so each flag
is added only for the jaxlib versions that accept it.
"""

from __future__ import annotations

import importlib.metadata
import os

# flag -> (first jaxlib version that accepts it, first version that no longer does); None: open end.
_CPU_FLAGS: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]] = {
    # Single-threaded Eigen: avoids a hang seen with some jaxlib versions on 2-core machines.
    "--xla_cpu_multi_thread_eigen=false": (None, None),
    # The older CPU emitters: much faster compiles of many small programs.
    "--xla_cpu_use_fusion_emitters=false": (None, (0, 11)),
}


def _jaxlib_version() -> tuple[int, ...]:
  try:
    text = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ()
  parts = []
  for piece in text.split(".")[:3]:
    digits = "".join(ch for ch in piece if ch.isdigit())
    parts.append(int(digits) if digits else 0)
  return tuple(parts)


def cpu_flags(version: tuple[int, ...] | None = None) -> list[str]:
  """The CPU flags the installed (or the given) jaxlib version accepts."""
  version = _jaxlib_version() if version is None else version
  chosen = []
  for flag, (first, stop) in _CPU_FLAGS.items():
    if first is not None and version and version < first:
      continue
    if stop is not None and version and version >= stop:
      continue
    chosen.append(flag)
  return chosen


def add_xla_flags(*flags: str) -> str:
  """Appends `flags` to $XLA_FLAGS unless a flag of the same name is already there; returns it."""
  current = os.environ.get("XLA_FLAGS", "")
  for flag in flags:
    if flag.split("=")[0] not in current:
      current = f"{current} {flag}".strip()
  os.environ["XLA_FLAGS"] = current
  return current
