"""Grain input pipelines of image-text pairs for dual-encoder (contrastive) training.

Reads a TFDS image-text corpus (features "image", "captions": a Sequence of
Text, optional "label"): the embedded demo `mrl_digit_captions`
(caption_demo.py, built on first use), or a corpus built with
`python -m mrl_jax.tools.build_image_text_corpus` (image_text_corpus.py).

Fields read from the `data` ConfigDict (a missing field takes its default; an
unknown field is a ConfigError). The image fields mean what they mean in
pipeline.py, with defaults for captioned images:

  name, data_dir      Dataset and TFDS data_dir. Default "mrl_digit_captions", None.
  train_split         Default "train".
  eval_split          Split the eval batches read by default. Default "test".
  image_size          Side of the training images; None = the stored size
                      (32 for the demo). Default None.
  eval_image_size     None = image_size. Default None.
  train_augment       "random_resized_crop" or "resize". Default "random_resized_crop".
  crop_scale          Default (0.9, 1.0) (open_clip's): a caption describes the
                      whole image, which a small crop would not show.
  crop_ratio          Default (3/4, 4/3).
  flip                Default False: captions say "left" and "right" (and the
                      demo's digits would read backwards).
  eval_crop_fraction  Default 1.0 (the whole image resized, as CLIP evaluates).
  mean, std           Default (0.5,), (0.5,).
  tokenizer           A vocab.txt, tokenizer.json or a folder of one; None = the
                      corpus's own (trained at build time). Default None.
  seq_len             Caption tokens, [CLS] and [SEP] included; longer captions
                      are cut. Default 32 (the demo's captions need at most 16).
  vocab_size          Optional check: must equal the tokenizer's vocabulary
                      size (compile_check shapes the text tower from it). Default None.
  image_key, captions_key, label_key   Feature names. Default "image",
                      "captions", "label" (a label is optional).
  worker_count, read_threads, prefetch, mock_examples   As pipeline.py.
  on_bad_example      An example that cannot be read, whose image does not
                      match the features, with no caption, a caption that is
                      empty or not UTF-8, or a label out of range: "stop"
                      raises DataError naming dataset, split and index; "skip"
                      leaves it out (logged once), as pipeline.py does: in
                      training its slot takes the next good example of the
                      epoch, in evaluation it is a masked row and its captions
                      are left out. Default "stop".

Training batches (this process's rows, b = global_batch_size / process_count):
"image" float32 [b, H, W, C]; "input_ids", "attention_mask", "token_type_ids"
int32 [b, seq_len] (`[CLS] caption [SEP]` then [PAD], token types 0). Each
epoch is a seeded permutation of the images; each image comes with ONE of its
captions, drawn from `np.random.default_rng((seed, epoch, image index))`, so
the caption of a position depends on nothing else. Layout across processes as
in pipeline.py (batch at the local size, process p takes batches p, p + P,
...), so the global batch of a step is the same for any process count, and the
iterator's state ({"next_index": step}) resumes exactly; `pipeline.data_metrics`
counts the skipped examples.

Evaluation, one pass in stored order, padded to whole global batches:
  * `make_pair_eval_batches`: one row per image: "image" (the eval view), its
    FIRST caption's tokens, "image_index" int32 (its row in the split),
    "label" int32 (-1 when the corpus has no labels), "mask" int32 (1 = real).
  * `make_caption_eval_batches`: one row per caption of the split (every
    caption of every image, in order): tokens, "image_index" (the row of its
    image in the pair batches), "mask".
  Padding rows (and bad examples with "skip") have mask 0, image_index -1,
  label -1, a zero image and all-[PAD] tokens with attention 0.
The captions of an eval split are listed once per process (that reads the
split's records once) and kept in memory with their tokens.

Speed (demo, 32x32, batch 256, one thread, 2-core CPU with other jobs running,
load average 7): 122 ms per training batch, about 2,100 pairs/s; per example
the crop and normalisation take ~77 us, tokenizing the caption ~27 us.
worker_count=2 gives the same batches as 0 (measured).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from mrl_jax.errors import ConfigError
from mrl_jax.data import image_text_corpus
from mrl_jax.data import pipeline
from mrl_jax.data import preprocess
from mrl_jax.data import sources
from mrl_jax.data import text_corpus
from mrl_jax.data import tokenizer as tokenizer_lib
from mrl_jax.data.pipeline import DataError

DEFAULTS: dict[str, Any] = dict(
    name="mrl_digit_captions",
    data_dir=None,
    train_split="train",
    eval_split="test",
    image_size=None,
    eval_image_size=None,
    train_augment="random_resized_crop",
    crop_scale=(0.9, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip=False,
    eval_crop_fraction=1.0,
    mean=(0.5,),
    std=(0.5,),
    tokenizer=None,
    seq_len=32,
    vocab_size=None,
    image_key="image",
    captions_key="captions",
    label_key="label",
    worker_count=0,
    read_threads=0,
    prefetch=2,
    mock_examples=0,
    on_bad_example="stop",
)
_BUILD_TOOL = "mrl_jax.tools.build_image_text_corpus"
# The image pipeline's bad-example handling, shared (one message and log policy).
_BadExample = pipeline._BadExample  # pylint: disable=protected-access
_note_bad = pipeline._note_bad  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class ImageTextDataInfo:
  """What a dual encoder needs to know about its image-text data."""
  num_train_examples: int       # Images of the train split (one pair each per epoch).
  image_size: int               # Side of the training images.
  in_channels: int
  seq_len: int
  vocab_size: int
  tokenizer_path: str
  pad_id: int
  num_classes: int              # 0 = unlabelled.
  class_names: tuple[str, ...]
  num_eval_images: int          # Of data.eval_split.
  num_eval_captions: int


def _settings(cfg) -> dict[str, Any]:
  s = pipeline.merged_settings(cfg, DEFAULTS, kind=" for image-text data",
                               module="mrl_jax/data/image_text_pipeline.py")
  pipeline.check_image_settings(s)
  seq_len = s["seq_len"]
  if isinstance(seq_len, bool) or int(seq_len) != seq_len or seq_len < 3:
    raise ConfigError(f"data.seq_len={seq_len!r}: need an int >= 3 ([CLS], a token, [SEP]).")
  s["seq_len"] = int(seq_len)
  return s


# ------------------------------------------------------------------ tokenizer
def _tokenizer_file(s: dict[str, Any]) -> str:
  return text_corpus.data_tokenizer_file(s["tokenizer"], name=s["name"], split=s["train_split"],
                                         data_dir=s["data_dir"], build_tool=_BUILD_TOOL)


def _tokenizer(s: dict[str, Any]) -> tokenizer_lib.TextTokenizer:
  return tokenizer_lib.load_tokenizer_cached(_tokenizer_file(s))


def load_caption_tokenizer(data_cfg) -> tokenizer_lib.TextTokenizer:
  """The tokenizer of `data_cfg`: data.tokenizer, or the corpus's own when None."""
  return _tokenizer(_settings(data_cfg))


