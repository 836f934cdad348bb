"""Train a Megalodon language model, then print a sample.

  python -m experiments.train --config=configs/shakespeare_char.py --workdir=/tmp/shakespeare \
      [--config.train.steps=100 ...]

Resumes automatically from the newest checkpoint in --workdir. SIGTERM saves a checkpoint and exits.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.", required=True)
_SAMPLE = flags.DEFINE_bool("sample", True, "Print a sample from the trained model at the end.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and tfds log every file at INFO
  from megalodon_jax.training import loop, sampling
  config = _CONFIG.value
  summary = loop.train_and_evaluate(config, _WORKDIR.value)
  if _SAMPLE.value and not summary.get("preempted") and config.sample.max_new_tokens > 0:
    experiment = loop.Experiment.create(config)
    print(f"\n--- sample (temperature {config.sample.temperature}, top_p {config.sample.top_p}) ---", flush=True)
    sampling.stream_sample(experiment, summary["state"].params, config.sample.prompt, config.sample)
    print("\n---", flush=True)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
