"""The train state's structure, shared by training, inference and checkpoint import.

State = {"step", "params", "model_state" (BatchNorm statistics), "opt_state"},
built from the config and a model factory (the task's, see mrl_jax/experiment.py)
so any of them can create or restore it on any mesh. Parameters matching
config.freeze have no opt_state leaves (`optim.build_optimizer`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mrl_jax import optim, sharding


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """How to build, shard and restore the train state of one config."""

  graphdef: Any                 # NNX graph of the model (static structure).
  init: Any                     # () -> state, to be jitted with `shardings`.
  abstract: Any                 # ShapeDtypeStructs of the state.
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  total_steps: int
  # config.freeze: paths (`sharding.path_to_str`) of the frozen parameters, and of
  # the BatchNorm statistics under a frozen path; the train step keeps both as they are.
  frozen_params: frozenset[str] = frozenset()
  frozen_stats: frozenset[str] = frozenset()


def total_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  steps_per_epoch = max(num_train_examples // config.batch_size, 1)
  return int(config.get("total_steps") or math.ceil(config.total_epochs * steps_per_epoch))


def state_spec(config: ml_collections.ConfigDict, make_model: Callable[[], nnx.Module],
               num_train_examples: int) -> StateSpec:
  """The state of `make_model()` (called traced: nothing is allocated until `init` runs)
  with config.optimizer over config.schedule for the run's total steps."""
  graphdef, abstract_params, abstract_rest = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)
  steps = total_steps(config, num_train_examples)
  schedule = optim.build_schedule(config.schedule, config.lr, steps)
  freeze = optim.freeze_patterns(config)
  optim.check_freeze_patterns(abstract_params, freeze)
  tx = optim.build_optimizer(config.optimizer, schedule, abstract_params, frozen=freeze)

  def init() -> dict[str, Any]:
    _, params, model_state = nnx.split(make_model(), nnx.Param, ...)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
            "opt_state": tx.init(params)}

  return StateSpec(graphdef, init, jax.eval_shape(init), tx, schedule, steps,
                   frozen_params=_frozen_names(abstract_params, freeze),
                   frozen_stats=_frozen_names(abstract_rest, freeze, nnx.BatchStat))


def _frozen_names(state: Any, patterns: Sequence[str], kind: type = nnx.Variable) -> frozenset:
  """Paths of the `kind` variables of an NNX state that match a freeze pattern."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  names = (sharding.path_to_str(path) for path, leaf in leaves if isinstance(leaf, kind))
  return frozenset(name for name in names if optim.is_frozen(name, patterns))


def state_shardings(config: ml_collections.ConfigDict, abstract: Any, mesh,
                    default_rules: Sequence[tuple[str, Sequence[str | None]]] = ()) -> Any:
  """Shardings of the state: config.sharding_rules, else the task's `default_rules`."""
  rules = tuple(config.get("sharding_rules") or default_rules)
  return sharding.tree_shardings(abstract, mesh, rules)


def restore_target(abstract: Any, shardings: Any) -> Any:
  """Shapes, dtypes and target shardings for Orbax (restores onto any mesh)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)
