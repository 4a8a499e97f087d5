"""Image classification, the task of every config written before tasks existed.

images -> encoder (ResNet, ViT) -> NestedHead: one set of logits per prefix size,
trained with softmax (integer labels) or sigmoid (multi-hot labels, JFT-style)
cross-entropy per size (`config.loss`), measured by top-1 (precision@1 for
multi-label data) per size. Batches are {"image": float32 [B, H, W, C],
"label": int32 [B] or multi-hot [B, C]} from `mrl_jax/data/pipeline.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mrl_jax import losses, models
from mrl_jax.data import pipeline
from mrl_jax.data.sources import DatasetNotPreparedError
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import periodic
from mrl_jax.nesting import Nesting
from mrl_jax.tasks.base import Task

LOSSES = ("softmax", "sigmoid")
# The classes of the nested head shard over "model"; never the embedding dim prefixes slice.
SHARDING_RULES = (("(^|/)head/", ("model",)),)


@dataclasses.dataclass(frozen=True)
class ImageDataInfo:
  """What the model and the batch layout depend on."""

  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of training batches
  multilabel: bool
  num_train_examples: int
  source: str = "dataset"  # "dataset", "config" (compile_check) or "checkpoint"

  @property
  def in_channels(self) -> int:
    return int(self.image_shape[-1])


def _from_summary(summary: pipeline.DatasetSummary) -> ImageDataInfo:
  return ImageDataInfo(summary.num_classes, tuple(summary.image_shape), summary.multilabel,
                       summary.num_train_examples, "dataset")


class ClassificationTask(Task):
  """Nested classification (MRL, MRL-E, FF-k heads) of images."""

  name = "classification"
  console_metric = "top1"

  # ------------------------------------------------------------ config and data
  def check_config(self, config: ml_collections.ConfigDict) -> None:
    if config.loss not in LOSSES:
      raise ConfigError(f"config.loss={config.loss!r} is unknown: use one of {LOSSES}.")

  def data_info(self, config: ml_collections.ConfigDict) -> ImageDataInfo:
    info = _from_summary(pipeline.dataset_info(config.data))
    if config.get("num_classes") and config.num_classes != info.num_classes:
      raise ConfigError(f"config.num_classes={config.num_classes} but {config.data.name!r} has "
                        f"{info.num_classes} classes: set --config.num_classes="
                        f"{info.num_classes} (or point config.data at the intended dataset).")
    return info

  def data_info_from_config(self, config: ml_collections.ConfigDict) -> ImageDataInfo:
    """The prepared dataset's layout if there is one, else config.num_classes, a square
    config.data.image_size with len(config.data.mean) channels, and multi-hot labels
    when config.loss == "sigmoid"."""
    try:
      return _from_summary(pipeline.dataset_info(config.data))
    except DatasetNotPreparedError:
      pass
    num_classes = config.get("num_classes")
    size = config.data.get("image_size")
    if not num_classes or not size:
      raise ConfigError(
          f"Dataset {config.data.name!r} is not prepared here, so compile_check needs "
          "config.num_classes and config.data.image_size to shape the batch: set them.")
    channels = len(config.data.get("mean", (0.0, 0.0, 0.0)))
    channels = channels if channels in (1, 3) else 3
    return ImageDataInfo(int(num_classes), (int(size), int(size), channels),
                         config.get("loss") == "sigmoid", int(config.batch_size), "config")

  def data_info_from_meta(self, config: ml_collections.ConfigDict,
                          meta: dict[str, Any]) -> ImageDataInfo:
    # Only the classes and channels shape parameters; one example sizes the (unused)
    # schedule, as inference has always done.
    channels = int(meta.get("in_channels", 3))
    size = int((config.get("data") or {}).get("image_size") or 0)
    return ImageDataInfo(int(meta["num_classes"]), (size, size, channels),
                         config.get("loss") == "sigmoid", 1, "checkpoint")

  def train_iterator(self, config: ml_collections.ConfigDict) -> Any:
    return pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                        seed=config.seed)

  def eval_batches(self, config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
    return pipeline.make_eval_batches(config.data, global_batch_size=config.eval_batch_size)

  def data_metrics(self, iterator: Any) -> dict[str, float]:
    return pipeline.data_metrics(iterator)

  # ------------------------------------------------------------ model and checkpoint
  def embedding_dim(self, config: ml_collections.ConfigDict) -> int:
    return models.embedding_dim(config)

  def model_description(self, config: ml_collections.ConfigDict, nesting: Nesting) -> str:
    return f"{config.model.name} ({config.head} head, dims {list(nesting.dims)})"

  def build_model(self, config: ml_collections.ConfigDict, nesting: Nesting,
                  info: ImageDataInfo, rngs: nnx.Rngs) -> nnx.Module:
    return models.build_model(config, num_classes=info.num_classes,
                              in_channels=info.in_channels, rngs=rngs, nesting=nesting)

  def checkpoint_meta(self, config: ml_collections.ConfigDict, nesting: Nesting,
                      info: ImageDataInfo) -> dict[str, Any]:
    meta = {"model": config.model.to_dict(), "head": config.head, "dims": list(nesting.dims),
            "num_classes": int(info.num_classes), "in_channels": int(info.in_channels),
            "head_bias": bool(config.get("head_bias", True))}
    if config.get("head_class_multiple", 1) != 1:  # Absent from older checkpoints: only when used.
      meta["head_class_multiple"] = int(config.head_class_multiple)
    return meta

  def sharding_rules(self, config: ml_collections.ConfigDict) -> tuple:
    return SHARDING_RULES

  def restored_model(self, experiment: Any, state: dict[str, Any], step: int) -> Any:
    from mrl_jax import inference  # pylint: disable=g-import-not-at-top  # inference builds tasks
    return inference.RestoredModel(experiment, state, step)

  def evaluators(self, config: ml_collections.ConfigDict, info: ImageDataInfo) -> list[Any]:
    return periodic.build_evaluators(config, in_channels=info.in_channels)

  # ------------------------------------------------------------ steps (traced)
  def abstract_batch(self, config: ml_collections.ConfigDict, info: ImageDataInfo,
                     batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    label_shape = (batch_size, info.num_classes) if info.multilabel else (batch_size,)
    return {"image": jax.ShapeDtypeStruct((batch_size, *info.image_shape), jnp.float32),
            "label": jax.ShapeDtypeStruct(label_shape, jnp.int32)}

  def loss(self, config: ml_collections.ConfigDict, model: nnx.Module,
           batch: dict[str, jax.Array], nesting: Nesting, *,
           train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    _, logits = model(batch["image"], train=train)
    weights = jnp.asarray(nesting.weights, jnp.float32)
    loss, per_size_loss = losses.nested_loss(config, logits, batch["label"], weights)
    return loss, {"per_size_loss": per_size_loss,
                  "per_size_top1": losses.nested_top1(logits, batch["label"])}

  def eval_sums(self, config: ml_collections.ConfigDict, model: nnx.Module,
                batch: dict[str, jax.Array], nesting: Nesting) -> dict[str, jax.Array]:
    _, logits = model(batch["image"], train=False)
    mask = batch["mask"]
    weights = jnp.asarray(nesting.weights, jnp.float32)
    _, per_loss = losses.nested_loss(config, logits, batch["label"], weights, mask=mask)
    correct = (losses.nested_correct(logits, batch["label"]) * mask).sum(axis=1)
    return {"correct": correct, "loss_sum": per_loss * mask.sum(), "count": mask.sum()}

  def reduce_eval(self, totals: dict[str, np.ndarray]) -> dict[str, Any]:
    count = max(float(totals["count"]), 1.0)
    return {"top1": totals["correct"] / count, "loss": totals["loss_sum"] / count,
            "count": int(totals["count"])}

  def embed(self, config: ml_collections.ConfigDict, model: nnx.Module,
            batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    z = model.encoder(batch["image"], train=False).astype(jnp.float32)
    return {"z": z, "label": batch["label"], "mask": batch["mask"]}

  # ------------------------------------------------------------ reporting
  def summary(self, config: ml_collections.ConfigDict, dims: tuple[int, ...],
              result: dict[str, Any]) -> dict[str, Any]:
    return {"val_top1": {str(m): float(a) for m, a in zip(dims, result["top1"])},
            "val_loss": {str(m): float(v) for m, v in zip(dims, result["loss"])},
            "eval_examples": result["count"]}

  def val_metrics(self, dims: tuple[int, ...], result: dict[str, Any]) -> dict[str, float]:
    return {**{f"val/top1_d{m}": float(v) for m, v in zip(dims, result["top1"])},
            **{f"val/loss_d{m}": float(v) for m, v in zip(dims, result["loss"])}}

  def format_table(self, config: ml_collections.ConfigDict, dims: tuple[int, ...],
                   result: dict[str, Any]) -> str:
    # Multi-label data: the top class counts as right if it is one of the labels.
    multilabel = pipeline.dataset_info(config.data).multilabel
    return format_table(dims, result["top1"], config.data.name, multilabel)

  def report_fields(self, config: ml_collections.ConfigDict,
                    info: ImageDataInfo) -> dict[str, Any]:
    return {"num_classes": info.num_classes, "input_from": info.source,
            "image_shape": list(info.image_shape)}


def format_table(dims: tuple[int, ...], top1: np.ndarray, dataset: str,
                 multilabel: bool = False) -> str:
  """The final console table: top-1 (or prec@1 for multi-label data) per size."""
  name = "prec@1" if multilabel else "top-1"
  lines = [f"Validation {name} per nesting size ({dataset}):", f"   dims | {name} (%)",
           "  ------+----------"]
  lines += [f"  {m:5d} | {100 * a:6.2f}" for m, a in zip(dims, top1)]
  return "\n".join(lines)
