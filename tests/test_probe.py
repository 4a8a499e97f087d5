"""Restoring a checkpoint for inference and probing it at every nesting size."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import subprocess_env
from mrl_jax import inference, train
from mrl_jax.data import pipeline
from mrl_jax.evaluation import probe
from mrl_jax.evaluation.linear_probe import linear_probe_top1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")


@pytest.fixture(scope="module")
def trained_workdir(digits_data_dir, tmp_path_factory):
  """A quickstart model trained for 40 steps on 8 CPU devices (data=4, model=2)."""
  workdir = tmp_path_factory.mktemp("trained")
  subprocess.run(
      [sys.executable, "-m", "mrl_jax.main", f"--config={QUICKSTART}:runlocal",
       f"--workdir={workdir}", f"--config.data.data_dir={digits_data_dir}",
       "--config.total_steps=40", "--config.log_every_steps=40", "--config.mesh.data=4",
       "--config.mesh.model=2", "--config.schedule.warmup_steps=5"],
      check=True, cwd=ROOT, env=subprocess_env(8), timeout=600)
  return str(workdir)


def first_eval_batch(model):
  return next(iter(pipeline.make_eval_batches(model.config.data, global_batch_size=120)))


@pytest.mark.slow
def test_load_restores_an_8_device_checkpoint_on_one_device(trained_workdir):
  model = inference.load(trained_workdir)
  assert model.step == 40 and model.dims == (2, 4, 8, 16, 32, 64)
  images = first_eval_batch(model)["image"][:7]
  z = model.embed(images)
  assert z.shape == (7, 64)
  np.testing.assert_allclose(model.embed(images, dim=8), z[:, :8], rtol=1e-5, atol=1e-6)
  unit = model.embed(images, dim=4, normalize=True)
  nonzero = np.linalg.norm(z[:, :4], axis=1) > 0  # a ReLU prefix can be all zeros: stays 0
  assert nonzero.any()
  np.testing.assert_allclose(np.linalg.norm(unit, axis=1)[nonzero], 1.0, rtol=1e-5)
  np.testing.assert_allclose(unit[nonzero], z[nonzero, :4] / np.linalg.norm(
      z[nonzero, :4], axis=1, keepdims=True), rtol=1e-5)
  logits = model.nested_logits(images)
  assert logits.shape == (6, 7, 10)
  # The same rows whatever the batch they are run in (padding does not leak).
  np.testing.assert_allclose(model.nested_logits(images[:3]), logits[:, :3], rtol=1e-4, atol=1e-4)


def test_load_without_a_checkpoint_names_the_fix(tmp_path):
  with pytest.raises(inference.CheckpointNotFoundError, match="not an mrl_jax workdir"):
    inference.load(str(tmp_path))


@pytest.mark.slow
def test_probe_writes_summary_plots_and_report(trained_workdir):
  summary = probe.run_probe(trained_workdir)
  dims = summary["dims"]
  out = os.path.join(trained_workdir, "probe")
  with open(os.path.join(out, "summary.json")) as f:
    on_disk = json.load(f)
  assert on_disk["dims"] == dims == [2, 4, 8, 16, 32, 64]
  for key in ("linear_top1", "knn1_top1", "knn5_top1", "head_top1", "map@10", "recall@100",
              "svd_knn1_top1", "random_knn1_top1", "svd_linear_top1", "random_linear_top1"):
    assert len(on_disk[key]) == len(dims), key
    assert all(0.0 <= v <= 1.0 for v in on_disk[key]), key
  assert on_disk["num_train"] == 1437 and on_disk["num_test"] == 360
  # The nested head's own top-1 agrees with inference.load's logits.
  assert on_disk["head_top1"][-1] > 0.5
  assert set(on_disk["adaptive_classification"]) >= {"curve", "fixed", "accuracy", "expected_dims"}
  assert {"single_shot_full", "adaptive", "funnel"} <= set(on_disk["funnel_retrieval"])
  for name in ("linear_top1.png", "knn1_top1.png", "map_at_10.png", "cascade.png",
               "retrieval.png", "report.md"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, "report.md")) as f:
    report = f.read()
  assert "| 64 |" in report and "Adaptive classification" in report


@pytest.mark.slow
def test_probe_baseline_truncates_the_other_models_embeddings(trained_workdir):
  """With the run itself as its "baseline", the baseline SVD rows equal the same-run ones."""
  config = inference.load(trained_workdir).config
  config.probe = {"baseline_workdir": trained_workdir, "linear_steps": 20}
  summary = probe.run_probe(trained_workdir, config, log=lambda _: None)
  assert summary["baseline"]["embedding_dim"] == 64 and summary["baseline"]["step"] == 40
  for key in ("svd_knn1_top1", "svd_linear_top1", "svd_map@10"):
    np.testing.assert_allclose(summary["baseline_" + key], summary[key], rtol=1e-6)
  assert len(summary["baseline_random_knn1_top1"]) == 6
  with open(os.path.join(trained_workdir, "probe", "report.md")) as f:
    assert "trained without MRL" in f.read()


@pytest.mark.slow
def test_probe_on_disk_equals_the_in_memory_probe(trained_workdir):
  """Shards + row blocks (max_in_memory_gb=0) give today's summary: k-NN, retrieval and
  funnel metrics exactly (one block: the same normalised vectors and distances), the SVD
  rows up to a few swapped neighbours (streamed_probe: a float64 eigh basis against a
  float32 SVD), the mini-batch linear top-1 within its stated 0.05 (minibatch_linear_probe)."""
  config = inference.load_config(trained_workdir)
  memory = probe.run_probe(trained_workdir, config, log=lambda _: None)
  config.probe = {"max_in_memory_gb": 0.0, "linear_epochs": 30,
                  "baseline_workdir": trained_workdir}
  lines = []
  disk = probe.run_probe(trained_workdir, config, log=lines.append)
  assert any("into shards under " + os.path.join(trained_workdir, "probe", "embeddings") in line
             for line in lines)
  assert not os.path.exists(os.path.join(trained_workdir, "probe", "embeddings", "train"))
  assert disk["linear_probe"]["optimizer"] == "minibatch_adam" and "linear_probe" not in memory
  # One neighbour swapped by the bases' rounding moves a query's top-1, precision@k or AP by
  # at most 1, so a metric averaged over the queries by at most 1 / num_test (one machine's
  # LAPACK swapped one of 9,000 top-25 slots); allow three such queries.
  svd_tolerance = 3 / memory["num_test"]
  compared = 0
  for key, values in memory.items():
    if not (isinstance(values, list) and values and isinstance(values[0], float)):
      continue
    compared += 1
    if key.endswith("linear_top1"):
      assert np.max(np.abs(np.subtract(disk[key], values))) <= 0.05, key
    elif key.startswith(("svd_", "baseline_svd_")):
      assert np.max(np.abs(np.subtract(disk[key], values))) <= svd_tolerance, key
    elif key != "head_top1":
      assert disk[key] == values, key
  assert compared > 50
  # The run as its own baseline: the baseline rows come through the same shards and blocks.
  for key in ("svd_knn1_top1", "svd_map@10", "svd_linear_top1"):
    assert disk["baseline_" + key] == disk[key], key
  for method, result in memory["funnel_retrieval"].items():
    if isinstance(result, dict):
      for key in ("map@10", "precision@10", "recall@10", "top1", "flops", "plan"):
        assert disk["funnel_retrieval"][method][key] == result[key], (method, key)


def test_truncation_rows_leave_sizes_beyond_the_embedding_empty():
  rng = np.random.default_rng(0)
  y = np.arange(40) % 4
  z = rng.normal(size=(40, 8)) + 3 * np.eye(8)[y]
  rows = probe.truncation_rows(z, y, z, y, [2, 8, 16], 4, dict(probe.DEFAULTS), rng,
                               prefixes=("", "random_"))
  assert rows["knn1_top1"][2] is None and rows["random_linear_top1"][2] is None
  assert rows["knn1_top1"][1] == 1.0  # each query finds itself


def test_linear_probe_matches_sklearn_logistic_regression():
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 10)) * 0.7
  y, yt = rng.integers(0, 4, 800), rng.integers(0, 4, 400)
  x, xt = centers[y] + rng.normal(size=(800, 10)), centers[yt] + rng.normal(size=(400, 10))
  ours = linear_probe_top1(x, y, xt, yt, 4, l2=1e-4, steps=100)
  mean, std = x.mean(0), x.std(0)
  reference = LogisticRegression(C=1 / (1e-4 * 800), max_iter=2000).fit((x - mean) / std, y)
  assert ours == pytest.approx(reference.score((xt - mean) / std, yt), abs=0.01)
  assert ours > 0.5  # far above chance (0.25)


def test_svd_basis_is_ordered_by_variance():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(500, 3)) * np.array([0.1, 5.0, 1.0])
  _, basis = probe.svd_basis(z)
  assert np.argmax(np.abs(basis[:, 0])) == 1 and np.argmax(np.abs(basis[:, 1])) == 2


@pytest.mark.slow
def test_embed_workdir_split_gives_the_split_in_order_with_its_labels(trained_workdir):
  """The index's database rows: the train split's embeddings and labels, row i = example i."""
  from mrl_jax.retrieval.workdir_embeddings import embed_workdir_split
  z, labels = embed_workdir_split(trained_workdir, "train", batch_size=100)
  assert z.dtype == np.float32 and z.shape == (1437, 64)
  assert labels.dtype == np.int64 and labels.shape == (1437,)
  # Independent of the batch size and the probe loop: the model run on the split's
  # first examples straight from the pipeline.
  model = inference.load(trained_workdir)
  batch = next(iter(pipeline.make_eval_batches(model.config.data, global_batch_size=50,
                                               split="train")))
  np.testing.assert_array_equal(labels[:50], batch["label"])
  np.testing.assert_allclose(z[:50], model.embed(batch["image"]), rtol=1e-4, atol=1e-5)
  assert np.bincount(labels).min() > 100  # All ten digits, not one class repeated.


def test_embed_workdir_split_refuses_a_text_workdir_with_the_fix(tmp_path):
  from mrl_jax.retrieval import workdir_embeddings
  (tmp_path / "config.json").write_text(json.dumps({"task": "mlm", "data": {"name": "x"}}))
  with pytest.raises(workdir_embeddings.WorkdirEmbeddingError, match="embed_text"):
    workdir_embeddings.embed_workdir_split(str(tmp_path), "train")


def test_retrieval_comparison_runs_compare_retrievals_methods_as_index_plans():
  """Probe mode's funnel_retrieval (an Index's plans) equals funnel.compare_retrieval's."""
  from mrl_jax.evaluation import funnel, probe_settings
  rng = np.random.default_rng(3)
  centres = rng.standard_normal((8, 48))
  train_y, test_y = rng.integers(0, 8, 400), rng.integers(0, 8, 60)
  scale = np.linspace(2.0, 0.3, 48)  # Early coordinates carry more of the class: nested-ish.
  train_z = ((centres[train_y] + rng.standard_normal((400, 48))) * scale).astype(np.float32)
  test_z = ((centres[test_y] + rng.standard_normal((60, 48))) * scale).astype(np.float32)
  settings = probe_settings.check_probe_settings(
      {"funnel_dims": (4, 8, 16, 64), "funnel_shortlists": (300, 100, 40, 20),
       "shortlist_dim": 8, "shortlist_size": 500})
  got = probe.retrieval_comparison(train_z, train_y, test_z, test_y, settings, repeats=1)
  want = funnel.compare_retrieval(test_z, test_y, train_z, train_y, shortlist_dim=8,
                                  shortlist_size=400, funnel_dims=(4, 8, 16, None),
                                  funnel_shortlists=(300, 100, 40, 20))
  json.dumps(got, allow_nan=False)
  for key in ("k", "num_queries", "num_database", "full_dim"):
    assert got[key] == want[key], key
  for method in ("single_shot_full", "adaptive", "funnel"):
    for key, value in want[method].items():
      if key != "seconds":
        assert got[method][key] == value, (method, key)
    assert got[method]["seconds"] > 0 and got[method]["queries_per_s"] > 0
  assert got["funnel"]["plan"] == "funnel:4,8,16,48:300,100,40,20"
  assert got["adaptive"]["plan"] == "adaptive:8:400:48"
  assert got["funnel"]["bytes_per_vector"] == 4 * (4 + 8 + 16 + 48)


