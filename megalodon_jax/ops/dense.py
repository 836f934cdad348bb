"""The dot_general of the projection layers: single-row products stay matrix products.

XLA on GPU rewrites the product of one row and a matrix of fewer than 10M elements into an
elementwise multiply and a reduction ("dot strength reduction": the GPU algebraic simplifier asks
IsMatrixMultiplicationTooSmallForRewriting). The multiply writes the whole [in, out] product to
memory and the reduction reads it back, 4-5x the time of reading the weights once; in mega1.3B
batch-1 decoding it was 3 of the 4 ms of a step (and the same in the Llama baseline). Every
projection of the 1.3B presets is under 10M elements, and no XLA flag turns the rewrite off in
jaxlib 0.11. Two rows are not a vector, so `dot_general` feeds a single row twice, behind an
optimisation barrier so that the simplifier cannot see the copies are equal, and keeps the first
result: the weights are read once by a GEMM kernel, and the spare row costs nothing measurable.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def single_row_axis(lhs_shape: tuple[int, ...], dimension_numbers) -> int | None:
  """The free axis of lhs to double when the product is one row times a matrix, else None."""
  (lhs_contract, _), (lhs_batch, _) = dimension_numbers
  free = [d for d in range(len(lhs_shape)) if d not in lhs_contract and d not in lhs_batch]
  if lhs_batch or not free or math.prod(lhs_shape[d] for d in free) != 1:
    return None
  return free[0]


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None, **kwargs) -> jax.Array:
  """lax.dot_general with the same arguments and result; see the module docstring."""
  axis = single_row_axis(lhs.shape, dimension_numbers)
  if axis is None:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)
  doubled = lax.optimization_barrier(jnp.concatenate([lhs, lhs], axis=axis))
  out = lax.dot_general(doubled, rhs, dimension_numbers, precision=precision,
                        preferred_element_type=preferred_element_type, **kwargs)
  # No batch dimensions: the output starts with lhs's free axes, of which `axis` is the first.
  return lax.slice_in_dim(out, 0, 1, axis=0)
