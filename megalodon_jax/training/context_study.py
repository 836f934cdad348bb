"""Perplexity against context length (the Megalodon paper's Figure 5, at small scale).

For each context length n, every evaluation document is cut into windows of n tokens and each
window is scored from an empty state; the mean loss over all scored tokens gives the perplexity
at that context. Windows run through `decoding.prefill`, so any n works with constant memory.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from megalodon_jax import data as data_lib
from megalodon_jax import decoding


def _documents(experiment, split: str, count: int, min_tokens: int) -> list[np.ndarray]:
  tokenizer = experiment.tokenizer()
  source = data_lib.open_split(experiment.data_cfg.dataset, split, experiment.data_cfg.data_dir)
  docs = []
  for example in source:
    key = experiment.data_cfg.text_key or ("book_text" if "book_text" in example else "text")
    text = example[key]
    ids = np.asarray(tokenizer.encode(text.decode("utf-8") if isinstance(text, bytes) else text), np.int32)
    if ids.size >= min_tokens:
      docs.append(ids)
    if len(docs) == count:
      break
  if not docs:
    raise ValueError(f"no document in split {split!r} has {min_tokens} tokens; use shorter context lengths")
  return docs


def perplexity_vs_context(experiment, params: Any, split: str, lengths: list[int], documents: int = 4) -> list[dict]:
  """[{context, tokens, loss, perplexity}] for each context length (same documents for all)."""
  docs = _documents(experiment, split, documents, max(lengths) + 1)
  rows = []
  for n in lengths:
    nll, count = 0.0, 0
    for ids in docs:
      usable = (ids.size - 1) // n * n
      for start in range(0, usable, n):
        window = ids[start:start + n + 1]
        logits, _ = decoding.prefill(params, experiment.model_cfg, window[None, :-1])
        logits = np.asarray(logits[0], np.float64)
        logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
        nll += float(np.sum(logz - logits[np.arange(n), window[1:]]))
        count += n
    rows.append({"context": n, "tokens": count, "loss": nll / count, "perplexity": math.exp(nll / count)})
  return rows


def format_table(rows: list[dict]) -> str:
  lines = [f"{'context':>8} {'tokens':>9} {'loss':>8} {'ppl':>9}"]
  lines += [f"{r['context']:>8} {r['tokens']:>9} {r['loss']:>8.4f} {r['perplexity']:>9.3f}" for r in rows]
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([r["context"] for r in rows], [r["perplexity"] for r in rows], "o-")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("perplexity")
  ax.set_title("Perplexity vs context length")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