@pytest.mark.slow
def test_index_cli_builds_from_a_workdir_and_benches_on_its_test_split(trained_workdir,
                                                                         tmp_path, capsys):
  """`mrl_jax.tools.index build --workdir` / `bench --workdir`: mAP@10 as the probe measures it."""
  from mrl_jax.retrieval.index import Index
  from mrl_jax.retrieval.workdir_embeddings import embed_workdir_split
  from mrl_jax.tools import index as index_cli
  out, bench_json = str(tmp_path / "index"), str(tmp_path / "bench.json")
  index_cli.main(["build", "--workdir", trained_workdir, "--split", "train", "--out", out])
  assert "1437 vectors, 64 dims" in capsys.readouterr().out
  index_cli.main(["bench", "--index", out, "--workdir", trained_workdir, "--split", "test",
                  "--plans", "exact", "adaptive:16:200:64", "--repeats", "1",
                  "--out", bench_json])
  assert "adaptive:16:200:64" in capsys.readouterr().out
  with open(bench_json) as f:
    rows = {row["plan"]: row for row in json.load(f)["rows"]}
  index = Index.load(out)  # Its stored (unit-normalised) train rows and their labels.
  train_z, train_y = index.store(64).decoded(), index.labels
  test_z, test_y = embed_workdir_split(trained_workdir, "test")
  want = probe.knn_metrics(train_z, train_y, test_z, test_y, 10, 5, (10,))["map@10"]
  assert rows["exact"]["metrics"]["map@10"] == pytest.approx(want, abs=0.01)
  assert rows["exact"]["metrics"]["recall_exact@10"] == 1.0


