"""Which configuration of decode_step.attend_step reads the cache fastest? Kernel times from a trace.

A batch-1 decode step of mega1.3B at 32K runs attend_step (one new token's attention over the
current chunk: values [1, 2048, 2, 2048] bf16 = 16.8 MB and keys [1, 2048, 2, 256] bf16 = 2 MB per
layer) 24 times per token. This probe times, per kernel from a jax.profiler trace, attend_step in
several configurations plus its combine, at the full fill (count = 2047 - 16) and at half fill
(count = 1024). Each timed call runs --layers (24) layers, each on its own keys/values buffers, so
that every layer reads its cache from HBM as in the decode step (one buffer re-read is served by
the ~50 MB L2: round 1 measured 7.2 us for the default there, against ~11.9 us per layer in the
model step). Floors in the same run:

  xla_read   row sums of the values and of the keys (every byte read once, XLA row reductions)
  xla_ref    attend_step_reference under XLA (scores, softmax, probabilities times the values)

Variant specs (attend_step arguments): BKxBDxSD[:wW][:tT][:sS][:p][:m][:cp] = block_k BK, block_d
BD, sub_d SD, num_warps W (default 4), tiles T (default 1: one tile per program; > 1: a loop with
an online softmax), num_stages S (default 1), p[P] = preload (every load issued first / the next P
tiles prefetched, P default 1), m = mma (both products on the tensor cores), cp = the Pallas combine
(attend_combine_pallas) instead of XLA's; noqk = DIAGNOSTIC ONLY (wrong results, flagged BAD): q
and k are the raw z halves (no RMS norm, affine maps or RoPE), to see what the per-program q/k
arithmetic costs. 'default' is attend_step with no arguments.

Keys and values are donated (the in-place update, as in the decode loop; a missing alias would
show as a 16.8 MB copy kernel). Layer 0's output of the first call per fill is checked against
attend_step_reference (float32, matmul precision 'highest'). Table columns, per layer: us with
every kernel (attend_step + combine), the attend_step kernel alone, TB/s of the kernel alone on
the bytes it must read ((count + 1) rows of keys and values; xla_*: all kernels, all rows), kernels
per layer, max abs error.

H200, jax 0.11.2 (2026-11-29, round 2, count 2031; experiments/results/gpu_checks/
2026-11-29_nvidia-h200_attend_probe_r2.json), us per layer with the combine (attend_step alone):
default (32x1024x256) 11.90 (9.95) + XLA combine 1.95; 8x1024x1024:t4:w4:p 10.43 (8.51), with :cp
10.11 (8.54, Pallas combine 1.6); 4x1024x1024:t8:w4:p:cp 10.94; deeper prefetch (p2, p3) and more
tiles per program slower; tensor-core (m) forms 12.7-15.1; one-warp forms 12.6-13.3; noqk (no q/k
arithmetic) -0.6; xla_read 8.22 (2.3 TB/s); xla_ref 32.8. Round 1 re-read one buffer (L2): ~30%
faster across the board, the same best form.

  python experiments/gpu_checks/probe_attend.py --json "$OUT/attend.json"
  python experiments/gpu_checks/probe_attend.py --smoke      # tiny shapes, interpret mode, CPU
"""

from __future__ import annotations

import argparse
import collections
import functools
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
SHAPES = {"mega1.3B": (1, 2048, 2, 256, 2048, 6656), "mega200M": (1, 2048, 1, 256, 2048, 3328),
          "smoke": (1, 64, 2, 16, 64, 96)}
# In priority order (variants past --budget-s are skipped).
VARIANTS = ("xla_read,default,default:cp,8x1024x1024:t4:w4:p,8x1024x1024:t4:w4:p:cp,8x1024x1024:t8:w4:p,"
            "8x1024x1024:t4:w4:p2,4x1024x1024:t8:w4:p3,4x1024x1024:t16:w4:p3,8x512x512:t8:w4:p3,"
            "8x1024x1024:t2:w4:p,8x512x512:t4:w4:p,8x512x512:t8:w4:p,16x512x512:t4:w4:p,16x512x512:t4:w4:s3,"
            "8x2048x2048:t4:w8:p,4x1024x1024:t8:w4:p,4x1024x1024:t16:w4:p,4x1024x1024:t8:w4:p:cp,"
            "8x1024x1024:t4:w8:p,32x1024x128:w4,16x512x128:w1,8x512x128:w1:p,32x1024x1024:m,16x2048x2048:w8:m,"
            "16x1024x1024:m,default:noqk,xla_ref,32x1024x256:w4:p,16x1024x1024:w4:p")