def tokenize_texts(tokenizer: tokenizer_lib.TextTokenizer, texts: Sequence[str],
                   seq_len: int) -> dict[str, np.ndarray]:
  """{"input_ids", "attention_mask", "token_type_ids"}: int32 [N, seq_len] of
  `[CLS] text [SEP]` then [PAD] (cut at the end when too long)."""
  encoded = tokenizer.encode(list(texts), int(seq_len))
  return {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


# ------------------------------------------------------------------ records
@dataclasses.dataclass(frozen=True)
class _Spec:
  """What the examples of a split must look like, and what they become."""
  dataset: str
  split: str
  image_key: str
  captions_key: str
  label_key: str | None         # None: the corpus has no labels.
  num_classes: int
  class_names: tuple[str, ...]
  channels: int
  stored_hw: tuple[int | None, int | None]
  train_size: int
  eval_size: int


def _spec(s: dict[str, Any], split: str, info, *, sized: bool = True) -> _Spec:
  """The split's _Spec; `sized=False` leaves the batch image sizes 0 (listing captions)."""
  features = info.features
  for key in (s["image_key"], s["captions_key"]):
    if key not in features:
      raise ConfigError(f"Dataset {s['name']!r} has no feature {key!r}; it has "
                        f"{sorted(features.keys())}. Is it an image-text corpus? Set "
                        f"data.image_key / data.captions_key.")
  shape = tuple(features[s["image_key"]].shape)
  if len(shape) != 3 or shape[-1] is None:
    raise ConfigError(f"Feature {s['image_key']!r} of {s['name']!r} has shape {shape}; "
                      f"expected [H, W, C] images with a known channel count.")
  channels = int(shape[-1])
  for key in ("mean", "std"):
    if len(s[key]) not in (1, channels):
      raise ConfigError(f"data.{key}={tuple(s[key])} has {len(s[key])} entries but "
                        f"{s['name']!r} images have {channels} channel(s): give 1 or {channels}.")
  stored_hw = (shape[0], shape[1])
  train_size = s["image_size"] if sized else 0
  if train_size is None:
    if None in stored_hw or stored_hw[0] != stored_hw[1]:
      raise ConfigError(f"data.image_size is None, but {s['name']!r} images are "
                        f"{stored_hw[0]}x{stored_hw[1]} (not a fixed square): set data.image_size.")
    train_size = stored_hw[0]
  eval_size = s["eval_image_size"] if s["eval_image_size"] is not None else train_size
  label_key, num_classes, names = None, 0, ()
  if s["label_key"] in features:
    label, multilabel = sources.label_feature(info, s["label_key"])
    if not multilabel:
      label_key, num_classes, names = s["label_key"], int(label.num_classes), tuple(label.names)
  return _Spec(dataset=s["name"], split=split, image_key=s["image_key"],
               captions_key=s["captions_key"], label_key=label_key, num_classes=num_classes,
               class_names=names, channels=channels, stored_hw=stored_hw,
               train_size=int(train_size), eval_size=int(eval_size))


def _open(s: dict[str, Any], split: str, *, sized: bool = True):
  source, info = sources.open_source(s["name"], split, s["data_dir"],
                                     mock_examples=int(s["mock_examples"]))
  return source, _spec(s, split, info, sized=sized), info


def _load(source, index: int, spec: _Spec) -> tuple[np.ndarray, tuple[str, ...], int]:
  """(uint8 image [H, W, C], captions, label or -1) of `source[index]`, or _BadExample."""
  where = f"{spec.dataset}/{spec.split} example {index}"
  try:
    record = source[index]
  except Exception as e:  # pylint: disable=broad-except
    detail = " ".join(str(e).split())
    raise _BadExample(
        f"{where} cannot be read or decoded ({type(e).__name__}: {detail}).") from e
  image = np.asarray(record[spec.image_key])
  if image.ndim == 2:
    image = image[:, :, None]
  hw_ok = all(d is None or d == a for d, a in zip(spec.stored_hw, image.shape[:2]))
  if image.ndim != 3 or image.shape[-1] != spec.channels or not hw_ok or image.dtype != np.uint8:
    expected = [d if d is not None else "*" for d in spec.stored_hw] + [spec.channels]
    raise _BadExample(
        f"{where}: image {spec.image_key!r} is {image.dtype} {list(image.shape)}, "
        f"expected uint8 {expected}.")
  raw = record[spec.captions_key]
  if isinstance(raw, (str, bytes)):
    values = [raw]
  else:
    values = list(np.asarray(raw, dtype=object).reshape(-1))
  captions = []
  for j, value in enumerate(values):
    if isinstance(value, bytes):
      try:
        value = value.decode("utf-8")
      except UnicodeDecodeError as e:
        raise _BadExample(
            f"{where}: caption {j} is not UTF-8 (byte 0x{value[e.start]:02x} at "
            f"{e.start}).") from None
    if not isinstance(value, str) or not value.strip():
      raise _BadExample(f"{where}: caption {j} is empty.")
    captions.append(value)
  if not captions:
    raise _BadExample(f"{where}: the image has no caption.")
  label = -1
  if spec.label_key is not None:
    label = int(np.asarray(record[spec.label_key]).reshape(-1)[0])
    if not 0 <= label < spec.num_classes:
      raise _BadExample(
          f"{where}: label {label} is out of range [0, {spec.num_classes}).")
  return image, tuple(captions), label


class _TrainReader:
  """Position in the shuffled, repeated order -> image, one caption's tokens, bad passed over.

  The caption is drawn from default_rng((seed, epoch, index)); a bad example's
  slot takes the next good example of the same epoch (as pipeline.py).
  """

  def __init__(self, source, spec: _Spec, order: grain.MapDataset, mode: str,
               tokenizer: tokenizer_lib.TextTokenizer, seq_len: int, seed: int):
    self._source, self._spec, self._order, self._mode = source, spec, order, mode
    self._tokenizer, self._seq_len, self._seed = tokenizer, seq_len, int(seed)
    self._n = len(source)

  def __call__(self, position: int, index: int) -> dict[str, Any]:
    epoch, offset = divmod(position, self._n)
    tries = min(self._n, pipeline.MAX_CONSECUTIVE_BAD)
    for skipped in range(tries):
      if skipped:
        index = self._order[epoch * self._n + (offset + skipped) % self._n]
      try:
        image, captions, _ = _load(self._source, int(index), self._spec)
      except _BadExample as e:
        _note_bad(e, self._spec, index, self._mode)  # pylint: disable=protected-access
        last = e
        continue
      rng = np.random.default_rng((self._seed, epoch, int(index)))
      text = captions[int(rng.integers(len(captions)))]
      tokens = tokenize_texts(self._tokenizer, [text], self._seq_len)
      out = {k: v[0] for k, v in tokens.items()}
      out.update(image=image, skipped=np.int32(skipped))
      return out
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

  def fn(item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = item["image"]
    if augment == "random_resized_crop":
      image = preprocess.random_resized_crop(image, rng, size, scale, ratio)
    else:
      image = preprocess.resize(image, size)
    if flip:
      image = preprocess.random_flip(image, rng)
    return dict(item, image=preprocess.normalize(image, mean, std))
  return fn


def _layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None and process_count is None:
    return pipeline.process_layout()
  if process_index is None or process_count is None or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}: give both, "
                     f"with 0 <= index < count.")
  return int(process_index), int(process_count)


