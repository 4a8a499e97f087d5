"""Schedules against closed forms; weight-decay masks; every optimizer takes a step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mrl_jax import optim
from mrl_jax.errors import ConfigError

PARAMS = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"scale": jnp.ones((4,)),
          "bias": jnp.ones((4,))}, "head": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones((5,))}}


def cfg(**kw):
  return ml_collections.ConfigDict(kw)


def test_warmup_then_cosine_closed_form():
  s = optim.build_schedule(cfg(name="cosine", warmup_steps=10), 1.0, 110)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 50 / 100)))
  assert float(s(110)) == pytest.approx(0.0, abs=1e-7)


def test_linear_and_step_schedules():
  lin = optim.build_schedule(cfg(name="linear", warmup_steps=0, end_lr_fraction=0.1), 2.0, 100)
  assert float(lin(50)) == pytest.approx(2.0 - 0.5 * 1.8)
  step = optim.build_schedule(cfg(name="step", step_boundaries=(0.5,), step_decay=0.1), 1.0, 100)
  assert float(step(49)) == 1.0 and float(step(51)) == pytest.approx(0.1)
  with pytest.raises(ConfigError, match="schedule"):
    optim.build_schedule(cfg(name="exp"), 1.0, 10)


def test_no_weight_decay_on_norms_and_biases():
  mask = optim.decay_mask(PARAMS, decay_norms_and_biases=False)
  assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                  "head": {"kernel": True, "bias": False}}


def test_sgd_weight_decay_is_coupled_like_pytorch():
  # One SGD step without momentum: p - lr * (g + wd * p), decay only where masked in.
  tx = optim.build_optimizer(cfg(name="sgd", momentum=0.0, weight_decay=0.1),
                             optim.build_schedule(cfg(name="constant"), 0.5, 10), PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.5 * (1 + 0.1))
  np.testing.assert_allclose(updates["head"]["bias"], -0.5)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_steps_downhill(name):
  tx = optim.build_optimizer(cfg(name=name, weight_decay=1e-4, grad_clip_norm=1.0),
                             optim.build_schedule(cfg(name="constant"), 0.01, 10), PARAMS)
  loss = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))
  params, state = PARAMS, tx.init(PARAMS)
  for _ in range(3):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = jax.tree.map(jnp.add, params, updates)
  assert loss(params) < loss(PARAMS)


def test_gradient_clipping_bounds_the_update():
  tx = optim.build_optimizer(cfg(name="sgd", momentum=0.0, grad_clip_norm=1.0),
                             optim.build_schedule(cfg(name="constant"), 1.0, 10), PARAMS)
  grads = jax.tree.map(lambda p: 100 * jnp.ones_like(p), PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  norm = jnp.sqrt(sum(jnp.sum(u ** 2) for u in jax.tree.leaves(updates)))
  assert float(norm) == pytest.approx(1.0, rel=1e-5)


def test_unknown_optimizer_is_a_config_error():
  with pytest.raises(ConfigError, match="rmsprop"):
    optim.build_optimizer(cfg(name="rmsprop"), lambda s: 0.1, PARAMS)
