"""Where does the 2-GPU sequence-parallel step lose its time? One layer's ops, timed in pieces.

On 2 H200s bench_scaling first measured mega200M at 1 x 32768 tokens at 167.6 ms/step on one GPU
and 187.7 ms/step on two (sequence parallel): no speed-up. The pieces below found the cause (XLA's
double-float power tables, session 6) and what is left after the fixes (94.7 ms against 146.6 on
one GPU, 77.4%, session 7; README "Several GPUs"). This script times, at the mega200M layer shapes
(B=1, L=32768, so L/2 per device on 2 devices), forward and forward+backward (gradient of
sum(y * w)) of:

  cema       single device, L          the Pallas CEMA as the layer calls it (no return_state)
             single device, L/2        the same: the ideal per-device cost (ratio 1.0)
             single device, L/2        return_state=True and a loss on the final state too, i.e.
                                       the backward's state-gradient path (has_g) (S2)
             2 devices, L              sequence_parallel.cema on a sequence mesh of 2
             single device, L/2        from an incoming state h0 (what a slice would cost run
                                       from the state entering it)
             single device, L/2        the slice's closed-form state and decay before the
                                       exchange (cema_slice_summary, S1'), Pallas and XLA powers
             single device, L/2        the earlier design's extra pieces (S1): cema_state_contribution (the
                                       state correction), _power_tables (its double-float
                                       powers), the slice-decay powers q^l and (q^l)^0..P; each
                                       with XLA's and with the Pallas power tables
  tsn        single device, L, L/2; 2 devices, L (sequence_parallel.timestep_norm); the summary
             pass of timestep_norm_sequence_local alone at L/2 (S3)
  attention  single device, L, L/2; 2 devices, L (sequence_parallel.chunked_attention)

and optionally (--trace_dir / --hlo_dir) traces one sequence-parallel train step built exactly as
bench_scaling builds it (RowSpec / build_step / compile_step) with jax.profiler, and dumps its
compiled HLO (S4: is it scheduling?). Every row is compiled and timed on its own, one after the
other (median of --iters after --warmup, block_until_ready: harness.time_fn); a row that fails
(e.g. out of memory) records its error and the run goes on. Ratios are to the op's single-device
L/2 row. Rows print as they finish; --json is rewritten after every row.

  python experiments/gpu_checks/check_sequence_parallel.py --json sp.json --trace_dir trace
  python experiments/gpu_checks/check_sequence_parallel.py --cpu --json /tmp/sp.json   # smoke
  python experiments/gpu_checks/check_sequence_parallel.py --single_device --json sp.json  # 1 GPU

--cpu: tiny shapes (D=32, N=4, L=512, float32) on 2 simulated CPU devices, the Pallas CEMA in
the interpreter; it also asserts that every sequence-parallel op equals the single-device op on
the full length (values and gradients, relative error < 1e-4) and that the state carried across
the slice boundary matters (so the check is not vacuous).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megalodon_jax.xla_flags import add_xla_flags, cpu_flags  # noqa: E402  (imports no JAX)

SEQUENCE_DEVICES = 2


def _cpu_environment() -> None:
  """Two simulated CPU devices and the CPU flags this jaxlib accepts (XLA aborts on others)."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  add_xla_flags(f"--xla_force_host_platform_device_count={SEQUENCE_DEVICES}", *cpu_flags())


if "--cpu" in sys.argv[1:]:  # XLA reads its flags once, when JAX starts
  _cpu_environment()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from experiments.benchmarks import bench_ops, bench_scaling, harness  # noqa: E402
from megalodon_jax import config as mega_config  # noqa: E402
from megalodon_jax import sharding  # noqa: E402
from megalodon_jax.ops import cema as cema_ops  # noqa: E402
from megalodon_jax.ops import timestep_norm as tsn_ops  # noqa: E402
from megalodon_jax.sharding import sequence_parallel as sp  # noqa: E402

VALUE_TOL = 1e-4  # sequence-parallel vs single device, max |diff| / max |single| (smoke mode)
STATE_EFFECT_MIN = 1e-3  # y of the second half alone must differ at least this much (smoke mode)


# ----------------------------------------------------------------------------------------------
# Shapes and inputs.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shapes:
  """One layer's shapes: B, L (total), D, N, G groups, H heads of Z / V features, chunk C."""
  batch: int
  length: int
  dim: int
  order: int
  groups: int
  heads: int
  z_head: int
  v_head: int
  chunk: int
  cema_chunk: int
  dtype: str

  @property
  def half(self) -> int:
    return self.length // SEQUENCE_DEVICES


def layer_shapes(args: argparse.Namespace) -> Shapes:
  cfg = mega_config.preset(args.preset)
  return Shapes(batch=1, length=args.length, dim=cfg.model_dim, order=cfg.cema_ndim, groups=cfg.norm_num_groups,
                heads=cfg.num_heads, z_head=cfg.z_head_dim, v_head=cfg.v_head_dim, chunk=cfg.chunk_size,
                cema_chunk=cfg.cema_chunk, dtype=args.dtype)


def _normal(key: int, shape: tuple[int, ...], dtype=jnp.float32, scale: float = 1.0) -> jax.Array:
  """Drawn on the device (fast at 32K x 2048), the same numbers for every row of an op."""
  return (scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)).astype(dtype)


def cema_params(dim: int, order: int) -> dict[str, jax.Array]:
  """SPEC §2 initialisation, except a quarter of the channels decay slowly (|q| ~ 1 - 4e-5), so
  the state carried across the slice boundary is large (the smoke check must see it)."""
  rng = np.random.default_rng(0)
  alpha = rng.normal(0.0, 0.2, (dim, order, 1))
  delta = rng.normal(0.0, 0.2, (dim, order, 1))
  slow = max(1, dim // 4)
  alpha[:slow] = -5.0
  delta[:slow] = -5.0
  freqs = rng.permutation(np.exp(-np.arange(1, dim + 1) * math.log(dim) / dim))
  params = {"alpha": alpha, "delta": delta, "theta": np.log(freqs / (1 - freqs)).reshape(dim, 1, 1),
            "gamma": rng.normal(0.0, 1.0, (dim, order, 2)),
            "omega": np.clip(rng.normal(0.0, 0.25, (dim, 1)), -1.0, 1.0)}
  return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def coefficients(params: dict[str, jax.Array]) -> cema_ops.CemaCoefficients:
  """As layers.cema.CEMA forms them (outside sequence_parallel.cema, on replicated parameters)."""
  return cema_ops.cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])


