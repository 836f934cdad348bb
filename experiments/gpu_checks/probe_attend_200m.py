"""mega200M batch-1 decode at 32K (one head: half the attend_step programs of mega1.3B): the default
attend form against narrower value blocks and fewer tiles per program, in one process, with Llama.

  python experiments/gpu_checks/probe_attend_200m.py "$OUT"

H200, 2026-11-29 (main at 1ef2f10): default 0.527 ms per token (Llama 1.001), block_d <= 512 0.514,
<= 256 0.513, 512 with 2 tiles 0.544, default again 0.503: the forms are within the run-to-run drift.
"""
import functools, sys
import jax
from experiments.benchmarks import bench_decode
from kernels_pallas import decode_step
from megalodon_jax import decoding

orig = decode_step.default_attend_form

def form(block_d_max, tiles_max, chunk, dv):
  f = orig(chunk, dv)
  f["block_d"] = min(f["block_d"], block_d_max)
  f["tiles"] = min(f["tiles"], tiles_max)
  return f

base = ["--sizes", "200M", "--batches", "1", "--contexts", "32768", "--loop", "device", "--inner", "16",
        "--warmup", "16", "--iters", "5", "--llama-decode-attention", "cudnn", "--mega-decode", "default",
        "--results-dir", sys.argv[1]]
for i, (bd, t) in enumerate([(1024, 4), (512, 4), (256, 4), (512, 2), (1024, 4)]):
  decode_step.default_attend_form = functools.partial(form, bd, t)
  decoding._fused_step.cache_clear()
  jax.clear_caches()
  archs = "llama,megalodon" if i == 0 else "megalodon"
  print(f"=== block_d <= {bd}, tiles <= {t}", flush=True)
  try:
    bench_decode.main(base + ["--archs", archs, "--name", f"attend200m_{i}_bd{bd}_t{t}"])
  except Exception as e:  # keep going
    print("ERROR", repr(e)[:300])
