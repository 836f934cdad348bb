"""Opening a split of a TFDS text dataset as a random-access source, with errors that say what to do.

`shakespeare_works` is built into the data dir on first use. Any other dataset (pg19, c4/en, ...)
must already be prepared there in the ArrayRecord format (the only random-access format tfds
reads without TensorFlow). A bucket path (gs://...) needs gcsfs, which this environment does
not install; copying the prepared folder to local disk (gsutil -m cp -r) always works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
from typing import Any

from etils import epath
import tensorflow_datasets as tfds

from megalodon_jax.data import shakespeare

# Datasets whose document text is not in a feature called "text".
KNOWN_TEXT_KEYS = {"pg19": "book_text"}


class DataError(ValueError):
  """A dataset, split or data dir that cannot be read; the message says what to run or pass."""


def resolve_data_dir(data_dir: os.PathLike | str | None) -> str:
  """data_dir, or tfds's default ($TFDS_DATA_DIR, else ~/tensorflow_datasets) when None."""
  return os.fspath(data_dir) if data_dir else tfds.core.constants.get_default_data_dir()


def _base_name(dataset: str) -> str:
  return dataset.split(":")[0].split("/")[0]


def _prepared_datasets(root: epath.Path) -> list[str]:
  """Names of the dataset folders under a data dir that hold some prepared version."""
  found = []
  for child in sorted(root.iterdir()) if root.is_dir() else []:
    # name/version/dataset_info.json, or name/config/version/dataset_info.json.
    if child.is_dir() and any(p for pattern in ("*/dataset_info.json", "*/*/dataset_info.json")
                              for p in child.glob(pattern)):
      found.append(child.name)
  return found


def _prepare_hint(dataset: str, data_dir: str) -> str:
  return (f"prepare it with `tfds build {_base_name(dataset)} --data_dir={data_dir} --file_format=array_record` "
          "(where its builder's dependencies are installed), or pass data_dir= the folder/bucket where it is "
          "already prepared in the array_record format")


def open_split(dataset: str, split: str, data_dir: os.PathLike | str | None = None) -> Sequence[Mapping[str, Any]]:
  """A split of a TFDS dataset as a random-access sequence of example dicts (text features are bytes).

  Args:
    dataset: a TFDS name, optionally with config/version ("c4/en:3.1.0"); "shakespeare_works" is
      built into data_dir when missing.
    split: a TFDS split string, e.g. "train", "validation[:10%]".
    data_dir: where the prepared dataset lives (None: tfds's default).
  Raises:
    DataError: the data dir, dataset, version or split is missing, or the dataset is not in the
      array_record format; the message says what to run or pass.
  """
  data_dir = resolve_data_dir(data_dir)
  if _base_name(dataset) == shakespeare.NAME:
    builder = shakespeare.prepare(data_dir)
  else:
    root = epath.Path(data_dir)
    try:
      exists = root.exists()
    except ImportError as e:  # e.g. gs:// without gcsfs
      raise DataError(f"cannot read data dir {data_dir!r}: {e}; or copy the prepared dataset folder to "
                      "local disk and pass that path") from e
    if not exists:
      raise DataError(f"data dir {data_dir!r} does not exist (looking for dataset {dataset!r}); "
                      + _prepare_hint(dataset, data_dir))
    if not (root / _base_name(dataset)).exists():
      raise DataError(f"dataset {dataset!r} is not in data dir {data_dir!r} (prepared there: "
                      f"{_prepared_datasets(root) or 'none'}); " + _prepare_hint(dataset, data_dir))
    try:
      builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DataError(f"tfds cannot find dataset {dataset!r} in {data_dir!r}: {str(e).splitlines()[0]}; "
                      + _prepare_hint(dataset, data_dir)) from e
    if not builder.is_prepared():
      raise DataError(f"dataset {dataset!r} has no prepared version {builder.version} in {data_dir!r} "
                      f"(no {builder.data_path}/dataset_info.json); " + _prepare_hint(dataset, data_dir))
  return _as_source(builder, dataset, split)


def _as_source(builder, dataset: str, split: str):
  available = list(builder.info.splits)
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise DataError(f"dataset {dataset!r} in {builder.data_path} is stored as {builder.info.file_format}, "
                    "which tfds cannot read by random access; re-prepare it with --file_format=array_record") from e
  except (ValueError, KeyError) as e:
    if "split" in str(e).lower():
      raise DataError(f"dataset {dataset!r} has no split {split!r}; available splits: {available}") from e
    raise


def text_key(dataset: str, example: Mapping[str, Any], requested: str | None = None) -> str:
  """The feature holding the document text: `requested`, a known name, or "text"."""
  key = requested or KNOWN_TEXT_KEYS.get(_base_name(dataset), "text")
  if key not in example:
    raise DataError(f"dataset {dataset!r} has no feature {key!r} (features: {sorted(example)}); "
                    "set text_key in the data config to the feature holding the document text")
  return key
