"""PrefixStore: stored unit-normalised prefixes and their rerank, against float64 brute force."""

import numpy as np
import pytest

from float32_tolerance import float32_atol
from mrl_jax.evaluation import funnel
from mrl_jax.retrieval.errors import IndexFileError, IndexNotFoundError, IndexQueryError
from mrl_jax.retrieval.prefix_store import (STORE_DTYPES, PrefixStore, _float16_to_float32,
                                           unit_prefix_rows)

WIDTH = 2048


@pytest.fixture(scope="module")
def data():
  """Raw (unnormalised, offset) embeddings, queries and random candidate lists."""
  rng = np.random.default_rng(0)
  scale = (np.arange(WIDTH) + 1.0) ** -0.3        # Leading dims carry more, as in MRL.
  database = (rng.normal(size=(1500, WIDTH)) * scale + 0.05).astype(np.float32)
  queries = (rng.normal(size=(40, WIDTH)) * scale + 0.05).astype(np.float32)
  candidates = np.stack([rng.choice(len(database), 120, replace=False) for _ in queries])
  return database, queries, candidates


def reference_distances(queries, database, candidates, dim):
  """float64 squared L2 between the unit-normalised dim-prefixes, [Q, S]."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(queries[:, :dim].astype(np.float64))
  c = unit(database[:, :dim].astype(np.float64))[candidates]
  return np.square(c - q[:, None, :]).sum(-1)


@pytest.mark.parametrize("dim", [2, 3, 64, WIDTH])
def test_float32_rerank_matches_funnel_rerank_and_float64(data, dim):
  database, queries, candidates = data
  store = PrefixStore.build(database, dim, "float32", block_rows=400)
  ids, dist = store.rerank(queries, candidates, 30)
  np.testing.assert_array_equal(ids, funnel.rerank(queries, database, candidates, dim, 30))
  expected = reference_distances(queries, database, ids, dim)
  assert dist.dtype == np.float32 and ids.dtype == np.int64
  np.testing.assert_allclose(dist, expected, rtol=0, atol=float32_atol(4.0, dim, depth=2))


def quantisation_bound(queries, database, candidates, dim, store):
  """Largest |d(q, x_stored) - d(q, x)| per pair from per-coordinate errors e_j (float64).

  d(q, x + e) - d(q, x) = -2 (q - x).e + ||e||^2, so |.| <= sum_j 2 |q_j - x_j| e_j + e_j^2.
  """
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(queries[:, :dim].astype(np.float64))
  x = unit(database[:, :dim].astype(np.float64))[candidates]      # [Q, S, dim]
  if store.dtype == "int8":
    vmin, vdiff = store.int8_scales
    error = np.broadcast_to(vdiff.astype(np.float64) / 510, x.shape)   # Half of one of 255 steps.
  else:  # float16: half an ulp (2^-11 relative), 2^-25 absolute among subnormals.
    error = np.maximum(np.abs(x) * 2.0 ** -11, 2.0 ** -25)
  return (2 * np.abs(q[:, None, :] - x) * error + error ** 2).sum(-1)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("dim", [3, 64, WIDTH])
def test_quantised_distances_within_their_quantisation_error(data, dtype, dim):
  database, queries, candidates = data
  store = PrefixStore.build(database, dim, dtype)
  ids, dist = store.rerank(queries, candidates, candidates.shape[1])   # All, sorted.
  np.testing.assert_array_equal(np.sort(ids, 1), np.sort(candidates, 1))
  exact = reference_distances(queries, database, ids, dim)
  bound = quantisation_bound(queries, database, ids, dim, store)
  bound += float32_atol(4.0, dim, depth=4)           # The expanded float32 formula.
  assert np.all(np.abs(dist - exact) <= bound)
  # The bound is tight enough to mean something: errors use a visible part of it.
  assert np.abs(dist - exact).max() > 1e-3 * bound.max()


def test_int8_rerank_recovers_the_float64_top10_on_graded_neighbours():
  rng = np.random.default_rng(1)
  queries = rng.normal(size=(20, WIDTH)).astype(np.float32)
  # 200 candidates per query at graded distances (noise from 0.05 to 1.5 of the query's
  # norm), so the top 10 is well defined but not trivially far from the rest.
  noise = np.linspace(0.05, 1.5, 200)[:, None]
  database = np.concatenate([q + noise * rng.normal(size=(200, WIDTH)) for q in queries])
  database = database.astype(np.float32)
  candidates = np.stack([rng.permutation(200) + 200 * i for i in range(len(queries))])
  store = PrefixStore.build(database, WIDTH, "int8")
  ids, _ = store.rerank(queries, candidates, 10)
  exact = reference_distances(queries, database, candidates, WIDTH)
  truth = np.take_along_axis(candidates, np.argsort(exact, 1)[:, :10], 1)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
  assert recall >= 0.95


def test_int8_codes_are_faiss_qt_8bit_codes_and_adds_are_clipped(data):
  faiss = pytest.importorskip("faiss")
  database, _, _ = data
  store = PrefixStore.build(database[:1000], 64, "int8")
  vmin, vdiff = store.int8_scales
  sq = faiss.IndexScalarQuantizer(64, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
  faiss.copy_array_to_vector(np.concatenate([vmin, vdiff]), sq.sq.trained)
  sq.is_trained = True
  extra = database[1000:].copy()
  extra[:5, :64] *= 50.0                         # Prefixes far outside the build's range.
  extra[:5, 1] = -extra[:5, 1]
  store.add(extra)
  unit = unit_prefix_rows(database, 64)                # How the store normalises database rows.
  codes = np.asarray(store._codes)
  np.testing.assert_array_equal(codes[:1000], sq.sa_encode(unit[:1000]))
  assert codes[:1000].min() == 0 and codes[:1000].max() == 255
  clipped = np.clip(unit_prefix_rows(extra, 64), vmin, vmin + vdiff)
  np.testing.assert_array_equal(codes[1000:], sq.sa_encode(clipped))
  np.testing.assert_allclose(store.decoded(), sq.sa_decode(codes), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", STORE_DTYPES)
def test_add_equals_building_on_the_concatenation(data, dtype):
  database, queries, candidates = data
  whole = PrefixStore.build(database, 64, dtype)
  part = PrefixStore.build(database[:700], 64, dtype)
  if dtype == "int8":  # An int8 add reuses the build's scales: compare with those scales.
    whole = PrefixStore.build(database, 64, dtype)
    whole._codec = part._codec
    whole._codes = whole._codec.encode(unit_prefix_rows(database, 64))
    whole._norms_sq = np.einsum("ij,ij->i", whole.decoded(), whole.decoded())
  part.add(database[700:1100])
  part.add(database[1100:])
  assert part.num_vectors == whole.num_vectors == len(database)
  np.testing.assert_array_equal(part.decoded(), whole.decoded())
  for a, b in zip(part.rerank(queries, candidates, 10), whole.rerank(queries, candidates, 10)):
    np.testing.assert_array_equal(a, b)


def test_missing_candidates_ties_and_padding():
  database = np.array([[1, 0], [0, 1], [1, 0], [1, 0.1], [-1, 0]], np.float32)
  store = PrefixStore.build(database, 2)
  queries = np.array([[2, 0], [0, 3]], np.float32)
  candidates = np.array([[-1, 2, 4, 0, 3], [4, -1, -1, 1, 2]])
  ids, dist = store.rerank(queries, candidates, 7)
  # Rows 0 and 2 are the same vector: equal distances, the smaller id first.
  np.testing.assert_array_equal(ids, [[0, 2, 3, 4, -1, -1, -1], [1, 2, 4, -1, -1, -1, -1]])
  assert np.all(np.isinf(dist[ids < 0])) and np.all(np.isfinite(dist[ids >= 0]))
  np.testing.assert_allclose(dist[0, :4], [0, 0, 2 - 2 / np.sqrt(1.01), 4], atol=1e-6)
  with pytest.raises(IndexQueryError, match="past the store"):
    store.rerank(queries, np.array([[5], [0]]), 1)
  with pytest.raises(IndexQueryError, match="at least 2 wide"):
    store.rerank(queries[:, :1], candidates, 1)


@pytest.mark.parametrize("dtype", STORE_DTYPES)
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip_is_bit_identical(data, tmp_path, dtype, mmap):
  database, queries, candidates = data
  store = PrefixStore.build(database, 48, dtype)
  store.save(tmp_path / "store")
  loaded = PrefixStore.load(tmp_path / "store", mmap=mmap)
  assert isinstance(loaded._codes, np.memmap) == mmap
  assert (loaded.dim, loaded.dtype, loaded.num_vectors, loaded.input_dim) == (48, dtype, 1500,
                                                                              WIDTH)
  assert loaded.bytes_per_vector == store.bytes_per_vector
  np.testing.assert_array_equal(np.asarray(loaded._codes), np.asarray(store._codes))
  assert loaded.decoded().tobytes() == store.decoded().tobytes()
  for a, b in zip(loaded.rerank(queries, candidates, 10), store.rerank(queries, candidates, 10)):
    assert a.tobytes() == b.tobytes()
  loaded.add(database[:3])                       # A memory-mapped store still takes adds.
  assert loaded.num_vectors == 1503


def test_load_errors_are_one_line_user_errors(data, tmp_path):
  database, _, _ = data
  with pytest.raises(IndexNotFoundError, match="No prefix store"):
    PrefixStore.load(tmp_path / "nowhere")
  PrefixStore.build(database[:50], 8, "int8").save(tmp_path / "s")
  (tmp_path / "s" / "codes.npy").write_bytes(b"not numpy")
  with pytest.raises(IndexFileError, match="codes.npy is missing or corrupt") as error:
    PrefixStore.load(tmp_path / "s")
  assert "\n" not in str(error.value)
  (tmp_path / "s" / "int8_scales.npy").unlink()
  (tmp_path / "s" / "store.json").write_text("{")
  with pytest.raises(IndexFileError, match="store.json is missing or unreadable"):
    PrefixStore.load(tmp_path / "s")


def test_build_reads_a_memmap_in_blocks(data, tmp_path):
  database, queries, candidates = data
  path = tmp_path / "embeddings.f32"
  mapped = np.memmap(path, np.float32, "w+", shape=database.shape)
  mapped[:] = database
  mapped.flush()
  mapped = np.memmap(path, np.float32, "r", shape=database.shape)
  for dtype in STORE_DTYPES:
    a = PrefixStore.build(mapped, 32, dtype, block_rows=333)
    b = PrefixStore.build(database, 32, dtype)
    assert a.decoded().tobytes() == b.decoded().tobytes()


def test_bytes_per_vector_and_build_errors(data):
  database, _, _ = data
  sizes = {dtype: PrefixStore.build(database, WIDTH, dtype).bytes_per_vector
           for dtype in STORE_DTYPES}
  assert sizes["float32"] == 4 * WIDTH
  assert sizes["float16"] == 2 * WIDTH + 4
  assert sizes["int8"] == pytest.approx(WIDTH + 4 + 8 * WIDTH / len(database))
  assert sizes["int8"] <= sizes["float32"] / 2
  with pytest.raises(IndexQueryError, match="unknown"):
    PrefixStore.build(database, 8, "bfloat16")
  with pytest.raises(IndexQueryError, match="outside"):
    PrefixStore.build(database, WIDTH + 1)
  bad = database[:10].copy()
  bad[3, 2] = np.nan
  with pytest.raises(IndexQueryError, match="NaN"):
    PrefixStore.build(bad, 8, "int8")


@pytest.mark.parametrize("dtype", STORE_DTYPES)
def test_refine_index_chain_gives_the_store_rerank(data, dtype, tmp_path):
  """faiss.IndexRefine(base on a small prefix, store.refine_index()) == shortlist + rerank."""
  faiss = pytest.importorskip("faiss")
  database, queries, _ = data
  store = PrefixStore.build(database, 256, dtype)
  base = faiss.IndexPreTransform(faiss.IndexFlatL2(16))
  base.prepend_transform(faiss.NormalizationTransform(16))
  base.prepend_transform(faiss.RemapDimensionsTransform(WIDTH, 16, False))
  base.add(database)
  refined = faiss.IndexRefine(base, store.refine_index())
  refined.k_factor = 10
  dist, ids = refined.search(queries, 10)
  _, shortlist = base.search(queries, 100)
  want_ids, want_dist = store.rerank(queries, shortlist, 10)
  assert np.mean(ids == want_ids) >= 0.95         # faiss sums in another order: rare swaps.
  np.testing.assert_allclose(dist, want_dist, rtol=0, atol=float32_atol(4.0, 256, depth=4))
  # The store now reads its codes from inside faiss; a rerank is unchanged.
  again_ids, again_dist = store.rerank(queries, shortlist, 10)
  np.testing.assert_array_equal(again_ids, want_ids)
  np.testing.assert_array_equal(again_dist, want_dist)
  store.save(tmp_path / "s")
  assert PrefixStore.load(tmp_path / "s").decoded().tobytes() == store.decoded().tobytes()
  before = store.decoded()
  store.add(database[:5])                        # Leaves faiss: earlier views stay valid.
  assert store.num_vectors == len(database) + 5
  np.testing.assert_array_equal(store.decoded(0, len(database)), before)
  assert store.refine_index().ntotal == len(database) + 5


def test_float16_decoding_is_exact_for_every_finite_half():
  half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
  half = half[np.isfinite(half)]
  assert len(half) == 63488                     # Subnormals, both zeros and normals included.
  decoded = _float16_to_float32(half)
  assert decoded.tobytes() == half.astype(np.float32).tobytes()
