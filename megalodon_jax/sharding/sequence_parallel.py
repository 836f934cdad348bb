"""Sequence parallelism for CEMA and TimestepNorm, and device-local chunked attention.

Each device of the sequence mesh axis (size P, index r) holds a contiguous slice of l = L / P steps
of every sequence. Attention needs nothing from other slices when l is a multiple of the chunk
size (chunks never straddle a slice). The two recurrences do, and both are associative, so
instead of the release's chain (rank r waits for the state of rank r-1, depth P-1) every device:

  1. summarises its slice as an element of the recurrence's monoid:
       CEMA:          the affine map h -> A_r h + h_r on the complex state, with h_r [B, D, N] the
                      slice's final state from a zero start and A_r = q^l, or 0 for rows with a
                      reset in the slice (sent as h_r plus one flag per row: q^l is known
                      everywhere); both in closed form without the scan
                      (ops.cema.cema_slice_summary: power tables and per-chunk sums);
       TimestepNorm:  (reset_r, count, mean, var) [B], [B, G]: the statistics since the slice's
                      last reset and whether the slice has one (Chan's merge, restarted at resets);
  2. forms the exclusive prefix of the elements over the sequence axis: the state entering its
     slice. Two schedules ('sequence_combine'):
       'all_gather': one all-gather of the P summaries, then a local fold (depth 1; every
                     device receives P-1 summaries);
       'doubling':   Hillis-Steele scan with log2(P) rounds of ppermute, then one shift
                     (depth ceil(log2 P) + 1; one summary per round; ceil(log2(P - 1)) rounds
                     when the total is not asked for);
  3. runs the op on its slice once, from the incoming state (CEMA: dropped at the slice's first
     reset; TimestepNorm: the incoming statistics).

Segment ids (packed documents): the ops reset at the first step t > 0 of a new run of equal ids
and continue from the incoming state at t = 0. Across slices the same rule holds, so a slice
drops its incoming state in rows whose first id differs from the previous slice's last id
(the 'boundary' flag below), and counts as a reset in the prefix for those rows.

Everything is differentiable: the gradient flows back through the op's incoming state, the
combine (all-gather / ppermute transpose to reduce-scatter / reverse ppermute) and the local
summaries.

The public functions `cema`, `timestep_norm` and `chunked_attention` take the arguments of the
ops they replace; without an active Parallelism (rules.use) they simply call those ops, so the
single-device path is unchanged. Under one, they run inside `jax.shard_map` over the whole mesh
(batch over the 'batch' rule's axes, length over the 'length' rule's axis, features replicated),
which is also what custom calls such as the Pallas kernels need under GSPMD.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from megalodon_jax.config import ConfigError
from megalodon_jax.ops import attention as attention_ops
from megalodon_jax.ops import cema as cema_ops
from megalodon_jax.ops import timestep_norm as tsn_ops
from megalodon_jax.sharding import rules as rules_lib

# ---------------------------------------------------------------------------------------------
# Prefix combine over a mesh axis (inside shard_map).
# ---------------------------------------------------------------------------------------------


def _select(flag: jax.Array, a: Any, b: Any) -> Any:
  """where(flag, a, b) over matching pytrees; flag a scalar (same choice for every leaf)."""
  return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


# Name of the values exclusive_prefix receives from other devices: the only ones it keeps for the
# backward (see below).
EXCHANGED = "sequence_exchange"


def exclusive_prefix(element: Any, combine: Callable[[Any, Any], Any], identity: Any, *, axis: str,
                     size: int, schedule: str = "all_gather", total: bool = True) -> tuple[Any, Any]:
  """(exclusive prefix, total) of per-device `element`s along mesh `axis`, inside shard_map.

  combine(earlier, later) must be associative with `identity` as its neutral element; elements
  are pytrees of real arrays (collectives on CPU do not all handle complex or bool). The
  exclusive prefix of device r combines the elements of devices 0..r-1 (identity on device 0);
  `total` combines all P elements and is the same on every device (None unless total=True; with
  'doubling' it costs one extra all-reduce).

  Differentiated, it keeps only what the collectives delivered (named EXCHANGED) and recomputes
  the local fold over it in the backward: a fold over P elements would otherwise keep O(P)
  intermediate states per layer, each written into a layer scan's stacked buffers and read back.
  """

  def run(element, identity):
    index = jax.lax.axis_index(axis)
    exchanged = lambda tree: jax.tree.map(lambda a: checkpoint_name(a, EXCHANGED), tree)  # noqa: E731
    if schedule == "all_gather":
      gathered = exchanged(jax.tree.map(lambda a: jax.lax.all_gather(a, axis), element))  # leading axis P
      acc, prefixes = identity, []
      for j in range(size):  # P is small and static: a local fold, no communication
        prefixes.append(acc)
        acc = combine(acc, jax.tree.map(lambda a: a[j], gathered))
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *prefixes)
      exclusive = jax.tree.map(lambda a: jnp.take(a, index, axis=0), stacked)
      return exclusive, (acc if total else None)
    if schedule != "doubling":
      raise ConfigError(f"unknown sequence combine {schedule!r}; use one of {rules_lib.SEQUENCE_COMBINES}")
    inclusive, shift = element, 1
    # Hillis-Steele: after k rounds (shifts 1, 2, .., 2^(k-1)) r covers (r - 2^k, r]. The final
    # shift hands r the inclusive prefix of r - 1 <= P - 2, complete once 2^k >= P - 1; only the
    # total needs the last device's, 2^k >= P (at P = 2 without it no round at all: one exchange,
    # and no received element kept per layer). Rounds past 2^k >= P - 1 change no device below
    # P - 1, so the exclusive prefixes are the same either way.
    rounds_until = size if total else size - 1
    while shift < rounds_until:
      received = exchanged(jax.lax.ppermute(inclusive, axis, [(i, i + shift) for i in range(size - shift)]))
      inclusive = _select(index >= shift, combine(received, inclusive), inclusive)
      shift *= 2
    previous = exchanged(jax.lax.ppermute(inclusive, axis, [(i, i + 1) for i in range(size - 1)]))
    exclusive = _select(index >= 1, previous, identity)
    if not total:
      return exclusive, None
    last = jax.tree.map(lambda a: jnp.where(index == size - 1, a, jnp.zeros_like(a)), inclusive)
    return exclusive, exchanged(jax.tree.map(lambda a: jax.lax.psum(a, axis), last))

  if schedule not in rules_lib.SEQUENCE_COMBINES:
    raise ConfigError(f"unknown sequence combine {schedule!r}; use one of {rules_lib.SEQUENCE_COMBINES}")
  return _keeping_exchanged(run)(element, identity)


def _keeping_exchanged(fn: Callable) -> Callable:
  """fn rematerialised in the backward from its inputs and the values named EXCHANGED.

  For the small per-row work around the combine (powers of a [D, N] decay, Chan's merges, the
  incoming state): each intermediate it would keep is one more stacked buffer per layer under a
  layer scan, and recomputing them is a few [B, D, N]- or [B, G]-sized elementwise ops."""
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(EXCHANGED))


def _boundary_resets(segment_ids: jax.Array, axis: str, size: int) -> jax.Array:
  """[b] bool: this slice's first id differs from the previous slice's last id (never on slice 0)."""
  index = jax.lax.axis_index(axis)
  previous_last = jax.lax.ppermute(segment_ids[:, -1], axis, [(i, i + 1) for i in range(size - 1)])
  return (index > 0) & (segment_ids[:, 0] != previous_last)


def _internal_resets(segment_ids: jax.Array) -> jax.Array:
  """[b] bool: a new run of ids starts at some step t > 0 of the slice."""
  return jnp.any(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)


# ---------------------------------------------------------------------------------------------
# CEMA.
# ---------------------------------------------------------------------------------------------


def _to_pair(h: jax.Array) -> jax.Array:
  """complex [...] -> float32 [..., 2] (real, imag)."""
  return jnp.stack([jnp.real(h), jnp.imag(h)], axis=-1)


def _from_pair(a: jax.Array) -> jax.Array:
  return jax.lax.complex(a[..., 0], a[..., 1])


def _cema_combine(span_powers: jax.Array):
  """The composition of slice maps. An element is (keep [b] f32, span [] i32, h [b, D, N, 2]):
  h -> keep * Q^span h + h_slice, with Q = q^l and span the number of slices it covers.

  span_powers: [D, N, P + 1] complex64, Q^0 .. Q^P.
  """

  def combine(first, second):
    keep1, span1, h1 = first
    keep2, span2, h2 = second
    decay = jnp.take(span_powers, span2, axis=-1)  # Q^span2: [D, N]
    carried = jnp.where(keep2[:, None, None] > 0, decay * _from_pair(h1), 0.0)
    return keep1 * keep2, span1 + span2, h2 + _to_pair(carried)

  return combine


def cema_sequence_local(x: jax.Array, coeffs: cema_ops.CemaCoefficients, omega: jax.Array,
                        h0: jax.Array | None, segment_ids: jax.Array | None, *, axis: str, size: int,
                        method: str, chunk: int, schedule: str = "all_gather", return_state: bool = False):
  """Per-device body of sequence-parallel CEMA (call inside shard_map over `axis` of `size`).

  x: [b, l, D] this device's slice; h0: [b, D, N] complex state before the whole sequence (the
  same on every device) or None; segment_ids: [b, l] or None.
  Returns y [b, l, D] float32, and with return_state also h_L [b, D, N] complex64, the state
  after the whole sequence (the same on every device).
  """
  batch = x.shape[0]
  # The slice's own state and decay come in closed form, and the scan runs once, from the incoming
  # state. Scanning from zero and adding the incoming state's contribution afterwards cost 0.84 ms
  # per mega200M layer beyond the 0.67 ms scan (fwd+bwd, L/2 = 16384, H200: the return_state
  # backward, the contribution, the decay's own power tables), ~10 ms of a 99 ms two-GPU step.
  powers = "pallas" if method == "pallas" else "xla"
  h_local, slice_decay = cema_ops.cema_slice_summary(x, coeffs, segment_ids, powers=powers)
  if segment_ids is None:
    boundary = jnp.zeros((batch,), bool)
    keep = jnp.ones((batch,), jnp.float32)
  else:
    boundary = _boundary_resets(segment_ids, axis, size)
    keep = (~(boundary | _internal_resets(segment_ids))).astype(jnp.float32)

  @_keeping_exchanged
  def incoming(keep, h_local, slice_decay, boundary, h0):
    """(state entering this slice [b, D, N], state after the whole sequence or None)."""
    # Q^0 .. Q^P by products: P is a mesh axis size (a few), so P float32 roundings at most; the
    # double-float tables (a kernel, and their JVP residuals per layer) are for exponents in the
    # thousands.
    span_powers = [jnp.ones_like(slice_decay)]
    for _ in range(size):
      span_powers.append(span_powers[-1] * slice_decay)
    span_powers = jnp.stack(span_powers, axis=-1)

    def apply(prefix):
      """The state a prefix map produces from h0 (zero when h0 is None)."""
      keep_p, span_p, h_p = prefix
      h = _from_pair(h_p)
      if h0 is None:
        return h
      carried = jnp.take(span_powers, span_p, axis=-1) * h0.astype(jnp.complex64)
      return h + jnp.where(keep_p[:, None, None] > 0, carried, 0.0)

    element = (keep, jnp.ones((), jnp.int32), _to_pair(h_local))
    identity = (jnp.ones((batch,), jnp.float32), jnp.zeros((), jnp.int32),
                jnp.zeros(h_local.shape + (2,), jnp.float32))
    before, everything = exclusive_prefix(element, _cema_combine(span_powers), identity, axis=axis, size=size,
                                          schedule=schedule, total=return_state)
    h_in = jnp.where(boundary[:, None, None], 0.0, apply(before)).astype(jnp.complex64)
    return h_in, (apply(everything) if return_state else None)

  h_in, h_last = incoming(keep, h_local, slice_decay, boundary, h0)
  y = cema_ops.cema(x, coeffs, omega, h_in, method=method, segment_ids=segment_ids, chunk=chunk)
  return (y, h_last) if return_state else y


# ---------------------------------------------------------------------------------------------
# TimestepNorm.
# ---------------------------------------------------------------------------------------------


def _tsn_summary(x: jax.Array, num_groups: int, valid: jax.Array, segment_ids: jax.Array | None):
  """(count [b] i32, mean [b, G], var [b, G]) of the slice's valid steps after its last reset
  (tsn_ops.weighted_stats: each step one observation of its group mean and variance; the
  gradient in closed form, one elementwise pass)."""
  weight = valid
  if segment_ids is not None:
    run = jnp.cumsum(tsn_ops.reset_flags(segment_ids, *segment_ids.shape).astype(jnp.int32), axis=1)
    weight = weight & (run == run[:, -1:])
  return tsn_ops.weighted_stats(x, num_groups, weight)


def _tsn_combine(first, second):
  """Chan's merge restarted where `second` has a reset: elements (reset f32 [b], count, mean, var)."""
  reset1, count1, mean1, var1 = first
  reset2, count2, mean2, var2 = second
  merged = tsn_ops.merge_stats(tsn_ops.TimestepNormState(count1, mean1, var1),
                               tsn_ops.TimestepNormState(count2, mean2, var2))
  take2 = reset2 > 0
  return (jnp.maximum(reset1, reset2), jnp.where(take2, count2, merged.count),
          jnp.where(take2[:, None], mean2, merged.mean), jnp.where(take2[:, None], var2, merged.var))


