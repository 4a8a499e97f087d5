"""A float32 `PrefixStore` read from a split's embedding shards on disk instead of memory.

`--mode=probe` on a large database builds its retrieval `Index` from these: the
unit-normalised `dim`-prefix of a row is computed from the raw row when it is read
(`unit_prefix_rows`, the function `PrefixStore.build` codes float32 stores with, row
by row), so `decoded` and `rerank` return what an in-memory float32 store of the
same embeddings returns, bit for bit, and no store is ever held whole. Exact stages
read it in row blocks (`Index._exact`), reranks gather their candidates' rows in
chunks of at most _GATHER_ROWS. `add`, `save` and faiss refine chains need the
codes in memory: they are refused (set `Index.faiss_refine = False`; the
stage-by-stage funnel gives the same ids).
"""

from __future__ import annotations

import numpy as np

from mrl_jax.retrieval.errors import IndexQueryError
from mrl_jax.retrieval.prefix_store import PrefixStore, _Codec, unit_prefix_rows

_GATHER_ROWS = 8192      # Candidate rows gathered per chunk of queries.
_READ_ROWS = 1 << 15     # Rows read per block while decoding a range.


class ShardPrefixStore(PrefixStore):
  """The float32 normalised `dim`-prefix of `embeddings` (a `SplitEmbeddings`), read on use."""

  # Index._exact scans (and caches) a store in one piece up to this size, else in row
  # blocks: a small prefix (1.28M x 16: 82 MB) is read once and kept, a large one streams.
  single_scan_bytes = 1 << 28

  def __init__(self, embeddings, dim: int):
    super().__init__(dim, "float32", np.zeros((0, dim), np.float32), None, _Codec("float32"),
                     embeddings.shape[1])
    if not 0 < dim <= embeddings.shape[1]:
      raise IndexQueryError(f"Prefix size {dim} is outside [1, {embeddings.shape[1]}].")
    self._embeddings = embeddings

  @property
  def num_vectors(self) -> int:
    return int(self._embeddings.shape[0])

  def decoded(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    stop = self.num_vectors if stop is None else min(stop, self.num_vectors)
    out = np.empty((max(0, stop - start), self.dim), np.float32)
    for at in range(start, stop, _READ_ROWS):
      end = min(stop, at + _READ_ROWS)
      out[at - start:end - start] = unit_prefix_rows(self._embeddings[at:end], self.dim)
    return out

  def _float32_distances(self, q: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    out = np.empty(candidates.shape, np.float32)
    per = max(1, _GATHER_ROWS // max(1, candidates.shape[1]))
    for s in range(0, len(q), per):
      cand = candidates[s:s + per]
      ids, inverse = np.unique(cand, return_inverse=True)
      rows = unit_prefix_rows(self._embeddings.take(ids), self.dim)
      # A small in-memory store over just these rows: the same distance code, bit for bit.
      local = PrefixStore(self.dim, "float32", rows, None, self._codec, self.input_dim)
      out[s:s + per] = local._float32_distances(q[s:s + per], inverse.reshape(cand.shape))
    return out

  def add(self, embeddings: np.ndarray) -> None:
    raise IndexQueryError("A store read from embedding shards cannot grow: build an in-memory "
                          "Index to add vectors.")

  def save(self, directory) -> None:
    raise IndexQueryError("A store read from embedding shards is not saved: its shards are on "
                          "disk already; build an in-memory Index to save one.")

  def refine_index(self, input_dim: int | None = None):
    raise IndexQueryError("A store read from embedding shards has no faiss copy: set "
                          "Index.faiss_refine = False.")
