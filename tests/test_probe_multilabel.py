"""Probing a model trained on a multi-label corpus: label-set metrics on the corpus, and
single-label k-NN / linear probe on `config.probe.data` (configs/vit_jft.py:runlocal)."""

import os

import numpy as np
import pytest

from mrl_jax import inference, train
from mrl_jax.data import pipeline
from mrl_jax.evaluation import multilabel, probe
from mrl_jax.evaluation.linear_probe import linear_probe_scores
from test_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_JFT = os.path.join(ROOT, "configs", "vit_jft.py")


def test_mean_average_precision_matches_sklearn():
  from sklearn.metrics import average_precision_score
  rng = np.random.default_rng(0)
  labels = (rng.random((60, 7)) < 0.3).astype(np.int32)
  labels[0, :] = 1  # every label has a positive
  labels[:, 6] = 0  # ... but this one: left out of the mean
  scores = rng.normal(size=(60, 7)) + 1.5 * labels
  reference = np.mean([average_precision_score(labels[:, c], scores[:, c]) for c in range(6)])
  assert multilabel.mean_average_precision(scores, labels) == pytest.approx(reference, rel=1e-12)


def test_precision_at_1_of_head_and_neighbours_match_a_loop():
  rng = np.random.default_rng(1)
  labels = (rng.random((50, 5)) < 0.4).astype(np.int32)
  scores = rng.normal(size=(50, 5))
  neighbours = (rng.random((50, 5)) < 0.4).astype(np.int32)
  head = np.mean([labels[i, int(np.argmax(scores[i]))] == 1 for i in range(50)])
  knn = np.mean([bool(set(np.flatnonzero(labels[i])) & set(np.flatnonzero(neighbours[i])))
                 for i in range(50)])
  assert multilabel.head_precision_at_1(scores, labels) == head
  assert multilabel.neighbour_precision_at_1(labels, neighbours) == knn


def test_one_vs_rest_linear_probe_ranks_like_sklearn_logistic_regression():
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(2)
  labels = (rng.random((600, 4)) < 0.35).astype(np.int32)
  labels_t = (rng.random((300, 4)) < 0.35).astype(np.int32)
  directions = rng.normal(size=(4, 12))
  x = labels @ directions + rng.normal(size=(600, 12))
  xt = labels_t @ directions + rng.normal(size=(300, 12))
  ours = multilabel.mean_average_precision(
      linear_probe_scores(x, labels, xt, l2=1e-3, steps=200), labels_t)
  mean, std = x.mean(0), x.std(0)
  # Mean-over-examples loss + l2/2 |w|^2 per label == sklearn's C = 1 / (l2 N).
  reference = np.stack([LogisticRegression(C=1 / (1e-3 * 600), max_iter=2000).fit(
      (x - mean) / std, labels[:, c]).decision_function((xt - mean) / std) for c in range(4)], 1)
  assert ours == pytest.approx(multilabel.mean_average_precision(reference, labels_t), abs=0.01)
  assert ours > 0.6  # far above the 0.35 of random scores


@pytest.fixture(scope="module")
def multilabel_run(digits_data_dir, tmp_path_factory):
  """configs/vit_jft.py:runlocal (tiny ViT, sigmoid head, mrl_demo_corpus) after 4 steps."""
  workdir = str(tmp_path_factory.mktemp("multilabel"))
  config = load_config(VIT_JFT, "runlocal")
  config.data.data_dir = digits_data_dir
  config.evaluators = {}  # The probe is under test, not the periodic evaluator.
  config.total_steps = 4
  config.checkpoint_every_steps = 4
  config.nesting.dims = (24, 192)  # Two sizes keep the probe's compiles few.
  train.train_and_evaluate(config, workdir)
  return workdir, config


def _embed(model, data_cfg, split):
  zs, logits, labels = [], [], []
  # The probe's batch size (256): the same compiled shapes give the same numbers.
  for batch in pipeline.make_eval_batches(data_cfg, global_batch_size=256, split=split):
    keep = batch["mask"] > 0
    z, lg = model.embed_and_logits(batch["image"][keep])
    zs.append(z), logits.append(lg), labels.append(batch["label"][keep])
  return np.concatenate(zs), np.concatenate(logits, 1), np.concatenate(labels)


