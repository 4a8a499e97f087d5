"""`mrl_digits`: scikit-learn's bundled handwritten digits as a TFDS dataset.

The source is `sklearn.datasets.load_digits()` (the UCI optical-recognition
digits test set): 1,797 grayscale 8x8 images of the digits 0..9 with pixel
values 0..16. Nothing is downloaded; the data ships inside scikit-learn.

Features:
  image: uint8 [8, 8, 1], PNG-encoded; pixel = round(v * 255 / 16), so 0..16
    becomes 0..255.
  label: ClassLabel with the 10 names "0".."9".
  id: int64, the row of the example in `load_digits()` (0..1796).

Splits (deterministic, stratified by class, seed 0; see `split_indices`):
  train: 1,437 examples, test: 360 examples (20.03 %). Each class sends
  round(20 % of its count) examples to `test` (with largest-remainder rounding
  so that the total is exactly 360), chosen by a permutation of that class's rows
  drawn from `np.random.default_rng(0)`. Within a split, TFDS stores the
  examples in its own fixed order (a hash of the `id` key), not by `id`.

Build it (as array_record, which is what the Grain pipeline reads) with
`mrl_jax.data.sources.open_source("mrl_digits", ...)`, which does it on first
use, or explicitly:

  builder = MrlDigits(data_dir=...)
  builder.download_and_prepare(file_format="array_record")
"""

from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TEST = 360
NUM_TRAIN = NUM_EXAMPLES - NUM_TEST
SPLIT_SEED = 0


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Returns sklearn's digits as (uint8 images [N, 8, 8, 1] on 0..255, int64 labels [N])."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.round(np.asarray(digits.images, np.float64) * (255.0 / 16.0))
  images = np.clip(images, 0, 255).astype(np.uint8)[..., None]
  return images, np.asarray(digits.target, np.int64)


def split_indices(labels: np.ndarray, num_test: int = NUM_TEST,
                  seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """Stratified train/test split of `labels`: sorted index arrays per split.

  Class c gets floor(num_test * n_c / N) test rows, plus one more for the
  classes with the largest remainders until the total is `num_test` (ties go to
  the smaller class id). The rows are the first ones of a permutation of that
  class's indices drawn from `np.random.default_rng(seed)`, classes in order.
  """
  labels = np.asarray(labels)
  classes, counts = np.unique(labels, return_counts=True)
  exact = num_test * counts / len(labels)
  take = np.floor(exact).astype(int)
  order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - take[i]), i))
  for i in order[:num_test - int(take.sum())]:
    take[i] += 1
  rng = np.random.default_rng(seed)
  test = []
  for c, k in zip(classes, take):
    rows = np.flatnonzero(labels == c)
    test.append(rows[rng.permutation(len(rows))[:k]])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {"train": train, "test": test}


class MrlDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, stratified 1,437 train / 360 test."""

  # TFDS looks up a builder's source file through `importlib_resources`, which
  # it does not install; this builder's file is simply this module.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release: sklearn load_digits, 8x8x1 PNG scaled to 0..255, "
               "stratified split 1437/360 with seed 0.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("The 1,797 8x8 grayscale handwritten digits bundled with "
                     "scikit-learn (sklearn.datasets.load_digits), pixels scaled "
                     "from 0..16 to 0..255."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            "id": np.int64,
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships inside scikit-learn.
    images, labels = load_arrays()
    splits = split_indices(labels)
    return {name: self._generate_examples(images, labels, rows)
            for name, rows in splits.items()}

  def _generate_examples(self, images, labels, rows):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    # PIL images are PNG-encoded by PIL itself; a numpy array would need TF.
    for i in rows:
      yield int(i), {
          "image": Image.fromarray(images[i, :, :, 0], mode="L"),
          "label": int(labels[i]),
          "id": int(i),
      }
