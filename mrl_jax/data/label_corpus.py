"""A JFT-style multi-label image corpus from manifests, as a TFDS dataset.

JFT-300M is private, so its MRL experiments are reproduced on corpora that
users assemble themselves. `LabelCorpus` turns such a corpus into TFDS
array_record splits that `sources.open_source(name, split, data_dir)` and the
Grain pipeline read by name, with no TensorFlow and without this module being
imported (TFDS reads the dataset from the files in data_dir).

Input, per split, a manifest: a UTF-8 text file (a leading byte-order mark is
allowed) with one example per line,

  image_path<TAB>labels

* `image_path`: absolute, or relative to the manifest's folder.
* `labels`: a comma-separated list of label ids or label names. A token made
  of digits (optionally signed) is an id, anything else a name, so a class
  whose name is a number must be given by its id. Duplicates are dropped. One
  label per row is ImageNet-21k-style single-label data.
* Blank lines and lines starting with `#` are ignored.

plus one label file for all splits: one class name per line, the line's index
(from 0) being the class id. Names must be unique and non-empty (blank lines
may only trail the file).

Features of the dataset:
  image: uint8 [H, W, 3] (sizes vary). JPEG or 8-bit PNG files that decode to
    RGB are stored byte for byte; any other image (grayscale, RGBA, palette,
    CMYK, 16-bit, GIF, BMP, WebP, ...) is converted with PIL's
    `convert("RGB")` (alpha is dropped, not composited) and re-encoded: as JPEG
    (quality 95) when the file was a JPEG, losslessly as PNG otherwise. EXIF
    orientation is not applied (TFDS's decoders ignore it too).
  labels: Sequence(ClassLabel(names from the label file)); the pipeline turns
    it into a multi-hot vector (set `data.label_key="labels"`).
  id: text, the image path as written in the manifest.

Examples are keyed by their image path (the k-th repeat of a path within a
manifest by `path#k`), so the stored order, sorted by a hash of the key, is
the same every build, and adding or removing rows leaves the relative order
of the other examples as it was.

Malformed rows are found at build time; every image is fully decoded with PIL.
The reasons (`REASONS`): not_utf8 (the line's bytes are not UTF-8, e.g. a file
saved as Latin-1; each line is decoded on its own, so the other lines are still
read), wrong_column_count, empty_labels, unknown_label_name,
label_id_out_of_range, missing_file, undecodable_image (not an image, or
truncated). A label file that is not UTF-8 is refused (`LabelFileError`) naming
its line. With `on_bad_row="stop"` (the default) the first one raises
`BadRowError` naming the manifest, line and reason, and nothing usable is
left in data_dir (TFDS deletes its temporary folder). With `"skip"` such rows are left out, the counts per reason are
logged, and every build writes `bad_rows.json` beside the dataset's files
(`<data_dir>/<name>/<version>/bad_rows.json`, see `read_report`): per split
the manifest, rows read, examples written, skipped counts per reason, and the
first `MAX_RECORDED_BAD_ROWS` bad rows (line, reason, detail, text).

  builder = build("my_jft", {"train": "train.tsv", "validation": "val.tsv"},
                  "labels.txt", data_dir=DIR, on_bad_row="skip")

or the command line: `python -m mrl_jax.tools.build_corpus`.

`mrl_demo_corpus` (`MrlDemoCorpus`, at the end of this module) is a small
corpus of 2x2 grids of scikit-learn digits, written as PNG files and built
through the same path, that `open_source` builds on first use.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import io
import json
import os
import re
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from mrl_jax.errors import UserError

ON_BAD_ROW = ("stop", "skip")
REASONS = ("not_utf8", "wrong_column_count", "empty_labels", "unknown_label_name",
           "label_id_out_of_range", "missing_file", "undecodable_image")
REPORT_FILE = "bad_rows.json"
MAX_RECORDED_BAD_ROWS = 100
DEFAULT_VERSION = "1.0.0"

# TFDS parses "name/config:version" out of a dataset name, and uses it as a
# directory name: keep to what its own registered names look like.
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_ID_RE = re.compile(r"[+-]?\d+")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BUFFER_RE = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class BadRowError(UserError, ValueError):
  """A manifest row that cannot become an example (with on_bad_row="stop")."""

  def __init__(self, manifest: str, line: int, reason: str, detail: str):
    self.manifest, self.line, self.reason, self.detail = manifest, line, reason, detail
    super().__init__(
        f"{manifest} line {line}: {reason}: {detail}. Fix or remove the row, or "
        f"build with on_bad_row='skip' (--on_bad_row=skip) to leave such rows out.")


class LabelFileError(UserError, ValueError):
  """A label file that cannot be read as one unique class name per line."""


class _BadRow(Exception):
  """Internal: why one row was rejected (becomes BadRowError or a skip)."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason, self.detail = reason, detail


