"""Zero-shot top-1, image<->text recall@k and the plain-model truncation baselines,
against float64 brute-force loops.

Exact-tie cases use vectors with entries +-1 and prefix sizes that are powers of 4:
every prefix then has a power-of-two norm, so the normalised vectors and all their
inner products are exact in float32 and the implementation must match the float64
reference's tie-breaking exactly, whatever its blocking or summation order.
"""

from __future__ import annotations

import numpy as np
import pytest

from mrl_jax.evaluation import cross_modal_retrieval, dual_baselines, zero_shot


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _signs(rng, shape) -> np.ndarray:
  return rng.choice([-1.0, 1.0], size=shape).astype(np.float32)


# ---------------------------------------------------------------- zero-shot
def _naive_zero_shot(image_z, labels, class_text_z, m):
  """(accuracy, predictions, margins) in float64, ties to the first class."""
  z = np.asarray(class_text_z, np.float64)[..., :m]
  weights = []
  for c in range(z.shape[0]):
    mean = np.zeros(m)
    for t in range(z.shape[1]):
      mean += z[c, t] / np.linalg.norm(z[c, t])
    weights.append(mean / z.shape[1] / np.linalg.norm(mean / z.shape[1]))
  preds, margins = [], []
  for x in np.asarray(image_z, np.float64)[:, :m]:
    scores = [float(np.dot(x / np.linalg.norm(x), w)) for w in weights]
    best = max(range(len(scores)), key=lambda c: (scores[c], -c))
    preds.append(best)
    top2 = sorted(scores, reverse=True)[:2]
    margins.append(top2[0] - top2[1])
  preds = np.asarray(preds)
  return float(np.mean(preds == labels)), preds, np.asarray(margins), np.asarray(weights)


def test_zero_shot_matches_float64_loop_with_template_averaging():
  rng = np.random.default_rng(0)
  num_classes, templates, d, n = 7, 3, 16, 300
  class_text_z = rng.normal(size=(num_classes, templates, d)).astype(np.float32)
  # Images near their class's prompts (scaled, so normalisation matters), plus noise.
  labels = rng.integers(0, num_classes, n)
  image_z = (3.0 * class_text_z[labels].mean(1) + rng.normal(size=(n, d))).astype(np.float32)
  dims = (2, 4, 8, 16)
  got = zero_shot.zero_shot_top1(image_z, labels, class_text_z, dims)
  assert got.shape == (len(dims),) and got.dtype == np.float32
  for i, m in enumerate(dims):
    acc, preds, margins, weights = _naive_zero_shot(image_z, labels, class_text_z, m)
    # float32 unit vectors: each score is off by at most ~m * 2^-24 * few.
    np.testing.assert_allclose(zero_shot.classifier_weights(class_text_z, m), weights,
                               atol=1e-6 * m)
    ours = zero_shot.zero_shot_predictions(image_z, zero_shot.classifier_weights(class_text_z, m))
    clear = margins > 1e-5 * m
    np.testing.assert_array_equal(ours[clear], preds[clear])
    assert abs(got[i] - acc) <= np.sum(~clear) / n + 1e-7
  assert got[-1] > 0.5  # The data is learnable: accuracy far above chance (1/7).


def test_zero_shot_exact_ties_go_to_the_first_class(monkeypatch):
  rng = np.random.default_rng(1)
  prompts = _signs(rng, (6, 1, 16))
  prompts[4] = prompts[1]  # Classes 1 and 4 have identical prompts: every score ties.
  prompts[5, 0, :4] = prompts[2, 0, :4]  # 2 and 5 tie at sizes 1 and 4 only.
  labels = rng.integers(0, 6, 101)
  flip = rng.random((101, 16)) < 0.2  # Each image: its class's prompt, some signs flipped.
  image_z = np.where(flip, -prompts[labels, 0], prompts[labels, 0]).astype(np.float32)
  # Several blocks, the last one padded.
  monkeypatch.setattr(zero_shot, "MAX_BLOCK_SCORES", 6 * 17)
  dims = (1, 4, 16)
  got = zero_shot.zero_shot_top1(image_z, labels, prompts, dims)
  for i, m in enumerate(dims):
    acc, preds, _, _ = _naive_zero_shot(image_z, labels, prompts, m)
    ours = zero_shot.zero_shot_predictions(image_z, zero_shot.classifier_weights(prompts, m))
    np.testing.assert_array_equal(ours, preds)
    assert got[i] == np.float32(acc)
    assert not np.any(ours == 4)  # Always beaten by its twin, class 1.


