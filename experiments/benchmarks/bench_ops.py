"""Per-op benchmark: our Pallas kernels against our XLA paths and against floors measured in this run.

Ops and default shapes (B=1, bf16 inputs, as in the released CUDA benchmarks):
  cema            D=4096 N=16, L=16384 and 32768; impls pallas (kernels_pallas.cema.cema_pallas),
                  blocked (megalodon_jax.ops.cema.cema_blocked, the fastest XLA path), fft;
                  chunked, associative on request.
  timestep_norm   L=32768 D=4096, 64 groups; impls pallas (kernels_pallas.timestep_norm) and
                  associative (megalodon_jax.ops.timestep_norm, the XLA path).
  chunk_attention 16 chunks of 2048, 4 heads, dk 256, dv 2048; impls pallas
                  (kernels_pallas.chunk_attention) and xla (ops.attention.chunked_attention_xla).

"fwd" times y = op(inputs); "fwd+bwd" times y and the vector-Jacobian product with a fixed random
cotangent (jax.vjp), i.e. what a training step does (y is returned, so the forward pass cannot be
dropped). Gradients are taken with respect to every differentiable input: x and the raw CEMA
parameters (alpha, delta, theta, gamma, omega); x, weight, bias; q, k, v.

Floors, all from ceilings measured at the start of this run (floors.py, plus an fp32 FMA rate):
  memory      bytes an ideal fused op must move / measured copy bandwidth
              (cema: read x bf16, write y f32; backward adds read dy f32 and x, write dx bf16;
              timestep_norm: read x, write y; backward read x, dy, write dx; all bf16;
              chunk_attention: q, k, v, out once; backward q, k, v, out, dout read, dq, dk, dv written)
  arithmetic  cema: FMAs of the recurrence as the kernels write it, per (t, d, n): forward 6 (state
              update 4, readout 2), backward 20 (adjoint scan 8, parameter-tangent scan 12),
              / measured fp32 FMA rate; chunk_attention: matmul FLOPs of the causal halves of the
              chunks (forward 2 (dk + dv) per query-key pair, backward twice that) / measured
              bf16 matmul peak.
  floor = max(memory, arithmetic); "x floor" = measured / floor.

Timings: jit once, `--warmup` calls, then the median of `--iters` samples, each the mean of
`--inner` back-to-back calls ended by block_until_ready (harness.time_fn). A row that fails
(out of memory, lowering error, missing kernel module) prints `failed: <reason>` and the run goes
on. Results are rewritten to experiments/results/<date>_<device>_ops.json after every row.

  python -m experiments.benchmarks.bench_ops                       # everything, on the GPU
  python -m experiments.benchmarks.bench_ops --ops cema --cema-lengths 32768 --cema-impls pallas
  python -m experiments.benchmarks.bench_ops --variant timestep_norm:time_splits=8   # + a tiling variant row
  python -m experiments.benchmarks.bench_ops --smoke               # tiny shapes, CPU, interpreted kernels
  python -m experiments.benchmarks.bench_ops --lower-only          # lower every program for CUDA, run nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import time
import traceback
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import floors, harness

OPS = ("cema", "timestep_norm", "chunk_attention")
IMPLS = {
    "cema": ("pallas", "blocked", "chunked", "fft", "associative", "sequential"),
    "timestep_norm": ("pallas", "associative", "sequential"),
    "chunk_attention": ("pallas", "xla"),
}
DEFAULT_IMPLS = {"cema": "pallas,blocked,fft", "timestep_norm": "pallas,associative",
                 "chunk_attention": "pallas,xla"}
# The XLA path each Pallas kernel replaces: the denominator of "speedup vs XLA".
XLA_REFERENCE = {"cema": "blocked", "timestep_norm": "associative", "chunk_attention": "xla"}

# Released CUDA kernels (fwd ms, fwd+bwd ms) and our fwd+bwd targets, keyed by (op, shape key).
RELEASED_MS = {
    ("cema", (1, 16384, 4096, 16)): (4.77, 11.04),
    ("cema", (1, 32768, 4096, 16)): (10.12, 25.06),
    ("timestep_norm", (1, 32768, 4096, 64)): (2.50, 7.83),
    ("chunk_attention", (1, 16, 2048, 4, 256, 2048)): (1.95, 5.76),
}
TARGET_FWD_BWD_MS = {
    ("cema", (1, 32768, 4096, 16)): 2.5,
    ("timestep_norm", (1, 32768, 4096, 64)): 0.6,
    ("chunk_attention", (1, 16, 2048, 4, 256, 2048)): 3.8,
}

# FMAs per (time step, channel, order) of the CEMA recurrence as the Pallas kernels write it.
CEMA_FMA_FWD = 6
CEMA_FMA_BWD = 20

PASSES = ("fwd", "fwdbwd")


# --------------------------------------------------------------------------------------------
# Shapes and settings
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shapes:
  """Problem sizes. cema: [B, L, D] with order N; timestep_norm: [B, L, D] in G groups;
  chunk_attention: [B, chunks * C, H, dk / dv]."""
  cema_lengths: tuple[int, ...] = (16384, 32768)
  cema_batch: int = 1
  cema_dim: int = 4096
  cema_order: int = 16
  tsn_batch: int = 1
  tsn_length: int = 32768
  tsn_dim: int = 4096
  tsn_groups: int = 64
  attn_batch: int = 1
  attn_chunks: int = 16
  attn_chunk: int = 2048
  attn_heads: int = 4
  attn_dk: int = 256
  attn_dv: int = 2048


SMOKE_SHAPES = Shapes(cema_lengths=(16,), cema_dim=8, cema_order=2, tsn_length=32, tsn_dim=16, tsn_groups=4,
                      attn_chunks=2, attn_chunk=16, attn_heads=2, attn_dk=16, attn_dv=32)
# Tiles that fit the smoke shapes (and keep the interpreted kernels quick to compile).
SMOKE_KERNEL_CONFIGS = {
    "cema": "block_d=8,block_t=2,split=1,num_warps=1,bwd_block_d=8,bwd_split=1,bwd_num_warps=1,summary_block=0",
    "timestep_norm": "block_t=16",
    "chunk_attention": "block_q=16,block_k=16,bwd_block_q=16,bwd_block_k=16,block_d=16,block_c=16,"
                       "block_qk=16,block_r=16",
}


@dataclasses.dataclass(frozen=True)
class KernelMode:
  """How the Pallas kernels run. interpret None: natively on a GPU/TPU, interpreted on the CPU.
  lower_only: build programs for CUDA (Triton kernels, not interpreted) without running them."""
  interpret: bool | None = None
  lower_only: bool = False
  configs: tuple[tuple[str, str], ...] = ()  # (op, "k=v,...") tiling overrides

  def config_text(self, op: str) -> str:
    return dict(self.configs).get(op, "")


def parse_overrides(text: str) -> dict[str, Any]:
  """'a=1,b=true,c=flash' -> {'a': 1, 'b': True, 'c': 'flash'} (ints, booleans, else strings)."""
  out: dict[str, Any] = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    if "=" not in item:
      raise ValueError(f"kernel config override {item!r} is not of the form name=value (e.g. block_t=32)")
    key, value = (s.strip() for s in item.split("=", 1))
    if value.lower() in ("true", "false"):
      out[key] = value.lower() == "true"
    else:
      try:
        out[key] = int(value)
      except ValueError:
        out[key] = value
  return out


def kernel_config(cls: type, text: str, base: Any = None) -> Any:
  """The kernel's config with the overrides in `text` applied to `base` (an instance of cls; the
  class defaults when None), or None when there are no overrides.

  Pass the kernel's own default for the shape as `base` where it depends on the shape (CEMA's
  default_config picks time chunks from B, L and D): a variant row then differs from the default
  row only in the fields it names.
  """
  if not text:
    return None
  overrides = parse_overrides(text)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(overrides) - names
  if unknown:
    raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; valid: {sorted(names)}")
  return dataclasses.replace(base, **overrides) if base is not None else cls(**overrides)


# --------------------------------------------------------------------------------------------
# Cases: one (op, shape, impl) each
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Cost:
  """What an ideal implementation cannot avoid, per pass."""
  bytes_fwd: float
  bytes_fwdbwd: float
  fma_fwd: float = 0.0  # fp32 fused multiply-adds (CUDA cores)
  fma_fwdbwd: float = 0.0
  matmul_flops_fwd: float = 0.0  # tensor-core FLOPs
  matmul_flops_fwdbwd: float = 0.0


@dataclasses.dataclass
class Case:
  """fn(*primals) -> y. make_inputs() -> (primals, cotangent of y), on device."""
  op: str
  shape: str
  shape_key: tuple[int, ...]
  impl: str
  fn: Callable[..., jax.Array]
  make_inputs: Callable[[], tuple[tuple[Any, ...], jax.Array]]
  cost: Cost


def hash32(x: jax.Array) -> jax.Array:
  """A bijective integer hash of uint32 values (lowbias32): consecutive inputs look independent."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def noise_normal(seed: int, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """Standard normal noise from a counter-based hash and Box-Muller.

  Used instead of jax.random because it compiles to a handful of elementwise ops (threefry takes
  seconds to compile on a CPU) and needs no host-side generation of the large inputs. Good enough
  for timing: values are finite, unit-variance and look independent.
  """
  size = math.prod(shape)
  if 2 * size >= 2**32:
    raise ValueError(f"shape {tuple(shape)} has too many elements for the 32-bit counter")
  counter = jax.lax.iota(jnp.uint32, size) * jnp.uint32(2) + hash32(jnp.uint32(seed * 2654435761 % 2**32))
  to_unit = lambda h: ((h >> 8).astype(jnp.float32) + 0.5) * (1.0 / 2**24)  # in (0, 1)
  u1, u2 = to_unit(hash32(counter)), to_unit(hash32(counter + jnp.uint32(1)))
  z = jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos((2.0 * math.pi) * u2)
  return z.reshape(shape).astype(dtype)


def noise_tokens(seed: int, shape: Sequence[int], vocab_size: int) -> jax.Array:
  """int32 token ids in [0, vocab_size), hashed from a counter like `noise_normal`."""
  size = math.prod(shape)
  counter = jax.lax.iota(jnp.uint32, size) + hash32(jnp.uint32(seed * 2654435761 % 2**32))
  return (hash32(counter) % jnp.uint32(vocab_size)).astype(jnp.int32).reshape(shape)


def _cema_params(dim: int, order: int, seed: int) -> dict[str, np.ndarray]:
  """Initial CEMA parameters as the release draws them (SPEC §2), in numpy (small arrays)."""
  rng = np.random.default_rng(seed)
  freqs = rng.permutation(np.exp(-np.arange(1, dim + 1) * math.log(dim) / dim))
  gamma_re = rng.normal(size=(dim, order, 1))
  f32 = lambda a: np.asarray(a, np.float32)
  return {
      "alpha": f32(rng.normal(0.0, 0.2, (dim, order, 1))),
      "delta": f32(rng.normal(0.0, 0.2, (dim, order, 1))),
      "theta": f32(np.log(freqs / (1.0 - freqs)).reshape(dim, 1, 1)),
      "gamma": f32(np.concatenate([gamma_re, np.zeros_like(gamma_re)], axis=-1)),
      "omega": f32(np.clip(rng.normal(0.0, 0.25, (dim, 1)), -1.0, 1.0)),
  }


def _cema_fn(impl: str, mode: KernelMode) -> Callable[..., jax.Array]:
  from megalodon_jax.ops import cema as cema_ops

  def fn(x, params):
    coeffs = cema_ops.cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
    omega = params["omega"].reshape(-1)
    if impl == "pallas":
      from kernels_pallas import cema as cema_kernels
      batch, length, dim = x.shape
      base = cema_kernels.default_config(batch, length, dim, coeffs.p.shape[-1])
      config = kernel_config(cema_kernels.CemaKernelConfig, mode.config_text("cema"), base)
      interpret = False if mode.lower_only else mode.interpret
      platform = "gpu" if mode.lower_only else None
      return cema_kernels.cema_pallas(x, coeffs, omega, config=config, interpret=interpret, platform=platform)
    return cema_ops.cema(x, coeffs, omega, method=impl)

  return fn


def cema_cases(shapes: Shapes, impls: Sequence[str], mode: KernelMode) -> list[Case]:
  cases = []
  b, d, n = shapes.cema_batch, shapes.cema_dim, shapes.cema_order
  for length in shapes.cema_lengths:
    elems = b * length * d
    cost = Cost(bytes_fwd=elems * (2 + 4), bytes_fwdbwd=elems * (2 + 4 + 4 + 2 + 2),
                fma_fwd=CEMA_FMA_FWD * elems * n, fma_fwdbwd=(CEMA_FMA_FWD + CEMA_FMA_BWD) * elems * n)

    def make_inputs(length=length):
      x = noise_normal(1, (b, length, d), jnp.bfloat16)
      ct = noise_normal(2, (b, length, d), jnp.float32)
      params = {k: jnp.asarray(v) for k, v in _cema_params(d, n, seed=3).items()}
      return (x, params), ct

    for impl in impls:
      cases.append(Case("cema", f"B{b} L{length} D{d} N{n} bf16", (b, length, d, n), impl,
                        _cema_fn(impl, mode), make_inputs, cost))
  return cases


def _tsn_fn(impl: str, groups: int, mode: KernelMode) -> Callable[..., jax.Array]:
  from megalodon_jax.ops import timestep_norm as tsn_ops

  def fn(x, weight, bias):
    if impl == "pallas":
      from kernels_pallas import timestep_norm as tsn_kernels
      config = kernel_config(tsn_kernels.KernelConfig, mode.config_text("timestep_norm"))
      interpret = False if mode.lower_only else mode.interpret
      backend = "triton" if mode.lower_only else None
      y, _ = tsn_kernels.timestep_norm_pallas(x, weight, bias, num_groups=groups, interpret=interpret,
                                              config=config, backend=backend)
      return y
    y, _ = tsn_ops.timestep_norm(x, weight, bias, num_groups=groups, method=impl)
    return y

  return fn


def tsn_cases(shapes: Shapes, impls: Sequence[str], mode: KernelMode) -> list[Case]:
  b, length, d, g = shapes.tsn_batch, shapes.tsn_length, shapes.tsn_dim, shapes.tsn_groups
  elems = b * length * d
  cost = Cost(bytes_fwd=elems * (2 + 2), bytes_fwdbwd=elems * (2 + 2 + 2 + 2 + 2))

  def make_inputs():
    # A per-feature offset and scale so the running statistics have something to track.
    x = noise_normal(4, (b, length, d), jnp.float32) * 2.0 + jnp.linspace(-1.0, 1.0, d)
    weight = 0.1 * noise_normal(5, (d,), jnp.float32)
    bias = 0.1 * noise_normal(6, (d,), jnp.float32)
    return (x.astype(jnp.bfloat16), weight, bias), noise_normal(7, (b, length, d), jnp.bfloat16)

  return [Case("timestep_norm", f"B{b} L{length} D{d} G{g} bf16", (b, length, d, g), impl,
               _tsn_fn(impl, g, mode), make_inputs, cost) for impl in impls]


def _attn_fn(impl: str, chunk: int, mode: KernelMode) -> Callable[..., jax.Array]:
  from megalodon_jax.ops import attention as attention_ops

  def fn(q, k, v):
    if impl == "pallas":
      from kernels_pallas import chunk_attention as attention_kernels
      config = kernel_config(attention_kernels.KernelConfig, mode.config_text("chunk_attention"))
      interpret = False if mode.lower_only else mode.interpret
      platform = "triton" if mode.lower_only else None
      return attention_kernels.chunk_attention(q, k, v, chunk_size=chunk, config=config, interpret=interpret,
                                               platform=platform)
    return attention_ops.chunked_attention_xla(q, k, v, chunk_size=chunk)

  return fn


def attention_flops_fwd(batch: int, chunks: int, chunk: int, heads: int, dk: int, dv: int) -> float:
  """Matmul FLOPs of causal chunked attention: 2 (dk + dv) per visited query-key pair."""
  pairs = chunk * (chunk + 1) / 2
  return 2.0 * (dk + dv) * pairs * chunks * heads * batch


def attention_cases(shapes: Shapes, impls: Sequence[str], mode: KernelMode) -> list[Case]:
  b, n, c, h = shapes.attn_batch, shapes.attn_chunks, shapes.attn_chunk, shapes.attn_heads
  dk, dv = shapes.attn_dk, shapes.attn_dv
  rows = b * n * c * h
  flops = attention_flops_fwd(b, n, c, h, dk, dv)
  # bf16 bytes. Forward: q, k, v read, out written. Backward: q, k, v, out, dout read; dq, dk, dv written.
  fwd_bytes = 2 * rows * (2 * dk + 2 * dv)
  bwd_bytes = 2 * rows * (2 * dk + 3 * dv) + 2 * rows * (2 * dk + dv)
  # Backward: dV = P^T dO and dP = dO V^T (dv wide), dQ = dS K and dK = dS^T Q (dk wide): 2x forward.
  cost = Cost(bytes_fwd=fwd_bytes, bytes_fwdbwd=fwd_bytes + bwd_bytes, matmul_flops_fwd=flops,
              matmul_flops_fwdbwd=3 * flops)

  def make_inputs():
    # Megalodon's q, k are RMS-normalised per head and scaled by 1/sqrt(dk): unit-size scores.
    q = noise_normal(8, (b, n * c, h, dk), jnp.float32) / math.sqrt(dk)
    k = noise_normal(9, (b, n * c, h, dk), jnp.float32)
    v = noise_normal(10, (b, n * c, h, dv), jnp.bfloat16)
    return (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v), noise_normal(11, (b, n * c, h, dv), jnp.bfloat16)

  shape = f"B{b} {n}x{c} H{h} dk{dk} dv{dv} bf16"
  return [Case("chunk_attention", shape, (b, n, c, h, dk, dv), impl, _attn_fn(impl, c, mode), make_inputs, cost)
          for impl in impls]


# --------------------------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------------------------

def measure_fma_rate(n: int = 1 << 24, chain: int = 512, *, warmup: int = 2, iters: int = 10,
                     inner: int = 3) -> dict[str, Any]:
  """fp32 FMA throughput of the CUDA cores: y = y * a + b repeated `chain` times on n elements.

  a and b are runtime scalars, so XLA cannot fold the chain; the GPU compiler contracts each
  multiply-add into one FMA. At the default sizes the kernel reads and writes 128 MB but does
  8.6e9 FMAs, so it is compute-bound. Returns timing stats plus {"fma_per_s", "tflops"}
  (2 FLOPs per FMA).
  """
  if n < 1 or chain < 1:
    raise ValueError(f"need n >= 1 and chain >= 1, got n={n}, chain={chain}")

  def kernel(x, a, b):
    for _ in range(chain):
      x = x * a + b
    return x

  x = jax.jit(lambda: noise_normal(12, (n,), jnp.float32))()
  a, b = jnp.float32(0.999), jnp.float32(1e-3)
  compiled = jax.jit(kernel).lower(x, a, b).compile()
  # One fused kernel is what makes this compute-bound; more would be memory-bound (rate too low).
  fusions = compiled.as_text().count("kind=k")
  stats = harness.time_fn(compiled, x, a, b, warmup=warmup, iters=iters, inner=inner)
  fmas = float(n) * chain
  rate = fmas / (stats["median_ms"] * 1e-3)
  return {**stats, "n": n, "chain": chain, "fusions": fusions, "fma_per_s": rate, "tflops": 2 * rate / 1e12}


def fma_chain_kernel(n: int, chain: int, *, chains: int = 4, block: int = 1024,
                     inline_asm: bool = False,
                     interpret: bool = False) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A Triton kernel of `chains` independent fp32 FMA chains per element.

  Returns f(x [n] f32, ab [2] f32) -> [n] f32: for i < chains, y_i = x + 1e-3 i, then `chain`
  times y_i = y_i * a + b; the result is the sum of the y_i. a and b are read at run time so
  nothing folds. inline_asm: each step is one PTX fma.rn.f32 (GPU only), which shows whether the
  compiler's own code (multiply and add, to be contracted) reaches the same rate.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu
  if n % block or chain % 8 or chains < 1:
    raise ValueError(f"need n % block == 0, chain % 8 == 0 and chains >= 1; got n={n}, "
                     f"block={block}, chain={chain}, chains={chains}")

  def kernel(x_ref, ab_ref, o_ref):
    a, b = ab_ref[0], ab_ref[1]
    x = x_ref[...]
    ys = tuple(x + 1e-3 * i for i in range(chains))

    if inline_asm:
      a_full, b_full = jnp.full(x.shape, a), jnp.full(x.shape, b)
      step = lambda y: plgpu.elementwise_inline_asm(
          "fma.rn.f32 $0, $1, $2, $3;", args=[y, a_full, b_full], constraints="=r,r,r,r", pack=1,
          result_shape_dtypes=[jax.ShapeDtypeStruct(y.shape, jnp.float32)])[0]
    else:
      step = lambda y: y * a + b

    def body(_, ys):
      for _ in range(8):  # unrolled so the loop overhead is negligible
        ys = tuple(step(y) for y in ys)
      return ys

    ys = jax.lax.fori_loop(0, chain // 8, body, ys)
    o_ref[...] = sum(ys[1:], ys[0])

  return pl.pallas_call(
      kernel, grid=(n // block,),
      in_specs=[pl.BlockSpec((block,), lambda i: (i,)), pl.BlockSpec((2,), lambda i: (0,))],
      out_specs=pl.BlockSpec((block,), lambda i: (i,)),
      out_shape=jax.ShapeDtypeStruct((n,), jnp.float32), interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1))


def measure_fma_rate_pallas(n: int = 1 << 22, chain: int = 1024, *, chains: int = 4,
                            inline_asm: bool = False, warmup: int = 2, iters: int = 10,
                            inner: int = 3) -> dict[str, Any]:
  """fp32 FMA throughput of `fma_chain_kernel` on the GPU.

  The XLA chain (measure_fma_rate) gives each thread one dependent chain, so it measures FMA
  latency hidden by occupancy as much as throughput; independent chains per thread expose the
  instruction-level parallelism that a hand-written recurrence kernel can use. Returns timing
  stats plus {"fma_per_s", "tflops"} (2 FLOPs per FMA).
  """
  fn = jax.jit(fma_chain_kernel(n, chain, chains=chains, inline_asm=inline_asm))
  x = jax.jit(lambda: noise_normal(13, (n,), jnp.float32))()
  ab = jnp.array([0.999, 1e-3], jnp.float32)
  stats = harness.time_fn(fn, x, ab, warmup=warmup, iters=iters, inner=inner)
  fmas = float(n) * chain * chains
  rate = fmas / (stats["median_ms"] * 1e-3)
  return {**stats, "n": n, "chain": chain, "chains": chains, "fma_per_s": rate,
          "tflops": 2 * rate / 1e12}


@dataclasses.dataclass
class Ceilings:
  copy_gb_per_s: float
  matmul_tflops: float
  fma_per_s: float

  def floor_ms(self, cost: Cost, pass_name: str) -> tuple[float, str]:
    """(floor in ms, which bound sets it) for 'fwd' or 'fwdbwd'."""
    nbytes = cost.bytes_fwd if pass_name == "fwd" else cost.bytes_fwdbwd
    fma = cost.fma_fwd if pass_name == "fwd" else cost.fma_fwdbwd
    mm = cost.matmul_flops_fwd if pass_name == "fwd" else cost.matmul_flops_fwdbwd
    bounds = {"memory": nbytes / (self.copy_gb_per_s * 1e9) * 1e3,
              "fp32_fma": fma / self.fma_per_s * 1e3,
              "matmul": mm / (self.matmul_tflops * 1e12) * 1e3}
    kind = max(bounds, key=bounds.get)
    return bounds[kind], kind


def measure_ceilings(smoke: bool, args: argparse.Namespace) -> tuple[Ceilings, list[dict[str, Any]]]:
  copy_bytes, matmul_n, fma_n, chain = ((1 << 20, 128, 1 << 12, 32) if smoke
                                        else (args.copy_bytes, args.matmul_n, 1 << 24, 512))
  iters = 3 if smoke else 10
  measured = floors.measure_floors(copy_bytes=copy_bytes, matmul_n=matmul_n, warmup=2, iters=iters)
  fma = measure_fma_rate(fma_n, chain, warmup=1 if smoke else 2, iters=iters)
  rows = floors.floor_rows(measured) + [{
      "ceiling": "fp32_fma_rate_xla", "value": fma["tflops"], "unit": "TFLOP/s (2 per FMA)",
      "median_ms": fma["median_ms"], "p10_ms": fma["p10_ms"], "p90_ms": fma["p90_ms"],
      "size": f"{fma['n']} x {fma['chain']} FMAs in {fma['fusions']} fused kernel(s), one chain per element"}]
  best = fma["fma_per_s"]
  if jax.default_backend() == "gpu":
    # The floor must use the best rate any kernel reaches, or it would sit below what is possible.
    for chains, asm in ((1, False), (4, False), (8, False), (8, True)):
      label = f"{chains}chains" + ("_ptx_fma" if asm else "")
      try:
        pfma = measure_fma_rate_pallas(chains=chains, inline_asm=asm, warmup=2, iters=iters)
      except Exception as e:  # a ceiling that cannot be measured must not stop the op rows
        print(f"  fp32 FMA (Triton, {label}): failed: {type(e).__name__}: {e}")
        continue
      rows.append({"ceiling": f"fp32_fma_rate_triton_{label}", "value": pfma["tflops"],
                   "unit": "TFLOP/s (2 per FMA)", "median_ms": pfma["median_ms"],
                   "p10_ms": pfma["p10_ms"], "p90_ms": pfma["p90_ms"],
                   "size": f"{pfma['n']} x {pfma['chains']} chains x {pfma['chain']} FMAs"})
      best = max(best, pfma["fma_per_s"])
  rows.append({"ceiling": "fp32_fma_rate", "value": 2 * best / 1e12, "unit": "TFLOP/s (2 per FMA)",
               "size": "best of the rows above; used for the fp32_fma floors"})
  return Ceilings(measured["copy_gb_per_s"], measured["matmul_tflops"], best), rows


# --------------------------------------------------------------------------------------------
# Measuring one case
# --------------------------------------------------------------------------------------------

def failure(err: BaseException) -> str:
  """One line naming the error (first line of its message, shortened)."""
  lines = str(err).strip().splitlines()
  text = lines[0] if lines else ""
  for line in lines:  # XLA puts the useful part (e.g. RESOURCE_EXHAUSTED) on some later line
    if "RESOURCE_EXHAUSTED" in line or "Out of memory" in line or "out of memory" in line:
      text = line.strip()
      break
  return f"{type(err).__name__}: {text[:240]}"


def _programs(case: Case) -> dict[str, Callable]:
  def fwdbwd(primals, ct):
    y, vjp = jax.vjp(case.fn, *primals)
    return y, vjp(ct)

  return {"fwd": jax.jit(lambda primals, ct: case.fn(*primals)), "fwdbwd": jax.jit(fwdbwd)}


def _lower_for_cuda(program: Callable, primals: Any, ct: Any) -> str:
  """Lowers a program for CUDA (no GPU needed); returns a short description."""
  from jax import export
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = export.export(program, platforms=["cuda"], disabled_checks=checks)(
      jax.tree.map(spec, primals), spec(ct))
  text = exported.mlir_module()
  return f"lowered for cuda: {text.count('__gpu$xla.gpu.triton')} triton calls, {len(text) // 1024} KiB"


def build_inputs(case: Case, abstract: bool = False) -> tuple[Any, Any]:
  """(primals, cotangent) on the device in one compiled program, or their shapes if `abstract`."""
  return jax.eval_shape(case.make_inputs) if abstract else jax.jit(case.make_inputs)()


def measure_case(case: Case, inputs: tuple[Any, Any], ceilings: Ceilings | None, args: argparse.Namespace,
                 mode: KernelMode) -> dict[str, Any]:
  """Times (or, with mode.lower_only, lowers) both passes of one case on `inputs` = (primals, ct)."""
  row: dict[str, Any] = {"op": case.op, "shape": case.shape, "impl": case.impl}
  programs = _programs(case)
  primals, ct = inputs
  for name in args.passes:
    if mode.lower_only:
      try:
        row[f"{name}_lowering"] = _lower_for_cuda(programs[name], primals, ct)
      except Exception as err:  # noqa: BLE001 - one failing row must not end the run
        row[f"{name}_error"] = failure(err)
      continue
    start = time.perf_counter()
    try:
      stats = harness.time_fn(programs[name], primals, ct, warmup=args.warmup, iters=args.iters,
                              inner=args.inner)
      check_finite(programs[name](primals, ct))
    except Exception as err:  # noqa: BLE001
      row[f"{name}_error"] = failure(err)
      if args.verbose:
        traceback.print_exc()
      continue
    finally:
      row[f"{name}_wall_s"] = round(time.perf_counter() - start, 2)  # compile + all calls
    row[f"{name}_ms"] = stats["median_ms"]
    row[f"{name}_p10_ms"], row[f"{name}_p90_ms"] = stats["p10_ms"], stats["p90_ms"]
  if not mode.lower_only:
    _add_derived(row, case, ceilings)
  return row


def check_finite(tree: Any) -> None:
  if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree)):
    raise FloatingPointError("non-finite values in the outputs")


def measure_group(cases: list[Case], ceilings: Ceilings | None, args: argparse.Namespace,
                  mode: KernelMode) -> Iterator[dict[str, Any]]:
  """Yields the rows of all impls of one (op, shape); they share one set of inputs, freed at the end."""
  try:
    inputs = build_inputs(cases[0], abstract=mode.lower_only)
  except Exception as err:  # noqa: BLE001
    for case in cases:
      yield {"op": case.op, "shape": case.shape, "impl": case.impl, "error": f"inputs: {failure(err)}"}
    return
  for case in cases:
    yield measure_case(case, inputs, ceilings, args, mode)
    jax.clear_caches()  # drop this case's executables before the next one compiles
    gc.collect()
  del inputs
  gc.collect()


def _add_derived(row: dict[str, Any], case: Case, ceilings: Ceilings | None) -> None:
  """Floors, ratios against the floor and the released kernels, TFLOP/s, target."""
  released = RELEASED_MS.get((case.op, case.shape_key))
  for i, name in enumerate(PASSES):
    ms = row.get(f"{name}_ms")
    if ceilings is not None:
      floor, kind = ceilings.floor_ms(case.cost, name)
      row[f"{name}_floor_ms"], row[f"{name}_floor_kind"] = floor, kind
      if ms:
        row[f"{name}_x_floor"] = ms / floor
    if released:
      row[f"{name}_released_ms"] = released[i]
      if ms:
        row[f"{name}_speedup_vs_released"] = released[i] / ms
    flops = case.cost.matmul_flops_fwd if name == "fwd" else case.cost.matmul_flops_fwdbwd
    if flops and ms:
      row[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
      if ceilings is not None:
        row[f"{name}_frac_matmul_peak"] = row[f"{name}_tflops"] / ceilings.matmul_tflops
  target = TARGET_FWD_BWD_MS.get((case.op, case.shape_key))
  if target is not None:
    row["target_fwdbwd_ms"] = target
    if row.get("fwdbwd_ms"):
      row["target_met"] = row["fwdbwd_ms"] <= target
      row["fwdbwd_x_target"] = row["fwdbwd_ms"] / target  # > 1: that many times slower than the target


def add_speedups_vs_xla(rows: list[dict[str, Any]]) -> None:
  """speedup_vs_xla_<pass> = time of the XLA reference path of the same op and shape / this row's."""
  for row in rows:
    ref = next((r for r in rows if r["op"] == row["op"] and r["shape"] == row["shape"]
                and r["impl"] == XLA_REFERENCE[row["op"]]), None)
    for name in PASSES:
      if ref and ref.get(f"{name}_ms") and row.get(f"{name}_ms"):
        row[f"{name}_speedup_vs_xla"] = ref[f"{name}_ms"] / row[f"{name}_ms"]


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ("op", "shape", "impl", "fwd_ms", "fwdbwd_ms", "fwd_floor_ms", "fwdbwd_floor_ms",
                   "fwdbwd_floor_kind", "fwd_x_floor", "fwdbwd_x_floor", "fwd_released_ms",
                   "fwdbwd_released_ms", "fwd_speedup_vs_released", "fwdbwd_speedup_vs_released",
                   "fwd_speedup_vs_xla", "fwdbwd_speedup_vs_xla", "fwd_tflops", "fwdbwd_tflops",
                   "fwdbwd_frac_matmul_peak", "target_fwdbwd_ms",
                   "target_met", "fwdbwd_x_target", "fwd_error", "fwdbwd_error", "error", "fwd_lowering", "fwdbwd_lowering")


