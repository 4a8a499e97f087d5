"""Image<->text retrieval recall@k of a dual encoder at every nesting size.

The protocol of CLIP / ALIGN on Flickr30k and COCO, per prefix size m, with
both modalities' prefixes z[:m] unit-normalised on their own and ranked by
inner product (cosine similarity):
  * image -> text: an image counts at k if ANY of its captions is among the k
    texts scoring highest against it;
  * text -> image: a caption counts at k if its own image is among the k images
    scoring highest against it.
`text_image[t]` names caption t's image (a row of `image_z`); an image may have
any number of captions. Images with no caption have nothing to find and are
left out of image -> text recall.

Ties. Candidates are ordered by score (descending), then by index (ascending):
among candidates with exactly equal scores the lower-numbered one ranks first.
The rank of a query's first relevant candidate in that order is computed
exactly (the count of candidates ordered before it), so every k comes from one
pass.

Precision. Each prefix is unit-normalised in float32 (as served), and the
scores are float64 products of those float32 vectors (numpy, BLAS dgemm). In
float32 the last bit of a score depends on the BLAS kernel's blocking and even
on the arrays' memory alignment (measured: the same vectors in another copy
moved 8 of 1,000 image->text ranks of a trained model); in float64 such
differences are ~1e-16, far below the gaps between real scores, so in practice
a ranking depends on the vectors alone. numpy also compiles nothing per shape, where a jitted version
spent longer compiling one block shape per size than scoring.

Cost. The full N x T similarity matrix is never built (5k x 25k for COCO's
test split): queries go in blocks of about MAX_BLOCK_SCORES scores, each block
one matmul against all candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mrl_jax.evaluation.zero_shot import unit_rows

DIRECTIONS = ("image_to_text", "text_to_image")
# Queries per block: about this many float64 scores ([block, candidates]) exist at once.
MAX_BLOCK_SCORES = 1 << 23


def _image_block_ranks(images: np.ndarray, image_ids: np.ndarray, texts: np.ndarray,
                       text_image: np.ndarray) -> np.ndarray:
  """Rank of each image's best-ranked own caption (-1: the image has none)."""
  scores = images @ texts.T                                             # [Q, T] float64
  own = text_image[None, :] == image_ids[:, None]
  best = np.max(np.where(own, scores, -np.inf), axis=1)[:, None]
  positions = np.arange(texts.shape[0])
  # Among own captions tied at the best score, the lowest index ranks first.
  first = np.min(np.where(own & (scores == best), positions, texts.shape[0]), axis=1)[:, None]
  ahead = np.count_nonzero(scores > best, axis=1) + np.count_nonzero(
      (scores == best) & (positions < first), axis=1)
  return np.where(own.any(axis=1), ahead, -1)


def _text_block_ranks(texts: np.ndarray, own_image: np.ndarray,
                      images: np.ndarray) -> np.ndarray:
  """Rank of each caption's own image among all images."""
  scores = texts @ images.T                                             # [Q, N] float64
  own = np.take_along_axis(scores, own_image[:, None], axis=1)
  positions = np.arange(images.shape[0])
  return np.count_nonzero(scores > own, axis=1) + np.count_nonzero(
      (scores == own) & (positions[None, :] < own_image[:, None]), axis=1)


def _blocks(n: int, candidates: int):
  block = max(1, min(n, MAX_BLOCK_SCORES // max(candidates, 1)))
  for start in range(0, n, block):
    yield start, block


def _check(image_z: np.ndarray, text_z: np.ndarray, text_image: np.ndarray) -> None:
  if image_z.ndim != 2 or text_z.ndim != 2 or image_z.shape[1] != text_z.shape[1]:
    raise ValueError(f"image_z [N, d] and text_z [T, d] must share d; got {image_z.shape} "
                     f"and {text_z.shape}.")
  if text_image.shape != (len(text_z),):
    raise ValueError(f"text_image must be [T={len(text_z)}], got shape {text_image.shape}.")
  if len(text_image) and (text_image.min() < 0 or text_image.max() >= len(image_z)):
    raise ValueError(f"text_image must index the {len(image_z)} images; got values in "
                     f"[{text_image.min()}, {text_image.max()}].")


def image_to_text_ranks(image_z: np.ndarray, text_z: np.ndarray,
                        text_image: np.ndarray) -> np.ndarray:
  """int [N]: for each image, how many texts rank before its first own caption (0 =
  an own caption is the nearest text); -1 for images without captions. Vectors
  are used as given (normalise them first for cosine similarity)."""
  image_z, text_z = np.asarray(image_z, np.float32), np.asarray(text_z, np.float32)
  text_image = np.asarray(text_image, np.int64)
  _check(image_z, text_z, text_image)
  image_z, text_z = image_z.astype(np.float64), text_z.astype(np.float64)  # exact copies
  out = [_image_block_ranks(image_z[start:start + block],
                            np.arange(start, min(start + block, len(image_z))), text_z,
                            text_image)
         for start, block in _blocks(len(image_z), len(text_z))]
  return np.concatenate(out).astype(np.int64) if out else np.zeros((0,), np.int64)


def text_to_image_ranks(image_z: np.ndarray, text_z: np.ndarray,
                        text_image: np.ndarray) -> np.ndarray:
  """int [T]: for each caption, how many images rank before its own image."""
  image_z, text_z = np.asarray(image_z, np.float32), np.asarray(text_z, np.float32)
  text_image = np.asarray(text_image, np.int64)
  _check(image_z, text_z, text_image)
  image_z, text_z = image_z.astype(np.float64), text_z.astype(np.float64)  # exact copies
  out = [_text_block_ranks(text_z[start:start + block], text_image[start:start + block],
                           image_z)
         for start, block in _blocks(len(text_z), len(image_z))]
  return np.concatenate(out).astype(np.int64) if out else np.zeros((0,), np.int64)


def recall_at_k(image_z: np.ndarray, text_z: np.ndarray, text_image: np.ndarray,
                dims: Sequence[int], ks: Sequence[int] = (1, 5, 10)
                ) -> dict[str, dict[int, np.ndarray]]:
  """{"image_to_text": {k: [len(dims)]}, "text_to_image": {k: [len(dims)]}} float32 recalls,
  per size m with unit-normalised prefixes z[:m] of both modalities (module doc)."""
  image_z, text_z = np.asarray(image_z, np.float32), np.asarray(text_z, np.float32)
  text_image = np.asarray(text_image, np.int32)
  _check(image_z, text_z, text_image)
  if not len(text_z):
    raise ValueError("No captions to retrieve.")
  for m in dims:
    if not 0 < m <= image_z.shape[1]:
      raise ValueError(f"dim={m} must be in [1, {image_z.shape[1]}] (the embedding's width).")
  for k in ks:
    if int(k) != k or k < 1:
      raise ValueError(f"k={k!r} must be a positive integer.")
  out: dict[str, dict[int, list[float]]] = {d: {int(k): [] for k in ks} for d in DIRECTIONS}
  for m in dims:
    images, texts = unit_rows(image_z[:, :m]), unit_rows(text_z[:, :m])
    i2t = image_to_text_ranks(images, texts, text_image)
    i2t = i2t[i2t >= 0]  # Images with captions only.
    t2i = text_to_image_ranks(images, texts, text_image)
    for k in ks:
      out["image_to_text"][int(k)].append(float(np.mean(i2t < k)))
      out["text_to_image"][int(k)].append(float(np.mean(t2i < k)))
  return {d: {k: np.asarray(v, np.float32) for k, v in per_k.items()}
          for d, per_k in out.items()}
