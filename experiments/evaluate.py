"""Evaluate a checkpoint: loss, perplexity, bits per byte; perplexity against context length.

  python -m experiments.evaluate --config=configs/shakespeare_char.py --workdir=/tmp/shakespeare \
      [--split=test] [--context_lengths=128,256,512,1024,2048] [--plot=ppl_vs_context.png]

The context-length study (as in the Megalodon paper's Figure 5) streams each evaluation document
through the decoder and reports the loss of the tokens at positions [n/2, n) for each context n,
so longer contexts are scored on the same kind of tokens with more history; it writes a JSON table
and a PNG plot.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py", "Config the model was trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: data.eval_split).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", None, "Evaluate only this many batches.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
_CONTEXTS = flags.DEFINE_list("context_lengths", [], "Context lengths for the perplexity-vs-context study.")
_DOCS = flags.DEFINE_integer("context_documents", 4, "Documents used by the context study.")
_PLOT = flags.DEFINE_string("plot", None, "PNG path for the perplexity-vs-context plot.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from megalodon_jax import data as data_lib
  from megalodon_jax.training import context_study, loop
  config = _CONFIG.value
  experiment = loop.Experiment.create(config)
  params = loop.load_params(experiment, _WORKDIR.value, _STEP.value)
  split = _SPLIT.value or experiment.data_cfg.eval_split
  result = loop.evaluate(experiment, params, split, max_batches=_MAX_BATCHES.value)
  baseline = data_lib.unigram_baseline(experiment.data_cfg)
  print(f"{split}: loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.3f}"
        + (f", {result['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in result else ""))
  print(f"unigram baseline: {baseline:.3f} bits/byte")
  if _CONTEXTS.value:
    lengths = sorted(int(n) for n in _CONTEXTS.value)
    table = context_study.perplexity_vs_context(experiment, params, split, lengths, _DOCS.value)
    print(context_study.format_table(table))
    out_json = os.path.join(_WORKDIR.value, f"ppl_vs_context_{split}.json")
    with open(out_json, "w") as f:
      json.dump(table, f, indent=2)
    plot = _PLOT.value or os.path.join(_WORKDIR.value, f"ppl_vs_context_{split}.png")
    context_study.plot(table, plot)
    print(f"wrote {out_json} and {plot}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