def summary_table(rows: list[dict[str, Any]]) -> str:
  short = [{k: row[k] for k in SUMMARY_COLUMNS if k in row} for row in rows]
  return harness.format_table(short)


def build_cases(args: argparse.Namespace, mode: KernelMode) -> list[Case]:
  shapes = SMOKE_SHAPES if args.smoke else Shapes()
  if args.cema_dim or args.cema_batch:
    shapes = dataclasses.replace(shapes, cema_dim=args.cema_dim or shapes.cema_dim,
                                 cema_batch=args.cema_batch or shapes.cema_batch)
  if args.cema_lengths:
    shapes = dataclasses.replace(shapes, cema_lengths=tuple(args.cema_lengths))
  builders = {"cema": cema_cases, "timestep_norm": tsn_cases, "chunk_attention": attention_cases}
  cases = []
  for op in args.ops:
    impls = _split(getattr(args, f"{op}_impls") or DEFAULT_IMPLS[op])
    bad = set(impls) - set(IMPLS[op])
    if bad:
      raise SystemExit(f"--{op.replace('_', '-')}-impls: unknown {sorted(bad)}; choose from {IMPLS[op]}")
    cases.extend(builders[op](shapes, impls, mode))
  for op, text in args.variants:
    if op in args.ops:
      # On top of the op's own overrides (--OP-config, or the smoke tiles); later keys win.
      merged = lambda base: f"{base},{text}" if base else text
      variant_mode = dataclasses.replace(mode, configs=tuple((o, merged(t) if o == op else t) for o, t in mode.configs))
      for case in builders[op](shapes, ["pallas"], variant_mode):
        cases.append(dataclasses.replace(case, impl=f"pallas[{text}]"))
  # Keep every (op, shape) together: its impls share one set of inputs.
  order = {key: i for i, key in reversed(list(enumerate((c.op, c.shape) for c in cases)))}
  return sorted(cases, key=lambda c: order[(c.op, c.shape)])


