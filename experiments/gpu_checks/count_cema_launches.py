"""Counts what the CEMA kernels' value-and-gradient launches, on a machine with no GPU.

    python experiments/gpu_checks/count_cema_launches.py
    python experiments/gpu_checks/count_cema_launches.py --config "{'pallas_combine': False}" --list
    git archive COMMIT kernels_pallas megalodon_jax | tar -x -C /tmp/old   # before / after
    python experiments/gpu_checks/count_cema_launches.py --root /tmp/old

Cross-lowers for CUDA (as sass_report.py does) what bench_ops times for the CEMA "fwdbwd" pass at
B=1, L=32768, D=4096, N=16, bf16 x: the coefficients from the stored parameters, cema_pallas with
default_config, and jax.vjp of both against a cotangent of y. Then counts, in the lowered StableHLO
(before XLA's fusion, which needs a GPU), the Pallas (Triton) custom calls by name and grid, and
the XLA ops around them by kind: all of them, those left once identical ops are merged (as XLA's
CSE does), and of those the CEMA op's own (not cema_coefficients' or its gradient's). Each XLA
GPU kernel is a fusion of such ops, so the counts bound the glue kernels only loosely (XLA may
fuse several ops, or siblings, into one kernel; transposes and reduces usually get their own).
"Pallas-call operands written by XLA ops" counts the operands that some XLA computation must
write (not a parameter, not another Pallas call's result through reshapes), a closer proxy for
the small glue kernels of a device trace.

Ops that never make a kernel of their own are left out: constants, reshapes, broadcasts, iotas and
returns. "on [B, L, D]" counts the ops whose result has at least L * D entries (the cast of dy,
the gradient of bf16 x): each a pass over the sequence, not a coefficient-sized kernel.
"""
from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import json
import math
import os
import re
import sys

_FREE = {"stablehlo.constant", "stablehlo.reshape", "stablehlo.broadcast_in_dim", "stablehlo.iota",
         "func.return", "stablehlo.return", "stablehlo.optimization_barrier"}
_MOVES = {"stablehlo.pad", "stablehlo.scatter", "stablehlo.concatenate", "stablehlo.slice",
          "stablehlo.dynamic_slice", "stablehlo.dynamic_update_slice", "stablehlo.gather"}
_TRITON = "__gpu$xla.gpu.triton"


def lower_cema_gradient(overrides: dict, batch: int = 1, length: int = 32768, dim: int = 4096,
                        ndim: int = 16, coefficients: bool = True):
  """The lowered (CUDA) jax.vjp of cema_pallas as bench_ops' fwdbwd runs it."""
  import jax
  import jax.numpy as jnp

  from kernels_pallas import cema as K
  from megalodon_jax.ops.cema import CemaCoefficients, cema_coefficients

  cfg = dataclasses.replace(K.default_config(batch, length, dim, ndim), **overrides)
  spec = jax.ShapeDtypeStruct
  if coefficients:
    params = {"alpha": spec((dim, ndim, 1), jnp.float32), "delta": spec((dim, ndim, 1), jnp.float32),
              "theta": spec((dim, 1, 1), jnp.float32), "gamma": spec((dim, ndim, 2), jnp.float32),
              "omega": spec((dim, 1), jnp.float32)}
  else:
    params = {"p": spec((dim, ndim), jnp.float32), "q": spec((dim, ndim), jnp.complex64),
              "eta": spec((dim, ndim), jnp.complex64), "omega": spec((dim, 1), jnp.float32)}

  def fn(x, params):
    if coefficients:
      coeffs = cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
    else:
      coeffs = CemaCoefficients(params["p"], params["q"], params["eta"])
    return K.cema_pallas(x, coeffs, params["omega"].reshape(-1), config=cfg, interpret=False,
                         platform="gpu")

  def fwdbwd(primals, ct):
    y, vjp = jax.vjp(fn, *primals)
    return y, vjp(ct)

  avals = ((spec((batch, length, dim), jnp.bfloat16), params), spec((batch, length, dim), jnp.float32))
  traced = jax.jit(fwdbwd).trace(*avals)
  try:
    return traced.lower(lowering_platforms=("cuda",)), cfg
  except RuntimeError as error:
    if "abstract GPU" not in str(error):
      raise
  # jax 0.11 wants an abstract GPU to lower Triton kernels for CUDA without one (tests/conftest.py).
  from jax._src import mesh as mesh_lib
  device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((), (), abstract_device=device)):
    return jax.jit(fwdbwd).trace(*avals).lower(lowering_platforms=("cuda",)), cfg


def _result_size(op) -> int:
  sizes = [math.prod(r.type.shape) for r in op.results if hasattr(r.type, "shape")]
  return max(sizes, default=0)


def _where(location: str) -> str:
  """The two innermost Python frames of an op's location, as 'function:line < caller:line'."""
  frames = re.findall(r'callsite\("([^"]+)"\("[^"]*":(\d+)', location)
  return " < ".join(f"{name}:{line}" for name, line in frames[:2]) or location


def _kernel_name(op) -> str:
  config = op.attributes["mhlo.backend_config"]
  return str(config["name"]).strip('"')


def _kernel_grid(op) -> tuple[int, ...]:
  config = op.attributes["mhlo.backend_config"]
  return tuple(int(str(config[f"grid_{axis}"]).split(":")[0]) for axis in "xyz")


def _kind(name: str) -> str:
  if name == "stablehlo.transpose":
    return "transpose"
  if name == "stablehlo.reduce":
    return "reduce"
  if name in _MOVES:
    return "pad/scatter/slice/concat"
  return "elementwise"


