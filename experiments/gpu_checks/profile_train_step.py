"""Where does a train step spend its GPU time? Kernel time per category, from a profiler trace.

Builds the same step as bench_train (forward, cross-entropy, backward, AdamW; one model size,
shape and remat policy), compiles it, runs a few warm-up steps, traces --trace_steps steps with
jax.profiler and sums the kernels' durations per category per step:

  gemm        cuBLAS / cuDNN / XLA-Triton matrix multiplies
  cema        the Pallas CEMA kernels (names start with cema_)
  tsn         the Pallas TimestepNorm kernels
  attention   the Pallas chunked-attention kernels
  fusion      XLA's own elementwise / reduction / copy fusions (norms, gates, optimizer, loss)
  collective  NCCL's kernels (all-reduce, all-gather, reduce-scatter, permutes)
  other       everything else (memcpy, memset)

and lists the kernels with the most time. busy = the sum of kernel durations per step; span = the
first kernel's start to the last kernel's end; span - busy = gaps the GPU sat idle.

  python experiments/gpu_checks/profile_train_step.py --size 1.3B --shape 8x4096 \\
      --remat save_dots_norms_cema_attention --json /tmp/profile.json
  python experiments/gpu_checks/profile_train_step.py --smoke          # tiny model on the CPU
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time
from typing import Any

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

# First match wins; the Pallas kernels carry the names given to pallas_call.
CATEGORIES = (
    # NCCL's kernels first: "fusion" below would claim all_reduce / reduce_scatter by their names.
    ("collective", re.compile(r"nccl|all_reduce|all-reduce|allreduce|all_gather|all-gather|reduce_scatter|"
                              r"reduce-scatter|collective_permute|collective-permute", re.I)),
    ("cema", re.compile(r"cema", re.I)),
    ("tsn", re.compile(r"timestep|tsn", re.I)),
    ("attention", re.compile(r"chunk_attention|attention", re.I)),
    ("gemm", re.compile(r"gemm|cublas|cudnn|xmma|nvjet|cutlass|sm90|wgmma|matmul|dot", re.I)),
    ("fusion", re.compile(r"fusion|reduce|transpose|copy|concatenate|slice|scatter|gather|convert|"
                          r"select|broadcast|add|multiply|loop_|input_", re.I)),
)


def category(name: str) -> str:
  for label, pattern in CATEGORIES:
    if pattern.search(name):
      return label
  return "other"


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--size", default="1.3B", help="200M or 1.3B (bench_train's size table)")
  parser.add_argument("--shape", default="8x4096", help="BATCHxLENGTH")
  parser.add_argument("--arch", default="megalodon", choices=["megalodon", "llama"])
  parser.add_argument("--remat", default="save_dots_norms_cema_attention")
  parser.add_argument("--scan-layers", dest="scan_layers", default="true", choices=["true", "false"])
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--trace_steps", type=int, default=2)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--trace_dir", default="/tmp/train_trace")
  parser.add_argument("--json", default=None)
  parser.add_argument("--hlo", default=None, help="write the compiled step's HLO text (gzip) here")
  parser.add_argument("--smoke", action="store_true", help="tiny model and shape on the CPU")
  return parser.parse_args(argv)


def load_trace_events(trace_dir: str) -> list[dict[str, Any]]:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1], "rt") as f:
    events = json.load(f)
  return events["traceEvents"] if isinstance(events, dict) else events


def device_kernels(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Complete events on the GPU's stream threads (kernels, memcpys), as {name, ts, dur} in us."""
  processes, threads = {}, {}
  for ev in events:
    if ev.get("ph") == "M" and ev.get("name") == "process_name":
      processes[ev["pid"]] = ev["args"]["name"]
    elif ev.get("ph") == "M" and ev.get("name") == "thread_name":
      threads[(ev["pid"], ev["tid"])] = ev["args"]["name"]
  out = []
  for ev in events:
    if ev.get("ph") != "X":
      continue
    if "gpu" not in processes.get(ev.get("pid"), "").lower():
      continue
    if "Stream" not in threads.get((ev.get("pid"), ev.get("tid")), ""):
      continue
    out.append({"name": ev["name"], "ts": ev["ts"], "dur": ev.get("dur", 0), "args": ev.get("args", {}),
                "pid": ev.get("pid")})
  return out


def totals_by_name(kernels: list[dict[str, Any]]) -> dict[str, list]:
  """Kernel name -> [launches, total duration in microseconds], in the order the names first ran."""
  totals: dict[str, list] = {}
  for k in sorted(kernels, key=lambda k: k.get("ts", 0)):
    entry = totals.setdefault(k["name"], [0, 0.0])
    entry[0] += 1
    entry[1] += k.get("dur", 0)
  return totals


