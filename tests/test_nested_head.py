"""NestedHead against the official MRL_Linear_Layer semantics (naive per-size loop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.models.nested_head import (NestedHead, head_dims, naive_nested_logits,
                                        prefix_sum_logits)
from mrl_jax.nesting import Nesting

DIMS = (4, 8, 16, 32)


class TorchMRLLinear(torch.nn.Module):
  """The official RAIVNLab/MRL `MRL_Linear_Layer`, transcribed as the reference."""

  def __init__(self, nesting_list, num_classes, efficient=False, bias=True):
    super().__init__()
    self.nesting_list, self.efficient = nesting_list, efficient
    if efficient:
      self.nesting_classifier_0 = torch.nn.Linear(nesting_list[-1], num_classes, bias=bias)
    else:
      for i, m in enumerate(nesting_list):
        setattr(self, f"nesting_classifier_{i}", torch.nn.Linear(m, num_classes, bias=bias))

  def forward(self, x):
    out = []
    for i, m in enumerate(self.nesting_list):
      if self.efficient:
        fc = self.nesting_classifier_0
        logits = x[:, :m] @ fc.weight[:, :m].t()
        out.append(logits if fc.bias is None else logits + fc.bias)
      else:
        out.append(getattr(self, f"nesting_classifier_{i}")(x[:, :m]))
    return out


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_official_torch_layer(efficient, use_bias):
  torch.manual_seed(0)
  ref = TorchMRLLinear(list(DIMS), 7, efficient=efficient, bias=use_bias).double()
  head = NestedHead(DIMS, 7, efficient=efficient, use_bias=use_bias, rngs=nnx.Rngs(0))
  # Copy the torch weights in: torch Linear stores [C, m], ours [m, C].
  if efficient:
    head.set_per_size_kernels([ref.nesting_classifier_0.weight.detach().numpy().T])
    if use_bias:
      head.bias[...] = jnp.asarray(ref.nesting_classifier_0.bias.detach().numpy(), jnp.float32)
  else:
    fcs = [getattr(ref, f"nesting_classifier_{i}") for i in range(len(DIMS))]
    head.set_per_size_kernels([fc.weight.detach().numpy().T for fc in fcs])
    if use_bias:
      head.bias[...] = jnp.asarray(np.stack([fc.bias.detach().numpy() for fc in fcs]), jnp.float32)
  x = np.random.default_rng(1).normal(size=(5, 32))
  expected = np.stack([o.detach().numpy() for o in ref(torch.from_numpy(x))])
  with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls.
    got = np.asarray(head(jnp.asarray(x, jnp.float32)))
  assert got.shape == (len(DIMS), 5, 7)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("efficient", [False, True])
def test_matches_naive_loop_and_round_trips_layout(efficient):
  head = NestedHead(DIMS, 11, efficient=efficient, rngs=nnx.Rngs(3))
  head.bias[...] = jax.random.normal(jax.random.key(2), head.bias[...].shape)
  z = jax.random.normal(jax.random.key(1), (6, 32))
  kernels = head.per_size_kernels()
  assert [k.shape for k in kernels] == [(m, 11) for m in DIMS]
  bias = head.bias[...]
  biases = [bias] * len(DIMS) if efficient else list(bias)
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(head(z), naive_nested_logits(z, kernels, biases, DIMS),
                               rtol=1e-5, atol=1e-5)
  # Writing the per-size layout back gives the same chunk-major parameters.
  before = jax.tree.leaves(nnx.state(head, nnx.Param))
  head.set_per_size_kernels(kernels[-1:] if efficient else kernels)
  for a, b in zip(before, jax.tree.leaves(nnx.state(head, nnx.Param))):
    np.testing.assert_array_equal(a, b)


def test_parameter_counts():
  c = 1000
  mrl = NestedHead((8, 16, 32, 64, 128, 256, 512, 1024, 2048), c, rngs=nnx.Rngs(0))
  mrl_e = NestedHead((8, 16, 32, 64, 128, 256, 512, 1024, 2048), c, efficient=True,
                     rngs=nnx.Rngs(0))
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(mrl) == 4088 * c + 9 * c  # sum(m) * C weights plus a bias per size
  assert count(mrl_e) == 2048 * c + c


def test_per_size_init_scale():
  head = NestedHead((8, 512), 2000, rngs=nnx.Rngs(0))
  small, large = head.per_size_kernels()
  assert np.std(small) == pytest.approx(1 / np.sqrt(8), rel=0.05)
  assert np.std(large) == pytest.approx(1 / np.sqrt(512), rel=0.05)


def test_ff_is_single_size_head():
  assert head_dims("ff", DIMS, 8, 32) == (8,)
  assert head_dims("ff", DIMS, None, 32) == (32,)
  assert head_dims("mrl_e", DIMS, None, 32) == DIMS
  with pytest.raises(ConfigError, match="config.head"):
    head_dims("nested", DIMS, None, 32)


@pytest.mark.parametrize("dims, weights, match", [
    ((8, 8, 16), None, "strictly increasing"),
    ((16, 8), None, "strictly increasing"),
    ((8, 16), (1.0,), "one weight per size"),
    ((), None, "empty"),
])
def test_bad_nesting_is_a_config_error(dims, weights, match):
  with pytest.raises(ConfigError, match=match):
    Nesting.create(dims, weights)


def test_nesting_larger_than_embedding():
  with pytest.raises(ConfigError, match="embedding has only 32 dims"):
    Nesting.create((8, 64), embedding_dim=32)
  assert Nesting.create((8, 16, 32)).chunks == ((0, 8), (8, 16), (16, 32))


@pytest.mark.parametrize("efficient", [False, True])
def test_class_padding_stores_whole_multiples_and_scores_only_real_classes(efficient):
  dims, classes = (4, 8, 16), 13
  padded = NestedHead(dims, classes, efficient=efficient, class_multiple=8, rngs=nnx.Rngs(0))
  plain = NestedHead(dims, classes, efficient=efficient, rngs=nnx.Rngs(1))
  kernels = [k[:, :classes] for k in padded.per_size_kernels()]
  plain.set_per_size_kernels(kernels[-1:] if efficient else kernels)
  plain.bias[...] = padded.bias[...][..., :classes]
  assert all(k.shape[-1] == 16 for k in padded.per_size_kernels())
  z = jax.random.normal(jax.random.key(2), (5, 16))
  logits = padded(z)
  assert logits.shape == (3, 5, classes)
  np.testing.assert_allclose(logits, plain(z), rtol=1e-6, atol=1e-6)

  graphdef, params = nnx.split(padded)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(z) ** 2))(params)
  kernel_grads = [g for g in jax.tree.leaves(grads) if g.ndim == 2 and g.shape[0] in dims]
  assert len(kernel_grads) == (1 if efficient else 3)
  for g in kernel_grads:  # the stored padding columns are inert
    assert np.all(np.asarray(g)[:, classes:] == 0) and np.any(np.asarray(g)[:, :classes] != 0)


@pytest.mark.parametrize("dims", [(3, 10, 64), (8, 16, 32, 64), (64,)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_mrl_e_values_and_gradients_match_float64_naive_loop(dims, use_bias):
  """The MRL-E chunked forward and its hand-written backward against the naive loop.

  Reference: the per-size loop z[:, :m] @ W[:m] + b and its closed-form
  gradients for a random cotangent R, in float64 (numpy). Tolerance: float32
  rounding of a sum of K products is at most ~K * eps * sum|terms|, with K the
  longest reduction each output sees (prefix length + one add per size for the
  logits, batch x sizes for dW, classes x sizes for dz).
  """
  batch, classes, n = 6, 11, len(dims)
  head = NestedHead(dims, classes, efficient=True, use_bias=use_bias, rngs=nnx.Rngs(0))
  if use_bias:
    head.bias[...] = jax.random.normal(jax.random.key(4), head.bias[...].shape)
  z = jax.random.normal(jax.random.key(5), (batch, dims[-1]))
  cot = jax.random.normal(jax.random.key(6), (n, batch, classes))
  graphdef, params = nnx.split(head)

  def loss(p, x):
    return jnp.sum(nnx.merge(graphdef, p)(x) * cot)

  with jax.default_matmul_precision("highest"):
    logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, z)
    grad_p, grad_z = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, z)

  w = np.asarray(head.kernel[...], np.float64)
  b = np.asarray(head.bias[...], np.float64) if use_bias else np.zeros(classes)
  x, r = np.asarray(z, np.float64), np.asarray(cot, np.float64)
  eps = np.finfo(np.float32).eps
  want_logits = np.stack([x[:, :m] @ w[:m] + b for m in dims])
  mag_logits = np.stack([np.abs(x[:, :m]) @ np.abs(w[:m]) + np.abs(b) for m in dims])
  want_dw, mag_dw = np.zeros_like(w), np.zeros_like(w)
  want_dz, mag_dz = np.zeros_like(x), np.zeros_like(x)
  for i, m in enumerate(dims):
    want_dw[:m] += x[:, :m].T @ r[i]
    mag_dw[:m] += np.abs(x[:, :m]).T @ np.abs(r[i])
    want_dz[:, :m] += r[i] @ w[:m].T
    mag_dz[:, :m] += np.abs(r[i]) @ np.abs(w[:m]).T
  checks = [(logits, want_logits, mag_logits, dims[-1] + n + 1),
            (grad_p["kernel"][...], want_dw, mag_dw, batch * n),
            (grad_z, want_dz, mag_dz, classes * n)]
  if use_bias:
    checks.append((grad_p["bias"][...], r.sum(axis=(0, 1)), np.abs(r).sum(axis=(0, 1)),
                   batch * n))
  else:
    assert "bias" not in grad_p or grad_p["bias"] is None
  for got, want, magnitude, length in checks:
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= 2 * length * eps * magnitude + 1e-30)


@pytest.mark.parametrize("classes_first", [False, True])
def test_prefix_sum_logits_on_fewer_features_than_the_kernel(classes_first):
  """Sizes (3, 10) on a 16-wide kernel (an "ff"-style head, or the tied [V, d]
  embedding): logits and gradients equal the per-size loop under autodiff, and
  the kernel's features past the largest size get exactly zero gradient."""
  dims, classes = (3, 10), 7
  chunks = Nesting.create(dims).chunks
  z = jax.random.normal(jax.random.key(0), (2, 3, 16))
  w = jax.random.normal(jax.random.key(1), (16, classes))
  b = jax.random.normal(jax.random.key(2), (classes,))
  cot = jax.random.normal(jax.random.key(3), (len(dims), 2, 3, classes))
  kernel = w.T if classes_first else w

  def fast(z, kernel, b):
    return prefix_sum_logits(z, kernel, b, chunks, classes_first=classes_first)

  def naive(z, kernel, b):
    w_ = kernel.T if classes_first else kernel
    return jnp.stack([z[..., :m] @ w_[:m] + b for m in dims])

  with jax.default_matmul_precision("highest"):
    got = jax.grad(lambda *a: jnp.sum(fast(*a) * cot), argnums=(0, 1, 2))(z, kernel, b)
    want = jax.grad(lambda *a: jnp.sum(naive(*a) * cot), argnums=(0, 1, 2))(z, kernel, b)
    np.testing.assert_allclose(fast(z, kernel, b), naive(z, kernel, b), rtol=1e-5, atol=1e-5)
  for g, w_ in zip(got, want):
    assert g.shape == w_.shape
    np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-5)
  unused = got[1][:, 10:] if classes_first else got[1][10:]
  assert np.all(np.asarray(unused) == 0) and np.all(np.asarray(got[0])[..., 10:] == 0)
