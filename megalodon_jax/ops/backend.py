"""Which implementation 'auto' means on the current backend: Pallas kernels on GPU/TPU, XLA elsewhere."""

from __future__ import annotations

import jax


def has_accelerator() -> bool:
  return jax.default_backend() in ("gpu", "tpu")


def cema_method(requested: str) -> str:
  """config.cema_method -> an ops.cema method ('auto': the Pallas kernel on GPU/TPU, else 'chunked')."""
  if requested == "auto":
    return "pallas" if has_accelerator() else "chunked"
  return requested


def timestep_norm_method(requested: str) -> str:
  """config.timestep_norm_impl -> an ops.timestep_norm method ('xla' is the associative scan)."""
  if requested == "auto":
    return "pallas" if has_accelerator() else "associative"
  return {"xla": "associative"}.get(requested, requested)
