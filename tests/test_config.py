"""Config validation and preset parameter counts (SPEC §6)."""

import jax
import jax.numpy as jnp
import pytest

from megalodon_jax import model as model_lib
from megalodon_jax.config import ConfigError, MegalodonConfig, check_sequence_length, count_params, preset

RELEASED_COUNTS = {  # SPEC §6, vocab 32000
    "mega200M": 220_627_968, "mega1.3B": 1_342_832_640, "mega1.3B_pg19": 1_327_628_288,
    "mega7.1B": 7_117_381_632, "mega7.3B": 7_385_817_088,
}


@pytest.mark.parametrize("name", sorted(RELEASED_COUNTS))
def test_preset_counts_match_the_release(name):
  assert count_params(preset(name)) == RELEASED_COUNTS[name]


@pytest.mark.parametrize("name", ["mega200M", "mega1.3B_pg19"])
def test_built_model_has_the_counted_parameters(name):
  # Shapes only (eval_shape): nothing is allocated, so the big presets are cheap to check.
  cfg = preset(name, num_layers=2)
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == count_params(cfg)


@pytest.mark.parametrize("name", ["tiny", "tiny_swiglu"])
def test_scanned_layout_has_the_same_count(name):
  cfg = preset(name, scan_layers=True)
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == count_params(cfg)


@pytest.mark.parametrize("changes,match", [
    (dict(num_heads=3), "num_heads=3 does not divide z_dim"),
    (dict(norm_num_groups=5), "norm_num_groups=5 does not divide model_dim"),
    (dict(dtype="float16"), "float16.*not supported.*bfloat16"),
    (dict(dropout=1.5), "dropout must be in"),
    (dict(cema_method="magic"), "cema_method must be one of"),
    (dict(model_dim=0), "model_dim must be a positive integer"),
])
def test_bad_configs_say_what_is_wrong(changes, match):
  with pytest.raises(ConfigError, match=match):
    preset("tiny", **changes)


def test_sequence_length_check():
  cfg = preset("tiny")  # chunk 8
  check_sequence_length(cfg, 5)
  check_sequence_length(cfg, 24)
  with pytest.raises(ConfigError, match="not a multiple of it.*16 or 24"):
    check_sequence_length(cfg, 20)


def test_unknown_fields_and_presets():
  with pytest.raises(ConfigError, match="unknown preset"):
    preset("mega9000B")
  with pytest.raises(ConfigError, match="unknown MegalodonConfig field"):
    preset("tiny").replace(hidden_size=3)
  assert MegalodonConfig.from_dict(preset("tiny").to_dict()) == preset("tiny")
