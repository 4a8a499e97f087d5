"""BERT's masked-LM head with nested (Matryoshka) prefixes of the tied decoder.

BERT scores a masked token with a transform, then a decoder tied to the word
embeddings E [V, d] with its own bias b [V]:

    h = LayerNorm(gelu(Dense(hidden)))          # the transform, d -> d
    logits = h @ E^T + b

The nested head scores every prefix size m in `nesting.dims` with the first
m dims of h against the first m columns of E:

    logits_m = h[..., :m] @ E[:, :m]^T + b

Where the nesting sits, and why: AFTER the transform, on the vector h that
meets E. The transform's Dense and LayerNorm mix all d dims (LayerNorm's mean
and variance are over the whole vector), so slicing its input would need one
transform per size, d^2 parameters and d^2 multiply-adds each; after it, the
decoder is exactly the MRL-E layer of the paper ("the last layer replaced by
the MRL layer"): one weight matrix (here the tied E) whose first m columns
score prefix m, one bias shared by all sizes. For the tied decoder "mrl" and
"mrl_e" are the same head (there is only one E to slice), and "ff" is the same
head with the single size k.

The sentence embedding that matches is z = transform(pool(hidden)) (see
`BertMLM.embed`): its prefixes z[:m] are the vectors the decoder trains.

Cost: the chunks between consecutive sizes (`nesting.chunks`) are multiplied
once each and the partial logits summed as a running total, so all sizes
together cost d * V multiply-adds per scored token, the same as the plain
decoder (a per-size loop costs sum(m) * V, about 2x for a doubling list).

Training does not need the logits themselves, only each size's cross-entropy:
`NestedMLMHead.masked_lm_sums` fuses the decoder with the loss
(`nested_xent_sums`, a hand-written VJP). Its forward keeps one size's logits
at a time (logsumexp, true-token logit, argmax) instead of a [n, ..., V]
float32 stack; its backward recomputes the running sums (one more d x V
product per token, cheaper on a CPU than writing and re-reading the stack),
turns each size into c_i * w * (softmax_i - onehot) and sums them as the
reverse running sum G_j of `prefix_sum_logits`, so autodiff's scatter of the
true-token gradient and its separate passes over every size are gone
(benchmarks/README.md, "Nested MLM head overhead on BERT", for the numbers).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.models.nested_head import prefix_sum_logits
from mrl_jax.nesting import Nesting

# BERT's initialisation: N(0, 0.02) dense kernels, zero biases, LN ones/zeros.
_KERNEL_INIT = nnx.initializers.normal(stddev=0.02)
LAYER_NORM_EPS = 1e-12


def bert_layer_norm(width: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance: with eps 1e-12 nothing hides the one-pass formula's
  # cancellation on activations with large means.
  return nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


class MLMTransform(nnx.Module):
  """Dense(d, d) -> exact (erf) GELU -> LayerNorm(eps 1e-12): BERT's `transform`."""

  def __init__(self, width: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.dense = nnx.Linear(width, width, kernel_init=_KERNEL_INIT,
                            bias_init=nnx.initializers.zeros, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
    self.norm = bert_layer_norm(width, dtype, param_dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(nnx.gelu(self.dense(x), approximate=False))


class NestedMLMHead(nnx.Module):
  """transform, then nested logits against the tied embedding: [num_sizes, ..., V].

  Parameters: `transform/dense/{kernel,bias}`, `transform/norm/{scale,bias}`
  and the decoder bias `bias` [V]. The decoder weight is not a parameter of
  the head: it is the encoder's word embedding, passed to every call.
  """

  def __init__(self, width: int, vocab_size: int, dims: Sequence[int], *,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.nesting = Nesting.create(dims)
    if self.nesting.dims[-1] > width:
      raise ConfigError(f"config.nesting.dims={self.nesting.dims} goes up to "
                        f"{self.nesting.dims[-1]} but the BERT width is {width}: drop the "
                        "larger sizes or use a wider model.")
    self.width, self.vocab_size, self.dtype = width, vocab_size, dtype
    self.transform = MLMTransform(width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((vocab_size,), param_dtype))

  def decode(self, h: jax.Array, embedding: jax.Array,
             dims: Sequence[int] | None = None) -> jax.Array:
    """Nested logits of transformed vectors h [..., d] against E [V, d]: [n, ..., V].

    `dims` scores other prefix sizes than the head's own (at most the width):
    e.g. a plain (FF) model's decoder truncated to every size, the paper's
    "truncated FF" baseline.
    """
    chunks = self.nesting.chunks if dims is None else _checked_nesting(dims, self.width).chunks
    h = h.astype(self.dtype)
    embedding = embedding.astype(self.dtype)
    # The MRL-E running sum with its hand-written backward (models/nested_head.py);
    # dims past the largest size (an "ff" head on k < d) are unused.
    return prefix_sum_logits(h, embedding, self.bias[...].astype(self.dtype),
                             chunks, classes_first=True)

  def __call__(self, hidden: jax.Array, embedding: jax.Array,
               dims: Sequence[int] | None = None) -> jax.Array:
    """Final hidden states [..., d] (already gathered) -> nested logits [n, ..., V]."""
    return self.decode(self.transform(hidden.astype(self.dtype)), embedding, dims)

  def masked_lm_sums(self, hidden: jax.Array, embedding: jax.Array, masked_ids: jax.Array,
                     masked_weights: jax.Array,
                     dims: Sequence[int] | None = None) -> dict[str, jax.Array]:
    """`tasks.mlm.masked_lm_sums` of this head's logits, without materializing them.

    hidden [..., d] (already gathered), masked_ids and masked_weights [...]:
    {"loss_sum" [n], "correct" [n], "count" []}, differentiable in the
    parameters and `embedding` (not in the ids or weights).
    """
    chunks = self.nesting.chunks if dims is None else _checked_nesting(dims, self.width).chunks
    h = self.transform(hidden.astype(self.dtype))
    return nested_xent_sums(h, embedding.astype(self.dtype), self.bias[...].astype(self.dtype),
                            chunks, masked_ids, masked_weights)


def _checked_nesting(dims: Sequence[int], width: int) -> Nesting:
  nesting = Nesting.create(dims)
  if nesting.dims[-1] > width:
    raise ValueError(f"dims={nesting.dims} go past the model's width {width}.")
  return nesting


def naive_nested_mlm_logits(h: jax.Array, embedding: jax.Array, bias: jax.Array,
                            dims: Sequence[int]) -> jax.Array:
  """Reference: one full product per size, h[..., :m] @ E[:, :m]^T + b, stacked.

  Tests and the benchmark compare `NestedMLMHead.decode` against it.
  """
  return jnp.stack([h[..., :m] @ embedding[:, :m].T + bias for m in dims])


def _size_logits(chunks, h, embedding, bias):
  """Yields (chunk, logits of its size): the running sum b + h_0 E_0^T + ..., as in decode."""
  running = bias
  for start, end in chunks:
    running = running + h[:, start:end] @ embedding[:, start:end].T
    yield (start, end), running


def _xent_forward(chunks, h, embedding, bias, ids, weights):
  lse, true, correct = [], [], []
  for _, logits in _size_logits(chunks, h, embedding, bias):
    logits = logits.astype(jnp.float32)
    lse.append(jax.nn.logsumexp(logits, axis=-1))
    true.append(jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0])
    correct.append((jnp.argmax(logits, axis=-1) == ids).astype(jnp.float32))
  lse, true, correct = jnp.stack(lse), jnp.stack(true), jnp.stack(correct)
  return (jnp.sum((lse - true) * weights, axis=1), jnp.sum(correct * weights, axis=1)), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nested_xent(chunks, h, embedding, bias, ids, weights):
  return _xent_forward(chunks, h, embedding, bias, ids, weights)[0]


def _nested_xent_fwd(chunks, h, embedding, bias, ids, weights):
  sums, lse = _xent_forward(chunks, h, embedding, bias, ids, weights)
  # Only the per-size logsumexp [n, N] is kept; the logits are recomputed.
  return sums, (h, embedding, bias, ids, weights, lse)


def _nested_xent_bwd(chunks, residuals, cotangents):
  h, embedding, bias, ids, weights, lse = residuals
  dloss, _ = cotangents  # "correct" is piecewise constant: no gradient
  dtype = h.dtype
  onehot = jnp.arange(embedding.shape[0])[None, :] == ids[:, None]
  per_size = list(_size_logits(chunks, h, embedding, bias))
  dh, dembedding, grad = [None] * len(chunks), [None] * len(chunks), None
  for j in reversed(range(len(chunks))):  # G_j = sum_{i >= j} dlogits_i, each written once
    (start, end), logits = per_size[j]
    scale = (dloss[j] * weights)[:, None]
    dlogits = scale * (jnp.exp(logits.astype(jnp.float32) - lse[j][:, None]) - onehot)
    grad = dlogits if grad is None else grad + dlogits
    g = grad.astype(dtype)
    dh[j] = g @ embedding[:, start:end]
    dembedding[j] = g.T @ h[:, start:end]
  dh, dembedding = jnp.concatenate(dh, axis=1), jnp.concatenate(dembedding, axis=1)
  unused = h.shape[1] - chunks[-1][1]
  if unused:  # dims past the largest size get no gradient
    dh = jnp.pad(dh, ((0, 0), (0, unused)))
    dembedding = jnp.pad(dembedding, ((0, 0), (0, unused)))
  dbias = jnp.sum(grad, axis=0).astype(bias.dtype)
  return dh.astype(dtype), dembedding.astype(embedding.dtype), dbias, None, None


_nested_xent.defvjp(_nested_xent_fwd, _nested_xent_bwd)


def nested_xent_sums(h: jax.Array, embedding: jax.Array, bias: jax.Array,
                     chunks: Sequence[tuple[int, int]], masked_ids: jax.Array,
                     masked_weights: jax.Array) -> dict[str, jax.Array]:
  """Per-size weighted cross-entropy and accuracy sums of the nested decoder's logits.

  Equals `tasks.mlm.masked_lm_sums(prefix_sum_logits(h, embedding, bias, chunks,
  classes_first=True), masked_ids, masked_weights)` (softmax in float32):
  {"loss_sum" [n], "correct" [n], "count" []}, h [..., d], embedding E [V, d],
  bias [V], masked_ids / masked_weights [...]. Gradients flow to h, E and bias.
  """
  chunks = tuple((int(s), int(e)) for s, e in chunks)
  weights = masked_weights.astype(jnp.float32).reshape(-1)
  loss_sum, correct = _nested_xent(chunks, h.reshape(-1, h.shape[-1]), embedding, bias,
                                   masked_ids.astype(jnp.int32).reshape(-1), weights)
  return {"loss_sum": loss_sum, "correct": correct, "count": jnp.sum(weights)}