def _split(text: str) -> list[str]:
  return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
  parser.add_argument("--cema-impls", default=None, help=f"default {DEFAULT_IMPLS['cema']}; any of {IMPLS['cema']}")
  parser.add_argument("--timestep-norm-impls", dest="timestep_norm_impls", default=None,
                      help=f"default {DEFAULT_IMPLS['timestep_norm']}")
  parser.add_argument("--chunk-attention-impls", dest="chunk_attention_impls", default=None,
                      help=f"default {DEFAULT_IMPLS['chunk_attention']}")
  parser.add_argument("--cema-lengths", type=int, nargs="*", default=None)
  parser.add_argument("--cema-dim", type=int, default=None, help="CEMA channels (default 4096)")
  parser.add_argument("--cema-batch", type=int, default=None, help="CEMA batch (default 1)")
  parser.add_argument("--passes", default="fwd,fwdbwd", help="comma-separated subset of fwd,fwdbwd")
  parser.add_argument("--cema-config", default="", help="CemaKernelConfig overrides, e.g. 'num_chunks=4,split=1'")
  parser.add_argument("--timestep-norm-config", dest="timestep_norm_config", default="",
                      help="kernels_pallas.timestep_norm.KernelConfig overrides, e.g. 'time_splits=4'")
  parser.add_argument("--chunk-attention-config", dest="chunk_attention_config", default="",
                      help="kernels_pallas.chunk_attention.KernelConfig overrides, e.g. 'block_q=64'")
  parser.add_argument("--variant", dest="variants", action="append", default=[], metavar="OP:K=V,...",
                      help="an extra Pallas row with these tiling overrides, e.g. timestep_norm:time_splits=8 "
                           "(repeatable; labelled pallas[K=V,...])")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=15)
  parser.add_argument("--inner", type=int, default=3, help="back-to-back calls per timed sample")
  parser.add_argument("--copy-bytes", type=int, default=2 << 30)
  parser.add_argument("--matmul-n", type=int, default=8192)
  parser.add_argument("--skip-ceilings", action="store_true", help="no floor measurements (no floor columns)")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, interpreted kernels (seconds)")
  parser.add_argument("--lower-only", action="store_true",
                      help="lower every program for CUDA with abstract inputs (works on a CPU); no timing")
  parser.add_argument("--results-dir", default=None)
  parser.add_argument("--name", default="ops", help="results file name")
  parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing rows")
  args = parser.parse_args(argv)
  args.ops = _split(args.ops)
  bad = set(args.ops) - set(OPS)
  if bad:
    parser.error(f"--ops: unknown {sorted(bad)}; choose from {OPS}")
  variants = []
  for item in args.variants:
    op, _, text = item.partition(":")
    if op not in OPS or not text:
      parser.error(f"--variant {item!r} must look like OP:K=V,... with OP one of {OPS}")
    variants.append((op, text))
  args.variants = variants
  args.passes = _split(args.passes)
  if set(args.passes) - set(PASSES) or not args.passes:
    parser.error(f"--passes must be a non-empty subset of {PASSES}")
  if args.smoke:
    args.warmup, args.iters, args.inner = min(args.warmup, 1), min(args.iters, 2), 1
  return args


