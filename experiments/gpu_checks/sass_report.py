"""Registers and instruction mix of the Triton kernels for sm_90a, on a machine with no GPU.

    pip install triton          # any recent release; it carries ptxas and cuobjdump
    python experiments/gpu_checks/sass_report.py --config "{'num_chunks': 16}" --out /tmp/sass
    python experiments/gpu_checks/sass_report.py --op timestep_norm --config "{'block_t': 32}"
    python experiments/gpu_checks/sass_report.py --op chunk_attention --out /tmp/attn_sass
    python experiments/gpu_checks/sass_report.py --op cema_toeplitz_probe --config "{'block': 32, 'dc': 16}"
    python experiments/gpu_checks/sass_report.py --op fma_probe --config "{'patterns': 'bwd_k8,bwd_2s_k4'}"
    python experiments/gpu_checks/sass_report.py --op cema_summary_tc_probe --config "{'block_d': 8}"
    python experiments/gpu_checks/sass_report.py --op cema_summary_mma

Step 1 (this Python, with JAX): cross-lowers the op's value-and-gradient for CUDA (CEMA at B=1,
L=32768, D=4096, N=16; TimestepNorm at B=1, L=32768, D=4096, G=64; chunked attention at bench_ops'
shape) and saves each Pallas
kernel's Triton IR (.ttir).  Step 2 (--triton-python,
default this Python): compiles each .ttir with Triton for sm_90a (num_warps from the config) and
disassembles it.  Prints per kernel: registers per thread, local memory (spills), shared memory,
block-wide barriers, and the mix of instructions in its main loop (the largest backward branch;
the whole kernel when it has none), e.g. how many are FP32 arithmetic, and how many registers that
arithmetic reads from the register file rather than the operand reuse cache (the CEMA scans' issue
rate tracks it only loosely: docs/cema_tensor_core_plan.md).
Caveat: triton.compile on a .ttir file starts after Triton's own TTIR passes, which XLA does run;
one of them folds `acc + dot(a, b)` into the dot's accumulator. Kernels written that way (the
attention block matmuls) show here an extra float32 tile, its FADDs and spills that the GPU build
does not have (folding the add by hand in the .ttir: 166 registers, no FADD, no spills).
XLA compiles the same IR with its own Triton, so register counts can differ (ncu on an H200:
backward scan 204 and chunk summaries 126 / 80 registers under XLA; 231 and 128 / 80 here).
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import os
import re
import subprocess
import sys

_COMPILE = r'''
import os, re, subprocess, sys, collections
import triton
from triton.backends.compiler import GPUTarget
path, num_warps = sys.argv[1], int(sys.argv[2])
kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": num_warps, "num_stages": 1})
base = path.rsplit(".", 1)[0]
open(base + ".cubin", "wb").write(kernel.asm["cubin"])
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
for args, suffix in ((["--dump-resource-usage"], ".usage"), (["--dump-sass"], ".sass")):
  text = subprocess.run([os.path.join(bin_dir, "cuobjdump"), *args, base + ".cubin"],
                        capture_output=True, text=True, check=True).stdout
  open(base + suffix, "w").write(text)
'''


def _cema_gradient(overrides: dict):
  """CEMA value-and-gradient at B=1, L=32768, D=4096, N=16: (function, avals, warps per kernel)."""
  import jax
  import jax.numpy as jnp

  from kernels_pallas import cema as K
  from megalodon_jax.ops.cema import CemaCoefficients

  batch, length, dim, ndim = 1, 32768, 4096, 16
  cfg = dataclasses.replace(K.default_config(batch, length, dim, ndim), **overrides)
  print(cfg)
  warps = {"cema_fwd_chunk_states": cfg.num_warps, "cema_fwd_scan": cfg.num_warps,
           "cema_bwd_chunk_states": cfg.bwd_num_warps if cfg.bwd_summary_tiling == "backward"
           else cfg.num_warps, "cema_bwd_scan": cfg.bwd_num_warps}

  def loss(x, p, q, eta, omega):
    y = K.cema_pallas(x, CemaCoefficients(p, q, eta), omega, config=cfg, interpret=False,
                      platform="gpu")
    return jnp.sum(y)

  spec = jax.ShapeDtypeStruct
  avals = (spec((batch, length, dim), jnp.bfloat16), spec((dim, ndim), jnp.float32),
           spec((dim, ndim), jnp.complex64), spec((dim, ndim), jnp.complex64),
           spec((dim,), jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4)), avals, warps


def _timestep_norm_gradient(overrides: dict):
  """Tiled TimestepNorm value-and-gradient at B=1, L=32768, D=4096, G=64 (TiledConfig overrides)."""
  import jax
  import jax.numpy as jnp

  from kernels_pallas import timestep_norm as T

  batch, length, dim, groups = 1, 32768, 4096, 64
  cfg = T.default_config("triton")
  cfg = dataclasses.replace(cfg, tiled=dataclasses.replace(cfg.tiled, **overrides))
  print(cfg)
  scan = ("timestep_norm_tiled_fwd_scan", "timestep_norm_tiled_bwd_scan")
  # The step-wise backward's per-step kernels run with the scans' warps.
  scan += ("timestep_norm_steps_bwd_maps", "timestep_norm_steps_bwd_coefficients")
  warps = collections.defaultdict(lambda: cfg.tiled.num_warps,
                                  {name: cfg.tiled.scan_warps for name in scan})

  def loss(x, weight, bias):
    y, _ = T.timestep_norm_pallas(x, weight, bias, num_groups=groups, interpret=False,
                                  backend="triton", config=cfg)
    return jnp.sum(y.astype(jnp.float32))

  spec = jax.ShapeDtypeStruct
  avals = (spec((batch, length, dim), jnp.bfloat16), spec((dim,), jnp.float32),
           spec((dim,), jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2)), avals, warps


def _attention_gradient(overrides: dict):
  """Chunked attention value-and-gradient at bench_ops' shape (16 chunks of 2048, 4 heads, dk 256,
  dv 2048, bf16; KernelConfig overrides). Warps: each kernel's own launch parameter (None)."""
  import jax
  import jax.numpy as jnp

  from kernels_pallas import chunk_attention as A

  batch, chunk, chunks, heads, dk, dv = 1, 2048, 16, 4, 256, 2048
  cfg = dataclasses.replace(A.KernelConfig(), **overrides)
  print(cfg)

  def loss(q, k, v):
    out = A.chunk_attention(q, k, v, chunk_size=chunk, platform="triton", interpret=False, config=cfg)
    return jnp.sum(out.astype(jnp.float32))

  spec = jax.ShapeDtypeStruct
  length = chunk * chunks
  avals = (spec((batch, length, heads, dk), jnp.bfloat16), spec((batch, length, heads, dk), jnp.bfloat16),
           spec((batch, length, heads, dv), jnp.bfloat16))
  return jax.grad(loss, argnums=(0, 1, 2)), avals, None


