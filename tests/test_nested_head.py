"""NestedHead against the official MRL_Linear_Layer semantics (naive per-size loop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.models.nested_head import NestedHead, head_dims, naive_nested_logits
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
