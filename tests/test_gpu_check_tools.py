"""Command-line parsing of the GPU check tools (experiments/gpu_checks/), which run on the H200."""

from __future__ import annotations

import dataclasses

import pytest

from experiments.gpu_checks.ab_cema_configs import parse_variant
from kernels_pallas import cema as K


def test_parse_variant_replaces_the_named_fields_with_their_types():
  base = K.default_config(1, 32768, 4096, 16)
  label, cfg = parse_variant("ss4:summary_split=4,fwd_pairs=false,bwd_summary_tiling=forward", base)
  assert label == "ss4"
  assert cfg.summary_split == 4 and isinstance(cfg.summary_split, int)
  assert cfg.fwd_pairs is False and base.fwd_pairs is True
  assert cfg.bwd_summary_tiling == "forward"
  assert cfg.block_d == base.block_d and cfg.num_chunks == base.num_chunks  # the rest untouched


@pytest.mark.parametrize("text,message", [
    ("ss4", "wants 'label:field=value"),
    ("x:summary_splt=4", "has no field 'summary_splt'"),
    ("x:fwd_pairs=maybe", "fwd_pairs wants true or false"),
])
def test_parse_variant_says_what_is_wrong(text, message):
  with pytest.raises(ValueError, match=message):
    parse_variant(text, K.default_config(1, 32768, 4096, 16))


def test_parse_version_loads_the_file_as_its_own_module_with_its_own_defaults():
  from experiments.gpu_checks.ab_cema_versions import parse_version

  label, module, cfg = parse_version("cur:kernels_pallas/cema.py:num_chunks=3,fwd_pairs=false", (1, 32768, 4096, 16))
  assert label == "cur" and module is not K and module.cema_pallas is not K.cema_pallas
  assert isinstance(cfg, module.CemaKernelConfig) and not isinstance(cfg, K.CemaKernelConfig)
  base = K.default_config(1, 32768, 4096, 16)
  assert cfg.num_chunks == 3 and cfg.fwd_pairs is False
  assert dataclasses.replace(cfg, num_chunks=base.num_chunks, fwd_pairs=base.fwd_pairs).__dict__ == base.__dict__


@pytest.mark.parametrize("text,message", [
    ("old", "wants 'label:path"),
    ("old:/no/such/cema.py", "no file '/no/such/cema.py'"),
])
def test_parse_version_says_what_is_wrong(text, message):
  from experiments.gpu_checks.ab_cema_versions import parse_version

  with pytest.raises((ValueError, FileNotFoundError), match=message):
    parse_version(text, (1, 32768, 4096, 16))
