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

and lists the kernels with the most time, and the source lines with the most kernel time (each
kernel's HLO instruction's metadata; set XLA_FLAGS=--xla_gpu_enable_command_buffer= so that
kernels inside CUDA graphs name their instruction too). busy = the sum of kernel durations per
step; span = the first kernel's start to the last kernel's end; span - busy = gaps the GPU sat idle.

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


# ----------------------------------------------------------------------------------------------
# Kernel time by source line: which line of our code (or optax's, flax's) each kernel came from.
# ----------------------------------------------------------------------------------------------

_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HLO_METADATA = re.compile(r"metadata=\{([^}]*)\}")
_HLO_FIELD = re.compile(r'(\w+)=(?:"([^"]*)"|(\d+))')
_HLO_SHAPE = re.compile(r"([a-z]+\d*\[[\d,]*\])")


def source_key(op_name: str, source_file: str, source_line: str) -> str:
  """'fwd|bwd file.py:line primitive' of one HLO instruction's metadata. XLA names backward ops
  after JAX's transpose of the forward (op_name contains 'transpose(')."""
  direction = "bwd" if "transpose(" in op_name else "fwd"
  primitive = op_name.rsplit("/", 1)[-1] if op_name else "?"
  where = f"{os.path.basename(source_file)}:{source_line}" if source_file else "?"
  return f"{direction} {where} {primitive}"


_OUR_CODE = ("megalodon_jax", "kernels_pallas", "experiments")


def _stack_tables(lines: list[str]) -> dict[int, tuple[str, int]]:
  """stack_frame_id -> (file, line) of the frame to report, from the module's FileNames /
  FunctionNames / FileLocations / StackFrames tables (how recent XLA stores source locations):
  the innermost frame in this repository's code, else the innermost frame."""
  tables: dict[str, dict[int, str]] = {}
  current = None
  for line in lines:
    stripped = line.strip()
    if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(stripped, {})
      continue
    if current is None:
      continue
    if not stripped or stripped.startswith("%") or stripped.startswith("ENTRY"):
      current = None
      continue
    key, _, value = stripped.partition(" ")
    if key.isdigit():
      current[int(key)] = value
  files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
  locations = {}
  for k, v in tables.get("FileLocations", {}).items():
    fields = dict(re.findall(r"(\w+)=(\d+)", v))
    locations[k] = (files.get(int(fields.get("file_name_id", 0)), "?"), int(fields.get("line", 0)))
  frames = {}
  for k, v in tables.get("StackFrames", {}).items():
    fields = dict(re.findall(r"(\w+)=(\d+)", v))
    frames[k] = (int(fields.get("file_location_id", 0)), int(fields.get("parent_frame_id", 0)))
  chosen = {}
  for frame in frames:
    chain, seen, node = [], set(), frame
    while node in frames and node not in seen:  # innermost first
      seen.add(node)
      location, parent = frames[node]
      if location in locations:
        chain.append(locations[location])
      node = parent
    ours = [c for c in chain if any(part in c[0] for part in _OUR_CODE)]
    if chain:
      chosen[frame] = (ours or chain)[0]
  return chosen


def hlo_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> source_key of its metadata, for every instruction that has one (a
  fusion carries its root's metadata). The compiled module's text: Compiled.as_text(). Source
  lines come from the metadata's source_file / source_line or, in recent XLA, its stack_frame_id."""
  lines = hlo_text.splitlines()
  frames = _stack_tables(lines)
  sources = {}
  for line in lines:
    match = _HLO_INSTRUCTION.match(line)
    if not match:
      continue
    meta = _HLO_METADATA.search(match.group(2))
    if not meta:
      continue
    fields = {k: a or b for k, a, b in _HLO_FIELD.findall(meta.group(1))}
    source_file, source_line = fields.get("source_file", ""), fields.get("source_line", "?")
    frame = fields.get("stack_frame_id")
    if not source_file and frame and int(frame) in frames:
      source_file, number = frames[int(frame)]
      source_line = str(number)
    if "op_name" in fields or source_file:
      key = source_key(fields.get("op_name", ""), source_file, source_line)
      if not source_file:  # ops XLA made itself (SPMD partitioner, buffers): their shape says more
        shape = _HLO_SHAPE.match(match.group(2))
        key = f"{key} {shape.group(1)}" if shape else key
      sources[match.group(1)] = key
  return sources


def kernel_instruction(kernel: dict[str, Any], sources: dict[str, str]) -> str | None:
  """The HLO instruction a traced kernel ran for: the trace's hlo_op, else the kernel's name with
  its last '_' turned into '.' (XLA names fusion kernels after their instruction)."""
  op = kernel.get("args", {}).get("hlo_op")
  if op in sources:
    return op
  name = kernel["name"]
  if name in sources:
    return name
  head, _, tail = name.rpartition("_")
  dotted = f"{head}.{tail}" if head and tail.isdigit() else None
  return dotted if dotted in sources else None


def by_source(kernels: list[dict[str, Any]], sources: dict[str, str], steps: int, top: int) -> list[dict[str, Any]]:
  """Kernel time per step grouped by source_key (kernels without metadata by their category),
  the `top` largest first."""
  totals: dict[str, list] = {}
  for k in kernels:
    op = kernel_instruction(k, sources)
    key = sources[op] if op else f"(no metadata) {category(k['name'])}"
    entry = totals.setdefault(key, [0, 0.0])
    entry[0] += 1
    entry[1] += k.get("dur", 0)
  ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
  return [{"source": key, "calls": c / steps, "ms": d / steps / 1e3} for key, (c, d) in ranked]


def source_excess(single: list[dict[str, Any]], parallel: list[dict[str, Any]], devices: int,
                  top: int) -> list[dict[str, Any]]:
  """Per source: parallel ms per step minus single ms / devices (what the parallel step spends
  beyond an even split of the single-device step), the largest first. Lists from by_source."""
  one = {r["source"]: r["ms"] for r in single}
  many = {r["source"]: r["ms"] for r in parallel}
  rows = [{"source": key, "single_ms": one.get(key, 0.0), "parallel_ms": many.get(key, 0.0),
           "excess_ms": many.get(key, 0.0) - one.get(key, 0.0) / devices} for key in set(one) | set(many)]
  return sorted(rows, key=lambda r: -r["excess_ms"])[:top]


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
  kernels = device_kernels(load_trace_events(args.trace_dir))
  out = summarize(kernels, args.trace_steps, args.top)
  if kernels:
    out["by_source"] = by_source(kernels, hlo_sources(compiled.as_text()), args.trace_steps, args.top)
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
  print("source lines (the HLO metadata's innermost frame in this repository; fwd / bwd):")
  for k in out.get("by_source", []):
    print(f"  {k['ms']:8.3f} ms  x{k['calls']:6.1f}  {k['source']}")
  print("copies (by HLO op):")
  for k in out.get("copies", []):
    print(f"  {k['ms']:8.3f} ms  x{k['calls']:6.1f}  {k['op']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
