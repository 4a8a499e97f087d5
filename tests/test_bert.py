"""BERT encoder and the nested tied MLM head: naive references, masks, remat, shapes, sharding.

(The forward pass against Hugging Face's PyTorch BERT is in test_hf_bert.py.)
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import subprocess_env
from float32_tolerance import float32_atol
from mrl_jax import sharding
from mrl_jax.errors import ConfigError
from mrl_jax.models import bert
from mrl_jax.models.bert import SHARDING_RULES, BertEncoder, BertMLM, build_bert_mlm
from mrl_jax.models.nested_mlm_head import NestedMLMHead, naive_nested_mlm_logits
from mrl_jax.nesting import Nesting

VOCAB = 50
TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, max_len=16)
DIMS = (4, 8, 16, 32)


def _random_params(model: nnx.Module, seed: int) -> nnx.Module:
  """Every parameter of an abstract model drawn N(0, 0.3) by numpy (instant, unlike
  eager init on CPU); dropout streams get fixed keys, so equal seeds give equal masks.
  Random LN scales/biases make every parameter matter."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), params)
  leaves, treedef = jax.tree.flatten(rest)
  # "rbg" keys: XLA's RngBitGenerator compiles in a fraction of threefry's time on CPU.
  rest = treedef.unflatten([
      jax.random.key(seed + i, impl="rbg") if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
      else jnp.zeros(a.shape, a.dtype) for i, a in enumerate(leaves)])
  return nnx.merge(graphdef, params, rest)


def _tiny_mlm(seed: int = 0, dims=DIMS, **kw) -> BertMLM:
  args = {**TINY, "dropout": 0.0, "attention_dropout": 0.0, **kw}

  def build():
    encoder = BertEncoder(None, vocab_size=VOCAB, rngs=nnx.Rngs(0), **args)
    return BertMLM(encoder, NestedMLMHead(encoder.width, VOCAB, dims, rngs=nnx.Rngs(1)))
  return _random_params(nnx.eval_shape(build), seed)


def _ids(shape, seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


# ---------------------------------------------------------------- the nested decoder

def _decode_inputs(seed=0, tokens=(3, 5), d=32):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(*tokens, d)).astype(np.float32)
  e = rng.normal(0, 0.3, size=(VOCAB, d)).astype(np.float32)
  b = rng.normal(size=(VOCAB,)).astype(np.float32)
  return h, e, b


def _head(dims, d=32, bias=None) -> NestedMLMHead:
  head = nnx.eval_shape(lambda: NestedMLMHead(d, VOCAB, dims, rngs=nnx.Rngs(0)))
  head.bias = nnx.Param(jnp.asarray(bias if bias is not None else np.zeros(VOCAB, np.float32)))
  return head


@pytest.mark.parametrize("dims", [DIMS, (32,), (3, 10, 32), (8, 20)])  # (8, 20): ff-style k < d
def test_nested_logits_equal_a_per_size_loop_in_float64(dims):
  h, e, b = _decode_inputs()
  got = np.asarray(jax.jit(_head(dims, bias=b).decode)(h, e))
  want = np.stack([h[..., :m].astype(np.float64) @ e[:, :m].T.astype(np.float64) + b
                   for m in dims])
  assert got.shape == (len(dims), 3, 5, VOCAB)
  # Each logit is a sum of at most d products plus the running sums over chunks.
  atol = float32_atol(np.abs(want).max(), fan_in=32, depth=len(dims))
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)
  # The module's own naive reference (the benchmark's baseline) agrees too.
  naive = np.asarray(naive_nested_mlm_logits(h, e, b, dims))
  np.testing.assert_allclose(naive, want, rtol=0, atol=atol)


def test_a_plain_head_truncated_to_other_sizes_equals_the_per_size_loop():
  # The truncated-FF baseline: an FF head over all 32 dims scores prefixes it was not built for.
  h, e, b = _decode_inputs(seed=1)
  dims = (3, 8, 20, 32)
  got = np.asarray(jax.jit(lambda h, e: _head((32,), bias=b).decode(h, e, dims))(h, e))
  want = np.stack([h[..., :m].astype(np.float64) @ e[:, :m].T.astype(np.float64) + b
                   for m in dims])
  atol = float32_atol(np.abs(want).max(), fan_in=32, depth=len(dims))
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)
  with pytest.raises(ValueError, match="width"):
    _head((32,)).decode(h, e, (8, 64))


