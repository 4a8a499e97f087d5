"""One place where metrics go: WORKDIR/metrics.jsonl, TensorBoard events, the console.

Only process 0 writes; other processes get a writer that does nothing, so the
train loop calls it unconditionally.

The workdir may be a bucket (gs://...; see workdir_path.py). metrics.jsonl is then
one object rewritten whole (objects cannot be appended to), at most every few
seconds and at every `flush()` -- the train loop flushes before each checkpoint save,
so a run killed after a checkpoint has every row up to it. `read_metrics` reads the
file the same way for both. tensorboardX can write gs:// only through
google-cloud-storage (and its credential look-ups), so on an object store the events
are written to a local temporary folder and copied into WORKDIR/tensorboard at each
flush and at close.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax

from mrl_jax import perf
from mrl_jax.workdir_path import AppendedLines, is_local, make_dirs, workdir_path, \
    write_json_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
  """JSON-friendly Python scalars (NaN/Inf kept as strings JSON can carry)."""
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None,
               tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir_path(workdir)
    self._tb = None
    self._tb_local_dir = None  # Object-store workdir: where events are written first.
    if not self.enabled:
      return
    make_dirs(self.workdir)
    self._jsonl = AppendedLines(self.workdir / METRICS_FILE)
    if tensorboard:
      from tensorboardX import SummaryWriter  # Imported lazily: only process 0 needs it.
      if is_local(self.workdir):
        self._tb = SummaryWriter(os.fspath(self.workdir / TENSORBOARD_DIR))
      else:
        self._tb_local_dir = tempfile.mkdtemp(prefix="mrl_jax_tensorboard_")
        self._tb = SummaryWriter(self._tb_local_dir)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.append(json.dumps(row))
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def flush(self) -> None:
    """Makes every row written so far readable in the workdir (a no-op cost locally)."""
    if not self.enabled:
      return
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
      self._copy_tensorboard()

  def _copy_tensorboard(self) -> None:
    """Object-store workdir: copies the local event files into WORKDIR/tensorboard."""
    if self._tb_local_dir is None:
      return
    target = self.workdir / TENSORBOARD_DIR
    for folder, _, files in os.walk(self._tb_local_dir):
      for name in files:
        source = os.path.join(folder, name)
        relative = os.path.relpath(source, self._tb_local_dir)
        destination = target / relative
        make_dirs(destination.parent)  # A no-op in a bucket; the test's local stand-in needs it.
        with open(source, "rb") as f:
          destination.write_bytes(f.read())

  def console(self, line: str) -> None:
    if self.enabled:
      print(line, file=sys.stdout, flush=True)

  def write_json(self, name: str, obj: Any) -> None:
    """Writes WORKDIR/<name> atomically (a reader never sees half a file)."""
    if not self.enabled:
      return
    write_json_atomic(self.workdir / name, obj)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
        self._copy_tensorboard()
        if self._tb_local_dir is not None:
          shutil.rmtree(self._tb_local_dir, ignore_errors=True)
          self._tb_local_dir = None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Every row of WORKDIR/metrics.jsonl, in order, for a local or an object-store workdir."""
  path = workdir_path(workdir) / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
