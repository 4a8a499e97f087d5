"""Adaptive classification cascade and adaptive / funnel retrieval against closed forms."""

import json

import numpy as np
import pytest

from mrl_jax.evaluation import adaptive, funnel


# --- Cascade -------------------------------------------------------------------------------

def hand_probs():
  """3 sizes, 4 examples, 3 classes; rows are (size, example)."""
  return np.array([
      # size 0
      [[0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.5, 0.4, 0.1], [0.2, 0.6, 0.2]],
      # size 1
      [[0.1, 0.8, 0.1], [0.1, 0.15, 0.75], [0.3, 0.6, 0.1], [0.9, 0.05, 0.05]],
      # size 2
      [[0.1, 0.1, 0.8], [0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.1, 0.1, 0.8]],
  ])


def test_cascade_hand_built():
  # Thresholds 0.6, 0.7: ex0 stops at 0 (0.8), ex1 at 1 (0.5 < 0.6, 0.75 >= 0.7),
  # ex2 at 2 (0.5, 0.6 both short), ex3 at 0 (0.6 >= 0.6, ties accept).
  preds, size = adaptive.cascade(hand_probs(), [0.6, 0.7, 0.99])
  np.testing.assert_array_equal(size, [0, 1, 2, 0])
  np.testing.assert_array_equal(preds, [0, 2, 2, 1])
  assert adaptive.expected_dims(size, [8, 16, 32]) == pytest.approx((8 + 16 + 32 + 8) / 4)
  # The last threshold may be left out.
  preds2, size2 = adaptive.cascade(hand_probs(), [0.6, 0.7])
  np.testing.assert_array_equal(size2, size)
  np.testing.assert_array_equal(preds2, preds)


def test_cascade_extreme_thresholds():
  probs = adaptive.softmax(np.random.default_rng(0).normal(size=(4, 50, 6)))
  preds, size = adaptive.cascade(probs, [0.0] * 4)
  np.testing.assert_array_equal(size, 0)
  np.testing.assert_array_equal(preds, probs[0].argmax(-1))
  assert adaptive.expected_dims(size, [8, 16, 32, 64]) == 8.0
  preds, size = adaptive.cascade(probs, [1.5, 1.5, 1.5, 1.5])
  np.testing.assert_array_equal(size, 3)
  np.testing.assert_array_equal(preds, probs[3].argmax(-1))
  assert adaptive.expected_dims(size, [8, 16, 32, 64]) == 64.0
  with pytest.raises(ValueError, match="thresholds"):
    adaptive.cascade(probs, [0.5])


def easy_hard_logits(num=2000, classes=10, dims=(8, 16, 32, 64), seed=0, noise=0.1):
  """Easy examples: every size confident and right. Hard: small sizes unsure and wrong,
  only the largest size right (and confident). A few impossible: every size unsure, wrong."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, num)
  kind = rng.choice(3, size=num, p=[0.6, 0.35, 0.05])  # 0 easy, 1 hard, 2 impossible
  wrong = (labels + 1 + rng.integers(0, classes - 1, num)) % classes
  logits = rng.normal(scale=noise, size=(len(dims), num, classes))
  rows = np.arange(num)
  for i in range(len(dims)):
    right_here = (kind == 0) | ((kind == 1) & (i == len(dims) - 1))
    target = np.where(right_here, labels, wrong)
    logits[i, rows, target] += np.where(right_here, 8.0, 1.0)
  return logits, labels, kind


def test_search_thresholds_closed_form():
  logits, labels, kind = easy_hard_logits()
  dims = [8, 16, 32, 64]
  probs = adaptive.softmax(logits)
  full_acc = float(np.mean(probs[-1].argmax(-1) == labels))
  t = adaptive.search_thresholds(probs, labels, dims, target_accuracy=full_acc)
  # The smallest size takes everything confident (the easy examples) and nothing else;
  # middle sizes are useless and take nothing; the last size accepts the rest.
  preds, size = adaptive.cascade(probs, t)
  assert np.mean(preds == labels) >= full_acc
  np.testing.assert_array_equal(size, np.where(kind == 0, 0, 3))
  assert t[3] == 0.0
  # Deterministic, and an unreachable target falls back to the best accuracy found.
  assert adaptive.search_thresholds(probs, labels, dims, target_accuracy=full_acc) == t
  t_hi = adaptive.search_thresholds(probs, labels, dims, target_accuracy=1.1)
  assert np.mean(adaptive.cascade(probs, t_hi)[0] == labels) == pytest.approx(full_acc)
  # A target of 0 sends everything to the smallest size.
  t0 = adaptive.search_thresholds(probs, labels, dims, target_accuracy=0.0)
  assert t0[0] == 0.0 and np.all(adaptive.cascade(probs, t0)[1] == 0)


def test_adaptive_classification_saves_dims():
  # Noise-free logits: every easy example has one confidence, every hard one another, so
  # the held-out thresholds transfer exactly and the reported numbers have a closed form.
  logits, labels, kind = easy_hard_logits(noise=0.0)
  dims = [8, 16, 32, 64]
  result = adaptive.adaptive_classification(logits, labels, dims, holdout_fraction=0.5, seed=3)
  json.dumps(result, allow_nan=False)
  rest = np.sort(np.random.default_rng(3).permutation(len(labels))[1000:])
  easy = np.mean(kind[rest] == 0)
  full = result["fixed"][-1]["accuracy"]
  assert full == pytest.approx(np.mean(kind[rest] < 2))
  assert [f["dim"] for f in result["fixed"]] == dims
  assert result["accuracy"] == pytest.approx(full)
  assert result["expected_dims"] == pytest.approx(8 * easy + 64 * (1 - easy))
  assert result["expected_dims"] < 0.5 * dims[-1]
  assert result["x_smaller_at_equal_accuracy"] == pytest.approx(64 / (8 * easy + 64 * (1 - easy)))
  assert result["num_holdout"] + result["num_reported"] == len(labels)
  # Curve: one point per distinct held-out fixed accuracy, sorted by target.
  targets = [p["target"] for p in result["curve"]]
  assert targets == sorted(targets) and len(targets) >= 2
  costs = [p["expected_dims"] for p in result["curve"]]
  assert all(dims[0] <= c <= dims[-1] for c in costs)
  # The reported numbers are the cascade's on the reported part.
  probs = adaptive.softmax(logits)[:, rest]
  for p in result["curve"]:
    preds, size = adaptive.cascade(probs, p["thresholds"])
    assert p["accuracy"] == pytest.approx(np.mean(preds == labels[rest]))
    assert p["expected_dims"] == pytest.approx(adaptive.expected_dims(size, dims))
  # Same seed, same answer; explicit targets are honoured.
  again = adaptive.adaptive_classification(logits, labels, dims, holdout_fraction=0.5, seed=3)
  assert again == result
  custom = adaptive.adaptive_classification(logits, labels, dims, seed=3, targets=[0.2])
  assert [p["target"] for p in custom["curve"]] == [0.2]
  assert custom["curve"][0]["expected_dims"] == 8.0


def test_x_smaller_none_when_never_reached():
  # A negative tolerance of 0.5 asks for 50 points above the full size: nothing qualifies.
  logits, labels, _ = easy_hard_logits(num=200)
  result = adaptive.adaptive_classification(logits, labels, [8, 16, 32, 64],
                                            equal_accuracy_tolerance=-0.5)
  assert result["x_smaller_at_equal_accuracy"] is None


def naive_pairwise_thresholds(probs, labels):
  """The official notebook's loop: per pair (i, i+1), the smallest t of the best accuracy."""
  conf, pred = probs.max(-1), probs.argmax(-1)
  out = []
  for i in range(len(probs) - 1):
    best_t, best_right = None, -1
    for t in list(adaptive.OFFICIAL_GRID) + [adaptive.NEVER]:
      right = 0
      for n in range(len(labels)):
        right += int((pred[i, n] if conf[i, n] >= t else pred[i + 1, n]) == labels[n])
      if right > best_right:
        best_t, best_right = float(t), right
    out.append(best_t)
  return out + [0.0]


