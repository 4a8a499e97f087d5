"""A softmax linear probe trained mini-batch over row blocks: for databases too large to hold.

`linear_probe.linear_probe_top1` fits full-batch L-BFGS on the whole standardised
train matrix in memory (10.5 GB for ImageNet-1K at 2048 dims, and every L-BFGS step
and line-search trial touches all of it). This probe fits the same model to the
same objective, softmax regression on standardised features with
mean cross-entropy + l2/2 ||W||^2, by Adam on shuffled mini-batches (cosine-decayed
learning rate, `epochs` passes), reading the train rows one block at a time: only a
block and the [dim, classes] weights are in memory. Standardisation uses the train
mean and standard deviation the caller streams (float64 sums).

How close to the L-BFGS probe. With l2 > 0 the objective is strictly convex, so both
optimisers approach the same unique minimiser, and both stop short of it (L-BFGS
after `linear_steps`, this one after `epochs`); what they report is the test top-1
of their iterate, which differs from the minimiser's only on test examples near a
decision boundary. Measured on the digits probe (quickstart model trained 40 steps,
1,437 train / 360 test, 6 sizes x 3 truncations, linear_epochs=30, batch 256, one
block; tests/test_probe.py): at most 0.019 apart (7 of 360 test examples), most
sizes within 0.006; with learning rate 0.01 instead of 0.2 the small sizes were
under-fitted (0.07 apart at 2 dims). The test bounds the difference by 0.05 per size
(18 test examples): a wide margin, as for training thresholds, not a float32 bound.
At ImageNet scale an epoch is ~5,000 Adam steps (1.28M / 256), so the default 10
epochs train far longer than the digits' 30 epochs of 6 steps.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_LEARNING_RATE = 0.2


_ADAM = optax.scale_by_adam()   # One transformation for every probe: one compile per shape.


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _train_block(params, opt_state, x, y, mask, mean, std, l2, first_step, total_steps,
                 learning_rate, *, batch_size):
  """Adam steps over the (already shuffled, padded) block's mini-batches, in order.

  The learning rate decays as learning_rate * (1 + cos(pi t / total_steps)) / 2 at step t.
  """
  x = ((x - mean) / std).reshape(-1, batch_size, x.shape[1])
  y, mask = y.reshape(-1, batch_size), mask.reshape(-1, batch_size)

  def loss(p, xb, yb, mb):
    logits = xb @ p["w"] + p["b"]
    data = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
    return jnp.sum(data * mb) / jnp.maximum(jnp.sum(mb), 1.0) + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  def step(carry, batch):
    p, state, t = carry
    grads = jax.grad(loss)(p, *batch)
    updates, state = _ADAM.update(grads, state, p)
    rate = learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t / total_steps, 1.0)))
    p = jax.tree.map(lambda w, u: w - rate * u, p, updates)
    return (p, state, t + 1.0), None

  (params, opt_state, _), _ = jax.lax.scan(
      step, (params, opt_state, jnp.float32(first_step)), (x, y, mask))
  return params, opt_state


class MinibatchSoftmaxProbe:
  """One probe: `train_block` on every block of every epoch, then `top1` (see the module doc)."""

  def __init__(self, dim: int, num_classes: int, mean: np.ndarray, std: np.ndarray, *,
               l2: float, total_steps: int, batch_size: int, seed: int | list[int],
               learning_rate: float = DEFAULT_LEARNING_RATE):
    self.batch_size = int(batch_size)
    self._mean = jnp.asarray(mean, jnp.float32)
    self._std = jnp.asarray(std, jnp.float32)
    self._l2 = jnp.float32(l2)
    self._total_steps = float(max(1, int(total_steps)))
    self._learning_rate = float(learning_rate)
    self._step = 0
    self.params = {"w": jnp.zeros((dim, num_classes), jnp.float32),
                   "b": jnp.zeros((num_classes,), jnp.float32)}
    self._opt_state = _ADAM.init(self.params)
    self._rng = np.random.default_rng(seed)

  @staticmethod
  def steps_per_block(rows: int, batch_size: int) -> int:
    return math.ceil(rows / batch_size)

  def train_block(self, x: np.ndarray, y: np.ndarray) -> None:
    """Adam steps on one block [rows, dim] of train features (raw; standardised here)."""
    rows = len(x)
    order = self._rng.permutation(rows)
    padded = self.steps_per_block(rows, self.batch_size) * self.batch_size
    xb = np.zeros((padded, x.shape[1]), np.float32)
    xb[:rows] = x[order]
    yb = np.zeros(padded, np.int32)
    yb[:rows] = y[order]
    mask = np.zeros(padded, np.float32)
    mask[:rows] = 1.0
    self.params, self._opt_state = _train_block(
        self.params, self._opt_state, jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(mask),
        self._mean, self._std, self._l2, np.float32(self._step), np.float32(self._total_steps),
        np.float32(self._learning_rate), batch_size=self.batch_size)
    self._step += padded // self.batch_size

  def logits(self, x: np.ndarray) -> np.ndarray:
    z = (jnp.asarray(x, jnp.float32) - self._mean) / self._std
    return np.asarray(z @ self.params["w"] + self.params["b"])

  def top1(self, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(self.logits(x), axis=1) == np.asarray(y)))
