"""WordPiece tokenizers for the text models: load, train, encode, save.

A `TextTokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (Rust, fast) and
adds the BERT conventions the rest of mrl_jax relies on: five special tokens
[PAD] [UNK] [CLS] [SEP] [MASK] with known ids, and `encode` building the
model's inputs `[CLS] a [SEP]` (a pair: `[CLS] a [SEP] b [SEP]`), truncated
and padded to a fixed length, as int32 arrays.

Two file formats are read by `load_tokenizer`:
  * `vocab.txt`: one WordPiece token per line, the line index (from 0) being
    its id, continuation pieces prefixed `##` -- the format of Google's BERT
    checkpoints and `bert-base-uncased`. It is read as a BertWordPiece
    tokenizer: BERT's normalizer (clean control characters, spaces around CJK
    characters, lowercase and strip accents unless `lowercase=False`), BERT's
    pre-tokenizer (split on whitespace and punctuation), WordPiece with
    `[UNK]` for words it cannot cover and words longer than 100 characters.
    This gives the same ids as `transformers.BertTokenizer(vocab.txt)`.
  * `tokenizer.json`: any Hugging Face tokenizer file (what `save` writes).
A directory is looked into for `tokenizer.json` first, then `vocab.txt`.

`train_wordpiece(texts, vocab_size)` learns a vocabulary from local text
(deterministically, with `wordpiece_vocab.learn_vocab`); ids 0..4 are
[PAD] [UNK] [CLS] [SEP] [MASK].
The command line is `python -m mrl_jax.tools.train_tokenizer`.
"""

from __future__ import annotations

import collections
import functools
import os
import re
from typing import Iterable, Sequence

import numpy as np

from mrl_jax.errors import UserError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # Trained vocabularies use ids 0..4 in this order.
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
CONTINUATION_PREFIX = "##"
MAX_INPUT_CHARS_PER_WORD = 100  # BERT's: a longer word becomes [UNK].


class TokenizerFileError(UserError, ValueError):
  """A tokenizer file that cannot be used (unreadable, or without BERT's special tokens)."""


class TokenizerNotFoundError(UserError, FileNotFoundError):
  """No tokenizer file at the given path."""


class TextTokenizer:
  """A WordPiece (or any `tokenizers`) tokenizer with BERT's special tokens.

  Attributes:
    vocab_size: number of ids (added tokens included); ids are 0..vocab_size-1.
    pad_id, cls_id, sep_id, mask_id, unk_id: the special tokens' ids.
    special_ids: the five of them, sorted.
    path: the file it was loaded from (None if trained in this process).
  """

  def __init__(self, tokenizer, *, path: str | None = None):
    self._tokenizer = tokenizer
    self.path = path
    where = path or "the trained tokenizer"
    ids = {}
    for token in SPECIAL_TOKENS:
      ids[token] = tokenizer.token_to_id(token)
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise TokenizerFileError(
          f"{where} has no {' '.join(missing)} token(s): a BERT vocabulary needs all of "
          f"{' '.join(SPECIAL_TOKENS)}; add them (e.g. as its first lines) or retrain it with "
          f"`python -m mrl_jax.tools.train_tokenizer`.")
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        int(ids[t]) for t in SPECIAL_TOKENS)
    self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    self.special_ids = tuple(sorted({self.pad_id, self.unk_id, self.cls_id, self.sep_id,
                                     self.mask_id}))
    if max(self.special_ids) >= self.vocab_size:
      raise TokenizerFileError(f"{where}: a special token's id is not below the vocabulary "
                               f"size {self.vocab_size}; the ids must be 0..size-1.")

  @property
  def backend(self):
    """The wrapped `tokenizers.Tokenizer`."""
    return self._tokenizer

  def __repr__(self) -> str:
    return f"TextTokenizer(vocab_size={self.vocab_size}, path={self.path!r})"

  def tokenize_ids(self, text: str) -> list[int]:
    """The ids of `text`, without special tokens and without truncation."""
    return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

  def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`tokenize_ids` of each text (in parallel threads inside `tokenizers`)."""
    encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [list(e.ids) for e in encodings]

  def id_to_token(self, token_id: int) -> str | None:
    return self._tokenizer.id_to_token(int(token_id))

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def encode(self, texts: Sequence[str], seq_len: int, *,
             pair: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Model inputs for `texts` (and second segments `pair`), int32 [N, seq_len].

    Returns input_ids (`[CLS] a [SEP]`, or `[CLS] a [SEP] b [SEP]`, then
    [PAD]s), token_type_ids (0 for [CLS], a and its [SEP]; 1 for b and its
    [SEP]; 0 on padding) and attention_mask (1 on real tokens). Too long
    inputs are cut at the end; a pair as Hugging Face's "longest_first" does
    (see `_longest_first`).
    """
    if isinstance(texts, str):
      raise TypeError("encode takes a sequence of texts; wrap a single text in a list.")
    texts = list(texts)
    specials = 2 if pair is None else 3
    if seq_len < specials + 1:
      raise ValueError(f"seq_len={seq_len} leaves no room for text besides the "
                       f"{specials} special tokens.")
    first = self.tokenize_batch(texts)
    if pair is not None:
      pair = list(pair)
      if len(pair) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(pair)} pair texts.")
      second = self.tokenize_batch(pair)
    n = len(texts)
    input_ids = np.full((n, seq_len), self.pad_id, np.int32)
    token_type_ids = np.zeros((n, seq_len), np.int32)
    attention_mask = np.zeros((n, seq_len), np.int32)
    budget = seq_len - specials
    for row in range(n):
      a = first[row]
      if pair is None:
        a = a[:budget]
        ids = [self.cls_id] + a + [self.sep_id]
        types = [0] * len(ids)
      else:
        b = second[row]
        la, lb = _longest_first(len(a), len(b), budget)
        a, b = a[:la], b[:lb]
        ids = [self.cls_id] + a + [self.sep_id] + b + [self.sep_id]
        types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
      input_ids[row, :len(ids)] = ids
      token_type_ids[row, :len(ids)] = types
      attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": attention_mask}

  def vocab(self) -> list[str]:
    """The tokens by id (index = id); ValueError if the ids have gaps."""
    by_id = {i: t for t, i in self._tokenizer.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(len(by_id))):
      raise ValueError("The vocabulary's ids are not 0..size-1; it cannot be a vocab.txt.")
    return [by_id[i] for i in range(len(by_id))]

  def save(self, path: str) -> None:
    """Writes `tokenizer.json` to `path` (a file name, or a directory to write it in)."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, TOKENIZER_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._tokenizer.save(path)

  def save_vocab(self, path: str) -> None:
    """Writes the WordPiece vocabulary as `vocab.txt` (one token per line, by id)."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, VOCAB_FILE)
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(t + "\n" for t in self.vocab()))


