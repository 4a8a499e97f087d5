"""The train state's structure, shared by training, inference and checkpoint import.

State = {"step", "params", "model_state" (BatchNorm statistics), "opt_state"},
built from the config alone so any of them can create or restore it on any mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mrl_jax import models, optim, sharding
from mrl_jax.nesting import Nesting

DEFAULT_SHARDING_RULES = (("(^|/)head/", ("model",)),)


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """How to build, shard and restore the train state of one config."""

  graphdef: Any                 # NNX graph of the model (static structure).
  init: Any                     # () -> state, to be jitted with `shardings`.
  abstract: Any                 # ShapeDtypeStructs of the state.
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  total_steps: int


def total_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  steps_per_epoch = max(num_train_examples // config.batch_size, 1)
  return int(config.get("total_steps") or math.ceil(config.total_epochs * steps_per_epoch))


def state_spec(config: ml_collections.ConfigDict, *, num_classes: int, in_channels: int,
               num_train_examples: int) -> StateSpec:
  def make_model() -> nnx.Module:
    return models.build_model(config, num_classes=num_classes, in_channels=in_channels,
                              rngs=nnx.Rngs(config.seed))

  graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)
  steps = total_steps(config, num_train_examples)
  schedule = optim.build_schedule(config.schedule, config.lr, steps)
  tx = optim.build_optimizer(config.optimizer, schedule, abstract_params)

  def init() -> dict[str, Any]:
    _, params, model_state = nnx.split(make_model(), nnx.Param, ...)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
            "opt_state": tx.init(params)}

  return StateSpec(graphdef, init, jax.eval_shape(init), tx, schedule, steps)


def state_shardings(config: ml_collections.ConfigDict, abstract: Any, mesh) -> Any:
  rules = tuple(config.get("sharding_rules") or DEFAULT_SHARDING_RULES)
  return sharding.tree_shardings(abstract, mesh, rules)


def restore_target(abstract: Any, shardings: Any) -> Any:
  """Shapes, dtypes and target shardings for Orbax (restores onto any mesh)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def checkpoint_meta(config: ml_collections.ConfigDict, nesting: Nesting, num_classes: int,
                    in_channels: int = 3) -> dict:
  """What a checkpoint's parameters depend on (checked when restoring)."""
  meta = {"model": config.model.to_dict(), "head": config.head, "dims": list(nesting.dims),
          "num_classes": int(num_classes), "in_channels": int(in_channels),
          "head_bias": bool(config.get("head_bias", True))}
  if config.get("head_class_multiple", 1) != 1:  # Absent from older checkpoints: only when used.
    meta["head_class_multiple"] = int(config.head_class_multiple)
  return meta
