"""Hugging Face BERT <-> BertMLM: the same MLM logits and hidden states as transformers'
PyTorch BertForMaskedLM (no download: a small random BertConfig saved locally)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import BertConfig, BertForMaskedLM

from mrl_jax import sharding
from mrl_jax.models import bert_hf
from mrl_jax.models.bert import build_bert_mlm
from mrl_jax.models.bert_hf import HFCheckpointError
from mrl_jax.nesting import Nesting

import ml_collections

HF = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=128, max_position_embeddings=32, type_vocab_size=2)
DIMS = (8, 16, 32, 64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
  """A random BertForMaskedLM saved with save_pretrained (safetensors, tied decoder absent).

  Every tensor is redrawn N(0, 0.2) (LayerNorm and biases included) so each
  one changes the outputs.
  """
  torch.manual_seed(0)
  model = BertForMaskedLM(BertConfig(**HF))
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  path = str(tmp_path_factory.mktemp("hf_bert"))
  model.save_pretrained(path)
  return path


def _abstract_mlm(model_cfg: dict, vocab_size: int):
  # Without dropout the model holds parameters only (no RNG keys to make concrete).
  model_cfg = {**model_cfg, "dropout": 0.0, "attention_dropout": 0.0}
  return nnx.eval_shape(lambda: build_bert_mlm(
      ml_collections.ConfigDict(model_cfg), Nesting.create(DIMS), vocab_size=vocab_size,
      head="mrl_e", dtype=jnp.float32, rngs=nnx.Rngs(0)))


def _import(hf_dir: str):
  """(our model filled from the HF folder, config.model dict, the HF state dict)."""
  with open(os.path.join(hf_dir, "config.json")) as f:
    model_cfg, vocab = bert_hf.model_config_from_hf(json.load(f))
  state_dict = load_file(os.path.join(hf_dir, "model.safetensors"))
  abstract = _abstract_mlm(model_cfg, vocab)
  graphdef, params = nnx.split(abstract, nnx.Param)
  expected = {sharding.path_to_str(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_leaves_with_path(params)}
  arrays = bert_hf.hf_to_params(state_dict, expected)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(arrays[sharding.path_to_str(p)]), params)
  return nnx.merge(graphdef, params), model_cfg, state_dict


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, HF["vocab_size"], (3, 20))
  lengths = np.array([20, 13, 7])
  mask = (np.arange(20)[None] < lengths[:, None]).astype(np.int64)
  types = (np.arange(20)[None] >= (lengths // 2)[:, None]).astype(np.int64) * mask
  return ids, types, mask


def _ours(model, ids, types, mask):
  kw = dict(token_type_ids=jnp.asarray(ids * 0 + types, jnp.int32),
            attention_mask=jnp.asarray(mask, jnp.int32))
  ids = jnp.asarray(ids, jnp.int32)
  with jax.default_matmul_precision("highest"):
    logits = nnx.jit(lambda m: m.all_logits(ids, **kw))(model)
    hidden = nnx.jit(lambda m: m.encoder(ids, train=False, **kw))(model)
  return np.asarray(logits), np.asarray(hidden)


def _reference(path_or_model, ids, types, mask):
  """transformers' forward in float64 (its own rounding drops out): logits, last hidden."""
  model = (BertForMaskedLM.from_pretrained(path_or_model) if isinstance(path_or_model, str)
           else path_or_model)
  model = model.double().eval()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), token_type_ids=torch.from_numpy(types),
                attention_mask=torch.from_numpy(mask), output_hidden_states=True)
  return out.logits.numpy(), out.hidden_states[-1].numpy()


def _relative_error(got, want, mask):
  """max |got - want| / max |want| over the real (unpadded) tokens."""
  real = mask.astype(bool)
  return float(np.abs(got[..., real, :] - want[real]).max() / np.abs(want[real]).max())


def test_imported_model_gives_transformers_logits_and_hidden_states(hf_dir):
  model, model_cfg, state_dict = _import(hf_dir)
  assert "cls.predictions.decoder.weight" not in state_dict  # tied: absent from the file
  assert model_cfg["variant"] is None and model_cfg["width"] == 64
  ids, types, mask = _inputs()
  logits, hidden = _ours(model, ids, types, mask)
  want_logits, want_hidden = _reference(hf_dir, ids, types, mask)
  assert logits.shape == (len(DIMS), 3, 20, HF["vocab_size"])
  # The nested head's full-size logits are BERT's MLM logits.
  assert _relative_error(logits[-1], want_logits, mask) < 1e-5
  assert _relative_error(hidden, want_hidden, mask) < 1e-5
  # The [CLS] hidden state in particular (what CLS pooling embeds).
  cls_err = np.abs(hidden[:, 0] - want_hidden[:, 0]).max() / np.abs(want_hidden[:, 0]).max()
  assert cls_err < 1e-5


