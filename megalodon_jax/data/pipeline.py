"""Training and evaluation input pipelines (grain), and the unigram bits-per-byte baseline."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any

import grain
import numpy as np

from megalodon_jax.data import packing, sources, tokenizers

Source = Sequence[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to cut it into batches.

  dataset / data_dir: a TFDS name and the folder or bucket where it is prepared (None: tfds's
    default); "shakespeare_works" is built there on first use.
  text_key: the feature holding the document text (None: "text", or "book_text" for pg19).
  tokenizer: "byte" or "sentencepiece:/path/to/model".
  seq_len: tokens per row fed to the model; rows hold seq_len + 1 tokens.
  batch_size: rows per batch on THIS process (global batch = batch_size * process_count).
  eval_batch_size: rows per process in make_eval_batches (None: batch_size).
  add_bos / add_eos: wrap every document in BOS ... EOS.
  seed: document order (reshuffled every epoch) and row-window shuffle.
  num_epochs: passes over this process's documents; None repeats forever.
  shuffle_window: rows shuffled together after packing (long documents otherwise fill a whole
    batch with consecutive rows of one work); 0 or 1 turns it off.
  read_threads: threads reading and tokenizing documents.
  """

  dataset: str = "shakespeare_works"
  data_dir: str | None = None
  text_key: str | None = None
  tokenizer: str = "byte"
  seq_len: int = 512
  batch_size: int = 8
  eval_batch_size: int | None = None
  add_bos: bool = True
  add_eos: bool = True
  seed: int = 0
  num_epochs: int | None = None
  shuffle_documents: bool = True
  shuffle_window: int = 1024
  train_split: str = "train"
  eval_split: str = "validation"
  read_threads: int = 2

  def __post_init__(self):
    for name in ("seq_len", "batch_size", "read_threads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < (0 if name == "read_threads" else 1):
        raise ValueError(f"DataConfig.{name} must be a {'non-negative' if name == 'read_threads' else 'positive'} "
                         f"integer, got {value!r}")
    for name in ("eval_batch_size", "num_epochs"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"DataConfig.{name} must be None or a positive integer, got {value!r}")
    if not isinstance(self.shuffle_window, int) or self.shuffle_window < 0:
      raise ValueError(f"DataConfig.shuffle_window must be an integer >= 0 (rows), got {self.shuffle_window!r}")
    if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
      raise ValueError(f"DataConfig.seed must be an integer in [0, 2**32), got {self.seed!r}")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> DataConfig:
    """From a plain dict (or an ml_collections ConfigDict); unknown keys are an error."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown data config keys {unknown}; valid keys: {sorted(names)}")
    return cls(**values)


def _as_config(config: DataConfig | Mapping[str, Any]) -> DataConfig:
  return config if isinstance(config, DataConfig) else DataConfig.from_dict(config)


def _check_process(process_index: int, process_count: int) -> None:
  if not (isinstance(process_count, int) and process_count >= 1 and 0 <= process_index < process_count):
    raise ValueError(f"need 0 <= process_index < process_count (e.g. jax.process_index(), "
                     f"jax.process_count()), got {process_index} of {process_count}")


class _Tokenize:
  """Example dict -> [n] int32 tokens, wrapped in BOS/EOS as configured."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, key: str, add_bos: bool, add_eos: bool):
    for flag, name in ((add_bos, "bos_id"), (add_eos, "eos_id")):
      if flag and getattr(tokenizer, name) < 0:
        raise ValueError(f"{tokenizer!r} has no {name} (it is -1); set add_{name[:3]}=False in the data config")
    self._tok, self._key = tokenizer, key
    self._bos = [tokenizer.bos_id] if add_bos else []
    self._eos = [tokenizer.eos_id] if add_eos else []

  def __call__(self, example: Mapping[str, Any]) -> np.ndarray:
    text = example[self._key]
    if isinstance(self._tok, tokenizers.ByteTokenizer):
      body = self._tok.encode_array(text)
    else:
      body = np.asarray(self._tok.encode(text), dtype=np.int32)
    return np.concatenate([np.asarray(self._bos, np.int32), body, np.asarray(self._eos, np.int32)])


def _open(cfg: DataConfig, split: str, source: Source | None) -> tuple[Source, str]:
  src = source if source is not None else sources.open_split(cfg.dataset, split, cfg.data_dir)
  if len(src) == 0:
    raise sources.DataError(f"split {split!r} of {cfg.dataset!r} has no examples")
  return src, sources.text_key(cfg.dataset, src[0], cfg.text_key)


def _read_options(cfg: DataConfig) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=max(2 * cfg.read_threads, 1))


