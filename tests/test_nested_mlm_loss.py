"""The fused nested decoder + cross-entropy (`nested_xent_sums`, `BertMLM.mlm_sums`).

References: a float64 numpy loop over the sizes (logits h[:, :m] E[:, :m]^T + b,
log-softmax, argmax) with the closed-form gradients of softmax cross-entropy,
and the unfused path (`prefix_sum_logits` logits into `tasks.mlm.masked_lm_sums`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from float32_tolerance import float32_atol
from mrl_jax.models.bert import BertEncoder, BertMLM
from mrl_jax.models.nested_mlm_head import NestedMLMHead, nested_xent_sums
from mrl_jax.nesting import Nesting
from mrl_jax.tasks import mlm

WIDTH, VOCAB = 32, 97


def _problem(seed: int):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(2, 5, WIDTH)).astype(np.float32)
  e = (0.5 * rng.normal(size=(VOCAB, WIDTH))).astype(np.float32)
  b = (0.3 * rng.normal(size=(VOCAB,))).astype(np.float32)
  ids = rng.integers(0, VOCAB, (2, 5)).astype(np.int32)
  # Zeros (unused prediction slots), fractions and ones.
  w = rng.choice([0.0, 0.5, 1.0], size=(2, 5)).astype(np.float32)
  w[0, 0] = 0.0
  return h, e, b, ids, w


def _float64_reference(h, e, b, ids, w, dims, coef):
  """Sums per size and the gradients of sum_i coef_i * loss_sum_i, in float64."""
  h, e, b = (np.asarray(a, np.float64) for a in (h, e, b))
  h, ids, w = h.reshape(-1, h.shape[-1]), ids.reshape(-1), np.asarray(w, np.float64).reshape(-1)
  onehot = np.eye(e.shape[0])[ids]
  loss, correct, margins = [], [], []
  dh, de, db = np.zeros_like(h), np.zeros_like(e), np.zeros_like(b)
  for c, m in zip(coef, dims):
    logits = h[:, :m] @ e[:, :m].T + b
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    loss.append(np.sum(w * (lse - logits[np.arange(len(ids)), ids])))
    correct.append(np.sum(w * (logits.argmax(1) == ids)))
    top2 = np.sort(logits, axis=1)[:, -2:]
    margins.append(np.min(top2[:, 1] - top2[:, 0]))
    dlogits = c * w[:, None] * (np.exp(logits - lse[:, None]) - onehot)
    dh[:, :m] += dlogits @ e[:, :m]
    de[:, :m] += dlogits.T @ h[:, :m]
    db += dlogits.sum(0)
  return np.array(loss), np.array(correct), min(margins), (dh, de, db)


@pytest.mark.parametrize("dims", [(4, 8, 16, 32), (3, 7, 32), (1, 5, 20), (32,)])
def test_fused_sums_and_gradients_equal_a_float64_per_size_loop(dims):
  h, e, b, ids, w = _problem(seed=len(dims) + dims[0])
  coef = np.linspace(0.5, 1.5, len(dims))
  chunks = Nesting.create(dims).chunks

  def objective(h, e, b):
    sums = nested_xent_sums(h, e, b, chunks, jnp.asarray(ids), jnp.asarray(w))
    return jnp.sum(jnp.asarray(coef, jnp.float32) * sums["loss_sum"]), sums

  (_, sums), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(
      jnp.asarray(h), jnp.asarray(e), jnp.asarray(b))
  loss, correct, margin, ref_grads = _float64_reference(h, e, b, ids, w, dims, coef)

  # A logit is a d-term dot product; a loss term is lse - true logit (2 logit
  # errors), summed over the predictions with weights <= 1.
  logit_scale = float(np.max(np.abs(h).reshape(-1, WIDTH) @ np.abs(e).T + np.abs(b)))
  logit_err = float32_atol(logit_scale, WIDTH)
  assert margin > 10 * logit_err  # the argmax is well defined at float32 precision
  total_w = float(w.sum())
  np.testing.assert_allclose(np.asarray(sums["loss_sum"]), loss,
                             atol=2 * logit_err * total_w + float32_atol(np.abs(loss).max(),
                                                                          h.size // WIDTH))
  np.testing.assert_array_equal(np.asarray(sums["correct"]), correct)
  assert float(sums["count"]) == total_w

  # Gradients: a softmax entry is off by about its logits' error (relative),
  # then summed over n sizes and contracted over V (dh) or the predictions (dE).
  abs_e, abs_h = np.abs(e).astype(np.float64), np.abs(h).reshape(-1, WIDTH).astype(np.float64)
  g_scale = float(np.sum(coef)) * w.reshape(-1)[:, None] * np.ones((1, VOCAB))  # >= |G| / 2
  for name, got, want, scale, fan_in in [
      ("dh", grads[0].reshape(-1, WIDTH), ref_grads[0], 2 * g_scale @ abs_e, VOCAB),
      ("dE", grads[1], ref_grads[1], 2 * g_scale.T @ abs_h, h.size // WIDTH),
      ("db", grads[2], ref_grads[2], 2 * g_scale.sum(0), h.size // WIDTH)]:
    s = float(np.max(scale))
    atol = float32_atol(s, fan_in, depth=len(dims)) + 2 * logit_err * s
    np.testing.assert_allclose(np.asarray(got), want, atol=atol, err_msg=name)
  # Dims past the largest size get no gradient.
  assert np.all(np.asarray(grads[0])[..., dims[-1]:] == 0)
  assert np.all(np.asarray(grads[1])[:, dims[-1]:] == 0)


def _tiny_mlm(dims) -> BertMLM:
  def build():
    encoder = BertEncoder(None, vocab_size=VOCAB, width=WIDTH, depth=1, num_heads=2, mlp_dim=64,
                          max_len=12, dropout=0.0, attention_dropout=0.0, rngs=nnx.Rngs(0))
    return BertMLM(encoder, NestedMLMHead(WIDTH, VOCAB, dims, rngs=nnx.Rngs(1)))
  graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), params)
  rest = jax.tree.map(lambda a: jax.random.key(0, impl="rbg")
                      if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                      else jnp.zeros(a.shape, a.dtype), rest)
  return graphdef, params, rest


def test_bert_mlm_sums_equal_the_unfused_loss_in_value_and_parameter_gradients():
  dims = (2, 6, 32)
  graphdef, params, rest = _tiny_mlm(dims)
  rng = np.random.default_rng(4)
  batch = {"input_ids": jnp.asarray(rng.integers(0, VOCAB, (2, 12)), jnp.int32),
           "masked_positions": jnp.asarray([[1, 4, 7], [2, 3, 10]], jnp.int32),
           "masked_ids": jnp.asarray(rng.integers(0, VOCAB, (2, 3)), jnp.int32),
           "masked_weights": jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], jnp.float32)}
  weights = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)

  def fused(params):
    model = nnx.merge(graphdef, params, rest)
    sums = model.mlm_sums(batch["input_ids"], masked_positions=batch["masked_positions"],
                          masked_ids=batch["masked_ids"],
                          masked_weights=batch["masked_weights"], train=False)
    return mlm.nested_mlm_xent_of_sums(sums, weights)[0]

  def unfused(params):
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["input_ids"], masked_positions=batch["masked_positions"], train=False)
    return mlm.nested_mlm_xent(logits, batch["masked_ids"], batch["masked_weights"], weights)[0]

  got, got_grads = jax.jit(jax.value_and_grad(fused))(params)
  want, want_grads = jax.jit(jax.value_and_grad(unfused))(params)
  # Same float32 ops in another order: a few roundings of the loss (~log V) apart.
  np.testing.assert_allclose(float(got), float(want), atol=float32_atol(float(want), VOCAB))
  # One scale for all: some true gradients are exactly 0 (the key bias, under
  # softmax's shift invariance), so their float32 values are rounding noise of
  # the others.
  scale = max(float(np.max(np.abs(r))) for r in jax.tree.leaves(want_grads))
  for path, g, r in zip(jax.tree.leaves_with_path(got_grads), jax.tree.leaves(got_grads),
                        jax.tree.leaves(want_grads)):
    # Backprop through the 1-layer encoder: depth ~ layers on the way back.
    np.testing.assert_allclose(np.asarray(g), np.asarray(r),
                               atol=float32_atol(scale, VOCAB * WIDTH, depth=8),
                               err_msg=jax.tree_util.keystr(path[0]))
  assert math.isfinite(float(got))
