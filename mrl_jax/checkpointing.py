"""Orbax checkpoints of the train state together with the Grain iterator position.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. `state` is the sharded
train state, `data` the input iterator's state (so a resumed run reads exactly
the next batch), `meta` what the state was built for (model, head, sizes,
classes), checked on restore so a checkpoint from another setup is refused with
a message instead of a shape error. Saves are asynchronous; Orbax writes into a
temporary folder and renames it when complete, so a save killed midway is never
picked up by `latest_step`.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir was written for a different model setup."""


class Checkpointer:
  """Saves every `every_steps` (and when forced), keeps the newest `keep`."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.every_steps = every_steps
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict[str, Any]) -> None:
    """Starts a save of `state` after `step` updates (returns before it is written).

    `data_iterator` None saves no input position (e.g. an imported checkpoint).
    """
    if step in self._manager.all_steps():
      return
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def read_meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None,
              meta: dict[str, Any]) -> Any:
    """Restores into `abstract_state`'s shapes and shardings (any mesh works).

    `data_iterator` is moved to the saved position in place; pass None to
    restore only the state (e.g. for probing).
    """
    saved = self.read_meta(step)
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, config has {v!r}"
             for k, v in meta.items() if saved.get(k) != v]
    if diffs:
      raise CheckpointMismatchError(
          f"The checkpoint at {self.directory}/{step} was written for a different setup ("
          + "; ".join(diffs) + "). Use the config it was trained with, or a new --workdir.")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
