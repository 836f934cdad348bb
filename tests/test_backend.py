"""What 'auto' resolves to on each backend (megalodon_jax.ops.backend)."""

import jax
import pytest

from megalodon_jax.ops import backend


@pytest.mark.parametrize("platform, long_input, short_input", [
    ("gpu", ("pallas", "pallas"), ("sequential", "associative")),
    ("tpu", ("pallas", "associative"), ("sequential", "associative")),
    ("cpu", ("blocked", "associative"), ("sequential", "associative")),
])
def test_auto_methods_per_backend(monkeypatch, platform, long_input, short_input):
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  monkeypatch.setattr(backend, "triton_unavailable_reason", lambda: None)  # a GPU that runs the kernels
  for length, (cema, tsn) in ((4096, long_input), (1, short_input)):
    assert backend.cema_method("auto", length) == cema
    assert backend.timestep_norm_method("auto", length) == tsn


def test_explicit_methods_pass_through():
  assert backend.cema_method("fft", 4096) == "fft"
  assert backend.timestep_norm_method("xla", 4096) == "associative"
  assert backend.timestep_norm_method("pallas", 1) == "pallas"
