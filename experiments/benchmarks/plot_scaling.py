"""Scaling efficiency of bench_scaling results as one bar chart (PNG), with each row's target.

Every row on more than one device with a `data` or `sequence` mode becomes a bar: tokens/s per
GPU over one GPU's tokens/s. The one-GPU row comes from the same file when it has one (as
bench_scaling computes `efficiency`), else from the nearest earlier file in the list with the same
size, mode, remat and tokens per GPU; a row without either is left out (and said so). A row
without a target (bench_scaling sets none without the one-GPU row) takes the same key's last one.

  python -m experiments.benchmarks.plot_scaling \\
      --files experiments/results/2026-11-28_nvidia-h200x2_scaling-200m.json,... \\
      --labels "2026-11-28,Pallas tables,..." --out docs/images/scaling_2x_h200.png
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from absl import app, flags


def _tokens_per_gpu_shape(row: dict[str, Any]) -> tuple[int, int]:
  """(rows, length) per GPU: the data rows grow with the devices, a sequence is split."""
  rows, length = (int(v) for v in row["shape"].split("x"))
  if row["mode"] == "data":
    return rows // row["devices"], length
  return rows, length


def _key(row: dict[str, Any]) -> tuple:
  return row["size"], row["mode"], row["remat"], row["shape"] if row["mode"] == "sequence" else _tokens_per_gpu_shape(row)


def _target(row: dict[str, Any]) -> float | None:
  match = re.search(r"([\d.]+)\s*%", row.get("target") or "")
  return float(match.group(1)) / 100 if match else None


def scaling_bars(files: Sequence[str], labels: Sequence[str] | None = None) -> tuple[list[dict], list[str]]:
  """([{label, efficiency, target, devices}], [what was left out]) from bench_scaling JSON files."""
  labels = list(labels) if labels else [f.rsplit("/", 1)[-1] for f in files]
  if len(labels) != len(files):
    raise ValueError(f"{len(labels)} labels for {len(files)} files; give one label per file (or none)")
  bars, skipped, single, targets = [], [], {}, {}
  for path, label in zip(files, labels):
    with open(path) as f:
      rows = json.load(f)["rows"]
    for row in rows:  # this file's one-GPU rows first, so that they win over earlier files'
      if row.get("devices") == 1 and row.get("tokens_per_s"):
        single[_key(row)] = row["tokens_per_s"]
    for row in rows:
      if row.get("devices", 1) < 2 or row.get("mode") not in ("data", "sequence"):
        continue
      if _target(row) is not None:
        targets[_key(row)] = _target(row)
      name = f"{row['size']} {row['mode']} {row['shape']} ({label})"
      efficiency = row.get("efficiency")
      if efficiency is None and _key(row) in single:
        efficiency = row["tokens_per_s_per_gpu"] / single[_key(row)]
      if efficiency is None:
        skipped.append(f"{name}: no one-GPU row to compare with")
        continue
      bars.append({"label": name, "efficiency": float(efficiency), "target": targets.get(_key(row)),
                   "devices": row["devices"]})
  return bars, skipped


def plot(bars: list[dict], out: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.2))
  ys = range(len(bars))[::-1]
  ax.barh(list(ys), [100 * b["efficiency"] for b in bars], color="#4c72b0")
  for y, b in zip(ys, bars):
    ax.text(100 * b["efficiency"] + 1, y, f"{100 * b['efficiency']:.1f}%", va="center", fontsize=8)
    if b["target"] is not None:
      ax.plot([100 * b["target"]] * 2, [y - 0.4, y + 0.4], color="#c44e52", lw=2)
  ax.set_yticks(list(ys), [b["label"] for b in bars], fontsize=8)
  ax.set_xlim(0, 110)
  ax.set_xlabel("tokens/s per GPU, % of one GPU (red: target)")
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


FLAGS = flags.FLAGS
flags.DEFINE_list("files", None, "bench_scaling JSON files, oldest first", required=True)
flags.DEFINE_list("labels", None, "one label per file (default: the file names)")
flags.DEFINE_string("out", "scaling.png", "the PNG to write")
flags.DEFINE_string("title", "Train-step scaling over 2 x H200 (bench_scaling)", "the chart's title")


def main(argv: Sequence[str]) -> None:
  del argv
  bars, skipped = scaling_bars(FLAGS.files, FLAGS.labels)
  for b in bars:
    target = "" if b["target"] is None else f" (target {100 * b['target']:.0f}%)"
    print(f"{b['label']}: {100 * b['efficiency']:.1f}%{target}")
  for s in skipped:
    print(f"left out: {s}")
  plot(bars, FLAGS.out, FLAGS.title)
  print(f"-> {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
