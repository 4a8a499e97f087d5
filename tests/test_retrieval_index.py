"""The vector index: parity with the exact funnel functions and float64, plans, calibration,
files."""

import json
import os
import shutil
import statistics

import numpy as np
import pytest

from float32_tolerance import float32_atol
from mrl_jax.errors import UserError
from mrl_jax.evaluation import funnel
from mrl_jax.retrieval import calibration, index as index_module
from mrl_jax.retrieval.errors import IndexFileError, IndexNotFoundError, IndexQueryError
from mrl_jax.retrieval.index import Index
from mrl_jax.retrieval.plans import Adaptive, Exact, Funnel, Target, plan_name

D = 64
DIMS = (8, 16, 32, 64)


def nested_data(n=2000, q=40, d=D, classes=10, seed=0):
  """Clustered data whose leading dims carry most of the signal (as an MRL embedding)."""
  rng = np.random.default_rng(seed)
  scale = (np.arange(d) + 1.0) ** -0.5
  centres = rng.normal(size=(classes, d)) * scale * 3
  db_labels, q_labels = rng.integers(0, classes, n), rng.integers(0, classes, q)
  noise = lambda m: rng.normal(size=(m, d)) * scale
  return ((centres[db_labels] + noise(n)).astype(np.float32),
          (centres[q_labels] + noise(q)).astype(np.float32), db_labels, q_labels)


@pytest.fixture(scope="module")
def data():
  return nested_data()


@pytest.fixture(scope="module")
def f32_index(data):
  database, _, labels, _ = data
  return Index.build(database, stores={d: "float32" for d in DIMS}, labels=labels)