def timestep_norm_sequence_local(x: jax.Array, weight: jax.Array, bias: jax.Array, *, num_groups: int,
                                 eps: float, state: tsn_ops.TimestepNormState | None,
                                 padding_mask: jax.Array | None, segment_ids: jax.Array | None,
                                 axis: str, size: int, method: str, schedule: str = "all_gather"):
  """Per-device body of sequence-parallel TimestepNorm (inside shard_map over `axis` of `size`).

  x: [b, l, D] this device's slice; state: the statistics before the whole sequence (same on
  every device) or None. Returns (y [b, l, D], state after the whole sequence).
  """
  batch = x.shape[0]
  valid = jnp.ones(x.shape[:2], bool) if padding_mask is None else ~padding_mask
  count, mean, var = _tsn_summary(x, num_groups, valid, segment_ids)
  if segment_ids is None:
    boundary = jnp.zeros((batch,), bool)
    reset = jnp.zeros((batch,), jnp.float32)
  else:
    boundary = _boundary_resets(segment_ids, axis, size)
    reset = (boundary | _internal_resets(segment_ids)).astype(jnp.float32)
  dtype = mean.dtype
  zero = tsn_ops.initial_state(batch, num_groups)
  first = zero if state is None else tsn_ops.TimestepNormState(
      jnp.asarray(state.count, jnp.int32), jnp.asarray(state.mean, dtype), jnp.asarray(state.var, dtype))

  @_keeping_exchanged
  def incoming(element, first, boundary):
    """(statistics entering this slice, statistics after the whole sequence)."""
    identity = (jnp.zeros((batch,), jnp.float32), zero.count, zero.mean.astype(dtype), zero.var.astype(dtype))
    before, total = exclusive_prefix(element, _tsn_combine, identity, axis=axis, size=size, schedule=schedule)
    start = (jnp.zeros((batch,), jnp.float32),) + tuple(first)
    _, count_in, mean_in, var_in = _tsn_combine(start, before)
    _, count_all, mean_all, var_all = _tsn_combine(start, total)
    keep = ~boundary
    state_in = tsn_ops.TimestepNormState(jnp.where(keep, count_in, 0), jnp.where(keep[:, None], mean_in, 0.0),
                                         jnp.where(keep[:, None], var_in, 0.0))
    return state_in, tsn_ops.TimestepNormState(count_all, mean_all, var_all)

  state_in, state_all = incoming((reset, count, mean, var), first, boundary)
  y, _ = tsn_ops.timestep_norm(x, weight, bias, num_groups=num_groups, eps=eps, state=state_in,
                               padding_mask=padding_mask, segment_ids=segment_ids, method=method)
  return y, state_all


