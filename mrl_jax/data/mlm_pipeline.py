"""Grain input pipelines for masked-language-model training on a text corpus.

Fields read from the `data` ConfigDict (a missing field takes its default; an
unknown field is a ConfigError):

  name             TFDS text dataset with a "text" feature: "mrl_text_demo"
                   (embedded, built on first use, see text_demo.py), a corpus
                   built with `python -m mrl_jax.tools.build_text_corpus`, or
                   any prepared array_record dataset. Default "mrl_text_demo".
  data_dir         TFDS data_dir; None = TFDS's default. Default None.
  train_split      Default "train".
  eval_split       Default "validation".
  tokenizer        A vocab.txt, tokenizer.json or a directory of one
                   (`tokenizer.load_tokenizer`); None = the corpus's own,
                   trained at build time and stored beside it. Default None.
  seq_len          Tokens per sequence, [CLS] and [SEP] included. Default 128.
  mask_rate        Fraction of a sequence's real tokens to predict. Default 0.15.
  max_predictions  Masked positions per sequence (the width of masked_*);
                   None = max(1, round(mask_rate * seq_len)) (BERT's
                   max_predictions_per_seq: 19 for 128 tokens), which no
                   sequence exceeds. Default None.
  text_key         The text feature. Default "text".
  worker_count     Grain worker processes; 0 = none. Default 0.
  prefetch         Batches prepared ahead (a thread, or per worker). Default 2.
  on_bad_example   A document that cannot be read, is not UTF-8 or is empty:
                   "stop" raises DataError naming the dataset, split and
                   example index; "skip" leaves it out (logged once). Default "stop".

Packing: each document is tokenized (no specials) and cut into chunks of
seq_len - 2 tokens, each becoming one sequence `[CLS] chunk [SEP]` followed by
[PAD]s; a sequence never spans two documents. The sequences are numbered by
document (in the split's stored order), then chunk. The whole split is
tokenized once per process when an iterator is first made (kept in memory
with the chunks as one int32 array): 1-2 s for the demo's 0.62M train tokens
(5,139 sequences of 128, 93 % of them full). Memory grows as 4 * seq_len bytes
per sequence and the tokenizing time with the corpus, so a corpus of billions
of tokens would need the packed arrays precomputed on disk instead. Masking
runs at about 190 batches of 64 x 128 per second in one thread (2-core CPU);
worker_count > 0 gives the same batches (measured with 2 workers).

Masking (BERT): of a sequence's real tokens other than the special tokens
([PAD] [UNK] [CLS] [SEP] [MASK] are never chosen), max(1, round(mask_rate * n))
positions are chosen at random (at most max_predictions); each chosen token
becomes [MASK] with probability 0.8, a random non-special token with 0.1, and
stays as it is with 0.1. Training draws it from `np.random.default_rng((seed,
epoch, sequence))`, evaluation from `((EVAL_MASK_SEED, sequence))`, so the
masks depend neither on the worker count nor on the process count.

Batches are dicts of numpy arrays (this process's rows): input_ids,
token_type_ids (all 0), attention_mask int32 [B, seq_len]; masked_positions,
masked_ids (the original ids there) int32 [B, max_predictions];
masked_weights float32 [B, max_predictions] (1 = a prediction, 0 = padding,
whose position and id are 0). Evaluation batches add "mask" float32 [B].

Layout across processes, as for images (pipeline.py): a seeded permutation of
the sequences per epoch, batched at the local size B / P, process p taking
batches p, p + P, ...; the iterator's state {"next_index": step} means the
same for any process count, and `checkpointing.IteratorStateHandler` saves it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterator, Sequence

from absl import logging
import grain
import numpy as np

from mrl_jax.errors import ConfigError
from mrl_jax.data import pipeline
from mrl_jax.data import sources
from mrl_jax.data import tokenizer as tokenizer_lib
from mrl_jax.data.pipeline import DataError

DEFAULTS: dict[str, Any] = dict(
    name="mrl_text_demo",
    data_dir=None,
    train_split="train",
    eval_split="validation",
    tokenizer=None,
    seq_len=128,
    mask_rate=0.15,
    max_predictions=None,
    text_key="text",
    worker_count=0,
    prefetch=2,
    on_bad_example="stop",
)
MASK_TOKEN_FRACTION = 0.8    # Of the chosen positions: -> [MASK].
RANDOM_TOKEN_FRACTION = 0.1  # -> a random token; the rest stay unchanged.
EVAL_MASK_SEED = 0
_TOKENIZE_CHUNK = 1024       # Documents per call into the Rust tokenizer.


@dataclasses.dataclass(frozen=True)
class TextDataInfo:
  vocab_size: int
  num_train_examples: int  # Training sequences per epoch.
  seq_len: int
  max_predictions: int
  tokenizer_path: str
  pad_id: int
  cls_id: int
  sep_id: int
  mask_id: int
  num_documents: int       # Documents of the train split that made sequences.


def _settings(cfg) -> dict[str, Any]:
  s = pipeline.merged_settings(cfg, DEFAULTS, kind=" for text data",
                               module="mrl_jax/data/mlm_pipeline.py")
  seq_len = s["seq_len"]
  if isinstance(seq_len, bool) or int(seq_len) != seq_len or seq_len < 3:
    raise ConfigError(f"data.seq_len={seq_len!r}: need an int >= 3 ([CLS], a token, [SEP]).")
  s["seq_len"] = int(seq_len)
  if not 0.0 < float(s["mask_rate"]) <= 1.0:
    raise ConfigError(f"data.mask_rate={s['mask_rate']!r}: need 0 < rate <= 1.")
  if s["max_predictions"] is None:
    s["max_predictions"] = max(1, int(round(float(s["mask_rate"]) * s["seq_len"])))
  else:
    m = s["max_predictions"]
    if isinstance(m, bool) or int(m) != m or not 1 <= m <= s["seq_len"] - 2:
      raise ConfigError(f"data.max_predictions={m!r}: need an int in [1, seq_len - 2 = "
                        f"{s['seq_len'] - 2}] (or None).")
    s["max_predictions"] = int(m)
  for key in ("worker_count", "prefetch"):
    if int(s[key]) < 0:
      raise ConfigError(f"data.{key}={s[key]}: must be >= 0.")
  return s


# ------------------------------------------------------------------ tokenizer
def _tokenizer_file(s: dict[str, Any]) -> str:
  """The file of the tokenizer `s` names (the corpus's own when tokenizer is None)."""
  from mrl_jax.data import text_corpus  # pylint: disable=g-import-not-at-top
  return text_corpus.data_tokenizer_file(s["tokenizer"], name=s["name"],
                                         split=s["train_split"], data_dir=s["data_dir"])


def _tokenizer(s: dict[str, Any]) -> tokenizer_lib.TextTokenizer:
  return tokenizer_lib.load_tokenizer_cached(_tokenizer_file(s))


def load_data_tokenizer(data_cfg) -> tokenizer_lib.TextTokenizer:
  """The tokenizer of `data_cfg`: data.tokenizer, or the corpus's own when None."""
  return _tokenizer(_settings(data_cfg))


# ------------------------------------------------------------------ packing
@dataclasses.dataclass(frozen=True)
class PackedSplit:
  """A split's documents tokenized and cut into sequences (see module doc)."""
  input_ids: np.ndarray     # int32 [num_sequences, seq_len], [CLS] ... [SEP] [PAD]...
  lengths: np.ndarray       # int32 [num_sequences], real tokens incl. [CLS] and [SEP].
  document: np.ndarray      # int64 [num_sequences], the source example index.
  num_documents: int        # Documents that made sequences.
  num_skipped: int          # Bad documents left out (on_bad_example="skip").

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])