def test_nested_gradients_equal_the_per_size_loop():
  dims = (4, 8, 16, 32)
  h, e, b = _decode_inputs(seed=2)
  graphdef, state = nnx.split(_head(dims))
  weights = np.random.default_rng(3).normal(size=(len(dims), 3, 5, VOCAB)).astype(np.float32)

  def loss_nested(h, e, b):
    head = nnx.merge(graphdef, state, copy=True)
    head.bias[...] = b
    return jnp.sum(weights * jnp.sin(head.decode(h, e)))

  def loss_naive(h, e, b):
    return jnp.sum(weights * jnp.sin(naive_nested_mlm_logits(h, e, b, dims)))

  with jax.default_matmul_precision("highest"):
    got = jax.grad(loss_nested, argnums=(0, 1, 2))(h, e, b)
    want = jax.grad(loss_naive, argnums=(0, 1, 2))(h, e, b)
  for g, w, fan_in in zip(got, want, (VOCAB * len(dims), 15 * len(dims), 15 * len(dims))):
    assert g.shape == w.shape
    # Both in float32: the forward dot (fan-in d) and the backward sum over
    # vocab / tokens and sizes, each off by the float32 bound.
    atol = float32_atol(np.abs(np.asarray(w)).max(), fan_in=max(fan_in, 32), depth=2)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=atol)


def test_gathered_logits_equal_all_logits_then_gathered():
  model = _tiny_mlm()
  ids = _ids((3, 12))
  positions = jnp.asarray([[0, 5, 11], [3, 3, 7], [10, 1, 2]], jnp.int32)
  mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [9], [11]]), jnp.int32)
  types = jnp.asarray(np.arange(12)[None] >= np.array([[6], [4], [12]]), jnp.int32)
  kw = dict(token_type_ids=types, attention_mask=mask)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(nnx.jit(lambda m: m(ids, masked_positions=positions, train=False, **kw))(
        model))
    every = np.asarray(nnx.jit(lambda m: m.all_logits(ids, **kw))(model))
  want = np.take_along_axis(every, np.asarray(positions)[None, :, :, None], axis=2)
  assert got.shape == (len(DIMS), 3, 3, VOCAB) and every.shape == (len(DIMS), 3, 12, VOCAB)
  # The same per-token computation; only XLA's blocking of the matmuls may differ.
  atol = float32_atol(np.abs(want).max(), fan_in=TINY["mlp_dim"], depth=8 * TINY["depth"] + 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)


# ---------------------------------------------------------------- the encoder

@nnx.jit(static_argnames="train")
def _hidden(encoder, ids, types, mask, train=False):
  return encoder(ids, token_type_ids=types, attention_mask=mask, train=train)


def test_padded_tokens_do_not_change_real_tokens():
  model = _tiny_mlm()
  real = 7
  ids = np.asarray(_ids((2, 12)))
  types = np.zeros_like(ids)
  types[:, 4:] = 1
  mask = (np.arange(12) < real)[None].repeat(2, 0).astype(np.int32)
  with jax.default_matmul_precision("highest"):
    padded = np.asarray(_hidden(model.encoder, ids, types, mask))
    other_pads = ids.copy()
    other_pads[:, real:] = (ids[:, real:] + 1) % VOCAB
    types2 = types.copy()
    types2[:, real:] = 0
    repadded = np.asarray(_hidden(model.encoder, other_pads, types2, mask))
    short = np.asarray(_hidden(model.encoder, ids[:, :real], types[:, :real], mask[:, :real]))
    unmasked = np.asarray(_hidden(model.encoder, ids, types, np.ones_like(mask)))
  atol = float32_atol(np.abs(short).max(), fan_in=TINY["mlp_dim"], depth=8 * TINY["depth"])
  np.testing.assert_allclose(padded[:, :real], short, rtol=0, atol=atol)
  np.testing.assert_allclose(repadded[:, :real], short, rtol=0, atol=atol)
  # Without the mask the padding would have been attended to.
  assert np.abs(unmasked[:, :real] - short).max() > 100 * atol
  # No mask given means every token is real.
  with jax.default_matmul_precision("highest"):
    default = np.asarray(_hidden(model.encoder, ids, types, None))
  np.testing.assert_allclose(default, unmasked, rtol=0, atol=atol)


