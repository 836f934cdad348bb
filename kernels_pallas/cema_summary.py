"""A sequence slice's CEMA summary as Pallas (Triton) kernels, with one custom VJP.

For a slice x: [B, L, D] (real) and q: [D, N] (complex, |q| <= 1), sequence parallelism
(ops.cema.cema_slice_summary) needs the state the slice ends in from a zero start, per unit p,
and the decay that carries an earlier state across it:

  h[b, n, d] = sum_{t < L} q[d, n]^(L - 1 - t) x[b, t, d],        q^L.

The slice is cut into J chunks of T steps (zeros in front fill it to J T), so that
h = sum_j c_j S_j with S_j = sum_{l < T} q^(T - 1 - l) x[j T + l] (the chunk's own sum) and
c_j = q^(T (J - 1 - j)) from the double-float power tables (kernels_pallas.cema.power_table_planes,
float32-accurate at any exponent). The plain-XLA form (a float32 einsum against a table of q^l
batched over the channels, ops.cema's "xla" powers) took 0.72 ms fwd+bwd per mega200M layer at
L = 16384 on an H200, as long as the slice's whole CEMA scan.

Kernels: one program per (batch, chunk, block of 128 channels), all N orders of its channels in
registers; Horner's rule along the chunk (S <- q S + x_t, 4 FMAs per step and lane, PTX FMAs when
compiled), and, when differentiating, the q-derivative beside it (S' <- q S' + S). The program
weights its chunk itself: it writes c_j S_j and A_j = c_j S'_j + c'_j S_j, with
c'_j = T (J - 1 - j) q^(T (J - 2 - j)) q^(T - 1), and XLA sums them over the chunks, so that
dh/dq = sum_j A_j = H' is one [B, N, D] residual. The result is scaled by a real s [D, N] (CEMA's
p) inside the VJP: p h then costs no residuals of its own. Complex values travel as real /
imaginary float32 planes (Pallas has no complex dtype); the VJP, for the planes' cotangents
s G = s (Gre + i Gim) of h (G: those of s h):
  dx[b, j T + l, d] = sum_n Re(conj(s G) c_j q^(T - 1 - l))  -> a reverse walk z <- q z from conj(s G) c_j;
  dq_re = sum_b Re(conj(s G) H') + Re(conj(Gd) L q^(L - 1)),  dq_im = -Im(...) likewise (Gd: q^L's);
  ds = sum_b Re(conj(G) h).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from kernels_pallas.triton_backend import plgpu

from kernels_pallas.cema import _plain_fma, _ptx_fma
from megalodon_jax.ops.cema import cema_powers

Array = jax.Array

_BLOCK_D = 128  # channels per program: lanes [N, 128] (2048 at N = 16) over 4 warps
_UNROLL = 16  # steps per loop iteration, statically unrolled (blocks are powers of 2)


def slice_summary_reference(x: Array, q: Array, length: int) -> tuple[Array, Array, Array]:
  """The plain-JAX reference of slice_summary_planes: (Re h, Im h) [B, N, D] float32 with
  h = sum_t q^(P - 1 - t) x_t over x's P steps, and q^length [D, N] complex64."""
  batch, padded, dim = x.shape
  weights = jnp.flip(cema_powers(q, padded), axis=-1)  # [D, N, P]: q^(P - 1 - t)
  hi = lax.Precision.HIGHEST
  xs = x.astype(jnp.float32)
  h_re = jnp.einsum("dnt,btd->bnd", jnp.real(weights), xs, precision=hi)
  h_im = jnp.einsum("dnt,btd->bnd", jnp.imag(weights), xs, precision=hi)
  return h_re, h_im, cema_powers(q, 1, offset=length)[..., 0]


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
# "per_order" is the default: at mega200M's L/2 = 16384 on an H200 the backward took 0.066 ms
# against 0.126 ("planes"), the forward 0.068 against 0.070 (2026-11-29, chunk sums before the
# weighting moved into the kernel; experiments/results/gpu_checks/2026-11-29_nvidia-h200_sp_summary_profile.log).
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


