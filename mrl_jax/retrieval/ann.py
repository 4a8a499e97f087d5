"""Approximate shortlists on a small MRL prefix: faiss HNSW and IVF, and AdANNS IVF.

An `AnnShortlist` holds a faiss structure over the unit-normalised `dim`-prefix of
every database vector and returns the approximate nearest ids by squared L2
between unit prefixes; a `PrefixStore` then reranks them with a larger prefix.

  * hnsw: faiss IndexHNSWFlat(dim, hnsw_neighbours), efConstruction as given;
    searched with efSearch (default max(k, 64)).
  * ivf:  k-means (faiss.Kmeans, seeded, on a seeded sample of the database) into
    ivf_lists lists (default about 4 sqrt(N)); a query scans the nprobe (default 16)
    lists nearest to it. With cluster_dim < dim this is AdANNS-IVF: the centroids
    are learnt and vectors and queries assigned on the normalised cluster_dim-prefix
    (a remap-and-renormalise transform in front of the coarse quantizer; normalising
    the dim-prefix first changes nothing, norms are scale-free), while the lists are
    scanned at dim.
codes="int8" stores the scanned prefix as per-dimension 8-bit scalar codes (faiss
IndexHNSWSQ / IndexIVFScalarQuantizer, QT_8bit, ranges learnt on a seeded sample)
instead of float32: a quarter of the bytes each hop or list scan reads. A graph
search is bound by those reads (memory latency, not arithmetic): on the 1M x 2048
synthetic database (benchmarks/retrieval.py, 2-core CPU) HNSW over the int8 256-dim
prefix plus an int8 rerank at 2048 ran 1.06-1.32x the float32 graph's queries/s at
the same shortlist and efSearch (ten settings over two passes of one run, and the
benchmark's tuned plans), with the graph built in 68 s instead of 76 s.
Its distances carry the codes' rounding (about 1/255 of each dimension's range), so
keep the shortlist a few times k and rerank it with a PrefixStore.
faiss ranks by ||q||^2 - 2 q.c + ||c||^2 in float32: among neighbours closer than
~1e-7 the order is approximate too; results are re-sorted by (distance, id), and
ids faiss could not fill are -1 at +inf, last. faiss is optional at import time:
`pip install faiss-cpu` (or a GPU build) to build or load a shortlist.
AdANNS here needs cluster_dim <= dim (clusters on a prefix of the scanned prefix).
An HNSW graph's links and codes are put on huge pages after build, add and load
(`huge_pages`; best effort): its hops land anywhere in them.

Measured (2-core CPU shared with other jobs, load average ~10: absolute times are a
few times an idle machine's; 100,000 x 64 clustered database, 500 queries, k 10,
recall of knn_search's exact top-10 on the same prefix, median of 5, ms per query):
  hnsw 16 dims, ef 64:        0.25 ms, recall 0.999  (build 22 s, 336 bytes/vector)
  hnsw 16 dims, ef 256:       1.24 ms, recall 1.0
  ivf 16 dims (1265 lists), nprobe 16: 0.08 ms, recall 0.991 (build 2.6 s, 73 bytes/vector)
  AdANNS ivf 32 dims on 8-dim clusters, nprobe 16: 0.13 ms, recall 0.873 (1.5 s)
  exact knn_search at 16 dims:  2.26 ms
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any

import numpy as np

from mrl_jax.retrieval.errors import IndexFileError, IndexQueryError, one_line
from mrl_jax.retrieval.huge_pages import back_with_huge_pages
from mrl_jax.retrieval.metadata_file import read_metadata, write_metadata
from mrl_jax.retrieval.prefix_store import (normalized_prefix, sort_by_distance_then_id,
                                             unit_prefix_rows)

ANN_KINDS = ("hnsw", "ivf")
# How the scanned prefix is stored inside the structure, and its bytes per dimension.
ANN_CODE_BYTES = {"float32": 4, "int8": 1}
ANN_CODES = tuple(ANN_CODE_BYTES)
FORMAT = "mrl_jax.ann_shortlist"
FORMAT_VERSION = 1
DEFAULT_NPROBE = 16
_TRAIN_POINTS_PER_LIST = 64   # k-means sample: faiss asks for >= 39 points per centroid.
_CODES_SAMPLE_ROWS = 65536    # Rows the int8 codes' per-dimension ranges are learnt on.
_KMEANS_ITERATIONS = 20
# faiss 1.15 computes brute-force distances (IndexFlat, so IVF coarse quantizers and k-means
# assignment) without BLAS for batches under distance_compute_blas_threshold rows, 128,000 by
# default there: AdANNS's quantizer (1265 centroids x 16 dims) took 1.4 ms for 500 queries
# that way and 0.11 ms through BLAS, and the whole adaptive plan 3.9 vs 2.4 ms (trained
# 100k x 512 database, 2-core CPU). Searches and builds here run with at most this value.
BATCH_BLAS_THRESHOLD = 20


@contextlib.contextmanager
def blas_for_batches(faiss: Any):
  """faiss's distance_compute_blas_threshold at most BATCH_BLAS_THRESHOLD inside the block (it
  is a process global: restored after, so other faiss code keeps its own setting)."""
  before = int(faiss.cvar.distance_compute_blas_threshold)
  faiss.cvar.distance_compute_blas_threshold = min(before, BATCH_BLAS_THRESHOLD)
  try:
    yield
  finally:
    faiss.cvar.distance_compute_blas_threshold = before


def _faiss():
  try:
    import faiss
  except ImportError as e:
    raise ImportError("Approximate shortlists need faiss: `pip install faiss-cpu`.") from e
  return faiss


@dataclasses.dataclass(frozen=True)
class AnnSpec:
  """What to build: the structure, the prefix it scans, and its build settings."""
  kind: str
  dim: int
  cluster_dim: int | None = None
  hnsw_neighbours: int = 32
  ef_construction: int = 40
  ivf_lists: int | None = None
  seed: int = 0
  codes: str = "float32"

  def __post_init__(self):
    if self.kind not in ANN_KINDS:
      raise IndexQueryError(f"ANN kind {self.kind!r} is unknown: use one of {ANN_KINDS}.")
    if int(self.dim) < 1:
      raise IndexQueryError(f"ANN dim={self.dim} must be at least 1.")
    if self.cluster_dim is not None:
      if self.kind != "ivf":
        raise IndexQueryError("cluster_dim is for kind='ivf' (AdANNS) only: drop it for hnsw.")
      if not 1 <= int(self.cluster_dim) <= int(self.dim):
        raise IndexQueryError(f"cluster_dim={self.cluster_dim} must be in [1, dim={self.dim}] "
                              "(clusters on a prefix of the scanned prefix).")
    if self.ivf_lists is not None and int(self.ivf_lists) < 1:
      raise IndexQueryError(f"ivf_lists={self.ivf_lists} must be at least 1.")
    if self.codes not in ANN_CODES:
      raise IndexQueryError(f"ANN codes={self.codes!r} is unknown: use one of {ANN_CODES}.")
    if self.hnsw_neighbours < 2 or self.ef_construction < 1:
      raise IndexQueryError("hnsw_neighbours must be >= 2 and ef_construction >= 1.")

  @property
  def clusters_on(self) -> int:
    """The prefix the IVF centroids live on (dim for plain IVF)."""
    return int(self.dim if self.cluster_dim is None else self.cluster_dim)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> AnnSpec:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise IndexQueryError(f"Unknown AnnSpec fields {sorted(unknown)}: use {sorted(fields)}.")
    return cls(**d)


def default_ivf_lists(num_vectors: int) -> int:
  """About 4 sqrt(N) lists, with at least 39 vectors per list (faiss's k-means minimum)."""
  return max(1, min(round(4 * math.sqrt(num_vectors)), num_vectors // 39))


class AnnShortlist:
  """A faiss HNSW / IVF structure over the normalised `dim`-prefix of the database."""

  def __init__(self, spec: AnnSpec, index: Any, input_dim: int):
    self.spec = spec
    self.dim = int(spec.dim)
    self.input_dim = int(input_dim)
    self.index = index   # faiss IndexHNSWFlat / HNSWSQ or IndexIVFFlat / IVFScalarQuantizer

  @classmethod
  def build(cls, embeddings: np.ndarray, spec: AnnSpec, *,
            block_rows: int = 65536) -> AnnShortlist:
    """Builds on raw [N, d >= spec.dim] embeddings, reading them in row blocks."""
    faiss = _faiss()
    if np.ndim(embeddings) != 2 or np.shape(embeddings)[1] < spec.dim:
      raise IndexQueryError(f"Embeddings of shape {np.shape(embeddings)} are narrower than the "
                            f"ANN prefix {spec.dim}: use a smaller dim.")
    n = len(embeddings)
    if n == 0:
      raise IndexQueryError("Cannot build an ANN shortlist from 0 embeddings.")
    with blas_for_batches(faiss):
      if spec.kind == "hnsw":
        if spec.codes == "int8":
          index = faiss.IndexHNSWSQ(spec.dim, faiss.ScalarQuantizer.QT_8bit,
                                    spec.hnsw_neighbours)
          index.train(_sample_rows(embeddings, spec.dim, _CODES_SAMPLE_ROWS, spec.seed))
        else:
          index = faiss.IndexHNSWFlat(spec.dim, spec.hnsw_neighbours)
        index.hnsw.efConstruction = spec.ef_construction
      else:
        index = _trained_ivf(faiss, embeddings, spec)
      shortlist = cls(spec, index, np.shape(embeddings)[1])
      for start in range(0, n, max(1, int(block_rows))):
        shortlist._add_block(embeddings[start:start + block_rows])
    shortlist.back_with_huge_pages()
    return shortlist

  def add(self, embeddings: np.ndarray) -> None:
    """Adds vectors (IVF: assigned to the lists learnt at build)."""
    if np.ndim(embeddings) != 2 or np.shape(embeddings)[1] < self.dim:
      raise IndexQueryError(f"Embeddings of shape {np.shape(embeddings)} are narrower than the "
                            f"ANN prefix {self.dim}.")
    self._add_block(embeddings)
    self.back_with_huge_pages()   # The buffers may have moved as they grew.

  def back_with_huge_pages(self) -> int:
    """Huge pages under an HNSW graph (`hnsw_with_huge_pages`); IVF lists are scanned
    front to back and stay as they are. Returns the bytes collapsed."""
    return hnsw_with_huge_pages(self.index) if self.spec.kind == "hnsw" else 0

  def _add_block(self, block: np.ndarray) -> None:
    with blas_for_batches(_faiss()):
      self.index.add(unit_prefix_rows(block, self.dim))

  @property
  def num_vectors(self) -> int:
    return int(self.index.ntotal)

  def search(self, queries: np.ndarray, k: int, *, ef_search: int | None = None,
             nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k: (ids int64 [Q, k], squared L2 float32 [Q, k]) at this prefix."""
    if np.ndim(queries) != 2 or np.shape(queries)[1] < self.dim:
      raise IndexQueryError(f"Queries of shape {np.shape(queries)} are narrower than the ANN "
                            f"prefix {self.dim}.")
    k = int(k)
    if k < 1:
      raise IndexQueryError(f"k={k} must be at least 1.")
    q = np.ascontiguousarray(normalized_prefix(queries, self.dim), np.float32)
    with blas_for_batches(_faiss()):
      dist, ids = self.index.search(q, k, params=self.search_parameters(
          k, ef_search=ef_search, nprobe=nprobe))
    ids = ids.astype(np.int64, copy=False)
    dist = np.where(ids < 0, np.float32(np.inf), dist).astype(np.float32)
    return sort_by_distance_then_id(dist, ids, k)

  def search_parameters(self, k: int, *, ef_search: int | None = None,
                        nprobe: int | None = None) -> Any:
    """faiss SearchParameters for this structure (efSearch / nprobe with the defaults)."""
    faiss = _faiss()
    if self.spec.kind == "hnsw":
      return faiss.SearchParametersHNSW(efSearch=int(ef_search or max(int(k), 64)))
    nprobe = int(nprobe or DEFAULT_NPROBE)
    return faiss.SearchParametersIVF(nprobe=max(1, min(nprobe, self.index.nlist)))

  def base_index(self, input_dim: int | None = None) -> Any:
    """The same structure behind a remap-and-normalise transform over raw-width queries.

    For faiss.IndexRefine chains (k_factor candidates, then a store's refine_index()).
    Searching it needs SearchParametersPreTransform(index_params=search_parameters(...))
    (inside IndexRefineSearchParameters(base_index_params=...); keep each object alive)
    for another efSearch / nprobe. input_dim defaults to the width built from.
    """
    faiss = _faiss()
    input_dim = self.input_dim if input_dim is None else int(input_dim)
    if input_dim < self.dim:
      raise IndexQueryError(f"input_dim={input_dim} is below the ANN prefix {self.dim}.")
    chain = faiss.IndexPreTransform(self.index)
    chain.prepend_transform(faiss.NormalizationTransform(self.dim))
    if input_dim != self.dim:
      chain.prepend_transform(faiss.RemapDimensionsTransform(input_dim, self.dim, False))
    return chain

  @property
  def bytes_per_vector(self) -> float:
    """Memory per vector: the stored prefix, its graph links or list id, centroids amortised."""
    n = max(1, self.num_vectors)
    per = float(ANN_CODE_BYTES[self.spec.codes] * self.dim)
    if self.spec.kind == "hnsw":
      hnsw = self.index.hnsw
      links = hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
      return per + links / n
    return per + 8.0 + 4.0 * self.spec.clusters_on * self.index.nlist / n

  # ---------------------------------------------------------------- files
  def save(self, directory: str | os.PathLike) -> None:
    """Writes ann.faiss (faiss.write_index) and ann.json (the spec)."""
    faiss = _faiss()
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    faiss.write_index(self.index, os.path.join(directory, "ann.faiss"))
    write_metadata(directory, "ann.json", FORMAT, FORMAT_VERSION,
                   {"spec": self.spec.to_dict(), "input_dim": self.input_dim,
                    "num_vectors": self.num_vectors})

  @classmethod
  def load(cls, directory: str | os.PathLike) -> AnnShortlist:
    faiss = _faiss()
    directory = os.fspath(directory)
    spec, input_dim, n = read_metadata(
        directory, "ann.json", FORMAT, FORMAT_VERSION, "ANN shortlist",
        lambda meta: (AnnSpec.from_dict(meta["spec"]), int(meta["input_dim"]),
                      int(meta["num_vectors"])))
    path = os.path.join(directory, "ann.faiss")
    try:
      index = faiss.read_index(path)
    except (RuntimeError, OSError) as e:
      raise IndexFileError(f"{path} is missing or corrupt ({one_line(e)[:200]}): save the "
                           "shortlist again.") from None
    if index.d != spec.dim or index.ntotal != n:
      raise IndexFileError(f"{path} holds {index.ntotal} vectors of {index.d} dims, ann.json "
                           f"says {n} of {spec.dim}: save the shortlist again.")
    shortlist = cls(spec, index, input_dim)   # read_index returns the concrete class, owning it.
    shortlist.back_with_huge_pages()
    return shortlist


def hnsw_with_huge_pages(index: Any) -> int:
  """Huge pages (`huge_pages`) under a faiss IndexHNSW's links and codes, where its hops
  land anywhere; returns the bytes collapsed (0 where the kernel declined)."""
  faiss = _faiss()
  storage = faiss.downcast_index(index.storage)
  return sum(back_with_huge_pages(faiss.rev_swig_ptr(vector.data(), vector.size()))
             for vector in (index.hnsw.neighbors, storage.codes) if vector.size())


def _sample_rows(embeddings: np.ndarray, dim: int, size: int, seed: int) -> np.ndarray:
  """The normalised dim-prefix of a seeded sample of rows (only that prefix is read)."""
  n = len(embeddings)
  rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))
  return unit_prefix_rows(np.asarray(embeddings[rows, :dim]), dim)


def _trained_ivf(faiss: Any, embeddings: np.ndarray, spec: AnnSpec) -> Any:
  """An IVF on dim dims (flat or int8 lists) whose coarse quantizer clusters the
  cluster_dim-prefix."""
  n = len(embeddings)
  lists = default_ivf_lists(n) if spec.ivf_lists is None else min(int(spec.ivf_lists), n)
  sample = _sample_rows(embeddings, spec.clusters_on, _TRAIN_POINTS_PER_LIST * lists, spec.seed)
  kmeans = faiss.Kmeans(spec.clusters_on, lists, niter=_KMEANS_ITERATIONS, seed=spec.seed,
                        verbose=False, max_points_per_centroid=_TRAIN_POINTS_PER_LIST)
  kmeans.train(sample)
  centroids = faiss.IndexFlatL2(spec.clusters_on)
  centroids.add(kmeans.centroids)
  quantizer = centroids
  if spec.clusters_on != spec.dim:
    # The IVF hands the quantizer the normalised dim-prefix; its first cluster_dim dims,
    # renormalised, are the normalised cluster_dim-prefix the centroids were learnt on.
    quantizer = faiss.IndexPreTransform(centroids)
    quantizer.prepend_transform(faiss.NormalizationTransform(spec.clusters_on))
    quantizer.prepend_transform(faiss.RemapDimensionsTransform(spec.dim, spec.clusters_on, False))
  if spec.codes == "int8":
    index = faiss.IndexIVFScalarQuantizer(quantizer, spec.dim, lists,
                                          faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2, False)
    # Only the codes' ranges are learnt here (on the vectors, not residuals); the quantizer
    # keeps the centroids above.
    codes_sample = _sample_rows(embeddings, spec.dim, _CODES_SAMPLE_ROWS, spec.seed)
    index.sq.train(codes_sample)
  else:
    index = faiss.IndexIVFFlat(quantizer, spec.dim, lists, faiss.METRIC_L2)
  index.is_trained = True
  index.referenced_objects = [quantizer, centroids]
  return index