def _toeplitz_probe(overrides: dict):
  """Session 19's per-channel Toeplitz probe (experiments/gpu_checks/probe_cema_toeplitz_triton.py),
  forward only, at B=1, L=32768, D=4096; overrides: mode, block, ct, dc, num_warps."""
  import functools

  import jax
  import jax.numpy as jnp

  from experiments.gpu_checks.probe_cema_toeplitz_triton import toeplitz_pallas

  settings = {"mode": "split", "block": 64, "ct": 64, "dc": 8, "num_warps": 4, **overrides}
  print(settings)
  spec = jax.ShapeDtypeStruct
  avals = (spec((1, 32768, 4096), jnp.bfloat16), spec((4096, settings["block"]), jnp.float32))
  warps = collections.defaultdict(lambda: settings["num_warps"])
  return functools.partial(toeplitz_pallas, **settings), avals, warps


def _fma_probe(overrides: dict):
  """The register-operand probe's kernels (experiments/gpu_checks/probe_fma_operands.py), one per
  pattern, at its default size; overrides: patterns (a comma-separated list of its PATTERNS)."""
  import jax

  from experiments.gpu_checks import probe_fma_operands as probe

  names = overrides.get("patterns", ",".join(probe.PATTERNS)).split(",")
  built = [probe.build(name, probe.BLOCK * 132 * 16, 4096, interpret=False) for name in names]

  def run_all(*args):
    return [fn(*args[2 * i:2 * i + 2]) for i, (fn, *_rest) in enumerate(built)]

  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for _, x, p, _ in built for a in (x, p)]
  return run_all, avals, collections.defaultdict(lambda: 4)