def make_inputs(op: str, s: Shapes) -> dict[str, Any]:
  """Full-length inputs of one op: activations [B, L, ...] in the compute dtype, f32 weights w.
  One program per op (eager draws would compile a few small programs per array)."""
  return jax.jit(lambda: _inputs(op, s))()


def _inputs(op: str, s: Shapes) -> dict[str, Any]:
  dtype = jnp.dtype(s.dtype)
  if op == "cema":
    return {"x": _normal(1, (s.batch, s.length, s.dim), dtype), "w": _normal(2, (s.batch, s.length, s.dim)),
            "params": cema_params(s.dim, s.order)}
  if op == "tsn":
    drift = jnp.linspace(-2.0, 2.0, s.length)[None, :, None]  # statistics that change along time
    x = (_normal(3, (s.batch, s.length, s.dim)) * (1.0 + jnp.abs(_normal(4, (1, 1, s.dim)))) + drift)
    return {"x": x.astype(dtype), "w": _normal(5, (s.batch, s.length, s.dim)),
            "weight": _normal(6, (s.dim,), scale=0.2), "bias": _normal(7, (s.dim,), scale=0.2)}
  if op == "attention":
    qk_scale = s.z_head ** -0.5  # RMS-normalised q, k times ~1/sqrt(dz), as the layer makes them
    return {"q": _normal(8, (s.batch, s.length, s.heads, s.z_head), dtype, qk_scale),
            "k": _normal(9, (s.batch, s.length, s.heads, s.z_head), dtype, qk_scale),
            "v": _normal(10, (s.batch, s.length, s.heads, s.v_head), dtype),
            "w": _normal(11, (s.batch, s.length, s.heads, s.v_head))}
  raise ValueError(op)


TABLES_TOL = 1e-5  # Pallas vs XLA power tables, relative, where float32 represents the value


def power_tables_check(s: Shapes) -> dict[str, Any]:
  """The Pallas power tables (kernels_pallas.cema.power_tables_pallas, compiled on a GPU) against
  XLA's, at the layer's q and L/2, and for the slice decay q^(L/2): max relative difference over
  the entries above 1e-30 (both are float32-rounded double-float powers, so ~1e-7)."""
  q = coefficients(cema_params(s.dim, s.order)).q
  out: dict[str, Any] = {}
  for name, kwargs in (("tables", {"length": s.half}), ("slice_decay", {"length": 1, "offset": s.half})):
    got = cema_ops._power_tables(q, impl="pallas", **kwargs)
    want = cema_ops._power_tables(q, **kwargs)
    worst = 0.0
    for a, b in ((got.high, want.high), (got.low, want.low)):
      a, b = np.asarray(a), np.asarray(b)
      big = np.abs(b) > 1e-30
      worst = max(worst, float(np.max(np.abs(a - b)[big] / np.abs(b)[big], initial=0.0)))
    out[name] = worst
  out["passed"] = all(v < TABLES_TOL for k, v in out.items())
  return out


# The slice summary's two paths, relative to the largest entry: the state and dx; the parameter
# gradients are sums over L/2 x D x N float32 terms, rounded in different orders. The check runs
# on float32 x: with bfloat16 x, dx is rounded to bfloat16, and a float32 difference of one ulp
# that straddles a bfloat16 rounding step shows as 2^-8 of that entry (4.1e-5 of the largest in
# the first GPU run, 2026-11-29, which therefore failed at 1e-5).
SUMMARY_TOL = 1e-5
SUMMARY_PARAM_TOL = 1e-4


def summary_check(s: Shapes) -> dict[str, Any]:
  """ops.cema.cema_slice_summary with powers="pallas" (the chunk-summary kernel, compiled on a GPU)
  against powers="xla" (XLA's tables and a float32 einsum) at the layer's L/2: the state h_L and
  the gradients of a random real functional of it in x and in the CEMA parameters. Max |difference|
  over max |XLA's|, per output."""
  params = cema_params(s.dim, s.order)
  x = _normal(18, (s.batch, s.half, s.dim), jnp.float32)
  w = _normal(19, (s.batch, s.dim, s.order, 2))

  def summary(powers):
    def loss(x, params):
      h, decay = cema_ops.cema_slice_summary(x, coefficients(params), powers=powers)
      return jnp.sum(jnp.real(h) * w[..., 0] + jnp.imag(h) * w[..., 1]) + jnp.sum(jnp.real(decay)), h
    (_, h), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, params)
    return {"h": h, "dx": grads[0], **{f"d{k}": v for k, v in grads[1].items()}}

  got, want = summary("pallas"), summary("xla")
  out: dict[str, Any] = {}
  for name in want:
    a, b = (np.asarray(jnp.asarray(v, jnp.complex64 if name == "h" else jnp.float32)) for v in (got[name], want[name]))
    scale = float(np.max(np.abs(b)))
    out[name] = float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)
  out["passed"] = all(v < (SUMMARY_TOL if k in ("h", "dx") else SUMMARY_PARAM_TOL) for k, v in out.items())
  return out


