"""Zero-shot classification of a dual encoder at every nesting size (CLIP's protocol).

Each class is described by prompts, every class name in every template ("a photo
of {}."); the text tower embeds all of them: `class_text_z` [C, T, d]. The
classifier at prefix size m is, per class, the mean over its T templates of the
prompts' prefixes z[:m], each unit-normalised on its own, renormalised to unit
length ([C, m]). An image is assigned the class whose classifier row has the
largest inner product with the image's own unit-normalised prefix; ties go to
the class listed first.

The prefixes are normalised in float32 (as served) and scored in float64
(numpy; see cross_modal_retrieval.py for why: a float32 BLAS score's last bit
depends on blocking and memory alignment, which would let near-ties flip between
runs), one block of images at a time so [N, C] never has to fit at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Images per block: about this many scores ([block, C] float64) exist at once.
MAX_BLOCK_SCORES = 1 << 23


def prompt_texts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Every class name in every template ("{}" marks the name), class-major:
  [c0 t0, c0 t1, ..., c1 t0, ...], so the embeddings reshape to [C, T, d]."""
  return [t.replace("{}", name) for name in class_names for t in templates]


def classifier_weights(class_text_z: np.ndarray, dim: int) -> np.ndarray:
  """The unit-norm zero-shot classifier [C, dim] of prefix size `dim` (module doc).

  class_text_z: prompt embeddings [C, T, d] (raw, as the text tower returns them)
  or [C, d] (one template).
  """
  z = np.asarray(class_text_z, np.float32)
  if z.ndim == 2:
    z = z[:, None, :]
  if z.ndim != 3:
    raise ValueError(f"class_text_z must be [C, T, d] or [C, d], got shape {z.shape}.")
  if not 0 < dim <= z.shape[-1]:
    raise ValueError(f"dim={dim} must be in [1, {z.shape[-1]}] (the embedding's width).")
  return unit_rows(np.mean(unit_rows(z[..., :dim]), axis=1))


def unit_rows(x: np.ndarray) -> np.ndarray:
  """Vectors (last axis) scaled to unit L2 norm, float32; a zero vector stays zero."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def zero_shot_predictions(image_z: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Predicted class ids [N] of the images' prefixes z[:m] against a [C, m] classifier."""
  image_z = np.asarray(image_z, np.float32)
  weights = np.asarray(weights, np.float32)
  m = weights.shape[1]
  if image_z.ndim != 2 or image_z.shape[1] < m:
    raise ValueError(f"image_z must be [N, >= {m}], got shape {image_z.shape}.")
  block = max(1, min(len(image_z), MAX_BLOCK_SCORES // max(len(weights), 1)))
  # argmax takes the first maximum: ties go to the lower class id.
  w = weights.astype(np.float64).T
  out = [np.argmax(unit_rows(image_z[start:start + block, :m]).astype(np.float64) @ w,
                   axis=1) for start in range(0, len(image_z), block)]
  return np.concatenate(out) if out else np.zeros((0,), np.int64)


def zero_shot_top1(image_z: np.ndarray, labels: np.ndarray, class_text_z: np.ndarray,
                   dims: Sequence[int]) -> np.ndarray:
  """Zero-shot top-1 accuracy [len(dims)] float32: per size m, images' unit prefixes
  against the template-averaged classifier of `classifier_weights(class_text_z, m)`."""
  labels = np.asarray(labels)
  if len(labels) != len(image_z):
    raise ValueError(f"{len(labels)} labels for {len(image_z)} images.")
  if not len(labels):
    raise ValueError("No images to classify.")
  return np.asarray([np.mean(zero_shot_predictions(image_z, classifier_weights(class_text_z, m))
                             == labels) for m in dims], np.float32)