def _summary_tc_probe(overrides: dict):
  """The tensor-core chunk-summary probe (experiments/gpu_checks/probe_cema_summary_tc.py), forward
  orientation, at B=1, L=32768, D=4096, N=16, 16 chunks; overrides: block_d, num_warps, prefetch."""
  import functools

  import jax
  import jax.numpy as jnp

  from experiments.gpu_checks.probe_cema_summary_tc import summary_tc

  settings = {"block_d": 16, "num_warps": 4, **overrides}
  spec = jax.ShapeDtypeStruct
  avals = (spec((1, 32768, 4096), jnp.bfloat16), spec((4096, 6, 16, 16), jnp.bfloat16),
           spec((4096, 2, 16), jnp.float32))
  fn = functools.partial(summary_tc, chunks=16, reverse=False, interpret=False, **settings)
  return fn, avals, collections.defaultdict(lambda: settings["num_warps"])


def _summary_mma(overrides: dict):
  """The forward's mma chunk summaries (kernels_pallas.cema_summary_mma) at B=1, L=32768, D=4096,
  N=16; no overrides."""
  import jax
  import jax.numpy as jnp

  from kernels_pallas import cema_summary_mma as M

  del overrides
  spec = jax.ShapeDtypeStruct
  avals = (spec((1, 32768, 4096), jnp.bfloat16), spec((3, 4, 2, 1024, 8, 4, 4), jnp.uint32),
           spec((4, 2, 1024, 8, 4, 4), jnp.float32))
  fn = lambda x, b, q: M.summary_planes(x, b, q, interpret=False)  # noqa: E731
  return fn, avals, collections.defaultdict(lambda: M.WARPS)


OPS = {"cema": _cema_gradient, "timestep_norm": _timestep_norm_gradient, "chunk_attention": _attention_gradient,
       "cema_toeplitz_probe": _toeplitz_probe, "fma_probe": _fma_probe,
       "cema_summary_tc_probe": _summary_tc_probe, "cema_summary_mma": _summary_mma}


def dump_ttir(out_dir: str, op: str, overrides: dict) -> list[tuple[str, int]]:
  """Writes one .ttir per Pallas kernel of the op's gradient; returns (path, num_warps) pairs."""
  os.environ.setdefault("JAX_TRACEBACK_IN_LOCATIONS_LIMIT", "0")
  sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
  import jax
  from jax._src.pallas.triton import pallas_call_registration as registration

  gradient, avals, warps = OPS[op](overrides)
  saved = []
  original = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    text = result.module.operation.get_asm(enable_debug_info=False)
    # Load hints that newer Triton releases spell differently; they do not change the SASS mix.
    text = re.sub(r" (evictionPolicy|cacheModifier) = \w+", "", text)
    name = re.search(r"tt.func public @(\w+)", text).group(1)
    path = os.path.join(out_dir, f"{len(saved):02d}_{name}.ttir")
    with open(path, "w") as f:
      f.write(text)
    # warps None, or a kernel it does not name (CEMA's power tables and combine kernels, which set
    # their own): the launch parameter the Pallas lowering chose (a local of its caller).
    try:
      num_warps = warps[name]
    except (KeyError, TypeError):
      num_warps = sys._getframe(1).f_locals["num_warps"]
    saved.append((path, num_warps))
    return result

  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    jax.jit(gradient).trace(*avals).lower(lowering_platforms=("cuda",))
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = original
  return saved


