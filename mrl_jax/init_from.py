"""Start training from other runs' weights: `config.init_from` (fine-tuning, LiT).

Whole encoder (and optionally head) from one run:

  config.init_from = dict(workdir="/path/to/pretraining/workdir", head=False)

Per tower of a dual encoder (config.model.name="dual_encoder"), each from its own run:

  config.init_from = dict(
      image=dict(workdir="/path/to/image/run", prefix="encoder/"),
      text=dict(workdir="/path/to/text/run", prefix="encoder/"))

When a run starts with no checkpoint of its own, parameters and non-parameter
state such as BatchNorm statistics are copied from the latest checkpoint of
each workdir: with `workdir`, the source's "encoder/..." into "encoder/..."
(and "head/..." too with `head=True`, only when its classes and sizes match);
with `image` / `text`, the source's "<prefix>..." into "image/..." /
"text/...". The default prefix "encoder/" fits a classification run or
`tools/import_torch.py`'s workdir (a ResNet-50 or ViT image tower) and an MLM
run or `tools/import_hf_bert.py`'s workdir (a BERT text tower). Dropout RNG
streams are not copied: the run draws its own from config.seed. The optimizer
starts fresh. A ViT's position embedding is resized when the image size
differs (fine-tuning at another resolution). Once the run has checkpoints of
its own it resumes from them and `init_from` is ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mrl_jax import inference, sharding
from mrl_jax.errors import ConfigError
from mrl_jax.models import vit

TOWERS = ("image", "text")


@dataclasses.dataclass(frozen=True)
class _Copy:
  """Source leaves `source_prefix...` of `workdir` into target leaves `target_prefix...`."""

  field: str            # the config field that asked for it ("config.init_from.image")
  model_field: str      # the config field that must match the source's model
  workdir: str
  source_prefix: str
  target_prefix: str


def _copies(init_cfg: Any) -> list[_Copy]:
  init_cfg = init_cfg or {}
  copies = []
  workdir = init_cfg.get("workdir")
  if workdir:
    for part in ("encoder/", "head/") if init_cfg.get("head", False) else ("encoder/",):
      copies.append(_Copy("config.init_from", "config.model", workdir, part, part))
  for tower in TOWERS:
    tower_cfg = init_cfg.get(tower) or {}
    if tower_cfg.get("workdir"):
      copies.append(_Copy(f"config.init_from.{tower}", f"config.model.{tower}",
                          tower_cfg["workdir"], tower_cfg.get("prefix", "encoder/"),
                          f"{tower}/"))
  return copies


def requested(init_cfg: Any) -> bool:
  """Whether config.init_from names any workdir to copy from."""
  return bool(_copies(init_cfg))


def _by_path(tree: Any) -> dict[str, jax.Array]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {sharding.path_to_str(path): leaf for path, leaf in leaves}


def _rng_names(tree: Any) -> set[str]:
  """Paths of the dropout RNG streams (nnx.RngState) of an NNX state."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {sharding.path_to_str(p) for p, v in leaves if isinstance(v, nnx.RngState)}


def _mismatch(copy: _Copy, source_name: str, source_shape, target_shape) -> ConfigError:
  where = (f"{copy.field}: {source_name!r} is {tuple(source_shape)} in {copy.workdir!r} but "
           f"{tuple(target_shape)} here")
  if source_name.endswith("embeddings/word/embedding") and source_shape[1:] == target_shape[1:]:
    return ConfigError(f"{where}: the vocabulary differs from that run's; set "
                       f"config.data.tokenizer to its tokenizer ({copy.workdir}/tokenizer.json, "
                       "made from the source's vocab.txt).")
  whole_model = copy.field == "config.init_from"
  head = " (and, with head=True, the classes and nesting)" if whole_model else ""
  return ConfigError(f"{where}; match {copy.model_field}{head} to the pre-trained run.")


def _copy(target: Any, source: Any, copy: _Copy, notes: list[str]) -> tuple[Any, int]:
  """`target` with every leaf under `copy.target_prefix` taken from `source` (resharded like
  target), and how many leaves were copied."""
  source_leaves = _by_path(source)
  skipped = _rng_names(target)
  copied = 0

  def take(path, leaf):
    nonlocal copied
    name = sharding.path_to_str(path)
    if not name.startswith(copy.target_prefix) or name in skipped:
      return leaf
    source_name = copy.source_prefix + name[len(copy.target_prefix):]
    if source_name not in source_leaves:
      raise ConfigError(f"{copy.field}.workdir={copy.workdir!r} has no parameter "
                        f"{source_name!r}" + (f" (for {name!r})" if source_name != name else "")
                        + f": it was trained with a different model; match {copy.model_field} "
                        "to it" + (" or set its prefix." if copy.field != "config.init_from"
                                   else "."))
    value = source_leaves[source_name]
    if value.shape != leaf.shape and name.endswith("pos_embedding"):
      notes.append(f"{name} resized {tuple(value.shape)} -> {tuple(leaf.shape)}")
      value = vit.resize_pos_embedding(jnp.asarray(value), leaf.shape[1])
    if value.shape != leaf.shape:
      raise _mismatch(copy, source_name, value.shape, leaf.shape)
    copied += 1
    return jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding)

  return jax.tree_util.tree_map_with_path(take, target), copied


def load_pretrained(state: dict[str, Any], init_cfg: ml_collections.ConfigDict,
                    log=print) -> dict[str, Any]:
  """`state` (freshly initialised, sharded) with the pre-trained weights copied in; one
  console line per init_from entry (the whole model, or each tower)."""
  copies = _copies(init_cfg)
  sources: dict[str, Any] = {}  # each workdir restored once
  params, model_state = state["params"], state["model_state"]
  for field in dict.fromkeys(c.field for c in copies):
    done, notes = [], []
    for copy in (c for c in copies if c.field == field):
      if copy.workdir not in sources:
        sources[copy.workdir] = inference.load(copy.workdir)
      source = sources[copy.workdir]
      params, copied = _copy(params, source.params, copy, notes)
      if not copied:
        raise ConfigError(f"{field}: this model has no parameters under {copy.target_prefix!r}"
                          + (" (per-tower init_from is for config.model.name='dual_encoder')"
                             if field != "config.init_from" else "") + ": drop it.")
      model_state, _ = _copy(model_state, source.model_state, copy, notes)
      done.append(copy.target_prefix.rstrip("/"))
    source_part = f"{copy.source_prefix} of " if copy.source_prefix != copy.target_prefix else ""
    log(f"Initialised {' and '.join(done)} from {source_part}{copy.workdir} (step {source.step})"
        + (f"; {'; '.join(notes)}" if notes else "") + ".")
  return {**state, "params": params, "model_state": model_state}