def test_zero_shot_rejects_bad_shapes():
  with pytest.raises(ValueError, match="dim=9"):
    zero_shot.classifier_weights(np.ones((3, 2, 8)), 9)
  with pytest.raises(ValueError, match="labels"):
    zero_shot.zero_shot_top1(np.ones((4, 8)), np.zeros(3), np.ones((3, 2, 8)), (8,))


# ---------------------------------------------------------------- retrieval
def _order(scores: np.ndarray) -> list[int]:
  """Candidates by score descending, then index ascending (the documented tie rule)."""
  return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def _naive_recall(image_z, text_z, text_image, m, ks):
  img = _unit(np.asarray(image_z, np.float64)[:, :m])
  txt = _unit(np.asarray(text_z, np.float64)[:, :m])
  i2t = {k: [] for k in ks}
  for i in range(len(img)):
    own = set(np.flatnonzero(text_image == i))
    if not own:
      continue
    order = _order(txt @ img[i])
    for k in ks:
      i2t[k].append(any(t in own for t in order[:k]))
  t2i = {k: [] for k in ks}
  for t in range(len(txt)):
    order = _order(img @ txt[t])
    for k in ks:
      t2i[k].append(text_image[t] in order[:k])
  return ({k: float(np.mean(v)) for k, v in i2t.items()},
          {k: float(np.mean(v)) for k, v in t2i.items()})


def _caption_layout(rng, num_images):
  """text_image with 0-4 captions per image (image 3 has none), shuffled."""
  counts = rng.integers(1, 5, num_images)
  counts[3] = 0
  text_image = np.repeat(np.arange(num_images), counts)
  return text_image[rng.permutation(len(text_image))].astype(np.int32)


def test_recall_exact_ties_match_float64_loop(monkeypatch):
  rng = np.random.default_rng(2)
  num_images, d = 37, 16
  image_z = _signs(rng, (num_images, d))
  image_z[5] = image_z[6]  # Two identical images: text -> image ties between them.
  text_image = _caption_layout(rng, num_images)
  flip = rng.random((len(text_image), d)) < 0.25
  text_z = np.where(flip, -image_z[text_image], image_z[text_image]).astype(np.float32)
  text_z[::7] = text_z[1]  # Many identical captions of different images: more ties.
  # Blocks that do not divide the query counts (the last block padded).
  monkeypatch.setattr(cross_modal_retrieval, "MAX_BLOCK_SCORES", 5 * len(text_image) + 3)
  ks = (1, 2, 5, 10)
  dims = (1, 4, 16)
  got = cross_modal_retrieval.recall_at_k(image_z, text_z, text_image, dims, ks)
  assert set(got) == {"image_to_text", "text_to_image"}
  for i, m in enumerate(dims):
    i2t, t2i = _naive_recall(image_z, text_z, text_image, m, ks)
    for k in ks:
      assert got["image_to_text"][k][i] == np.float32(i2t[k]), (m, k)
      assert got["text_to_image"][k][i] == np.float32(t2i[k]), (m, k)
  # At size 1 every score is +-1: recall@1 is decided by the tie rule alone.
  assert 0 < got["text_to_image"][1][0] < 1