def count_ops(module, big: int) -> dict:
  """Counts in the public main function of a lowered StableHLO module (jax inlines its calls).

  Returns {"pallas": {name: count}, "grids": [(name, grid)], "fed_by_xla": int, "ops": [one dict
  per counted XLA op: op, kind, shapes, where (source frames), big (a result of >= big entries),
  coefficients (from cema_coefficients or its gradient, outside the CEMA op), repeat (an identical
  op, same operands and attributes, came before: XLA's CSE merges it)]}."""
  main = [op for op in module.body.operations if op.operation.name == "func.func"
          and str(op.attributes["sym_name"]).strip('"') == "main"][0]
  pallas, grids, ops = collections.Counter(), [], []
  fed = 0
  origin = {}  # value -> "pallas" | "xla" (function arguments: absent), following reshapes
  canonical, seen = {}, {}  # value -> the value of the first identical op; op key -> its results

  def name_of(value):
    return canonical.get(value.get_name(), value.get_name())

  for op in main.regions[0].blocks[0].operations:
    name = op.operation.name
    results = [r.get_name() for r in op.results]
    if name == "func.call":
      raise NotImplementedError("a call in main: count its callee (jax inlines them at this version)")
    if name == "stablehlo.custom_call" and str(op.attributes["call_target_name"]).strip('"') == _TRITON:
      pallas[_kernel_name(op)] += 1
      grids.append((_kernel_name(op), _kernel_grid(op)))
      fed += sum(origin.get(v.get_name()) == "xla" for v in op.operands)
      kind = "pallas"
    else:
      # (Regions, e.g. a reduce's body, are not part of the key: fine for the few reduces here.)
      attrs = tuple(sorted(str(op.attributes[i]) for i in range(len(op.attributes))))
      key = (name, tuple(name_of(v) for v in op.operands), str([r.type for r in op.results]), attrs)
      repeat = key in seen
      if repeat:
        canonical.update(zip(results, seen[key]))
      else:
        seen[key] = results
      if name in ("stablehlo.reshape", "stablehlo.bitcast_convert"):
        kind = origin.get(op.operands[0].get_name())
      elif name in _FREE:
        kind = "xla"
      else:
        where = _where(str(op.location))
        ops.append({"op": name, "kind": _kind(name), "where": where, "repeat": repeat,
                    "shapes": [list(r.type.shape) for r in op.results if hasattr(r.type, "shape")],
                    "big": _result_size(op) >= big, "coefficients": where.startswith("cema_coefficients")})
        kind = "xla"
    for r in results:
      origin[r] = kind
  return {"pallas": dict(pallas), "grids": grids, "fed_by_xla": fed, "ops": ops}


def summary(counts: dict) -> dict:
  """{row: {kind: count}}: every counted XLA op, those left after CSE, and of those the ones of the
  CEMA op itself (not cema_coefficients); "total" sums the kinds."""
  rows = {"all XLA ops": lambda o: True, "after CSE": lambda o: not o["repeat"],
          "after CSE, CEMA op only": lambda o: not o["repeat"] and not o["coefficients"],
          "on [B, L, D]": lambda o: o["big"]}
  table = {}
  for row, keep in rows.items():
    kinds = collections.Counter(o["kind"] for o in counts["ops"] if keep(o))
    table[row] = {"total": sum(kinds.values()), **dict(sorted(kinds.items()))}
  return table


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="{}", help="CemaKernelConfig overrides, as a dict")
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--order", type=int, default=16)
  parser.add_argument("--no-coefficients", action="store_true",
                      help="differentiate p, q, eta directly (no cema_coefficients around the op)")
  parser.add_argument("--list", action="store_true", help="list every counted XLA op with its source")
  parser.add_argument("--json", default=None, help="also write the counts here")
  parser.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", ".."),
                      help="import kernels_pallas and megalodon_jax from this checkout (e.g. an export "
                           "of another commit, for before / after counts); default: this one")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.abspath(args.root))
  lowered, cfg = lower_cema_gradient(ast.literal_eval(args.config), length=args.length, dim=args.dim,
                                     ndim=args.order, coefficients=not args.no_coefficients)
  counts = count_ops(lowered.compiler_ir("stablehlo"), big=args.length * args.dim)
  print(cfg)
  print(f"Pallas calls: {sum(counts['pallas'].values())}:",
        ", ".join(f"{k} x{v}" for k, v in sorted(counts["pallas"].items())))
  print("  grids (x, y, z):", ", ".join(f"{k} {g}" for k, g in counts["grids"]))
  print("XLA ops by op:", ", ".join(f"{k.split('.')[-1]} x{v}" for k, v in sorted(
      collections.Counter(o["op"] for o in counts["ops"]).items())))
  table = summary(counts)
  kinds = ["total", "elementwise", "transpose", "reduce", "pad/scatter/slice/concat"]
  print(f"{'XLA ops':26s}" + "".join(f"{k:>26s}" if k.startswith("pad") else f"{k:>12s}" for k in kinds))
  for row, values in table.items():
    print(f"{row:26s}" + "".join(f"{values.get(k, 0):>26d}" if k.startswith("pad") else f"{values.get(k, 0):>12d}"
                                 for k in kinds))
  print(f"Pallas-call operands written by XLA ops: {counts['fed_by_xla']}")
  if args.list:
    for o in counts["ops"]:
      print(f"{o['op']:28s} {str(o['shapes']):20s} {o['where']}{'  (repeat)' if o['repeat'] else ''}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": dataclasses.asdict(cfg), "pallas": counts["pallas"], "grids": counts["grids"],
                 "xla": table, "fed_by_xla": counts["fed_by_xla"]}, f, indent=1)


if __name__ == "__main__":
  main()
