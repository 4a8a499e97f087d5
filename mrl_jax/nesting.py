"""The nesting list: which prefixes z[:m] of the embedding are trained and measured.

One `Nesting` object is shared by the head, the losses, the metrics and the
evaluators, so every part of the code agrees on the sizes and their weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mrl_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Nesting:
  """Increasing prefix sizes and their relative-importance loss weights c_m."""

  dims: tuple[int, ...]
  weights: tuple[float, ...]

  def __post_init__(self):
    dims, weights = self.dims, self.weights
    if not dims:
      raise ConfigError("config.nesting.dims is empty: give at least one prefix size, "
                        "e.g. (8, 16, 32, ..., embedding_dim).")
    if any(int(m) != m or m <= 0 for m in dims):
      raise ConfigError(f"config.nesting.dims={dims} must be positive integers.")
    if any(b <= a for a, b in zip(dims, dims[1:])):
      raise ConfigError(f"config.nesting.dims={dims} must be strictly increasing, "
                        "e.g. (8, 16, 32, 64).")
    if len(weights) != len(dims):
      raise ConfigError(
          f"config.nesting.weights has {len(weights)} entries but "
          f"config.nesting.dims has {len(dims)}: give one weight per size "
          "(or leave weights empty for all ones).")
    if any(w < 0 for w in weights):
      raise ConfigError(f"config.nesting.weights={weights} must be non-negative.")

  @classmethod
  def create(cls, dims: Sequence[int], weights: Sequence[float] | None = None,
             *, embedding_dim: int | None = None) -> Nesting:
    """Builds and checks a nesting; empty/None weights mean c_m = 1 for every m."""
    dims = tuple(int(m) for m in dims)
    weights = tuple(float(w) for w in weights) if weights else (1.0,) * len(dims)
    nesting = cls(dims, weights)
    if embedding_dim is not None and dims[-1] > embedding_dim:
      raise ConfigError(
          f"config.nesting.dims={dims} goes up to {dims[-1]} but the model's "
          f"embedding has only {embedding_dim} dims: drop the larger sizes or "
          "use a wider model.")
    return nesting

  @property
  def num_sizes(self) -> int:
    return len(self.dims)

  @property
  def chunks(self) -> tuple[tuple[int, int], ...]:
    """Disjoint [start, end) slices of z whose prefix sums give every prefix.

    Prefix m_i is the union of chunks 0..i, so a head computes one partial
    product per chunk and sums them cumulatively instead of re-multiplying
    the shared leading features once per size.
    """
    starts = (0,) + self.dims[:-1]
    return tuple(zip(starts, self.dims))