def float64_distances(queries, database, dim, ids):
  """Squared L2 between the float64 unit-normalised prefixes of each query and its ids."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(queries[:, :dim].astype(np.float64))
  c = unit(database[:, :dim].astype(np.float64)[ids])
  return np.square(c - q[:, None, :]).sum(-1)


def one_line_error(fn, match, cls=IndexQueryError):
  with pytest.raises(cls, match=match) as info:
    fn()
  assert isinstance(info.value, UserError) and "\n" not in str(info.value)


# --- Parity -----------------------------------------------------------------------------------

def test_exact_plans_equal_single_shot_and_float64(data, f32_index):
  database, queries, _, _ = data
  for dim in (None, 16):  # Both sides of knn.DIRECT_MAX_DIM (32).
    plan = Exact(dim)
    ids, dist = f32_index.search(queries, 10, plan)
    assert ids.dtype == np.int64 and dist.dtype == np.float32 and ids.shape == (40, 10)
    np.testing.assert_array_equal(ids, funnel.single_shot(queries, database, dim, 10))
    ref = float64_distances(queries, database, dim or D, ids)
    np.testing.assert_allclose(dist, ref, rtol=0, atol=float32_atol(4.0, dim or D))
  # None and the plan text mean the same as Exact().
  np.testing.assert_array_equal(f32_index.search(queries, 10)[0],
                                f32_index.search(queries, 10, "exact")[0])


@pytest.mark.parametrize("dims,shortlists", [((8, 64), (200,)), ((16, 32, None), (300, 50)),
                                             ((8, 16, 32, 64), (400, 100, 25, 10)), ((32,), (20,))])
def test_exact_shortlist_funnels_equal_funnel_retrieve(data, f32_index, dims, shortlists):
  database, queries, _, _ = data
  ids, dist = f32_index.search(queries, 10, Funnel(dims, shortlists))
  np.testing.assert_array_equal(
      ids, funnel.funnel_retrieve(queries, database, dims=dims, shortlists=shortlists, k=10))
  last = dims[-1] or D
  ref = float64_distances(queries, database, last, ids)
  np.testing.assert_allclose(dist, ref, rtol=0, atol=float32_atol(4.0, last))
  assert np.all(np.diff(dist, axis=1) >= 0)


def test_adaptive_equals_adaptive_retrieve(data, f32_index):
  database, queries, _, _ = data
  ids, _ = f32_index.search(queries, 25, "adaptive:16:200:64")
  np.testing.assert_array_equal(ids, funnel.adaptive_retrieve(
      queries, database, shortlist_dim=16, rerank_dim=64, shortlist_size=200, k=25))
  np.testing.assert_array_equal(ids, f32_index.search(queries, 25, Adaptive(16, 200))[0])


def test_any_number_of_queries(data, f32_index, monkeypatch):
  database, _, _, _ = data
  rng = np.random.default_rng(1)
  many = rng.normal(size=(400, D)).astype(np.float32)
  monkeypatch.setattr(index_module, "_QUERY_BLOCK_CANDIDATES", 200 * 100)  # Blocks of 200 queries.
  ids, _ = f32_index.search(many, 5, "adaptive:8:100:64")
  np.testing.assert_array_equal(ids, funnel.adaptive_retrieve(
      many, database, shortlist_dim=8, rerank_dim=64, shortlist_size=100, k=5))
  ids, dist = f32_index.search(many[:0], 5, "adaptive:8:100:64")
  assert ids.shape == dist.shape == (0, 5)


def test_blocked_exact_scan_equals_one_scan(data, monkeypatch):
  database, queries, _, _ = data
  index = Index.build(database, stores={16: "float32", 64: "int8"})
  one = {d: index.search(queries, 10, Exact(d)) for d in (16, 64)}
  # Force row blocks of 300 vectors (the last block is shorter than k would allow at 2000).
  monkeypatch.setattr(index_module, "_single_scan_limit", lambda: 0)
  monkeypatch.setattr(index_module, "_SCAN_BLOCK_BYTES", 300 * 4 * 16)
  blocked16 = Index.build(database, stores={16: "float32"}).search(queries, 10, Exact(16))
  np.testing.assert_array_equal(blocked16[0], one[16][0])
  np.testing.assert_allclose(blocked16[1], one[16][1], rtol=0, atol=float32_atol(4.0, 16))
  monkeypatch.setattr(index_module, "_SCAN_BLOCK_BYTES", 300 * 4 * 64)
  blocked64 = Index.build(database, stores={16: "float32", 64: "int8"}).search(queries, 10, Exact())
  np.testing.assert_array_equal(blocked64[0], one[64][0])


def test_quantised_stores_rank_like_float32(data, f32_index):
  database, queries, _, _ = data
  ref_ids, ref_dist = f32_index.search(queries, 10, "adaptive:16:200:64")
  for dtype, tol in (("float16", 2e-3), ("int8", 0.05)):
    index = Index.build(database, stores={16: "float32", 64: dtype})
    ids, dist = index.search(queries, 10, "adaptive:16:200:64")
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids)])
    assert overlap > 0.9, (dtype, overlap)
    # Same candidates reranked on decoded vectors: distances move by the coding error only.
    np.testing.assert_allclose(np.sort(dist, 1), np.sort(ref_dist, 1), rtol=0, atol=tol * 4)
    assert index.bytes_per_vector("exact") < f32_index.bytes_per_vector("exact")


# --- Add ------------------------------------------------------------------------------------

def test_add_equals_building_on_everything(data, f32_index):
  database, queries, labels, _ = data
  grown = Index.build(database[:1200], stores={d: "float32" for d in DIMS}, labels=labels[:1200])
  grown.search(queries, 10, "exact:16")  # A cached scan must not survive the add.
  grown.add(database[1200:], labels=labels[1200:])
  assert grown.num_vectors == 2000
  np.testing.assert_array_equal(grown.labels, labels)
  for plan in ("exact", "exact:16", "funnel:8,16,64:300,50"):
    np.testing.assert_array_equal(grown.search(queries, 10, plan)[0],
                                  f32_index.search(queries, 10, plan)[0])
  assert repr(grown) == ("Index(2000 x 64, stores {8: float32, 16: float32, 32: float32, "
                         "64: float32}, ann [], labels True, 0 calibrated plans)")
  one_line_error(lambda: grown.store(12), "no 12-dim prefix")
  one_line_error(lambda: grown.shortlist("hnsw8"), "no ANN 'hnsw8' \\(built: none\\)")
  one_line_error(lambda: grown.add(database[:3]), "pass labels")
  one_line_error(lambda: Index.build(database[:10]).add(database[:3], labels=[0, 1, 2]),
                 "without labels")
  one_line_error(lambda: grown.add(database[:3, :32], labels=[0, 1, 2]), "32 dims")


# --- Errors ---------------------------------------------------------------------------------

def test_search_errors_are_one_line(data, f32_index):
  database, queries, _, _ = data
  bad = queries.copy()
  bad[3, 5] = np.nan
  cases = [
      (lambda: f32_index.search(queries[0], 10), "2-D array.*x\\[None\\]"),
      (lambda: f32_index.search(queries[:, :32], 10),
       "queries have 32 dims but the index was built on 64-dim embeddings"),
      (lambda: f32_index.search(bad, 10), "query 3 has NaN/inf values"),
      (lambda: f32_index.search(queries, 0), "k=0 is outside \\[1, 2000\\]"),
      (lambda: f32_index.search(queries, 2001), "outside \\[1, 2000\\]"),
      (lambda: f32_index.search(queries, True), "outside"),
      (lambda: f32_index.search(queries, 10, "adaptive:12:200:64"),
       "uses 12 dims but the index stores \\[8, 16, 32, 64\\]: rebuild with stores="
       "\\{8: ..., 12: ..., 16: ..., 32: ..., 64: ...\\}"),
      (lambda: f32_index.search(queries, 10, "adaptive:16:200:64@hnsw16"),
       "ANN 'hnsw16', which this index does not have \\(built: none\\)"),
      (lambda: f32_index.search(queries, 10, "funnel:16,64:200,5"),
       "k=10 is more than plan .* keeps in its last stage \\(5\\)"),
      (lambda: f32_index.search(queries, 10, "adaptive:16:3000:64"),
       "shortlists 3000 candidates but the index holds 2000"),
      (lambda: f32_index.search(queries, 10, "exact:128"), "uses 128 dims but the embeddings"),
      (lambda: f32_index.search(queries, 10, "nearest"), "not understood"),
      (lambda: f32_index.search(queries, 10, "target:map@10:0.01"), "needs a calibrated index"),
  ]
  for fn, match in cases:
    one_line_error(fn, match)


def test_build_errors_are_one_line(data):
  database, _, labels, _ = data
  one_line_error(lambda: Index.build(database, stores={128: "float32"}), "outside|in \\[1, 64\\]")
  one_line_error(lambda: Index.build(database, stores={16: "bfloat16"}), "dtype 'bfloat16'")
  one_line_error(lambda: Index.build(database, stores={}), "stores is empty")
  one_line_error(lambda: Index.build(database, labels=labels[:5]), "labels must be 2000")
  one_line_error(lambda: Index.build(database[:0]), "at least one row")
  bad = database[:50].copy()
  bad[7, 0] = np.inf
  one_line_error(lambda: Index.build(bad), "embedding 7 has NaN/inf")


# --- ANN shortlists -------------------------------------------------------------------------

def test_ann_shortlist_plans(data):
  pytest.importorskip("faiss")
  from mrl_jax.retrieval.ann import AnnSpec
  database, queries, _, _ = data
  index = Index.build(database, stores={16: "float32", 64: "float32"},
                      ann={"hnsw16": AnnSpec("hnsw", 16)})
  exact_ids, _ = index.search(queries, 10, "adaptive:16:200:64")
  for plan in ("adaptive:16:200:64@hnsw16", "adaptive:16:200:64@hnsw16:ef=400"):
    ids, dist = index.search(queries, 10, plan)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
    assert overlap > 0.9, (plan, overlap)
    ref = float64_distances(queries, database, 64, ids)
    np.testing.assert_allclose(dist, ref, rtol=0, atol=float32_atol(4.0, 64))
  one_line_error(lambda: index.search(queries, 10, "adaptive:32:200:64@hnsw16"),
                 "shortlists at 32 dims but ANN 'hnsw16' covers 16")
  one_line_error(lambda: index.search(queries, 10, "adaptive:16:200:32@hnsw16"),
                 "uses 32 dims but the index stores \\[16, 64\\]")
  assert index.bytes_per_vector("adaptive:16:200:64@hnsw16") == pytest.approx(
      index.shortlist("hnsw16").bytes_per_vector + index.store(64).bytes_per_vector)


# --- Calibration ----------------------------------------------------------------------------

def test_calibrate_table_and_target(data, f32_index):
  _, queries, _, query_labels = data
  plans = ["exact:16", "adaptive:8:100:64", "adaptive:8:400:64", "funnel:8,16,64:400,50"]
  table = f32_index.calibrate(queries, query_labels=query_labels, k=10, plans=plans, repeats=1)
  assert [row["plan"] for row in table] == ["exact"] + plans  # Exact full size comes first.
  exact_row = table[0]
  assert exact_row["metrics"]["recall_exact@10"] == 1.0
  assert exact_row["mflops_per_query"] == 2000 * 64 / 1e6
  per_query = {}  # plan -> {metric: per-query values}, computed here from the ids.
  exact_ids = f32_index.search(queries, 10, "exact")[0]
  for row in table:
    ids, _ = f32_index.search(queries, 10, row["plan"])
    labels = f32_index.labels[ids]
    hits = (labels == query_labels[:, None])
    precision = (np.cumsum(hits, 1) / np.arange(1, 11))
    per_query[row["plan"]] = {
        "map@10": (precision * hits).sum(1) / 10,
        "recall_exact@10": np.array([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])}
    assert row["metrics"]["map@10"] == pytest.approx(per_query[row["plan"]]["map@10"].mean())
    assert row["metrics"]["precision@10"] == pytest.approx(hits.mean())
    assert row["queries_per_s"] > 0 and row["num_queries"] == 40
    assert row["bytes_per_vector"] == f32_index.bytes_per_vector(row["plan"])
    for metric, values in per_query[row["plan"]].items():
      covariance = np.cov(values, per_query["exact"][metric])
      assert row["spread"][metric] == pytest.approx(
          {"variance": covariance[0, 0], "covariance_with_exact": covariance[0, 1],
           "reference_variance": covariance[1, 1]}, abs=1e-12)
  assert f32_index.calibration == table
  # The same queries give the same table apart from timings.
  again = f32_index.calibrate(queries, query_labels=query_labels, k=10, plans=plans, repeats=1)
  timings = ("queries_per_s", "seconds")
  strip = lambda t: [{k: v for k, v in r.items() if k not in timings} for r in t]
  assert strip(again) == strip(table)
  json.dumps(table)
  # Target: the fastest row whose metric is within `within` of exact full size's, by a margin
  # of z(confidence) standard errors of its per-query difference from ratio x exact's.
  for metric, within, confidence in (("map@10", 0.01, 0.95), ("recall_exact@10", 0.2, 0.95),
                                     ("recall_exact@10", 0.2, 0.5), ("map@10", 0.05, 0.99)):
    ratio = 1 - within
    z = statistics.NormalDist().inv_cdf(confidence)

    def meets(r):
      if r["plan"] == "exact":
        return True
      differences = per_query[r["plan"]][metric] - ratio * per_query["exact"][metric]
      margin = z * differences.std(ddof=1) / np.sqrt(len(differences))
      return r["metrics"][metric] - margin >= ratio * exact_row["metrics"][metric]

    best = max((r for r in again if meets(r)), key=lambda r: r["queries_per_s"])
    target = Target(metric, within, confidence)
    assert plan_name(f32_index.resolve_plan(target)) == best["plan"]
    np.testing.assert_array_equal(f32_index.search(queries, 10, target)[0],
                                  f32_index.search(queries, 10, best["plan"])[0])


def test_resolve_target_on_a_hand_table():
  row = lambda plan, qps, m: {"plan": plan, "queries_per_s": qps, "mflops_per_query": 1.0,
                              "metrics": {"map@10": m}}
  table = [row("exact", 10.0, 0.50), row("adaptive:16:200:64", 500.0, 0.494),
           row("adaptive:16:50:64", 900.0, 0.40), row("exact:16", 300.0, 0.499)]
  resolve = lambda within: plan_name(calibration.resolve_target(Target("map@10", within, 0.5),
                                                                table))
  assert resolve(0.02) == "adaptive:16:200:64"
  assert resolve(0.003) == "exact:16"
  assert resolve(0.0) == "exact"
  assert resolve(0.5) == "adaptive:16:50:64"
  one_line_error(lambda: calibration.resolve_target(Target("map@25", 0.01), table),
                 "map@25 was not calibrated")
  one_line_error(lambda: calibration.resolve_target(Target(), table[1:]), "no exact full-size row")
  # A table without per-query spreads (an older calibration) cannot give a margin.
  one_line_error(lambda: calibration.resolve_target(Target("map@10", 0.02), table),
                 "calibrate again, or ask for confidence 0.5")


def test_resolve_target_with_confidence_passes_over_a_plan_that_met_the_bar_by_luck():
  def row(plan, qps, m, variance, covariance):
    return {"plan": plan, "queries_per_s": qps, "mflops_per_query": 1.0, "num_queries": 100,
            "metrics": {"map@10": m},
            "spread": {"map@10": {"variance": variance, "covariance_with_exact": covariance,
                                  "reference_variance": 0.04}}}
  # Bar 0.99 x 0.5 = 0.495. The fast plan clears it by 0.002 with a per-query difference of
  # standard deviation 0.173 (standard error 0.0173); the slow one by 0.004 with 0.002.
  table = [row("exact", 10.0, 0.50, 0.04, 0.04), row("adaptive:16:50:64", 900.0, 0.497, 0.05, 0.03),
           row("exact:16", 300.0, 0.499, 0.04, 0.04)]
  resolve = lambda confidence: plan_name(calibration.resolve_target(
      Target("map@10", 0.01, confidence), table))
  assert resolve(0.5) == "adaptive:16:50:64"
  assert resolve(0.95) == "exact:16"
  assert Target("map@10", 0.01) == Target("map@10", 0.01, 0.95)  # The default confidence.
  # At 99.99% the slow plan's margin is still only 3.72 x 0.0002 = 0.0007: it stays the pick.
  assert resolve(0.9999) == "exact:16"


def test_confidence_margin_is_z_standard_errors_of_the_paired_difference():
  values, reference = np.array([1.0, 0.5, 1.0, 0.0]), np.array([1.0, 1.0, 0.8, 0.6])
  differences = values - 0.99 * reference
  standard_error = np.sqrt(((differences - differences.mean()) ** 2).sum() / 3) / 2
  spread = calibration.paired_spread(values, reference)
  assert calibration.confidence_margin(spread, 4, 0.99, 0.95) == pytest.approx(
      1.6448536 * standard_error, rel=1e-6)
  assert calibration.confidence_margin(spread, 4, 0.99, 0.5) == 0.0
  assert calibration.confidence_margin(spread, 1, 0.99, 0.95) == 0.0
  # Identical per-query results (a plan returning exact search's ids) need no margin at all.
  assert calibration.confidence_margin(calibration.paired_spread(reference, reference), 4, 1.0,
                                       0.99) == pytest.approx(0.0, abs=1e-7)
  for bad in (0.4, 1.0):
    with pytest.raises(ValueError, match=r"must be in \[0.5, 1\)"):
      calibration.confidence_margin(spread, 4, 0.99, bad)
  with pytest.raises(ValueError, match="paired"):
    calibration.paired_spread(values, reference[:3])


def test_confidence_margin_passes_a_plan_exactly_at_the_bar_at_the_stated_rate():
  # Plans whose true mean is exactly the bar (0.99 x the reference's): drawn on 300 queries,
  # the bare comparison of means passes half of them, the 95% margin about 5%.
  rng = np.random.default_rng(0)
  passed = {0.5: 0, 0.95: 0}
  trials, queries = 2000, 300
  for _ in range(trials):
    reference = rng.uniform(0.3, 1.0, queries)
    # The plan loses a uniform share of each query's metric, on average 1%.
    values = reference * (1.0 - rng.uniform(0.0, 0.02, queries))
    bar = 0.99 * reference.mean()
    for confidence in passed:
      margin = calibration.confidence_margin(calibration.paired_spread(values, reference),
                                             queries, 0.99, confidence)
      passed[confidence] += values.mean() - margin >= bar
  assert 0.45 < passed[0.5] / trials < 0.55
  assert 0.03 < passed[0.95] / trials < 0.07


def test_default_plan_grid():
  plans = [plan_name(p) for p in calibration.default_plans(2048, [16, 64, 2048], {"hnsw16": 16},
                                                          1_000_000, 10)]
  assert plans[:3] == ["exact", "exact:64", "exact:16"]
  assert "adaptive:16:200:2048" in plans and "adaptive:64:1600:2048" in plans
  assert "funnel:16,64,2048:400,100" in plans and "adaptive:16:50:64@hnsw16" in plans
  assert "funnel:16,64,2048:1600,400@hnsw16" in plans
  assert len(plans) == len(set(plans)) == 3 + 6 * 3 + 6 * 1 + 6 * 3
  # Shortlist sizes stay within [k, N].
  small = [plan_name(p) for p in calibration.default_plans(64, [8, 64], {}, 300, 60)]
  assert small == ["exact", "exact:8", "adaptive:8:100:64", "adaptive:8:200:64"]


def test_calibrate_errors(data, f32_index):
  database, queries, _, query_labels = data
  unlabelled = Index.build(database, stores={16: "float32", 64: "float32"})
  one_line_error(lambda: unlabelled.calibrate(queries, query_labels=query_labels),
                 "index has no labels")
  unlabelled.calibrate(queries[:5], k=5, plans=["adaptive:16:50:64"], repeats=1)
  one_line_error(lambda: unlabelled.search(queries, 5, "target:map@5:0.01"),
                 "map@5 was not calibrated")
  one_line_error(lambda: f32_index.calibrate(queries, query_labels=query_labels[:3]),
                 "query_labels must be 40")
  one_line_error(lambda: Index.build(database, stores={16: "float32"}).calibrate(queries),
                 "stores only \\[16\\]")


# --- Files ----------------------------------------------------------------------------------

def test_save_load_round_trip(data, tmp_path):
  database, queries, labels, query_labels = data
  pytest.importorskip("faiss")
  from mrl_jax.retrieval.ann import AnnSpec
  index = Index.build(database, stores={8: "float32", 16: "int8", 64: "float16"}, labels=labels,
                      ann={"hnsw8": AnnSpec("hnsw", 8)})
  index.calibrate(queries, query_labels=query_labels, k=10, plans=["adaptive:8:100:64"],
                  repeats=1)
  path = str(tmp_path / "idx")
  index.save(path)
  assert sorted(os.listdir(path)) == ["ann", "labels.npy", "manifest.json", "stores"]
  for mmap in (True, False):
    loaded = Index.load(path, mmap=mmap)
    assert (loaded.dim, loaded.num_vectors, loaded.store_dims) == (64, 2000, [8, 16, 64])
    assert [loaded.store(d).dtype for d in (8, 16, 64)] == ["float32", "int8", "float16"]
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.calibration == json.loads(json.dumps(index.calibration))
    assert loaded.bytes_per_vector() == index.bytes_per_vector()
    assert loaded.ann_names == ["hnsw8"] and loaded.shortlist("hnsw8").spec == AnnSpec("hnsw", 8)
    for plan in ("exact", "exact:16", "funnel:8,16,64:300,50", "target:recall_exact@10:0.5",
                 "funnel:8,16,64:300,50@hnsw8"):
      for got, want in zip(loaded.search(queries, 10, plan), index.search(queries, 10, plan)):
        np.testing.assert_array_equal(got, want)
  # Saving over an index (even the memory-mapped one it was loaded from) replaces it whole.
  loaded = Index.load(path)
  loaded.add(database[:7], labels=labels[:7])
  loaded.save(path)
  again = Index.load(path)
  assert again.num_vectors == 2007
  np.testing.assert_array_equal(again.search(queries, 10, "exact")[0],
                                loaded.search(queries, 10, "exact")[0])
  Index.build(database, stores={32: "float32"}).save(path)
  assert Index.load(path).store_dims == [32] and Index.load(path).ann_names == []
  assert sorted(os.listdir(path)) == ["manifest.json", "stores"]
  assert sorted(os.listdir(path + "/stores")) == ["dim32"]
  assert sorted(os.listdir(tmp_path)) == ["idx"]  # No temporary directories left behind.


def test_unreadable_index_directories(data, tmp_path):
  database, _, labels, _ = data
  one_line_error(lambda: Index.load(str(tmp_path / "missing")), "No index at", IndexNotFoundError)
  (tmp_path / "empty").mkdir()
  one_line_error(lambda: Index.load(str(tmp_path / "empty")), "not an index", IndexFileError)
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("mine")
  one_line_error(lambda: Index.build(database[:50]).save(str(tmp_path / "notes")),
                 "exists and is not an index", IndexFileError)
  assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
  path = tmp_path / "idx"
  small = Index.build(database[:50], stores={8: "float32", 64: "int8"}, labels=labels[:50])
  small.save(str(path))
  manifest = json.loads((path / "manifest.json").read_text())

  def broken(edit):
    small.save(str(path))
    edit()
    return lambda: Index.load(str(path))

  one_line_error(broken(lambda: (path / "manifest.json").write_text("{not json")), "unreadable",
                 IndexFileError)
  one_line_error(broken(lambda: (path / "manifest.json").write_text(
      json.dumps({**manifest, "format_version": 99}))), "version 99", IndexFileError)
  one_line_error(broken(lambda: (path / "manifest.json").write_text(
      json.dumps({**manifest, "format": "other"}))), "not an mrl_jax index", IndexFileError)
  one_line_error(broken(lambda: (path / "manifest.json").write_text(
      json.dumps({k: v for k, v in manifest.items() if k != "stores"}))), "incomplete",
      IndexFileError)
  one_line_error(broken(lambda: (path / "manifest.json").write_text(
      json.dumps({**manifest, "num_vectors": 51}))), "manifest says 51", IndexFileError)
  one_line_error(broken(lambda: os.remove(path / "stores" / "dim64" / "codes.npy")),
                 "dim64/codes.npy is missing", IndexFileError)
  one_line_error(broken(lambda: shutil.rmtree(path / "stores" / "dim8")),
                 "store stores/dim8 is unreadable", IndexFileError)
  one_line_error(broken(lambda: os.remove(path / "labels.npy")), "labels.npy is unreadable",
                 IndexFileError)


def test_from_workdir_builds_on_the_split_embeddings_and_labels(data, monkeypatch):
  from mrl_jax.retrieval import workdir_embeddings
  database, queries, labels, _ = data
  calls = []

  def fake_embed(workdir, split, *, data_dir=None, batch_size=256):
    calls.append((workdir, split, data_dir, batch_size))
    return database, labels

  monkeypatch.setattr(workdir_embeddings, "embed_workdir_split", fake_embed)
  index = Index.from_workdir("/w", split="train", data_dir="/d", batch_size=64,
                             stores={16: "float32", 64: "float32"})
  assert calls == [("/w", "train", "/d", 64)]
  assert index.store_dims == [16, 64]
  np.testing.assert_array_equal(index.labels, labels)
  np.testing.assert_array_equal(index.search(queries, 5)[0], funnel.single_shot(queries, database,
                                                                               None, 5))


def test_package_re_exports():
  import mrl_jax.retrieval as retrieval
  assert retrieval.Index is Index and retrieval.Target is Target
  assert retrieval.parse_plan("exact:16") == Exact(16)
  with pytest.raises(AttributeError):
    retrieval.no_such_name  # noqa: B018


def test_faiss_refine_chain_gives_the_numpy_rerank_ids(data):
  pytest.importorskip("faiss")
  from mrl_jax.retrieval.ann import AnnSpec
  database, queries, _, _ = data
  index = Index.build(database, stores={8: "float32", 16: "float32", 32: "int8", 64: "float32"},
                      ann={"hnsw8": AnnSpec("hnsw", 8), "ivf8": AnnSpec("ivf", 8, ivf_lists=40)})

  def both(plan, k):
    index.faiss_refine = True
    chained = index.search(queries, k, plan)
    index.faiss_refine = False
    stepwise = index.search(queries, k, plan)
    return chained, stepwise

  # float32 stores: faiss sums the same squared differences, so the ids are equal.
  for plan in ("adaptive:8:200:64@hnsw8:ef=300", "funnel:8,16,64:300,60@hnsw8",
               "funnel:8,16,64:400,100,20@ivf8:nprobe=4"):
    (ids, dist), (ref_ids, ref_dist) = both(plan, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dist, ref_dist, rtol=0, atol=float32_atol(4.0, 64))
  # One IVF list per query: most of the 500 asked for are missing (-1 at +inf, last), alike.
  (ids, dist), (ref_ids, ref_dist) = both("funnel:8,16:500,300@ivf8:nprobe=1", 300)
  assert 0 < (ref_ids < 0).sum() and np.isinf(ref_dist[ref_ids < 0]).all()
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(np.isinf(dist), np.isinf(ref_dist))
  # An int8 stage: the same codes; only quantised near-ties may order differently.
  (ids, dist), (ref_ids, ref_dist) = both("funnel:8,32,64:300,100@hnsw8", 10)
  assert np.mean(ids == ref_ids) > 0.99
  # add() rebuilds the chain over the grown stores.
  index.faiss_refine = True
  index.add(database[:5] * 1.01)
  ids, _ = index.search(queries, 10, "adaptive:8:400:64@hnsw8:ef=400")
  index.faiss_refine = False
  np.testing.assert_array_equal(ids, index.search(queries, 10, "adaptive:8:400:64@hnsw8:ef=400")[0])


def test_faiss_refine_chain_on_a_full_width_int8_store(data):
  """An int8 store at the queries' full width as the chain's last stage: the same results as
  the numpy rerank, for queries at any scale (each stage normalises its own prefix)."""
  pytest.importorskip("faiss")
  from mrl_jax.retrieval.ann import AnnSpec
  database, queries, _, _ = data
  index = Index.build(database, stores={16: "float32", 64: "int8"},
                      ann={"hnsw8": AnnSpec("hnsw", 8)})
  for plan in ("adaptive:8:200:64@hnsw8:ef=300", "funnel:8,16,64:300,60@hnsw8"):
    index.faiss_refine = False
    ref_ids, ref_dist = index.search(queries, 10, plan)
    index.faiss_refine = True
    for scale in (1.0, 7.5):
      ids, dist = index.search(queries * np.float32(scale), 10, plan)
      # The same int8 codes decoded by faiss and by numpy: only quantised near-ties may swap.
      assert np.mean(ids == ref_ids) > 0.99
      same = ids == ref_ids
      np.testing.assert_allclose(dist[same], ref_dist[same], rtol=0,
                                 atol=float32_atol(4.0, 64))


def test_calibrate_default_grid_follows_what_is_built(data):
  database, queries, _, _ = data
  index = Index.build(database[:300], stores={8: "float32", 64: "float32"})
  table = index.calibrate(queries[:5], k=5, repeats=1)
  assert [row["plan"] for row in table] == ["exact", "exact:8", "adaptive:8:50:64",
                                            "adaptive:8:100:64", "adaptive:8:200:64"]
  assert all(set(row["metrics"]) == {"recall_exact@5"} for row in table)
  assert table[-1]["metrics"]["recall_exact@5"] >= table[2]["metrics"]["recall_exact@5"]
