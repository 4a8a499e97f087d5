"""Where log records go in a `python -m mrl_jax.main` run.

The console carries the project's own lines: what MetricWriter and the probe
print, and log records emitted by mrl_jax's own modules (a skipped bad
example, a checkpoint set aside, a dataset being built), on stdout. Library
records (Orbax, TFDS, Grain, absl, JAX; Python `logging` and absl logging, and
Python warnings) go to WORKDIR/logs/<mode>.log (`<mode>.process<i>.log` when
there are several processes), and also to the console, as absl prints them,
with `--library_logs=console`.

The process index is only known once the process group is joined, so records
emitted before `open_log_file` are kept in memory and written to the file
first. Before `route` runs (imports, flag parsing) absl prints only warnings.

A workdir in a bucket (gs://...) cannot take a log file that grows: the file is then
written in a local temporary folder and copied to WORKDIR/logs/ when the process
exits (`close`, also registered with atexit); a process killed outright leaves no
copy there.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import shutil
import sys
import tempfile

from absl import logging as absl_logging

from mrl_jax.workdir_path import is_local, make_dirs, workdir_path, write_bytes_atomic

_PROJECT_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
MODES = ("file", "console")


class _FromProject(logging.Filter):
  """Passes records emitted by code in the mrl_jax package."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.pathname.startswith(_PROJECT_DIR)


class _ConsoleFormatter(logging.Formatter):
  """The message alone, as the project's other console lines; warnings say so."""

  def format(self, record: logging.LogRecord) -> str:
    message = record.getMessage()
    if record.levelno >= logging.ERROR:
      return f"error: {message}"
    if record.levelno >= logging.WARNING:
      return f"warning: {message}"
    return message


class LibraryLogs:
  """Installs the routing on the root logger; `open_log_file` once the process is known."""

  def __init__(self, library_logs: str = "file"):
    if library_logs not in MODES:
      raise ValueError(f"library_logs={library_logs!r}: use one of {MODES}.")
    self.path: str | None = None
    self._copy_to = None  # Object-store workdir: where the local file goes at exit.
    self._handler: logging.Handler | None = None
    root = logging.getLogger()
    # Records before the file exists; flushed into it by open_log_file.
    self._buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1,
                                                  target=None, flushOnClose=False)
    root.addHandler(self._buffer)
    if library_logs == "file":
      absl_handler = absl_logging.get_absl_handler()
      if absl_handler in root.handlers:
        root.removeHandler(absl_handler)
      console = logging.StreamHandler(sys.stdout)
      console.addFilter(_FromProject())
      console.setFormatter(_ConsoleFormatter())
      root.addHandler(console)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the file.

  def open_log_file(self, workdir: str, mode: str, process_index: int,
                    process_count: int) -> str:
    """Starts WORKDIR/logs/<mode>[.process<i>].log with what was buffered; returns its path
    (for a bucket workdir, the local file that is copied there at exit)."""
    name = mode if process_count == 1 else f"{mode}.process{process_index}"
    folder = workdir_path(workdir) / "logs"
    if is_local(folder):
      make_dirs(folder)
      self.path = os.fspath(folder / f"{name}.log")
    else:
      self._copy_to = folder / f"{name}.log"
      self.path = os.path.join(tempfile.mkdtemp(prefix="mrl_jax_logs_"), f"{name}.log")
      atexit.register(self.close)
    handler = self._handler = logging.FileHandler(self.path)
    handler.setFormatter(absl_logging.PythonFormatter())
    root = logging.getLogger()
    self._buffer.setTarget(handler)
    self._buffer.flush()
    root.removeHandler(self._buffer)
    self._buffer.close()
    root.addHandler(handler)
    return self.path

  def close(self) -> None:
    """Object-store workdir: copies the log file into WORKDIR/logs/ (once)."""
    if self._copy_to is None or self.path is None:
      return
    self._handler.flush()
    with open(self.path, "rb") as f:
      write_bytes_atomic(self._copy_to, f.read())
    self._copy_to = None
    logging.getLogger().removeHandler(self._handler)
    self._handler.close()
    shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)
