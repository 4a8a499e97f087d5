"""What a task is: everything the train loop, compile_check, probing and inference
need to know about one kind of training, behind one small interface.

The loop (`mrl_jax/train.py`) knows no task: it asks the task for its data,
model, loss and metrics, and the experiment builder (`mrl_jax/experiment.py`)
jits the steps around the task's pure functions. A task is chosen by
`config.task` (default "classification", so configs and checkpoints written
before tasks existed keep their meaning):

  * "classification" (`tasks/classification.py`): images -> encoder -> nested
    head, softmax or sigmoid cross-entropy per prefix size.
  * "mlm" (`tasks/mlm.py`): token ids -> BERT -> nested tied MLM decoder,
    masked-LM cross-entropy per prefix size.
  * "contrastive" (`tasks/contrastive.py`): image-text pairs -> an image tower
    and a text tower (ALIGN / CLIP / SigLIP style) -> the nested contrastive
    loss, every prefix of both embeddings normalised on its own.

Conventions shared by every task:
  * `DataInfo` is the task's own description of its data (a frozen dataclass);
    it must have `num_train_examples`. The builder gets it from the prepared
    dataset (`data_info`) or, for compile_check without data, from the config
    (`data_info_from_config`), and, when restoring a workdir, from the
    checkpoint's meta (`data_info_from_meta`), so a model restores without its
    dataset.
  * Batches are dicts of numpy arrays (host) / jax arrays (device), rows on the
    data axes of the mesh; evaluation batches carry "mask" [B] (1 = real row).
  * Per-size values are arrays [num_sizes] in the order of `nesting.dims`.
  * The pure functions (`loss`, `eval_sums`, `embed`) are traced inside jit:
    jax ops only, no host syncs.
  * The nesting is built once per run (`nesting`, from the config and
    `embedding_dim`) and handed to `build_model` and to the pure functions, so
    the model and the loss always agree on the sizes and weights.
  * Evaluators (`evaluators`) are objects with `name`, `due(step, total_steps)`,
    `run(embed, mesh, dims) -> {metric: float}` (embed: global batch ->
    replicated `embed` output) and `console_line(metrics, dims) -> str`.
"""

from __future__ import annotations

import abc
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.models.nested_head import head_dims
from mrl_jax.nesting import Nesting


