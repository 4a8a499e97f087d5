"""Checks of a whole config against the devices present, run before any compile."""

from __future__ import annotations

import difflib

import ml_collections

from mrl_jax import models, tasks
from mrl_jax.errors import ConfigError
from mrl_jax.nesting import Nesting
from mrl_jax.sharding import BATCH_AXES, MESH_AXES, mesh_shape

NONFINITE_MODES = ("stop", "skip")
# Fields that count steps (or checkpoints), the least each may be, and what the least means.
_COUNTS = (
    ("log_every_steps", 1, ""),
    ("eval_every_steps", 0, " (0: no evaluation during training)"),
    ("checkpoint_every_steps", 0, " (0: only at the end)"),
    ("keep_checkpoints", 1, ""),
    ("max_nonfinite_steps", 0, ""),
    ("grad_accum_steps", 1, ""),
    ("total_steps", 0, ""),
)


def nesting_from_config(config: ml_collections.ConfigDict,
                        task: tasks.Task | None = None) -> Nesting:
  """The checked nesting the model scores (`config.task`'s, see Task.nesting)."""
  return (task or tasks.get_task(config)).nesting(config)


def _check_loop_fields(config: ml_collections.ConfigDict) -> None:
  """Intervals and counts are ints in range; on_nonfinite is a known mode."""
  for name, least, meaning in _COUNTS:
    value = config.get(name)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ConfigError(f"config.{name}={value!r}: use an integer >= {least}{meaning}.")
  epochs = config.get("total_epochs")
  if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                             or not epochs >= 0):
    raise ConfigError(f"config.total_epochs={epochs!r}: use a number >= 0.")
  mode = config.get("on_nonfinite", "stop")
  if mode not in NONFINITE_MODES:
    raise ConfigError(f"config.on_nonfinite={mode!r}: use one of {NONFINITE_MODES}.")


def check_config(config: ml_collections.ConfigDict, *, num_devices: int,
                 process_count: int, task: tasks.Task | None = None) -> Nesting:
  """Raises ConfigError naming the field to fix; returns the checked nesting.

  The loop's fields, the nesting and the mesh/batch layout are checked here;
  what only one task reads (e.g. config.loss) by `task.check_config`.
  """
  task = task or tasks.get_task(config)
  _check_loop_fields(config)
  models.compute_dtype(config)
  nesting = task.nesting(config)
  task.check_config(config)
  shape = dict(zip(MESH_AXES, mesh_shape(config.mesh, num_devices)))
  dp = shape[BATCH_AXES[0]] * shape[BATCH_AXES[1]]
  batch, accum = config.batch_size, config.get("grad_accum_steps", 1)
  if accum < 1 or batch % accum:
    raise ConfigError(f"config.batch_size={batch} is not divisible by "
                      f"config.grad_accum_steps={accum}.")
  if (batch // accum) % dp:
    raise ConfigError(
        f"config.batch_size={batch} (per accumulation step {batch // accum}) is not divisible by "
        f"the data-parallel size {dp} (mesh data={shape['data']} x fsdp={shape['fsdp']}): "
        f"use a multiple of {dp}.")
  if batch % process_count or config.eval_batch_size % process_count:
    raise ConfigError(f"config.batch_size={batch} and config.eval_batch_size="
                      f"{config.eval_batch_size} must be divisible by the {process_count} processes.")
  if config.eval_batch_size % dp:
    raise ConfigError(f"config.eval_batch_size={config.eval_batch_size} is not divisible by the "
                      f"data-parallel size {dp}: use a multiple of {dp}.")
  if not (config.get("total_steps") or config.get("total_epochs")):
    raise ConfigError("Set config.total_steps or config.total_epochs (> 0).")
  return nesting


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every field's dotted path (nested configs and their fields both)."""
  names = []
  for key, value in config.items():
    names.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      names += field_names(value, f"{prefix}{key}.")
  return names


def unknown_field(config: ml_collections.ConfigDict, path: str) -> str | None:
  """A one-line message if `path` ("model.depth") names no field of `config`, else None.

  The message names the closest existing fields (difflib over every dotted
  field name), or the top-level fields when nothing is close.
  """
  node, parts = config, path.split(".")
  for i, part in enumerate(parts):
    if isinstance(node, ml_collections.ConfigDict) and part in node:
      node = node[part]
      continue
    close = difflib.get_close_matches(path, field_names(config), n=3, cutoff=0.6)
    if not close and i and isinstance(node, ml_collections.ConfigDict):
      # A typo in a nested name: compare with that sub-config's own fields.
      parent = ".".join(parts[:i])
      close = [f"{parent}.{n}" for n in difflib.get_close_matches(part, list(node), n=3,
                                                                  cutoff=0.6)]
    if close:
      hint = " Did you mean " + " or ".join(f"config.{c}" for c in close) + "?"
    elif i == 0:
      hint = " Its fields: " + ", ".join(sorted(config.keys())) + "."
    else:
      hint = ""
    return f"--config.{path}: the config has no field config.{'.'.join(parts[:i + 1])}.{hint}"
  return None