def second_half(a: jax.Array) -> jax.Array:
  """[B, L, ...] -> [B, L/2:, ...]: what device 1 of 2 holds (device 0's slice costs the same)."""
  return a[:, a.shape[1] // SEQUENCE_DEVICES:]


# ----------------------------------------------------------------------------------------------
# Cases: one op variant = a forward, a scalar loss and its inputs.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
  """forward(*args[:inputs]) and loss(*args) -> scalar; the loss is differentiated in `argnums`
  (the arguments after the forward's are the loss's weights)."""
  forward: Callable[..., Any]
  loss: Callable[..., jax.Array]
  args: tuple
  argnums: tuple[int, ...]
  inputs: int


def weighted(y: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.sum(y.astype(jnp.float32) * w)


def sequence_parallelism(schedule: str) -> sharding.Parallelism:
  """A data=1 x sequence=2 mesh over the first 2 devices, as bench_scaling's sequence rows."""
  mesh = sharding.create_mesh({"data": 1, "sequence": SEQUENCE_DEVICES}, jax.devices()[:SEQUENCE_DEVICES])
  return sharding.Parallelism(mesh, sharding.DEFAULT_RULES, schedule)


def split_sequence(par: sharding.Parallelism, *arrays: jax.Array) -> tuple:
  """[B, L, ...] arrays placed as the model's activations: L split over the sequence axis."""
  return tuple(jax.device_put(a, NamedSharding(par.mesh, P(None, "sequence"))) for a in arrays)


def replicate(par: sharding.Parallelism, *trees: Any) -> tuple:
  """Parameters: a copy on every device."""
  return tuple(jax.device_put(t, NamedSharding(par.mesh, P())) for t in trees)


def under(par: sharding.Parallelism | None, fn: Callable) -> Callable:
  """fn traced under sharding.use(par) (what makes the layers' ops sequence-parallel)."""
  if par is None:
    return fn

  def traced(*args):
    with sharding.use(par):
      return fn(*args)

  return traced


def cema_case(data: dict, s: Shapes, method: str, *, half: bool = False, state_loss: bool = False,
              par: sharding.Parallelism | None = None, incoming: bool = False) -> Case:
  """The layer's call: sequence_parallel.cema(x, coeffs, omega, method=..., chunk=...).

  incoming: an incoming state h0 (a fixed random one; not differentiated), i.e. what a slice
  costs when it runs from the state entering it instead of adding a correction afterwards."""
  x, w = (second_half(data["x"]), second_half(data["w"])) if half else (data["x"], data["w"])
  h0 = (jax.lax.complex(_normal(15, (s.batch, s.dim, s.order)), _normal(16, (s.batch, s.dim, s.order)))
        if incoming else None)

  def forward(x, params):
    return sp.cema(x, coefficients(params), params["omega"].reshape(-1), h0, method=method,
                   return_state=state_loss, chunk=s.cema_chunk)

  def loss(x, params, w, *state_w):
    if not state_loss:
      return weighted(forward(x, params), w)
    y, h = forward(x, params)
    # A real cotangent on h_L, as sequence parallelism gives the local final state (S2).
    return weighted(y, w) + jnp.sum(jnp.real(h) * state_w[0] + jnp.imag(h) * state_w[1])

  args = (x, data["params"], w)
  if state_loss:
    shape = (s.batch, s.dim, s.order)
    args += (_normal(12, shape), _normal(13, shape))
  if par is not None:
    (x, w), (params,) = split_sequence(par, x, w), replicate(par, data["params"])
    args = (x, params, w)
  return Case(under(par, forward), under(par, loss), args, (0, 1), 2)


def state_contribution_case(data: dict, s: Shapes, powers: str = "xla") -> Case:
  """cema_state_contribution(h_in, coeffs, L/2): the correction every slice adds (S1), with its
  power tables built by `powers` (ops.cema.POWER_IMPLS)."""
  def forward(h_pair, params):
    return cema_ops.cema_state_contribution(jax.lax.complex(h_pair[..., 0], h_pair[..., 1]),
                                            coefficients(params), s.half, powers=powers)

  def loss(h_pair, params, w):
    return weighted(forward(h_pair, params), w)

  h_pair = _normal(14, (s.batch, s.dim, s.order, 2))
  return Case(forward, loss, (h_pair, data["params"], second_half(data["w"])), (0, 1), 2)


def power_tables_case(data: dict, s: Shapes, impl: str = "xla") -> Case:
  """_power_tables(q, L/2), the double-float powers inside cema_state_contribution (S1)."""
  def forward(params):
    tables = cema_ops._power_tables(coefficients(params).q, s.half, impl=impl)
    return tables.high, tables.low

  def loss(params):
    return sum(jnp.sum(jnp.real(t) + jnp.imag(t)) for t in forward(params))

  return Case(forward, loss, (data["params"],), (0,), 1)


def slice_decay_case(data: dict, s: Shapes, impl: str = "xla") -> Case:
  """cema_sequence_local's other powers: Q = q^(L/2) and Q^0..Q^P (S1)."""
  def forward(params):
    decay = cema_ops.cema_powers(coefficients(params).q, 1, offset=s.half, impl=impl)[..., 0]
    return cema_ops.cema_powers(decay, SEQUENCE_DEVICES + 1, impl=impl)

  def loss(params):
    powers = forward(params)
    return jnp.sum(jnp.real(powers) + jnp.imag(powers))

  return Case(forward, loss, (data["params"],), (0,), 1)


def slice_summary_case(data: dict, s: Shapes, powers: str = "xla", layout: str = "per_order") -> Case:
  """cema_slice_summary(x, coeffs) at L/2: the slice's closed-form state h_L and decay q^(L/2),
  all that cema_sequence_local computes before the exchange since session 7 (S1'); with Pallas
  powers, the chunk-summary kernel in `layout` (kernels_pallas.cema_summary.LAYOUTS)."""
  from kernels_pallas import cema_summary
  x, w = second_half(data["x"]), _normal(17, (s.batch, s.dim, s.order))

  def forward(x, params):
    with cema_summary.use_layout(layout):  # read when traced, also for the backward
      return cema_ops.cema_slice_summary(x, coefficients(params), powers=powers)

  def loss(x, params, w):
    h, decay = forward(x, params)
    return jnp.sum(jnp.real(h) * w + jnp.imag(h)) + jnp.sum(jnp.real(decay) + jnp.imag(decay))

  return Case(forward, loss, (x, data["params"], w), (0, 1), 2)


def tsn_case(data: dict, s: Shapes, method: str, *, half: bool = False,
             par: sharding.Parallelism | None = None) -> Case:
  """The layer's call: sequence_parallel.timestep_norm(x, weight, bias, num_groups, method)."""
  x, w = (second_half(data["x"]), second_half(data["w"])) if half else (data["x"], data["w"])

  def forward(x, weight, bias):
    return sp.timestep_norm(x, weight, bias, num_groups=s.groups, method=method)

  def loss(x, weight, bias, w):
    return weighted(forward(x, weight, bias)[0], w)

  args = (x, data["weight"], data["bias"], w)
  if par is not None:
    (x, w), (weight, bias) = split_sequence(par, x, w), replicate(par, data["weight"], data["bias"])
    args = (x, weight, bias, w)
  return Case(under(par, forward), under(par, loss), args, (0, 1, 2), 3)


def tsn_summary_case(data: dict, s: Shapes) -> Case:
  """The extra pass of timestep_norm_sequence_local: the slice's (count, mean, var) (S3)."""
  x = second_half(data["x"])
  valid = jnp.ones(x.shape[:2], bool)
  w_mean, w_var = _normal(15, (s.batch, s.groups)), _normal(16, (s.batch, s.groups))

  def forward(x):
    return sp._tsn_summary(x, s.groups, valid, None)

  def loss(x):
    _, mean, var = forward(x)
    return jnp.sum(mean * w_mean + var * w_var)

  return Case(forward, loss, (x,), (0,), 1)


def attention_case(data: dict, s: Shapes, impl: str, *, half: bool = False,
                   par: sharding.Parallelism | None = None) -> Case:
  """The layer's call: sequence_parallel.chunked_attention(q, k, v, chunk_size=C, impl=...)."""
  names = ("q", "k", "v", "w")
  args = tuple(second_half(data[n]) if half else data[n] for n in names)

  def forward(q, k, v):
    return sp.chunked_attention(q, k, v, chunk_size=s.chunk, impl=impl)

  def loss(q, k, v, w):
    return weighted(forward(q, k, v), w)

  if par is not None:
    args = split_sequence(par, *args)
  return Case(under(par, forward), under(par, loss), args, (0, 1, 2), 3)


# ----------------------------------------------------------------------------------------------
# Rows.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RowPlan:
  """A row to time: `build(data, shapes)` makes its Case from the op's full-length inputs."""
  op: str
  variant: str
  devices: int
  length: int
  build: Callable[[dict, Shapes], Case]
  ideal: bool = False  # the op's single-device L/2 row, the ratios' denominator
  compare: str | None = None  # "single" / "parallel": the pair checked for equal values (--cpu)


def row_plans(s: Shapes, args: argparse.Namespace) -> list[RowPlan]:
  """In order of the suspects: CEMA (S1, S2), TimestepNorm (S3), attention."""
  par = sequence_parallelism(args.schedule) if jax.device_count() >= SEQUENCE_DEVICES else None
  m, t, a = args.cema_method, args.tsn_method, args.attention_impl
  L, h = s.length, s.half
  return [
      RowPlan("cema", m, 1, L, lambda d, s: cema_case(d, s, m), compare="single"),
      RowPlan("cema", f"{m} (ideal)", 1, h, lambda d, s: cema_case(d, s, m, half=True), ideal=True),
      RowPlan("cema", f"{m} return_state, loss on h_L (S2)", 1, h,
              lambda d, s: cema_case(d, s, m, half=True, state_loss=True)),
      RowPlan("cema", f"{m} from an incoming state h0", 1, h,
              lambda d, s: cema_case(d, s, m, half=True, incoming=True)),
      RowPlan("cema", f"sequence_parallel {m} {args.schedule}", SEQUENCE_DEVICES, L,
              lambda d, s: cema_case(d, s, m, par=par), compare="parallel"),
      # Since session 7: the slice's closed-form summary before the exchange, then the scan from
      # the incoming state (the row above); the S1 rows below are the earlier correction's pieces.
      RowPlan("cema", "slice summary, Pallas powers (S1')", 1, h, lambda d, s: slice_summary_case(d, s, "pallas")),
      RowPlan("cema", "slice summary, Pallas powers, planes layout", 1, h,
              lambda d, s: slice_summary_case(d, s, "pallas", "planes")),
      RowPlan("cema", "slice summary, XLA powers (S1')", 1, h, slice_summary_case),
      RowPlan("cema", "state_contribution (S1)", 1, h, state_contribution_case),
      RowPlan("cema", "_power_tables (S1)", 1, h, power_tables_case),
      RowPlan("cema", "slice decay powers (S1)", 1, h, slice_decay_case),
      # The same three with Pallas power tables (what sequence parallelism uses with the Pallas scan).
      RowPlan("cema", "state_contribution, Pallas powers", 1, h,
              lambda d, s: state_contribution_case(d, s, "pallas")),
      RowPlan("cema", "_power_tables, Pallas", 1, h, lambda d, s: power_tables_case(d, s, "pallas")),
      RowPlan("cema", "slice decay powers, Pallas", 1, h, lambda d, s: slice_decay_case(d, s, "pallas")),
      RowPlan("tsn", t, 1, L, lambda d, s: tsn_case(d, s, t), compare="single"),
      RowPlan("tsn", f"{t} (ideal)", 1, h, lambda d, s: tsn_case(d, s, t, half=True), ideal=True),
      RowPlan("tsn", f"sequence_parallel {t} {args.schedule}", SEQUENCE_DEVICES, L,
              lambda d, s: tsn_case(d, s, t, par=par), compare="parallel"),
      RowPlan("tsn", "summary pass (S3)", 1, h, tsn_summary_case),
      RowPlan("attention", a, 1, L, lambda d, s: attention_case(d, s, a), compare="single"),
      RowPlan("attention", f"{a} (ideal)", 1, h, lambda d, s: attention_case(d, s, a, half=True), ideal=True),
      RowPlan("attention", f"sequence_parallel {a}", SEQUENCE_DEVICES, L,
              lambda d, s: attention_case(d, s, a, par=par), compare="parallel"),
  ]


def compile_fn(fn: Callable, *args) -> tuple[Any, float]:
  """(compiled jit of fn for these arguments, seconds); -O0 on the CPU (bench_scaling's options)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile(bench_scaling.compiler_options())
  return compiled, time.perf_counter() - start


def dump_hlo(row: dict, key: str, compiled: Any, hlo_dir: str) -> None:
  """The compiled program's HLO text: <hlo_dir>/ops/<op>-<variant>.<fwd or fwd_bwd>.hlo.txt."""
  name = "-".join(harness._slug(str(row[k])) for k in ("op", "variant") if harness._slug(str(row[k])))
  directory = os.path.join(hlo_dir, "ops")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{name}.{key}.hlo.txt"), "w") as f:
    f.write(compiled.as_text())


def time_program(row: dict, key: str, fn: Callable, inputs: tuple, args: argparse.Namespace) -> Any:
  """Compiles and times fn(*inputs) into row[key + '_ms'] (or row[key + '_error']); returns
  the last outputs as numpy when they are kept for the value check, else None."""
  try:
    compiled, seconds = compile_fn(fn, *inputs)
    row[f"{key}_compile_s"] = round(seconds, 2)
    if args.hlo_dir:
      dump_hlo(row, key, compiled, args.hlo_dir)
    footprint = bench_scaling.bench_train.compiled_bytes(compiled)
    if footprint is not None:
      row[f"{key}_mem_mib"] = round(footprint / 2**20, 1)
    stats = harness.time_fn(compiled, *inputs, warmup=args.warmup, iters=args.iters, inner=args.inner)
    row[f"{key}_ms"] = stats["median_ms"]
    if args.kernels:
      row[f"{key}_kernels"] = trace_kernels(compiled, inputs, args.kernels)
    return jax.device_get(compiled(*inputs)) if args.check else None
  except Exception as err:  # noqa: BLE001 - one failing program must not cost the others
    if args.verbose:
      traceback.print_exception(err)
    row[f"{key}_error"] = ("OOM: " if bench_scaling.bench_train.is_oom(err) else "") + bench_ops.failure(err)
    return None


def trace_kernels(compiled: Any, inputs: tuple, calls: int) -> dict:
  """--kernels: the GPU kernels of `calls` back-to-back calls (profile_ops.kernel_table: busy and
  span ms per call, and per kernel its calls and ms per call); on the CPU an 'error' entry."""
  from experiments.gpu_checks import profile_ops, profile_train_step  # only with --kernels
  directory = tempfile.mkdtemp(prefix="sp_kernels_")
  try:
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    for _ in range(calls):
      out = compiled(*inputs)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    events = profile_train_step.load_trace_events(directory)
    table = profile_ops.kernel_table(profile_train_step.device_kernels(events), calls)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  table.pop("timeline", None)
  return table


def kernels_lines(row: dict, top: int = 6) -> str:
  """The slowest kernels of a row's programs (with --kernels), one line each."""
  lines = []
  for key in ("fwd", "fwd_bwd"):
    table = row.get(f"{key}_kernels")
    if not table:
      continue
    if "error" in table:
      lines.append(f"    {key}: {table['error']}")
      continue
    lines.append(f"    {key}: busy {table['busy_ms']:.3f} ms, span {table['span_ms']:.3f} ms, "
                 f"{table['kernels_per_call']:.0f} kernels per call")
    for k in sorted(table["kernels"], key=lambda k: -k["ms"])[:top]:
      lines.append(f"      {k['ms']:.4f} ms  x{k['calls']:.0f}  {k['name'][:90]}")
  return "".join("\n" + line for line in lines)


def run_row(plan: RowPlan, data: dict, s: Shapes, args: argparse.Namespace) -> tuple[dict, Any]:
  """Times plan's forward and forward+backward; returns (row, kept outputs or None)."""
  row: dict[str, Any] = {"op": plan.op, "variant": plan.variant, "devices": plan.devices, "length": plan.length}
  try:
    case = plan.build(data, s)
  except Exception as err:  # noqa: BLE001
    row["fwd_error"] = row["fwd_bwd_error"] = bench_ops.failure(err)
    return row, None
  forward = time_program(row, "fwd", case.forward, case.args[:case.inputs], args)
  grad = jax.value_and_grad(case.loss, argnums=case.argnums)
  backward = time_program(row, "fwd_bwd", grad, case.args, args)
  return row, (forward, backward)


def add_ratios(rows: list[dict], plans: list[RowPlan]) -> None:
  """fwd_ratio, fwd_bwd_ratio: a row's time over its op's single-device L/2 (ideal) row."""
  ideal = {p.op: r for p, r in zip(plans, rows) if p.ideal}
  for plan, row in zip(plans, rows):
    base = ideal.get(plan.op)
    for key in ("fwd", "fwd_bwd"):
      if base is not None and f"{key}_ms" in row and base.get(f"{key}_ms"):
        row[f"{key}_ratio"] = row[f"{key}_ms"] / base[f"{key}_ms"]


COLUMNS = (("op", 9), ("variant", 44), ("devices", 7), ("length", 6), ("fwd_ms", 9), ("fwd_bwd_ms", 10),
           ("fwd_ratio", 9), ("fwd_bwd_ratio", 13))


def _cell(row: dict, key: str) -> str:
  value = row.get(key)
  if value is None and key.endswith("_ms"):
    return "failed" if f"{key[:-3]}_error" in row else "-"
  if isinstance(value, float):
    return f"{value:.3f}" if key.endswith("_ms") else f"{value:.2f}"
  return "-" if value is None else str(value)


def table_line(row: dict | None = None) -> str:
  """One fixed-width line of the table (the header when row is None)."""
  cells = []
  for key, width in COLUMNS:
    text = key if row is None else _cell(row, key)
    cells.append(text.ljust(width) if key in ("op", "variant") else text.rjust(width))
  return " ".join(cells)


def errors_line(row: dict) -> str:
  return "".join(f"\n    {key}: {row[key]}" for key in ("fwd_error", "fwd_bwd_error") if key in row)


# ----------------------------------------------------------------------------------------------
# The value check (--cpu): sequence-parallel == single device on the full length.
# ----------------------------------------------------------------------------------------------

def rel_err(got, want) -> float:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  scale = float(np.max(np.abs(want))) if want.size else 0.0
  return float(np.max(np.abs(got - want))) / max(scale, 1e-30) if want.size else 0.0


def first_output(outputs: Any) -> np.ndarray:
  """y of a forward (the first leaf: CEMA's y, TimestepNorm's y, attention's output)."""
  return np.asarray(jax.tree.leaves(outputs)[0])


def compare(single: Any, parallel: Any) -> dict[str, float]:
  """Errors of the sequence-parallel op's (y, loss and gradients) against the single device's."""
  (fwd_s, bwd_s), (fwd_p, bwd_p) = single, parallel
  out = {"y": rel_err(first_output(fwd_p), first_output(fwd_s))}
  grads_s, grads_p = jax.tree.leaves(bwd_s), jax.tree.leaves(bwd_p)
  if len(grads_s) != len(grads_p):
    raise AssertionError(f"{len(grads_p)} gradient leaves, the single device has {len(grads_s)}")
  out["loss_and_grads"] = max(rel_err(p, q) for p, q in zip(grads_p, grads_s))
  return out


def value_check(plans: list[RowPlan], kept: list[Any]) -> dict[str, Any]:
  """Per op: errors of the parallel row against the full single-device row, and how much the
  second half's y depends on the first half (the ideal row runs the second half alone)."""
  result: dict[str, Any] = {"tolerance": VALUE_TOL, "ops": {}}
  ops = dict.fromkeys(p.op for p in plans)
  for op in ops:
    by_role = {p.compare or ("ideal" if p.ideal else None): k for p, k in zip(plans, kept) if p.op == op}
    single, parallel, ideal = by_role.get("single"), by_role.get("parallel"), by_role.get("ideal")
    if any(k is None or k[0] is None or k[1] is None for k in (single, parallel)):
      result["ops"][op] = {"error": "a row of the pair failed", "passed": False}
      continue
    errors = compare(single, parallel)
    entry = {**errors, "passed": max(errors.values()) < VALUE_TOL}
    if op != "attention" and ideal is not None and ideal[0] is not None:
      # Without the carried state the second half would be computed as if it started the sequence.
      y_full = first_output(single[0])
      entry["state_effect"] = rel_err(first_output(ideal[0]), y_full[:, y_full.shape[1] // SEQUENCE_DEVICES:])
      entry["passed"] = entry["passed"] and entry["state_effect"] > STATE_EFFECT_MIN
    result["ops"][op] = entry
  result["passed"] = bool(result["ops"]) and all(e["passed"] for e in result["ops"].values())
  return result


# ----------------------------------------------------------------------------------------------
# The whole sequence-parallel train step: profiler trace and HLO (item S4).
# ----------------------------------------------------------------------------------------------

def profiler_options():
  """No Python tracer: host frames would dominate the trace file, which must travel back small."""
  try:
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return options
  except AttributeError:
    return None


def directory_bytes(path: str) -> tuple[int, int]:
  """(files, bytes) under path."""
  files = total = 0
  for root, _, names in os.walk(path):
    for name in names:
      files += 1
      total += os.path.getsize(os.path.join(root, name))
  return files, total


def scaling_args(args: argparse.Namespace) -> argparse.Namespace:
  """bench_scaling's own settings for its sequence rows (bf16 compute, auto kernels, no remat)."""
  argv = ["--smoke"] if args.cpu else ["--sizes", args.step_size]
  return bench_scaling.parse_args(argv + ["--modes", "sequence", "--sequence-combine", args.schedule])


SOURCE_ROWS = 150  # per device: enough source lines that a two-program difference finds its rows


def step_kernels(directory: str, steps: int, top: int = 12, hlo_text: str | None = None) -> dict[str, Any]:
  """The traced steps' GPU kernels per device (profile_train_step.summarize: busy and span ms per
  step, ms per category, collectives included, and the `top` kernels), so that the trace need not
  travel back to be read. With the compiled step's HLO text, also the time per source line
  ("by_source", profile_train_step.by_source)."""
  from experiments.gpu_checks import profile_train_step  # only when tracing
  events = profile_train_step.load_trace_events(directory)
  kernels = profile_train_step.device_kernels(events)
  if not kernels:
    return {"error": "the trace has no GPU kernels (CPU run?)"}
  names = {ev["pid"]: ev["args"]["name"] for ev in events
           if ev.get("ph") == "M" and ev.get("name") == "process_name"}
  by_device: dict[int, list] = {}
  for k in kernels:
    by_device.setdefault(k.get("pid", -1), []).append(k)
  sources = profile_train_step.hlo_sources(hlo_text) if hlo_text else None
  out = {}
  for pid, ks in sorted(by_device.items()):
    table = profile_train_step.summarize(ks, steps, top)
    if sources is not None:
      table["by_source"] = profile_train_step.by_source(ks, sources, steps, SOURCE_ROWS)
    out[names.get(pid, str(pid))] = table
  return out


def step_excess_lines(steps: list[dict[str, Any]], top: int = 30) -> str:
  """The first device of each multi-device profile against the single-device one: the source
  lines that take more than their even share (profile_train_step.source_excess)."""
  from experiments.gpu_checks import profile_train_step  # only when tracing
  first = lambda step: next(iter(step.get("kernels", {}).values()), {})  # noqa: E731
  single = next((s for s in steps if s.get("devices") == 1), None)
  if single is None or "by_source" not in first(single):
    return ""
  lines = []
  for step in steps:
    if step.get("devices", 1) == 1 or "by_source" not in first(step):
      continue
    rows = profile_train_step.source_excess(first(single)["by_source"], first(step)["by_source"],
                                            step["devices"], top)
    step["excess_by_source"] = rows
    lines.append(f"  {step['devices']} devices, first device, ms per step beyond 1/{step['devices']} of one device's:")
    lines += [f"    {r['excess_ms']:+7.3f}  (1 dev {r['single_ms']:7.3f}, {step['devices']} dev {r['parallel_ms']:7.3f})  "
              f"{r['source']}" for r in rows]
  return "\n".join(lines)


def step_kernels_lines(kernels: dict[str, Any]) -> str:
  """Per device: busy / span ms per step and ms per category."""
  if "error" in kernels:
    return f"    {kernels['error']}"
  lines = []
  for device, table in kernels.items():
    cats = ", ".join(f"{c} {ms:.2f}" for c, ms in table["by_category_ms"].items())
    lines.append(f"    {device}: busy {table['busy_ms']:.2f} ms, span {table['span_ms']:.2f} ms per step; {cats}")
  return "\n".join(lines)


def profile_step(devices: int, args: argparse.Namespace) -> dict[str, Any]:
  """Compiles bench_scaling's sequence step over `devices`, dumps its HLO, times it and traces
  --trace_steps steps. Returns what it found (or the error)."""
  sargs = scaling_args(args)
  spec = bench_scaling.RowSpec(sargs.sizes[0], "sequence", devices, 1, args.step_length, "none")
  out: dict[str, Any] = {"row": spec.label(), "devices": devices}
  try:
    step = bench_scaling.compile_step(bench_scaling.build_step(spec, sargs))
    out["compile_s"] = step.compile_s
    hlo_text = step.compiled.as_text()
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
      path = os.path.join(args.hlo_dir, f"sequence_step_{devices}dev.hlo.txt")
      with open(path, "w") as f:
        f.write(hlo_text)
      out["hlo"] = path
    params, opt_state, batch = bench_scaling.initial_state(step)
    state = (params, opt_state)
    del params, opt_state  # donated below; `state` holds the live buffers

    def train(state):
      params, opt_state, metrics = step.compiled(*state, batch)
      jax.block_until_ready((params, opt_state, metrics))
      return params, opt_state

    for _ in range(args.warmup):
      state = train(state)
    times = []
    for _ in range(args.iters):
      start = time.perf_counter()
      state = train(state)
      times.append((time.perf_counter() - start) * 1e3)
    out["step_ms"] = float(np.median(times))
    if args.trace_dir:
      directory = os.path.join(args.trace_dir, f"sequence_step_{devices}dev")
      with jax.profiler.trace(directory, create_perfetto_trace=True, profiler_options=profiler_options()):
        for i in range(args.trace_steps):
          with jax.profiler.StepTraceAnnotation("train_step", step_num=i):
            state = train(state)
      files, size = directory_bytes(directory)
      out.update(trace=directory, trace_files=files, trace_mib=round(size / 2**20, 2))
      out["kernels"] = step_kernels(directory, args.trace_steps, hlo_text=hlo_text)
    del state, batch
  except Exception as err:  # noqa: BLE001
    if args.verbose:
      traceback.print_exception(err)
    out["error"] = ("OOM: " if bench_scaling.bench_train.is_oom(err) else "") + bench_ops.failure(err)
  bench_scaling.bench_train.free_memory()
  return out


# ----------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cpu", action="store_true",
                      help="smoke: tiny shapes on 2 CPU devices, float32, value check asserted")
  parser.add_argument("--preset", default=None, help="layer shapes (default mega200M; --cpu: tiny)")
  parser.add_argument("--length", type=int, default=None, help="total tokens L (default 32768; --cpu: 512)")
  parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                      help="activations (default bfloat16 as bench_scaling's step; --cpu: float32)")
  parser.add_argument("--cema_method", default="pallas", choices=cema_ops.METHODS,
                      help="what the layer runs on a GPU ('auto'); interpreted on the CPU")
  parser.add_argument("--tsn_method", default="associative", choices=tsn_ops.METHODS,
                      help="what the layer runs ('auto' = associative, ops/backend.py)")
  parser.add_argument("--attention_impl", default="auto", choices=mega_config.ATTENTION_IMPLS)
  parser.add_argument("--schedule", default="all_gather", choices=sharding.rules.SEQUENCE_COMBINES)
  parser.add_argument("--only", default="", help="comma-separated ops to time (cema,tsn,attention)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--inner", type=int, default=1,
                      help="back-to-back calls per timed sample (hides the host's dispatch for small ops)")
  parser.add_argument("--json", default=None, help="write rows, settings and checks here (after every row)")
  parser.add_argument("--trace_dir", default=None, help="jax.profiler trace of the sequence-parallel step")
  parser.add_argument("--hlo_dir", default=None, help="compiled HLO text of that step and of every row's programs")
  parser.add_argument("--trace_devices", default=str(SEQUENCE_DEVICES),
                      help="steps to profile, e.g. '1,2' to also trace the single-device step")
  parser.add_argument("--trace_steps", type=int, default=1)
  parser.add_argument("--step_size", default="200M", help="bench_scaling size of the profiled step")
  parser.add_argument("--step_length", type=int, default=None, help="tokens of the profiled step (default L)")
  parser.add_argument("--rows", default="",
                      help="comma-separated substrings: only rows whose variant contains one of them")
  parser.add_argument("--step_only", action="store_true",
                      help="no op rows or checks: only the train-step profile (--trace_dir / --hlo_dir)")
  parser.add_argument("--single_device", action="store_true",
                      help="on one device: only the single-device rows (the suspects' costs, no step trace)")
  parser.add_argument("--kernels", type=int, default=0,
                      help="trace this many calls of every timed program and print its slowest GPU kernels")
  parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
  args = parser.parse_args(argv)
  args.preset = args.preset or ("tiny" if args.cpu else "mega200M")
  args.length = args.length or (512 if args.cpu else 32768)
  args.dtype = args.dtype or ("float32" if args.cpu else "bfloat16")
  args.step_length = args.step_length or args.length
  args.check = args.cpu and not args.rows and not args.step_only  # the value check needs both rows of each pair
  if args.cpu:
    args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
  args.trace_devices = [int(d) for d in args.trace_devices.split(",") if d.strip()]
  return args


def shrink_cema_tiles() -> None:
  """--cpu: tiles of one step in the interpreted CEMA kernel (check_cema --cpu shrinks them too):
  the interpreter traces every unrolled step, and 16 of them double the smoke run's time. The
  layer's call takes no tiling, so the default itself is wrapped; the time chunks stay as the
  default chooses them (2 at L=512), so the time-parallel path still runs."""
  from kernels_pallas import cema as cema_kernels
  default = cema_kernels.default_config

  def small_tiles(*shape):
    # Blocked summaries and paired forward steps need tiles of several steps.
    return dataclasses.replace(default(*shape), block_t=1, summary_block=0, fwd_pairs=False)

  cema_kernels.default_config = small_tiles


def write_json(path: str | None, payload: dict) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(json.dumps(harness._jsonable(payload), indent=2, allow_nan=False) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if jax.device_count() < SEQUENCE_DEVICES and not args.single_device:
    raise SystemExit(f"needs {SEQUENCE_DEVICES} devices, found {jax.device_count()} ({jax.devices()})")
  s = layer_shapes(args)
  if args.cpu:
    shrink_cema_tiles()
  if s.half % s.chunk:
    raise SystemExit(f"L/{SEQUENCE_DEVICES} = {s.half} must be a multiple of the attention chunk {s.chunk}")
  print(f"check_sequence_parallel: jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}); {args.preset}: {s}; warmup {args.warmup}, median of {args.iters}")
  only = {o.strip() for o in args.only.split(",") if o.strip()}
  plans = [] if args.step_only else [p for p in row_plans(s, args) if (not only or p.op in only)
           and (p.devices == 1 or not args.single_device)
           and (not args.rows or any(r.strip() in p.variant for r in args.rows.split(",") if r.strip()))]
  settings = {k: v for k, v in vars(args).items() if k != "check"}
  payload: dict[str, Any] = {"name": "check_sequence_parallel", "metadata": harness.run_metadata(),
                             "settings": settings, "shapes": dataclasses.asdict(s), "rows": []}
  rows, kept, data, data_op = [], [], None, None
  print(table_line())
  for plan in plans:
    if plan.op != data_op:  # one op's inputs live at a time
      data = None
      bench_scaling.bench_train.free_memory()
      try:
        data, data_op = make_inputs(plan.op, s), plan.op
      except Exception as err:  # noqa: BLE001
        data, data_op = None, plan.op
        print(f"  inputs of {plan.op} failed: {bench_ops.failure(err)}")
    if data is None:
      row, outputs = {"op": plan.op, "variant": plan.variant, "devices": plan.devices, "length": plan.length,
                      "fwd_error": "inputs failed", "fwd_bwd_error": "inputs failed"}, None
    else:
      row, outputs = run_row(plan, data, s, args)
    rows.append(row)
    kept.append(outputs if plan.compare or plan.ideal else None)
    add_ratios(rows, plans[:len(rows)])
    print(table_line(row) + errors_line(row) + kernels_lines(row))
    payload["rows"] = rows
    write_json(args.json, payload)
  data = None
  if (not only or "cema" in only) and not args.step_only:
    payload["power_tables_check"] = power_tables_check(s)
    print(f"power tables, Pallas vs XLA (max relative difference, tolerance {TABLES_TOL}): "
          f"{json.dumps(payload['power_tables_check'])}")
    payload["summary_check"] = summary_check(s)
    print(f"slice summary, kernel vs XLA (max difference over max, tolerance {SUMMARY_TOL} for h and dx, "
          f"{SUMMARY_PARAM_TOL} for the parameters): "
          f"{json.dumps(payload['summary_check'])}")
    write_json(args.json, payload)
  if args.check:
    payload["value_check"] = value_check(plans, kept)
    print(f"value check (sequence parallel vs single device, tolerance {VALUE_TOL}): "
          f"{json.dumps(payload['value_check']['ops'])}")
  for devices in (args.trace_devices if (args.trace_dir or args.hlo_dir) and not args.single_device else []):
    print(f"profiling the sequence-parallel train step on {devices} device(s) ...")
    payload.setdefault("steps", []).append(profile_step(devices, args))
    print(f"  { {k: v for k, v in payload['steps'][-1].items() if k != 'kernels'} }")
    if "kernels" in payload["steps"][-1]:
      print(step_kernels_lines(payload["steps"][-1]["kernels"]))
    write_json(args.json, payload)
  excess = step_excess_lines(payload.get("steps", []))
  if excess:
    print(excess)
    write_json(args.json, payload)
  print("\n== check_sequence_parallel (ratios: over the op's single-device L/2 row)")
  print(table_line())
  print("\n".join(table_line(r) for r in rows))
  write_json(args.json, payload)
  if args.json:
    print(f"-> {args.json}")
  if not payload.get("power_tables_check", {"passed": True})["passed"]:
    raise SystemExit("power tables check FAILED: " + json.dumps(payload["power_tables_check"]))
  if not payload.get("summary_check", {"passed": True})["passed"]:
    raise SystemExit("slice summary check FAILED: " + json.dumps(payload["summary_check"]))
  if args.check and not payload["value_check"]["passed"]:
    raise SystemExit("value check FAILED: " + json.dumps(payload["value_check"]["ops"]))
  return payload


if __name__ == "__main__":
  main()
