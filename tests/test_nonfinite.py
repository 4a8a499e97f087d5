"""NaN/Inf in training: the update is dropped, the run stops naming the step (or skips
if configured), and no checkpoint follows the bad step. Plus throughput/MFU accounting."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax import experiment, metric_writer, perf, sharding, train
from mrl_jax.data import pipeline
from test_train import quickstart_config, read_metrics


class _PoisonedIterator:
  """The real training iterator, with NaN images in the batches of chosen steps (1-based)."""

  def __init__(self, inner, bad_steps):
    self._inner, self._bad, self._step = inner, set(bad_steps), 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self._inner))
    self._step += 1
    if self._step in self._bad:
      batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  def __getattr__(self, name):  # get_state / set_state / close for checkpoints
    return getattr(self._inner, name)


@pytest.fixture
def poison(monkeypatch):
  def apply(bad_steps):
    real = pipeline.make_train_iterator
    monkeypatch.setattr(pipeline, "make_train_iterator",
                        lambda *a, **k: _PoisonedIterator(real(*a, **k), bad_steps))
  return apply


def test_update_step_drops_a_non_finite_update(digits_data_dir):
  config = quickstart_config(digits_data_dir)
  exp = experiment.build(config)
  mesh = exp.mesh
  step = exp.train_step()
  state = exp.init_state()
  before = jax.tree.map(np.asarray, state)
  images = np.random.default_rng(0).normal(size=(64, 16, 16, 1)).astype(np.float32)
  images[3] = np.nan
  batch = sharding.global_batch({"image": images, "label": np.zeros(64, np.int32)}, mesh)
  state, metrics = step(state, batch)
  assert not bool(metrics["finite"]) and int(state["step"]) == 1
  for key in ("params", "model_state", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state[key]), before[key])


@pytest.mark.slow
def test_stop_names_the_step_and_writes_no_later_checkpoint(digits_data_dir, tmp_path, poison):
  poison({5})
  config = quickstart_config(digits_data_dir, log_every_steps=100, checkpoint_every_steps=3)
  with pytest.raises(train.NonFiniteError, match=r"Non-finite (loss|gradient norm) nan.* at step 5\b"):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


@pytest.mark.slow
def test_skip_trains_through_and_counts(digits_data_dir, tmp_path, poison):
  poison({2, 5})
  config = quickstart_config(digits_data_dir)
  config.on_nonfinite = "skip"
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 6
  rows = {r["step"]: r for r in read_metrics(tmp_path) if "train/loss" in r}
  assert rows[4]["train/nonfinite_skipped_steps"] == 1 and rows[6]["train/nonfinite_skipped_steps"] == 2
  assert np.isfinite(rows[6]["train/loss"])
  assert all(np.isfinite(v) for v in summary["val_loss"].values())


@pytest.mark.slow
def test_skip_gives_up_past_the_limit(digits_data_dir, tmp_path, poison):
  poison({2, 3})
  config = quickstart_config(digits_data_dir)
  config.on_nonfinite = "skip"
  config.max_nonfinite_steps = 1
  with pytest.raises(train.NonFiniteError, match="diverging"):
    train.train_and_evaluate(config, str(tmp_path))


def test_peak_table_and_mfu():
  assert perf.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert perf.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
  assert perf.peak_flops_per_device("TPU v5 lite") == 197e12
  assert perf.peak_flops_per_device("TPU v4") == 275e12
  assert perf.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
  assert perf.peak_flops_per_device("cpu") is None
  devices = [types.SimpleNamespace(device_kind="TPU v4")] * 4
  assert perf.mfu(275e12, 2.0, devices) == pytest.approx(1 / 8)
  assert perf.mfu(None, 1.0, devices) is None


def test_step_flops_counts_the_matmuls_of_the_lowered_program():
  lowered = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(
      jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((32, 16), jnp.float32))
  assert perf.step_flops(lowered) >= 2 * 64 * 32 * 16


def test_throughput_splits_data_wait_from_compute(monkeypatch):
  clock = iter([100.0, 104.0])
  monkeypatch.setattr(metric_writer.time, "perf_counter", lambda: next(clock))
  meter = metric_writer.Throughput(0, 10, 32, flops_per_step=1e12)
  meter.add_data_wait(1.0)
  out = meter.report(4)  # 4 steps in 4 s, 1 s of it waiting for data
  assert out["step_ms"] == pytest.approx(1000.0) and out["data_wait_ms"] == pytest.approx(250.0)
  assert out["compute_ms"] == pytest.approx(750.0) and out["data_wait_fraction"] == 0.25
  assert out["examples_per_s"] == pytest.approx(32.0) and out["eta_s"] == pytest.approx(6.0)
  assert out["tflops_per_s_per_device"] == pytest.approx(1.0 / jax.device_count())
