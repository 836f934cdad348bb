"""chunk_attention lowered for CUDA on the CPU: which kernels a configuration sends to Mosaic GPU.

Shared by the tests of the three Mosaic GPU kernels (block matmul, backward tiles, scores), which
count `mosaic_gpu_v2` custom calls in the module to check the dispatch without a GPU; and
`capture_smem_requests`, which the kernels' lowering tests use to hold shared memory to their own counts.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from kernels_pallas import chunk_attention as ca


def lowered_attention_module(config: ca.KernelConfig, chunk: int = 256, length: int = 512, segments: bool = False,
                             dtype=jnp.bfloat16, dk: int = 128, dv: int = 256) -> str:
  """chunk_attention's forward + backward (batch 1, 2 heads, dk 128, dv 256 unless given) lowered for CUDA,
  not interpreted, as MLIR text."""
  batch, heads = 1, 2
  q = jax.ShapeDtypeStruct((batch, length, heads, dk), dtype)
  v = jax.ShapeDtypeStruct((batch, length, heads, dv), dtype)
  seg = jax.ShapeDtypeStruct((batch, length), jnp.int32) if segments else None

  def fwd_bwd(q, k, v, seg, d_out):
    def attend(q, k, v):
      return ca.chunk_attention(q, k, v, chunk_size=chunk, segment_ids=seg, config=config, interpret=False,
                                platform="triton")
    out, vjp = jax.vjp(attend, q, k, v)
    return out, *vjp(d_out)

  # The Triton kernels' custom calls have no serialisation guarantee; lowering is all this needs.
  triton_ok = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"], disabled_checks=triton_ok)
  return exported(q, q, v, seg, v).mlir_module()


def capture_smem_requests(monkeypatch) -> tuple[list[str], bool]:
  """Records the dynamic shared memory each Mosaic GPU kernel lowered afterwards asks for.

  Returns (requests, captured): `requests` fills with the byte counts (as strings) when kernels are lowered;
  `captured` is False when this jax has no such private hook (the counts are then unchecked).
  """
  requests: list[str] = []
  try:
    from jax.experimental.mosaic.gpu import core as mosaic_core
    serde = mosaic_core._run_serde_pass
  except (ImportError, AttributeError):  # private: another jax may not have it
    return requests, False

  def capture(module, **kwargs):  # the kernel module just before it is serialised into the call
    if kwargs.get("serialize"):
      requests.extend(re.findall(r"dynamic_shared_memory_size %c(\d+)_i32", str(module)))
    return serde(module, **kwargs)

  monkeypatch.setattr(mosaic_core, "_run_serde_pass", capture)
  return requests, True
