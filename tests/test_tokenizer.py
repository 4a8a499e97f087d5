"""WordPiece tokenizers: ids checked against transformers' BertTokenizer on real text."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from mrl_jax.data import text_demo
from mrl_jax.data import tokenizer as tokenizer_lib
from mrl_jax.errors import UserError
from mrl_jax.tools import train_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 3000-token vocabulary learnt from the Lee background news, saved both ways."""
  folder = tmp_path_factory.mktemp("tokenizer")
  tokenizer = tokenizer_lib.train_wordpiece(text_demo.lee_background_documents(), 3000)
  tokenizer.save(str(folder / "tokenizer.json"))
  tokenizer.save_vocab(str(folder / "vocab.txt"))
  return tokenizer, folder


@pytest.fixture(scope="module")
def lee_texts():
  """The 50 Lee documents (not in the vocabulary's training text; a pound sign, accents)."""
  docs, _ = text_demo.lee_similarity()
  return docs + ["Héllo WORLD, café naïve — déjà vu!", "ÅNGSTRÖM   x\ty\u00a0z", "?"]


def _hf(folder, lowercase=True):
  return transformers.BertTokenizer(str(folder / "vocab.txt"), do_lower_case=lowercase)


def test_special_tokens_come_first(trained):
  tokenizer, _ = trained
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
          tokenizer.mask_id) == (0, 1, 2, 3, 4)
  assert tokenizer.vocab_size == 3000
  assert tokenizer.vocab()[:5] == list(tokenizer_lib.SPECIAL_TOKENS)


@pytest.mark.parametrize("seq_len", [8, 64, 512])
def test_vocab_txt_gives_bert_tokenizer_ids(trained, lee_texts, seq_len):
  _, folder = trained
  ours = tokenizer_lib.load_tokenizer(str(folder / "vocab.txt")).encode(lee_texts, seq_len)
  ref = _hf(folder)(lee_texts, max_length=seq_len, truncation=True, padding="max_length",
                    return_tensors="np")
  for key in ("input_ids", "token_type_ids", "attention_mask"):
    assert ours[key].dtype == np.int32 and ours[key].shape == (len(lee_texts), seq_len)
    np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)


def test_pairs_are_truncated_as_bert_tokenizer_does(trained, lee_texts):
  _, folder = trained
  ours = tokenizer_lib.load_tokenizer(str(folder / "vocab.txt"))
  hf = _hf(folder)
  words = " ".join(lee_texts).split()
  rng = random.Random(0)
  # Every combination of short/long, equal/unequal, odd/even budgets.
  a = [" ".join(words[:rng.randint(0, 40)]) for _ in range(60)]
  b = [" ".join(words[300:300 + rng.randint(0, 40)]) for _ in range(60)]
  for seq_len in (5, 16, 31, 64):
    got = ours.encode(a, seq_len, pair=b)
    ref = hf(a, b, max_length=seq_len, truncation=True, padding="max_length", return_tensors="np")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
      np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{key} at {seq_len}")


def test_tokenize_ids_has_no_specials_and_matches_bert(trained, lee_texts):
  _, folder = trained
  ours = tokenizer_lib.load_tokenizer(str(folder / "vocab.txt"))
  hf = _hf(folder)
  for text in lee_texts:
    assert ours.tokenize_ids(text) == hf.encode(text, add_special_tokens=False)
  assert ours.tokenize_batch(lee_texts[:3]) == [ours.tokenize_ids(t) for t in lee_texts[:3]]


def test_cased_vocab_keeps_case(trained):
  _, folder = trained
  text = "Héllo World"
  ours = tokenizer_lib.load_tokenizer(str(folder / "vocab.txt"), lowercase=False)
  assert ours.tokenize_ids(text) == _hf(folder, lowercase=False).encode(
      text, add_special_tokens=False)
  assert ours.tokenize_ids(text) != tokenizer_lib.load_tokenizer(
      str(folder / "vocab.txt")).tokenize_ids(text)