def _loss_and_grads(model: BertMLM, ids, positions):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits = nnx.merge(graphdef, params, rest, copy=True)(ids, masked_positions=positions,
                                                          train=True)
    return jnp.sum(jnp.sin(logits)), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(logits), jax.tree.map(np.asarray, grads)


def test_remat_gives_the_same_outputs_and_grads_with_dropout():
  """Training mode: the recomputed blocks must replay the same dropout masks."""
  kw = dict(depth=1, dropout=0.2, attention_dropout=0.2)
  plain, remat = _tiny_mlm(**kw), _tiny_mlm(remat=True, **kw)  # same seed: same params, keys
  ids, positions = _ids((2, 10)), jnp.asarray([[1, 4], [0, 9]], jnp.int32)
  logits, grads = _loss_and_grads(plain, ids, positions)
  logits_r, grads_r = _loss_and_grads(remat, ids, positions)
  np.testing.assert_array_equal(logits, logits_r)
  # Equal up to float32 rounding: recomputation changes XLA's fusion and sum order.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 *
                                                       np.abs(a).max()), grads, grads_r)

  def jaxpr(m):
    graphdef, state = nnx.split(m)
    return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(
        ids, masked_positions=positions, train=True))(state))
  assert jaxpr(remat).count("remat") == 1  # jax.checkpoint's primitive, once per block
  assert "remat" not in jaxpr(plain)
  # Dropout (hidden and attention) is on in training only.
  evaluated = np.asarray(nnx.jit(lambda m: m(ids, masked_positions=positions, train=False))(
      plain))
  assert not np.allclose(logits, evaluated)


def test_attention_dropout_path_equals_fused_attention_at_rate_zero_probability():
  """The explicit-softmax path (used when attention dropout is on) computes the
  same attention as dot_product_attention: with a rate so small no element drops."""
  model = _tiny_mlm(depth=1, attention_dropout=1e-9)
  ids = _ids((2, 9))
  mask = jnp.asarray(np.arange(9)[None] < np.array([[9], [6]]), jnp.int32)
  with jax.default_matmul_precision("highest"):
    train = np.asarray(_hidden(model.encoder, ids, None, mask, train=True))
    evaluated = np.asarray(_hidden(model.encoder, ids, None, mask, train=False))
  atol = float32_atol(np.abs(evaluated).max(), fan_in=TINY["mlp_dim"], depth=8)
  np.testing.assert_allclose(train, evaluated, rtol=0, atol=atol)


def test_embed_is_the_transformed_pooled_hidden_state():
  model = _tiny_mlm()
  ids = _ids((3, 8))
  mask = jnp.asarray(np.arange(8)[None] < np.array([[8], [5], [1]]), jnp.int32)
  with jax.default_matmul_precision("highest"):
    hidden = np.asarray(_hidden(model.encoder, ids, None, mask)).astype(np.float64)
    cls = np.asarray(nnx.jit(lambda m: m.embed(ids, attention_mask=mask))(model))
    mean = np.asarray(nnx.jit(lambda m: m.embed(ids, attention_mask=mask, pooling="mean"))(
        model))
    transform = nnx.jit(lambda m, x: m.head.transform(x))
    want_cls = np.asarray(transform(model, jnp.asarray(hidden[:, 0], jnp.float32)))
    m = np.asarray(mask, np.float64)[..., None]
    want_mean = np.asarray(transform(model, jnp.asarray((hidden * m).sum(1) / m.sum(1),
                                                        jnp.float32)))
  assert cls.shape == (3, 32) and cls.dtype == np.float32
  np.testing.assert_allclose(cls, want_cls, rtol=0, atol=1e-5 * np.abs(want_cls).max())
  np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-5 * np.abs(want_mean).max())
  # The [CLS] embedding's full prefix scores exactly like that token's MLM logits.
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(nnx.jit(lambda m: m.all_logits(ids, attention_mask=mask))(model))
  e = np.asarray(model.encoder.word_embedding())
  scored = cls @ e.T + np.asarray(model.head.bias[...])
  np.testing.assert_allclose(scored, logits[-1, :, 0], rtol=0,
                             atol=1e-4 * np.abs(scored).max())
  with pytest.raises(ConfigError, match="pooling"):
    model.embed(ids, pooling="max")


