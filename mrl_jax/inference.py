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

from mrl_jax import experiment, sharding
from mrl_jax.checkpointing import (Checkpointer, CheckpointMismatchError,
                                   CheckpointUnreadableError, unreadable_reason)
from mrl_jax.evaluation.knn import l2_normalize
from mrl_jax.errors import UserError
from mrl_jax.workdir_path import read_text, workdir_path


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """The workdir has no config or no complete (readable) checkpoint."""


class ConfigFileError(UserError, ValueError):
  """The workdir's config.json cannot be read."""


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config `workdir` (a folder or a bucket URI) was trained with (WORKDIR/config.json)."""
  path = workdir_path(workdir) / "config.json"
  if not path.exists():
    raise CheckpointNotFoundError(
        f"{path} does not exist: {workdir} is not an mrl_jax workdir. Train into it with "
        "`python -m mrl_jax.main --config ... --workdir DIR`, or import a PyTorch checkpoint "
        "with `python -m mrl_jax.tools.import_torch`.")
  return ml_collections.ConfigDict(read_config_json(path))


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
  """The dict in a workdir's config.json; a truncated or hand-broken file is a UserError."""
  try:
    saved = json.loads(read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigFileError(
        f"{path} is not valid JSON ({unreadable_reason(e)}): it was cut short or edited. "
        "Restore it from a copy, or rerun training with the same --config (it rewrites "
        "config.json once a checkpoint is restored).") from e
  if not isinstance(saved, dict):
    raise ConfigFileError(f"{path} holds a JSON {type(saved).__name__}, not the config object "
                          "training writes: restore it from a copy.")
  return saved


def _process_rows(out: jax.Array, batch: jax.Array, axis: int) -> np.ndarray:
  """This process's rows of `out` (batch along `axis`): those its rows of `batch` became.

  With several processes the mesh spans all of them, so `out` is a global array; each
  process takes the rows it put in (whatever sharding XLA gave the output).
  """
  if out.is_fully_addressable:
    return np.asarray(out)
  mine = sorted({(s.index[0].start or 0, s.index[0].stop or batch.shape[0])
                 for s in batch.addressable_shards})
  parts = []
  for start, stop in mine:
    for shard in out.addressable_shards:
      lo = shard.index[axis].start or 0
      hi = shard.index[axis].stop if shard.index[axis].stop is not None else out.shape[axis]
      if lo <= start and stop <= hi:
        parts.append(np.take(np.asarray(shard.data), np.arange(start - lo, stop - lo), axis=axis))
        break
  return np.concatenate(parts, axis=axis)


class RestoredModel:
  """A restored nested classifier with batched, jitted `embed` and `nested_logits`
  (what `load` returns for config.task="classification")."""

  def __init__(self, experiment: Any, state: dict[str, Any], step: int,
               batch_size: int = 256):
    self.config = experiment.config
    self.step = step
    self.num_classes = experiment.info.num_classes
    self.dims = experiment.dims
    self.batch_size = batch_size
    self._mesh = experiment.mesh
    self._params, self._model_state = state["params"], state["model_state"]
    graphdef = experiment.spec.graphdef

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
      x = sharding.global_batch({"x": chunk}, self._mesh)["x"]
      z, lg = self._forward(self._params, self._model_state, x)
      zs.append(_process_rows(z, x, 0)[:real])
      logits.append(_process_rows(lg, x, 1)[:, :real])
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


def load(workdir: str | os.PathLike, *, step: int | None = None, batch_size: int = 256) -> Any:
  """Restores `workdir`'s latest readable (or the given) checkpoint onto all local devices.

  Returns the task's restored model (`Task.restored_model`; for classification a
  `RestoredModel`), its `batch_size` set to `batch_size`. Without `step`, a
  committed but unreadable newest checkpoint is set aside as `<step>.corrupt`
  (one console line) and the next newest is restored, as training does on resume.
  """
  workdir = workdir_path(workdir)
  config = load_config(workdir)
  checkpointer = Checkpointer(workdir, every_steps=0)
  # Inference is pure data parallelism over whatever devices this process has.
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  set_aside = []
  try:
    while True:
      wanted = checkpointer.latest_step() if step is None else step
      if wanted is None:
        raise CheckpointNotFoundError(
            f"No complete checkpoint in {checkpointer.directory}"
            + (f" (unreadable, set aside: {', '.join(map(str, set_aside))})" if set_aside else "")
            + ": train first, or check --workdir.")
      try:
        # The model is shaped by what the checkpoint was trained with (its meta),
        # so it restores without the dataset.
        exp = experiment.build(config, meta=checkpointer.read_meta(wanted), mesh=mesh,
                               check=False)
        state = checkpointer.restore(wanted, exp.restore_target(), None, exp.checkpoint_meta())
        break
      except (CheckpointMismatchError, UserError):
        raise
      except Exception as e:  # pylint: disable=broad-except  # Whatever Orbax or TensorStore raise.
        if step is not None:  # Asked for by number: nothing else to fall back on.
          raise CheckpointUnreadableError(
              f"Checkpoint step {step} in {checkpointer.directory} is unreadable "
              f"({unreadable_reason(e)}): pass another step, or none for the newest "
              "readable one.") from e
        checkpointer.set_aside_unreadable(wanted, e)
        set_aside.append(wanted)
  finally:
    checkpointer.close()
  model = exp.task.restored_model(exp, state, wanted)
  model.batch_size = batch_size
  # Where its files are (e.g. a text model's tokenizer.json): a local path or a URI.
  model.workdir = os.fspath(workdir)
  return model
