"""Nested losses against closed forms and PyTorch's cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mrl_jax import losses


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_xent_matches_torch_weighted_sum(smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 8, 5)) * 3
  labels = rng.integers(0, 5, size=8)
  weights = np.array([2.0, 1.0, 0.5])
  total, per_size = losses.nested_softmax_xent(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels), weights, label_smoothing=smoothing)
  ce = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
  expected = [ce(torch.from_numpy(l), torch.from_numpy(labels)).item() for l in logits]
  np.testing.assert_allclose(per_size, expected, rtol=1e-5)
  np.testing.assert_allclose(total, np.dot(weights, expected), rtol=1e-5)


def test_softmax_xent_closed_form_uniform_logits():
  # Equal logits: every size's loss is log(C) whatever the labels.
  total, per_size = losses.nested_softmax_xent(
      jnp.zeros((4, 6, 10)), jnp.arange(6) % 10, jnp.ones(4))
  np.testing.assert_allclose(per_size, np.log(10.0) * np.ones(4), rtol=1e-6)
  np.testing.assert_allclose(total, 4 * np.log(10.0), rtol=1e-6)


def test_mask_ignores_padded_rows():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, size=6))
  mask = jnp.array([1, 1, 1, 0, 0, 0], jnp.float32)
  _, masked = losses.nested_softmax_xent(logits, labels, jnp.ones(2), mask=mask)
  _, first3 = losses.nested_softmax_xent(logits[:, :3], labels[:3], jnp.ones(2))
  np.testing.assert_allclose(masked, first3, rtol=1e-6)
  acc = losses.nested_top1(logits, labels, mask)
  np.testing.assert_allclose(acc, losses.nested_top1(logits[:, :3], labels[:3]))


def test_sigmoid_xent_matches_torch():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 5, 7))
  labels = (rng.random((5, 7)) < 0.3).astype(np.float32)
  total, per_size = losses.nested_sigmoid_xent(jnp.asarray(logits, jnp.float32),
                                               jnp.asarray(labels), jnp.array([1.0, 3.0]))
  bce = torch.nn.BCEWithLogitsLoss(reduction="none")
  expected = [bce(torch.from_numpy(l), torch.from_numpy(labels).double()).sum(-1).mean().item()
              for l in logits]
  np.testing.assert_allclose(per_size, expected, rtol=1e-5)
  np.testing.assert_allclose(total, expected[0] + 3 * expected[1], rtol=1e-5)


def test_top1_single_and_multilabel():
  logits = jnp.array([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]],
                      [[5.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
  np.testing.assert_allclose(losses.nested_top1(logits, jnp.array([1, 0])), [1.0, 0.0])
  multi_hot = jnp.array([[0, 1, 1], [0, 0, 1]])
  np.testing.assert_allclose(losses.nested_top1(logits, multi_hot), [0.5, 0.5])


def test_gradients_flow_to_every_size():
  def loss(logits):
    return losses.nested_softmax_xent(logits, jnp.array([0, 1]), jnp.array([1.0, 0.0, 2.0]))[0]
  grads = jax.grad(loss)(jnp.zeros((3, 2, 4)))
  norms = jnp.abs(grads).sum(axis=(1, 2))
  assert norms[0] > 0 and norms[1] == 0 and norms[2] == pytest.approx(2 * norms[0])