def _padding_tokens(tokenizer: tokenizer_lib.TextTokenizer, seq_len: int) -> dict[str, np.ndarray]:
  return {"input_ids": np.full(seq_len, tokenizer.pad_id, np.int32),
          "attention_mask": np.zeros(seq_len, np.int32),
          "token_type_ids": np.zeros(seq_len, np.int32)}


# ------------------------------------------------------------------ captions of a split
@dataclasses.dataclass(frozen=True)
class SplitCaptions:
  """Every caption of a split with the row of its image (bad examples left out)."""
  image_index: np.ndarray      # int32 [M].
  texts: tuple[str, ...]       # [M].
  good_images: np.ndarray      # bool [N]: the images whose captions are listed.


@functools.lru_cache(maxsize=8)
def _split_captions_cached(name: str, split: str, data_dir: str | None, mode: str,
                           mock_examples: int, keys: tuple[str, str, str],
                           dataset_path: str) -> SplitCaptions:
  del dataset_path  # Part of the cache key only: a rebuilt dataset is read again.
  s = dict(DEFAULTS, name=name, data_dir=data_dir, on_bad_example=mode,
           mock_examples=mock_examples, image_key=keys[0], captions_key=keys[1],
           label_key=keys[2])
  source, spec, _ = _open(s, split, sized=False)
  index, texts, good = [], [], np.zeros(len(source), bool)
  for i in range(len(source)):
    try:
      _, captions, _ = _load(source, i, spec)
    except _BadExample as e:
      _note_bad(e, spec, i, mode)  # pylint: disable=protected-access
      continue
    good[i] = True
    index.extend([i] * len(captions))
    texts.extend(captions)
  image_index = np.asarray(index, np.int32)
  image_index.flags.writeable = good.flags.writeable = False
  return SplitCaptions(image_index=image_index, texts=tuple(texts), good_images=good)


