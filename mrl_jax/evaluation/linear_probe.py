"""Linear probes: L2-regularised linear models fitted on frozen embeddings.

Full-batch L-BFGS (optax) on standardised features: deterministic, no learning
rate to tune, and exact enough that differences between sizes reflect the
embeddings rather than the probe's optimiser. Single-label data get a softmax
regression (`linear_probe_top1`); multi-label data a one-vs-rest logistic
regression per label, all labels fitted at once (`linear_probe_scores`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

LOSSES = ("softmax", "sigmoid")


@functools.partial(jax.jit, static_argnames=("num_outputs", "loss_kind", "steps"))
def _fit(x: jax.Array, y: jax.Array, num_outputs: int, loss_kind: str, l2: float, steps: int):
  """Weights and bias; `y` is integer labels [N] (softmax) or multi-hot [N, C] (sigmoid)."""
  params = {"w": jnp.zeros((x.shape[1], num_outputs)), "b": jnp.zeros((num_outputs,))}

  def loss(p):
    logits = x @ p["w"] + p["b"]
    if loss_kind == "softmax":
      data = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    else:
      data = optax.sigmoid_binary_cross_entropy(logits, y).sum(axis=1).mean()
    return data + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(p, updates), state), value

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return params


def _fitted_test_logits(train_x: np.ndarray, y: jax.Array, test_x: np.ndarray,
                        num_outputs: int, loss_kind: str, l2: float, steps: int) -> jax.Array:
  """Test logits of the probe fitted on standardised train features."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  standardise = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
  params = _fit(standardise(train_x), y, num_outputs, loss_kind, l2, steps)
  return standardise(test_x) @ params["w"] + params["b"]


def linear_probe_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                      test_y: np.ndarray, num_classes: int, *, l2: float = 1e-4,
                      steps: int = 100) -> float:
  """Top-1 on the test set of a softmax regression fitted on the train set."""
  logits = _fitted_test_logits(train_x, jnp.asarray(train_y), test_x, num_classes, "softmax",
                               l2, steps)
  return float(np.mean(np.asarray(jnp.argmax(logits, axis=1)) == test_y))


def linear_probe_scores(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, *,
                        l2: float = 1e-4, steps: int = 100) -> np.ndarray:
  """Per-label logits [N_test, C] of one-vs-rest logistic regressions fitted on the train set."""
  labels = jnp.asarray(train_labels, jnp.float32)
  return np.asarray(_fitted_test_logits(train_x, labels, test_x, labels.shape[1], "sigmoid",
                                        l2, steps))
