"""Nested losses and per-size metrics over logits shaped [num_sizes, B, C].

The MRL objective is sum_m c_m * L(W_m z[:m], y): each size's loss is
averaged over the (unmasked) batch, then weighted by c_m and summed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections


def _masked_mean(per_example: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean over the last (batch) axis, counting only rows with mask 1."""
  if mask is None:
    return per_example.mean(axis=-1)
  mask = mask.astype(per_example.dtype)
  return (per_example * mask).sum(axis=-1) / jnp.maximum(mask.sum(), 1.0)


def nested_softmax_xent(logits: jax.Array, labels: jax.Array, weights: jax.Array, *,
                        label_smoothing: float = 0.0,
                        mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy per size for integer labels [B].

  Label smoothing follows PyTorch's `CrossEntropyLoss(label_smoothing=eps)`:
  the target is (1 - eps) * one_hot + eps / C. Returns (weighted total, per-size [n]).
  """
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[None, :, None], axis=-1)[..., 0]
  if label_smoothing:
    uniform = -log_probs.mean(axis=-1)
    nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  per_size = _masked_mean(nll, mask)
  return jnp.sum(jnp.asarray(weights, jnp.float32) * per_size), per_size


def nested_sigmoid_xent(logits: jax.Array, labels: jax.Array, weights: jax.Array, *,
                        mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Sigmoid cross-entropy per size for multi-hot labels [B, C] (multi-label data).

  Summed over classes and averaged over examples, as for JFT-style training.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)[None]
  per_class = -(labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
  per_size = _masked_mean(per_class.sum(axis=-1), mask)
  return jnp.sum(jnp.asarray(weights, jnp.float32) * per_size), per_size


def nested_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where a size's top-1 class is right: [num_sizes, B].

  For multi-hot labels, "right" means the top class is one of the true ones
  (precision@1).
  """
  top1 = jnp.argmax(logits, axis=-1)
  if labels.ndim == 2:
    return jnp.take_along_axis(labels[None].astype(jnp.float32), top1[..., None], axis=-1)[..., 0]
  return (top1 == labels[None]).astype(jnp.float32)


def nested_top1(logits: jax.Array, labels: jax.Array,
                mask: jax.Array | None = None) -> jax.Array:
  """Top-1 accuracy per size: [num_sizes]."""
  return _masked_mean(nested_correct(logits, labels), mask)


def nested_loss(config: ml_collections.ConfigDict, logits: jax.Array, labels: jax.Array,
                weights: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(weighted total loss, per-size losses) of `config.loss` for integer or multi-hot labels.

  "sigmoid" turns integer labels into one-hot targets; "softmax" applies
  `config.label_smoothing` (default 0).
  """
  if config.loss == "sigmoid":
    if labels.ndim == 1:
      labels = jax.nn.one_hot(labels, logits.shape[-1])
    return nested_sigmoid_xent(logits, labels, weights, mask=mask)
  return nested_softmax_xent(logits, labels, weights, mask=mask,
                             label_smoothing=config.get("label_smoothing", 0.0))
