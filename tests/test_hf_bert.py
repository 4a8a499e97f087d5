"""Hugging Face BERT <-> BertMLM: the same MLM logits and hidden states as transformers'
PyTorch BertForMaskedLM (no download: a small random BertConfig saved locally)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
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
  # BertModel names (no "bert." prefix), the pooler, the next-sentence head and an old
  # position_ids buffer are fine.
  plain = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state_dict.items()}
  plain["pooler.dense.weight"] = np.zeros((64, 64), np.float32)
  plain["embeddings.position_ids"] = np.arange(32)[None]
  plain["cls.seq_relationship.weight"] = np.zeros((2, 64), np.float32)  # BertForPreTraining
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
  assert ("bert.encoder.layer.0.intermediate.dense.weight is (64, 128), expected (128, 64)"
          in message)
  assert "untied decoder" in message


# ---------------------------------------------------------------- the CLIs

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a of and to in is was for on that with as by it he at from his an were are "
         "which this be or has had not but").split()
TEXTS = ["the a of w5 w7 and to", "his was w1", "it is not w90 but w3 w3 w3 on the w60"]


@pytest.fixture(scope="module")
def hf_folder(hf_dir, tmp_path_factory) -> str:
  """The random model's folder plus a 99-token vocab.txt: what import_hf_bert reads."""
  path = str(tmp_path_factory.mktemp("hf_folder"))
  for name in os.listdir(hf_dir):
    with open(os.path.join(hf_dir, name), "rb") as src, open(os.path.join(path, name), "wb") as dst:
      dst.write(src.read())
  vocab = SPECIALS + WORDS
  vocab += [f"w{i}" for i in range(HF["vocab_size"] - len(vocab))]
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  return path


def _run_import(checkpoint: str, workdir: str, *args: str) -> int:
  from mrl_jax.tools import import_hf_bert
  return import_hf_bert.main(["--checkpoint", checkpoint, "--workdir", workdir, *args])


@pytest.fixture(scope="module")
def imported_workdir(hf_folder, tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp("imported") / "w")
  assert _run_import(hf_folder, workdir) == 0
  return workdir


def _tokens(workdir: str, seq_len: int):
  from mrl_jax.data import tokenizer as tokenizer_lib
  return tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer.json")).encode(
      TEXTS, seq_len)


def test_import_cli_writes_a_workdir_that_restores_transformers_logits(imported_workdir,
                                                                       hf_folder):
  from mrl_jax import inference
  with open(os.path.join(imported_workdir, "config.json")) as f:
    config = json.load(f)
  assert config["task"] == "mlm" and config["head"] == "mrl_e"
  assert config["nesting"]["dims"] == [12, 24, 48, 64]  # the recipe's sizes up to the width
  assert config["model"]["width"] == 64 and config["model"]["max_len"] == 32
  assert config["data"]["seq_len"] == 32 and config["data"]["vocab_size"] == HF["vocab_size"]
  assert config["data"]["tokenizer"] == os.path.join(imported_workdir, "tokenizer.json")
  model = inference.load(imported_workdir)
  assert model.step == 0 and model.dims == (12, 24, 48, 64)
  batch = _tokens(imported_workdir, 32)
  ids, types, mask = (batch[k].astype(np.int64)
                      for k in ("input_ids", "token_type_ids", "attention_mask"))
  assert ids[0, 0] == SPECIALS.index("[CLS]") and ids[0, 1] == len(SPECIALS)  # [CLS] "the"
  with jax.default_matmul_precision("highest"):
    logits = model.mlm_logits(ids, attention_mask=mask, token_type_ids=types)
  want, _ = _reference(hf_folder, ids, types, mask)
  assert logits.shape == (4, 3, 32, HF["vocab_size"])
  assert _relative_error(logits[-1], want, mask) < 1e-5


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_export_cli_loads_in_transformers_and_sentence_transformers(hf_folder, tmp_path,
                                                                    pooling):
  from mrl_jax import inference
  from mrl_jax.tools import export_hf_bert
  workdir, out = str(tmp_path / "w"), str(tmp_path / "hf")
  assert _run_import(hf_folder, workdir, "--pooling", pooling, "--nesting", "8,32,64") == 0
  assert export_hf_bert.main(["--workdir", workdir, "--out", out]) == 0
  # The weights come back bit for bit (the tied decoder is absent from both files).
  exported, original = load_file(os.path.join(out, "model.safetensors")), load_file(
      os.path.join(hf_folder, "model.safetensors"))
  assert set(exported) == set(original)
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  with open(os.path.join(out, "mrl_jax.json")) as f:
    assert json.load(f)["nesting_dims"] == [8, 32, 64]

  batch = _tokens(workdir, 32)
  restored = inference.load(workdir)
  if pooling == "mean":  # The transformers half does not depend on the pooling.
    _check_transformers_half(out, batch, restored)

  # sentence-transformers: SentenceTransformer(out, truncate_dim=m) gives z[:, :m].
  st = pytest.importorskip("sentence_transformers")
  encoder = st.SentenceTransformer(out, truncate_dim=8, device="cpu")
  for m in (8, 64):
    # The constructor's truncate_dim, then encode's own for the full size.
    got = encoder.encode(TEXTS, convert_to_numpy=True, truncate_dim=None if m == 8 else m)
    z = restored.embed_text(TEXTS, dim=m, normalize=False)  # the workdir's own tokenizer
    assert got.shape == z.shape == (3, m)
    # float32 on both sides (torch and XLA): 2 layers, the transform, the pooling.
    assert np.abs(got - z).max() < 1e-5 * np.abs(z).max()
  unit = encoder.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
  np.testing.assert_allclose(unit, restored.embed_text(TEXTS, dim=8), atol=1e-5)


