"""Shared benchmark plumbing: timing, device memory, results files, and one train step for any LM.

Timing is host wall-clock (`time.perf_counter`) around calls whose outputs are waited for with
`jax.block_until_ready`, which is correct under JAX's asynchronous dispatch: the clock stops only
when the device has finished. Compilation is kept out of the numbers by warm-up calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import pathlib
import platform
import re
import subprocess
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_RESULTS_DIR = REPO_ROOT / "experiments" / "results"


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def _check_counts(warmup: int, iters: int, inner: int) -> None:
  if warmup < 0 or iters < 1 or inner < 1:
    raise ValueError(f"need warmup >= 0, iters >= 1 and inner >= 1; got warmup={warmup}, iters={iters}, "
                     f"inner={inner}")


@contextlib.contextmanager
def exclusive_file_lock(path: str | None):
  """Holds an exclusive flock on `path` (created if missing) for the block; None: no lock.

  The --parallel sweeps of the GPU check scripts compile in several processes at once but time
  one process at a time, each holding this lock around its timings.
  """
  if path is None:
    yield
    return
  with open(path, "a") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def summarize_times(times_ms: Sequence[float]) -> dict[str, Any]:
  """Order statistics of a list of per-call times in milliseconds."""
  t = np.asarray(times_ms, dtype=np.float64)
  return {
      "median_ms": float(np.median(t)),
      "p10_ms": float(np.percentile(t, 10)),
      "p90_ms": float(np.percentile(t, 90)),
      "mean_ms": float(t.mean()),
      "min_ms": float(t.min()),
      "max_ms": float(t.max()),
      "times_ms": [float(x) for x in t],
  }


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 3, iters: int = 20, inner: int = 1,
            **kwargs: Any) -> dict[str, Any]:
  """Times `fn(*args, **kwargs)` on the device; returns summarize_times(...) plus the counts.

  Each of the `iters` samples runs `fn` `inner` times back to back and waits for the last result
  only; the sample is the mean per call. inner > 1 hides the host's dispatch latency (tens of us)
  for short kernels, since the device runs the queued calls in order. Arguments are made ready
  before the clock starts, so work queued earlier is not billed to `fn`. `fn` must not donate its
  arguments (use `time_stateful` for steps that consume their inputs).
  """
  _check_counts(warmup, iters, inner)
  jax.block_until_ready((args, kwargs))
  for _ in range(warmup):
    jax.block_until_ready(fn(*args, **kwargs))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / inner)
  return {**summarize_times(times), "warmup": warmup, "iters": iters, "inner": inner}


def time_stateful(fn: Callable[..., tuple[Any, Any]], state: Any, *args: Any, warmup: int = 3,
                  iters: int = 20) -> tuple[dict[str, Any], Any]:
  """Times `state, aux = fn(state, *args)` threaded through its own outputs (e.g. a train step).

  Suited to functions that donate `state`. Returns (timing stats, final state); `aux` of the last
  call is waited for together with the state.
  """
  _check_counts(warmup, iters, 1)
  jax.block_until_ready((state, args))
  for _ in range(warmup):
    state, aux = fn(state, *args)
    jax.block_until_ready((state, aux))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    state, aux = fn(state, *args)
    jax.block_until_ready((state, aux))
    times.append((time.perf_counter() - start) * 1e3)
  return {**summarize_times(times), "warmup": warmup, "iters": iters, "inner": 1}, state


def tokens_per_second(tokens_per_call: int, milliseconds: float) -> float:
  return tokens_per_call / (milliseconds * 1e-3)


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over a peak (e.g. the measured matmul peak)."""
  return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


# --------------------------------------------------------------------------------------------
# Device memory
# --------------------------------------------------------------------------------------------

def _memory_stat(key: str, device: jax.Device | None) -> int | None:
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # backends without allocator statistics raise or return None
    return None
  if not stats or key not in stats:
    return None
  return int(stats[key])


