"""Adaptive classification with nested logits: a confidence cascade over sizes (MRL paper).

Each example walks the sizes from smallest to largest and stops at the first
size whose largest softmax probability reaches that size's threshold; the last
size accepts everything. Its prediction is the argmax at the size it stopped
at and its cost is that size's number of dims, so a cascade is summarised by
(accuracy, expected dims = mean over examples of the stopping size's dims).

Threshold search (`search_thresholds`), greedy and deterministic:
  1. Start with every size but the last switched off (threshold NEVER = 2.0,
     which no probability reaches): all examples go to the largest size.
  2. For the sizes from smallest to second largest, one at a time, with the
     thresholds of the smaller sizes already fixed and the larger ones still
     off, try every grid value plus NEVER. Keep the smallest value whose
     accuracy is >= the target. Lowering a size's threshold only moves
     examples from the largest size to this one, so the smallest feasible
     value is also the cheapest. If no value reaches the target, keep the one
     with the highest accuracy (ties: the smallest value).
  Step 2 never loses feasibility (NEVER reproduces the accuracy already
  reached), so whenever the largest size alone meets the target, so does the
  result.

Pairwise search (`method="pairwise"`), the official MRL code's protocol
(RAIVNLab/MRL, model_analysis/Model_Cascades.ipynb), reimplemented here:
  * for every consecutive pair of sizes (i, i+1) on its own, try every grid
    value t (official grid: 0.1, ..., 1.0, 100 values, `OFFICIAL_GRID`, the
    default for this method) for the two-size cascade "size i if its confidence
    clears t, else size i+1" on all held-out examples, and keep the smallest t
    with the highest accuracy; the pairs do not see each other's thresholds and
    no accuracy target is involved;
  * the curve is one cascade per largest size allowed ("early stopping" in the
    notebook): for cap j = 1 .. n-1, sizes 0..j with the pairwise thresholds of
    sizes 0..j-1, size j accepting the rest; the full-size point is cap n-1.
  Differences from the notebook: a size stops when its confidence is >= t (the
  notebook: > t; they differ only for confidences exactly on a grid value, such
  as a saturated softmax of 1.0 at t = 1.0), NEVER is a candidate after the grid
  (a size can be switched off), and the held-out part is `holdout_fraction` of
  the examples (the notebook: 10,000 of ImageNet's 50,000, i.e. 0.2) drawn
  from a seeded generator (the notebook: unseeded np.random.choice). The
  notebook's softmaxes come from test-time augmentation (`--tta`); here they
  are whatever logits are passed. A pair never sees the sizes after it: if
  both of its sizes are wrong on some hard examples, passing them on gains the
  pair nothing, so its smallest best threshold may stop them at the smaller
  size even where a later size is right. On such data the greedy search keeps
  the full size's accuracy and the pairwise one does not.

Protocol (`adaptive_classification`): split the examples with a seeded
permutation into a held-out part (threshold search only) and the rest
(everything reported), `num_splits` times (the paper averages 30 random
splits). Split 0 is the seed's permutation and gives the top-level keys; every
split's numbers enter "over_splits" as mean, standard deviation (numpy's, ddof
0, as the notebook), min and max.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

NEVER = 2.0  # A threshold no softmax probability reaches: the size is skipped.
DEFAULT_GRID = np.linspace(0.0, 1.0, 101)
OFFICIAL_GRID = np.linspace(0.1, 1.0, 100)  # Model_Cascades.ipynb: np.linspace(0.1, 1, 100).
METHODS = ("greedy", "pairwise")
_EPS = 1e-12


def softmax(logits: np.ndarray) -> np.ndarray:
  """Softmax over the last axis in float64."""
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def _check_thresholds(thresholds: Sequence[float], num_sizes: int) -> np.ndarray:
  t = np.asarray(thresholds, np.float64).reshape(-1)
  if len(t) == num_sizes - 1:
    t = np.append(t, 0.0)
  if len(t) != num_sizes:
    raise ValueError(f"Need {num_sizes} thresholds (or {num_sizes - 1}, the last size always "
                     f"accepts), got {len(t)}.")
  return t


def _stop_index(confidence: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """Index of the first size whose confidence >= its threshold; the last size always accepts."""
  accept = confidence >= thresholds[:, None]
  accept[-1] = True
  return np.argmax(accept, axis=0)


def cascade(probs: np.ndarray, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Runs the cascade on probabilities [n, N, C]: (predictions [N], stopping size index [N]).

  `thresholds` has one value per size (the last one is ignored) or one per size but the last.
  """
  probs = np.asarray(probs)
  thresholds = _check_thresholds(thresholds, probs.shape[0])
  size_index = _stop_index(probs.max(axis=-1), thresholds)
  chosen = probs[size_index, np.arange(probs.shape[1])]
  return chosen.argmax(axis=-1), size_index


