"""config.freeze (LiT): frozen parameters never change, have no optimizer state and resume."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mrl_jax import experiment, inference, optim, perf, sharding, train
from mrl_jax.errors import ConfigError
from test_train import quickstart_config

PARAMS = {"encoder": {"conv": {"kernel": -jnp.zeros((3, 3, 2, 4))},
                      "bn": {"scale": jnp.ones((4,))}},
          "head": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones((5,))}}


def by_path(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {sharding.path_to_str(p): np.asarray(x) for p, x in leaves}


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_frozen_parameters_get_zero_updates_and_no_optimizer_state(name):
  cfg = ml_collections.ConfigDict(dict(name=name, weight_decay=0.1, decay_norms_and_biases=True,
                                       grad_clip_norm=1.0))
  schedule = optax.constant_schedule(0.1)
  tx = optim.build_optimizer(cfg, schedule, PARAMS, frozen=("^encoder/",))
  plain = optim.build_optimizer(cfg, schedule, PARAMS)
  state = tx.init(PARAMS)
  # The optimizer state is exactly that of an optimizer over the trained parameters only.
  assert count(state) == count(plain.init({"head": PARAMS["head"]})) < count(plain.init(PARAMS))
  for _ in range(2):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)
  assert all(np.all(u == 0) for u in jax.tree.leaves(updates["encoder"]))
  assert all(np.any(u != 0) for u in jax.tree.leaves(updates["head"]))


def test_frozen_mask_matches_paths():
  mask = by_path(optim.frozen_mask(PARAMS, ("^encoder/conv/", "bias$")))
  assert mask == {"encoder/conv/kernel": True, "encoder/bn/scale": False,
                  "head/kernel": False, "head/bias": True}


def test_one_string_is_one_pattern():
  config = ml_collections.ConfigDict(dict(freeze="^image/"))
  assert optim.freeze_patterns(config) == ("^image/",)
  assert optim.freeze_patterns(ml_collections.ConfigDict()) == ()


def test_a_pattern_matching_nothing_is_one_config_line():
  config = quickstart_config(None, freeze=("^image/",))
  with pytest.raises(ConfigError, match=r"'\^image/' matches no parameter") as e:
    experiment.build(config, info_from="config")
  assert "encoder/" in str(e.value) and "\n" not in str(e.value)
  config = quickstart_config(None, freeze=("encoder/(",))
  with pytest.raises(ConfigError, match="not a regular expression"):
    experiment.build(config, info_from="config")


def test_frozen_run_has_no_optimizer_state_for_the_encoder():
  config = quickstart_config(None)
  plain = experiment.build(config, info_from="config")
  config.freeze = ("^encoder/",)
  frozen = experiment.build(config, info_from="config")
  leaves, _ = jax.tree_util.tree_flatten_with_path(frozen.spec.abstract["params"])
  encoder = {sharding.path_to_str(p): x for p, x in leaves
             if sharding.path_to_str(p).startswith("encoder/")}
  assert len(encoder) > 20 and frozen.spec.frozen_params == set(encoder)
  # SGD with momentum: one trace per trained element, none for the encoder's.
  assert (count(frozen.spec.abstract["opt_state"])
          == count(plain.spec.abstract["opt_state"]) - count(list(encoder.values())) > 0)
  assert "encoder/bn1/mean" in frozen.spec.frozen_stats


def test_a_frozen_encoders_backward_pass_is_compiled_away():
  def step_flops(**overrides):
    exp = experiment.build(quickstart_config(None, **overrides), info_from="config")
    return perf.step_flops(exp.train_step().lower(exp.restore_target(), exp.abstract_batch()))
  # Forward-only through the encoder: about a third of forward + backward (measured 0.34).
  assert step_flops(freeze=("^encoder/",)) < 0.5 * step_flops()


@pytest.mark.slow
def test_frozen_encoder_is_bit_identical_after_training_and_resume(digits_data_dir, tmp_path,
                                                                   capsys):
  config = quickstart_config(digits_data_dir, freeze=("^encoder/",), total_steps=3)
  initial = experiment.build(config).init_state()
  init_params, init_stats = by_path(initial["params"]), by_path(initial["model_state"])
  train.train_and_evaluate(config, str(tmp_path))  # checkpoints step 3
  config.total_steps = 6
  train.train_and_evaluate(config, str(tmp_path))  # resumes from step 3
  assert "(step 3)" in capsys.readouterr().out.split("Resumed from")[1].splitlines()[0]
  final = inference.load(str(tmp_path))
  assert final.step == 6
  params, stats = by_path(final.params), by_path(final.model_state)
  for name, value in init_params.items():
    if name.startswith("encoder/"):
      np.testing.assert_array_equal(value.view(np.uint32), params[name].view(np.uint32),
                                    err_msg=name)
    else:
      assert not np.array_equal(value, params[name]), f"{name} did not train"
  for name, value in init_stats.items():
    if name.startswith("encoder/"):  # BatchNorm statistics under a frozen path are kept
      np.testing.assert_array_equal(value, stats[name], err_msg=name)
