"""Adaptive and funnel retrieval with nested embeddings (MRL paper), and their search cost.

Every stage looks at a prefix `[:, :D]` of the raw embeddings, unit-normalised
on its own, and ranks by squared L2 distance (for unit vectors the same order as
inner product, but computed without the float32 cancellation that reorders
close neighbours at tiny prefixes: `knn_search` for the exact shortlist, and
sums of squared coordinate differences when reranking candidates).

  * single-shot: exact top-k over the whole database at one size;
  * adaptive:    exact shortlist of `shortlist_size` with a small prefix, then the
                 candidates are reranked with a larger prefix and the top k kept;
  * funnel:      stage 0 is an exact shortlist of shortlists[0] with dims[0]; stage
                 i >= 1 reranks the current candidates with dims[i] and keeps
                 shortlists[i]. `shortlists` may have one entry fewer than `dims`,
                 then the last stage keeps k. The answer is the last stage's
                 ranking cut to k, so k may not exceed what the last stage keeps
                 (ValueError otherwise; no padding). Adaptive retrieval is the
                 two-stage funnel.

Rankings break distance ties towards the smaller database index, as `knn_search` does.

Cost, in multiply-adds of distance dot products per query (normalisation and
sorting are not counted): single-shot M*D; adaptive M*D_s + S*D_r; funnel
M*dims[0] + sum_{i>=1} shortlists[i-1]*dims[i].
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.evaluation.knn import knn_search, l2_normalize
from mrl_jax.evaluation.retrieval import retrieval_metrics

_RERANK_BLOCK_ELEMENTS = 1 << 24  # Gathered candidate floats per block (64 MiB in float32).
_NORM_EPS = 1e-12                  # As in l2_normalize.


def _resolve(dim: int | None, full: int) -> int:
  dim = full if dim is None else int(dim)
  if not 0 < dim <= full:
    raise ValueError(f"Prefix size {dim} is outside [1, {full}] (the embedding size).")
  return dim


def _normalized_prefix(x: np.ndarray, dim: int) -> np.ndarray:
  return np.asarray(l2_normalize(np.asarray(x[..., :dim], np.float32)))


def _stage_plan(dims: Sequence[int | None], shortlists: Sequence[int], k: int, full: int,
                num_database: int) -> tuple[list[int], list[int]]:
  """Resolved dims and how many candidates each stage keeps, validated."""
  dims = [_resolve(d, full) for d in dims]
  keeps = [int(s) for s in shortlists]
  if len(keeps) == len(dims) - 1:
    keeps.append(int(k))
  if not dims or len(keeps) != len(dims):
    raise ValueError(f"Need len(shortlists) == len(dims) or len(dims) - 1, got {len(shortlists)} "
                     f"shortlists for {len(dims)} dims.")
  if not 0 < keeps[0] <= num_database:
    raise ValueError(f"First shortlist {keeps[0]} must be in [1, {num_database}] (database size).")
  for before, after in zip(keeps, keeps[1:]):
    if not 0 < after <= before:
      raise ValueError(f"Shortlists must be positive and non-increasing, got {keeps}.")
  if not 0 < k <= keeps[-1]:
    raise ValueError(f"k={k} must be in [1, {keeps[-1]}] (what the last stage keeps).")
  return dims, keeps


def rerank(queries: np.ndarray, database: np.ndarray, candidates: np.ndarray, dim: int,
           keep: int, *, block_elements: int = _RERANK_BLOCK_ELEMENTS) -> np.ndarray:
  """Reorders each query's candidate ids [Q, S] by distance at prefix `dim`; keeps `keep`.

  Candidate prefixes are gathered one block of queries at a time ([B, S, dim] floats with
  B * S * dim <= block_elements, at least one query). Distances are the squared L2 between
  unit-normalised prefixes, summed from coordinate differences in float32 (exact up to
  ~1e-7 of each distance, so a whole-database candidate list gives `single_shot`'s ids).
  Id -1 (a slot an ANN shortlist could not fill) ranks last and stays -1.
  """
  if isinstance(database, jax.Array):  # Keep the database where it is: gather on device.
    return _rerank_on_device(jnp.asarray(queries), database, jnp.asarray(candidates), dim, keep)
  candidates = np.asarray(candidates)
  num_queries, num_candidates = candidates.shape
  prefix = np.asarray(database)[:, :dim]
  block = max(1, block_elements // max(1, num_candidates * dim))
  out = np.empty((num_queries, keep), candidates.dtype)
  for start in range(0, num_queries, block):
    cand = candidates[start:start + block]
    q = _normalized_prefix(queries[start:start + block], dim)            # [B, dim]
    missing = cand < 0                     # np.take would read row N-1 for them.
    c = np.take(prefix, np.where(missing, 0, cand), axis=0).astype(np.float32, copy=False)
    c = c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), np.float32(_NORM_EPS))
    dist = np.where(missing, np.float32(np.inf), np.square(c - q[:, None, :]).sum(-1))
    order = np.lexsort((cand, dist), axis=-1)[:, :keep]  # By distance, then database id.
    out[start:start + block] = np.take_along_axis(cand, order, axis=1)
  return out


@functools.partial(jax.jit, static_argnames=("dim", "keep"))
def _rerank_on_device(queries: jax.Array, database: jax.Array, candidates: jax.Array, dim: int,
                      keep: int) -> jax.Array:
  """`rerank` for a database already on the accelerator (same distances and tie order)."""
  q = l2_normalize(queries[:, :dim].astype(jnp.float32))                    # [Q, dim]
  missing = candidates < 0
  c = l2_normalize(jnp.take(database[:, :dim], jnp.where(missing, 0, candidates),
                            axis=0).astype(jnp.float32))
  dist = jnp.where(missing, jnp.inf, jnp.sum(jnp.square(c - q[:, None, :]), axis=-1))
  order = jnp.lexsort((candidates, dist), axis=-1)[:, :keep]
  return jnp.take_along_axis(candidates, order, axis=1)


def single_shot(queries: np.ndarray, database: np.ndarray, dim: int | None = None, k: int = 10,
                ) -> np.ndarray:
  """Exact top-k database ids [Q, k] at prefix size `dim` (None: the full embedding)."""
  dim = _resolve(dim, np.shape(database)[1])
  _, idx = knn_search(_normalized_prefix(queries, dim), _normalized_prefix(database, dim), k)
  return idx


def funnel_retrieve(queries: np.ndarray, database: np.ndarray, *,
                    dims: Sequence[int | None] = (16, 32, 64, 128, 256, None),
                    shortlists: Sequence[int] = (200, 100, 50, 25, 10), k: int = 10,
                    index: Any | None = None) -> np.ndarray:
  """Funnel retrieval (see module doc): database ids [Q, k].

  `index` (a `retrieval.ann.AnnShortlist` over the dims[0]-prefix) replaces the exact
  first shortlist with an approximate one (its default ef_search / nprobe); later stages
  rerank exactly as before. ValueError if it finds fewer than shortlists[0] candidates
  for a query (raise its nprobe, or use fewer, larger lists).
  """
  dims, keeps = _stage_plan(dims, shortlists, k, np.shape(database)[1], len(database))
  if index is not None:
    if index.dim != dims[0]:
      raise ValueError(f"The index covers {index.dim} dims but the first stage uses {dims[0]}.")
    neighbours, _ = index.search(queries, keeps[0])
    if np.any(neighbours < 0):
      raise ValueError(f"The approximate shortlist found fewer than {keeps[0]} candidates for "
                       "some queries: scan more of it (nprobe) or shorten the first shortlist.")
  else:
    neighbours = single_shot(queries, database, dims[0], keeps[0])
  for dim, keep in zip(dims[1:], keeps[1:]):
    neighbours = rerank(queries, database, neighbours, dim, keep)
  return neighbours[:, :k]


def adaptive_retrieve(queries: np.ndarray, database: np.ndarray, *, shortlist_dim: int = 16,
                      rerank_dim: int | None = None, shortlist_size: int = 200, k: int = 100,
                      index: Any | None = None) -> np.ndarray:
  """Shortlist `shortlist_size` with `shortlist_dim`, rerank with `rerank_dim`: ids [Q, k].

  With `index` (a `retrieval.ann.AnnShortlist` over `shortlist_dim` dims) the shortlist is
  approximate.
  """
  return funnel_retrieve(queries, database, dims=(shortlist_dim, rerank_dim),
                         shortlists=(shortlist_size,), k=k, index=index)


def single_shot_flops(num_database: int, dim: int) -> int:
  """Multiply-adds per query of exact search at one size: M * D."""
  return int(num_database) * int(dim)


def funnel_flops(num_database: int, dims: Sequence[int], shortlists: Sequence[int]) -> int:
  """Multiply-adds per query of a funnel: M * dims[0] + sum_{i>=1} shortlists[i-1] * dims[i]."""
  if len(shortlists) < len(dims) - 1:
    raise ValueError(f"{len(dims)} stages need at least {len(dims) - 1} shortlists.")
  return int(num_database) * int(dims[0]) + sum(
      int(s) * int(d) for s, d in zip(shortlists, dims[1:]))


def adaptive_flops(num_database: int, shortlist_dim: int, rerank_dim: int,
                   shortlist_size: int) -> int:
  """Multiply-adds per query of adaptive retrieval: M * D_s + S * D_r."""
  return funnel_flops(num_database, (shortlist_dim, rerank_dim), (shortlist_size,))


def search_flops(num_database: int, full_dim: int, *, shortlist_dim: int = 16,
                 rerank_dim: int | None = None, shortlist_size: int = 200,
                 funnel_dims: Sequence[int | None] = (16, 32, 64, 128, 256, None),
                 funnel_shortlists: Sequence[int] = (200, 100, 50, 25, 10)) -> dict[str, int]:
  """Multiply-adds per query of single-shot (full size), adaptive and funnel search."""
  return {
      "single_shot_full": single_shot_flops(num_database, full_dim),
      "adaptive": adaptive_flops(num_database, _resolve(shortlist_dim, full_dim),
                                 _resolve(rerank_dim, full_dim), shortlist_size),
      "funnel": funnel_flops(num_database, [_resolve(d, full_dim) for d in funnel_dims],
                             funnel_shortlists),
  }


def _timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, float]:
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return result, float(np.median(times))


def compare_retrieval(queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray,
                      database_labels: np.ndarray, *, dims_full: int | None = None,
                      ks: Sequence[int] = (10,), shortlist_dim: int = 16,
                      rerank_dim: int | None = None, shortlist_size: int = 200,
                      funnel_dims: Sequence[int | None] = (16, 32, 64, 128, 256, None),
                      funnel_shortlists: Sequence[int] = (200, 100, 50, 25, 10),
                      repeats: int = 1) -> dict[str, Any]:
  """Single-shot full-size search vs adaptive vs funnel retrieval, JSON-serialisable.

  `dims_full` is the size used as "full" (single-shot, and wherever a dim is None);
  default: the embedding width. Every method retrieves k = max(ks) neighbours (so the
  funnel's last stage must keep >= max(ks)). Per method: retrieval_metrics at `ks`,
  "top1" (the first neighbour's label equals the query's), "flops" and "mflops"
  (multiply-adds per query / 1e6), "seconds" (median wall time over `repeats` runs;
  it includes JAX compilation on a first call at new shapes) and the resolved settings.
  """
  queries = np.asarray(queries)
  database = np.asarray(database)
  query_labels = np.asarray(query_labels).reshape(-1)
  database_labels = np.asarray(database_labels).reshape(-1)
  full = _resolve(dims_full, database.shape[1])
  k = max(int(m) for m in ks)
  num_database = len(database)
  s_dim, r_dim = _resolve(shortlist_dim, full), _resolve(rerank_dim, full)
  f_dims, f_keeps = _stage_plan(funnel_dims, funnel_shortlists, k, full, num_database)

  methods = {
      "single_shot_full": (
          lambda: single_shot(queries, database, full, k),
          single_shot_flops(num_database, full), {"dim": full}),
      "adaptive": (
          lambda: adaptive_retrieve(queries, database, shortlist_dim=s_dim, rerank_dim=r_dim,
                                    shortlist_size=shortlist_size, k=k),
          adaptive_flops(num_database, s_dim, r_dim, shortlist_size),
          {"shortlist_dim": s_dim, "rerank_dim": r_dim, "shortlist_size": int(shortlist_size)}),
      "funnel": (
          lambda: funnel_retrieve(queries, database, dims=f_dims, shortlists=f_keeps, k=k),
          funnel_flops(num_database, f_dims, f_keeps), {"dims": f_dims, "shortlists": f_keeps}),
  }
  out: dict[str, Any] = {"k": k, "num_queries": int(len(queries)),
                         "num_database": int(num_database), "full_dim": full}
  for name, (run, flops, settings) in methods.items():
    neighbours, seconds = _timed(run, repeats)
    labels = database_labels[neighbours]
    result = retrieval_metrics(labels, query_labels, database_labels, ks)
    result["top1"] = float(np.mean(labels[:, 0] == query_labels))
    result.update(flops=int(flops), mflops=flops / 1e6, seconds=seconds, **settings)
    out[name] = result
  return out
