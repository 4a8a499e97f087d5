"""The nested contrastive loss (CLIP softmax / SigLIP sigmoid per prefix size) and its metric.

References: a float64 per-size loop that normalises each prefix on its own
(jax in float64 for the gradients); the sharded loss on 8 CPU devices against
the single-device one.
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import subprocess_env
from float32_tolerance import float32_atol
from mrl_jax import losses
from mrl_jax.errors import ConfigError

B, D = 8, 20


def naive_loss(image, text, dims, weights, scale, bias, kind):
  """Per size: normalise the prefixes, full logits, then the textbook loss."""
  n, batch = len(dims), image.shape[0]
  scale = jnp.broadcast_to(scale, (n,))
  per = []
  for k, m in enumerate(dims):
    a = image[:, :m] / jnp.sqrt(jnp.sum(image[:, :m] ** 2, -1, keepdims=True) + 1e-12)
    b = text[:, :m] / jnp.sqrt(jnp.sum(text[:, :m] ** 2, -1, keepdims=True) + 1e-12)
    logits = scale[k] * a @ b.T
    if kind == "softmax":
      own = jnp.diagonal(logits)
      per.append(0.5 * (jnp.mean(jax.nn.logsumexp(logits, 1) - own)
                        + jnp.mean(jax.nn.logsumexp(logits, 0) - own)))
    else:
      if bias is not None:
        logits = logits + jnp.broadcast_to(bias, (n,))[k]
      z = 2.0 * jnp.eye(batch) - 1.0
      per.append(-jnp.sum(jax.nn.log_sigmoid(z * logits)) / batch)
  per = jnp.stack(per)
  return jnp.sum(jnp.asarray(weights, per.dtype) * per), per


def _embeddings(seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(B, D))
  text = 0.7 * image + rng.normal(size=(B, D))
  image[1, :8] = 0.0  # a zero prefix: its cosine is 0 (epsilon), never NaN
  return image, text


CASES = {
    # kind, dims, weights, scale, bias
    "softmax_ragged_zero_weight": ("softmax", (3, 8, 20), (1.0, 0.0, 2.0), 5.0, None),
    "softmax_short_per_size_scale": ("softmax", (4, 12), (1.0, 0.5), [3.0, 7.0], None),
    "sigmoid_per_size_scale_bias": ("sigmoid", (3, 8, 20), (1.0, 0.5, 2.0),
                                    [3.0, 5.0, 10.0], [-1.0, -2.0, -3.0]),
    "sigmoid_one_short_size": ("sigmoid", (5,), (1.0,), 10.0, -10.0),
    "sigmoid_no_bias": ("sigmoid", (2, 6, 20), (0.3, 1.0, 1.0), 4.0, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_gradients_match_float64_per_size_loop(case):
  kind, dims, weights, scale, bias = CASES[case]
  image, text = _embeddings()
  args = [image, text, np.asarray(scale)] + ([] if bias is None else [np.asarray(bias)])
  argnums = tuple(range(len(args)))

  def ours(i, t, s, *b):
    return losses.nested_contrastive_loss(i, t, dims, weights, scale=s,
                                          bias=b[0] if b else None, kind=kind)

  (total, per), grads = jax.jit(jax.value_and_grad(ours, argnums, has_aux=True))(
      *[jnp.asarray(a, jnp.float32) for a in args])
  with jax.enable_x64(True):
    def ref(i, t, s, *b):
      return naive_loss(i, t, dims, weights, s, b[0] if b else None, kind)
    (ref_total, ref_per), ref_grads = jax.jit(jax.value_and_grad(ref, argnums, has_aux=True))(
        *[jnp.asarray(a, jnp.float64) for a in args])
  assert per.dtype == jnp.float32 and per.shape == (len(dims),)
  # Float32 error of a B x d contraction, then a softmax over B, in ~3 steps; the
  # logits are up to max(scale) in size.
  logit_scale = float(np.max(np.abs(scale)))
  atol = float32_atol(max(logit_scale, float(np.max(np.abs(ref_per)))), B * D, depth=3)
  np.testing.assert_allclose(per, ref_per, rtol=0, atol=atol)
  np.testing.assert_allclose(total, ref_total, rtol=0, atol=atol * sum(weights))
  for name, g, r in zip(("image", "text", "scale", "bias"), grads, ref_grads):
    r = np.asarray(r)
    tol = float32_atol(logit_scale * max(float(np.max(np.abs(r))), 1e-3), B * D, depth=3)
    np.testing.assert_allclose(np.asarray(g), r, rtol=0, atol=tol, err_msg=name)
    assert np.all(np.isfinite(g)), name


def test_softmax_ignores_a_bias():
  image, text = (jnp.asarray(a, jnp.float32) for a in _embeddings())

  def loss(bias):
    return losses.nested_contrastive_loss(image, text, (4, 20), None, scale=3.0, bias=bias)[0]

  value, grad = jax.value_and_grad(loss)(jnp.float32(-5.0))
  assert float(value) == float(loss(None))
  assert float(grad) == 0.0


def test_pair_top1_matches_numpy_argmax_per_size():
  image, text = _embeddings(1)
  dims = (3, 8, 20)
  got = losses.nested_pair_top1(jnp.float32(image), jnp.float32(text), dims)
  want = []
  for m in dims:
    a = image[:, :m] / np.sqrt(np.sum(image[:, :m] ** 2, -1, keepdims=True) + 1e-12)
    b = text[:, :m] / np.sqrt(np.sum(text[:, :m] ** 2, -1, keepdims=True) + 1e-12)
    want.append(np.mean(np.argmax(a @ b.T, axis=1) == np.arange(B)))
  np.testing.assert_allclose(got, want, atol=1e-7)
  assert 0.0 < float(got[-1]) <= 1.0  # correlated pairs: some hits
  # A metric: no gradient flows back through it.
  grad = jax.grad(lambda i: losses.nested_pair_top1(i, jnp.float32(text), dims).sum())(
      jnp.float32(image))
  assert float(jnp.max(jnp.abs(grad))) == 0.0


def test_bad_arguments_are_refused_with_the_fix():
  z = jnp.ones((4, 8))
  with pytest.raises(ValueError, match="softmax"):
    losses.nested_contrastive_loss(z, z, (8,), None, scale=1.0, kind="hinge")
  with pytest.raises(ValueError, match="same shape"):
    losses.nested_contrastive_loss(z, jnp.ones((4, 6)), (4,), None, scale=1.0)
  with pytest.raises(ValueError, match="one value per size"):
    losses.nested_contrastive_loss(z, z, (4, 8), None, scale=jnp.ones(3))
  with pytest.raises(ConfigError, match="only 8 dims"):
    losses.nested_contrastive_loss(z, z, (4, 16), None, scale=1.0)


SHARDED_CHECK = textwrap.dedent("""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from mrl_jax import losses, sharding

    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    B, D = 16, 20
    image = jnp.float32(rng.normal(size=(B, D)))
    text = jnp.float32(0.7 * image + rng.normal(size=(B, D)))
    dims, weights = (3, 8, 20), (1.0, 0.5, 2.0)
    scale, bias = jnp.float32([3.0, 5.0, 10.0]), jnp.float32([-1.0, -2.0, -3.0])

    def value_and_grads(kind, mesh=None):
      def f(i, t, s, b):
        return losses.nested_contrastive_loss(i, t, dims, weights, scale=s, bias=b,
                                              kind=kind, mesh=mesh)
      return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)

    for kind in ("softmax", "sigmoid"):
      (one_total, one_per), one_grads = jax.jit(value_and_grads(kind))(image, text, scale, bias)
      one_top1 = losses.nested_pair_top1(image, text, dims)
      jax.block_until_ready(one_grads)
      for shape in (dict(data=4, fsdp=2, model=1), dict(data=8, fsdp=1, model=1),
                    dict(data=2, fsdp=2, model=2)):
        mesh = sharding.make_mesh(shape)
        rows, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)

        def context_step(i, t, s, b):  # as the train step: the mesh from the context
          with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return value_and_grads(kind)(i, t, s, b), losses.nested_pair_top1(i, t, dims)

        def explicit_step(i, t, s, b):
          return value_and_grads(kind, mesh)(i, t, s, b), losses.nested_pair_top1(
              i, t, dims, mesh=mesh)

        # The explicit mesh= argument once; the context mesh (the train step's way) on all.
        steps = (context_step, explicit_step) if shape["fsdp"] == 2 and shape["model"] == 1 \
            else (context_step,)
        for step in steps:
          args = (jax.device_put(image, rows), jax.device_put(text, rows), scale, bias)
          step = jax.jit(step, in_shardings=(rows, rows, rep, rep)).lower(*args).compile()
          ((total, per), grads), top1 = step(*args)
          jax.block_until_ready((total, grads, top1))  # CPU collectives: wait on each step
          np.testing.assert_allclose(per, one_per, rtol=0, atol=2e-5)
          np.testing.assert_allclose(total, one_total, rtol=0, atol=4e-5)
          for g, r in zip(grads, one_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=2e-6)
          np.testing.assert_array_equal(top1, one_top1)
          # Only [B, d] embeddings travel between devices, never a B x B matrix.
          hlo = step.as_text()
          gathered = re.findall(r"= (f32\\[[0-9,]*\\])[^=]*? all-gather\\(", hlo)
          assert gathered and all(s == f"f32[{B},{D}]" for s in gathered), gathered
          assert f"f32[{B},{B}]" not in " ".join(
              re.findall(r"= (f32\\[[0-9,]*\\])[^=]*? (?:all-gather|all-to-all)", hlo))
        print(kind, shape, float(total), float(one_total))
    print("OK")
""")


def test_sharded_loss_matches_one_device():
  result = subprocess.run([sys.executable, "-c", SHARDED_CHECK], env=subprocess_env(8),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "OK" in result.stdout
