"""The jitted train and eval steps: loss, gradient accumulation, skipping non-finite updates."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrainState(NamedTuple):
  """Everything a resumed run needs besides the data iterator's position."""
  step: jax.Array  # [] int32, optimiser updates applied or skipped so far
  params: Any
  opt_state: Any
  rng: jax.Array  # dropout key; folded with the step, so it never needs advancing
  nonfinite_streak: jax.Array  # [] int32, consecutive skipped steps
  nonfinite_total: jax.Array  # [] int32


def init_train_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  zero = jnp.zeros((), jnp.int32)
  return TrainState(zero, params, optimizer.init(params), rng, zero, zero)


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits: [B, L, V] float32; targets: [B, L] int; mask: [B, L] -> (sum of masked NLL, token count)."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum((logz - target_logit) * mask), jnp.sum(mask)


def _loss_fn(apply_fn: Callable, params: Any, batch: dict, rng: jax.Array | None):
  rngs = None if rng is None else {"dropout": rng}
  logits = apply_fn({"params": params}, batch["inputs"], batch.get("segment_ids"),
                    deterministic=rng is None, rngs=rngs)
  return cross_entropy(logits, batch["targets"], batch["loss_mask"])


def _split_microbatches(batch: dict, count: int) -> dict:
  def split(x):
    if x.shape[0] % count:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by train.microbatches={count}")
    return x.reshape(count, x.shape[0] // count, *x.shape[1:])
  return jax.tree.map(split, batch)


def make_train_step(apply_fn: Callable, optimizer: optax.GradientTransformation, *, microbatches: int = 1,
                    use_dropout: bool = False) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns train_step(state, batch) -> (state, metrics), to be wrapped in jax.jit by the caller.

  batch: inputs, targets, segment_ids (optional), loss_mask: [B, L]. The loss is the mean NLL over
  the unmasked targets of the whole batch, also when it is split into microbatches (gradients are
  summed over microbatches, then divided by the batch's token count). A step whose loss or
  gradients are not finite leaves params and optimiser state unchanged and is counted.
  """

  def grads_of(params, batch, rng):
    # Summed NLL (not the mean) so microbatch gradients add up; divided by the token count later.
    (nll, count), grads = jax.value_and_grad(lambda p: _loss_fn(apply_fn, p, batch, rng), has_aux=True)(params)
    return nll, count, grads

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step) if use_dropout else None
    if microbatches == 1:
      nll, count, grads = grads_of(state.params, batch, rng)
    else:
      def body(carry, xs):
        i, micro = xs
        micro_rng = None if rng is None else jax.random.fold_in(rng, i)
        nll, count, grads = grads_of(state.params, micro, micro_rng)
        acc_nll, acc_count, acc_grads = carry
        return (acc_nll + nll, acc_count + count, jax.tree.map(jnp.add, acc_grads, grads)), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (nll, count, grads), _ = jax.lax.scan(
          body, (jnp.zeros(()), jnp.zeros(()), zeros),
          (jnp.arange(microbatches), _split_microbatches(batch, microbatches)))
    denom = jnp.maximum(count, 1.0)
    loss = nll / denom
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    new_state = TrainState(
        step=state.step + 1, params=keep(new_params, state.params), opt_state=keep(new_opt_state, state.opt_state),
        rng=state.rng, nonfinite_streak=streak.astype(jnp.int32),
        nonfinite_total=(state.nonfinite_total + (~finite)).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite,
               "nonfinite_streak": new_state.nonfinite_streak, "nonfinite_total": new_state.nonfinite_total}
    return new_state, metrics

  return train_step


def make_eval_step(apply_fn: Callable) -> Callable[[Any, dict], dict]:
  """eval_step(params, batch) -> {"nll": summed NLL, "tokens": count}; wrap in jax.jit."""
  def eval_step(params, batch):
    nll, count = _loss_fn(apply_fn, params, batch, None)
    return {"nll": nll, "tokens": count}
  return eval_step
