"""Vision Transformer encoders (ViT-Ti/S/B/L/H) in Flax NNX, without a classifier.

The architecture is the original ViT (Dosovitskiy et al., 2021): a conv patch
embedding (kernel = stride = patch), learned position embeddings, an optional
class token, pre-LN blocks (LayerNorm eps 1e-6 -> multi-head self-attention ->
residual; LayerNorm -> MLP with exact GELU -> residual), a final LayerNorm,
then the class token (pool="token") or the mean of the patch tokens
(pool="gap", no class token) as the representation, optionally followed by the
pre-training "pre_logits" layer (Linear + tanh). The nested MRL head that
scores it lives in `nested_head.py`.

Parameter layout (nnx.state paths, NHWC images, HWIO conv kernel):

    patch_embed/{kernel,bias}            [p, p, C, d], [d]
    cls_token                            [1, 1, d]        (pool="token" only)
    pos_embedding                        [1, (1 +) gh*gw, d]
    blocks/i/norm1/{scale,bias}          [d]
    blocks/i/attn/{q,k,v}_proj/kernel    [d, heads, head_dim]  (bias [heads, head_dim])
    blocks/i/attn/out_proj/kernel        [heads, head_dim, d]  (bias [d])
    blocks/i/norm2/{scale,bias}          [d]
    blocks/i/mlp/fc1/{kernel,bias}       [d, mlp], [mlp]
    blocks/i/mlp/fc2/{kernel,bias}       [mlp, d], [d]
    norm/{scale,bias}                    [d]
    pre_logits/{kernel,bias}             [d, r], [r]      (representation_size only)

The projections are not named query/key/value: `sharding.path_to_str` drops
every path entry called "value" (NNX's Variable suffix), which would leave the
value projection at "attn/kernel", out of reach of the rules. Keeping heads as
their own kernel dim is what lets `SHARDING_RULES` split
attention by heads (Megatron-style tensor parallelism) with a plain
PartitionSpec, without reshaping a fused [d, 3d] matrix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mrl_jax.errors import ConfigError

# name -> (width, depth, mlp_dim, num_heads), from the ViT and "How to train
# your ViT" papers.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
PATCH_SIZES = (8, 14, 16, 32)
# What a variant fixes; each may also be given explicitly to override it.
ARCH_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch")
POOLS = ("token", "gap")

# Megatron-style tensor parallelism over the "model" mesh axis, in the format
# of `config.sharding_rules` (regex searched in the parameter path, mesh axes
# for the *trailing* dims). Query/key/value are column-parallel (split by
# heads), the attention output is row-parallel (its input heads split), so one
# all-reduce closes each attention; fc1 is column-parallel over the MLP dim
# and fc2 row-parallel, one all-reduce per MLP. The output biases of out_proj
# and fc2 are added after that all-reduce, so no rule names them (replicated).
# `spec_for` searches (not matches) the patterns, so optimizer state, whose
# paths carry a prefix such as "1/0/mu/", is placed like its parameter.
# BERT's blocks use the same parameter names and the same rules (models/bert.py).
BLOCK_SHARDING_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)attn/[qkv]_proj/kernel", ("model", None)),
    (r"(^|/)attn/[qkv]_proj/bias", ("model", None)),
    (r"(^|/)attn/out_proj/kernel", ("model", None, None)),
    (r"(^|/)mlp/fc1/kernel", (None, "model")),
    (r"(^|/)mlp/fc1/bias", ("model",)),
    (r"(^|/)mlp/fc2/kernel", ("model", None)),
)
SHARDING_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = BLOCK_SHARDING_RULES + (
    # The nested head: classes over "model", never the embedding dim that the
    # nested prefixes slice.
    (r"(^|/)head/", ("model",)),
)

# Initializers of the reference implementation (google-research/vision_transformer):
# Xavier-uniform dense kernels with near-zero (not zero) biases, LeCun-normal
# patch and pre-logits kernels, zero class token, N(0, 0.02) position embeddings.
_DENSE_INIT = nnx.initializers.xavier_uniform()
_DENSE_BIAS_INIT = nnx.initializers.normal(stddev=1e-6)
_POSEMB_INIT = nnx.initializers.normal(stddev=0.02)
_LECUN_INIT = nnx.initializers.lecun_normal()

_VARIANT_RE = re.compile(r"^(Ti|S|B|L|H)/(\d+)$")


def _variant_choices() -> str:
  return (f"'<size>/<patch>' with size in {list(VARIANTS)} and patch in {list(PATCH_SIZES)} "
          "(e.g. 'B/16')")


def parse_variant(variant: str) -> dict[str, int]:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch=16)."""
  match = _VARIANT_RE.match(variant) if isinstance(variant, str) else None
  if match is None or int(match.group(2)) not in PATCH_SIZES:
    raise ConfigError(f"ViT variant {variant!r} is unknown: use {_variant_choices()}.")
  width, depth, mlp_dim, num_heads = VARIANTS[match.group(1)]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch=int(match.group(2)))