def split_captions(data_cfg, split: str | None = None) -> SplitCaptions:
  """Every caption of `split` (default data.eval_split) with its image's row."""
  s = _settings(data_cfg)
  return _captions_of(s, split or s["eval_split"])


def _captions_of(s: dict[str, Any], split: str) -> SplitCaptions:
  _, _, info = _open(s, split, sized=False)
  return _split_captions_cached(s["name"], split, s["data_dir"], s["on_bad_example"],
                                int(s["mock_examples"]),
                                (s["image_key"], s["captions_key"], s["label_key"]),
                                os.fspath(info.data_dir))


# ------------------------------------------------------------------ public API
def image_text_dataset_info(data_cfg) -> ImageTextDataInfo:
  """Split sizes, image shape, tokenizer and labels of `data_cfg`'s corpus.

  Reads sizes from the TFDS info and the caption count of the eval split
  from the build's record (a sliced split, e.g. "test[:100]", or a corpus
  without one, lists its captions once). ConfigError if data.vocab_size is set
  and differs from the tokenizer's.
  """
  s = _settings(data_cfg)
  train_source, spec, info = _open(s, s["train_split"])
  eval_source, _, _ = _open(s, s["eval_split"])
  tokenizer = _tokenizer(s)
  if s["vocab_size"] is not None and int(s["vocab_size"]) != tokenizer.vocab_size:
    raise ConfigError(f"data.vocab_size={s['vocab_size']} but the tokenizer "
                      f"({_tokenizer_file(s)}) has {tokenizer.vocab_size} tokens: set "
                      f"--config.data.vocab_size={tokenizer.vocab_size} or leave it unset.")
  num_captions = None
  if not int(s["mock_examples"]):
    num_captions = image_text_corpus.recorded_caption_count(info.data_dir, s["eval_split"])
  if num_captions is None:
    num_captions = len(_captions_of(s, s["eval_split"]).texts)
  return ImageTextDataInfo(
      num_train_examples=len(train_source), image_size=spec.train_size,
      in_channels=spec.channels, seq_len=s["seq_len"], vocab_size=tokenizer.vocab_size,
      tokenizer_path=_tokenizer_file(s), pad_id=tokenizer.pad_id,
      num_classes=spec.num_classes, class_names=spec.class_names,
      num_eval_images=len(eval_source), num_eval_captions=int(num_captions))


