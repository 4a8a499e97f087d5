"""Restore any mrl_jax workdir and run the model: `m = inference.load(W)`.

The model is rebuilt from `W/config.json` and the latest complete checkpoint in
`W/checkpoints`, restored onto the devices present (one CPU included), whatever
mesh it was saved from. Images are float arrays [N, H, W, C] in the layout the
config's preprocessing produces (see `mrl_jax/data/pipeline.py`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mrl_jax import sharding, train_state
from mrl_jax.checkpointing import Checkpointer
from mrl_jax.config_checks import nesting_from_config
from mrl_jax.evaluation.knn import l2_normalize
from mrl_jax.errors import UserError


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """The workdir has no config or no complete checkpoint."""


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise CheckpointNotFoundError(
        f"{path} does not exist: {workdir} is not an mrl_jax workdir. Train into it with "
        "`python -m mrl_jax.main --config ... --workdir DIR`, or import a PyTorch checkpoint "
        "with `python -m mrl_jax.tools.import_torch`.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


class RestoredModel:
  """A restored nested classifier with batched, jitted `embed` and `nested_logits`."""

  def __init__(self, config: ml_collections.ConfigDict, spec: train_state.StateSpec,
               state: dict[str, Any], mesh, step: int, num_classes: int,
               batch_size: int = 256):
    self.config = config
    self.step = step
    self.num_classes = num_classes
    self.dims = nesting_from_config(config).dims
    self.batch_size = batch_size
    self._mesh = mesh
    self._params, self._model_state = state["params"], state["model_state"]
    graphdef = spec.graphdef

    def forward(params, model_state, images):
      model = nnx.merge(graphdef, params, model_state, copy=True)
      return model(images, train=False)

    self._forward = jax.jit(forward)

  def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N, d], logits [n, N, C]) in batches padded to a fixed shape."""
    images = np.asarray(images, np.float32)
    batch = self.batch_size - self.batch_size % max(sharding.data_parallel_size(self._mesh), 1)
    batch = max(batch, sharding.data_parallel_size(self._mesh))
    zs, logits = [], []
    for start in range(0, len(images), batch):
      chunk = images[start:start + batch]
      real = len(chunk)
      if real < batch:  # One compiled shape: pad the last batch.
        chunk = np.concatenate([chunk, np.zeros((batch - real, *chunk.shape[1:]), chunk.dtype)])
      z, lg = self._forward(self._params, self._model_state,
                            sharding.global_batch({"x": chunk}, self._mesh)["x"])
      zs.append(np.asarray(z)[:real])
      logits.append(np.asarray(lg)[:, :real])
    return np.concatenate(zs), np.concatenate(logits, axis=1)

  def embed(self, images: np.ndarray, dim: int | None = None,
            normalize: bool = False) -> np.ndarray:
    """Embeddings [N, dim]: the first `dim` features (all when None), optionally unit-norm."""
    z, _ = self._run(images)
    if dim is not None:
      if not 0 < dim <= z.shape[1]:
        raise ValueError(f"dim={dim} must be in [1, {z.shape[1]}].")
      z = z[:, :dim]
    return np.asarray(l2_normalize(jnp.asarray(z))) if normalize else z

  @property
  def params(self) -> Any:
    """The restored parameters (an NNX State: `encoder/...`, `head/...`)."""
    return self._params

  @property
  def model_state(self) -> Any:
    """Non-parameter state, e.g. BatchNorm statistics."""
    return self._model_state

  def embed_and_logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self._run(images)

  def nested_logits(self, images: np.ndarray) -> np.ndarray:
    """The nested head's logits [num_sizes, N, num_classes]."""
    return self._run(images)[1]


def load(workdir: str, *, step: int | None = None, batch_size: int = 256) -> RestoredModel:
  """Restores `workdir`'s latest (or given) checkpoint onto all local devices."""
  workdir = os.path.abspath(workdir)
  config = load_config(workdir)
  checkpointer = Checkpointer(workdir, every_steps=0)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise CheckpointNotFoundError(
          f"No complete checkpoint in {checkpointer.directory}: train first, or check --workdir.")
    saved_meta = checkpointer.read_meta(step)
    num_classes = int(saved_meta["num_classes"])
    in_channels = int(saved_meta.get("in_channels", 3))
    spec = train_state.state_spec(config, num_classes=num_classes, in_channels=in_channels,
                                  num_train_examples=1)
    # Inference is pure data parallelism over whatever devices this process has.
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    shardings = train_state.state_shardings(config, spec.abstract, mesh)
    meta = train_state.checkpoint_meta(config, nesting_from_config(config), num_classes,
                                       in_channels)
    state = checkpointer.restore(step, train_state.restore_target(spec.abstract, shardings),
                                 None, meta)
  finally:
    checkpointer.close()
  return RestoredModel(config, spec, state, mesh, step, num_classes, batch_size)
