"""ANN shortlists on an MRL prefix (faiss HNSW, IVF, AdANNS IVF) against exact search."""

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from mrl_jax.evaluation import funnel  # noqa: E402
from mrl_jax.evaluation.knn import knn_search  # noqa: E402
from mrl_jax.retrieval.ann import AnnShortlist, AnnSpec, default_ivf_lists  # noqa: E402
from mrl_jax.retrieval.errors import (IndexFileError, IndexNotFoundError,  # noqa: E402
                                      IndexQueryError)
from mrl_jax.retrieval.prefix_store import PrefixStore, normalized_prefix  # noqa: E402


@pytest.fixture(scope="module")
def clustered():
  """Clustered nested data: 3000 x 64 database, 60 queries (leading dims carry more)."""
  rng = np.random.default_rng(0)
  n, q, d, classes = 3000, 60, 64, 20
  scale = (np.arange(d) + 1.0) ** -0.5
  centres = rng.normal(size=(classes, d)) * scale * 3
  noise = lambda m: rng.normal(size=(m, d)) * scale
  database = (centres[rng.integers(0, classes, n)] + noise(n)).astype(np.float32)
  queries = (centres[rng.integers(0, classes, q)] + noise(q)).astype(np.float32)
  return database, queries


def exact_ids(queries, database, dim, k):
  _, ids = knn_search(normalized_prefix(queries, dim), normalized_prefix(database, dim), k)
  return ids


def recall(found, truth):
  return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)])


def test_hnsw_recall_at_ef_64(clustered):
  database, queries = clustered
  shortlist = AnnShortlist.build(database, AnnSpec("hnsw", 16), block_rows=700)
  ids, dist = shortlist.search(queries, 10)
  assert ids.dtype == np.int64 and dist.dtype == np.float32 and ids.shape == (60, 10)
  assert recall(ids, exact_ids(queries, database, 16, 10)) >= 0.9
  assert np.all(np.diff(dist, axis=1) >= 0)


def test_ivf_recall_at_a_quarter_of_the_lists_and_exact_when_all_are_scanned(clustered):
  database, queries = clustered
  spec = AnnSpec("ivf", 16, ivf_lists=40)
  shortlist = AnnShortlist.build(database, spec)
  truth = exact_ids(queries, database, 16, 10)
  assert recall(shortlist.search(queries, 10, nprobe=10)[0], truth) >= 0.9
  ids, dist = shortlist.search(queries, 10, nprobe=40)
  assert recall(ids, truth) >= 0.99
  reference, _ = knn_search(normalized_prefix(queries, 16), normalized_prefix(database, 16), 10)
  np.testing.assert_allclose(dist, reference, rtol=0, atol=1e-5)


def test_adanns_clusters_on_a_smaller_prefix_and_recall_rises_with_nprobe(clustered):
  database, queries = clustered
  shortlist = AnnShortlist.build(database, AnnSpec("ivf", 32, cluster_dim=8, ivf_lists=40))
  centroids = faiss.downcast_index(faiss.downcast_index(shortlist.index.quantizer).index)
  assert centroids.d == 8 and centroids.ntotal == 40
  # Vectors sit in the list of their nearest centroid by the normalised 8-dim prefix.
  _, assigned = centroids.search(normalized_prefix(database, 8), 1)
  invlists = shortlist.index.invlists
  for list_no in range(0, 40, 7):
    size = invlists.list_size(list_no)
    members = faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy()
    np.testing.assert_array_equal(np.sort(members), np.flatnonzero(assigned[:, 0] == list_no))
  truth = exact_ids(queries, database, 32, 10)
  recalls = [recall(shortlist.search(queries, 10, nprobe=p)[0], truth) for p in (1, 4, 40)]
  assert recalls[0] < recalls[1] < recalls[2]
  assert recalls[2] >= 0.99                  # Every list scanned at 32 dims: exact.


@pytest.mark.parametrize("spec", [AnnSpec("hnsw", 16), AnnSpec("ivf", 16, ivf_lists=30),
                                  AnnSpec("ivf", 24, cluster_dim=8, ivf_lists=30)])
def test_add_save_load_round_trip(clustered, tmp_path, spec):
  database, queries = clustered
  shortlist = AnnShortlist.build(database[:2000], spec)
  shortlist.add(database[2000:])
  assert shortlist.num_vectors == 3000
  ids, dist = shortlist.search(queries, 10, nprobe=30)
  assert recall(ids, exact_ids(queries, database, spec.dim, 10)) >= 0.8  # Added rows found.
  shortlist.save(tmp_path / "ann")
  loaded = AnnShortlist.load(tmp_path / "ann")
  assert loaded.spec == spec and loaded.input_dim == 64
  assert loaded.bytes_per_vector == shortlist.bytes_per_vector
  for a, b in zip(loaded.search(queries, 10, nprobe=30), (ids, dist)):
    np.testing.assert_array_equal(a, b)


def test_base_index_takes_raw_queries_for_an_index_refine_chain(clustered):
  database, queries = clustered
  shortlist = AnnShortlist.build(database, AnnSpec("hnsw", 16))
  store = PrefixStore.build(database, 64, "int8")
  chain = faiss.IndexRefine(shortlist.base_index(), store.refine_index())
  chain.k_factor = 20
  hnsw_params = shortlist.search_parameters(200)      # Kept alive: faiss holds pointers.
  base_params = faiss.SearchParametersPreTransform(index_params=hnsw_params)
  params = faiss.IndexRefineSearchParameters(k_factor=20, base_index_params=base_params)
  dist, ids = chain.search(queries, 10, params=params)
  short, _ = shortlist.search(queries, 200)
  want_ids, want_dist = store.rerank(queries, short, 10)
  assert np.mean(ids == want_ids) >= 0.95
  np.testing.assert_allclose(dist, want_dist, rtol=0, atol=1e-4)


