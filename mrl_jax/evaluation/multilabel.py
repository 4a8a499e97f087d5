"""Label-set metrics for models trained on multi-label corpora (multi-hot labels).

Labels are multi-hot int arrays [N, C] (1 = the example carries the class).

- precision@1 (`precision_at_1`): the share of queries whose top-ranked item
  is relevant: for a classifier, the top-scoring class is one of the query's
  labels; for retrieval, the nearest database example shares at least one
  label with the query.
- mAP over labels (`mean_average_precision`): for each label c that at least
  one test example carries, rank the test examples by their score for c
  (decreasing) and take the average precision
      AP_c = (1 / P_c) * sum over positives i of precision@rank(i),
  P_c the number of positives; mAP is the mean of AP_c over those labels.
  This is scikit-learn's `average_precision_score(y[:, c], s[:, c])` when
  scores have no ties (ties here are broken by example order, not pooled).
The linear probe whose scores feed the mAP, a one-vs-rest logistic regression
per label, is `linear_probe.linear_probe_scores`.
"""

from __future__ import annotations

import numpy as np


def precision_at_1(top_hit: np.ndarray) -> float:
  """Mean of a boolean [N] "the top-ranked item is relevant"."""
  return float(np.mean(np.asarray(top_hit, bool)))


def head_precision_at_1(scores: np.ndarray, labels: np.ndarray) -> float:
  """Share of examples whose top-scoring class [N, C] is one of their labels [N, C]."""
  top = np.argmax(scores, axis=1)
  return precision_at_1(np.asarray(labels)[np.arange(len(top)), top] > 0)


def neighbour_precision_at_1(query_labels: np.ndarray, neighbour_labels: np.ndarray) -> float:
  """Share of queries [N, C] whose nearest neighbour's labels [N, C] share a class with them."""
  return precision_at_1(np.any((np.asarray(query_labels) > 0)
                               & (np.asarray(neighbour_labels) > 0), axis=1))


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
  """AP of ranking by `scores` [N] (decreasing; ties by index) against boolean `relevant` [N]."""
  relevant = np.asarray(relevant, bool)
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  hits = relevant[order]
  if not hits.any():
    raise ValueError("average_precision needs at least one relevant example.")
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float(precision[hits].sum() / hits.sum())


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """Mean over labels with at least one positive of AP of ranking examples by that label's score."""
  labels = np.asarray(labels) > 0
  present = np.flatnonzero(labels.any(axis=0))
  return float(np.mean([average_precision(scores[:, c], labels[:, c]) for c in present]))