SMOKE_VARIANTS = ("xla_read,xla_ref,8x32x16:w4,8x32x16:w4:p,8x64x64:w8:p,4x32x32:t4:s2,4x32x32:t4:p,8x32x16:w4:p:noqk,"
                  "16x32x32:m,4x32x32:t4:p:cp,4x32x32:t4:p3")


def parse_spec(spec: str) -> dict:
  """'32x1024x256:w8:t2:s3:p' -> attend_step keyword arguments ({} for 'default')."""
  if spec.split(":")[0] == "default":
    return {"noqk": True} if spec == "default:noqk" else {}
  head, *opts = spec.split(":")
  block_k, block_d, sub_d = (int(v) for v in head.split("x"))
  kwargs = {"block_k": block_k, "block_d": block_d, "sub_d": sub_d}
  names = {"w": "num_warps", "t": "tiles", "s": "num_stages"}
  for opt in opts:
    if opt == "p" or (opt[:1] == "p" and opt[1:].isdigit()):
      kwargs["preload"] = int(opt[1:] or 1)
    elif opt == "m":
      kwargs["mma"] = True
    elif opt == "cp":
      kwargs["combine"] = "pallas"
    elif opt == "noqk":
      kwargs["noqk"] = True
    elif opt[:1] in names and opt[1:].isdigit():
      kwargs[names[opt[0]]] = int(opt[1:])
    else:
      raise ValueError(f"bad option {opt!r} in variant {spec!r} (w<warps>, t<tiles>, s<stages>, p, m, noqk)")
  return kwargs


def make_data(shape, layers: int):
  """The q/k inputs and v_new (shared by the layers) and `layers` distinct keys/values buffers."""
  from megalodon_jax.ops import rope
  batch, chunk, heads, dz, dv, cols = shape
  keys = jax.random.split(jax.random.key(0), 8)
  normal = lambda key, s: jax.random.normal(key, s, F32)
  bf = jnp.bfloat16
  cache = jax.jit(lambda key: (normal(key, (batch, chunk, heads, dz)).astype(bf),
                               normal(jax.random.fold_in(key, 1), (batch, chunk, heads, dv)).astype(bf)))
  stack = [cache(jax.random.fold_in(keys[4], i)) for i in range(layers)]
  return dict(proj=normal(keys[0], (batch, cols)).astype(bf), bias=(0.1 * normal(keys[1], (heads * dz,))).astype(bf),
              scale=0.2 * normal(keys[2], (2, heads * dz)) + 1.0, shift=0.1 * normal(keys[3], (2, heads * dz)),
              freqs=rope.rope_frequencies(dz), keys=tuple(k for k, _ in stack), values=tuple(v for _, v in stack),
              v_new=normal(keys[6], (batch, heads, dv)).astype(bf))


def _cheap_qk_math(inputs, count, *, dz, eps, dtype):
  """Diagnostic stand-in for decode_step._qk_math: q, k = z's halves (no norm, maps or RoPE)."""
  del count, dz, eps
  z_re, z_im = inputs[:2]
  return z_re.astype(F32), z_im.astype(F32), z_re.astype(dtype), z_im.astype(dtype)


