"""Parsing the `:arg` suffix of a config path, e.g. `configs/x.py:runlocal,depth=50`."""

from __future__ import annotations

import ast

import ml_collections


def parse_config_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Comma-separated `key=value` pairs (a bare `key` means True) over `defaults`.

  Values are Python literals where they parse as one (50, 0.1, True), strings
  otherwise (B/16). Unknown keys are an error, so a typo is not silently ignored.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; this config takes {sorted(defaults)}.")
    if not _:
      parsed[key] = True
      continue
    try:
      parsed[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed[key] = value
  return parsed
