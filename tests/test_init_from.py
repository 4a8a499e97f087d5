"""Fine-tuning from another run: the encoder is copied (position embedding resized), the head
is new; a dual encoder's towers each from their own run (classification, MLM)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax import inference, sharding, train
from mrl_jax.errors import ConfigError
from mrl_jax.models import vit
from test_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
I21K = os.path.join(ROOT, "configs", "vit_imagenet21k.py")


def by_path(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {sharding.path_to_str(p): np.asarray(x) for p, x in leaves}


@pytest.fixture(scope="module")
def pretrained(runlocal_run):
  """The session's vit_imagenet21k:runlocal run (tests/conftest.py): read, never changed."""
  workdir, _, _ = runlocal_run("vit_imagenet21k.py")
  return workdir


def finetune_config(data_dir, pretrained_workdir, **init):
  config = load_config(I21K, "runlocal")
  config.data.data_dir = data_dir
  config.data.image_size = 48  # fine-tune at a higher resolution: 6x6 patches instead of 4x4
  config.init_from = dict(workdir=pretrained_workdir, **init)
  config.total_steps = 1
  config.lr = 0.0  # the one step leaves the weights as initialised
  config.head = "mrl_e"  # a different head: not copied
  return config


@pytest.mark.slow
def test_finetune_run_starts_from_the_pretrained_encoder(pretrained, digits_data_dir, tmp_path):
  train.train_and_evaluate(finetune_config(digits_data_dir, pretrained), str(tmp_path))
  source, tuned = inference.load(pretrained), inference.load(str(tmp_path))
  src, dst = by_path(source.params), by_path(tuned.params)
  encoder = [k for k in dst if k.startswith("encoder/")]
  assert len(encoder) > 20
  for name in encoder:
    if name.endswith("pos_embedding"):
      assert src[name].shape == (1, 17, 192) and dst[name].shape == (1, 37, 192)
      np.testing.assert_allclose(dst[name], vit.resize_pos_embedding(src[name], 37), rtol=1e-6)
      np.testing.assert_array_equal(dst[name][:, 0], src[name][:, 0])  # class token row kept
    else:
      np.testing.assert_array_equal(dst[name], src[name], err_msg=name)
  assert "head/kernel" in dst and "head/kernel" not in src  # MRL-E head, freshly initialised


@pytest.mark.slow
def test_a_different_encoder_is_refused_with_the_parameter_named(pretrained, digits_data_dir,
                                                                tmp_path):
  config = finetune_config(digits_data_dir, pretrained)
  config.model.depth = 3
  with pytest.raises(ConfigError, match=r"no parameter 'encoder/blocks/2/"):
    train.train_and_evaluate(config, str(tmp_path))
  config = finetune_config(digits_data_dir, pretrained, head=True)
  with pytest.raises(ConfigError, match="head"):
    train.train_and_evaluate(config, str(tmp_path / "b"))