def _bert_config(**model_kw) -> ml_collections.ConfigDict:
  model = dict(name="bert", variant="base", dropout=0.1, attention_dropout=0.1, remat=False,
               width=None, depth=None, num_heads=None, mlp_dim=None, max_len=None,
               type_vocab_size=None)
  return ml_collections.ConfigDict(dict(model={**model, **model_kw}))


def _closed_form_count(width, depth, mlp_dim, vocab, max_len=512, types=2) -> int:
  d = width
  embed = (vocab + max_len + types) * d + 2 * d
  block = 4 * (d * d + d) + 2 * d + (d * mlp_dim + mlp_dim) + (mlp_dim * d + d) + 2 * d
  head = d * d + d + 2 * d + vocab  # transform + LN + decoder bias (weight tied)
  return embed + depth * block + head


def _num_params(model) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_variants_and_overrides_build_the_right_shapes():
  nesting = Nesting.create((12, 24, 48, 96, 192, 384, 768))
  model = nnx.eval_shape(lambda: build_bert_mlm(
      _bert_config().model, nesting, vocab_size=30522, head="mrl_e", dtype=jnp.float32,
      rngs=nnx.Rngs(0)))
  # Hugging Face's BertForMaskedLM (bert-base-uncased): 109,514,298 parameters,
  # of which the tied decoder weight is the word embedding.
  assert _num_params(model) == _closed_form_count(768, 12, 3072, 30522) == 109_514_298
  assert len(model.encoder.blocks) == 12 and model.head.nesting.dims == nesting.dims

  config = _bert_config(variant="mini", depth=2, width=128, max_len=128, type_vocab_size=1)
  assert bert.bert_embedding_dim("mini", **bert.model_overrides(config.model)) == 128
  model = nnx.eval_shape(lambda: build_bert_mlm(
      config.model, Nesting.create((16, 128)), vocab_size=100, head="mrl", dtype=jnp.float32,
      rngs=nnx.Rngs(0)))
  enc = model.encoder
  assert (enc.width, len(enc.blocks), enc.num_heads, enc.mlp_dim) == (128, 2, 4, 1024)
  flat = {sharding.path_to_str(p): v.shape for p, v in nnx.to_flat_state(nnx.state(model))}
  assert flat["encoder/embeddings/position/embedding"] == (128, 128)
  assert flat["encoder/embeddings/token_type/embedding"] == (1, 128)
  assert flat["encoder/blocks/1/attn/q_proj/kernel"] == (128, 4, 32)
  assert flat["encoder/blocks/1/attn/out_proj/kernel"] == (4, 32, 128)
  assert flat["encoder/blocks/1/mlp/fc1/kernel"] == (128, 1024)
  assert flat["head/transform/dense/kernel"] == (128, 128) and flat["head/bias"] == (100,)
  assert _num_params(model) == _closed_form_count(128, 2, 1024, 100, 128, 1)
  # No dropout rate, no RNG stream: the state then holds parameters only.
  quiet = nnx.eval_shape(lambda: build_bert_mlm(
      _bert_config(variant="tiny", dropout=0.0, attention_dropout=0.0).model,
      Nesting.create((128,)), vocab_size=100, head="ff", dtype=jnp.float32, rngs=nnx.Rngs(0)))
  assert not jax.tree.leaves(nnx.state(quiet, nnx.Not(nnx.Param)))
  published = dict(tiny=(128, 2, 2, 512), mini=(256, 4, 4, 1024), small=(512, 4, 8, 2048),
                   medium=(512, 8, 8, 2048), base=(768, 12, 12, 3072),
                   large=(1024, 24, 16, 4096))  # Turc et al. 2019; Devlin et al. 2019
  assert set(bert.VARIANTS) == set(published)
  for name, (width, depth, heads, mlp) in published.items():
    arch = bert.architecture(name)
    assert (arch["width"], arch["depth"], arch["num_heads"], arch["mlp_dim"]) == (
        width, depth, heads, mlp)
    assert (arch["max_len"], arch["type_vocab_size"]) == (512, 2)


