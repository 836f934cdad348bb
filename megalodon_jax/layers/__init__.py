"""Flax (linen) modules: thin wrappers that own parameters and call the pure functions in ops/."""

from megalodon_jax.layers.cema import CEMA
from megalodon_jax.layers.ffn import NormalizedFFN
from megalodon_jax.layers.mega_attention import MovingAverageGatedAttention
from megalodon_jax.layers.norms import LayerNorm, RMSNorm
from megalodon_jax.layers.timestep_norm import TimestepNorm

__all__ = ["CEMA", "LayerNorm", "MovingAverageGatedAttention", "NormalizedFFN", "RMSNorm", "TimestepNorm"]