def make_train_iterator(config: DataConfig | Mapping[str, Any], *, process_index: int = 0,
                        process_count: int = 1, source: Source | None = None) -> grain.DatasetIterator:
  """The training batches of this process, as a checkpointable grain iterator.

  Each process reads documents process_index, process_index + process_count, ... of the train
  split, shuffles them (a new order every epoch), packs them into rows, shuffles rows within
  windows of `shuffle_window` and batches them. `next(it)` gives
  {inputs, targets, segment_ids: [batch_size, seq_len] int32, loss_mask: [batch_size, seq_len] float32}.
  `it.get_state()` is a small JSON-serialisable dict; a fresh iterator given it with
  `it.set_state(state)` yields exactly the batches the saved one would have yielded next
  (grain.checkpoint.CheckpointSave/CheckpointRestore store it with Orbax).
  With num_epochs set, the final batch is padded with empty rows (loss_mask 0), then it stops.

  Args:
    config: a DataConfig or a dict of its fields.
    process_index, process_count: this process's share (jax.process_index(), jax.process_count()).
    source: read these example dicts instead of the configured dataset's train split (tests).
  """
  cfg = _as_config(config)
  _check_process(process_index, process_count)
  tokenizer = tokenizers.make_tokenizer(cfg.tokenizer)
  src, key = _open(cfg, cfg.train_split, source)
  if len(src) < process_count:
    raise sources.DataError(f"the train split has {len(src)} documents, fewer than the {process_count} processes "
                            "sharing it by document; use fewer processes or a larger dataset")
  docs = grain.MapDataset.source(src)[process_index::process_count]
  if cfg.shuffle_documents:
    docs = docs.shuffle(seed=cfg.seed)
  docs = docs.repeat(cfg.num_epochs).map(_Tokenize(tokenizer, key, cfg.add_bos, cfg.add_eos))
  rows = packing.PackedRowsIterDataset(docs.to_iter_dataset(_read_options(cfg)), seq_len=cfg.seq_len,
                                       pad_id=tokenizer.pad_id)
  if cfg.shuffle_window > 1:
    rows = packing.WindowShuffleIterDataset(rows, window=cfg.shuffle_window, seed=cfg.seed)
  batches = rows.batch(cfg.batch_size, batch_fn=functools.partial(
      packing.stack_rows, batch_size=cfg.batch_size, pad_id=tokenizer.pad_id))
  return iter(batches)


def make_eval_batches(config: DataConfig | Mapping[str, Any], split: str | None = None, *,
                      process_index: int = 0, process_count: int = 1, one_document_per_row: bool = False,
                      source: Source | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Evaluation batches over a whole split, in a fixed order, once (same arrays as training).

  Documents are packed as one contiguous stream in the split's order (or, with
  one_document_per_row, each document starts a new row). Every process packs the whole split
  and takes rows [process_index * B, (process_index + 1) * B) of each global batch of
  B * process_count rows, so all processes yield the same number of batches; the last ones are
  padded with empty rows (loss_mask 0). Every token of every document except its first (BOS)
  is scored exactly once, so bits per byte =
  sum(nll_nats * loss_mask) over all batches and processes / (ln 2 * count_text_bytes(...)).
  """
  cfg = _as_config(config)
  _check_process(process_index, process_count)
  tokenizer = tokenizers.make_tokenizer(cfg.tokenizer)
  src, key = _open(cfg, split or cfg.eval_split, source)
  local = cfg.eval_batch_size or cfg.batch_size
  docs = grain.MapDataset.source(src).map(_Tokenize(tokenizer, key, cfg.add_bos, cfg.add_eos))
  rows = packing.PackedRowsIterDataset(docs.to_iter_dataset(_read_options(cfg)), seq_len=cfg.seq_len,
                                       pad_id=tokenizer.pad_id, one_document_per_row=one_document_per_row)
  batches = rows.batch(local * process_count, batch_fn=functools.partial(
      packing.stack_rows, batch_size=local * process_count, pad_id=tokenizer.pad_id))
  lo = process_index * local
  # A generator expression, so that errors above surface at the call rather than at first next().
  return ({name: value[lo:lo + local] for name, value in batch.items()} for batch in batches)


def _texts(cfg: DataConfig, split: str, source: Source | None) -> Iterator[bytes]:
  src, key = _open(cfg, split, source)
  for i in range(len(src)):
    text = src[i][key]
    yield text.encode("utf-8") if isinstance(text, str) else bytes(text)


def count_text_bytes(config: DataConfig | Mapping[str, Any], split: str | None = None, *,
                     source: Source | None = None) -> int:
  """UTF-8 bytes of all documents of a split (the denominator of bits per byte)."""
  cfg = _as_config(config)
  return sum(len(t) for t in _texts(cfg, split or cfg.eval_split, source))


def unigram_bits_per_byte(train_texts: Iterable[bytes | str], eval_texts: Iterable[bytes | str]) -> float:
  """Cross-entropy (bits per byte) of eval_texts under the byte unigram model of train_texts.

  The model counts bytes of train_texts with add-one smoothing over all 256 values, so unseen
  bytes keep a finite cost: p(b) = (count(b) + 1) / (total + 256).
  """
  def histogram(texts):
    counts = np.zeros(256, dtype=np.int64)
    for text in texts:
      data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
      counts += np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    return counts

  train, held_out = histogram(train_texts), histogram(eval_texts)
  if held_out.sum() == 0:
    raise ValueError("the evaluation texts are empty; no bits per byte to compute")
  log2_p = np.log2(train + 1.0) - math.log2(train.sum() + 256.0)
  return float(-(held_out * log2_p).sum() / held_out.sum())


def unigram_baseline(config: DataConfig | Mapping[str, Any], *, max_train_bytes: int | None = 1 << 28) -> float:
  """The unigram bits per byte of the configured eval split under the train split's byte counts.

  Reads train documents in order until max_train_bytes (None: all; the default keeps a c4-sized
  split cheap) and the whole eval split.
  """
  cfg = _as_config(config)

  def capped(texts):
    seen = 0
    for text in texts:
      if max_train_bytes is not None and seen >= max_train_bytes:
        return
      seen += len(text)
      yield text

  return unigram_bits_per_byte(capped(_texts(cfg, cfg.train_split, None)), _texts(cfg, cfg.eval_split, None))
