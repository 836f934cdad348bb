"""Model configuration: a frozen dataclass, its validation, the released presets.

Every check raises `ConfigError` with a message that says what is wrong and how to fix it,
so a bad config fails at construction time and never as a shape error deep inside XLA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

CEMA_METHODS = ("auto", "sequential", "associative", "fft", "chunked", "blocked", "pallas")
ATTENTION_IMPLS = ("xla", "pallas", "auto")
TIMESTEP_NORM_IMPLS = ("xla", "pallas", "auto")
COMPUTE_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_cema_attention", "save_dots_cema_attention",
                  "save_dots_norms_cema_attention", "recompute_elementwise")


class ConfigError(ValueError):
  """A configuration value is invalid; the message says which and how to fix it."""


@dataclasses.dataclass(frozen=True)
class MegalodonConfig:
  """Hyper-parameters of a Megalodon language model (SPEC §1, §6).

  Dimension names follow the release: D = model_dim, Z = z_dim (shared q/k
  representation), V = value_dim, F = ffn_hidden_dim, N = cema_ndim, C = chunk_size.
  """

  vocab_size: int = 32000
  num_layers: int = 12
  model_dim: int = 1024
  z_dim: int = 256
  value_dim: int = 2048
  num_heads: int = 1
  ffn_hidden_dim: int = 2560
  cema_ndim: int = 16
  chunk_size: int = 2048
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  rope_base: float = 10000.0
  swiglu: bool = False
  rescale_nffn: bool = False
  scale_emb: bool = False
  share_emb: bool = False
  dropout: float = 0.0
  attention_dropout: float = 0.0
  hidden_dropout: float = 0.0
  # Numerics and implementation choices (not part of the released checkpoint format).
  dtype: str = "float32"  # compute dtype of matmuls/activations; CEMA and norms stay float32
  param_dtype: str = "float32"
  cema_method: str = "auto"  # auto: the Pallas kernel on GPU/TPU, the blocked XLA path elsewhere
  cema_chunk: int = 64  # T of the chunked and blocked CEMA paths
  attention_impl: str = "auto"
  timestep_norm_impl: str = "auto"  # auto: Pallas on GPU (not for decode steps), else the associative scan
  remat_policy: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    validate(self)

  # Derived sizes -------------------------------------------------------------
  @property
  def z_head_dim(self) -> int:
    return self.z_dim // self.num_heads

  @property
  def v_head_dim(self) -> int:
    return self.value_dim // self.num_heads

  def replace(self, **changes: Any) -> "MegalodonConfig":
    """A copy with some fields changed (validated again)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ConfigError(
          f"unknown MegalodonConfig field(s) {sorted(unknown)}; valid fields are "
          f"{sorted(f.name for f in dataclasses.fields(self))}")
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "MegalodonConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
      raise ConfigError(f"unknown MegalodonConfig field(s) {sorted(unknown)}; valid fields are {sorted(names)}")
    return cls(**dict(values))


def _positive(cfg: MegalodonConfig, *names: str) -> None:
  for name in names:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _divides(cfg: MegalodonConfig, small: str, big: str, what: str) -> None:
  s, b = getattr(cfg, small), getattr(cfg, big)
  if b % s:
    raise ConfigError(
        f"{small}={s} does not divide {big}={b}: {what}. Choose {small} among the divisors of {b} "
        f"or change {big} to a multiple of {s}.")


def validate(cfg: MegalodonConfig) -> None:
  """Raises ConfigError naming the first invalid field of `cfg`."""
  _positive(cfg, "vocab_size", "num_layers", "model_dim", "z_dim", "value_dim", "num_heads",
            "ffn_hidden_dim", "cema_ndim", "chunk_size", "norm_num_groups", "cema_chunk")
  _divides(cfg, "num_heads", "z_dim", "q/k are split into num_heads heads of z_dim/num_heads")
  _divides(cfg, "num_heads", "value_dim", "values are split into num_heads heads of value_dim/num_heads")
  _divides(cfg, "norm_num_groups", "model_dim", "TimestepNorm splits the features into equal groups")
  if cfg.z_head_dim % 2:
    raise ConfigError(f"z_dim/num_heads = {cfg.z_head_dim} must be even: RoPE rotates adjacent pairs")
  for name in ("dropout", "attention_dropout", "hidden_dropout"):
    rate = getattr(cfg, name)
    if not 0.0 <= rate < 1.0:
      raise ConfigError(f"{name} must be in [0, 1), got {rate}")
  if cfg.norm_eps <= 0:
    raise ConfigError(f"norm_eps must be positive, got {cfg.norm_eps}")
  if cfg.rope_base <= 1:
    raise ConfigError(f"rope_base must be > 1, got {cfg.rope_base}")
  for name in ("dtype", "param_dtype"):
    value = getattr(cfg, name)
    if value in ("float16", "half", "fp16"):
      raise ConfigError(
          f"{name}='float16' is not supported: Megalodon's CEMA and TimestepNorm statistics "
          "overflow float16 and the release trains in bf16. Use 'bfloat16' (or 'float32').")
    if value not in COMPUTE_DTYPES:
      raise ConfigError(f"{name} must be one of {COMPUTE_DTYPES}, got {value!r}")
  _choice(cfg, "cema_method", CEMA_METHODS)
  _choice(cfg, "attention_impl", ATTENTION_IMPLS)
  _choice(cfg, "timestep_norm_impl", TIMESTEP_NORM_IMPLS)
  _choice(cfg, "remat_policy", REMAT_POLICIES)


