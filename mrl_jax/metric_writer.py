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

from mrl_jax import perf


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
  """Steps/s, examples/s, ETA, data-wait vs compute time and MFU since the last report.

  The loop reports the seconds it spent waiting for input with `add_data_wait`;
  the rest of each interval is compute (and, where steps are dispatched
  asynchronously, is only known at the report's own device sync).
  """

  def __init__(self, first_step: int, total_steps: int, global_batch_size: int, *,
               flops_per_step: float | None = None):
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.flops_per_step = flops_per_step
    self._step, self._time, self._data_wait = first_step, time.perf_counter(), 0.0

  def add_data_wait(self, seconds: float) -> None:
    self._data_wait += seconds

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = max(step - self._step, 1)
    elapsed = max(now - self._time, 1e-9)
    step_s, data_s = elapsed / steps, self._data_wait / steps
    self._step, self._time, self._data_wait = step, now, 0.0
    steps_per_s = 1.0 / step_s
    examples = steps_per_s * self.global_batch_size
    out = {
        "steps_per_s": steps_per_s,
        "examples_per_s": examples,
        "examples_per_s_per_device": examples / jax.device_count(),
        "eta_s": (self.total_steps - step) * step_s,
        "step_ms": 1e3 * step_s,
        "data_wait_ms": 1e3 * data_s,
        "compute_ms": 1e3 * max(step_s - data_s, 0.0),
        "data_wait_fraction": min(data_s / step_s, 1.0),
    }
    if self.flops_per_step:
      out["tflops_per_s_per_device"] = self.flops_per_step / step_s / jax.device_count() / 1e12
      utilisation = perf.mfu(self.flops_per_step, step_s)
      if utilisation is not None:
        out["mfu"] = utilisation
    return out


def format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
