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
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from absl import logging as absl_logging

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
    """Starts WORKDIR/logs/<mode>[.process<i>].log with what was buffered; returns its path."""
    name = mode if process_count == 1 else f"{mode}.process{process_index}"
    folder = os.path.join(os.path.abspath(workdir), "logs")
    os.makedirs(folder, exist_ok=True)
    self.path = os.path.join(folder, f"{name}.log")
    handler = logging.FileHandler(self.path)
    handler.setFormatter(absl_logging.PythonFormatter())
    root = logging.getLogger()
    self._buffer.setTarget(handler)
    self._buffer.flush()
    root.removeHandler(self._buffer)
    self._buffer.close()
    root.addHandler(handler)
    return self.path
