"""Release state-dict conversion: exact round trips and clear errors."""

import jax
import numpy as np
import pytest

from megalodon_jax import convert, model as model_lib
from megalodon_jax.config import preset


@pytest.mark.parametrize("name", ["tiny", "tiny_swiglu"])
def test_round_trip_is_exact(name, tmp_path):
  cfg = preset(name)
  params = jax.tree.map(np.asarray, model_lib.init_params(cfg, jax.random.key(0)))
  state = convert.to_release(params, cfg)
  assert set(state) >= set(convert.release_shapes(cfg))
  for key, shape in convert.release_shapes(cfg).items():
    assert state[key].shape == shape, key
  for suffix in (".npz", ".safetensors"):
    path = tmp_path / f"ckpt{suffix}"
    convert.save_state_dict(state, path)
    back = convert.from_release(convert.load_state_dict(path), cfg)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_linear_weights_are_out_by_in():
  cfg = preset("tiny")
  params = jax.tree.map(np.asarray, model_lib.init_params(cfg, jax.random.key(0)))
  state = convert.to_release(params, cfg)
  np.testing.assert_array_equal(state["layers.1.mega.wv.weight"], params["layers_1"]["mega"]["wv"]["kernel"].T)


def test_missing_and_misshaped_keys_are_named():
  cfg = preset("tiny")
  state = convert.to_release(model_lib.init_params(cfg, jax.random.key(0)), cfg)
  broken = dict(state)
  del broken["layers.1.mega.wz.bias"]
  with pytest.raises(convert.ConversionError, match=r"missing keys: \['layers.1.mega.wz.bias'\]"):
    convert.from_release(broken, cfg)
  broken = dict(state)
  broken["layers.0.mega.cema.alpha"] = np.zeros((3, 3, 1), np.float32)
  with pytest.raises(convert.ConversionError, match=r"'layers.0.mega.cema.alpha' has shape \(3, 3, 1\)"):
    convert.from_release(broken, cfg)
  broken = dict(state)
  broken["layers.0.mega.extra"] = np.zeros(3)
  with pytest.raises(convert.ConversionError, match="unexpected keys: .*layers.0.mega.extra"):
    convert.from_release(broken, cfg)
  broken = dict(state)
  broken["layers.0.mega.timenorm.prior_count"] = np.array(5)
  with pytest.raises(convert.ConversionError, match="prior_count"):
    convert.from_release(broken, cfg)


def test_model_parallel_shards_merge(tmp_path):
  cfg = preset("tiny")
  state = convert.to_release(model_lib.init_params(cfg, jax.random.key(0)), cfg)
  # Split as the release does for 2 ranks; the axes are written out here independently.
  split_axis = {
      "mega.wz.weight": 0, "mega.wz.bias": 0, "mega.wv.weight": 0, "mega.wr.bias": 0, "mega.wh2.weight": 1,
      "mega.cema.gamma": 0, "mega.gamma": 1, "nffn.fc1.weight": 0, "nffn.fc2.weight": 1, "mega.timenorm.bias": 0,
      "mega.rmsnorm.weight": None, "nffn.norm.weight": None,
  }
  shards = [{}, {}]
  for key, value in state.items():
    short = key.split(".", 2)[-1] if key.startswith("layers.") else key
    axis = split_axis.get(short, convert.shard_axis(key))
    if short in split_axis:
      assert axis == convert.shard_axis(key), key
    for rank in range(2):
      shards[rank][key] = value if axis is None else np.split(value, 2, axis=axis)[rank]
  for rank in range(2):
    convert.save_state_dict(shards[rank], tmp_path / f"r{rank}.npz")
  merged = convert.load_state_dict([tmp_path / "r0.npz", tmp_path / "r1.npz"])
  for key in state:
    np.testing.assert_array_equal(merged[key], state[key])
