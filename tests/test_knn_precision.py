"""knn_search ids against float64 brute force where float32 rounding used to reorder them.

Two traps: unit vectors at tiny prefixes (neighbours packed within 1e-7 of each
other on the sphere) and raw vectors with a large common offset (||q||^2 and
||c||^2 near 1e6 swamp the distances). Only queries whose float64 distance gaps
are far above the float32 error of the exact computation are compared, so the
tests are deterministic; the old ||q||^2 - 2 q.c + ||c||^2 form fails them all.
"""

import subprocess
import sys

import numpy as np
import pytest

from mrl_jax.evaluation import knn

EPS32 = float(np.finfo(np.float32).eps)
K = 5


def cap_vectors(num, d, spread, seed):
  """Unit vectors (float32) in a small cap around e0: a collapsed tiny prefix."""
  rng = np.random.default_rng(seed)
  x = np.zeros((num, d))
  x[:, 0] = 1.0
  x[:, 1:] = rng.normal(scale=spread, size=(num, d - 1))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(queries, database):
  """Float64 squared L2 of the float32 inputs, summed from coordinate differences."""
  q, c = queries.astype(np.float64), database.astype(np.float64)
  return ((q[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def well_separated(dist, scale, k=K):
  """Queries whose k+1 nearest float64 distances differ by far more than float32 error.

  `scale` [Q]: the magnitude the float32 computation rounds at (per query); 1000
  ulps of it covers any summation order over up to a few hundred dims.
  """
  top = np.sort(dist, axis=1)[:, :k + 1]
  return np.all(np.diff(top, axis=1) > 1000 * EPS32 * scale[:, None], axis=1)


@pytest.mark.parametrize("d,spread", [(2, 1e-3), (3, 1e-3), (8, 3e-4)])
def test_unit_vectors_at_tiny_prefixes(d, spread):
  database = cap_vectors(2000, d, spread, seed=d)
  queries = cap_vectors(200, d, spread, seed=100 + d)
  dist = brute_force(queries, database)
  # Exact differences round at the scale of the distances themselves.
  keep = well_separated(dist, np.sort(dist, axis=1)[:, K])
  assert keep.mean() > 0.5
  got_d, got_i = knn.knn_search(queries, database, K, db_block=512)
  expected = np.argsort(dist, axis=1, kind="stable")[:, :K]
  np.testing.assert_array_equal(got_i[keep], expected[keep])
  np.testing.assert_allclose(got_d, np.take_along_axis(dist, got_i, 1), rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("d", [2, 8, 64])
def test_raw_vectors_with_a_large_common_offset(d):
  rng = np.random.default_rng(d)
  database = (1000.0 + rng.normal(size=(2000, d))).astype(np.float32)
  queries = (1000.0 + rng.normal(size=(100, d))).astype(np.float32)
  dist = brute_force(queries, database)
  # The centred expansion rounds at the scale of ||q - mean||^2 + ||c - mean||^2 ~ 2d.
  centred = np.full(len(queries), 4.0 * d)
  keep = well_separated(dist, centred if d > knn.DIRECT_MAX_DIM else np.sort(dist, 1)[:, K])
  assert keep.mean() > 0.5
  got_d, got_i = knn.knn_search(queries, database, K, db_block=512)
  expected = np.argsort(dist, axis=1, kind="stable")[:, :K]
  np.testing.assert_array_equal(got_i[keep], expected[keep])
  np.testing.assert_allclose(got_d, np.take_along_axis(dist, got_i, 1),
                             rtol=1e-5, atol=100 * EPS32 * 4.0 * d)


def test_inner_product_metric_and_ties():
  rng = np.random.default_rng(5)
  database = rng.normal(size=(300, 16)).astype(np.float32)
  database[40] = database[7]  # an exact tie: the smaller index comes first
  queries = np.concatenate([rng.normal(size=(30, 16)), database[7:8]]).astype(np.float32)
  ip = queries.astype(np.float64) @ database.T.astype(np.float64)
  scores, idx = knn.knn_search(queries, database, K, metric="ip", db_block=64)
  expected = np.argsort(-ip, axis=1, kind="stable")[:, :K]
  np.testing.assert_array_equal(idx, expected)
  np.testing.assert_allclose(scores, np.take_along_axis(ip, expected, 1), rtol=1e-5, atol=1e-4)
  assert idx[-1, 0] == 7 and 40 in idx[-1]
  with pytest.raises(ValueError, match="metric"):
    knn.knn_search(queries, database, K, metric="cosine")


SHARDED_PRECISION = """
import numpy as np
import jax
from mrl_jax.evaluation import knn
import test_knn_precision as t
assert jax.local_device_count() == 4
cases = [(t.cap_vectors(1001, 2, 1e-3, 2), t.cap_vectors(50, 2, 1e-3, 102), "l2"),
         ((1000 + np.random.default_rng(1).normal(size=(1001, 64))).astype(np.float32),
          (1000 + np.random.default_rng(2).normal(size=(50, 64))).astype(np.float32), "l2"),
         (t.cap_vectors(1001, 8, 0.3, 3), t.cap_vectors(50, 8, 0.3, 103), "ip")]
for database, queries, metric in cases:
  database[17] = database[900]                      # an exact tie across shards
  queries[0] = database[900]
  one = knn.knn_search(queries, database, t.K, metric=metric, devices=1, db_block=128)
  four = knn.knn_search(queries, database, t.K, metric=metric, devices=4, db_block=128)
  np.testing.assert_array_equal(four[1], one[1])
  np.testing.assert_allclose(four[0], one[0], rtol=1e-6)
  assert list(four[1][0, :2]) == [17, 900], four[1][0]
# Plain Gaussian data, 301 rows (not a multiple of 4 devices): ids and distances vs brute force.
rng = np.random.default_rng(0)
database = rng.normal(size=(301, 8)).astype(np.float32)
database[17] = database[250]
queries = np.concatenate([rng.normal(size=(20, 8)), database[250:251]]).astype(np.float32)
dist, idx = knn.knn_search(queries, database, 7, db_block=32)
brute = t.brute_force(queries, database)
expected = np.argsort(brute, axis=1, kind="stable")[:, :7]
np.testing.assert_array_equal(idx, expected)
np.testing.assert_allclose(dist, np.take_along_axis(brute, expected, 1), rtol=1e-5, atol=1e-6)
print("sharded precision ok")
"""


def test_sharded_search_keeps_precision_and_ties():
  """4 CPU devices give the single-device ids and float64's (the smaller index first on ties)."""
  import os

  from conftest import subprocess_env
  env = subprocess_env(4)
  env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + env["PYTHONPATH"]
  result = subprocess.run([sys.executable, "-c", SHARDED_PRECISION], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "sharded precision ok" in result.stdout