_LOGGED_BAD: set[tuple[str, str, int]] = set()


def _document_text(source, index: int, s: dict[str, Any], split: str) -> str:
  """The text of example `index`; DataError ("stop") or None ("skip") if it is bad."""
  where = f"{s['name']}/{split} example {index}"
  try:
    record = source[index]
    value = record[s["text_key"]]
  except KeyError:
    raise ConfigError(f"Dataset {s['name']!r} has no feature {s['text_key']!r}: set "
                      f"data.text_key to its text feature.") from None
  except Exception as e:  # pylint: disable=broad-except
    problem = f"cannot be read ({type(e).__name__}: {' '.join(str(e).split())})"
  else:
    problem = None
    if isinstance(value, np.ndarray) and value.shape == ():
      value = value.item()
    if isinstance(value, bytes):
      try:
        value = value.decode("utf-8")
      except UnicodeDecodeError as e:
        problem = f"text is not UTF-8 (byte 0x{value[e.start]:02x} at {e.start})"
    if problem is None and not isinstance(value, str):
      problem = f"text {s['text_key']!r} is {type(value).__name__}, not a string"
    if problem is None and not value.strip():
      problem = "text is empty"
  if problem is None:
    return value
  message = f"{where}: {problem}."
  if s["on_bad_example"] == "stop":
    raise DataError(f"{message} {pipeline._FIX}")  # pylint: disable=protected-access
  key = (s["name"], split, int(index))
  if key not in _LOGGED_BAD:
    _LOGGED_BAD.add(key)
    logging.warning("Skipping a bad document (data.on_bad_example=\"skip\"): %s", message)
  return None


