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
  on_bad_example      An example that cannot be read or decoded, or whose image
                      shape/dtype or label does not match the dataset's
                      features: "stop" raises DataError naming the dataset,
                      split and example index; "skip" leaves it out (see "Bad
                      examples" below). Default "stop".

Batches are dicts of numpy arrays: "image" float32 [local_B, H, W, C] (C as
stored: 1 for grayscale), "label" int32 [local_B] (multi-label datasets:
int32 multi-hot [local_B, num_classes]); evaluation batches add "mask".

Layout across processes: examples are ordered globally (a seeded permutation
per epoch), batched at the local batch size B / P, and process p takes batches
p, p + P, p + 2P, ... Augmentation randomness is seeded per example position.
So at every step the P local batches, concatenated in process order, are
exactly the global batch a 1-process run reads at that step, and an iterator's
state ({"next_index": step}) means the same thing for any process count.

Bad examples with on_bad_example="skip": each is logged once per process with
its index. In training, the slot of a bad example takes the next good example
of the same epoch's order (wrapping around), so batches keep their size and
what fills a slot depends on its position only: a resumed run, and any process
count, read exactly the batches an uninterrupted 1-process run reads. (A Grain
filter would instead shift every later position by the number dropped before
it, which a process cannot know without reading the other processes'
examples.) The filling example is seen twice in that epoch. `data_metrics`
reports how many were left out of the batches read. In evaluation a bad
example becomes a masked row (mask 0), so it is not counted at all. If
MAX_CONSECUTIVE_BAD examples in a row are bad (or every example of a smaller
split), DataError says the data is broken instead of searching on.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
from typing import Any, Iterator
import weakref

from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from mrl_jax.errors import ConfigError, UserError
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
    on_bad_example="stop",
)
TRAIN_AUGMENTS = ("random_resized_crop", "resize")
ON_BAD_EXAMPLE = ("stop", "skip")
# "skip" looks this far ahead in the shuffled order for a good example; more
# bad ones in a row means broken data (a wrong path, a corrupt file), not a few
# bad images, and searching a large split for the rare good one would only hide it.
MAX_CONSECUTIVE_BAD = 1000
_FIX = ('Repair or remove the example, or set data.on_bad_example="skip" to leave bad '
        'examples out.')


class DataError(UserError, ValueError):
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


def merged_settings(cfg, defaults: dict[str, Any], *, kind: str = "",
                    module: str = "mrl_jax/data/pipeline.py") -> dict[str, Any]:
  """`defaults` updated with config.data's fields; an unknown field or an unknown
  on_bad_example is a ConfigError (the image and text pipelines share this)."""
  given = dict(cfg.items()) if cfg is not None else {}
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ConfigError(f"Unknown data config field(s) {unknown}{kind}; known fields: "
                      f"{sorted(defaults)} (see {module}).")
  s = {**defaults, **given}
  if s["on_bad_example"] not in ON_BAD_EXAMPLE:
    raise ConfigError(f"data.on_bad_example={s['on_bad_example']!r}: use one of {ON_BAD_EXAMPLE}.")
  return s


def _settings(cfg) -> dict[str, Any]:
  s = merged_settings(cfg, DEFAULTS)
  check_image_settings(s)
  return s


def check_image_settings(s: dict[str, Any]) -> None:
  """ConfigError naming the field if an image setting of merged `s` is out of range
  (the image-text pipeline checks its image fields with this too)."""
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


class _BadExample(Exception):
  """One example that cannot be used; `str()` says which and why (internal)."""


