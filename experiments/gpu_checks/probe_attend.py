"""Which configuration of decode_step.attend_step reads the cache fastest? Kernel times from a trace.

A batch-1 decode step of mega1.3B at 32K runs attend_step (one new token's attention over the
current chunk: values [1, 2048, 2, 2048] bf16 = 16.8 MB and keys [1, 2048, 2, 256] bf16 = 2 MB per
layer) 24 times per token. This probe times, per kernel from a jax.profiler trace, attend_step in
several configurations plus attend_combine, at the full fill (count = 2047 - 16) and at half fill
(count = 1024), against two floors in the same run:

  xla_read   sums of the values and keys over the positions (every byte read once, XLA reductions)
  xla_ref    attend_step_reference under XLA (scores, softmax, probabilities times the values)

Variant specs (attend_step arguments): BKxBDxSD[:wW][:tT][:sS][:p] = block_k BK, block_d BD,
sub_d SD, num_warps W (default 4), tiles T (default 1: one tile per program; > 1: a loop with an
online softmax), num_stages S (default 1), p = preload (every load issued first / the next tile
prefetched), m = mma (both products on the tensor cores), noqk = DIAGNOSTIC ONLY (wrong results, flagged BAD): q and k are the raw z halves
(no RMS norm, affine maps or RoPE), to see what the per-program q/k arithmetic costs. 'default' is
attend_step with no arguments.

Each variant is one jit of (attention output, keys, values) with keys and values donated (the
in-place update, as in the decode loop; a missing alias would show as a 16.8 MB copy kernel). The
output of its first call is checked against attend_step_reference (float32, matmul precision
'highest'). Table columns: us per call with every kernel of the call (attend_step + combine),
attend_step kernel alone, TB/s of the kernel alone on the bytes it must read ((count + 1) rows
of keys and values), kernels per call, max abs error.

  python experiments/gpu_checks/probe_attend.py --json "$OUT/attend.json"
  python experiments/gpu_checks/probe_attend.py --smoke      # tiny shapes, interpret mode, CPU
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

F32 = jnp.float32
EPS = 1e-5
# (batch, chunk, heads, dz, dv, projection columns): mega1.3B; smoke: tiny.
SHAPES = {"mega1.3B": (1, 2048, 2, 256, 2048, 6656), "smoke": (1, 64, 2, 16, 64, 96)}
# In priority order (variants past --budget-s are skipped).
VARIANTS = ("xla_read,default,16x1024x1024:m,16x512x512:m,32x1024x1024:m,32x512x512:m,16x2048x2048:w8:m,"
            "16x1024x1024:w8:m,16x256x256:m,16x1024x1024:t2:m,16x512x512:t4:m:p,32x1024x1024:w8:m,32x1024x128:w4,32x1024x128:w4:p,16x1024x128:w4:p,16x1024x1024:w4:p,"
            "16x1024x256:w4:p,32x1024x256:w4:p,16x256x256:w1:p,8x256x256:w1:p,16x128x128:w1:p,16x256x128:w1:p,"
            "8x512x128:w1:p,16x512x128:w1,16x512x256:w2:p,8x1024x1024:w4:p,16x512x512:w4:p,16x512x512:t4:w4:p,"
            "8x1024x1024:t4:w4:p,16x256x256:t4:w1:p,16x512x512:t4:w4:s3,default:noqk,16x1024x1024:m:noqk,"
            "16x1024x128:w4:p:noqk,xla_ref,32x1024x1024:w4,32x1024x256:w8:p,16x2048x2048:w8:p")
SMOKE_VARIANTS = "xla_read,xla_ref,8x32x16:w4,8x32x16:w4:p,8x64x64:w8:p,4x32x32:t4:s2,4x32x32:t4:p,8x32x16:w4:p:noqk,16x32x32:m"


def parse_spec(spec: str) -> dict:
  """'32x1024x256:w8:t2:s3:p' -> attend_step keyword arguments ({} for 'default')."""
  if spec.split(":")[0] == "default":
    return {"noqk": True} if spec == "default:noqk" else {}
  head, *opts = spec.split(":")
  block_k, block_d, sub_d = (int(v) for v in head.split("x"))
  kwargs = {"block_k": block_k, "block_d": block_d, "sub_d": sub_d}
  names = {"w": "num_warps", "t": "tiles", "s": "num_stages"}
  for opt in opts:
    if opt == "p":
      kwargs["preload"] = True
    elif opt == "m":
      kwargs["mma"] = True
    elif opt == "noqk":
      kwargs["noqk"] = True
    elif opt[:1] in names and opt[1:].isdigit():
      kwargs[names[opt[0]]] = int(opt[1:])
    else:
      raise ValueError(f"bad option {opt!r} in variant {spec!r} (w<warps>, t<tiles>, s<stages>, p, m, noqk)")
  return kwargs


def make_data(shape):
  from megalodon_jax.ops import rope
  batch, chunk, heads, dz, dv, cols = shape
  keys = jax.random.split(jax.random.key(0), 8)
  normal = lambda i, s: jax.random.normal(keys[i], s, F32)
  bf = jnp.bfloat16
  return dict(proj=normal(0, (batch, cols)).astype(bf), bias=(0.1 * normal(1, (heads * dz,))).astype(bf),
              scale=0.2 * normal(2, (2, heads * dz)) + 1.0, shift=0.1 * normal(3, (2, heads * dz)),
              freqs=rope.rope_frequencies(dz), keys=normal(4, (batch, chunk, heads, dz)).astype(bf),
              values=normal(5, (batch, chunk, heads, dv)).astype(bf), v_new=normal(6, (batch, heads, dv)).astype(bf))


def _cheap_qk_math(inputs, count, *, dz, eps, dtype):
  """Diagnostic stand-in for decode_step._qk_math: q, k = z's halves (no norm, maps or RoPE)."""
  del count, dz, eps
  z_re, z_im = inputs[:2]
  return z_re.astype(F32), z_im.astype(F32), z_re.astype(dtype), z_im.astype(dtype)


