"""Where does a batch-1 decode step spend its time? Kernels, gaps and host dispatch, per architecture.

bench_decode measured mega1.3B at batch 1 at 5.1 ms per token (the weights take about 0.6 ms to
read) and Llama-1.3B at 4.3 ms at 32K. For one size, batch and context (default 1.3B, 1, 32768;
Megalodon with its chunk buffer nearly full, the costlier fill; Llama with cuDNN decode attention)
this script reports per token:

  host_ms     one jitted call per token, queued by Python (bench_decode --loop host)
  device_ms   --inner tokens per call in one jitted lax.fori_loop (bench_decode --loop device)
  kernels     GPU kernels launched per token, from a jax.profiler trace of --trace_steps host
              steps (Perfetto JSON), with busy_ms (sum of kernel durations) and span_ms (first
              kernel start to last kernel end, over the steps); span - busy = the gaps between
              kernels, busy = what fusing cannot remove.
  top         the kernels with the most time per token.

  python experiments/gpu_checks/check_decode_overhead.py --json out.json --trace_dir /tmp/trace
  python experiments/gpu_checks/check_decode_overhead.py --smoke      # tiny models, CPU (no kernels)
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="1.3B")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--context", type=int, default=32768)
  parser.add_argument("--inner", type=int, default=16)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--trace_steps", type=int, default=4)
  parser.add_argument("--trace_dir", default="/tmp/decode_trace")
  parser.add_argument("--json", default=None)
  parser.add_argument("--archs", default="megalodon,llama")
  parser.add_argument("--attention_impl", default="auto", help="Megalodon's attention_impl (auto, xla, pallas)")
  parser.add_argument("--top", type=int, default=12, help="kernels listed per row (by time per token)")
  parser.add_argument("--hlo_dir", default=None, help="write each traced step's optimized HLO here")
  parser.add_argument("--mega-decode", default="default",
                      help="comma-separated Megalodon decode impls (bench_decode.MEGA_DECODE_IMPLS; default: "
                           "decoding.generate's for the batch on this backend), one row each")
  parser.add_argument("--loops", default="host,device",
                      help="which of host,device to time; each row is also traced once (host-loop steps) unless "
                           "--trace_steps 0")
  parser.add_argument("--smoke", action="store_true")
  return parser.parse_args(argv)


def summarize_trace(trace_dir: str, steps: int, top: int = 12) -> dict[str, Any]:
  """Kernel events of the newest Perfetto trace under trace_dir, per decode step."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    return {"error": f"no perfetto_trace.json.gz under {trace_dir}"}
  with gzip.open(paths[-1], "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  processes, threads = {}, {}
  for ev in events:
    if ev.get("ph") == "M" and ev.get("name") == "process_name":
      processes[ev["pid"]] = ev["args"]["name"]
    elif ev.get("ph") == "M" and ev.get("name") == "thread_name":
      threads[(ev["pid"], ev["tid"])] = ev["args"]["name"]
  per_thread = collections.Counter()
  kernels = []
  for ev in events:
    if ev.get("ph") != "X":
      continue
    pname = processes.get(ev.get("pid"), "")
    tname = threads.get((ev.get("pid"), ev.get("tid")), "")
    if "GPU" not in pname and "gpu" not in pname:
      continue
    per_thread[tname] += 1
    if "Stream" in tname:
      kernels.append(ev)
  out: dict[str, Any] = {"trace_file": paths[-1], "gpu_threads": dict(per_thread)}
  if not kernels:
    return out
  start = min(k["ts"] for k in kernels)
  end = max(k["ts"] + k.get("dur", 0) for k in kernels)
  busy = sum(k.get("dur", 0) for k in kernels)
  from experiments.gpu_checks import profile_train_step as trace_tools
  ranked = sorted(trace_tools.totals_by_name(kernels).items(), key=lambda kv: -kv[1][1])[:top]
  out.update(kernels_per_step=len(kernels) / steps, busy_ms_per_step=busy / steps / 1e3,
             span_ms_per_step=(end - start) / steps / 1e3,
             top=[{"name": n[:120], "per_step": c / steps, "us_per_step": d / steps} for n, (c, d) in ranked])
  return out


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from experiments.benchmarks import bench_decode

  common = ["--sizes", "tiny" if args.smoke else args.size, "--batches", str(args.batch),
            "--contexts", str(args.context), "--iters", str(args.iters), "--inner", str(args.inner),
            "--warmup", str(args.inner), "--attention-impl", args.attention_impl] + (["--smoke"] if args.smoke else [])
  results: dict[str, Any] = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}

  def save():
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=1)

  resolve = lambda impl: bench_decode.default_mega_impl(args.batch) if impl == "default" else impl
  variants = [(arch, impl) for arch in args.archs.split(",")
              for impl in ([resolve(i) for i in args.mega_decode.split(",")] if arch == "megalodon" else ["model"])]
  for arch, impl in variants:
    row: dict[str, Any] = {"arch": arch if impl == "model" else f"{arch}:{impl}"}
    for loop in args.loops.split(","):
      bargs = bench_decode.parse_args(common + ["--loop", loop, "--archs", arch, "--mega-decode", impl])
      if arch == "llama" and not args.smoke:
        bargs.llama_decode_attention = ["cudnn"]
      size = bargs.sizes[0]
      mega_preset, llama_preset = bargs.size_table[size]
      params: dict[str, Any] = {}
      if arch == "megalodon":
        (r,) = bench_decode.megalodon_rows(size, mega_preset, args.batch, [args.context], bargs, params)
      else:
        r = bench_decode.llama_row(size, llama_preset, args.batch, args.context, bargs, params,
                                   bargs.llama_decode_attention)
      row[f"{loop}_ms"] = r.get("ms_per_step")
      row[f"{loop}_error"] = r.get("error")
      if "trace" not in row and "error" not in r and args.trace_steps > 0:  # once per row, whichever loop
        row.update(trace=_trace_host_steps(arch, bargs, params, size, mega_preset, llama_preset, args, impl))
      params.clear()
      jax.clear_caches()
      print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    results["rows"].append(row)
    save()
  for row in results["rows"]:
    t = row.get("trace", {})
    print(f"\n{row['arch']}: host {row.get('host_ms')} ms/token, device loop {row.get('device_ms')} ms/token; "
          f"kernels/token {t.get('kernels_per_step')}, busy {t.get('busy_ms_per_step')} ms, "
          f"span {t.get('span_ms_per_step')} ms")
    for k in t.get("top", []):
      print(f"  {k['us_per_step']:9.1f} us  x{k['per_step']:6.1f}  {k['name']}")
  llama = [r for r in results["rows"] if r["arch"] == "llama"]
  for row in results["rows"]:
    for loop in args.loops.split(","):
      mine, base = row.get(f"{loop}_ms"), llama[0].get(f"{loop}_ms") if llama else None
      if row["arch"].startswith("megalodon") and mine and base:
        row[f"{loop}_tokens_per_s_over_llama"] = base / mine
        print(f"{row['arch']} {loop} loop: {mine:.3f} ms/token, {1e3 / mine:.0f} tok/s = "
              f"{base / mine:.2f}x Llama ({base:.3f} ms/token)")
  save()


