"""A jax that cannot run Pallas' Triton backend (deprecated upstream in jax 0.11) must not break the
library: 'auto' falls back to the XLA paths with one warning, explicit 'pallas' is a clear error, and
the kernel modules still import (their TPU and Mosaic GPU kernels do not need Triton)."""

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import pytest

from kernels_pallas import triton_backend
from megalodon_jax import decoding
from megalodon_jax.config import ConfigError
from megalodon_jax.ops import attention, backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_this_jax_runs_the_triton_kernels():
  # On the CPU: the module imports. Under MEGALODON_TEST_PLATFORM=gpu: the probe kernel ran on the GPU.
  assert triton_backend.unavailable_reason() is None


def test_failed_probe_is_a_reason(monkeypatch):
  # Pretend the default backend is a GPU: the probe then compiles a Triton kernel for what is really
  # the CPU, which fails, as a jax whose GPU lowering is gone would.
  if jax.default_backend() != "cpu":
    pytest.skip("needs a CPU backend to stand in for a GPU whose Triton lowering fails")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  triton_backend._reason_on.cache_clear()
  try:
    reason = triton_backend.unavailable_reason()
  finally:
    triton_backend._reason_on.cache_clear()
  assert reason is not None and "16-element test kernel" in reason


@pytest.fixture
def gpu_without_triton(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(backend, "triton_unavailable_reason", lambda: "no Triton in this test")
  monkeypatch.setattr(backend, "_warned_fallback", False)


def test_auto_falls_back_to_xla_with_one_warning(gpu_without_triton):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert backend.cema_method("auto", 4096) == "blocked"
    assert backend.timestep_norm_method("auto", 4096) == "associative"
    assert not attention._pallas_available()
    assert decoding.default_fused_settings(1) == decoding.FusedSettings()
    assert decoding.default_fused_settings(16) == decoding.FusedSettings()
  messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  assert len(messages) == 1 and "no Triton in this test" in messages[0], messages


def test_explicit_pallas_is_a_config_error(gpu_without_triton):
  for call, option in ((lambda: backend.cema_method("pallas", 4096), "cema_method"),
                       (lambda: backend.timestep_norm_method("pallas", 4096), "timestep_norm_impl")):
    with pytest.raises(ConfigError, match=f"{option}='pallas' needs Pallas' Triton backend.*no Triton in this test"):
      call()
  assert backend.cema_method("blocked", 4096) == "blocked"  # XLA choices stay as asked


def test_tpu_keeps_its_kernels(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  monkeypatch.setattr(backend, "triton_unavailable_reason", lambda: "no Triton in this test")
  assert backend.cema_method("auto", 4096) == "pallas"
  assert backend.cema_method("pallas", 4096) == "pallas"


def test_library_without_the_triton_module():
  """In a fresh interpreter where `jax.experimental.pallas.triton` cannot be imported."""
  script = textwrap.dedent("""
      import sys
      sys.modules["jax.experimental.pallas.triton"] = None  # import now raises ImportError
      import jax, jax.numpy as jnp, numpy as np
      from kernels_pallas import cema, cema_summary, chunk_attention, decode_step, timestep_norm, triton_backend
      from megalodon_jax import model
      from megalodon_jax.config import ConfigError, preset
      from megalodon_jax.ops import backend, cema as cema_ops

      reason = triton_backend.unavailable_reason()
      assert reason is not None and "pallas.triton" in reason, reason
      try:
        backend.cema_method("pallas", 64)
      except ConfigError as error:
        assert "cema_method='pallas'" in str(error), error
      else:
        raise AssertionError("explicit pallas accepted")

      # A Triton kernel called anyway says what to do instead of failing on None.
      x = jnp.ones((1, 16, 4), jnp.float32)
      coeffs = cema_ops.cema_coefficients(jnp.zeros((4, 2, 1)), jnp.zeros((4, 2, 1)), jnp.zeros((4, 1, 1)),
                                          jnp.ones((4, 2, 2)))
      try:
        cema.cema_pallas(x, coeffs, jnp.zeros((4,)), interpret=True)
      except triton_backend.TritonBackendUnavailable as error:
        assert "cema_method='auto'" in str(error), error
      else:
        raise AssertionError("the Triton kernel ran without Triton")

      # The model on 'auto' still trains and matches the sequential CEMA reference path.
      cfg = preset("mega200M", num_layers=1, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64,
                   chunk_size=8, norm_num_groups=4, vocab_size=64)
      ref_cfg = preset("mega200M", num_layers=1, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64,
                       chunk_size=8, norm_num_groups=4, vocab_size=64, cema_method="sequential")
      params = model.init_params(cfg, jax.random.key(0))
      tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 64)
      loss = lambda c: lambda p: jnp.mean(model.MegalodonLM(c).apply({"params": p}, tokens) ** 2)
      got = jax.grad(loss(cfg))(params)
      want = jax.grad(loss(ref_cfg))(params)
      err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
      scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(want))
      assert err <= 1e-4 * scale, (err, scale)
      print("OK")
  """)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
