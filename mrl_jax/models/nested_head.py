"""Nested classification heads: one set of logits per prefix size of the embedding.

Kinds (`config.head`):
  * ``mrl``: a separate classifier W_m (m x C) per prefix size m.
  * ``mrl_e``: one classifier W (d x C); prefix m is scored by W[:m] (no extra
    parameters, "efficient" MRL). The bias is shared by all sizes, as in the
    official `MRL_Linear_Layer(efficient=True)`.
  * ``ff``: the fixed-feature baseline, a plain classifier on z[:k]; it is the
    ``mrl`` head with the single size k, so it needs no code of its own.

Cost. The embedding is cut into the chunks between consecutive sizes. Each
chunk is multiplied once, by the rows of every classifier that reads it, and
the partial products are summed cumulatively over chunks. This costs
sum(m) * C multiply-adds for ``mrl`` and d * C for ``mrl_e``: the minimum,
with no masked full-width copies. To keep the per-step work free of weight
slicing, ``mrl`` stores its classifiers chunk-major: ``kernels[j]`` has shape
[chunk_j, num_sizes - j, C] and holds rows chunk_j of classifiers j..n-1.
`per_size_kernels` / `set_per_size_kernels` convert to and from the usual
per-classifier [m, C] layout (for export, import and tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrl_jax.config_errors import ConfigError
from mrl_jax.nesting import Nesting

HEAD_KINDS = ("mrl", "mrl_e", "ff")


class NestedHead(nnx.Module):
  """Scores every prefix z[:m], m in `dims`; returns logits [num_sizes, B, C]."""

  def __init__(self, dims: Sequence[int], num_classes: int, *, efficient: bool = False,
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.nesting = Nesting.create(dims)
    self.num_classes = num_classes
    self.efficient = efficient
    self.dtype = dtype
    n = self.nesting.num_sizes
    key = rngs.params()
    # Each classifier gets LeCun-normal scale for its own fan-in m_i.
    head_scale = np.asarray([1.0 / np.sqrt(m) for m in self.nesting.dims], np.float32)
    if efficient:
      d = self.nesting.dims[-1]
      self.kernel = nnx.Param(
          jax.random.normal(key, (d, num_classes), param_dtype) / np.sqrt(d))
      self.bias = nnx.Param(jnp.zeros((num_classes,), param_dtype)) if use_bias else None
    else:
      keys = jax.random.split(key, n)
      kernels = []
      for j, (start, end) in enumerate(self.nesting.chunks):
        scale = jnp.asarray(head_scale[j:], param_dtype)[None, :, None]
        kernels.append(nnx.Param(
            jax.random.normal(keys[j], (end - start, n - j, num_classes), param_dtype) * scale))
      self.kernels = nnx.List(kernels)
      self.bias = nnx.Param(jnp.zeros((n, num_classes), param_dtype)) if use_bias else None

  def __call__(self, z: jax.Array) -> jax.Array:
    z = z.astype(self.dtype)
    n = self.nesting.num_sizes
    if self.efficient:
      kernel = self.kernel[...].astype(self.dtype)
      partials = jnp.stack([z[:, s:e] @ kernel[s:e] for s, e in self.nesting.chunks])
      logits = jnp.cumsum(partials, axis=0)
      if self.bias is not None:
        logits = logits + self.bias[...].astype(self.dtype)
      return logits
    batch, classes = z.shape[0], self.num_classes
    logits = jnp.zeros((batch, n, classes), self.dtype)
    for j, (s, e) in enumerate(self.nesting.chunks):
      # One plain GEMM per chunk feeds classifiers j..n-1 at once, accumulated in place.
      kernel = self.kernels[j][...].astype(self.dtype).reshape(e - s, (n - j) * classes)
      logits = logits.at[:, j:].add((z[:, s:e] @ kernel).reshape(batch, n - j, classes))
    if self.bias is not None:
      logits = logits + self.bias[...].astype(self.dtype)
    return jnp.transpose(logits, (1, 0, 2))

  def per_size_kernels(self) -> list[jax.Array]:
    """Classifier i as an [m_i, C] matrix (the layout of a plain Linear layer)."""
    if self.efficient:
      return [self.kernel[...][:m] for m in self.nesting.dims]
    return [jnp.concatenate([self.kernels[j][...][:, i - j] for j in range(i + 1)], axis=0)
            for i in range(self.nesting.num_sizes)]

  def set_per_size_kernels(self, kernels: Sequence[jax.Array]) -> None:
    """Inverse of `per_size_kernels` (for ``mrl_e``, pass the single [d, C] matrix)."""
    if self.efficient:
      (kernel,) = kernels
      self.kernel[...] = jnp.asarray(kernel, self.kernel[...].dtype)
      return
    n = self.nesting.num_sizes
    for j, (s, e) in enumerate(self.nesting.chunks):
      stacked = jnp.stack([jnp.asarray(kernels[i])[s:e] for i in range(j, n)], axis=1)
      self.kernels[j][...] = stacked.astype(self.kernels[j][...].dtype)


def head_dims(kind: str, nesting_dims: Sequence[int], ff_dim: int | None,
              embedding_dim: int) -> tuple[int, ...]:
  """The sizes a head of `kind` scores: the nesting list, or (k,) for ``ff``."""
  if kind not in HEAD_KINDS:
    raise ConfigError(f"config.head={kind!r} is unknown: use one of {HEAD_KINDS}.")
  if kind == "ff":
    k = ff_dim or embedding_dim
    if not 0 < k <= embedding_dim:
      raise ConfigError(f"config.ff_dim={k} must be in [1, {embedding_dim}] "
                        "(the model's embedding size).")
    return (k,)
  return tuple(nesting_dims)


def naive_nested_logits(z: jax.Array, kernels: Sequence[jax.Array],
                        biases: Sequence[jax.Array | None], dims: Sequence[int]) -> jax.Array:
  """Reference: one full classifier per size, z[:, :m] @ W_m + b_m, stacked.

  This is the official `MRL_Linear_Layer` loop; tests and the benchmark compare
  `NestedHead` against it.
  """
  out = []
  for m, w, b in zip(dims, kernels, biases):
    logits = z[:, :m] @ w[:m]
    out.append(logits if b is None else logits + b)
  return jnp.stack(out)
