"""Packing token documents into fixed-length rows (see megalodon_jax/data/__init__.py for the layout).

The stream of documents is concatenated and cut into rows of `seq_len + 1` tokens. When a
document continues into the next row, that row starts again with the last token placed in the
previous row, so every (token, next token) pair of a document lies together in exactly one row:
each document token after the first is a scored target exactly once.

`PackedRowsIterDataset` runs the same packer inside a grain pipeline with a small, exact
checkpoint state: the parent's state before the document being cut, and the position in it.
`WindowShuffleIterDataset` then mixes rows within windows, also with an exact, small state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grain
import numpy as np

Row = dict[str, np.ndarray]


def _check_lengths(seq_len: int) -> None:
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive integer (rows hold seq_len + 1 tokens), got {seq_len!r}")


class _Packer:
  """Cuts documents into rows; between rows its whole state is (current document, next position)."""

  def __init__(self, seq_len: int, pad_id: int, one_document_per_row: bool):
    _check_lengths(seq_len)
    self.row_len = int(seq_len) + 1
    self.pad_id = int(pad_id)
    self.one_document_per_row = one_document_per_row
    self.doc: np.ndarray | None = None
    self.pos = 0

  def next_row(self, fetch: Callable[[], np.ndarray | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """(tokens, segments): [seq_len + 1] int32 each, or None once `fetch` returns None and all is out."""
    tokens = np.full(self.row_len, self.pad_id, dtype=np.int32)
    segments = np.zeros(self.row_len, dtype=np.int32)
    fill, segment = 0, 0
    while fill < self.row_len:
      if self.doc is None:
        doc = fetch()
        if doc is None:
          break
        self.doc, self.pos = np.asarray(doc, dtype=np.int32).reshape(-1), 0
        if self.doc.size == 0:
          self.doc = None
          continue
      take = min(self.row_len - fill, self.doc.size - self.pos)
      segment += 1
      tokens[fill:fill + take] = self.doc[self.pos:self.pos + take]
      segments[fill:fill + take] = segment
      fill += take
      self.pos += take
      if self.pos == self.doc.size:
        self.doc = None
        if self.one_document_per_row:
          break
      elif fill == self.row_len:
        # The document goes on in the next row, which repeats its last token here as its first
        # input so that the target after it is still predicted (from a fresh context).
        self.pos -= 1
    return (tokens, segments) if fill else None


def row_to_example(tokens: np.ndarray, segments: np.ndarray) -> Row:
  """One packed row of seq_len + 1 tokens -> the model's [seq_len] arrays.

  tokens, segments: [seq_len + 1] -> inputs, targets, segment_ids: [seq_len] int32 and
  loss_mask: [seq_len] float32 (1 where input and target belong to the same document).
  """
  same = (segments[:-1] == segments[1:]) & (segments[:-1] != 0)
  return {
      "inputs": tokens[:-1].astype(np.int32),
      "targets": tokens[1:].astype(np.int32),
      "segment_ids": segments[:-1].astype(np.int32),
      "loss_mask": same.astype(np.float32),
  }


def pack_documents(docs: Iterable[Iterable[int]], seq_len: int, pad_id: int = 0, *,
                   one_document_per_row: bool = False) -> Iterator[Row]:
  """Rows (dicts of [seq_len] arrays, see `row_to_example`) from token documents, in order.

  With one_document_per_row a new document always starts a new row (the rest of the previous
  row is padding), so no row mixes documents.
  """
  packer = _Packer(seq_len, pad_id, one_document_per_row)
  docs_iter = iter(docs)
  fetch = lambda: next(docs_iter, None)
  while (row := packer.next_row(fetch)) is not None:
    yield row_to_example(*row)


def stack_rows(rows: list[Row], batch_size: int, pad_id: int) -> Row:
  """Stacks rows into [batch_size, seq_len] arrays; a short final batch gets all-padding rows."""
  if not rows or len(rows) > batch_size:
    raise ValueError(f"cannot make a batch of {batch_size} rows from {len(rows)} rows")
  batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
  missing = batch_size - len(rows)
  if missing:
    fill = {"inputs": pad_id, "targets": pad_id, "segment_ids": 0, "loss_mask": 0.0}
    batch = {key: np.concatenate([value, np.full((missing,) + value.shape[1:], fill[key], value.dtype)])
             for key, value in batch.items()}
  return batch


class _PackedRowsIterator(grain.DatasetIterator):
  """grain iterator over packed rows; `get_state` is JSON-serialisable."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, one_document_per_row: bool):
    super().__init__(parent)
    self._packer = _Packer(seq_len, pad_id, one_document_per_row)
    self._doc_parent_state: dict[str, Any] | None = None

  def _fetch(self) -> np.ndarray | None:
    # Remember where the parent stood before this document, to fetch it again on restore.
    self._doc_parent_state = self._parent.get_state()
    return next(self._parent, None)

  def __next__(self) -> Row:
    row = self._packer.next_row(self._fetch)
    if row is None:
      raise StopIteration
    return row_to_example(*row)

  def get_state(self) -> dict[str, Any]:
    if self._packer.doc is None:
      return {"parent": self._parent.get_state(), "doc_pos": -1}
    return {"parent": self._doc_parent_state, "doc_pos": int(self._packer.pos)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._packer.doc, self._packer.pos = None, 0
    if state["doc_pos"] >= 0:
      doc = self._fetch()
      if doc is None:
        raise ValueError("cannot restore the packing state: the parent dataset ended before the "
                         "document being packed; was the state saved with a different dataset/config?")
      self._packer.doc = np.asarray(doc, dtype=np.int32).reshape(-1)
      self._packer.pos = int(state["doc_pos"])


class PackedRowsIterDataset(grain.IterDataset):
  """Packs a grain dataset of token documents ([n] int arrays) into rows (see `row_to_example`)."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int,
               one_document_per_row: bool = False):
    super().__init__(parent)
    _check_lengths(seq_len)
    self._seq_len, self._pad_id, self._one_doc = int(seq_len), int(pad_id), one_document_per_row

  def __iter__(self) -> _PackedRowsIterator:
    return _PackedRowsIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._one_doc)

  def __str__(self) -> str:
    return f"PackedRowsIterDataset(seq_len={self._seq_len}, one_document_per_row={self._one_doc})"


class _WindowShuffleIterator(grain.DatasetIterator):
  """Yields each window of `window` consecutive parent elements in a seeded random order."""

  def __init__(self, parent: grain.DatasetIterator, window: int, seed: int):
    super().__init__(parent)
    self._window, self._seed = window, seed
    self._buffer: list[Any] = []
    self._pos = 0
    self._index = 0  # Which window the buffer holds; it seeds that window's order.
    self._start_state = self._parent.get_state()

  def _fill(self) -> None:
    self._start_state = self._parent.get_state()
    items = [item for _, item in zip(range(self._window), self._parent)]
    order = np.random.default_rng([self._seed, self._index]).permutation(len(items))
    self._buffer, self._pos = [items[i] for i in order], 0

  def __next__(self) -> Any:
    if self._pos == len(self._buffer):
      if self._buffer:
        self._index += 1
      self._fill()
      if not self._buffer:
        raise StopIteration
    item, self._buffer[self._pos] = self._buffer[self._pos], None  # Free rows once handed out.
    self._pos += 1
    return item

  def get_state(self) -> dict[str, Any]:
    # Restoring re-reads the current window from its start, so the state stays a few integers.
    return {"parent": self._start_state, "window_index": self._index, "pos": self._pos}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._index = int(state["window_index"])
    self._fill()
    self._pos = min(int(state["pos"]), len(self._buffer))


class WindowShuffleIterDataset(grain.IterDataset):
  """Shuffles consecutive, non-overlapping windows of `window` elements (e.g. packed rows).

  Unlike grain's window shuffle this draws each window's order with numpy, which stays cheap
  for small windows (grain's index_shuffle costs ~20 ms per element below ~100 elements).
  """

  def __init__(self, parent: grain.IterDataset, *, window: int, seed: int):
    super().__init__(parent)
    if window < 1:
      raise ValueError(f"window must be a positive number of elements, got {window}")
    self._window, self._seed = int(window), int(seed)

  def __iter__(self) -> _WindowShuffleIterator:
    return _WindowShuffleIterator(self._parent.__iter__(), self._window, self._seed)

  def __str__(self) -> str:
    return f"WindowShuffleIterDataset(window={self._window}, seed={self._seed})"