def test_funnel_accepts_a_shortlist(clustered):
  database, queries = clustered
  shortlist = AnnShortlist.build(database, AnnSpec("hnsw", 16))
  approx = funnel.adaptive_retrieve(queries, database, shortlist_dim=16, shortlist_size=200,
                                    k=10, index=shortlist)
  exact = funnel.adaptive_retrieve(queries, database, shortlist_dim=16, shortlist_size=200, k=10)
  assert approx.shape == (60, 10)
  assert recall(approx, exact) > 0.9
  with pytest.raises(ValueError, match="covers 16 dims"):
    funnel.adaptive_retrieve(queries, database, shortlist_dim=8, k=10, index=shortlist)


def test_spec_and_file_errors(clustered, tmp_path):
  database, _ = clustered
  with pytest.raises(IndexQueryError, match="unknown"):
    AnnSpec("lsh", 8)
  with pytest.raises(IndexQueryError, match="cluster_dim"):
    AnnSpec("hnsw", 8, cluster_dim=4)
  with pytest.raises(IndexQueryError, match="cluster_dim=16"):
    AnnSpec("ivf", 8, cluster_dim=16)
  spec = AnnSpec("ivf", 32, cluster_dim=8, ivf_lists=7, seed=3)
  assert AnnSpec.from_dict(spec.to_dict()) == spec
  assert default_ivf_lists(1_000_000) == 4000 and default_ivf_lists(100) == 2
  with pytest.raises(IndexQueryError, match="narrower"):
    AnnShortlist.build(database[:, :8], AnnSpec("hnsw", 16))
  with pytest.raises(IndexNotFoundError):
    AnnShortlist.load(tmp_path / "nowhere")
  AnnShortlist.build(database[:300], AnnSpec("hnsw", 8)).save(tmp_path / "a")
  (tmp_path / "a" / "ann.faiss").write_bytes(b"junk")
  with pytest.raises(IndexFileError, match="ann.faiss is missing or corrupt") as error:
    AnnShortlist.load(tmp_path / "a")
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("spec", [AnnSpec("hnsw", 32, codes="int8"),
                                  AnnSpec("ivf", 32, ivf_lists=30, codes="int8"),
                                  AnnSpec("ivf", 32, cluster_dim=8, ivf_lists=30, codes="int8")])
def test_int8_codes_keep_recall_at_a_quarter_of_the_bytes(clustered, tmp_path, spec):
  database, queries = clustered
  shortlist = AnnShortlist.build(database, spec)
  plain = AnnShortlist.build(database, AnnSpec(**{**spec.to_dict(), "codes": "float32"}))
  assert type(shortlist.index).__name__ == ("IndexHNSWSQ" if spec.kind == "hnsw"
                                            else "IndexIVFScalarQuantizer")
  # The scanned prefix costs 1 byte per dim instead of 4; links / list ids are unchanged.
  assert plain.bytes_per_vector - shortlist.bytes_per_vector == pytest.approx(3 * 32, abs=2)
  truth = exact_ids(queries, database, 32, 10)
  # Every IVF list scanned: only the 8-bit rounding stands between it and exact search.
  ids, dist = shortlist.search(queries, 10, ef_search=128, nprobe=30)
  assert recall(ids, truth) >= 0.9
  reference, _ = knn_search(normalized_prefix(queries, 32), normalized_prefix(database, 32), 10)
  np.testing.assert_allclose(dist, reference, rtol=0, atol=0.01)  # Seen: 0.0033.
  shortlist.save(tmp_path / "ann")
  loaded = AnnShortlist.load(tmp_path / "ann")
  assert loaded.spec == spec and type(loaded.index) is type(shortlist.index)
  np.testing.assert_array_equal(loaded.search(queries, 10, ef_search=128, nprobe=30)[0], ids)
  with pytest.raises(IndexQueryError, match="codes='int4' is unknown"):
    AnnSpec("hnsw", 32, codes="int4")


def test_searches_use_blas_for_batches_and_leave_faiss_global_as_found(clustered):
  from mrl_jax.retrieval.ann import BATCH_BLAS_THRESHOLD, blas_for_batches
  database, queries = clustered
  before = faiss.cvar.distance_compute_blas_threshold
  try:
    faiss.cvar.distance_compute_blas_threshold = 10**6   # A user's own (faiss 1.15: 128,000).
    with blas_for_batches(faiss):
      assert faiss.cvar.distance_compute_blas_threshold == BATCH_BLAS_THRESHOLD
    with pytest.raises(RuntimeError), blas_for_batches(faiss):
      raise RuntimeError("restored on errors too")
    assert faiss.cvar.distance_compute_blas_threshold == 10**6
    faiss.cvar.distance_compute_blas_threshold = 5    # Lower than ours: kept inside the block.
    with blas_for_batches(faiss):
      assert faiss.cvar.distance_compute_blas_threshold == 5
    faiss.cvar.distance_compute_blas_threshold = 10**6
    ivf = AnnShortlist.build(database, AnnSpec("ivf", 32, cluster_dim=8, ivf_lists=40))
    ids, _ = ivf.search(queries, 10, nprobe=40)   # All lists: exact at 32 dims.
    assert faiss.cvar.distance_compute_blas_threshold == 10**6
    assert recall(ids, exact_ids(queries, database, 32, 10)) >= 0.99
  finally:
    faiss.cvar.distance_compute_blas_threshold = before
