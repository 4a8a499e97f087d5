"""The probe's truncation metrics over train embeddings on disk, in row blocks: bounded memory.

`probe.truncation_rows` holds the whole train matrix (and its SVD, and L-BFGS's
standardised copy) in memory. `streamed_truncation_rows` computes the same rows
(same keys, same definitions) from a `SplitEmbeddings` (shards on disk, see
embedding_shards.py), reading it in blocks of `block_rows` rows, so its memory does
not grow with the number of train rows:

  1. statistics pass: float64 column sums and Gram matrix X^T X of the raw rows ->
     the mean, the per-column standard deviation, and the SVD basis: the
     eigenvectors of the covariance X^T X / N - mean mean^T (float64, d x d), by
     decreasing eigenvalue (the right singular vectors of the centred matrix, which
     `probe.svd_basis` takes from a float32 SVD; signs are arbitrary in both and
     flip no distance and no probe prediction);
  2. k-NN pass: per block, every (truncation, size) representation is formed
     (prefix / SVD projection / random subset), unit-normalised row by row and
     scanned by `knn.StreamingKnn`, whose shift is the representation's float32 mean
     over the first block (one block: exactly `knn_search`'s, so a database that
     fits one block gives today's neighbours bit for bit);
  3. linear passes: `linear_epochs` passes (blocks in a seeded random order) train
     every (truncation, size) probe (`minibatch_linear_probe.py`), standardised
     with the statistics of pass 1 (SVD features: mean 0, variance the eigenvalue).

Equal to the in-memory path: the prefix and random-subset k-NN / retrieval rows
exactly (the same normalised vectors and distances; with several blocks, up to
float32 rounding of the shift, which can only swap neighbours whose distances
agree to ~1e-7); the SVD rows up to the float32 rounding of the basis (float64
eigh here, float32 SVD there); the linear top-1 within the mini-batch probe's
stated tolerance (see its module doc).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from mrl_jax.evaluation import knn
from mrl_jax.evaluation.minibatch_linear_probe import MinibatchSoftmaxProbe

STD_EPS = 1e-6   # As linear_probe's standardisation.
_KINDS = ("", "svd_", "random_")   # Truncations; a probe's seed is (seed, kind, size).


def size_columns(rows: list[dict[str, float] | None], key_prefix: str) -> dict[str, list]:
  """Per-size metric rows (None where a size was skipped) as one list per metric, keyed
  `key_prefix + metric`: the summary's column layout, shared by both probe paths."""
  keys = next(r for r in rows if r is not None)
  return {key_prefix + key: [r[key] if r is not None else None for r in rows] for key in keys}


def column_statistics(embeddings, block_rows: int) -> dict[str, np.ndarray]:
  """float64 mean [d], std [d], and the SVD basis: eigenvalues [d] (descending), vectors [d, d]."""
  num, dim = embeddings.shape
  total = np.zeros(dim, np.float64)
  gram = np.zeros((dim, dim), np.float64)
  for _, block in embeddings.blocks(block_rows):
    x = block.astype(np.float64)
    total += x.sum(0)
    gram += x.T @ x
  mean = total / num
  covariance = gram / num - np.outer(mean, mean)
  values, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
  order = np.argsort(values)[::-1]
  values, vectors = np.maximum(values[order], 0.0), vectors[:, order]
  variance = np.maximum(np.diag(covariance), 0.0)
  return {"mean": mean, "std": np.sqrt(variance), "eigenvalues": values, "basis": vectors}


def _representations(stats: dict[str, np.ndarray], dims: list[int], full: int,
                     rng: np.random.Generator, prefixes: tuple[str, ...],
                     ) -> tuple[dict[tuple[str, int], Callable], dict[tuple[str, int], tuple]]:
  """{(prefix, m): x -> features} and {(prefix, m): (feature mean, feature std)} per size."""
  mean32 = stats["mean"].astype(np.float32)
  basis32 = stats["basis"].astype(np.float32)
  # Drawn as probe.truncation_rows draws them (same rng calls, same order).
  random_subsets = {m: np.sort(rng.choice(full, size=m, replace=False)) for m in dims if m <= full}
  represent, moments = {}, {}
  for prefix in prefixes:
    for m in dims:
      if m > full:
        continue
      if prefix == "":
        represent[prefix, m] = lambda z, m=m: np.asarray(z[:, :m])
        moments[prefix, m] = (stats["mean"][:m], stats["std"][:m])
      elif prefix == "svd_":
        represent[prefix, m] = lambda z, m=m: (np.asarray(z) - mean32) @ basis32[:, :m]
        moments[prefix, m] = (np.zeros(m), np.sqrt(stats["eigenvalues"][:m]))
      elif prefix == "random_":
        subset = random_subsets[m]
        represent[prefix, m] = lambda z, s=subset: np.asarray(z)[:, s]
        moments[prefix, m] = (stats["mean"][subset], stats["std"][subset])
      else:
        raise ValueError(f"unknown truncation prefix {prefix!r}")
  return represent, moments


