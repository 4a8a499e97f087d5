"""Label-set metrics for models trained on multi-label corpora (multi-hot labels).

Labels are multi-hot int arrays [N, C] (1 = the example carries the class).

- precision@1 (`precision_at_1`): the share of queries whose top-ranked item
  is relevant: for a classifier, the top-scoring class is one of the query's
  labels; for retrieval, the nearest database example shares at least one
  label with the query.
- mAP over labels (`mean_average_precision`): for each label c that at least
  one test example carries, rank the test examples by their score for c
  (decreasing) and take the average precision
      AP_c = (1 / P_c) * sum over positives i of precision@rank(i),
  P_c the number of positives; mAP is the mean of AP_c over those labels.
  This is scikit-learn's `average_precision_score(y[:, c], s[:, c])` when
  scores have no ties (ties here are broken by example order, not pooled).
- `linear_probe_scores`: a one-vs-rest linear probe: an L2-regularised
  logistic regression per label (sigmoid cross-entropy, all labels fitted at
  once by full-batch L-BFGS on standardised features), whose test scores feed
  the mAP.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def precision_at_1(top_hit: np.ndarray) -> float:
  """Mean of a boolean [N] "the top-ranked item is relevant"."""
  return float(np.mean(np.asarray(top_hit, bool)))


def head_precision_at_1(scores: np.ndarray, labels: np.ndarray) -> float:
  """Share of examples whose top-scoring class [N, C] is one of their labels [N, C]."""
  top = np.argmax(scores, axis=1)
  return precision_at_1(np.asarray(labels)[np.arange(len(top)), top] > 0)


def neighbour_precision_at_1(query_labels: np.ndarray, neighbour_labels: np.ndarray) -> float:
  """Share of queries [N, C] whose nearest neighbour's labels [N, C] share a class with them."""
  return precision_at_1(np.any((np.asarray(query_labels) > 0)
                               & (np.asarray(neighbour_labels) > 0), axis=1))


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
  """AP of ranking by `scores` [N] (decreasing; ties by index) against boolean `relevant` [N]."""
  relevant = np.asarray(relevant, bool)
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  hits = relevant[order]
  if not hits.any():
    raise ValueError("average_precision needs at least one relevant example.")
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float(precision[hits].sum() / hits.sum())


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """Mean over labels with at least one positive of AP of ranking examples by that label's score."""
  labels = np.asarray(labels) > 0
  present = np.flatnonzero(labels.any(axis=0))
  return float(np.mean([average_precision(scores[:, c], labels[:, c]) for c in present]))


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_sigmoid(x: jax.Array, y: jax.Array, l2: float, steps: int):
  params = {"w": jnp.zeros((x.shape[1], y.shape[1])), "b": jnp.zeros((y.shape[1],))}

  def loss(p):
    logits = x @ p["w"] + p["b"]
    bce = optax.sigmoid_binary_cross_entropy(logits, y).sum(axis=1).mean()
    return bce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(p, updates), state), value

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return params


def linear_probe_scores(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, *,
                        l2: float = 1e-4, steps: int = 100) -> np.ndarray:
  """Per-label logits [N_test, C] of one-vs-rest logistic regressions fitted on the train set."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  standardise = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
  params = _fit_sigmoid(standardise(train_x), jnp.asarray(train_labels, jnp.float32), l2, steps)
  return np.asarray(standardise(test_x) @ params["w"] + params["b"])