def _load(source, index: int, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 image [H, W, C], label) of `source[index]`, or _BadExample saying why not."""
  where = f"{spec.dataset}/{spec.split} example {index}"
  try:
    # TFDS decodes the image while reading the record, so a corrupt or
    # truncated file surfaces here, as whatever the decoder raises.
    record = source[index]
  except Exception as e:  # pylint: disable=broad-except
    detail = " ".join(str(e).split())  # One line, whatever the decoder wrote.
    raise _BadExample(f"{where} cannot be read or decoded ({type(e).__name__}: {detail}).") from e
  image = np.asarray(record[spec.image_key])
  if image.ndim == 2:
    image = image[:, :, None]
  hw_ok = all(d is None or d == a for d, a in zip(spec.stored_hw, image.shape[:2]))
  if image.ndim != 3 or image.shape[-1] != spec.channels or not hw_ok or image.dtype != np.uint8:
    expected = [d if d is not None else "*" for d in spec.stored_hw] + [spec.channels]
    raise _BadExample(f"{where}: image {spec.image_key!r} is {image.dtype} {list(image.shape)}, "
                      f"expected uint8 {expected}.")
  raw = np.asarray(record[spec.label_key]).astype(np.int64).reshape(-1)
  if not spec.multilabel and raw.size != 1:
    raise _BadExample(f"{where}: label {spec.label_key!r} has shape {list(raw.shape)}, "
                      "expected a scalar.")
  bad = raw[(raw < 0) | (raw >= spec.num_classes)]
  if bad.size:
    raise _BadExample(f"{where}: label {int(bad[0])} is out of range [0, {spec.num_classes}).")
  if spec.multilabel:
    label = np.zeros(spec.num_classes, np.int32)
    label[raw] = 1
  else:
    label = np.int32(raw[0])
  return image, label


# (dataset, split, index) of the bad examples this process has already logged.
_LOGGED_BAD: set[tuple[str, str, int]] = set()


def _note_bad(error: _BadExample, spec: _Spec, index: int, mode: str) -> None:
  """Raises the user-facing DataError ("stop"), or logs the example once ("skip")."""
  if mode == "stop":
    raise DataError(f"{error} {_FIX}") from error.__cause__
  key = (spec.dataset, spec.split, int(index))
  if key not in _LOGGED_BAD:
    _LOGGED_BAD.add(key)
    logging.warning("Skipping a bad example (data.on_bad_example=\"skip\"): %s", error)


class _TrainReader:
  """Position in the shuffled, repeated order -> (image, label, bad examples passed over).

  A bad example's slot takes the next good example of the same epoch (see the
  module doc), so the result depends on the position only.
  """

  def __init__(self, source, spec: _Spec, order: grain.MapDataset, mode: str):
    self._source, self._spec, self._order, self._mode = source, spec, order, mode
    self._n = len(source)

  def __call__(self, position: int, index: int) -> tuple[np.ndarray, np.ndarray, np.int32]:
    epoch_start, offset = position - position % self._n, position % self._n
    tries = min(self._n, MAX_CONSECUTIVE_BAD)
    for skipped in range(tries):
      if skipped:
        index = self._order[epoch_start + (offset + skipped) % self._n]
      try:
        image, label = _load(self._source, index, self._spec)
        return image, label, np.int32(skipped)
      except _BadExample as e:
        _note_bad(e, self._spec, index, self._mode)
        last = e
    spec = self._spec
    if tries == self._n:
      raise DataError(f"Every one of the {self._n} examples of {spec.dataset}/{spec.split} is "
                      f"bad (the last: {last}). Check data.name, data.data_dir and the split.")
    raise DataError(f"{tries} examples in a row of {spec.dataset}/{spec.split} are bad (the last: "
                    f"{last}): the data looks broken, not just a few bad examples. Repair it.")


def _train_map(s: dict[str, Any], spec: _Spec):
  size = spec.train_size
  scale, ratio = tuple(s["crop_scale"]), tuple(s["crop_ratio"])
  augment, flip, mean, std = s["train_augment"], bool(s["flip"]), s["mean"], s["std"]

  def fn(item, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, label, skipped = item
    if augment == "random_resized_crop":
      image = preprocess.random_resized_crop(image, rng, size, scale, ratio)
    else:
      image = preprocess.resize(image, size)
    if flip:
      image = preprocess.random_flip(image, rng)
    return {"image": preprocess.normalize(image, mean, std), "label": label, "skipped": skipped}
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


def _to_iterator(ds: grain.MapDataset, s: dict[str, Any],
                 last_stage: Any = None) -> grain.DatasetIterator:
  """Grain's iterator over `ds`; `last_stage` (if any) maps each batch in the consuming thread."""
  threads, prefetch, workers = int(s["read_threads"]), int(s["prefetch"]), int(s["worker_count"])
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(prefetch, threads) if threads else 0))
  if workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
  elif prefetch > 0:
    it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=prefetch)
  if last_stage is not None:
    it_ds = it_ds.map(last_stage)
  iterator = iter(it_ds)
  _OPEN_ITERATORS.add(iterator)
  return iterator


