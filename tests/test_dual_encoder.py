"""The two-tower model: paths, shapes, init of the temperature and bias, the projections
and pooling against naive references, the capped scale's gradient, sharding, locking."""

import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from float32_tolerance import float32_atol
from mrl_jax import sharding
from mrl_jax.errors import ConfigError
from mrl_jax.models import build_model, dual_encoder
from mrl_jax.models.dual_encoder import FixedScalar, build_dual_encoder
from mrl_jax.nesting import Nesting

VOCAB = 40
SEQ = 6
VIT = dict(name="vit", width=16, depth=1, mlp_dim=32, num_heads=2, patch=4)
BERT = dict(name="bert", variant=None, width=24, depth=1, num_heads=2, mlp_dim=32, max_len=8,
            dropout=0.0, attention_dropout=0.0)
RESNET = dict(name="resnet", depth=18, width=4, small_images=True)


def make_config(image=VIT, text=BERT, embed_dim=12, **contrastive):
  return ml_collections.ConfigDict(dict(
      model=dict(name="dual_encoder", image=dict(image), text=dict(text), embed_dim=embed_dim),
      contrastive=contrastive, compute_dtype="float32", freeze=()))


def build(config, dims=(4, 8, 12)):
  # "rbg" keys: eager initialisation compiles ~5x faster on CPU than with threefry.
  rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
  return build_dual_encoder(config, Nesting.create(dims), in_channels=3, image_size=8,
                            vocab_size=VOCAB, rngs=rngs)


def by_path(state):
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  return {sharding.path_to_str(p): np.asarray(x) for p, x in leaves}


def batch(rows=3, seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(rows, 8, 8, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, VOCAB, size=(rows, SEQ)), jnp.int32)
  mask = jnp.asarray([[1] * SEQ, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]][:rows], jnp.int32)
  return images, ids, mask


def test_parameter_paths_shapes_and_embedding_width():
  config = make_config()
  model = build(config)
  params = by_path(nnx.state(model, nnx.Param))
  assert params["image_projection/kernel"].shape == (16, 12)
  assert params["text_projection/kernel"].shape == (24, 12)
  assert params["logit_scale"].shape == ()
  assert "logit_bias" not in params  # softmax: no bias
  assert params["image/pos_embedding"].shape == (1, 5, 16)
  assert params["text/embeddings/word/embedding"].shape == (VOCAB, 24)
  assert all(k.split("/")[0] in ("image", "text", "image_projection", "text_projection",
                                 "logit_scale") for k in params)
  images, ids, mask = batch()
  zi = model.embed_image(images, train=False)
  zt = model.embed_text(ids, attention_mask=mask, train=False)
  assert zi.shape == zt.shape == (3, dual_encoder.dual_embedding_dim(config)) == (3, 12)
  assert zi.dtype == zt.dtype == jnp.float32
  assert dual_encoder.tower_widths(config) == (16, 24)


def test_projections_and_pooling_against_naive_references():
  for pooling in ("cls", "mean"):
    model = build(make_config(text=dict(BERT, pooling=pooling)))
    images, ids, mask = batch()
    feats = np.asarray(model.image(images, train=False), np.float64)
    kernel = np.asarray(model.image_projection.kernel[...], np.float64)
    zi = np.asarray(model.embed_image(images, train=False))
    np.testing.assert_allclose(zi, feats @ kernel, rtol=0,
                               atol=float32_atol(np.abs(feats @ kernel).max(), 16))
    hidden = np.asarray(model.text(ids, attention_mask=mask, train=False), np.float64)
    if pooling == "cls":
      pooled = hidden[:, 0]
    else:  # mean over the real tokens only
      m = np.asarray(mask, np.float64)[..., None]
      pooled = (hidden * m).sum(1) / m.sum(1)
    ref = pooled @ np.asarray(model.text_projection.kernel[...], np.float64)
    zt = np.asarray(model.embed_text(ids, attention_mask=mask, train=False))
    np.testing.assert_allclose(zt, ref, rtol=0, atol=float32_atol(np.abs(ref).max(), 24 * SEQ))


def test_init_scale_and_bias_per_kind():
  softmax = build(make_config())
  scale, bias = softmax.scale_and_bias()
  assert float(scale) == pytest.approx(1 / 0.07, rel=1e-6) and bias is None
  sigmoid = build(make_config(kind="sigmoid"))
  scale, bias = sigmoid.scale_and_bias()
  assert float(scale) == pytest.approx(10.0, rel=1e-6) and float(bias) == -10.0
  per_size = build(make_config(kind="sigmoid", per_size_scale=True, init_scale=5.0,
                               init_bias=-3.0), dims=(4, 12))
  scale, bias = per_size.scale_and_bias()
  assert scale.shape == bias.shape == (2,)
  np.testing.assert_allclose(scale, [5.0, 5.0], rtol=1e-6)
  np.testing.assert_array_equal(bias, [-3.0, -3.0])
  # A bias for softmax only when asked for.
  assert build(make_config(init_bias=-1.0)).scale_and_bias()[1] is not None


