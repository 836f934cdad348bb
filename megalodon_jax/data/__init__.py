"""Input pipeline for training Megalodon language models: corpus, tokenizers, packing, grain.

Batches are dicts of numpy arrays, B rows of L = seq_len steps:

  inputs       [B, L] int32    tokens fed to the model
  targets      [B, L] int32    the next token of each input (inputs shifted by one)
  segment_ids  [B, L] int32    document of each INPUT position: 1, 2, 3, ... in order of
                               appearance within the row, 0 for padding
  loss_mask    [B, L] float32  1 where targets[i] is the next token of the same document as
                               inputs[i], else 0 (padding, and the step from one document's
                               last token to the next document's first)

Packing. Each document is tokenized and wrapped as [BOS] + tokens + [EOS] (configurable). The
documents are concatenated in order and cut into rows of L + 1 tokens; inputs = row[:-1],
targets = row[1:], so segment_ids are the row's segment ids without the last one and
loss_mask[i] = (seg[i] == seg[i + 1] != 0). A document longer than the space left in a row
continues in the next row, which begins with a repeat of the last token placed in the row
before (it has no context there, but now predicts its successor). Thus every token of a
document except the first is a target with loss_mask 1 exactly once, and a continued
document restarts at segment id 1 (position 0) of its new row. Only the end of a finite
stream is padded (pad id, segment 0); a short final batch gets all-padding rows.

Example (L = 4, rows of 5 tokens; documents a = a0..a2 and b = b0..b5 after BOS/EOS):

  row 0: a0 a1 a2 b0 b1    segments 1 1 1 2 2   inputs a0 a1 a2 b0   targets a1 a2 b0 b1
                                                segment_ids 1 1 1 2  loss_mask 1 1 0 1
  row 1: b1 b2 b3 b4 b5    segments 1 1 1 1 1   loss_mask 1 1 1 1

Public API:
  DataConfig                              all pipeline settings (a frozen dataclass; from_dict)
  make_train_iterator(config, *, process_index=0, process_count=1) -> grain.DatasetIterator
                                          infinite (or num_epochs) training batches of this
                                          process; get_state() / set_state() for resuming
  make_eval_batches(config, split=None, *, process_index=0, process_count=1,
                    one_document_per_row=False) -> Iterator[batch]
                                          one ordered pass over a split (bits per byte)
  count_text_bytes(config, split=None) -> int
  unigram_bits_per_byte(train_texts, eval_texts) -> float; unigram_baseline(config) -> float
  ByteTokenizer, SentencePieceTokenizer, make_tokenizer("byte" | "sentencepiece:PATH")
  pack_documents(docs, seq_len, pad_id) -> Iterator[row dict]   (the packer, without grain)
  open_split(dataset, split, data_dir) -> random-access examples; DataError
  ShakespeareWorks (TFDS builder "shakespeare_works"), prepare_shakespeare(data_dir)
"""

from megalodon_jax.data.packing import pack_documents
from megalodon_jax.data.pipeline import (
    DataConfig,
    count_text_bytes,
    make_eval_batches,
    make_train_iterator,
    unigram_baseline,
    unigram_bits_per_byte,
)
from megalodon_jax.data.shakespeare import ShakespeareWorks
from megalodon_jax.data.shakespeare import prepare as prepare_shakespeare
from megalodon_jax.data.sources import DataError, open_split
from megalodon_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, make_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "SentencePieceTokenizer",
    "ShakespeareWorks",
    "count_text_bytes",
    "make_eval_batches",
    "make_tokenizer",
    "make_train_iterator",
    "open_split",
    "pack_documents",
    "prepare_shakespeare",
    "unigram_baseline",
    "unigram_bits_per_byte",
]
