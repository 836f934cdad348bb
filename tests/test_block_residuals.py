"""remat_policy "recompute_elementwise": the block stores matmul/kernel/reduction outputs and
recomputes elementwise work in the backward (model.recompute_elementwise). Same loss and gradients
as "none" (every linearisation point stored), far fewer stored bytes."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from megalodon_jax import model as model_lib
from megalodon_jax.config import preset
from megalodon_jax.model import MegalodonLM

# Scanned layers, as bench_train runs them; tiny shapes (D=32, H=2, C=8), one layer and the
# sequential CEMA scan to keep the CPU compiles short (what is stored does not depend on either).
CFG32 = preset("tiny", scan_layers=True, num_layers=1, cema_method="sequential")
CFG16 = CFG32.replace(dtype="bfloat16")
_DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "bool": 1, "c64": 8}


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(CFG32, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
  keys = jax.random.split(jax.random.key(1), 2)
  inputs = jax.random.randint(keys[0], (2, 3 * CFG32.chunk_size), 0, CFG32.vocab_size)
  targets = jax.random.randint(keys[1], inputs.shape, 0, CFG32.vocab_size)
  return inputs, targets


def _loss_fn(cfg, policy):
  model = MegalodonLM(cfg.replace(remat_policy=policy))
  def loss(p, inputs, targets):
    logits = model.apply({"params": p}, inputs)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return jnp.mean(logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0])
  return loss


_GRADS = {}


def _value_and_grad(cfg, policy, params, batch):
  key = (cfg.dtype, policy)
  if key not in _GRADS:  # each variant is compiled once for the whole file
    _GRADS[key] = jax.jit(jax.value_and_grad(_loss_fn(cfg, policy)))(params, *batch)
  return _GRADS[key]


def _float64(tree):
  return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


def test_float32_loss_and_gradients_equal_those_of_none(params, batch):
  loss_new, grads_new = _value_and_grad(CFG32, "recompute_elementwise", params, batch)
  loss_old, grads_old = _value_and_grad(CFG32, "none", params, batch)
  np.testing.assert_allclose(float(loss_new), float(loss_old), rtol=1e-6)
  for new, old in zip(_float64(grads_new), _float64(grads_old)):
    # float32 rounding: the recomputed elementwise values are the stored ones, up to fusion order.
    np.testing.assert_allclose(new, old, rtol=2e-5, atol=1e-7 * max(1.0, np.abs(old).max()))
  # Real gradients, not all zero: every parameter gets one.
  assert all(np.abs(g).max() > 0 for g in _float64(grads_new))


@pytest.mark.slow  # two more compiles of the train step (~1 min on 2 CPU cores)
def test_bfloat16_gradients_as_accurate_as_those_of_none(params, batch):
  """bf16 compute: both policies are judged against the float32 computation of the same step."""
  _, reference = _value_and_grad(CFG32, "recompute_elementwise", params, batch)
  loss_new, grads_new = _value_and_grad(CFG16, "recompute_elementwise", params, batch)
  loss_old, grads_old = _value_and_grad(CFG16, "none", params, batch)
  np.testing.assert_allclose(float(loss_new), float(loss_old), rtol=1e-3)
  err = lambda grads: sum(np.sum((g - r) ** 2) for g, r in zip(_float64(grads), _float64(reference)))
  norm = sum(np.sum(r ** 2) for r in _float64(reference))
  rel_new, rel_old = np.sqrt(err(grads_new) / norm), np.sqrt(err(grads_old) / norm)
  assert rel_new < 2e-2, rel_new  # bf16 rounding of activations, not a wrong gradient
  assert rel_new < 1.5 * rel_old + 1e-3, (rel_new, rel_old)


def test_forward_without_differentiation_is_unchanged(params, batch):
  inputs, _ = batch
  forward = lambda policy: jax.jit(MegalodonLM(CFG16.replace(remat_policy=policy)).apply)({"params": params}, inputs)
  new, old = forward("recompute_elementwise"), forward("none")
  np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def _saved(policy, inputs) -> tuple[str, int]:
  """print_saved_residuals' listing (without the arguments) and its total bytes.

  Unrolled layers: under nn.scan the listing would show the scan's stacked outputs, not their sources.
  """
  cfg = CFG16.replace(scan_layers=False, num_layers=2, remat_policy=policy)
  model = MegalodonLM(cfg)
  params = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))  # tracing only
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(lambda p: jnp.mean(model.apply({"params": p}, inputs)), params)
  lines = [line for line in out.getvalue().splitlines() if "from the argument" not in line]
  total = 0
  for line in lines:
    match = re.match(r"\s*(\w+)\[([\d,]*)\]", line)
    assert match, line
    dims = [int(d) for d in match.group(2).split(",") if d]
    total += _DTYPE_BYTES[match.group(1)] * int(np.prod(dims, dtype=np.int64))
  return "\n".join(lines), total


def test_only_matmul_kernel_and_reduction_outputs_are_stored(batch):
  inputs, _ = batch
  new, new_bytes = _saved("recompute_elementwise", inputs)
  old, old_bytes = _saved("none", inputs)
  # "none" stores silu's linearisation points and the gated product.
  assert "'silu'" in old and "output of mul" in old
  # Inside the blocks (the output head keeps its bf16 casts of x and the kernel; each layer's
  # output is stored as the next layer's input, as under nn.scan).
  new = "\n".join(line for line in new.splitlines() if "logits.py" not in line)
  for elementwise in ("'silu'", "output of mul", "output of sub", "output of convert_element_type",
                      "output of logistic", "output of stack", "Dense.__call__"):
    assert elementwise not in new, elementwise
  assert "output of dot_general" in new and "output of reduce_sum" in new
  assert "named 'mega_out'" in new  # the first hop's output, instead of its two projections
  assert new_bytes < 0.6 * old_bytes, (new_bytes, old_bytes)


def test_policy_recomputes_elementwise_and_keeps_the_rest():
  prim = lambda name: type("Prim", (), {"name": name})()
  f32 = jax.ShapeDtypeStruct((4, 8), jnp.float32)
  c64 = jax.ShapeDtypeStruct((4, 8), jnp.complex64)
  policy = model_lib.recompute_elementwise
  assert model_lib.REMAT_POLICIES["recompute_elementwise"] is policy
  for name in ("mul", "add", "logistic", "convert_element_type", "rsqrt", "name", "stack"):
    assert not policy(prim(name), f32), name
  for name in ("dot_general", "pallas_call", "reduce_sum", "reduce_max", "cumsum", "custom_vjp_call"):
    assert policy(prim(name), f32), name
  assert policy(prim("name"), f32, name="mega_out") and not policy(prim("name"), f32, name="tsn_out")
  # Complex values cannot be stored; their real and imaginary parts can.
  assert not policy(prim("dot_general"), c64, c64)
  assert policy(prim("real"), c64) and policy(prim("imag"), c64)


def test_bench_train_accepts_the_policy_and_gives_llama_its_no_recompute_policy():
  from experiments.benchmarks import bench_train
  args = bench_train.parse_args(["--smoke", "--shapes", "1x32", "--remat", "recompute_elementwise"])
  assert [(s.arch, s.remat) for s in bench_train.row_specs(args)] == [("llama", "none"),
                                                                      ("megalodon", "recompute_elementwise")]
