"""Checks of a whole config against the devices present, run before any compile."""

from __future__ import annotations

import ml_collections

from mrl_jax import models
from mrl_jax.errors import ConfigError
from mrl_jax.nesting import Nesting
from mrl_jax.sharding import BATCH_AXES, MESH_AXES, mesh_shape

LOSSES = ("softmax", "sigmoid")


def nesting_from_config(config: ml_collections.ConfigDict) -> Nesting:
  """The checked nesting the head scores; FF-k trains one size with weight 1."""
  dims = models.nested_dims(config)
  weights = (1.0,) if config.head == "ff" else tuple(config.nesting.get("weights") or ())
  return Nesting.create(dims, weights, embedding_dim=models.embedding_dim(config))


def check_config(config: ml_collections.ConfigDict, *, num_devices: int,
                 process_count: int) -> Nesting:
  """Raises ConfigError naming the field to fix; returns the checked nesting."""
  models.compute_dtype(config)
  nesting = nesting_from_config(config)
  if config.loss not in LOSSES:
    raise ConfigError(f"config.loss={config.loss!r} is unknown: use one of {LOSSES}.")
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
