"""`python -m mrl_jax.tools.index build|search|bench`: the vector index from the shell.

Round trips through the real entry point (`main(argv)` in-process), checked against
`Index.search` and a float64 brute-force reference; every input mistake is one
`error:` line naming the file or flag and the fix, with exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import subprocess_env
from mrl_jax.tools import index as index_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, D, Q, CLASSES = 600, 64, 40, 6


def _clustered(rng: np.random.Generator, centres: np.ndarray, n: int):
  labels = rng.integers(0, len(centres), n)
  return (centres[labels] + 0.6 * rng.standard_normal((n, centres.shape[1]))).astype(
      np.float32), labels.astype(np.int64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A labelled clustered database and held-out queries as .npy files, and a built index."""
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((CLASSES, D))
  db, db_labels = _clustered(rng, centres, N)
  queries, query_labels = _clustered(rng, centres, Q)
  root = tmp_path_factory.mktemp("cli")
  paths = {name: str(root / f"{name}.npy") for name in ("db", "labels", "queries", "qlabels")}
  for name, array in zip(paths, (db, db_labels, queries, query_labels)):
    np.save(paths[name], array)
  paths["index"] = str(root / "index")
  index_cli.main(["build", "--embeddings", paths["db"], "--labels", paths["labels"],
                  "--out", paths["index"], "--stores", "16:float32,32:float32,64:float32",
                  "--ann", "hnsw16=hnsw:16"])
  paths["root"] = str(root)
  return paths


