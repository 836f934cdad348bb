"""Command-line parsing of the GPU check tools (experiments/gpu_checks/), which run on the H200."""

from __future__ import annotations

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