# ---------------------------------------------------------------------------------------------
# Context-aware entry points used by the layers.
# ---------------------------------------------------------------------------------------------


class _Layout:
  """Specs of [B, L, ...] activations under a Parallelism: batch axes, sequence axis and its size."""

  def __init__(self, par: rules_lib.Parallelism, batch: int, length: int):
    spec = par.spec((batch, length), ("batch", "length"))
    self.batch = spec[0]
    self.sequence = spec[1]
    if self.sequence is not None and not isinstance(self.sequence, str):
      raise ConfigError(f"mesh.rules.length must map to one mesh axis for sequence parallelism, got {self.sequence}")
    self.size = 1 if self.sequence is None else par.mesh.shape[self.sequence]
    self.mesh = par.mesh
    self.schedule = par.sequence_combine

  def rows(self, *trailing) -> P:
    """Spec of a [B, L, *trailing] array."""
    return P(self.batch, self.sequence, *trailing)

  def per_row(self, *trailing) -> P:
    """Spec of a [B, *trailing] array (replicated over the sequence axis)."""
    return P(self.batch, *trailing)


def _shard_map(fn, layout: _Layout, in_specs, out_specs):
  # check_vma=False: the ops start their scans from constant (device-invariant) carries, which the
  # varying-axes type check rejects, and Pallas calls carry no such types. Values and gradients do
  # not depend on it (the transpose of a replicated input is summed over the devices either way).
  return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _pack_optional(*values):
  """(present values, rebuild): shard_map arguments must be arrays, so Nones are left out."""
  present = tuple(v for v in values if v is not None)
  flags = tuple(v is not None for v in values)

  def rebuild(args):
    it = iter(args)
    return tuple(next(it) if flag else None for flag in flags)

  return present, rebuild


