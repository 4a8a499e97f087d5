"""benchmarks/retrieval.py on tiny databases: its data, exact reference, JSON, protocol, budgets."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import sys
import time

import numpy as np
import pytest

from mrl_jax.evaluation.retrieval import retrieval_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location(
      "retrieval_benchmark", os.path.join(ROOT, "benchmarks", "retrieval.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Its dataclasses look their module up while being defined.
  spec.loader.exec_module(module)
  yield module
  sys.modules.pop(spec.name, None)


def _float64_top10(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
  q = queries.astype(np.float64)
  d = database.astype(np.float64)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  dist = (q * q).sum(1)[:, None] - 2 * q @ d.T + (d * d).sum(1)[None, :]
  return np.argsort(dist, axis=1, kind="stable")[:, :10]


def test_synthetic_database_is_written_in_chunks_and_read_back_in_blocks(bench, tmp_path):
  path = str(tmp_path / "db.npy")
  num, dim = 2 * bench.GENERATE_ROWS + 5, 8
  bench.write_synthetic(path, num, dim, classes=7, decay=0.75, noise=1.5, seed=3)
  stored = np.load(path)
  labels, _ = bench.synthetic_labels(num, 1, 7, 3)
  # Independently: centres * scale, plus each chunk's noise from its own seeded stream.
  scale = (np.arange(dim) + 1.0) ** -0.75
  centres = np.random.default_rng([3, 0]).standard_normal((7, dim), np.float32) * scale
  for i in range(3):
    rows = slice(i * bench.GENERATE_ROWS, (i + 1) * bench.GENERATE_ROWS)
    eps = np.random.default_rng([3, 1, i]).standard_normal((len(labels[rows]), dim), np.float32)
    np.testing.assert_allclose(stored[rows], centres[labels[rows]] + 1.5 * scale * eps,
                               rtol=1e-6, atol=1e-6)
  rows = bench.NpyRows(path, block_rows=1000)
  assert rows.shape == (num, dim)
  blocks = list(rows.blocks(2500))
  assert [start for start, _ in blocks] == [0, 1000, 2000]
  np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), stored[:2500])
  norms = np.linalg.norm(rows.normalized_rows(), axis=1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-6)


def test_benchmark_tiny_run_json_and_exact_reference(bench, tmp_path):
  out_file = tmp_path / "out.json"
  num, dim, nq = 3000, 32, 80
  argv = ["--num_database", str(num), "--dim", str(dim), "--num_queries", str(nq),
          "--classes", "10", "--decay", "0.75", "--noise", "1.0",
          "--scratch", str(tmp_path / "scratch"),
          "--methods", "exact,faiss_flat,faiss_hnsw,faiss_ivf,mrl", "--repeats", "1",
          "--min_time_s", "0",
          "--max_build_s", "0", "--block_rows", "1000",   # HNSW: one block only, a subset
          "--ef_search", "32,128", "--nprobe", "4,16", "--shortlist_dims", "8",
          "--shortlist_sizes", "50,200", "--mrl_stores", "8:float32,16:float32,full:int8",
          "--mrl_ann", "hnsw8=hnsw:8,hnsw8q=hnsw:8:int8", "--out", str(out_file)]
  out = bench.main(argv)
  assert json.loads(out_file.read_text()) == json.loads(json.dumps(out))
  assert (out["num_database"], out["dim"], out["num_queries"]) == (num, dim, nq)
  assert out["num_tuning_queries"] + out["num_reported_queries"] == nq
  methods = out["methods"]
  required = {"family", "queries_per_s", "map@10", "precision@10", "recall_exact@10", "build_s",
              "bytes_per_vector", "mflops_per_query"}
  for name, row in methods.items():
    assert required <= set(row), name
    assert row["family"] in ("exact", "full_dim_ann", "mrl"), name
    assert row["queries_per_s"] > 0 and 0 <= row["recall_exact@10"] <= 1, name
  assert methods["exact"]["recall_exact@10"] == 1.0
  assert methods["exact"]["bytes_per_vector"] == 4 * dim
  assert methods["exact"]["mflops_per_query"] == pytest.approx(num * dim / 1e6)
  assert methods["faiss_flat"]["recall_exact@10"] >= 0.99
  assert {methods[n]["family"] for n in ("faiss_hnsw", "faiss_ivf")} == {"full_dim_ann"}
  # HNSW could not finish within a zero budget: built on the first block, said so, and its
  # recall is against exact search over those same rows.
  hnsw = methods["faiss_hnsw"]
  assert hnsw["subset"] and hnsw["built_rows"] == 1000
  assert hnsw["exact_on_subset"]["recall_exact@10"] == 1.0
  assert not methods["faiss_ivf"]["subset"]
  mrl = [n for n, r in methods.items() if r["family"] == "mrl"]
  assert {"mrl_adaptive_exact8", "mrl_adaptive_hnsw8", "mrl_adaptive_hnsw8q"} <= set(mrl)
  assert "@hnsw8q:ef=" in methods["mrl_adaptive_hnsw8q"]["setting"]["plan"]
  # The int8 graph's 8-dim prefix costs 8 bytes a vector, the float32 one's 32.
  assert (methods["mrl_adaptive_hnsw8"]["bytes_per_vector"]
          - methods["mrl_adaptive_hnsw8q"]["bytes_per_vector"]) == pytest.approx(24, abs=1)
  assert out["best"]["mrl"] in mrl and out["goals"]["best_mrl"] == out["best"]["mrl"]
  # The index's own exact plan is an exact row (int8 full-size codes: near, not equal, ids).
  assert methods["mrl_index_exact"]["family"] == "exact"
  assert methods["mrl_index_exact"]["recall_exact@10"] >= 0.9
  assert out["peak_rss_gb"] > 0
  # The rematch: the MRL families that met the bar, then the best full-size ANN reopened from
  # scratch beside them; its pick is the best MRL plan and its ratio the goal's.
  rematch = out["rematch"]
  assert rematch["best_mrl"] == out["best"]["mrl"] in rematch["contenders"]
  assert rematch["best_full_dim_ann"] == out["best"]["full_dim_ann"]
  assert set(rematch["reported_queries_per_s"]) == {*rematch["contenders"],
                                                    rematch["best_full_dim_ann"]}
  assert out["goals"]["speedup_from_rematch"]
  assert out["goals"]["speedup_vs_best_ann"] == pytest.approx(
      rematch["reported_queries_per_s"][rematch["best_mrl"]]
      / rematch["reported_queries_per_s"][rematch["best_full_dim_ann"]])
  assert not [f for f in os.listdir(tmp_path / "scratch") if f.startswith("rematch_")]
  # The nested shape: exact search on the 8-dim prefix is clearly worse than at full size.
  assert set(out["prefix_exact_reported"]) == {"8", "16"}
  assert out["prefix_exact_reported"]["8"]["map@10"] < 0.9 * methods["exact"]["map@10"]

  # The exact method's mAP@10 on the reported half is a float64 brute force's (up to float32
  # near-ties at the 10th place: at most a swap or two among 40 queries x 10).
  data = np.load(os.path.join(out["database"]["path"]))
  db_labels, q_labels = bench.synthetic_labels(num, nq, 10, 0)
  centres = bench._centres(10, dim, 0.75, 0)
  queries = bench.synthetic_block(centres, q_labels, 1.0, 0.75, 0, 2, 0)
  tune, report = bench._split(nq, 0)
  assert len(np.intersect1d(tune, report)) == 0
  ids = _float64_top10(queries[report], data)
  expected = retrieval_metrics(db_labels[ids], q_labels[report], db_labels, (10,))
  assert methods["exact"]["map@10"] == pytest.approx(expected["map@10"], abs=0.006)
  assert methods["exact"]["precision@10"] == pytest.approx(expected["precision@10"], abs=0.006)


def test_benchmark_user_files_without_labels_report_recall_only(bench, tmp_path):
  rng = np.random.default_rng(0)
  database = rng.standard_normal((1500, 16)).astype(np.float32)
  queries = rng.standard_normal((40, 16)).astype(np.float32)
  np.save(tmp_path / "db.npy", database)
  np.save(tmp_path / "q.npy", queries)
  out = bench.main(["--database", str(tmp_path / "db.npy"), "--queries", str(tmp_path / "q.npy"),
                    "--name", "mine", "--methods", "exact,faiss_flat", "--repeats", "1",
                    "--min_time_s", "0"])
  assert out["name"] == "mine" and out["labels"] is False and out["num_database"] == 1500
  for row in out["methods"].values():
    assert "map@10" not in row and row["tuning"]["metric"] == "recall_exact@10"
  _, report = bench._split(40, 0)
  ids = _float64_top10(queries[report], database)
  assert out["methods"]["exact"]["recall_exact@10"] == 1.0
  assert out["methods"]["faiss_flat"]["recall_exact@10"] >= 0.99
  # The benchmark's own exact top-10 is the float64 one (the reference the others are scored by).
  bench_ids = bench.exact_top_k(bench.normalized(queries[report]),
                                bench.in_memory_blocks(bench.normalized(database), 512), 10)
  assert (bench_ids == ids).mean() >= 0.99


def test_tuner_does_not_pick_a_setting_that_met_the_bar_by_luck(bench):
  # Without labels the metric is recall of exact search's top 10. The fast setting finds all of
  # it on 199 of 200 queries and nothing on one: mean 0.995 clears the 0.99 bar, but by less
  # than 1.645 standard errors of its per-query difference; the slow one returns exact's ids.
  exact_ids = np.arange(200 * 10).reshape(200, 10)
  lucky_ids = exact_ids.copy()
  lucky_ids[7] = -1
  lucky = bench.Candidate({"name": "lucky"}, lambda q: lucky_ids, lambda q: (1.0, 1.0))

  def slow_exact(q):
    time.sleep(0.02)
    return exact_ids

  exact = bench.Candidate({"name": "exact"}, slow_exact, lambda q: (1.0, 1.0))
  queries = np.zeros((200, 4), np.float32)
  picks = {}
  for confidence in (0.5, 0.95):
    tuner = bench.Tuner(queries, None, None, exact_ids, 0.99, 1, 0.0, confidence)
    assert tuner.bar == pytest.approx(0.99)
    picked, row, log_rows = tuner.tune([[lucky], [exact]])
    picks[confidence] = picked.setting["name"]
    lucky_row = log_rows[0]
    assert lucky_row["recall_exact@10"] == pytest.approx(0.995)
    assert row["met_bar"]
  assert picks == {0.5: "lucky", 0.95: "exact"}
  assert log_rows[0]["bar_margin"] == pytest.approx(
      1.6448536 * np.std(np.r_[np.full(199, 0.01), -0.99], ddof=1) / np.sqrt(200), rel=1e-6)
  assert not log_rows[0]["met_bar"] and log_rows[1]["bar_margin"] == 0.0


def test_timed_calls_repeats_then_more_until_min_seconds(bench, monkeypatch):
  calls = []
  clock = (i * 0.01 for i in itertools.count())   # Each perf_counter() call: 10 ms later.
  monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))

  def fn():
    calls.append(1)
    return len(calls)

  out, seconds = bench.timed(fn, 3)   # One warm-up call, then exactly `repeats`.
  assert (out, len(calls), seconds) == (4, 4, pytest.approx(0.01))
  calls.clear()
  bench.timed(fn, 3, min_seconds=0.245)  # 10 ms a call: 25 calls pass 0.245 s.
  assert len(calls) == 1 + 25
  calls.clear()
  bench.timed(fn, 3, min_seconds=100.0, max_calls=40)   # Capped.
  assert len(calls) == 1 + 40


def test_build_budget_rows_from_a_pilot_follow_the_closed_form(bench):
  # Linear part alone: 10 s at 50k rows -> 100 s at 500k; n^1.5 alone: 50k * 10^(2/3).
  assert bench._largest_rows_within(100, 1_000_000, 50_000, [(10, 1.0)]) == pytest.approx(
      500_000, abs=1_000)
  assert bench._largest_rows_within(100, 1_000_000, 50_000, [(10, 1.5)]) == pytest.approx(
      50_000 * 10 ** (2 / 3), abs=1_000)
  both = bench._largest_rows_within(100, 1_000_000, 50_000, [(5, 1.0), (5, 1.5)])
  assert bench._predicted_s([(5, 1.0), (5, 1.5)], both / 50_000) <= 100
  assert bench._predicted_s([(5, 1.0), (5, 1.5)], (both + 2_000) / 50_000) > 100
  assert bench._largest_rows_within(10_000, 1_000_000, 50_000, [(10, 1.5)]) == 1_000_000
  assert bench._largest_rows_within(1, 1_000_000, 50_000, [(10, 1.5)]) == 50_000  # The pilot's.


@pytest.mark.parametrize("method", ["faiss_ivf", "scann"])
def test_pilot_budget_builds_a_subset_or_everything(bench, tmp_path, monkeypatch, method):
  if method == "scann" and not bench.scann_available():
    pytest.skip("ScaNN is optional and does not import here")
  monkeypatch.setattr(bench, "_PILOT_ROWS", 1000)
  rng = np.random.default_rng(1)
  np.save(tmp_path / "db.npy", rng.standard_normal((3000, 16)).astype(np.float32))
  np.save(tmp_path / "q.npy", rng.standard_normal((10, 16)).astype(np.float32))
  args = bench.parse_args(["--database", str(tmp_path / "db.npy"),
                           "--queries", str(tmp_path / "q.npy"), "--max_build_s", "0"])
  db = bench.file_database(args)
  small = bench.BUILDERS[method](db, args, db.num)
  assert small.built_rows == 1000 and "pilot build on 1,000 rows" in small.notes
  assert len(small.chains[0][0].search(db.queries)[0]) == bench.K
  args.max_build_s = 1e9
  assert bench.BUILDERS[method](db, args, db.num).built_rows == 3000
  if method == "scann":  # Its build's memory is capped too: no room left -> the pilot's rows.
    args.max_rss_gb = 0.0
    capped = bench.BUILDERS[method](db, args, db.num)
    assert capped.built_rows == 1000 and "memory: built on 1,000 rows" in capped.notes


@pytest.mark.parametrize("method", ["faiss_hnsw", "faiss_ivf", "scann"])
def test_saved_baseline_reopens_to_the_same_results(bench, tmp_path, method):
  # The rematch times the best full-size ANN reopened from --scratch: it must be the same
  # structure at the same tuned setting, whichever library built it.
  if method == "scann" and not bench.scann_available():
    pytest.skip("ScaNN is optional and does not import here")
  rng = np.random.default_rng(2)
  np.save(tmp_path / "db.npy", rng.standard_normal((3000, 16)).astype(np.float32))
  np.save(tmp_path / "q.npy", rng.standard_normal((20, 16)).astype(np.float32))
  args = bench.parse_args(["--database", str(tmp_path / "db.npy"),
                           "--queries", str(tmp_path / "q.npy"), "--ef_search", "16,64",
                           "--nprobe", "2,8"])
  db = bench.file_database(args)
  built = bench.BUILDERS[method](db, args, db.num)
  candidate = built.chains[0][-1]
  path = str(tmp_path / f"rematch_{method}")
  reopen = built.save(path)
  search, release = reopen(candidate.setting)
  np.testing.assert_array_equal(search(db.queries), candidate.search(db.queries))
  release()
  bench._remove_saved(path)
  assert not os.path.exists(path)


def test_mrl_plans_rerank_at_each_rerank_dim_through_the_stores_between(bench):
  from mrl_jax.retrieval.ann import AnnSpec
  from mrl_jax.retrieval.plans import Adaptive, Funnel
  args = bench.parse_args(["--shortlist_dims", "8", "--shortlist_sizes", "10,50",
                           "--ef_search", "16", "--rerank_dims", "32,full"])
  ann = {"g": AnnSpec("hnsw", 16)}
  families = dict(bench.mrl_plans(64, 1000, [8, 16, 32, 64], ann, args))
  assert set(families) == {"adaptive_exact8", "funnel_exact8", "adaptive_exact8_to32",
                           "funnel_exact8_to32", "adaptive_g", "funnel_g", "adaptive_g_to32"}
  assert families["adaptive_exact8_to32"] == [[Adaptive(8, 10, 32), Adaptive(8, 50, 32)]]
  assert families["funnel_exact8_to32"] == [[Funnel((8, 16, 32), (10, 10)),
                                             Funnel((8, 16, 32), (50, 25))]]
  assert families["funnel_g"][1] == [Funnel((16, 32, 64), (50, 25), shortlist="g",
                                            ef_search=50)]
  # 16 -> 32 has no store between: no funnel_g_to32. A rerank dim that is not stored, or not
  # above the shortlist's, makes no family.
  args = bench.parse_args(["--shortlist_dims", "8", "--shortlist_sizes", "10",
                           "--rerank_dims", "8,24,full"])
  assert set(dict(bench.mrl_plans(64, 1000, [8, 64], {}, args))) == {"adaptive_exact8"}


def test_interleaved_rounds_time_every_contestant_alike(bench, monkeypatch):
  now = [0.0]
  monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
  calls = []

  def contestant(name, seconds):
    def fn():
      calls.append(name)
      now[0] += seconds
    return fn

  # a takes 10 ms a call, b 40 ms: bursts of 3 (one untimed) until both have 0.2 s of timed
  # calls. b has it after 3 rounds (6 timed calls, 0.24 s), a only after 10 (20 calls).
  medians = bench.interleaved({"a": contestant("a", 0.01), "b": contestant("b", 0.04)},
                              repeats=2, min_seconds=0.2, burst=3)
  assert medians == {"a": pytest.approx(0.01), "b": pytest.approx(0.04)}
  # The rounds go on until the slower-to-fill a is done, and every round calls both.
  assert calls.count("a") == calls.count("b") == 3 * 10
  # The order rotates each round; each burst is one contestant's three calls in a row.
  assert calls[:6] == ["a"] * 3 + ["b"] * 3 and calls[6:12] == ["b"] * 3 + ["a"] * 3
