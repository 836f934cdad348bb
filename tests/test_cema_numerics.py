"""The CEMA numerics tool: its float64 reference, its error metrics, and the ci preset's bounds."""

import csv
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cema_numerics as cn
from experiments import cema_reference


# ----------------------------------------------------------------------------------------------
# The float64 reference against autodiff of a plain float64 scan.
# ----------------------------------------------------------------------------------------------

def _plain_scan_with_grads(x, w, p, q, eta, omega):
  """y, h_L and the gradients of sum(y * w) by jax.grad through a one-step-per-iteration scan."""
  with jax.enable_x64(True):
    def loss(x, p, q, eta):
      def step(h, x_t):
        h = q * h + p * x_t[..., None]
        return h, jnp.sum(jnp.real(eta * h), axis=-1) + omega * x_t
      h0 = jnp.zeros((x.shape[0],) + p.shape, jnp.complex128)
      h, ys = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
      y = jnp.swapaxes(ys, 0, 1)
      return jnp.sum(y * w), (y, h)
    (_, (y, h)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, p, q, eta)
    return {"y": np.asarray(y), "h": np.asarray(h), "dx": np.asarray(grads[0]),
            "dp": np.asarray(grads[1]), "dq": np.asarray(grads[2]), "deta": np.asarray(grads[3])}


def test_reference_matches_autodiff_of_a_plain_float64_scan(rng):
  batch, length, dim, order = 2, 37, 3, 4  # 37 is no multiple of any block: front padding
  x = rng.normal(size=(batch, length, dim))
  w = rng.normal(size=(batch, length, dim))
  p = rng.uniform(0.5, 1.0, (dim, order))
  q = rng.uniform(0.9, 0.999, (dim, order)) * np.exp(1j * rng.uniform(0, np.pi, (dim, order)))
  eta = rng.normal(size=(dim, order)) + 1j * rng.normal(size=(dim, order))
  omega = rng.normal(size=dim)
  expected = _plain_scan_with_grads(x, w, p, q, eta, omega)
  for block in (None, 1, 4, 64):
    got = cema_reference.reference(x, w, p, q, eta, omega, block=block)._asdict()
    for name, value in expected.items():
      err = np.max(np.abs(got[name] - value)) / np.max(np.abs(value))
      assert err < 1e-12, f"block {block}, {name}: {err}"


def test_reference_rejects_mismatched_shapes():
  x = np.zeros((1, 8, 3))
  with pytest.raises(ValueError, match="batch, length, dim"):
    cema_reference.reference(x, np.zeros((1, 8, 2)), np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)))
  with pytest.raises(ValueError, match="D=3"):
    cema_reference.reference(x, x, np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)))


# ----------------------------------------------------------------------------------------------
# Metrics, regimes, flags.
# ----------------------------------------------------------------------------------------------

def test_rel_err_and_windows(rng):
  ref = rng.normal(size=(2, 300, 3))
  assert cn.rel_err(ref * (1 + 1e-3), ref) == pytest.approx(1e-3, rel=1e-9)
  assert cn.rel_err(ref + 1e-2 * np.linalg.norm(ref) / np.sqrt(ref.size), ref) == pytest.approx(1e-2, rel=1e-9)
  assert cn.position_windows(1000) == [(0, 256), (256, 512), (512, 1000)]
  assert cn.position_windows(100) == [(0, 100)]


def test_regime_coefficients_have_the_requested_magnitude_and_phases():
  p, q, eta = cn.regime_coefficients(cn.Regime("r", 1e-4), dim=4, order=8, seed=0)
  assert q.dtype == np.complex64 and p.dtype == np.float32 and eta.dtype == np.complex64
  np.testing.assert_allclose(np.abs(q.astype(np.complex128)), 1 - 1e-4, rtol=1e-6)
  phases = np.angle(q.astype(np.complex128)).ravel()
  np.testing.assert_allclose(np.abs(phases), np.linspace(0, np.pi, 32), atol=1e-6)
  assert 0.5 <= p.min() and p.max() < 1.0
  with pytest.raises(ValueError, match=r"1 - \|q\|"):
    cn.regime_coefficients(cn.Regime("bad", 0.7), 4, 8, 0)


