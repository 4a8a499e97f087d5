"""Two-tower image-text models (ALIGN / CLIP / SigLIP style) with a learned temperature.

An image tower from the image registry (`config.model.image`, "vit" or
"resnet") and a BERT text tower (`config.model.text`, pooled by its [CLS]
token as in ALIGN, or by the mean over real tokens), each followed by a linear
projection without bias (ALIGN, CLIP) to `config.model.embed_dim`. The
projected vectors are the nested embeddings: the contrastive loss normalises
every prefix z[:, :m] of both on its own. With `embed_dim=None` there are no
projections and the two towers must be equally wide.

    config.model = dict(name="dual_encoder",
        image=dict(name="vit", variant="B/16", ...),   # the image registry's fields
        text=dict(name="bert", variant="base", pooling="cls", dropout=0.1, ...),
        embed_dim=768)
    config.contrastive = dict(kind="softmax", init_scale=None, init_bias=None,
        learn_scale=True, per_size_scale=False, max_scale=100.0)

Temperature and bias. `logit_scale` holds t, the logits are scaled by
exp(t), initialised t = log(init_scale): 1/0.07 for softmax (CLIP), 10 for
sigmoid (SigLIP). exp(t) is capped at `max_scale` (CLIP clamps at 100): above
the cap the gradient still passes when it would lower t, so the cap acts like
CLIP's clamp of the parameter after each step, not like a wall t sticks to.
`per_size_scale` gives every prefix size its own t (shape [n], the nesting's
order), else one scalar. `learn_scale=False` stores t as a `FixedScalar`
variable instead of an `nnx.Param`: it is in the model state, not the
parameters, so no optimizer (and no weight decay) ever sees it.
`logit_bias` (SigLIP's b, initialised -10) exists for kind="sigmoid" or when
`init_bias` is set; it is always learned.

Parameter paths (`sharding.path_to_str` form):

    image/...                     the image tower (ViT or ResNet paths)
    text/...                      the BERT encoder (bert.py's paths without encoder/)
    image_projection/kernel       [image width, embed_dim]
    text_projection/kernel        [text width, embed_dim]
    logit_scale                   [] or [n]
    logit_bias                    [] or [n]   (sigmoid only)

Locked towers (LiT). A tower whose parameters all match `config.freeze`
runs in inference mode even when training (`train=False`: BatchNorm uses and
keeps its running statistics, no dropout), as LiT runs its locked image tower;
`DualEncoder.locked` names those towers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mrl_jax import optim, sharding
from mrl_jax.errors import ConfigError
from mrl_jax.models import ENCODERS, bert, compute_dtype, vit
from mrl_jax.nesting import Nesting

KINDS = ("softmax", "sigmoid")
TOWERS = ("image", "text")
# CLIP's initial temperature 0.07 and SigLIP's t' = log 10, b' = -10.
DEFAULT_INIT_SCALE = {"softmax": 1.0 / 0.07, "sigmoid": 10.0}
DEFAULT_INIT_BIAS = {"softmax": None, "sigmoid": -10.0}

# The towers' Megatron rules match under "image/" and "text/" as written
# (`(^|/)attn/...`); BERT's word embedding is vocab-parallel. The projections
# are never split over "model" along their output dim: the nested prefixes
# slice it (FSDP may still shard a dim of a large one; it is gathered to use).
SHARDING_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = vit.BLOCK_SHARDING_RULES + (
    (r"^text/embeddings/word/embedding", ("model", None)),
    (r"^(image|text)_projection/", (None, None)),
)


class FixedScalar(nnx.Variable):
  """A value the model uses but never trains (a fixed temperature): model state, not Param."""


@dataclasses.dataclass(frozen=True)
class ContrastiveSettings:
  """config.contrastive with its defaults filled in."""

  kind: str
  init_scale: float
  init_bias: float | None
  learn_scale: bool
  per_size_scale: bool
  max_scale: float


def contrastive_settings(config: ml_collections.ConfigDict) -> ContrastiveSettings:
  """config.contrastive checked, defaults per kind (see the module docstring)."""
  cfg = config.get("contrastive") or ml_collections.ConfigDict()
  kind = cfg.get("kind", "softmax")
  if kind not in KINDS:
    raise ConfigError(f"config.contrastive.kind={kind!r} is unknown: use one of {KINDS}.")
  init_scale = cfg.get("init_scale")
  init_scale = float(DEFAULT_INIT_SCALE[kind] if init_scale is None else init_scale)
  max_scale = float(cfg.get("max_scale", 100.0))
  if not 0.0 < init_scale <= max_scale:
    raise ConfigError(f"config.contrastive.init_scale={init_scale} must be in (0, max_scale="
                      f"{max_scale}]: raise config.contrastive.max_scale or lower init_scale.")
  init_bias = cfg.get("init_bias")
  init_bias = DEFAULT_INIT_BIAS[kind] if init_bias is None else float(init_bias)
  return ContrastiveSettings(kind, init_scale, init_bias, bool(cfg.get("learn_scale", True)),
                             bool(cfg.get("per_size_scale", False)), max_scale)


# ---------------------------------------------------------------- config alone
def _tower_config(config: ml_collections.ConfigDict, tower: str) -> ml_collections.ConfigDict:
  cfg = config.model.get(tower)
  if cfg is None:
    raise ConfigError(f"config.model.name='dual_encoder' needs config.model.{tower} "
                      "(see mrl_jax/models/dual_encoder.py).")
  return cfg


def _image_entry(cfg: ml_collections.ConfigDict):
  name = cfg.get("name")
  if name not in ENCODERS:
    raise ConfigError(f"config.model.image.name={name!r} is unknown: use one of "
                      f"{sorted(ENCODERS)}.")
  return ENCODERS[name]


def _text_fields(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  name = cfg.get("name", "bert")
  if name != "bert":
    raise ConfigError(f"config.model.text.name={name!r} is unknown: use 'bert'.")
  pooling = cfg.get("pooling", "cls")
  if pooling not in bert.POOLINGS:
    raise ConfigError(f"config.model.text.pooling={pooling!r} is unknown: use one of "
                      f"{bert.POOLINGS}.")
  return dict(variant=cfg.get("variant", "base"), **bert.model_overrides(cfg))


def tower_widths(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(image tower width, text tower width) from the config alone."""
  image_cfg, text_cfg = _tower_config(config, "image"), _tower_config(config, "text")
  try:
    image_width = _image_entry(image_cfg)[1](image_cfg)
  except ValueError as e:  # e.g. an unsupported ResNet depth
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"config.model.image: {e}") from e
  return int(image_width), bert.bert_embedding_dim(**_text_fields(text_cfg))