def test_pairwise_search_matches_the_notebook_loop():
  logits, labels, _ = easy_hard_logits(num=300, noise=1.5, seed=4)
  probs = adaptive.softmax(logits)
  got = adaptive.search_thresholds(probs, labels, [8, 16, 32, 64], method="pairwise")
  assert got == naive_pairwise_thresholds(probs, labels)
  assert len(set(got[:-1])) > 1  # the data gives the pairs different thresholds


@pytest.mark.parametrize("method", ["greedy", "pairwise"])
def test_every_split_searches_on_its_held_out_part_and_reports_the_rest(method):
  """The protocol redone from public pieces: thresholds from the held-out part only."""
  logits, labels, _ = easy_hard_logits(num=400, noise=1.5, seed=5)
  dims, probs = [8, 16, 32, 64], adaptive.softmax(logits)
  result = adaptive.adaptive_classification(logits, labels, dims, seed=2, num_splits=6,
                                            method=method)
  json.dumps(result, allow_nan=False)
  splits = adaptive.holdout_splits(len(labels), 0.5, 2, 6)
  # Split 0 is today's single split.
  np.testing.assert_array_equal(splits[0][0],
                                np.sort(np.random.default_rng(2).permutation(400)[:200]))
  honest, leaky = [], []
  for hold, rest in splits:
    assert len(hold) == 200 and not set(hold) & set(rest) and len(set(hold) | set(rest)) == 400
    numbers = []
    for fit in (hold, rest):  # rest: the leak this test must catch
      if method == "greedy":
        target = float(np.mean(probs[-1, hold].argmax(-1) == labels[hold]))
        t = adaptive.search_thresholds(probs[:, fit], labels[fit], dims, target_accuracy=target)
      else:
        t = adaptive.search_thresholds(probs[:, fit], labels[fit], dims, method="pairwise")
      preds, size = adaptive.cascade(probs[:, rest], t)
      numbers.append((float(np.mean(preds == labels[rest])), adaptive.expected_dims(size, dims)))
    honest.append(numbers[0])
    leaky.append(numbers[1])
  assert honest != leaky  # the data tells the two apart
  assert (result["accuracy"], result["expected_dims"]) == pytest.approx(honest[0])
  stats = result["over_splits"]
  for i, field in enumerate(("accuracy", "expected_dims")):
    values = np.array([h[i] for h in honest])
    assert stats[field]["mean"] == pytest.approx(values.mean())
    assert stats[field]["std"] == pytest.approx(values.std())
    assert (stats[field]["min"], stats[field]["max"]) == pytest.approx((values.min(), values.max()))
    assert stats[field]["count"] == 6
  assert result["num_splits"] == 6 and result["method"] == method
  if method == "pairwise":
    assert [p["max_dim"] for p in result["curve"]] == dims[1:]
    assert [p["max_dim"] for p in stats["curve"]] == dims[1:]
  else:
    assert [p["matched_dim"] for p in stats["curve"]] == dims


def test_adaptive_rejects_unknown_methods_and_pairwise_targets():
  logits, labels, _ = easy_hard_logits(num=100)
  with pytest.raises(ValueError, match="method"):
    adaptive.adaptive_classification(logits, labels, [8, 16, 32, 64], method="exhaustive")
  with pytest.raises(ValueError, match="targets"):
    adaptive.adaptive_classification(logits, labels, [8, 16, 32, 64], method="pairwise",
                                     targets=[0.5])


# --- Retrieval -----------------------------------------------------------------------------

def random_embeddings(num_db=300, num_q=40, d=32, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_q, d)).astype(np.float32),
          rng.normal(size=(num_db, d)).astype(np.float32))


def test_full_dims_everywhere_equals_single_shot():
  queries, database = random_embeddings()
  exact = funnel.single_shot(queries, database, None, k=10)
  got = funnel.adaptive_retrieve(queries, database, shortlist_dim=None, rerank_dim=None,
                                 shortlist_size=100, k=10)
  np.testing.assert_array_equal(got, exact)
  got = funnel.funnel_retrieve(queries, database, dims=(None, None, None),
                               shortlists=(100, 30), k=10)
  np.testing.assert_array_equal(got, exact)