def test_conversion_round_trips_exactly_and_exports_to_transformers(hf_dir, tmp_path):
  model, model_cfg, state_dict = _import(hf_dir)
  params = {sharding.path_to_str(p): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  exported = bert_hf.params_to_hf(params)
  assert set(exported) == set(state_dict)
  for name, value in state_dict.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)

  # Export a different model (our own random weights) and load it in transformers.
  rng = np.random.default_rng(5)
  ours = {k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in params.items()}
  save_file(bert_hf.params_to_hf(ours), str(tmp_path / "model.safetensors"),
            metadata={"format": "pt"})
  with open(tmp_path / "config.json", "w") as f:
    json.dump(bert_hf.hf_config_from_model(model_cfg, HF["vocab_size"]), f)
  graphdef, abstract = nnx.split(_abstract_mlm(model_cfg, HF["vocab_size"]), nnx.Param)
  filled = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(ours[sharding.path_to_str(p)]), abstract))
  ids, types, mask = _inputs(seed=1)
  logits, hidden = _ours(filled, ids, types, mask)
  loaded = BertForMaskedLM.from_pretrained(str(tmp_path))
  # transformers tied the decoder to the exported word embeddings.
  np.testing.assert_array_equal(loaded.cls.predictions.decoder.weight.detach().numpy(),
                                ours["encoder/embeddings/word/embedding"])
  want_logits, want_hidden = _reference(loaded, ids, types, mask)
  assert _relative_error(hidden, want_hidden, mask) < 1e-5
  assert _relative_error(logits[-1], want_logits, mask) < 1e-5


def test_config_round_trip_and_variant_detection():
  hf = dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
            num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
            type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  model_cfg, vocab = bert_hf.model_config_from_hf(hf)
  assert (model_cfg["variant"], vocab, model_cfg["width"]) == ("base", 30522, None)
  back = bert_hf.hf_config_from_model(model_cfg, vocab)
  assert {k: back[k] for k in hf} == hf
  assert back["architectures"] == ["BertForMaskedLM"] and back["tie_word_embeddings"]
  BertConfig(**back)  # transformers accepts it


@pytest.mark.parametrize("change,match", [
    (dict(hidden_act="gelu_new"), "hidden_act='gelu_new'"),
    (dict(layer_norm_eps=1e-5), "layer_norm_eps=1e-05"),
    (dict(model_type="roberta"), "model_type='roberta'"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(hidden_size=None), "hidden_size"),
])
def test_unsupported_configs_are_one_line_errors(change, match):
  hf = dict(model_type="bert", **HF)
  hf.update(change)
  hf = {k: v for k, v in hf.items() if v is not None}
  with pytest.raises(HFCheckpointError, match=match) as info:
    bert_hf.model_config_from_hf(hf)
  assert "\n" not in str(info.value)


def test_bad_state_dicts_list_every_problem_in_one_line(hf_dir):
  _, model_cfg, state_dict = _import(hf_dir)
  graphdef, abstract = nnx.split(_abstract_mlm(model_cfg, HF["vocab_size"]), nnx.Param)
  expected = {sharding.path_to_str(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  # BertModel names (no "bert." prefix), the pooler and an old position_ids buffer are fine.
  plain = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state_dict.items()}
  plain["pooler.dense.weight"] = np.zeros((64, 64), np.float32)
  plain["embeddings.position_ids"] = np.arange(32)[None]
  plain["cls.predictions.decoder.weight"] = state_dict["bert.embeddings.word_embeddings.weight"]
  assert set(bert_hf.hf_to_params(plain, expected)) == set(expected)

  bad = dict(state_dict)
  del bad["cls.predictions.transform.dense.weight"]
  bad["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((64, 128), np.float32)
  bad["bert.encoder.layer.7.output.dense.bias"] = np.zeros(64, np.float32)
  bad["cls.predictions.decoder.weight"] = np.zeros((99, 64), np.float32)
  with pytest.raises(HFCheckpointError) as info:
    bert_hf.hf_to_params(bad, expected)
  message = str(info.value)
  assert "\n" not in message
  assert "unknown keys: bert.encoder.layer.7.output.dense.bias" in message
  assert "missing keys: cls.predictions.transform.dense.weight" in message
  assert "bert.encoder.layer.0.intermediate.dense.weight is (64, 128), expected (128, 64)" in message
  assert "untied decoder" in message