# Why one custom VJP for the whole summary: differentiating the chunk sums and the weighting by the
# tables separately kept S_j, S'_j, c_j and the tables' JVP residuals per layer (a layer scan
# stacks each) and ran the sum's backward, the tables' JVP and their layout changes as ~20 small
# XLA kernels. Here only c (the backward's start) and one array of H', h and L q^(L - 1) are kept
# (besides q and s, which the CEMA scan's VJP keeps too): under a layer scan every residual is a
# stacked buffer, zero-filled, written and read back, a few microseconds each per layer on an
# H200, while packing the [B, N, D]-sized ones is one small copy.


def _cmul(ar, ai, br, bi):
  """Complex products of plane lists: (ar + i ai)(br + i bi)."""
  return ([a * b - c * d for a, b, c, d in zip(ar, br, ai, bi)],
          [a * d + c * b for a, b, c, d in zip(ar, br, ai, bi)])


def _slice_forward_kernel(x_ref, qre_ref, qim_ref, cre_ref, cim_ref, *refs, steps: int, count: int,
                          derivative: bool, per_order: bool, ptx_fma: bool):
  if derivative:
    hre_ref, him_ref, lre_ref, lim_ref, pre_ref, pim_ref, are_ref, aim_ref = refs
  else:
    pre_ref, pim_ref = refs
  qre, qim = _load_planes(qre_ref, per_order), _load_planes(qim_ref, per_order)
  zeros = [jnp.zeros_like(a) for a in qre]
  unroll = min(_UNROLL, steps)
  fma = _ptx_fma if ptx_fma else _plain_fma

  def tile(i, carry):
    rows = [_load_row(x_ref, i * unroll + u, per_order) for u in range(unroll)]
    sr, si, dr, di = (list(planes) for planes in carry)
    for xt in rows:
      for n in range(len(sr)):
        if derivative:
          dr[n], di[n] = (fma(qre[n], dr[n], fma(-qim[n], di[n], sr[n])),
                          fma(qim[n], dr[n], fma(qre[n], di[n], si[n])))
        sr[n], si[n] = fma(qre[n], sr[n], fma(-qim[n], si[n], xt)), fma(qim[n], sr[n], qre[n] * si[n])
    return sr, si, dr, di

  sr, si, dr, di = lax.fori_loop(0, steps // unroll, tile, (zeros, zeros, zeros, zeros))
  cre, cim = _load_planes(cre_ref, per_order), _load_planes(cim_ref, per_order)
  pr, pi = _cmul(cre, cim, sr, si)
  _store_planes(pre_ref, pr, per_order)
  _store_planes(pim_ref, pi, per_order)
  if derivative:
    # c'_j from q^(T (J - 2 - j)) (clamped to j = J - 2: the last chunk's c' is 0) and q^(T - 1).
    weight = (steps * (count - 1 - pl.program_id(1))).astype(jnp.float32)
    hr, hi = _cmul(_load_planes(hre_ref, per_order), _load_planes(him_ref, per_order),
                   _load_planes(lre_ref, per_order), _load_planes(lim_ref, per_order))
    ar, ai = _cmul(cre, cim, dr, di)
    br, bi = _cmul([weight * a for a in hr], [weight * a for a in hi], sr, si)
    _store_planes(are_ref, [a + b for a, b in zip(ar, br)], per_order)
    _store_planes(aim_ref, [a + b for a, b in zip(ai, bi)], per_order)


def _slice_backward_kernel(g_re, g_im, qre_ref, qim_ref, cre_ref, cim_ref, dx_ref, *, steps: int,
                           per_order: bool, ptx_fma: bool):
  qre, qim = _load_planes(qre_ref, per_order), _load_planes(qim_ref, per_order)
  unroll = min(_UNROLL, steps)
  fma = _ptx_fma if ptx_fma else _plain_fma
  gr, gi = _load_planes(g_re, per_order), _load_planes(g_im, per_order)
  cr, ci = _load_planes(cre_ref, per_order), _load_planes(cim_ref, per_order)
  start = ([a * c + b * d for a, b, c, d in zip(gr, gi, cr, ci)],  # conj(G) c_j
           [a * d - b * c for a, b, c, d in zip(gr, gi, cr, ci)])

  def tile(i, carry):
    zr, zi = (list(planes) for planes in carry)
    last = steps - 1 - i * unroll
    for u in range(unroll):
      total = functools.reduce(jnp.add, zr) if per_order else jnp.sum(zr[0], axis=0)
      dx_ref[pl.ds(last - u, 1), :] = total[None, :]
      for n in range(len(zr)):
        zr[n], zi[n] = fma(-qim[n], zi[n], qre[n] * zr[n]), fma(qim[n], zr[n], qre[n] * zi[n])
    return zr, zi

  lax.fori_loop(0, steps // unroll, tile, start)


def _slice_tables(qre, qim, block: int, count: int, length: int, interpret: bool):
  """From one power-table kernel: the weights c = q^(T j) in table order as [2, J, N, D] (real and
  imaginary planes stacked: one array to keep), q^(T - 1) planes [N, D] x2, q^L and L q^(L - 1) as
  (re, im) [N, D] pairs."""
  from kernels_pallas.cema import power_table_planes  # the double-float tables
  order, dim = qre.shape
  hr, hi, lr, li = power_table_planes(qre.reshape(-1), qim.reshape(-1), block, count, 0, interpret)
  high = jnp.stack([hr, hi]).reshape(2, count, order, dim)
  low = (lr.reshape(block, order, dim), li.reshape(block, order, dim))

  def power(exponent):  # q^exponent, exponent <= T J, from at most three float32-accurate factors
    j, l = divmod(exponent, block)
    if j < count:
      re, im = _cmul([high[0, j]], [high[1, j]], [low[0][l]], [low[1][l]])
      return re[0], im[0]
    re, im = _cmul([high[0, count - 1]], [high[1, count - 1]], [low[0][block - 1]], [low[1][block - 1]])
    re, im = _cmul(re, im, [qre], [qim])
    return re[0], im[0]

  decay = power(length)
  below = power(length - 1)
  return high, (low[0][block - 1], low[1][block - 1]), decay, (length * below[0], length * below[1])


def _slice_specs(block: int, order: int, block_d: int, count: int):
  seq = pl.BlockSpec((None, block, block_d), lambda b, j, d: (b, j, d))
  coef = pl.BlockSpec((order, block_d), lambda b, j, d: (0, d))
  # The stacked weights [2, J, N, D]: chunk j takes c_j = q^(T (J - 1 - j)) (and for c'_j the
  # entry one lower, clamped: the last chunk's c' is 0), real plane then imaginary plane.
  carry = [pl.BlockSpec((None, None, order, block_d), lambda b, j, d, part=part: (part, count - 1 - j, 0, d))
           for part in (0, 1)]
  shifted = [pl.BlockSpec((None, None, order, block_d),
                          lambda b, j, d, part=part: (part, jnp.maximum(count - 2 - j, 0), 0, d)) for part in (0, 1)]
  chunk = pl.BlockSpec((None, None, order, block_d), lambda b, j, d: (b, j, 0, d))
  row = pl.BlockSpec((None, order, block_d), lambda b, j, d: (b, 0, d))
  return seq, coef, carry, shifted, chunk, row


def _planes(q):
  """q [D, N] complex -> (Re q^T, Im q^T), each [N, D] float32: the kernels' lanes."""
  q = jnp.asarray(q).astype(jnp.complex64).T
  return jnp.real(q), jnp.imag(q)


def _slice_forward(x, q, block, count, length, interpret, per_order, derivative):
  batch, padded, dim = x.shape
  qre, qim = _planes(q)
  order = qre.shape[0]
  high, low_last, decay, decay_d = _slice_tables(qre, qim, block, count, length, interpret)
  seq, coef, carry, shifted, chunk, _ = _slice_specs(block, order, min(_BLOCK_D, dim), count)
  plane = jax.ShapeDtypeStruct((batch, count, order, dim), jnp.float32)
  inputs, specs = [x, qre, qim, high, high], [seq, coef, coef, *carry]
  if derivative:
    inputs += [high, high, *low_last]
    specs += [*shifted, coef, coef]
  outputs = 4 if derivative else 2
  parts = _call(_slice_forward_kernel, x.shape, order, block, interpret, "cema_slice_summary", specs,
                [chunk] * outputs, [plane] * outputs, *inputs, count=count, derivative=derivative,
                per_order=per_order)
  sums = [jnp.sum(p, axis=1) for p in parts]  # over the chunks: [B, N, D]
  return sums, high, decay, decay_d


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _slice_summary(x, q, scale, block, count, length, interpret, per_order):
  (h_re, h_im), _, decay, _ = _slice_forward(x, q, block, count, length, interpret, per_order, False)
  return scale.T * h_re, scale.T * h_im, decay[0], decay[1]


def _slice_summary_fwd(x, q, scale, block, count, length, interpret, per_order):
  (h_re, h_im, a_re, a_im), high, decay, decay_d = _slice_forward(x, q, block, count, length, interpret,
                                                                  per_order, True)
  # Kept: q and scale themselves (the scan's VJP keeps the same arrays), the tables and one packed
  # array [4 B + 2, N, D]: H' and h (re, im planes), then L q^(L - 1) (re, im).
  packed = jnp.concatenate([a_re, a_im, h_re, h_im, decay_d[0][None], decay_d[1][None]])
  residuals = (jnp.zeros((0,), x.dtype), q, scale, packed, high)
  return (scale.T * h_re, scale.T * h_im, decay[0], decay[1]), residuals


def _slice_summary_bwd(block, count, length, interpret, per_order, residuals, cotangents):
  x_tag, q, scale, packed, high = residuals
  gs_re, gs_im, gd_re, gd_im = cotangents
  batch = (packed.shape[0] - 2) // 4
  a_re, a_im, h_re, h_im = (packed[i * batch:(i + 1) * batch] for i in range(4))
  dd_re, dd_im = packed[4 * batch], packed[4 * batch + 1]
  ds = jnp.sum(gs_re * h_re + gs_im * h_im, axis=0).T
  g_re, g_im = scale.T * gs_re, scale.T * gs_im  # the cotangents of h
  qre, qim = _planes(q)
  _, order, dim = g_re.shape
  x_shape = (batch, count * block, dim)
  seq, coef, carry, _, _, row = _slice_specs(block, order, min(_BLOCK_D, dim), count)
  dx = _call(_slice_backward_kernel, x_shape, order, block, interpret, "cema_slice_summary_bwd",
             [row, row, coef, coef, *carry], seq, jax.ShapeDtypeStruct(x_shape, jnp.float32),
             g_re, g_im, qre, qim, high, high, per_order=per_order)
  # dL = Re(conj(G) dh) with dh = H' dq (h holomorphic in q), and the same for q^L; as the
  # cotangent of the complex input (JAX: dL = Re(ct dq)), ct = dL/dRe q - i dL/dIm q.
  dq_re = jnp.sum(g_re * a_re + g_im * a_im, axis=0) + gd_re * dd_re + gd_im * dd_im
  dq_im = jnp.sum(g_im * a_re - g_re * a_im, axis=0) + gd_im * dd_re - gd_re * dd_im
  return dx.astype(x_tag.dtype), lax.complex(dq_re, -dq_im).T.astype(q.dtype), ds.astype(scale.dtype)


_slice_summary.defvjp(_slice_summary_fwd, _slice_summary_bwd)


def slice_summary_planes(x: Array, q: Array, block: int, length: int, interpret: bool = False,
                         scale: Array | None = None) -> tuple[Array, Array, Array]:
  """A slice's summary from x [B, J T, D] (zeros in front of its `length` real steps, so that J T
  >= length; T = block): (Re h, Im h) [B, N, D] float32 with h = s sum_t q^(J T - 1 - t) x_t, and
  q^length [D, N] complex64, differentiable in x, q and s (one custom VJP; see above). scale: the
  real s [D, N] (CEMA's p; None: 1). Needs supported(D, N, block) and block * J >= length."""
  batch, padded, dim = x.shape
  order = q.shape[-1]
  count = padded // block
  if q.shape != (dim, order) or padded % block or not (padded - block < length <= padded):
    raise ValueError(f"the slice summary needs x [B, J*{block}, D] with J*{block} - {block} < length <= J*{block} "
                     f"and q [D, N]; got x {x.shape}, q {q.shape}, length {length}")
  if scale is None:
    scale = jnp.ones((dim, order), jnp.float32)
  elif scale.shape != (dim, order) or jnp.iscomplexobj(scale):
    raise ValueError(f"the slice summary's scale must be real [D, N] = {(dim, order)}; got {scale.dtype}{scale.shape}")
  if not supported(dim, order, block):
    raise ValueError(f"the slice summary kernel needs power-of-2 N and block and D a multiple of {_BLOCK_D} "
                     f"(or a power of 2); got D={dim}, N={order}, block={block}.")
  h_re, h_im, d_re, d_im = _slice_summary(x, q, scale, block, count, length, interpret, _layout == "per_order")
  return h_re, h_im, lax.complex(d_re, d_im).T