def test_retrieval_comparison_adds_an_ann_shortlist_row_when_asked(tmp_path):
  from mrl_jax.evaluation import probe_settings, report
  rng = np.random.default_rng(4)
  train_z = rng.standard_normal((300, 32)).astype(np.float32)
  test_z = (train_z[:30] + 0.01 * rng.standard_normal((30, 32))).astype(np.float32)
  train_y = np.arange(300) % 5
  settings = probe_settings.check_probe_settings(
      {"funnel_dims": (8, 16), "funnel_shortlists": (100, 50), "shortlist_dim": 16,
       "shortlist_size": 100, "retrieval_ann": "hnsw"})
  got = probe.retrieval_comparison(train_z, train_y, test_z, train_y[:30], settings, repeats=1)
  row = got["adaptive_hnsw"]
  assert row["plan"] == "adaptive:16:100:32@hnsw" and row["mflops"] is None
  # Each query is a slightly moved copy of database row i: found first, at 16 dims too.
  assert row["top1"] == 1.0 and got["adaptive"]["top1"] == 1.0
  json.dumps(got, allow_nan=False)
  report._plot_retrieval(got, str(tmp_path / "retrieval.png"))  # The ANN row is left off.
  assert os.path.getsize(tmp_path / "retrieval.png") > 0
