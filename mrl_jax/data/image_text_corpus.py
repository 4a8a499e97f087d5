"""An image-text corpus (captioned images) from manifests or webdataset tars, as TFDS.

`ImageTextCorpus` turns a user's captioned images into TFDS array_record
splits that `sources.open_source(name, split, data_dir)` and the pair
pipeline (`image_text_pipeline.py`) read by name, with no TensorFlow and
without this module (TFDS reads the dataset from its files in data_dir).

Inputs, per split, any mix of:

  * manifests (`.tsv` / `.txt`): UTF-8 lines `image_path<TAB>caption`
    (a leading byte-order mark is allowed; blank lines and lines starting
    with `#` are ignored). Relative paths resolve against the manifest's
    folder. Rows that share an image path (as written) give that image
    several captions, in the order of the rows.
  * webdataset tar shards (what img2dataset writes): members `KEY.jpg`,
    `KEY.jpeg`, `KEY.png` or `KEY.webp` (the image) and `KEY.txt` (its
    caption), grouped by KEY (the member name up to the first dot of its
    file name; folders inside the tar are part of the key). `KEY.json` and
    other extensions are ignored. Read with Python's tarfile (plain or
    compressed tars).

Features of the dataset:
  image:    uint8 [H, W, 3], stored as label_corpus stores images
            (`rgb_image_bytes`: JPEG / 8-bit RGB PNG byte for byte, anything
            else converted to RGB and re-encoded).
  captions: Sequence(Text), one or more per image.
  image_id: Text: the image path as written in the manifest, or
            `<shard file name>:<KEY>` for a tar member.
  label:    ClassLabel, only in corpora that have labels (the embedded demo
            `mrl_digit_captions`, see caption_demo.py); user corpora have none.
Examples are keyed by image_id, so the stored order (a hash of the key) is the
same every build.

Bad rows (`REASONS`), the policy of `build_corpus`: not_utf8 (a manifest line
or a tar caption that is not UTF-8), wrong_column_count (not exactly
`path<TAB>caption`), empty_caption, missing_file (no image at the path, or an
empty path), undecodable_image, missing_caption (a tar image without a .txt),
missing_image (a tar .txt without an image), duplicate_member (a KEY with two
images or two captions in one shard), unreadable_tar (a shard tarfile cannot
read; the whole shard counts once). With on_bad_row="stop" (default) the first
one raises `label_corpus.BadRowError` (`BadMemberError` for tars) as one line
naming the manifest and line (or shard and member) and the fix, and nothing
usable is left in data_dir. Row problems of a manifest (columns, encoding,
captions, missing files) are found in a first pass over its lines, image
decoding in a second, so "stop" reports the first row problem before any
undecodable image. With "skip" the bad rows are left out (an image that does
not decode drops every row naming it), counted per reason in `report`
and in `bad_rows.json` beside the dataset's files (read with
`label_corpus.read_report`; each split also records its `captions` count,
which the pair pipeline reads instead of scanning the split).

A WordPiece tokenizer (`tokenizer.train_wordpiece`, `tokenizer_vocab_size`
tokens) is trained on the train split's captions into the build's tokenizer
folder (`text_corpus.corpus_tokenizer_dir`: `<data_dir>/<name>/<version>/
tokenizer/`), unless the caller passes one (`tokenizer=`, copied there) or
sets tokenizer_vocab_size=0; the pair pipeline uses it when
config.data.tokenizer is None.

  build_image_text_corpus("my_pairs", data_dir=DIR,
                          manifests={"train": "train.tsv", "validation": "val.tsv"})
  build_image_text_corpus("my_laion", data_dir=DIR,
                          shards={"train": "shards/0*.tar", "validation": ["val.tar"]})

or the command line `python -m mrl_jax.tools.build_image_text_corpus`.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import tarfile
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from mrl_jax.data import label_corpus
from mrl_jax.data import text_corpus
from mrl_jax.data.label_corpus import BadRowError
from mrl_jax.errors import UserError

REASONS = ("not_utf8", "wrong_column_count", "empty_caption", "missing_file",
           "undecodable_image", "missing_caption", "missing_image", "duplicate_member",
           "unreadable_tar")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
MANIFEST_EXTENSIONS = (".tsv", ".txt")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
DEFAULT_VERSION = "1.0.0"
DEFAULT_TOKENIZER_VOCAB_SIZE = 8000

_BadRow = label_corpus._BadRow  # pylint: disable=protected-access
_absolute = label_corpus._absolute  # pylint: disable=protected-access
_resolve = label_corpus._resolve  # pylint: disable=protected-access


class ImageTextCorpusError(UserError, ValueError):
  """Arguments or inputs that cannot make an image-text corpus."""


class ImageTextFileNotFoundError(UserError, FileNotFoundError):
  """A manifest or shard named for a split does not exist."""


class BadMemberError(BadRowError):
  """A tar shard member that cannot become an example (with on_bad_row="stop")."""

  def __init__(self, shard: str, member: str | None, reason: str, detail: str):
    # pylint: disable=super-init-not-called,non-parent-init-called
    self.manifest, self.line, self.reason, self.detail = shard, 0, reason, detail
    self.shard, self.member = shard, member
    where = f"{shard} member {member}" if member is not None else shard
    what = "the member" if member is not None else "the shard"
    ValueError.__init__(
        self, f"{where}: {reason}: {detail}. Fix or remove {what}, or build with "
        f"on_bad_row='skip' (--on_bad_row=skip) to leave such members out.")


@dataclasses.dataclass
class CaptionSplitReport(label_corpus.SplitReport):
  """`label_corpus.SplitReport` plus the captions written."""
  captions: int = 0


@dataclasses.dataclass(frozen=True)
class Example:
  """One image with its captions, before it is written."""
  image_id: str
  image: bytes
  captions: tuple[str, ...]
  label: int | None = None


def is_tar(path: epath.PathLike) -> bool:
  return os.fspath(path).lower().endswith(TAR_EXTENSIONS)


def expand_inputs(items: str | epath.PathLike | Sequence[str | epath.PathLike]) -> list[epath.Path]:
  """Files (absolute) of one split's inputs: paths and globs, in the order given,
  each glob's matches sorted; ImageTextFileNotFoundError for a path or a glob
  that names nothing."""
  if isinstance(items, (str, os.PathLike)):
    items = [items]
  files = []
  for item in items:
    text = os.fspath(item)
    if glob.has_magic(text):
      matches = sorted(glob.glob(text))
      if not matches:
        raise ImageTextFileNotFoundError(f"No file matches {text!r}: check the pattern.")
      files.extend(_absolute(m) for m in matches)
    else:
      files.append(_absolute(text))
  return files


def _decode_image(data: bytes, where: str) -> bytes:
  try:
    return label_corpus.rgb_image_bytes(data)
  except Exception as e:  # pylint: disable=broad-except
    # As label_corpus: PIL's many exception types all mean the same here, and
    # the buffer's address in its messages would differ from build to build.
    message = label_corpus._BUFFER_RE.sub("the file", str(e))  # pylint: disable=protected-access
    raise _BadRow("undecodable_image",
                  f"{where} does not decode as an image ({type(e).__name__}: {message})") from e


def _caption_text(text: str) -> str:
  caption = " ".join(text.split())
  if not caption:
    raise _BadRow("empty_caption", "the caption is empty")
  return caption


class ImageTextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds an image-text corpus from manifests and tar shards (see module doc).

  Not registered with TFDS; a prepared corpus is read from its files. After
  `download_and_prepare`, `report` maps each split to its `CaptionSplitReport`.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, name: str, inputs: Mapping[str, Sequence[epath.PathLike]],
               on_bad_row: str = "stop", version: str = DEFAULT_VERSION,
               description: str | None = None, tokenizer_vocab_size: int = 0,
               tokenizer: epath.PathLike | None = None,
               data_dir: epath.PathLike | None = None, **kwargs: Any):
    """Creates the builder; nothing is read yet.

    Args:
      name: dataset name (lowercase letters, digits, underscores; not a TFDS name).
      inputs: split name -> its manifests and tar shards (told apart by extension).
      on_bad_row: "stop" or "skip".
      version: "X.Y.Z".
      description: stored in the DatasetInfo; default names the inputs.
      tokenizer_vocab_size: > 0 trains a WordPiece tokenizer of that size on
        the train split's captions; 0 = none (unless `tokenizer` is given).
      tokenizer: an existing tokenizer (vocab.txt, tokenizer.json or a folder)
        to store as the corpus's own instead of training one.
      data_dir: TFDS data_dir (None = TFDS's default).
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder`.
    """
    if not label_corpus._NAME_RE.fullmatch(name):  # pylint: disable=protected-access
      raise ImageTextCorpusError(f"Dataset name {name!r}: use lowercase letters, digits and "
                                 f"underscores, starting with a letter (e.g. 'my_pairs').")
    if on_bad_row not in label_corpus.ON_BAD_ROW:
      raise ImageTextCorpusError(
          f"on_bad_row={on_bad_row!r}: use one of {label_corpus.ON_BAD_ROW}.")
    for split in inputs:
      if not label_corpus._NAME_RE.fullmatch(split):  # pylint: disable=protected-access
        raise ImageTextCorpusError(f"Split name {split!r}: use lowercase letters, digits and "
                                   f"underscores (e.g. 'train', 'validation').")
    if tokenizer is None and tokenizer_vocab_size > 0 and inputs and "train" not in inputs:
      raise ImageTextCorpusError(
          f"Dataset {name!r}: its tokenizer is trained on the 'train' split, which is not "
          f"given (pass a tokenizer, or build without one: --tokenizer_vocab_size=0).")
    self.name = name
    self.VERSION = tfds.core.Version(version)  # pylint: disable=invalid-name
    self._inputs = {split: [_absolute(p) for p in paths]
                    for split, paths in inputs.items()}
    self._on_bad_row = on_bad_row
    self._description = description
    self._tokenizer_vocab_size = int(tokenizer_vocab_size)
    self._tokenizer_source = os.fspath(tokenizer) if tokenizer is not None else None
    self._train_captions: list[str] = []
    self.report: dict[str, CaptionSplitReport] = {}
    super().__init__(data_dir=data_dir, version=version, **kwargs)

  # ------------------------------------------------------------ what the data is
  def class_names(self) -> list[str] | None:
    """The label names (None: an unlabelled corpus; the demo overrides this)."""
    return None

  def image_feature(self) -> tfds.features.Image:
    # No encoding_format: the stored bytes are JPEG or PNG per example.
    return tfds.features.Image(shape=(None, None, 3))

  def _info(self) -> tfds.core.DatasetInfo:
    description = self._description or (
        "Image-text corpus built by mrl_jax.data.image_text_corpus from "
        + "; ".join(f"{s}: {', '.join(map(os.fspath, p))}" for s, p in sorted(self._inputs.items()))
        + ".")
    features = {"image": self.image_feature(),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "image_id": tfds.features.Text()}
    names = self.class_names()
    if names:
      features["label"] = tfds.features.ClassLabel(names=names)
    return tfds.core.DatasetInfo(builder=self, description=description,
                                 features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    if not self._inputs:
      raise ImageTextCorpusError(f"Dataset {self.name!r}: no split inputs given.")
    missing = [os.fspath(p) for paths in self._inputs.values() for p in paths if not p.is_file()]
    if missing:
      raise ImageTextFileNotFoundError(f"Manifest or shard file(s) not found: "
                                       f"{', '.join(missing)}.")
    self.report = {split: CaptionSplitReport(manifest=", ".join(os.fspath(p) for p in paths))
                   for split, paths in self._inputs.items()}
    self._train_captions = []
    return {split: self._generate_examples(split) for split in self._inputs}

  def examples(self, split: str) -> Iterator[Example]:
    """The split's good examples, reading its inputs in order (bad rows go to `_bad`)."""
    for path in self._inputs[split]:
      if is_tar(path):
        yield from self._tar_examples(split, path)
      else:
        yield from self._manifest_examples(split, path)

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    report = self.report[split]
    keep = split == "train" and self._tokenizer_source is None and self._tokenizer_vocab_size > 0
    seen = set()
    for example in self.examples(split):
      if example.image_id in seen:
        # Two inputs of one split naming the same image (TFDS would fail on the key).
        raise ImageTextCorpusError(f"Split {split!r}: image {example.image_id!r} comes from "
                                   f"two of its inputs; list each image in one input only.")
      seen.add(example.image_id)
      report.examples += 1
      report.captions += len(example.captions)
      if keep:
        self._train_captions.extend(example.captions)
      features = {"image": example.image, "captions": list(example.captions),
                  "image_id": example.image_id}
      if example.label is not None:
        features["label"] = int(example.label)
      yield example.image_id, features
    if not report.examples:
      reasons = ", ".join(f"{r} {n}" for r, n in sorted(report.skipped.items()))
      raise ImageTextCorpusError(f"Split {split!r} has no examples: {report.rows} rows read from "
                                 f"{report.manifest}" + (f", all bad ({reasons})" if reasons
                                                         else "") + ".")

  # ------------------------------------------------------------ manifests
  def _manifest_examples(self, split: str, manifest: epath.Path) -> Iterator[Example]:
    report = self.report[split]
    where = os.fspath(manifest)
    # Pass 1: rows -> captions per image path, in first-appearance order.
    rows: dict[str, list[tuple[int, str, str]]] = collections.OrderedDict()
    file_ok: dict[str, bool] = {}
    for number, raw in label_corpus._binary_lines(manifest):  # pylint: disable=protected-access
      try:
        line = label_corpus._decode_line(raw, number)  # pylint: disable=protected-access
      except _BadRow as bad:
        if raw.lstrip().startswith(b"#"):
          continue
        report.rows += 1
        self._bad(report, where, f"line {number}", number,
                  raw.decode("utf-8", errors="backslashreplace"), bad)
        continue
      if not line.strip() or line.lstrip().startswith("#"):
        continue
      report.rows += 1
      try:
        columns = line.split("\t")
        if len(columns) != 2:
          raise _BadRow("wrong_column_count", f"{len(columns)} tab-separated column(s), "
                                              f"expected 2 (image_path<TAB>caption)")
        path_text = columns[0].strip()
        caption = _caption_text(columns[1])
        if not path_text:
          raise _BadRow("missing_file", "the image path is empty")
        if path_text not in file_ok:
          file_ok[path_text] = _resolve(manifest, path_text).is_file()
        if not file_ok[path_text]:
          raise _BadRow("missing_file",
                        f"no file at {_resolve(manifest, path_text)}")
      except _BadRow as bad:
        self._bad(report, where, f"line {number}", number, line, bad)
        continue
      rows.setdefault(path_text, []).append((number, caption, line))
    # Pass 2: one decode per image.
    for path_text, image_rows in rows.items():
      path = _resolve(manifest, path_text)
      try:
        image = _decode_image(path.read_bytes(), os.fspath(path))
      except _BadRow as bad:
        for number, _, line in image_rows:
          self._bad(report, where, f"line {number}", number, line, bad)
        continue
      yield Example(image_id=path_text, image=image,
                    captions=tuple(caption for _, caption, _ in image_rows))

  # ------------------------------------------------------------ tar shards
  def _tar_examples(self, split: str, shard: epath.Path) -> Iterator[Example]:
    report = self.report[split]
    where = os.fspath(shard)
    try:
      archive = tarfile.open(where, "r:*")
      members = archive.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:
      report.rows += 1
      self._bad(report, where, "(the tar file)", 0, where,
                _BadRow("unreadable_tar", f"tarfile cannot read it ({type(e).__name__}: "
                                          f"{' '.join(str(e).split())})"))
      return
    with archive:
      groups: dict[str, dict[str, list[tarfile.TarInfo]]] = collections.OrderedDict()
      for member in members:
        if not member.isfile():
          continue
        folder, base = os.path.split(member.name)
        if base.startswith("."):
          continue  # Hidden files (e.g. macOS's ._ resource forks) are no members.
        stem, dot, extension = base.partition(".")
        if not dot:
          continue
        extension = extension.lower()
        kind = ("image" if extension in IMAGE_EXTENSIONS else
                "caption" if extension == CAPTION_EXTENSION else None)
        if kind is None:
          continue  # .json and anything else img2dataset writes beside.
        key = f"{folder}/{stem}" if folder else stem
        groups.setdefault(key, {"image": [], "caption": []})[kind].append(member)
      shard_name = os.path.basename(where)
      for key, group in groups.items():
        report.rows += 1
        images, captions = group["image"], group["caption"]
        member = (images or captions)[0].name
        try:
          for kind, found in (("image", images), ("caption", captions)):
            if len(found) > 1:
              raise _BadRow("duplicate_member", f"key {key!r} has {len(found)} {kind} members "
                            f"({', '.join(m.name for m in found)}); keep one")
          if not captions:
            raise _BadRow("missing_caption", f"no {key}.{CAPTION_EXTENSION} beside the image")
          if not images:
            raise _BadRow("missing_image", f"no {key}.jpg/.png/.webp beside the caption")
          member = captions[0].name
          raw = archive.extractfile(captions[0]).read()
          try:
            text = raw.decode("utf-8-sig")
          except UnicodeDecodeError as e:
            raise _BadRow("not_utf8", f"byte 0x{raw[e.start]:02x} at offset {e.start} is not "
                                      f"UTF-8 (save captions as UTF-8)") from None
          caption = _caption_text(text)
          member = images[0].name
          image = _decode_image(archive.extractfile(images[0]).read(), f"{where}:{member}")
        except _BadRow as bad:
          self._bad(report, where, f"member {member}", 0, member, bad)
          continue
        yield Example(image_id=f"{shard_name}:{key}", image=image, captions=(caption,))

  # ------------------------------------------------------------ bad rows and the build
  def _bad(self, report: label_corpus.SplitReport, file: str, at: str, line: int, text: str,
           bad: _BadRow) -> None:
    if self._on_bad_row == "stop":
      if at.startswith("member "):
        raise BadMemberError(file, at[len("member "):], bad.reason, bad.detail)
      if line:
        raise BadRowError(file, line, bad.reason, bad.detail)
      raise BadMemberError(file, None, bad.reason, bad.detail)
    report.skipped[bad.reason] = report.skipped.get(bad.reason, 0) + 1
    if len(report.bad_rows) < label_corpus.MAX_RECORDED_BAD_ROWS:
      report.bad_rows.append(dict(file=file, at=at, reason=bad.reason, detail=bad.detail,
                                  text=text[:500]))

  def _store_tokenizer(self) -> None:
    from mrl_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    if self._tokenizer_source is not None:
      tokenizer = tokenizer_lib.load_tokenizer(self._tokenizer_source)
      what = f"the tokenizer {self._tokenizer_source}"
    elif self._tokenizer_vocab_size > 0:
      tokenizer = tokenizer_lib.train_wordpiece(self._train_captions, self._tokenizer_vocab_size)
      what = (f"a WordPiece tokenizer of {tokenizer.vocab_size} tokens trained on "
              f"{len(self._train_captions)} train captions")
    else:
      return
    folder = text_corpus.corpus_tokenizer_dir(self.data_path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(os.fspath(folder / tokenizer_lib.TOKENIZER_FILE))
    tokenizer.save_vocab(os.fspath(folder / tokenizer_lib.VOCAB_FILE))
    logging.info("%s: stored %s in %s.", self.name, what, folder)

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    super()._download_and_prepare(dl_manager, download_config)
    # TFDS writes into a temporary folder that becomes the dataset's folder
    # only if everything succeeds, so the tokenizer and report move with it.
    self._store_tokenizer()
    self._train_captions = []
    for split, report in sorted(self.report.items()):
      if report.num_skipped:
        logging.warning("%s/%s: skipped %d of %d rows: %s", self.name, split,
                        report.num_skipped, report.rows,
                        ", ".join(f"{r} {n}" for r, n in sorted(report.skipped.items())))
    contents = dict(
        on_bad_row=self._on_bad_row,
        splits={split: dict(dataclasses.asdict(r), skipped=dict(sorted(r.skipped.items())),
                            num_skipped=r.num_skipped)
                for split, r in sorted(self.report.items())})
    (self.data_path / label_corpus.REPORT_FILE).write_text(json.dumps(contents, indent=1) + "\n")


def split_inputs(manifests: Mapping[str, Any] | None,
                 shards: Mapping[str, Any] | None) -> dict[str, list[epath.Path]]:
  """split -> files: each split's manifests, then its shards (paths, lists or globs)."""
  inputs: dict[str, list[epath.Path]] = {}
  for kind, mapping in (("manifest", manifests or {}), ("shard", shards or {})):
    for split, items in mapping.items():
      files = expand_inputs(items)
      for f in files:
        if (kind == "shard") != is_tar(f):
          want = "a .tar shard" if kind == "shard" else "a manifest (.tsv/.txt)"
          raise ImageTextCorpusError(f"{f} (split {split!r}) was given as {kind} but is not "
                                     f"{want}; pass it as the other kind.")
      inputs.setdefault(split, []).extend(files)
  return inputs


def build_image_text_corpus(name: str, *, data_dir: epath.PathLike | None = None,
                            manifests: Mapping[str, Any] | None = None,
                            shards: Mapping[str, Any] | None = None,
                            on_bad_row: str = "stop",
                            tokenizer_vocab_size: int = DEFAULT_TOKENIZER_VOCAB_SIZE,
                            tokenizer: epath.PathLike | None = None,
                            version: str = DEFAULT_VERSION, overwrite: bool = False,
                            **kwargs: Any) -> ImageTextCorpus:
  """Builds the corpus as array_record in data_dir and returns its builder.

  `manifests` / `shards`: split -> a file, a glob or a list of them. An
  already prepared corpus of that name and version is kept (its `report` is
  then empty) unless `overwrite`.
  """
  label_corpus.check_name(name)
  builder = ImageTextCorpus(name=name, inputs=split_inputs(manifests, shards),
                            on_bad_row=on_bad_row, version=version,
                            tokenizer_vocab_size=tokenizer_vocab_size, tokenizer=tokenizer,
                            data_dir=data_dir, **kwargs)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder


def recorded_caption_count(builder_dir: epath.PathLike, split: str) -> int | None:
  """Captions of `split` as recorded at build time (None: not recorded)."""
  try:
    report = label_corpus.read_report(builder_dir)
  except (FileNotFoundError, ValueError):
    return None
  value = report.get("splits", {}).get(split, {}).get("captions")
  return int(value) if value is not None else None
