"""Text in, sampled text out: tokenization around decoding.generate, streaming to stdout."""

from __future__ import annotations

import sys
from typing import Any, Mapping

import jax
import numpy as np

from megalodon_jax import decoding


def stream_sample(experiment, params: Any, prompt: str, sample_cfg: Mapping[str, Any], out=None) -> str:
  """Samples a continuation of `prompt`, writing it to `out` (stdout) as it is produced; returns it."""
  out = sys.stdout if out is None else out
  tokenizer = experiment.tokenizer()
  ids = tokenizer.encode(prompt)
  if getattr(experiment.data_cfg, "add_bos", True) and tokenizer.bos_id is not None:
    ids = [tokenizer.bos_id] + ids
  out.write(prompt)
  out.flush()
  generated: list[int] = []
  printed = ""
  stream = decoding.generate(
      params, experiment.model_cfg, np.asarray([ids], np.int32), int(sample_cfg["max_new_tokens"]),
      jax.random.PRNGKey(int(sample_cfg["seed"])), temperature=float(sample_cfg["temperature"]),
      top_k=int(sample_cfg["top_k"]), top_p=float(sample_cfg["top_p"]), stop_token=tokenizer.eos_id,
      tokens_per_call=int(sample_cfg.get("tokens_per_call", 1)))
  for token in stream:
    token = int(token[0])
    if token == tokenizer.eos_id:
      break
    generated.append(token)
    text = tokenizer.decode(generated)
    # Print only what decodes cleanly so far (a multi-byte character may still be incomplete).
    if not text.endswith("\ufffd"):
      out.write(text[len(printed):])
      out.flush()
      printed = text
  text = tokenizer.decode(generated)
  out.write(text[len(printed):])
  out.flush()
  return text
