"""Which implementation 'auto' means on the current backend: Pallas kernels on GPU/TPU, XLA elsewhere.

On a GPU the kernels are Pallas Triton kernels (kernels_pallas.triton_backend). Where this jax cannot
run them (the backend is deprecated upstream), 'auto' takes the XLA paths and warns once, and an
explicit 'pallas' is a ConfigError that says so.
"""

from __future__ import annotations

import warnings

import jax

from megalodon_jax.config import ConfigError

_warned_fallback = False


def triton_unavailable_reason() -> str | None:
  """Why Pallas' Triton kernels cannot run on the default backend, or None (see triton_backend)."""
  from kernels_pallas import triton_backend  # lazy: Pallas is optional at import time
  return triton_backend.unavailable_reason()


def gpu_kernels_usable() -> bool:
  """On a GPU: whether the Triton kernels can run; if not, warns once that 'auto' uses XLA paths."""
  global _warned_fallback
  reason = triton_unavailable_reason()
  if reason is None:
    return True
  if not _warned_fallback:
    _warned_fallback = True
    warnings.warn(f"megalodon_jax: the Pallas GPU kernels cannot run ({reason}); 'auto' uses the XLA "
                  "paths for CEMA, attention, TimestepNorm and decoding, which are slower.",
                  RuntimeWarning, stacklevel=3)
  return False


def has_accelerator() -> bool:
  """Whether 'auto' should take the Pallas kernels: on a TPU, or on a GPU that can run them."""
  platform = jax.default_backend()
  return platform == "tpu" or (platform == "gpu" and gpu_kernels_usable())


def _require_kernels(option: str) -> None:
  """An explicit Pallas choice off a TPU needs the Triton backend (compiled on a GPU, else interpreted)."""
  if jax.default_backend() == "tpu":
    return
  reason = triton_unavailable_reason()
  if reason is not None:
    raise ConfigError(f"{option}='pallas' needs Pallas' Triton backend, which cannot run here: {reason}. "
                      f"Use {option}='auto' (the XLA path on such a jax) or name an XLA path.")


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
  if requested == "pallas":
    _require_kernels("cema_method")
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
    if (jax.default_backend() == "gpu" and (length is None or length > SHORT_CEMA_INPUT)
        and gpu_kernels_usable()):
      return "pallas"
    return "associative"
  if requested == "pallas":
    _require_kernels("timestep_norm_impl")
  return {"xla": "associative"}.get(requested, requested)
