"""The MRL train loop, read top to bottom: experiment (checks, mesh, model and
optimizer, steps) -> input -> checkpoint restore -> evaluation -> loop -> summary.

The loop knows no task: data, loss, metrics and reports come from the task
`config.task` names (`mrl_jax/tasks/`), through `mrl_jax.experiment`.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mrl_jax import experiment, init_from, perf, sharding
from mrl_jax.checkpointing import Checkpointer
from mrl_jax.config_checks import NONFINITE_MODES
from mrl_jax.errors import ConfigError, UserError
from mrl_jax.metric_writer import MetricWriter, Throughput, format_eta

# Step metrics the loop itself logs; every other one is the task's (see train_metrics).
_LOOP_METRICS = ("loss", "lr", "grad_norm", "finite")

def host_values(tree: Any) -> Any:
  """Replicated device values as numpy on this process (works multi-process too)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def per_size_metrics(prefix: str, name: str, dims: tuple[int, ...], values: np.ndarray) -> dict:
  return {f"{prefix}/{name}_d{m}": float(v) for m, v in zip(dims, values)}


def train_metrics(dims: tuple[int, ...], values: dict[str, np.ndarray]) -> dict[str, float]:
  """The task's step metrics as log entries: "per_size_<x>" [num_sizes] -> train/<x>_d<m>,
  any other scalar <x> -> train/<x>."""
  row = {}
  for key, value in values.items():
    if key in _LOOP_METRICS:
      continue
    if key.startswith("per_size_"):
      row.update(per_size_metrics("train", key[len("per_size_"):], dims, value))
    else:
      row[f"train/{key}"] = float(value)
  return row


class NonFiniteError(UserError, FloatingPointError):
  """Training produced a NaN or Inf loss or gradient (and config.on_nonfinite says stop)."""


class _NonFiniteGuard:
  """Checks every step's `finite` flag, without a device sync per step.

  The update step already drops non-finite updates (see train_step.py), so the
  state stays clean; the flags are gathered here and read in one transfer at
  log steps and before every checkpoint save, so no checkpoint follows an
  unnoticed NaN. "stop" raises naming the step and the offending metric;
  "skip" counts the dropped steps and stops once more than `max_skipped`.
  """

  def __init__(self, mode: str, max_skipped: int, dims: tuple[int, ...], console):
    if mode not in NONFINITE_MODES:
      raise ConfigError(f"config.on_nonfinite={mode!r}: use one of {NONFINITE_MODES}.")
    self.mode, self.max_skipped, self.dims, self.console = mode, max_skipped, dims, console
    self.skipped = 0
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, {k: metrics[k] for k in
                                 ("finite", "loss", "grad_norm", "per_size_loss")}))

  def check(self) -> None:
    pending, self._pending = self._pending, []
    if not pending:
      return
    flags = host_values([m["finite"] for _, m in pending])
    for (step, metrics), ok in zip(pending, flags):
      if ok:
        continue
      values = host_values(metrics)
      if not np.isfinite(values["loss"]):
        what = f"loss {values['loss']} (per-size losses " + ", ".join(
            f"{m}: {v:.4g}" for m, v in zip(self.dims, values["per_size_loss"].tolist())) + ")"
      else:
        what = f"gradient norm {values['grad_norm']} (loss {values['loss']:.4g})"
      if self.mode == "stop":
        raise NonFiniteError(
            f"Non-finite {what} at step {step}. The update was dropped and no checkpoint is "
            "written after it. Lower config.lr, set config.optimizer.grad_clip_norm, or "
            "set config.on_nonfinite='skip' to skip such steps.")
      self.skipped += 1
      self.console(f"step {step}: non-finite {what}; update skipped ({self.skipped} so far).")
      if self.skipped > self.max_skipped:
        raise NonFiniteError(
            f"{self.skipped} steps had a non-finite loss or gradient (the last at step {step}), "
            f"more than config.max_nonfinite_steps={self.max_skipped}: the run is diverging. "
            "Lower config.lr or set config.optimizer.grad_clip_norm.")


