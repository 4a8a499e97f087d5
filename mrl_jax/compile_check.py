"""`--mode=compile_check`: compile the train step for the config's mesh, without data.

Lowers the exact update step that training runs (`Experiment.train_step`)
on abstract inputs (shapes, dtypes and shardings only: nothing is allocated),
compiles it with XLA for the devices present and reports per-device memory
(parameters + optimizer state, XLA's argument / output / temporary buffers)
and FLOPs. Run it before booking a pod: a config that does not fit fails here
in minutes, on any machine. To check an N-device mesh on a CPU-only machine:

  python -m mrl_jax.main --config configs/vit_jft.py --workdir /tmp/cc \
      --mode=compile_check --cpu_devices=8

The dataset need not be present: when it is not prepared, the batch layout
comes from the config (`Task.data_info_from_config`; for classification the
class count is `config.num_classes`, images are `config.data.image_size` square
with len(config.data.mean) channels, and labels are multi-hot when
`config.loss == "sigmoid"`). Writes WORKDIR/compile_check.json.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mrl_jax import experiment, perf
from mrl_jax.workdir_path import make_dirs, workdir_path, write_json_atomic


def _per_device_bytes(abstract: Any) -> int:
  """Bytes one device holds of arrays with shardings (the largest shard of each)."""
  total = 0
  for x in jax.tree.leaves(abstract):
    shard = x.sharding.shard_shape(x.shape)
    # x.dtype.itemsize, not jnp.dtype(...): dropout RNG keys (key<fry>) are not numpy dtypes.
    total += int(np.prod(shard, dtype=np.int64)) * x.dtype.itemsize
  return total


def compile_check(config: ml_collections.ConfigDict, workdir: str | None = None,
                  log=print) -> dict[str, Any]:
  """Compiles the update step for `config` on the present devices; returns the report."""
  exp = experiment.build(config, info_from="config")
  mesh = exp.mesh
  state = exp.restore_target()
  b = int(config.batch_size)
  batch = exp.abstract_batch(b)
  step = exp.train_step()

  start = time.time()
  lowered = step.lower(state, batch)
  lower_seconds = time.time() - start
  compiled = lowered.compile()
  compile_seconds = time.time() - start - lower_seconds
  memory = compiled.memory_analysis()
  mib = lambda n: round(n / 2**20, 1)
  report: dict[str, Any] = {
      "devices": jax.device_count(), "platform": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape),
      "task": exp.task.name, "model": config.model.to_dict(), "head": config.get("head"),
      "dims": list(exp.dims), "global_batch": b,
      "batch": {k: {"shape": list(x.shape), "dtype": str(x.dtype)} for k, x in batch.items()},
      **exp.task.report_fields(config, exp.info),
      "parameters": exp.num_parameters,
      "compute_dtype": config.get("compute_dtype", "float32"),
      "grad_accum_steps": int(config.get("grad_accum_steps", 1)),
      "lower_seconds": round(lower_seconds, 1), "compile_seconds": round(compile_seconds, 1),
      "per_device_mib": {
          "params": mib(_per_device_bytes(state["params"])),
          "optimizer_state": mib(_per_device_bytes(state["opt_state"])),
          "train_state": mib(_per_device_bytes(state)),
      },
      "flops_per_step_per_device": perf.step_flops(compiled),
  }
  if memory is not None:
    report["per_device_mib"].update(
        arguments=mib(memory.argument_size_in_bytes), outputs=mib(memory.output_size_in_bytes),
        aliased=mib(memory.alias_size_in_bytes), temporaries=mib(memory.temp_size_in_bytes),
        generated_code=mib(memory.generated_code_size_in_bytes))
    # Donated state aliases its outputs, so arguments + outputs - aliased + temporaries
    # bounds what one device holds while the step runs.
    report["per_device_mib"]["peak_estimate"] = mib(
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  log(format_report(report))
  if workdir and jax.process_index() == 0:
    folder = make_dirs(workdir_path(workdir))
    write_json_atomic(folder / "compile_check.json", report)
  return report


def format_report(report: dict[str, Any]) -> str:
  mem = report["per_device_mib"]
  flops = report["flops_per_step_per_device"]
  classes = f", {report['num_classes']} classes" if "num_classes" in report else ""
  rows = ", ".join(f"{k} {v['shape'][1:]} {v['dtype']}" for k, v in report["batch"].items())
  lines = [
      f"compile_check: {report['model'].get('name')} {report['model'].get('variant', '')} "
      f"({report['head']} head{classes}, dims {report['dims']}), "
      f"{report['parameters']:,} parameters",
      f"  mesh {report['mesh']} on {report['devices']} {report['platform']} devices "
      f"({report['device_kind']}); global batch {report['global_batch']} x ({rows}), "
      f"{report['compute_dtype']}, grad_accum {report['grad_accum_steps']}",
      f"  lowered in {report['lower_seconds']} s, compiled in {report['compile_seconds']} s"
      + (f"; {flops / 1e9:,.1f} GFLOP per step per device" if flops else ""),
      "  per-device memory (MiB):",
  ]
  lines += [f"    {k:16s} {v:>12,.1f}" for k, v in mem.items()]
  return "\n".join(lines)