def test_tokenizer_json_round_trip(trained, lee_texts):
  tokenizer, folder = trained
  for path in (folder / "tokenizer.json", folder):  # The file, or its directory.
    loaded = tokenizer_lib.load_tokenizer(str(path))
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.special_ids == tokenizer.special_ids
    for key, value in loaded.encode(lee_texts, 48).items():
      np.testing.assert_array_equal(value, tokenizer.encode(lee_texts, 48)[key])
  # vocab.txt lists the same tokens by id.
  lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
  assert lines == tokenizer.vocab()


def _one_line_user_error(excinfo, *needles):
  message = str(excinfo.value)
  assert isinstance(excinfo.value, UserError)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, message


def test_missing_files_are_named(tmp_path):
  with pytest.raises(tokenizer_lib.TokenizerNotFoundError) as e:
    tokenizer_lib.load_tokenizer(str(tmp_path / "nope.txt"))
  _one_line_user_error(e, str(tmp_path / "nope.txt"))
  with pytest.raises(tokenizer_lib.TokenizerNotFoundError) as e:
    tokenizer_lib.load_tokenizer(str(tmp_path))
  _one_line_user_error(e, str(tmp_path), "tokenizer.json", "vocab.txt")


def test_vocab_without_bert_specials_is_refused(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n##s\n", encoding="utf-8")
  with pytest.raises(tokenizer_lib.TokenizerFileError) as e:
    tokenizer_lib.load_tokenizer(str(path))
  _one_line_user_error(e, str(path), "[MASK]")
  path.write_text("[PAD]\n[UNK]\n\n[CLS]\n", encoding="utf-8")
  with pytest.raises(tokenizer_lib.TokenizerFileError) as e:
    tokenizer_lib.load_tokenizer(str(path))
  _one_line_user_error(e, str(path), "line 3")


def test_tokenizer_json_without_specials_or_broken_is_refused(trained, tmp_path):
  _, folder = trained
  spec = json.loads((folder / "tokenizer.json").read_text())
  spec["model"]["vocab"].pop("[MASK]")
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "[MASK]"]
  path = tmp_path / "tokenizer.json"
  path.write_text(json.dumps(spec))
  with pytest.raises(tokenizer_lib.TokenizerFileError) as e:
    tokenizer_lib.load_tokenizer(str(path))
  _one_line_user_error(e, str(path), "[MASK]")
  path.write_text("{not json")
  with pytest.raises(tokenizer_lib.TokenizerFileError) as e:
    tokenizer_lib.load_tokenizer(str(path))
  _one_line_user_error(e, str(path))


def test_train_tokenizer_cli(tmp_path, capsys):
  corpus = tmp_path / "news.txt"
  corpus.write_text("\n".join(text_demo.lee_background_documents()[:100]) + "\n", encoding="utf-8")
  with open(corpus, "ab") as f:
    f.write(b"caf\xe9 in Latin-1\n")  # Not a document: left out and counted.
  out = tmp_path / "tok"
  assert train_tokenizer.main(["--input", str(corpus), "--vocab_size", "1500",
                               "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "100 documents" in printed and "not_utf8 1" in printed
  assert sorted(os.listdir(out)) == ["tokenizer.json", "vocab.txt"]
  from_json = tokenizer_lib.load_tokenizer(str(out / "tokenizer.json"))
  from_vocab = tokenizer_lib.load_tokenizer(str(out / "vocab.txt"))
  assert from_json.vocab_size == from_vocab.vocab_size == 1500
  texts, _ = text_demo.lee_similarity()
  np.testing.assert_array_equal(from_json.encode(texts, 64)["input_ids"],
                                from_vocab.encode(texts, 64)["input_ids"])
  assert train_tokenizer.main(["--input", str(tmp_path / "missing.txt"), "--vocab_size", "100",
                               "--out", str(out)]) == 2
  assert "missing.txt" in capsys.readouterr().err