def test_whole_database_shortlist_equals_single_shot_at_rerank_dim():
  queries, database = random_embeddings()
  exact = funnel.single_shot(queries, database, 24, k=10)
  got = funnel.adaptive_retrieve(queries, database, shortlist_dim=4, rerank_dim=24,
                                 shortlist_size=len(database), k=10)
  np.testing.assert_array_equal(got, exact)
  exact_full = funnel.single_shot(queries, database, None, k=10)
  got = funnel.funnel_retrieve(queries, database, dims=(4, 8, None),
                               shortlists=(len(database), len(database), 10), k=10)
  np.testing.assert_array_equal(got, exact_full)


def test_rerank_blocks_and_ties():
  queries, database = random_embeddings(num_db=50, num_q=7, d=8)
  database[10] = database[3]  # An exact duplicate: the tie goes to the smaller id.
  cand = np.tile(np.arange(50)[::-1], (7, 1))
  small = funnel.rerank(queries, database, cand, 8, 20, block_elements=1)
  big = funnel.rerank(queries, database, cand, 8, 20)
  np.testing.assert_array_equal(small, big)
  np.testing.assert_array_equal(big, funnel.single_shot(queries, database, 8, k=20))


def test_tiny_prefix_rankings_match_float64():
  """At a 2-dim prefix the neighbours sit ~1e-4 apart on the circle (squared distances
  ~1e-8): the old expanded ||q||^2 - 2 q.c + ||c||^2 (error ~2e-7) reordered them."""
  rng = np.random.default_rng(7)
  x = np.zeros((700, 6))
  x[:, 0] = 1.0
  x[:, 1] = rng.normal(scale=3e-2, size=700)
  x[:, 2:] = rng.normal(size=(700, 4))                       # beyond the prefix
  x[:, :2] *= rng.uniform(0.5, 2.0, size=(700, 1))           # prefix norms vary
  x = x.astype(np.float32)
  queries, database = x[:100], x[100:]
  unit = lambda v: v[:, :2] / np.linalg.norm(v[:, :2].astype(np.float64), axis=1, keepdims=True)
  dist = ((unit(queries)[:, None] - unit(database)[None]) ** 2).sum(-1)
  top = np.sort(dist, axis=1)[:, :6]
  # Float32 normalisation moves each point by ~eps32, a squared distance D by about
  # 4 * sqrt(D) * eps32: keep queries whose gaps are 100x that.
  bound = 4 * np.sqrt(top[:, 1:]) * np.finfo(np.float32).eps
  keep = np.all(np.diff(top, axis=1) > 100 * bound, axis=1)
  assert keep.sum() >= 20
  expected = np.argsort(dist, axis=1, kind="stable")[:, :5]
  everything = np.tile(np.arange(len(database))[::-1], (len(queries), 1))
  for got in (funnel.single_shot(queries, database, 2, k=5),
              funnel.rerank(queries, database, everything, 2, 5),
              funnel.funnel_retrieve(queries, database, dims=(4, 2), shortlists=(600,), k=5)):
    np.testing.assert_array_equal(got[keep], expected[keep])


def test_bad_plans_raise():
  queries, database = random_embeddings(num_db=30)
  with pytest.raises(ValueError, match="last stage"):
    funnel.funnel_retrieve(queries, database, dims=(4, None), shortlists=(20, 5), k=10)
  with pytest.raises(ValueError, match="non-increasing"):
    funnel.funnel_retrieve(queries, database, dims=(4, 8, None), shortlists=(10, 20), k=5)
  with pytest.raises(ValueError, match="database size"):
    funnel.adaptive_retrieve(queries, database, shortlist_size=31, k=5)
  with pytest.raises(ValueError, match="embedding size"):
    funnel.single_shot(queries, database, 64)


def nested_data(num_classes=10, per_class_db=40, per_class_q=10, d=64, coarse=8, seed=0):
  """Class centres live in the first `coarse` dims; later dims are noise only."""
  rng = np.random.default_rng(seed)
  centres = np.zeros((num_classes, d))
  centres[:, :coarse] = rng.normal(scale=3.0, size=(num_classes, coarse))

  def draw(per_class):
    labels = np.repeat(np.arange(num_classes), per_class)
    x = centres[labels] + rng.normal(scale=0.3, size=(len(labels), d))
    x[:, coarse:] += rng.normal(scale=0.3, size=(len(labels), d - coarse))
    return x.astype(np.float32), labels

  database, db_labels = draw(per_class_db)
  queries, q_labels = draw(per_class_q)
  return queries, q_labels, database, db_labels