def kernel_mode(args: argparse.Namespace) -> KernelMode:
  configs = []
  for op in OPS:
    text = getattr(args, f"{op}_config")
    if args.smoke and not text:
      text = SMOKE_KERNEL_CONFIGS[op]
    configs.append((op, text))
  return KernelMode(interpret=None, lower_only=args.lower_only, configs=tuple(configs))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  mode = kernel_mode(args)
  cases = build_cases(args, mode)
  print(f"bench_ops: {len(cases)} cases on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}; warmup {args.warmup}, median of {args.iters} x {args.inner} calls", flush=True)
  ceilings, ceiling_rows = None, []
  if not (args.skip_ceilings or args.lower_only):
    ceilings, ceiling_rows = measure_ceilings(args.smoke, args)
    # Also on their own, in floors.py's format (plus the fp32 FMA rate).
    harness.write_results("floors", ceiling_rows, {"floors_source": "bench_ops.measure_ceilings"},
                          results_dir=args.results_dir)
  meta = {"ops_settings": {k: v for k, v in vars(args).items()}, "ceilings": ceiling_rows,
          "cema_fma_per_element": {"fwd": CEMA_FMA_FWD, "bwd": CEMA_FMA_BWD},
          "timing": "median of iters samples, each the mean of `inner` back-to-back calls, after warmup"}
  rows: list[dict[str, Any]] = []
  for _, group in itertools.groupby(cases, key=lambda c: (c.op, c.shape)):
    for row in measure_group(list(group), ceilings, args, mode):
      rows.append(row)
      add_speedups_vs_xla(rows)
      print(_row_line(row), flush=True)
      # Rewritten after every row, so a run cut short still leaves its results.
      harness.write_results(args.name, rows, meta, results_dir=args.results_dir, print_table=False)
  path = harness.write_results(args.name, rows, meta, results_dir=args.results_dir, print_table=False)
  print(f"\n== {args.name}: ours (Pallas / XLA) vs floors measured in this run and the released CUDA kernels")
  print(summary_table(rows))
  for row in rows:
    if "target_met" in row:
      verdict = "MET" if row["target_met"] else f"NOT met, {row['fwdbwd_x_target']:.2f}x the target's time"
      # The sample size matters for short ops: with few back-to-back calls the host's dispatch shows.
      print(f"target {row['op']} {row['shape']} {row['impl']}: fwd+bwd <= {row['target_fwdbwd_ms']} ms: "
            f"{row['fwdbwd_ms']:.3f} ms ({args.inner} back-to-back calls per sample), {verdict}")
  print(f"-> {path}", flush=True)
  return rows


def _row_line(row: dict[str, Any]) -> str:
  parts = [f"{row['op']:15s} {row['shape']:32s} {row['impl']:11s}"]
  for name in PASSES:
    if f"{name}_ms" in row:
      parts.append(f"{name} {row[f'{name}_ms']:.3f} ms")
    elif f"{name}_error" in row:
      parts.append(f"{name} failed: {row[f'{name}_error']}")
    elif f"{name}_lowering" in row:
      parts.append(f"{name} {row[f'{name}_lowering']}")
  if "error" in row:
    parts.append(f"failed: {row['error']}")
  return " | ".join(parts)


if __name__ == "__main__":
  main()