def test_config_errors_are_one_line_and_name_the_field():
  with pytest.raises(ConfigError, match=r"variant='huge'.*tiny.*large"):
    bert.bert_embedding_dim("huge")
  with pytest.raises(ConfigError, match="not divisible by num_heads"):
    bert.architecture("tiny", width=129)
  with pytest.raises(ConfigError, match="needs config.model.variant"):
    bert.architecture(None, width=64)
  with pytest.raises(ConfigError, match=r"config.head='mrl2'"):
    build_bert_mlm(_bert_config(variant="tiny").model, Nesting.create((8,)), vocab_size=10,
                   head="mrl2", dtype=jnp.float32, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="goes up to 256 but the BERT width is 128"):
    nnx.eval_shape(lambda: build_bert_mlm(
        _bert_config(variant="tiny").model, Nesting.create((8, 256)), vocab_size=10,
        head="mrl_e", dtype=jnp.float32, rngs=nnx.Rngs(0)))
  with pytest.raises(ConfigError, match="attention_dropout"):
    BertEncoder("tiny", vocab_size=10, attention_dropout=1.0, rngs=nnx.Rngs(0))
  model = _tiny_mlm()
  with pytest.raises(ConfigError, match=r"longer than the model's 16 position.*seq_len"):
    model.encoder(_ids((1, 17)), train=False)
  # BERT is not in the image-classifier registry: a classification config says what to set.
  from mrl_jax import models
  config = _bert_config(variant="tiny")
  config.head, config.nesting = "mrl_e", ml_collections.ConfigDict(dict(dims=(8,)))
  with pytest.raises(ConfigError, match=r"text encoder.*config.task='mlm'"):
    models.embedding_dim(config)


