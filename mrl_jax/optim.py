"""Optimizers and learning-rate schedules built from `config.optimizer` / `config.schedule`.

config.optimizer fields:
  name: "sgd" | "adamw" | "lars" | "lamb" | "adafactor".
  momentum (sgd/lars), nesterov (sgd), b1, b2, eps (adamw/lamb).
  weight_decay: decoupled for adamw/lamb/lars/adafactor; for sgd it is added to
    the gradient before momentum, as PyTorch's SGD(weight_decay=...) does.
  decay_norms_and_biases: False (the recipes' choice) skips every parameter with
    fewer than 2 dims, i.e. norm scales/offsets and biases.
  grad_clip_norm: clip the global gradient norm to this value (0 = off).
config.freeze (top level, any task): regexes (re.search) over parameter paths in
  `sharding.path_to_str` form, e.g. ("^image/",) locks a dual encoder's image
  tower (LiT). Frozen parameters get no optimizer state at all (optax's
  multi_transform gives them set_to_zero, whose state is an empty MaskedNode),
  no weight decay and a zero update; the train step also stops their gradient
  and keeps them (and BatchNorm statistics under them) bit for bit.
config.schedule fields:
  name: "cosine" | "linear" | "step" | "constant", after `warmup_steps` of linear
    warm-up from 0; `end_lr_fraction` (cosine/linear floor), `step_boundaries`
    (fractions of the run) and `step_decay` (multiplier at each boundary).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from mrl_jax import sharding
from mrl_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw", "lars", "lamb", "adafactor")
SCHEDULES = ("cosine", "linear", "step", "constant")


def build_schedule(cfg: ml_collections.ConfigDict, base_lr: float,
                   total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then the configured decay to the end of the run."""
  name = cfg.get("name", "cosine")
  warmup = min(int(cfg.get("warmup_steps", 0)), max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end_lr = base_lr * float(cfg.get("end_lr_fraction", 0.0))
  if name == "cosine":
    main = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=end_lr / base_lr if base_lr else 0.0)
  elif name == "linear":
    main = optax.linear_schedule(base_lr, end_lr, decay_steps)
  elif name == "step":
    boundaries = {int(f * decay_steps): float(cfg.get("step_decay", 0.1))
                  for f in cfg.get("step_boundaries", (0.3, 0.6, 0.9))}
    main = optax.piecewise_constant_schedule(base_lr, boundaries)
  elif name == "constant":
    main = optax.constant_schedule(base_lr)
  else:
    raise ConfigError(f"config.schedule.name={name!r} is unknown: use one of {SCHEDULES}.")
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), main], [warmup])


def decay_mask(params: Any, decay_norms_and_biases: bool) -> Any:
  """True where weight decay applies: matrices and conv kernels (ndim >= 2)."""
  return jax.tree.map(lambda p: decay_norms_and_biases or p.ndim >= 2, params)


def freeze_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """config.freeze as a tuple of regexes (one string is one pattern, not its characters)."""
  freeze = config.get("freeze") or ()
  return (freeze,) if isinstance(freeze, str) else tuple(freeze)


def is_frozen(name: str, patterns: Sequence[str]) -> bool:
  """Whether the parameter path `name` ("image/blocks/0/...") matches a freeze pattern."""
  return any(re.search(p, name) for p in patterns)


def frozen_mask(params: Any, patterns: Sequence[str]) -> Any:
  """True at every leaf of `params` whose path matches one of `patterns` (config.freeze)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: is_frozen(sharding.path_to_str(path), patterns), params)


def check_freeze_patterns(params: Any, patterns: Sequence[str]) -> None:
  """A ConfigError for a pattern that is no regex or matches no parameter of `params`."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  names = [sharding.path_to_str(path) for path, _ in leaves]
  for pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"config.freeze pattern {pattern!r} is not a regular expression "
                        f"({e}): fix it.") from e
    if not any(re.search(pattern, n) for n in names):
      examples = ", ".join(repr(n) for n in names[:3])
      raise ConfigError(f"config.freeze pattern {pattern!r} matches no parameter (paths look "
                        f"like {examples}, ...): fix or drop it.")


def build_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule, params: Any, *,
                    frozen: Sequence[str] = ()) -> optax.GradientTransformation:
  """The optax chain for `cfg` (clipping -> optimizer with masked weight decay); parameters
  matching a `frozen` pattern get a zero update and no optimizer state.

  `params` (the parameter tree, kept for callers) is not needed: the masks are
  functions of the tree the optimizer is initialised and updated with.
  """
  del params
  tx = _build_chain(cfg, schedule)
  if not frozen:
    return tx  # the opt_state layout of runs (and checkpoints) without config.freeze
  patterns = tuple(frozen)
  labels = lambda p: jax.tree.map(lambda f: "frozen" if f else "trained",
                                  frozen_mask(p, patterns))
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def _build_chain(cfg: ml_collections.ConfigDict,
                 schedule: optax.Schedule) -> optax.GradientTransformation:
  name = cfg.get("name", "sgd")
  wd = float(cfg.get("weight_decay", 0.0))
  decay_all = bool(cfg.get("decay_norms_and_biases", False))
  # A function of the params it is given: under multi_transform the frozen leaves
  # arrive as empty MaskedNodes, which a mask tree built beforehand would not match.
  mask = lambda p: decay_mask(p, decay_all)
  if name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=cfg.get("momentum", 0.9) or None,
                  nesterov=bool(cfg.get("nesterov", False))))
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                     eps=cfg.get("eps", 1e-8), weight_decay=wd, mask=mask)
  elif name == "lars":
    tx = optax.lars(schedule, weight_decay=wd, weight_decay_mask=mask,
                    trust_ratio_mask=mask, momentum=cfg.get("momentum", 0.9))
  elif name == "lamb":
    tx = optax.lamb(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                    eps=cfg.get("eps", 1e-6), weight_decay=wd, mask=mask)
  elif name == "adafactor":
    tx = optax.adafactor(schedule, momentum=cfg.get("momentum", None),
                         weight_decay_rate=wd or None, weight_decay_mask=mask,
                         multiply_by_parameter_scale=False, clipping_threshold=None)
  else:
    raise ConfigError(f"config.optimizer.name={name!r} is unknown: use one of {OPTIMIZERS}.")
  clip = float(cfg.get("grad_clip_norm", 0.0))
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
