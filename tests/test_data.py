"""Input pipeline: the digits builder, sources, preprocessing and Grain iterators."""

import math

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mrl_jax.errors import ConfigError
from mrl_jax.data import digits
from mrl_jax.data import pipeline
from mrl_jax.data import preprocess
from mrl_jax.data import sources


def digits_cfg(data_dir, **overrides) -> ml_collections.ConfigDict:
  cfg = dict(name="mrl_digits", data_dir=data_dir, image_size=12,
             train_augment="random_resized_crop", crop_scale=(0.5, 1.0), flip=True,
             eval_crop_fraction=1.0, mean=(0.5,), std=(0.25,), prefetch=2)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def fake_processes(monkeypatch, index, count):
  """Makes this process look like process `index` of `count` (the barrier a no-op)."""
  from jax.experimental import multihost_utils
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)


# ---------------------------------------------------------------- mrl_digits


def test_digits_build_matches_sklearn(digits_data_dir):
  images, labels = digits.load_arrays()
  assert images.shape == (1797, 8, 8, 1) and images.max() == 255
  from sklearn.datasets import load_digits
  raw = load_digits()
  np.testing.assert_array_equal(images[..., 0], np.round(raw.images * 255 / 16).astype(np.uint8))

  seen = []
  for split, size in (("train", digits.NUM_TRAIN), ("test", digits.NUM_TEST)):
    source, info = sources.open_source("mrl_digits", split, digits_data_dir)
    assert len(source) == size == info.splits[split].num_examples
    assert sources.dataset_num_classes(info) == 10
    ids = []
    for i in range(len(source)):
      ex = source[i]
      np.testing.assert_array_equal(ex["image"], images[ex["id"]])
      assert ex["image"].dtype == np.uint8
      assert ex["label"] == labels[ex["id"]]
      ids.append(int(ex["id"]))
    seen.append(sorted(ids))
    # The split is stratified: every class within one example of 20 %.
    share = np.bincount(labels[ids], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(share - size / 1797) < 0.02)
  assert (1437, 360) == (len(seen[0]), len(seen[1]))
  assert sorted(seen[0] + seen[1]) == list(range(1797))
  np.testing.assert_array_equal(seen[1], digits.split_indices(labels)["test"])

  # The files on disk are TFDS array_record, readable without this package.
  builder = tfds.builder_from_directory(f"{digits_data_dir}/mrl_digits/1.0.0")
  assert builder.info.file_format.value == "array_record"
  on_disk = builder.as_data_source(split="test")
  ex = on_disk[7]
  np.testing.assert_array_equal(ex["image"], images[ex["id"]])


def test_embedded_dataset_is_built_by_process_0_then_the_others(tmp_path, monkeypatch):
  from jax.experimental import multihost_utils
  for index in (0, 1):
    data_dir = str(tmp_path / f"p{index}")
    at_barrier = []
    fake_processes(monkeypatch, index, 2)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name, d=data_dir:
                        at_barrier.append(digits.MrlDigits(data_dir=d).is_prepared()))
    source, _ = sources.open_source("mrl_digits", "test", data_dir)
    # Process 0 builds before the barrier; process 1 waits at it (and, on a
    # data_dir not shared with process 0, as here, then builds its own copy).
    assert at_barrier == [index == 0]
    assert len(source) == 360


# ---------------------------------------------------------------- sources


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(sources.DatasetNotPreparedError) as e:
    sources.open_source("imagenet2012", "train", data_dir)
  message = str(e.value)
  assert "imagenet2012" in message and data_dir in message
  assert f"tfds build imagenet2012 --file_format=array_record --data_dir={data_dir}" in message
  with pytest.raises(FileNotFoundError, match="tfds build imagenet2012"):
    pipeline.dataset_info(ml_collections.ConfigDict(
        dict(name="imagenet2012", data_dir=data_dir, image_size=32)))


def test_unknown_dataset_name():
  with pytest.raises(sources.UnknownDatasetError, match="'no_such_set' is not a TFDS dataset"):
    sources.open_source("no_such_set", "train", None)