def streamed_truncation_rows(train, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray,
                             dims: list[int], num_classes: int, settings: dict[str, Any],
                             rng: np.random.Generator, *, prefixes: tuple[str, ...],
                             neighbour_metrics: Callable[..., dict[str, float]],
                             key_prefix: str = "", log=print) -> dict[str, list[float | None]]:
  """`probe.truncation_rows` over `train` (a SplitEmbeddings) in blocks; see the module doc.

  neighbour_metrics(idx, train_y, test_y, depth) -> the k-NN / retrieval dict of one
  size from the test queries' neighbour ids (probe.neighbour_metrics, bound).
  """
  num, full = train.shape
  block_rows = int(settings["block_rows"])
  begin = time.perf_counter()
  stats = column_statistics(train, block_rows)
  log(f"  {key_prefix}statistics and SVD basis of {num} x {full}: "
      f"{time.perf_counter() - begin:.1f} s")
  represent, moments = _representations(stats, dims, full, rng, prefixes)
  depth = min(max(max(settings["retrieval_ks"]), settings["knn_k"]), num)
  searches: dict[tuple[str, int], knn.StreamingKnn] = {}
  begin = time.perf_counter()
  for start, block in train.blocks(block_rows):
    for key, fn in represent.items():
      rows = knn.l2_normalize(jnp.asarray(fn(block), jnp.float32))
      if key not in searches:
        queries = np.asarray(knn.l2_normalize(jnp.asarray(fn(test_z), jnp.float32)))
        searches[key] = knn.StreamingKnn(queries, depth, centre=np.asarray(jnp.mean(rows, axis=0)))
      searches[key].add(np.asarray(rows))
  log(f"  {key_prefix}k-NN pass over {len(represent)} representations: "
      f"{time.perf_counter() - begin:.1f} s")

  epochs, batch = int(settings["linear_epochs"]), int(settings["linear_batch_size"])
  starts = list(range(0, num, block_rows))
  steps = epochs * sum(MinibatchSoftmaxProbe.steps_per_block(min(block_rows, num - s), batch)
                       for s in starts)
  probes = {key: MinibatchSoftmaxProbe(
      key[1], num_classes, mean, std + STD_EPS, l2=settings["linear_l2"], total_steps=steps,
      batch_size=batch, seed=[settings["seed"], _KINDS.index(key[0]), key[1]])
      for key, (mean, std) in moments.items()}
  order_rng = np.random.default_rng(settings["seed"])
  begin = time.perf_counter()
  for _ in range(epochs):
    for start in order_rng.permutation(starts):
      block = train.read(int(start), int(start) + block_rows)
      labels = train_y[int(start):int(start) + len(block)]
      for key, probe in probes.items():
        probe.train_block(represent[key](block), labels)
  log(f"  {key_prefix}linear probes, {epochs} epoch(s): {time.perf_counter() - begin:.1f} s")

  out: dict[str, list[float | None]] = {}
  for prefix in prefixes:
    rows = []
    for m in dims:
      if (prefix, m) not in represent:
        rows.append(None)
        continue
      _, idx = searches[prefix, m].result()
      row = neighbour_metrics(idx, train_y, test_y, depth)
      row["linear_top1"] = probes[prefix, m].top1(represent[prefix, m](test_z), test_y)
      rows.append(row)
      log(f"  {key_prefix}{prefix or 'mrl_'}d={m}: linear {row['linear_top1']:.4f}, "
          f"1-NN {row['knn1_top1']:.4f}")
    out.update(size_columns(rows, key_prefix + prefix))
  return out
