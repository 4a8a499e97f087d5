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

from mrl_jax.errors import ConfigError
from mrl_jax.models import resnet, vit
from mrl_jax.models.classifier import NestedClassifier
from mrl_jax.models.nested_head import NestedHead, head_dims
from mrl_jax.nesting import Nesting


def _build_resnet(cfg: ml_collections.ConfigDict, in_channels: int, dtype: Any,
                  rngs: nnx.Rngs, image_size: int | None = None) -> nnx.Module:
  del image_size  # convolutions and global pooling take any resolution
  return resnet.ResNet(cfg.depth, in_channels=in_channels, width=cfg.get("width", 64),
                       small_images=cfg.get("small_images", False),
                       blurpool=cfg.get("blurpool", False),
                       zero_init_residual=cfg.get("zero_init_residual", False),
                       dtype=dtype, rngs=rngs)


def _resnet_dim(cfg: ml_collections.ConfigDict) -> int:
  return resnet.resnet_embedding_dim(cfg.depth, cfg.get("width", 64))


def _build_vit(cfg: ml_collections.ConfigDict, in_channels: int, dtype: Any,
               rngs: nnx.Rngs, image_size: int | None = None) -> nnx.Module:
  # The position-embedding grid is sized for one resolution (other sizes are
  # interpolated at call time): config.model.image_size, else the training size.
  size = cfg.get("image_size") or image_size
  if not size:
    raise ConfigError("config.model.name='vit' needs an image size for its position "
                      "embeddings: set config.data.image_size or config.model.image_size.")
  return vit.ViT(cfg.get("variant", "B/16"), image_size=size, in_channels=in_channels,
                 pool=cfg.get("pool", "token"),
                 representation_size=cfg.get("representation_size"),
                 dropout=cfg.get("dropout", 0.0), remat=cfg.get("remat", False),
                 dtype=dtype, rngs=rngs, **_vit_overrides(cfg))


def _vit_overrides(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Optional config.model.{width,depth,mlp_dim,num_heads,patch} over the variant's."""
  return {k: cfg[k] for k in vit.ARCH_FIELDS if cfg.get(k) is not None}


def _vit_dim(cfg: ml_collections.ConfigDict) -> int:
  return vit.vit_embedding_dim(cfg.get("variant", "B/16"), cfg.get("representation_size"),
                               **_vit_overrides(cfg))


# Builders are called as build(config.model, in_channels, dtype, rngs,
# image_size=config.data.image_size or None).
ENCODERS: dict[str, tuple[Callable[..., nnx.Module], Callable[..., int]]] = {
    "resnet": (_build_resnet, _resnet_dim),
    "vit": (_build_vit, _vit_dim),
}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _encoder_entry(cfg: ml_collections.ConfigDict):
  if cfg.name == "bert":  # models/bert.py: token ids, not images; trained by the mlm task
    raise ConfigError("config.model.name='bert' is a text encoder, not an image classifier's: "
                      "set config.task='mlm' (see configs/bert_mlm.py).")
  if cfg.name == "dual_encoder":  # models/dual_encoder.py: image-text pairs, trained contrastively
    raise ConfigError("config.model.name='dual_encoder' is an image-text model, not an image "
                      "classifier's: set config.task='contrastive' (see configs/align.py).")
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
                rngs: nnx.Rngs, nesting: Nesting | None = None) -> NestedClassifier:
  """Encoder + NestedHead; the head scores `nesting` (the run's, built once by the
  experiment) or, when None, the sizes `nested_dims(config)` with unit weights."""
  build_encoder, _ = _encoder_entry(config.model)
  dtype = compute_dtype(config)
  data = config.get("data")
  image_size = data.get("image_size") if data is not None else None
  encoder = build_encoder(config.model, in_channels, dtype, rngs, image_size=image_size)
  head = NestedHead(nesting if nesting is not None else nested_dims(config), num_classes,
                    efficient=config.head == "mrl_e", use_bias=config.get("head_bias", True),
                    dtype=dtype, class_multiple=config.get("head_class_multiple", 1), rngs=rngs)
  return NestedClassifier(encoder, head)
