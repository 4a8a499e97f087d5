"""The MRL train loop, read top to bottom: checks -> mesh -> input -> model and
optimizer -> update step -> checkpoint restore -> evaluation -> loop -> summary.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mrl_jax import init_from, perf, sharding, train_state
from mrl_jax.checkpointing import Checkpointer
from mrl_jax.config_checks import NONFINITE_MODES, check_config
from mrl_jax.errors import ConfigError, UserError
from mrl_jax.data import pipeline
from mrl_jax.metric_writer import MetricWriter, Throughput, format_eta
from mrl_jax.evaluation import periodic
from mrl_jax.train_step import abstract_batch, make_embed_step, make_eval_step, make_train_step

def host_values(tree: Any) -> Any:
  """Replicated device values as numpy on this process (works multi-process too)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def per_size_metrics(prefix: str, name: str, dims: tuple[int, ...], values: np.ndarray) -> dict:
  return {f"{prefix}/{name}_d{m}": float(v) for m, v in zip(dims, values)}


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
  # ---------------------------------------------------------------- checks
  # The config first: a bad field stops the run before any data is opened or built.
  nesting = check_config(config, num_devices=jax.device_count(),
                         process_count=jax.process_count())
  data_info = pipeline.dataset_info(config.data)
  if config.get("num_classes") and config.num_classes != data_info.num_classes:
    raise ConfigError(f"config.num_classes={config.num_classes} but {config.data.name!r} has "
                      f"{data_info.num_classes} classes: set --config.num_classes="
                      f"{data_info.num_classes} (or point config.data at the intended dataset).")
  dims = nesting.dims
  writer = MetricWriter(workdir)

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  writer.console(f"Mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} "
                 f"devices, {jax.process_count()} process(es).")

  # ---------------------------------------------------------------- input
  train_iter = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                            seed=config.seed)

  # ---------------------------------------------------------------- model & optimizer
  spec = train_state.state_spec(config, num_classes=data_info.num_classes,
                                in_channels=data_info.image_shape[-1],
                                num_train_examples=data_info.num_train_examples)
  total_steps = spec.total_steps
  # Parameters are never materialised unsharded: shapes -> shardings -> jitted init.
  state_shardings = train_state.state_shardings(config, spec.abstract, mesh)
  writer.console(f"Model: {config.model.name} ({config.head} head, dims {list(dims)}), "
                 f"{sum(x.size for x in jax.tree.leaves(spec.abstract['params'])):,} parameters.")

  # ---------------------------------------------------------------- update step
  train_step = make_train_step(config, spec, mesh, state_shardings, nesting.weights)
  eval_step = make_eval_step(config, spec, mesh, state_shardings, nesting.weights)
  in_channels = data_info.image_shape[-1]
  evaluators = periodic.build_evaluators(config, in_channels=in_channels)
  embed_step = make_embed_step(spec, mesh, state_shardings)

  def run_evaluators(state, step: int) -> dict[str, float]:
    results = {}
    for ev in evaluators:
      if ev.due(step, total_steps):
        embed = lambda batch: host_values(
            embed_step(state["params"], state["model_state"], batch))
        metrics = periodic.run_evaluator(ev, embed, mesh, dims, in_channels)
        writer.write(step, metrics)
        writer.console(f"step {step} | {ev.name}: 1-NN top-1 " + " ".join(
            f"@{m}:{metrics[f'eval/{ev.name}/knn1_top1_d{m}']:.3f}" for m in dims))
        results.update(metrics)
    return results

  def evaluate(state) -> dict[str, np.ndarray]:
    totals = None
    for batch in pipeline.make_eval_batches(config.data, global_batch_size=config.eval_batch_size):
      out = host_values(eval_step(state["params"], state["model_state"],
                                  sharding.global_batch(batch, mesh)))
      totals = out if totals is None else jax.tree.map(np.add, totals, out)
    count = max(float(totals["count"]), 1.0)
    return {"top1": totals["correct"] / count, "loss": totals["loss_sum"] / count,
            "count": int(totals["count"])}

  # ---------------------------------------------------------------- init or restore
  checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                              keep=config.get("keep_checkpoints", 3),
                              async_save=config.get("async_checkpointing", True),
                              console=writer.console)
  meta = train_state.checkpoint_meta(config, nesting, data_info.num_classes,
                                     data_info.image_shape[-1])
  had_checkpoints = checkpointer.latest_step() is not None
  # Unreadable steps are set aside on the way to the newest readable one.
  latest, state = checkpointer.restore_latest(
      train_state.restore_target(spec.abstract, state_shardings), train_iter, meta)
  if latest is None:
    if had_checkpoints:
      writer.console(f"No readable checkpoint is left in {checkpointer.directory}: "
                     "training starts from scratch.")
      train_iter = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                                seed=config.seed)
    state = jax.jit(spec.init, out_shardings=state_shardings)()
    if (config.get("init_from") or {}).get("workdir"):
      state = init_from.load_pretrained(state, config.init_from, log=writer.console)
    first_step = 0
  else:
    first_step = int(host_values(state["step"]))
    writer.console(f"Resumed from {checkpointer.directory}/{latest} (step {first_step}).")
  # The config travels with the checkpoints: probing and inference rebuild the model
  # from it. Written only now, so a run refused by the checkpoint leaves it as it was.
  writer.write_json("config.json", config.to_dict())

  # ---------------------------------------------------------------- train loop
  wait_each_step = jax.default_backend() == "cpu"  # CPU collectives can hang otherwise.
  log_every = config.get("log_every_steps", 50)
  eval_every = config.get("eval_every_steps", 0)
  flops = perf.step_flops(train_step.lower(state, abstract_batch(
      mesh, config.batch_size, data_info.image_shape, data_info.num_classes,
      data_info.multilabel)))
  throughput = Throughput(first_step, total_steps, config.batch_size, flops_per_step=flops)
  guard = _NonFiniteGuard(config.get("on_nonfinite", "stop"),
                          int(config.get("max_nonfinite_steps", 100)), dims, writer.console)
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
                 **per_size_metrics("train", "loss", dims, values["per_size_loss"]),
                 **per_size_metrics("train", "top1", dims, values["per_size_top1"]),
                 **pipeline.data_metrics(train_iter),
                 "train/nonfinite_skipped_steps": guard.skipped,
                 **{f"perf/{k}": v for k, v in speed.items()}}
          writer.write(step, row)
          writer.console(
              f"step {step}/{total_steps} | loss {values['loss']:.4f} | top1 "
              + " ".join(f"@{m}:{a:.3f}" for m, a in zip(dims, values["per_size_top1"]))
              + f" | lr {values['lr']:.4g} | {speed['steps_per_s']:.2f} steps/s, "
              f"{speed['examples_per_s']:.0f} ex/s ({speed['examples_per_s_per_device']:.0f}/device)"
              f", data wait {100 * speed['data_wait_fraction']:.0f}%"
              + (f", MFU {100 * speed['mfu']:.1f}%" if "mfu" in speed else "")
              + f" | ETA {format_eta(speed['eta_s'])}")
        if eval_every and step % eval_every == 0 and step != total_steps:
          result = evaluate(state)
          writer.write(step, {**per_size_metrics("val", "top1", dims, result["top1"]),
                              **per_size_metrics("val", "loss", dims, result["loss"])})
        if step != total_steps:
          run_evaluators(state, step)
        if preemption.reached(step):
          writer.console(f"SIGTERM: saving a checkpoint at step {step} before exiting.")
          guard.check()
          checkpointer.save(step, state, train_iter, meta)
          preempted = True
          break
        if checkpointer.should_save(step) or step == total_steps:
          guard.check()
          checkpointer.save(step, state, train_iter, meta)
    finally:
      checkpointer.close()

  if preempted:
    writer.console(f"Preempted at step {step}; run the same command to resume.")
    writer.close()
    return {"dims": list(dims), "steps": step, "preempted": True}

  # ---------------------------------------------------------------- final evaluation
  result = evaluate(state)
  val_top1 = {str(m): float(a) for m, a in zip(dims, result["top1"])}
  writer.write(step, {**per_size_metrics("val", "top1", dims, result["top1"]),
                      **per_size_metrics("val", "loss", dims, result["loss"])})
  summary = {"dims": list(dims), "val_top1": val_top1,
             "val_loss": {str(m): float(v) for m, v in zip(dims, result["loss"])},
             "steps": step, "head": config.head, "model": config.model.name,
             "dataset": config.data.name, "eval_examples": result["count"],
             "train_seconds_this_run": round(time.time() - start_time, 1)}
  summary["evaluators"] = run_evaluators(state, step)
  writer.write_json("summary.json", summary)
  writer.console(format_table(dims, result["top1"], config.data.name, data_info.multilabel))
  writer.close()
  return summary


def format_table(dims: tuple[int, ...], top1: np.ndarray, dataset: str,
                 multilabel: bool = False) -> str:
  # Multi-label data: the top class counts as right if it is one of the labels.
  name = "prec@1" if multilabel else "top-1"
  lines = [f"Validation {name} per nesting size ({dataset}):", f"   dims | {name} (%)",
           "  ------+----------"]
  lines += [f"  {m:5d} | {100 * a:6.2f}" for m, a in zip(dims, top1)]
  return "\n".join(lines)
