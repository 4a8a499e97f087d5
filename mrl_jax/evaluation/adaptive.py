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

`adaptive_classification` splits the examples with a seeded permutation into a
held-out part (threshold search) and the rest (everything reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

NEVER = 2.0  # A threshold no softmax probability reaches: the size is skipped.
DEFAULT_GRID = np.linspace(0.0, 1.0, 101)
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


def search_thresholds(probs: np.ndarray, labels: np.ndarray, dims: Sequence[int], *,
                      target_accuracy: float, grid: Sequence[float] | None = None
                      ) -> list[float]:
  """Per-size thresholds with accuracy >= target and few expected dims (greedy, see module doc).

  `probs` [n, N, C]; `grid` defaults to 0, 0.01, ..., 1. Returns n plain floats:
  switched-off sizes get NEVER (2.0), the last size 0.0.
  """
  probs = np.asarray(probs)
  if len(dims) != probs.shape[0]:
    raise ValueError(f"{len(dims)} dims for {probs.shape[0]} sizes of probabilities.")
  correct = probs.argmax(axis=-1) == np.asarray(labels)[None, :]
  return _search(probs.max(axis=-1), correct, target_accuracy, grid)


def _evaluate(confidence: np.ndarray, correct: np.ndarray, dims: Sequence[int],
              thresholds: Sequence[float]) -> tuple[float, float]:
  """(accuracy, expected dims) of the cascade from confidences and correctness [n, N]."""
  size_index = _stop_index(confidence, _check_thresholds(thresholds, len(confidence)))
  accuracy = float(np.mean(correct[size_index, np.arange(correct.shape[1])]))
  return accuracy, expected_dims(size_index, dims)


def adaptive_classification(logits: np.ndarray, labels: np.ndarray, dims: Sequence[int], *,
                            holdout_fraction: float = 0.5, seed: int = 0,
                            targets: Sequence[float] | None = None,
                            grid: Sequence[float] | None = None,
                            equal_accuracy_tolerance: float = 0.001) -> dict[str, Any]:
  """Accuracy vs expected dims of the cascade, thresholds searched on a held-out part.

  Returns a JSON-serialisable dict:
    * "fixed": [{"dim", "accuracy"}] of every single size on the reported part;
    * "curve": per target accuracy (default: every size's held-out accuracy, so the curve
      spans the fixed sizes), {"target", "accuracy", "expected_dims", "thresholds"} on the
      reported part, sorted by target;
    * "accuracy", "expected_dims", "thresholds": the point searched with the full size's
      held-out accuracy as target (always computed, also when `targets` is given);
    * "x_smaller_at_equal_accuracy": dims[-1] / the smallest expected dims among the curve
      points and the point above whose reported accuracy is >= the full size's reported
      accuracy minus `equal_accuracy_tolerance` (absolute, default 0.001 = 0.1 points);
      None when no point qualifies;
    * "equal_accuracy_tolerance", "num_holdout", "num_reported".
  """
  confidence, prediction = confidence_and_prediction(logits)
  labels = np.asarray(labels).reshape(-1)
  num_sizes, num = confidence.shape
  dims = [int(m) for m in dims]
  if len(dims) != num_sizes:
    raise ValueError(f"{len(dims)} dims for {num_sizes} sizes of logits.")
  if len(labels) != num:
    raise ValueError(f"{len(labels)} labels for {num} examples.")
  num_holdout = int(round(holdout_fraction * num))
  if not 0 < num_holdout < num:
    raise ValueError(f"holdout_fraction={holdout_fraction} leaves an empty part of {num} examples.")
  order = np.random.default_rng(seed).permutation(num)
  hold, rest = np.sort(order[:num_holdout]), np.sort(order[num_holdout:])
  correct = prediction == labels[None, :]
  hold_conf, hold_correct = confidence[:, hold], correct[:, hold]
  rest_conf, rest_correct = confidence[:, rest], correct[:, rest]

  hold_fixed = [float(np.mean(c)) for c in hold_correct]
  rest_fixed = [float(np.mean(c)) for c in rest_correct]
  if targets is None:
    targets = hold_fixed
  targets = sorted({float(t) for t in targets})

  def point(target: float) -> dict[str, Any]:
    thresholds = _search(hold_conf, hold_correct, target, grid)
    accuracy, cost = _evaluate(rest_conf, rest_correct, dims, thresholds)
    return {"target": target, "accuracy": accuracy, "expected_dims": cost,
            "thresholds": thresholds}

  curve = [point(t) for t in targets]
  full_point = next((p for p in curve if p["target"] == hold_fixed[-1]), None)
  if full_point is None:
    full_point = point(hold_fixed[-1])

  reference = rest_fixed[-1] - equal_accuracy_tolerance
  costs = [p["expected_dims"] for p in curve + [full_point] if p["accuracy"] >= reference - _EPS]
  x_smaller = float(dims[-1] / min(costs)) if costs else None
  return {
      "fixed": [{"dim": m, "accuracy": a} for m, a in zip(dims, rest_fixed)],
      "curve": curve,
      "accuracy": full_point["accuracy"],
      "expected_dims": full_point["expected_dims"],
      "thresholds": full_point["thresholds"],
      "x_smaller_at_equal_accuracy": x_smaller,
      "equal_accuracy_tolerance": float(equal_accuracy_tolerance),
      "num_holdout": int(len(hold)),
      "num_reported": int(len(rest)),
  }
