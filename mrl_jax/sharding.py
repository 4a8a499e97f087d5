"""Device mesh, parameter shardings and global batches.

The mesh has three axes, sized by `config.mesh` (data, fsdp, model; one may be
-1 to take the devices left over):
  * data: pure data parallelism (parameters replicated),
  * fsdp: data parallelism with parameters and optimizer state sharded,
  * model: tensor parallelism; by default only the classes of the nested head
    shard over it (never the embedding dim that prefixes slice).
The batch is split over (data, fsdp). Parameters follow `config.sharding_rules`,
a list of (regex searched in the parameter path, spec) pairs where the spec names mesh
axes for the *trailing* dims of matching parameters (e.g. ("(^|/)head/", ("model",))
shards the last dim over "model"); the first matching rule wins. Dims that no
rule shards are FSDP-sharded: the largest dim divisible by the fsdp size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mrl_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves the -1 entry of `config.mesh` and checks the product is the device count."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: the fixed axes ({known}) "
                        f"do not divide the {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices or min(sizes) < 1:
    raise ConfigError(f"config.mesh={dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} "
                      f"devices but {num_devices} are present: make the product of the "
                      "axis sizes equal the device count, or set one axis to -1.")
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: shardings propagate through the model without out_sharding annotations.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def path_to_str(path: Sequence[Any]) -> str:
  """"layer1/0/conv1/kernel" for a pytree key path (NNX's trailing .value dropped)."""
  parts = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    if name == "value":
      continue
    parts.append(str(name))
  return "/".join(parts)


def spec_for(name: str, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Sequence[str | None]]], min_fsdp_size: int = 2 ** 14) -> P:
  """The PartitionSpec for one parameter, per the module docstring."""
  spec: list[str | None] = [None] * len(shape)
  for pattern, trailing in rules:
    if re.search(pattern, name):
      trailing = list(trailing)[-len(shape):] if shape else []
      for i, axis in enumerate(trailing, start=len(shape) - len(trailing)):
        if axis is not None and shape[i] % mesh.shape[axis] == 0:
          spec[i] = axis
      break
  fsdp = mesh.shape["fsdp"]
  if fsdp > 1 and math.prod(shape) >= min_fsdp_size:
    free = [i for i in np.argsort(shape)[::-1] if spec[i] is None and shape[i] % fsdp == 0]
    if free:
      spec[free[0]] = "fsdp"
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Sequence[str | None]]]) -> Any:
  """NamedShardings for every leaf of an (abstract) parameter-shaped tree."""
  def leaf(path, x):
    return NamedSharding(mesh, spec_for(path_to_str(path), x.shape, mesh, rules))
  return jax.tree_util.tree_map_with_path(leaf, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's rows (every process calls it)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
