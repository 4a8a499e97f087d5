"""One place where metrics go: WORKDIR/metrics.jsonl, TensorBoard events, the console.

Only process 0 writes; other processes get a writer that does nothing, so the
train loop calls it unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax


def _plain(value: Any) -> Any:
  """JSON-friendly Python scalars (NaN/Inf kept as strings JSON can carry)."""
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # Imported lazily: only process 0 needs it.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def console(self, line: str) -> None:
    if self.enabled:
      print(line, file=sys.stdout, flush=True)

  def write_json(self, name: str, obj: Any) -> None:
    """Writes WORKDIR/<name> atomically (a reader never sees half a file)."""
    if not self.enabled:
      return
    path = os.path.join(self.workdir, name)
    with open(path + ".tmp", "w") as f:
      json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


class Throughput:
  """Steps/s, examples/s and ETA over the interval since the last report."""

  def __init__(self, first_step: int, total_steps: int, global_batch_size: int):
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self._step, self._time = first_step, time.perf_counter()

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps_per_s = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    examples = steps_per_s * self.global_batch_size
    return {
        "steps_per_s": steps_per_s,
        "examples_per_s": examples,
        "examples_per_s_per_device": examples / jax.device_count(),
        "eta_s": (self.total_steps - step) / max(steps_per_s, 1e-9),
    }


def format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