def test_compare_retrieval_on_nested_data():
  queries, q_labels, database, db_labels = nested_data()
  result = funnel.compare_retrieval(
      queries, q_labels, database, db_labels, ks=(10,), shortlist_dim=8, shortlist_size=100,
      funnel_dims=(4, 8, 16, 32, None), funnel_shortlists=(200, 100, 50, 25, 10))
  json.dumps(result, allow_nan=False)
  full, ada, fun = result["single_shot_full"], result["adaptive"], result["funnel"]
  assert full["top1"] > 0.9
  assert abs(ada["top1"] - full["top1"]) <= 0.05
  assert abs(fun["top1"] - full["top1"]) <= 0.05
  assert ada["map@10"] >= full["map@10"] - 0.05
  for r in (full, ada, fun):
    assert {"map@10", "precision@10", "recall@10", "top1", "mflops", "seconds"} <= set(r)
    assert r["seconds"] >= 0
  m = len(database)
  assert full["flops"] == m * 64
  assert ada["flops"] == m * 8 + 100 * 64
  assert fun["flops"] == m * 4 + 200 * 8 + 100 * 16 + 50 * 32 + 25 * 64
  assert ada["mflops"] == pytest.approx(ada["flops"] / 1e6)
  assert fun["dims"] == [4, 8, 16, 32, 64] and fun["shortlists"] == [200, 100, 50, 25, 10]


def test_flop_formulas():
  # The MRL paper's setting: ImageNet-1K database, 2048-d.
  m = 1_281_167
  assert funnel.single_shot_flops(m, 2048) == m * 2048
  assert funnel.adaptive_flops(m, 16, 2048, 200) == m * 16 + 200 * 2048
  assert funnel.funnel_flops(m, (16, 32, 64, 128, 256, 2048), (200, 100, 50, 25, 10)) == (
      m * 16 + 200 * 32 + 100 * 64 + 50 * 128 + 25 * 256 + 10 * 2048)
  flops = funnel.search_flops(m, 2048)
  assert flops == {"single_shot_full": m * 2048, "adaptive": m * 16 + 200 * 2048,
                   "funnel": m * 16 + 200 * 32 + 100 * 64 + 50 * 128 + 25 * 256 + 10 * 2048}


def test_rerank_on_device_equals_host_rerank():
  import jax.numpy as jnp
  rng = np.random.default_rng(3)
  database = rng.normal(size=(400, 32)).astype(np.float32)
  queries = rng.normal(size=(25, 32)).astype(np.float32)
  candidates = np.stack([rng.choice(400, size=40, replace=False) for _ in range(25)])
  candidates[:, 1] = candidates[:, 0]  # an exact tie: the smaller id must come first
  host = funnel.rerank(queries, database, candidates, 16, 10)
  device = np.asarray(funnel.rerank(queries, jnp.asarray(database), candidates, 16, 10))
  np.testing.assert_array_equal(device, host)


def test_unfilled_shortlist_slots_rank_last_on_host_and_device():
  import jax.numpy as jnp
  queries, database = random_embeddings(num_db=60, num_q=5, d=8)
  rng = np.random.default_rng(4)
  filled = np.stack([rng.choice(59, size=12, replace=False) for _ in range(5)])
  # An ANN that found only 12 of 16 pads with -1, which must not be read as row 59.
  padded = np.concatenate([filled[:, :6], np.full((5, 4), -1), filled[:, 6:]], axis=1)
  want = funnel.rerank(queries, database, filled, 8, 12)
  for db in (database, jnp.asarray(database)):
    got = np.asarray(funnel.rerank(queries, db, padded, 8, 16))
    np.testing.assert_array_equal(got[:, :12], want)
    np.testing.assert_array_equal(got[:, 12:], -1)