class _SkipCounter:
  """Takes the per-row "skipped" counts out of each batch and adds them up.

  It runs after any prefetching, in the thread that consumes the batches, so it
  counts exactly the batches the train loop has read, whether the examples were
  prepared in threads or in worker processes.
  """

  def __init__(self):
    self.count = 0

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    self.count += int(batch.pop("skipped").sum())
    return batch


# The counters of the train iterators that skip bad examples.
_SKIP_COUNTERS: "weakref.WeakKeyDictionary[grain.DatasetIterator, _SkipCounter]" = (
    weakref.WeakKeyDictionary())


def data_metrics(iterator: grain.DatasetIterator) -> dict[str, int]:
  """Input metrics of a `make_train_iterator` iterator, for the train loop's log rows.

  With data.on_bad_example="skip": {"data/skipped_examples": bad examples left
  out of the batches read so far by this run (a resumed run counts from its
  resume step), summed over all processes}; with "stop", {}. With several
  processes every process must call it at the same steps (it is a collective).
  """
  counter = _SKIP_COUNTERS.get(iterator)
  if counter is None:
    return {}
  count = counter.count
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    count = int(np.sum(multihost_utils.process_allgather(np.int64(count))))
  return {"data/skipped_examples": count}


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
    # The stages below the top one have their own __del__ (ThreadPrefetch's
    # close is not idempotent), so every stage's close becomes a no-op.
    stages = [iterator]
    while stages:
      stage = stages.pop()
      stage.close = lambda: None
      stages.extend(getattr(stage, "_parents", ()))


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
  iterator supports get_state()/set_state() and grain.checkpoint's Orbax args;
  `data_metrics(iterator)` reports the bad examples it skipped.
  """
  s = _settings(cfg)
  process_index, process_count = process_layout()
  local_batch = _local_batch_size(global_batch_size, process_count)
  source, spec = _open(s, s["train_split"])
  if len(source) < 1:
    raise DataError(f"Split {s['name']}/{s['train_split']} is empty.")
  # Shuffling indices permutes exactly as shuffling the records would; the
  # reader needs the order itself to find a bad example's replacement.
  order = grain.MapDataset.range(len(source)).shuffle(seed=int(seed) % 2**32).repeat()
  ds = order.map_with_index(_TrainReader(source, spec, order, s["on_bad_example"]))
  ds = ds.random_map(_train_map(s, spec), seed=(int(seed) + 1) % 2**32)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  counter = _SkipCounter()
  iterator = _to_iterator(ds, s, last_stage=counter)
  if s["on_bad_example"] == "skip":
    _SKIP_COUNTERS[iterator] = counter
  return iterator


def make_eval_batches(cfg, *, global_batch_size: int,
                      split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` (default data.eval_split) in a fixed order: this process's rows.

  The split is padded to ceil(N / global_batch_size) global batches; every
  batch has exactly local_B rows and a "mask" float32 [local_B] (1 = real
  example, 0 = padding: zero image, label 0). Every example appears exactly
  once across all processes and steps. With data.on_bad_example="skip" a bad
  example is such a masked row.
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
      try:
        image, label = _load(source, i, spec)
      except _BadExample as e:
        _note_bad(e, spec, i, s["on_bad_example"])
      else:
        return {"image": _eval_view(image, s, spec), "label": label, "mask": np.float32(1.0)}
    return {"image": np.zeros(shape, np.float32), "label": pad_label, "mask": np.float32(0.0)}

  ds = grain.MapDataset.range(padded).map(example)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  return _to_iterator(ds, s)
