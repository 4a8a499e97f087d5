"""One builder for every entry point: config -> task, nesting, mesh, state, steps.

Training, compile_check, inference, the PyTorch importer and the benchmarks all
start with `experiment.build(config, ...)`, so they check the same config,
build the nesting once (from the config and the task's embedding size; the
model and the loss get the same object), lay the state out the same way and
jit the same steps:

    exp = experiment.build(config)                    # the prepared dataset's layout
    state = exp.init_state()                          # sharded, never unsharded first
    state, metrics = exp.train_step()(state, batch)   # batch: sharding.global_batch(...)

Where the data layout comes from (`info`, the task's DataInfo):
  * default: the prepared dataset (`Task.data_info`; the data module's
    not-prepared error when it is not);
  * `info_from="config"`: the dataset if prepared, else config fields alone
    (`Task.data_info_from_config`, for compile_check);
  * `meta=<checkpoint meta>`: what a checkpoint was trained with
    (`Task.data_info_from_meta`, for restoring without the dataset);
  * `info=`: given outright (e.g. the importer, which reads it from weights).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from mrl_jax import sharding, train_state, train_step
from mrl_jax.config_checks import check_config
from mrl_jax.nesting import Nesting
from mrl_jax.tasks import Task, get_task
from mrl_jax.train_state import StateSpec

INFO_SOURCES = ("dataset", "config")


@dataclasses.dataclass
class Experiment:
  """Everything one run is built from; the jitted steps are made on first use, once."""

  config: ml_collections.ConfigDict
  task: Task
  nesting: Nesting
  info: Any                 # the task's DataInfo
  mesh: Mesh
  spec: StateSpec
  state_shardings: Any
  _steps: dict[str, Callable] = dataclasses.field(default_factory=dict, repr=False)

  @property
  def total_steps(self) -> int:
    return self.spec.total_steps

  @property
  def dims(self) -> tuple[int, ...]:
    return self.nesting.dims

  @property
  def num_parameters(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self.spec.abstract["params"])))

  def _cached(self, name: str, make: Callable[[], Callable]) -> Callable:
    if name not in self._steps:
      self._steps[name] = make()
    return self._steps[name]

  def train_step(self) -> Callable:
    """jit(state, global batch) -> (new state, replicated metrics); the state is donated."""
    return self._cached("train", lambda: train_step.make_train_step(
        self.task, self.config, self.nesting, self.spec, self.mesh, self.state_shardings))

  def eval_step(self) -> Callable:
    """jit(params, model_state, global batch with "mask") -> replicated `Task.eval_sums`."""
    return self._cached("eval", lambda: train_step.make_eval_step(
        self.task, self.config, self.nesting, self.spec, self.mesh, self.state_shardings))

  def embed_step(self) -> Callable:
    """jit(params, model_state, global batch) -> replicated `Task.embed` dict."""
    return self._cached("embed", lambda: train_step.make_embed_step(
        self.task, self.config, self.spec, self.mesh, self.state_shardings))

  def init_state(self) -> dict[str, Any]:
    """A freshly initialised state, created directly in its shardings."""
    return jax.jit(self.spec.init, out_shardings=self.state_shardings)()

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """A global training batch (default config.batch_size rows) as shapes, dtypes and
    the batch sharding, for lowering without data."""
    rows = sharding.batch_sharding(self.mesh)
    shapes = self.task.abstract_batch(self.config, self.info,
                                      int(batch_size or self.config.batch_size))
    return {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows) for k, x in shapes.items()}

  def restore_target(self) -> Any:
    """The state's shapes and dtypes with their target shardings (Orbax restores onto them)."""
    return train_state.restore_target(self.spec.abstract, self.state_shardings)

  def checkpoint_meta(self) -> dict[str, Any]:
    """What the parameters depend on, saved with and checked against every checkpoint."""
    return self.task.checkpoint_meta(self.config, self.nesting, self.info)


def build(config: ml_collections.ConfigDict, *, info: Any = None,
          meta: dict[str, Any] | None = None, info_from: str = "dataset",
          mesh: Mesh | None = None, check: bool = True) -> Experiment:
  """Checks `config` and builds its experiment (nothing is allocated; see module doc).

  Args:
    info: the task's DataInfo, given outright.
    meta: a checkpoint's meta to take the DataInfo from (when `info` is None).
    info_from: "dataset" (the prepared dataset) or "config" (the dataset if prepared,
      else config fields); used when neither `info` nor `meta` is given.
    mesh: the device mesh; default the config's (`config.mesh` over all devices).
    check: run every config check against the devices present (training,
      compile_check); False runs only the task's own checks and the nesting's,
      not the mesh and batch layout's (restoring onto another mesh than the
      config's).
  """
  task = get_task(config)
  if check:
    nesting = check_config(config, num_devices=jax.device_count(),
                           process_count=jax.process_count(), task=task)
  else:
    nesting = task.nesting(config)
    task.check_config(config)
  if info is None:
    if meta is not None:
      info = task.data_info_from_meta(config, meta)
    elif info_from == "dataset":
      info = task.data_info(config)
    elif info_from == "config":
      info = task.data_info_from_config(config)
    else:
      raise ValueError(f"info_from={info_from!r}: use one of {INFO_SOURCES}.")
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)

  def make_model() -> nnx.Module:
    return task.build_model(config, nesting, info, nnx.Rngs(config.seed))

  spec = train_state.state_spec(config, make_model, info.num_train_examples)
  shardings = train_state.state_shardings(config, spec.abstract, mesh,
                                          task.sharding_rules(config))
  return Experiment(config, task, nesting, info, mesh, spec, shardings)