class _PreemptionFlag:
  """SIGTERM asks the loop to save a checkpoint and exit between steps.

  In one process a Python handler sets a flag. With several, JAX's preemption
  service (started by jax.distributed.initialize) owns SIGTERM and makes all
  processes agree on the step to stop after: a process stopping on its own
  would leave the others waiting in the next step's collectives.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; every process calls it after every step."""
    if self._multiprocess:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __enter__(self):
    if self._multiprocess:
      return self  # A Python handler would replace JAX's.
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the configured MRL model; returns the summary it writes."""
  # ---------------------------------------------------------------- experiment
  # The config first: a bad field stops the run before any data is opened or built.
  # Parameters are never materialised unsharded: shapes -> shardings -> jitted init.
  exp = experiment.build(config)
  task, mesh, dims, total_steps = exp.task, exp.mesh, exp.dims, exp.total_steps
  writer = MetricWriter(workdir)
  writer.console(f"Mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} "
                 f"devices, {jax.process_count()} process(es).")
  writer.console(f"Model: {task.model_description(config, exp.nesting)}, "
                 f"{exp.num_parameters:,} parameters.")

  # ---------------------------------------------------------------- input and steps
  train_iter = task.train_iterator(config)
  train_step, eval_step, embed_step = exp.train_step(), exp.eval_step(), exp.embed_step()
  evaluators = task.evaluators(config, exp.info)

  def run_evaluators(state, step: int) -> dict[str, float]:
    results = {}
    for ev in evaluators:
      if ev.due(step, total_steps):
        embed = lambda batch: host_values(
            embed_step(state["params"], state["model_state"], batch))
        metrics = ev.run(embed, mesh, dims)
        writer.write(step, metrics)
        writer.console(f"step {step} | {ev.name}: {ev.console_line(metrics, dims)}")
        results.update(metrics)
    return results

  def evaluate(state) -> dict[str, Any]:
    totals = None
    for batch in task.eval_batches(config):
      out = host_values(eval_step(state["params"], state["model_state"],
                                  sharding.global_batch(batch, mesh)))
      totals = out if totals is None else jax.tree.map(np.add, totals, out)
    return task.reduce_eval(totals)

  # ---------------------------------------------------------------- init or restore
  checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                              keep=config.get("keep_checkpoints", 3),
                              async_save=config.get("async_checkpointing", True),
                              console=writer.console)
  meta = exp.checkpoint_meta()
  had_checkpoints = checkpointer.latest_step() is not None
  # Unreadable steps are set aside on the way to the newest readable one.
  latest, state = checkpointer.restore_latest(exp.restore_target(), train_iter, meta)
  if latest is None:
    if had_checkpoints:
      writer.console(f"No readable checkpoint is left in {checkpointer.directory}: "
                     "training starts from scratch.")
      train_iter = task.train_iterator(config)
    state = exp.init_state()
    if init_from.requested(config.get("init_from")):  # a workdir, or one per tower
      state = init_from.load_pretrained(state, config.init_from, log=writer.console)
    first_step = 0
  else:
    first_step = int(host_values(state["step"]))
    writer.console(f"Resumed from {checkpointer.directory}/{latest} (step {first_step}).")
  # The config travels with the checkpoints: probing and inference rebuild the model
  # from it. Written only now, so a run refused by the checkpoint leaves it as it was.
  writer.write_json("config.json", config.to_dict())
  task.on_workdir(config, workdir)  # What else restoring needs (e.g. the MLM tokenizer).

  # ---------------------------------------------------------------- train loop
  wait_each_step = jax.default_backend() == "cpu"  # CPU collectives can hang otherwise.
  log_every = config.get("log_every_steps", 50)
  eval_every = config.get("eval_every_steps", 0)
  flops = perf.step_flops(train_step.lower(state, exp.abstract_batch()))
  throughput = Throughput(first_step, total_steps, config.batch_size, flops_per_step=flops)
  guard = _NonFiniteGuard(config.get("on_nonfinite", "stop"),
                          int(config.get("max_nonfinite_steps", 100)), dims, writer.console)
  shown = "per_size_" + task.console_metric
  start_time = time.time()
  step = first_step
  preempted = False
  with _PreemptionFlag() as preemption:
    try:
      while step < total_steps:
        wait_start = time.perf_counter()
        local_batch = next(train_iter)
        throughput.add_data_wait(time.perf_counter() - wait_start)
        state, metrics = train_step(state, sharding.global_batch(local_batch, mesh))
        step += 1
        guard.add(step, metrics)
        if wait_each_step:
          jax.block_until_ready(metrics["loss"])
        if step % log_every == 0 or step == total_steps or step == first_step + 1:
          guard.check()
          values = host_values(metrics)
          speed = throughput.report(step)
          row = {"train/loss": float(values["loss"]), "train/lr": float(values["lr"]),
                 "train/grad_norm": float(values["grad_norm"]),
                 **train_metrics(dims, values),
                 **task.data_metrics(train_iter),
                 "train/nonfinite_skipped_steps": guard.skipped,
                 **{f"perf/{k}": v for k, v in speed.items()}}
          writer.write(step, row)
          writer.console(
              f"step {step}/{total_steps} | loss {values['loss']:.4f} | {task.console_metric} "
              + " ".join(f"@{m}:{a:.3f}" for m, a in zip(dims, values[shown]))
              + f" | lr {values['lr']:.4g} | {speed['steps_per_s']:.2f} steps/s, "
              f"{speed['examples_per_s']:.0f} ex/s ({speed['examples_per_s_per_device']:.0f}/device)"
              f", data wait {100 * speed['data_wait_fraction']:.0f}%"
              + (f", MFU {100 * speed['mfu']:.1f}%" if "mfu" in speed else "")
              + f" | ETA {format_eta(speed['eta_s'])}")
        if eval_every and step % eval_every == 0 and step != total_steps:
          writer.write(step, task.val_metrics(dims, evaluate(state)))
        if step != total_steps:
          run_evaluators(state, step)
        if preemption.reached(step):
          writer.console(f"SIGTERM: saving a checkpoint at step {step} before exiting.")
          guard.check()
          writer.flush()  # On a bucket: every row up to this checkpoint is in metrics.jsonl.
          checkpointer.save(step, state, train_iter, meta)
          preempted = True
          break
        if checkpointer.should_save(step) or step == total_steps:
          guard.check()
          writer.flush()
          checkpointer.save(step, state, train_iter, meta)
    finally:
      checkpointer.close()

  if preempted:
    writer.console(f"Preempted at step {step}; run the same command to resume.")
    writer.close()
    return {"dims": list(dims), "steps": step, "preempted": True}

  # ---------------------------------------------------------------- final evaluation
  result = evaluate(state)
  writer.write(step, task.val_metrics(dims, result))
  summary = {"dims": list(dims), **task.summary(config, dims, result),
             "steps": step, "head": config.get("head"), "model": config.model.name,
             "dataset": config.data.name,
             "train_seconds_this_run": round(time.time() - start_time, 1)}
  summary["evaluators"] = run_evaluators(state, step)
  summary.update(task.evaluator_summary(config, dims, summary["evaluators"]))
  writer.write_json("summary.json", summary)
  writer.console(task.format_table(config, dims, result))
  writer.close()
  return summary
