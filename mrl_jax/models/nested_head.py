"""Nested classification heads: one set of logits per prefix size of the embedding.

Kinds (`config.head`):
  * ``mrl``: a separate classifier W_m (m x C) per prefix size m.
  * ``mrl_e``: one classifier W (d x C); prefix m is scored by W[:m] (no extra
    parameters, "efficient" MRL). The bias is shared by all sizes, as in the
    official `MRL_Linear_Layer(efficient=True)`.
  * ``ff``: the fixed-feature baseline, a plain classifier on z[:k]; it is the
    ``mrl`` head with the single size k, so it needs no code of its own.

Cost (multiply-adds per example, the minimum for each kind):
  * ``mrl``: sum(m) * C. Classifier i reads its prefix once: one GEMM per
    size, traced into one jitted computation, each classifier its own
    parameter (`kernels[i]`, [m_i, C], the official `nesting_classifier_i`).
    Two batched alternatives cost the same multiply-adds and measured slower
    (benchmarks/nested_head.py, d=2048, C=1000): per-chunk partial products
    accumulated across sizes write (n + 1) / 2 times more partial logits (1.8x
    slower on CPU, 1.2x on an H100), and one stacked [sum(m), C] parameter
    split per size adds a full copy of the weights and their gradient (1.25x
    slower on CPU).
  * ``mrl_e``: d * C. The embedding is cut into the chunks between consecutive
    sizes; each chunk is multiplied once by its rows of the shared W and the
    partial logits are summed as a running total, so prefix m_i costs only its
    new rows. The naive loop re-multiplies the shared leading features for
    every size: sum(m) * C, about 2x for a doubling nesting list.
No masked full-width copies are made for either kind.

Why MRL-E was 2.3x a plain linear head at equal multiply-adds, and what
changed (`benchmarks/nested_head.py`, d=2048, C=1000, batch 256, nesting
8..2048, fwd+bwd, 2-core CPU; optimized HLO and jax.profiler op times): the
27 GEMMs (9 chunks x forward, dz, dW) were not the problem; the elementwise
work autodiff derived from the running sum was. XLA fused the running sum
into each size's consumer (size i re-adds all i partial products: 45 partial
reads for 9 sizes), added the bias in a separate pass over [9, B, C], and the
backward materialized two more [9, B, C] arrays (the biased logits for the
loss and their gradient) before the reverse running sum; elementwise fusions
took 6.5 ms of op time per step against the plain head's 0.35 ms. The
custom VJP (`prefix_sum_logits`) puts the bias in the first running sum,
saves only z and W, and builds the chunk gradients G_j = sum_{i >= j}
dlogits_i as one reverse running sum that reads dlogits in place, each G_j
written once; elementwise op time fell to 3.0 ms and the step from 1.8-2.3x
to 1.17-1.36x the plain head (the spread is across runs on a shared machine).
What is left, per step (op time summed over threads): the chunked GEMMs take
~50% longer than the plain head's three GEMMs at equal multiply-adds (the
K=8..64 chunks are output-bound and XLA runs independent GEMMs side by side,
one thread each), the chunk slices of W and z and the concatenated dW and dz
copy 10 MiB each way (~2.8 ms), and 9 sizes of logits cost the loss 9x the
elementwise work of one. Merging the small leading sizes into one masked GEMM,
a scan or cumsum for the running sum, and the bias as an extra GEMM row were
measured and were no faster.

Class padding (`class_multiple`): a head over C classes whose class dim shards
over the "model" mesh axis needs C divisible by that axis (JFT-300M's 18,291
classes divide by no power of two). With `class_multiple=k` the parameters hold
ceil(C / k) * k class columns, fixed by the config rather than the mesh so a
checkpoint restores on any mesh, and the logits are cut back to the C real
classes (the sliced columns never reach a loss, so they get no gradient).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.nesting import Nesting

HEAD_KINDS = ("mrl", "mrl_e", "ff")


class NestedHead(nnx.Module):
  """Scores every prefix z[:m], m in `dims`; returns logits [num_sizes, B, C]."""

  def __init__(self, nesting: Nesting | Sequence[int], num_classes: int, *,
               efficient: bool = False, use_bias: bool = True, dtype=jnp.float32,
               param_dtype=jnp.float32, class_multiple: int = 1, rngs: nnx.Rngs):
    """`nesting`: the run's Nesting (built once, shared with the loss), or bare sizes."""
    if class_multiple < 1:
      raise ConfigError(f"config.head_class_multiple={class_multiple} must be >= 1.")
    self.nesting = nesting if isinstance(nesting, Nesting) else Nesting.create(nesting)
    self.num_classes = num_classes
    stored_classes = -(-num_classes // class_multiple) * class_multiple
    self.stored_classes = stored_classes
    self.efficient = efficient
    self.dtype = dtype
    n = self.nesting.num_sizes
    key = rngs.params()
    if efficient:
      d = self.nesting.dims[-1]
      self.kernel = nnx.Param(
          jax.random.normal(key, (d, stored_classes), param_dtype) / np.sqrt(d))
      self.bias = nnx.Param(jnp.zeros((stored_classes,), param_dtype)) if use_bias else None
    else:
      # Each classifier gets LeCun-normal scale for its own fan-in m_i.
      keys = jax.random.split(key, n)
      self.kernels = nnx.List([
          nnx.Param(jax.random.normal(k, (m, stored_classes), param_dtype) / np.sqrt(m))
          for k, m in zip(keys, self.nesting.dims)])
      self.bias = nnx.Param(jnp.zeros((n, stored_classes), param_dtype)) if use_bias else None

  def __call__(self, z: jax.Array) -> jax.Array:
    z = z.astype(self.dtype)
    if self.efficient:
      kernel = self.kernel[...].astype(self.dtype)
      bias = None if self.bias is None else self.bias[...].astype(self.dtype)
      logits = prefix_sum_logits(z, kernel, bias, self.nesting.chunks)
      bias = None  # already in the running sums
    else:
      logits = jnp.stack([z[:, :m] @ w[...].astype(self.dtype)
                          for m, w in zip(self.nesting.dims, self.kernels)])
      bias = None if self.bias is None else self.bias[...].astype(self.dtype)[:, None, :]
    logits = logits if bias is None else logits + bias
    return logits[..., :self.num_classes] if self.stored_classes > self.num_classes else logits

  def per_size_kernels(self) -> list[jax.Array]:
    """Classifier i as an [m_i, C] matrix (the layout of a plain Linear layer)."""
    if self.efficient:
      return [self.kernel[...][:m] for m in self.nesting.dims]
    return [w[...] for w in self.kernels]

  def set_per_size_kernels(self, kernels: Sequence[jax.Array]) -> None:
    """Inverse of `per_size_kernels` (for ``mrl_e``, pass the single [d, C] matrix)."""
    if self.efficient:
      (kernel,) = kernels
      targets, kernels = [self.kernel], [kernel]
    else:
      targets = list(self.kernels)
    if [tuple(k.shape) for k in kernels] != [t[...].shape for t in targets]:
      raise ValueError(f"Head kernels have shapes {[tuple(k.shape) for k in kernels]}, "
                       f"expected {[t[...].shape for t in targets]}.")
    for target, kernel in zip(targets, kernels):
      target[...] = jnp.asarray(kernel, target[...].dtype)


def _chunk_product(z_chunk: jax.Array, kernel: jax.Array, start: int, end: int,
                   classes_first: bool) -> jax.Array:
  if classes_first:  # kernel [C, d], e.g. a tied word embedding
    return z_chunk @ kernel[:, start:end].T
  return z_chunk @ kernel[start:end]


def _running_logits(chunks, classes_first, z, kernel, bias):
  """Logits of every prefix: bias + z_0 W_0 + ... + z_i W_i, one chunk product each."""
  logits, running = [], bias
  for start, end in chunks:
    partial = _chunk_product(z[:, start:end], kernel, start, end, classes_first)
    running = partial if running is None else running + partial
    logits.append(running)
  return jnp.stack(logits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _prefix_sum_logits(chunks, classes_first, z, kernel, bias):
  return _running_logits(chunks, classes_first, z, kernel, bias)


def _prefix_sum_logits_fwd(chunks, classes_first, z, kernel, bias):
  return _running_logits(chunks, classes_first, z, kernel, bias), (z, kernel, bias)


def _prefix_sum_logits_bwd(chunks, classes_first, residuals, dlogits):
  z, kernel, bias = residuals
  grads, running = [None] * len(chunks), None
  for j in reversed(range(len(chunks))):  # G_j = sum_{i >= j} dlogits_i, each written once
    running = dlogits[j] if running is None else running + dlogits[j]
    grads[j] = running
  if classes_first:
    dz = [g @ kernel[:, s:e] for (s, e), g in zip(chunks, grads)]
    dkernel = jnp.concatenate([g.T @ z[:, s:e] for (s, e), g in zip(chunks, grads)], axis=1)
  else:
    dz = [g @ kernel[s:e].T for (s, e), g in zip(chunks, grads)]
    dkernel = jnp.concatenate([z[:, s:e].T @ g for (s, e), g in zip(chunks, grads)], axis=0)
  unused = kernel.shape[1 if classes_first else 0] - chunks[-1][1]
  if unused:  # features past the largest size (an "ff" head on k < d) get no gradient
    dkernel = jnp.pad(dkernel, ((0, 0), (0, unused)) if classes_first else ((0, unused), (0, 0)))
  dbias = None if bias is None else jnp.sum(grads[0], axis=0)
  return jnp.concatenate(dz, axis=1), dkernel, dbias


_prefix_sum_logits.defvjp(_prefix_sum_logits_fwd, _prefix_sum_logits_bwd)


def prefix_sum_logits(z: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                      chunks: Sequence[tuple[int, int]], *,
                      classes_first: bool = False) -> jax.Array:
  """MRL-E logits of every prefix, [num_chunks, ..., C], at d x C multiply-adds per row.

  Size i's logits are bias + sum_{j <= i} z[..., chunk_j] @ W[chunk_j] for the
  disjoint `chunks` (`Nesting.chunks`), W = `kernel` [d, C] or, with
  `classes_first`, `kernel` [C, d] (a tied embedding). The backward is written
  by hand (autodiff of the running sum costs more than the GEMMs; see the
  module docstring): chunk j's gradient G_j = sum_{i >= j} dlogits_i is one
  reverse running sum, then dz_j = G_j W_j^T and dW_j = z_j^T G_j, one GEMM
  each, and dbias = sum_rows G_0.
  """
  chunks = tuple((int(s), int(e)) for s, e in chunks)
  d = chunks[-1][1]
  lead = z.shape[:-1]
  logits = _prefix_sum_logits(chunks, classes_first, z[..., :d].reshape(-1, d), kernel, bias)
  return logits.reshape((len(chunks), *lead, logits.shape[-1]))


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
