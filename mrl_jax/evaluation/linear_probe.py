"""Linear probe: an L2-regularised softmax regression fitted on frozen embeddings.

Full-batch L-BFGS (optax) on standardised features: deterministic, no learning
rate to tune, and exact enough that differences between sizes reflect the
embeddings rather than the probe's optimiser.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(x: jax.Array, y: jax.Array, num_classes: int, l2: float, steps: int):
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

  def loss(p):
    logits = x @ p["w"] + p["b"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return nll + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(p, updates), state), value

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return params


def linear_probe_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                      test_y: np.ndarray, num_classes: int, *, l2: float = 1e-4,
                      steps: int = 100) -> float:
  """Top-1 on the test set of a softmax regression fitted on the train set."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  standardise = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
  params = _fit(standardise(train_x), jnp.asarray(train_y), num_classes, l2, steps)
  predictions = np.asarray(jnp.argmax(standardise(test_x) @ params["w"] + params["b"], axis=1))
  return float(np.mean(predictions == test_y))