def expected_dims(size_index: np.ndarray, dims: Sequence[int]) -> float:
  """Mean number of dims used per example."""
  return float(np.mean(np.asarray(dims, np.float64)[np.asarray(size_index)]))


def confidence_and_prediction(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Max softmax probability and argmax [n, N] of logits [n, N, C], one size at a time.

  Only these two enter the cascade, so the [n, N, C] probabilities are never stored.
  """
  confidence, prediction = [], []
  for size_logits in logits:
    x = np.asarray(size_logits, np.float64)
    top = x.max(axis=-1, keepdims=True)
    confidence.append(1.0 / np.exp(x - top).sum(axis=-1))
    prediction.append(x.argmax(axis=-1))
  return np.stack(confidence), np.stack(prediction)


def _search(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float,
            grid: Sequence[float] | None) -> list[float]:
  """The greedy search of the module doc on confidences and correctness [n, N]."""
  num_sizes, num = confidence.shape
  if num == 0:
    raise ValueError("No examples to search thresholds on.")
  grid = np.unique(np.asarray(DEFAULT_GRID if grid is None else grid, np.float64))
  candidates = np.append(grid[grid < NEVER], NEVER)  # Ascending; NEVER = size switched off.
  thresholds = np.full(num_sizes, NEVER)
  thresholds[-1] = 0.0
  # Examples already stopped by the fixed smaller sizes, and their correct count.
  stopped = np.zeros(num, bool)
  stopped_correct = 0
  for i in range(num_sizes - 1):
    alive = ~stopped
    # [A, G]: does the alive example stop at size i with candidate threshold g?
    stops = confidence[i, alive][:, None] >= candidates[None, :]
    right = np.where(stops, correct[i, alive][:, None], correct[-1, alive][:, None])
    accuracy = (stopped_correct + right.sum(axis=0)) / num
    feasible = accuracy >= target_accuracy - _EPS
    if feasible.any():
      pick = int(np.argmax(feasible))  # Smallest feasible threshold = cheapest.
    else:
      pick = int(np.argmax(accuracy))  # Ties go to the smallest threshold.
    thresholds[i] = candidates[pick]
    now = alive & (confidence[i] >= thresholds[i])
    stopped_correct += int(correct[i, now].sum())
    stopped |= now
  return [float(t) for t in thresholds]


def _search_pairwise(confidence: np.ndarray, correct: np.ndarray,
                     grid: Sequence[float] | None) -> list[float]:
  """The official code's pairwise search of the module doc on confidences and correctness."""
  num_sizes, num = confidence.shape
  if num == 0:
    raise ValueError("No examples to search thresholds on.")
  grid = np.unique(np.asarray(OFFICIAL_GRID if grid is None else grid, np.float64))
  candidates = np.append(grid[grid < NEVER], NEVER)  # Ascending.
  thresholds = np.zeros(num_sizes)
  for i in range(num_sizes - 1):
    stops = confidence[i][:, None] >= candidates[None, :]                    # [N, G]
    right = np.where(stops, correct[i][:, None], correct[i + 1][:, None])
    thresholds[i] = candidates[int(np.argmax(right.sum(axis=0)))]  # First max = smallest t.
  return [float(t) for t in thresholds]


def search_thresholds(probs: np.ndarray, labels: np.ndarray, dims: Sequence[int], *,
                      target_accuracy: float | None = None,
                      grid: Sequence[float] | None = None, method: str = "greedy"
                      ) -> list[float]:
  """Per-size thresholds (see module doc): n plain floats, the last size 0.0.

  method="greedy": accuracy >= `target_accuracy` with few expected dims; `grid`
  defaults to 0, 0.01, ..., 1; switched-off sizes get NEVER (2.0).
  method="pairwise": the official code's per-pair search (no target); `grid`
  defaults to OFFICIAL_GRID. `probs` [n, N, C].
  """
  probs = np.asarray(probs)
  if len(dims) != probs.shape[0]:
    raise ValueError(f"{len(dims)} dims for {probs.shape[0]} sizes of probabilities.")
  correct = probs.argmax(axis=-1) == np.asarray(labels)[None, :]
  if method == "pairwise":
    return _search_pairwise(probs.max(axis=-1), correct, grid)
  if method != "greedy":
    raise ValueError(f"method={method!r} is unknown: use one of {METHODS}.")
  if target_accuracy is None:
    raise ValueError("The greedy search needs target_accuracy.")
  return _search(probs.max(axis=-1), correct, target_accuracy, grid)


def _evaluate(confidence: np.ndarray, correct: np.ndarray, dims: Sequence[int],
              thresholds: Sequence[float]) -> tuple[float, float]:
  """(accuracy, expected dims) of the cascade from confidences and correctness [n, N]."""
  size_index = _stop_index(confidence, _check_thresholds(thresholds, len(confidence)))
  accuracy = float(np.mean(correct[size_index, np.arange(correct.shape[1])]))
  return accuracy, expected_dims(size_index, dims)


def holdout_splits(num: int, holdout_fraction: float, seed: int,
                   num_splits: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """`num_splits` (held-out, reported) pairs of sorted example indices, disjoint, covering all.

  Split 0 comes from `np.random.default_rng(seed)`, split s >= 1 from `default_rng((seed, s))`.
  """
  num_holdout = int(round(holdout_fraction * num))
  if not 0 < num_holdout < num:
    raise ValueError(f"holdout_fraction={holdout_fraction} leaves an empty part of {num} examples.")
  if num_splits < 1:
    raise ValueError(f"num_splits={num_splits} must be at least 1.")
  out = []
  for split in range(num_splits):
    rng = np.random.default_rng(seed if split == 0 else (seed, split))
    order = rng.permutation(num)
    out.append((np.sort(order[:num_holdout]), np.sort(order[num_holdout:])))
  return out


def _stats(values: Sequence[float | None]) -> dict[str, float] | None:
  """Mean, std (ddof 0), min, max of the values that are not None (None if there are none)."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if not len(v):
    return None
  return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
          "max": float(v.max()), "count": int(len(v))}


def _one_split(confidence: np.ndarray, correct: np.ndarray, dims: list[int], hold: np.ndarray,
               rest: np.ndarray, method: str, targets: Sequence[float] | None,
               grid: Sequence[float] | None, tolerance: float) -> dict[str, Any]:
  """Thresholds searched on `hold` only, every number measured on `rest` only."""
  hold_conf, hold_correct = confidence[:, hold], correct[:, hold]
  rest_conf, rest_correct = confidence[:, rest], correct[:, rest]
  hold_fixed = [float(np.mean(c)) for c in hold_correct]
  rest_fixed = [float(np.mean(c)) for c in rest_correct]

  def measured(thresholds: list[float], **keys) -> dict[str, Any]:
    accuracy, cost = _evaluate(rest_conf, rest_correct, dims, thresholds)
    return {**keys, "accuracy": accuracy, "expected_dims": cost, "thresholds": thresholds}

  if method == "greedy":
    cache: dict[float, dict[str, Any]] = {}

    def point(target: float) -> dict[str, Any]:
      if target not in cache:
        cache[target] = measured(_search(hold_conf, hold_correct, target, grid), target=target)
      return cache[target]

    curve = [point(t) for t in sorted({float(t) for t in (hold_fixed if targets is None else targets)})]
    full_point = point(hold_fixed[-1])
    # Per fixed size (or given target), in order: what "over_splits" averages.
    matched = [point(float(t)) for t in (hold_fixed if targets is None else targets)]
  else:
    thresholds = _search_pairwise(hold_conf, hold_correct, grid)
    curve = []
    for cap in range(1, len(dims)):
      sub = thresholds[:cap] + [0.0]
      accuracy, cost = _evaluate(rest_conf[:cap + 1], rest_correct[:cap + 1], dims[:cap + 1], sub)
      curve.append({"max_dim": dims[cap], "accuracy": accuracy, "expected_dims": cost,
                    "thresholds": sub})
    full_point = curve[-1]
    matched = curve

  reference = rest_fixed[-1] - tolerance
  costs = [p["expected_dims"] for p in curve + [full_point] if p["accuracy"] >= reference - _EPS]
  x_smaller = float(dims[-1] / min(costs)) if costs else None
  return {
      "fixed": [{"dim": m, "accuracy": a} for m, a in zip(dims, rest_fixed)],
      "curve": curve,
      "accuracy": full_point["accuracy"],
      "expected_dims": full_point["expected_dims"],
      "thresholds": full_point["thresholds"],
      "x_smaller_at_equal_accuracy": x_smaller,
      "_matched": matched,
  }


def adaptive_classification(logits: np.ndarray, labels: np.ndarray, dims: Sequence[int], *,
                            holdout_fraction: float = 0.5, seed: int = 0, num_splits: int = 30,
                            method: str = "greedy", targets: Sequence[float] | None = None,
                            grid: Sequence[float] | None = None,
                            equal_accuracy_tolerance: float = 0.001) -> dict[str, Any]:
  """Accuracy vs expected dims of the cascade, thresholds searched on held-out parts.

  `method`: "greedy" (target-driven search, this module's) or "pairwise" (the official
  code's; `grid` then defaults to OFFICIAL_GRID and `targets` must be None). Returns a
  JSON-serialisable dict whose top-level numbers are split 0's:
    * "fixed": [{"dim", "accuracy"}] of every single size on the reported part;
    * "curve": greedy: per target accuracy (default: every size's held-out accuracy, so
      the curve spans the fixed sizes), {"target", "accuracy", "expected_dims",
      "thresholds"} on the reported part, sorted by target; pairwise: per largest size
      allowed, {"max_dim", "accuracy", "expected_dims", "thresholds"};
    * "accuracy", "expected_dims", "thresholds": greedy: the point searched with the full
      size's held-out accuracy as target (always computed, also when `targets` is given);
      pairwise: the cascade over all sizes;
    * "x_smaller_at_equal_accuracy": dims[-1] / the smallest expected dims among the curve
      points and the point above whose reported accuracy is >= the full size's reported
      accuracy minus `equal_accuracy_tolerance` (absolute, default 0.001 = 0.1 points);
      None when no point qualifies;
    * "over_splits": every split's "accuracy", "expected_dims" and
      "x_smaller_at_equal_accuracy" as {"mean", "std", "min", "max", "count"} (count:
      splits where it is not None), "fixed" per size, and "curve": greedy: per fixed size
      i in order (target: that split's held-out accuracy of size i, so the point a split
      matches to size i; with `targets` given, per target in the order given), with
      "matched_dim" (or "target") and stats of "target", "accuracy", "expected_dims";
      pairwise: per largest size "max_dim";
    * "method", "num_splits", "equal_accuracy_tolerance", "num_holdout", "num_reported".
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r} is unknown: use one of {METHODS}.")
  if method == "pairwise" and targets is not None:
    raise ValueError("The pairwise search has no accuracy targets: leave targets=None.")
  confidence, prediction = confidence_and_prediction(logits)
  labels = np.asarray(labels).reshape(-1)
  num_sizes, num = confidence.shape
  dims = [int(m) for m in dims]
  if len(dims) != num_sizes:
    raise ValueError(f"{len(dims)} dims for {num_sizes} sizes of logits.")
  if len(labels) != num:
    raise ValueError(f"{len(labels)} labels for {num} examples.")
  splits = holdout_splits(num, holdout_fraction, seed, num_splits)
  correct = prediction == labels[None, :]
  results = [_one_split(confidence, correct, dims, hold, rest, method, targets, grid,
                        equal_accuracy_tolerance) for hold, rest in splits]

  if method == "greedy":
    names = ([("target", float(t)) for t in targets] if targets is not None
             else [("matched_dim", m) for m in dims])
  else:
    names = [("max_dim", m) for m in dims[1:]]
  curve_stats = []
  for i, (key, value) in enumerate(names):
    entry: dict[str, Any] = {key: value}
    for field in ("target", "accuracy", "expected_dims"):
      if field in results[0]["_matched"][i]:
        entry[field] = _stats([r["_matched"][i][field] for r in results])
    curve_stats.append(entry)
  over_splits = {
      field: _stats([r[field] for r in results])
      for field in ("accuracy", "expected_dims", "x_smaller_at_equal_accuracy")}
  over_splits["fixed"] = [{"dim": m, "accuracy": _stats([r["fixed"][i]["accuracy"]
                                                         for r in results])}
                          for i, m in enumerate(dims)]
  over_splits["curve"] = curve_stats

  out = {k: v for k, v in results[0].items() if k != "_matched"}
  out.update(over_splits=over_splits, method=method, num_splits=int(num_splits),
             equal_accuracy_tolerance=float(equal_accuracy_tolerance),
             num_holdout=int(len(splits[0][0])), num_reported=int(len(splits[0][1])))
  return out
