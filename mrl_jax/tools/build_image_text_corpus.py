r"""Builds an image-text corpus (captioned images) into TFDS array_record.

    python -m mrl_jax.tools.build_image_text_corpus --name my_pairs --data_dir DIR \
        --train train.tsv --validation val.tsv [--test test.tsv] \
        [--on_bad_row stop|skip] [--tokenizer_vocab_size 8000 | --tokenizer vocab.txt] \
        [--version 1.0.0] [--overwrite]

Each split takes one or more inputs: manifests (`.tsv` / `.txt`, lines
`image_path<TAB>caption`; rows naming the same image give it several
captions) or webdataset tar shards as img2dataset writes them (`KEY.jpg` +
`KEY.txt` members), or globs of them in quotes (`--train 'shards/0*.tar'`).
See mrl_jax/data/image_text_corpus.py for the formats and the stored features.
A WordPiece tokenizer of --tokenizer_vocab_size tokens is trained on the train
captions and stored beside the corpus (0: none; --tokenizer stores a given one
instead); dual-encoder training uses it when config.data.tokenizer is unset:

    --config.data.name=my_pairs --config.data.data_dir=DIR --config.data.image_size=224

Bad rows (missing or undecodable images, empty or non-UTF-8 captions, wrong
column counts, tar members without caption or image): with --on_bad_row=stop
(default) the first is one `error:` line naming the manifest and line (or
shard and member); with skip they are left out and counted by reason (also
in DIR/<name>/<version>/bad_rows.json).

Exit status: 0 built (or already there), 2 a mistake in the arguments or the
input (one `error:` line).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mrl_jax.data import image_text_corpus
from mrl_jax.data import label_corpus
from mrl_jax.data import text_corpus
from mrl_jax.errors import UserError
from mrl_jax.tools.build_corpus import print_build_report, written_and_skipped_lines

SPLITS = ("train", "validation", "test")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m mrl_jax.tools.build_image_text_corpus",
      description="Build an image-text corpus from manifests or webdataset tars into TFDS "
                  "array_record (with its tokenizer).")
  parser.add_argument("--name", required=True, help="Dataset name, e.g. my_pairs.")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
  for split in SPLITS:
    parser.add_argument(f"--{split}", nargs="+", metavar="MANIFEST_OR_TAR", default=None,
                        required=split == "train",
                        help=f"The {split} split: .tsv/.txt manifests, .tar shards or globs.")
  parser.add_argument("--on_bad_row", choices=label_corpus.ON_BAD_ROW, default="stop",
                      help="stop: fail on the first bad row; skip: leave such rows out, counted.")
  parser.add_argument("--tokenizer_vocab_size", type=int,
                      default=image_text_corpus.DEFAULT_TOKENIZER_VOCAB_SIZE,
                      help="Size of the WordPiece tokenizer trained on the train captions "
                           "(0: none).")
  parser.add_argument("--tokenizer", default=None,
                      help="Store this tokenizer (vocab.txt, tokenizer.json or a folder) as the "
                           "corpus's own instead of training one.")
  parser.add_argument("--version", default=image_text_corpus.DEFAULT_VERSION,
                      help="Dataset version X.Y.Z.")
  parser.add_argument("--overwrite", action="store_true",
                      help="Rebuild even if this name and version are already prepared.")
  args = parser.parse_args(argv)
  if args.tokenizer_vocab_size < 0:
    parser.error("--tokenizer_vocab_size must be >= 0")
  return args


def summary_lines(report: dict) -> list[str]:
  """One line per split (images and captions written), then the rows skipped by reason."""
  return written_and_skipped_lines(
      report, lambda r: f"{r['examples']} images with {r.get('captions', 0)} captions "
                        f"written of {r['rows']} rows")


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  manifests, shards = {}, {}
  for split in SPLITS:
    items = getattr(args, split)
    if not items:
      continue
    for item in items:
      (shards if image_text_corpus.is_tar(item) else manifests).setdefault(split, []).append(item)
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  tqdm_utils.display_progress_bar(False)  # The summary below says what was built.
  try:
    builder = image_text_corpus.build_image_text_corpus(
        args.name, data_dir=args.data_dir, manifests=manifests, shards=shards,
        on_bad_row=args.on_bad_row, tokenizer_vocab_size=args.tokenizer_vocab_size,
        tokenizer=args.tokenizer, version=args.version, overwrite=args.overwrite)
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