@dataclasses.dataclass
class SplitReport:
  """What the build made of one split's manifest."""
  manifest: str
  rows: int = 0                     # Non-blank, non-comment lines.
  examples: int = 0                 # Examples written.
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # Reason -> count.
  bad_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # The first few.

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())


def _decode_line(raw: bytes, number: int) -> str:
  """One line's text; _BadRow("not_utf8") if not UTF-8.

  Line 1 may start with a UTF-8 byte-order mark (Windows editors write one),
  which would otherwise become part of the first path or class name.
  """
  start = 3 if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
  try:
    return raw[start:].decode("utf-8")
  except UnicodeDecodeError as e:
    at = start + e.start
    raise _BadRow("not_utf8", f"byte 0x{raw[at]:02x} at column {at + 1} is not UTF-8 (was "
                              f"the file saved as Latin-1 or cp1252? save it as UTF-8)") from None


def _binary_lines(path: epath.Path) -> Iterator[tuple[int, bytes]]:
  """(1-based number, bytes without the line break) per line, streamed.

  Read as bytes so that each line is decoded on its own and one that is not
  UTF-8 spoils no other. Lines end at \\n, \\r\\n or \\r, as in text mode.
  """
  number = 0
  with path.open("rb") as f:
    for chunk in f:  # A binary file splits at newline bytes only.
      if chunk.endswith(b"\n"):
        chunk = chunk[:-1]
      if chunk.endswith(b"\r"):
        chunk = chunk[:-1]
      for raw in chunk.split(b"\r"):
        number += 1
        yield number, raw


def read_label_file(path: epath.PathLike) -> list[str]:
  """The class names of a label file (see module doc); LabelFileError if malformed."""
  path = epath.Path(path)
  lines = []
  for number, raw in _binary_lines(path):
    try:
      lines.append(_decode_line(raw, number))
    except _BadRow as bad:
      raise LabelFileError(f"{path} line {number}: {bad.detail}.") from None
  while lines and not lines[-1].strip():
    lines.pop()
  names, first_seen = [], {}
  for number, line in enumerate(lines, start=1):
    name = line.strip()
    if not name:
      raise LabelFileError(f"{path} line {number} is blank: every line up to the last "
                           f"name is a class (its id is the line's index).")
    if name in first_seen:
      raise LabelFileError(f"{path} line {number}: class name {name!r} repeats line "
                           f"{first_seen[name]}; names must be unique.")
    first_seen[name] = number
    names.append(name)
  if not names:
    raise LabelFileError(f"{path} lists no class names.")
  return names


def _parse_labels(text: str, names: Sequence[str],
                 index: Mapping[str, int] | None = None) -> list[int]:
  """Sorted distinct class ids of a manifest's labels column; raises _BadRow."""
  index = index if index is not None else {n: i for i, n in enumerate(names)}
  tokens = [t.strip() for t in text.split(",")]
  tokens = [t for t in tokens if t]
  if not tokens:
    raise _BadRow("empty_labels", "the labels column lists no label")
  ids = set()
  for token in tokens:
    if _ID_RE.fullmatch(token):
      value = int(token)
      if not 0 <= value < len(names):
        raise _BadRow("label_id_out_of_range",
                      f"label id {value} is not in [0, {len(names)})")
      ids.add(value)
    elif token in index:
      ids.add(index[token])
    else:
      raise _BadRow("unknown_label_name",
                    f"label {token!r} is not a name in the label file")
  return sorted(ids)


