"""One decoding step of a block's TimestepNorm + CEMA as a single Pallas (Triton) kernel.

In a batch-1 decode step every kernel is tiny and costs its launch (~1-1.5 us on an H200), so the
XLA version of TimestepNorm (step moments, state merge, normalisation) followed by one CEMA step
and the RMSNorm statistics takes 4-9 kernels per layer. Everything here is local to a block of
whole norm groups: a group's moments are a reduction over its K features, the CEMA state update
is elementwise per (feature, order) and its readout a sum over the orders. Only the RMSNorm that
follows needs a sum over all features; the kernel writes the per-group sums of y^2 and leaves the
final 64-term sum to the caller (see megalodon_jax.decoding).

Per program (sequence b, groups [j GB, (j + 1) GB)), one step:
  TimestepNorm  m, v = mean, variance of x over each group's K features (two-pass, in registers);
                n' = n + 1, w = 1 / n', delta = m - mu, mu' = mu + w delta,
                var' = (1 - w) var + w v + (1 - w) w delta^2 (ops.timestep_norm.merge_stats);
                x_tsn = (x - mu') rsqrt(var' + eps) (weight + 1) + bias, rounded to x.dtype.
  CEMA          h' = q h + p x_tsn (complex, as real/imag float32 arrays: Pallas has no complex);
                y = Re(sum_n eta_n h'_n) + omega x_tsn (ops.cema.cema_sequential's step).
  RMS partial   s = sum over the group of y^2.

Arrays (G groups of K features, D = G K, N CEMA orders):
  x [B, G, K] (compute dtype); count [B, 1] int32 steps merged so far; mean, var [B, G] float32;
  weight, bias [G, K]; p, q_re, q_im, eta_re, eta_im [G, K, N] float32 (cema_coefficients);
  omega [G, K] float32; h_re, h_im [B, G, K, N] float32 (mean, var, h_re, h_im updated in place).
Returns x_tsn [B, G, K] (x.dtype), y [B, G, K] float32, sumsq [B, G] float32, count + 1 [B, 1]
(an XLA add: every program reads count, so the kernel cannot update it in place), mean', var' [B, G],
h_re', h_im'. Every state the kernel rewrites is aliased to its input: a state written to a new
buffer costs a copy back into the cache's buffer in a decode loop (a ~1 us memcpy kernel each).

`tsn_cema_step_reference` is the same math in plain JAX (the test oracle). `tsn_cema_step` runs
the Triton kernel on a GPU and the Pallas interpreter elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _triton_options(interpret: bool | None, num_warps: int, num_stages: int = 1) -> tuple[bool, dict]:
  """(interpret, pallas_call keyword arguments): the Pallas interpreter off a GPU unless told otherwise;
  on the GPU, Triton's warps per program and software-pipelining stages."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if interpret:
    return True, {}
  from kernels_pallas.triton_backend import plgpu
  return False, {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def _tsn_reference(x, count, mean, var, weight, bias, *, eps: float):
  """One TimestepNorm step of x [B, G, K] (count [B, 1] steps merged, mean/var [B, G]) -> (x_tsn in x's
  dtype, mean', var')."""
  f32 = jnp.float32
  xf = x.astype(f32)
  m = jnp.mean(xf, axis=-1)
  v = jnp.mean(jnp.square(xf - m[..., None]), axis=-1)
  w = 1.0 / (count.astype(f32) + 1.0)  # [B, 1]
  delta = m - mean
  new_mean = mean + w * delta
  new_var = (1.0 - w) * var + w * v + ((1.0 - w) * w) * (delta * delta)
  x_tsn = ((xf - new_mean[..., None]) * jax.lax.rsqrt(new_var + eps)[..., None] * (weight.astype(f32) + 1.0)
           + bias.astype(f32)).astype(x.dtype)
  return x_tsn, new_mean, new_var


def tsn_cema_step_reference(x, count, mean, var, weight, bias, p, q_re, q_im, eta_re, eta_im, omega, h_re, h_im,
                            *, eps: float, residual=None):
  """Plain-JAX oracle of the kernel; shapes and results as the module docstring says (with a residual:
  the step of (x + residual).astype(x.dtype), and that sum appended to the results)."""
  f32 = jnp.float32
  if residual is not None:
    total = (x + residual).astype(x.dtype)
    outs = tsn_cema_step_reference(total, count, mean, var, weight, bias, p, q_re, q_im, eta_re, eta_im, omega,
                                   h_re, h_im, eps=eps)
    return outs + (total,)
  x_tsn, new_mean, new_var = _tsn_reference(x, count, mean, var, weight, bias, eps=eps)
  xt = x_tsn.astype(f32)[..., None]
  new_re = q_re * h_re - q_im * h_im + p * xt
  new_im = q_re * h_im + q_im * h_re
  y = jnp.sum(eta_re * new_re - eta_im * new_im, axis=-1) + omega * xt[..., 0]
  return x_tsn, y, jnp.sum(y * y, axis=-1), count + 1, new_mean, new_var, new_re, new_im


def _tsn_update(x, count_ref, mean_ref, var_ref, weight_ref, bias_ref, *, eps: float, k: int, dtype):
  """The TimestepNorm step of a block of groups x [GB, K]: (x_tsn [GB, K] in dtype, mean', var' [GB])."""
  f32 = jnp.float32
  xf = x.astype(f32)
  m = jnp.sum(xf, axis=-1) * (1.0 / k)  # [GB]
  centered = xf - m[:, None]
  v = jnp.sum(centered * centered, axis=-1) * (1.0 / k)
  count = count_ref[0] + 1
  w = 1.0 / count.astype(f32)  # scalar
  mu = mean_ref[...]
  delta = m - mu
  new_mean = mu + w * delta
  new_var = (1.0 - w) * var_ref[...] + w * v + ((1.0 - w) * w) * (delta * delta)
  inv = jax.lax.rsqrt(new_var + eps)
  x_tsn = ((xf - new_mean[:, None]) * inv[:, None] * (weight_ref[...].astype(f32) + 1.0)
           + bias_ref[...].astype(f32)).astype(dtype)
  return x_tsn, new_mean, new_var


def _kernel(x_ref, count_ref, mean_ref, var_ref, weight_ref, bias_ref, p_ref, qr_ref, qi_ref, er_ref, ei_ref,
            omega_ref, hr_ref, hi_ref,
            xt_out, y_out, ss_out, mean_out, var_out, hr_out, hi_out, *, eps: float, k: int, x_value=None,
            y_scale_ref=None):
  """x_value: the block input already loaded (_kernel_extras' sum); None reads x_ref. y_scale_ref: y is
  written times this per-feature scale (in y_out's dtype); the sums of squares stay those of y."""
  f32 = jnp.float32
  x_tsn, new_mean, new_var = _tsn_update(x_ref[...] if x_value is None else x_value, count_ref, mean_ref, var_ref,
                                         weight_ref, bias_ref, eps=eps, k=k, dtype=xt_out.dtype)
  xt = x_tsn.astype(f32)
  qr, qi, hr, hi = qr_ref[...], qi_ref[...], hr_ref[...], hi_ref[...]  # [GB, K, N]
  new_re = qr * hr - qi * hi + p_ref[...] * xt[:, :, None]
  new_im = qr * hi + qi * hr
  y = jnp.sum(er_ref[...] * new_re - ei_ref[...] * new_im, axis=-1) + omega_ref[...] * xt
  xt_out[...] = x_tsn
  y_out[...] = y if y_scale_ref is None else (y * y_scale_ref[...].astype(f32)).astype(y_out.dtype)
  ss_out[...] = jnp.sum(y * y, axis=-1)
  mean_out[...] = new_mean
  var_out[...] = new_var
  hr_out[...] = new_re
  hi_out[...] = new_im


def _kernel_with_count(x_ref, count_ref, mean_ref, var_ref, weight_ref, bias_ref, p_ref, qr_ref, qi_ref, er_ref,
                       ei_ref, omega_ref, hr_ref, hi_ref, state_ref, xt_out, y_out, ss_out, mean_out, var_out, hr_out,
                       hi_out, state_out, *, eps: float, k: int, x_value=None, y_scale_ref=None):
  """_kernel, plus count + 1 written into the (aliased, never read) count_state buffer by one program."""
  del state_ref
  _kernel(x_ref, count_ref, mean_ref, var_ref, weight_ref, bias_ref, p_ref, qr_ref, qi_ref, er_ref, ei_ref, omega_ref,
          hr_ref, hi_ref, xt_out, y_out, ss_out, mean_out, var_out, hr_out, hi_out, eps=eps, k=k, x_value=x_value,
          y_scale_ref=y_scale_ref)

  @pl.when(pl.program_id(1) == 0)
  def _():
    state_out[0] = count_ref[0] + 1


def _kernel_extras(*refs, eps: float, k: int, with_count: bool, with_residual: bool, with_scale: bool):
  """_kernel / _kernel_with_count with the optional inputs after the 14 (+ count_state) of _kernel:
  residual (the previous block's deferred residual add: the step normalises x + residual, float32 add
  rounded to x's dtype as the XLA add did, and writes the sum as the last output, for the block's own
  residual adds), then y_scale (see _kernel)."""
  n_in = 14 + int(with_count) + int(with_residual) + int(with_scale)
  ins, outs = list(refs[:n_in]), list(refs[n_in:])
  scale_ref = ins.pop() if with_scale else None
  x_value = None
  if with_residual:
    res_ref, sum_out = ins.pop(), outs.pop()
    x_value = (ins[0][...].astype(jnp.float32) + res_ref[...].astype(jnp.float32)).astype(sum_out.dtype)
    sum_out[...] = x_value
  body = _kernel_with_count if with_count else _kernel
  body(*ins, *outs, eps=eps, k=k, x_value=x_value, y_scale_ref=scale_ref)


def _check(arrays: dict, groups_per_block: int):
  x, h_re = arrays["x"], arrays["h_re"]
  if x.ndim != 3 or h_re.ndim != 4:
    raise ValueError(f"x must be [batch, groups, group_size] and h_re [batch, groups, group_size, order], "
                     f"got shapes {x.shape} and {h_re.shape}")
  batch, groups, k = x.shape
  order = h_re.shape[-1]
  shapes = {"count": (batch, 1), "mean": (batch, groups), "var": (batch, groups), "weight": (groups, k),
            "bias": (groups, k), "omega": (groups, k), "h_re": (batch, groups, k, order),
            "h_im": (batch, groups, k, order)}
  shapes.update({name: (groups, k, order) for name in ("p", "q_re", "q_im", "eta_re", "eta_im")})
  for name, expect in shapes.items():
    got = arrays[name].shape
    if tuple(got) != expect:
      raise ValueError(f"{name} must have shape {expect} for x of shape {x.shape}, got {tuple(got)}")
  if groups % groups_per_block:
    raise ValueError(f"groups_per_block={groups_per_block} must divide the {groups} groups")


def default_groups_per_block(groups: int, group_size: int, order: int) -> int:
  """Groups per program: about 1024 (feature, order) entries each (registers), at least one group."""
  per_block = max(1, 1024 // (group_size * order))
  while groups % per_block:
    per_block //= 2
  return max(per_block, 1)


@functools.partial(jax.jit, static_argnames=("eps", "groups_per_block", "num_warps", "interpret"))
def tsn_cema_step(x, count, mean, var, weight, bias, p, q_re, q_im, eta_re, eta_im, omega, h_re, h_im, *,
                  eps: float, groups_per_block: int | None = None, num_warps: int = 4,
                  interpret: bool | None = None, count_state=None, residual=None, y_scale=None):
  """The kernel (see the module docstring); mean, var, h_re, h_im are updated in place when donated.

  residual: [B, G, K], a second addend of the step's input: the kernel normalises
  (x + residual).astype(x.dtype) (float32 add, one rounding: the previous block's residual add, one
  XLA kernel fewer) and returns that sum as a ninth result (the residual stream the block needs).

  y_scale: [G, K], y is returned times it, in x's dtype (e.g. the RMSNorm scale of a normalisation
  applied after the next product: the product then reads y as it is, with no elementwise producer
  XLA would recompute for every weight row); sumsq stays that of the unscaled y.

  count_state: [B, 1] int32, a buffer holding the same counts as `count` (e.g. a layer's own
  TimestepNorm count when every layer has seen the same steps, and `count` another layer's): the
  kernel writes count + 1 into it in place (one program per sequence), and that is the count
  returned. Without it, count + 1 is an XLA add whose result a decode loop copies back into the
  cache's buffer."""
  groups_per_block = groups_per_block or default_groups_per_block(*x.shape[1:], h_re.shape[-1])
  _check(dict(x=x, count=count, mean=mean, var=var, weight=weight, bias=bias, p=p, q_re=q_re, q_im=q_im,
              eta_re=eta_re, eta_im=eta_im, omega=omega, h_re=h_re, h_im=h_im), groups_per_block)
  batch, groups, k = x.shape
  order = p.shape[-1]
  gb = groups_per_block
  grid = (batch, groups // gb)
  seq = pl.BlockSpec((None, gb, k), lambda b, j: (b, j, 0))
  stat = pl.BlockSpec((None, gb), lambda b, j: (b, j))
  cnt = pl.BlockSpec((None, 1), lambda b, j: (b, 0))
  feat = pl.BlockSpec((gb, k), lambda b, j: (j, 0))
  coef = pl.BlockSpec((gb, k, order), lambda b, j: (j, 0, 0))
  state = pl.BlockSpec((None, gb, k, order), lambda b, j: (b, j, 0, 0))
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  y_shape = f32(x.shape) if y_scale is None else jax.ShapeDtypeStruct(x.shape, x.dtype)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), y_shape, f32((batch, groups)), f32((batch, groups)),
               f32((batch, groups)), f32(h_re.shape), f32(h_im.shape)]
  interpret, kwargs = _triton_options(interpret, num_warps)
  in_specs = [seq, cnt, stat, stat, feat, feat, coef, coef, coef, coef, coef, feat, state, state]
  out_specs = [seq, seq, stat, stat, stat, state, state]
  aliases = {2: 3, 3: 4, 12: 5, 13: 6}
  args = [x, count, mean.astype(jnp.float32), var.astype(jnp.float32), weight, bias, p, q_re, q_im, eta_re, eta_im,
          omega, h_re, h_im]
  kernel = _kernel
  if count_state is not None:
    if count_state.shape != count.shape or count_state.dtype != count.dtype:
      raise ValueError(f"count_state must be like count ({count.shape} {count.dtype}), got "
                       f"{count_state.shape} {count_state.dtype}")
    in_specs, out_specs, kernel = in_specs + [cnt], out_specs + [cnt], _kernel_with_count
    out_shape.append(jax.ShapeDtypeStruct(count.shape, count.dtype))
    aliases[14] = 7
    args.append(count_state)
  if residual is not None:
    if residual.shape != x.shape:
      raise ValueError(f"residual must have x's shape {x.shape}, got {residual.shape}")
    in_specs, out_specs, args = in_specs + [seq], out_specs + [seq], args + [residual]
    out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
  if y_scale is not None:
    if y_scale.shape != (groups, k):
      raise ValueError(f"y_scale must be [groups, group_size] = {(groups, k)}, got {y_scale.shape}")
    in_specs, args = in_specs + [feat], args + [y_scale]
  if residual is not None or y_scale is not None:
    kernel = functools.partial(_kernel_extras, with_count=count_state is not None, with_residual=residual is not None,
                               with_scale=y_scale is not None)
  outs = pl.pallas_call(
      functools.partial(kernel, eps=float(eps), k=k), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, input_output_aliases=aliases, interpret=interpret, name="tsn_cema_step", **kwargs,
  )(*args)
  x_tsn, y, sumsq, new_mean, new_var, new_re, new_im = outs[:7]
  new_count = outs[7] if count_state is not None else count + 1
  if residual is not None:
    return x_tsn, y, sumsq, new_count, new_mean, new_var, new_re, new_im, outs[-1]
  return x_tsn, y, sumsq, new_count, new_mean, new_var, new_re, new_im


# ---------------------------------------------------------------------------------------------
# Attention scores of one new query against the current chunk, with the new key written in place.
#
# The XLA version is a reduction for the per-head RMS of z, a dynamic-update-slice fusion that
# makes k (affine map, RoPE) and writes it, and a GEMM of the query (made from z again) with the
# keys: three kernels. Here every program recomputes q and k from z (a few hundred numbers) and
# scores one block of keys; the program whose block holds position `count` writes the new key.
#
# Layout: z's features per head are PERMUTED to [even features | odd features] (the real and
# imaginary parts of RoPE's pairs), in the projection's columns, its bias, the q/k affine maps and
# the key cache alike (see megalodon_jax.decoding.fuse_decode_params(permute_z=True) and
# permute_keys): dot products and RMS norms do not change under a common permutation, and the
# pairs become two contiguous halves (no strided loads).
#
# Arrays: proj [R, P] (R >= B rows; columns [h dz, (h + 1) dz) are head h's z before its bias);
# bias [H dz]; scale, shift [2, H dz] float32 (row 0: q, row 1: k); freqs [dz / 2] float32 (RoPE);
# keys [B, C, H, dz] (updated in place); count [1] int32 chunk position of the new token.
# Returns scores [B, H, C] float32 (-inf past count) and the keys.
# ---------------------------------------------------------------------------------------------


def _normalized_z(z_re, z_im, b_re, b_im, *, dz: int, eps: float, z_scale=None):
  """z's halves after the bias add (rounded to z's dtype, as the projection's output is) and the
  RMS normalisation over the head, float32. z_scale: a float32 scalar the raw product is multiplied
  by before the bias (the block's RMS normalisation applied after the product, see attend_step)."""
  f32 = jnp.float32
  scaled = (lambda z: z.astype(f32)) if z_scale is None else (lambda z: z_scale * z.astype(f32))
  z_re = (scaled(z_re) + b_re.astype(f32)).astype(z_re.dtype).astype(f32)
  z_im = (scaled(z_im) + b_im.astype(f32)).astype(z_im.dtype).astype(f32)
  inv = jax.lax.rsqrt((jnp.sum(z_re * z_re) + jnp.sum(z_im * z_im)) * (1.0 / dz) + eps)
  return z_re * inv, z_im * inv


def _rope(re, im, cos, sin, dtype):
  f32 = jnp.float32
  re, im = re.astype(dtype).astype(f32), im.astype(dtype).astype(f32)
  return (re * cos - im * sin).astype(dtype), (re * sin + im * cos).astype(dtype)


def _qk_inputs(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, *, dz: int) -> tuple:
  """The loads q and k are made from (z, bias, the q and k affine maps in halves, freqs): one place,
  so that a kernel can issue them together with its other loads."""
  half = dz // 2
  lo, hi = pl.ds(0, half), pl.ds(half, half)
  return (proj_ref[lo], proj_ref[hi], bias_ref[lo], bias_ref[hi], scale_ref[0, lo], scale_ref[0, hi],
          shift_ref[0, lo], shift_ref[0, hi], scale_ref[1, lo], scale_ref[1, hi], shift_ref[1, lo], shift_ref[1, hi],
          freqs_ref[...])


def _qk_math(inputs: tuple, count, *, dz: int, eps: float, dtype, z_scale=None):
  """The new token's q (float32) and k (dtype) halves of one head from _qk_inputs' arrays: bias, RMS
  norm, affine maps, RoPE (z_scale: see _normalized_z)."""
  f32 = jnp.float32
  z_re, z_im, b_re, b_im, sq_re, sq_im, hq_re, hq_im, sk_re, sk_im, hk_re, hk_im, freqs = inputs
  zn_re, zn_im = _normalized_z(z_re, z_im, b_re, b_im, dz=dz, eps=eps, z_scale=z_scale)
  angle = count.astype(f32) * freqs
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Row 0 of the affine maps makes q, row 1 makes k (layers/mega_attention.py).
  q_re, q_im = _rope(zn_re * sq_re + hq_re, zn_im * sq_im + hq_im, cos, sin, dtype)
  k_re, k_im = _rope(zn_re * sk_re + hk_re, zn_im * sk_im + hk_im, cos, sin, dtype)
  return q_re.astype(f32), q_im.astype(f32), k_re, k_im


def _query_key(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, count, *, dz: int, eps: float, dtype):
  """_qk_math of _qk_inputs: q (float32) and k (dtype) halves of one head."""
  return _qk_math(_qk_inputs(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, dz=dz), count, dz=dz, eps=eps,
                  dtype=dtype)


def _key_halves(keys_ref, rows, *, dz: int):
  """keys_ref[rows] as its two halves [n, dz / 2] (the real and imaginary parts of RoPE's pairs)."""
  half = dz // 2
  return keys_ref[rows, pl.ds(0, half)], keys_ref[rows, pl.ds(half, half)]


def _block_scores(keys_re, keys_im, q_re, q_im, k_re, k_im, count, start, *, block_k: int):
  """Scores [block_k] float32 of the positions [start, start + block_k) from their cached key halves
  [block_k, dz / 2]: the new key at `count`, -inf past it; and the positions."""
  f32 = jnp.float32
  scores = jnp.sum(keys_re.astype(f32) * q_re[None, :] + keys_im.astype(f32) * q_im[None, :], axis=-1)
  new_score = jnp.sum(k_re.astype(f32) * q_re + k_im.astype(f32) * q_im)
  pos = start + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
  scores = jnp.where(pos == count, new_score, scores)
  return jnp.where(pos <= count, scores, -jnp.inf), pos


def _scores_kernel(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, keys_ref, count_ref, scores_out, keys_out,
                   *, dz: int, eps: float, block_k: int):
  half = dz // 2
  lo, hi = pl.ds(0, half), pl.ds(half, half)
  count = count_ref[0]
  q_re, q_im, k_re, k_im = _query_key(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, count, dz=dz, eps=eps,
                                      dtype=keys_ref.dtype)
  j = pl.program_id(2)
  keys_re, keys_im = _key_halves(keys_ref, slice(None), dz=dz)
  scores_out[...], _ = _block_scores(keys_re, keys_im, q_re, q_im, k_re, k_im, count, j * block_k, block_k=block_k)

  @pl.when(count // block_k == j)
  def _():
    row = pl.ds(count - j * block_k, 1)
    keys_out[row, lo] = k_re[None, :]
    keys_out[row, hi] = k_im[None, :]


def qk_scores_step_reference(proj, bias, scale, shift, freqs, keys, count, *, eps: float, z_scale=None):
  """Plain-JAX oracle of `qk_scores_step` (same layout and rounding; z_scale [B, 1]: the raw product
  times it before the bias, see attend_step's sumsq)."""
  f32 = jnp.float32
  batch, chunk, heads, dz = keys.shape
  half = dz // 2
  z = proj[:batch, :heads * dz].astype(f32)
  z = z if z_scale is None else z_scale * z
  z = (z + bias.astype(f32)).astype(proj.dtype).astype(f32)
  z = z.reshape(batch, heads, dz)
  z = z * jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + eps)
  scale, shift = scale.reshape(2, heads, dz), shift.reshape(2, heads, dz)
  angle = count[0].astype(f32) * freqs
  cos, sin = jnp.cos(angle), jnp.sin(angle)

  def rope(t):
    re, im = t[..., :half].astype(keys.dtype).astype(f32), t[..., half:].astype(keys.dtype).astype(f32)
    return jnp.concatenate([re * cos - im * sin, re * sin + im * cos], axis=-1).astype(keys.dtype)

  q = rope(z * scale[0] + shift[0])
  k = rope(z * scale[1] + shift[1])
  keys = jax.lax.dynamic_update_slice(keys, k[:, None], (0, count[0], 0, 0))
  scores = jnp.einsum("bhd,bkhd->bhk", q.astype(f32), keys.astype(f32))
  valid = jnp.arange(chunk) <= count[0]
  return jnp.where(valid[None, None], scores, -jnp.inf), keys


def default_block_k(chunk: int) -> int:
  return min(chunk, 32)


def _check_qk_inputs(proj, bias, scale, shift, freqs, count, *, batch: int, heads: int, dz: int) -> None:
  """Shapes of the q/k inputs shared by qk_scores_step and attend_step (errors name the argument)."""
  if proj.ndim != 2 or proj.shape[0] < batch or proj.shape[1] < heads * dz:
    raise ValueError(f"proj must be [rows >= {batch}, columns >= {heads * dz}], got {proj.shape}")
  for name, arr, shape in (("bias", bias, (heads * dz,)), ("scale", scale, (2, heads * dz)),
                           ("shift", shift, (2, heads * dz)), ("freqs", freqs, (dz // 2,)), ("count", count, (1,))):
    if tuple(arr.shape) != shape:
      raise ValueError(f"{name} must have shape {shape}, got {tuple(arr.shape)}")


@functools.partial(jax.jit, static_argnames=("eps", "block_k", "num_warps", "interpret"))
def qk_scores_step(proj, bias, scale, shift, freqs, keys, count, *, eps: float, block_k: int | None = None,
                   num_warps: int = 4, interpret: bool | None = None):
  """The kernel (see above); `keys` is updated in place when donated."""
  batch, chunk, heads, dz = keys.shape
  block_k = block_k or default_block_k(chunk)
  if dz % 2 or chunk % block_k:
    raise ValueError(f"the head dim ({dz}) must be even and block_k ({block_k}) must divide the chunk ({chunk})")
  _check_qk_inputs(proj, bias, scale, shift, freqs, count, batch=batch, heads=heads, dz=dz)
  grid = (batch, heads, chunk // block_k)
  interpret, kwargs = _triton_options(interpret, num_warps)
  key_spec = pl.BlockSpec((None, block_k, None, dz), lambda b, h, j: (b, j, h, 0))
  return pl.pallas_call(
      functools.partial(_scores_kernel, dz=dz, eps=float(eps), block_k=block_k), grid=grid,
      in_specs=[pl.BlockSpec((None, dz), lambda b, h, j: (b, h)), pl.BlockSpec((dz,), lambda b, h, j: (h,)),
                pl.BlockSpec((2, dz), lambda b, h, j: (0, h)), pl.BlockSpec((2, dz), lambda b, h, j: (0, h)),
                pl.BlockSpec((dz // 2,), lambda b, h, j: (0,)), key_spec, pl.BlockSpec((1,), lambda b, h, j: (0,))],
      out_specs=[pl.BlockSpec((None, None, block_k), lambda b, h, j: (b, h, j)), key_spec],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, chunk), jnp.float32), jax.ShapeDtypeStruct(keys.shape, keys.dtype)],
      input_output_aliases={5: 1}, interpret=interpret, name="qk_scores_step", **kwargs,
  )(proj, bias, scale.astype(jnp.float32), shift.astype(jnp.float32), freqs.astype(jnp.float32), keys, count)


# ---------------------------------------------------------------------------------------------
# The whole attention of one new token over the current chunk (flash-decoding split of the chunk).
#
# After qk_scores_step, XLA still needs a softmax (2-3 kernels) and the product of the
# probabilities with the values, a GEMM that reads the [C, H, dv] value buffer (16.8 MB per layer
# for mega1.3B with a full chunk) at ~1.4 TB/s, plus the kernel that writes the new value. Here
# every program takes a block of positions and block_d value features of one head: it scores its
# positions as qk_scores_step does (the new key written by the d = 0 program of the block holding
# `count`), and writes its block's softmax statistics (max m, sum l of exp(s - m)) and acc = sum
# over its positions of exp(s - m) v, with the new value (v_new at `count`) written in place.
# Blocks entirely past `count` read nothing. `attend_combine` (XLA) or `attend_combine_pallas`
# merges the blocks: out = sum_j e^(m_j - M) acc_j / sum_j e^(m_j - M) l_j, M = max_j m_j.
#
# Forms (attend_step's arguments; H200 numbers in default_attend_form): one tile of block_k
# positions per program, its values used in sub_d-feature chunks (preload: every load issued
# first); a loop over `tiles` tiles of block_k positions with an online softmax and the next
# `preload` tiles loaded ahead in registers (the decode default: the load of tile t + 1 overlaps
# the arithmetic of tile t, and the q/k work is done once per tiles x block_k positions); mma: both
# products as tensor-core matrix products. Elementwise products of the probabilities with a wide
# value tile made Triton move the tile into the scores' register layout through shared memory
# (many barriers); the 8 x 1024 tiles of the default keep the value layout (17 barriers in all).
# Options that remove XLA kernels around it in a decode step: v_bias (v = silu(raw + bias) made
# here) and sumsq (the block's RMS normalisation applied to the raw product, inv returned).
#
# Arrays as qk_scores_step's, plus values [B, C, H, dv] (updated in place) and v_new [B, H, dv]
# (values' dtype; with v_bias the raw product). Returns stats [B, H, NB, 2] float32 (m, l),
# acc [B, H, NB, dv] float32 (NB = C / (tiles block_k)), keys, values[, inv [B, 1]].
# ---------------------------------------------------------------------------------------------


def _attend_block(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, keys_ref, values_ref, vnew_ref, acc_out,
                  count, start, *, dz: int, eps: float, block_k: int, block_d: int, sub_d: int, preload: bool,
                  z_scale=None):
  """One block of block_k positions (tiles = 1): writes acc_out, returns (m, l, k_re, k_im)."""
  f32 = jnp.float32
  chunks = [pl.ds(c * sub_d, sub_d) for c in range(block_d // sub_d)]
  if preload:
    # Every load first (values, keys, the q/k inputs, the new value): none depends on another, so
    # the program waits for memory once instead of once per step of the q/k -> scores -> values chain.
    tiles = [values_ref[:, cols] for cols in chunks]
    keys_re, keys_im = _key_halves(keys_ref, slice(None), dz=dz)
    inputs = _qk_inputs(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, dz=dz)
    new_values = [vnew_ref[cols] for cols in chunks]
  else:
    # The value tile first when it is one chunk; with several, each is loaded where it is used
    # (fewer registers).
    tiles = [values_ref[:, cols] for cols in chunks] if len(chunks) == 1 else [None] * len(chunks)
    inputs = _qk_inputs(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, dz=dz)
    new_values = [None] * len(chunks)
  q_re, q_im, k_re, k_im = _qk_math(inputs, count, dz=dz, eps=eps, dtype=keys_ref.dtype, z_scale=z_scale)
  if not preload:
    keys_re, keys_im = _key_halves(keys_ref, slice(None), dz=dz)
  scores, pos = _block_scores(keys_re, keys_im, q_re, q_im, k_re, k_im, count, start, block_k=block_k)
  m = jnp.max(scores)  # finite: position `start` <= count
  p = jnp.exp(scores - m)  # 0 past count
  at_new = (pos == count)[:, None]
  for cols, tile, new_value in zip(chunks, tiles, new_values):
    tile = values_ref[:, cols] if tile is None else tile  # [block_k, sub_d]
    new_value = vnew_ref[cols] if new_value is None else new_value
    v = jnp.where(at_new, new_value.astype(f32)[None, :], tile.astype(f32))
    acc_out[cols] = jnp.sum(p[:, None] * v, axis=0)
  return m, jnp.sum(p), k_re, k_im


def _dot(a, b, contracting):
  """a [M, K] times b ([K, N] or [N, K], by `contracting`) with float32 accumulation (tl.dot)."""
  return jax.lax.dot_general(a, b, (contracting, ((), ())), preferred_element_type=jnp.float32)


def _mma_tile(keys_re, keys_im, tile, q_rows, new_score, new_value, count, start, m_prev, *, block_k: int):
  """One tile of block_k positions from `start` with both products on the tensor cores.

  q_rows: q's halves as row 0 of two [16, dz / 2] matrices (rows 1.. zero); tile [block_k, block_d].
  Returns (m, alpha = e^(m_prev - m), l, acc [block_d] float32): the running max including this
  tile, and the tile's sum of p = e^(s - m) and sum of p v (the new value at `count`)."""
  f32, bf16 = jnp.float32, jnp.bfloat16
  scores = _dot(q_rows[0], keys_re, ((1,), (1,))) + _dot(q_rows[1], keys_im, ((1,), (1,)))
  scores = jnp.sum(scores, axis=0)  # [block_k]: rows 1.. are 0
  pos = start + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
  cached = (pos <= count) & (pos != count)
  in_tile = (count >= start) & (count - start < block_k)
  m = jnp.maximum(m_prev, jnp.max(jnp.where(cached, scores, -jnp.inf)))
  m = jnp.where(in_tile, jnp.maximum(m, new_score), m)  # finite: position `start` <= count
  p = jnp.where(cached, jnp.exp(scores - m), 0.0)
  p_new = jnp.where(in_tile, jnp.exp(new_score - m), 0.0)
  p_hi = p.astype(bf16)
  p_lo = (p - p_hi.astype(f32)).astype(bf16)
  row = jax.lax.broadcasted_iota(jnp.int32, (16, block_k), 0)
  weights = jnp.where(row == 0, p_hi[None, :], jnp.where(row == 1, p_lo[None, :], jnp.zeros((), bf16)))
  acc = jnp.sum(_dot(weights, tile.astype(bf16), ((1,), (0,))), axis=0) + p_new * new_value
  return m, jnp.exp(m_prev - m), jnp.sum(p) + p_new, acc


def _q_rows(q_re, q_im, dtype):
  """q's halves (bf16-exact) as row 0 of two [16, dz / 2] matrices, the rest zero (tl.dot needs M >= 16)."""
  row = jax.lax.broadcasted_iota(jnp.int32, (16, q_re.shape[0]), 0)
  as_rows = lambda v: jnp.where(row == 0, v.astype(dtype)[None, :], jnp.zeros((), dtype))
  return as_rows(q_re), as_rows(q_im)


def _attend_block_mma(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, keys_ref, values_ref, vnew_ref, acc_out,
                      count, start, *, dz: int, eps: float, block_k: int, z_scale=None):
  """_attend_block with both products on the tensor cores (every load issued first).

  Elementwise products of p with a [block_k, block_d] tile and a reduction over its positions make
  Triton move the whole tile into the scores' register layout through shared memory (and reduce
  across warps); as matrix products the layouts are Triton's dot operands. q (bf16-exact: RoPE's
  output is rounded to the keys' dtype) is row 0 of a [16, dz / 2] matrix times the key halves;
  the probabilities, split into bf16 p_hi + p_lo (|p - p_hi - p_lo| <= 2^-16 p), are rows 0 and 1 of
  a [16, block_k] matrix times the value tile (accumulated in float32). The position `count` is
  left out of the product and its new value added as p_new v_new."""
  f32 = jnp.float32
  tile = values_ref[...]  # [block_k, block_d]
  keys_re, keys_im = _key_halves(keys_ref, slice(None), dz=dz)
  inputs = _qk_inputs(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, dz=dz)
  new_value = vnew_ref[...].astype(f32)
  q_re, q_im, k_re, k_im = _qk_math(inputs, count, dz=dz, eps=eps, dtype=keys_ref.dtype, z_scale=z_scale)
  new_score = jnp.sum(k_re.astype(f32) * q_re + k_im.astype(f32) * q_im)
  m, _, l, acc = _mma_tile(keys_re, keys_im, tile, _q_rows(q_re, q_im, keys_ref.dtype), new_score, new_value, count,
                           start, jnp.asarray(-jnp.inf, f32), block_k=block_k)
  acc_out[...] = acc
  return m, l, k_re, k_im


def _attend_looped(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, keys_ref, values_ref, vnew_ref, acc_out,
                   count, start, *, dz: int, eps: float, block_k: int, block_d: int, tiles: int, preload: int,
                   mma: bool = False, z_scale=None):
  """`tiles` tiles of block_k positions, one after the other with an online softmax (the tiles past
  count are skipped): writes acc_out, returns (m, l, k_re, k_im). preload = P > 0: tile t + P is
  loaded before tile t is used (P tiles in flight in registers), else Triton's pipeliner
  (num_stages) may.
  mma: each tile's products on the tensor cores (_mma_tile)."""
  f32 = jnp.float32
  inputs = _qk_inputs(proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, dz=dz)
  new_value = vnew_ref[...].astype(f32)

  def load(t):
    offset = t * block_k if isinstance(t, int) else pl.multiple_of(t * block_k, block_k)
    rows = pl.ds(offset, block_k)
    return (*_key_halves(keys_ref, rows, dz=dz), values_ref[rows, :])

  depth = int(preload)
  first = tuple(load(min(i, tiles - 1)) for i in range(depth))
  q_re, q_im, k_re, k_im = _qk_math(inputs, count, dz=dz, eps=eps, dtype=keys_ref.dtype, z_scale=z_scale)

  if mma:
    q_rows = _q_rows(q_re, q_im, keys_ref.dtype)
    new_score = jnp.sum(k_re.astype(f32) * q_re + k_im.astype(f32) * q_im)

  def update(t, tile, m, l, acc):
    keys_re, keys_im, v = tile
    if mma:
      m_new, alpha, l_tile, acc_tile = _mma_tile(keys_re, keys_im, v, q_rows, new_score, new_value, count,
                                                 start + t * block_k, m, block_k=block_k)
      return m_new, l * alpha + l_tile, acc * alpha + acc_tile
    scores, pos = _block_scores(keys_re, keys_im, q_re, q_im, k_re, k_im, count, start + t * block_k,
                                block_k=block_k)
    m_new = jnp.maximum(m, jnp.max(scores))  # finite: the tile's first position is <= count
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(scores - m_new)
    v = jnp.where((pos == count)[:, None], new_value[None, :], v.astype(f32))
    return m_new, l * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * v, axis=0)

  n = jnp.minimum((count - start) // block_k + 1, tiles)
  init = (jnp.asarray(-jnp.inf, f32), jnp.asarray(0.0, f32), jnp.zeros((block_d,), f32))
  if depth:
    def body(t, carry):
      m, l, acc, ahead = carry
      nxt = load(jnp.minimum(t + depth, tiles - 1))  # past the last tile: the last again (cached)
      return (*update(t, ahead[0], m, l, acc), (*ahead[1:], nxt))

    m, l, acc, _ = jax.lax.fori_loop(0, n, body, (*init, first))
  else:
    m, l, acc = jax.lax.fori_loop(0, n, lambda t, carry: update(t, load(t), *carry), init)
  acc_out[...] = acc
  return m, l, k_re, k_im


class _ActivatedValue:
  """v_new read as silu(raw + bias) in float32, rounded to the values' dtype: indexing it reads the
  raw product and the bias like a ref (attend_step(v_bias=...)), so the bias add and the SiLU need
  no kernel of their own."""

  def __init__(self, raw_ref, bias_ref, dtype):
    self.raw_ref, self.bias_ref, self.dtype = raw_ref, bias_ref, dtype

  def __getitem__(self, index):
    t = self.raw_ref[index].astype(jnp.float32) + self.bias_ref[index].astype(jnp.float32)
    return (t / (1.0 + jnp.exp(-t))).astype(self.dtype)


def _attend_kernel(*refs, dz: int, eps: float, block_k: int, block_d: int, sub_d: int, preload: int, tiles: int,
                   mma: bool, act: bool, rms_dim: int):
  """Refs: proj, bias, scale, shift, freqs, keys, values, v_new, count[, v_bias (act)][, sumsq
  (rms_dim > 0)], then stats, acc, keys, values[, inv (rms_dim > 0)] outputs."""
  (proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, keys_ref, values_ref, vnew_ref, count_ref), rest = (
      refs[:9], list(refs[9:]))
  vbias_ref = rest.pop(0) if act else None
  sumsq_ref = rest.pop(0) if rms_dim else None
  stats_out, acc_out, keys_out, values_out = rest[:4]
  inv_out = rest[4] if rms_dim else None
  if act:
    vnew_ref = _ActivatedValue(vnew_ref, vbias_ref, values_ref.dtype)
  z_scale = None
  if rms_dim:
    # The block's RMS normalisation of y (mx = y inv rms_scale) applied after the product:
    # inv = rsqrt(sum y^2 / dim + eps) from the TimestepNorm/CEMA kernel's per-group sums.
    z_scale = jax.lax.rsqrt(jnp.sum(sumsq_ref[...]) * (1.0 / rms_dim) + eps)

    @pl.when((pl.program_id(1) == 0) & (pl.program_id(2) == 0) & (pl.program_id(3) == 0))
    def _():
      inv_out[...] = jnp.full((1,), z_scale, jnp.float32)

  count = count_ref[0]
  j, d = pl.program_id(2), pl.program_id(3)
  span = block_k * tiles
  start = j * span
  two = jax.lax.broadcasted_iota(jnp.int32, (2,), 0)
  refs = (proj_ref, bias_ref, scale_ref, shift_ref, freqs_ref, keys_ref, values_ref, vnew_ref, acc_out)

  @pl.when(start <= count)
  def _():
    if mma and tiles == 1:
      m, l, k_re, k_im = _attend_block_mma(*refs, count, start, dz=dz, eps=eps, block_k=block_k, z_scale=z_scale)
    elif tiles == 1:
      m, l, k_re, k_im = _attend_block(*refs, count, start, dz=dz, eps=eps, block_k=block_k, block_d=block_d,
                                       sub_d=sub_d, preload=preload, z_scale=z_scale)
    else:
      m, l, k_re, k_im = _attend_looped(*refs, count, start, dz=dz, eps=eps, block_k=block_k, block_d=block_d,
                                        tiles=tiles, preload=preload, mma=mma, z_scale=z_scale)

    @pl.when(d == 0)
    def _():
      stats_out[...] = jnp.where(two == 0, m, l)

    @pl.when(count // span == j)
    def _():
      row = pl.ds(count - start, 1)
      values_out[row, :] = vnew_ref[...][None, :]

      @pl.when(d == 0)
      def _():
        half = dz // 2
        keys_out[row, pl.ds(0, half)] = k_re[None, :]
        keys_out[row, pl.ds(half, half)] = k_im[None, :]

  @pl.when(start > count)
  def _():
    acc_out[...] = jnp.zeros((block_d,), jnp.float32)

    @pl.when(d == 0)
    def _():
      stats_out[...] = jnp.where(two == 0, -jnp.inf, 0.0)


def attend_combine(stats: jax.Array, acc: jax.Array) -> jax.Array:
  """stats [B, H, NB, 2], acc [B, H, NB, dv] (attend_step's) -> attention output [B, H, dv] float32."""
  m, l = stats[..., 0], stats[..., 1]
  weight = jnp.exp(m - jnp.max(m, axis=-1, keepdims=True))  # 0 for blocks past count
  return jnp.sum(weight[..., None] * acc, axis=2) / jnp.sum(weight * l, axis=-1)[..., None]


def _combine_kernel(*refs, gated: bool, scaled: bool):
  """Refs: stats [NB, 2], acc [NB, block_d][, gate [block_d], gate_bias [block_d][, gate_scale [1]]], out."""
  stats_ref, acc_ref, out_ref = refs[0], refs[1], refs[-1]
  acc = acc_ref[...]  # [NB, block_d]: first, its load does not wait for the weights
  m, l = stats_ref[:, 0], stats_ref[:, 1]
  weight = jnp.exp(m - jnp.max(m))  # 0 for blocks past count
  out = (jnp.sum(weight[:, None] * acc, axis=0) / jnp.sum(weight * l)).astype(out_ref.dtype)
  if gated:
    # The attention output times the gate silu(scale raw + bias): the product the next projection
    # reads, made here so that the gate is no kernel of its own (nor recomputed per weight row).
    f32 = jnp.float32
    raw = refs[2][...].astype(f32)
    raw = raw * refs[4][0] if scaled else raw
    t = (raw + refs[3][...].astype(f32)).astype(out_ref.dtype).astype(f32)
    out = (out.astype(f32) * (t / (1.0 + jnp.exp(-t)))).astype(out_ref.dtype)
  out_ref[...] = out


@functools.partial(jax.jit, static_argnames=("block_d", "num_warps", "out_dtype", "gate_offset", "interpret"))
def attend_combine_pallas(stats: jax.Array, acc: jax.Array, *, block_d: int = 64, num_warps: int = 4,
                          out_dtype=jnp.float32, gate=None, gate_bias=None, gate_scale=None, gate_offset: int = 0,
                          interpret: bool | None = None) -> jax.Array:
  """attend_combine as one Pallas kernel: programs of block_d features per (sequence, head).

  gate [B, >= gate_offset + H dv] (e.g. the whole raw w_mx product, read from column gate_offset on,
  so that no slice of it is copied), gate_bias [>= H dv], gate_scale [B, 1] float32 (optional):
  the output is attention * silu(gate_scale gate + gate_bias) (the sum rounded to out_dtype first,
  as an XLA bias add would), in out_dtype."""
  batch, heads, blocks, dv = acc.shape
  block_d = min(block_d, dv)
  if dv % block_d or stats.shape != (batch, heads, blocks, 2):
    raise ValueError(f"block_d ({block_d}) must divide dv ({dv}) and stats must be {(batch, heads, blocks, 2)}, "
                     f"got {stats.shape}")
  if gate is not None and (gate_offset % block_d or gate.ndim != 2 or gate.shape[0] != batch
                           or gate.shape[1] < gate_offset + heads * dv or gate_bias is None
                           or gate_bias.size < heads * dv):
    raise ValueError(f"gate must be [{batch}, >= {gate_offset} + {heads * dv}] with gate_offset a multiple of "
                     f"block_d ({block_d}) and gate_bias >= {heads * dv} entries, got gate "
                     f"{gate.shape}, offset {gate_offset}, bias {None if gate_bias is None else gate_bias.shape}")
  interpret, kwargs = _triton_options(interpret, num_warps)
  per_head = dv // block_d
  in_specs = [pl.BlockSpec((None, None, blocks, 2), lambda b, h, d: (b, h, 0, 0)),
              pl.BlockSpec((None, None, blocks, block_d), lambda b, h, d: (b, h, 0, d))]
  args = [stats, acc]
  if gate is not None:
    first = gate_offset // block_d
    in_specs += [pl.BlockSpec((None, block_d), lambda b, h, d: (b, first + h * per_head + d)),
                 pl.BlockSpec((block_d,), lambda b, h, d: (h * per_head + d,))]
    args += [gate, gate_bias.reshape(-1)]
    if gate_scale is not None:
      in_specs.append(pl.BlockSpec((None, 1), lambda b, h, d: (b, 0)))
      args.append(gate_scale.astype(jnp.float32))
  kernel = functools.partial(_combine_kernel, gated=gate is not None, scaled=gate_scale is not None)
  return pl.pallas_call(
      kernel, grid=(batch, heads, per_head), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, block_d), lambda b, h, d: (b, h, d)),
      out_shape=jax.ShapeDtypeStruct((batch, heads, dv), out_dtype), interpret=interpret, name="attend_combine",
      **kwargs,
  )(*args)


def attend_step_reference(proj, bias, scale, shift, freqs, keys, values, v_new, count, *, eps: float,
                          v_bias=None, sumsq=None, rms_dim: int = 0):
  """Plain-JAX oracle: (attention output [B, H, dv] float32, keys, values) with the new key and value
  written at `count` (what attend_combine(attend_step(...)) gives, up to summation order); with
  sumsq, inv [B, 1] float32 as a fourth result (see attend_step for v_bias, sumsq)."""
  inv = None
  if sumsq is not None:
    inv = jax.lax.rsqrt(jnp.sum(sumsq.astype(jnp.float32), axis=-1, keepdims=True) / rms_dim + eps)
  scores, keys = qk_scores_step_reference(proj, bias, scale, shift, freqs, keys, count, eps=eps, z_scale=inv)
  if v_bias is not None:
    t = v_new.astype(jnp.float32) + v_bias.reshape(v_new.shape[1:]).astype(jnp.float32)
    v_new = jax.nn.silu(t)
  values = jax.lax.dynamic_update_slice(values, v_new[:, None].astype(values.dtype), (0, count[0], 0, 0))
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhk,bkhd->bhd", probs, values.astype(jnp.float32))
  return (out, keys, values) if inv is None else (out, keys, values, inv)


def default_attend_form(chunk: int, dv: int) -> dict:
  """attend_step keyword arguments (and 'combine': 'xla' | 'pallas', the block merge) of the fused
  decode step's default (megalodon_jax.decoding.attend_options(())); fits any chunk and dv.

  H200, mega1.3B batch 1, count 2031 of 2048, 24 distinct cache buffers per step (HBM; 2026-11-29,
  experiments/results/gpu_checks/2026-11-29_nvidia-h200_attend_probe_r2.json), us per layer with the
  combine: 8 x 1024 tiles, 4 per program, one prefetched (grid 1 x 2 x 64 x 2), Pallas combine 10.11
  (attend_step 8.54 + combine 1.6); the same with XLA's combine 10.43; the form before (32 x 1024 in
  256-feature chunks, no loop) 11.90 (9.95 + 1.95); 8 x 1024 x 8 tiles 12.0; two tiles prefetched
  11.7; 4 x 1024 x 8 tiles 11.2; tensor-core forms 12.7-15.1; XLA's row-sum read of the same bytes
  8.2 us (2.3 TB/s)."""
  block_d = min(dv, 1024)
  while dv % block_d:
    block_d //= 2
  block_k = min(chunk, 8)
  tiles = max(1, min(4, chunk // block_k))
  while chunk % (block_k * tiles):
    tiles -= 1
  return {"block_k": block_k, "block_d": block_d, "tiles": tiles, "preload": 1, "num_warps": 4,
          "combine": "pallas"}


def default_attend_blocks(chunk: int, dv: int) -> tuple[int, int]:
  """(block_k, block_d): 32 positions x up to 1024 features per program, read in sub_d = 256 chunks.

  H200, mega1.3B batch 1 at 32K (2026-11-29, same run): 32 x 1024 in 4 chunks of 256, 1.690 ms per
  token; 32 x 512 loaded in one go before the scores, 1.848 ms (attend_step 15.6 us per layer
  against ~11.9)."""
  return min(chunk, 32), min(dv, 1024)


@functools.partial(jax.jit, static_argnames=("eps", "block_k", "block_d", "sub_d", "num_warps", "preload", "tiles",
                                             "num_stages", "mma", "rms_dim", "proj_offset", "interpret"))
def attend_step(proj, bias, scale, shift, freqs, keys, values, v_new, count, *, eps: float,
                block_k: int | None = None, block_d: int | None = None, sub_d: int | None = 256, num_warps: int = 4,
                preload: bool | int = False, tiles: int = 1, num_stages: int = 1, mma: bool = False,
                v_bias=None, sumsq=None, rms_dim: int = 0, proj_offset: int = 0, interpret: bool | None = None):
  """The kernel (see above): (stats, acc, keys, values[, inv]); keys and values are updated in place
  when donated.

  Each program covers tiles x block_k positions and block_d value features (stats/acc have
  C / (tiles block_k) blocks). tiles = 1: one tile, its values used in sub_d-feature chunks, every
  load issued first with preload. tiles > 1: a loop over the tiles with an online softmax (sub_d
  unused), tiles t + 1 .. t + preload loaded during tile t (preload = 1 or True: one ahead);
  num_stages is Triton's pipelining depth.
  mma (block_k >= 16, head dim dz >= 32, bf16 keys and values): the scores and the probabilities times the values as
  matrix products on the tensor cores (see _attend_block_mma; sub_d unused, and preload with tiles = 1).

  v_bias [H, dv]: v_new is the raw value product (any float dtype) and the new value is
  silu(v_new + v_bias) in float32, rounded to the values' dtype (the decode step's v).
  sumsq [B, G] float32 with rms_dim = D: proj is the product of the UNnormalised y (times the RMS
  norm's scale); inv = rsqrt(sum(sumsq) / rms_dim + eps) multiplies z before its bias, and is
  returned as a fifth output [B, 1] float32 for the other columns of the product.

  proj_offset (a multiple of dz): z starts at that column of proj. v_new may also be [B, >= H dv], a
  row whose first H dv columns are the new value (e.g. one product [v | z | ...] for both, read in
  place rather than sliced into a copy)."""
  batch, chunk, heads, dz = keys.shape
  dv = values.shape[-1]
  default_k, default_d = default_attend_blocks(chunk, dv)
  block_k, block_d = block_k or default_k, block_d or default_d
  sub_d = min(sub_d or block_d, block_d)
  tiles = int(tiles)
  span = block_k * tiles
  if dz % 2 or tiles < 1 or chunk % span or dv % block_d or block_d % sub_d:
    raise ValueError(f"the head dim ({dz}) must be even, tiles ({tiles}) x block_k ({block_k}) must divide the chunk "
                     f"({chunk}), block_d ({block_d}) the value head dim ({dv}) and sub_d ({sub_d}) block_d")
  v_row = v_new.ndim == 2
  if (values.shape[:3] != (batch, chunk, heads)
      or (v_new.shape != (batch, heads, dv) if not v_row else (v_new.shape[0] != batch or v_new.shape[1] < heads * dv))):
    raise ValueError(f"values must be [{batch}, {chunk}, {heads}, dv] and v_new [{batch}, {heads}, dv] (or a row "
                     f"[{batch}, >= {heads} dv]), got {values.shape} and {v_new.shape}")
  if proj_offset % dz or proj_offset < 0:
    raise ValueError(f"proj_offset={proj_offset} must be a non-negative multiple of the head dim {dz}")
  if proj.ndim == 2 and proj.shape[1] < proj_offset + heads * dz:
    raise ValueError(f"proj must have >= {proj_offset} + {heads * dz} columns for proj_offset={proj_offset}, got "
                     f"{proj.shape}")
  if v_bias is not None and v_bias.size != heads * dv:
    raise ValueError(f"v_bias must have {heads} x {dv} entries (one per value feature), got shape {v_bias.shape}")
  if (sumsq is None) != (rms_dim == 0) or (sumsq is not None and (sumsq.ndim != 2 or sumsq.shape[0] != batch)):
    raise ValueError(f"sumsq [batch={batch}, groups] and rms_dim > 0 go together, got sumsq "
                     f"{None if sumsq is None else sumsq.shape} and rms_dim={rms_dim}")
  _check_qk_inputs(proj, bias, scale, shift, freqs, count, batch=batch, heads=heads, dz=dz)
  if mma and (block_k < 16 or dz < 32 or keys.dtype != jnp.bfloat16 or values.dtype != jnp.bfloat16):
    # Triton's tensor-core dot needs every dimension >= 16; the scores contract dz / 2 features. With
    # dz = 8 the compiled kernel returned wrong values on an H200 (the interpreter does not care).
    raise ValueError(f"mma needs block_k >= 16 (got {block_k}), a head dim >= 32 (got {dz}; the scores' "
                     f"product contracts half of it) and bf16 keys and values (got {keys.dtype}, {values.dtype}); "
                     "use the elementwise forms (mma=False) otherwise")
  blocks = chunk // span
  grid = (batch, heads, blocks, dv // block_d)
  interpret, kwargs = _triton_options(interpret, num_warps, num_stages)
  key_spec = pl.BlockSpec((None, span, None, dz), lambda b, h, j, d: (b, j, h, 0))
  value_spec = pl.BlockSpec((None, span, None, block_d), lambda b, h, j, d: (b, j, h, d))
  row_spec = pl.BlockSpec((None, None, block_d), lambda b, h, j, d: (b, h, d))
  f32 = jnp.float32
  kernel = functools.partial(_attend_kernel, dz=dz, eps=float(eps), block_k=block_k, block_d=block_d, sub_d=sub_d,
                             preload=int(preload), tiles=tiles, mma=bool(mma), act=v_bias is not None,
                             rms_dim=int(rms_dim))
  z_first = proj_offset // dz
  per_head = dv // block_d
  if v_row:
    vnew_spec = pl.BlockSpec((None, block_d), lambda b, h, j, d: (b, h * per_head + d))
  else:
    vnew_spec = row_spec
  in_specs = [pl.BlockSpec((None, dz), lambda b, h, j, d: (b, z_first + h)),
              pl.BlockSpec((dz,), lambda b, h, j, d: (h,)),
              pl.BlockSpec((2, dz), lambda b, h, j, d: (0, h)), pl.BlockSpec((2, dz), lambda b, h, j, d: (0, h)),
              pl.BlockSpec((dz // 2,), lambda b, h, j, d: (0,)), key_spec, value_spec, vnew_spec,
              pl.BlockSpec((1,), lambda b, h, j, d: (0,))]
  args = [proj, bias, scale.astype(f32), shift.astype(f32), freqs.astype(f32), keys, values,
          v_new if v_bias is not None else v_new.astype(values.dtype), count]
  if v_bias is not None:
    in_specs.append(pl.BlockSpec((None, block_d), lambda b, h, j, d: (h, d)))
    args.append(v_bias.reshape(heads, dv))
  out_specs = [pl.BlockSpec((None, None, None, 2), lambda b, h, j, d: (b, h, j, 0)),
               pl.BlockSpec((None, None, None, block_d), lambda b, h, j, d: (b, h, j, d)), key_spec, value_spec]
  out_shape = [jax.ShapeDtypeStruct((batch, heads, blocks, 2), f32), jax.ShapeDtypeStruct((batch, heads, blocks, dv), f32),
               jax.ShapeDtypeStruct(keys.shape, keys.dtype), jax.ShapeDtypeStruct(values.shape, values.dtype)]
  if sumsq is not None:
    groups = sumsq.shape[1]
    in_specs.append(pl.BlockSpec((None, groups), lambda b, h, j, d: (b, 0)))
    args.append(sumsq.astype(f32))
    out_specs.append(pl.BlockSpec((None, 1), lambda b, h, j, d: (b, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, 1), f32))
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases={5: 2, 6: 3}, interpret=interpret, name="attend_step", **kwargs,
  )(*args)


# ---------------------------------------------------------------------------------------------
# One row times a matrix stored transposed, for batch-1 decoding.
#
# A decode step's projections are one row times a [K, N] weight: pure weight traffic (2 bytes per
# weight read once). XLA's GEMM kernels for M <= 2 leave the H200 at ~2 TB/s of its ~4 TB/s. Here
# the weight is stored [N, K] (contiguous along the reduction) and split into [block_n, block_k]
# tiles, one per program and each read in one go, so that the whole grid keeps many independent
# loads in flight; every program writes its tile's partial dot products and the caller sums the
# K / block_k partials (a small reduction XLA can fuse into the consumer of the product).
#
# Arrays: x [K] (any float dtype), w_t [N, K]; returns partials [K / block_k, N] float32.
# ---------------------------------------------------------------------------------------------


def _gemv_kernel(x_ref, w_ref, out_ref, *, block_k: int, k_steps: int):
  # k_steps tiles of [bn, bk] one after the other (unrolled: every load can be issued up front),
  # products accumulated elementwise and summed across K once at the end.
  acc = None
  for step in range(k_steps):
    cols = pl.ds(step * block_k, block_k)
    term = w_ref[:, cols].astype(jnp.float32) * x_ref[cols].astype(jnp.float32)[None, :]
    acc = term if acc is None else acc + term
  out_ref[...] = jnp.sum(acc, axis=1)


def gemv_partials_reference(x: jax.Array, w_t: jax.Array, block_k: int) -> jax.Array:
  """Plain-JAX oracle: x [K], w_t [N, K] -> [K / block_k, N] float32 partial sums."""
  n, k = w_t.shape
  xb = x.astype(jnp.float32).reshape(k // block_k, block_k)
  wb = w_t.astype(jnp.float32).reshape(n, k // block_k, block_k)
  return jnp.einsum("jc,njc->jn", xb, wb)


def default_gemv_blocks(n: int, k: int) -> tuple[int, int]:
  """(block_n, block_k): the largest power-of-2 block_k <= 512 dividing K, block_n so a tile is 32K weights."""
  block_k = 512
  while k % block_k:
    block_k //= 2
  block_n = max(min(32768 // block_k, 256), 16)
  while n % block_n:
    block_n //= 2
  return block_n, block_k


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "k_steps", "num_warps", "interpret"))
def gemv_partials(x: jax.Array, w_t: jax.Array, *, block_n: int | None = None, block_k: int | None = None,
                  k_steps: int = 1, num_warps: int = 8, interpret: bool | None = None) -> jax.Array:
  """x [K], w_t [N, K] -> partial products [K / (block_k k_steps), N] float32 (sum over axis 0 = x @ w_t.T).

  Each program reads k_steps consecutive [block_n, block_k] tiles; k_steps = K / block_k leaves one
  partial (no split of K, nothing to sum)."""
  n, k = w_t.shape
  if x.shape != (k,):
    raise ValueError(f"gemv_partials: x must be [K] = [{k}] to match w_t [N, K] = {w_t.shape}, got {x.shape}")
  default_n, default_k = default_gemv_blocks(n, k)
  block_n, block_k = block_n or default_n, block_k or default_k
  for name, block, dim in (("block_n", block_n, n), ("block_k", block_k, k)):
    if dim % block or block & (block - 1):
      raise ValueError(f"gemv_partials: {name}={block} must be a power of 2 dividing {dim}")
  if k_steps < 1 or k % (block_k * k_steps):
    raise ValueError(f"gemv_partials: k_steps={k_steps} tiles of block_k={block_k} must divide K={k}")
  interpret, kwargs = _triton_options(interpret, num_warps)
  span = block_k * k_steps
  return pl.pallas_call(
      functools.partial(_gemv_kernel, block_k=block_k, k_steps=k_steps), grid=(n // block_n, k // span),
      in_specs=[pl.BlockSpec((span,), lambda i, j: (j,)), pl.BlockSpec((block_n, span), lambda i, j: (i, j))],
      out_specs=pl.BlockSpec((None, block_n), lambda i, j: (j, i)),
      out_shape=jax.ShapeDtypeStruct((k // span, n), jnp.float32), interpret=interpret, name="gemv_partials",
      **kwargs,
  )(x, w_t)


# ---------------------------------------------------------------------------------------------
# The block's residual add and the FFN LayerNorm's moments, one kernel per step.
#
# After the wh2 product a block computes y = h1 + wh2 out + x (h1: a slice of the w_mx product plus
# its bias) and, with the FFN norm folded into fc_in (decoding._folded_norm_fc_in), the shifted
# moments of y: in XLA an elementwise kernel and a reduction, two launches for 2 x 2048 numbers.
# Here one program per sequence does both. h1 is read straight out of the w_mx product [B, P] (a
# static column window) and its bias out of the [r | h1] bias: slicing either in XLA could be a
# copy kernel of its own in front of this custom call.
#
# Arrays: raw [B, P] (w_mx product before its bias; columns [raw_offset, raw_offset + D) are h1's),
# bias [Pb] (columns [bias_offset, bias_offset + D) are h1's), wh2 [B, D], x [B, D], inv [B, 1]
# float32 or None (a per-row scale of h1's product, for a norm applied after the product). With
# every addend rounded as the XLA expression ((raw_h inv + b) + wh2) + x rounds it (per add, to the
# promoted dtype), returns y [B, D] in x.dtype and its moments mean, var [B, 1] float32: shift = the
# mean of y - y[0], var = max(mean((y - y[0])^2) - shift^2, 0), mean = y[0] + shift.
# ---------------------------------------------------------------------------------------------


def _rounded_sum(a, b, dtype):
  return (a.astype(jnp.float32) + b.astype(jnp.float32)).astype(dtype)


def residual_moments_reference(raw, bias, wh2, x, *, raw_offset: int, bias_offset: int, inv=None):
  """Plain-JAX oracle of `residual_moments` (the expressions of decoding._block_tail and _folded_norm_fc_in)."""
  f32 = jnp.float32
  dim = x.shape[-1]
  h = raw[:, raw_offset:raw_offset + dim]
  b = bias[bias_offset:bias_offset + dim]
  h1 = (h + b) if inv is None else (h.astype(f32) * inv + b.astype(f32)).astype(raw.dtype)
  y = ((h1 + wh2) + x).astype(x.dtype)
  yf = y.astype(f32)
  d = yf - yf[:, :1]
  shift = jnp.mean(d, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(d * d, axis=-1, keepdims=True) - shift * shift, 0.0)
  return y, yf[:, :1] + shift, var


def _residual_row(raw_ref, bias_ref, wh2_ref, x_ref, inv, start: int, size: int, *, raw_offset: int,
                  bias_offset: int, dtypes: tuple, out_dtype):
  """y[start:start + size] float32, rounded as the module comment says."""
  f32 = jnp.float32
  h1_dtype, sum_dtype, y_dtype = dtypes
  h = raw_ref[pl.ds(raw_offset + start, size)].astype(f32)
  if inv is not None:
    h = h * inv
  h1 = _rounded_sum(h, bias_ref[pl.ds(bias_offset + start, size)], h1_dtype)
  y = _rounded_sum(_rounded_sum(h1, wh2_ref[pl.ds(start, size)], sum_dtype), x_ref[pl.ds(start, size)], y_dtype)
  return y.astype(out_dtype)


def _residual_kernel(raw_ref, bias_ref, wh2_ref, x_ref, *rest, raw_offset: int, bias_offset: int, dim: int,
                     dtypes: tuple, with_inv: bool, first_by_reduction: bool):
  f32 = jnp.float32
  if with_inv:
    inv_ref, y_out, mean_out, var_out = rest
  else:
    y_out, mean_out, var_out = rest
  row = functools.partial(_residual_row, raw_ref, bias_ref, wh2_ref, x_ref, inv_ref[...] if with_inv else None,
                          raw_offset=raw_offset, bias_offset=bias_offset, dtypes=dtypes, out_dtype=y_out.dtype)
  y = row(0, dim)
  y_out[...] = y
  yf = y.astype(f32)
  if first_by_reduction:  # y[0] picked out of the row: one more block reduction on the critical path
    first = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, (dim,), 0) == 0, yf, 0.0))[None]
  else:  # y[0] recomputed from its own [1] loads, beside the row (the same value bit for bit)
    first = row(0, 1).astype(f32)
  d = yf - first
  shift = jnp.sum(d) / dim
  mean_out[...] = first + shift
  var_out[...] = jnp.maximum(jnp.sum(d * d) / dim - shift * shift, 0.0)[None]


@functools.partial(jax.jit, static_argnames=("raw_offset", "bias_offset", "num_warps", "first_by_reduction",
                                             "interpret"))
def residual_moments(raw, bias, wh2, x, *, raw_offset: int, bias_offset: int, inv=None, num_warps: int = 4,
                     first_by_reduction: bool = False, interpret: bool | None = None):
  """The kernel (see above): (y [B, D] x.dtype, mean [B, 1], var [B, 1] float32). One program per row;
  D must be a power of 2 (one Triton block). first_by_reduction: y[0] (the shift) picked out of the row
  by a masked sum instead of recomputed from its own loads (the same value; kept for A/B timing)."""
  batch, dim = x.shape
  if raw.ndim != 2 or raw.shape[0] != batch or not 0 <= raw_offset <= raw.shape[1] - dim:
    raise ValueError(f"raw must be [{batch}, P] with columns [raw_offset, raw_offset + {dim}) inside it, got shape "
                     f"{raw.shape} and raw_offset={raw_offset}")
  if bias.ndim != 1 or not 0 <= bias_offset <= bias.shape[0] - dim:
    raise ValueError(f"bias must be [Pb] with [bias_offset, bias_offset + {dim}) inside it, got shape {bias.shape} "
                     f"and bias_offset={bias_offset}")
  if wh2.shape != x.shape:
    raise ValueError(f"wh2 must have x's shape {x.shape}, got {wh2.shape}")
  if inv is not None and inv.shape != (batch, 1):
    raise ValueError(f"inv must be [{batch}, 1], got {inv.shape}")
  if dim & (dim - 1):
    raise ValueError(f"the row length D={dim} must be a power of 2 (one Triton block per row)")
  interpret, kwargs = _triton_options(interpret, num_warps)
  h1_dtype = jnp.promote_types(raw.dtype, bias.dtype) if inv is None else raw.dtype
  sum_dtype = jnp.promote_types(h1_dtype, wh2.dtype)
  dtypes = (h1_dtype, sum_dtype, jnp.promote_types(sum_dtype, x.dtype))
  row = pl.BlockSpec((None, dim), lambda b: (b, 0))
  one = pl.BlockSpec((None, 1), lambda b: (b, 0))
  in_specs = [pl.BlockSpec((None, raw.shape[1]), lambda b: (b, 0)), pl.BlockSpec(bias.shape, lambda b: (0,)), row, row]
  args = [raw, bias, wh2, x]
  if inv is not None:
    in_specs.append(one)
    args.append(inv.astype(jnp.float32))
  f32 = jnp.float32
  return pl.pallas_call(
      functools.partial(_residual_kernel, raw_offset=raw_offset, bias_offset=bias_offset, dim=dim, dtypes=dtypes,
                        with_inv=inv is not None, first_by_reduction=first_by_reduction),
      grid=(batch,), in_specs=in_specs, out_specs=[row, one, one],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((batch, 1), f32),
                 jax.ShapeDtypeStruct((batch, 1), f32)],
      interpret=interpret, name="residual_moments", **kwargs,
  )(*args)


# ---------------------------------------------------------------------------------------------
# One row times a transposed weight in a single kernel, optionally with the FFN's input epilogue.
#
# gemv_rows: x [B, K] times w_t [N, K] -> [B, N]: each program reads block_n whole rows of w_t (one
# load; every byte of the tile in flight at once), multiplies by x in float32 and sums along K. No
# split of K, so no partials to add up afterwards.
#
# ffn_in_step: the FFN's first product with its folded LayerNorm and activation (batch-1 decoding,
# megalodon_jax.decoding._folded_norm_fc_in):
#   u = (rstd (y @ W' - mean colsum) + bias0) rounded to y's dtype,   rstd = rsqrt(var + eps),
#   hidden = silu(u), or with SwiGLU silu(u_gate) * u_up over the two halves of W' (rows [gate | up]
#   of w_t), silu(t) = t / (1 + exp(-t)) in float32 rounded to y's dtype.
# In XLA the epilogue is an elementwise kernel of its own: XLA fuses it neither into the row
# reduction before it nor into the next product (which would recompute it for every weight row).
#
# Arrays: y [B, K]; w_t [F', K] (F' = F, or 2F with SwiGLU); colsum, bias0 [F'] float32; mean, var
# [B, 1] float32. Returns hidden [B, F] in y's dtype.
# ---------------------------------------------------------------------------------------------


def _silu_rounded(t, dtype):
  return (t / (1.0 + jnp.exp(-t))).astype(dtype)


def _row_products(w_ref, x):
  return jnp.sum(w_ref[...].astype(jnp.float32) * x[None, :], axis=1)


def _gemv_rows_kernel(x_ref, w_ref, out_ref):
  out_ref[...] = _row_products(w_ref, x_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def _ffn_in_kernel(y_ref, mean_ref, var_ref, *refs, eps: float, swiglu: bool):
  f32 = jnp.float32
  out_ref = refs[-1]
  y = y_ref[...].astype(f32)
  mean, rstd = mean_ref[0], jax.lax.rsqrt(var_ref[0] + eps)

  def normalised(w_ref, colsum_ref, bias_ref):
    raw = _row_products(w_ref, y)
    return ((raw - mean * colsum_ref[...]) * rstd + bias_ref[...]).astype(out_ref.dtype).astype(f32)

  hidden = _silu_rounded(normalised(*refs[:3]), out_ref.dtype)
  if swiglu:
    hidden = (hidden.astype(f32) * normalised(*refs[3:6])).astype(out_ref.dtype)
  out_ref[...] = hidden


def gemv_rows_reference(x: jax.Array, w_t: jax.Array, out_dtype=None) -> jax.Array:
  """Plain-JAX oracle: x [B, K], w_t [N, K] -> [B, N] (float32 products summed, in out_dtype, default x's)."""
  out = jnp.einsum("bk,nk->bn", x.astype(jnp.float32), w_t.astype(jnp.float32))
  return out.astype(out_dtype or x.dtype)


def ffn_in_step_reference(y, w_t, colsum, bias0, mean, var, *, eps: float, swiglu: bool = False):
  """Plain-JAX oracle of `ffn_in_step` (see the comment above)."""
  f32 = jnp.float32
  raw = jnp.einsum("bk,nk->bn", y.astype(f32), w_t.astype(f32))
  u = ((raw - mean * colsum) * jax.lax.rsqrt(var + eps) + bias0).astype(y.dtype).astype(f32)
  if not swiglu:
    return _silu_rounded(u, y.dtype)
  gate, up = jnp.split(u, 2, axis=-1)
  return (_silu_rounded(gate, y.dtype).astype(f32) * up).astype(y.dtype)


def default_gemv_rows_block(n: int, k: int) -> int:
  """Rows per program: 4, fewer when they do not divide N.

  H200, mega200M's fc_in (2560 x 1024) with the FFN epilogue, 12 chained products (2026-11-29,
  experiments/results/gpu_checks/2026-11-29_nvidia-h200_gemv_rows_200m_r2.log), us per product at 4
  warps: 4 rows 3.25, 8 rows 3.83, 16 rows 4.76 (XLA's row reduction + epilogue kernel: 4.21); 1-2 rows
  with 1-2 warps 3.29-3.51."""
  block_n = 4
  while n % block_n:
    block_n //= 2
  return block_n


def _gemv_rows_check(name: str, x, w_t, rows: int, block_n: int) -> None:
  if x.ndim != 2 or w_t.ndim != 2 or x.shape[1] != w_t.shape[1]:
    raise ValueError(f"{name}: x must be [B, K] and w_t [N, K] with the same K, got {x.shape} and {w_t.shape}")
  if rows % block_n or block_n & (block_n - 1) or x.shape[1] & (x.shape[1] - 1):
    raise ValueError(f"{name}: block_n={block_n} must be a power of 2 dividing the {rows} output rows, and "
                     f"K={x.shape[1]} a power of 2 (one Triton block per row)")


@functools.partial(jax.jit, static_argnames=("block_n", "num_warps", "out_dtype", "interpret"))
def gemv_rows(x: jax.Array, w_t: jax.Array, *, block_n: int | None = None, num_warps: int = 4, out_dtype=None,
              interpret: bool | None = None) -> jax.Array:
  """x [B, K] @ w_t[N, K].T -> [B, N] in out_dtype (default x's), one kernel (see above)."""
  n, k = w_t.shape
  block_n = block_n or default_gemv_rows_block(n, k)
  _gemv_rows_check("gemv_rows", x, w_t, n, block_n)
  interpret, kwargs = _triton_options(interpret, num_warps)
  return pl.pallas_call(
      _gemv_rows_kernel, grid=(x.shape[0], n // block_n),
      in_specs=[pl.BlockSpec((None, k), lambda b, j: (b, 0)), pl.BlockSpec((block_n, k), lambda b, j: (j, 0))],
      out_specs=pl.BlockSpec((None, block_n), lambda b, j: (b, j)),
      out_shape=jax.ShapeDtypeStruct((x.shape[0], n), out_dtype or x.dtype), interpret=interpret, name="gemv_rows",
      **kwargs,
  )(x, w_t)


@functools.partial(jax.jit, static_argnames=("eps", "swiglu", "block_n", "num_warps", "interpret"))
def ffn_in_step(y: jax.Array, w_t: jax.Array, colsum: jax.Array, bias0: jax.Array, mean: jax.Array, var: jax.Array,
                *, eps: float, swiglu: bool = False, block_n: int | None = None, num_warps: int = 4,
                interpret: bool | None = None) -> jax.Array:
  """The kernel (see above): hidden [B, F] in y's dtype."""
  rows, k = w_t.shape
  batch = y.shape[0]
  if swiglu and rows % 2:
    raise ValueError(f"ffn_in_step: with swiglu w_t holds [gate | up] rows, an even count; got {rows}")
  width = rows // 2 if swiglu else rows
  block_n = block_n or default_gemv_rows_block(width, k)
  _gemv_rows_check("ffn_in_step", y, w_t, width, block_n)
  if colsum.shape != (rows,) or bias0.shape != (rows,):
    raise ValueError(f"ffn_in_step: colsum and bias0 must be [{rows}] (one per row of w_t), got {colsum.shape} and "
                     f"{bias0.shape}")
  if mean.shape != (batch, 1) or var.shape != (batch, 1):
    raise ValueError(f"ffn_in_step: mean and var must be [{batch}, 1], got {mean.shape} and {var.shape}")
  f32 = jnp.float32
  interpret, kwargs = _triton_options(interpret, num_warps)
  one = pl.BlockSpec((None, 1), lambda b, j: (b, 0))
  in_specs = [pl.BlockSpec((None, k), lambda b, j: (b, 0)), one, one]
  args = [y, mean.astype(f32), var.astype(f32)]
  halves = (0, width // block_n) if swiglu else (0,)
  for shift in halves:  # the gate half (or the only one), then the up half: the same arrays, other rows
    in_specs += [pl.BlockSpec((block_n, k), lambda b, j, s=shift: (j + s, 0)),
                 pl.BlockSpec((block_n,), lambda b, j, s=shift: (j + s,)),
                 pl.BlockSpec((block_n,), lambda b, j, s=shift: (j + s,))]
    args += [w_t, colsum.astype(f32), bias0.astype(f32)]
  return pl.pallas_call(
      functools.partial(_ffn_in_kernel, eps=float(eps), swiglu=bool(swiglu)), grid=(batch, width // block_n),
      in_specs=in_specs, out_specs=pl.BlockSpec((None, block_n), lambda b, j: (b, j)),
      out_shape=jax.ShapeDtypeStruct((batch, width), y.dtype), interpret=interpret, name="ffn_in_step", **kwargs,
  )(*args)


# ---------------------------------------------------------------------------------------------
# The final TimestepNorm of a decode step (no CEMA after it), one kernel with its residual add.
#
# After the last block the step normalises x + residual (the block's deferred residual add): in XLA
# the add and the moments, the state merge, the normalisation and the count update are four small
# kernels. Here one program per sequence takes all the groups, so it can also update the count in
# place (it reads count[b] before it writes it, and no other program touches row b).
#
# Arrays: x, residual [B, G, K]; count [B, 1] int32; mean, var [B, G] float32; weight, bias [G, K].
# Returns (x_tsn [B, G, K] in x's dtype, count + 1, mean', var'); count, mean, var are updated in
# place when donated.
# ---------------------------------------------------------------------------------------------


def _final_norm_kernel(*refs, eps: float, k: int, with_residual: bool):
  if with_residual:
    x_ref, res_ref, count_ref, mean_ref, var_ref, weight_ref, bias_ref, xt_out, count_out, mean_out, var_out = refs
    x = (x_ref[...].astype(jnp.float32) + res_ref[...].astype(jnp.float32)).astype(x_ref.dtype)
  else:
    x_ref, count_ref, mean_ref, var_ref, weight_ref, bias_ref, xt_out, count_out, mean_out, var_out = refs
    x = x_ref[...]
  x_tsn, new_mean, new_var = _tsn_update(x, count_ref, mean_ref, var_ref, weight_ref, bias_ref, eps=eps, k=k,
                                         dtype=xt_out.dtype)
  count = count_ref[0]
  xt_out[...] = x_tsn
  mean_out[...] = new_mean
  var_out[...] = new_var
  count_out[0] = count + 1


def final_norm_step_reference(x, count, mean, var, weight, bias, *, eps: float, residual=None):
  """Plain-JAX oracle of `final_norm_step`."""
  if residual is not None:
    x = (x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(x.dtype)
  x_tsn, new_mean, new_var = _tsn_reference(x, count, mean, var, weight, bias, eps=eps)
  return x_tsn, count + 1, new_mean, new_var


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def final_norm_step(x, count, mean, var, weight, bias, *, eps: float, residual=None, num_warps: int = 4,
                    interpret: bool | None = None):
  """The kernel (see above): (x_tsn, count + 1, mean', var')."""
  batch, groups, k = x.shape
  shapes = {"count": (batch, 1), "mean": (batch, groups), "var": (batch, groups), "weight": (groups, k),
            "bias": (groups, k)}
  for name, arr in (("count", count), ("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
    if tuple(arr.shape) != shapes[name]:
      raise ValueError(f"final_norm_step: {name} must have shape {shapes[name]} for x of shape {x.shape}, got "
                       f"{tuple(arr.shape)}")
  if residual is not None and residual.shape != x.shape:
    raise ValueError(f"final_norm_step: residual must have x's shape {x.shape}, got {residual.shape}")
  interpret, kwargs = _triton_options(interpret, num_warps)
  seq = pl.BlockSpec((None, groups, k), lambda b: (b, 0, 0))
  stat = pl.BlockSpec((None, groups), lambda b: (b, 0))
  cnt = pl.BlockSpec((None, 1), lambda b: (b, 0))
  feat = pl.BlockSpec((groups, k), lambda b: (0, 0))
  args = [x] + ([residual] if residual is not None else []) + [count, mean.astype(jnp.float32),
                                                                var.astype(jnp.float32), weight, bias]
  first = 2 if residual is not None else 1  # the index of count among the inputs
  in_specs = [seq] * first + [cnt, stat, stat, feat, feat]
  f32 = jnp.float32
  return tuple(pl.pallas_call(
      functools.partial(_final_norm_kernel, eps=float(eps), k=k, with_residual=residual is not None),
      grid=(batch,), in_specs=in_specs, out_specs=[seq, cnt, stat, stat],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(count.shape, count.dtype),
                 jax.ShapeDtypeStruct((batch, groups), f32), jax.ShapeDtypeStruct((batch, groups), f32)],
      input_output_aliases={first: 1, first + 1: 2, first + 2: 3}, interpret=interpret, name="final_norm_step",
      **kwargs,
  )(*args))