def summarize(kernels: list[dict[str, Any]], steps: int, top: int) -> dict[str, Any]:
  """Per-step kernel time by category and by name (milliseconds)."""
  if not kernels:
    return {"error": "the trace has no GPU kernels (CPU run?)"}
  start = min(k["ts"] for k in kernels)
  end = max(k["ts"] + k["dur"] for k in kernels)
  busy = sum(k["dur"] for k in kernels)
  by_cat = collections.Counter()
  for k in kernels:
    by_cat[category(k["name"])] += k["dur"]
  ranked = sorted(totals_by_name(kernels).items(), key=lambda kv: -kv[1][1])[:top]
  # Copies have no telling kernel name; the HLO op behind each (when the trace says) does.
  copies = collections.defaultdict(lambda: [0, 0.0])
  for k in kernels:
    if "memcpy" in k["name"].lower() or "memset" in k["name"].lower():
      op = str(k["args"].get("hlo_op") or k["args"].get("long_name") or k["args"])[:160]
      copies[op][0] += 1
      copies[op][1] += k["dur"]
  return {
      "copies": [{"op": op, "calls": c / steps, "ms": d / steps / 1e3}
                 for op, (c, d) in sorted(copies.items(), key=lambda kv: -kv[1][1])[:top]],
      "kernels_per_step": len(kernels) / steps,
      "busy_ms": busy / steps / 1e3,
      "span_ms": (end - start) / steps / 1e3,
      "by_category_ms": {c: d / steps / 1e3 for c, d in by_cat.most_common()},
      "top": [{"name": n[:160], "category": category(n), "calls": c / steps, "ms": d / steps / 1e3}
              for n, (c, d) in ranked],
  }


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from experiments.benchmarks import bench_train, harness

  shape = "2x16" if args.smoke else args.shape
  bargs = bench_train.parse_args(["--sizes", "tiny" if args.smoke else args.size, "--shapes", shape,
                                  "--archs", args.arch, "--remat", args.remat,
                                  "--scan-layers", args.scan_layers] + (["--smoke"] if args.smoke else []))
  (spec,) = bench_train.row_specs(bargs)
  model = bench_train.build_model(spec, bargs)
  optimizer = harness.adamw(bargs.learning_rate)
  step = harness.make_train_step(model.apply, optimizer)
  params = jax.jit(model.init)(jax.random.key(0))
  opt_state = jax.jit(optimizer.init)(params)
  batch = bench_train.make_batch(spec, model.vocab_size)
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, batch).compile()
  print(f"compiled {spec.size} {spec.arch} {spec.batch}x{spec.length} remat={spec.remat} "
        f"in {time.perf_counter() - t0:.1f} s", flush=True)
  if args.hlo:
    with gzip.open(args.hlo, "wt") as f:
      f.write(compiled.as_text())
  state = (params, opt_state)
  for _ in range(args.warmup):
    *state, metrics = compiled(*state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
    for _ in range(args.trace_steps):
      *state, metrics = compiled(*state, batch)
    jax.block_until_ready(metrics)
  wall_ms = (time.perf_counter() - t0) * 1e3 / args.trace_steps
  out = summarize(device_kernels(load_trace_events(args.trace_dir)), args.trace_steps, args.top)
  out.update(size=spec.size, arch=spec.arch, shape=shape, remat=spec.remat, scan_layers=args.scan_layers, traced_wall_ms=wall_ms,
             tokens_per_s_traced=spec.batch * spec.length / wall_ms * 1e3, device=jax.devices()[0].device_kind,
             jax=jax.__version__, commit=os.environ.get("GIT_COMMIT", ""))
  print(f"\n{out['size']} {out['arch']} {out['shape']} remat={out['remat']}: wall {wall_ms:.1f} ms/step "
        f"(traced), busy {out.get('busy_ms', 0):.1f} ms, span {out.get('span_ms', 0):.1f} ms, "
        f"{out.get('kernels_per_step', 0):.0f} kernels/step")
  if "error" in out:
    print(f"  {out['error']}")
  for cat, ms in out.get("by_category_ms", {}).items():
    print(f"  {cat:10s} {ms:8.2f} ms  {100 * ms / out['busy_ms']:5.1f}%")
  print("top kernels:")
  for k in out.get("top", []):
    print(f"  {k['ms']:8.3f} ms  x{k['calls']:6.1f}  [{k['category']}] {k['name']}")
  print("copies (by HLO op):")
  for k in out.get("copies", []):
    print(f"  {k['ms']:8.3f} ms  x{k['calls']:6.1f}  {k['op']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