def _longest_first(la: int, lb: int, budget: int) -> tuple[int, int]:
  """Lengths a pair of segments is cut to so that they fit in `budget` tokens.

  Hugging Face's "longest_first" (tokenizers' truncation.rs, which
  transformers' BertTokenizer uses too): the shorter segment is kept whole if
  it fits in half the budget and the longer one gets the rest; otherwise each
  gets half, the odd token going to the longer one (to b when they are equally
  long).
  """
  if la + lb <= budget:
    return la, lb
  swap = la > lb
  n1, n2 = (lb, la) if swap else (la, lb)
  n2 = n1 if n1 > budget else max(n1, budget - n1)
  if n1 + n2 > budget:
    n1 = budget // 2
    n2 = n1 + budget % 2
  return (n2, n1) if swap else (n1, n2)


def _bert_pipeline(model, lowercase: bool):
  """A `tokenizers.Tokenizer` around `model` with BERT's normalizer and pre-tokenizer."""
  from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = Tokenizer(model)
  # strip_accents=None follows lowercase, as in BERT (uncased strips accents).
  tokenizer.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
  return tokenizer


def read_vocab_file(path: str) -> dict[str, int]:
  """token -> id of a vocab.txt (line index = id); TokenizerFileError if unreadable."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise TokenizerFileError(f"{path} cannot be read ({type(e).__name__}: {e}).") from None
  vocab: dict[str, int] = {}
  lines = data.split(b"\n")
  if lines and lines[-1] == b"":
    lines.pop()  # The final newline ends the last token; it does not start one.
  for number, raw in enumerate(lines, start=1):
    try:
      token = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
      raise TokenizerFileError(f"{path} line {number} is not UTF-8: save the vocabulary "
                               f"as UTF-8.") from None
    if not token.strip():
      raise TokenizerFileError(f"{path} line {number} is blank: every line of a vocab.txt "
                               f"is a token (its id is the line's index).")
    # A repeated token keeps its first id (BERT's load_vocab keeps the last,
    # which leaves a hole in the ids); both are malformed, so refuse.
    if token in vocab:
      raise TokenizerFileError(f"{path} line {number}: token {token!r} repeats line "
                               f"{vocab[token] + 1}; tokens must be unique.")
    vocab[token] = number - 1
  if not vocab:
    raise TokenizerFileError(f"{path} lists no tokens.")
  return vocab


def resolve_tokenizer_file(path: str) -> str:
  """The tokenizer file `path` names: itself, or a directory's tokenizer.json / vocab.txt."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in (TOKENIZER_FILE, VOCAB_FILE):
      candidate = os.path.join(path, name)
      if os.path.isfile(candidate):
        return candidate
    raise TokenizerNotFoundError(f"No {TOKENIZER_FILE} or {VOCAB_FILE} in directory {path}: "
                                 f"give the tokenizer file, or train one with "
                                 f"`python -m mrl_jax.tools.train_tokenizer`.")
  if not os.path.isfile(path):
    raise TokenizerNotFoundError(f"No tokenizer file at {path}: give a vocab.txt or a "
                                 f"tokenizer.json (or a directory holding one).")
  return path


