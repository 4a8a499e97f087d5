"""Blocked k-NN against brute force; retrieval metrics against a naive per-query loop.

The multi-device (sharded database) search is checked in test_knn_precision.py.
"""

import numpy as np
import pytest

from mrl_jax.evaluation import knn, retrieval


@pytest.mark.parametrize("db_block", [7, 64, 1000])
def test_blocked_knn_equals_brute_force(db_block):
  rng = np.random.default_rng(0)
  database = rng.normal(size=(300, 16)).astype(np.float32)
  queries = rng.normal(size=(45, 16)).astype(np.float32)
  dist, idx = knn.knn_search(queries, database, 5, query_block=16, db_block=db_block)
  brute = ((queries[:, None] - database[None]) ** 2).sum(-1)
  expected = np.argsort(brute, axis=1, kind="stable")[:, :5]
  np.testing.assert_array_equal(idx, expected)
  np.testing.assert_allclose(dist, np.take_along_axis(brute, expected, 1), rtol=1e-4, atol=1e-4)


def test_knn_rejects_k_larger_than_database():
  with pytest.raises(ValueError, match="database size"):
    knn.knn_search(np.zeros((2, 3)), np.zeros((4, 3)), 5)


def test_knn_vote_counts_then_rank():
  labels = np.array([[1, 2, 2], [3, 1, 1], [4, 5, 6]])
  np.testing.assert_array_equal(knn.knn_classify(labels, 7), [2, 1, 4])


def naive_vote(row):
  """Most votes; among those, the class whose nearest member comes first."""
  counts = {c: list(row).count(c) for c in row}
  best = max(counts.values())
  return next(c for c in row if counts[c] == best)


def test_knn_vote_tie_goes_to_the_nearest_member():
  # 3 and 1 have two votes each; 3 owns the nearest neighbour (the old rank bonus gave 1).
  assert knn.knn_classify(np.array([[3, 1, 1, 3, 2]]), 4)[0] == 3
  assert knn.knn_classify(np.array([[2, 0, 0, 1, 1, 2]]), 3)[0] == 2
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=(500, 7))
  np.testing.assert_array_equal(knn.knn_classify(labels, 4), [naive_vote(r) for r in labels])


def naive_metrics(neighbour_labels, query_labels, database_labels, k, official=1300):
  aps, precisions, recalls, official_recalls = [], [], [], []
  for row, y in zip(neighbour_labels, query_labels):
    hits, ap = 0, 0.0
    for i, label in enumerate(row[:k], start=1):
      if label == y:
        hits += 1
        ap += hits / i
    aps.append(ap / k)
    precisions.append(hits / k)
    recalls.append(hits / max(int((database_labels == y).sum()), 1))
    official_recalls.append(hits / official)
  return np.mean(aps), np.mean(precisions), np.mean(recalls), np.mean(official_recalls)


def test_retrieval_metrics_match_naive_loop():
  rng = np.random.default_rng(1)
  database_labels = rng.integers(0, 5, size=400)
  query_labels = rng.integers(0, 5, size=30)
  neighbour_labels = rng.integers(0, 5, size=(30, 100))
  got = retrieval.retrieval_metrics(neighbour_labels, query_labels, database_labels)
  small = retrieval.retrieval_metrics(neighbour_labels, query_labels, database_labels,
                                      official_class_size=80)
  for k in (10, 25, 50, 100):
    ap, p, r, r_official = naive_metrics(neighbour_labels, query_labels, database_labels, k)
    assert got[f"map@{k}"] == pytest.approx(ap)
    assert got[f"precision@{k}"] == pytest.approx(p)
    assert got[f"recall@{k}"] == pytest.approx(r)
    assert got[f"recall_official@{k}"] == pytest.approx(r_official)
    r_80 = naive_metrics(neighbour_labels, query_labels, database_labels, k, official=80)[3]
    assert small[f"recall_official@{k}"] == pytest.approx(r_80)


def test_per_query_metrics_match_naive_loop_and_average_to_the_metrics():
  rng = np.random.default_rng(2)
  database_labels = rng.integers(0, 4, size=200)
  query_labels = rng.integers(0, 4, size=25)
  neighbour_labels = rng.integers(0, 4, size=(25, 30))
  ks = (1, 10, 30)
  per_query = retrieval.per_query_retrieval_metrics(neighbour_labels, query_labels,
                                                    database_labels, ks)
  means = retrieval.retrieval_metrics(neighbour_labels, query_labels, database_labels, ks)
  assert set(per_query) == set(means)
  for k in ks:
    naive = np.array([naive_metrics(row[None], np.array([y]), database_labels, k)
                      for row, y in zip(neighbour_labels, query_labels)])
    for column, name in enumerate(("map", "precision", "recall", "recall_official")):
      np.testing.assert_allclose(per_query[f"{name}@{k}"], naive[:, column], rtol=1e-12)
      assert means[f"{name}@{k}"] == pytest.approx(per_query[f"{name}@{k}"].mean(), rel=1e-12)


def test_perfect_ranking_closed_form():
  # Every retrieved item is relevant: precision 1, AP@k 1, recall k / class size.
  database_labels = np.array([0] * 20 + [1] * 20)
  metrics = retrieval.retrieval_metrics(np.zeros((3, 10), int), np.zeros(3, int),
                                        database_labels, ks=(10,))
  assert metrics == {"precision@10": 1.0, "recall@10": 0.5, "map@10": 1.0,
                     "recall_official@10": 10 / 1300}