def dual_embedding_dim(config: ml_collections.ConfigDict) -> int:
  """The size d of both nested embeddings, from the config alone (nothing built)."""
  image_width, text_width = tower_widths(config)
  embed_dim = config.model.get("embed_dim", 768)
  if embed_dim is None:
    if image_width != text_width:
      raise ConfigError(f"config.model.embed_dim=None needs towers of one width but the image "
                        f"tower is {image_width} and the text tower {text_width} wide: set "
                        "config.model.embed_dim to project both.")
    return image_width
  if int(embed_dim) < 1:
    raise ConfigError(f"config.model.embed_dim={embed_dim} must be a positive integer or None.")
  return int(embed_dim)


def sharding_rules(config: ml_collections.ConfigDict) -> tuple:
  """(regex, axes) rules for a dual encoder's parameters (see `SHARDING_RULES`)."""
  del config  # the same rules for every tower choice
  return SHARDING_RULES


# ---------------------------------------------------------------- the model
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _capped_exp(t: jax.Array, max_scale: float) -> jax.Array:
  return jnp.minimum(jnp.exp(t), max_scale)


def _capped_exp_fwd(t, max_scale):
  return _capped_exp(t, max_scale), t


def _capped_exp_bwd(max_scale, t, g):
  scale = jnp.minimum(jnp.exp(t), max_scale)
  # At the cap only a gradient that lowers t (g > 0 under gradient descent) passes.
  passes = (t < math.log(max_scale)) | (g > 0)
  return (jnp.where(passes, g * scale, 0.0),)


_capped_exp.defvjp(_capped_exp_fwd, _capped_exp_bwd)


def _tower_params(module: nnx.Module, prefix: str) -> list[str]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param))
  return [prefix + sharding.path_to_str(path) for path, _ in leaves]


