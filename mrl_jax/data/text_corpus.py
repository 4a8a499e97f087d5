"""A text corpus from plain-text or JSONL files, as a TFDS dataset (array_record).

`TextCorpus` turns a user's text files into TFDS array_record splits that
`sources.open_source(name, split, data_dir)` and the MLM pipeline
(`mlm_pipeline.py`) read by name, with no TensorFlow and without this module
(TFDS reads the dataset from its files in data_dir).

Input: per split, one or more UTF-8 files (a leading byte-order mark is
allowed) in one of three formats:

  lines   one document per non-blank line (blank lines are ignored).
  blocks  one document per block of lines separated by blank lines (lines
          holding only whitespace count as blank); a block's lines are joined
          with "\\n". The document's line number is its block's first line.
  jsonl   one JSON object per non-blank line, `{"text": "...", "label": ...}`;
          "label" (a string, or an integer that stands for its decimal
          string) is optional, but if any row of any split has one, every row
          must. Other keys are ignored.

Features of the dataset:
  text:  Text, the document (stripped of leading and trailing whitespace).
  label: ClassLabel, only when the rows have labels. Class names are the
         distinct labels of all splits' good rows, sorted (numerically when
         every label is an integer), so the ids are the same whichever split
         is read.
  id:    Text, `<file>:<line>`, the file as given and the document's 1-based
         line number.
Examples are keyed by their id, so the stored order (a hash of the key) is the
same every build.

Bad rows (`REASONS`): not_utf8 (a line that is not UTF-8; each line is decoded
on its own; in a block, the whole block is bad), empty_document (a JSONL text
that is empty or only whitespace), not_json, not_an_object (valid JSON but not
an object), missing_text (no "text" string), missing_label, bad_label (a label
that is neither a string nor an integer). With on_bad_row="stop" (default) the
first raises `label_corpus.BadRowError` naming the file, line and reason, and
nothing is left in data_dir; with "skip" such rows are left out and counted by
reason (`report`, and `bad_rows.json` beside the dataset's files, read with
`label_corpus.read_report`).

A WordPiece tokenizer can be trained on the train split at build time
(`tokenizer_vocab_size`), stored beside the dataset in `<data_dir>/<name>/
<version>/tokenizer/` (tokenizer.json and vocab.txt); the MLM pipeline uses it
when `config.data.tokenizer` is None (see `corpus_tokenizer_dir`). Training it
keeps the train split's texts in memory during the build.

  build_text_corpus("my_corpus", {"train": ["a.txt"], "validation": ["b.txt"]},
                    data_dir=DIR, text_format="blocks", on_bad_row="skip")

or the command line `python -m mrl_jax.tools.build_text_corpus`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from mrl_jax.data import label_corpus
from mrl_jax.data.label_corpus import BadRowError, SplitReport  # pylint: disable=unused-import
from mrl_jax.errors import UserError

FORMATS = ("lines", "blocks", "jsonl")
REASONS = ("not_utf8", "empty_document", "not_json", "not_an_object", "missing_text",
           "missing_label", "bad_label")
TOKENIZER_DIR = "tokenizer"
DEFAULT_VERSION = "1.0.0"
DEFAULT_TOKENIZER_VOCAB_SIZE = 8000


_BadRow = label_corpus._BadRow  # pylint: disable=protected-access


class TextFileError(UserError, ValueError):
  """Arguments or input that cannot make a text corpus (bad name, format, no documents)."""


class TextFileNotFoundError(UserError, FileNotFoundError):
  """A text file named for a split does not exist."""


@dataclasses.dataclass(frozen=True)
class Document:
  """One document read from a file (before it is written)."""
  line: int                 # 1-based line number of its (first) line.
  text: str
  label: str | None = None


def corpus_tokenizer_dir(builder_dir: epath.PathLike) -> epath.Path:
  """Where a corpus built here keeps its own tokenizer: `<builder_dir>/tokenizer`."""
  return epath.Path(builder_dir) / TOKENIZER_DIR


def data_tokenizer_file(tokenizer: epath.PathLike | None, *, name: str, split: str,
                        data_dir: str | None,
                        build_tool: str = "mrl_jax.tools.build_text_corpus") -> str:
  """The tokenizer file a data config names: `tokenizer` (a vocab.txt, a
  tokenizer.json or a folder of one), or, when None, the corpus's own one
  (`corpus_tokenizer_dir`), which the text and image-text pipelines share.

  Raises ConfigError when None and the corpus has none; `build_tool` is the
  module named in that message as the one that builds corpora with one.
  """
  from mrl_jax.data import sources  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from mrl_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  if tokenizer is not None:
    path = os.fspath(tokenizer)
    if os.path.isdir(path):
      return tokenizer_lib.resolve_tokenizer_file(path)
    return path
  _, info = sources.open_source(name, split, data_dir)
  candidate = corpus_tokenizer_dir(info.data_dir) / tokenizer_lib.TOKENIZER_FILE
  if not candidate.exists():
    raise ConfigError(
        f"data.tokenizer is None, but dataset {name!r} has no tokenizer of its own "
        f"(no {candidate}): set --config.data.tokenizer=<vocab.txt or tokenizer.json>, or "
        f"rebuild the corpus with python -m {build_tool} (which trains one).")
  # Tokenizers open local files only: a corpus in a gs:// data_dir is read from a copy.
  from mrl_jax.workdir_path import local_file  # pylint: disable=g-import-not-at-top
  return local_file(candidate)


def _label_text(value: Any) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise _BadRow("bad_label", f"label {value!r} is a {type(value).__name__}, not a string "
                               f"or an integer")
  text = str(value).strip()
  if not text:
    raise _BadRow("bad_label", "the label is an empty string")
  return text


def _parse_json_row(line: str) -> tuple[str, str | None]:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise _BadRow("not_json", f"not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(row, dict):
    raise _BadRow("not_an_object", f"the row is a JSON {type(row).__name__}, not an object "
                                   f'{{"text": ..., "label": ...}}')
  text = row.get("text")
  if not isinstance(text, str):
    raise _BadRow("missing_text", 'the object has no "text" string' if text is None else
                  f'"text" is a {type(text).__name__}, not a string')
  if not text.strip():
    raise _BadRow("empty_document", 'the "text" is empty')
  label = _label_text(row["label"]) if row.get("label") is not None else None
  return text.strip(), label


def read_documents(path: epath.PathLike, text_format: str
                   ) -> Iterator[Document | tuple[int, str, _BadRow]]:
  """The documents of one file, and (line, text, _BadRow) for each bad row, in order."""
  path = epath.Path(path)
  block: list[str] = []
  block_start, block_bad = 0, None
  for number, raw in label_corpus._binary_lines(path):  # pylint: disable=protected-access
    try:
      line = label_corpus._decode_line(raw, number)  # pylint: disable=protected-access
    except _BadRow as bad:
      text = raw.decode("utf-8", errors="backslashreplace")
      if text_format == "blocks":
        if not block:
          block_start = number
        block.append(text)
        if block_bad is None:
          block_bad = _BadRow(bad.reason, f"line {number}: {bad.detail}")
        continue
      yield number, text, bad
      continue
    if text_format == "blocks":
      if line.strip():
        if not block:
          block_start = number
        block.append(line)
        continue
      if block:
        yield _end_block(block_start, block, block_bad)
      block, block_bad = [], None
      continue
    if not line.strip():
      continue
    if text_format == "lines":
      yield Document(number, line.strip())
      continue
    try:
      text, label = _parse_json_row(line)
    except _BadRow as bad:
      yield number, line, bad
      continue
    yield Document(number, text, label)
  if text_format == "blocks" and block:
    yield _end_block(block_start, block, block_bad)


def _end_block(start: int, block: list[str], bad: _BadRow | None):
  text = "\n".join(block).strip()
  if bad is not None:
    return start, text, bad
  return Document(start, text)


def _sort_names(labels: Iterable[str]) -> list[str]:
  names = sorted(set(labels))
  if names and all(label_corpus._ID_RE.fullmatch(n) for n in names):  # pylint: disable=protected-access
    names.sort(key=int)
  return names


class TextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds a text corpus from files (see module doc).

  Not registered with TFDS; a prepared corpus is read from its files. After
  `download_and_prepare`, `report` maps each split to its `SplitReport`.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, name: str, files: Mapping[str, Sequence[epath.PathLike]],
               text_format: str = "lines", on_bad_row: str = "stop",
               version: str = DEFAULT_VERSION, description: str | None = None,
               tokenizer_vocab_size: int = 0, data_dir: epath.PathLike | None = None,
               **kwargs: Any):
    """Creates the builder; JSONL files are read once now, for their label names.

    Args:
      name: dataset name (lowercase letters, digits, underscores; not a TFDS name).
      files: split name -> the files of that split.
      text_format: "lines", "blocks" or "jsonl".
      on_bad_row: "stop" or "skip".
      version: "X.Y.Z".
      description: stored in the DatasetInfo; default names the files.
      tokenizer_vocab_size: > 0 trains a WordPiece tokenizer of that size on
        the train split and stores it beside the dataset; 0 = none.
      data_dir: TFDS data_dir (None = TFDS's default).
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder`.
    """
    if not label_corpus._NAME_RE.fullmatch(name):  # pylint: disable=protected-access
      raise TextFileError(f"Dataset name {name!r}: use lowercase letters, digits and "
                       f"underscores, starting with a letter (e.g. 'my_corpus').")
    if text_format not in FORMATS:
      raise TextFileError(f"text_format={text_format!r}: use one of {FORMATS}.")
    if on_bad_row not in label_corpus.ON_BAD_ROW:
      raise TextFileError(f"on_bad_row={on_bad_row!r}: use one of {label_corpus.ON_BAD_ROW}.")
    for split in files:
      if not label_corpus._NAME_RE.fullmatch(split):  # pylint: disable=protected-access
        raise TextFileError(f"Split name {split!r}: use lowercase letters, digits and "
                         f"underscores (e.g. 'train', 'validation').")
    if tokenizer_vocab_size > 0 and files and "train" not in files:
      raise TextFileError(f"Dataset {name!r}: its tokenizer is trained on the 'train' split, "
                          f"which is not given (or build without one: tokenizer_vocab_size=0, "
                          f"--vocab_size=0).")
    self.name = name
    self.VERSION = tfds.core.Version(version)  # pylint: disable=invalid-name
    self._files = {split: [label_corpus._absolute(p) for p in paths]  # pylint: disable=protected-access
                   for split, paths in files.items()}
    self._format = text_format
    self._on_bad_row = on_bad_row
    self._description = description
    self._tokenizer_vocab_size = int(tokenizer_vocab_size)
    self._train_texts: list[str] = []
    self.report: dict[str, SplitReport] = {}
    self._names = self._label_names()
    super().__init__(data_dir=data_dir, version=version, **kwargs)

  # ------------------------------------------------------------ what the data is
  def _documents(self, split: str) -> Iterator[tuple[str, Document | tuple[int, str, _BadRow]]]:
    """(file as given, document or bad row) of a split, files in order."""
    for path in self._files.get(split, ()):
      if not path.is_file():
        raise TextFileNotFoundError(f"Text file not found: {path} (split {split!r}).")
      for item in read_documents(path, self._format):
        yield os.fspath(path), item

  def _label_names(self) -> list[str] | None:
    """The class names (None: no labels); subclasses may know them without files."""
    if self._format != "jsonl":
      return None
    labels = set()
    for split in self._files:
      for _, item in self._documents(split):
        if isinstance(item, Document) and item.label is not None:
          labels.add(item.label)
    return _sort_names(labels) or None

  def _info(self) -> tfds.core.DatasetInfo:
    description = self._description or (
        f"Text corpus ({self._format}) built by mrl_jax.data.text_corpus from "
        + "; ".join(f"{s}: {', '.join(map(os.fspath, p))}" for s, p in sorted(self._files.items()))
        + ".")
    features = {"text": tfds.features.Text(), "id": tfds.features.Text()}
    if self._names:
      features["label"] = tfds.features.ClassLabel(names=self._names)
    return tfds.core.DatasetInfo(
        builder=self, description=description,
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("text", "label") if self._names else None)

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    if not self._files:
      raise TextFileError(f"Dataset {self.name!r}: no split files given.")
    missing = [os.fspath(p) for paths in self._files.values() for p in paths if not p.is_file()]
    if missing:
      raise TextFileNotFoundError(f"Text file(s) not found: {', '.join(missing)}.")
    self.report = {split: SplitReport(manifest=", ".join(os.fspath(p) for p in paths))
                   for split, paths in self._files.items()}
    self._train_texts = []
    return {split: self._generate_examples(split) for split in self._files}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    report = self.report[split]
    keep_texts = self._tokenizer_vocab_size > 0 and split == "train"
    for file, item in self._documents(split):
      report.rows += 1
      if not isinstance(item, Document):
        number, text, bad = item
        self._bad_row(report, file, number, text, bad)
        continue
      if self._names and item.label is None:
        self._bad_row(report, file, item.line, item.text[:200], _BadRow(
            "missing_label", 'the row has no "label", but other rows of the corpus have one'))
        continue
      report.examples += 1
      key = f"{file}:{item.line}"
      example = {"text": item.text, "id": key}
      if self._names:
        example["label"] = item.label
      if keep_texts:
        self._train_texts.append(item.text)
      yield key, example
    if not report.examples:
      # TFDS would fail on the empty split with an assertion of its own.
      reasons = ", ".join(f"{r} {n}" for r, n in sorted(report.skipped.items()))
      raise TextFileError(f"Split {split!r} has no documents: {report.rows} rows read from "
                          f"{report.manifest}" + (f", all bad ({reasons})" if reasons else "")
                          + f". Check the files and --format (now {self._format}).")

  def _bad_row(self, report: SplitReport, file: str, number: int, text: str,
               bad: _BadRow) -> None:
    if self._on_bad_row == "stop":
      raise BadRowError(file, number, bad.reason, bad.detail)
    report.skipped[bad.reason] = report.skipped.get(bad.reason, 0) + 1
    if len(report.bad_rows) < label_corpus.MAX_RECORDED_BAD_ROWS:
      report.bad_rows.append(dict(file=file, line=number, reason=bad.reason,
                                  detail=bad.detail, text=text[:500]))

  # ------------------------------------------------------------ the build
  def _train_tokenizer(self, texts: Sequence[str]) -> None:
    from mrl_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    if not texts:
      raise TextFileError(f"Dataset {self.name!r}: cannot train its tokenizer, the train split "
                        f"has no documents (build with tokenizer_vocab_size=0 to skip it).")
    tokenizer = tokenizer_lib.train_wordpiece(texts, self._tokenizer_vocab_size)
    folder = corpus_tokenizer_dir(self.data_path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(os.fspath(folder / tokenizer_lib.TOKENIZER_FILE))
    tokenizer.save_vocab(os.fspath(folder / tokenizer_lib.VOCAB_FILE))
    logging.info("%s: trained a WordPiece tokenizer of %d tokens on %d train documents "
                 "into %s.", self.name, tokenizer.vocab_size, len(texts), folder)

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    super()._download_and_prepare(dl_manager, download_config)
    # TFDS writes into a temporary folder that becomes the dataset's folder
    # only if everything succeeds, so the tokenizer and report move with it.
    if self._tokenizer_vocab_size > 0:
      self._train_tokenizer(self._train_texts)
      self._train_texts = []
    for split, report in sorted(self.report.items()):
      if report.num_skipped:
        logging.warning("%s/%s: skipped %d of %d rows: %s", self.name, split,
                        report.num_skipped, report.rows,
                        ", ".join(f"{r} {n}" for r, n in sorted(report.skipped.items())))
    contents = dict(
        on_bad_row=self._on_bad_row, format=self._format,
        splits={split: dict(dataclasses.asdict(r), skipped=dict(sorted(r.skipped.items())),
                            num_skipped=r.num_skipped)
                for split, r in sorted(self.report.items())})
    (self.data_path / label_corpus.REPORT_FILE).write_text(json.dumps(contents, indent=1) + "\n")


def build_text_corpus(name: str, files: Mapping[str, Sequence[epath.PathLike]], *,
                      data_dir: epath.PathLike | None = None, text_format: str = "lines",
                      on_bad_row: str = "stop", version: str = DEFAULT_VERSION,
                      tokenizer_vocab_size: int = DEFAULT_TOKENIZER_VOCAB_SIZE,
                      overwrite: bool = False, **kwargs: Any) -> TextCorpus:
  """Builds the corpus as array_record in data_dir and returns its builder.

  An already prepared corpus of that name and version is kept (its `report`
  is then empty) unless `overwrite`.
  """
  label_corpus.check_name(name)
  builder = TextCorpus(name=name, files=files, text_format=text_format,
                       on_bad_row=on_bad_row, version=version,
                       tokenizer_vocab_size=tokenizer_vocab_size, data_dir=data_dir, **kwargs)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder
