"""A split's embeddings on disk: shards written while embedding, read back in row blocks.

`--mode=probe` on a large database (ImageNet-1K at 2048 dims is 10.5 GB of float32)
does not keep the train embeddings in memory. Each process appends the rows it
embeds to its own shard, in its split directory:

  shard-PPPPP.npy   float32 [rows, dim]: a plain .npy (np.load(..., mmap_mode="r") reads it)
  labels-PPPPP.npy  int64 [rows]: the class ids
  rows-PPPPP.npy    int64 [rows]: each row's index in the split (dataset order)
  shard-PPPPP.json  {"rows", "dim", "num_shards"}: written last, so a shard is complete
                    exactly when its JSON exists

The .npy header is written last as well (its shape is known only at the end; a
fixed-size header is reserved first), so the data streams to disk block by block
and never sits in memory. `SplitEmbeddings` reads all shards of a split back in
split order (rows of several processes interleave batch by batch).

Reading. Rows are read with plain file reads into fresh buffers, never through a
memory map: pages of a map that a scan touched stay resident and count in the
process's RSS (10 GB peak RSS for a scan of a 10 GB map, although the kernel could
drop them), and even scattered gathers map far more than they touch (measured:
25 gathers of 8,000 random rows of a 1.6 GB shard through a read-only map raised
peak RSS to 1.8 GB although each dropped its pages with MADV_DONTNEED afterwards;
the kernel maps whole neighbourhoods of page cache around each fault). A gather
(`take`, the candidates of a rerank) reads each run of consecutive rows once.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from mrl_jax.errors import UserError

_HEADER_BYTES = 128        # Reserved .npy header (v1.0): room for any 2-D float32 shape.
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_SHARD_JSON = re.compile(r"shard-(\d{5})\.json$")


class EmbeddingShardError(UserError, FileNotFoundError):
  """A split's embedding shards are missing or incomplete."""


def _npy_header(rows: int, dim: int) -> bytes:
  """A .npy v1.0 header of exactly _HEADER_BYTES for float32 [rows, dim], C order."""
  text = repr({"descr": "<f4", "fortran_order": False, "shape": (int(rows), int(dim))})
  length = _HEADER_BYTES - len(_NPY_MAGIC) - 2
  if len(text) + 1 > length:
    raise ValueError(f"shape ({rows}, {dim}) does not fit the reserved .npy header")
  return _NPY_MAGIC + struct.pack("<H", length) + (text.ljust(length - 1) + "\n").encode("latin1")


class ShardWriter:
  """Appends one process's embedded rows of a split to its shard (see the module doc)."""

  def __init__(self, directory: str, process_index: int = 0, num_shards: int = 1):
    os.makedirs(directory, exist_ok=True)
    self.directory, self.process_index, self.num_shards = directory, process_index, num_shards
    stem = os.path.join(directory, f"shard-{process_index:05d}")
    for name in (f"{stem}.json",):  # A shard being rewritten is incomplete until closed.
      if os.path.exists(name):
        os.remove(name)
    self._stem = stem
    self._file = open(f"{stem}.npy", "wb")
    self._file.write(b"\0" * _HEADER_BYTES)
    self._rows = 0
    self._dim: int | None = None
    self._labels: list[np.ndarray] = []
    self._ids: list[np.ndarray] = []

  def append(self, embeddings: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
    """Adds embeddings [n, dim], their labels [n] and their split row indices [n]."""
    z = np.ascontiguousarray(embeddings, np.float32)
    if z.ndim != 2 or len(z) != len(labels) or len(z) != len(rows):
      raise ValueError(f"embeddings {z.shape}, labels {np.shape(labels)} and rows "
                       f"{np.shape(rows)} must be [n, dim], [n], [n]")
    if self._dim is None:
      self._dim = z.shape[1]
    elif z.shape[1] != self._dim:
      raise ValueError(f"embeddings have {z.shape[1]} dims, the shard {self._dim}")
    if len(z):  # A batch of padding only adds nothing.
      self._file.write(memoryview(z).cast("B"))
    self._labels.append(np.asarray(labels, np.int64).reshape(-1))
    self._ids.append(np.asarray(rows, np.int64).reshape(-1))
    self._rows += len(z)

  def close(self) -> None:
    """Writes the header, labels and row ids, then the JSON that marks the shard complete."""
    dim = self._dim or 0
    self._file.seek(0)
    self._file.write(_npy_header(self._rows, dim))
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    np.save(f"{self._stem.replace('shard-', 'labels-')}.npy",
            np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64))
    np.save(f"{self._stem.replace('shard-', 'rows-')}.npy",
            np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64))
    tmp = f"{self._stem}.json.tmp"
    with open(tmp, "w") as f:
      json.dump({"rows": self._rows, "dim": dim, "num_shards": self.num_shards}, f)
    os.replace(tmp, f"{self._stem}.json")


