"""A restored dual-encoder workdir: `m = inference.load(W)` on a config.task="contrastive" run.

    m = inference.load("/tmp/align")
    zi = m.embed_image(images, dim=64)                # [N, 64], each row unit norm
    zt = m.embed_text(["a photo of a seven."], dim=64)
    w = m.zero_shot_classifier(["zero", "one"], ("a photo of the digit {}.",), dim=64)
    predictions = (zi @ w.T).argmax(1)

Images are float32 [N, H, W, C] as the evaluation pipeline produces them
(resized to the model's size and normalised with config.data's mean and std);
grayscale images given to an RGB model are repeated over the channels. Text is a
list of strings, tokenized with WORKDIR/tokenizer.json (which training writes) at
config.data.seq_len tokens, or token-id arrays [N, L] / the dict
`TextTokenizer.encode` returns (`text_model.TokenInputs`). Calls are batched at
`batch_size` rows (the last batch padded, so one shape compiles once), jitted,
and run data-parallel over the restoring process's devices.

Matryoshka serving: `dim=m` keeps the first m coordinates and, by default,
unit-normalises that prefix on its own (never the full vector first), which is
what the nested contrastive loss trained for every size of the nesting list.
`scale` is the learned logit scale exp(t) (capped as in training; one value per
nesting size with per_size_scale), `bias` SigLIP's bias (None for softmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from mrl_jax.evaluation import zero_shot
from mrl_jax.text_model import TokenInputs


def _prefix(z: np.ndarray, dim: int | None, normalize: bool) -> np.ndarray:
  """z[:, :dim] (all when None), the prefix unit-normalised on its own if asked."""
  if dim is not None:
    if not 0 < dim <= z.shape[1]:
      raise ValueError(f"dim={dim} must be in [1, {z.shape[1]}] (the embedding's width).")
    z = z[:, :dim]
  return zero_shot.unit_rows(z) if normalize else z


class RestoredDualEncoder(TokenInputs):
  """A restored image tower + text tower: `embed_image`, `embed_text`, `zero_shot_classifier`."""

  def __init__(self, experiment: Any, state: dict[str, Any], step: int, batch_size: int = 256):
    self.config = experiment.config
    self.task = experiment.task
    self.nesting = experiment.nesting
    self.dims = tuple(int(m) for m in experiment.nesting.dims)
    self.step = int(step)
    info = experiment.info
    self.vocab_size = int(info.vocab_size)
    self.seq_len = int(info.seq_len)
    self.image_size = int(info.image_size)
    self.in_channels = int(info.in_channels)
    self.batch_size = batch_size
    self.workdir = getattr(experiment, "workdir", None)
    self._mesh = experiment.mesh
    self._params, self._model_state = state["params"], state["model_state"]
    self._tokenizer = None
    graphdef, task, config = experiment.spec.graphdef, experiment.task, experiment.config

    def merged(params, model_state):
      return nnx.merge(graphdef, params, model_state, copy=True)

    @jax.jit
    def images_fn(params, model_state, batch):
      return merged(params, model_state).embed_image(batch["image"], train=False)

    @jax.jit
    def texts_fn(params, model_state, batch):
      return merged(params, model_state).embed_text(
          batch["input_ids"], attention_mask=batch["attention_mask"],
          token_type_ids=batch["token_type_ids"], train=False)

    @jax.jit
    def task_embed(params, model_state, batch):
      return task.embed(config, merged(params, model_state), batch)

    @jax.jit
    def scale_and_bias(params, model_state):
      return merged(params, model_state).scale_and_bias()

    self._images_fn, self._texts_fn = images_fn, texts_fn
    self._task_embed, self._scale_and_bias = task_embed, scale_and_bias

  # ------------------------------------------------------------ state
  @property
  def params(self) -> Any:
    """The restored parameters (an NNX State: image/..., text/..., *_projection/..., logit_*)."""
    return self._params

  @property
  def model_state(self) -> Any:
    return self._model_state

  @property
  def mesh(self) -> Any:
    """The devices the calls run on (data parallel)."""
    return self._mesh

  @property
  def embedding_dim(self) -> int:
    return int(self.task.embedding_dim(self.config))

  @property
  def scale(self) -> float | np.ndarray:
    """The learned logit scale exp(t): a float, or [num_sizes] with per_size_scale."""
    scale = np.asarray(self._scale_and_bias(self._params, self._model_state)[0], np.float32)
    return float(scale) if scale.ndim == 0 else scale

  @property
  def bias(self) -> float | np.ndarray | None:
    """SigLIP's learned logit bias (a float or [num_sizes]); None without one."""
    bias = self._scale_and_bias(self._params, self._model_state)[1]
    if bias is None:
      return None
    bias = np.asarray(bias, np.float32)
    return float(bias) if bias.ndim == 0 else bias

  # ------------------------------------------------------------ outputs
  def embed_image(self, images: Any, dim: int | None = None, normalize: bool = True) -> np.ndarray:
    """Image embeddings [N, dim] float32 (all d dims when None), each row's prefix unit-norm
    by default. images: float [N, H, W, C] as the evaluation pipeline makes them."""
    images = np.asarray(images, np.float32)
    want = (self.image_size, self.image_size)
    if images.ndim != 4 or images.shape[1:3] != want or images.shape[3] not in (
        1, self.in_channels):
      raise ValueError(f"images must be float [N, {want[0]}, {want[1]}, {self.in_channels}] "
                       f"(the model's input), got shape {images.shape}.")
    if images.shape[3] == 1 and self.in_channels == 3:
      images = np.repeat(images, 3, axis=-1)
    parts = [np.asarray(self._images_fn(self._params, self._model_state, b))[:real]
             for real, b in self._batches({"image": images})]
    z = np.concatenate(parts) if parts else np.zeros((0, self.embedding_dim), np.float32)
    return _prefix(z, dim, normalize)

  def embed_text(self, texts: Any, dim: int | None = None, normalize: bool = True) -> np.ndarray:
    """Text embeddings [N, dim] float32 (all d dims when None), each row's prefix unit-norm
    by default. texts: a list of strings, token ids [N, L], or a dict of token arrays."""
    arrays = self.encode(texts)
    parts = [np.asarray(self._texts_fn(self._params, self._model_state, b))[:real]
             for real, b in self._batches(arrays)]
    z = np.concatenate(parts) if parts else np.zeros((0, self.embedding_dim), np.float32)
    return _prefix(z, dim, normalize)

  def zero_shot_classifier(self, class_names: Sequence[str],
                           templates: Sequence[str] = ("a photo of {}.",),
                           dim: int | None = None) -> np.ndarray:
    """Unit rows [C, dim]: per class, the mean of its prompts' unit prefixes, renormalised
    (every name in every template, "{}" marking the name; `zero_shot.py`). Score images
    with `embed_image(images, dim) @ classifier.T`."""
    if isinstance(class_names, str) or isinstance(templates, str):
      raise TypeError("Give lists of class names and templates, not single strings.")
    if not class_names or not templates or any("{}" not in t for t in templates):
      raise ValueError("Give at least one class name and templates that each contain '{}'.")
    z = self.embed_text(zero_shot.prompt_texts(class_names, templates), normalize=False)
    return zero_shot.classifier_weights(z.reshape(len(class_names), len(templates), -1),
                                        dim or z.shape[1])

  def embed_batch(self, global_batch: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """The task's `embed` of one global batch (on `mesh`), as host arrays: what the
    training evaluators' `embed` is, so `--mode=probe` measures through the same code."""
    return jax.tree.map(np.asarray, self._task_embed(self._params, self._model_state,
                                                     global_batch))