def _choice(cfg: MegalodonConfig, name: str, options: tuple[str, ...]) -> None:
  value = getattr(cfg, name)
  if value not in options:
    raise ConfigError(f"{name} must be one of {options}, got {value!r}")


def check_sequence_length(cfg: MegalodonConfig, length: int) -> None:
  """Sequences no longer than a chunk are one chunk; longer ones must be whole chunks (SPEC §4)."""
  if length > cfg.chunk_size and length % cfg.chunk_size:
    lower = (length // cfg.chunk_size) * cfg.chunk_size
    raise ConfigError(
        f"sequence length {length} is longer than chunk_size={cfg.chunk_size} but not a multiple of it. "
        f"Use a length <= {cfg.chunk_size} or a multiple of it (e.g. {lower} or {lower + cfg.chunk_size}), "
        "or pad the batch with segment id 0.")


# Released presets (SPEC §6). vocab_size defaults to the release's 32000 (LLaMA tokenizer).
PRESETS: dict[str, dict[str, Any]] = {
    "mega200M": dict(num_layers=12, model_dim=1024, num_heads=1, z_dim=256, value_dim=2048,
                     ffn_hidden_dim=2560, chunk_size=2048, norm_num_groups=32),
    "mega1.3B": dict(num_layers=24, model_dim=2048, num_heads=2, z_dim=512, value_dim=4096,
                     ffn_hidden_dim=4864, chunk_size=2048, norm_num_groups=64),
    "mega1.3B_pg19": dict(num_layers=24, model_dim=2048, num_heads=2, z_dim=512, value_dim=4096,
                          ffn_hidden_dim=3584, chunk_size=2048, norm_num_groups=64, swiglu=True,
                          scale_emb=True, share_emb=True),
    "mega7.1B": dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192,
                     ffn_hidden_dim=11264, chunk_size=2048, norm_num_groups=64),
    "mega7.3B": dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192,
                     ffn_hidden_dim=8192, chunk_size=2048, norm_num_groups=64, swiglu=True),
    # Small shapes for tests and CPU runs; same structure as the presets (multi-head, groups).
    "tiny": dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, z_dim=16, value_dim=32,
                 ffn_hidden_dim=64, cema_ndim=4, chunk_size=8, norm_num_groups=4, cema_chunk=4),
    "tiny_swiglu": dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, z_dim=16, value_dim=32,
                        ffn_hidden_dim=48, cema_ndim=4, chunk_size=8, norm_num_groups=4, swiglu=True,
                        scale_emb=True, share_emb=True, rescale_nffn=True, cema_chunk=4),
    "small": dict(vocab_size=260, num_layers=4, model_dim=128, num_heads=2, z_dim=64, value_dim=256,
                  ffn_hidden_dim=256, cema_ndim=16, chunk_size=128, norm_num_groups=16),
}


def preset(name: str, **overrides: Any) -> MegalodonConfig:
  """A named preset (SPEC §6, or a small test shape) with optional field overrides."""
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
  return MegalodonConfig(**{**PRESETS[name], **overrides})


def count_params(cfg: MegalodonConfig) -> int:
  """Number of trainable parameters, from shapes alone (no allocation).

  Matches the released model's parameter count (SPEC §6), e.g. 220,627,968 for mega200M.
  """
  d, z, v, f, n = cfg.model_dim, cfg.z_dim, cfg.value_dim, cfg.ffn_hidden_dim, cfg.cema_ndim
  timenorm = 2 * d
  cema = 4 * d * n + 2 * d  # alpha, delta (D,N); gamma (D,N,2); theta, omega (D)
  rmsnorm = d
  projections = (d * z + z) + 2 * (d * v + v) + (d * d + d) + v * d  # wz, wv, wr, wh1, wh2
  qk_affine = 4 * z  # gamma, beta: (2, Z)
  ffn = 2 * d + (3 if cfg.swiglu else 2) * d * f + (d if cfg.rescale_nffn else 0)
  per_layer = timenorm + cema + rmsnorm + projections + qk_affine + ffn
  embed = cfg.vocab_size * d
  head = 0 if cfg.share_emb else cfg.vocab_size * d
  return cfg.num_layers * per_layer + embed + 2 * d + head
