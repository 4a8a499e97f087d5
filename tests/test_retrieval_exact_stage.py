"""exact_top_k: the blocked knn scan and jax.lax.approx_max_k (exact on CPU) against brute force."""

import numpy as np
import pytest

from float32_tolerance import float32_atol
from mrl_jax.evaluation.knn import knn_search
from mrl_jax.retrieval import exact_stage
from mrl_jax.retrieval.errors import IndexQueryError
from mrl_jax.retrieval.exact_stage import exact_top_k
from mrl_jax.retrieval.prefix_store import normalized_prefix


def separated(n, q, m, seed=0):
  """Normalised database and queries whose float64 distances are far apart (well-ordered)."""
  rng = np.random.default_rng(seed)
  database = normalized_prefix(rng.normal(size=(n, m)), m)
  queries = normalized_prefix(rng.normal(size=(q, m)), m)
  return queries, database


def brute_force(queries, database, k):
  dist = np.square(queries[:, None, :].astype(np.float64) - database[None].astype(np.float64))
  dist = dist.sum(-1)
  ids = np.lexsort((np.broadcast_to(np.arange(len(database)), dist.shape), dist), axis=-1)[:, :k]
  return ids, np.take_along_axis(dist, ids, 1)


@pytest.mark.parametrize("m", [3, 48])
@pytest.mark.parametrize("method", ["knn", "approx", "auto"])
def test_methods_match_brute_force(method, m):
  queries, database = separated(1500, 37, m)
  ids, dist = exact_top_k(queries, database, 10, method=method)
  want_ids, want_dist = brute_force(queries, database, 10)
  assert ids.dtype == np.int64 and dist.dtype == np.float32 and ids.shape == (37, 10)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(dist, want_dist, rtol=0, atol=float32_atol(4.0, m, depth=2))


def test_approx_on_cpu_equals_knn_in_blocks(monkeypatch):
  queries, database = separated(900, 50, 64, seed=1)
  monkeypatch.setattr(exact_stage, "_SCORE_BYTES", 4 * 900 * 16)   # Blocks of 16 queries.
  ids, _ = exact_top_k(queries, database, 25, method="approx", recall_target=0.9)
  _, knn_ids = knn_search(queries, database, 25)
  np.testing.assert_array_equal(ids, knn_ids)


def test_auto_times_both_once_per_shape_off_cpu(monkeypatch):
  queries, database = separated(400, 8, 16)
  monkeypatch.setattr(exact_stage, "_platform", lambda database: "gpu")
  monkeypatch.setattr(exact_stage, "_AUTO_CHOICE", {})
  calls = []
  for name in ("_knn", "_approx"):
    real = getattr(exact_stage, name)
    monkeypatch.setattr(exact_stage, name,
                        lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
  first = exact_top_k(queries, database, 5)
  # Each method twice (compile, then timed), then the faster one for the answer.
  assert sorted(calls[:4]) == ["_approx", "_approx", "_knn", "_knn"] and len(calls) == 5
  assert exact_stage._AUTO_CHOICE == {("gpu", 8, 400, 16, 5): calls[4][1:]}
  calls.clear()
  second = exact_top_k(queries, database, 5)
  assert len(calls) == 1                     # The kept method only, no timing.
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_errors():
  queries, database = separated(50, 2, 8)
  with pytest.raises(IndexQueryError, match="unknown"):
    exact_top_k(queries, database, 3, method="faiss")
  with pytest.raises(IndexQueryError, match=r"k=51 must be in \[1, 50\]"):
    exact_top_k(queries, database, 51)
  with pytest.raises(IndexQueryError, match="same m"):
    exact_top_k(queries[:, :4], database, 3)