def test_recall_gaussian_matches_float64_loop_where_scores_are_apart():
  rng = np.random.default_rng(3)
  num_images, d = 50, 24
  image_z = rng.normal(size=(num_images, d)).astype(np.float32)
  text_image = _caption_layout(rng, num_images)
  text_z = (image_z[text_image] + 1.5 * rng.normal(size=(len(text_image), d))).astype(np.float32)
  dims, ks = (3, 12, 24), (1, 5, 10)
  got = cross_modal_retrieval.recall_at_k(image_z, text_z, text_image, dims, ks)
  for i, m in enumerate(dims):
    img, txt = _unit(image_z[:, :m].astype(np.float64)), _unit(text_z[:, :m].astype(np.float64))
    # float32 scores of unit vectors are off by ~m * 2^-24: a query's rank is certain
    # only if no other candidate scores that close to its relevant one.
    eps = 1e-5
    i2t_ranks = cross_modal_retrieval.image_to_text_ranks(img, txt, text_image)
    t2i_ranks = cross_modal_retrieval.text_to_image_ranks(img, txt, text_image)
    uncertain = {"image_to_text": 0, "text_to_image": 0}
    queries = ([("image_to_text", i, txt @ img[i], np.flatnonzero(text_image == i), i2t_ranks)
                for i in range(num_images)]
               + [("text_to_image", t, img @ txt[t], np.array([text_image[t]]), t2i_ranks)
                  for t in range(len(txt))])
    for direction, q, scores, relevant, ranks in queries:
      if not len(relevant):
        assert ranks[q] == -1
        continue
      order = _order(scores)
      best = min(order.index(r) for r in relevant)
      if np.sum(np.abs(scores - scores[order[best]]) < eps) == 1:
        assert ranks[q] == best
      else:
        uncertain[direction] += 1
    i2t, t2i = _naive_recall(image_z, text_z, text_image, m, ks)
    for k in ks:
      # An uncertain query can move a recall by its share, no more.
      captioned = num_images - 1
      assert abs(got["image_to_text"][k][i] - i2t[k]) <= uncertain["image_to_text"] / captioned \
          + 1e-6
      assert abs(got["text_to_image"][k][i] - t2i[k]) <= uncertain["text_to_image"] / len(txt) \
          + 1e-6
    assert sum(uncertain.values()) < 0.05 * len(queries)  # Most ranks were checked exactly.
  assert got["image_to_text"][10][-1] > got["image_to_text"][1][0]


def test_ranks_of_images_without_captions_are_minus_one():
  image_z = np.eye(3, dtype=np.float32)
  text_z = np.eye(3, dtype=np.float32)[[0, 0, 2]]
  ranks = cross_modal_retrieval.image_to_text_ranks(image_z, text_z, np.array([0, 0, 2]))
  np.testing.assert_array_equal(ranks, [0, -1, 0])
  with pytest.raises(ValueError, match="index the 3 images"):
    cross_modal_retrieval.recall_at_k(image_z, text_z, np.array([0, 5, 2]), (3,))


# ---------------------------------------------------------------- baselines
def test_joint_svd_basis_spans_the_top_directions_of_both_modalities():
  rng = np.random.default_rng(4)
  d = 12
  scales = np.linspace(3.0, 0.2, d)
  image_z = rng.normal(size=(400, d)) * scales
  text_z = rng.normal(size=(1200, d)) * scales[::-1] + 0.5  # another spread, an offset
  basis = dual_baselines.joint_svd_basis(image_z, text_z)
  np.testing.assert_allclose(basis.T @ basis, np.eye(d), atol=1e-10)
  # Reference: right singular vectors of the stacked rows, each modality weighted 1/2.
  stacked = np.concatenate([image_z / np.sqrt(2 * len(image_z)),
                            text_z / np.sqrt(2 * len(text_z))])
  _, sv, vt = np.linalg.svd(stacked, full_matrices=False)
  for m in range(1, d):
    if sv[m - 1] - sv[m] > 1e-3 * sv[0]:  # Subspaces are defined where the spectrum has a gap.
      ours, ref = basis[:, :m] @ basis[:, :m].T, vt[:m].T @ vt[:m]
      np.testing.assert_allclose(ours, ref, atol=1e-8)


def test_truncations_apply_one_map_to_both_modalities():
  rng = np.random.default_rng(5)
  image_z = rng.normal(size=(30, 10)).astype(np.float32)
  text_z = rng.normal(size=(60, 10)).astype(np.float32)
  maps = dual_baselines.truncations(image_z, text_z, (2, 10), seed=7)
  again = dual_baselines.truncations(image_z, text_z, (2, 10), seed=7)
  subset = dual_baselines.random_subsets(10, (2, 10), 7)[2]
  assert len(set(subset)) == 2 and list(subset) == sorted(subset)
  np.testing.assert_array_equal(maps["random"](text_z, 2), text_z[:, subset])
  np.testing.assert_array_equal(maps["random"](image_z, 2), again["random"](image_z, 2))
  # Prompt arrays [C, T, d] project on their last axis.
  assert maps["svd"](text_z.reshape(6, 10, 10), 2).shape == (6, 10, 2)
  # At full size the SVD map is a rotation: every inner product is the model's.
  full_i, full_t = maps["svd"](image_z, 10), maps["svd"](text_z, 10)
  np.testing.assert_allclose(full_i @ full_t.T, image_z @ text_z.T, atol=1e-4)
