"""Bytes exchanged per layer per training step by sequence parallelism, from shapes alone.

  python -m experiments.comm_report --preset=mega7.1B --seq_len=32768 --batch=8 --data=1 --sequence=8

Each device of the sequence axis (P of them) holds L / P steps of b = batch / (data * fsdp) rows.
Per Megalodon block, the recurrences need the state that enters the device's slice:

  CEMA summary           b * D * N complex64 (8 bytes) + a keep flag per row + the span (int32)
  TimestepNorm summary   b * (reset flag, count, G means, G variances), 4 bytes each
  boundary ids           b int32 (only with packed sequences: does a document continue?)

The release sends, per block, ONE message of b * (2G + 2 D N) float32 from rank r to rank r + 1
(TimestepNorm mean/var and the CEMA state) and the same size back in the backward pass: a chain,
where rank r cannot finish the layer before rank r - 1 has. This project combines the same
summaries with a parallel prefix instead:

  all_gather   one all-gather of the P summaries, then a local fold: depth 1; each device
               receives the P - 1 other summaries (a ring moves them in P - 1 pipelined hops);
  doubling     Hillis-Steele: ceil(log2 P) rounds of one ppermute, plus one shift round;
  chain        the release: P - 1 dependent hops, one message per device.

The message per link is the same size in all three ("same bytes"); what differs is how many
messages a device handles and the depth (dependent rounds). The backward pass moves the same bytes
again (the transposes: reduce-scatter / reversed ppermute / reversed chain). For scale, the table
also gives one [b, L/P, D] bf16 activation (what a layer's output weighs on a device) and the
per-layer parameter bytes FSDP gathers (and reduce-scatters) when mesh.fsdp > 1.
"""

from __future__ import annotations

import dataclasses
import math

from absl import app, flags

from megalodon_jax.config import MegalodonConfig, preset

