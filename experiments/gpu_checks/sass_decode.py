"""Registers, spills and instruction mix of the decode-step Pallas kernels for sm_90a, without a GPU.

sass_report.py's machinery (cross-lower, save each kernel's Triton IR, compile it with a pip Triton
for sm_90a, disassemble) applied to kernels_pallas.decode_step at mega1.3B's decode shapes:
attend_step (C=2048, H=2, dz=256, dv=2048) and gemv_partials (every projection shape).

  python experiments/gpu_checks/sass_decode.py --triton-python /tmp/tritonvenv/bin/python
  python experiments/gpu_checks/sass_decode.py --op attend --config "{'block_k': 64, 'block_d': 512}"
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from experiments.gpu_checks import sass_report  # noqa: E402


def _attend(overrides: dict):
  import jax
  import jax.numpy as jnp
  from kernels_pallas import decode_step
  f = lambda *a: decode_step.attend_step(*a, eps=1e-5, interpret=False, **overrides)
  bf = jnp.bfloat16
  avals = [jax.ShapeDtypeStruct(s, d) for s, d in (
      ((1, 6656), bf), ((512,), bf), ((2, 512), jnp.float32), ((2, 512), jnp.float32), ((128,), jnp.float32),
      ((1, 2048, 2, 256), bf), ((1, 2048, 2, 2048), bf), ((1, 2, 2048), bf), ((1,), jnp.int32))]
  return f, avals, {"attend_step": overrides.get("num_warps", 4)}


def _gemv(overrides: dict):
  import jax
  import jax.numpy as jnp
  from kernels_pallas import decode_step
  n, k = overrides.pop("n", 2048), overrides.pop("k", 4864)
  f = lambda x, w: decode_step.gemv_partials(x, w, interpret=False, **overrides)
  avals = [jax.ShapeDtypeStruct((k,), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.bfloat16)]
  return f, avals, {"gemv_partials": overrides.get("num_warps", 8)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--op", default="attend", choices=["attend", "gemv"])
  parser.add_argument("--config", default="{}", help="keyword overrides as a dict (gemv also takes n, k)")
  parser.add_argument("--out", default="/tmp/decode_sass")
  parser.add_argument("--triton-python", default=sys.executable)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  sass_report.OPS.update(attend=_attend, gemv=_gemv)
  kernels = sass_report.dump_ttir(args.out, args.op, ast.literal_eval(args.config))
  env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
  for path, num_warps in kernels:
    subprocess.run([args.triton_python, "-c", sass_report._COMPILE, path, str(num_warps)], check=True, env=env)  # pylint: disable=protected-access
    base = path.rsplit(".", 1)[0]
    usage = open(base + ".usage").read()
    resources = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", usage)
    regs, stack, shared = resources.groups() if resources else ("?", "?", "?")
    sass = open(base + ".sass").read()
    loads = len(re.findall(r"LDG\.E", sass))
    print(f"{os.path.basename(base)}: {regs} registers, {stack} B stack (spills), {shared} B shared, "
          f"{sass.count('BAR.SYNC')} BAR.SYNC, {loads} global loads, {num_warps} warps")
    print("  " + sass_report.loop_mix(sass), flush=True)


if __name__ == "__main__":
  main()
