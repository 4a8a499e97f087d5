"""Mesh sizes from the config and parameter placement rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mrl_jax import sharding
from mrl_jax.errors import ConfigError


def test_mesh_shape_fills_the_minus_one_axis():
  assert sharding.mesh_shape({"data": -1, "fsdp": 1, "model": 1}, 8) == (8, 1, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "model": 2}, 8) == (2, 2, 2)
  with pytest.raises(ConfigError, match="devices"):
    sharding.mesh_shape({"data": 3, "fsdp": 1, "model": 1}, 8)
  with pytest.raises(ConfigError, match="at most one"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "model": 1}, 8)


class FakeMesh:
  """Only the axis sizes matter to `spec_for`."""

  def __init__(self, **shape):
    self.shape = shape


RULES = (("(^|/)head/", ("model",)),)


def test_head_classes_shard_over_model_never_the_prefix_dim():
  mesh = FakeMesh(data=2, fsdp=1, model=4)
  assert sharding.spec_for("head/kernels/3/value", (64, 1000), mesh, RULES) == P(None, "model")
  assert sharding.spec_for("head/bias", (9, 1000), mesh, RULES) == P(None, "model")
  # Classes not divisible by the model axis stay replicated rather than failing.
  assert sharding.spec_for("head/kernel", (64, 10), FakeMesh(data=1, fsdp=1, model=4),
                           RULES) == P(None, None)


def test_fsdp_shards_the_largest_divisible_dim_of_large_params():
  mesh = FakeMesh(data=1, fsdp=4, model=1)
  assert sharding.spec_for("encoder/layer1/0/conv1/kernel", (3, 3, 256, 512), mesh, RULES) == \
      P(None, None, None, "fsdp")
  assert sharding.spec_for("encoder/bn1/scale", (64,), mesh, RULES) == P(None)  # too small
  both = sharding.spec_for("head/kernels/0/value", (2048, 1000), FakeMesh(data=1, fsdp=2, model=2),
                           RULES)
  assert both == P("fsdp", "model")


def test_path_to_str_drops_nnx_value_suffix():
  tree = {"encoder": {"layer1": [{"kernel": 1}]}}
  paths = [sharding.path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  assert paths == ["encoder/layer1/0/kernel"]


def test_global_batch_on_one_device_keeps_the_rows():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  batch = {"image": np.arange(24, dtype=np.float32).reshape(4, 6), "label": np.arange(4)}
  out = sharding.global_batch(batch, mesh)
  np.testing.assert_array_equal(out["image"], batch["image"])
  assert out["label"].sharding.spec == P(sharding.BATCH_AXES)


def test_optimizer_state_of_the_head_follows_the_same_rule():
  mesh = FakeMesh(data=1, fsdp=1, model=2)
  assert sharding.spec_for("1/0/trace/head/kernels/0", (8, 10), mesh, RULES) == P(None, "model")
  assert sharding.spec_for("1/0/trace/encoder/overhead/kernel", (8, 10), mesh, RULES) == P(None, None)
