"""Fine-tuning from another run: the encoder is copied (position embedding resized), the head is new."""

import os

import jax
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
def pretrained(digits_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  config = load_config(I21K, "runlocal")
  config.data.data_dir = digits_data_dir
  train.train_and_evaluate(config, workdir)
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
