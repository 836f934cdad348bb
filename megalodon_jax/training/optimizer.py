"""AdamW with the release's schedules and defaults, weight-decay masking and clipping (SPEC §6)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from megalodon_jax.config import ConfigError

SCHEDULES = ("linear", "cosine", "constant")


def lr_multiplier(step: jax.Array | int, *, scheduler: str, warmup: int, total_steps: int,
                  init_ratio: float = 1e-4, end_ratio: float = 0.01, cycles: float = 1.0) -> jax.Array:
  """The release's learning-rate factor at `step` (multiplies the peak learning rate).

  Warm-up rises linearly from init_ratio to 1 over `warmup` steps; then linear or cosine decay to
  end_ratio at total_steps, constant afterwards.
  """
  step = jnp.asarray(step, jnp.float32)
  warm = init_ratio + step * (1.0 - init_ratio) / max(warmup, 1)
  progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
  if scheduler == "linear":
    decay = progress * end_ratio + (1.0 - progress)
  elif scheduler == "cosine":
    decay = end_ratio + 0.5 * (1.0 - end_ratio) * (jnp.cos(math.pi * progress * cycles) + 1.0)
  elif scheduler == "constant":
    decay = jnp.ones_like(progress)
  else:
    raise ConfigError(f"optim.scheduler must be one of {SCHEDULES}, got {scheduler!r}")
  return jnp.where(step < warmup, warm, decay)


def learning_rate_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  def schedule(step):
    return optim["lr"] * lr_multiplier(step, scheduler=optim["scheduler"], warmup=optim["warmup"],
                                       total_steps=total_steps, init_ratio=optim["lr_init_ratio"],
                                       end_ratio=optim["lr_end_ratio"], cycles=optim.get("cycles", 1.0))
  return schedule


# Parameters that are not matrices of a linear map: norm offsets, CEMA parameters, biases,
# the q/k affine maps and the FFN rescale. Decaying them towards zero has no regularising purpose.
_NO_DECAY_NAMES = ("bias", "weight", "alpha", "delta", "theta", "gamma", "beta", "omega")


def weight_decay_mask(params: Any, decay_all: bool = False) -> Any:
  """A pytree of bools: True where weight decay applies (linear kernels and the embedding)."""
  def decays(path, _):
    if decay_all:
      return True
    name = getattr(path[-1], "key", str(path[-1]))
    return name not in _NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW (decoupled weight decay on the masked parameters)."""
  if optim["scheduler"] not in SCHEDULES:
    raise ConfigError(f"optim.scheduler must be one of {SCHEDULES}, got {optim['scheduler']!r}")
  if total_steps <= optim["warmup"] and optim["scheduler"] != "constant":
    raise ConfigError(f"train.steps={total_steps} must exceed optim.warmup={optim['warmup']} for a "
                      f"{optim['scheduler']} schedule; lower the warm-up or train longer")
  chain = []
  if optim.get("clip", 0.0) and optim["clip"] > 0:
    chain.append(optax.clip_by_global_norm(optim["clip"]))
  chain.append(optax.adamw(
      learning_rate_schedule(optim, total_steps), b1=optim["beta1"], b2=optim["beta2"], eps=optim["epsilon"],
      weight_decay=optim["weight_decay"],
      mask=lambda p: weight_decay_mask(p, optim.get("decay_norms_and_cema", False))))
  return optax.chain(*chain)