def rgb_image_bytes(data: bytes) -> bytes:
  """`data` if it is a JPEG or 8-bit PNG decoding to RGB, else an RGB re-encoding.

  The image is fully decoded either way, so truncated or corrupt files raise
  (any exception PIL raises: OSError, SyntaxError, ValueError, ...).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as image:
    image.load()
    fmt, mode = image.format, image.mode
    # TFDS decodes stored bytes as they are (PIL, OpenCV or TF), so only files
    # that every one of them reads as 8-bit, 3-channel can be kept unchanged.
    # A PNG's bit depth is byte 24 (after the signature and IHDR's size, type,
    # width and height); a transparent colour key may become an alpha channel.
    keep = mode == "RGB" and "transparency" not in image.info and (
        fmt == "JPEG" or
        (fmt == "PNG" and data.startswith(_PNG_SIGNATURE) and len(data) > 24 and data[24] == 8))
    if keep:
      return data
    rgb = image.convert("RGB")
  out = io.BytesIO()
  if fmt == "JPEG":
    # Already lossy: a lossless PNG of a photo would be several times larger.
    rgb.save(out, format="JPEG", quality=95)
  else:
    rgb.save(out, format="PNG")
  return out.getvalue()


def _absolute(path: epath.PathLike) -> epath.Path:
  # Absolute paths make error messages and the report unambiguous.
  path = epath.Path(path)
  return path if path.is_absolute() else epath.Path(os.path.abspath(path))


def _resolve(manifest: epath.Path, text: str) -> epath.Path:
  path = epath.Path(text)
  return path if path.is_absolute() else manifest.parent / text


class LabelCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds a multi-label image corpus from manifests (see module doc).

  Not registered with TFDS: the name is chosen per corpus, and a prepared
  corpus is read from its files (`tfds.builder(name, data_dir=...)` falls back
  to them), so readers need neither this class nor the manifests.

  After `download_and_prepare`, `report` maps each split to its `SplitReport`.
  """

  # TFDS looks up a builder's source file through `importlib_resources`, which
  # it does not install; this builder's file is simply this module.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, name: str, manifests: Mapping[str, epath.PathLike],
               label_file: epath.PathLike | None, on_bad_row: str = "stop",
               version: str = DEFAULT_VERSION, description: str | None = None,
               data_dir: epath.PathLike | None = None, **kwargs: Any):
    """Creates the builder; of the inputs, only the label file is read now.

    Args:
      name: dataset name, also its directory in data_dir: lowercase letters,
        digits and underscores, starting with a letter; not the name of a
        dataset TFDS itself knows (that one would be read instead).
      manifests: split name -> manifest file.
      label_file: the class names file (see module doc).
      on_bad_row: "stop" (raise BadRowError at the first bad row) or "skip".
      version: the dataset version, "X.Y.Z" (a directory level in data_dir).
      description: stored in the DatasetInfo; default names the manifests.
      data_dir: TFDS data_dir (None = TFDS's default).
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder`.
    """
    if not _NAME_RE.fullmatch(name):
      raise ValueError(f"Dataset name {name!r}: use lowercase letters, digits and "
                       f"underscores, starting with a letter (e.g. 'my_jft').")
    if on_bad_row not in ON_BAD_ROW:
      raise ValueError(f"on_bad_row={on_bad_row!r}: use one of {ON_BAD_ROW}.")
    for split in manifests:
      if not _NAME_RE.fullmatch(split):
        raise ValueError(f"Split name {split!r}: use lowercase letters, digits and "
                         f"underscores (e.g. 'train', 'validation').")
    # Instance attributes stand in for the class attributes TFDS reads, since
    # each corpus is built by this one class (as tfds' AdhocBuilder does).
    self.name = name
    self.VERSION = tfds.core.Version(version)  # pylint: disable=invalid-name
    self._manifests = {split: _absolute(path) for split, path in manifests.items()}
    self._label_file = _absolute(label_file) if label_file is not None else None
    self._on_bad_row = on_bad_row
    self._description = description
    self._names = self._label_names()
    self.report: dict[str, SplitReport] = {}
    super().__init__(data_dir=data_dir, version=version, **kwargs)

  def _label_names(self) -> list[str]:
    """The class names; read from the label file (subclasses may know them)."""
    if self._label_file is None:
      raise ValueError("LabelCorpus needs a label_file.")
    return read_label_file(self._label_file)

  def _info(self) -> tfds.core.DatasetInfo:
    description = self._description or (
        "Multi-label image corpus built by mrl_jax.data.label_corpus from the "
        "manifests " + ", ".join(f"{s}={p}" for s, p in sorted(self._manifests.items())) + ".")
    return tfds.core.DatasetInfo(
        builder=self,
        description=description,
        features=tfds.features.FeaturesDict({
            # No encoding_format: the stored bytes are JPEG or PNG per example.
            "image": tfds.features.Image(shape=(None, None, 3)),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=self._names)),
            "id": tfds.features.Text(),
        }),
        supervised_keys=("image", "labels"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local files named by the manifests.
    if not self._manifests:
      raise ValueError(f"Dataset {self.name!r}: no split manifests given.")
    missing = [f"{s}={p}" for s, p in sorted(self._manifests.items()) if not p.is_file()]
    if missing:
      raise FileNotFoundError(f"Manifest file(s) not found: {', '.join(missing)}.")
    # The features were made from the label file when the builder was created;
    # an edit since then would silently relabel the examples.
    if self._label_file is not None and read_label_file(self._label_file) != self._names:
      raise ValueError(f"{self._label_file} changed after the builder was created; "
                       f"create it again.")
    self.report = {split: SplitReport(manifest=os.fspath(path))
                   for split, path in self._manifests.items()}
    return {split: self._generate_examples(split, path)
            for split, path in self._manifests.items()}

  def _generate_examples(self, split: str, manifest: epath.Path
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    report = self.report[split]
    index = {n: i for i, n in enumerate(self._names)}
    seen = collections.Counter()
    for number, raw in _binary_lines(manifest):
      try:
        line = _decode_line(raw, number)
      except _BadRow as bad:
        if raw.lstrip().startswith(b"#"):
          continue  # A comment says nothing about the data, whatever its encoding.
        report.rows += 1
        # The report is JSON: keep the undecodable bytes visible as \xNN.
        text = raw.decode("utf-8", errors="backslashreplace")
        self._bad_row(report, number, text, bad)
        continue
      if not line.strip() or line.lstrip().startswith("#"):
        continue
      report.rows += 1
      try:
        path_text, ids, image = self._parse_row(line, manifest, index)
      except _BadRow as bad:
        self._bad_row(report, number, line, bad)
        continue
      key = path_text if not seen[path_text] else f"{path_text}#{seen[path_text]}"
      seen[path_text] += 1
      report.examples += 1
      yield key, {"image": image, "labels": ids, "id": path_text}

  def _parse_row(self, line: str, manifest: epath.Path, index: Mapping[str, int]
                 ) -> tuple[str, list[int], bytes]:
    """(path as written, label ids, image bytes to store) of a row, or _BadRow."""
    columns = line.split("\t")
    if len(columns) != 2:
      raise _BadRow("wrong_column_count",
                    f"{len(columns)} tab-separated column(s), expected 2 "
                    f"(image_path<TAB>labels)")
    path_text = columns[0].strip()
    ids = _parse_labels(columns[1], self._names, index)
    if not path_text:
      raise _BadRow("missing_file", "the image path is empty")
    path = _resolve(manifest, path_text)
    if not path.is_file():
      raise _BadRow("missing_file", f"no file at {path}")
    data = path.read_bytes()
    try:
      image = rgb_image_bytes(data)
    except Exception as e:  # pylint: disable=broad-except
      # PIL signals a bad file with many exception types; all mean the same
      # here. Its messages may name the in-memory buffer's address, which
      # would make the report differ from build to build.
      message = _BUFFER_RE.sub("the file", str(e))
      raise _BadRow("undecodable_image",
                    f"{path} does not decode as an image ({type(e).__name__}: {message})") from e
    return path_text, ids, image

  def _bad_row(self, report: SplitReport, number: int, line: str, bad: _BadRow) -> None:
    if self._on_bad_row == "stop":
      raise BadRowError(report.manifest, number, bad.reason, bad.detail)
    report.skipped[bad.reason] = report.skipped.get(bad.reason, 0) + 1
    if len(report.bad_rows) < MAX_RECORDED_BAD_ROWS:
      report.bad_rows.append(dict(line=number, reason=bad.reason, detail=bad.detail,
                                  text=line))

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    super()._download_and_prepare(dl_manager, download_config)
    # TFDS is writing into a temporary folder that becomes the dataset's
    # folder only if everything succeeds, so the report moves with the data.
    for split, report in sorted(self.report.items()):
      if report.num_skipped:
        logging.warning("%s/%s: skipped %d of %d rows of %s: %s", self.name, split,
                        report.num_skipped, report.rows, report.manifest,
                        ", ".join(f"{r} {n}" for r, n in sorted(report.skipped.items())))
      logging.info("%s/%s: %d examples written.", self.name, split, report.examples)
    contents = dict(
        on_bad_row=self._on_bad_row,
        splits={split: dict(dataclasses.asdict(r), skipped=dict(sorted(r.skipped.items())),
                            num_skipped=r.num_skipped)
                for split, r in sorted(self.report.items())})
    (self.data_path / REPORT_FILE).write_text(json.dumps(contents, indent=1) + "\n")


def read_report(builder_dir: epath.PathLike) -> dict[str, Any]:
  """The `bad_rows.json` of a built corpus (`<data_dir>/<name>/<version>`)."""
  return json.loads((epath.Path(builder_dir) / REPORT_FILE).read_text())


def check_name(name: str) -> None:
  """ValueError unless `name` is free for a corpus: not a TFDS or embedded dataset.

  `open_source` would otherwise read (or build) that other dataset instead.
  """
  from mrl_jax.data import sources  # pylint: disable=g-import-not-at-top
  if name in sources.EMBEDDED_DATASETS:
    raise ValueError(f"Dataset name {name!r} is one of this package's own datasets "
                     f"{sources.EMBEDDED_DATASETS}; choose another.")
  try:
    tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return
  except Exception:  # pylint: disable=broad-except
    return  # Not a name TFDS resolves to a builder: free.
  raise ValueError(f"Dataset name {name!r} is a TFDS dataset, which readers would "
                   f"get instead of this corpus; choose another.")


def build(name: str, manifests: Mapping[str, epath.PathLike], label_file: epath.PathLike,
          *, data_dir: epath.PathLike | None = None, on_bad_row: str = "stop",
          version: str = DEFAULT_VERSION, overwrite: bool = False,
          **kwargs: Any) -> LabelCorpus:
  """Builds the corpus as array_record in data_dir and returns its builder.

  An already prepared corpus of that name and version is kept (the builder's
  `report` is then empty; see `read_report`) unless `overwrite`.
  """
  check_name(name)
  builder = LabelCorpus(name=name, manifests=manifests, label_file=label_file,
                        on_bad_row=on_bad_row, version=version, data_dir=data_dir, **kwargs)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder


# ------------------------------------------------------ the embedded demo corpus
#
# `mrl_demo_corpus`: a small multi-label corpus made of scikit-learn's digits,
# built through the same manifests-and-files path as a user's corpus, for smoke
# runs and tests (nothing is downloaded). Each image is a 2x2 grid of four
# different digit images (8x8 each, upsampled 2x with nearest neighbours, gray
# copied to RGB: 32x32x3); its labels are the distinct digits in it (10 classes
# named "0".."9"). The train split draws its digits from `mrl_digits`' train
# rows, validation from its test rows, so no digit image is in both.
# `sources.open_source("mrl_demo_corpus", split, data_dir)` builds it on first
# use (about a second).

DEMO_NAME = "mrl_demo_corpus"
DEMO_VERSION = "1.0.0"
DEMO_SPLITS = {"train": 512, "validation": 128}
DEMO_IMAGE_SIZE = 32
DEMO_SEED = 0
DEMO_CLASS_NAMES = tuple(str(d) for d in range(10))
_DEMO_DIGIT_ROWS = {"train": "train", "validation": "test"}  # Split -> mrl_digits split.


def demo_examples(split: str, seed: int = DEMO_SEED):
  """The demo corpus' split as arrays, in manifest order.

  Returns:
    (images uint8 [N, 32, 32, 3], rows int64 [N, 4]: the `digits.load_arrays()`
    rows in the top-left, top-right, bottom-left, bottom-right cells,
    labels: N sorted lists of the distinct digits).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import digits  # pylint: disable=g-import-not-at-top
  if split not in DEMO_SPLITS:
    raise ValueError(f"{DEMO_NAME} has splits {list(DEMO_SPLITS)}, not {split!r}.")
  images, labels = digits.load_arrays()
  pool = digits.split_indices(labels)[_DEMO_DIGIT_ROWS[split]]
  # One stream per split, so that resizing one split leaves the other alone.
  rng = np.random.default_rng([seed, list(DEMO_SPLITS).index(split)])
  rows = np.stack([rng.choice(pool, 4, replace=False) for _ in range(DEMO_SPLITS[split])])
  scale = DEMO_IMAGE_SIZE // 16
  cells = images[rows].repeat(scale, axis=2).repeat(scale, axis=3)  # [N, 4, 16, 16, 1]
  top = np.concatenate([cells[:, 0], cells[:, 1]], axis=2)
  bottom = np.concatenate([cells[:, 2], cells[:, 3]], axis=2)
  grid = np.concatenate([top, bottom], axis=1).repeat(3, axis=-1)
  return grid, rows.astype(np.int64), [sorted({int(d) for d in labels[r]}) for r in rows]


def write_demo_files(folder: epath.PathLike, seed: int = DEMO_SEED
                     ) -> tuple[dict[str, epath.Path], epath.Path]:
  """Writes the demo corpus' PNG files, manifests and label file into `folder`.

  Layout: `labels.txt`, `<split>.tsv` (rows `<split>/<i:05d>.png<TAB>labels`,
  label ids), `<split>/<i:05d>.png`. Returns (split -> manifest, label file).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = epath.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  label_file = folder / "labels.txt"
  label_file.write_text("\n".join(DEMO_CLASS_NAMES) + "\n")
  manifests = {}
  for split in DEMO_SPLITS:
    images, _, labels = demo_examples(split, seed)
    (folder / split).mkdir(exist_ok=True)
    lines = [f"# {DEMO_NAME} {split}: 2x2 grids of sklearn digits, seed {seed}."]
    for i, (image, label) in enumerate(zip(images, labels)):
      relative = f"{split}/{i:05d}.png"
      Image.fromarray(image, mode="RGB").save(os.fspath(folder / relative))
      lines.append(f"{relative}\t{','.join(map(str, label))}")
    manifests[split] = folder / f"{split}.tsv"
    manifests[split].write_text("\n".join(lines) + "\n")
  return manifests, label_file


class MrlDemoCorpus(LabelCorpus, skip_registration=True):
  """The embedded demo corpus: writes its source files, then builds them as any corpus.

  Its source files exist only while it is being built (in a temporary folder),
  so the builder knows its class names without them, and creating it, e.g. to
  ask `is_prepared()`, touches no files.
  """

  def __init__(self, *, data_dir: epath.PathLike | None = None, **kwargs: Any):
    super().__init__(
        name=DEMO_NAME, manifests={}, label_file=None, on_bad_row="stop",
        version=DEMO_VERSION, data_dir=data_dir,
        description=(f"{DEMO_SPLITS['train']} train / {DEMO_SPLITS['validation']} "
                     f"validation 32x32 RGB 2x2 grids of scikit-learn digits; labels: "
                     f"the distinct digits in the grid (10 classes). Embedded demo "
                     f"corpus of mrl_jax, seed {DEMO_SEED}."),
        **kwargs)

  def _label_names(self) -> list[str]:
    if self._label_file is not None:
      return super()._label_names()
    return list(DEMO_CLASS_NAMES)

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    import tempfile  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory(prefix="mrl_demo_corpus_") as folder:
      self._manifests, self._label_file = write_demo_files(folder)
      try:
        super()._download_and_prepare(dl_manager, download_config)
      finally:
        self._manifests, self._label_file = {}, None