def step_fn(variant: str, interpret: bool | None):
  """jit of (proj, bias, scale, shift, freqs, keys, values, v_new, count) -> (out [B, H, dv] f32, keys,
  values), keys and values donated."""
  from kernels_pallas import decode_step

  def f(proj, bias, scale, shift, freqs, keys, values, v_new, count):
    if variant == "xla_read":
      out = jnp.sum(values.astype(F32), axis=1) + jnp.sum(keys.astype(F32), axis=(1, 3))[..., None]
      return out, keys, values
    if variant == "xla_ref":
      return decode_step.attend_step_reference(proj, bias, scale, shift, freqs, keys, values, v_new, count, eps=EPS)
    kwargs = parse_spec(variant)
    noqk = kwargs.pop("noqk", False)
    real_math = decode_step._qk_math
    if noqk:  # patched while this function is traced (the first call compiles it)
      decode_step._qk_math = _cheap_qk_math
    try:
      stats, acc, keys, values = decode_step.attend_step(proj, bias, scale, shift, freqs, keys, values, v_new, count,
                                                         eps=EPS, interpret=interpret, **kwargs)
    finally:
      decode_step._qk_math = real_math
    return decode_step.attend_combine(stats, acc), keys, values

  return jax.jit(f, donate_argnums=(5, 6))


def reference(data, count: int):
  from kernels_pallas import decode_step
  with jax.default_matmul_precision("highest"):
    out, _, _ = jax.jit(lambda d, c: decode_step.attend_step_reference(
        d["proj"], d["bias"], d["scale"], d["shift"], d["freqs"], d["keys"], d["values"], d["v_new"], c,
        eps=EPS))(data, jnp.asarray([count], jnp.int32))
  return np.asarray(out)