def make_pair_train_iterator(data_cfg, *, global_batch_size: int, seed: int,
                             process_index: int | None = None,
                             process_count: int | None = None) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator over this process's training pairs (module doc).

  `process_index` / `process_count` default to JAX's (given: for tests).
  """
  s = _settings(data_cfg)
  process_index, process_count = _layout(process_index, process_count)
  local_batch = pipeline._local_batch_size(global_batch_size, process_count)  # pylint: disable=protected-access
  tokenizer = _tokenizer(s)
  source, spec, _ = _open(s, s["train_split"])
  if len(source) < 1:
    raise DataError(f"Split {s['name']}/{s['train_split']} is empty.")
  order = grain.MapDataset.range(len(source)).shuffle(seed=int(seed) % 2**32).repeat()
  ds = order.map_with_index(_TrainReader(source, spec, order, s["on_bad_example"], tokenizer,
                                         s["seq_len"], seed))
  ds = ds.random_map(_train_map(s, spec), seed=(int(seed) + 1) % 2**32)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  counter = pipeline._SkipCounter()  # pylint: disable=protected-access
  iterator = pipeline._to_iterator(ds, s, last_stage=counter)  # pylint: disable=protected-access
  if s["on_bad_example"] == "skip":
    pipeline._SKIP_COUNTERS[iterator] = counter  # pylint: disable=protected-access
  return iterator


def make_pair_eval_batches(data_cfg, *, global_batch_size: int, split: str | None = None,
                           process_index: int | None = None,
                           process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split`'s images (default data.eval_split) with their first captions."""
  s = _settings(data_cfg)
  split = split or s["eval_split"]
  process_index, process_count = _layout(process_index, process_count)
  local_batch = pipeline._local_batch_size(global_batch_size, process_count)  # pylint: disable=protected-access
  tokenizer = _tokenizer(s)
  source, spec, _ = _open(s, split)
  n = len(source)
  padded = max(math.ceil(n / global_batch_size), 1) * global_batch_size
  shape = (spec.eval_size, spec.eval_size, spec.channels)
  seq_len, mode = s["seq_len"], s["on_bad_example"]

  def example(i: int) -> dict[str, np.ndarray]:
    if i < n:
      try:
        image, captions, label = _load(source, i, spec)
      except _BadExample as e:
        _note_bad(e, spec, i, mode)  # pylint: disable=protected-access
      else:
        tokens = tokenize_texts(tokenizer, captions[:1], seq_len)
        return dict({k: v[0] for k, v in tokens.items()},
                    image=pipeline._eval_view(image, s, spec),  # pylint: disable=protected-access
                    image_index=np.int32(i), label=np.int32(label), mask=np.int32(1))
    return dict(_padding_tokens(tokenizer, seq_len), image=np.zeros(shape, np.float32),
                image_index=np.int32(-1), label=np.int32(-1), mask=np.int32(0))

  ds = grain.MapDataset.range(padded).map(example)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  return pipeline._to_iterator(ds, s)  # pylint: disable=protected-access


def make_caption_eval_batches(data_cfg, *, global_batch_size: int, split: str | None = None,
                              process_index: int | None = None,
                              process_count: int | None = None
                              ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over every caption of `split` (default data.eval_split), in order."""
  s = _settings(data_cfg)
  split = split or s["eval_split"]
  process_index, process_count = _layout(process_index, process_count)
  local_batch = pipeline._local_batch_size(global_batch_size, process_count)  # pylint: disable=protected-access
  tokenizer = _tokenizer(s)
  captions = _captions_of(s, split)
  tokens = tokenize_texts(tokenizer, captions.texts, s["seq_len"]) if captions.texts else None
  m = len(captions.texts)
  padded = max(math.ceil(m / global_batch_size), 1) * global_batch_size
  padding = _padding_tokens(tokenizer, s["seq_len"])

  def row(i: int) -> dict[str, np.ndarray]:
    if i < m:
      return dict({k: v[i] for k, v in tokens.items()},
                  image_index=captions.image_index[i], mask=np.int32(1))
    return dict(padding, image_index=np.int32(-1), mask=np.int32(0))

  ds = grain.MapDataset.range(padded).map(row)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  return pipeline._to_iterator(ds, s)  # pylint: disable=protected-access
