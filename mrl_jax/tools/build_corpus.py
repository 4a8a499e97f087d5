r"""Builds an image corpus from manifests into TFDS array_record (JFT-style, multi-label).

    python -m mrl_jax.tools.build_corpus --name my_jft --labels labels.txt \
        --split train=train.tsv --split validation=val.tsv --data_dir DIR \
        [--on_bad_row=stop|skip] [--version 1.0.0] [--overwrite]

Manifests are `image_path<TAB>labels` lines (labels: comma-separated ids or
names from the label file, one name per line); see
`mrl_jax/data/label_corpus.py` for the format, the stored features and how bad
rows are handled. ImageNet-21k-style single-label data is the same with one
label per row. Prints, per split, the examples written and the rows skipped
(by reason); the same numbers are kept in `<DIR>/<name>/<version>/bad_rows.json`.
Afterwards train on it with, e.g.,

    --config.data.name=my_jft --config.data.data_dir=DIR
    --config.data.label_key=labels --config.data.image_size=224

Exit status: 0 built (or already there), 1 a bad row with --on_bad_row=stop or
a bad label file / manifest, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from mrl_jax.data import label_corpus


def _split_arg(text: str) -> tuple[str, str]:
  name, sep, path = text.partition("=")
  if not sep or not name or not path:
    raise argparse.ArgumentTypeError(f"{text!r}: expected SPLIT=MANIFEST, e.g. train=train.tsv")
  return name, path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses the command line (see module doc)."""
  parser = argparse.ArgumentParser(
      prog="python -m mrl_jax.tools.build_corpus",
      description="Build a multi-label image corpus from manifests into TFDS array_record.")
  parser.add_argument("--name", required=True, help="Dataset name, e.g. my_jft.")
  parser.add_argument("--labels", required=True,
                      help="Label file: one class name per line (line index = id).")
  parser.add_argument("--split", action="append", type=_split_arg, required=True,
                      metavar="SPLIT=MANIFEST",
                      help="A split and its manifest; repeat for each split.")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
  parser.add_argument("--on_bad_row", choices=label_corpus.ON_BAD_ROW, default="stop",
                      help="stop: fail on the first malformed row; skip: leave such rows "
                           "out and count them.")
  parser.add_argument("--version", default=label_corpus.DEFAULT_VERSION,
                      help="Dataset version X.Y.Z.")
  parser.add_argument("--overwrite", action="store_true",
                      help="Rebuild even if this name and version are already prepared.")
  args = parser.parse_args(argv)
  names = [s for s, _ in args.split]
  repeated = sorted({s for s in names if names.count(s) > 1})
  if repeated:
    parser.error(f"split(s) {repeated} given more than once")
  return args


def _summary(report: dict) -> list[str]:
  lines = []
  for split, r in sorted(report["splits"].items()):
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(r["skipped"].items()))
    lines.append(f"{split}: {r['examples']} examples written, {r['num_skipped']} rows skipped"
                 + (f" ({reasons})" if reasons else "") + f"  [{r['manifest']}]")
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  """Builds the corpus; returns the exit status."""
  args = parse_args(argv)
  try:
    builder = label_corpus.build(
        args.name, dict(args.split), args.labels, data_dir=args.data_dir,
        on_bad_row=args.on_bad_row, version=args.version, overwrite=args.overwrite)
  except (label_corpus.BadRowError, ValueError, FileNotFoundError) as e:
    print(f"build_corpus: error: {e}", file=sys.stderr)
    return 1
  print_build_report(builder, args.name, args.version, _summary)
  return 0


def written_and_skipped_lines(report: dict, written: Callable[[dict], str]) -> list[str]:
  """One line per split (`written(split_report)`, then its source), then one line of the
  rows skipped by reason (build_text_corpus and build_image_text_corpus print this)."""
  lines, skips = [], []
  for split, r in sorted(report["splits"].items()):
    lines.append(f"{split}: {written(r)}  [{r['manifest']}]")
    if r["num_skipped"]:
      reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(r["skipped"].items()))
      skips.append(f"{split} {r['num_skipped']} ({reasons})")
  if skips:
    lines.append("skipped bad rows: " + "; ".join(skips))
  return lines


def print_build_report(builder, name: str, version: str,
                       summary: Callable[[dict], list[str]]) -> bool:
  """Built (or found already built) and, from bad_rows.json, per split what was
  written and skipped (build_corpus and build_text_corpus print the same way);
  False when the corpus has no bad_rows.json."""
  if not builder.report:
    print(f"{name} {version} was already prepared in {builder.data_path} "
          f"(--overwrite rebuilds it); from its build:")
  else:
    print(f"Built {name} {version} into {builder.data_path}:")
  try:
    report = label_corpus.read_report(builder.data_path)
  except FileNotFoundError:
    print(f"  (no {label_corpus.REPORT_FILE} there)")
    return False
  for line in summary(report):
    print("  " + line)
  return True


if __name__ == "__main__":
  sys.exit(main())
