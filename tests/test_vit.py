"""ViT encoder: reference parameter counts, torch-equal forward, remat, posemb resize, sharding."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import subprocess_env
from float32_tolerance import float32_atol
from mrl_jax import models, sharding
from mrl_jax.errors import ConfigError
from mrl_jax.models import vit
from mrl_jax.models.vit import SHARDING_RULES, ViT

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch=4, image_size=16)


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(tree, nnx.Param)))


def _random_params(model: nnx.Module, seed: int) -> nnx.Module:
  """Fills every parameter of an abstract model with N(0, 0.3) drawn by numpy.

  On CPU, eager init compiles one XLA program per parameter shape (seconds per
  tiny model); an abstract model filled from numpy is instant. Random LN
  scales/biases and attention biases (the real init makes them 1/0/~0) also
  make the torch comparison see every parameter. Dropout RNG streams get
  fixed keys, so two models built with the same seed draw the same masks.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), params)
  rest_leaves, treedef = jax.tree.flatten(rest)
  rest = treedef.unflatten([
      jax.random.key(seed + i) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
      else jnp.zeros(a.shape, a.dtype) for i, a in enumerate(rest_leaves)])
  return nnx.merge(graphdef, params, rest)


def _tiny(seed: int = 0, **kw) -> ViT:
  """A tiny ViT with random parameters (and dropout keys)."""
  args = {**TINY, **kw}
  return _random_params(nnx.eval_shape(lambda: ViT(rngs=nnx.Rngs(0), **args)), seed)


def _images(shape, seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@nnx.jit(static_argnames="train")
def _forward(model: ViT, x: jax.Array, train: bool) -> jax.Array:
  return model(x, train=train)


# ---------------------------------------------------------------- parameter counts

def _vit_config(variant: str, **model_kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      model={**dict(name="vit", variant=variant, pool="token", representation_size=None,
                    dropout=0.0, remat=False), **model_kw},
      head="ff", ff_dim=None, head_bias=True, compute_dtype="float32",
      nesting=dict(dims=(8, 16)), data=dict(image_size=224)))


def _abstract_classifier(config: ml_collections.ConfigDict, num_classes: int = 1000):
  return nnx.eval_shape(lambda: models.build_model(config, num_classes=num_classes,
                                                   in_channels=3, rngs=nnx.Rngs(0)))


def _closed_form_count(width, depth, mlp_dim, patch, image=224, channels=3, classes=1000,
                       cls_token=True, representation_size=None) -> int:
  d, tokens = width, (image // patch) ** 2 + cls_token
  embed = patch * patch * channels * d + d + cls_token * d + tokens * d
  block = 2 * 2 * d + 4 * (d * d + d) + (d * mlp_dim + mlp_dim) + (mlp_dim * d + d)
  out = representation_size or d
  pre_logits = d * out + out if representation_size else 0
  return embed + depth * block + 2 * d + pre_logits + out * classes + classes


def test_vit_b16_has_the_reference_parameter_count():
  model = _abstract_classifier(_vit_config("B/16"))
  assert model.head.kernels[0].shape == (768, 1000)
  assert _num_params(model) == 86_567_656  # timm/torchvision vit_b_16, 1000 classes
  assert _closed_form_count(768, 12, 3072, 16) == 86_567_656


@pytest.mark.parametrize("variant,arch", [("S/16", (384, 12, 1536)), ("L/16", (1024, 24, 4096)),
                                          ("Ti/16", (192, 12, 768))])
def test_other_variants_match_closed_form(variant, arch):
  assert _num_params(_abstract_classifier(_vit_config(variant))) == \
      _closed_form_count(*arch, patch=16)


def test_gap_and_representation_layer_counts(shallow_variants):
  config = _vit_config("Ti/32", pool="gap", representation_size=128, image_size=96)
  assert models.embedding_dim(config) == 128
  model = _abstract_classifier(config, num_classes=10)
  assert model.encoder.cls_token is None and model.encoder.grid == (3, 3)
  assert _num_params(model) == _closed_form_count(192, 1, 768, 32, image=96, classes=10,
                                                  cls_token=False, representation_size=128)


def test_parameter_paths_and_kernel_layouts(shallow_variants):
  vit.VARIANTS["Ti"] = (192, 4, 768, 3)
  model = _abstract_classifier(_vit_config("Ti/16"))
  flat = {sharding.path_to_str(p): v.shape for p, v in nnx.to_flat_state(nnx.state(model))}
  assert flat["encoder/blocks/3/attn/q_proj/kernel"] == (192, 3, 64)
  assert flat["encoder/blocks/3/attn/v_proj/bias"] == (3, 64)
  assert flat["encoder/blocks/3/attn/out_proj/kernel"] == (3, 64, 192)
  assert flat["encoder/blocks/3/mlp/fc1/kernel"] == (192, 768)
  assert flat["encoder/blocks/3/mlp/fc2/kernel"] == (768, 192)
  assert flat["encoder/patch_embed/kernel"] == (16, 16, 3, 192)
  assert flat["encoder/pos_embedding"] == (1, 197, 192)
  assert flat["encoder/cls_token"] == (1, 1, 192)
  assert "encoder/blocks/4/norm1/scale" not in flat
  # No dropout: the model state holds parameters only.
  assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))


