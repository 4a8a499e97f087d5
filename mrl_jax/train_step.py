"""The jitted update, evaluation and embedding steps of one experiment, built without data.

The steps know no task: they merge the model from the state and call the
task's pure functions (`Task.loss`, `Task.eval_sums`, `Task.embed`). The train
loop, `--mode=compile_check` (which lowers and compiles the update step on
abstract inputs) and the benchmarks all get their steps from
`mrl_jax.experiment.Experiment`, which builds them here, so what is checked
for memory is exactly what trains.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mrl_jax import sharding
from mrl_jax.nesting import Nesting
from mrl_jax.tasks.base import Task
from mrl_jax.train_state import StateSpec


def _under_mesh(mesh: Mesh, step: Callable) -> Callable:
  """`step`, traced with `mesh` as the context mesh, so a task's collectives find it.

  `jax.sharding.get_abstract_mesh()` inside a loss (e.g. the sharded
  `losses.nested_contrastive_loss`) then returns this mesh. `jax.set_mesh` is
  refused inside `jax.jit`; the abstract mesh is what tracing needs.
  """
  @functools.wraps(step)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return step(*args)
  return traced


def _map_named(fn: Callable, tree: Any, names: frozenset[str]) -> Any:
  """`tree` with `fn` applied to the leaves whose `sharding.path_to_str` path is in `names`."""
  if not names:
    return tree
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn(x) if sharding.path_to_str(path) in names else x, tree)


def _keep_named(new: Any, old: Any, names: frozenset[str]) -> Any:
  """`new` with the leaves named in `names` taken from `old` (same tree structure)."""
  if not names:
    return new
  return jax.tree_util.tree_map_with_path(
      lambda path, n, o: o if sharding.path_to_str(path) in names else n, new, old)


def make_train_step(task: Task, config: ml_collections.ConfigDict, nesting: Nesting,
                    spec: StateSpec, mesh: Mesh, state_shardings: Any) -> Callable:
  """jit(state, batch) -> (new state, replicated metrics); the state is donated.

  Metrics: "loss", "grad_norm", "lr", "finite" and the task's loss metrics
  (averaged over microbatches when config.grad_accum_steps > 1).
  """
  graphdef, tx, schedule = spec.graphdef, spec.tx, spec.schedule
  accum = int(config.get("grad_accum_steps", 1))

  def loss_and_aux(params, model_state, batch):
    # config.freeze: no gradient flows into frozen parameters, so XLA drops the
    # backward pass that would only feed them (e.g. all of a locked tower's).
    params = _map_named(jax.lax.stop_gradient, params, spec.frozen_params)
    model = nnx.merge(graphdef, params, model_state, copy=True)
    loss, metrics = task.loss(config, model, batch, nesting, train=True)
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return loss, (metrics, new_model_state)

  grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    if accum == 1:
      (loss, (metrics, model_state)), grads = grad_fn(params, state["model_state"], batch)
    else:
      # Microbatch k takes rows k, k+accum, ... of every batch entry: every device
      # keeps its own rows.
      def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))
      micro = jax.tree.map(split, dict(batch))

      def body(carry, mb):
        model_state, grad_sum = carry
        (loss, (metrics, model_state)), grads = grad_fn(params, model_state, mb)
        return (model_state, jax.tree.map(jnp.add, grad_sum, grads)), (loss, metrics)

      zeros = jax.tree.map(jnp.zeros_like, params)
      (model_state, grads), (loss, metrics) = jax.lax.scan(
          body, (state["model_state"], zeros), micro)
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss, metrics = loss.mean(), jax.tree.map(lambda v: v.mean(0), metrics)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient never reaches the state: the update is
    # dropped (the step counter still advances past the batch) and `finite`
    # tells the loop, which stops or counts the skip (config.on_nonfinite).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Frozen parameters (and BatchNorm statistics under them) are carried over bit for
    # bit, not updated by zero (which would turn a -0.0 into 0.0).
    new_params = _keep_named(optax.apply_updates(params, updates), params, spec.frozen_params)
    model_state = _keep_named(model_state, state["model_state"], spec.frozen_stats)
    updated = {"params": new_params, "model_state": model_state, "opt_state": opt_state}
    kept = {k: state[k] for k in updated}
    new_state = {"step": state["step"] + 1,
                 **jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, kept)}
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "finite": finite}
    return new_state, metrics

  return jax.jit(_under_mesh(mesh, train_step),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(task: Task, config: ml_collections.ConfigDict, nesting: Nesting,
                   spec: StateSpec, mesh: Mesh, state_shardings: Any) -> Callable:
  """jit(params, model_state, batch with "mask") -> the task's replicated eval sums."""
  graphdef = spec.graphdef

  def eval_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state, copy=True)
    return task.eval_sums(config, model, batch, nesting)

  return jax.jit(_under_mesh(mesh, eval_step),
                 in_shardings=(state_shardings["params"], state_shardings["model_state"],
                               sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def make_embed_step(task: Task, config: ml_collections.ConfigDict, spec: StateSpec, mesh: Mesh,
                    state_shardings: Any) -> Callable:
  """jit(params, model_state, batch) -> the task's `embed` dict ({"z" [B, d], ...}), replicated.

  For evaluators that need the representation itself (k-NN, linear probes);
  labels and mask come back replicated too, so every process sees the global batch.
  """
  graphdef = spec.graphdef

  def embed_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state, copy=True)
    return task.embed(config, model, batch)

  return jax.jit(_under_mesh(mesh, embed_step),
                 in_shardings=(state_shardings["params"], state_shardings["model_state"],
                               sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
