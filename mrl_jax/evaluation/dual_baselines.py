"""Truncations of a plain (non-nested) dual encoder: the baselines MRL is compared with.

A dual encoder trained at one size gives no meaning to its first m coordinates;
the two classic ways to get m-dim embeddings out of it anyway, applied to BOTH
modalities identically (so image and text vectors stay comparable):
  * "svd": project on the top-m directions of a basis fitted on the image AND
    text embeddings together (`joint_svd_basis`);
  * "random": keep one fixed, seeded subset of m coordinates (`random_subsets`),
    the same for images and texts.
The projected vectors are then scored by the same zero-shot, recall@k and k-NN
functions as the nested model's prefixes (each unit-normalised on its own).

The basis. The directions are the eigenvectors of the two modalities' second
moments averaged with equal weight, (Zi^T Zi / N + Zt^T Zt / T) / 2, by
decreasing eigenvalue: the best rank-m linear compression of both at once,
with a split that has five captions per image not letting text dominate.
Unlike the image probe's `probe.svd_basis` it is not centred: embeddings are
projected as served (no mean subtracted; cosine similarity of centred vectors
would score a different model), so at m = d the projection is a rotation and
every score equals the full model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

KINDS = ("svd", "random")


def joint_svd_basis(image_z: np.ndarray, text_z: np.ndarray) -> np.ndarray:
  """Orthonormal directions [d, d] (columns, by decreasing joint second moment; module doc)."""
  image_z, text_z = np.asarray(image_z, np.float64), np.asarray(text_z, np.float64)
  if image_z.ndim != 2 or text_z.ndim != 2 or image_z.shape[1] != text_z.shape[1]:
    raise ValueError(f"image_z [N, d] and text_z [T, d] must share d; got {image_z.shape} "
                     f"and {text_z.shape}.")
  if not len(image_z) or not len(text_z):
    raise ValueError("The basis needs image and text embeddings (got an empty set).")
  moment = 0.5 * (image_z.T @ image_z / len(image_z) + text_z.T @ text_z / len(text_z))
  values, vectors = np.linalg.eigh(moment)  # ascending eigenvalues
  return vectors[:, np.argsort(-values, kind="stable")]


def random_subsets(width: int, dims: Sequence[int], seed: int) -> dict[int, np.ndarray]:
  """{m: sorted distinct coordinates [m]} drawn once per size from a seeded generator."""
  rng = np.random.default_rng(seed)
  out = {}
  for m in dims:
    if not 0 < m <= width:
      raise ValueError(f"dim={m} must be in [1, {width}] (the embedding's width).")
    out[int(m)] = np.sort(rng.choice(width, size=int(m), replace=False))
  return out


def truncations(image_z: np.ndarray, text_z: np.ndarray, dims: Sequence[int],
                seed: int) -> dict[str, Callable[[np.ndarray, int], np.ndarray]]:
  """{"svd": f, "random": f}, f(z [N, d], m) -> [N, m] float32: the baselines' m-dim
  vectors of any embeddings of the same model (images, captions, prompts), fitted
  once on `image_z` and `text_z`."""
  basis = joint_svd_basis(image_z, text_z)
  subsets = random_subsets(np.shape(image_z)[1], dims, seed)
  return {
      "svd": lambda z, m: (np.asarray(z, np.float64) @ basis[:, :m]).astype(np.float32),
      "random": lambda z, m: np.asarray(z, np.float32)[..., subsets[m]],
  }
