"""Start training from another run's weights: `config.init_from` (fine-tuning).

  config.init_from = dict(workdir="/path/to/pretraining/workdir", head=False)

When a run starts with no checkpoint of its own, the encoder's parameters (and
non-parameter state such as BatchNorm statistics) are copied from the latest
checkpoint of `init_from.workdir`; the head too if `head=True` (only when its
classes and sizes match). The optimizer starts fresh. A ViT's position
embedding is resized when the image size differs (fine-tuning at a higher
resolution). Once the run has checkpoints of its own it resumes from them and
`init_from` is ignored.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mrl_jax import inference, sharding
from mrl_jax.errors import ConfigError
from mrl_jax.models import vit


def _by_path(tree: Any) -> dict[str, jax.Array]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {sharding.path_to_str(path): leaf for path, leaf in leaves}


def _copy(target: Any, source: Any, prefixes: tuple[str, ...], workdir: str) -> tuple[Any, list]:
  """`target` with every leaf under `prefixes` taken from `source` (resharded like target)."""
  source_leaves = _by_path(source)
  notes = []

  def take(path, leaf):
    name = sharding.path_to_str(path)
    if not name.startswith(prefixes):
      return leaf
    if name not in source_leaves:
      raise ConfigError(f"config.init_from.workdir={workdir!r} has no parameter {name!r}: it "
                        "was trained with a different model; match config.model to it.")
    value = source_leaves[name]
    if value.shape != leaf.shape and name.endswith("pos_embedding"):
      notes.append(f"{name} resized {tuple(value.shape)} -> {tuple(leaf.shape)}")
      value = vit.resize_pos_embedding(jnp.asarray(value), leaf.shape[1])
    if value.shape != leaf.shape:
      raise ConfigError(f"config.init_from: {name!r} is {tuple(value.shape)} in "
                        f"{workdir!r} but {tuple(leaf.shape)} here; match config.model "
                        "(and, with head=True, the classes and nesting) to the pre-trained run.")
    return jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding)

  return jax.tree_util.tree_map_with_path(take, target), notes


def load_pretrained(state: dict[str, Any], init_cfg: ml_collections.ConfigDict,
                    log=print) -> dict[str, Any]:
  """`state` (freshly initialised, sharded) with the pre-trained weights copied in."""
  workdir = init_cfg.get("workdir")
  source = inference.load(workdir)
  prefixes = ("encoder/", "head/") if init_cfg.get("head", False) else ("encoder/",)
  params, notes = _copy(state["params"], source.params, prefixes, workdir)
  model_state, _ = _copy(state["model_state"], source.model_state, prefixes, workdir)
  log(f"Initialised {' and '.join(p.rstrip('/') for p in prefixes)} from {workdir} "
      f"(step {source.step})" + (f"; {'; '.join(notes)}" if notes else "") + ".")
  return {**state, "params": params, "model_state": model_state}