@pytest.mark.parametrize("variant", ["B/15", "X/16", "b/16", "B16", "ViT-B/16", "", None])
def test_bad_variant_is_a_config_error_naming_the_choices(variant):
  with pytest.raises(ConfigError, match=r"Ti.*H.*8, 14, 16, 32"):
    vit.parse_variant(variant)
  with pytest.raises(ConfigError, match=r"Ti.*H.*8, 14, 16, 32"):
    models.embedding_dim(_vit_config(variant))


@pytest.fixture
def shallow_variants(monkeypatch):
  """One block per variant: registry tests do not need 12 blocks traced."""
  for name, (width, _, mlp_dim, heads) in list(vit.VARIANTS.items()):
    monkeypatch.setitem(vit.VARIANTS, name, (width, 1, mlp_dim, heads))


def test_other_config_errors(shallow_variants):
  with pytest.raises(ConfigError, match="pool"):
    nnx.eval_shape(lambda: ViT(pool="cls", rngs=nnx.Rngs(0), **TINY))
  with pytest.raises(ConfigError, match="variant"):
    nnx.eval_shape(lambda: ViT(width=32, rngs=nnx.Rngs(0)))
  config = _vit_config("Ti/16")
  config.data.image_size = None
  with pytest.raises(ConfigError, match="image_size"):
    _abstract_classifier(config)


def test_model_image_size_overrides_data_image_size(shallow_variants):
  assert _abstract_classifier(_vit_config("Ti/16", image_size=64)).encoder.grid == (4, 4)
  assert _abstract_classifier(_vit_config("Ti/16")).encoder.grid == (14, 14)


def test_explicit_dims_override_the_variant():
  model = nnx.eval_shape(lambda: ViT("B/16", depth=2, image_size=32, rngs=nnx.Rngs(0)))
  assert (model.width, model.depth, model.patch, len(model.blocks)) == (768, 2, 16, 2)
  # The same through the registry (configs/vit_jft.py's `:runlocal` sets model.depth).
  config = _vit_config("Ti/8", depth=2, width=96, image_size=32)
  assert models.embedding_dim(config) == 96
  encoder = _abstract_classifier(config, num_classes=10).encoder
  assert (encoder.width, len(encoder.blocks), encoder.num_heads, encoder.grid) == (96, 2, 3, (4, 4))


# ---------------------------------------------------------------- forward vs torch

