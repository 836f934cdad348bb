"""How fast is the Mosaic GPU scores kernel against the Triton one it would replace?

The forward of chunked attention starts with the scores kernel: P~ = exp2(S - m) tiles, 1 / l and
lse from q and k (`chunk_attention._tr_scores`, fwd_scores='bounded' by default). On an H200 at the
benchmark shape (B=1, 16 chunks of 2048, 4 heads, dk 256, bf16) the Triton kernel takes 0.32-0.47 ms
for ~0.08 TFLOP of Q K^T and 256 MiB of P~ stores. This probe times it against
`kernels_pallas.scores_mgpu.chunk_scores_mgpu` (TMA + wgmma, warp-specialised) in the same run, both
including the XLA pass that computes the bound ('bounded'), and in 'twopass' (no bound) too.

q, k ~ N(0, 1) * dk^-1/4 (bf16). With --hot-rows N, N query rows (fixed seed) are scaled by
--hot-scale so that the bound fails for their query blocks and the kernels take the second pass there.

Each row: median ms over --iters samples (each the mean of --inner calls) after warm-up; qk_tflops
counts Q K^T once per visited tile (2 * B H n * nbq (nbq + 1) / 2 * 128^2 * dk); the largest errors
against the Triton kernel of the same mode: P~ over the visited tiles relative to each row's largest
entry, rscale and lse relative to their largest magnitude. A configuration that fails (shared memory,
compilation, wrong results) is an error row, not the end of the probe.

  python experiments/gpu_checks/probe_mgpu_scores.py --results-dir "$OUT"
  python experiments/gpu_checks/probe_mgpu_scores.py --hot-rows 16 --results-dir "$OUT" --name probe-mgpu-scores-hot
"""

from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import harness
from kernels_pallas import chunk_attention as ca
from kernels_pallas import scores_mgpu as sm

# (impl, mode, label, keyword arguments of chunk_scores_mgpu). Shared memory at dk 256:
# sm.smem_bytes(256, stages) = 104 KiB + 16 KiB per stage (4: 168, 6: 200, 7: 216 KiB).
CANDIDATES = (
    ("triton", "bounded", "op default", {}),
    ("mgpu", "bounded", "st 6", dict(stages=6)),
    ("mgpu", "bounded", "st 4", dict(stages=4)),
    ("mgpu", "bounded", "st 7", dict(stages=7)),
    ("mgpu", "bounded", "st 6 pingpong", dict(stages=6, pingpong=True)),
    ("mgpu", "bounded", "st 4 pingpong", dict(stages=4, pingpong=True)),
    ("mgpu", "bounded", "st 7 pingpong", dict(stages=7, pingpong=True)),
    ("mgpu", "bounded", "st 6 exact math", dict(stages=6, approx_math=False)),
    ("triton", "twopass", "op default", {}),
    ("mgpu", "twopass", "st 6", dict(stages=6)),
    ("mgpu", "twopass", "st 6 pingpong", dict(stages=6, pingpong=True)),
)


def _error(err: BaseException) -> str:
  lines = str(err).splitlines() or [""]
  return f"{type(err).__name__}: {lines[0][:300]}"


def _print_row(row: dict) -> None:
  print({key: (float(f"{val:.4g}") if isinstance(val, float) else val) for key, val in row.items()}, flush=True)


def _inputs(args):
  batch, length, heads, dk = args.batch, args.chunks * args.chunk_size, args.heads, args.dk
  keys = jax.random.split(jax.random.key(args.seed), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, dk)) * dk ** -0.25
  k = jax.random.normal(keys[1], (batch, length, heads, dk)) * dk ** -0.25
  if args.hot_rows:
    flat = jax.random.choice(keys[2], batch * length * heads, (args.hot_rows,), replace=False)
    scale = jnp.ones((batch * length * heads,)).at[flat].set(args.hot_scale)
    q = q * scale.reshape(batch, length, heads)[..., None]
  return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)


def _errors_fn(chunk: int, block: int):
  """(mine, theirs) -> largest errors: P~ row-relative over visited tiles, rscale and lse relative."""
  tile = np.arange(chunk) // block
  visited = jnp.asarray(tile[None, :] <= tile[:, None])  # [C, C]

  def errors(mine, theirs):
    (p, rscale, lse), (tp, trs, tlse) = mine, theirs
    shape = p.shape[:2] + (p.shape[2] // chunk, chunk, chunk)
    p = jnp.where(visited, p.reshape(shape).astype(jnp.float32), 0.0)
    tp = jnp.where(visited, tp.reshape(shape).astype(jnp.float32), 0.0)
    row = jnp.max(jnp.abs(p - tp), axis=-1) / jnp.maximum(jnp.max(jnp.abs(tp), axis=-1), 1e-30)
    rel = lambda a, b: jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))  # noqa: E731
    return jnp.max(row), rel(rscale, trs), rel(lse, tlse), jnp.all(jnp.isfinite(p))

  return jax.jit(errors)