def _trace_host_steps(arch, bargs, params, size, mega_preset, llama_preset, args, impl="model") -> dict[str, Any]:
  """Traces args.trace_steps host-loop steps of the row's compiled step (rebuilt here)."""
  import jax
  from experiments.benchmarks import bench_decode
  try:
    if arch == "megalodon":
      cfg = bench_decode.megalodon_config(mega_preset, bargs)
      apply, prepare, prepare_cache = bench_decode.megalodon_apply(cfg, impl)
      step = bench_decode.greedy_step(apply)
      count = max(cfg.chunk_size - 2 * args.trace_steps - 2, 0)
      state = (prepare_cache(bench_decode.megalodon_cache(cfg, args.batch, args.context, count)),
               bench_decode.first_tokens(args.batch))
    else:
      from experiments.baselines import llama as llama_lib
      cfg = bench_decode.llama_config(llama_preset, bargs, bargs.llama_decode_attention[0])
      model = llama_lib.Llama(cfg)
      step = bench_decode.greedy_step(lambda p, cache, tokens: model.apply({"params": p}, tokens, cache))
      state = (bench_decode.llama_cache(cfg, args.batch, args.context, 2 * args.trace_steps + 2),
               bench_decode.first_tokens(args.batch))
    p = params[mega_preset if arch == "megalodon" else llama_preset]
    if arch == "megalodon":
      p = prepare(p)
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
      with open(os.path.join(args.hlo_dir, f"{arch}_{impl}_decode_step.hlo.txt"), "w") as f:
        f.write(step.lower(state, p).compile().as_text())
    for _ in range(args.trace_steps):
      state, logits = step(state, p)
    jax.block_until_ready((state, logits))
    trace_dir = os.path.join(args.trace_dir, f"{arch}_{impl}")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.trace_steps):
        state, logits = step(state, p)
      jax.block_until_ready((state, logits))
    out = summarize_trace(trace_dir, args.trace_steps, args.top)
    out["traced_wall_ms_per_step"] = (time.perf_counter() - start) * 1e3 / args.trace_steps
    return out
  except Exception as err:  # noqa: BLE001 - a diagnostic: report and go on
    return {"error": f"{type(err).__name__}: {err}"[:500]}


if __name__ == "__main__":
  main()
