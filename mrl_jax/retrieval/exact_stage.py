"""Exact top-k over a whole stored prefix: the blocked scan, or approx_max_k on accelerators.

  * "knn":    `evaluation.knn.knn_search` (exact, careful float32: direct coordinate
              differences up to 32 dims, mean-centred dot products above). The parity
              path, and the CPU default.
  * "approx": one jitted pass per block of queries: squared L2 against every database
              row (direct differences up to 32 dims, ||c||^2 - 2 q.c above, at full
              float32 precision), then jax.lax.approx_max_k on -distance with
              `recall_target`. On TPU/GPU that is the fast partial-reduction top-k; on
              CPU XLA computes it exactly (a sort), so its ids equal "knn"'s wherever the
              distances are not within float32 rounding of each other.
  * "auto":   "knn" on CPU; on GPU/TPU both are timed once per (Q, N, m, k) shape
              (second call, so compilation is not counted) and the faster is kept.
Both return ids int64 and squared L2 float32, [Q, k], ascending, ties to the smaller id.
Pass the database as a jax.Array to keep it on the device between calls.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.evaluation.knn import DIRECT_MAX_DIM, knn_search
from mrl_jax.retrieval.errors import IndexQueryError
from mrl_jax.retrieval.prefix_store import sort_by_distance_then_id

EXACT_METHODS = ("auto", "knn", "approx")
_SCORE_BYTES = 1 << 28          # Per block of queries: [block, N] float32 scores (256 MiB).
_HIGHEST = jax.lax.Precision.HIGHEST
_AUTO_CHOICE: dict[tuple[str, int, int, int, int], str] = {}   # shape -> faster method


def exact_top_k(queries_norm: Any, database_norm: Any, k: int, *, method: str = "auto",
                recall_target: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """Top-k database rows for normalised queries [Q, m] over a normalised [N, m] database.

  Returns (ids int64 [Q, k], squared L2 float32 [Q, k]) as numpy arrays.
  """
  if method not in EXACT_METHODS:
    raise IndexQueryError(f"Exact method {method!r} is unknown: use one of {EXACT_METHODS}.")
  q_shape, db_shape = np.shape(queries_norm), np.shape(database_norm)
  if len(q_shape) != 2 or len(db_shape) != 2 or q_shape[1] != db_shape[1]:
    raise IndexQueryError(f"Queries {q_shape} and database {db_shape} must be [Q, m] and "
                          "[N, m] with the same m.")
  k = int(k)
  if not 0 < k <= db_shape[0]:
    raise IndexQueryError(f"k={k} must be in [1, {db_shape[0]}] (the database size).")
  if not 0.0 < recall_target <= 1.0:
    raise IndexQueryError(f"recall_target={recall_target} must be in (0, 1].")
  if method == "auto":
    method = _auto_method(queries_norm, database_norm, k, recall_target)
  if method == "knn":
    return _knn(queries_norm, database_norm, k)
  return _approx(queries_norm, database_norm, k, recall_target)


def _knn(queries: Any, database: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
  dist, ids = knn_search(queries, database, k)
  return np.asarray(ids, np.int64), np.asarray(dist, np.float32)


def _platform(database: Any) -> str:
  if isinstance(database, jax.Array):
    return next(iter(database.devices())).platform
  return jax.default_backend()


def _auto_method(queries: Any, database: Any, k: int, recall_target: float) -> str:
  platform = _platform(database)
  if platform == "cpu":
    return "knn"
  key = (platform, int(np.shape(queries)[0]), int(np.shape(database)[0]),
         int(np.shape(database)[1]), k)
  if key not in _AUTO_CHOICE:
    seconds = {}
    for name, run in (("knn", lambda: _knn(queries, database, k)),
                      ("approx", lambda: _approx(queries, database, k, recall_target))):
      run()                                     # Compiles for this shape.
      start = time.perf_counter()
      run()
      seconds[name] = time.perf_counter() - start
    _AUTO_CHOICE[key] = min(seconds, key=seconds.get)
  return _AUTO_CHOICE[key]


@functools.partial(jax.jit, static_argnames=("k", "recall_target"))
def _approx_block(queries: jax.Array, database: jax.Array, k: int,
                  recall_target: float) -> tuple[jax.Array, jax.Array]:
  if queries.shape[1] <= DIRECT_MAX_DIM:   # No cancellation at tiny prefixes (see knn.py).
    dist = jnp.sum(jnp.square(queries[:, None, :] - database[None, :, :]), axis=-1)
  else:
    dist = (jnp.sum(queries * queries, axis=1, keepdims=True)
            + jnp.sum(database * database, axis=1)[None, :]
            - 2.0 * jnp.matmul(queries, database.T, precision=_HIGHEST))
  neg, ids = jax.lax.approx_max_k(-dist, k, recall_target=recall_target)
  return jnp.maximum(-neg, 0.0), ids


def _approx(queries: Any, database: Any, k: int,
            recall_target: float) -> tuple[np.ndarray, np.ndarray]:
  database = jnp.asarray(database, jnp.float32)
  num_queries, num_db = np.shape(queries)[0], database.shape[0]
  block = int(max(1, min(num_queries, _SCORE_BYTES // (4 * num_db))))
  ids, dists = [], []
  for start in range(0, num_queries, block):
    q = np.asarray(queries[start:start + block], np.float32)
    rows = len(q)
    if rows < block:   # One compiled shape for every block.
      q = np.concatenate([q, np.zeros((block - rows, q.shape[1]), np.float32)])
    d, i = _approx_block(jnp.asarray(q), database, k, float(recall_target))
    dists.append(np.asarray(d)[:rows])
    ids.append(np.asarray(i)[:rows].astype(np.int64))
  return sort_by_distance_then_id(np.concatenate(dists), np.concatenate(ids), k)
