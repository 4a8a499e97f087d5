"""Hugging Face BERT <-> this project's BertMLM: parameter names, layouts and configs.

Pure conversions between dicts of arrays (no files; the CLIs in
`mrl_jax/tools/{import,export}_hf_bert.py` read and write the folders).

Names (`BertForMaskedLM`; a `BertModel` state dict has the same names without
the `bert.` prefix) -> NNX paths of `bert.BertMLM`:

    bert.embeddings.{word,position,token_type}_embeddings.weight
        -> encoder/embeddings/{word,position,token_type}/embedding
    bert.embeddings.LayerNorm.{weight,bias}      -> encoder/embeddings/norm/{scale,bias}
    bert.encoder.layer.i.attention.self.{query,key,value}.{weight,bias}
        -> encoder/blocks/i/attn/{q,k,v}_proj/{kernel,bias}
    bert.encoder.layer.i.attention.output.dense  -> encoder/blocks/i/attn/out_proj
    bert.encoder.layer.i.attention.output.LayerNorm -> encoder/blocks/i/attn_norm
    bert.encoder.layer.i.intermediate.dense      -> encoder/blocks/i/mlp/fc1
    bert.encoder.layer.i.output.dense            -> encoder/blocks/i/mlp/fc2
    bert.encoder.layer.i.output.LayerNorm        -> encoder/blocks/i/mlp_norm
    cls.predictions.transform.dense              -> head/transform/dense
    cls.predictions.transform.LayerNorm          -> head/transform/norm
    cls.predictions.bias                         -> head/bias

Layouts: a torch Linear weight is [out, in]; an NNX kernel is [in..., out...]
(q/k/v [d, heads, head_dim], out_proj [heads, head_dim, d]); HF splits the d
outputs of query/key/value head-major, which is the reshape order here.

Keys that are read but not stored: `cls.predictions.decoder.weight` (the tied
decoder; it must equal the word embedding, since BertMLM has no untied
decoder), `cls.predictions.decoder.bias` (tied to `cls.predictions.bias`),
`bert.embeddings.position_ids` (a buffer of older checkpoints), and the
parts of BertForPreTraining / BertModel that are not the MLM: the pooler
(`bert.pooler.*`) and the next-sentence head (`cls.seq_relationship.*`).
Older TF-converted names `LayerNorm.gamma/beta` are read as weight/bias.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mrl_jax.errors import UserError
from mrl_jax.models import bert
from mrl_jax.models.nested_mlm_head import LAYER_NORM_EPS


class HFCheckpointError(UserError, ValueError):
  """A Hugging Face BERT folder, config or state dict this model cannot represent."""


# (NNX path regex, HF name template, number of kernel input dims: 0 = not a kernel)
_LAYER = "bert.encoder.layer.{i}."
_TABLE: tuple[tuple[str, str, int], ...] = (
    (r"encoder/embeddings/word/embedding", "bert.embeddings.word_embeddings.weight", 0),
    (r"encoder/embeddings/position/embedding", "bert.embeddings.position_embeddings.weight", 0),
    (r"encoder/embeddings/token_type/embedding",
     "bert.embeddings.token_type_embeddings.weight", 0),
    (r"encoder/embeddings/norm/scale", "bert.embeddings.LayerNorm.weight", 0),
    (r"encoder/embeddings/norm/bias", "bert.embeddings.LayerNorm.bias", 0),
    (r"encoder/blocks/(?P<i>\d+)/attn/q_proj/kernel", _LAYER + "attention.self.query.weight", 1),
    (r"encoder/blocks/(?P<i>\d+)/attn/q_proj/bias", _LAYER + "attention.self.query.bias", 0),
    (r"encoder/blocks/(?P<i>\d+)/attn/k_proj/kernel", _LAYER + "attention.self.key.weight", 1),
    (r"encoder/blocks/(?P<i>\d+)/attn/k_proj/bias", _LAYER + "attention.self.key.bias", 0),
    (r"encoder/blocks/(?P<i>\d+)/attn/v_proj/kernel", _LAYER + "attention.self.value.weight", 1),
    (r"encoder/blocks/(?P<i>\d+)/attn/v_proj/bias", _LAYER + "attention.self.value.bias", 0),
    (r"encoder/blocks/(?P<i>\d+)/attn/out_proj/kernel", _LAYER + "attention.output.dense.weight",
     2),
    (r"encoder/blocks/(?P<i>\d+)/attn/out_proj/bias", _LAYER + "attention.output.dense.bias", 0),
    (r"encoder/blocks/(?P<i>\d+)/attn_norm/scale", _LAYER + "attention.output.LayerNorm.weight",
     0),
    (r"encoder/blocks/(?P<i>\d+)/attn_norm/bias", _LAYER + "attention.output.LayerNorm.bias", 0),
    (r"encoder/blocks/(?P<i>\d+)/mlp/fc1/kernel", _LAYER + "intermediate.dense.weight", 1),
    (r"encoder/blocks/(?P<i>\d+)/mlp/fc1/bias", _LAYER + "intermediate.dense.bias", 0),
    (r"encoder/blocks/(?P<i>\d+)/mlp/fc2/kernel", _LAYER + "output.dense.weight", 1),
    (r"encoder/blocks/(?P<i>\d+)/mlp/fc2/bias", _LAYER + "output.dense.bias", 0),
    (r"encoder/blocks/(?P<i>\d+)/mlp_norm/scale", _LAYER + "output.LayerNorm.weight", 0),
    (r"encoder/blocks/(?P<i>\d+)/mlp_norm/bias", _LAYER + "output.LayerNorm.bias", 0),
    (r"head/transform/dense/kernel", "cls.predictions.transform.dense.weight", 1),
    (r"head/transform/dense/bias", "cls.predictions.transform.dense.bias", 0),
    (r"head/transform/norm/scale", "cls.predictions.transform.LayerNorm.weight", 0),
    (r"head/transform/norm/bias", "cls.predictions.transform.LayerNorm.bias", 0),
    (r"head/bias", "cls.predictions.bias", 0),
)
_TABLE_RE = tuple((re.compile(p), name, n) for p, name, n in _TABLE)

TIED_DECODER = "cls.predictions.decoder.weight"
TIED_DECODER_BIAS = "cls.predictions.decoder.bias"
_DROPPED = re.compile(r"bert\.embeddings\.position_ids|bert\.pooler\..*|cls\.seq_relationship\..*")


def hf_name(path: str) -> tuple[str, int]:
  """An NNX path's HF name and its kernel's number of input dims (0: not a Linear weight)."""
  for pattern, name, in_dims in _TABLE_RE:
    match = pattern.fullmatch(path)
    if match:
      return name.format(**match.groupdict()), in_dims
  raise KeyError(f"No Hugging Face name for the BERT parameter {path!r}.")


def _hf_shape(path: str, shape: tuple[int, ...], in_dims: int) -> tuple[int, ...]:
  """The torch shape of an NNX parameter: Linear [out, in], embeddings as they are,
  everything else (per-head biases [heads, head_dim] too) flat."""
  if in_dims:
    return (math.prod(shape[in_dims:]), math.prod(shape[:in_dims]))
  return tuple(shape) if path.endswith("/embedding") else (math.prod(shape),)


def _canonical(name: str) -> str:
  """`BertModel` names get the `bert.` prefix; TF-era gamma/beta become weight/bias."""
  if name.startswith("module."):
    name = name[len("module."):]
  if not name.startswith(("bert.", "cls.")):
    name = "bert." + name
  if name.endswith("LayerNorm.gamma"):
    name = name[:-len("gamma")] + "weight"
  elif name.endswith("LayerNorm.beta"):
    name = name[:-len("beta")] + "bias"
  return name


def hf_to_params(state_dict: Mapping[str, Any],
                 expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """HF tensors -> {NNX path: float32 array} for every path of `expected` (path -> shape).

  Raises one HFCheckpointError listing every unknown, missing and misshaped
  tensor, and an untied decoder.
  """
  tensors = {_canonical(k): np.asarray(v) for k, v in state_dict.items()}
  names = {path: hf_name(path) for path in expected}
  by_name = {name: path for path, (name, _) in names.items()}
  out: dict[str, np.ndarray] = {}
  problems, unknown, shapes, misshaped = [], [], [], set()
  for name, value in tensors.items():
    if name in (TIED_DECODER, TIED_DECODER_BIAS) or _DROPPED.fullmatch(name):
      continue
    path = by_name.get(name)
    if path is None:
      unknown.append(name)
      continue
    shape, in_dims = tuple(expected[path]), names[path][1]
    want = _hf_shape(path, shape, in_dims)
    if tuple(value.shape) != want:
      shapes.append(f"{name} is {tuple(value.shape)}, expected {want}")
      misshaped.add(path)
      continue
    value = value.astype(np.float32)
    out[path] = (value.T if in_dims else value).reshape(shape)
  missing = sorted(names[p][0] for p in expected if p not in out and p not in misshaped)
  if unknown:
    problems.append("unknown keys: " + ", ".join(sorted(unknown)))
  if missing:
    problems.append("missing keys: " + ", ".join(missing))
  if shapes:
    problems.append("wrong shapes: " + "; ".join(shapes))
  word = out.get("encoder/embeddings/word/embedding")
  if TIED_DECODER in tensors and word is not None:
    decoder = tensors[TIED_DECODER].astype(np.float32)
    if decoder.shape != word.shape or not np.array_equal(decoder, word):
      problems.append(f"{TIED_DECODER} differs from the word embeddings (an untied decoder; "
                      "BertMLM's decoder is the word embedding)")
  bias = out.get("head/bias")
  if TIED_DECODER_BIAS in tensors and bias is not None:
    if not np.array_equal(tensors[TIED_DECODER_BIAS].astype(np.float32).reshape(-1), bias):
      problems.append(f"{TIED_DECODER_BIAS} differs from cls.predictions.bias")
  if problems:
    raise HFCheckpointError("The state dict is not a BertForMaskedLM of this config: "
                            + "; ".join(problems) + ".")
  return out


def params_to_hf(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{NNX path: array} of a BertMLM -> BertForMaskedLM tensors (float32, torch layouts),
  without the tied decoder weight and bias (transformers ties them on load)."""
  out = {}
  for path, value in params.items():
    name, in_dims = hf_name(path)
    value = np.asarray(value, np.float32)
    value = (value.reshape(math.prod(value.shape[:in_dims]), -1).T if in_dims
             else value.reshape(_hf_shape(path, value.shape, 0)))
    out[name] = np.ascontiguousarray(value)
  return out