def peak_memory_bytes(device: jax.Device | None = None) -> int | None:
  """Peak bytes allocated on `device` since the process started (None where not reported, e.g. CPU).

  The allocator's peak cannot be reset, so measure one configuration per process when comparing
  peaks, or compare differences of `memory_in_use_bytes` around a computation.
  """
  return _memory_stat("peak_bytes_in_use", device)


def memory_in_use_bytes(device: jax.Device | None = None) -> int | None:
  """Bytes currently allocated on `device` (None where not reported)."""
  return _memory_stat("bytes_in_use", device)


# --------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def device_kind() -> str:
  """The first device's kind as a file-name slug, e.g. 'nvidia-h200' or 'cpu'."""
  return _slug(jax.devices()[0].device_kind) or jax.devices()[0].platform


def git_commit() -> dict[str, Any]:
  """{"git_commit": sha or None, "git_dirty": bool or None} of the checkout holding this file.

  GIT_COMMIT in the environment wins: the device machine's copy of the tree carries a .git of
  an older HEAD with the newer files on top, so its own answer would name the wrong commit.
  """
  if os.environ.get("GIT_COMMIT"):
    return {"git_commit": os.environ["GIT_COMMIT"], "git_dirty": None}
  def git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()
  try:
    sha = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": sha, "git_dirty": dirty}
  except (OSError, subprocess.SubprocessError):
    return {"git_commit": os.environ.get("GIT_COMMIT"), "git_dirty": None}


def run_metadata() -> dict[str, Any]:
  """Where and with what a measurement was taken."""
  import jaxlib
  device = jax.devices()[0]
  meta = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "python_version": platform.python_version(),
      **git_commit(),
  }
  try:
    import flax
    meta["flax_version"] = flax.__version__
  except ImportError:
    pass
  try:
    meta["platform_version"] = device.client.platform_version  # e.g. the CUDA / driver versions
  except AttributeError:
    pass
  return meta


def _jsonable(value: Any) -> Any:
  """Converts numpy/JAX scalars and arrays, dataclasses and paths to JSON; non-finite floats -> None."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = dataclasses.asdict(value)
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (jax.Array, np.ndarray)):
    return _jsonable(np.asarray(value).tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None  # strict JSON has no NaN/Infinity
  if isinstance(value, pathlib.PurePath):
    return str(value)
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return str(value)


def _cell(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return f"[{len(value)} values]"
  if isinstance(value, (float, np.floating)):
    v = float(value)
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
      return f"{v:.3e}"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
  return str(value)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Rows as an aligned text table; columns are the keys in order of first appearance."""
  columns: list[str] = []
  for row in rows:
    columns.extend(k for k in row if k not in columns)
  cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  numeric = [all(_is_number(row.get(c)) for row in rows if c in row) for c in columns]

  def line(values: Sequence[str]) -> str:
    return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

  return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def results_path(name: str, *, results_dir: str | os.PathLike | None = None, device: str | None = None,
                 date: str | None = None) -> pathlib.Path:
  """<results_dir>/<YYYY-MM-DD>_<device>_<name>.json (today's UTC date unless `date` is given)."""
  slug = _slug(name)
  if not slug:
    raise ValueError(f"results name {name!r} has no letters or digits; use e.g. 'train_step_200M'")
  date = date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
  directory = pathlib.Path(results_dir) if results_dir is not None else DEFAULT_RESULTS_DIR
  return directory / f"{date[:10]}_{_slug(device or device_kind())}_{slug}.json"


