"""The CPU XLA flags are chosen by jaxlib version: XLA aborts the process on a flag it does not know."""

import os

from megalodon_jax import xla_flags


def test_fusion_emitter_flag_only_for_jaxlib_that_has_it():
  old = xla_flags.cpu_flags((0, 10, 2))
  new = xla_flags.cpu_flags((0, 11, 2))
  assert "--xla_cpu_use_fusion_emitters=false" in old
  assert "--xla_cpu_use_fusion_emitters=false" not in new
  assert "--xla_cpu_multi_thread_eigen=false" in old and "--xla_cpu_multi_thread_eigen=false" in new


def test_installed_jaxlib_accepts_the_chosen_flags():
  """conftest set XLA_FLAGS from cpu_flags() before JAX started; had a flag been unknown, the
  process would have aborted at the first computation."""
  import jax.numpy as jnp
  if not os.environ.get("MEGALODON_TEST_PLATFORM"):  # the CPU run: conftest added them
    for flag in xla_flags.cpu_flags():
      assert flag in os.environ["XLA_FLAGS"]
  assert float(jnp.arange(4.0).sum()) == 6.0


def test_add_xla_flags_keeps_a_flag_already_set(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
  result = xla_flags.add_xla_flags("--xla_cpu_multi_thread_eigen=false", "--xla_force_host_platform_device_count=2")
  assert result == "--xla_cpu_multi_thread_eigen=true --xla_force_host_platform_device_count=2"
