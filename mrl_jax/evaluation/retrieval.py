"""Retrieval metrics at k from ranked neighbour labels, with the official MRL definitions.

For a query with label y and its top-k retrieved labels:
  * precision@k = hits in the top k / k,
  * recall@k    = hits in the top k / (number of database items with label y),
    from the real class counts;
  * recall_official@k = hits in the top k / `official_class_size`: the official
    MRL code divides by a constant, 1300 (about the images per ImageNet-1K
    training class), whatever the class; comparable with the paper's numbers on
    ImageNet, meaningless elsewhere unless the constant is set to the class size;
  * AP@k        = (sum of precision@i over the ranks i <= k that are hits) / k,
    the official code's definition; mAP@k is its mean over queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OFFICIAL_CLASS_SIZE = 1300  # The official code's recall denominator (ImageNet-1K).


def retrieval_metrics(neighbour_labels: np.ndarray, query_labels: np.ndarray,
                      database_labels: np.ndarray, ks: Sequence[int] = (10, 25, 50, 100), *,
                      official_class_size: int = OFFICIAL_CLASS_SIZE) -> dict[str, float]:
  """{"map@k", "precision@k", "recall@k", "recall_official@k"} for every k in `ks`.

  k may not exceed the neighbours given; see the module doc for the definitions.
  """
  per_query = per_query_retrieval_metrics(neighbour_labels, query_labels, database_labels, ks,
                                          official_class_size=official_class_size)
  return {name: float(np.mean(values)) for name, values in per_query.items()}


def per_query_retrieval_metrics(neighbour_labels: np.ndarray, query_labels: np.ndarray,
                                database_labels: np.ndarray,
                                ks: Sequence[int] = (10, 25, 50, 100), *,
                                official_class_size: int = OFFICIAL_CLASS_SIZE,
                                ) -> dict[str, np.ndarray]:
  """retrieval_metrics' entries before the mean over queries: float64 [Q] each (AP@k for map@k)."""
  if max(ks) > neighbour_labels.shape[1]:
    raise ValueError(f"Need at least {max(ks)} neighbours per query, "
                     f"got {neighbour_labels.shape[1]}.")
  if official_class_size <= 0:
    raise ValueError(f"official_class_size={official_class_size} must be positive.")
  hits = (neighbour_labels == query_labels[:, None]).astype(np.float64)
  cumulative = np.cumsum(hits, axis=1)
  ranks = np.arange(1, hits.shape[1] + 1)
  precision_at_rank = cumulative / ranks
  class_counts = np.bincount(database_labels, minlength=int(query_labels.max()) + 1)
  relevant = np.maximum(class_counts[query_labels], 1)
  out = {}
  for k in ks:
    out[f"precision@{k}"] = cumulative[:, k - 1] / k
    out[f"recall@{k}"] = cumulative[:, k - 1] / relevant
    out[f"recall_official@{k}"] = cumulative[:, k - 1] / official_class_size
    out[f"map@{k}"] = (precision_at_rank[:, :k] * hits[:, :k]).sum(axis=1) / k
  return out
