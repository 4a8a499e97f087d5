"""Grain input pipelines for training and evaluation, built from `config.data`.

Fields read from the `data` ConfigDict (a missing field takes its default; an
unknown field is a ConfigError, so typos do not go unnoticed):

  name                TFDS dataset name ("mrl_digits" is built on first use;
                      others must be prepared as array_record, see sources.py).
                      Default "mrl_digits".
  data_dir            TFDS data_dir; None = TFDS default ($TFDS_DATA_DIR or
                      ~/tensorflow_datasets). Default None.
  train_split         Split to train on (TFDS slicing allowed, "train[:90%]").
                      Default "train".
  eval_split          Split `make_eval_batches` reads by default. Default "test".
  image_size          Side of the square training images. None = the dataset's
                      own fixed size (8 for mrl_digits); required for datasets
                      with images of varying size. Default None.
  eval_image_size     Side of the square evaluation images; None = image_size.
                      Default None.
  train_augment       "random_resized_crop" (torchvision's, then resize to
                      image_size) or "resize" (the whole image resized).
                      Default "random_resized_crop".
  crop_scale          (min, max) area fraction of the random crop.
                      Default (0.08, 1.0).
  crop_ratio          (min, max) aspect ratio (w/h) of the random crop.
                      Default (3/4, 4/3).
  flip                Random left-right flips in training. Default True.
  eval_crop_fraction  Evaluation view: 1.0 = the whole image resized to
                      eval_image_size; f < 1 = shorter side resized to
                      eval_image_size / f, then the centred crop
                      (224/256 = ImageNet's "resize 256, crop 224"). Default 0.875.
  mean, std           Per-channel normalisation on the 0..1 scale: one entry per
                      channel, or one entry for all. Default (0.5,), (0.5,).
  worker_count        Grain worker processes (`mp_prefetch`); 0 = none, the
                      examples are processed in this process. Workers need
                      absl flags parsed and a `__main__` guard. Default 0.
  read_threads        Threads per process reading and preprocessing examples
                      (grain ReadOptions.num_threads; 0 reads in the
                      consuming thread, which was fastest on 2 cores). Default 0.
  prefetch            Batches prepared ahead: in a background thread when
                      worker_count == 0, per worker otherwise. 0 = none.
                      Default 2.
  mock_examples       > 0: use this many random examples per split from
                      `tfds.testing.mock_data` instead of the real data (smoke
                      runs of configs whose data is not here). Default 0.
  image_key           Image feature name. Default "image".
  label_key           Label feature name (a ClassLabel, or a Sequence of
                      ClassLabel for multi-label data). Default "label".
  shuffle_buffer      Accepted and ignored: training shuffles globally.

Batches are dicts of numpy arrays: "image" float32 [local_B, H, W, C] (C as
stored: 1 for grayscale), "label" int32 [local_B] (multi-label datasets:
int32 multi-hot [local_B, num_classes]); evaluation batches add "mask".

Layout across processes: examples are ordered globally (a seeded permutation
per epoch), batched at the local batch size B / P, and process p takes batches
p, p + P, p + 2P, ... Augmentation randomness is seeded per example position.
So at every step the P local batches, concatenated in process order, are
exactly the global batch a 1-process run reads at that step, and an iterator's
state ({"next_index": step}) means the same thing for any process count.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
from typing import Any, Iterator
import weakref

import grain
import jax
import ml_collections
import numpy as np

from mrl_jax.config_errors import ConfigError
from mrl_jax.data import preprocess
from mrl_jax.data import sources

DEFAULTS: dict[str, Any] = dict(
    name="mrl_digits",
    data_dir=None,
    train_split="train",
    eval_split="test",
    image_size=None,
    eval_image_size=None,
    train_augment="random_resized_crop",
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip=True,
    eval_crop_fraction=0.875,
    mean=(0.5,),
    std=(0.5,),
    worker_count=0,
    read_threads=0,
    prefetch=2,
    mock_examples=0,
    image_key="image",
    label_key="label",
    shuffle_buffer=None,
)
TRAIN_AUGMENTS = ("random_resized_crop", "resize")


class DataError(ValueError):
  """An example in the dataset does not match the dataset's declared features."""


@dataclasses.dataclass(frozen=True)
class DatasetSummary:
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  image_shape: tuple[int, int, int]       # (H, W, C) of training batches.
  multilabel: bool
  eval_image_shape: tuple[int, int, int]  # (H, W, C) of evaluation batches.


def process_layout() -> tuple[int, int]:
  """(this process's index, process count)."""
  return jax.process_index(), jax.process_count()


