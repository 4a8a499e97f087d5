"""Orbax checkpoints of the train state together with the Grain iterator position.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. `state` is the sharded
train state, `data` the input iterator's state (so a resumed run reads exactly
the next batch), `meta` what the state was built for (model, head, sizes,
classes), checked on restore so a checkpoint from another setup is refused with
a message instead of a shape error. Saves are asynchronous; Orbax writes into a
temporary folder (`<step>.orbax-checkpoint-tmp`), puts a commit marker
(`commit_success.txt`) in it and renames it when complete, so a save killed
midway is never picked up by `latest_step`.

Orbax itself, on a local filesystem, trusts any folder named like a step. So
`latest_step` also requires the commit marker: a step folder without one (a
copy or sync interrupted midway, a save on a filesystem without atomic
renames) is ignored, and before this process's first save it is renamed
`<step>.incomplete` (kept for inspection, never read) so that the step can be
written again and does not count towards `keep`.

A committed step can still be unreadable (a data file truncated or deleted by
a disk or sync fault after the commit). `restore_latest` tries the newest
committed step and, if Orbax cannot read it, says so in one console line,
renames it `<step>.corrupt` (kept, never deleted, no longer counted towards
`keep`, so garbage collection cannot remove the last readable step in its
place) and tries the next newest. A checkpoint written for another setup is
not unreadable: that CheckpointMismatchError is the user's to fix and is raised.

Every process takes part in every save and restore (Orbax synchronises them).
A checkpoint restores on any process count and mesh: the state is resharded
onto the target shardings, and the iterator state is stored once
(`IteratorStateHandler`), not per process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from mrl_jax.errors import UserError
from mrl_jax.workdir_path import workdir_path


class CheckpointMismatchError(UserError, ValueError):
  """The checkpoint in the workdir was written for a different model setup."""


class CheckpointUnreadableError(UserError, OSError):
  """A checkpoint asked for by step exists but Orbax cannot read it."""


def unreadable_reason(error: BaseException) -> str:
  """`Type: first line of the message`, short enough for one console line."""
  lines = str(error).strip().splitlines()
  first = lines[0].strip() if lines else ""
  if len(first) > 160:
    first = first[:157] + "..."
  return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _console_on_process_0(line: str) -> None:
  if jax.process_index() == 0:
    print(line, file=sys.stdout, flush=True)


ITERATOR_STATE_FILE = "iterator_state.json"
# What Orbax writes into a step folder as the last thing before committing it.
COMMIT_MARKER = "commit_success.txt"
INCOMPLETE_SUFFIX = ".incomplete"
CORRUPT_SUFFIX = ".corrupt"
# What grain.checkpoint.CheckpointHandler wrote (one file per process) before
# IteratorStateHandler existed; process 0's is read from such checkpoints.
_GRAIN_PROCESS_0_FILES = "process_0-of-*.json"


class IteratorStateHandler(ocp.CheckpointHandler):
  """Saves a data iterator's JSON state once, so it restores on any process count.

  Grain's own Orbax handler writes `process_{i}-of-{P}.json` per process and
  restores only with the same P. The train iterator's state here,
  {"next_index": step}, is the same on every process and means the same for
  any process count (see data/pipeline.py), so process 0 writes it and every
  process of any later run reads it. Orbax calls `save` on every process; the
  others write nothing.
  """

  def save(self, directory: epath.Path, args: IteratorStateSave) -> None:
    if jax.process_index() == 0:
      (directory / ITERATOR_STATE_FILE).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path,
              args: IteratorStateRestore | None = None) -> dict[str, Any]:
    """Returns the saved state; moves `args.iterator` (if any) to it in place."""
    path = directory / ITERATOR_STATE_FILE
    if not path.exists():
      legacy = sorted(directory.glob(_GRAIN_PROCESS_0_FILES))
      if not legacy:
        raise FileNotFoundError(f"No {ITERATOR_STATE_FILE} (nor a Grain per-process state "
                                f"file) in {directory}.")
      path = legacy[0]
    state = json.loads(path.read_text())
    iterator = args.iterator if args is not None else None
    if iterator is not None:
      iterator.set_state(state)
      # set_state stops Grain's background prefetch; restart it so the next
      # batch is prepared while the rest of the checkpoint restores.
      if hasattr(iterator, "start_prefetch"):
        iterator.start_prefetch()
    return state


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
  """`state`: the iterator's `get_state()`, taken when the save is requested."""
  state: dict[str, Any]


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
  """`iterator`: moved to the saved position in place (None: only read the state)."""
  iterator: Any = None