def _torch_params(model: ViT) -> dict[str, torch.Tensor]:
  return {sharding.path_to_str(p): torch.from_numpy(np.asarray(v[...]).copy())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _torch_vit(p: dict[str, torch.Tensor], x: torch.Tensor, *, num_heads: int, pool: str,
               representation: bool) -> torch.Tensor:
  """The original ViT, eval mode, with torch ops and nn.MultiheadAttention. x is NCHW."""
  w = p["patch_embed/kernel"]
  h = F.conv2d(x, w.permute(3, 2, 0, 1), p["patch_embed/bias"], stride=w.shape[0])
  h = h.flatten(2).transpose(1, 2)  # [B, gh*gw, d], row-major over the grid
  d = h.shape[-1]
  if pool == "token":
    h = torch.cat([p["cls_token"].expand(h.shape[0], 1, d), h], dim=1)
  h = h + p["pos_embedding"]
  i = 0
  while f"blocks/{i}/norm1/scale" in p:
    b = lambda name: p[f"blocks/{i}/{name}"]  # noqa: E731 (bound per block)
    attn = torch.nn.MultiheadAttention(d, num_heads, batch_first=True)
    # Per-head [d, heads, hd] kernels flatten head-major into torch's [3d, d] in_proj.
    attn.in_proj_weight.data = torch.cat([b(f"attn/{n}_proj/kernel").reshape(d, d).T
                                          for n in "qkv"])
    attn.in_proj_bias.data = torch.cat([b(f"attn/{n}_proj/bias").reshape(d) for n in "qkv"])
    attn.out_proj.weight.data = b("attn/out_proj/kernel").reshape(d, d).T
    attn.out_proj.bias.data = b("attn/out_proj/bias")
    y = F.layer_norm(h, (d,), b("norm1/scale"), b("norm1/bias"), eps=1e-6)
    h = h + attn(y, y, y, need_weights=False)[0]
    y = F.layer_norm(h, (d,), b("norm2/scale"), b("norm2/bias"), eps=1e-6)
    y = F.gelu(y @ b("mlp/fc1/kernel") + b("mlp/fc1/bias"))
    h = h + y @ b("mlp/fc2/kernel") + b("mlp/fc2/bias")
    i += 1
  h = F.layer_norm(h, (d,), p["norm/scale"], p["norm/bias"], eps=1e-6)
  z = h[:, 0] if pool == "token" else h.mean(dim=1)
  if representation:
    z = torch.tanh(z @ p["pre_logits/kernel"] + p["pre_logits/bias"])
  return z


@pytest.mark.parametrize("pool,representation_size", [("token", None), ("gap", None),
                                                      ("token", 24)])
def test_forward_matches_torch_reference(pool, representation_size):
  model = _tiny(pool=pool, representation_size=representation_size)
  x = _images((3, 16, 16, 3))
  with jax.default_matmul_precision("highest"):
    got = np.asarray(_forward(model, x, False))
  with torch.no_grad():  # In float64: the reference's own rounding drops out.
    want = _torch_vit({k: v.double() for k, v in _torch_params(model).items()},
                      torch.from_numpy(np.array(x)).double().permute(0, 3, 1, 2),
                      num_heads=TINY["num_heads"], pool=pool,
                      representation=representation_size is not None).numpy()
  assert got.shape == (3, representation_size or TINY["width"]) and got.dtype == np.float32
  # Longest sum: the patch embedding or an MLP layer; in sequence: the patch
  # embedding, per block q/k/v, scores, weighted values, out, fc1, fc2, pre-logits.
  atol = float32_atol(np.abs(want).max(), fan_in=max(TINY["patch"] ** 2 * 3, TINY["mlp_dim"]),
                      depth=2 + 6 * TINY["depth"])
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def test_bfloat16_compute_float32_params_and_output():
  model = _tiny(dtype=jnp.bfloat16)
  assert {a.dtype for a in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("float32")}
  x = _images((2, 16, 16, 3))
  graphdef, state = nnx.split(model)
  tokens = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s).tokens(v, train=False), state, x)
  assert tokens.dtype == jnp.bfloat16
  z = np.asarray(_forward(model, x, False))
  assert z.dtype == np.float32
  ref = nnx.merge(nnx.graphdef(_tiny()), state)  # same weights, float32 compute
  want = np.asarray(_forward(ref, x, False))
  np.testing.assert_allclose(z, want, atol=0.05 * np.abs(want).max())


# ---------------------------------------------------------------- remat

def _loss_and_grads(model: ViT, x: jax.Array, train: bool):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    z = nnx.merge(graphdef, params, rest, copy=True)(x, train=train)
    return jnp.sum(jnp.sin(z)), z

  (_, z), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(z), jax.tree.map(np.asarray, grads)


