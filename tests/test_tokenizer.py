"""WordPiece tokenizers: ids checked against transformers' BertTokenizer on real text."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from mrl_jax.data import text_demo
from mrl_jax.data import tokenizer as tokenizer_lib
from mrl_jax.data import wordpiece_vocab
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


# ------------------------------------------------------------ deterministic training
_NUMBERS = "zero one two three four five six seven eight nine".split()
_COLOURS = "red green blue yellow white".split()
# Caption-like text with many equally frequent pairs: Hugging Face's trainer
# broke such ties in a per-process random order.
_TIED_TEXTS = [f"a {c} {n} and a {d} {m}" for c in _COLOURS for n in _NUMBERS
               for d in _COLOURS[::-1] for m in _NUMBERS[::-1]]

_TRAIN_SCRIPT = """
import sys
from mrl_jax.data import tokenizer
with open(sys.argv[1], encoding="utf-8") as f:
  texts = f.read().splitlines()
trained = tokenizer.train_wordpiece(texts, int(sys.argv[3]))
trained.save(sys.argv[2] + "/tokenizer.json")
trained.save_vocab(sys.argv[2] + "/vocab.txt")
"""


def test_training_gives_the_same_files_in_every_process(tmp_path):
  corpus = tmp_path / "texts.txt"
  corpus.write_text("\n".join(_TIED_TEXTS + text_demo.lee_background_documents()[:20]) + "\n",
                    encoding="utf-8")
  outputs = []
  for seed in ("0", "1", "2"):
    out = tmp_path / f"run{seed}"
    out.mkdir()
    env = dict(os.environ, PYTHONHASHSEED=seed)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(tokenizer_lib.__file__)))]
        + [p for p in [env.get("PYTHONPATH")] if p])
    subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, str(corpus), str(out), "600"],
                   env=env, check=True, timeout=300)
    outputs.append(((out / "vocab.txt").read_bytes(), (out / "tokenizer.json").read_bytes()))
  assert outputs[0] == outputs[1] == outputs[2]
  # And the same as in this process.
  here = tokenizer_lib.train_wordpiece(corpus.read_text(encoding="utf-8").splitlines(), 600)
  assert "".join(t + "\n" for t in here.vocab()).encode("utf-8") == outputs[0][0]


def _naive_learn_vocab(word_counts, size, min_frequency, specials):
  """The learner's rule, recounting every pair from scratch before each merge."""
  words = {w: [w[0]] + ["##" + ch for ch in w[1:]] for w in word_counts}
  initial = sorted({p[0] for p in words.values()})
  continuation = sorted({s for p in words.values() for s in p[1:]})
  vocab = list(specials) + initial + continuation
  while len(vocab) < size:
    counts = collections.Counter()
    for w, pieces in words.items():
      for pair in zip(pieces, pieces[1:]):
        counts[pair] += word_counts[w]
    if not counts:
      break
    best = min(counts, key=lambda pair: (-counts[pair], pair))
    if counts[best] < min_frequency:
      break
    a, b = best
    merged = a + b[2:]
    if merged not in vocab:
      vocab.append(merged)
    for w, pieces in words.items():
      out, i = [], 0
      while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
          out.append(merged)
          i += 2
        else:
          out.append(pieces[i])
          i += 1
      words[w] = out
  return vocab


def test_merges_closed_form():
  # "aaaa": (##a, ##a) occurs twice (weight 1 each) and beats (a, ##a); it is
  # merged left to right without overlap (a ##aa ##a); then the two pairs
  # left tie at 1 and "##" sorts before "a", so ##aaa comes before aaaa.
  assert wordpiece_vocab.learn_vocab({"aaaa": 1}, 100, min_frequency=1) == [
      "a", "##a", "##aa", "##aaa", "aaaa"]
  # Pair counts are weighted by word counts: (c, ##d) 3 > (a, ##b) 2.
  assert wordpiece_vocab.learn_vocab({"ab": 2, "cd": 3}, 100)[4:] == ["cd", "ab"]
  # Equal counts: lexicographic on (left, right), so ab before cd.
  assert wordpiece_vocab.learn_vocab({"cd": 3, "ab": 3}, 100)[4:] == ["ab", "cd"]
  # xyz: (##y, ##z) and (x, ##y) tie at 2; ##yz first, then x + ##yz.
  assert wordpiece_vocab.learn_vocab({"xyz": 2}, 100, special_tokens=("[S]",)) == [
      "[S]", "x", "##y", "##z", "##yz", "xyz"]


@pytest.mark.parametrize("seed", range(4))
def test_incremental_counts_match_recounting(seed):
  rng = random.Random(seed)
  letters = "abcde"[:3 + seed % 3]
  counts = {}
  for _ in range(60):
    word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 7)))
    counts[word] = rng.randint(1, 4)  # Small counts: many ties.
  for size, min_frequency in ((40, 2), (400, 1), (400, 5)):
    got = wordpiece_vocab.learn_vocab(counts, size, min_frequency=min_frequency,
                                      special_tokens=tokenizer_lib.SPECIAL_TOKENS)
    assert got == _naive_learn_vocab(counts, size, min_frequency, tokenizer_lib.SPECIAL_TOKENS)


def test_train_wordpiece_limits():
  texts = ["ab ab ab, CD cd cd."]
  specials = list(tokenizer_lib.SPECIAL_TOKENS)
  alphabet = [",", ".", "a", "c", "##b", "##d"]
  # min_frequency above every pair count (3): the alphabet only.
  assert tokenizer_lib.train_wordpiece(texts, 100, min_frequency=4).vocab() == specials + alphabet
  assert tokenizer_lib.train_wordpiece(texts, 100).vocab() == specials + alphabet + ["ab", "cd"]
  # vocab_size stops the merges, and when the alphabet does not fit its most
  # frequent pieces are kept (ties by code point).
  assert tokenizer_lib.train_wordpiece(texts, 12).vocab() == specials + alphabet + ["ab"]
  small = tokenizer_lib.train_wordpiece(texts, 8)
  assert small.vocab() == specials + ["a", "##b", "##d"]  # Of a, c, ##b, ##d (3 each).
  assert small.tokenize_ids("cd ab ,") == [1, 5, 6, 1]  # A word with a lost piece: [UNK].
  # Cased training keeps CD apart from cd.
  assert "CD" in tokenizer_lib.train_wordpiece(texts * 2, 100, lowercase=False).vocab()
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train_wordpiece(texts, 5)


def test_special_tokens_in_training_text_stay_special():
  trained = tokenizer_lib.train_wordpiece(["the [MASK] sat [SEP] on the mat"] * 3, 100)
  assert "mask" not in trained.vocab() and "[" not in trained.vocab()
  assert trained.tokenize_ids("[MASK] [SEP]") == [trained.mask_id, trained.sep_id]
  assert trained.decode(trained.encode(["the mat"], 8)["input_ids"][0]) == "the mat"


def test_every_training_word_tokenises_without_unk(trained):
  docs = text_demo.lee_background_documents()
  backend = trained[0].backend
  words = {w for d in docs for w, _ in backend.pre_tokenizer.pre_tokenize_str(
      backend.normalizer.normalize_str(d))}
  for tokenizer in (trained[0], tokenizer_lib.train_wordpiece(docs, 300)):
    words_list = sorted(words)
    for word, ids in zip(words_list, tokenizer.tokenize_batch(words_list)):
      assert tokenizer.unk_id not in ids, word
      pieces = [tokenizer.id_to_token(i) for i in ids]
      assert pieces[0] + "".join(p[2:] for p in pieces[1:]) == word