def test_scale_is_capped_and_the_cap_only_lets_lowering_gradients_through():
  model = build(make_config(max_scale=100.0))
  grad = lambda sign: float(jax.grad(lambda t: sign * dual_encoder._capped_exp(t, 100.0))(
      jnp.float32(math.log(200.0))))
  model.logit_scale[...] = jnp.float32(math.log(200.0))
  assert float(model.scale_and_bias()[0]) == 100.0
  # loss = +scale: gradient descent lowers t, so the gradient passes (d scale / dt = 100).
  assert grad(1.0) == pytest.approx(100.0, rel=1e-6)
  # loss = -scale wants t higher still: blocked at the cap.
  assert grad(-1.0) == 0.0
  below = float(jax.grad(lambda t: dual_encoder._capped_exp(t, 100.0))(jnp.float32(1.0)))
  assert below == pytest.approx(math.e, rel=1e-6)
  with pytest.raises(ConfigError, match="max_scale"):
    build(make_config(init_scale=200.0))


def test_fixed_scale_is_model_state_not_a_parameter():
  model = build(make_config(learn_scale=False, init_scale=20.0))
  assert "logit_scale" not in by_path(nnx.state(model, nnx.Param))
  assert by_path(nnx.state(model, FixedScalar))["logit_scale"] == pytest.approx(math.log(20.0))
  assert float(model.scale_and_bias()[0]) == pytest.approx(20.0, rel=1e-6)


def test_no_projections_needs_equal_widths():
  config = make_config(embed_dim=None, text=dict(BERT, width=16))
  model = build(config, dims=(4, 16))
  assert model.image_projection is None and model.text_projection is None
  assert dual_encoder.dual_embedding_dim(config) == 16
  images, _, _ = batch()
  np.testing.assert_array_equal(model.embed_image(images, train=False),
                                model.image(images, train=False))
  with pytest.raises(ConfigError, match="embed_dim") as e:
    dual_encoder.dual_embedding_dim(make_config(embed_dim=None))
  assert "16" in str(e.value) and "24" in str(e.value) and "\n" not in str(e.value)


def test_resnet_image_tower_and_its_locked_batch_statistics():
  config = make_config(image=RESNET)
  assert dual_encoder.tower_widths(config) == (32, 24)  # 8 * width for ResNet-18
  model = build(config)
  stats = by_path(nnx.state(model, nnx.BatchStat))
  assert "image/bn1/mean" in stats and model.locked == ()
  images, _, _ = batch()
  model.embed_image(images, train=True)
  assert not np.array_equal(by_path(nnx.state(model, nnx.BatchStat))["image/bn1/mean"],
                            stats["image/bn1/mean"])
  # Every image parameter frozen (LiT): the tower runs in inference mode, stats kept.
  config.freeze = ("^image/",)
  locked = build(config)
  assert locked.locked == ("image",)
  before = by_path(nnx.state(locked, nnx.BatchStat))
  out = locked.embed_image(images, train=True)
  after = by_path(nnx.state(locked, nnx.BatchStat))
  assert all(np.array_equal(before[k], after[k]) for k in before)
  np.testing.assert_array_equal(out, locked.embed_image(images, train=False))
  config.freeze = ("^image/layer1/",)  # part of the tower: it still trains as usual
  assert build(config).locked == ()


def test_nesting_larger_than_the_embedding_is_refused():
  with pytest.raises(ConfigError, match="embed_dim"):
    build(make_config(), dims=(4, 16))


def test_sharding_rules_split_towers_not_the_nested_dim():
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "model": 2})
  rules = dual_encoder.sharding_rules(make_config())
  spec = lambda name, shape: tuple(sharding.spec_for(name, shape, mesh, rules))
  assert spec("image/blocks/0/attn/q_proj/kernel", (16, 2, 8)) == (None, "model", None)
  assert spec("text/blocks/0/mlp/fc1/kernel", (24, 32)) == (None, "model")
  assert spec("text/embeddings/word/embedding", (VOCAB, 24)) == ("model", None)
  assert spec("image_projection/kernel", (16, 12)) == (None, None)
  assert spec("text_projection/kernel", (24, 12)) == (None, None)


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError, match="config.model.image.name='bert'"):
    dual_encoder.tower_widths(make_config(image=dict(name="bert")))
  with pytest.raises(ConfigError, match="config.model.text.pooling"):
    dual_encoder.tower_widths(make_config(text=dict(BERT, pooling="max")))
  with pytest.raises(ConfigError, match="config.contrastive.kind"):
    dual_encoder.contrastive_settings(make_config(kind="triplet"))
  # The image classifier's registry points to the contrastive task.
  config = make_config()
  config.head = "mrl"
  with pytest.raises(ConfigError, match="config.task='contrastive'"):
    build_model(config, num_classes=3, in_channels=3, rngs=nnx.Rngs(0))
