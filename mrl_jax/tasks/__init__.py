"""Task registry: `config.task` -> the Task that trains and measures it (see base.py)."""

from __future__ import annotations

import importlib

import ml_collections

from mrl_jax.errors import ConfigError
from mrl_jax.tasks.base import Task

# name -> "module:Class", imported on first use so image runs never import text code.
TASKS = {
    "classification": "mrl_jax.tasks.classification:ClassificationTask",
    "mlm": "mrl_jax.tasks.mlm:MaskedLMTask",
    "contrastive": "mrl_jax.tasks.contrastive:ContrastiveTask",
}


def get_task(config: ml_collections.ConfigDict) -> Task:
  name = config.get("task", "classification")
  if name not in TASKS:
    raise ConfigError(f"config.task={name!r} is unknown: use one of {sorted(TASKS)}.")
  module, cls = TASKS[name].split(":")
  return getattr(importlib.import_module(module), cls)()
