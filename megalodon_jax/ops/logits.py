"""The output head: float32 logits from a low-precision matmul, with a low-precision backward.

`jnp.dot(x16, w16, preferred_element_type=float32)` gives float32 logits from a bf16 GEMM, but
its automatic transpose multiplies the float32 logit gradient by the bf16 operands, and the
mixed product is promoted to float32: both backward GEMMs of the largest matrix in the model
(dx = g W^T and dW = x^T g) run as float32/TF32 GEMMs. On an H200 in the mega1.3B train step
they took 29 ms of a 675 ms step (4.4%), against ~7 ms for the bf16 forward. Here the logit
gradient is rounded to the compute dtype first, as the released model does under autocast (its
bf16 linear layer receives a bf16 gradient through the float32 cast of the logits), so the
backward GEMMs run in bf16 with float32 accumulation. With a float32 compute dtype nothing
changes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def output_logits(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
  """x: [..., D], kernel: [D, V] -> float32 logits [..., V] = x @ kernel in `dtype`."""
  return jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)


def _fwd(x, kernel, dtype):
  x_c, k_c = x.astype(dtype), kernel.astype(dtype)
  logits = jnp.dot(x_c, k_c, preferred_element_type=jnp.float32)
  # Zero-size placeholders carry the input dtypes without holding their values.
  return logits, (x_c, k_c, jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype))


def _bwd(dtype, residuals, g):
  x_c, k_c, x_tag, k_tag = residuals
  g_c = g.astype(dtype)
  dx = jnp.dot(g_c, k_c.T, preferred_element_type=jnp.float32).astype(x_tag.dtype)
  g2 = g_c.reshape(-1, g_c.shape[-1])
  x2 = x_c.reshape(-1, x_c.shape[-1])
  dk = jnp.dot(x2.T, g2, preferred_element_type=jnp.float32).astype(k_tag.dtype)
  return dx, dk


output_logits.defvjp(_fwd, _bwd)