def test_imagenet_mock_examples_give_batches_of_the_requested_size():
  cfg = ml_collections.ConfigDict(dict(
      name="imagenet2012", eval_split="validation", image_size=24, eval_image_size=20,
      eval_crop_fraction=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
      mock_examples=10))
  info = pipeline.dataset_info(cfg)
  assert info == pipeline.DatasetSummary(
      num_classes=1000, num_train_examples=10, num_eval_examples=10, image_shape=(24, 24, 3),
      multilabel=False, eval_image_shape=(20, 20, 3))
  batch = next(pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  assert np.all((batch["label"] >= 0) & (batch["label"] < 1000))
  evals = list(pipeline.make_eval_batches(cfg, global_batch_size=4))
  assert [b["image"].shape for b in evals] == [(4, 20, 20, 3)] * 3
  assert sum(b["mask"].sum() for b in evals) == 10


# ---------------------------------------------------------------- training iterator


def test_train_iterator_is_deterministic_with_the_right_shapes(digits_data_dir):
  cfg = digits_cfg(digits_data_dir)
  first = take(pipeline.make_train_iterator(cfg, global_batch_size=32, seed=5), 3)
  again = take(pipeline.make_train_iterator(cfg, global_batch_size=32, seed=5), 3)
  other = take(pipeline.make_train_iterator(cfg, global_batch_size=32, seed=6), 3)
  assert_batches_equal(first, again)
  assert not np.array_equal(first[0]["label"], other[0]["label"])
  for batch in first:
    assert batch["image"].shape == (32, 12, 12, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    # (x / 255 - 0.5) / 0.25 lies in [-2, 2].
    assert batch["image"].min() >= -2.0 and batch["image"].max() <= 2.0
    assert set(batch["label"].tolist()) <= set(range(10))
  assert pipeline.dataset_info(cfg) == pipeline.DatasetSummary(
      num_classes=10, num_train_examples=1437, num_eval_examples=360,
      image_shape=(12, 12, 1), multilabel=False, eval_image_shape=(12, 12, 1))


def test_each_epoch_is_a_permutation(digits_data_dir):
  # Native size, no augmentation: batches are the stored images, so epochs can
  # be matched against the source by label counts and by pixel sums.
  cfg = digits_cfg(digits_data_dir, image_size=None, train_augment="resize", flip=False,
                   mean=(0.0,), std=(1.0,), prefetch=0)
  batches = take(pipeline.make_train_iterator(cfg, global_batch_size=479, seed=1), 6)
  labels = np.concatenate([b["label"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  _, all_labels = digits.load_arrays()
  train_labels = all_labels[digits.split_indices(all_labels)["train"]]
  for epoch in range(2):
    rows = slice(epoch * 1437, (epoch + 1) * 1437)
    np.testing.assert_array_equal(np.bincount(labels[rows], minlength=10),
                                  np.bincount(train_labels, minlength=10))
  assert not np.array_equal(labels[:1437], labels[1437:])  # A new order per epoch.
  np.testing.assert_allclose(images[:1437].sum(), images[1437:].sum(), rtol=1e-5)


@pytest.mark.parametrize("prefetch,read_threads", [(0, 0), (2, 0), (2, 2)])
def test_resume_from_state_across_an_epoch_boundary(digits_data_dir, prefetch, read_threads):
  cfg = digits_cfg(digits_data_dir, prefetch=prefetch, read_threads=read_threads)
  # 1437 examples / 128 = 11.2 batches per epoch: steps 9..14 cross into epoch 2.
  it = pipeline.make_train_iterator(cfg, global_batch_size=128, seed=0)
  take(it, 9)
  state = it.get_state()
  expected = take(it, 6)
  resumed = pipeline.make_train_iterator(cfg, global_batch_size=128, seed=0)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 6), expected)
  assert it.get_state() == resumed.get_state() == {"next_index": 15}


def test_two_processes_together_read_the_one_process_global_batch(digits_data_dir, monkeypatch):
  cfg = digits_cfg(digits_data_dir)
  steps = 14  # Past the first epoch (22.5 steps of 64 would be one; 1437/64).
  whole = take(pipeline.make_train_iterator(cfg, global_batch_size=64, seed=2), steps)
  halves = []
  for index in range(2):
    fake_processes(monkeypatch, index, 2)
    halves.append(take(pipeline.make_train_iterator(cfg, global_batch_size=64, seed=2), steps))
  for step in range(steps):
    for key in ("image", "label"):
      assert halves[0][step][key].shape[0] == 32
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), whole[step][key])


def test_global_batch_must_split_over_processes(digits_data_dir, monkeypatch):
  fake_processes(monkeypatch, 0, 3)
  with pytest.raises(ConfigError, match="multiple of the process count 3"):
    pipeline.make_train_iterator(digits_cfg(digits_data_dir), global_batch_size=64, seed=0)


def test_grain_checkpoint_args_round_trip_with_orbax(digits_data_dir, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  cfg = digits_cfg(digits_data_dir)
  it = pipeline.make_train_iterator(cfg, global_batch_size=64, seed=0)
  take(it, 3)
  with ocp.CheckpointManager(tmp_path, item_handlers={
      "data": grain.checkpoint.CheckpointHandler()}) as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 2)
    resumed = pipeline.make_train_iterator(cfg, global_batch_size=64, seed=0)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert_batches_equal(take(resumed, 2), expected)


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("global_batch", [100, 120, 512])
def test_eval_batches_cover_the_split_once(digits_data_dir, global_batch):
  cfg = digits_cfg(digits_data_dir, image_size=None, mean=(0.0,), std=(1.0,))
  batches = list(pipeline.make_eval_batches(cfg, global_batch_size=global_batch))
  assert len(batches) == math.ceil(360 / global_batch)
  for b in batches:
    assert b["image"].shape == (global_batch, 8, 8, 1) and b["mask"].dtype == np.float32
    assert b["label"].dtype == np.int32
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 360 and np.all(mask[:360] == 1) and np.all(mask[360:] == 0)
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert np.all(images[360:] == 0) and np.all(labels[360:] == 0)
  source, _ = sources.open_source("mrl_digits", "test", digits_data_dir)
  np.testing.assert_array_equal(labels[:360], [source[i]["label"] for i in range(360)])
  np.testing.assert_allclose(images[:360], np.stack(
      [source[i]["image"] for i in range(360)]).astype(np.float32) / 255, rtol=1e-6)


def test_eval_batches_split_over_two_processes(digits_data_dir, monkeypatch):
  cfg = digits_cfg(digits_data_dir)
  whole = list(pipeline.make_eval_batches(cfg, global_batch_size=100))
  parts = []
  for index in range(2):
    fake_processes(monkeypatch, index, 2)
    parts.append(list(pipeline.make_eval_batches(cfg, global_batch_size=100)))
  assert len(parts[0]) == len(parts[1]) == len(whole) == 4
  for step, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key])


