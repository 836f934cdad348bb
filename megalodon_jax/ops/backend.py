"""Which implementation 'auto' means on the current backend: Pallas kernels on GPU/TPU, XLA elsewhere."""

from __future__ import annotations

import jax


def has_accelerator() -> bool:
  return jax.default_backend() in ("gpu", "tpu")


# Inputs this short (decode steps) run the plain scan: a few fused elementwise ops per step, cheaper
# than a kernel launch with time-chunk bookkeeping.
SHORT_CEMA_INPUT = 8


def cema_method(requested: str, length: int | None = None) -> str:
  """config.cema_method -> an ops.cema method.

  'auto': the sequential scan for inputs of at most SHORT_CEMA_INPUT steps, else the Pallas kernel on
  GPU/TPU and elsewhere the blocked XLA path (all chunks at once as matmuls: 1.3-1.6x faster than
  the chunked path fwd+bwd on a 2-core CPU), packed sequences (segment ids) included: with resets
  it stayed 1.2-1.7x faster than the chunked path fwd+bwd (B=1, L=1024-16384, D=64, N=16, T=64,
  4 to ~400 documents per row).
  """
  if requested == "auto":
    if length is not None and length <= SHORT_CEMA_INPUT:
      return "sequential"
    return "pallas" if has_accelerator() else "blocked"
  return requested


def timestep_norm_method(requested: str, length: int | None = None) -> str:
  """config.timestep_norm_impl -> an ops.timestep_norm method ('xla' is the associative scan).

  'auto': the Pallas kernel on GPU (its tiled design ran fwd+bwd in 1.02 ms of device time against
  1.26 ms for the associative scan at L=32768, D=4096, 64 groups on an H200; gpu_checks,
  2026-11-28) except for inputs of at most SHORT_CEMA_INPUT steps (decode steps, where a kernel
  launch with tile bookkeeping costs more than a few fused elementwise ops); the associative scan
  elsewhere (the Mosaic kernel has not run on a TPU yet).
  """
  if requested == "auto":
    if jax.default_backend() == "gpu" and (length is None or length > SHORT_CEMA_INPUT):
      return "pallas"
    return "associative"
  return {"xla": "associative"}.get(requested, requested)