def pack_documents(token_ids: Sequence[Sequence[int]], seq_len: int, cls_id: int,
                   sep_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(input_ids int32 [S, seq_len], lengths int32 [S], document int64 [S]).

  Document d's ids are cut into chunks of seq_len - 2; each is `[CLS] chunk
  [SEP]` padded with pad_id. An empty document makes no sequence.
  """
  body = seq_len - 2
  counts = [math.ceil(len(ids) / body) for ids in token_ids]
  total = int(sum(counts))
  input_ids = np.full((total, seq_len), pad_id, np.int32)
  lengths = np.zeros(total, np.int32)
  document = np.zeros(total, np.int64)
  row = 0
  for d, ids in enumerate(token_ids):
    ids = np.asarray(ids, np.int32)
    for start in range(0, len(ids), body):
      piece = ids[start:start + body]
      input_ids[row, 0] = cls_id
      input_ids[row, 1:1 + len(piece)] = piece
      input_ids[row, 1 + len(piece)] = sep_id
      lengths[row] = len(piece) + 2
      document[row] = d
      row += 1
  return input_ids, lengths, document


@functools.lru_cache(maxsize=8)
def _packed_cached(name: str, split: str, data_dir: str | None, text_key: str,
                   on_bad_example: str, seq_len: int, tokenizer_path: str,
                   tokenizer_mtime: float | None, dataset_path: str) -> PackedSplit:
  del dataset_path  # Part of the cache key only: a rebuilt dataset is read again.
  s = dict(DEFAULTS, name=name, data_dir=data_dir, text_key=text_key,
           on_bad_example=on_bad_example)
  tokenizer = tokenizer_lib.load_tokenizer_cached(tokenizer_path)
  source, _ = sources.open_source(name, split, data_dir)
  indices, token_ids, skipped = [], [], 0
  for start in range(0, len(source), _TOKENIZE_CHUNK):
    texts = []
    for i in range(start, min(start + _TOKENIZE_CHUNK, len(source))):
      text = _document_text(source, i, s, split)
      if text is None:
        skipped += 1
      else:
        indices.append(i)
        texts.append(text)
    token_ids.extend(tokenizer.tokenize_batch(texts))
  input_ids, lengths, document = pack_documents(
      token_ids, seq_len, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)
  document = np.asarray(indices, np.int64)[document] if len(document) else document
  for array in (input_ids, lengths, document):
    array.flags.writeable = False  # Shared by every iterator of this process.
  return PackedSplit(input_ids=input_ids, lengths=lengths, document=document,
                     num_documents=sum(1 for ids in token_ids if ids), num_skipped=skipped)


def packed_split(data_cfg, split: str | None = None) -> PackedSplit:
  """The tokenized, packed sequences of `split` (default data.train_split)."""
  return _packed(_settings(data_cfg), split)


def _packed(s: dict[str, Any], split: str | None) -> PackedSplit:
  split = split or s["train_split"]
  tokenizer_path = _tokenizer_file(s)
  _tokenizer(s)  # Loads (and checks) it before the split is read.
  _, info = sources.open_source(s["name"], split, s["data_dir"])
  if s["text_key"] not in info.features:
    raise ConfigError(f"Dataset {s['name']!r} has no feature {s['text_key']!r}; it has "
                      f"{sorted(info.features.keys())}. Is it a text corpus? Set data.text_key.")
  try:
    mtime = os.stat(tokenizer_path).st_mtime
  except OSError:
    mtime = None
  return _packed_cached(s["name"], split, s["data_dir"], s["text_key"], s["on_bad_example"],
                        s["seq_len"], tokenizer_path, mtime, os.fspath(info.data_dir))


# ------------------------------------------------------------------ masking
def mask_sequence(input_ids: np.ndarray, rng: np.random.Generator, *, mask_rate: float,
                  max_predictions: int, mask_id: int, special_ids: np.ndarray,
                  random_ids: np.ndarray) -> dict[str, np.ndarray]:
  """BERT's masking of one sequence (see module doc); `input_ids` is not changed.

  `special_ids` are never chosen; `random_ids` are the ids a "random token"
  is drawn from (the non-special ones).
  """
  candidates = np.flatnonzero(~np.isin(input_ids, special_ids))
  count = 0
  if len(candidates):
    count = min(max_predictions, max(1, int(round(len(candidates) * mask_rate))))
  chosen = np.sort(rng.choice(candidates, count, replace=False)) if count else candidates[:0]
  u = rng.random(count)
  replacement = random_ids[rng.integers(0, len(random_ids), count)]
  masked = np.array(input_ids, np.int32, copy=True)
  original = masked[chosen]
  to_mask = u < MASK_TOKEN_FRACTION
  to_random = u >= MASK_TOKEN_FRACTION + RANDOM_TOKEN_FRACTION
  masked[chosen[to_mask]] = mask_id
  masked[chosen[to_random]] = replacement[to_random]
  positions = np.zeros(max_predictions, np.int32)
  ids = np.zeros(max_predictions, np.int32)
  weights = np.zeros(max_predictions, np.float32)
  positions[:count], ids[:count], weights[:count] = chosen, original, 1.0
  return {"input_ids": masked, "masked_positions": positions, "masked_ids": ids,
          "masked_weights": weights}


class _Masker:
  """Sequence index (and a seed key) -> one masked example (picklable for workers)."""

  def __init__(self, packed: PackedSplit, s: dict[str, Any],
               tokenizer: tokenizer_lib.TextTokenizer):
    self._ids, self._lengths = packed.input_ids, packed.lengths
    self._mask_rate, self._max_predictions = float(s["mask_rate"]), int(s["max_predictions"])
    self._mask_id, self._pad_id = tokenizer.mask_id, tokenizer.pad_id
    self._special = np.asarray(tokenizer.special_ids, np.int32)
    self._random = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int32), self._special)

  def example(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = self._ids[index]
    out = mask_sequence(ids, rng, mask_rate=self._mask_rate,
                        max_predictions=self._max_predictions, mask_id=self._mask_id,
                        special_ids=self._special, random_ids=self._random)
    seq_len = ids.shape[0]
    out["token_type_ids"] = np.zeros(seq_len, np.int32)
    out["attention_mask"] = (np.arange(seq_len) < self._lengths[index]).astype(np.int32)
    return out

  def padding(self) -> dict[str, np.ndarray]:
    """An evaluation padding row: all [PAD], nothing attended, nothing predicted."""
    seq_len = self._ids.shape[1]
    zeros = np.zeros(self._max_predictions, np.int32)
    return {"input_ids": np.full(seq_len, self._pad_id, np.int32),
            "masked_positions": zeros, "masked_ids": zeros.copy(),
            "masked_weights": np.zeros(self._max_predictions, np.float32),
            "token_type_ids": np.zeros(seq_len, np.int32),
            "attention_mask": np.zeros(seq_len, np.int32)}


class _TrainExample:
  """Position in the shuffled, repeated order -> a masked example seeded by (seed, epoch, index)."""

  def __init__(self, masker: _Masker, num_sequences: int, seed: int):
    self._masker, self._n, self._seed = masker, num_sequences, int(seed)

  def __call__(self, position: int, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self._seed, position // self._n, int(index)))
    return self._masker.example(int(index), rng)


# ------------------------------------------------------------------ public API
def text_dataset_info(data_cfg) -> TextDataInfo:
  """Vocabulary, special ids and the train split's size in sequences (packs the train split).

  Raises sources.DatasetNotPreparedError for an absent dataset (the embedded
  demo corpus is built on first use).
  """
  s = _settings(data_cfg)
  tokenizer = _tokenizer(s)
  packed = _packed(s, s["train_split"])
  return TextDataInfo(
      vocab_size=tokenizer.vocab_size, num_train_examples=len(packed), seq_len=s["seq_len"],
      max_predictions=s["max_predictions"], tokenizer_path=_tokenizer_file(s),
      pad_id=tokenizer.pad_id, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
      mask_id=tokenizer.mask_id, num_documents=packed.num_documents)


def _iterator_settings(s: dict[str, Any]) -> dict[str, Any]:
  # pipeline._to_iterator's knobs; reading happens in the consuming thread
  # (the examples are in memory already).
  return dict(read_threads=0, prefetch=int(s["prefetch"]), worker_count=int(s["worker_count"]))


def make_mlm_train_iterator(data_cfg, *, global_batch_size: int,
                            seed: int) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator over this process's masked training batches.

  Each epoch is a fresh seeded permutation of all sequences; batches run
  across epoch boundaries (see the module doc for the layout and keys).
  """
  s = _settings(data_cfg)
  process_index, process_count = pipeline.process_layout()
  local_batch = pipeline._local_batch_size(global_batch_size, process_count)  # pylint: disable=protected-access
  tokenizer = _tokenizer(s)
  packed = _packed(s, s["train_split"])
  if len(packed) < 1:
    raise DataError(f"Split {s['name']}/{s['train_split']} has no text to train on "
                    f"({packed.num_skipped} bad documents skipped).")
  masker = _Masker(packed, s, tokenizer)
  order = grain.MapDataset.range(len(packed)).shuffle(seed=int(seed) % 2**32).repeat()
  ds = order.map_with_index(_TrainExample(masker, len(packed), seed))
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  return pipeline._to_iterator(ds, _iterator_settings(s))  # pylint: disable=protected-access


def make_mlm_eval_batches(data_cfg, *, global_batch_size: int,
                          split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split`'s sequences (default data.eval_split), masked the same every call.

  Padded to ceil(S / global_batch_size) global batches; "mask" float32 [B]
  is 1 on real sequences, 0 on padding rows (all [PAD], attention 0,
  masked_weights 0). Every sequence appears once across processes and steps.
  """
  s = _settings(data_cfg)
  split = split or s["eval_split"]
  process_index, process_count = pipeline.process_layout()
  local_batch = pipeline._local_batch_size(global_batch_size, process_count)  # pylint: disable=protected-access
  tokenizer = _tokenizer(s)
  packed = _packed(s, split)
  masker = _Masker(packed, s, tokenizer)
  n = len(packed)
  padded = max(math.ceil(n / global_batch_size), 1) * global_batch_size

  def example(i: int) -> dict[str, np.ndarray]:
    if i < n:
      out = masker.example(i, np.random.default_rng((EVAL_MASK_SEED, i)))
      out["mask"] = np.float32(1.0)
      return out
    out = masker.padding()
    out["mask"] = np.float32(0.0)
    return out

  ds = grain.MapDataset.range(padded).map(example)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  return pipeline._to_iterator(ds, _iterator_settings(s))  # pylint: disable=protected-access
