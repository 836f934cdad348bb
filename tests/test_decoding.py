"""Prefill + step-by-step decoding equals one full forward pass (SPEC §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_jax import decoding, model as model_lib
from megalodon_jax.cache import cache_bytes, init_cache
from megalodon_jax.config import preset
from megalodon_jax.model import MegalodonLM

CFG = preset("tiny")  # chunk 8
LENGTH = 3 * CFG.chunk_size + 3  # spans more than three chunks


@pytest.fixture(scope="module")
def setup():
  params = model_lib.init_params(CFG, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, LENGTH))
  # The full-sequence reference needs whole chunks: run 4 chunks and keep the first LENGTH steps
  # (causality makes the extra steps irrelevant).
  padded = np.concatenate([tokens, np.zeros((2, 4 * CFG.chunk_size - LENGTH), tokens.dtype)], axis=1)
  full = MegalodonLM(CFG).apply({"params": params}, jnp.asarray(padded))[:, :LENGTH]
  return params, tokens, np.asarray(full)


@pytest.mark.parametrize("k", [0, 1, CFG.chunk_size - 1, CFG.chunk_size, CFG.chunk_size + 1, 2 * CFG.chunk_size + 5])
def test_prefill_then_decode_equals_full_forward(setup, k):
  params, tokens, full = setup
  logits, cache = decoding.prefill(params, CFG, tokens[:, :k])
  outputs = [np.asarray(logits)]
  for t in range(k, LENGTH):
    step_logits, cache = decoding.decode_step(params, CFG, tokens[:, t], cache)
    outputs.append(np.asarray(step_logits)[:, None])
  got = np.concatenate(outputs, axis=1)
  assert np.max(np.abs(got - full)) < 1e-4


def test_prefill_from_a_partial_chunk(setup):
  params, tokens, full = setup
  _, cache = decoding.prefill(params, CFG, tokens[:, :3])
  logits, cache = decoding.prefill(params, CFG, tokens[:, 3:3 + 2 * CFG.chunk_size + 2], cache)
  assert np.max(np.abs(np.asarray(logits) - full[:, 3:3 + 2 * CFG.chunk_size + 2])) < 1e-4
  assert int(cache.count) == (5 + 2 * CFG.chunk_size) % CFG.chunk_size


def test_cache_memory_is_constant_in_tokens_decoded(setup):
  params, tokens, _ = setup
  _, cache = decoding.prefill(params, CFG, tokens[:, :2])
  before = cache_bytes(cache)
  shapes = [x.shape for x in jax.tree.leaves(cache)]
  for t in range(2, LENGTH):
    _, cache = decoding.decode_step(params, CFG, tokens[:, t], cache)
  assert cache_bytes(cache) == before == cache_bytes(init_cache(CFG, 2))
  assert [x.shape for x in jax.tree.leaves(cache)] == shapes


def test_prefill_pieces():
  assert decoding.prefill_pieces(20, 0, 8) == [16, 4]
  assert decoding.prefill_pieces(20, 5, 8) == [3, 16, 1]
  assert decoding.prefill_pieces(2, 5, 8) == [2]
  assert decoding.prefill_pieces(0, 5, 8) == []


def test_sampling_filters(rng):
  logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0]])
  assert int(decoding.sample_logits(logits, jax.random.key(0), temperature=0.0)[0]) == 3
  draws = {int(decoding.sample_logits(logits, jax.random.key(i), top_k=2)[0]) for i in range(50)}
  assert draws == {2, 3}
  # p(3) = 0.64, p(2) = 0.24: top_p 0.5 keeps only token 3; 0.7 keeps {2, 3}.
  assert {int(decoding.sample_logits(logits, jax.random.key(i), top_p=0.5)[0]) for i in range(30)} == {3}
  assert {int(decoding.sample_logits(logits, jax.random.key(i), top_p=0.7)[0]) for i in range(60)} == {2, 3}


def test_generate_is_deterministic_for_a_seed(setup):
  params, tokens, _ = setup
  run = lambda seed: np.stack(list(decoding.generate(params, CFG, tokens[:, :5], 12, jax.random.key(seed),
                                                    temperature=1.0, top_k=10)))
  np.testing.assert_array_equal(run(3), run(3))
  assert not np.array_equal(run(3), run(4))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_on_device_makes_the_tokens_generate_streams(setup, temperature):
  params, tokens, _ = setup
  steps = CFG.chunk_size + 4  # crosses a chunk boundary inside the device loop
  kwargs = dict(temperature=temperature, top_k=10)
  streamed = np.stack(list(decoding.generate(params, CFG, tokens[:, :5], steps, jax.random.key(7), **kwargs)), 1)
  on_device, cache = decoding.generate_on_device(params, CFG, tokens[:, :5], steps, jax.random.key(7), **kwargs)
  np.testing.assert_array_equal(np.asarray(on_device), streamed)
  assert len(np.unique(streamed)) > 1
  assert int(cache.count) == (5 + steps - 1) % CFG.chunk_size  # the last token is sampled, not fed


@pytest.mark.parametrize("tokens_per_call", [3, CFG.chunk_size + 1])
def test_generate_in_blocks_streams_the_same_tokens_and_stops_alike(setup, tokens_per_call):
  params, tokens, _ = setup
  run = lambda n, stop=None: np.stack(list(decoding.generate(
      params, CFG, tokens[:, :5], 2 * CFG.chunk_size, jax.random.key(11), temperature=1.0, top_k=10,
      stop_token=stop, tokens_per_call=n)))
  one = run(1)
  np.testing.assert_array_equal(run(tokens_per_call), one)
  # A stop token that every sequence meets: both stop after the same step (batch of 1 sequence).
  single = lambda n, stop: np.stack(list(decoding.generate(
      params, CFG, tokens[:1, :5], 2 * CFG.chunk_size, jax.random.key(11), temperature=1.0, top_k=10,
      stop_token=stop, tokens_per_call=n)))
  stop = int(single(1, None)[4, 0])
  stopped = single(tokens_per_call, stop)
  assert stopped[-1, 0] == stop and len(stopped) <= 5
  np.testing.assert_array_equal(stopped, single(1, stop))