def _listing(sass: str) -> list[tuple[int, str]]:
  """(address, instruction text) of every instruction in a cuobjdump --dump-sass listing."""
  return [(int(m.group(1), 16), m.group(2).strip())
          for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def _loop_range(body: list[tuple[int, str]]) -> tuple[int, int]:
  """Address range of the largest loop (a branch back to an earlier address); the whole kernel
  when there is none."""
  best = None
  for addr, text in body:
    if "BRA" not in text:
      continue
    target = re.search(r"0x([0-9a-f]+)", text.split("BRA")[-1])
    if target and int(target.group(1), 16) < addr:
      lo = int(target.group(1), 16)
      count = sum(1 for a, _ in body if lo <= a <= addr)
      if best is None or count > best[0]:
        best = (count, lo, addr)
  return (body[0][0], body[-1][0]) if best is None else best[1:]


def loop_mix(sass: str) -> str:
  """Instruction counts of the largest loop (a branch back to an earlier address)."""
  body = _listing(sass)
  lo, hi = _loop_range(body)  # no loop (one tile per program): the whole kernel
  count = sum(1 for a, _ in body if lo <= a <= hi)
  ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                            for a, t in body if lo <= a <= hi)
  fp = ops["FFMA"] + ops["FMUL"] + ops["FADD"]
  top = " ".join(f"{k}:{v}" for k, v in ops.most_common(10))
  what = "loop" if count < len(body) else "kernel (no loop)"
  return f"{what}: {count} instructions, {fp / count:.0%} FP32 arithmetic; {top}"


def operand_reads(sass: str) -> str:
  """Register reads of the FP32 arithmetic (FFMA, FMUL, FADD) in the largest loop.

  A source register counts as read from the register file unless the instruction before it in
  the listing named the same register in the same operand slot with .reuse (the operand reuse
  cache). Also counted: FFMAs whose three file reads all fall in one of the two register banks
  (even / odd register numbers), the case ptxas steers clear of."""
  body = _listing(sass)
  lo, hi = _loop_range(body)
  previous: dict[int, int] = {}
  count = reads = reused = one_bank = 0
  for addr, text in body:
    if not lo <= addr <= hi:
      continue
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    opcode = text.split()[0]
    sources = [o.strip() for o in text[len(opcode):].split(",")][1:]
    from_file, from_cache, current = set(), 0, {}
    for slot, operand in enumerate(sources):
      match = re.search(r"\bR(\d+)(\.reuse)?", operand)
      if not match:
        continue
      register = int(match.group(1))
      if match.group(2):
        current[slot] = register
      if previous.get(slot) == register:
        from_cache += 1
      else:
        from_file.add(register)
    previous = current
    if opcode.split(".")[0] not in ("FFMA", "FMUL", "FADD"):
      continue
    count += 1
    reads += len(from_file)
    reused += from_cache
    if len(from_file) == 3 and len({r % 2 for r in from_file}) == 1:
      one_bank += 1
  if not count:
    return "operand reads: no FP32 arithmetic"
  return (f"operand reads: {reads / count:.2f} registers per FP32 instruction from the file, "
          f"{reused / count:.2f} from the reuse cache; {one_bank / count:.0%} with three reads in one bank")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--op", default="cema", choices=sorted(OPS))
  parser.add_argument("--config", default="{}",
                      help="overrides, as a dict: CemaKernelConfig fields, TiledConfig fields "
                           "for timestep_norm, KernelConfig fields for chunk_attention, mode / block / "
                           "ct / dc / num_warps for cema_toeplitz_probe")
  parser.add_argument("--out", default="/tmp/cema_sass")
  parser.add_argument("--triton-python", default=sys.executable,
                      help="a Python with triton installed (may differ from the JAX one)")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  kernels = dump_ttir(args.out, args.op, ast.literal_eval(args.config))
  env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
  for path, num_warps in kernels:
    subprocess.run([args.triton_python, "-c", _COMPILE, path, str(num_warps)], check=True, env=env)
    base = path.rsplit(".", 1)[0]
    usage = open(base + ".usage").read()
    resources = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", usage)
    regs, stack, shared = resources.groups() if resources else ("?", "?", "?")
    sass = open(base + ".sass").read()
    print(f"{os.path.basename(base)}: {regs} registers, {stack} B stack (spills), {shared} B "
          f"shared, {sass.count('BAR.SYNC')} BAR.SYNC, {num_warps} warps")
    mma = {op: len(re.findall(rf"\b{op}\.", sass)) for op in ("HGMMA", "HMMA")}
    if any(mma.values()):  # which tensor-core path Triton took: wgmma (HGMMA) or mma.sync (HMMA)
      print(f"  tensor-core instructions: {mma['HGMMA']} HGMMA (wgmma), {mma['HMMA']} HMMA (mma.sync)")
    print("  " + loop_mix(sass), flush=True)
    print("  " + operand_reads(sass), flush=True)


if __name__ == "__main__":
  main()
