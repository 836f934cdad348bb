"""How fast is the Mosaic GPU scores kernel, under each of its schedules, against the Triton one it replaces?

The forward of chunked attention starts with the scores kernel: P~ = exp2(S - m) tiles, 1 / l and
lse from q and k (`chunk_attention._tr_scores`, fwd_scores='bounded' by default). On an H200 at the
benchmark shape (B=1, 16 chunks of 2048, 4 heads, dk 256, bf16) the Triton kernel takes 0.32-0.47 ms
for ~0.08 TFLOP of Q K^T and 256 MiB of P~ stores. This probe times it against
`kernels_pallas.scores_mgpu.chunk_scores_mgpu` (TMA + wgmma, warp-specialised) in the same run, both
including the XLA pass that computes the bound ('bounded'), and in 'twopass' (no bound) too.

The default candidates A/B the consumers' schedules: 'serial' (each tile's wgmma waited for before
its exp2 / P~ store: the kernel's default) against 'overlap' (overlap=True: the next tile's wgmma
issued first, FlashAttention-3's intra-warpgroup overlap) at several ring depths, and one or two P~
staging buffers per consumer ('p2': p_buffers=2). --set all adds the earlier candidates (ping-pong
consumers, exact math). --set fix A/Bs the bound decision made warp-uniform for ptxas
(uniform_decision=True, the kernel's default) against the old lowering ('old' rows), in which ptxas
serialised every wgmma of the bounded kernel (C7520).

q, k ~ N(0, 1) * dk^-1/4 (bf16). --hot-rows takes one or more counts (default 0 16): for each, that
many query rows (fixed seed) are scaled by --hot-scale, so that with N > 0 the bound fails for their
query blocks and the kernels take the second pass there (the failed branch checked on the GPU). Every
candidate is compiled once and run on each input set.

Each row: one candidate on one input set. Errors against the Triton kernel of the same mode on the
same inputs: P~ over the visited tiles relative to each row's largest entry, rscale and lse relative
to their largest magnitude. Timing: --rounds rounds, each timing every candidate once (median ms
over --iters samples, each the mean of --inner calls, after warm-up), interleaved so that clock
drift under sustained load hits all alike; ms is the median of the rounds' medians. qk_tflops
counts Q K^T once per visited tile (2 * B H n * nbq (nbq + 1) / 2 * 128^2 * dk); first_call_s is
the first call's wall time (mostly compilation). A configuration that fails (shared memory,
compilation, wrong results) is an error row, not the end of the probe. Past --compile-budget-s
(default 80 s from the start) no further Mosaic GPU candidate is compiled (its rows say skipped),
so that one device call stays short; the candidates come in order of interest.

--ptxas [PART ...] (candidates whose label contains a part; all Mosaic GPU ones without parts) sets
MOSAIC_GPU_DUMP_PTXAS=1 and captures what the compilation prints around the candidate's first call:
registers, spills, and ptxas's "wgmma ... serialized" warnings (the overlap is lost if ptxas
serialises the wgmma) land in the row (and the log). It compiles the kernel a second time for the
dump, so ask for it on a few candidates.

  python experiments/gpu_checks/probe_mgpu_scores.py --results-dir "$OUT" --ptxas "st 6"
  python experiments/gpu_checks/probe_mgpu_scores.py --only "bounded serial st 6" "bounded overlap" --hot-rows 0
  python experiments/gpu_checks/probe_mgpu_scores.py --results-dir "$OUT" --set fix --ptxas
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import harness
from kernels_pallas import chunk_attention as ca
from kernels_pallas import scores_mgpu as sm

# (impl, mode, label, keyword arguments of chunk_scores_mgpu). Shared memory at dk 256:
# sm.smem_bytes(256, stages) = 104 KiB + 16 KiB per stage (4: 168, 5: 184, 6: 200, 7: 216 KiB); a
# second staging buffer per consumer ('p2') 32 KiB more (4: 200, 5: 216 KiB; 6 does not fit).
# In order of interest: past --compile-budget-s the rest are skipped.
CANDIDATES = (
    ("triton", "bounded", "op default", {}),
    ("mgpu", "bounded", "serial st 6", dict(stages=6)),
    ("mgpu", "bounded", "overlap st 6", dict(stages=6, overlap=True)),
    ("mgpu", "bounded", "overlap st 5", dict(stages=5, overlap=True)),
    ("mgpu", "bounded", "overlap st 7", dict(stages=7, overlap=True)),
    ("mgpu", "bounded", "overlap st 4", dict(stages=4, overlap=True)),
    ("mgpu", "bounded", "serial st 4", dict(stages=4)),
    ("mgpu", "bounded", "overlap st 5 p2", dict(stages=5, overlap=True, p_buffers=2)),
    ("mgpu", "bounded", "overlap st 4 p2", dict(stages=4, overlap=True, p_buffers=2)),
    ("mgpu", "bounded", "serial st 5 p2", dict(stages=5, p_buffers=2)),
    ("triton", "twopass", "op default", {}),
    ("mgpu", "twopass", "serial st 6", dict(stages=6)),
    ("mgpu", "twopass", "overlap st 6", dict(stages=6, overlap=True)),
)
# --set fix: the bound decision made warp-uniform for ptxas (uniform_decision, the default since 2026-12)
# against the old lowering ('old': uniform_decision=False, where ptxas serialised every wgmma of the
# bounded kernel, warning C7520), serial first (the op's default), then the overlapped schedule.
FIX = (
    ("triton", "bounded", "op default", {}),
    ("mgpu", "bounded", "serial st 6 old", dict(stages=6, uniform_decision=False)),
    ("mgpu", "bounded", "serial st 6 uni", dict(stages=6)),
    ("mgpu", "bounded", "serial st 4 old", dict(stages=4, uniform_decision=False)),
    ("mgpu", "bounded", "serial st 4 uni", dict(stages=4)),
    ("mgpu", "bounded", "serial st 5 uni", dict(stages=5)),
    ("mgpu", "bounded", "overlap st 6 uni", dict(stages=6, overlap=True)),
    ("mgpu", "bounded", "overlap st 5 uni", dict(stages=5, overlap=True)),
)
# Measured on 2026-11-30 (gpu_checks/2026-11-30_nvidia-h200_probe-mgpu-scores.json); --set all.
EARLIER = (
    ("mgpu", "bounded", "serial st 7", dict(stages=7)),
    ("mgpu", "bounded", "pingpong st 6", dict(stages=6, pingpong=True)),
    ("mgpu", "bounded", "pingpong st 4", dict(stages=4, pingpong=True)),
    ("mgpu", "bounded", "serial st 6 exact math", dict(stages=6, approx_math=False)),
    ("mgpu", "twopass", "pingpong st 6", dict(stages=6, pingpong=True)),
)
_PTXAS_LINE = re.compile(r"registers|spill|serializ|Performance Loss|warning|error|fail", re.IGNORECASE)


def _error(err: BaseException) -> str:
  lines = str(err).splitlines() or [""]
  return f"{type(err).__name__}: {lines[0][:300]}"


def _print_row(row: dict) -> None:
  print({key: (float(f"{val:.4g}") if isinstance(val, float) else val) for key, val in row.items()}, flush=True)


@contextlib.contextmanager
def _captured_output(sink: list):
  """Appends to `sink` what this process (C++ and subprocesses included) writes to fds 1 and 2 meanwhile."""
  libc = ctypes.CDLL(None)
  sys.stdout.flush()
  sys.stderr.flush()
  libc.fflush(None)
  saved = os.dup(1), os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 1)
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      libc.fflush(None)
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      for fd in saved:
        os.close(fd)
      capture.seek(0)
      sink.append(capture.read().decode(errors="replace"))


def _ptxas_summary(text: str) -> dict:
  """ptxas -v's registers and spills, and its warnings (e.g. wgmma serialised), from captured output."""
  lines = [line.strip()[:300] for line in text.splitlines() if _PTXAS_LINE.search(line)]
  registers = [int(n) for n in re.findall(r"Used (\d+) registers", text)]
  spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
  return {"ptxas_registers": max(registers) if registers else None,
          "ptxas_spill_bytes": max(spills) if spills else None,
          "wgmma_serialized": bool(re.search(r"wgmma.*serializ", text, re.IGNORECASE)),
          "ptxas_lines": lines[:12]}


