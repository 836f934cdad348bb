"""Pallas' Triton backend, which the GPU kernels of cema, cema_summary, chunk_attention, decode_step and
timestep_norm use: imported once, here, with a check of whether this jax can still run it.

jax 0.11 deprecates the backend ("will be removed in a future JAX version"). A jax without it must not
take the library down with it: the kernel modules take `plgpu` from here, so they import either way and
their TPU (Mosaic) and Mosaic GPU kernels keep working; any use of a Triton-only API then raises
TritonBackendUnavailable, which says what to do instead; and `megalodon_jax.ops.backend` (with
`ops.attention` and `decoding`) sends 'auto' to the XLA paths on a GPU where `unavailable_reason()`
is not None, warning once.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl


class TritonBackendUnavailable(RuntimeError):
  """A Triton-only Pallas API was used on a jax that cannot run Pallas' Triton backend."""


class _MissingTriton:
  """Stands in for `jax.experimental.pallas.triton` when it cannot be imported."""

  def __init__(self, reason: str):
    self._reason = reason

  def __getattr__(self, name: str):
    raise TritonBackendUnavailable(
        f"plgpu.{name} needs Pallas' Triton backend, which cannot be used here: {self._reason}. "
        "Use the XLA paths (cema_method='auto' or 'blocked', attention_impl='xla', "
        "timestep_norm_impl='xla'; 'auto' picks them by itself on such a jax), or install a jax "
        "that still has the backend (this project pins 0.10.2; 0.11.2 runs it with a DeprecationWarning).")


try:
  from jax.experimental.pallas import triton as plgpu
  _IMPORT_ERROR: str | None = None
except ImportError as error:  # a jax that dropped the backend
  _IMPORT_ERROR = f"jax {jax.__version__} has no jax.experimental.pallas.triton ({error})"
  plgpu = _MissingTriton(_IMPORT_ERROR)


def _probe_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...] + 1.0


def unavailable_reason() -> str | None:
  """None when the Triton kernels can run on the default backend, else why not (one line).

  Off a GPU only the import counts (the kernels run in the Pallas interpreter there). On a GPU a
  16-element kernel is compiled and run once per process, so that a jax which keeps the module but
  drops or breaks the lowering is caught here, not in the middle of a model's first step.
  """
  return _reason_on(jax.default_backend())


@functools.lru_cache(maxsize=None)
def _reason_on(platform: str) -> str | None:
  if _IMPORT_ERROR is not None:
    return _IMPORT_ERROR
  if platform != "gpu":
    return None
  spec = jax.ShapeDtypeStruct((16,), jnp.float32)
  try:
    with warnings.catch_warnings(), jax.ensure_compile_time_eval():
      warnings.simplefilter("ignore", DeprecationWarning)  # jax 0.11's notice; the README covers it
      probe = pl.pallas_call(_probe_kernel, out_shape=spec,
                             compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1))
      # A compiled executable runs eagerly even when this is reached while a model is being traced.
      out = np.asarray(jax.jit(probe).lower(spec).compile()(np.arange(16, dtype=np.float32)))
  except Exception as error:  # noqa: BLE001 -- whatever failed, these kernels cannot be dispatched
    return (f"Pallas' Triton backend failed a 16-element test kernel on this GPU "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
  if not np.array_equal(out, np.arange(16, dtype=np.float32) + 1.0):
    return "Pallas' Triton backend returned wrong values for a 16-element test kernel on this GPU"
  return None
