"""Pieces of the producer / consumer TMA ring shared by the Pallas Mosaic GPU kernels
(block_matmul_mgpu, bwd_tiles_mgpu): ring step g uses slot g % stages, and the consumers release
each step once on `consumed[slot]` (an mbarrier array of `stages` barriers)."""

from __future__ import annotations

from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp


def ring_drain(consumed, total, stages: int) -> None:
  """Producer: wait out the releases of the last `stages` of `total` ring steps (the earlier ones were
  waited for before their slots were reloaded), so that no barrier is left mid-phase when the CTA exits.

  consumed: the release barriers [stages]; total: the steps this program ran (traced int32 or int).
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu  # Mosaic GPU: imported only when used

  @pl.loop(jnp.maximum(total - stages, 0), total)
  def _drain(g):
    plgpu.barrier_wait(consumed.at[lax.rem(g, stages)])