# ---------------------------------------------------------------- bad data and config


class _Source:
  def __init__(self, examples):
    self.examples = examples

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]


@pytest.mark.parametrize("bad,match", [
    ({"label": 10}, r"mrl_digits/(train|test) example 3: label 10 is out of range \[0, 10\)"),
    ({"image": np.zeros((8, 8, 3), np.uint8)}, r"example 3: image 'image' is uint8 \[8, 8, 3\]"),
])
def test_bad_examples_are_named(digits_data_dir, monkeypatch, bad, match):
  _, info = sources.open_source("mrl_digits", "train", digits_data_dir)
  examples = [{"image": np.zeros((8, 8, 1), np.uint8), "label": 1} for _ in range(6)]
  examples[3] = {**examples[3], **bad}
  monkeypatch.setattr(sources, "open_source", lambda *a, **k: (_Source(examples), info))
  cfg = digits_cfg(digits_data_dir, prefetch=0)
  with pytest.raises(pipeline.DataError, match=match):
    take(pipeline.make_train_iterator(cfg, global_batch_size=6, seed=0), 1)
  with pytest.raises(pipeline.DataError, match=match):
    list(pipeline.make_eval_batches(cfg, global_batch_size=6))


@pytest.mark.parametrize("overrides,match", [
    ({"crop_scal": (0.1, 1.0)}, "Unknown data config field"),
    ({"train_augment": "autoaugment"}, "train_augment"),
    ({"mean": (0.4, 0.4, 0.4), "std": (0.2, 0.2, 0.2)}, "1 channel"),
    ({"eval_crop_fraction": 1.5}, "eval_crop_fraction"),
])
def test_config_mistakes(digits_data_dir, overrides, match):
  with pytest.raises(ConfigError, match=match):
    pipeline.dataset_info(digits_cfg(digits_data_dir, **overrides))