def load_tokenizer(path: str, *, lowercase: bool = True) -> TextTokenizer:
  """The tokenizer in `path`: a vocab.txt, a tokenizer.json, or a directory of one.

  `lowercase` applies to vocab.txt only (a tokenizer.json carries its own
  normalizer): True for uncased vocabularies such as bert-base-uncased.

  Raises:
    TokenizerNotFoundError: nothing at `path`.
    TokenizerFileError: the file is not a tokenizer, or lacks a special token.
  """
  path = resolve_tokenizer_file(path)
  if path.endswith(".json"):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    try:
      backend = Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except
      # The Rust side raises a bare Exception whose text may span lines.
      detail = " ".join(str(e).split())
      raise TokenizerFileError(f"{path} is not a Hugging Face tokenizer.json ({detail}).") from None
    return TextTokenizer(backend, path=path)
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  vocab = read_vocab_file(path)
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise TokenizerFileError(f"{path} has no {' '.join(missing)} token(s): a BERT vocabulary "
                             f"needs all of {' '.join(SPECIAL_TOKENS)}; add them or retrain it "
                             f"with `python -m mrl_jax.tools.train_tokenizer`.")
  model = models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD,
                           continuing_subword_prefix=CONTINUATION_PREFIX)
  backend = _bert_pipeline(model, lowercase)
  return TextTokenizer(backend, path=path)


# Special tokens in training text are cut out before normalisation, as encoding does.
_SPECIAL_TOKENS_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _word_counts(texts: Iterable[str], backend) -> collections.Counter:
  """word -> occurrences in `texts`, the words being what `backend`'s BERT
  normalizer and pre-tokenizer make of them (special tokens in the text are
  taken out first, as the tokenizer does when encoding)."""
  normalize = backend.normalizer.normalize_str
  pre_tokenize = backend.pre_tokenizer.pre_tokenize_str
  counts: collections.Counter = collections.Counter()
  for text in texts:
    for segment in _SPECIAL_TOKENS_RE.split(text):
      if segment:
        counts.update(word for word, _ in pre_tokenize(normalize(segment)))
  return counts


@functools.lru_cache(maxsize=8)
def _load_tokenizer_version(path: str, mtime: float | None) -> TextTokenizer:
  del mtime  # Part of the cache key only: an edited file is read again.
  return load_tokenizer(path)


def load_tokenizer_cached(path: str) -> TextTokenizer:
  """`load_tokenizer(path)`, read once per version of the file (its mtime): the data
  pipelines ask for it per split, iterator and evaluator."""
  try:
    mtime = os.stat(path).st_mtime
  except OSError:
    mtime = None  # load_tokenizer says what is missing.
  return _load_tokenizer_version(path, mtime)


def train_wordpiece(texts: Iterable[str], vocab_size: int, *, lowercase: bool = True,
                    min_frequency: int = 2) -> TextTokenizer:
  """A WordPiece tokenizer with BERT's normalisation, learnt from `texts`.

  Ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK], then the characters of the
  words (word-initial, then `##` continuations, by code point), then the
  pieces merged from the most frequent adjacent pairs, in merge order
  (`wordpiece_vocab.learn_vocab`); merging stops at `vocab_size` tokens or
  when no pair occurs `min_frequency` times. Words longer than
  MAX_INPUT_CHARS_PER_WORD are left out (they tokenise to [UNK] anyway).
  The vocabulary, and the saved files, depend only on the texts and the
  arguments: ties are broken by a fixed rule, not by the process's hash
  order (Hugging Face's WordPieceTrainer gives a different vocabulary in
  every process). Every training word that fits the alphabet tokenises
  without [UNK].
  """
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import wordpiece_vocab  # pylint: disable=g-import-not-at-top
  if vocab_size <= len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size={vocab_size}: must exceed the {len(SPECIAL_TOKENS)} "
                     f"special tokens.")
  splitter = _bert_pipeline(models.WordPiece(unk_token=UNK), lowercase)
  counts = _word_counts(texts, splitter)
  counts = {w: c for w, c in counts.items() if len(w) <= MAX_INPUT_CHARS_PER_WORD}
  tokens = wordpiece_vocab.learn_vocab(
      counts, int(vocab_size), min_frequency=int(min_frequency), special_tokens=SPECIAL_TOKENS,
      prefix=CONTINUATION_PREFIX)
  model = models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token=UNK,
                           max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD,
                           continuing_subword_prefix=CONTINUATION_PREFIX)
  backend = _bert_pipeline(model, lowercase)
  # As the trainer did: the specials are added tokens (never split, skipped by
  # decode); they keep their ids 0..4.
  backend.add_special_tokens(list(SPECIAL_TOKENS))
  return TextTokenizer(backend)