def test_reference_initializers():
  """BERT's init: N(0, 0.02) kernels and embeddings, zero biases, LayerNorm 1/0, eps 1e-12."""
  encoder = BertEncoder(None, vocab_size=512, width=64, depth=1, num_heads=2, mlp_dim=256,
                        max_len=512, rngs=nnx.Rngs(0))
  model = BertMLM(encoder, NestedMLMHead(64, 512, (64,), rngs=nnx.Rngs(1)))
  params = {sharding.path_to_str(p): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for name, value in params.items():
    if name.endswith(("kernel", "embedding")) and value.size >= 4096:
      assert 0.018 < value.std() < 0.022 and abs(value.mean()) < 0.002, name
    elif name.endswith("kernel") or name.endswith("embedding"):
      assert 0.01 < value.std() < 0.03, name
    elif name.endswith("scale"):
      assert np.all(value == 1.0), name
    else:
      assert name.endswith("bias") and np.all(value == 0.0), name
  assert params["encoder/embeddings/word/embedding"].shape == (512, 64)
  norms = [encoder.embeddings.norm, encoder.blocks[0].attn_norm, encoder.blocks[0].mlp_norm,
           model.head.transform.norm]
  assert {n.epsilon for n in norms} == {1e-12}


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny_mlm(dtype=jnp.bfloat16)
  assert {a.dtype for a in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
      jnp.dtype("float32")}
  ids = _ids((2, 8))
  graphdef, state = nnx.split(model)
  hidden = jax.eval_shape(lambda s: nnx.merge(graphdef, s).encoder(ids, train=False), state)
  assert hidden.dtype == jnp.bfloat16
  z = nnx.jit(lambda m: m.embed(ids))(model)
  assert z.dtype == jnp.float32


# ---------------------------------------------------------------- sharding

class FakeMesh:
  """Only the axis sizes matter to `spec_for`."""

  def __init__(self, **shape):
    self.shape = shape


def test_sharding_rules_give_megatron_and_vocab_parallel_specs():
  mesh = FakeMesh(data=1, fsdp=2, model=2)
  spec = lambda name, shape: sharding.spec_for(name, shape, mesh, SHARDING_RULES)  # noqa: E731
  b = "encoder/blocks/3/"
  assert spec(b + "attn/q_proj/kernel", (768, 12, 64)) == P("fsdp", "model", None)
  assert spec(b + "attn/k_proj/bias", (12, 64)) == P("model", None)
  assert spec(b + "attn/out_proj/kernel", (12, 64, 768)) == P("model", None, "fsdp")
  assert spec(b + "mlp/fc1/kernel", (768, 3072)) == P("fsdp", "model")
  assert spec(b + "mlp/fc2/kernel", (3072, 768)) == P("model", "fsdp")
  assert spec("encoder/embeddings/word/embedding", (30522, 768)) == P("model", "fsdp")
  assert spec("head/bias", (30522,)) == P("model")
  # The MLM transform's d (what the prefixes slice) is never split over "model".
  assert "model" not in spec("head/transform/dense/kernel", (768, 768))
  assert spec("head/transform/norm/scale", (768,)) == P(None)
  assert spec("1/0/mu/encoder/embeddings/word/embedding", (30522, 768)) == P("model", "fsdp")


SHARDED_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from mrl_jax import sharding
    from mrl_jax.models.bert import SHARDING_RULES, BertEncoder, BertMLM
    from mrl_jax.models.nested_mlm_head import NestedMLMHead

    assert jax.device_count() == 8
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, model=2))
    abstract = nnx.eval_shape(lambda: BertMLM(
        BertEncoder(None, vocab_size=128, width=64, depth=1, num_heads=4, mlp_dim=256,
                    max_len=16, dropout=0.0, attention_dropout=0.0, rngs=nnx.Rngs(0)),
        NestedMLMHead(64, 128, (16, 64), rngs=nnx.Rngs(1))))
    graphdef, params = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), params)
    ids = rng.integers(0, 128, (8, 12)).astype(np.int32)
    positions = rng.integers(0, 12, (8, 3)).astype(np.int32)
    targets = rng.integers(0, 128, (8, 3)).astype(np.int32)

    def loss_fn(params, ids, positions, targets):
      logits = nnx.merge(graphdef, params)(ids, masked_positions=positions, train=True)
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, targets[None, :, :, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss_fn))
    with jax.default_matmul_precision("highest"):
      loss1, grads1 = step(jax.device_put(params, jax.devices()[0]), ids, positions, targets)
      loss1 = float(loss1)
      shardings = sharding.tree_shardings(params, mesh, SHARDING_RULES)
      placed = jax.device_put(params, shardings)
      specs = {sharding.path_to_str(p): x.sharding.spec
               for p, x in jax.tree_util.tree_leaves_with_path(placed)}
      assert specs["encoder/blocks/0/attn/q_proj/kernel"] == P(None, "model", None), specs
      assert specs["encoder/blocks/0/attn/out_proj/kernel"] == P("model", None, None), specs
      assert specs["encoder/blocks/0/mlp/fc1/kernel"] == P("fsdp", "model"), specs
      assert specs["encoder/blocks/0/mlp/fc2/kernel"] == P("model", "fsdp"), specs
      assert specs["encoder/embeddings/word/embedding"] == P("model", None), specs
      assert specs["head/bias"] == P("model"), specs
      batch = sharding.global_batch(dict(ids=ids, positions=positions, targets=targets), mesh)
      loss8, grads8 = step(placed, batch["ids"], batch["positions"], batch["targets"])
      loss8 = float(loss8)  # wait: CPU collectives hang on queued steps
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-4, atol=1e-6),
                 grads8, grads1)
    print("OK", loss1, loss8)
""")


def test_sharded_forward_backward_matches_one_device():
  result = subprocess.run([sys.executable, "-c", SHARDED_CHECK], env=subprocess_env(8),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "OK" in result.stdout
