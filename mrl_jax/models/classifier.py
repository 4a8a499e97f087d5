"""An encoder followed by a nested head: images -> (embedding z, nested logits)."""

from __future__ import annotations

import jax
from flax import nnx

from mrl_jax.models.nested_head import NestedHead


class NestedClassifier(nnx.Module):
  """Parameter paths start with `encoder/` or `head/` (sharding rules match on them)."""

  def __init__(self, encoder: nnx.Module, head: NestedHead):
    self.encoder = encoder
    self.head = head

  def __call__(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    z = self.encoder(images, train=train)
    return z, self.head(z)
