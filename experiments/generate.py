"""Sample text from a trained checkpoint, streaming it as it is produced.

  python -m experiments.generate --config=configs/shakespeare_char.py --workdir=/tmp/shakespeare \
      --prompt="ROMEO:" --temperature=0.8 --top_p=0.95 --seed=0 --max_new_tokens=500
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py", "Config the model was trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (default: the config's sample.prompt).")
_MAX = flags.DEFINE_integer("max_new_tokens", None, "Tokens to sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (0: off).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass (1: off).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.")
_PER_CALL = flags.DEFINE_integer("tokens_per_call", None, "Tokens sampled per device call while streaming.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from megalodon_jax.training import loop, sampling
  config = _CONFIG.value
  sample = dict(config.sample.to_dict())
  for key, flag in (("prompt", _PROMPT), ("max_new_tokens", _MAX), ("temperature", _TEMPERATURE),
                    ("top_k", _TOP_K), ("top_p", _TOP_P), ("seed", _SEED), ("tokens_per_call", _PER_CALL)):
    if flag.value is not None:
      sample[key] = flag.value
  experiment = loop.Experiment.create(config)
  params = loop.load_params(experiment, _WORKDIR.value, _STEP.value)
  sampling.stream_sample(experiment, params, sample["prompt"], sample)
  print(flush=True)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
