"""Multi-process start-up: `jax.distributed.initialize` from the environment.

`initialize_from_env()` must run before anything asks JAX for devices. It
decides, from the environment alone, whether this process is one of several:

  * MRL_DISTRIBUTED=off: never (a single-process run inside a cluster job).
  * MRL_COORDINATOR_ADDRESS ("host:port"), MRL_NUM_PROCESSES, MRL_PROCESS_ID:
    these, explicitly (what launch/local.sh and launch/slurm_gpu.sbatch set).
    JAX's own JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID are
    read the same way when the MRL_ ones are absent.
  * MRL_DISTRIBUTED=jax: plain `jax.distributed.initialize()`, which detects the
    cluster itself (Cloud TPU VMs through the metadata server, Open MPI,
    Kubernetes; what launch/tpu_pod.sh sets).
  * A SLURM step with more than one task, or TPU worker variables naming more
    than one host (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES): plain
    `jax.distributed.initialize()` as well. JAX's SLURM detection gives each
    task only GPU SLURM_LOCALID, so start one task per GPU that way (for one
    process per node, launch/slurm_gpu.sbatch sets the MRL_ variables).
  * Otherwise nothing happens: one process, as before.

On CPU the processes exchange collectives over gloo (TCP). It is set
explicitly because some JAX releases default to no CPU collectives, and then
the first cross-process reduction of a multi-process CPU run fails.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax

from mrl_jax.errors import UserError

# Prefix order: the project's own names win over JAX's.
_PREFIXES = ("MRL_", "JAX_")


class DistributedConfigError(UserError, ValueError):
  """The environment names a coordinator but not a complete, valid process layout."""


def _explicit_layout(env: Mapping[str, str]) -> tuple[str, int, int] | None:
  """(coordinator, process count, process id) from MRL_* or JAX_* variables, if given."""
  for prefix in _PREFIXES:
    address = env.get(prefix + "COORDINATOR_ADDRESS")
    if not address:
      continue
    names = (prefix + "NUM_PROCESSES", prefix + "PROCESS_ID")
    missing = [n for n in names if not env.get(n)]
    if missing:
      raise DistributedConfigError(
          f"{prefix}COORDINATOR_ADDRESS={address} is set but {' and '.join(missing)} "
          "is not: set all three (or none).")
    try:
      num_processes, process_id = (int(env[n]) for n in names)
    except ValueError as e:
      raise DistributedConfigError(f"{names[0]} and {names[1]} must be integers: {e}") from e
    if not 0 <= process_id < num_processes:
      raise DistributedConfigError(
          f"{names[1]}={process_id} is outside [0, {names[0]}={num_processes}).")
    return address, num_processes, process_id
  return None


def _cluster_detected(env: Mapping[str, str]) -> bool:
  """Whether a multi-process cluster job that JAX can describe itself is present."""
  if env.get("MRL_DISTRIBUTED", "").lower() == "jax":
    return True
  # One-task SLURM jobs (e.g. tests run in an allocation) stay single-process.
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
    return True
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  return len([h for h in hosts.split(",") if h]) > 1


def plan(env: Mapping[str, str] | None = None) -> tuple[str, int, int] | str | None:
  """What `initialize_from_env` would do: a layout, "detect" (JAX decides), or None."""
  env = os.environ if env is None else env
  if env.get("MRL_DISTRIBUTED", "").lower() == "off":
    return None
  layout = _explicit_layout(env)
  if layout is not None:
    return layout
  return "detect" if _cluster_detected(env) else None


def initialize_from_env(env: Mapping[str, str] | None = None) -> bool:
  """Joins the process group the environment describes; True if it did (see module doc)."""
  what = plan(env)
  if what is None:
    return False
  if jax.distributed.is_initialized():  # A notebook or a caller did it already.
    return True
  if "jax_cpu_collectives_implementation" in jax.config.values:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if what == "detect":
    jax.distributed.initialize()
    logging.info("Joined the process group JAX detected from the cluster environment.")
  else:
    address, num_processes, process_id = what
    jax.distributed.initialize(address, num_processes, process_id)
    logging.info("Process %d of %d joined the run (coordinator %s).", process_id,
                 num_processes, address)
  return True