@pytest.mark.slow
def test_probe_of_a_multilabel_model_reports_label_set_metrics(multilabel_run):
  workdir, config = multilabel_run
  config.probe.linear_steps = 10
  config.probe.funnel_dims = (24, 48)
  config.probe.funnel_shortlists = (100, 20)
  summary = probe.run_probe(workdir, config, log=lambda _: None,
                            overrides={"data.data_dir": config.data.data_dir,
                                       "probe.linear_steps": 10})
  dims = summary["dims"]
  assert dims == [24, 192]
  assert summary["multilabel"]["dataset"] == "mrl_demo_corpus"
  assert (summary["multilabel"]["num_train"], summary["multilabel"]["num_test"]) == (512, 128)
  assert "head_top1" not in summary and "adaptive_classification" not in summary

  # Naive references on independently computed embeddings and logits.
  model = inference.load(workdir)
  assert model.batch_size == 256 == config.probe.batch_size
  train_z, _, train_y = _embed(model, config.data, "train")
  test_z, test_logits, test_y = _embed(model, config.data, "validation")
  assert train_y.shape == (512, 10) and test_y.shape == (128, 10)
  from sklearn.metrics import average_precision_score
  for i, m in enumerate(dims):
    head_p1 = np.mean([test_y[n, np.argmax(test_logits[i, n])] == 1 for n in range(128)])
    assert summary["multilabel_head_precision@1"][i] == pytest.approx(head_p1, abs=1e-12)
    present = [c for c in range(10) if test_y[:, c].any()]
    head_map = np.mean([average_precision_score(test_y[:, c], test_logits[i, :, c])
                        for c in present])
    assert summary["multilabel_head_map"][i] == pytest.approx(head_map, abs=1e-9)
    # 1-NN in float64 (cosine = L2 on unit vectors); near-ties may go either way in float32.
    q = test_z[:, :m].astype(np.float64)
    d = train_z[:, :m].astype(np.float64)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    dist = ((q[:, None] - d[None]) ** 2).sum(-1)
    order = np.argsort(dist, axis=1)
    shares = (test_y & train_y[order[:, 0]]).any(1)
    gap = np.take_along_axis(dist, order[:, 1:2], 1)[:, 0] - dist[np.arange(128), order[:, 0]]
    ambiguous = int(np.sum(gap < 1e-4))
    assert abs(summary["multilabel_knn_precision@1"][i] - shares.mean()) <= ambiguous / 128 + 1e-9
    assert 0.0 <= summary["multilabel_linear_map"][i] <= 1.0

  # The single-label metrics ran on config.probe.data (the digits) at every size.
  assert summary["single_label_dataset"] == "mrl_digits"
  assert (summary["num_train"], summary["num_test"]) == (1437, 360)
  for key in ("knn1_top1", "linear_top1", "map@10", "svd_knn1_top1"):
    assert len(summary[key]) == len(dims) and all(0.0 <= v <= 1.0 for v in summary[key]), key
  assert summary["knn1_top1"][-1] > 0.15  # digits, far above chance (0.1) even after 4 steps
  with open(os.path.join(workdir, "probe", "report.md")) as f:
    report = f.read()
  assert "multi-label corpus `mrl_demo_corpus`" in report and "head mAP" in report
  assert "of `mrl_digits`" in report


def test_report_of_a_multilabel_probe_without_single_label_data(tmp_path):
  """Only the corpus' label-set metrics (no config.probe.data): one table, no single-label rows."""
  from mrl_jax.evaluation.report import write_report
  summary = {"dims": [8, 16], "head": "mrl", "step": 4,
             "multilabel": {"dataset": "jft_like", "num_train": 50, "num_test": 20,
                            "num_classes": 7},
             "multilabel_head_precision@1": [0.5, 0.75], "multilabel_head_map": [0.25, 0.5],
             "multilabel_knn_precision@1": [0.6, 0.7], "multilabel_linear_map": [0.3, 0.4]}
  write_report(summary, str(tmp_path))
  report = (tmp_path / "report.md").read_text()
  assert "| 16 | 75.00 | 50.00 | 70.00 | 40.00 |" in report
  assert "linear" in report and "Adaptive classification" not in report


def test_probe_data_looks_for_its_files_where_the_training_data_lives():
  config = load_config(VIT_JFT, "runlocal")
  config.data.data_dir = "/corpus_dir"
  settings = probe.probe_settings(config)
  assert (settings["data"].name, settings["data"].data_dir) == ("mrl_digits", "/corpus_dir")
  assert (settings["train_split"], settings["test_split"]) == ("train", "test")
  config.probe.test_split = "test[:50]"
  assert probe.probe_settings(config)["test_split"] == "test[:50]"