def _brute_force(queries: np.ndarray, db: np.ndarray, dim: int) -> np.ndarray:
  """Squared L2 [Q, N] between unit-normalised dim-prefixes, in float64."""
  q = queries[:, :dim].astype(np.float64)
  x = db[:, :dim].astype(np.float64)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def _error_line(capsys, argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    index_cli.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err, err
  return err


def test_build_prints_one_line_and_search_matches_index_and_brute_force(files, tmp_path, capsys):
  from mrl_jax.retrieval.index import Index
  capsys.readouterr()
  out = str(tmp_path / "built")
  assert index_cli.main(["build", "--embeddings", files["db"], "--out", out,
                         "--stores", "16:float32,64:int8"]) == 0
  line = capsys.readouterr().out.strip()
  assert "\n" not in line and f"{N} vectors" in line and f"{D} dims" in line
  assert "bytes/vector" in line

  db, queries = np.load(files["db"]), np.load(files["queries"])
  index = Index.load(files["index"])
  for plan in (None, "exact:16", "adaptive:16:100:64", "funnel:16,32,64:200,50",
               "adaptive:16:100:64@hnsw16:ef=128"):
    ids_path = str(tmp_path / "ids.npy")
    argv = ["search", "--index", files["index"], "--queries", files["queries"], "--k", "10",
            "--out", ids_path] + ([] if plan is None else ["--plan", plan])
    assert index_cli.main(argv) == 0
    assert "queries/s" in capsys.readouterr().out
    ids, distances = np.load(ids_path), np.load(index_cli.distances_path(ids_path))
    assert ids.dtype == np.int64 and distances.dtype == np.float32 and ids.shape == (Q, 10)
    want_ids, want_distances = index.search(queries, 10, plan)
    np.testing.assert_array_equal(ids, want_ids, err_msg=str(plan))
    np.testing.assert_allclose(distances, want_distances, rtol=1e-6, atol=1e-6)
  # Exact full-size search is the float64 brute force (up to float32 error at near-ties).
  ids_path = str(tmp_path / "exact.npy")
  index_cli.main(["search", "--index", files["index"], "--queries", files["queries"],
                  "--k", "10", "--out", ids_path])
  ids, distances = np.load(ids_path), np.load(index_cli.distances_path(ids_path))
  reference = _brute_force(queries, db, D)
  tolerance = 8 * np.finfo(np.float32).eps * 4  # squared distances of unit vectors are <= 4
  kth = np.sort(reference, axis=1)[:, 9]
  np.testing.assert_allclose(distances, np.take_along_axis(reference, ids, 1), atol=tolerance)
  assert (np.take_along_axis(reference, ids, 1).max(1) <= kth + tolerance).all()


def test_bench_prints_a_table_saves_calibration_and_target_plans_use_it(files, tmp_path,
                                                                         capsys):
  capsys.readouterr()
  out_json = str(tmp_path / "bench.json")
  plans = ["exact", "exact:16", "adaptive:16:100:64"]
  assert index_cli.main(["bench", "--index", files["index"], "--queries", files["queries"],
                         "--query_labels", files["qlabels"], "--plans", *plans,
                         "--repeats", "1", "--out", out_json]) == 0
  table = capsys.readouterr().out
  for plan in plans:
    assert plan in table
  assert "queries/s" in table and "map@10" in table
  with open(out_json) as f:
    saved = json.load(f)
  assert saved["num_queries"] == Q and len(saved["rows"]) >= len(plans)
  # The calibration went into the index: a fresh load resolves a target plan.
  ids_path = str(tmp_path / "target.npy")
  assert index_cli.main(["search", "--index", files["index"], "--queries", files["queries"],
                         "--k", "10", "--plan", "target:map@10:0.5", "--out", ids_path]) == 0
  assert "plan target:map@10:0.5 = " in capsys.readouterr().out  # Names the plan it chose.
  assert np.load(ids_path).shape == (Q, 10)


def test_input_mistakes_are_one_line_naming_the_file_and_the_fix(files, tmp_path, capsys):
  capsys.readouterr()
  out = str(tmp_path / "never")
  missing = str(tmp_path / "missing.npy")
  assert "does not exist" in _error_line(capsys, ["build", "--embeddings", missing, "--out", out])
  as_float64 = str(tmp_path / "f64.npy")
  np.save(as_float64, np.load(files["db"]).astype(np.float64))
  err = _error_line(capsys, ["build", "--embeddings", as_float64, "--out", out])
  assert as_float64 in err and "float64" in err and "astype(np.float32)" in err
  flat = str(tmp_path / "flat.npy")
  np.save(flat, np.zeros(10, np.float32))
  assert "[N, d]" in _error_line(capsys, ["build", "--embeddings", flat, "--out", out])
  not_npy = str(tmp_path / "text.npy")
  with open(not_npy, "w") as f:
    f.write("hello")
  assert "not a readable .npy" in _error_line(capsys, ["build", "--embeddings", not_npy,
                                                       "--out", out])
  short_labels = str(tmp_path / "short_labels.npy")
  np.save(short_labels, np.zeros(N - 1, np.int64))
  err = _error_line(capsys, ["build", "--embeddings", files["db"], "--labels", short_labels,
                             "--out", out])
  assert f"{N - 1} rows" in err and f"{N} vectors" in err
  assert "DIM:DTYPE" in _error_line(capsys, ["build", "--embeddings", files["db"], "--out", out,
                                             "--stores", "16:float8"])
  assert "NAME=KIND:DIM" in _error_line(capsys, ["build", "--embeddings", files["db"],
                                                 "--out", out, "--ann", "hnsw16=pq:16"])
  assert "cluster_dim is for kind='ivf'" in _error_line(
      capsys, ["build", "--embeddings", files["db"], "--out", out, "--ann", "h=hnsw:16:cluster=8"])
  assert "one of the two" in _error_line(capsys, ["build", "--out", out])
  assert not os.path.exists(out)

  narrow = str(tmp_path / "narrow.npy")
  np.save(narrow, np.zeros((3, D // 2), np.float32))
  ids = str(tmp_path / "ids.npy")
  err = _error_line(capsys, ["search", "--index", files["index"], "--queries", narrow,
                             "--out", ids])
  assert narrow in err and f"{D // 2} columns" in err
  assert "Plan" in _error_line(capsys, ["search", "--index", files["index"], "--queries",
                                        files["queries"], "--plan", "adaptive:16", "--out", ids])
  _error_line(capsys, ["search", "--index", str(tmp_path / "no_index"), "--queries",
                       files["queries"], "--out", ids])
  float_labels = str(tmp_path / "float_labels.npy")
  np.save(float_labels, np.zeros(Q, np.float32))
  err = _error_line(capsys, ["bench", "--index", files["index"], "--queries", files["queries"],
                             "--query_labels", float_labels])
  assert "not integers" in err
  assert not os.path.exists(ids)


def test_stores_and_ann_flags_parse_to_the_library_specs():
  from mrl_jax.retrieval.ann import AnnSpec
  assert index_cli.parse_stores("16:float32, 2048:int8,64") == {
      16: "float32", 2048: "int8", 64: "float32"}
  assert index_cli.parse_ann(["hnsw16=hnsw:16:neighbours=16", "adanns=ivf:64:cluster=16:lists=1024"
                              ",flat=ivf:32", "q=hnsw:256:codes=int8"]) == {
      "hnsw16": AnnSpec(kind="hnsw", dim=16, hnsw_neighbours=16),
      "adanns": AnnSpec(kind="ivf", dim=64, cluster_dim=16, ivf_lists=1024),
      "flat": AnnSpec(kind="ivf", dim=32), "q": AnnSpec(kind="hnsw", dim=256, codes="int8")}
  with pytest.raises(index_cli.ArgumentError, match="codes='int4' is unknown"):
    index_cli.parse_ann(["q=hnsw:256:codes=int4"])


def test_help_runs_as_a_module():
  result = subprocess.run([sys.executable, "-m", "mrl_jax.tools.index", "--help"],
                          capture_output=True, text=True, cwd=ROOT, env=subprocess_env(),
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert "build" in result.stdout and "search" in result.stdout and "bench" in result.stdout