def _check_transformers_half(out: str, batch: dict, restored) -> None:
  """transformers: the tokenizer gives mrl_jax's ids, BertModel the workdir's hidden states."""
  from transformers import AutoTokenizer, BertModel
  tokenizer = AutoTokenizer.from_pretrained(out)
  hf_ids = tokenizer(TEXTS, padding="max_length", max_length=32, return_tensors="np")
  for key in ("input_ids", "token_type_ids", "attention_mask"):
    np.testing.assert_array_equal(hf_ids[key], batch[key], err_msg=key)
  model_cfg = {k: v for k, v in restored.config.model.to_dict().items() if k != "pooling"}
  graphdef, _ = nnx.split(_abstract_mlm(model_cfg, HF["vocab_size"]), nnx.Param)
  ours = nnx.merge(graphdef, restored.params)
  _, hidden = _ours(ours, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
  bert_model = BertModel.from_pretrained(out).double().eval()
  with torch.no_grad():
    want = bert_model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()
                         if k in ("input_ids", "token_type_ids", "attention_mask")}
                      ).last_hidden_state.numpy()
  assert _relative_error(hidden, want, batch["attention_mask"]) < 1e-5


def _copy_folder(src: str, dst: str, skip=()) -> str:
  os.makedirs(dst)
  for name in os.listdir(src):
    if name not in skip:
      with open(os.path.join(src, name), "rb") as a, open(os.path.join(dst, name), "wb") as b:
        b.write(a.read())
  return dst


def test_pytorch_bin_imports_like_safetensors(hf_folder, imported_workdir, tmp_path):
  from mrl_jax import inference
  folder = _copy_folder(hf_folder, str(tmp_path / "bin"), skip=("model.safetensors",))
  torch.save({k: torch.from_numpy(v) for k, v in
              load_file(os.path.join(hf_folder, "model.safetensors")).items()},
             os.path.join(folder, "pytorch_model.bin"))
  assert _run_import(folder, str(tmp_path / "w")) == 0
  a, b = inference.load(str(tmp_path / "w")).params, inference.load(imported_workdir).params
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_unusable_folders_and_workdirs_are_one_line_errors(hf_folder, imported_workdir,
                                                           tmp_path, capsys):
  from mrl_jax.tools import export_hf_bert
  cases = []
  cases.append((str(tmp_path / "nowhere"), "is not a directory"))
  no_config = _copy_folder(hf_folder, str(tmp_path / "c1"), skip=("config.json",))
  cases.append((no_config, "config.json does not exist"))
  no_weights = _copy_folder(hf_folder, str(tmp_path / "c2"), skip=("model.safetensors",))
  cases.append((no_weights, "has no model.safetensors"))
  no_vocab = _copy_folder(hf_folder, str(tmp_path / "c3"), skip=("vocab.txt",))
  cases.append((no_vocab, "has no tokenizer.json or vocab.txt"))
  for name, change, match in [
      ("c4", dict(architectures=["BertForSequenceClassification"]), "only checkpoints with"),
      ("c5", dict(model_type="roberta"), "model_type='roberta'"),
      ("c6", dict(hidden_act="relu"), "hidden_act='relu'")]:
    folder = _copy_folder(hf_folder, str(tmp_path / name), skip=("config.json",))
    with open(os.path.join(hf_folder, "config.json")) as f:
      hf = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump({**hf, **change}, f)
    cases.append((folder, match))
  for folder, match in cases:
    assert _run_import(folder, str(tmp_path / "unused")) == 2, folder
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1, err
  # A workdir that already holds a checkpoint is not overwritten.
  assert _run_import(hf_folder, imported_workdir) == 2
  assert "is not empty" in capsys.readouterr().err
  # Export: only MLM workdirs, into an empty folder.
  image_workdir = tmp_path / "image"
  image_workdir.mkdir()
  (image_workdir / "config.json").write_text(json.dumps({"task": "classification"}))
  assert export_hf_bert.main(["--workdir", str(image_workdir), "--out", str(tmp_path / "o")]) == 2
  assert "only masked-LM BERT workdirs" in capsys.readouterr().err
  assert export_hf_bert.main(["--workdir", imported_workdir, "--out", hf_folder]) == 2
  assert "is not empty" in capsys.readouterr().err
