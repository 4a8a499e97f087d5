"""BERT encoders (tiny ... large) in Flax NNX, and BERT with the nested tied MLM head.

The architecture is the original BERT (Devlin et al., 2019), as Hugging Face's
`BertModel` computes it: word + learned position + token-type embeddings,
summed -> LayerNorm (eps 1e-12) -> dropout; post-LN blocks (self-attention ->
dropout -> residual -> LayerNorm; Dense -> exact erf GELU -> Dense -> dropout
-> residual -> LayerNorm), dropout on the attention probabilities, and a key
padding mask from `attention_mask` (1 = real token; masked keys get zero
attention weight, as HF's additive large-negative mask gives). Initialisation:
N(0, 0.02) kernels and embeddings, zero biases, LayerNorm ones/zeros. The
encoder returns the final hidden states; `nested_mlm_head.py` holds the
masked-LM head whose decoder is tied to `word_embedding()`.

Parameter layout (nnx.state paths of `BertMLM`; the encoder's own paths drop
the `encoder/` prefix):

    encoder/embeddings/word/embedding         [V, d]
    encoder/embeddings/position/embedding     [max_len, d]
    encoder/embeddings/token_type/embedding   [type_vocab_size, d]
    encoder/embeddings/norm/{scale,bias}      [d]
    encoder/blocks/i/attn/{q,k,v}_proj/kernel [d, heads, head_dim]  (bias [heads, head_dim])
    encoder/blocks/i/attn/out_proj/kernel     [heads, head_dim, d]  (bias [d])
    encoder/blocks/i/attn_norm/{scale,bias}   [d]
    encoder/blocks/i/mlp/fc1/{kernel,bias}    [d, mlp], [mlp]
    encoder/blocks/i/mlp/fc2/{kernel,bias}    [mlp, d], [d]
    encoder/blocks/i/mlp_norm/{scale,bias}    [d]
    head/transform/dense/{kernel,bias}        [d, d], [d]
    head/transform/norm/{scale,bias}          [d]
    head/bias                                 [V]

As in `vit.py`, the projections are not named query/key/value
(`sharding.path_to_str` drops path entries called "value") and keep heads as
their own kernel dim, so `SHARDING_RULES` splits attention by heads with a
plain PartitionSpec.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.models import vit
from mrl_jax.models.nested_head import HEAD_KINDS
from mrl_jax.models.nested_mlm_head import NestedMLMHead, bert_layer_norm
from mrl_jax.nesting import Nesting

# name -> (width, depth, num_heads, mlp_dim): BERT-Base/Large and the
# compact models of Turc et al. (2019), "Well-Read Students Learn Better".
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 2, 2, 512),
    "mini": (256, 4, 4, 1024),
    "small": (512, 4, 8, 2048),
    "medium": (512, 8, 8, 2048),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}
# What a variant fixes (max_len and type_vocab_size are 512 and 2 for all of
# them); each may also be given explicitly to override it.
ARCH_FIELDS = ("width", "depth", "num_heads", "mlp_dim", "max_len", "type_vocab_size")
_DEFAULTS = dict(max_len=512, type_vocab_size=2)
POOLINGS = ("cls", "mean")

# Megatron-style tensor parallelism over the "model" mesh axis (the format of
# `config.sharding_rules`, see vit.SHARDING_RULES for the reasoning): q/k/v
# column-parallel by heads, out_proj row-parallel, fc1 column- and fc2
# row-parallel, one all-reduce per attention and per MLP. The word embedding
# is vocab-parallel (its rows over "model", Megatron's VocabParallelEmbedding),
# which also splits the tied decoder's logits and its bias by vocabulary, the
# layout a vocab-parallel cross-entropy wants. Never the hidden dim d of the
# embedding or of the MLM transform: the nested prefixes slice it. Dims no
# rule names are FSDP-sharded by `sharding.spec_for`.
SHARDING_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = vit.BLOCK_SHARDING_RULES + (
    (r"(^|/)embeddings/word/embedding", ("model", None)),
    (r"(^|/)head/bias", ("model",)),
)

_INIT = nnx.initializers.normal(stddev=0.02)
_ZEROS = nnx.initializers.zeros


def architecture(variant: str | None, **overrides: int | None) -> dict[str, int]:
  """The variant's `ARCH_FIELDS`, with any non-None override replacing its value.

  Without a variant width, depth, num_heads and mlp_dim must all be given.
  """
  unknown = set(overrides) - set(ARCH_FIELDS)
  if unknown:
    raise TypeError(f"Unknown BERT architecture fields {sorted(unknown)}: use {ARCH_FIELDS}.")
  arch: dict[str, int] = dict(_DEFAULTS)
  if variant is not None:
    if variant not in VARIANTS:
      raise ConfigError(f"config.model.variant={variant!r} is not a BERT variant: use one "
                        f"of {list(VARIANTS)}.")
    arch.update(zip(("width", "depth", "num_heads", "mlp_dim"), VARIANTS[variant]))
  arch.update({k: int(v) for k, v in overrides.items() if v is not None})
  missing = [k for k in ARCH_FIELDS if k not in arch]
  if missing:
    raise ConfigError(f"BERT needs config.model.variant (one of {list(VARIANTS)}) or all of "
                      f"{missing}.")
  bad = [k for k in ARCH_FIELDS if arch[k] < 1]
  if bad:
    raise ConfigError(f"config.model.{bad[0]}={arch[bad[0]]} must be a positive integer.")
  if arch["width"] % arch["num_heads"]:
    raise ConfigError(f"config.model.width={arch['width']} is not divisible by "
                      f"num_heads={arch['num_heads']}: pick a width that is.")
  return arch


def bert_embedding_dim(variant: str | None = "base", **overrides: int | None) -> int:
  """The hidden width d (the size of the nested embedding), without building anything."""
  return architecture(variant, **overrides)["width"]


def model_overrides(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """config.model's set `ARCH_FIELDS` (None means: the variant's value)."""
  return {k: cfg[k] for k in ARCH_FIELDS if cfg.get(k) is not None}


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  # Without dropout no RNG stream is stored: the model state holds only parameters.
  return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


class Embeddings(nnx.Module):
  """word + position + token-type embeddings -> LayerNorm -> dropout."""

  def __init__(self, vocab_size: int, width: int, max_len: int, type_vocab_size: int, *,
               dropout: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(embedding_init=_INIT, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.word = nnx.Embed(vocab_size, width, **kw)
    self.position = nnx.Embed(max_len, width, **kw)
    self.token_type = nnx.Embed(type_vocab_size, width, **kw)
    self.norm = bert_layer_norm(width, dtype, param_dtype, rngs)
    self.dropout = _dropout(dropout, rngs)
    self.max_len = max_len

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, *,
               train: bool) -> jax.Array:
    length = input_ids.shape[1]
    if length > self.max_len:
      raise ConfigError(f"Sequences of {length} tokens are longer than the model's "
                        f"{self.max_len} position embeddings: lower config.data.seq_len or "
                        "raise config.model.max_len.")
    x = (self.word(input_ids) + self.position(jnp.arange(length))[None]
         + self.token_type(token_type_ids))
    return self.dropout(self.norm(x), deterministic=not train)


class Attention(nnx.Module):
  """Multi-head self-attention, per-head kernels [d, heads, head_dim], a key padding mask."""

  def __init__(self, width: int, num_heads: int, *, attention_dropout: float, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    head_dim = width // num_heads
    kw = dict(kernel_init=_INIT, bias_init=_ZEROS, dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.q_proj = nnx.LinearGeneral(width, (num_heads, head_dim), **kw)
    self.k_proj = nnx.LinearGeneral(width, (num_heads, head_dim), **kw)
    self.v_proj = nnx.LinearGeneral(width, (num_heads, head_dim), **kw)
    self.out_proj = nnx.LinearGeneral((num_heads, head_dim), width, axis=(-2, -1), **kw)
    self.attention_dropout = _dropout(attention_dropout, rngs)

  def __call__(self, x: jax.Array, key_mask: jax.Array, *, train: bool) -> jax.Array:
    """x [B, L, d]; key_mask [B, 1, 1, L] bool (True = real token)."""
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if train and self.attention_dropout.rate > 0:
      # Dropout on the probabilities needs them explicitly; the same math as
      # dot_product_attention's XLA path (float32 logits and softmax).
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
      logits = logits / math.sqrt(q.shape[-1])
      logits = jnp.where(key_mask, logits, jnp.finfo(jnp.float32).min)
      probs = self.attention_dropout(jax.nn.softmax(logits, axis=-1), deterministic=False)
      y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    else:
      y = jax.nn.dot_product_attention(q, k, v, mask=key_mask)
    return self.out_proj(y)


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2 (BERT's intermediate and output dense layers)."""

  def __init__(self, width: int, mlp_dim: int, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    kw = dict(kernel_init=_INIT, bias_init=_ZEROS, dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_dim, **kw)
    self.fc2 = nnx.Linear(mlp_dim, width, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Post-LN block: x = LN(x + drop(attn(x))), then x = LN(x + drop(mlp(x)))."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dropout: float,
               attention_dropout: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.attn = Attention(width, num_heads, attention_dropout=attention_dropout, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = bert_layer_norm(width, dtype, param_dtype, rngs)
    self.mlp = Mlp(width, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = bert_layer_norm(width, dtype, param_dtype, rngs)
    self.dropout = _dropout(dropout, rngs)

  def __call__(self, x: jax.Array, key_mask: jax.Array, *, train: bool) -> jax.Array:
    x = self.attn_norm(x + self.dropout(self.attn(x, key_mask, train=train),
                                        deterministic=not train))
    return self.mlp_norm(x + self.dropout(self.mlp(x), deterministic=not train))


def _block_forward(block: Block, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
  return block(x, key_mask, train=train)


# Only each block's input is kept for the backward pass; attention
# probabilities and the 4x-wide MLP activations are recomputed. `train` is
# static: it picks the dropout branches.
_block_forward_remat = nnx.remat(_block_forward, static_argnums=(3,))


class BertEncoder(nnx.Module):
  """Token ids [B, L] -> final hidden states [B, L, width] (in the compute dtype).

  Args:
    variant: one of `VARIANTS` (fills width, depth, num_heads, mlp_dim); None
      needs those four as overrides.
    vocab_size: rows of the word embedding (and logits of the tied decoder).
    dropout: rate after the embeddings, the attention output and the MLP.
    attention_dropout: rate on the attention probabilities.
    remat: recompute each block's activations in the backward pass (saves
      memory; same outputs and gradients).
    dtype: compute dtype (e.g. bfloat16); params stay in `param_dtype`.
    **overrides: any of `ARCH_FIELDS` (width, depth, num_heads, mlp_dim,
      max_len, type_vocab_size) over the variant's value.
  """

  def __init__(self, variant: str | None = "base", *, vocab_size: int, dropout: float = 0.1,
               attention_dropout: float = 0.1, remat: bool = False, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **overrides: int | None):
    arch = architecture(variant, **overrides)
    for name, rate in (("dropout", dropout), ("attention_dropout", attention_dropout)):
      if not 0.0 <= rate < 1.0:
        raise ConfigError(f"config.model.{name}={rate!r} must be in [0, 1).")
    if vocab_size < 1:
      raise ConfigError(f"BERT vocab_size={vocab_size} must be positive.")
    self.width, self.depth = arch["width"], arch["depth"]
    self.num_heads, self.mlp_dim = arch["num_heads"], arch["mlp_dim"]
    self.max_len, self.type_vocab_size = arch["max_len"], arch["type_vocab_size"]
    self.vocab_size = vocab_size
    self.remat, self.dtype = remat, dtype
    self.embeddings = Embeddings(vocab_size, self.width, self.max_len, self.type_vocab_size,
                                 dropout=dropout, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    self.blocks = nnx.List([
        Block(self.width, self.num_heads, self.mlp_dim, dropout=dropout,
              attention_dropout=attention_dropout, dtype=dtype, param_dtype=param_dtype,
              rngs=rngs) for _ in range(self.depth)])

  def word_embedding(self) -> jax.Array:
    """The word-embedding matrix E [vocab, width] (the tied decoder's weight)."""
    return self.embeddings.word.embedding[...]

  def __call__(self, input_ids: jax.Array, *, token_type_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None, train: bool) -> jax.Array:
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    key_mask = (attention_mask != 0)[:, None, None, :]
    x = self.embeddings(input_ids, token_type_ids, train=train)
    forward = _block_forward_remat if self.remat else _block_forward
    for block in self.blocks:
      x = forward(block, x, key_mask, train)
    return x


def pool_hidden(hidden: jax.Array, attention_mask: jax.Array | None, pooling: str) -> jax.Array:
  """[B, L, d] -> [B, d] float32: the [CLS] (first) token, or the mean over real tokens."""
  if pooling == "cls":
    return hidden[:, 0].astype(jnp.float32)
  if pooling == "mean":
    # In float32: bf16 sums over hundreds of tokens lose digits.
    hidden = hidden.astype(jnp.float32)
    if attention_mask is None:
      return jnp.mean(hidden, axis=1)
    mask = (attention_mask != 0).astype(jnp.float32)[..., None]
    return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  raise ConfigError(f"pooling={pooling!r} is unknown: use one of {POOLINGS}.")


class BertMLM(nnx.Module):
  """BERT with the nested tied MLM head; paths start with `encoder/` or `head/`."""

  def __init__(self, encoder: BertEncoder, head: NestedMLMHead):
    if head.vocab_size != encoder.vocab_size or head.width != encoder.width:
      raise ValueError(f"The MLM head ({head.width} wide, {head.vocab_size} tokens) does not "
                       f"fit the encoder ({encoder.width} wide, {encoder.vocab_size} tokens).")
    self.encoder = encoder
    self.head = head

  def __call__(self, input_ids: jax.Array, *, masked_positions: jax.Array,
               token_type_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None, train: bool,
               dims: Sequence[int] | None = None) -> jax.Array:
    """Nested logits [num_sizes, B, P, V] at `masked_positions` [B, P] only.

    The hidden states are gathered before the head, so only the P scored
    tokens per row meet the [V, d] decoder. `dims` (default: the head's
    nesting) scores other prefix sizes, e.g. a plain model truncated.
    """
    hidden = self.encoder(input_ids, token_type_ids=token_type_ids,
                          attention_mask=attention_mask, train=train)
    picked = jnp.take_along_axis(hidden, masked_positions[..., None].astype(jnp.int32), axis=1)
    return self.head(picked, self.encoder.word_embedding(), dims)

  def mlm_sums(self, input_ids: jax.Array, *, masked_positions: jax.Array,
               masked_ids: jax.Array, masked_weights: jax.Array,
               token_type_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None, train: bool,
               dims: Sequence[int] | None = None) -> dict[str, jax.Array]:
    """`tasks.mlm.masked_lm_sums` of `__call__`'s logits, decoder and loss fused.

    {"loss_sum" [n], "correct" [n], "count" []} over the [B, P] predictions;
    the [n, B, P, V] logits are never stored (`NestedMLMHead.masked_lm_sums`).
    """
    hidden = self.encoder(input_ids, token_type_ids=token_type_ids,
                          attention_mask=attention_mask, train=train)
    picked = jnp.take_along_axis(hidden, masked_positions[..., None].astype(jnp.int32), axis=1)
    return self.head.masked_lm_sums(picked, self.encoder.word_embedding(), masked_ids,
                                    masked_weights, dims)

  def all_logits(self, input_ids: jax.Array, *, token_type_ids: jax.Array | None = None,
                 attention_mask: jax.Array | None = None) -> jax.Array:
    """Nested logits [num_sizes, B, L, V] for every token (inference, train=False)."""
    hidden = self.encoder(input_ids, token_type_ids=token_type_ids,
                          attention_mask=attention_mask, train=False)
    return self.head(hidden, self.encoder.word_embedding())

  def embed(self, input_ids: jax.Array, *, token_type_ids: jax.Array | None = None,
            attention_mask: jax.Array | None = None, pooling: str = "cls",
            train: bool = False) -> jax.Array:
    """The nested sentence embedding z = transform(pool(hidden)) [B, d] float32.

    Its prefixes z[:, :m] are the vectors the nested decoder scores; truncate
    and unit-normalise them to use size m. With pooling="cls" z is the
    transformed [CLS] token.
    """
    if pooling not in POOLINGS:
      raise ConfigError(f"pooling={pooling!r} is unknown: use one of {POOLINGS}.")
    hidden = self.encoder(input_ids, token_type_ids=token_type_ids,
                          attention_mask=attention_mask, train=train)
    pooled = pool_hidden(hidden, attention_mask, pooling)
    return self.head.transform(pooled.astype(self.head.dtype)).astype(jnp.float32)


def build_bert_mlm(model_cfg: ml_collections.ConfigDict, nesting: Nesting, *, vocab_size: int,
                   head: str, dtype: Any, rngs: nnx.Rngs) -> BertMLM:
  """BERT from `config.model` (name="bert") with the nested MLM head over `nesting.dims`.

  `head` is config.head: for the tied decoder "mrl" and "mrl_e" build the same
  head (one tied matrix E, sliced per size; there are no per-size decoders to
  keep apart), and "ff" is that head with the caller's single size (k,).
  """
  if head not in HEAD_KINDS:
    raise ConfigError(f"config.head={head!r} is unknown: use one of {HEAD_KINDS}.")
  encoder = BertEncoder(model_cfg.get("variant", "base"), vocab_size=vocab_size,
                        dropout=model_cfg.get("dropout", 0.1),
                        attention_dropout=model_cfg.get("attention_dropout", 0.1),
                        remat=model_cfg.get("remat", False), dtype=dtype, rngs=rngs,
                        **model_overrides(model_cfg))
  return BertMLM(encoder, NestedMLMHead(encoder.width, vocab_size, nesting.dims, dtype=dtype,
                                        rngs=rngs))
