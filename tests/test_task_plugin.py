"""A task the code base has never seen plugs into the train loop: train.py knows no task.

`RegressionTask` (nested linear regression of y = x A on random vectors, batches
{"x", "y"}: no images, no labels) is registered under config.task="toy_regression"
and driven through `train.train_and_evaluate`, resume, `inference.load`, and a
gradient-accumulated update step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mrl_jax import experiment, inference, sharding, tasks, train
from mrl_jax.tasks.base import Task

IN_DIM, OUT_DIM, WIDTH = 6, 3, 8
NUM_TRAIN, NUM_EVAL = 64, 20
# The regression the model must learn; fixed, so every run sees the same problem.
TRUE_MAP = np.random.default_rng(123).normal(size=(IN_DIM, OUT_DIM)).astype(np.float32)


def _examples(seed: int, n: int) -> dict[str, np.ndarray]:
  x = np.random.default_rng(seed).normal(size=(n, IN_DIM)).astype(np.float32)
  return {"x": x, "y": x @ TRUE_MAP}


class _BatchIterator:
  """Checkpointable: the state is the next batch's index; batch k is a pure function of k."""

  def __init__(self, batch_size: int, seed: int):
    self.batch_size, self.seed, self.next_index = batch_size, seed, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = _examples(self.seed * 1_000_003 + self.next_index, self.batch_size)
    self.next_index += 1
    return batch

  def get_state(self) -> dict:
    return {"next_index": self.next_index}

  def set_state(self, state: dict) -> None:
    self.next_index = int(state["next_index"])


@dataclasses.dataclass(frozen=True)
class RegressionInfo:
  num_train_examples: int
  in_dim: int


class NestedRegressor(nnx.Module):
  """x -> z = W x (the nested embedding) -> one linear read-out per prefix z[:m]."""

  def __init__(self, in_dim: int, dims: tuple[int, ...], rngs: nnx.Rngs):
    self.dims = dims
    self.encoder = nnx.Linear(in_dim, dims[-1], rngs=rngs)
    self.heads = nnx.List([nnx.Linear(m, OUT_DIM, rngs=rngs) for m in dims])

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    z = self.encoder(x)
    return z, jnp.stack([head(z[:, :m]) for m, head in zip(self.dims, self.heads)])


class RegressionTask(Task):
  name = "toy_regression"
  console_metric = "mse"

  def data_info(self, config):
    return RegressionInfo(NUM_TRAIN, IN_DIM)

  def data_info_from_meta(self, config, meta):
    return RegressionInfo(1, int(meta["in_dim"]))

  def train_iterator(self, config):
    return _BatchIterator(config.batch_size, config.seed)

  def eval_batches(self, config):
    data = _examples(999, NUM_EVAL)
    b = config.eval_batch_size
    for start in range(0, NUM_EVAL, b):
      rows = {k: v[start:start + b] for k, v in data.items()}
      real = len(rows["x"])
      rows = {k: np.concatenate([v, np.zeros((b - real, v.shape[1]), v.dtype)])
              for k, v in rows.items()}
      yield {**rows, "mask": (np.arange(b) < real).astype(np.float32)}

  def embedding_dim(self, config):
    return config.model.width

  def build_model(self, config, nesting, info, rngs):
    return NestedRegressor(info.in_dim, nesting.dims, rngs)

  def checkpoint_meta(self, config, nesting, info):
    return {"dims": list(nesting.dims), "in_dim": info.in_dim}

  def abstract_batch(self, config, info, batch_size):
    return {"x": jax.ShapeDtypeStruct((batch_size, info.in_dim), jnp.float32),
            "y": jax.ShapeDtypeStruct((batch_size, OUT_DIM), jnp.float32)}

  def loss(self, config, model, batch, nesting, *, train):
    _, pred = model(batch["x"])
    per_size = ((pred - batch["y"][None]) ** 2).sum(-1).mean(-1)
    total = jnp.sum(jnp.asarray(nesting.weights) * per_size)
    return total, {"per_size_loss": per_size, "per_size_mse": per_size}

  def eval_sums(self, config, model, batch, nesting):
    _, pred = model(batch["x"])
    sq = ((pred - batch["y"][None]) ** 2).sum(-1)
    return {"sse": (sq * batch["mask"]).sum(-1), "count": batch["mask"].sum()}

  def reduce_eval(self, totals):
    return {"mse": totals["sse"] / max(float(totals["count"]), 1.0),
            "count": int(totals["count"])}

  def embed(self, config, model, batch):
    return {"z": model.encoder(batch["x"]), "mask": batch["mask"]}

  def restored_model(self, exp, state, step):
    graphdef = exp.spec.graphdef

    def predict(x):
      model = nnx.merge(graphdef, state["params"], state["model_state"])
      return np.asarray(model(jnp.asarray(x))[1])

    return types.SimpleNamespace(step=step, dims=exp.dims, predict=predict,
                                 params=state["params"])

  def summary(self, config, dims, result):
    return {"val_mse": {str(m): float(v) for m, v in zip(dims, result["mse"])},
            "eval_examples": result["count"]}

  def val_metrics(self, dims, result):
    return {f"val/mse_d{m}": float(v) for m, v in zip(dims, result["mse"])}

  def format_table(self, config, dims, result):
    return "toy table\n" + "\n".join(f"{m} {v:.4f}" for m, v in zip(dims, result["mse"]))


