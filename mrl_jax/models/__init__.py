"""Model registry: `config.model.name` -> an encoder; every encoder feeds a NestedHead.

An encoder family registers two functions: one building the NNX module from
`config.model` and one giving its embedding size without building it (so the
nesting list is checked before anything is allocated or compiled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import nnx

from mrl_jax.config_errors import ConfigError
from mrl_jax.models import resnet
from mrl_jax.models.classifier import NestedClassifier
from mrl_jax.models.nested_head import NestedHead, head_dims


def _build_resnet(cfg: ml_collections.ConfigDict, in_channels: int, dtype: Any,
                  rngs: nnx.Rngs) -> nnx.Module:
  return resnet.ResNet(cfg.depth, in_channels=in_channels, width=cfg.get("width", 64),
                       small_images=cfg.get("small_images", False),
                       blurpool=cfg.get("blurpool", False),
                       zero_init_residual=cfg.get("zero_init_residual", False),
                       dtype=dtype, rngs=rngs)


def _resnet_dim(cfg: ml_collections.ConfigDict) -> int:
  return resnet.resnet_embedding_dim(cfg.depth, cfg.get("width", 64))


ENCODERS: dict[str, tuple[Callable[..., nnx.Module], Callable[..., int]]] = {
    "resnet": (_build_resnet, _resnet_dim),
}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _encoder_entry(cfg: ml_collections.ConfigDict):
  if cfg.name not in ENCODERS:
    raise ConfigError(f"config.model.name={cfg.name!r} is unknown: use one of {sorted(ENCODERS)}.")
  return ENCODERS[cfg.name]


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  name = config.get("compute_dtype", "float32")
  if name not in COMPUTE_DTYPES:
    raise ConfigError(f"config.compute_dtype={name!r}: use one of {sorted(COMPUTE_DTYPES)}.")
  return COMPUTE_DTYPES[name]


def embedding_dim(config: ml_collections.ConfigDict) -> int:
  try:
    return _encoder_entry(config.model)[1](config.model)
  except ValueError as e:  # e.g. an unsupported ResNet depth
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"config.model: {e}") from e


def nested_dims(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The prefix sizes the configured head scores (checked against the encoder)."""
  dim = embedding_dim(config)
  dims = head_dims(config.head, config.nesting.dims, config.get("ff_dim"), dim)
  if dims[-1] > dim:
    raise ConfigError(f"config.nesting.dims={tuple(dims)} goes up to {dims[-1]} but "
                      f"{config.model.name} embeds into {dim} dims: drop the larger sizes.")
  return dims


def build_model(config: ml_collections.ConfigDict, *, num_classes: int, in_channels: int,
                rngs: nnx.Rngs) -> NestedClassifier:
  build_encoder, _ = _encoder_entry(config.model)
  dtype = compute_dtype(config)
  encoder = build_encoder(config.model, in_channels, dtype, rngs)
  head = NestedHead(nested_dims(config), num_classes, efficient=config.head == "mrl_e",
                    use_bias=config.get("head_bias", True), dtype=dtype, rngs=rngs)
  return NestedClassifier(encoder, head)