_PRESET = flags.DEFINE_string("preset", "mega7.1B", "Model preset (megalodon_jax.config.PRESETS).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 32768, "Sequence length L of a training row.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (rows per step).")
_DATA = flags.DEFINE_integer("data", 1, "Mesh size of the data axis (ICI x DCN).")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Mesh size of the fsdp axis.")
_SEQUENCE = flags.DEFINE_integer("sequence", 8, "Mesh size of the sequence axis (P).")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Mesh size of the tensor axis.")
_PACKED = flags.DEFINE_bool("packed", True, "Packed documents (segment ids): count the boundary-id exchange.")

F32 = 4


@dataclasses.dataclass(frozen=True)
class Summaries:
  """Bytes of the per-device summaries of ONE block (one TimestepNorm and one CEMA)."""
  cema: int
  timestep_norm: int
  boundary_ids: int  # per op that needs it (two per block), 0 without packed sequences

  @property
  def per_block(self) -> int:
    return self.cema + self.timestep_norm + 2 * self.boundary_ids


def summary_bytes(cfg: MegalodonConfig, rows: int, packed: bool = True) -> Summaries:
  """What megalodon_jax.sharding.sequence_parallel exchanges for `rows` rows on a device."""
  d, n, g = cfg.model_dim, cfg.cema_ndim, cfg.norm_num_groups
  cema = rows * d * n * 2 * F32 + rows * F32 + F32  # state as (re, im) f32 pairs, keep flags, span
  tsn = rows * (F32 + F32 + 2 * g * F32)  # reset flag, count, mean [G], var [G]
  return Summaries(cema=cema, timestep_norm=tsn, boundary_ids=rows * F32 if packed else 0)


def release_message_bytes(cfg: MegalodonConfig, rows: int) -> int:
  """The release's per-block chain message: [rows, 2G + 2 D N] float32."""
  return rows * (2 * cfg.norm_num_groups + 2 * cfg.model_dim * cfg.cema_ndim) * F32


def block_param_bytes(cfg: MegalodonConfig, dtype_bytes: int = 4) -> int:
  d, z, v, f, n = cfg.model_dim, cfg.z_dim, cfg.value_dim, cfg.ffn_hidden_dim, cfg.cema_ndim
  per_layer = (2 * d + 4 * d * n + 2 * d + d + (d * z + z) + 2 * (d * v + v) + (d * d + d) + v * d + 4 * z
               + 2 * d + (3 if cfg.swiglu else 2) * d * f + (d if cfg.rescale_nffn else 0))
  return per_layer * dtype_bytes


@dataclasses.dataclass(frozen=True)
class Schedule:
  name: str
  messages_per_device: int  # summaries a device receives per block and pass
  depth: int  # dependent communication rounds per block and pass


def schedules(parts: int) -> list[Schedule]:
  rounds = math.ceil(math.log2(parts)) if parts > 1 else 0
  return [Schedule("chain (release)", 1 if parts > 1 else 0, parts - 1),
          Schedule("all_gather", parts - 1, 1 if parts > 1 else 0),
          Schedule("doubling", rounds + 1 if parts > 1 else 0, rounds + 1 if parts > 1 else 0)]


def fmt(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
    n /= 1024
  return str(n)


def report(cfg: MegalodonConfig, *, seq_len: int, batch: int, data: int, fsdp: int, sequence: int, tensor: int,
           packed: bool) -> str:
  replicas = data * fsdp
  if batch % replicas:
    raise ValueError(f"batch={batch} must be divisible by data * fsdp = {replicas}")
  if seq_len % sequence or (seq_len // sequence) % min(cfg.chunk_size, seq_len):
    raise ValueError(f"seq_len={seq_len} / sequence={sequence} must be a multiple of chunk_size={cfg.chunk_size}")
  rows, local = batch // replicas, seq_len // sequence
  s = summary_bytes(cfg, rows, packed)
  release = release_message_bytes(cfg, rows)
  activation = rows * local * cfg.model_dim * 2
  lines = [
      f"preset D={cfg.model_dim} N={cfg.cema_ndim} G={cfg.norm_num_groups} layers={cfg.num_layers}; "
      f"mesh data={data} fsdp={fsdp} sequence={sequence} tensor={tensor}; batch {batch} x L {seq_len}",
      f"per device: b={rows} rows x {local} steps ({local // min(cfg.chunk_size, local)} attention chunks); "
      "attention needs no communication",
      "",
      "one summary per block (forward; the backward pass moves the same again):",
      f"  CEMA {fmt(s.cema)} + TimestepNorm {fmt(s.timestep_norm)}"
      + (f" + 2 x boundary ids {fmt(s.boundary_ids)}" if packed else "") + f" = {fmt(s.per_block)}",
      f"  release chain message: {fmt(release)}  (same content: mean/var and the CEMA state)",
      f"  for scale: one [b, L/P, D] bf16 activation = {fmt(activation)} "
      f"({activation / max(s.per_block, 1):,.0f} x a summary)",
      "",
      f"{'schedule':<18}{'msgs/device':>12}{'bytes/device':>16}{'all links':>16}{'depth':>8}"
      f"{'per step (' + str(cfg.num_layers) + ' layers, fwd+bwd)':>36}",
  ]
  for sched in schedules(sequence):
    message = release if sched.name.startswith("chain") else s.per_block
    per_device = sched.messages_per_device * message
    links = (sequence - 1 if sched.name.startswith("chain") else sequence * sched.messages_per_device) * message
    per_step = 2 * cfg.num_layers * per_device
    lines.append(f"{sched.name:<18}{sched.messages_per_device:>12}{fmt(per_device):>16}{fmt(links):>16}"
                 f"{sched.depth:>8}{fmt(per_step):>36}")
  lines.append("")
  lines.append("depth = dependent communication rounds per block; the chain also serialises the compute "
               f"(rank r starts after rank r-1), the prefix schemes do not.")
  if fsdp > 1:
    gathered = block_param_bytes(cfg) * (fsdp - 1) // fsdp
    lines.append(f"FSDP (fsdp={fsdp}): per block each device gathers {fmt(gathered)} of float32 parameters "
                 f"(forward, again in backward) and reduce-scatters as much gradient.")
  return "\n".join(lines)


def main(argv):
  del argv
  cfg = preset(_PRESET.value)
  print(report(cfg, seq_len=_SEQ_LEN.value, batch=_BATCH.value, data=_DATA.value, fsdp=_FSDP.value,
               sequence=_SEQUENCE.value, tensor=_TENSOR.value, packed=_PACKED.value))


if __name__ == "__main__":
  app.run(main)