def architecture(variant: str | None, **overrides: int | None) -> dict[str, int]:
  """The variant's `ARCH_FIELDS`, with any non-None override replacing its value.

  Without a variant every field must be given (e.g. tiny test models).
  """
  arch = parse_variant(variant) if variant is not None else {}
  unknown = set(overrides) - set(ARCH_FIELDS)
  if unknown:
    raise TypeError(f"Unknown ViT architecture fields {sorted(unknown)}.")
  arch.update({k: v for k, v in overrides.items() if v is not None})
  missing = [k for k in ARCH_FIELDS if k not in arch]
  if missing:
    raise ConfigError(f"ViT needs a variant ({_variant_choices()}) or all of {missing}.")
  return arch


def vit_embedding_dim(variant: str | None, representation_size: int | None = None,
                      **overrides: int | None) -> int:
  """Size of the representation: `representation_size` if set, else the width."""
  width = architecture(variant, **overrides)["width"]  # checks the variant either way
  return representation_size or width


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, (tuple, list)):
    h, w = size
    return int(h), int(w)
  return int(size), int(size)


def resize_posemb_grid(grid: jax.Array, new_hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of a [h, w, d] position-embedding grid to `new_hw`.

  Half-pixel centres (torch's `interpolate(mode="bilinear", align_corners=False)`
  when upsampling); downsampling is antialiased so no position is skipped.
  The resize runs in float32: bf16 interpolation weights would add noise.
  """
  if tuple(grid.shape[:2]) == tuple(new_hw):
    return grid
  out = jax.image.resize(grid.astype(jnp.float32), (*new_hw, grid.shape[-1]),
                         method="bilinear")
  return out.astype(grid.dtype)


def resize_pos_embedding(pos: jax.Array, num_tokens: int) -> jax.Array:
  """A [1, n, d] position embedding (square grid, maybe a class-token row) resized to
  `num_tokens` rows: how pre-trained ViTs are fine-tuned at another resolution."""
  n, d = pos.shape[1], pos.shape[2]
  if n == num_tokens:
    return pos
  n_cls = n - math.isqrt(n) ** 2  # 1 with a class token: n = 1 + g*g
  side, new_side = math.isqrt(n - n_cls), math.isqrt(num_tokens - n_cls)
  if side * side != n - n_cls or new_side * new_side != num_tokens - n_cls or n_cls > 1:
    raise ValueError(f"Cannot resize a position embedding of {n} tokens to {num_tokens}: "
                     "both must be a square grid (plus the same class-token row).")
  grid = resize_posemb_grid(pos[0, n_cls:].reshape(side, side, d), (new_side, new_side))
  return jnp.concatenate([pos[:, :n_cls], grid.reshape(1, -1, d)], axis=1)


class Attention(nnx.Module):
  """Multi-head self-attention with per-head kernels [d, heads, head_dim]."""

  def __init__(self, width: int, num_heads: int, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    if width % num_heads:
      raise ConfigError(f"ViT width {width} is not divisible by num_heads {num_heads}.")
    head_dim = width // num_heads
    kw = dict(kernel_init=_DENSE_INIT, bias_init=_DENSE_BIAS_INIT, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
    self.q_proj = nnx.LinearGeneral(width, (num_heads, head_dim), **kw)
    self.k_proj = nnx.LinearGeneral(width, (num_heads, head_dim), **kw)
    self.v_proj = nnx.LinearGeneral(width, (num_heads, head_dim), **kw)
    self.out_proj = nnx.LinearGeneral((num_heads, head_dim), width, axis=(-2, -1), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    # [B, T, heads, head_dim] is dot_product_attention's layout; its XLA path
    # takes the softmax in float32 even for bf16 inputs, and on GPU the same
    # call can be routed to a fused kernel.
    y = jax.nn.dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x))
    return self.out_proj(y)


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> dropout -> fc2 -> dropout."""

  def __init__(self, width: int, mlp_dim: int, *, dropout: nnx.Dropout, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(kernel_init=_DENSE_INIT, bias_init=_DENSE_BIAS_INIT, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_dim, **kw)
    self.fc2 = nnx.Linear(mlp_dim, width, **kw)
    self.dropout = dropout

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    # approximate=False: the original ViT and torch's nn.GELU() use erf.
    x = self.dropout(nnx.gelu(self.fc1(x), approximate=False), deterministic=not train)
    return self.dropout(self.fc2(x), deterministic=not train)


def _layer_norm(width: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance (not E[x^2] - E[x]^2): transformer activations have large
  # means, where the one-pass formula cancels digits.
  return nnx.LayerNorm(width, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  # Without dropout no RNG stream is stored, so the model state holds nothing
  # beyond parameters.
  return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


class Block(nnx.Module):
  """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, width: int, mlp_dim: int, num_heads: int, *, dropout: float = 0.0,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(width, dtype, param_dtype, rngs)
    self.attn = Attention(width, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = _layer_norm(width, dtype, param_dtype, rngs)
    self.dropout = _dropout(dropout, rngs)
    self.mlp = Mlp(width, mlp_dim, dropout=self.dropout, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x + self.dropout(self.attn(self.norm1(x)), deterministic=not train)
    return x + self.mlp(self.norm2(x), train=train)


def _block_forward(block: Block, x: jax.Array, train: bool) -> jax.Array:
  return block(x, train=train)


# Rematerialised variant: only each block's input is kept for the backward
# pass; its internals (attention probabilities, the 4x-wide MLP activations)
# are recomputed. `train` is static: it picks the dropout branch.
_block_forward_remat = nnx.remat(_block_forward, static_argnums=(2,))


class ViT(nnx.Module):
  """ViT encoder: [B, H, W, C] images -> [B, embedding_dim] float32 features.

  Args:
    variant: e.g. "B/16" (see `VARIANTS`, `PATCH_SIZES`); fills width, depth,
      mlp_dim, num_heads and patch. Any of those given explicitly overrides it;
      without a variant all five are required (tiny test models).
    image_size: side (or (H, W)) the position-embedding grid is built for.
      Other resolutions are served by resizing the grid at call time.
    in_channels: channels of the input images.
    pool: "token" (class token) or "gap" (mean of patch tokens, no class token).
    representation_size: if set, a Linear(width, r) + tanh "pre_logits" layer
      on the pooled vector, and the embedding size becomes r.
    dropout: rate after the embeddings, the attention output and in the MLP.
    remat: recompute each block's activations in the backward pass (saves
      memory; same outputs and gradients).
    dtype: compute dtype (e.g. bfloat16); params stay in `param_dtype` and the
      output is always float32.
  """

  def __init__(self, variant: str | None = None, *, width: int | None = None,
               depth: int | None = None, mlp_dim: int | None = None,
               num_heads: int | None = None, patch: int | None = None,
               image_size: int | Sequence[int] = 224, in_channels: int = 3,
               pool: str = "token", representation_size: int | None = None,
               dropout: float = 0.0, remat: bool = False, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    arch = architecture(variant, width=width, depth=depth, mlp_dim=mlp_dim,
                        num_heads=num_heads, patch=patch)
    if pool not in POOLS:
      raise ConfigError(f"ViT pool={pool!r} is unknown: use one of {POOLS}.")
    if not 0.0 <= dropout < 1.0:
      raise ConfigError(f"ViT dropout={dropout!r} must be in [0, 1).")
    self.width, self.depth = arch["width"], arch["depth"]
    self.mlp_dim, self.num_heads, self.patch = arch["mlp_dim"], arch["num_heads"], arch["patch"]
    self.image_size = _pair(image_size)
    self.grid = (self.image_size[0] // self.patch, self.image_size[1] // self.patch)
    if min(self.grid) < 1:
      raise ConfigError(f"ViT image_size {self.image_size} is smaller than the patch "
                        f"{self.patch}.")
    self.pool = pool
    self.remat = remat
    self.dtype = dtype
    self.embedding_dim = representation_size or self.width
    d = self.width

    self.patch_embed = nnx.Conv(in_channels, d, (self.patch, self.patch),
                                strides=(self.patch, self.patch), padding="VALID",
                                kernel_init=_LECUN_INIT, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
    if pool == "token":
      self.cls_token = nnx.Param(jnp.zeros((1, 1, d), param_dtype))
    else:
      self.cls_token = None
    num_tokens = self.grid[0] * self.grid[1] + (pool == "token")
    self.pos_embedding = nnx.Param(_POSEMB_INIT(rngs.params(), (1, num_tokens, d), param_dtype))
    self.dropout = _dropout(dropout, rngs)
    self.blocks = nnx.List([
        Block(d, self.mlp_dim, self.num_heads, dropout=dropout, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs) for _ in range(self.depth)])
    self.norm = _layer_norm(d, dtype, param_dtype, rngs)
    if representation_size:
      self.pre_logits = nnx.Linear(d, representation_size, kernel_init=_LECUN_INIT,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    else:
      self.pre_logits = None

  def position_embeddings(self, grid_hw: tuple[int, int]) -> jax.Array:
    """[1, tokens, d] for a gh x gw patch grid (the class token's row kept as is)."""
    pos = self.pos_embedding[...]
    n_cls = 1 if self.cls_token is not None else 0
    cls_pos, grid = pos[:, :n_cls], pos[0, n_cls:].reshape(*self.grid, self.width)
    grid = resize_posemb_grid(grid, grid_hw).reshape(1, -1, self.width)
    return jnp.concatenate([cls_pos, grid], axis=1)

  def tokens(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Images -> the final-LayerNorm'd token sequence [B, (1 +) gh*gw, d]."""
    x = self.patch_embed(x.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.position_embeddings((gh, gw)).astype(x.dtype)
    x = self.dropout(x, deterministic=not train)
    forward = _block_forward_remat if self.remat else _block_forward
    for block in self.blocks:
      x = forward(block, x, train)
    return self.norm(x)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B, H, W, C] -> [B, embedding_dim] float32."""
    x = self.tokens(x, train=train)
    if self.pool == "token":
      z = x[:, 0]
    else:
      # Mean in float32: bf16 sums over hundreds of tokens lose digits.
      z = jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
    if self.pre_logits is not None:
      z = jnp.tanh(self.pre_logits(z))
    return z.astype(jnp.float32)