def _settings(cfg) -> dict[str, Any]:
  given = dict(cfg.items()) if cfg is not None else {}
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"Unknown data config field(s) {unknown}; known fields: "
                      f"{sorted(DEFAULTS)} (see mrl_jax/data/pipeline.py).")
  s = dict(DEFAULTS)
  s.update({k: v for k, v in given.items()})
  if s["train_augment"] not in TRAIN_AUGMENTS:
    raise ConfigError(f"data.train_augment={s['train_augment']!r}: use one of {TRAIN_AUGMENTS}.")
  lo, hi = s["crop_scale"]
  if not 0.0 < lo <= hi <= 1.0:
    raise ConfigError(f"data.crop_scale={tuple(s['crop_scale'])}: need 0 < min <= max <= 1.")
  lo, hi = s["crop_ratio"]
  if not 0.0 < lo <= hi:
    raise ConfigError(f"data.crop_ratio={tuple(s['crop_ratio'])}: need 0 < min <= max.")
  if not 0.0 < s["eval_crop_fraction"] <= 1.0:
    raise ConfigError(f"data.eval_crop_fraction={s['eval_crop_fraction']}: need 0 < f <= 1.")
  for key in ("image_size", "eval_image_size"):
    if s[key] is not None and (int(s[key]) != s[key] or s[key] < 1):
      raise ConfigError(f"data.{key}={s[key]!r}: need a positive int (or None).")
  if any(float(x) <= 0 for x in s["std"]):
    raise ConfigError(f"data.std={tuple(s['std'])}: every entry must be > 0.")
  for key in ("worker_count", "read_threads", "prefetch", "mock_examples"):
    if int(s[key]) < 0:
      raise ConfigError(f"data.{key}={s[key]}: must be >= 0.")
  return s


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What the examples of a split must look like, and what they become."""
  dataset: str
  split: str
  image_key: str
  label_key: str
  num_classes: int
  multilabel: bool
  channels: int
  stored_hw: tuple[int | None, int | None]
  train_size: int
  eval_size: int


def _spec(s: dict[str, Any], split: str, info) -> _Spec:
  feature = info.features[s["image_key"]] if s["image_key"] in info.features else None
  if feature is None:
    raise ConfigError(f"Dataset {s['name']!r} has no feature {s['image_key']!r}; it has "
                      f"{sorted(info.features.keys())}. Set data.image_key.")
  shape = tuple(feature.shape)
  if len(shape) != 3 or shape[-1] is None:
    raise ConfigError(f"Feature {s['image_key']!r} of {s['name']!r} has shape {shape}; "
                      f"expected [H, W, C] images with a known channel count.")
  channels = int(shape[-1])
  for key in ("mean", "std"):
    if len(s[key]) not in (1, channels):
      raise ConfigError(f"data.{key}={tuple(s[key])} has {len(s[key])} entries but "
                        f"{s['name']!r} images have {channels} channel(s): give 1 or {channels}.")
  stored_hw = (shape[0], shape[1])
  train_size = s["image_size"]
  if train_size is None:
    if None in stored_hw or stored_hw[0] != stored_hw[1]:
      raise ConfigError(f"data.image_size is None, but {s['name']!r} images are "
                        f"{stored_hw[0]}x{stored_hw[1]} (not a fixed square): set data.image_size.")
    train_size = stored_hw[0]
  eval_size = s["eval_image_size"] if s["eval_image_size"] is not None else train_size
  label, multilabel = sources.label_feature(info, s["label_key"])
  return _Spec(dataset=s["name"], split=split, image_key=s["image_key"],
               label_key=s["label_key"], num_classes=int(label.num_classes),
               multilabel=multilabel, channels=channels, stored_hw=stored_hw,
               train_size=int(train_size), eval_size=int(eval_size))


def _open(s: dict[str, Any], split: str):
  source, info = sources.open_source(s["name"], split, s["data_dir"],
                                     mock_examples=int(s["mock_examples"]))
  return source, _spec(s, split, info)


def _checked(index: int, record: dict[str, Any], spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 image [H, W, C], label) of a record, or a DataError naming the example."""
  where = f"{spec.dataset}/{spec.split} example {index}"
  image = np.asarray(record[spec.image_key])
  if image.ndim == 2:
    image = image[:, :, None]
  hw_ok = all(d is None or d == a for d, a in zip(spec.stored_hw, image.shape[:2]))
  if image.ndim != 3 or image.shape[-1] != spec.channels or not hw_ok or image.dtype != np.uint8:
    expected = [d if d is not None else "*" for d in spec.stored_hw] + [spec.channels]
    raise DataError(f"{where}: image {spec.image_key!r} is {image.dtype} {list(image.shape)}, "
                    f"expected uint8 {expected}.")
  raw = np.asarray(record[spec.label_key]).astype(np.int64).reshape(-1)
  if not spec.multilabel and raw.size != 1:
    raise DataError(f"{where}: label {spec.label_key!r} has shape {list(raw.shape)}, expected a scalar.")
  bad = raw[(raw < 0) | (raw >= spec.num_classes)]
  if bad.size:
    raise DataError(f"{where}: label {int(bad[0])} is out of range [0, {spec.num_classes}).")
  if spec.multilabel:
    label = np.zeros(spec.num_classes, np.int32)
    label[raw] = 1
  else:
    label = np.int32(raw[0])
  return image, label


