"""The classification task keeps what checkpoints written before tasks existed depend on:
configs without config.task, the checkpoint meta, the parameter paths, one shared nesting."""

import jax
from flax import nnx

from mrl_jax import experiment, sharding, tasks
from mrl_jax.tasks.classification import ClassificationTask, ImageDataInfo
from test_train import quickstart_config


def test_a_config_without_task_is_classification():
  config = quickstart_config(None)
  del config["task"]
  assert isinstance(tasks.get_task(config), ClassificationTask)


def test_checkpoint_meta_is_the_pre_task_layout():
  config = quickstart_config(None)
  task = tasks.get_task(config)
  info = ImageDataInfo(10, (16, 16, 1), False, 1000)
  meta = task.checkpoint_meta(config, task.nesting(config), info)
  # What train_state.checkpoint_meta wrote before tasks existed (checked on every restore).
  assert meta == {"model": config.model.to_dict(), "head": "mrl",
                  "dims": [2, 4, 8, 16, 32, 64], "num_classes": 10, "in_channels": 1,
                  "head_bias": True}
  config.head_class_multiple = 8
  assert task.checkpoint_meta(config, task.nesting(config), info)["head_class_multiple"] == 8


def _param_paths(exp) -> set[str]:
  leaves = jax.tree_util.tree_leaves_with_path(exp.spec.abstract["params"])
  return {sharding.path_to_str(p) for p, _ in leaves if sharding.path_to_str(p).startswith("head/")}


def test_head_parameters_and_nesting_are_shared_with_the_loss():
  info = ImageDataInfo(10, (16, 16, 1), False, 1000)
  config = quickstart_config(None, **{"nesting.weights": (1.0, 2.0, 1.0, 1.0, 1.0, 3.0)})
  exp = experiment.build(config, info=info)
  assert _param_paths(exp) == {f"head/kernels/{i}" for i in range(6)} | {"head/bias"}
  # The model's head holds the run's Nesting, weights included (the loss's).
  model = nnx.eval_shape(lambda: exp.task.build_model(config, exp.nesting, info, nnx.Rngs(0)))
  assert model.head.nesting == exp.nesting and model.head.nesting.weights[-1] == 3.0
  config = quickstart_config(None, head="mrl_e")
  assert _param_paths(experiment.build(config, info=info)) == {"head/kernel", "head/bias"}
  assert experiment.build(config, info=info).abstract_batch(8)["image"].shape == (8, 16, 16, 1)
