"""The smoke run of experiments/gpu_checks/check_sequence_parallel.py (--cpu: 2 CPU devices, tiny
shapes, the interpreted Pallas CEMA): every row timed, each sequence-parallel op equal to the
single-device op on the full length; and (slow) the sequence-parallel train step traced and dumped.

Subprocesses, because the script needs its own XLA_FLAGS (2 simulated devices, not conftest's 8)
before JAX starts. The first test takes about 40 s on 2 CPU cores, the second about 25 s.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "gpu_checks" / "check_sequence_parallel.py"
ROWS_PER_OP = {"cema": 14, "tsn": 4, "attention": 3}


def run_smoke(tmp_path: pathlib.Path, *extra: str) -> tuple[dict, str]:
  """Runs the script with --cpu; returns (its JSON, its stdout)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONUNBUFFERED"] = "1"
  out = tmp_path / "sp.json"
  argv = [sys.executable, str(SCRIPT), "--cpu", "--json", str(out), *extra]
  proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return json.loads(out.read_text()), proc.stdout


def test_smoke_times_every_row_and_sequence_parallel_equals_one_device(tmp_path):
  payload, stdout = run_smoke(tmp_path)
  rows = payload["rows"]
  assert {op: sum(r["op"] == op for r in rows) for op in ROWS_PER_OP} == ROWS_PER_OP
  assert len(rows) == sum(ROWS_PER_OP.values())
  for row in rows:
    assert not any(k.endswith("_error") for k in row), row
    for key in ("fwd_ms", "fwd_bwd_ms", "fwd_ratio", "fwd_bwd_ratio"):
      assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert row["devices"] in (1, 2) and row["length"] in (256, 512)
    if row["devices"] == 2:
      assert row["length"] == 512 and row["variant"].startswith("sequence_parallel")
  ideal = [r for r in rows if r["variant"].endswith("(ideal)")]
  assert len(ideal) == 3 and all(r["length"] == 256 and r["fwd_bwd_ratio"] == 1.0 for r in ideal)

  check = payload["value_check"]
  assert check["passed"], check
  assert set(check["ops"]) == set(ROWS_PER_OP)
  for op, entry in check["ops"].items():
    assert entry["y"] < 1e-4 and entry["loss_and_grads"] < 1e-4, (op, entry)
  for op in ("cema", "tsn"):  # the state carried across the slice boundary is not negligible
    assert check["ops"][op]["state_effect"] > 1e-3
  tables = payload["power_tables_check"]  # the Pallas power tables (interpreted here) vs XLA's
  assert tables["passed"] and 0.0 <= tables["tables"] < 1e-5 and 0.0 <= tables["slice_decay"] < 1e-5
  summary = payload["summary_check"]  # the chunk-summary kernel (interpreted) vs the XLA form
  assert summary["passed"] and {"h", "dx", "dalpha", "ddelta", "dtheta"} <= set(summary)
  assert all(0.0 <= v < 1e-5 for k, v in summary.items() if k != "passed")
  assert "steps" not in payload  # no step profile unless asked for
  assert "fwd_bwd_ratio" in stdout and "value check" in stdout


@pytest.mark.slow
def test_smoke_profiles_the_sequence_parallel_step(tmp_path):
  payload, _ = run_smoke(tmp_path, "--only", "attention", "--trace_dir", str(tmp_path / "trace"),
                         "--hlo_dir", str(tmp_path / "hlo"), "--step_length", "64")
  assert len(payload["rows"]) == ROWS_PER_OP["attention"] and payload["value_check"]["passed"]
  (step,) = payload["steps"]
  assert "error" not in step, step
  assert step["row"].startswith("tiny sequence n=2 1x64")
  assert math.isfinite(step["step_ms"]) and step["trace_files"] > 0 and step["trace_mib"] > 0
  assert pathlib.Path(step["hlo"]).stat().st_size > 0
  assert len(list((tmp_path / "hlo" / "ops").glob("attention-*.hlo.txt"))) == 2 * ROWS_PER_OP["attention"]


def test_kernels_option_traces_every_timed_program(tmp_path):
  """--kernels N: each timed program of the selected rows is traced (on the CPU the trace has no
  GPU kernels, which the row records as such instead of failing)."""
  payload, stdout = run_smoke(tmp_path, "--only", "cema", "--rows", "(ideal)", "--kernels", "2")
  (row,) = payload["rows"]
  assert row["variant"].endswith("(ideal)") and not any(k.endswith("_error") for k in row), row
  for key in ("fwd_kernels", "fwd_bwd_kernels"):
    assert "no GPU kernels" in row[key]["error"], row[key]
  assert "no GPU kernels" in stdout