def write_results(name: str, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any] | None = None, *,
                  results_dir: str | os.PathLike | None = None, print_table: bool = True,
                  device: str | None = None) -> pathlib.Path:
  """Writes <results_dir>/<YYYY-MM-DD>_<device>_<name>.json and prints the rows as a table.

  device: the file name's device part (default device_kind(), e.g. 'nvidia-h200'; multi-device
  benchmarks say how many, e.g. 'nvidia-h200x2').

  The file holds {"name", "metadata": run_metadata() plus `meta`, "rows"}. `meta` (the benchmark's
  own settings: shapes, dtypes, configs) may not reuse a key of run_metadata(). A file of the same
  name (same benchmark, device and day) is replaced. Returns the path written.
  """
  metadata = run_metadata()
  clash = set(meta or {}) & set(metadata)
  if clash:
    raise ValueError(f"meta keys {sorted(clash)} would overwrite the run metadata; rename them "
                     "(e.g. prefix with the benchmark's name)")
  metadata.update(meta or {})
  path = results_path(name, results_dir=results_dir, device=device, date=metadata["date"])
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {"name": name, "metadata": _jsonable(metadata), "rows": _jsonable(list(rows))}
  path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
  if print_table:
    print(f"== {name} on {metadata['device_kind']} ({metadata['backend']}), jax {metadata['jax_version']}")
    print(format_table(rows))
    print(f"-> {path}")
  return path


# --------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------

def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """logits: [B, L, V]; targets, weights: [B, L] -> (mean loss over weighted tokens, token count).

  Computed in float32 whatever the logits' dtype.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  if weights is None:
    return jnp.mean(losses), jnp.asarray(losses.size, jnp.float32)
  weights = weights.astype(jnp.float32)
  count = jnp.sum(weights)
  return jnp.sum(losses * weights) / jnp.maximum(count, 1.0), count


def adamw(learning_rate: float | optax.Schedule, *, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-8,
          weight_decay: float = 0.1, clip_norm: float | None = 1.0,
          decay_matrices_only: bool = True) -> optax.GradientTransformation:
  """AdamW with the released Megalodon settings (SPEC §6) by default, used for every model compared.

  decay_matrices_only: no weight decay on vectors (norm scales, biases), the usual LM practice.
  """
  mask = (lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)) if decay_matrices_only else None
  steps = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  steps.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask))
  return optax.chain(*steps)


_BATCH_KEYS = ("inputs", "targets", "weights")


def _global_norm(tree: Any) -> jax.Array:
  """L2 norm of all leaves together, in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)))


def train_step_fn(apply_fn: Callable[..., jax.Array],
                  optimizer: optax.GradientTransformation) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
  """The un-jitted `step(params, opt_state, batch) -> (params, opt_state, metrics)` of make_train_step,
  for callers that jit it themselves (e.g. with shardings, traced under a sharding.Parallelism)."""

  def loss_fn(params, batch):
    missing = {"inputs", "targets"} - set(batch)
    if missing:
      raise KeyError(f"batch lacks {sorted(missing)}; it needs 'inputs' and 'targets' ([B, L] int arrays)")
    extra = {k: v for k, v in batch.items() if k not in _BATCH_KEYS}
    logits = apply_fn(params, batch["inputs"], **extra)
    return cross_entropy(logits, batch["targets"], batch.get("weights"))

  def step(params, opt_state, batch):
    (loss, tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": _global_norm(grads), "tokens": tokens}

  return step


def make_train_step(apply_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation, *,
                    donate: bool = True) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
  """One jitted `step(params, opt_state, batch) -> (params, opt_state, metrics)` for any LM.

  apply_fn(params, inputs, **extra) -> logits [B, L, V]; e.g. for Flax
  `lambda p, x, **kw: model.apply({"params": p}, x, **kw)`.
  batch: {"inputs": [B, L] int, "targets": [B, L] int, optional "weights": [B, L]}; any other keys
  (e.g. "segment_ids") are passed to apply_fn as keyword arguments.
  The step runs forward, float32 cross-entropy, backward and the optimizer update in one program;
  params and opt_state are donated (their buffers reused) unless donate=False.
  metrics: {"loss", "grad_norm", "tokens"} (device scalars).
  """
  return jax.jit(train_step_fn(apply_fn, optimizer), donate_argnums=(0, 1) if donate else ())
