"""faiss prefix indexes for the shortlist stage (AdANNS-style), against exact search."""

import numpy as np
import pytest

pytest.importorskip("faiss")

from mrl_jax.evaluation import ann, funnel  # noqa: E402


def nested_data(n=3000, q=60, d=64, classes=20, seed=0):
  rng = np.random.default_rng(seed)
  scale = (np.arange(d) + 1.0) ** -0.5
  centres = rng.normal(size=(classes, d)) * scale * 3
  db_labels, q_labels = rng.integers(0, classes, n), rng.integers(0, classes, q)
  noise = lambda m: rng.normal(size=(m, d)) * scale
  return (centres[db_labels] + noise(n)).astype(np.float32), (centres[q_labels] + noise(q)).astype(np.float32)


def overlap(a, b):
  return np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)])


def test_flat_index_equals_exact_shortlist():
  database, queries = nested_data()
  index = ann.PrefixIndex(database, 16, kind="flat")
  exact = funnel.single_shot(queries, database, 16, 50)
  assert overlap(index.search(queries, 50), exact) > 0.99


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_shortlist_then_exact_rerank(kind):
  database, queries = nested_data()
  index = ann.PrefixIndex(database, 16, kind=kind, ivf_lists=32, nprobe=8)
  assert overlap(index.search(queries, 50), funnel.single_shot(queries, database, 16, 50)) > 0.9
  approx = funnel.adaptive_retrieve(queries, database, shortlist_dim=16, shortlist_size=200,
                                    k=10, index=index)
  exact = funnel.adaptive_retrieve(queries, database, shortlist_dim=16, shortlist_size=200, k=10)
  assert approx.shape == (60, 10)
  assert overlap(approx, exact) > 0.9


def test_index_must_cover_the_first_stage_dims():
  database, queries = nested_data(n=500)
  index = ann.PrefixIndex(database, 8, kind="flat")
  with pytest.raises(ValueError, match="covers 8 dims"):
    funnel.adaptive_retrieve(queries, database, shortlist_dim=16, k=10, index=index)
  with pytest.raises(ValueError, match="unknown"):
    ann.PrefixIndex(database, 8, kind="lsh")