def test_remat_gives_identical_outputs_and_grads():
  """Training mode with dropout: the recomputed blocks must replay the same masks."""
  model = _tiny(depth=1, dropout=0.2)
  remat = _tiny(depth=1, dropout=0.2, remat=True)  # same seed: same params and keys
  x = _images((2, 16, 16, 3))
  z, grads = _loss_and_grads(model, x, True)
  z_r, grads_r = _loss_and_grads(remat, x, True)
  np.testing.assert_array_equal(z, z_r)
  # Equal up to float32 rounding: recomputation changes XLA's fusion and sum order.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads, grads_r)
  # The rematerialised model really checkpoints each block; the plain one does not.
  def jaxpr(m):
    graphdef, state = nnx.split(m)
    return str(jax.make_jaxpr(lambda s, v: nnx.merge(graphdef, s)(v, train=True))(state, x))
  assert jaxpr(remat).count("remat") == 1  # jax.checkpoint's primitive, once per block
  assert jaxpr(_tiny(remat=True)).count("remat") == TINY["depth"]
  assert "remat" not in jaxpr(model)
  # Dropout is on in training only.
  assert not np.allclose(z, np.asarray(_forward(model, x, False)))


def test_reference_initializers(monkeypatch):
  """Each parameter gets the original ViT's initializer; each initializer has its law.

  The initializers are swapped for constant fills to see which one each
  parameter used without compiling a random draw per shape.
  """
  fills = {"_DENSE_INIT": 1.0, "_DENSE_BIAS_INIT": 2.0, "_POSEMB_INIT": 3.0, "_LECUN_INIT": 4.0}
  laws = {name: getattr(vit, name) for name in fills}
  for name, value in fills.items():
    monkeypatch.setattr(vit, name, lambda key, shape, dtype=jnp.float32, v=value:
                        jnp.full(shape, v, dtype))
  m = ViT(rngs=nnx.Rngs(0), **{**TINY, "depth": 1, "representation_size": 8})
  got = {sharding.path_to_str(p): float(np.unique(np.asarray(v[...]))[0])
         for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))
         if np.unique(np.asarray(v[...])).size == 1}
  for n in ("q", "k", "v", "out"):
    assert got[f"blocks/0/attn/{n}_proj/kernel"] == 1.0
    assert got[f"blocks/0/attn/{n}_proj/bias"] == 2.0
  for n in ("fc1", "fc2"):
    assert (got[f"blocks/0/mlp/{n}/kernel"], got[f"blocks/0/mlp/{n}/bias"]) == (1.0, 2.0)
  assert got["pos_embedding"] == 3.0 and got["cls_token"] == 0.0
  assert (got["patch_embed/kernel"], got["patch_embed/bias"]) == (4.0, 0.0)
  assert (got["pre_logits/kernel"], got["pre_logits/bias"]) == (4.0, 0.0)
  assert (got["blocks/0/norm1/scale"], got["norm/bias"]) == (1.0, 0.0)
  assert m.norm.epsilon == 1e-6 and m.blocks[0].norm2.epsilon == 1e-6

  key = jax.random.key(0)
  pos = np.asarray(laws["_POSEMB_INIT"](key, (64, 64)))
  assert 0.019 < pos.std() < 0.021 and np.abs(pos).max() > 0.07  # untruncated N(0, 0.02)
  k = np.asarray(laws["_DENSE_INIT"](key, (32, 96)))
  limit = np.sqrt(6 / (32 + 96))  # Xavier-uniform bound
  assert np.abs(k).max() <= limit and np.abs(k).max() > 0.95 * limit
  assert 0 < np.abs(np.asarray(laws["_DENSE_BIAS_INIT"](key, (64,)))).max() < 1e-5


# ---------------------------------------------------------------- posemb resize

