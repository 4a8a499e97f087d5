"""The one path type for a workdir and every file in it: local folders and buckets alike.

A workdir is a local folder or an object-store URI (`gs://BUCKET/run`, or any other
scheme `etils.epath` opens: s3://, az://, hf://). Every read and write of a workdir
goes through `etils.epath.Path`, the path type Orbax itself uses, so a checkpoint, the
config.json beside it and the probe's outputs all land in the same place.

Local paths behave exactly as before: they are made absolute (`os.path.abspath`) and
a file is replaced atomically (written to `<name>.tmp`, then `os.replace`), so a
reader never sees half a file. On an object store an object write is already atomic
(the object appears whole when the upload completes) and there is no rename, so a
file is written once. Objects cannot be appended to: `AppendedLines` keeps what was
written and rewrites the whole object (see there).

Without TensorFlow, epath opens gs:// through fsspec's gcsfs (which follows
STORAGE_EMULATOR_HOST); with TensorFlow installed it uses tf.io.gfile.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from etils import epath

from mrl_jax.errors import ConfigError

# The one path type for workdirs and their files.
WorkdirPath = epath.Path

# `scheme://` at the start of a path: a URI, not a local file name.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The schemes etils.epath can open (gpath's prefixes); any other URI is refused up front.
_EPATH_SCHEMES = ("gs", "s3", "az", "hf")


def _no_stale_bucket_listings() -> None:
  """gcsfs caches every folder listing for the life of the process and never sees what
  other processes (or TensorStore, through which Orbax writes arrays) add later: after
  one listing, a checkpoint another process committed stayed invisible, `exists()`
  False (measured against the emulator in tests/test_gcs_workdir.py). So gs:// listings
  are always fetched afresh (a few small requests per save or restore)."""
  try:
    import fsspec
  except ImportError:  # No fsspec: epath goes through TensorFlow, which caches nothing.
    return
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


_no_stale_bucket_listings()


def is_local(path: str | os.PathLike) -> bool:
  """Whether `path` is a local file name (no `scheme://` in front)."""
  return _URI.match(os.fspath(path)) is None


def workdir_path(path: str | os.PathLike, what: str = "--workdir") -> epath.Path:
  """`path` as the workdir path type: local paths absolute, URIs kept as they are.

  `what` names the flag or field the path came from, for the error message.
  """
  text = os.fspath(path) if path is not None else ""
  if not str(text).strip():
    raise ConfigError(f"{what} is empty; pass a local folder or a bucket URI such as "
                      "gs://BUCKET/run.")
  if _URI.match(text) is None:  # Local (not via is_local: tests swap that to pick a branch).
    return epath.Path(os.path.abspath(text))
  scheme = text.split("://", 1)[0].lower()
  if scheme not in _EPATH_SCHEMES:
    supported = ", ".join(f"{s}://" for s in _EPATH_SCHEMES)
    raise ConfigError(f"{what} {text!r} uses {scheme}://, which cannot be opened (supported: "
                      f"{supported}); pass a local folder or e.g. gs://BUCKET/run.")
  return epath.Path(text)


def make_dirs(path: str | os.PathLike) -> epath.Path:
  """Creates the folder `path` (and its parents) if missing; returns it as a path.

  On an object store folders do not exist as such; this is then (nearly) a no-op.
  """
  path = epath.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that a reader sees the old file or the new one, never half.

  Local: `<path>.tmp`, then `os.replace`. Object store: one object write (atomic there).
  """
  if is_local(path):
    local = os.fspath(path)
    with open(local + ".tmp", "wb") as f:
      f.write(data)
    os.replace(local + ".tmp", local)
  else:
    epath.Path(path).write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Like `write_bytes_atomic`, for text (UTF-8)."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
  """`obj` as JSON (indented as the workdir's JSON files always were) at `path`, atomically."""
  write_text_atomic(path, json.dumps(obj, indent=indent))


def write_through_local_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  """`write(local_file_name)` for writers that only take a local file name (a tokenizer's
  `save`), landing at `path` atomically: local `<path>.tmp` + `os.replace`; object store:
  a local temporary file, then one object write."""
  if is_local(path):
    local = os.fspath(path)
    write(local + ".tmp")
    os.replace(local + ".tmp", local)
    return
  with tempfile.TemporaryDirectory(prefix="mrl_jax_upload_") as folder:
    local = os.path.join(folder, epath.Path(path).name)
    write(local)
    with open(local, "rb") as f:
      epath.Path(path).write_bytes(f.read())


def local_file(path: str | os.PathLike) -> str:
  """A local file name holding the file at `path`, for readers that only open local files.

  Local paths are returned as they are; an object is downloaded once per process into a
  temporary folder (removed at exit), and that copy's name is returned.
  """
  if is_local(path):
    return os.fspath(path)
  key = os.fspath(path)
  if key not in _LOCAL_COPIES:
    folder = tempfile.mkdtemp(prefix="mrl_jax_download_")
    atexit.register(shutil.rmtree, folder, True)
    local = os.path.join(folder, epath.Path(path).name)
    with open(local, "wb") as f:
      f.write(epath.Path(path).read_bytes())
    _LOCAL_COPIES[key] = local
  return _LOCAL_COPIES[key]


_LOCAL_COPIES: dict[str, str] = {}


def read_text(path: str | os.PathLike) -> str:
  """The text of the file at `path` (local or object store)."""
  return epath.Path(path).read_text()


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(read_text(path))


def save_figure(figure: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
  """Saves a matplotlib figure as PNG at `path` (local or object store), atomically."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", **savefig_kwargs)
  write_bytes_atomic(path, buffer.getvalue())


class AppendedLines:
  """A text file that grows line by line: appended locally, rewritten whole on object stores.

  Local: the file is opened in append mode and each `append` is flushed at once, as
  before. Object store: objects cannot be appended to, so the lines are kept in memory
  (starting with what a resumed run already wrote) and the whole object is rewritten
  at `flush` -- at most every `min_interval_s` seconds from `append` (stores limit how
  often one object may be rewritten, e.g. about once a second on GCS), and always on an
  explicit `flush()` or `close()`. Readers read one file either way.
  """

  def __init__(self, path: str | os.PathLike, *, min_interval_s: float = 2.0):
    self.path = epath.Path(path)
    self.local = is_local(path)
    self._min_interval_s = min_interval_s
    self._file = None
    self._chunks: list[str] = []
    self._dirty = False
    self._last_flush = float("-inf")
    if self.local:
      self._file = open(os.fspath(path), "a")
    elif self.path.exists():
      self._chunks.append(self.path.read_text())

  def append(self, line: str) -> None:
    """Adds `line` (a newline is added) and, where allowed, writes it out."""
    if self._file is not None:
      self._file.write(line + "\n")
      self._file.flush()
      return
    self._chunks.append(line + "\n")
    self._dirty = True
    if time.monotonic() - self._last_flush >= self._min_interval_s:
      self.flush()

  def flush(self) -> None:
    """Makes every appended line readable in the file (object store: one rewrite)."""
    if self._file is not None:
      self._file.flush()
      return
    if self._dirty:
      self._chunks = ["".join(self._chunks)]
      self.path.write_text(self._chunks[0])
      self._dirty = False
      self._last_flush = time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    else:
      self.flush()
