"""Metrics: JSONL and TensorBoard writers, model FLOPs and MFU, a progress bar (process 0 only)."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax

from megalodon_jax.config import MegalodonConfig, count_params

# Dense bf16 peak FLOP/s by device kind, for MFU. Unknown devices (CPUs) report no MFU.
PEAK_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops
  return None


def model_flops_per_token(config: MegalodonConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), model FLOPs only.

  Matmuls: 6 per parameter (embedding lookups excluded, a tied head counted once as a matmul).
  Attention inside chunks of C: q.k^T with Z-dim heads and p.v with V-dim heads; a full C x C block
  would cost 2 (Z + V) C FLOPs per token, causal attention is counted once, i.e. half of that, as
  for the Llama baseline. CEMA: ~10 float32 FLOPs per (token, d, n) forward.
  """
  chunk = min(seq_len, config.chunk_size)
  dense_params = count_params(config) - config.vocab_size * config.model_dim * (1 if not config.share_emb else 0)
  matmul = 6 * dense_params
  attention = 3 * config.num_layers * (config.z_dim + config.value_dim) * chunk
  cema = 3 * config.num_layers * 10 * config.model_dim * config.cema_ndim
  return float(matmul + attention + cema)


class MetricsWriter:
  """Writes scalars to <workdir>/metrics.jsonl and TensorBoard event files (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "train") -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": prefix, "time": time.time(), **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        if math.isfinite(v):
          self._tb.add_scalar(f"{prefix}/{k}", v, int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """A tqdm bar with loss, tokens/s and ETA on process 0; silent elsewhere."""

  def __init__(self, total: int, initial: int = 0, enabled: bool | None = None):
    enabled = jax.process_index() == 0 if enabled is None else enabled
    self._bar = None
    self._position = initial
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

  def advance_to(self, step: int, **postfix: Any) -> None:
    """Moves the bar to `step` and shows the given values."""
    if self._bar is not None:
      self._bar.update(step - self._position)
      self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                            refresh=False)
    self._position = step

  def write(self, message: str) -> None:
    if self._bar is not None:
      self._bar.write(message)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