# ---------------------------------------------------------------- configs

def _check(hf: Mapping[str, Any], key: str, allowed: tuple, what: str) -> None:
  value = hf.get(key, allowed[0])
  if value not in allowed:
    raise HFCheckpointError(f"config.json has {key}={value!r}: this BERT supports only "
                            f"{what}.")


def model_config_from_hf(hf: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
  """A HF BertConfig (config.json as a dict) -> (config.model fields, vocab_size).

  The variant is named when the four sizes match one of `bert.VARIANTS`;
  otherwise they are given as overrides. max_len and type_vocab_size are
  always given.
  """
  _check(hf, "model_type", ("bert",), "model_type='bert'")
  _check(hf, "hidden_act", ("gelu",), "hidden_act='gelu' (exact erf GELU)")
  _check(hf, "position_embedding_type", ("absolute",), "absolute position embeddings")
  _check(hf, "is_decoder", (False,), "encoders (is_decoder=false)")
  _check(hf, "add_cross_attention", (False,), "self-attention only (add_cross_attention=false)")
  eps = float(hf.get("layer_norm_eps", LAYER_NORM_EPS))
  if not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
    raise HFCheckpointError(f"config.json has layer_norm_eps={eps}: this BERT uses "
                            f"LayerNorm eps {LAYER_NORM_EPS} (the original BERT's).")
  try:
    sizes = dict(width=int(hf["hidden_size"]), depth=int(hf["num_hidden_layers"]),
                 num_heads=int(hf["num_attention_heads"]), mlp_dim=int(hf["intermediate_size"]))
    extra = dict(max_len=int(hf.get("max_position_embeddings", 512)),
                 type_vocab_size=int(hf.get("type_vocab_size", 2)))
    vocab_size = int(hf["vocab_size"])
  except KeyError as e:
    raise HFCheckpointError(f"config.json has no {e.args[0]}: it is not a BertConfig.") from None
  variant = next((name for name, arch in bert.VARIANTS.items()
                  if arch == tuple(sizes[k] for k in ("width", "depth", "num_heads", "mlp_dim"))),
                 None)
  model = dict(name="bert", variant=variant,
               **{k: (None if variant else v) for k, v in sizes.items()}, **extra,
               dropout=float(hf.get("hidden_dropout_prob", 0.1)),
               attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
               remat=False)
  bert.architecture(variant, **{k: model[k] for k in bert.ARCH_FIELDS})  # checks the sizes
  return model, vocab_size


def hf_config_from_model(model_cfg: Mapping[str, Any], vocab_size: int, *,
                         pad_token_id: int | None = 0) -> dict[str, Any]:
  """config.model (+ vocab size) -> a BertConfig dict for BertForMaskedLM."""
  arch = bert.architecture(model_cfg.get("variant"),
                           **{k: model_cfg.get(k) for k in bert.ARCH_FIELDS})
  return {
      "architectures": ["BertForMaskedLM"],
      "model_type": "bert",
      "vocab_size": int(vocab_size),
      "hidden_size": arch["width"],
      "num_hidden_layers": arch["depth"],
      "num_attention_heads": arch["num_heads"],
      "intermediate_size": arch["mlp_dim"],
      "max_position_embeddings": arch["max_len"],
      "type_vocab_size": arch["type_vocab_size"],
      "hidden_act": "gelu",
      "hidden_dropout_prob": float(model_cfg.get("dropout", 0.1)),
      "attention_probs_dropout_prob": float(model_cfg.get("attention_dropout", 0.1)),
      "layer_norm_eps": LAYER_NORM_EPS,
      "initializer_range": 0.02,
      "position_embedding_type": "absolute",
      "pad_token_id": pad_token_id,
      "tie_word_embeddings": True,
      "is_decoder": False,
  }
