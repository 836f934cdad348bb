"""Chunk summaries of the CEMA input as a Pallas (Triton) kernel, with a custom VJP.

For chunks of T steps (x: [B, J T, D] real, q: [D, N] complex, |q| <= 1):

  S[b, j, d, n] = sum_{l < T} q[d, n]^(T - 1 - l) x[b, j T + l, d]

which is what a chunk hands to the next one: the state it ends in from a zero start, per unit p.
Sequence parallelism needs it for a device's whole slice (ops.cema.cema_slice_summary combines
the J summaries with q^(T j) from the double-float power tables). The plain-XLA form of the
same sum (a float32 einsum against a table of q^l, batched over the channels) took 0.72 ms fwd+bwd
per mega200M layer at L/2 = 16384 on an H200, as long as the slice's whole CEMA scan.

Kernel: one program per (batch, chunk, block of channels); lanes [N, block_d] (orders x channels),
Horner's rule along the chunk (S <- q S + x_t, 4 FMAs per step and lane), and alongside it the
q-derivative S' (S' <- q S' + S), kept as the VJP's residual. Compiled, the multiply-adds are PTX
FMAs, as in the CEMA scan kernels. Complex values travel as real /
imaginary float32 planes (Pallas has no complex dtype), and the custom VJP is written on those
planes:
  dx[b, j T + l, d] = sum_n Re(conj(G) q^(T - 1 - l))      (G = Gre + i Gim, the planes' cotangents)
                    -> a reverse walk z <- q z from z = conj(G), one output row per step;
  dq_re = sum_{b,j} Gre Re S' + Gim Im S',   dq_im = sum_{b,j} Gim Re S' - Gre Im S'.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.cema import _plain_fma, _ptx_fma
from megalodon_jax.ops.cema import cema_powers

Array = jax.Array

_BLOCK_D = 128  # channels per program: lanes [N, 128] (2048 at N = 16) over 4 warps
_UNROLL = 16  # steps per loop iteration, statically unrolled (blocks are powers of 2)


def chunk_summaries_reference(x: Array, q: Array, block: int) -> Array:
  """The plain-JAX reference: [B, J, D, N] complex64 from x [B, J block, D], q [D, N]."""
  batch, length, dim = x.shape
  weights = jnp.flip(cema_powers(q, block), axis=-1)  # [D, N, T]: q^(T - 1 - l)
  chunks = x.astype(jnp.float32).reshape(batch, length // block, block, dim)
  hi = lax.Precision.HIGHEST
  return lax.complex(jnp.einsum("dnl,bjld->bjdn", jnp.real(weights), chunks, precision=hi),
                     jnp.einsum("dnl,bjld->bjdn", jnp.imag(weights), chunks, precision=hi))


def supported(dim: int, order: int, block: int) -> bool:
  """Whether the kernel takes these shapes (Triton blocks are powers of two)."""
  power_of_2 = lambda n: n >= 1 and n & (n - 1) == 0  # noqa: E731
  return power_of_2(order) and power_of_2(block) and (dim % _BLOCK_D == 0 or power_of_2(dim))


# How a program holds its [N, block_d] lanes (a static switch for benchmarking, see use_layout):
#   "planes":    one [N, block_d] array per plane; x's row broadcasts over the orders and the
#                backward's per-step sum over the orders is an array reduction;
#   "per_order": N separate [block_d] vectors per plane, the orders unrolled in Python, so every
#                thread holds all N orders of its channels: x's row needs no broadcast and the sum
#                over the orders is N - 1 adds in registers (the main scan kernel's layout idea).
# "per_order" is the default: at mega200M's L/2 = 16384 on an H200 its backward kernel took 0.066
# ms against 0.126 ("planes"), the forward 0.068 against 0.070 (2026-11-29,
# experiments/results/gpu_checks/2026-11-29_nvidia-h200_sp_summary_profile.log).
LAYOUTS = ("planes", "per_order")
_layout = "per_order"


@contextlib.contextmanager
def use_layout(layout: str):
  """Within the block, kernels traced from here on use `layout` (LAYOUTS): an A/B switch for the
  profile scripts; the layout is static, fixed when a function is traced."""
  global _layout
  if layout not in LAYOUTS:
    raise ValueError(f"unknown chunk-summary layout {layout!r}; valid: {', '.join(LAYOUTS)}")
  previous, _layout = _layout, layout
  try:
    yield
  finally:
    _layout = previous


def _load_planes(ref, per_order: bool) -> list:
  """[N, block_d] ref -> [array [N, block_d]] or N arrays [block_d]."""
  if not per_order:
    return [ref[...]]
  return [ref[pl.ds(n, 1), :].reshape(ref.shape[1]) for n in range(ref.shape[0])]


def _store_planes(ref, planes: list, per_order: bool) -> None:
  if not per_order:
    ref[...] = planes[0]
    return
  for n, plane in enumerate(planes):
    ref[pl.ds(n, 1), :] = plane[None, :]


def _load_row(ref, t, per_order: bool):
  """Row t of a [T, block_d] ref as float32: [1, block_d] (broadcasts over the orders) or [block_d]."""
  row = ref[pl.ds(t, 1), :].astype(jnp.float32)
  return row.reshape(row.shape[1]) if per_order else row


def _forward_kernel(x_ref, qre_ref, qim_ref, *out_refs, steps: int, derivative: bool, per_order: bool,
                    ptx_fma: bool):
  qre, qim = _load_planes(qre_ref, per_order), _load_planes(qim_ref, per_order)
  zeros = [jnp.zeros_like(a) for a in qre]
  unroll = min(_UNROLL, steps)
  fma = _ptx_fma if ptx_fma else _plain_fma

  def tile(i, carry):
    # The tile's rows are loaded up front, so their latencies overlap instead of adding up.
    rows = [_load_row(x_ref, i * unroll + u, per_order) for u in range(unroll)]
    sr, si, dr, di = (list(planes) for planes in carry)
    for xt in rows:
      for n in range(len(sr)):
        if derivative:  # S' <- q S' + S with the S from before this step
          dr[n], di[n] = (fma(qre[n], dr[n], fma(-qim[n], di[n], sr[n])),
                          fma(qim[n], dr[n], fma(qre[n], di[n], si[n])))
        sr[n], si[n] = fma(qre[n], sr[n], fma(-qim[n], si[n], xt)), fma(qim[n], sr[n], qre[n] * si[n])
    return sr, si, dr, di

  final = lax.fori_loop(0, steps // unroll, tile, (zeros, zeros, zeros, zeros))
  for ref, planes in zip(out_refs, final):  # S (and S' when asked for)
    _store_planes(ref, planes, per_order)


def _backward_kernel(g_re, g_im, qre_ref, qim_ref, dx_ref, *, steps: int, per_order: bool, ptx_fma: bool):
  qre, qim = _load_planes(qre_ref, per_order), _load_planes(qim_ref, per_order)
  unroll = min(_UNROLL, steps)
  fma = _ptx_fma if ptx_fma else _plain_fma

  def tile(i, carry):
    zr, zi = (list(planes) for planes in carry)  # conj(G) q^(T - 1 - l) at l = T - 1 - (i unroll + u)
    last = steps - 1 - i * unroll
    for u in range(unroll):
      total = functools.reduce(jnp.add, zr) if per_order else jnp.sum(zr[0], axis=0)
      dx_ref[pl.ds(last - u, 1), :] = total[None, :]
      for n in range(len(zr)):
        zr[n], zi[n] = fma(-qim[n], zi[n], qre[n] * zr[n]), fma(qim[n], zr[n], qre[n] * zi[n])
    return zr, zi

  conj_g = (_load_planes(g_re, per_order), [-a for a in _load_planes(g_im, per_order)])
  lax.fori_loop(0, steps // unroll, tile, conj_g)


def _specs(block: int, order: int, block_d: int):
  seq = pl.BlockSpec((None, block, block_d), lambda b, j, d: (b, j, d))
  coef = pl.BlockSpec((order, block_d), lambda b, j, d: (0, d))
  summary = pl.BlockSpec((None, None, order, block_d), lambda b, j, d: (b, j, 0, d))
  return seq, coef, summary


def _call(kernel, x_shape, order: int, block: int, interpret: bool, name: str, in_specs, out_specs,
          out_shape, *args, **static):
  batch, length, dim = x_shape
  block_d = min(_BLOCK_D, dim)
  kwargs = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=1)}
  # Multiply-adds as PTX FMAs when compiled: Triton through XLA does not contract a * b + c
  # (kernels_pallas.cema.CemaKernelConfig.ptx_fma); the interpreter keeps plain arithmetic.
  return pl.pallas_call(functools.partial(kernel, steps=block, ptx_fma=not interpret, **static),
                        grid=(batch, length // block, dim // block_d), in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=interpret, name=name, **kwargs)(*args)


def _forward(x: Array, qre: Array, qim: Array, block: int, interpret: bool, per_order: bool, derivative: bool):
  """x [B, J T, D]; q planes [N, D] -> (S re, S im) and with `derivative` also (S' re, S' im),
  each [B, J, N, D] float32."""
  batch, length, dim = x.shape
  order = qre.shape[0]
  seq, coef, summary = _specs(block, order, min(_BLOCK_D, dim))
  outputs = 4 if derivative else 2
  plane = jax.ShapeDtypeStruct((batch, length // block, order, dim), jnp.float32)
  return _call(_forward_kernel, x.shape, order, block, interpret, "cema_chunk_summaries", [seq, coef, coef],
               [summary] * outputs, [plane] * outputs, x, qre, qim, derivative=derivative, per_order=per_order)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _summaries(x: Array, qre: Array, qim: Array, block: int, interpret: bool, per_order: bool):
  s_re, s_im = _forward(x, qre, qim, block, interpret, per_order, derivative=False)  # not differentiated
  return s_re, s_im


def _summaries_fwd(x, qre, qim, block, interpret, per_order):
  s_re, s_im, d_re, d_im = _forward(x, qre, qim, block, interpret, per_order, derivative=True)
  # The backward needs only x's dtype (its shape follows from S'): a zero-size placeholder keeps
  # it, so that x itself is not saved once more (in a layer scan: a stacked copy per layer).
  return (s_re, s_im), (jnp.zeros((0,), x.dtype), qre, qim, d_re, d_im)


def _summaries_bwd(block, interpret, per_order, residuals, cotangents):
  x_tag, qre, qim, d_re, d_im = residuals
  g_re, g_im = cotangents
  batch, chunks, order, dim = d_re.shape
  x_shape = (batch, chunks * block, dim)
  seq, coef, summary = _specs(block, order, min(_BLOCK_D, dim))
  dx = _call(_backward_kernel, x_shape, order, block, interpret, "cema_chunk_summaries_bwd",
             [summary, summary, coef, coef], seq, jax.ShapeDtypeStruct(x_shape, jnp.float32),
             g_re, g_im, qre, qim, per_order=per_order)
  dq_re = jnp.sum(g_re * d_re + g_im * d_im, axis=(0, 1))
  dq_im = jnp.sum(g_im * d_re - g_re * d_im, axis=(0, 1))
  return dx.astype(x_tag.dtype), dq_re, dq_im


_summaries.defvjp(_summaries_fwd, _summaries_bwd)


def chunk_summaries_planes(x: Array, q: Array, block: int, interpret: bool = False) -> tuple[Array, Array]:
  """(Re S, Im S), each [B, J, N, D] float32, the kernel's own layout (channels minor, so that a
  caller reducing over the chunks reads whole rows); see chunk_summaries_pallas."""
  batch, length, dim = x.shape
  order = q.shape[-1]
  if q.shape != (dim, order) or length % block:
    raise ValueError(f"chunk summaries need x [B, J*{block}, D] and q [D, N]; got x {x.shape}, q {q.shape}")
  if not supported(dim, order, block):
    raise ValueError(f"chunk summaries need power-of-2 N and block and D a multiple of {_BLOCK_D} "
                     f"(or a power of 2); got D={dim}, N={order}, block={block}. Use chunk_summaries_reference.")
  q = jnp.asarray(q).astype(jnp.complex64).T  # [N, D]
  # The layout is read here, at trace time, and rides along to the backward as a static argument.
  return _summaries(x, jnp.real(q), jnp.imag(q), block, interpret, _layout == "per_order")


def chunk_summaries_pallas(x: Array, q: Array, block: int, interpret: bool = False) -> Array:
  """S [B, J, D, N] complex64 (see the module docstring) for x [B, J block, D] (float32 or
  bfloat16) and q [D, N] complex. Differentiable in x and q. Needs supported(D, N, block)."""
  s_re, s_im = chunk_summaries_planes(x, q, block, interpret)
  return jnp.moveaxis(lax.complex(s_re, s_im), 2, 3)  # [B, J, D, N]