def _inputs(args, hot_rows: int):
  batch, length, heads, dk = args.batch, args.chunks * args.chunk_size, args.heads, args.dk
  keys = jax.random.split(jax.random.key(args.seed), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, dk)) * dk ** -0.25
  k = jax.random.normal(keys[1], (batch, length, heads, dk)) * dk ** -0.25
  if hot_rows:
    flat = jax.random.choice(keys[2], batch * length * heads, (hot_rows,), replace=False)
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


def scores_rows(args, start: float) -> list[dict]:
  batch, n_chunks, chunk, heads, dk, dv = args.batch, args.chunks, args.chunk_size, args.heads, args.dk, args.dv
  dtype = jnp.bfloat16
  inputs = {hot: _inputs(args, hot) for hot in args.hot_rows}
  nbq = chunk // sm.BLOCK
  flops = 2.0 * batch * heads * n_chunks * nbq * (nbq + 1) / 2 * sm.BLOCK ** 2 * dk
  shape = f"B{batch} n{n_chunks}x{chunk} H{heads} dk{dk}"
  errors = _errors_fn(chunk, sm.BLOCK)
  plans = {mode: ca._triton_plan(ca.KernelConfig(fwd_scores=mode), False, args.scale, batch, heads, n_chunks, chunk,
                                 chunk, dk, dv, dtype) for mode in ("bounded", "twopass")}
  scale2 = args.scale * ca._LOG2E
  candidates = {"ab": CANDIDATES, "all": CANDIDATES + EARLIER, "fix": FIX}[args.set]
  chosen = [c for c in candidates if not args.only or any(part in f"{c[0]} {c[1]} {c[2]}" for part in args.only)]
  # The Triton kernel of each mode chosen, first: its outputs are what the others are checked against.
  candidates = [c for c in candidates if c in chosen or (c[0] == "triton" and c[1] in {d[1] for d in chosen})]
  candidates.sort(key=lambda c: (c[1] != "bounded", c[0] != "triton"))
  timed, rows, triton_out = [], [], {}
  for impl, mode, label, kwargs in candidates:
    plan = plans[mode]
    base = {"shape": shape, "impl": impl, "mode": mode, "config": label}
    if impl == "triton":
      base["tiles"] = [plan.geom.bq, plan.geom.bk]
      fn = jax.jit(lambda q, k, plan=plan: ca._tr_scores(plan, q, k, dtype, None))
    else:
      base["smem_kib"] = round(sm.smem_bytes(dk, kwargs.get("stages", 6), p_buffers=kwargs.get("p_buffers", 1))
                               / 1024, 1)

      def fn(q, k, plan=plan, mode=mode, kwargs=kwargs):
        bound = ca._score_bound(q, k, plan.geom, scale2) if mode == "bounded" else None
        return sm.chunk_scores_mgpu(q, k, bound, chunk=chunk, scale=args.scale, **kwargs)

      fn = jax.jit(fn)
    dump = impl == "mgpu" and args.ptxas is not None and (not args.ptxas or any(p in label for p in args.ptxas))
    first = True  # the first call compiles (the Mosaic GPU kernel at its first run)
    skip = None
    if impl != "triton" and time.perf_counter() - start > args.compile_budget_s:  # Triton's: the references
      skip = f"skipped: the probe ran past --compile-budget-s {args.compile_budget_s:g} before its first call"
    for hot in args.hot_rows:
      row = {**base, "hot_rows": hot}
      if skip:  # over the budget, or the candidate failed on the first input set
        row["error"] = skip
        rows.append(row)
        _print_row(row)
        continue
      try:
        q, k = inputs[hot]
        start = time.perf_counter()
        if dump and first:
          captured = []
          os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
          try:
            with _captured_output(captured):
              out = jax.block_until_ready(fn(q, k))
          finally:
            del os.environ["MOSAIC_GPU_DUMP_PTXAS"]
            print(f"--- compilation output of {mode} {label}:\n{captured[0][-6000:]}\n---", flush=True)
          base.update(_ptxas_summary(captured[0]))  # the same kernel for the later input sets
          row.update(_ptxas_summary(captured[0]))
        else:
          out = jax.block_until_ready(fn(q, k))
        if first:
          row["first_call_s"] = time.perf_counter() - start
          first = False
        if impl == "triton":
          triton_out.setdefault((mode, hot), out)
        if (mode, hot) in triton_out:
          p_err, rs_err, lse_err, finite = (float(x) for x in errors(out, triton_out[(mode, hot)]))
          row.update(p_rel_err=p_err if finite else float("nan"), rscale_rel_err=rs_err, lse_rel_err=lse_err)
          row["ok"] = bool(p_err < args.tolerance and rs_err < 1e-4 and lse_err < 1e-4 and finite)
        del out
        timed.append((row, fn, q, k))
      except Exception as err:  # noqa: BLE001 - one failing configuration must not end the probe
        row["error"] = skip = _error(err)
        traceback.print_exc()
        _print_row(row)
      rows.append(row)
  triton_out.clear()

  if any(c[1] == "bounded" for c in candidates):  # the XLA pass both 'bounded' rows include
    fn = jax.jit(lambda q, k: ca._score_bound(q, k, plans["bounded"].geom, scale2))
    for hot in args.hot_rows[:1]:
      row = {"shape": shape, "hot_rows": hot, "impl": "xla", "mode": "bounded", "config": "bound alone"}
      timed.append((row, fn, *inputs[hot]))
      rows.append(row)

  for _ in range(args.rounds):  # interleaved: each round times every candidate once
    for row, fn, q, k in timed:
      if "error" in row:
        continue
      try:
        row.setdefault("rounds_ms", []).append(
            harness.time_fn(fn, q, k, warmup=args.warmup, iters=args.iters, inner=args.inner)["median_ms"])
      except Exception as err:  # noqa: BLE001
        row["error"] = _error(err)
        traceback.print_exc()
  for row, *_ in timed:
    if row.get("rounds_ms"):
      row["ms"] = float(np.median(row["rounds_ms"]))
      if row["impl"] != "xla":
        row["qk_tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    _print_row(row)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--inner", type=int, default=5, help="calls per timing sample")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds over all candidates")
  parser.add_argument("--compile-budget-s", type=float, default=80.0,
                      help="start no Mosaic GPU candidate's first call (compiling it) after this many seconds")
  parser.add_argument("--set", choices=("ab", "all", "fix"), default="ab",
                      help="ab: the serial / overlap candidates; all: also the earlier ones (ping-pong, exact math); "
                           "fix: the warp-uniform bound decision against the old lowering (uniform_decision=False)")
  parser.add_argument("--only", nargs="*", default=None,
                      help="candidates whose 'impl mode label' contains one of these (and Triton's of their modes)")
  parser.add_argument("--ptxas", nargs="*", default=None,
                      help="capture ptxas -v for Mosaic GPU candidates whose label contains one of these (all if none)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--chunks", type=int, default=16)
  parser.add_argument("--chunk-size", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--dk", type=int, default=256)
  parser.add_argument("--dv", type=int, default=2048, help="only shapes the Triton plan (its dv tiles)")
  parser.add_argument("--scale", type=float, default=1.0, help="attention scale (Megalodon's default: 1)")
  parser.add_argument("--hot-rows", type=int, nargs="+", default=[0, 16],
                      help="input sets: query rows scaled by --hot-scale in each (N > 0: those blocks' bounds fail)")
  parser.add_argument("--hot-scale", type=float, default=30.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tolerance", type=float, default=1e-2, help="largest row-relative P~ error (bf16)")
  parser.add_argument("--results-dir", default=None)
  parser.add_argument("--name", default="probe-mgpu-scores")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("probe_mgpu_scores needs a Hopper GPU (Mosaic GPU kernels have no CPU path).")

  start = time.perf_counter()
  try:
    rows = scores_rows(args, start)
  except Exception as err:  # noqa: BLE001 - e.g. out of memory building the inputs
    traceback.print_exc()
    rows = [{"impl": "probe", "error": _error(err)}]
  harness.write_results(args.name, rows, {"probe_scores_shape": [args.batch, args.chunks, args.chunk_size, args.heads,
                                                                 args.dk],
                                          "probe_scores_hot_rows": [args.hot_rows, args.hot_scale],
                                          "probe_scores_scale": args.scale,
                                          "probe_scores_timing": [args.rounds, args.iters, args.inner, args.warmup],
                                          "probe_scores_wall_s": time.perf_counter() - start},
                        results_dir=args.results_dir)


if __name__ == "__main__":
  main()
