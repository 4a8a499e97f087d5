"""Representation evaluators that run during training: 1-NN and linear probe per size.

The paper measures JFT-trained models by 1-NN on ImageNet-1K at every prefix
size; a config asks for that (or any single-label split) with

  config.evaluators = dict(
      imagenet_knn=dict(
          every_steps=10_000,               # also runs after the last step
          data=dict(name="imagenet2012", train_split="train", eval_split="validation",
                    image_size=224, ...),   # a data config, as config.data
          batch_size=1024,
          max_train_examples=0,             # database / probe-training cap (0 = all)
          max_test_examples=0,              # query cap (0 = all)
          linear_probe=True, linear_steps=100, linear_l2=1e-4),
  )

Each evaluator embeds its train split (the 1-NN database and the linear probe's
training set) and its eval split with the current parameters, then scores every
nesting size's unit-normalised prefix. An unset `data.data_dir` means
config.data.data_dir. Metrics: `eval/<name>/knn1_top1_d<m>`
and `eval/<name>/linear_top1_d<m>`. Grayscale evaluation images fed to an RGB
model are repeated over the 3 channels.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from mrl_jax import sharding
from mrl_jax.errors import ConfigError
from mrl_jax.data import pipeline
from mrl_jax.evaluation import knn
from mrl_jax.evaluation.linear_probe import linear_probe_top1

DEFAULTS = dict(every_steps=0, data=None, batch_size=256, max_train_examples=0,
                max_test_examples=0, linear_probe=True, linear_steps=100, linear_l2=1e-4)


@dataclasses.dataclass
class Evaluator:
  name: str
  every_steps: int
  data: ml_collections.ConfigDict
  batch_size: int
  max_train_examples: int
  max_test_examples: int
  linear_probe: bool
  linear_steps: int
  linear_l2: float
  num_classes: int
  in_channels: int = 3  # the model's; grayscale images are repeated to match

  def due(self, step: int, total_steps: int) -> bool:
    return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)

  def run(self, embed: Callable, mesh, dims: tuple[int, ...]) -> dict[str, float]:
    """`run_evaluator` with this evaluator's settings (the train loop's entry point)."""
    return run_evaluator(self, embed, mesh, dims, self.in_channels)

  def console_line(self, metrics: dict[str, float], dims: tuple[int, ...]) -> str:
    return "1-NN top-1 " + " ".join(
        f"@{m}:{metrics[f'eval/{self.name}/knn1_top1_d{m}']:.3f}" for m in dims)


def build_evaluators(config: ml_collections.ConfigDict, *, in_channels: int) -> list[Evaluator]:
  """Checks `config.evaluators` (and opens its datasets) before training starts."""
  out = []
  for name, cfg in (config.get("evaluators") or {}).items():
    given = dict(cfg.items())
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
      raise ConfigError(f"config.evaluators.{name}: unknown field(s) {unknown}; known: "
                        f"{sorted(DEFAULTS)}.")
    s = {**DEFAULTS, **given}
    if s["data"] is None:
      raise ConfigError(f"config.evaluators.{name}.data is missing: give a data config "
                        "(like config.data) naming a single-label dataset.")
    data = ml_collections.ConfigDict(s["data"].to_dict())
    if data.get("data_dir") is None:  # Unset: look where the training data lives.
      data.data_dir = config.data.get("data_dir")
    s["data"] = data
    info = pipeline.dataset_info(s["data"])
    if info.multilabel:
      raise ConfigError(f"config.evaluators.{name}: {s['data'].name!r} is multi-label; 1-NN "
                        "and linear-probe top-1 need single-label data (e.g. imagenet2012).")
    if info.eval_image_shape[-1] not in (1, in_channels):
      raise ConfigError(f"config.evaluators.{name}: {s['data'].name!r} images have "
                        f"{info.eval_image_shape[-1]} channels but the model takes {in_channels}.")
    if s["batch_size"] % pipeline.process_layout()[1]:
      raise ConfigError(f"config.evaluators.{name}.batch_size={s['batch_size']} must be a "
                        "multiple of the process count.")
    out.append(Evaluator(name=name, every_steps=int(s["every_steps"]), data=s["data"],
                         batch_size=int(s["batch_size"]),
                         max_train_examples=int(s["max_train_examples"]),
                         max_test_examples=int(s["max_test_examples"]),
                         linear_probe=bool(s["linear_probe"]),
                         linear_steps=int(s["linear_steps"]), linear_l2=float(s["linear_l2"]),
                         num_classes=info.num_classes, in_channels=in_channels))
  return out


def embed_split(embed: Callable[[dict[str, Any]], dict[str, np.ndarray]], data_cfg, split: str,
                batch_size: int, mesh, in_channels: int,
                limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings [N, d], labels [N]) of the first `limit` (0 = all) examples of a split.

  `embed` maps a global batch to replicated {"z", "label", "mask"} (see
  Experiment.embed_step), so every process gets every row.
  """
  zs, labels, seen = [], [], 0
  for batch in pipeline.make_eval_batches(data_cfg, global_batch_size=batch_size, split=split):
    if batch["image"].shape[-1] == 1 and in_channels == 3:
      batch = {**batch, "image": np.repeat(batch["image"], 3, axis=-1)}
    out = embed(sharding.global_batch(batch, mesh))
    keep = np.asarray(out["mask"]) > 0
    zs.append(np.asarray(out["z"])[keep])
    labels.append(np.asarray(out["label"])[keep])
    seen += int(keep.sum())
    if limit and seen >= limit:
      break
  z, y = np.concatenate(zs), np.concatenate(labels)
  return (z[:limit], y[:limit]) if limit else (z, y)


def run_evaluator(ev: Evaluator, embed: Callable, mesh, dims: tuple[int, ...],
                  in_channels: int) -> dict[str, float]:
  """Metrics {"eval/<name>/knn1_top1_d<m>": ..., ...} for the current parameters."""
  start = time.time()
  train_z, train_y = embed_split(embed, ev.data, ev.data.get("train_split", "train"),
                                 ev.batch_size, mesh, in_channels, ev.max_train_examples)
  test_z, test_y = embed_split(embed, ev.data, ev.data.get("eval_split", "test"),
                               ev.batch_size, mesh, in_channels, ev.max_test_examples)
  out: dict[str, float] = {}
  for m in dims:
    db = np.asarray(knn.l2_normalize(train_z[:, :m]))
    queries = np.asarray(knn.l2_normalize(test_z[:, :m]))
    _, idx = knn.knn_search(queries, db, 1)
    out[f"eval/{ev.name}/knn1_top1_d{m}"] = float(np.mean(train_y[idx[:, 0]] == test_y))
    if ev.linear_probe:
      out[f"eval/{ev.name}/linear_top1_d{m}"] = linear_probe_top1(
          train_z[:, :m], train_y, test_z[:, :m], test_y, ev.num_classes,
          l2=ev.linear_l2, steps=ev.linear_steps)
  out[f"eval/{ev.name}/seconds"] = round(time.time() - start, 2)
  return out
