"""Approximate shortlists from a faiss index built on a small prefix (AdANNS-style).

The index holds only the unit-normalised first `dim` features of every database
vector, so it is small and fast to search; the candidates it returns are then
reranked with a larger prefix (`funnel.funnel_retrieve(..., index=...)`).
faiss ranks by squared L2 computed as ||q||^2 - 2 q.c + ||c||^2 in float32, so
at prefixes of a few dims the order among neighbours closer than ~1e-7 is
approximate too; the exact rerank (`funnel.rerank`) does not have that error.
faiss is optional: `pip install faiss-cpu` (or a GPU build).
"""

from __future__ import annotations

import numpy as np

from mrl_jax.evaluation.knn import l2_normalize

INDEX_KINDS = ("flat", "hnsw", "ivf")


def _faiss():
  try:
    import faiss
  except ImportError as e:
    raise ImportError("The approximate shortlist needs faiss: `pip install faiss-cpu`.") from e
  return faiss


class PrefixIndex:
  """A faiss index over the unit-normalised `dim`-prefix of `database` (squared L2)."""

  def __init__(self, database: np.ndarray, dim: int, *, kind: str = "hnsw",
               hnsw_neighbours: int = 32, ef_search: int = 128, ivf_lists: int = 1024,
               nprobe: int = 16, seed: int = 0):
    if kind not in INDEX_KINDS:
      raise ValueError(f"Index kind {kind!r} is unknown: use one of {INDEX_KINDS}.")
    faiss = _faiss()
    self.dim, self.kind = int(dim), kind
    vectors = np.ascontiguousarray(np.asarray(l2_normalize(np.asarray(database)[:, :dim],)),
                                   np.float32)
    if kind == "flat":
      index = faiss.IndexFlatL2(self.dim)
    elif kind == "hnsw":
      index = faiss.IndexHNSWFlat(self.dim, hnsw_neighbours)
      index.hnsw.efSearch = ef_search
    else:
      lists = max(1, min(ivf_lists, len(vectors) // 39))  # faiss wants ~39 points per list
      index = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.dim), self.dim, lists)
      rng = np.random.default_rng(seed)
      sample = vectors[rng.choice(len(vectors), size=min(len(vectors), 256 * lists),
                                  replace=False)]
      index.train(sample)
      index.nprobe = min(nprobe, lists)
    index.add(vectors)
    self.index = index

  def search(self, queries: np.ndarray, k: int) -> np.ndarray:
    """Approximate top-k database ids [Q, k] by the normalised prefix."""
    q = np.ascontiguousarray(np.asarray(l2_normalize(np.asarray(queries)[:, :self.dim])),
                             np.float32)
    if self.kind == "hnsw":
      self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, k)
    _, ids = self.index.search(q, k)
    return ids.astype(np.int64)