def scores_rows(args) -> list[dict]:
  batch, n_chunks, chunk, heads, dk, dv = args.batch, args.chunks, args.chunk_size, args.heads, args.dk, args.dv
  dtype = jnp.bfloat16
  q, k = _inputs(args)
  nbq = chunk // sm.BLOCK
  flops = 2.0 * batch * heads * n_chunks * nbq * (nbq + 1) / 2 * sm.BLOCK ** 2 * dk
  shape = f"B{batch} n{n_chunks}x{chunk} H{heads} dk{dk}"
  errors = _errors_fn(chunk, sm.BLOCK)
  plans = {mode: ca._triton_plan(ca.KernelConfig(fwd_scores=mode), False, args.scale, batch, heads, n_chunks, chunk,
                                 chunk, dk, dv, dtype) for mode in ("bounded", "twopass")}
  scale2 = args.scale * ca._LOG2E
  rows, triton_out = [], {}
  for impl, mode, label, kwargs in CANDIDATES:
    if args.only and not any(part in f"{impl} {mode} {label}" for part in args.only):
      continue
    row = {"shape": shape, "hot_rows": args.hot_rows, "impl": impl, "mode": mode, "config": label}
    try:
      plan = plans[mode]
      if impl == "triton":
        row["tiles"] = [plan.geom.bq, plan.geom.bk]
        fn = jax.jit(lambda q, k, plan=plan: ca._tr_scores(plan, q, k, dtype, None))
      else:
        row["smem_kib"] = round(sm.smem_bytes(dk, kwargs.get("stages", 6)) / 1024, 1)

        def fn(q, k, plan=plan, mode=mode, kwargs=kwargs):
          bound = ca._score_bound(q, k, plan.geom, scale2) if mode == "bounded" else None
          return sm.chunk_scores_mgpu(q, k, bound, chunk=chunk, scale=args.scale, **kwargs)

        fn = jax.jit(fn)
      out = jax.block_until_ready(fn(q, k))
      if impl == "triton":
        triton_out.setdefault(mode, out)
      if mode in triton_out:
        p_err, rs_err, lse_err, finite = (float(x) for x in errors(out, triton_out[mode]))
        row.update(p_rel_err=p_err if finite else float("nan"), rscale_rel_err=rs_err, lse_rel_err=lse_err)
        row["ok"] = bool(p_err < args.tolerance and rs_err < 1e-4 and lse_err < 1e-4 and finite)
      del out
      timing = harness.time_fn(fn, q, k, warmup=args.warmup, iters=args.iters, inner=args.inner)
      row["ms"] = timing["median_ms"]
      row["qk_tflops"] = flops / (timing["median_ms"] * 1e-3) / 1e12
    except Exception as err:  # noqa: BLE001 - one failing configuration must not end the probe
      row["error"] = _error(err)
      traceback.print_exc()
    rows.append(row)
    _print_row(row)
  if not args.only or any("bound" in part for part in args.only):  # the XLA pass both 'bounded' rows include
    row = {"shape": shape, "hot_rows": args.hot_rows, "impl": "xla", "mode": "bounded", "config": "bound alone"}
    try:
      fn = jax.jit(lambda q, k: ca._score_bound(q, k, plans["bounded"].geom, scale2))
      row["ms"] = harness.time_fn(fn, q, k, warmup=args.warmup, iters=args.iters, inner=args.inner)["median_ms"]
    except Exception as err:  # noqa: BLE001
      row["error"] = _error(err)
    rows.append(row)
    _print_row(row)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--inner", type=int, default=5, help="calls per timing sample")
  parser.add_argument("--only", nargs="*", default=None, help="candidates whose 'impl mode label' contains one of these")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--chunks", type=int, default=16)
  parser.add_argument("--chunk-size", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--dk", type=int, default=256)
  parser.add_argument("--dv", type=int, default=2048, help="only shapes the Triton plan (its dv tiles)")
  parser.add_argument("--scale", type=float, default=1.0, help="attention scale (Megalodon's default: 1)")
  parser.add_argument("--hot-rows", type=int, default=0, help="query rows scaled by --hot-scale (bound fails)")
  parser.add_argument("--hot-scale", type=float, default=30.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tolerance", type=float, default=1e-2, help="largest row-relative P~ error (bf16)")
  parser.add_argument("--results-dir", default=None)
  parser.add_argument("--name", default="probe-mgpu-scores")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("probe_mgpu_scores needs a Hopper GPU (Mosaic GPU kernels have no CPU path).")

  try:
    rows = scores_rows(args)
  except Exception as err:  # noqa: BLE001 - e.g. out of memory building the inputs
    traceback.print_exc()
    rows = [{"impl": "probe", "error": _error(err)}]
  harness.write_results(args.name, rows, {"probe_scores_shape": [args.batch, args.chunks, args.chunk_size, args.heads,
                                                                 args.dk],
                                          "probe_scores_hot_rows": [args.hot_rows, args.hot_scale],
                                          "probe_scores_scale": args.scale},
                        results_dir=args.results_dir)


if __name__ == "__main__":
  main()
