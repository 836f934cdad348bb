"""experiments/benchmarks/plot_scaling.py: the efficiencies it plots, against hand-computed ratios."""

import json

import numpy as np
import pytest

from experiments.benchmarks import plot_scaling


def _row(mode, devices, shape, tokens_per_s, efficiency=None, target=None, size="200M"):
  row = {"size": size, "mode": mode, "devices": devices, "shape": shape, "remat": "none",
         "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / devices}
  if efficiency is not None:
    row["efficiency"] = efficiency
  if target is not None:
    row["target"] = target
  return row


def _write(path, rows):
  path.write_text(json.dumps({"rows": rows}))
  return str(path)


def test_efficiencies_targets_and_what_is_left_out(tmp_path):
  first = _write(tmp_path / "a.json", [
      _row("data", 1, "8x4096", 100.0), _row("data", 2, "16x4096", 190.0, 0.95, "efficiency >= 90%"),
      _row("sequence", 1, "1x32768", 200.0), _row("sequence", 2, "1x32768", 200.0, 0.5, "efficiency >= 85%")])
  # Only the two-GPU rows: the sequence row's one-GPU tokens/s and target come from a.json; the
  # 1.3B row has no one-GPU row anywhere; "long" rows are not scaling rows.
  second = _write(tmp_path / "b.json", [
      _row("sequence", 2, "1x32768", 300.0), _row("sequence", 2, "1x32768", 50.0, size="1.3B"),
      _row("long", 2, "1x65536", 80.0)])
  bars, skipped = plot_scaling.scaling_bars([first, second], ["before", "after"])
  got = {b["label"]: (b["efficiency"], b["target"]) for b in bars}
  assert got == {"200M data 16x4096 (before)": (0.95, 0.90), "200M sequence 1x32768 (before)": (0.5, 0.85),
                 "200M sequence 1x32768 (after)": (pytest.approx(150.0 / 200.0), 0.85)}
  assert skipped == ["1.3B sequence 1x32768 (after): no one-GPU row to compare with"]
  with pytest.raises(ValueError, match="one label per file"):
    plot_scaling.scaling_bars([first, second], ["only one"])

  out = tmp_path / "scaling.png"
  plot_scaling.plot(bars, str(out), "test")
  import matplotlib.image
  image = matplotlib.image.imread(str(out))
  assert image.ndim == 3 and image.shape[0] > 100 and np.std(image) > 0  # a drawn chart, not a blank