def layer_call(variant: str, interpret: bool | None, proj, bias, scale, shift, freqs, keys, values, v_new, count):
  """One layer's attention: (out [B, H, dv] float32, keys, values)."""
  from kernels_pallas import decode_step
  if variant == "xla_read":  # row reductions: every byte of values and keys read once
    batch, chunk, heads, dv = values.shape
    out = (jnp.sum(values.reshape(batch * chunk, heads * dv).astype(F32), axis=-1)
           + jnp.sum(keys.reshape(batch * chunk, -1).astype(F32), axis=-1))
    return out, keys, values
  if variant == "xla_ref":
    return decode_step.attend_step_reference(proj, bias, scale, shift, freqs, keys, values, v_new, count, eps=EPS)
  kwargs = parse_spec(variant)
  noqk = kwargs.pop("noqk", False)
  combine = kwargs.pop("combine", "xla")
  real_math = decode_step._qk_math
  if noqk:  # patched while this function is traced (the first call compiles it)
    decode_step._qk_math = _cheap_qk_math
  try:
    stats, acc, keys, values = decode_step.attend_step(proj, bias, scale, shift, freqs, keys, values, v_new, count,
                                                       eps=EPS, interpret=interpret, **kwargs)
  finally:
    decode_step._qk_math = real_math
  if combine == "pallas":
    out = decode_step.attend_combine_pallas(stats, acc, interpret=interpret)
  else:
    out = decode_step.attend_combine(stats, acc)
  return out, keys, values


def step_fn(variant: str, interpret: bool | None):
  """jit of one layer's (proj, bias, scale, shift, freqs, keys, values, v_new, count) -> (out, keys,
  values), keys and values donated. Called once per layer buffer in turn (one compile; each call
  reads its layer's cache from HBM, not from the L2 that re-reading one buffer would hit)."""
  return jax.jit(functools.partial(layer_call, variant, interpret), donate_argnums=(5, 6))


def reference(data, count: int):
  from kernels_pallas import decode_step
  with jax.default_matmul_precision("highest"):
    out, _, _ = jax.jit(lambda d, c: decode_step.attend_step_reference(
        d["proj"], d["bias"], d["scale"], d["shift"], d["freqs"], d["keys"][0], d["values"][0], d["v_new"], c,
        eps=EPS))(data, jnp.asarray([count], jnp.int32))
  return np.asarray(out)


def kernel_times(trace_dir: str, calls_per_fill: list[int], layers: int) -> list[dict]:
  """Per fill (calls made one fill after another): median over calls of all kernels of a call and
  of the attend_step kernels alone, divided by the layers per call; kernels per layer; kernel names
  (us per layer)."""
  from experiments.gpu_checks import profile_train_step as trace_tools
  kernels = sorted(trace_tools.device_kernels(trace_tools.load_trace_events(trace_dir)), key=lambda k: k["ts"])
  if not kernels:
    return [{"trace_error": "no GPU kernels in the trace (CPU run?)"} for _ in calls_per_fill]
  total = sum(calls_per_fill)
  if len(kernels) % total:  # stray events: the mean over every call of both fills
    main = sum(k["dur"] for k in kernels if "attend_step" in k["name"]) / (total * layers)
    return [{"us_call": sum(k["dur"] for k in kernels) / (total * layers), "us_kernel": main,
             "kernels_per_call": round(len(kernels) / (total * layers), 2),
             "kernels": {"uneven": f"{len(kernels)} for {total} calls"}} for _ in calls_per_fill]
  per_call = len(kernels) // total
  calls = [kernels[i * per_call:(i + 1) * per_call] for i in range(total)]
  out, start = [], 0
  for n in calls_per_fill:
    mine = calls[start:start + n]
    start += n
    names = collections.OrderedDict()
    for call in mine:
      for k in call:
        names[k["name"][:60]] = names.get(k["name"][:60], 0) + k["dur"] / (n * layers)
    main = [sum(k["dur"] for k in call if "attend_step" in k["name"]) / layers for call in mine]
    out.append({"us_call": statistics.median(sum(k["dur"] for k in call) / layers for call in mine),
                "us_kernel": statistics.median(main), "kernels_per_call": round(per_call / layers, 2),
                "kernels": {name: round(us, 2) for name, us in names.items()}})
  return out


