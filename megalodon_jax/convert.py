"""Conversion between released PyTorch state dicts (SPEC §6) and Flax parameters.

Release layout: flat `name -> array` dicts, linear weights stored (out, in), norm scales stored
as offsets from 1 (the same convention as here, so they are copied as they are), plus buffers
(`rope.freqs`, TimestepNorm priors) that must hold their defaults. Files: `consolidated.pth`
(or one `consolidated.NN.pth` per model-parallel rank), read with torch when it is installed;
`.npz` and `.safetensors` files need no torch.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from megalodon_jax.config import MegalodonConfig


class ConversionError(ValueError):
  """A state dict does not match the config; the message names every offending key."""


# Per-layer entries: release suffix -> (path under the Flax layer, transpose?)
_MEGA_KEYS = {
    "timenorm.weight": (("mega", "timenorm", "weight"), False),
    "timenorm.bias": (("mega", "timenorm", "bias"), False),
    "cema.alpha": (("mega", "cema", "alpha"), False),
    "cema.delta": (("mega", "cema", "delta"), False),
    "cema.theta": (("mega", "cema", "theta"), False),
    "cema.gamma": (("mega", "cema", "gamma"), False),
    "cema.omega": (("mega", "cema", "omega"), False),
    "rmsnorm.weight": (("mega", "rmsnorm", "weight"), False),
    "wz.weight": (("mega", "wz", "kernel"), True),
    "wz.bias": (("mega", "wz", "bias"), False),
    "wv.weight": (("mega", "wv", "kernel"), True),
    "wv.bias": (("mega", "wv", "bias"), False),
    "wr.weight": (("mega", "wr", "kernel"), True),
    "wr.bias": (("mega", "wr", "bias"), False),
    "wh1.weight": (("mega", "wh1", "kernel"), True),
    "wh1.bias": (("mega", "wh1", "bias"), False),
    "wh2.weight": (("mega", "wh2", "kernel"), True),
    "gamma": (("mega", "gamma"), False),
    "beta": (("mega", "beta"), False),
}
_FFN_KEYS = {
    "norm.weight": (("nffn", "norm", "weight"), False),
    "norm.bias": (("nffn", "norm", "bias"), False),
    "fc1.weight": (("nffn", "fc1", "kernel"), True),
    "fc2.weight": (("nffn", "fc2", "kernel"), True),
}
_TIMENORM_BUFFERS = ("prior_count", "prior_mean", "prior_logv")


def release_shapes(config: MegalodonConfig) -> dict[str, tuple[int, ...]]:
  """Every parameter key of a released state dict for `config`, with its (PyTorch-layout) shape."""
  d, z, v, f, n = config.model_dim, config.z_dim, config.value_dim, config.ffn_hidden_dim, config.cema_ndim
  layer = {
      "mega.timenorm.weight": (d,), "mega.timenorm.bias": (d,),
      "mega.cema.alpha": (d, n, 1), "mega.cema.delta": (d, n, 1), "mega.cema.theta": (d, 1, 1),
      "mega.cema.gamma": (d, n, 2), "mega.cema.omega": (d, 1), "mega.rmsnorm.weight": (d,),
      "mega.wz.weight": (z, d), "mega.wz.bias": (z,), "mega.wv.weight": (v, d), "mega.wv.bias": (v,),
      "mega.wr.weight": (v, d), "mega.wr.bias": (v,), "mega.wh1.weight": (d, d), "mega.wh1.bias": (d,),
      "mega.wh2.weight": (d, v), "mega.gamma": (2, z), "mega.beta": (2, z),
      "nffn.norm.weight": (d,), "nffn.norm.bias": (d,), "nffn.fc1.weight": (f, d), "nffn.fc2.weight": (d, f),
  }
  if config.swiglu:
    layer["nffn.fc3.weight"] = (f, d)
  if config.rescale_nffn:
    layer["nffn.alpha"] = (d,)
  shapes = {f"layers.{i}.{k}": s for i in range(config.num_layers) for k, s in layer.items()}
  shapes["embed.weight"] = (config.vocab_size, d)
  shapes["output.final_norm.weight"] = (d,)
  shapes["output.final_norm.bias"] = (d,)
  if not config.share_emb:
    shapes["output.output.weight"] = (config.vocab_size, d)
  return shapes


def _layer_entries(config: MegalodonConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  entries = {f"mega.{k}": v for k, v in _MEGA_KEYS.items()}
  entries.update({f"nffn.{k}": v for k, v in _FFN_KEYS.items()})
  if config.swiglu:
    entries["nffn.fc3.weight"] = (("nffn", "fc3", "kernel"), True)
  if config.rescale_nffn:
    entries["nffn.alpha"] = (("nffn", "alpha"), False)
  return entries


def _buffer_defaults(config: MegalodonConfig) -> dict[str, np.ndarray]:
  """Buffers of a released state dict and the values they must hold."""
  groups = config.norm_num_groups
  half = config.z_head_dim // 2
  freqs = 1.0 / (config.rope_base ** (np.arange(0, 2 * half, 2, dtype=np.float64) / config.z_head_dim))
  out = {"rope.freqs": freqs.astype(np.float32)}
  prefixes = [f"layers.{i}.mega.timenorm" for i in range(config.num_layers)] + ["output.final_norm"]
  for prefix in prefixes:
    out[f"{prefix}.prior_count"] = np.zeros((), np.int64)
    out[f"{prefix}.prior_mean"] = np.zeros((groups,), np.float32)
    out[f"{prefix}.prior_logv"] = np.zeros((groups,), np.float32)
  return out


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def from_release(state_dict: Mapping[str, Any], config: MegalodonConfig, *, check_buffers: bool = True) -> dict:
  """Released state dict -> Flax params (nested dicts of float32 numpy arrays).

  Raises ConversionError listing every missing, unexpected or mis-shaped key.
  """
  state = {k: _to_numpy(v) for k, v in state_dict.items()}
  expected = release_shapes(config)
  buffers = _buffer_defaults(config)
  tied_head = config.share_emb and "output.output.weight" in state
  allowed = set(expected) | set(buffers) | ({"output.output.weight"} if tied_head else set())
  problems = []
  missing = sorted(set(expected) - set(state))
  if missing:
    problems.append(f"missing keys: {missing}")
  unexpected = sorted(set(state) - allowed)
  if unexpected:
    problems.append(f"unexpected keys: {unexpected}")
  for key, shape in expected.items():
    if key in state and tuple(state[key].shape) != shape:
      problems.append(f"key {key!r} has shape {tuple(state[key].shape)}, expected {shape} for this config")
  if tied_head and not np.array_equal(state["output.output.weight"], state["embed.weight"]):
    problems.append("share_emb=True but output.output.weight differs from embed.weight")
  if check_buffers:
    for key, default in buffers.items():
      if key in state:
        value = state[key]
        if value.shape != default.shape or not np.allclose(value.astype(np.float64), default, rtol=1e-6, atol=0):
          problems.append(f"buffer {key!r} does not hold its default ({'rope base' if 'rope' in key else 'zeros'}); "
                          "this converter supports only the released defaults")
  if problems:
    raise ConversionError("state dict does not match the config:\n  " + "\n  ".join(problems))

  def leaf(key: str, transpose: bool) -> np.ndarray:
    value = state[key].astype(np.float32)
    return np.ascontiguousarray(value.T) if transpose else value

  layers = []
  for i in range(config.num_layers):
    layer: dict = {}
    for suffix, (path, transpose) in _layer_entries(config).items():
      node = layer
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = leaf(f"layers.{i}.{suffix}", transpose)
    layers.append(layer)
  params: dict = {"embed": {"embedding": leaf("embed.weight", False)},
                  "final_norm": {"weight": leaf("output.final_norm.weight", False),
                                 "bias": leaf("output.final_norm.bias", False)}}
  if not config.share_emb:
    params["output"] = {"kernel": leaf("output.output.weight", True)}
  if config.scan_layers:
    params["layers"] = _stack(layers)
  else:
    params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
  return params


def to_release(params: Mapping[str, Any], config: MegalodonConfig, *, with_buffers: bool = True) -> dict:
  """Flax params -> released state dict (flat, PyTorch layout, float32 numpy arrays)."""
  params = _as_numpy_tree(params)
  if config.scan_layers:
    layers = _unstack(params["layers"], config.num_layers)
  else:
    layers = [params[f"layers_{i}"] for i in range(config.num_layers)]
  state = {}
  for i, layer in enumerate(layers):
    for suffix, (path, transpose) in _layer_entries(config).items():
      value = layer
      for name in path:
        value = value[name]
      state[f"layers.{i}.{suffix}"] = np.ascontiguousarray(value.T) if transpose else value
  state["embed.weight"] = params["embed"]["embedding"]
  state["output.final_norm.weight"] = params["final_norm"]["weight"]
  state["output.final_norm.bias"] = params["final_norm"]["bias"]
  # A tied head is one tensor under two names in a PyTorch state dict.
  state["output.output.weight"] = (params["embed"]["embedding"] if config.share_emb
                                   else np.ascontiguousarray(params["output"]["kernel"].T))
  if with_buffers:
    state.update(_buffer_defaults(config))
  return state


def _as_numpy_tree(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _as_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float32)


def _stack(layers: Sequence[dict]) -> dict:
  first = layers[0]
  if isinstance(first, dict):
    return {k: _stack([layer[k] for layer in layers]) for k in first}
  return np.stack(layers)


def _unstack(tree: Any, count: int) -> list:
  if isinstance(tree, Mapping):
    parts = {k: _unstack(v, count) for k, v in tree.items()}
    return [{k: parts[k][i] for k in parts} for i in range(count)]
  return [tree[i] for i in range(count)]


# Model-parallel shards --------------------------------------------------------------------------
# Which axis each released tensor is split along across model-parallel ranks (None: replicated).
_SHARD_AXES = [
    (r"\.mega\.timenorm\.(weight|bias|prior_mean|prior_logv)$", 0),
    (r"\.mega\.cema\.(alpha|delta|theta|gamma|omega)$", 0),
    (r"\.mega\.(wz|wv|wr|wh1)\.(weight|bias)$", 0),  # column parallel: output features
    (r"\.mega\.wh2\.weight$", 1),  # row parallel: input features
    (r"\.mega\.(gamma|beta)$", 1),
    (r"\.nffn\.(fc1|fc3)\.weight$", 0),
    (r"\.nffn\.fc2\.weight$", 1),
    (r"^embed\.weight$", 1),
    (r"^output\.final_norm\.(weight|bias|prior_mean|prior_logv)$", 0),
    (r"^output\.output\.weight$", 1),
]


def shard_axis(key: str) -> int | None:
  """The axis along which the release splits `key` across model-parallel ranks, or None."""
  for pattern, axis in _SHARD_AXES:
    if re.search(pattern, key):
      return axis
  return None


def merge_model_parallel_shards(shards: Sequence[Mapping[str, Any]]) -> dict:
  """Per-rank state dicts (rank order) -> one consolidated state dict."""
  shards = [{k: _to_numpy(v) for k, v in s.items()} for s in shards]
  keys = set(shards[0])
  for rank, shard in enumerate(shards[1:], start=1):
    if set(shard) != keys:
      diff = sorted(keys.symmetric_difference(shard))
      raise ConversionError(f"model-parallel shard {rank} has different keys from shard 0: {diff}")
  merged = {}
  for key in sorted(keys):
    axis = shard_axis(key)
    if axis is None or len(shards) == 1:
      merged[key] = shards[0][key]
    else:
      merged[key] = np.concatenate([s[key] for s in shards], axis=axis)
  return merged


# Files ------------------------------------------------------------------------------------------
def load_state_dict(path: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, np.ndarray]:
  """Reads a state dict from .pt/.pth (needs torch), .npz or .safetensors.

  A sequence of paths (or a directory holding consolidated.NN.pth files) is read as
  model-parallel shards in rank order and merged.
  """
  if isinstance(path, (list, tuple)):
    return merge_model_parallel_shards([load_state_dict(p) for p in path])
  path = os.fspath(path)
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if re.fullmatch(r"consolidated(\.\d+)?\.pth", f))
    if not files:
      raise FileNotFoundError(f"no consolidated*.pth files in directory {path}")
    return load_state_dict([os.path.join(path, f) for f in files]) if len(files) > 1 else \
        load_state_dict(os.path.join(path, files[0]))
  if not os.path.exists(path):
    raise FileNotFoundError(f"state dict file {path} does not exist")
  if path.endswith((".pt", ".pth")):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path} needs PyTorch (pip install torch); or convert it to .npz or "
                        ".safetensors where torch is available") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: _to_numpy(v) for k, v in state.items()}
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  raise ValueError(f"unknown state dict format for {path}: use .pt/.pth, .npz or .safetensors")


def save_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes a state dict as .npz, .safetensors or .pt/.pth (needs torch)."""
  path = os.fspath(path)
  arrays = {k: np.asarray(v, order="C") for k, v in state.items()}  # (ascontiguousarray would make 0-d arrays 1-d)
  if path.endswith(".npz"):
    np.savez(path, **arrays)
  elif path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file(arrays, path)
  elif path.endswith((".pt", ".pth")):
    import torch
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
  else:
    raise ValueError(f"unknown state dict format for {path}: use .pt/.pth, .npz or .safetensors")