def _differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
  """One "field: checkpoint has X, config has Y" per field where `saved` differs from `wanted`.

  Nested dicts are compared field by field, so the message names e.g.
  `model.depth` rather than printing both model configs.
  """
  out = []
  for key, value in wanted.items():
    old = saved.get(key)
    value = json.loads(json.dumps(value))  # Tuples as the JSON on disk has them: lists.
    if isinstance(value, dict) and isinstance(old, dict):
      out += _differences(old, value, f"{prefix}{key}.")
    elif old != value:
      out.append(f"{prefix}{key}: checkpoint has {old!r}, config has {value!r}")
  return out


class Checkpointer:
  """Saves every `every_steps` (and when forced), keeps the newest `keep`."""

  def __init__(self, workdir: str | os.PathLike, *, every_steps: int, keep: int = 3,
               async_save: bool = True, console: Callable[[str], None] | None = None):
    # A local folder (made absolute: Orbax needs that) or a bucket (gs://...).
    self.directory = workdir_path(workdir) / "checkpoints"
    self.every_steps = every_steps
    self._manager = ocp.CheckpointManager(
        os.fspath(self.directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": IteratorStateHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        })
    self._incomplete_set_aside = False
    # The project's own warnings (set-aside folders) go to the console, not the library log.
    self._console = console or _console_on_process_0

  def is_complete(self, step: int) -> bool:
    """Whether the folder of `step` holds a committed checkpoint (see module doc)."""
    return (self.directory / str(step) / COMMIT_MARKER).exists()

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (None if there is none)."""
    complete = [step for step in self._manager.all_steps() if self.is_complete(step)]
    return max(complete, default=None)

  def _set_aside(self, reasons: dict[int, str], suffix: str) -> None:
    """Renames each step folder to `<step><suffix>` (process 0; the others wait).

    `reasons[step]` is the console line's "why". Nothing is deleted: an
    existing target gets a `.1`, `.2`, ... suffix instead.
    """
    if jax.process_index() == 0:
      for step, reason in sorted(reasons.items()):
        folder = self.directory / str(step)
        target = folder.parent / f"{step}{suffix}"
        k = 1
        while target.exists():
          target, k = folder.parent / f"{step}{suffix}.{k}", k + 1
        folder.rename(target)
        line = f"warning: checkpoint step {step} {reason}; renamed to {target.name} and ignored."
        self._console(line)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"mrl_jax_checkpoint_set_aside{suffix}")
    self._manager.reload()

  def _set_aside_incomplete(self) -> None:
    """Renames step folders without a commit marker to `<step>.incomplete` (once)."""
    if self._incomplete_set_aside:
      return
    self._incomplete_set_aside = True
    incomplete = [step for step in self._manager.all_steps() if not self.is_complete(step)]
    if incomplete:
      self._set_aside({step: f"has no {COMMIT_MARKER} (it was never completed)"
                       for step in incomplete}, INCOMPLETE_SUFFIX)

  def set_aside_unreadable(self, step: int, error: BaseException) -> None:
    """Renames the committed but unreadable `step` to `<step>.corrupt`, with one console line."""
    self._set_aside({step: f"in {self.directory} is unreadable ({unreadable_reason(error)})"},
                    CORRUPT_SUFFIX)

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict[str, Any]) -> None:
    """Starts a save of `state` after `step` updates (returns before it is written).

    `data_iterator` None saves no input position (e.g. an imported checkpoint).
    """
    self._set_aside_incomplete()
    if step in self._manager.all_steps():
      return
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = IteratorStateSave(data_iterator.get_state())
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def read_meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None,
              meta: dict[str, Any]) -> Any:
    """Restores into `abstract_state`'s shapes and shardings (any mesh works).

    `data_iterator` is moved to the saved position in place; pass None to
    restore only the state (e.g. for probing).
    """
    diffs = _differences(self.read_meta(step), meta)
    if diffs:
      raise CheckpointMismatchError(
          f"The checkpoint at {self.directory}/{step} was written for a different setup ("
          + "; ".join(diffs) + "). Use the config it was trained with, or a new --workdir.")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = IteratorStateRestore(data_iterator)
    state = self._manager.restore(step, args=ocp.args.Composite(**items))["state"]
    # Any read deferred by the restore fails here, inside the caller's try.
    return jax.block_until_ready(state)

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None,
                     meta: dict[str, Any]) -> tuple[int | None, Any]:
    """(step, state) of the newest readable checkpoint; (None, None) if there is none.

    Unreadable steps on the way are set aside (see module doc). Any error from
    reading a step counts as unreadable except CheckpointMismatchError, which
    is raised: that checkpoint is fine, the config is not the one it was
    trained with.
    """
    while (step := self.latest_step()) is not None:
      try:
        return step, self.restore(step, abstract_state, data_iterator, meta)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # Whatever Orbax or TensorStore raise.
        self.set_aside_unreadable(step, e)
    return None, None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