class Task(abc.ABC):
  """One kind of training (classification, masked LM, ...)."""

  name: str = ""
  # The per-size training metric printed on the console and logged as
  # train/<name>_d<m> (besides the loss), e.g. "top1" or "mlm_accuracy".
  console_metric: str = ""

  # ------------------------------------------------------------ config and data
  def check_config(self, config: ml_collections.ConfigDict) -> None:
    """Task-specific config checks (ConfigError naming the field); run before data opens."""

  @abc.abstractmethod
  def data_info(self, config: ml_collections.ConfigDict) -> Any:
    """The prepared dataset's description (raises the data module's not-prepared error)."""

  def data_info_from_config(self, config: ml_collections.ConfigDict) -> Any:
    """For compile_check when the dataset is not prepared: the same description from
    config fields alone (ConfigError naming the fields to set when they are missing)."""
    return self.data_info(config)

  @abc.abstractmethod
  def data_info_from_meta(self, config: ml_collections.ConfigDict, meta: dict[str, Any]) -> Any:
    """The description a checkpoint was trained with (from `checkpoint_meta`)."""

  @abc.abstractmethod
  def train_iterator(self, config: ml_collections.ConfigDict) -> Any:
    """A checkpointable iterator (grain.DatasetIterator) of local training batches."""

  @abc.abstractmethod
  def eval_batches(self, config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
    """Local evaluation batches of config.data's eval split, each with "mask"."""

  def on_workdir(self, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Called by training beside writing WORKDIR/config.json: files the workdir must carry
    to be restored without the dataset (e.g. the MLM task's tokenizer.json). Default: none."""

  def data_metrics(self, iterator: Any) -> dict[str, float]:
    """Input metrics of a `train_iterator` for the train log rows (a collective when
    several processes run: every process calls it at the same steps)."""
    return {}

  # ------------------------------------------------------------ model and checkpoint
  def nesting(self, config: ml_collections.ConfigDict) -> Nesting:
    """The checked nesting: config.nesting.{dims,weights} over an embedding of
    `embedding_dim(config)`; with config.head="ff" the single size config.ff_dim
    (default: the whole embedding), weight 1."""
    dim = self.embedding_dim(config)
    kind = config.get("head", "mrl")
    dims = head_dims(kind, config.nesting.dims, config.get("ff_dim"), dim)
    if dims[-1] > dim:
      raise ConfigError(f"config.nesting.dims={tuple(dims)} goes up to {dims[-1]} but "
                        f"{config.model.name} embeds into {dim} dims: drop the larger sizes.")
    weights = (1.0,) if kind == "ff" else tuple(config.nesting.get("weights") or ())
    return Nesting.create(dims, weights, embedding_dim=dim)

  def model_description(self, config: ml_collections.ConfigDict, nesting: Nesting) -> str:
    """What the console's "Model:" line says before the parameter count."""
    return f"{config.model.name} (dims {list(nesting.dims)})"

  @abc.abstractmethod
  def embedding_dim(self, config: ml_collections.ConfigDict) -> int:
    """The size d of the nested embedding, from the config alone (nothing allocated)."""

  @abc.abstractmethod
  def build_model(self, config: ml_collections.ConfigDict, nesting: Nesting, info: Any,
                  rngs: nnx.Rngs) -> nnx.Module:
    """The model, whose nested part scores exactly `nesting.dims`."""

  @abc.abstractmethod
  def checkpoint_meta(self, config: ml_collections.ConfigDict, nesting: Nesting,
                      info: Any) -> dict[str, Any]:
    """What the parameters depend on; checked on restore (a mismatch is one line)."""

  def sharding_rules(self, config: ml_collections.ConfigDict) -> tuple:
    """(regex, axes) rules for parameters when the config gives none."""
    return ()

  def restored_model(self, experiment: Any, state: dict[str, Any], step: int) -> Any:
    """What `inference.load` returns for a restored `state` (params and model_state
    restored, opt_state absent) of `experiment` (built from config.json + meta).
    `load` then sets its attributes `batch_size` (load's argument) and `workdir`."""
    raise NotImplementedError(f"Task {self.name!r} has no inference model.")

  def evaluators(self, config: ml_collections.ConfigDict, info: Any) -> list[Any]:
    """The representation evaluators config.evaluators asks for (checked and opened
    before training starts); see the module docstring for what one is."""
    return []

  # ------------------------------------------------------------ steps (traced)
  @abc.abstractmethod
  def abstract_batch(self, config: ml_collections.ConfigDict, info: Any,
                     batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes (no shardings) of a global training batch, for lowering."""

  @abc.abstractmethod
  def loss(self, config: ml_collections.ConfigDict, model: nnx.Module,
           batch: dict[str, jax.Array], nesting: Nesting, *,
           train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted total loss, metrics): metrics["per_size_loss"] and
    metrics["per_size_" + console_metric] are [num_sizes]; others are free."""

  @abc.abstractmethod
  def eval_sums(self, config: ml_collections.ConfigDict, model: nnx.Module,
                batch: dict[str, jax.Array], nesting: Nesting) -> dict[str, jax.Array]:
    """Sums over the batch's real rows (batch["mask"]), added up over the eval split."""

  @abc.abstractmethod
  def reduce_eval(self, totals: dict[str, np.ndarray]) -> dict[str, Any]:
    """Eval-split results from the summed `eval_sums`: per-size arrays and "count"."""

  @abc.abstractmethod
  def embed(self, config: ml_collections.ConfigDict, model: nnx.Module,
            batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{"z": [B, d] float32, plus what evaluators need (e.g. "label", "mask")}."""

  # ------------------------------------------------------------ reporting
  @abc.abstractmethod
  def summary(self, config: ml_collections.ConfigDict, dims: tuple[int, ...],
              result: dict[str, Any]) -> dict[str, Any]:
    """The task's keys of summary.json from the final `reduce_eval` result."""

  @abc.abstractmethod
  def val_metrics(self, dims: tuple[int, ...], result: dict[str, Any]) -> dict[str, float]:
    """Flat metrics written to the metric log, e.g. {"val/top1_d8": ...}."""

  @abc.abstractmethod
  def format_table(self, config: ml_collections.ConfigDict, dims: tuple[int, ...],
                   result: dict[str, Any]) -> str:
    """The final console table, one row per size."""

  def evaluator_summary(self, config: ml_collections.ConfigDict, dims: tuple[int, ...],
                        metrics: dict[str, float]) -> dict[str, Any]:
    """Top-level summary.json keys made from the final evaluators' flat metrics (e.g. a
    dual encoder's {"zero_shot_top1": {"<dim>": float}}); they stay under "evaluators"
    too. Default: none."""
    return {}

  def report_fields(self, config: ml_collections.ConfigDict, info: Any) -> dict[str, Any]:
    """Task keys of compile_check's report (e.g. the class count)."""
    return {}
