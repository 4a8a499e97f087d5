"""Evaluators during training: 1-NN and linear probe per size on a single-label split."""

import numpy as np
import pytest

from mrl_jax import inference, train
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import knn, periodic, probe
from test_train import quickstart_config, read_metrics


def digits_evaluator(data_dir, **extra):
  return {"digits": dict(every_steps=3, batch_size=120, linear_steps=30,
                         data=dict(name="mrl_digits", data_dir=data_dir, image_size=16,
                                   eval_crop_fraction=1.0, mean=(0.5,), std=(0.5,)), **extra)}


@pytest.mark.slow
def test_evaluator_runs_during_training_and_matches_the_restored_model(digits_data_dir, tmp_path):
  config = quickstart_config(digits_data_dir)
  config.evaluators = digits_evaluator(digits_data_dir)
  summary = train.train_and_evaluate(config, str(tmp_path))
  dims = list(config.nesting.dims)
  rows = [r for r in read_metrics(tmp_path) if "eval/digits/knn1_top1_d2" in r]
  assert [r["step"] for r in rows] == [3, 6]
  final = rows[-1]
  for m in dims:
    assert 0.0 <= final[f"eval/digits/linear_top1_d{m}"] <= 1.0
  assert summary["evaluators"]["eval/digits/knn1_top1_d2"] == final["eval/digits/knn1_top1_d2"]

  # Reference: the probe's 1-NN on embeddings of the restored final checkpoint.
  model = inference.load(str(tmp_path))
  train_z, _, train_y = probe.embed_split(model, model.config.data, "train", 120)
  test_z, _, test_y = probe.embed_split(model, model.config.data, "test", 120)
  for m in dims:
    _, idx = knn.knn_search(np.asarray(knn.l2_normalize(test_z[:, :m])),
                            np.asarray(knn.l2_normalize(train_z[:, :m])), 1)
    expected = np.mean(train_y[idx[:, 0]] == test_y)
    assert abs(final[f"eval/digits/knn1_top1_d{m}"] - expected) <= 1 / 360, m  # float ties


def test_evaluator_config_errors_name_the_fix(digits_data_dir):
  config = quickstart_config(digits_data_dir)
  config.evaluators = digits_evaluator(digits_data_dir, every=3)
  with pytest.raises(ConfigError, match="unknown field"):
    periodic.build_evaluators(config, in_channels=1)
  config.evaluators = {"digits": dict(every_steps=3)}
  with pytest.raises(ConfigError, match="data is missing"):
    periodic.build_evaluators(config, in_channels=1)
