"""Tokenizers with one small interface: a byte-level tokenizer and a SentencePiece wrapper.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `pad_id`, `bos_id`
and `eos_id`. `encode` never adds BOS/EOS itself: the pipeline adds them per document.

ByteTokenizer ids (vocab_size 260, the `small` preset's vocabulary):

  0 pad, 1 bos, 2 eos, 3 reserved (never produced), 4 + b for each UTF-8 byte b in 0..255.
"""

from __future__ import annotations

from collections.abc import Iterable
import os
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
  """What the pipeline needs from a tokenizer."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str | bytes) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted past four special ids (see the module docstring for the id table)."""

  pad_id = 0
  bos_id = 1
  eos_id = 2
  num_special = 4  # pad, bos, eos and one reserved id
  vocab_size = 256 + num_special

  def encode(self, text: str | bytes) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str | bytes) -> np.ndarray:
    """Like `encode` but returns a numpy array: [num_bytes] int32 (the fast path for packing)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self.num_special

  def decode(self, ids: Iterable[int]) -> str:
    """Bytes of the non-special ids as UTF-8; invalid sequences (e.g. cut samples) become U+FFFD."""
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"token ids must lie in [0, {self.vocab_size}) for the byte tokenizer, "
                       f"got values in [{ids.min()}, {ids.max()}]")
    data = (ids[ids >= self.num_special] - self.num_special).astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class SentencePieceTokenizer:
  """A SentencePiece model file behind the same interface as ByteTokenizer.

  Models without a pad piece (LLaMA's has pad_id -1) use id 0 for padding: padded positions
  carry segment id 0 and loss mask 0, so the id there is never attended to or scored.
  """

  def __init__(self, model_file: str | os.PathLike):
    import sentencepiece  # Imported here so the byte tokenizer works without it.
    path = os.fspath(model_file)
    if not os.path.exists(path):
      raise FileNotFoundError(f"SentencePiece model file {path!r} does not exist; pass the path of a "
                              "trained .model file (e.g. tokenizer.model of the LLaMA release)")
    self.model_file = path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    pad = int(self._sp.pad_id())
    self.pad_id = pad if pad >= 0 else 0

  def encode(self, text: str | bytes) -> list[int]:
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.model_file!r})"


def make_tokenizer(spec: str) -> ByteTokenizer | SentencePieceTokenizer:
  """A tokenizer from a config string: "byte", or "sentencepiece:PATH" (alias "spm:PATH")."""
  if spec == "byte":
    return ByteTokenizer()
  kind, sep, path = spec.partition(":")
  if sep and kind in ("sentencepiece", "spm") and path:
    return SentencePieceTokenizer(path)
  raise ValueError(f"unknown tokenizer spec {spec!r}; use 'byte' or 'sentencepiece:/path/to/model.model'")
