"""Correlation of embedding similarities with human similarity ratings (the Lee benchmark).

The Lee corpus (Lee, Pincombe & Welsh, 2005; shipped in gensim's test data) has
50 news documents and a 50 x 50 matrix of mean human similarity ratings. A
sentence-embedding model is scored by how well the cosine similarity of its
document embeddings follows those ratings over the 50 * 49 / 2 = 1225 distinct
document pairs (the upper triangle, diagonal excluded): Pearson's r on the
values themselves and Spearman's rho on their ranks (ties get their average
rank, as in `scipy.stats.spearmanr`). Each prefix z[:m] is unit-normalised on
its own before the cosines, as a Matryoshka embedding is served.

Plain numpy in float64 (checked against scipy.stats in tests/test_bert_mlm.py).
"""

from __future__ import annotations

import numpy as np


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
  """The entries above the diagonal of a square matrix, row by row: [n * (n - 1) / 2]."""
  matrix = np.asarray(matrix)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"Need a square matrix, got shape {matrix.shape}.")
  rows, cols = np.triu_indices(matrix.shape[0], k=1)
  return matrix[rows, cols]


def average_ranks(values: np.ndarray) -> np.ndarray:
  """Ranks 1..n of `values`; tied values share the mean of the ranks they span."""
  values = np.asarray(values, np.float64)
  order = np.argsort(values, kind="stable")
  sorted_values = values[order]
  # Start of each run of equal values in sorted order.
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  ends = np.r_[starts[1:], len(values)]
  mean_rank = (starts + ends + 1) / 2.0  # ranks start..end-1 (0-based) -> mean of 1-based ranks
  ranks = np.empty(len(values), np.float64)
  ranks[order] = np.repeat(mean_rank, ends - starts)
  return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson's correlation coefficient of two equally long vectors (nan if one is constant)."""
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if x.shape != y.shape or len(x) < 2:
    raise ValueError(f"Need two vectors of the same length >= 2, got {x.shape} and {y.shape}.")
  dx, dy = x - x.mean(), y - y.mean()
  denom = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
  if denom == 0.0:
    return float("nan")
  return float(np.clip(np.dot(dx, dy) / denom, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman's rank correlation: Pearson's r of the average ranks."""
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f"Need two vectors of the same length, got {x.shape} and {y.shape}.")
  return pearson(average_ranks(x), average_ranks(y))


def cosine_matrix(z: np.ndarray) -> np.ndarray:
  """Cosine similarities [N, N] of the rows of z (each row unit-normalised first), float64."""
  z = np.asarray(z, np.float64)
  z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  return z @ z.T


def similarity_correlation(z: np.ndarray, human: np.ndarray,
                           dims: list[int] | tuple[int, ...]) -> dict[str, list[float]]:
  """{"pearson": [...], "spearman": [...]} per prefix size, over the upper-triangle pairs.

  z: [N, d] document embeddings; human: [N, N] ratings (only the upper triangle is read).
  """
  ratings = upper_triangle(human)
  out: dict[str, list[float]] = {"pearson": [], "spearman": []}
  for m in dims:
    cosines = upper_triangle(cosine_matrix(z[:, :m]))
    out["pearson"].append(pearson(cosines, ratings))
    out["spearman"].append(spearman(cosines, ratings))
  return out
