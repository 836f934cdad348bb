"""How fast is a Pallas Mosaic GPU (TMA + wgmma, warp-specialised) matmul on this card?

The chunked-attention kernels are Pallas-Triton kernels fed by cp.async; their GEMM-shaped stages
(P V, dV = P^T dO, the backward tiles' dO V^T) run at 490-580 TFLOP/s on an H200 where XLA's
cuBLAS matmul reaches 680-720. A Mosaic GPU rewrite is the README's open route to the attention
target; this probe measures whether the building block is there: JAX's own Hopper example kernel
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`) against `jnp.dot` in the same run, bf16 in,
bf16 out, float32 accumulation, on a large square product and on attention-like products (one
chunk-head's rows against a 2048-wide operand, K = 2048).

Second part (--block-causal, on by default): the forward block-causal matmul of chunked attention,
O = (1 / l) P~ V, as the Mosaic GPU kernel `kernels_pallas.block_matmul_mgpu.block_causal_matmul_mgpu`
against the Triton `_tr_block_matmul` it would replace, in the same run, at the attention benchmark
shape (B=1, 16 chunks of 2048, 4 heads, dk 256, dv 2048, bf16). P~ and 1 / l are the real ones: the
Triton 'twopass' scores kernel writes them from q, k ~ N(0, dk^-1/2) (as check_chunk_attention).
Every output is compared with the dense float32 reference (`block_causal_matmul_reference`);
TFLOP/s count the causal half (2 * B H n C^2 / 2 * dv), as check_chunk_attention's stage rates.

Third part (--bwd-tiles, on by default): the backward tiles kernel (S, P = exp2(S - lse), dP = dO V^T,
dS = P (dP - delta) per visited 128 x 128 tile, written to the P and dS tile buffers) as the Mosaic GPU
kernel `kernels_pallas.bwd_tiles_mgpu.bwd_tiles_mgpu` against the Triton `_tr_bwd_tiles` (the op's
default plan), same shape. lse comes from the Triton forward, delta from `chunk_attention._delta`.
Errors on visited tiles only (the kernels leave the others unwritten): against the Triton kernel's
buffers (both bf16) and against the dense float32 reference on the first and last chunk (all heads;
the full reference would be 2 GiB per buffer). TFLOP/s count 2 (dk + dv) per visited query-key pair,
the causal half: 2 * B H n C^2 / 2 * (dk + dv).

Each row: median of --iters samples (each the mean of --inner calls) after warm-up, TFLOP/s, and the
largest relative error against float32 (max |got - ref| / max |ref|). Configurations that do not fit
shared memory or fail to compile are reported as errors in their rows, not dropped; each part
survives the others' failures.

  python experiments/gpu_checks/probe_mgpu_matmul.py --results-dir "$OUT"
  python experiments/gpu_checks/probe_mgpu_matmul.py --no-example-matmul --results-dir "$OUT"  # parts 2, 3
  python experiments/gpu_checks/probe_mgpu_matmul.py --no-example-matmul --no-block-causal --results-dir "$OUT"  # part 3
  # part 2's persistent rows (forward and transposed) and the op's defaults
  python experiments/gpu_checks/probe_mgpu_matmul.py --no-example-matmul --no-bwd-tiles \
      --only "st 4 epi 64 immediate" persistent --results-dir "$OUT"
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import harness
from kernels_pallas import block_matmul_mgpu as bm
from kernels_pallas import bwd_tiles_mgpu as bt
from kernels_pallas import chunk_attention as ca

SHAPES = ((8192, 8192, 8192), (32768, 2048, 2048), (4096, 2048, 2048))


def _configs():
  """Tilings as keyword dicts (the example's TuningConfig fields may change between jax versions)."""
  for (tile_m, tile_n), wg_dim in itertools.product(((128, 128), (128, 256), (256, 128)), ("N", "M")):
    yield dict(tile_m=tile_m, tile_n=tile_n, tile_k=64, max_concurrent_steps=4, epi_tile_n=64,
               epi_tile_m=64, grid_minor_dim="N", grid_tile_width=8, wg_dimension=wg_dim)


def _mgpu_fn(mgpu, fields):
  dims = {key: mgpu.MatmulDimension[value] for key, value in fields.items() if key.endswith("_dim") or key == "wg_dimension"}
  cfg = mgpu.TuningConfig(**{**fields, **dims})
  return jax.jit(lambda a, b: mgpu.matmul(a, b, None, cfg))


def _error(err: BaseException) -> str:
  lines = str(err).splitlines() or [""]
  return f"{type(err).__name__}: {lines[0][:300]}"


def _print_row(row: dict) -> None:
  print({key: (round(val, 4) if isinstance(val, float) else val) for key, val in row.items()}, flush=True)


def example_matmul_rows(args) -> list[dict]:
  """Part 1: JAX's Hopper example matmul against jnp.dot."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mgpu  # imports Mosaic GPU

  rows = []
  for m, n, k in SHAPES:
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
    ref = np.asarray(jnp.dot(a, b, preferred_element_type=jnp.float32))
    scale = float(np.max(np.abs(ref)))
    flops = 2.0 * m * n * k
    xla = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    candidates = [("xla_dot", "", lambda: jax.jit(xla))]
    for fields in _configs():
      label = f"{fields['tile_m']}x{fields['tile_n']} wg={fields['wg_dimension']}"
      candidates.append(("mgpu", label, lambda fields=fields: _mgpu_fn(mgpu, fields)))
    for impl, label, make in candidates:
      row = {"part": "example_matmul", "shape": f"{m}x{n}x{k}", "impl": impl, "config": label}
      try:
        fn = make()
        out = fn(a, b)
        row["max_rel_err"] = float(np.max(np.abs(np.asarray(out, np.float32) - ref))) / scale
        timing = harness.time_fn(fn, a, b, warmup=args.warmup, iters=args.iters)
        row["ms"] = timing["median_ms"]
        row["tflops"] = flops / (timing["median_ms"] * 1e-3) / 1e12
      except Exception as err:  # noqa: BLE001 - one failing tiling must not end the probe
        row["error"] = _error(err)
      rows.append(row)
      _print_row(row)
  return rows


def _check_and_time(row: dict, fn, fn_args: tuple, ref, ref_max: float, flops: float, args) -> None:
  """Fills row with the largest error of fn(*fn_args) against ref (relative to max |ref|), whether
  it is within --tolerance, and the median time and TFLOP/s."""
  out = jax.block_until_ready(fn(*fn_args))
  err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) / ref_max
  row["max_rel_err"] = err if bool(jnp.all(jnp.isfinite(out))) else float("nan")
  row["ok"] = bool(row["max_rel_err"] < args.tolerance)  # NaN compares False
  del out
  timing = harness.time_fn(fn, *fn_args, warmup=args.warmup, iters=args.iters, inner=args.inner)
  row["ms"] = timing["median_ms"]
  row["tflops"] = flops / (timing["median_ms"] * 1e-3) / 1e12


# The persistent schedule (not yet measured), forward and transposed: P programs stride the grid's item
# order, each ring running on across its items; 264 cannot co-reside (one CTA per SM): a finer split of
# the last wave. 4 stages with 64-column stores (226 KiB, the op's configuration) and 3 stages (210 KiB).
PERSISTENT_CANDIDATES = tuple(
    (f"bd 256 st {stages}{' epi 64' if stages == 4 else ''} immediate persistent {ctas}",
     dict(block=128, block_d=256, stages=stages, release="immediate", persistent_ctas=ctas,
          **({"epi_cols": 64} if stages == 4 else {})))
    for ctas in (132, 264) for stages in (4, 3))

# Part 2 candidates: (impl, label, keyword arguments). Shared memory per CTA (bf16):
# stages * (block * 64 + 64 * block_d) * 2 + block * block_d * 2 bytes (output staging), at most 227 KiB.
BLOCK_CAUSAL_CANDIDATES = (
    ("triton", "op default (mm tiles 128x64)", {"mm_block_k": 64}),
    ("triton", "square 128", {"mm_block_k": 128}),
    ("mgpu", "block 128 bd 256 st 3", dict(block=128, block_d=256, stages=3)),  # 208 KiB
    ("mgpu", "block 128 bd 256 st 3 immediate", dict(block=128, block_d=256, stages=3, release="immediate")),
    # 4 * 48 KiB ring + 2 * 16 KiB staging (64-column stores) + row scales: 226 KiB
    ("mgpu", "block 128 bd 256 st 4 epi 64 immediate", dict(block=128, block_d=256, stages=4, epi_cols=64,
                                                           release="immediate")),
    ("mgpu", "block 128 bd 256 st 4 epi 64", dict(block=128, block_d=256, stages=4, epi_cols=64)),
    ("mgpu", "block 128 bd 128 st 4", dict(block=128, block_d=128, stages=4)),  # 160 KiB
    ("mgpu", "block 128 bd 128 st 6", dict(block=128, block_d=128, stages=6)),  # 224 KiB
    ("mgpu", "block 64 bd 256 st 4", dict(block=64, block_d=256, stages=4)),  # 192 KiB
    ("mgpu", "block 64 bd 256 st 5", dict(block=64, block_d=256, stages=5)),  # 232 KiB: may not fit
    *(("mgpu", f"block 128 {label}", kwargs) for label, kwargs in PERSISTENT_CANDIDATES),
)


def block_causal_rows(args) -> list[dict]:
  """Part 2: the Mosaic GPU block-causal matmul against the Triton one on real probability tiles."""
  batch, n_chunks, chunk, heads, dk, dv = args.batch, args.chunks, args.chunk_size, args.heads, args.dk, args.dv
  length = n_chunks * chunk
  dtype = jnp.bfloat16
  keys = jax.random.split(jax.random.key(0), 3)
  q = (jax.random.normal(keys[0], (batch, length, heads, dk)) * dk ** -0.25).astype(dtype)
  k = (jax.random.normal(keys[1], (batch, length, heads, dk)) * dk ** -0.25).astype(dtype)
  v = jax.random.normal(keys[2], (batch, length, heads, dv)).astype(dtype)
  # 128 x 128 score tiles (the op's default writer): every reader below reads only tiles it wrote.
  config = ca.KernelConfig(block_q=128, block_k=128, fwd_scores="twopass")
  plan = ca._triton_plan(config, False, 1.0, batch, heads, n_chunks, chunk, chunk, dk, dv, dtype)
  p_buf, rscale, _ = jax.jit(lambda q, k: ca._tr_scores(plan, q, k, dtype, None))(q, k)
  del q, k
  ref = jax.jit(lambda p, x, r: bm.block_causal_matmul_reference(p, x, r, chunk, 128))(p_buf, v, rscale)
  ref_max = float(jnp.max(jnp.abs(ref)))
  flops = 2.0 * batch * heads * n_chunks * chunk ** 2 / 2 * dv  # the causal half
  shape = f"B{batch} n{n_chunks}x{chunk} H{heads} dv{dv}"
  rows = []
  for impl, label, kwargs in BLOCK_CAUSAL_CANDIDATES:
    if args.only and not any(part in f"{impl} {label}" for part in args.only):
      continue
    row = {"part": "block_causal", "shape": shape, "impl": impl, "config": label}
    try:
      if impl == "triton":
        tplan = ca._triton_plan(dataclasses.replace(config, **kwargs), False, 1.0, batch, heads, n_chunks, chunk,
                                chunk, dk, dv, dtype)
        mm_plan = dataclasses.replace(tplan, geom=tplan.mm_geom)
        row["tiles"] = [mm_plan.geom.bq, mm_plan.geom.bk, mm_plan.block_d]
        fn = jax.jit(lambda p, x, r, mm_plan=mm_plan: ca._tr_block_matmul(mm_plan, p, x, None, None, dtype, r))
      else:
        fn = jax.jit(lambda p, x, r, kwargs=kwargs: bm.block_causal_matmul_mgpu(p, x, r, chunk=chunk, **kwargs))
      _check_and_time(row, fn, (p_buf, v, rscale), ref, ref_max, flops, args)
    except Exception as err:  # noqa: BLE001 - one failing configuration must not end the probe
      row["error"] = _error(err)
      traceback.print_exc()
    rows.append(row)
    _print_row(row)
  rows += _transposed_rows(args, plan, p_buf, v, flops, shape)
  return rows


# The backward's transposed products (dV = P^T dO, dK = dS^T Q): Triton's tmatmul against Mosaic GPU.
TRANSPOSED_CANDIDATES = (
    ("triton", "op default (bwd tiles 128x128)", {}),
    ("mgpu", "T block 128 bd 256 st 4 epi 64 immediate", dict(block=128, block_d=256, stages=4, epi_cols=64,
                                                             release="immediate")),
    ("mgpu", "T block 128 bd 256 st 3", dict(block=128, block_d=256, stages=3)),
    *(("mgpu", f"T block 128 {label}", kwargs) for label, kwargs in PERSISTENT_CANDIDATES),
)


def _transposed_rows(args, plan, p_buf, x, flops, shape) -> list[dict]:
  """Y = M^T X on the same probability tiles (every tile at or below the diagonal is visited)."""
  chunk, dtype = args.chunk_size, p_buf.dtype
  ref = jax.jit(lambda p, x: bm.block_causal_matmul_reference(p, x, None, chunk, 128, transpose_m=True))(p_buf, x)
  ref_max = float(jnp.max(jnp.abs(ref)))
  rows = []
  for impl, label, kwargs in TRANSPOSED_CANDIDATES:
    if args.only and not any(part in f"{impl} {label}" for part in args.only):
      continue
    row = {"part": "block_causal_transposed", "shape": shape, "impl": impl, "config": label}
    try:
      if impl == "triton":
        mm_plan = dataclasses.replace(plan, geom=plan.bwd_mm_geom)
        row["tiles"] = [mm_plan.geom.bq, mm_plan.geom.bk, mm_plan.block_d]
        fn = jax.jit(lambda p, x, mm_plan=mm_plan: ca._tr_block_tmatmul(mm_plan, p, x, dtype))
      else:
        fn = jax.jit(lambda p, x, kwargs=kwargs: bm.block_causal_matmul_mgpu(p, x, None, chunk=chunk,
                                                                           transpose_m=True, **kwargs))
      _check_and_time(row, fn, (p_buf, x), ref, ref_max, flops, args)
    except Exception as err:  # noqa: BLE001 - one failing configuration must not end the probe
      row["error"] = _error(err)
      traceback.print_exc()
    rows.append(row)
    _print_row(row)
  return rows


# Part 3 candidates: (impl, label, keyword arguments of bwd_tiles_mgpu). Shared memory per CTA (bf16):
# stages * (128 + block_k) * 64 * 2 B ring + 32 KiB output staging + 2 KiB row statistics, at most 227 KiB.
BWD_TILES_CANDIDATES = (
    ("triton", "tiles op default (128x128, 4 stages)", {}),
    # whole pair walks per program: 8 programs per chunk-head at C=2048, ~16 chunk-heads in flight
    # (DRAM-bound: 28% L2 hits under ncu), then walks split into groups of spans (more programs per
    # chunk-head, fewer chunk-heads' rows competing for L2)
    ("mgpu", "tiles bk 128 st 4", dict(block_k=128, stages=4)),  # 162 KiB
    ("mgpu", "tiles bk 128 st 4 spans 1", dict(block_k=128, stages=4, spans_per_program=1)),  # the default
    # persistent: 132 programs (one per SM) stride the global tile order, each ring running on across
    # its tiles (no prologue or ring drain per tile); 264 cannot co-reside (one CTA per SM), a finer split
    ("mgpu", "tiles bk 128 st 4 persistent 132", dict(block_k=128, stages=4, persistent_ctas=132)),
    ("mgpu", "tiles bk 128 st 4 persistent 264", dict(block_k=128, stages=4, persistent_ctas=264)),
    ("mgpu", "tiles bk 128 st 3 persistent 132", dict(block_k=128, stages=3, persistent_ctas=132)),  # 130 KiB
    ("mgpu", "tiles bk 128 st 6 persistent 132", dict(block_k=128, stages=6, persistent_ctas=132)),  # 226 KiB
    ("mgpu", "tiles bk 128 st 5 persistent 132", dict(block_k=128, stages=5, persistent_ctas=132)),  # 194 KiB
    ("mgpu", "tiles bk 128 st 6 spans 1", dict(block_k=128, stages=6, spans_per_program=1)),  # 226 KiB
    ("mgpu", "tiles bk 128 st 5 spans 1", dict(block_k=128, stages=5, spans_per_program=1)),  # 194 KiB
    ("mgpu", "tiles bk 128 st 4 spans 2", dict(block_k=128, stages=4, spans_per_program=2)),
    ("mgpu", "tiles bk 128 st 4 spans 4", dict(block_k=128, stages=4, spans_per_program=4)),
    ("mgpu", "tiles bk 128 st 6 spans 2", dict(block_k=128, stages=6, spans_per_program=2)),  # 226 KiB
    ("mgpu", "tiles bk 256 st 3 spans 1", dict(block_k=256, stages=3, spans_per_program=1)),  # 178 KiB
    ("mgpu", "tiles bk 256 st 4 spans 1", dict(block_k=256, stages=4, spans_per_program=1)),  # 226 KiB
    ("mgpu", "tiles bk 256 st 4 spans 2", dict(block_k=256, stages=4, spans_per_program=2)),
)


def bwd_tiles_rows(args) -> list[dict]:
  """Part 3: the Mosaic GPU backward tiles kernel against the Triton one (and the float32 reference)."""
  batch, n_chunks, chunk, heads, dk, dv = args.batch, args.chunks, args.chunk_size, args.heads, args.dk, args.dv
  length = n_chunks * chunk
  dtype = jnp.bfloat16
  keys = jax.random.split(jax.random.key(1), 4)
  q = (jax.random.normal(keys[0], (batch, length, heads, dk)) * dk ** -0.25).astype(dtype)
  k = (jax.random.normal(keys[1], (batch, length, heads, dk)) * dk ** -0.25).astype(dtype)
  v = jax.random.normal(keys[2], (batch, length, heads, dv)).astype(dtype)
  d_out = jax.random.normal(keys[3], (batch, length, heads, dv)).astype(dtype)
  plan = ca._triton_plan(ca.KernelConfig(), False, 1.0, batch, heads, n_chunks, chunk, chunk, dk, dv, dtype)
  out, lse = jax.jit(lambda q, k, v: ca._tr_blocks_forward(plan, q, k, v, None))(q, k, v)
  delta = jax.jit(ca._delta)(out, d_out)
  del out
  inputs = (q, k, v, d_out, lse, delta)
  tiles_plan = dataclasses.replace(plan, geom=plan.bwd_geom)  # as _tr_backward calls it
  triton_fn = jax.jit(lambda q, k, v, d_out, lse, delta: ca._tr_bwd_tiles(tiles_plan, q, k, v, None, lse, delta,
                                                                          d_out))
  triton_out = jax.block_until_ready(triton_fn(*inputs))

  visited = bt.visited_tiles(chunk)  # [C, C]: the entries both kernels write

  @jax.jit
  def visited_err(got, want):
    """max |got - want| / max |want| over visited entries ([B, H, rows, C] each), and got's finiteness there."""
    shape = (got.shape[0], got.shape[1], -1, chunk, chunk)
    got, want = got.reshape(shape).astype(jnp.float32), want.reshape(shape).astype(jnp.float32)
    diff = jnp.max(jnp.where(visited, jnp.abs(got - want), 0.0))
    finite = jnp.all(jnp.where(visited, jnp.isfinite(got), True))
    return diff / jnp.max(jnp.where(visited, jnp.abs(want), 0.0)), finite

  # float32 reference on the first and last chunk (all heads): 64 MiB per buffer and chunk at the default shape
  reference = jax.jit(lambda *a: bt.bwd_tiles_reference(*a, chunk, 1.0))
  ref_chunks = sorted({0, n_chunks - 1})
  refs = {}
  for c in ref_chunks:
    rows = slice(c * chunk, (c + 1) * chunk)
    refs[c] = reference(q[:, rows], k[:, rows], v[:, rows], d_out[:, rows], lse[..., rows], delta[..., rows])

  def errors(p_buf, ds_buf) -> dict:
    row = {}
    for name, got, want in (("p", p_buf, triton_out[0]), ("ds", ds_buf, triton_out[1])):
      err, finite = visited_err(got, want)
      row[f"{name}_err_vs_triton"] = float(err) if bool(finite) else float("nan")
    for index, (name, buf) in enumerate((("p", p_buf), ("ds", ds_buf))):
      errs = []
      for c in ref_chunks:
        err, finite = visited_err(buf[:, :, c * chunk:(c + 1) * chunk], refs[c][index])
        errs.append(float(err) if bool(finite) else float("nan"))
      row[f"{name}_err_ref"] = float(np.max(errs))  # NaN if any chunk had one
    return row

  flops = 2.0 * batch * heads * n_chunks * chunk ** 2 / 2 * (dk + dv)  # causal half, 2 (dk + dv) per pair
  shape = f"B{batch} n{n_chunks}x{chunk} H{heads} dk{dk} dv{dv}"
  rows = []
  for impl, label, kwargs in BWD_TILES_CANDIDATES:
    if args.only and not any(part in f"{impl} {label}" for part in args.only):
      continue
    row = {"part": "bwd_tiles", "shape": shape, "impl": impl, "config": label}
    try:
      if impl == "triton":
        fn, out = triton_fn, triton_out
        row["tiles"] = [tiles_plan.geom.bq, tiles_plan.geom.bk]
      else:
        fn = jax.jit(lambda *a, kwargs=kwargs: bt.bwd_tiles_mgpu(*a, chunk=chunk, scale=1.0, **kwargs))
        out = jax.block_until_ready(fn(*inputs))
      row.update(errors(*out))
      errs = [row[key] for key in ("p_err_vs_triton", "ds_err_vs_triton", "p_err_ref", "ds_err_ref")]
      row["ok"] = bool(all(err < args.tolerance for err in errs))  # NaN compares False
      del out
      timing = harness.time_fn(fn, *inputs, warmup=args.warmup, iters=args.iters, inner=args.inner)
      row["ms"] = timing["median_ms"]
      row["tflops"] = flops / (timing["median_ms"] * 1e-3) / 1e12
    except Exception as err:  # noqa: BLE001 - one failing configuration must not end the probe
      row["error"] = _error(err)
      traceback.print_exc()
    rows.append(row)
    _print_row(row)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--inner", type=int, default=5, help="parts 2, 3: calls per timing sample")
  parser.add_argument("--example-matmul", action=argparse.BooleanOptionalAction, default=True,
                      help="part 1: JAX's Hopper example matmul against jnp.dot")
  parser.add_argument("--block-causal", action=argparse.BooleanOptionalAction, default=True,
                      help="part 2: Mosaic GPU against Triton block-causal matmul (attention's P V)")
  parser.add_argument("--bwd-tiles", action=argparse.BooleanOptionalAction, default=True,
                      help="part 3: Mosaic GPU against Triton backward tiles kernel (attention's P, dS tiles)")
  parser.add_argument("--only", nargs="*", default=None,
                      help="parts 2, 3: candidates whose 'impl label' contains one of these")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--chunks", type=int, default=16)
  parser.add_argument("--chunk-size", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--dk", type=int, default=256)
  parser.add_argument("--dv", type=int, default=2048)
  parser.add_argument("--tolerance", type=float, default=1e-2, help="parts 2, 3: max relative error (bf16 output)")
  parser.add_argument("--results-dir", default=None)
  parser.add_argument("--name", default="probe-mgpu-matmul")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("probe_mgpu_matmul needs a Hopper GPU (Mosaic GPU kernels have no CPU path).")

  rows = []
  parts = ((args.example_matmul, example_matmul_rows), (args.block_causal, block_causal_rows),
           (args.bwd_tiles, bwd_tiles_rows))
  for enabled, part in parts:
    if not enabled:
      continue
    try:
      rows += part(args)
    except Exception as err:  # noqa: BLE001 - e.g. out of memory building part 2's inputs
      traceback.print_exc()
      rows.append({"part": part.__name__, "error": _error(err)})
      _print_row(rows[-1])
    # Written after each part: a part that hangs past the device limit leaves the other's rows.
    harness.write_results(args.name, rows, {"probe_shapes": [list(s) for s in SHAPES],
                                            "block_causal_shape": [args.batch, args.chunks, args.chunk_size,
                                                                   args.heads, args.dk, args.dv]},
                          results_dir=args.results_dir, print_table=False)
  harness.write_results(args.name, rows, {"probe_shapes": [list(s) for s in SHAPES],
                                          "block_causal_shape": [args.batch, args.chunks, args.chunk_size,
                                                                 args.heads, args.dk, args.dv]},
                        results_dir=args.results_dir)


if __name__ == "__main__":
  main()
