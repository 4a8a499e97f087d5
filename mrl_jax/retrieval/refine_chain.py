"""An ANN-shortlist funnel run as one faiss call: IndexRefine chains over the stores' codes.

For a funnel whose stage 0 is an `AnnShortlist`, the stages can run inside faiss
(C++, multithreaded over queries) instead of one numpy rerank per stage:

  IndexRefine(... IndexRefine(ann.base_index(), store[dims[1]].refine_index()) ...,
              store[dims[-1]].refine_index())

searched with nested IndexRefineSearchParameters whose k_factor makes each stage ask
the one below for exactly the candidates the plan keeps there (the ANN's efSearch /
nprobe innermost). Both the base and the refine indexes take raw-width queries and
normalise their own prefix, so the chain sees the queries the numpy path sees. The
refine distances are faiss's (float32 flat L2 / scalar-quantizer decode, summed from
coordinate differences); the result is re-sorted by (distance, id) as everywhere else.

Measured on 100,000 x 2048 clustered vectors (HNSW on 16 dims, int8 store at 2048,
k 10, 500 queries, best of 12) on the 2-core CPU while other jobs kept its load at
9-14, so only roughly; ms per query for shortlists 100 / 200 / 400:
  HNSW search alone                  0.32 / 0.51 / 1.11
  the chain adds (SQ8 refine)        0.16 / 0.30 / 0.71
  PrefixStore.rerank (numpy int8)    0.24 / 0.18 / 5.5   (4.1-7.0 in three runs at 400)
  same, 1 thread each                chain adds 0.18 / 0.57 / 0.66, numpy 0.07 / 0.13 / 0.24
Neither path wins everywhere; the chain is the default because its cost grows
linearly with the shortlist and never hit the numpy path's slow case (set
`index.faiss_refine = False` to switch). Index overhead around the faiss call was
under 5%. Ids: equal to the stage-by-stage path for float32 stores, and for > 99.9% of
slots with int8 (quantised near-ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mrl_jax.retrieval.ann import blas_for_batches
from mrl_jax.retrieval.prefix_store import PrefixStore, sort_by_distance_then_id


class RefineChain:
  """One faiss IndexRefine chain: an ANN shortlist, then the stores at the later dims."""

  def __init__(self, shortlist: Any, stores: Sequence[PrefixStore], input_dim: int):
    import faiss
    self._faiss = faiss
    self._shortlist = shortlist
    index = shortlist.base_index(input_dim)
    self._parts = [index]                     # Python owners of every faiss object.
    for store in stores:
      refine = store.refine_index(input_dim)
      index = faiss.IndexRefine(index, refine)
      self._parts += [refine, index]
    self._index = index
    self.num_stages = 1 + len(stores)

  def _parameters(self, keeps: Sequence[int], ef_search: int | None, nprobe: int | None) -> Any:
    faiss = self._faiss
    params = faiss.SearchParametersPreTransform(
        index_params=self._shortlist.search_parameters(keeps[0], ef_search=ef_search,
                                                       nprobe=nprobe))
    owners = [params]
    for before, after in zip(keeps, keeps[1:]):
      # faiss asks its base for int(k * k_factor) candidates: + 0.5 makes that exactly `before`.
      params = faiss.IndexRefineSearchParameters(k_factor=(before + 0.5) / after,
                                                 base_index_params=params)
      owners.append(params)
    return params, owners

  def search(self, queries: np.ndarray, keeps: Sequence[int], *, ef_search: int | None = None,
             nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, distances float32) [Q, keeps[-1]], by (distance, id); -1 / +inf last."""
    if len(keeps) != self.num_stages:
      raise ValueError(f"{len(keeps)} keeps for a {self.num_stages}-stage chain.")
    params, _owners = self._parameters(keeps, ef_search, nprobe)  # _owners: alive during search.
    q = np.ascontiguousarray(queries, np.float32)
    with blas_for_batches(self._faiss):
      dist, ids = self._index.search(q, int(keeps[-1]), params=params)
    ids = ids.astype(np.int64, copy=False)
    dist = np.where(ids < 0, np.float32(np.inf), dist).astype(np.float32)
    return sort_by_distance_then_id(dist, ids, int(keeps[-1]))
