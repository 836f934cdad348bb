"""Counts what the CEMA kernels' value-and-gradient launches, on a machine with no GPU.

    python experiments/gpu_checks/count_cema_launches.py
    python experiments/gpu_checks/count_cema_launches.py --config "{'pallas_combine': False}" --list

Cross-lowers for CUDA (as sass_report.py does) what bench_ops times for the CEMA "fwdbwd" pass at
B=1, L=32768, D=4096, N=16, bf16 x: the coefficients from the stored parameters, cema_pallas with
default_config, and jax.vjp of both against a cotangent of y. Then counts, in the lowered StableHLO
(before XLA's fusion, which needs a GPU), the Pallas (Triton) custom calls by name and the XLA ops
around them by kind. Each XLA GPU kernel is a fusion of such ops, so the counts bound the glue
kernels only loosely (XLA may fuse several ops, or siblings, into one kernel); "operands fed by
XLA" is the number of Pallas-call operands that some XLA computation must write (not a parameter,
not another Pallas call's result through reshapes), a closer proxy for the small glue kernels of a
device trace.

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


def count_ops(module, big: int) -> dict:
  """Counts in the public main function of a lowered StableHLO module (callees inlined per call).

  Returns {"pallas": {name: count}, "grids": [(name, grid)], "xla": {op: count}, "xla_big":
  {op: count} (result >= big entries), "fed_by_xla": int, "listing": [(op, shape, location)]}."""
  from jax._src.interpreters import mlir  # noqa: F401 -- registers the dialects
  funcs = {}
  for op in module.body.operations:
    if op.operation.name == "func.func":
      funcs[str(op.attributes["sym_name"]).strip('"')] = op
  pallas, xla, xla_big = collections.Counter(), collections.Counter(), collections.Counter()
  listing, grids = [], []
  fed = 0

  def walk(func):
    nonlocal fed
    block = func.regions[0].blocks[0]
    args = set(id(a) for a in block.arguments)  # noqa: F841 -- kept for clarity of the rule below
    origin = {}  # value -> "arg" | "pallas" | "xla", following reshapes

    def source(value):
      return origin.get(value.get_name() if hasattr(value, "get_name") else str(value), "arg")

    for op in block.operations:
      name = op.operation.name
      results = [r.get_name() for r in op.results]
      if name == "stablehlo.custom_call" and str(op.attributes["call_target_name"]).strip('"') == _TRITON:
        pallas[_kernel_name(op)] += 1
        grids.append((_kernel_name(op), _kernel_grid(op)))
        fed += sum(source(v) == "xla" for v in op.operands)
        kind = "pallas"
      elif name == "func.call":
        callee = str(op.attributes["callee"]).lstrip("@")
        walk(funcs[callee])
        kind = "xla"
      elif name in ("stablehlo.reshape", "stablehlo.bitcast_convert") or name == "stablehlo.broadcast_in_dim":
        kind = source(op.operands[0]) if name != "stablehlo.broadcast_in_dim" else "xla"
      elif name in _FREE:
        kind = "xla"
      else:
        xla[name] += 1
        size = _result_size(op)
        if size >= big:
          xla_big[name] += 1
        listing.append((name, [list(r.type.shape) for r in op.results if hasattr(r.type, "shape")],
                        _where(str(op.location))))
        kind = "xla"
      for r in results:
        origin[r] = kind

  walk(funcs["main"])
  return {"pallas": dict(pallas), "grids": grids, "xla": dict(xla), "xla_big": dict(xla_big), "fed_by_xla": fed,
          "listing": listing}


def summary(counts: dict) -> dict:
  xla = counts["xla"]
  kinds = collections.Counter()
  for name, n in xla.items():
    if name == "stablehlo.transpose":
      kinds["transpose"] += n
    elif name == "stablehlo.reduce":
      kinds["reduce"] += n
    elif name in _MOVES:
      kinds["pad/scatter/slice/concatenate"] += n
    else:
      kinds["elementwise"] += n
  big = sum(counts["xla_big"].values())
  return {"pallas_calls": sum(counts["pallas"].values()), "xla_ops": sum(xla.values()),
          "xla_ops_on_[B,L,D]": big, "xla_ops_on_coefficients": sum(xla.values()) - big,
          **{f"xla_{k}": v for k, v in sorted(kinds.items())}, "operands_fed_by_xla": counts["fed_by_xla"]}


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
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
  lowered, cfg = lower_cema_gradient(ast.literal_eval(args.config), length=args.length, dim=args.dim,
                                     ndim=args.order, coefficients=not args.no_coefficients)
  counts = count_ops(lowered.compiler_ir("stablehlo"), big=args.length * args.dim)
  print(cfg)
  print("Pallas calls:", ", ".join(f"{k} x{v}" for k, v in sorted(counts["pallas"].items())))
  print("  grids (x, y, z):", ", ".join(f"{k} {g}" for k, g in counts["grids"]))
  print("XLA ops:", ", ".join(f"{k.split('.')[-1]} x{v}" for k, v in sorted(counts["xla"].items())))
  result = summary(counts)
  for key, value in result.items():
    print(f"  {key:32s} {value}")
  if args.list:
    for name, shapes, loc in counts["listing"]:
      print(f"{name:28s} {shapes} {loc}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": dataclasses.asdict(cfg), "summary": result, "pallas": counts["pallas"],
                 "grids": counts["grids"], "xla": counts["xla"]}, f, indent=1)


if __name__ == "__main__":
  main()