def run_variant(variant: str, data, fills, wants, args, interpret) -> list[dict]:
  batch, chunk, heads, dz, dv, _ = args.shape
  jax.clear_caches()  # attend_step's own jit cache would otherwise skip the noqk patch (or keep it)
  fn = step_fn(variant, interpret)
  small = [data[k] for k in ("proj", "bias", "scale", "shift", "freqs")]
  keys = [jnp.array(k, copy=True) for k in data["keys"]]  # donated buffers: our own copies
  values = [jnp.array(v, copy=True) for v in data["values"]]
  layers = len(keys)

  def step(count):
    outs = []
    for i in range(layers):
      out, keys[i], values[i] = fn(*small, keys[i], values[i], data["v_new"], count)
      outs.append(out)
    return outs

  counts = [jnp.asarray([c], jnp.int32) for c in fills]
  rows = []
  start = time.perf_counter()
  for fill, count, want in zip(fills, counts, wants):
    outs = step(count)
    checked = variant != "xla_read"
    err = float(np.max(np.abs(np.asarray(outs[0]) - want))) if checked else float("nan")  # layer 0
    rows.append({"variant": variant, "count": fill, "max_abs_err": err,
                 "ok": bool(err <= 1e-3 * max(1.0, float(np.max(np.abs(want))))) if checked else None})
  rows[0]["compile_s"] = round(time.perf_counter() - start, 2)
  for _ in range(args.warmup):
    outs = step(counts[0])
  jax.block_until_ready(outs)
  trace_dir = os.path.join(args.trace_dir, variant.replace(":", "_"))
  shutil.rmtree(trace_dir, ignore_errors=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for count in counts:
      for _ in range(args.calls):
        outs = step(count)
      jax.block_until_ready(outs)
  times = kernel_times(trace_dir, [args.calls * layers] * len(counts), 1)
  row_bytes = heads * (dz + dv) * data["values"][0].dtype.itemsize * batch
  for row, t in zip(rows, times):
    row.update(t)
    if "us_kernel" in t:
      need = chunk if variant == "xla_read" else row["count"] + 1
      us = t["us_call"] if variant.startswith("xla") else t["us_kernel"]
      row["tbps"] = need * row_bytes / (us * 1e-6) / 1e12 if us else None
  shutil.rmtree(trace_dir, ignore_errors=True)
  del keys, values, outs
  return rows


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default=None, help=f"comma-separated specs (default: {VARIANTS})")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--layers", type=int, default=24, help="distinct cache buffers per call (a layer stack)")
  parser.add_argument("--trace_dir", default="/tmp/attend_trace")
  parser.add_argument("--json", default=None)
  parser.add_argument("--budget-s", type=float, default=150, help="variants after this many seconds are skipped")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--size", default="mega1.3B", choices=["mega1.3B", "mega200M"], help="the model's shapes")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  args.shape = SHAPES["smoke" if args.smoke else args.size]
  variants = (args.variants or (SMOKE_VARIANTS if args.smoke else VARIANTS)).split(",")
  interpret = True if args.smoke else None
  if args.smoke:
    args.calls, args.warmup, args.layers = 2, 1, 2
  chunk = args.shape[1]
  fills = [chunk - 1 - 16, chunk // 2]
  print(f"jax {jax.__version__} {jax.devices()[0].device_kind}; shape (B, C, H, dz, dv, P) {args.shape}; "
        f"fills {fills}", flush=True)
  data = make_data(args.shape, args.layers)
  wants = [reference(data, c) for c in fills]
  rows = []
  print(f"{'variant':26s} {'count':>5s} {'us/layer':>8s} {'kernel':>7s} {'TB/s':>5s} {'k/layer':>7s} {'max err':>8s}",
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
      print(f"{variant:26s} {row['count']:5d} {row['us_call']:8.2f} {row['us_kernel']:7.2f} "
            f"{row.get('tbps') or 0:5.2f} "
            f"{row['kernels_per_call']:7.2f} {row['max_abs_err']:8.1e}{'' if row['ok'] in (True, None) else ' BAD'}"
            f"  {row.get('compile_s', '')}", flush=True)
  full = [r for r in rows if r.get("count") == fills[0] and "us_call" in r and r["variant"] != "xla_read"]
  if full:
    best = min(full, key=lambda r: r["us_call"])
    print(f"best at count {fills[0]}: {best['variant']} {best['us_call']:.2f} us per layer "
          f"(kernel {best['us_kernel']:.2f})")
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
