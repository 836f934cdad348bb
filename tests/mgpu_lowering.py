"""chunk_attention lowered for CUDA on the CPU: which kernels a configuration sends to Mosaic GPU.

Shared by the tests of the three Mosaic GPU kernels (block matmul, backward tiles, scores), which
count `mosaic_gpu_v2` custom calls in the module to check the dispatch without a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import chunk_attention as ca


def lowered_attention_module(config: ca.KernelConfig, chunk: int = 256, length: int = 512, segments: bool = False,
                             dtype=jnp.bfloat16) -> str:
  """chunk_attention's forward + backward (batch 1, 2 heads, dk 128, dv 256) lowered for CUDA, not
  interpreted, as MLIR text."""
  batch, heads, dk, dv = 1, 2, 128, 256
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
