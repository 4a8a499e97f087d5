"""The jitted update and evaluation steps of one config, built without data.

Both the train loop and `--mode=compile_check` (which lowers and compiles the
update step on abstract inputs) build their steps here, so what is checked for
memory is exactly what trains.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mrl_jax import losses, sharding
from mrl_jax.train_state import StateSpec


def nested_loss(config: ml_collections.ConfigDict, logits: jax.Array, labels: jax.Array,
                weights: jax.Array, mask: jax.Array | None = None):
  """(weighted total loss, per-size losses) for integer or multi-hot labels."""
  if config.loss == "sigmoid":
    if labels.ndim == 1:
      labels = jax.nn.one_hot(labels, logits.shape[-1])
    return losses.nested_sigmoid_xent(logits, labels, weights, mask=mask)
  return losses.nested_softmax_xent(logits, labels, weights, mask=mask,
                                    label_smoothing=config.get("label_smoothing", 0.0))


def make_train_step(config: ml_collections.ConfigDict, spec: StateSpec, mesh: Mesh,
                    state_shardings: Any, nesting_weights: tuple[float, ...]) -> Callable:
  """jit(state, batch) -> (new state, replicated metrics); the state is donated."""
  graphdef, tx, schedule = spec.graphdef, spec.tx, spec.schedule
  weights = jnp.asarray(nesting_weights, jnp.float32)
  accum = int(config.get("grad_accum_steps", 1))

  def loss_and_aux(params, model_state, images, labels):
    model = nnx.merge(graphdef, params, model_state, copy=True)
    _, logits = model(images, train=True)
    loss, per_size_loss = nested_loss(config, logits, labels, weights)
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return loss, (per_size_loss, losses.nested_top1(logits, labels), new_model_state)

  grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    if accum == 1:
      (loss, (per_loss, top1, model_state)), grads = grad_fn(
          params, state["model_state"], batch["image"], batch["label"])
    else:
      # Microbatch k takes rows k, k+accum, ...: every device keeps its own rows.
      def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))
      micro = jax.tree.map(split, {"image": batch["image"], "label": batch["label"]})

      def body(carry, mb):
        model_state, grad_sum = carry
        (loss, (per_loss, top1, model_state)), grads = grad_fn(
            params, model_state, mb["image"], mb["label"])
        return (model_state, jax.tree.map(jnp.add, grad_sum, grads)), (loss, per_loss, top1)

      zeros = jax.tree.map(jnp.zeros_like, params)
      (model_state, grads), (loss, per_loss, top1) = jax.lax.scan(
          body, (state["model_state"], zeros), micro)
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss, per_loss, top1 = loss.mean(), per_loss.mean(0), top1.mean(0)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient never reaches the state: the update is
    # dropped (the step counter still advances past the batch) and `finite`
    # tells the loop, which stops or counts the skip (config.on_nonfinite).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updated = {"params": optax.apply_updates(params, updates), "model_state": model_state,
               "opt_state": opt_state}
    kept = {k: state[k] for k in updated}
    new_state = {"step": state["step"] + 1,
                 **jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, kept)}
    metrics = {"loss": loss, "per_size_loss": per_loss, "per_size_top1": top1,
               "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite}
    return new_state, metrics

  return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def abstract_batch(mesh: Mesh, batch_size: int, image_shape: tuple[int, int, int],
                   num_classes: int, multilabel: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes, dtypes and shardings of a global training batch (for lowering without data)."""
  rows = sharding.batch_sharding(mesh)
  label_shape = (batch_size, num_classes) if multilabel else (batch_size,)
  return {"image": jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32, sharding=rows),
          "label": jax.ShapeDtypeStruct(label_shape, jnp.int32, sharding=rows)}


def make_eval_step(config: ml_collections.ConfigDict, spec: StateSpec, mesh: Mesh,
                   state_shardings: Any, nesting_weights: tuple[float, ...]) -> Callable:
  """jit(params, model_state, batch with "mask") -> replicated per-size sums."""
  graphdef = spec.graphdef
  weights = jnp.asarray(nesting_weights, jnp.float32)

  def eval_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state, copy=True)
    _, logits = model(batch["image"], train=False)
    mask = batch["mask"]
    _, per_loss = nested_loss(config, logits, batch["label"], weights, mask=mask)
    correct = (losses.nested_correct(logits, batch["label"]) * mask).sum(axis=1)
    return {"correct": correct, "loss_sum": per_loss * mask.sum(), "count": mask.sum()}

  return jax.jit(eval_step, in_shardings=(state_shardings["params"],
                                          state_shardings["model_state"],
                                          sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def make_embed_step(spec: StateSpec, mesh: Mesh, state_shardings: Any) -> Callable:
  """jit(params, model_state, batch) -> {"z" [B, d] float32, "label", "mask"}, replicated.

  For evaluators that need the representation itself (k-NN, linear probes);
  labels and mask come back replicated too, so every process sees the global batch.
  """
  graphdef = spec.graphdef

  def embed_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state, copy=True)
    z = model.encoder(batch["image"], train=False).astype(jnp.float32)
    return {"z": z, "label": batch["label"], "mask": batch["mask"]}

  return jax.jit(embed_step, in_shardings=(state_shardings["params"],
                                           state_shardings["model_state"],
                                           sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
