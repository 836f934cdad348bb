"""The training job end to end on a tiny config: learning, exact resume, preemption, sampling, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import shakespeare_char
from megalodon_jax.config import ConfigError
from megalodon_jax.data import DataError
from megalodon_jax.training import loop, optimizer as optimizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.xdist_group("training")  # one worker builds the corpus and compiles once


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory):
  """Environment of the training subprocesses: one persistent compilation cache for all of them,
  so only the first compiles the step (the rest load it; results are bitwise the same)."""
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def smoke_config(data_dir, **train):
  config = shakespeare_char.get_config("smoke")
  config.data.data_dir = data_dir
  config.train.eval_every = 0
  for key, value in train.items():
    setattr(config.train, key, value)
  return config


def read_losses(workdir):
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["split"] == "train":
        losses.setdefault(record["step"], []).append(record["loss"])
  return losses


def test_loss_decreases_over_30_steps(data_dir, tmp_path):
  config = smoke_config(data_dir, steps=30, log_every=1)
  config.optim.lr = 1e-2
  summary = loop.train_and_evaluate(config, str(tmp_path))
  losses = [summary["losses"][s] for s in range(1, 31)]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
  # The final evaluation beats the corpus's unigram model.
  assert summary["eval"]["bits_per_byte"] < summary["unigram_bits_per_byte"]


def _train_cmd(workdir, data_dir, steps, every):
  return [sys.executable, "-m", "experiments.train", "--config=configs/shakespeare_char.py:smoke",
          f"--workdir={workdir}", f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.eval_every=0", f"--config.checkpoint.every={every}",
          "--config.checkpoint.async_save=False", f"--config.data.data_dir={data_dir}", "--sample=false"]


def _run_until(cmd, workdir, step, sig, env):
  """Starts training and sends `sig` once metrics for `step` have been written."""
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and max(read_losses(workdir) or [0]) >= step:
        proc.send_signal(sig)
        break
      time.sleep(0.05)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, out


def test_kill_and_resume_equals_uninterrupted(data_dir, tmp_path, subprocess_env):
  steps = 12
  straight = tmp_path / "straight"
  subprocess.run(_train_cmd(straight, data_dir, steps, 3), cwd=REPO, check=True, capture_output=True,
                 env=subprocess_env)
  reference = read_losses(straight)
  assert sorted(reference) == list(range(1, steps + 1))

  killed = tmp_path / "killed"
  code, out = _run_until(_train_cmd(killed, data_dir, steps, 3), killed, 7, signal.SIGKILL, subprocess_env)
  assert code == -signal.SIGKILL, out
  before = read_losses(killed)
  subprocess.run(_train_cmd(killed, data_dir, steps, 3), cwd=REPO, check=True, capture_output=True,
                 env=subprocess_env)
  resumed = read_losses(killed)
  assert sorted(resumed) == list(range(1, steps + 1))
  assert any(len(v) == 2 for v in resumed.values()), "some steps after the last checkpoint must have rerun"
  for step, values in resumed.items():
    for value in values:  # bitwise: same params, optimiser state and batches
      assert value == reference[step][0], (step, values, reference[step], before.get(step))


def test_sigterm_leaves_a_restorable_checkpoint(data_dir, tmp_path, subprocess_env):
  workdir = tmp_path / "preempted"
  code, out = _run_until(_train_cmd(workdir, data_dir, 200, 1000), workdir, 3, signal.SIGTERM, subprocess_env)
  assert code == 0, out
  assert "SIGTERM received: saved checkpoint at step" in out
  saved = int(out.split("saved checkpoint at step")[1].split()[0])
  config = smoke_config(data_dir, steps=200)
  experiment = loop.Experiment.create(config)
  from megalodon_jax.training.checkpoint import Checkpointer
  ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
  step, state, data_state = ckpt.restore_latest(experiment.abstract_state())
  ckpt.close()
  assert step == saved == int(state.step) and data_state


def test_generation_from_a_checkpoint_is_deterministic(data_dir, tmp_path):
  import io
  from megalodon_jax.training import sampling
  config = smoke_config(data_dir, steps=4)
  loop.train_and_evaluate(config, str(tmp_path))
  cmd = [sys.executable, "-m", "experiments.generate", "--config=configs/shakespeare_char.py:smoke",
         f"--workdir={tmp_path}", "--prompt=KING:", "--max_new_tokens=24", "--seed=1",
         f"--config.data.data_dir={data_dir}"]
  from_cli = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
  experiment = loop.Experiment.create(config)
  params = loop.load_params(experiment, str(tmp_path))

  def sample(seed, **overrides):
    out = io.StringIO()
    settings = dict(config.sample.to_dict(), max_new_tokens=24, seed=seed, **overrides)
    sampling.stream_sample(experiment, params, "KING:", settings, out=out)
    return out.getvalue()

  first = sample(1)
  assert first.startswith("KING:") and len(first) > len("KING:")
  assert from_cli.rstrip("\n") == first == sample(1)
  assert config.sample.tokens_per_call > 1 and sample(1, tokens_per_call=1) == first  # blocks change nothing
  assert sample(2) != first


def test_corrupt_latest_checkpoint_falls_back(data_dir, tmp_path, caplog):
  config = smoke_config(data_dir, steps=4)
  config.checkpoint.every = 2
  config.checkpoint.async_save = False
  loop.train_and_evaluate(config, str(tmp_path))
  latest = tmp_path / "checkpoints" / "4" / "state"
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  experiment = loop.Experiment.create(config)
  with caplog.at_level("WARNING"):
    params = loop.load_params(experiment, str(tmp_path))
  assert "checkpoint at step 4" in caplog.text and "falling back" in caplog.text
  assert jax.tree.leaves(params)


def test_bad_configs_and_missing_data_are_clear(data_dir, tmp_path):
  config = smoke_config(data_dir)
  config.data.seq_len = 40  # chunk 16
  with pytest.raises(ConfigError, match="not a multiple"):
    loop.Experiment.create(config)
  config = smoke_config(data_dir)
  config.model.vocab_size = 100
  with pytest.raises(ConfigError, match="vocab_size=100 is smaller than the tokenizer"):
    loop.Experiment.create(config)
  config = smoke_config(data_dir)
  config.optim.scheduler = "exponential"
  with pytest.raises(ConfigError, match="scheduler must be one of"):
    loop.Experiment.create(config)
  config = smoke_config(str(tmp_path / "empty"))
  config.data.dataset = "pg19"
  with pytest.raises(DataError, match="pg19"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))


def test_release_schedules():
  kw = dict(warmup=10, total_steps=110, init_ratio=1e-4, end_ratio=0.01)
  lin = lambda s: float(optimizer_lib.lr_multiplier(s, scheduler="linear", **kw))
  cos = lambda s: float(optimizer_lib.lr_multiplier(s, scheduler="cosine", **kw))
  assert lin(0) == pytest.approx(1e-4) and lin(5) == pytest.approx(1e-4 + 5 * (1 - 1e-4) / 10)
  assert lin(10) == pytest.approx(1.0) and lin(60) == pytest.approx(0.5 * 0.01 + 0.5)
  assert lin(110) == pytest.approx(0.01) and lin(500) == pytest.approx(0.01)
  assert cos(60) == pytest.approx(0.01 + 0.5 * 0.99 * (np.cos(np.pi * 0.5) + 1))
  assert cos(110) == pytest.approx(0.01)


def test_weight_decay_mask():
  from megalodon_jax import model as model_lib
  from megalodon_jax.config import preset
  params = jax.eval_shape(lambda: model_lib.init_params(preset("tiny"), jax.random.key(0)))
  mask = optimizer_lib.weight_decay_mask(params)
  layer = mask["layers_0"]
  assert layer["mega"]["wz"]["kernel"] and mask["embed"]["embedding"] and mask["output"]["kernel"]
  assert not layer["mega"]["wz"]["bias"] and not layer["mega"]["cema"]["alpha"]
  assert not layer["mega"]["timenorm"]["weight"] and not layer["mega"]["gamma"]
  assert all(jax.tree.leaves(optimizer_lib.weight_decay_mask(params, decay_all=True)))