def test_settings_validation_says_what_is_wrong():
  with pytest.raises(ValueError, match="unknown paths"):
    cn.run(dataclasses.replace(cn.PRESETS["ci"], paths=("scan",)))
  with pytest.raises(ValueError, match="neither paths nor dtypes"):
    cn.run(dataclasses.replace(cn.PRESETS["ci"], max_length=(("assoc", 8),)))
  with pytest.raises(ValueError, match="one_minus_q"):
    cn.run(dataclasses.replace(cn.PRESETS["ci"], one_minus_q=(1.5,)))


def test_flags_override_the_preset():
  from absl import flags
  values = flags.FlagValues()
  cn.define_flags(values)
  values(["prog", "--preset=ci", "--lengths=512,128", "--max_length=fft=256,bfloat16=64",
          "--one_minus_q=0.1", "--timing=", "--dim=4"])
  settings = cn.settings_from_flags(values)
  assert settings.lengths == (512, 128) and settings.dim == 4 and settings.timing == ()
  assert settings.caps() == {"fft": 256, "bfloat16": 64} and settings.one_minus_q == (0.1,)
  assert settings.order == cn.PRESETS["ci"].order  # not given: the preset's
  values = flags.FlagValues()
  cn.define_flags(values)
  values(["prog", "--max_length=fft"])
  with pytest.raises(ValueError, match="max_length"):
    cn.settings_from_flags(values)


# ----------------------------------------------------------------------------------------------
# The ci preset: every XLA path, float32 errors within the stated bounds.
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("cema_numerics")
  results = cn.run(cn.PRESETS["ci"], out, log=lambda message: None)
  return results, out


def test_ci_preset_float32_errors_are_within_bounds(ci_run):
  results, _ = ci_run
  assert not results["failures"] and not results["skipped"]
  assert cn.bound_violations(results) == []
  settings = cn.PRESETS["ci"]
  expected = {(path, length, regime.label) for path in settings.paths for length in settings.lengths
              for regime in cn.regimes(settings) if cn._run_allowed(settings, path, "float32", length)}
  got = {(r["path"], r["length"], r["regime"]) for r in results["errors"] if r["dtype"] == "float32"}
  assert got == expected
  assert max(results["reference_check"].values()) < 1e-12


def test_bound_check_catches_a_large_error(ci_run):
  results, _ = ci_run
  broken = json.loads(json.dumps(results))
  broken["errors"][0]["dq"] = 1e-2
  assert len(cn.bound_violations(broken)) == 1


def test_ci_preset_bf16_inputs(ci_run):
  """Each path's own error with bf16 inputs is float32-sized; rounding the inputs costs ~1e-3."""
  results, _ = ci_run
  bf16 = [r for r in results["errors"] if r["dtype"] == "bfloat16"]
  assert {r["path"] for r in bf16} == set(cn.PRESETS["ci"].paths)
  assert max(r["y"] for r in bf16) < cn.FLOAT32_BOUNDS["y"]
  # dx comes back in bf16 (the input's dtype), so it carries bf16 rounding: 2^-9 relative at most.
  assert all(1e-4 < r["dx"] < 2 ** -8 for r in bf16)
  rounding = results["rounding"]
  assert rounding and all(5e-4 < r["y"] < 1e-2 for r in rounding)


