"""Float64 CEMA reference for the numerics study: outputs, final state and exact gradients.

The recurrence (SPEC §2), per channel d and order n, with the state kept without its input scale:
    v_t = q v_{t-1} + x_t,   h_t = p v_t,   y_t = Re(sum_n eta_n p_n v_t,n) + omega_d x_t.
For the loss  l = sum_{b,t,d} w_{b,t,d} y_{b,t,d}  the gradients have closed forms (JAX's
convention for a complex parameter z: the gradient of Re(F(z)) is F'(z)):
    dl/dx_j  = omega w_j + Re(sum_n p eta u_j),  u_j = sum_{t >= j} q^(t-j) w_t
             (the same recurrence run backwards over w: no stored states needed),
    dl/dp    = Re(eta S),   dl/deta = p S,   dl/dq = eta p R,
    S = sum_{b,t} w_t v_t,  R = sum_{b,t} w_t z_t,  z_t = dv_t/dq = q z_{t-1} + v_{t-1}.
So the reference runs the forward recurrence once (carrying v and z, accumulating S and R) and
once more over the reversed w, and never stores a [B, L, D, N] array.

Why blocked: a plain lax.scan over 1M steps is slow (one tiny loop iteration per step; tens of
microseconds each on a GPU). Instead the sequence is cut into K blocks of T ~ sqrt(L) steps.
A scan of T steps runs all K blocks at once from a zero state; a scan of K steps then carries
the true state across blocks, and each block's outputs get the incoming state's contribution
q^(tau+1) V in closed form. Every number is still formed by float64 sequential arithmetic over
at most T + K steps, so the reference is accurate to ~1e-13 relative, far below any float32 error.
Powers q^tau (tau <= T) come from repeated multiplication in complex128 (error ~ tau * 1e-16).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Reference(NamedTuple):
  """Float64 results for one input set (numpy arrays; gradients summed over the batch).

  y: [B, L, D] float64; h: [B, D, N] complex128 (final state h_L); dx: [B, L, D] float64 or None;
  dp: [D, N] float64; dq, deta: [D, N] complex128 (JAX's convention for complex gradients).
  """
  y: np.ndarray
  h: np.ndarray
  dx: np.ndarray | None
  dp: np.ndarray
  dq: np.ndarray
  deta: np.ndarray


def block_size(length: int) -> int:
  """T: a power of two near sqrt(length) (at least 1)."""
  return 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(length)))))


def _powers(q: jax.Array, count: int) -> jax.Array:
  """q^0 .. q^(count-1) by repeated multiplication: q [D, N] -> [D, N, count]."""
  def step(current, _):
    return current * q, current
  _, out = jax.lax.scan(step, jnp.ones_like(q), None, length=count)
  return jnp.moveaxis(out, 0, -1)


@functools.partial(jax.jit, static_argnames=("block", "with_sums"))
def _core(x, w, p, q, eta, *, block: int, with_sums: bool):
  """Blocked float64 recurrence. x, w: [B, L, D] with L = K * block; p [D, N]; q, eta [D, N].

  Returns (y [B, L, D] = Re(sum_n eta p v), v_L [B, D, N], S [D, N], R [D, N]).
  """
  batch, length, dim = x.shape
  order = p.shape[1]
  count = length // block
  c = eta * p
  # [T, K, B, D]: step tau of every block k.
  xs = jnp.transpose(x.reshape(batch, count, block, dim), (2, 1, 0, 3))
  ws = jnp.transpose(w.reshape(batch, count, block, dim), (2, 1, 0, 3))
  zeros = jnp.zeros((count, batch, dim, order), jnp.complex128)
  sums = jnp.zeros((dim, order), jnp.complex128)

  def local_step(carry, inputs):
    v, z, s, r = carry
    x_t, w_t = inputs
    z = q * z + v  # uses v_{t-1}
    v = q * v + x_t[..., None]
    if with_sums:
      s = s + jnp.sum(w_t[..., None] * v, axis=(0, 1))
      r = r + jnp.sum(w_t[..., None] * z, axis=(0, 1))
    return (v, z, s, r), jnp.sum(jnp.real(c * v), axis=-1)

  (v_end, z_end, s, r), y_local = jax.lax.scan(local_step, (zeros, zeros, sums, sums), (xs, ws))

  powers = _powers(q, block + 1)  # [D, N, T + 1]
  q_block = powers[..., block]
  dq_block = block * powers[..., block - 1]  # d q^T / dq

  def cross_step(carry, inputs):
    big_v, big_z = carry
    v_local, z_local = inputs
    incoming = (big_v, big_z)
    big_z = dq_block * big_v + q_block * big_z + z_local
    big_v = q_block * big_v + v_local
    return (big_v, big_z), incoming

  state = jnp.zeros((batch, dim, order), jnp.complex128)
  (v_last, _), (v_in, z_in) = jax.lax.scan(cross_step, (state, state), (v_end, z_end))

  # Contribution of the incoming state V to step tau of its block: q^(tau+1) V.
  decay = powers[..., 1:]  # [D, N, T]
  y_carry = jnp.real(jnp.einsum("dnt,kbdn->tkbd", c[..., None] * decay, v_in))
  y = jnp.transpose(y_local + y_carry, (2, 1, 0, 3)).reshape(batch, length, dim)
  if with_sums:
    taus = jnp.arange(1, block + 1, dtype=jnp.float64)
    a = jnp.einsum("tkbd,dnt->kbdn", ws, decay)  # sum_tau w q^(tau+1)
    a_prime = jnp.einsum("tkbd,dnt->kbdn", ws, taus * powers[..., :block])  # sum_tau w (tau+1) q^tau
    s = s + jnp.sum(v_in * a, axis=(0, 1))
    r = r + jnp.sum(v_in * a_prime + z_in * a, axis=(0, 1))
  return y, v_last, s, r


def _front_pad(a: np.ndarray, pad: int) -> np.ndarray:
  return np.pad(a, ((0, 0), (pad, 0), (0, 0)))


def reference(x: np.ndarray, w: np.ndarray, p: np.ndarray, q: np.ndarray, eta: np.ndarray,
              omega: np.ndarray | None = None, *, with_dx: bool = True,
              block: int | None = None) -> Reference:
  """Float64 CEMA of x and the gradients of sum(y * w). Enables x64 only inside this call.

  x, w: [B, L, D] real (any float dtype; values are taken exactly); p: [D, N] real;
  q, eta: [D, N] complex; omega: [D] or None (zeros). with_dx: also run the backward recurrence
  for dl/dx (it does not depend on x, so callers comparing several inputs can reuse it).
  block: steps per block (default: a power of two near sqrt(L)).
  """
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  if x.ndim != 3 or w.shape != x.shape:
    raise ValueError(f"x and w must both be [batch, length, dim]; got {x.shape} and {w.shape}")
  batch, length, dim = x.shape
  p = np.asarray(p, np.float64)
  q = np.asarray(q, np.complex128)
  eta = np.asarray(eta, np.complex128)
  if p.ndim != 2 or p.shape[0] != dim or q.shape != p.shape or eta.shape != p.shape:
    raise ValueError(f"p, q, eta must all be [D={dim}, N]; got {p.shape}, {q.shape}, {eta.shape}")
  omega = np.zeros(dim) if omega is None else np.asarray(omega, np.float64).reshape(dim)
  block = block_size(length) if block is None else int(block)
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  # Leading zeros leave the state at zero, so padding at the front changes nothing.
  pad = (-length) % block
  with jax.enable_x64(True):
    y, v_last, s, r = _core(_front_pad(x, pad), _front_pad(w, pad), p, q, eta, block=block,
                            with_sums=True)
    y = np.asarray(y)[:, pad:] + omega * x
    dx = None
    if with_dx:
      # u_j = sum_{t >= j} q^(t-j) w_t is the forward recurrence over reversed w.
      back, _, _, _ = _core(_front_pad(w[:, ::-1], pad), np.zeros_like(_front_pad(w, pad)), p, q,
                            eta, block=block, with_sums=False)
      dx = np.asarray(back)[:, pad:][:, ::-1] + omega * w
    v_last, s, r = np.asarray(v_last), np.asarray(s), np.asarray(r)
  return Reference(y=y, h=p * v_last, dx=dx, dp=np.real(eta * s), dq=eta * p * r, deta=p * s)