# ------------------------------------------------------------ per tower (dual encoder)
def random_like(abstract, seed):
  """Every float leaf of an abstract state drawn N(0, 1) by numpy: instant, unlike a
  compiled init on CPU, and no two sources or fresh states share a value."""
  rng = np.random.default_rng(seed)

  def draw(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # dropout streams
      return jax.random.split(jax.random.key(seed), int(np.prod(x.shape))).reshape(x.shape)
    if not jnp.issubdtype(x.dtype, jnp.floating):  # e.g. their counters
      return jnp.zeros(x.shape, x.dtype)
    return jnp.asarray(rng.normal(size=x.shape).astype(x.dtype))
  return jax.tree.map(draw, abstract)


def write_random_workdir(config, workdir, seed, info=None):
  """A workdir as training leaves it (config.json, a checkpoint, the task's files), its
  parameters and statistics random; `info`: the task's DataInfo (default: the dataset's)."""
  import json
  from mrl_jax import experiment
  from mrl_jax.checkpointing import Checkpointer
  exp = experiment.build(config, info=info)
  params = random_like(exp.spec.abstract["params"], seed)
  state = {"step": jnp.ones((), jnp.int32), "params": params,
           "model_state": random_like(exp.spec.abstract["model_state"], seed + 100),
           "opt_state": jax.jit(exp.spec.tx.init)(params)}
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    checkpointer.save(1, state, None, exp.checkpoint_meta())
  finally:
    checkpointer.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  exp.task.on_workdir(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def tower_sources(digits_data_dir, text_demo_data_dir, tmp_path_factory):
  """Workdirs of a quickstart classification run (ResNet-18: BatchNorm statistics) and of
  a tiny MLM run (BERT), with random weights."""
  from test_bert_mlm import mlm_config
  from test_train import quickstart_config
  image_cfg = quickstart_config(digits_data_dir)
  image_run = write_random_workdir(image_cfg, str(tmp_path_factory.mktemp("image_run")), 1)
  text_cfg = mlm_config(text_demo_data_dir)
  text_run = write_random_workdir(text_cfg, str(tmp_path_factory.mktemp("text_run")), 2)
  return (image_run, image_cfg), (text_run, text_cfg)


def dual_state(image_cfg, text_cfg, *, vocab_size, **image_overrides):
  """A fresh tiny dual-encoder state with towers shaped like the two source runs'."""
  import ml_collections
  from flax import nnx
  from mrl_jax.models.dual_encoder import build_dual_encoder
  from mrl_jax.nesting import Nesting
  config = ml_collections.ConfigDict(dict(
      model=dict(name="dual_encoder", image={**image_cfg.model.to_dict(), **image_overrides},
                 text={**text_cfg.model.to_dict(), "name": "bert"}, embed_dim=16),
      compute_dtype="float32"))
  model = nnx.eval_shape(lambda: build_dual_encoder(
      config, Nesting.create((8, 16)), in_channels=1, image_size=16, vocab_size=vocab_size,
      rngs=nnx.Rngs(1)))
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  return {"params": random_like(params, 3), "model_state": random_like(model_state, 4)}


def per_tower(image_run=None, text_run=None, **image):
  return ml_collections_dict(image=dict(workdir=image_run, prefix="encoder/", **image),
                             text=dict(workdir=text_run, prefix="encoder/"))


def ml_collections_dict(**kw):
  import ml_collections
  return ml_collections.ConfigDict(kw)


def test_towers_start_from_a_classification_run_and_an_mlm_run(tower_sources):
  from mrl_jax import init_from
  (image_run, image_cfg), (text_run, text_cfg) = tower_sources
  image_src, text_src = inference.load(image_run), inference.load(text_run)
  vocab = by_path(text_src.params)["encoder/embeddings/word/embedding"].shape[0]
  fresh = dual_state(image_cfg, text_cfg, vocab_size=vocab)
  lines = []
  state = init_from.load_pretrained(fresh, per_tower(image_run, text_run), log=lines.append)
  assert lines == [f"Initialised image from encoder/ of {image_run} (step 1).",
                   f"Initialised text from encoder/ of {text_run} (step 1)."]
  params, stats = by_path(state["params"]), by_path(state["model_state"])
  for tower, src in (("image", image_src), ("text", text_src)):
    src_params, src_stats = by_path(src.params), by_path(src.model_state)
    names = [k for k in params if k.startswith(tower + "/")]
    assert len(names) > 10
    for name in names:
      np.testing.assert_array_equal(params[name], src_params["encoder/" + name[len(tower) + 1:]],
                                    err_msg=name)
    for name in (k for k in stats if k.startswith(tower + "/")):
      np.testing.assert_array_equal(stats[name], src_stats["encoder/" + name[len(tower) + 1:]],
                                    err_msg=name)
  assert "image/bn1/mean" in stats and "image/layer4/1/bn2/var" in stats  # BN stats copied
  # Projections and temperature keep their fresh initialisation.
  before = by_path(fresh["params"])
  for name in ("image_projection/kernel", "text_projection/kernel", "logit_scale"):
    np.testing.assert_array_equal(params[name], before[name])


def test_per_tower_mismatches_are_one_line_config_errors(tower_sources):
  from mrl_jax import init_from
  (image_run, image_cfg), (text_run, text_cfg) = tower_sources
  vocab = by_path(inference.load(text_run).params)["encoder/embeddings/word/embedding"].shape[0]
  # Another vocabulary: the fix is the source's tokenizer.
  state = dual_state(image_cfg, text_cfg, vocab_size=vocab + 1)
  with pytest.raises(ConfigError, match=r"config.data.tokenizer .*tokenizer.json") as e:
    init_from.load_pretrained(state, per_tower(text_run=text_run), log=lambda _: None)
  assert "\n" not in str(e.value)
  # A deeper image tower than the source's: the missing parameter is named.
  state = dual_state(image_cfg, text_cfg, vocab_size=vocab, depth=34)
  with pytest.raises(ConfigError, match=r"config.init_from.image.workdir=.* no parameter "
                                        r"'encoder/layer1/2/.*\(for 'image/layer1/2/"):
    init_from.load_pretrained(state, per_tower(image_run=image_run), log=lambda _: None)
  # A wrong prefix names the source path it looked for.
  state = dual_state(image_cfg, text_cfg, vocab_size=vocab)
  with pytest.raises(ConfigError, match=r"no parameter 'backbone/"):
    init_from.load_pretrained(state, ml_collections_dict(image=dict(workdir=image_run,
                                                                    prefix="backbone/")),
                              log=lambda _: None)


def test_per_tower_init_from_is_requested_only_by_a_workdir():
  from mrl_jax import init_from
  assert not init_from.requested(None)
  assert not init_from.requested(per_tower())
  assert init_from.requested(per_tower(text_run="/somewhere"))
  assert init_from.requested(ml_collections_dict(workdir="/somewhere", head=False))


def test_a_vit_image_tower_gets_the_source_position_embedding_resized(tmp_path):
  import ml_collections
  from flax import nnx
  from mrl_jax import init_from
  from mrl_jax.models.dual_encoder import build_dual_encoder
  from mrl_jax.nesting import Nesting
  from mrl_jax.tasks.classification import ImageDataInfo
  from test_train import quickstart_config
  tower = dict(name="vit", variant=None, width=16, depth=1, num_heads=2, mlp_dim=32, patch=4,
               pool="token")
  source_cfg = quickstart_config(None, model=tower, **{"nesting.dims": (8, 16)})
  source = write_random_workdir(source_cfg, str(tmp_path), 7,
                                info=ImageDataInfo(10, (16, 16, 3), False, 100))
  config = ml_collections.ConfigDict(dict(
      model=dict(name="dual_encoder", image=tower, embed_dim=8,
                 text=dict(name="bert", variant=None, width=8, depth=1, num_heads=2,
                           mlp_dim=8, max_len=8)), compute_dtype="float32"))
  model = nnx.eval_shape(lambda: build_dual_encoder(  # 32x32 images: 8x8 patches, not 4x4
      config, Nesting.create((8,)), in_channels=3, image_size=32, vocab_size=10,
      rngs=nnx.Rngs(0)))
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  lines = []
  state = init_from.load_pretrained(
      {"params": random_like(params, 8), "model_state": random_like(model_state, 9)},
      per_tower(image_run=source), log=lines.append)
  src = by_path(inference.load(source).params)["encoder/pos_embedding"]
  dst = by_path(state["params"])["image/pos_embedding"]
  assert src.shape == (1, 17, 16) and dst.shape == (1, 65, 16)
  np.testing.assert_allclose(dst, vit.resize_pos_embedding(src, 65), rtol=1e-6)
  assert "image/pos_embedding resized (1, 17, 16) -> (1, 65, 16)" in lines[0]