class DualEncoder(nnx.Module):
  """Image tower + text tower -> projected raw embeddings [B, d] float32 (see module doc).

  Args:
    image, text: the towers (an image encoder returning [B, image_width]; a
      `bert.BertEncoder`).
    image_width: the image tower's output width.
    embed_dim: projection size; None: no projections (equal tower widths).
    pooling: the text tower's "cls" or "mean".
    num_sizes: prefix sizes of the nesting (the length of a per-size scale).
    settings: `contrastive_settings(config)`.
    freeze: regexes over parameter paths; towers fully matched are `locked`.
    dtype: compute dtype of the projections.
  """

  def __init__(self, image: nnx.Module, text: bert.BertEncoder, *, image_width: int,
               embed_dim: int | None, pooling: str, num_sizes: int,
               settings: ContrastiveSettings, freeze: Sequence[str] = (),
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    text_width = text.width
    if embed_dim is None and image_width != text_width:
      raise ConfigError(f"config.model.embed_dim=None needs towers of one width but the image "
                        f"tower is {image_width} and the text tower {text_width} wide: set "
                        "config.model.embed_dim to project both.")
    self.image = image
    self.text = text
    self.pooling = pooling
    self.dtype = dtype
    self.settings = settings
    self.embed_dim = embed_dim or image_width
    if embed_dim is None:
      self.image_projection = self.text_projection = None
    else:
      def projection(width: int) -> nnx.Linear:
        # CLIP's initialisation of its projections: N(0, width^-1/2).
        return nnx.Linear(width, embed_dim, use_bias=False, dtype=dtype,
                          kernel_init=nnx.initializers.normal(stddev=width ** -0.5),
                          rngs=rngs)
      self.image_projection = projection(image_width)
      self.text_projection = projection(text_width)
    shape = (num_sizes,) if settings.per_size_scale else ()
    t = jnp.full(shape, math.log(settings.init_scale), jnp.float32)
    self.logit_scale = nnx.Param(t) if settings.learn_scale else FixedScalar(t)
    if settings.init_bias is not None:
      self.logit_bias = nnx.Param(jnp.full(shape, settings.init_bias, jnp.float32))
    else:
      self.logit_bias = None
    self.locked = tuple(
        name for name, module in (("image", image), ("text", text))
        if all(optim.is_frozen(p, freeze) for p in _tower_params(module, f"{name}/")))

  def embed_image(self, images: jax.Array, *, train: bool) -> jax.Array:
    """[B, H, W, C] -> the raw (unnormalised) image embedding [B, embed_dim] float32."""
    z = self.image(images, train=train and "image" not in self.locked)
    if self.image_projection is not None:
      z = self.image_projection(z.astype(self.dtype))
    return z.astype(jnp.float32)

  def embed_text(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, train: bool) -> jax.Array:
    """[B, L] token ids -> the raw text embedding [B, embed_dim] float32."""
    hidden = self.text(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                       train=train and "text" not in self.locked)
    z = bert.pool_hidden(hidden, attention_mask, self.pooling)
    if self.text_projection is not None:
      z = self.text_projection(z.astype(self.dtype))
    return z.astype(jnp.float32)

  def scale_and_bias(self) -> tuple[jax.Array, jax.Array | None]:
    """(exp(t) capped at max_scale, b or None); each [] or [num_sizes], float32."""
    t = self.logit_scale[...]
    if isinstance(self.logit_scale, FixedScalar):
      scale = jnp.minimum(jnp.exp(t), self.settings.max_scale)
    else:
      scale = _capped_exp(t, self.settings.max_scale)
    bias = None if self.logit_bias is None else self.logit_bias[...]
    return scale, bias


def build_dual_encoder(config: ml_collections.ConfigDict, nesting: Nesting, *, in_channels: int,
                       image_size: int | None, vocab_size: int, rngs: nnx.Rngs) -> DualEncoder:
  """The dual encoder of `config.model` (name="dual_encoder"), its scale per `nesting`."""
  d = dual_embedding_dim(config)  # checks the towers and the widths first
  if nesting.dims[-1] > d:
    raise ConfigError(f"config.nesting.dims go up to {nesting.dims[-1]} but the dual encoder "
                      f"embeds into {d} dims: drop the larger sizes or raise "
                      "config.model.embed_dim.")
  dtype = compute_dtype(config)
  image_cfg, text_cfg = _tower_config(config, "image"), _tower_config(config, "text")
  build_image, image_dim = _image_entry(image_cfg)
  image = build_image(image_cfg, in_channels, dtype, rngs, image_size=image_size)
  text = bert.BertEncoder(vocab_size=vocab_size, dropout=text_cfg.get("dropout", 0.1),
                          attention_dropout=text_cfg.get("attention_dropout", 0.1),
                          remat=text_cfg.get("remat", False), dtype=dtype, rngs=rngs,
                          **_text_fields(text_cfg))
  return DualEncoder(image, text, image_width=image_dim(image_cfg),
                     embed_dim=config.model.get("embed_dim", 768),
                     pooling=text_cfg.get("pooling", "cls"), num_sizes=len(nesting.dims),
                     settings=contrastive_settings(config),
                     freeze=optim.freeze_patterns(config), dtype=dtype, rngs=rngs)