def _train_map(s: dict[str, Any], spec: _Spec):
  size = spec.train_size
  scale, ratio = tuple(s["crop_scale"]), tuple(s["crop_ratio"])
  augment, flip, mean, std = s["train_augment"], bool(s["flip"]), s["mean"], s["std"]

  def fn(item, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, label = item
    if augment == "random_resized_crop":
      image = preprocess.random_resized_crop(image, rng, size, scale, ratio)
    else:
      image = preprocess.resize(image, size)
    if flip:
      image = preprocess.random_flip(image, rng)
    return {"image": preprocess.normalize(image, mean, std), "label": label}
  return fn


def _eval_view(image: np.ndarray, s: dict[str, Any], spec: _Spec) -> np.ndarray:
  if s["eval_crop_fraction"] >= 1.0:
    image = preprocess.resize(image, spec.eval_size)
  else:
    image = preprocess.center_crop_resize(image, spec.eval_size, s["eval_crop_fraction"])
  return preprocess.normalize(image, s["mean"], s["std"])


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ConfigError(f"Global batch size {global_batch_size} must be a positive multiple "
                      f"of the process count {process_count}.")
  return global_batch_size // process_count


def _to_iterator(ds: grain.MapDataset, s: dict[str, Any]) -> grain.DatasetIterator:
  threads, prefetch, workers = int(s["read_threads"]), int(s["prefetch"]), int(s["worker_count"])
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(prefetch, threads) if threads else 0))
  if workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
  elif prefetch > 0:
    it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=prefetch)
  iterator = iter(it_ds)
  _OPEN_ITERATORS.add(iterator)
  return iterator


# Grain iterators call close() from __del__, which fails noisily ("'NoneType'
# object has no attribute ...") when that runs during interpreter shutdown. So
# iterators still alive at exit are closed first, and their close() made a no-op.
_OPEN_ITERATORS: "weakref.WeakSet[grain.DatasetIterator]" = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
  for iterator in list(_OPEN_ITERATORS):
    try:
      iterator.close()
    except Exception:  # pylint: disable=broad-except
      pass
    iterator.close = lambda: None


def dataset_info(cfg) -> DatasetSummary:
  """Class count, split sizes and batch image shapes for `cfg` (prepares mrl_digits)."""
  s = _settings(cfg)
  train_source, spec = _open(s, s["train_split"])
  eval_source, _ = _open(s, s["eval_split"])
  return DatasetSummary(
      num_classes=spec.num_classes, num_train_examples=len(train_source),
      num_eval_examples=len(eval_source),
      image_shape=(spec.train_size, spec.train_size, spec.channels),
      multilabel=spec.multilabel,
      eval_image_shape=(spec.eval_size, spec.eval_size, spec.channels))


def make_train_iterator(cfg, *, global_batch_size: int, seed: int) -> grain.DatasetIterator:
  """Infinite iterator over this process's training batches (see module doc).

  Yields {"image": float32 [local_B, H, W, C], "label": int32 [local_B]} with
  local_B = global_batch_size // process_count. Each epoch is a fresh seeded
  permutation of the whole split; batches run across epoch boundaries. The
  iterator supports get_state()/set_state() and grain.checkpoint's Orbax args.
  """
  s = _settings(cfg)
  process_index, process_count = process_layout()
  local_batch = _local_batch_size(global_batch_size, process_count)
  source, spec = _open(s, s["train_split"])
  if len(source) < 1:
    raise DataError(f"Split {s['name']}/{s['train_split']} is empty.")
  ds = grain.MapDataset.source(source)
  ds = ds.map_with_index(lambda i, record: _checked(i, record, spec))
  ds = ds.shuffle(seed=int(seed) % 2**32).repeat()
  ds = ds.random_map(_train_map(s, spec), seed=(int(seed) + 1) % 2**32)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  return _to_iterator(ds, s)


def make_eval_batches(cfg, *, global_batch_size: int,
                      split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` (default data.eval_split) in a fixed order: this process's rows.

  The split is padded to ceil(N / global_batch_size) global batches; every
  batch has exactly local_B rows and a "mask" float32 [local_B] (1 = real
  example, 0 = padding: zero image, label 0). Every example appears exactly
  once across all processes and steps.
  """
  s = _settings(cfg)
  split = split or s["eval_split"]
  process_index, process_count = process_layout()
  local_batch = _local_batch_size(global_batch_size, process_count)
  source, spec = _open(s, split)
  n = len(source)
  padded = max(math.ceil(n / global_batch_size), 1) * global_batch_size
  shape = (spec.eval_size, spec.eval_size, spec.channels)
  pad_label = np.zeros(spec.num_classes, np.int32) if spec.multilabel else np.int32(0)

  def example(i: int) -> dict[str, np.ndarray]:
    if i < n:
      image, label = _checked(i, source[i], spec)
      return {"image": _eval_view(image, s, spec), "label": label, "mask": np.float32(1.0)}
    return {"image": np.zeros(shape, np.float32), "label": pad_label, "mask": np.float32(0.0)}

  ds = grain.MapDataset.range(padded).map(example)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  return _to_iterator(ds, s)
