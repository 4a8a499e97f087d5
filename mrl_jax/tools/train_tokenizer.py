r"""Trains a WordPiece tokenizer (BERT's normalisation) on local text files.

    python -m mrl_jax.tools.train_tokenizer --input a.txt b.txt --vocab_size 8000 \
        --out DIR [--format lines|blocks|jsonl] [--cased]

Writes DIR/tokenizer.json (read by `mrl_jax.data.tokenizer.load_tokenizer` and
`--config.data.tokenizer=DIR`) and DIR/vocab.txt (the same vocabulary in
BERT's format, readable by `transformers.BertTokenizer`). Ids 0..4 are [PAD]
[UNK] [CLS] [SEP] [MASK]. The input formats are those of `build_text_corpus`
(see mrl_jax/data/text_corpus.py); rows that are not documents (not UTF-8,
bad JSON, ...) are left out and counted in one summary line.

Exit status: 0 written, 2 a mistake in the arguments or the input (one
`error:` line).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Iterator, Sequence

from mrl_jax.data import text_corpus
from mrl_jax.data import tokenizer as tokenizer_lib
from mrl_jax.errors import UserError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m mrl_jax.tools.train_tokenizer",
      description="Train a WordPiece tokenizer on text files; writes tokenizer.json and vocab.txt.")
  parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                      help="Text files to learn the vocabulary from.")
  parser.add_argument("--vocab_size", type=int, required=True,
                      help="Vocabulary size, special tokens included (e.g. 8000; BERT's: 30522).")
  parser.add_argument("--out", required=True, help="Output directory.")
  parser.add_argument("--format", choices=text_corpus.FORMATS, default="lines",
                      help="lines: a document per line; blocks: blank-line-separated; "
                           'jsonl: {"text": ...} per line.')
  parser.add_argument("--cased", action="store_true",
                      help="Keep case and accents (default: lowercase and strip accents).")
  parser.add_argument("--min_frequency", type=int, default=2,
                      help="Fewest occurrences of a piece to enter the vocabulary.")
  args = parser.parse_args(argv)
  if args.vocab_size <= len(tokenizer_lib.SPECIAL_TOKENS):
    parser.error(f"--vocab_size must exceed the {len(tokenizer_lib.SPECIAL_TOKENS)} special tokens")
  return args


def _texts(paths: Sequence[str], text_format: str, skipped: collections.Counter,
           counts: collections.Counter) -> Iterator[str]:
  for path in paths:
    for item in text_corpus.read_documents(path, text_format):
      if isinstance(item, text_corpus.Document):
        counts["documents"] += 1
        yield item.text
      else:
        skipped[item[2].reason] += 1


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  missing = [p for p in args.input if not os.path.isfile(p)]
  try:
    if missing:
      raise text_corpus.TextFileNotFoundError(f"Input file(s) not found: {', '.join(missing)}.")
    skipped, counts = collections.Counter(), collections.Counter()
    tokenizer = tokenizer_lib.train_wordpiece(
        _texts(args.input, args.format, skipped, counts), args.vocab_size,
        lowercase=not args.cased, min_frequency=args.min_frequency)
    if not counts["documents"]:
      raise text_corpus.TextFileError(f"No documents in {', '.join(args.input)} (format "
                                      f"{args.format}): check --format.")
    os.makedirs(args.out, exist_ok=True)
    tokenizer.save(os.path.join(args.out, tokenizer_lib.TOKENIZER_FILE))
    tokenizer.save_vocab(os.path.join(args.out, tokenizer_lib.VOCAB_FILE))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Trained a {tokenizer.vocab_size}-token WordPiece tokenizer on {counts['documents']} "
        f"documents into {args.out} ({tokenizer_lib.TOKENIZER_FILE}, {tokenizer_lib.VOCAB_FILE}).")
  if skipped:
    print(f"Skipped {sum(skipped.values())} rows that are not documents: "
          + ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) + ".")
  return 0


if __name__ == "__main__":
  sys.exit(main())
