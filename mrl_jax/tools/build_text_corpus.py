r"""Builds a text corpus from plain-text or JSONL files into TFDS array_record.

    python -m mrl_jax.tools.build_text_corpus --name my_corpus --data_dir DIR \
        --train a.txt b.txt --validation c.txt [--test d.txt] \
        [--format lines|blocks|jsonl] [--on_bad_row stop|skip] [--vocab_size 8000] \
        [--version 1.0.0] [--overwrite]

Formats (see mrl_jax/data/text_corpus.py): `lines` one document per line,
`blocks` documents separated by blank lines, `jsonl` one `{"text": ...,
"label": ...}` object per line (labels optional; they become a ClassLabel).
A WordPiece tokenizer of --vocab_size tokens is trained on the train split and
stored beside the corpus (0 = none); MLM training then uses it when
config.data.tokenizer is unset:

    --config.data.name=my_corpus --config.data.data_dir=DIR

Bad rows (not UTF-8, empty documents, rows that are not JSON objects or have
no text): with --on_bad_row=stop (default) the first one is reported as one
`error:` line naming the file and line; with skip they are left out and
counted by reason in one summary line (and in DIR/<name>/<version>/bad_rows.json).

Exit status: 0 built (or already there), 2 a mistake in the arguments or the
input (one `error:` line).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mrl_jax.data import label_corpus
from mrl_jax.data import text_corpus
from mrl_jax.errors import UserError
from mrl_jax.tools.build_corpus import print_build_report, written_and_skipped_lines

SPLITS = ("train", "validation", "test")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m mrl_jax.tools.build_text_corpus",
      description="Build a text corpus from files into TFDS array_record (with its tokenizer).")
  parser.add_argument("--name", required=True, help="Dataset name, e.g. my_corpus.")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
  for split in SPLITS:
    parser.add_argument(f"--{split}", nargs="+", metavar="FILE", default=None,
                        required=split == "train", help=f"The {split} split's files.")
  parser.add_argument("--format", choices=text_corpus.FORMATS, default="lines",
                      help="lines: a document per line; blocks: blank-line-separated "
                           'documents; jsonl: {"text": ..., "label": ...} per line.')
  parser.add_argument("--on_bad_row", choices=label_corpus.ON_BAD_ROW, default="stop",
                      help="stop: fail on the first bad row; skip: leave such rows out, counted.")
  parser.add_argument("--vocab_size", type=int, default=text_corpus.DEFAULT_TOKENIZER_VOCAB_SIZE,
                      help="Size of the WordPiece tokenizer trained on the train split (0: none).")
  parser.add_argument("--version", default=text_corpus.DEFAULT_VERSION,
                      help="Dataset version X.Y.Z.")
  parser.add_argument("--overwrite", action="store_true",
                      help="Rebuild even if this name and version are already prepared.")
  args = parser.parse_args(argv)
  if args.vocab_size < 0:
    parser.error("--vocab_size must be >= 0")
  return args


def summary_lines(report: dict) -> list[str]:
  """One line per split (examples written), then one line of the rows skipped by reason."""
  return written_and_skipped_lines(
      report, lambda r: f"{r['examples']} documents written of {r['rows']} rows")


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  files = {split: getattr(args, split) for split in SPLITS if getattr(args, split)}
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  tqdm_utils.display_progress_bar(False)  # The summary below says what was built.
  try:
    builder = text_corpus.build_text_corpus(
        args.name, files, data_dir=args.data_dir, text_format=args.format,
        on_bad_row=args.on_bad_row, version=args.version, tokenizer_vocab_size=args.vocab_size,
        overwrite=args.overwrite)
  except (UserError, ValueError) as e:  # check_name's ValueError is the user's too.
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  if not print_build_report(builder, args.name, args.version, summary_lines):
    return 0
  tokenizer_dir = text_corpus.corpus_tokenizer_dir(builder.data_path)
  if tokenizer_dir.exists():
    print(f"  tokenizer: {tokenizer_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