def cema(x: jax.Array, coeffs: cema_ops.CemaCoefficients, omega: jax.Array, h0: jax.Array | None = None, *,
         method: str = "chunked", segment_ids: jax.Array | None = None, return_state: bool = False,
         chunk: int = 64):
  """ops.cema.cema, sequence-parallel under an active Parallelism (same arguments and results)."""
  par = rules_lib.current()
  if par is None:
    return cema_ops.cema(x, coeffs, omega, h0, method=method, segment_ids=segment_ids,
                         return_state=return_state, chunk=chunk)
  batch, length, _ = x.shape
  layout = _Layout(par, batch, length)
  omega = jnp.asarray(omega).reshape(-1)

  def body(x, coeffs, omega, *optional):
    h0_local, seg = rebuild(optional)
    if layout.size == 1:
      return cema_ops.cema(x, coeffs, omega, h0_local, method=method, segment_ids=seg,
                           return_state=return_state, chunk=chunk)
    return cema_sequence_local(x, coeffs, omega, h0_local, seg, axis=layout.sequence, size=layout.size,
                               method=method, chunk=chunk, schedule=layout.schedule, return_state=return_state)

  optional, rebuild = _pack_optional(h0, segment_ids)
  specs = tuple(s for s, v in ((layout.per_row(None, None), h0), (layout.rows(), segment_ids)) if v is not None)
  out_specs = (layout.rows(None), layout.per_row(None, None)) if return_state else layout.rows(None)
  return _shard_map(body, layout, (layout.rows(None), P(), P()) + specs, out_specs)(x, coeffs, omega, *optional)


