"""Errors a user of the vector index can cause: bad queries, bad plans, unreadable index files."""

from __future__ import annotations

from mrl_jax.errors import UserError


class IndexQueryError(UserError, ValueError):
  """A search or add call the index cannot answer (wrong width, NaN, k too large, bad plan)."""


class IndexFileError(UserError, ValueError):
  """An index directory that is incomplete, from another format version, or not an index."""


class IndexNotFoundError(UserError, FileNotFoundError):
  """No index directory at the given path."""


def one_line(error: BaseException) -> str:
  """An exception's message on one line (its type name when it has none), to quote in ours."""
  return " ".join(str(error).split()) or type(error).__name__