def kernel_times(trace_dir: str, calls_per_fill: list[int]) -> list[dict]:
  """Per fill (calls made one fill after another): median over calls of all kernels of a call and
  of the attend_step kernel alone, kernels per call, and the kernel names."""
  from experiments.gpu_checks import profile_train_step as trace_tools
  kernels = sorted(trace_tools.device_kernels(trace_tools.load_trace_events(trace_dir)), key=lambda k: k["ts"])
  if not kernels:
    return [{"trace_error": "no GPU kernels in the trace (CPU run?)"} for _ in calls_per_fill]
  total = sum(calls_per_fill)
  if len(kernels) % total:  # stray events: the mean over every call of both fills
    main = sum(k["dur"] for k in kernels if "attend_step" in k["name"]) / total
    return [{"us_call": sum(k["dur"] for k in kernels) / total, "us_kernel": main,
             "kernels_per_call": len(kernels) // total, "kernels": {"uneven": f"{len(kernels)} for {total} calls"}}
            for _ in calls_per_fill]
  per_call = len(kernels) // total
  calls = [kernels[i * per_call:(i + 1) * per_call] for i in range(total)]
  out, start = [], 0
  for n in calls_per_fill:
    mine = calls[start:start + n]
    start += n
    names = collections.OrderedDict()
    for call in mine:
      for k in call:
        names[k["name"][:60]] = names.get(k["name"][:60], 0) + k["dur"] / n
    main = [sum(k["dur"] for k in call if "attend_step" in k["name"]) for call in mine]
    out.append({"us_call": statistics.median(sum(k["dur"] for k in call) for call in mine),
                "us_kernel": statistics.median(main), "kernels_per_call": per_call,
                "kernels": {name: round(us, 2) for name, us in names.items()}})
  return out


def run_variant(variant: str, data, fills, wants, args, interpret) -> list[dict]:
  batch, chunk, heads, dz, dv, _ = args.shape
  jax.clear_caches()  # attend_step's own jit cache would otherwise skip the noqk patch (or keep it)
  fn = step_fn(variant, interpret)
  state = {k: jnp.array(v, copy=True) for k, v in data.items()}  # donated buffers: our own copies
  small = [state[k] for k in ("proj", "bias", "scale", "shift", "freqs")]
  counts = [jnp.asarray([c], jnp.int32) for c in fills]
  rows = []
  keys, values = state["keys"], state["values"]
  start = time.perf_counter()
  for fill, count, want in zip(fills, counts, wants):
    out, keys, values = fn(*small, keys, values, state["v_new"], count)
    err = float(np.max(np.abs(np.asarray(out) - want))) if variant != "xla_read" else float("nan")
    rows.append({"variant": variant, "count": fill, "max_abs_err": err,
                 "ok": bool(err <= 1e-3 * max(1.0, float(np.max(np.abs(want))))) if variant != "xla_read" else None})
  rows[0]["compile_s"] = round(time.perf_counter() - start, 2)
  for _ in range(args.warmup):
    out, keys, values = fn(*small, keys, values, state["v_new"], counts[0])
  jax.block_until_ready(out)
  trace_dir = os.path.join(args.trace_dir, variant.replace(":", "_"))
  shutil.rmtree(trace_dir, ignore_errors=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for count in counts:
      for _ in range(args.calls):
        out, keys, values = fn(*small, keys, values, state["v_new"], count)
      jax.block_until_ready(out)
  times = kernel_times(trace_dir, [args.calls] * len(counts))
  row_bytes = heads * (dz + dv) * data["values"].dtype.itemsize * batch
  for row, t in zip(rows, times):
    row.update(t)
    if "us_kernel" in t:
      need = chunk if variant == "xla_read" else row["count"] + 1
      us = t["us_call"] if variant.startswith("xla") else t["us_kernel"]
      row["tbps"] = need * row_bytes / (us * 1e-6) / 1e12 if us else None
  shutil.rmtree(trace_dir, ignore_errors=True)
  return rows


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default=None, help=f"comma-separated specs (default: {VARIANTS})")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--trace_dir", default="/tmp/attend_trace")
  parser.add_argument("--json", default=None)
  parser.add_argument("--budget-s", type=float, default=150, help="variants after this many seconds are skipped")
  parser.add_argument("--smoke", action="store_true")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  args.shape = SHAPES["smoke" if args.smoke else "mega1.3B"]
  variants = (args.variants or (SMOKE_VARIANTS if args.smoke else VARIANTS)).split(",")
  interpret = True if args.smoke else None
  if args.smoke:
    args.calls, args.warmup = 2, 1
  chunk = args.shape[1]
  fills = [chunk - 1 - 16, chunk // 2]
  print(f"jax {jax.__version__} {jax.devices()[0].device_kind}; shape (B, C, H, dz, dv, P) {args.shape}; "
        f"fills {fills}", flush=True)
  data = make_data(args.shape)
  wants = [reference(data, c) for c in fills]
  rows = []
  print(f"{'variant':26s} {'count':>5s} {'us/call':>8s} {'kernel':>7s} {'TB/s':>5s} {'k/call':>6s} {'max err':>8s}",
        flush=True)
  began = time.perf_counter()
  for variant in variants:
    if time.perf_counter() - began > args.budget_s:
      print(f"{variant:26s} skipped: the probe's time budget ({args.budget_s} s) is spent", flush=True)
      continue
    try:
      got = run_variant(variant, data, fills, wants, args, interpret)
    except Exception as err:  # noqa: BLE001 - one failing variant must not end the probe
      got = [{"variant": variant, "error": f"{type(err).__name__}: {err}"[:400]}]
      print(f"{variant:26s} FAILED {got[0]['error']}", flush=True)
    for row in got:
      rows.append(row)
      if "error" in row:
        continue
      if "trace_error" in row:
        print(f"{variant:26s} {row['count']:5d} {row['trace_error']}  err {row['max_abs_err']:.1e}", flush=True)
        continue
      print(f"{variant:26s} {row['count']:5d} {row['us_call']:8.2f} {row['us_kernel']:7.2f} {row.get('tbps') or 0:5.2f} "
            f"{row['kernels_per_call']:6d} {row['max_abs_err']:8.1e}{'' if row['ok'] in (True, None) else ' BAD'}"
            f"  {row.get('compile_s', '')}", flush=True)
  full = [r for r in rows if r.get("count") == fills[0] and "us_call" in r and r["variant"] != "xla_read"]
  if full:
    best = min(full, key=lambda r: r["us_call"])
    print(f"best at count {fills[0]}: {best['variant']} {best['us_call']:.2f} us per call (kernel {best['us_kernel']:.2f})")
    for r in full:
      if r["variant"] in ("default", best["variant"]):
        print(f"  {r['variant']}: {r['kernels']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "shape": args.shape, "fills": fills,
                 "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