def test_native_size_uses_the_stored_embeddings_unchanged():
  model = _tiny()
  np.testing.assert_array_equal(np.asarray(model.position_embeddings(model.grid)),
                                np.asarray(model.pos_embedding[...]))
  grid = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 8)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(vit.resize_posemb_grid(grid, (4, 4))), grid)


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_posemb_is_interpolated_bilinearly_for_other_sizes(pool):
  model = _tiny(pool=pool)
  n_cls = pool == "token"
  pos = np.asarray(model.pos_embedding[...])
  new = np.asarray(model.position_embeddings((6, 7)))
  assert new.shape == (1, n_cls + 42, 32)
  np.testing.assert_array_equal(new[:, :n_cls], pos[:, :n_cls])  # class token kept
  grid = torch.from_numpy(pos[0, n_cls:].reshape(4, 4, 32).copy()).permute(2, 0, 1)[None]
  want = F.interpolate(grid, size=(6, 7), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(new[0, n_cls:], want[0].permute(1, 2, 0).reshape(42, 32).numpy(),
                             rtol=1e-5, atol=1e-6)
  shape = (2, 24, 28, 3) if pool == "token" else (2, 8, 8, 3)  # larger / smaller than trained
  z = np.asarray(_forward(model, _images(shape), False))
  assert z.shape == (2, 32) and np.all(np.isfinite(z))


# ---------------------------------------------------------------- sharding

class FakeMesh:
  """Only the axis sizes matter to `spec_for`."""

  def __init__(self, **shape):
    self.shape = shape


def test_sharding_rules_give_megatron_specs():
  mesh = FakeMesh(data=2, fsdp=2, model=2)
  spec = lambda name, shape: sharding.spec_for(name, shape, mesh, SHARDING_RULES)  # noqa: E731
  b = "encoder/blocks/3/"
  assert spec(b + "attn/q_proj/kernel", (768, 12, 64)) == P("fsdp", "model", None)
  assert spec(b + "attn/k_proj/bias", (12, 64)) == P("model", None)
  assert spec(b + "attn/out_proj/kernel", (12, 64, 768)) == P("model", None, "fsdp")
  assert spec(b + "attn/out_proj/bias", (768,)) == P(None)
  assert spec(b + "mlp/fc1/kernel", (768, 3072)) == P("fsdp", "model")
  assert spec(b + "mlp/fc1/bias", (3072,)) == P("model")
  assert spec(b + "mlp/fc2/kernel", (3072, 768)) == P("model", "fsdp")
  assert spec(b + "mlp/fc2/bias", (768,)) == P(None)
  assert spec("head/kernels/0/value", (768, 1000)) == P("fsdp", "model")
  assert spec("head/bias", (1, 1000)) == P(None, "model")
  assert spec("encoder/patch_embed/kernel", (16, 16, 3, 768)) == P(None, None, None, "fsdp")
  # Optimizer state follows the same rules; 3 heads do not split over 2 devices.
  assert spec("1/0/mu/" + b + "attn/v_proj/kernel/value", (192, 3, 64)) == P("fsdp", None, None)
  assert spec("1/0/mu/" + b + "mlp/fc1/kernel", (192, 768)) == P("fsdp", "model")


SHARDED_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from mrl_jax import sharding
    from mrl_jax.models.classifier import NestedClassifier
    from mrl_jax.models.nested_head import NestedHead
    from mrl_jax.models.vit import SHARDING_RULES, ViT

    assert jax.device_count() == 8
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, model=2))
    abstract = nnx.eval_shape(lambda: NestedClassifier(
        ViT(width=64, depth=1, mlp_dim=256, num_heads=4, patch=4, image_size=16,
            rngs=nnx.Rngs(0)),
        NestedHead((16, 64), 10, rngs=nnx.Rngs(0))))
    graphdef, params = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), params)
    images = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    labels = np.arange(8) % 10

    def loss_fn(params, images, labels):
      _, logits = nnx.merge(graphdef, params)(images, train=True)
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, labels[None, :, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss_fn))
    with jax.default_matmul_precision("highest"):
      loss1, grads1 = step(jax.device_put(params, jax.devices()[0]), images, labels)
      loss1 = float(loss1)
      shardings = sharding.tree_shardings(params, mesh, SHARDING_RULES)
      placed = jax.device_put(params, shardings)
      specs = {sharding.path_to_str(p): x.sharding.spec
               for p, x in jax.tree_util.tree_leaves_with_path(placed)}
      assert specs["encoder/blocks/0/attn/q_proj/kernel"] == P(None, "model", None), specs
      assert specs["encoder/blocks/0/attn/out_proj/kernel"] == P("model", None, None), specs
      assert specs["encoder/blocks/0/mlp/fc1/kernel"] == P("fsdp", "model"), specs
      assert specs["encoder/blocks/0/mlp/fc2/kernel"] == P("model", "fsdp"), specs
      assert specs["head/kernels/0"] == P(None, "model"), specs
      batch = sharding.global_batch({"image": images, "label": labels}, mesh)
      loss8, grads8 = step(placed, batch["image"], batch["label"])
      loss8 = float(loss8)  # wait: CPU collectives hang on queued steps
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-4, atol=1e-6),
                 grads8, grads1)
    print("OK", loss1, loss8)
""")


def test_sharded_forward_backward_matches_one_device():
  result = subprocess.run([sys.executable, "-c", SHARDED_CHECK], env=subprocess_env(8),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "OK" in result.stdout