@pytest.fixture
def toy_task(monkeypatch):
  monkeypatch.setitem(tasks.TASKS, "toy_regression", f"{__name__}:RegressionTask")


def toy_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      task="toy_regression", seed=0, model=dict(name="toy_linear", width=WIDTH),
      data=dict(name="toy_vectors"), nesting=dict(dims=(2, 4, 8), weights=()),
      batch_size=16, eval_batch_size=8, total_steps=40, lr=0.05,
      optimizer=dict(name="adamw", weight_decay=0.0), schedule=dict(name="constant"),
      mesh=dict(data=-1, fsdp=1, model=1), log_every_steps=10, checkpoint_every_steps=20,
      keep_checkpoints=2, grad_accum_steps=1))
  config.update(overrides)
  return config


def read_rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_a_new_task_trains_resumes_and_restores_through_the_generic_loop(toy_task, tmp_path,
                                                                         capsys):
  workdir = str(tmp_path)
  first = train.train_and_evaluate(toy_config(total_steps=20), workdir)
  assert first["steps"] == 20 and first["dims"] == [2, 4, 8]
  assert first["dataset"] == "toy_vectors" and first["model"] == "toy_linear"
  summary = train.train_and_evaluate(toy_config(), workdir)  # resumes at 20, trains to 40
  out = capsys.readouterr().out
  assert "Resumed from" in out and "(step 20)" in out
  assert "| mse @2:" in out and "toy table" in out

  rows = [r for r in read_rows(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 10, 20, 21, 30, 40]
  assert {"train/mse_d2", "train/loss_d8", "train/grad_norm"} <= set(rows[-1])
  # A linear map is exactly learnable from 8 dims: the full-width error falls far;
  # 2 dims cannot hold a rank-3 map, so its error stays above the 8-dim one.
  assert rows[-1]["train/mse_d8"] < 0.2 * rows[0]["train/mse_d8"], rows
  val = {int(m): v for m, v in summary["val_mse"].items()}
  assert summary["eval_examples"] == NUM_EVAL and val[8] < val[2]

  # Reference: the restored model's predictions on the eval vectors, in float64.
  restored = inference.load(workdir)
  assert restored.step == 40 and restored.dims == (2, 4, 8)
  data = _examples(999, NUM_EVAL)
  pred = restored.predict(data["x"]).astype(np.float64)
  mse = ((pred - data["y"][None]) ** 2).sum(-1).mean(-1)
  np.testing.assert_allclose([val[m] for m in (2, 4, 8)], mse, rtol=1e-4)


def test_grad_accumulation_splits_every_batch_entry(toy_task):
  """2 microbatches of 8 rows give the update of one batch of 16 (MSE is a row mean)."""
  batch = _examples(7, 16)
  states = {}
  for accum in (1, 2):
    exp = experiment.build(toy_config(grad_accum_steps=accum,
                                      optimizer=dict(name="sgd", momentum=0.0)))
    state, metrics = exp.train_step()(exp.init_state(), sharding.global_batch(batch, exp.mesh))
    states[accum] = (jax.tree.map(np.asarray, state["params"]), float(metrics["loss"]))
  np.testing.assert_allclose(states[2][1], states[1][1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               states[2][0], states[1][0])