class SplitEmbeddings:
  """All shards of a split as one read-only [N, dim] float32 array, in split order.

  Supports what the probe and `retrieval.Index` read: `shape`, `dtype`, `len`,
  `x[start:stop]` (a row block, read from disk), `x[ids]` / `x[ids, :c]` (gathered
  rows), `blocks(rows)`, and `labels` (in memory: int64 [N]).
  """

  def __init__(self, directory: str):
    self.directory = directory
    metas = {}
    if os.path.isdir(directory):
      for name in os.listdir(directory):
        match = _SHARD_JSON.match(name)
        if match:
          with open(os.path.join(directory, name)) as f:
            metas[int(match.group(1))] = json.load(f)
    if not metas:
      raise EmbeddingShardError(f"No complete embedding shard in {directory}: run the probe "
                                "again (it writes them).")
    # Shard 0's count rules: files of an earlier run with more processes are ignored.
    expected = (metas.get(0) or next(iter(metas.values())))["num_shards"]
    metas = {p: m for p, m in metas.items() if p < expected}
    if any(m["num_shards"] != expected for m in metas.values()):
      raise EmbeddingShardError(f"{directory} holds shards of runs with different process "
                                "counts: remove the directory and run the probe again.")
    missing = sorted(set(range(expected)) - set(metas))
    if missing:
      raise EmbeddingShardError(f"{directory} lacks shard(s) {missing} of {expected}: a process "
                                "did not finish embedding; run the probe again.")
    dims = {m["dim"] for m in metas.values() if m["rows"]}
    if len(dims) > 1:
      raise EmbeddingShardError(f"{directory}: shards of different widths {sorted(dims)}: remove "
                                "the directory and run the probe again.")
    self.dim = dims.pop() if dims else 0
    self._paths = [os.path.join(directory, f"shard-{p:05d}.npy") for p in range(expected)]
    self._counts = np.array([metas[p]["rows"] for p in range(expected)], np.int64)
    labels = [np.load(os.path.join(directory, f"labels-{p:05d}.npy")) for p in range(expected)]
    ids = [np.load(os.path.join(directory, f"rows-{p:05d}.npy")) for p in range(expected)]
    self.num_rows = int(self._counts.sum())
    shard = np.concatenate([np.full(c, p, np.int32) for p, c in enumerate(self._counts)])
    local = np.concatenate([np.arange(c, dtype=np.int64) for c in self._counts])
    order = np.argsort(np.concatenate(ids), kind="stable")
    self._shard, self._local = shard[order], local[order]   # Split row g is shard/local here.
    self.labels = np.concatenate(labels)[order]
    self._files = [open(p, "rb") for p in self._paths]

  # ---------------------------------------------------------------- array protocol
  @property
  def shape(self) -> tuple[int, int]:
    return (self.num_rows, self.dim)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.float32)

  @property
  def ndim(self) -> int:
    return 2

  def __len__(self) -> int:
    return self.num_rows

  def __getitem__(self, key: Any) -> np.ndarray:
    cols = slice(None)
    if isinstance(key, tuple):
      key, cols = key
    if isinstance(key, slice):
      start, stop, step = key.indices(self.num_rows)
      if step != 1:
        raise IndexError("row slices of SplitEmbeddings take step 1")
      return self.read(start, stop)[:, cols]
    return self.take(np.asarray(key))[:, cols]

  # ---------------------------------------------------------------- reading
  def _runs(self, positions: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
    """(shard, first local row, count, first output row) of consecutive rows of `positions`."""
    if not len(positions):
      return
    shard, local = self._shard[positions], self._local[positions]
    breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(local) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(positions)]])
    for s, e in zip(starts, ends):
      yield int(shard[s]), int(local[s]), int(e - s), int(s)

  def _read_rows(self, positions: np.ndarray, out: np.ndarray) -> None:
    """Reads split rows `positions` (ascending) into `out` [len(positions), dim], run by run."""
    row_bytes = 4 * self.dim
    flat = memoryview(out.reshape(-1)).cast("B")
    for shard, local, count, at in self._runs(positions):
      f = self._files[shard]
      f.seek(_HEADER_BYTES + local * row_bytes)
      view = flat[at * row_bytes:(at + count) * row_bytes]
      while len(view):
        got = f.readinto(view)
        if not got:
          raise EmbeddingShardError(f"{self._paths[shard]} is shorter than its JSON says: "
                                    "run the probe again.")
        view = view[got:]

  def read(self, start: int, stop: int) -> np.ndarray:
    """float32 [stop - start, dim]: split rows start..stop, read from disk (not mapped)."""
    stop = min(stop, self.num_rows)
    out = np.empty((max(0, stop - start), self.dim), np.float32)
    self._read_rows(np.arange(start, stop), out)
    return out

  def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 [<= rows, dim]) over the whole split, in order."""
    for start in range(0, self.num_rows, max(1, int(rows))):
      yield start, self.read(start, start + rows)

  def take(self, ids: np.ndarray) -> np.ndarray:
    """float32 [len(ids), dim]: the rows at split positions `ids` (any order, repeats allowed)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
      raise IndexError(f"row ids must be in [0, {self.num_rows})")
    unique, inverse = np.unique(ids, return_inverse=True)
    rows = np.empty((len(unique), self.dim), np.float32)
    self._read_rows(unique, rows)
    return rows[inverse.reshape(-1)]

  def close(self) -> None:
    for f in self._files:
      f.close()
