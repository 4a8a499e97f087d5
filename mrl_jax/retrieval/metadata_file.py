"""The small JSON file beside each saved store or shortlist: its format, version and sizes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

from mrl_jax.retrieval.errors import IndexFileError, IndexNotFoundError, one_line

Parsed = TypeVar("Parsed")


def write_metadata(directory: str, name: str, format_name: str, version: int,
                   fields: dict[str, Any]) -> None:
  """Writes DIRECTORY/NAME: {"format", "version", **fields}."""
  meta = {"format": format_name, "version": version, **fields}
  with open(os.path.join(directory, name), "w") as f:
    json.dump(meta, f, indent=1)


def read_metadata(directory: str, name: str, format_name: str, version: int, what: str,
                  parse: Callable[[dict[str, Any]], Parsed]) -> Parsed:
  """`parse` of DIRECTORY/NAME after checking its format and version.

  `what` names the saved thing ("prefix store"); a missing directory is an
  IndexNotFoundError, and a missing, unreadable or foreign file, or one `parse`
  cannot read (KeyError, ValueError, TypeError), an IndexFileError: one line each.
  """
  if not os.path.isdir(directory):
    raise IndexNotFoundError(f"No {what} at {directory}: build and save one first.")
  path = os.path.join(directory, name)
  try:
    with open(path) as f:
      meta = json.load(f)
    if meta.get("format") != format_name or meta.get("version") != version:
      raise ValueError(f"not a version-{version} {what}")
    return parse(meta)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise IndexFileError(f"{path} is missing or unreadable ({one_line(e)}): save the "
                         f"{what.split()[-1]} again.") from None