def test_ci_preset_writes_json_csv_and_timings(ci_run):
  results, out = ci_run
  stem = out / cn.results_stem(results)
  loaded = json.loads(stem.with_suffix(".json").read_text())
  assert len(loaded["errors"]) == len(results["errors"])
  with open(out / f"{stem.name}_errors.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(results["errors"]) + len(results["rounding"])
  assert float(rows[0]["y"]) == pytest.approx(results["errors"][0]["y"], rel=1e-3)
  timed = {t["path"] for t in results["timings"]}
  assert timed == set(cn.PRESETS["ci"].paths)
  assert all(t["fwd_bwd_median_ms"] > 0 for t in results["timings"])


def test_plots_and_summary_from_the_json(ci_run, tmp_path):
  results, out = ci_run
  loaded = json.loads((out / f"{cn.results_stem(results)}.json").read_text())
  written = cn.plot(loaded, tmp_path)
  names = {p.name.split("_cpu_")[-1] for p in written}
  assert names == {"error_vs_length.png", "error_vs_q.png", "error_vs_position.png",
                   "error_vs_phase.png", "bf16.png", "time_vs_length.png"}
  assert all(p.stat().st_size > 10_000 for p in written)
  text = cn.summary(loaded)
  assert "sequential" in text and "input rounding" in text


def test_merging_runs_made_in_pieces_gives_back_the_whole_run(ci_run):
  """The H200 study ran as pieces (split by length); merged, they must equal one run's table."""
  results, _ = ci_run
  whole = json.loads(json.dumps(results))
  short, long_ = sorted(whole["settings"]["lengths"])
  parts = []
  for keep, skip in ((short, long_), (long_, short)):
    part = json.loads(json.dumps(whole))
    for key in ("errors", "rounding", "timings"):
      part[key] = [r for r in part[key] if r["length"] == keep]
    part["settings"]["lengths"] = [keep, skip]
    part["skipped"] = [{"path": "*", "dtype": "*", "length": skip, "reason": "budget"}]
    part["elapsed_s"] = 1.5
    parts.append(part)
  merged = cn.merge_results(parts)
  key = lambda r: (r["path"], r["dtype"], r["length"], r["regime"])
  assert sorted(map(key, merged["errors"])) == sorted(map(key, whole["errors"]))
  assert sorted(merged["errors"], key=key) == sorted(whole["errors"], key=key)
  assert len(merged["timings"]) == len(whole["timings"])
  assert merged["skipped"] == []  # each part's skipped length was measured by the other
  assert sorted(merged["settings"]["lengths"]) == [short, long_]
  assert merged["elapsed_s"] == 3.0 and len(merged["metadata"]["merged_from"]) == 2
  # A skip nobody made up for stays listed.
  parts[1]["skipped"] = [{"path": "fft", "dtype": "float32", "length": 99, "reason": "budget"}]
  assert cn.merge_results(parts)["skipped"] == parts[1]["skipped"]
  other = json.loads(json.dumps(parts[1]))
  other["settings"]["dim"] += 1
  with pytest.raises(ValueError, match="settings.dim"):
    cn.merge_results([parts[0], other])
  other = json.loads(json.dumps(parts[1]))
  other["metadata"]["device"] = "elsewhere"
  with pytest.raises(ValueError, match="different devices"):
    cn.merge_results([parts[0], other])


def test_textbook_fft_kernel_drifts_where_the_project_fft_does_not(rng):
  """The metric sees a real loss of accuracy: exp(t log q) powers at |q| = 1 - 1e-6 over 4096 steps."""
  from megalodon_jax.ops import cema as cema_ops
  p, q, eta = cn.regime_coefficients(cn.Regime("r", 1e-6), dim=4, order=4, seed=0)
  x = rng.standard_normal((1, 4096, 4)).astype(np.float32)
  ref = cema_reference.reference(x, np.zeros_like(x), p, q, eta, with_dx=False)
  coeffs = cema_ops.CemaCoefficients(jnp.asarray(p), jnp.asarray(q), jnp.asarray(eta))
  textbook = cn.fft_expq(jnp.asarray(x), coeffs, return_state=False)
  project = cema_ops.cema(jnp.asarray(x), coeffs, jnp.zeros(4), method="fft")
  assert cn.rel_err(project, ref.y) < 1e-6
  assert cn.rel_err(textbook, ref.y) > 1e-5


def test_pallas_kernel_in_the_interpreter_is_within_bounds(tmp_path):
  settings = dataclasses.replace(cn.PRESETS["ci"], paths=("pallas",), lengths=(256,), bf16_lengths=(),
                                 timing=())
  results = cn.run(settings, tmp_path, log=lambda message: None)
  assert not results["failures"]
  assert {r["path"] for r in results["errors"]} == {"pallas"}
  assert cn.bound_violations(results) == []
