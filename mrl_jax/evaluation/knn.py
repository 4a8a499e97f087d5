"""Exact nearest-neighbour search over large databases, one block of queries at a time.

Memory stays at block x database_block distances: the database is scanned in
chunks and a running top-k is merged, so no N x M distance matrix is built.
With several devices the database rows are sharded over all of them: each
device scans its shard, and the per-device top-k lists are gathered and merged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Unit-normalises rows (each prefix is normalised on its own before retrieval)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k", "db_block"))
def _topk_one_query_block(queries: jax.Array, database: jax.Array, k: int,
                          db_block: int) -> tuple[jax.Array, jax.Array]:
  """Squared-L2 top-k of `queries` against `database` (rows padded to db_block multiples)."""
  num_db = database.shape[0]
  pad = (-num_db) % db_block
  db = jnp.pad(database, ((0, pad), (0, 0)))
  valid = jnp.arange(num_db + pad) < num_db
  db_sq = jnp.where(valid, jnp.sum(db * db, axis=1), jnp.inf)
  q_sq = jnp.sum(queries * queries, axis=1, keepdims=True)
  blocks = (num_db + pad) // db_block

  def scan_block(carry, b):
    best_d, best_i = carry
    start = b * db_block
    chunk = jax.lax.dynamic_slice_in_dim(db, start, db_block)
    chunk_sq = jax.lax.dynamic_slice_in_dim(db_sq, start, db_block)
    dist = q_sq - 2.0 * queries @ chunk.T + chunk_sq[None, :]
    ids = start + jnp.arange(db_block)
    all_d = jnp.concatenate([best_d, dist], axis=1)
    all_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, dist.shape)], axis=1)
    neg, order = jax.lax.top_k(-all_d, k)
    return (-neg, jnp.take_along_axis(all_i, order, axis=1)), None

  init = (jnp.full((queries.shape[0], k), jnp.inf, queries.dtype),
          jnp.full((queries.shape[0], k), -1, jnp.int32))
  (dist, idx), _ = jax.lax.scan(scan_block, init, jnp.arange(blocks))
  return dist, idx


def _sharded_search_fn(num_devices: int, shard_rows: int, k: int, db_block: int):
  """Per-device blocked top-k over a row shard, then a merge of the gathered lists."""
  mesh = jax.make_mesh((num_devices,), ("db",), axis_types=(AxisType.Auto,))
  local_k = min(k, shard_rows)

  def local(queries, shard, valid):
    offset = jax.lax.axis_index("db") * shard_rows
    # Padding rows get an infinite norm so they never enter a top-k.
    shard = jnp.where(valid[:, None], shard, jnp.inf)
    dist, idx = _topk_one_query_block(queries, shard, local_k, db_block)
    dist = jnp.where(jnp.isnan(dist), jnp.inf, dist)
    return dist[None], (idx + offset)[None]

  search = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("db"), P("db")),
                         out_specs=(P("db"), P("db")), check_vma=False)

  @jax.jit
  def run(queries, shard, valid):
    dist, idx = search(queries, shard, valid)          # [devices, Q, local_k]
    dist = jnp.moveaxis(dist, 0, 1).reshape(queries.shape[0], -1)
    idx = jnp.moveaxis(idx, 0, 1).reshape(queries.shape[0], -1)
    # Merge: by distance, then by database index (smaller first) for ties.
    order = jnp.lexsort((idx, dist), axis=-1)[:, :k]
    return jnp.take_along_axis(dist, order, 1), jnp.take_along_axis(idx, order, 1)

  return mesh, run


def knn_search(queries: np.ndarray, database: np.ndarray, k: int, *, query_block: int = 1024,
               db_block: int = 8192, devices: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact k nearest database rows (squared L2) for every query: (distances, indices) [Q, k].

  Ties are broken towards the smaller database index. `k` may not exceed the database size.
  `devices` (default: all local devices) is how many devices share the database rows.
  """
  if not 0 < k <= len(database):
    raise ValueError(f"k={k} must be in [1, {len(database)}] (the database size).")
  num_devices = devices or jax.local_device_count()
  database = jnp.asarray(database, jnp.float32)
  if num_devices > 1:
    shard_rows = -(-len(database) // num_devices)
    pad = shard_rows * num_devices - len(database)
    mesh, run = _sharded_search_fn(num_devices, shard_rows, k, min(db_block, shard_rows))
    valid = jnp.arange(shard_rows * num_devices) < len(database)
    database = jax.device_put(jnp.pad(database, ((0, pad), (0, 0))), NamedSharding(mesh, P("db")))
    valid = jax.device_put(valid, NamedSharding(mesh, P("db")))
    search = lambda q: run(q, database, valid)
  else:
    block = min(db_block, len(database))
    search = lambda q: _topk_one_query_block(q, database, k, block)
  dists, idxs = [], []
  for start in range(0, len(queries), query_block):
    d, i = search(jnp.asarray(queries[start:start + query_block], jnp.float32))
    dists.append(np.asarray(d))
    idxs.append(np.asarray(i))
  return np.concatenate(dists), np.concatenate(idxs)


def knn_classify(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Majority vote over the k neighbours' labels (ties go to the nearer neighbour's class)."""
  k = neighbour_labels.shape[1]
  # Weight 1 per vote plus a tiny rank bonus: counts decide, rank breaks ties.
  weights = 1.0 + (k - np.arange(k)) * 1e-6
  votes = np.zeros((len(neighbour_labels), num_classes))
  np.add.at(votes, (np.arange(len(neighbour_labels))[:, None], neighbour_labels), weights)
  return votes.argmax(axis=1)