def timestep_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, *, num_groups: int, eps: float = 1e-5,
                  state: tsn_ops.TimestepNormState | None = None, padding_mask: jax.Array | None = None,
                  segment_ids: jax.Array | None = None, method: str = "associative"):
  """ops.timestep_norm.timestep_norm, sequence-parallel under an active Parallelism."""
  par = rules_lib.current()
  if par is None:
    return tsn_ops.timestep_norm(x, weight, bias, num_groups=num_groups, eps=eps, state=state,
                                 padding_mask=padding_mask, segment_ids=segment_ids, method=method)
  tsn_ops.check_inputs(x, weight, bias, num_groups, state, padding_mask, segment_ids)
  batch, length, _ = x.shape
  layout = _Layout(par, batch, length)

  def body(x, weight, bias, *optional):
    state_local, mask, seg = rebuild(optional)
    if layout.size == 1:
      return tsn_ops.timestep_norm(x, weight, bias, num_groups=num_groups, eps=eps, state=state_local,
                                   padding_mask=mask, segment_ids=seg, method=method)
    return timestep_norm_sequence_local(x, weight, bias, num_groups=num_groups, eps=eps, state=state_local,
                                        padding_mask=mask, segment_ids=seg, axis=layout.sequence,
                                        size=layout.size, method=method, schedule=layout.schedule)

  optional, rebuild = _pack_optional(state, padding_mask, segment_ids)
  state_spec = tsn_ops.TimestepNormState(layout.per_row(), layout.per_row(None), layout.per_row(None))
  specs = tuple(s for s, v in ((state_spec, state), (layout.rows(), padding_mask), (layout.rows(), segment_ids))
                if v is not None)
  return _shard_map(body, layout, (layout.rows(None), P(), P()) + specs, (layout.rows(None), state_spec))(x, weight, bias, *optional)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_size: int,
                      segment_ids: jax.Array | None = None, impl: str = "auto", dropout_rate: float = 0.0,
                      dropout_rng: jax.Array | None = None) -> jax.Array:
  """ops.attention.chunked_attention, run per device under an active Parallelism.

  Chunks never cross a sequence slice, so no communication is needed; the slice length L / P
  must be a multiple of chunk_size (ConfigError otherwise). Heads follow the 'heads' rule.
  With attention dropout the XLA path is left to GSPMD (one mask over the global array).
  """
  par = rules_lib.current()
  if par is None or dropout_rate > 0.0:
    return attention_ops.chunked_attention(q, k, v, chunk_size=chunk_size, segment_ids=segment_ids, impl=impl,
                                           dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  batch, length, heads, _ = q.shape
  layout = _Layout(par, batch, length)
  if layout.size > 1 and (length // layout.size) % chunk_size:
    raise ConfigError(
        f"sequence parallelism splits the length {length} into {layout.size} slices of {length // layout.size} "
        f"steps, which is not a multiple of chunk_size={chunk_size}: attention chunks must not straddle slices. "
        f"Use a sequence length that is a multiple of {layout.size * chunk_size} or a smaller mesh.sequence.")
  head_axes = par.spec((heads,), ("heads",))[0]
  spec = layout.rows(head_axes, None)

  def body(q, k, v, *seg):
    return attention_ops.chunked_attention(q, k, v, chunk_size=chunk_size, segment_ids=seg[0] if seg else None,
                                           impl=impl)

  seg_args = (segment_ids,) if segment_ids is not None else ()
  seg_specs = (layout.rows(),) if segment_ids is not None else ()
  return _shard_map(body, layout, (spec, spec, spec) + seg_specs, spec)(q, k, v, *seg_args)


def sequence_parallel_size(par: rules_lib.Parallelism | None = None) -> int:
  """Size of the mesh axis the sequence is split over (1 without sequence parallelism)."""
  par = par or rules_lib.current()
  if par is None or par.sequence_axis is None:
    return 1
  return par.mesh.shape[par.sequence_axis]


__all__ = ["cema", "cema_sequence_local", "chunked_attention", "exclusive_prefix", "sequence_parallel_size",
           "timestep_norm", "timestep_norm_sequence_local"]
