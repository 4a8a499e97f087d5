"""A deterministic WordPiece vocabulary learner (pure Python).

`learn_vocab(word_counts, size, ...)` returns the tokens of a WordPiece
vocabulary learnt from a word -> count table, the way BERT's and Hugging
Face's WordPiece trainers do: every word starts as its characters (the first
one as is, the others as `##`-continuation pieces), and the most frequent
adjacent pair of pieces within words (each occurrence weighted by its word's
count) is merged into one new piece, again and again, until the vocabulary
is full or no pair occurs `min_frequency` times.

Why not `tokenizers.trainers.WordPieceTrainer`: its Rust trainer breaks
ties between equally frequent pairs by ids given out in HashMap order, which
is random per process, so the same text gives different vocabularies (even
different token sets) in different processes. Here every choice is by a
fixed rule, so the result depends only on the counts and the arguments:
  * the alphabet: word-initial characters by code point, then the
    continuation pieces `##c` by code point (when the alphabet alone does
    not fit, its most frequent pieces are kept, ties by code point);
  * merges: the highest pair count first; equal counts in lexicographic order
    of the pair (left piece, then right piece) as Python compares strings;
  * a merge whose piece is already in the vocabulary (`ab` + `##c` after
    `a` + `##bc`) is applied to the words but adds no token.
Pair counts are updated incrementally (only the words holding the merged
pair are re-counted) with a lazy heap, so thousands of merges over ~0.6M
words of text take seconds.
"""

from __future__ import annotations

import heapq
from typing import Mapping, Sequence

CONTINUATION_PREFIX = "##"


def _pairs(symbols: Sequence[str]) -> list[tuple[str, str]]:
  return list(zip(symbols[:-1], symbols[1:]))


def learn_vocab(word_counts: Mapping[str, int], size: int, *, min_frequency: int = 2,
                special_tokens: Sequence[str] = (),
                prefix: str = CONTINUATION_PREFIX) -> list[str]:
  """The vocabulary (tokens by id) learnt from `word_counts`, at most `size` tokens.

  Args:
    word_counts: word -> number of occurrences (words as the pre-tokenizer
      gives them; empty words and counts <= 0 are ignored).
    size: the most tokens, `special_tokens` included.
    min_frequency: merging stops when the most frequent pair occurs fewer
      times than this (the alphabet is always kept, as far as it fits).
    special_tokens: the first tokens, in this order.
    prefix: the continuation prefix of pieces that do not start a word.
  """
  vocab = list(special_tokens)
  known = set(vocab)
  # The words in a fixed order (the table's own order may be arbitrary).
  words = sorted((w, int(c)) for w, c in word_counts.items() if w and int(c) > 0)
  symbols = [[w[0]] + [prefix + ch for ch in w[1:]] for w, _ in words]
  freqs = [c for _, c in words]

  alphabet_counts: dict[str, int] = {}
  for syms, freq in zip(symbols, freqs):
    for s in syms:
      alphabet_counts[s] = alphabet_counts.get(s, 0) + freq
  alphabet = [s for s in alphabet_counts if s not in known]
  room = max(size - len(vocab), 0)
  if len(alphabet) > room:
    alphabet = sorted(alphabet, key=lambda s: (-alphabet_counts[s], s))[:room]
  # Word-initial characters first, then continuation pieces, each by code point.
  alphabet.sort(key=lambda s: (s.startswith(prefix), s))
  vocab.extend(alphabet)
  known.update(alphabet)
  if len(vocab) >= size:
    return vocab

  pair_counts: dict[tuple[str, str], int] = {}
  pair_words: dict[tuple[str, str], set[int]] = {}  # May hold stale indices.
  for index, (syms, freq) in enumerate(zip(symbols, freqs)):
    for pair in _pairs(syms):
      pair_counts[pair] = pair_counts.get(pair, 0) + freq
      pair_words.setdefault(pair, set()).add(index)
  # A min-heap on (-count, left, right) pops the highest count and, among equal
  # counts, the lexicographically smallest pair. Entries whose count is no
  # longer the pair's are skipped when popped (each change pushes a new one).
  heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
  heapq.heapify(heap)
  prefix_len = len(prefix)

  while len(vocab) < size and heap:
    neg_count, a, b = heapq.heappop(heap)
    count = pair_counts.get((a, b), 0)
    if count != -neg_count:
      continue
    if count < max(min_frequency, 1):
      break
    merged = a + b[prefix_len:]
    if merged not in known:
      vocab.append(merged)
      known.add(merged)
    delta: dict[tuple[str, str], int] = {}
    for index in sorted(pair_words.pop((a, b), ())):
      syms = symbols[index]
      out: list[str] = []
      i = 0
      while i < len(syms):  # Left to right, non-overlapping (a a a -> aa a).
        if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
          out.append(merged)
          i += 2
        else:
          out.append(syms[i])
          i += 1
      if len(out) == len(syms):
        continue  # A stale index: the pair left this word in an earlier merge.
      symbols[index] = out
      freq = freqs[index]
      for pair in _pairs(syms):
        delta[pair] = delta.get(pair, 0) - freq
      for pair in _pairs(out):
        delta[pair] = delta.get(pair, 0) + freq
        pair_words.setdefault(pair, set()).add(index)
    pair_counts.pop((a, b), None)
    delta.pop((a, b), None)
    for pair, change in delta.items():
      if not change:
        continue
      new_count = pair_counts.get(pair, 0) + change
      if new_count <= 0:
        pair_counts.pop(pair, None)
        pair_words.pop(pair, None)
      else:
        pair_counts[pair] = new_count
        heapq.heappush(heap, (-new_count,) + pair)
  return vocab