# ---------------------------------------------------------------- preprocessing


def test_random_resized_crop_size_and_determinism():
  image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  a = preprocess.random_resized_crop(image, np.random.default_rng(1), 16)
  b = preprocess.random_resized_crop(image, np.random.default_rng(1), 16)
  c = preprocess.random_resized_crop(image, np.random.default_rng(2), 16)
  assert a.shape == (16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  gray = preprocess.random_resized_crop(image[:, :, :1], np.random.default_rng(1), (10, 12))
  assert gray.shape == (10, 12, 1)


def test_random_resized_crop_boxes_and_fallback():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = preprocess.random_resized_crop_params(50, 60, rng, (0.2, 0.9))
    assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 60
    assert 0.2 * 0.8 <= h * w / 3000 <= 0.9 * 1.2  # Rounding aside, the drawn area.
  # A 10x100 strip has no box of >= 90 % area within ratio 3/4..4/3: centre crop
  # at ratio 4/3, i.e. 10 x round(13.3).
  assert preprocess.random_resized_crop_params(10, 100, rng, (0.9, 1.0)) == (0, 43, 10, 13)
  assert preprocess.random_resized_crop_params(100, 10, rng, (0.9, 1.0)) == (43, 0, 13, 10)


def test_center_crop_geometry():
  image = np.arange(8 * 12, dtype=np.uint8).reshape(8, 12, 1)
  # Shorter side 8 = round(4 / 0.5): no resize, then the centred 4x4 box.
  np.testing.assert_array_equal(preprocess.center_crop_resize(image, 4, 0.5), image[2:6, 4:8])
  np.testing.assert_array_equal(preprocess.center_crop(image, (3, 5)), image[2:5, 4:9])
  assert preprocess.resize_shorter_side(image, 4).shape == (4, 6, 1)
  tall = np.zeros((30, 20, 3), np.uint8)
  assert preprocess.center_crop_resize(tall, 16, 0.8).shape == (16, 16, 3)  # 20x30 then crop.


def test_resize_keeps_constant_images_and_flip_mirrors():
  image = np.full((7, 9, 3), 77, np.uint8)
  np.testing.assert_array_equal(preprocess.resize(image, 5), np.full((5, 5, 3), 77, np.uint8))
  ramp = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
  flips = [preprocess.random_flip(ramp, np.random.default_rng(s)) for s in range(20)]
  assert any(np.array_equal(f, ramp[:, ::-1]) for f in flips)
  assert any(np.array_equal(f, ramp) for f in flips)


def test_normalize_closed_form():
  image = np.array([[[0, 51, 255]], [[255, 102, 0]]], np.uint8)  # [2, 1, 3]
  mean, std = (0.5, 0.2, 0.0), (0.5, 0.1, 2.0)
  out = preprocess.normalize(image, mean, std)
  expected = (image / 255.0 - np.array(mean)) / np.array(std)
  assert out.dtype == np.float32 and out.shape == (2, 1, 3)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(preprocess.normalize(image, (0.5,), (0.25,)),
                             (image / 255.0 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
