"""The MRL vector index against exact full-size search and full-size ANN, one run, side by side.

How to run (2-core CPU; the 1M x 2048 run takes about an hour and stays under 20 GB):

    # (a) the synthetic nested database, generated into --scratch (kept and reused there)
    python benchmarks/retrieval.py --num_database 1000000 --dim 2048 --num_queries 1000 \
        --scratch /tmp/retrieval_scratch --out results/retrieval_synthetic_1m.json
    python benchmarks/retrieval.py --calibrate ...    # first search the noise level (below)
    # (b)/(c) any user's embeddings (memory-mapped .npy; labels optional: then recall only)
    python benchmarks/retrieval.py --database DB.npy --database_labels L.npy \
        --queries Q.npy --query_labels QL.npy --name trained_model --out FILE.json
    # quick look: --num_database 200000 --methods exact,mrl --shortlist_sizes 100,200,400

Databases. (a) Each vector is its class centre plus noise, both scaled by
scale_j = (j + 1) ** -decay, so every dim has the same signal-to-noise ratio but the
leading dims carry most of the norm: a prefix of m dims holds about
(sum_j<m scale_j^2)^2 / sum_j<m scale_j^4 dims' worth of evidence, which grows slowly
with m, so small prefixes separate classes worse than the full size (as in a trained
MRL embedding). `noise` sets how hard the task is; `--calibrate` bisects it on a
subsample (--calibrate_rows, same classes) until exact full-size mAP@10 reaches
--target_map, and the run uses that value (the subsample's prefix mAPs are printed
and kept in the JSON). The defaults (decay 1.0, noise 0.75, 1000 classes) were chosen so:
measured on 200k rows at noise 0.72, exact mAP@10 by prefix 8 / 16 / 64 / 2048 was
0.06 / 0.28 / 0.57 / 0.66 with 1000 classes (200 per class) and 0.24 / 0.60 / 0.84 /
0.89 with 200 classes (1000 per class, as at 1M); 1M rows with 1000 classes lie between
(more rows per class raise mAP, more distractors lower it). Decay 0.75 made the 16-dim
prefix almost useless (0.06 vs 0.61), 1.25 made 64 dims as good as 2048. The
database is written straight into a float32 .npy in row
blocks; it is never in memory at once except where a method needs it.

Protocol. The queries are split (seeded) into a tuning half and a reported half.
Every method's settings (ef_search, nprobe, leaves / reorder, the MRL plan) are
chosen on the tuning half only: the fastest setting whose tuning mAP@10 (recall of
the exact full-size top-10 without labels) is at least --bar (0.99) times exact
full-size search's, by a margin: z(--bar_confidence, 0.95) = 1.645 standard errors of
its per-query difference from 0.99 x exact's (`calibration.confidence_margin`), so the
pick is not the one setting of many that cleared the bar by luck on these queries (at
1M the picks at the bare bar fell to 98.7% of exact's on the reported half); then it is
measured on the reported half alone (the median of at least --repeats batched runs after
a warm-up, and of more until they add up to --min_time_s, both halves alike). The best
full-size ANN is the fastest on the tuning half among faiss HNSW / IVF / ScaNN that met
the bar; it is written to --scratch for the rematch (a faiss file or a ScaNN directory).

Rematch (--rematch 1, after the MRL index is built, the baselines freed). The MRL families
that met the bar within --rematch_within of the fastest one's tuning queries/s are timed
interleaved (`interleaved`: rounds of a 3-call burst each, the first call untimed, until
each has --rematch_s seconds): on the tuning half, to pick the best MRL plan; then on the
reported half together with the best full-size ANN reopened from scratch, for the goal's
ratio. Timed apart (minutes between them), the same MRL plan ran up to 1.7x faster in one
process or run than in another on this 2-core machine, while faiss IVF at full size varied
by about 10-20%; the table keeps the per-method timings, the goals take the rematch's.
faiss's distance_compute_blas_threshold is set to --faiss_blas_threshold (20) for every
faiss method alike (see the flag).

Methods (one at a time, each freed before the next; peak RSS in the JSON):
  exact         normalised float32 copy in RAM, blocked BLAS matmul + top-k (numpy);
  faiss_flat    faiss IndexFlatIP on the normalised vectors;
  faiss_hnsw    faiss IndexHNSWFlat(d, 32) at full size, efConstruction 40, efSearch tuned;
  faiss_ivf     faiss IndexIVFFlat at full size, about 4 sqrt(N) lists (k-means 10
                iterations on 40 points per list), nprobe tuned;
  scann         ScaNN (if `import scann` works; optional): tree (about sqrt(N) leaves),
                asymmetric hashing (2 dims per 4-bit code), exact reorder; leaves and
                reorder size tuned;
  mrl           `mrl_jax.retrieval.Index` with --mrl_stores (default 16, 32, 64 float32;
                256 and full int8) and --mrl_ann (default hnsw16 = HNSW on 16 dims, adanns =
                IVF scanning 64 dims with clusters learnt on 16, hnsw256 / hnsw256q = HNSW
                on 256 dims over float32 / int8 codes, hnsw384q / hnsw512q = HNSW on 384 /
                512 dims over int8 codes), and a grid of plans, each
                family tuned on its own and reported (mrl_<family>):
                  adaptive_exact<Ds> / funnel_exact<Ds>  exact shortlist at Ds in
                      --shortlist_dims, sizes S in --shortlist_sizes (funnel: every store
                      above Ds, keeping S, S/2, S/4, ... >= 10);
                  adaptive_<ann> / funnel_<ann>  the ANN's shortlist, S x (efSearch >= S in
                      --ef_search, or nprobe in --nprobe);
                  ..._to<Dr>  the same, reranked at a stored prefix Dr below full size
                      (--rerank_dims, default full only), held to the same full-size bar;
                  index_exact  the index's own exact full-size plan (an "exact" row; on a
                      GPU its exact stage runs on the device: the GPU goal's reference).
A baseline whose build would pass --max_build_s (900 s) is built on the largest
prefix of the database rows that fits: HNSW adds row blocks until the next would
pass the budget; IVF and ScaNN time a pilot build on 50k rows and scale its parts
(IVF: k-means on 40 points per list ~ n, adding n rows to ~4 sqrt(n) lists ~ n^1.5;
ScaNN: n^e with e fitted from pilots at 25k and 50k rows, clamped to [1, 1.5]).
Such a row says "built on n of N": its
queries/s is measured on the smaller database (flattering it), and its mAP@10 and
recall are against exact search over those same n rows (the bar too), so they show
how close it gets to exact on its own database, not a full-database result.

Cost per query (MFLOPs = 1e6 multiply-adds of distance dot products): exact N*d;
HNSW / IVF / ScaNN from the distance evaluations faiss counts (hnsw_stats,
indexIVF_stats) times d plus the coarse centroids; ScaNN leaves*d + the searched
leaves' rows * d/2 lookups + reorder*d; MRL `plans.plan_flops` plus its ANN's counted
distances.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

K = 10
FAMILIES = ("exact", "full_dim_ann", "mrl")
ALL_METHODS = ("exact", "faiss_flat", "faiss_hnsw", "faiss_ivf", "scann", "mrl")
INDEX_EXACT = "index_exact"   # The MRL index's exact full-size plan: an "exact" family row.
_READ_BLOCK_BYTES = 1 << 26   # Rows read from the database file per block (64 MiB).
_SCAN_BLOCK_ROWS = 32768      # Database rows per matmul block of exact search.
_PILOT_ROWS = 50_000          # Pilot build size of the IVF / ScaNN build-time estimate.
_NORM_EPS = 1e-12             # As evaluation.knn.l2_normalize.
SCANN_MEMORY_FACTOR = 4.0     # ScaNN's build peak / its float32 input (measured 3.75).
GENERATE_ROWS = 8192          # Synthetic rows per seeded random stream (and per write).


def log(*args: Any) -> None:
  print(*args, flush=True)


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB.


def rss_gb() -> float:
  """Resident memory now (Linux /proc; 0 elsewhere): shows each method's memory was freed."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
  except OSError:
    return 0.0


def normalized(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(_NORM_EPS))


# --- Databases ----------------------------------------------------------------------------

class NpyRows:
  """Row blocks of a 2-D .npy file read with plain reads (no mmap: pages do not stay resident)."""

  def __init__(self, path: str, block_rows: int = 0):
    self.path = path
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      self.offset = f.tell()
    if len(shape) != 2 or fortran or dtype.kind not in "fi":
      raise SystemExit(f"error: {path} must hold a 2-D C-order float array, got shape {shape} "
                       f"{dtype}{' (Fortran order)' if fortran else ''}.")
    self.shape, self.dtype = tuple(int(s) for s in shape), dtype
    self.block_rows = block_rows or max(1, _READ_BLOCK_BYTES // (self.shape[1] * 4))

  def read(self, start: int, stop: int) -> np.ndarray:
    stop = min(stop, self.shape[0])
    count = (stop - start) * self.shape[1]
    x = np.fromfile(self.path, self.dtype, count=count,
                    offset=self.offset + start * self.shape[1] * self.dtype.itemsize)
    return x.reshape(stop - start, self.shape[1]).astype(np.float32, copy=False)

  def blocks(self, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    stop = self.shape[0] if stop is None else min(stop, self.shape[0])
    for start in range(0, stop, self.block_rows):
      yield start, self.read(start, min(start + self.block_rows, stop))

  def normalized_rows(self, stop: int | None = None) -> np.ndarray:
    stop = self.shape[0] if stop is None else min(stop, self.shape[0])
    out = np.empty((stop, self.shape[1]), np.float32)
    for start, block in self.blocks(stop):
      out[start:start + len(block)] = normalized(block)
    return out

  def memmap(self) -> np.memmap:
    return np.load(self.path, mmap_mode="r")


@dataclasses.dataclass
class Database:
  name: str
  rows: NpyRows
  labels: np.ndarray | None       # [N] int64 or None
  queries: np.ndarray             # [Q, d] float32, raw
  query_labels: np.ndarray | None
  info: dict[str, Any]

  @property
  def num(self) -> int:
    return self.rows.shape[0]

  @property
  def dim(self) -> int:
    return self.rows.shape[1]


def _scale(dim: int, decay: float) -> np.ndarray:
  return ((np.arange(dim, dtype=np.float64) + 1.0) ** -decay).astype(np.float32)


def _centres(classes: int, dim: int, decay: float, seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, 0])
  return rng.standard_normal((classes, dim), np.float32) * _scale(dim, decay)


def synthetic_block(centres: np.ndarray, labels: np.ndarray, noise: float, decay: float,
                    seed: int, stream: int, block: int) -> np.ndarray:
  """centre[label] + noise * scale * N(0, 1), from its own seeded stream per block."""
  rng = np.random.default_rng([seed, stream, block])
  eps = rng.standard_normal((len(labels), centres.shape[1]), np.float32)
  eps *= np.float32(noise) * _scale(centres.shape[1], decay)
  eps += centres[labels]
  return eps


def synthetic_labels(num_database: int, num_queries: int, classes: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  db_labels = np.arange(num_database, dtype=np.int64) % classes  # Every class in any row range.
  q_labels = np.random.default_rng([seed, 3]).integers(0, classes, num_queries).astype(np.int64)
  return db_labels, q_labels


def write_synthetic(path: str, num_database: int, dim: int, classes: int, decay: float,
                    noise: float, seed: int) -> None:
  """Writes the database .npy chunk by chunk (one chunk in memory; each its own seeded stream,
  so the data does not depend on how it is later read)."""
  centres = _centres(classes, dim, decay, seed)
  db_labels, _ = synthetic_labels(num_database, 1, classes, seed)
  tmp = path + ".partial"
  with open(tmp, "wb") as f:
    np.lib.format.write_array_header_2_0(
        f, {"descr": "<f4", "fortran_order": False, "shape": (num_database, dim)})
    for i, start in enumerate(range(0, num_database, GENERATE_ROWS)):
      labels = db_labels[start:start + GENERATE_ROWS]
      synthetic_block(centres, labels, noise, decay, seed, 1, i).tofile(f)
  os.replace(tmp, path)


def synthetic_database(args: argparse.Namespace, scratch: str) -> Database:
  params = {"num_database": args.num_database, "dim": args.dim, "num_queries": args.num_queries,
            "classes": args.classes, "decay": args.decay, "noise": args.noise, "seed": args.seed}
  stem = os.path.join(scratch, "synthetic_{num_database}x{dim}_c{classes}_d{decay:g}_n{noise:.6g}"
                      "_s{seed}".format(**params))
  path = stem + ".npy"
  if os.path.exists(path):
    log(f"Reusing the synthetic database {path}.")
  else:
    start = time.perf_counter()
    write_synthetic(path, args.num_database, args.dim, args.classes, args.decay, args.noise,
                    args.seed)
    log(f"Wrote the synthetic database {path} in {time.perf_counter() - start:.1f} s.")
  db_labels, q_labels = synthetic_labels(args.num_database, args.num_queries, args.classes,
                                         args.seed)
  centres = _centres(args.classes, args.dim, args.decay, args.seed)
  queries = synthetic_block(centres, q_labels, args.noise, args.decay, args.seed, 2, 0)
  return Database(args.name or "synthetic", NpyRows(path, args.block_rows), db_labels, queries,
                  q_labels,
                  {"kind": "synthetic", "path": path, **params,
                   "model": "x = c[label] + noise * scale * N(0, I), c ~ scale * N(0, I), "
                            "scale_j = (j + 1) ** -decay; database labels i % classes"})


def _load_labels(path: str | None, rows: int, what: str) -> np.ndarray | None:
  if not path:
    return None
  labels = np.load(path, mmap_mode="r")
  if labels.ndim != 1 or len(labels) != rows or labels.dtype.kind not in "iu":
    raise SystemExit(f"error: {what} {path} must be 1-D integers with {rows} entries, got "
                     f"shape {labels.shape} {labels.dtype}.")
  return np.asarray(labels, np.int64)


def file_database(args: argparse.Namespace) -> Database:
  rows = NpyRows(args.database, args.block_rows)
  queries = np.load(args.queries, mmap_mode="r")
  if queries.ndim != 2 or queries.shape[1] != rows.shape[1]:
    raise SystemExit(f"error: --queries {args.queries} must be [Q, {rows.shape[1]}], got "
                     f"{queries.shape}.")
  db_labels = _load_labels(args.database_labels, rows.shape[0], "--database_labels")
  q_labels = _load_labels(args.query_labels, len(queries), "--query_labels")
  if (db_labels is None) != (q_labels is None):
    raise SystemExit("error: give both --database_labels and --query_labels, or neither.")
  return Database(args.name or os.path.splitext(os.path.basename(args.database))[0], rows,
                  db_labels, np.asarray(queries, np.float32), q_labels,
                  {"kind": "files", "database": args.database, "queries": args.queries,
                   "database_labels": args.database_labels, "query_labels": args.query_labels})


# --- Metrics and exact search -------------------------------------------------------------

QUALITY_METRICS = ("recall_exact@10", "map@10", "precision@10")  # map / precision need labels.


def per_query_quality(ids: np.ndarray, query_labels: np.ndarray | None,
                      db_labels: np.ndarray | None, exact_ids: np.ndarray,
                      ) -> dict[str, np.ndarray]:
  """`quality`'s metrics of every query, float64 [Q] each (the index's own definitions,
  `calibration.per_query_plan_metrics` at k = 10)."""
  from mrl_jax.retrieval.calibration import per_query_plan_metrics
  values = per_query_plan_metrics(np.asarray(ids)[:, :K], np.asarray(exact_ids)[:, :K],
                                  query_labels, db_labels)
  return {name: values[name] for name in QUALITY_METRICS if name in values}


def quality(ids: np.ndarray, query_labels: np.ndarray | None, db_labels: np.ndarray | None,
            exact_ids: np.ndarray) -> dict[str, float]:
  """mAP@10 / precision@10 by label (official definitions) and recall of the exact top-10."""
  return _mean_over_queries(per_query_quality(ids, query_labels, db_labels, exact_ids))


def _mean_over_queries(per_query: dict[str, np.ndarray]) -> dict[str, float]:
  return {name: float(values.mean()) for name, values in per_query.items()}


def exact_top_k(queries_norm: np.ndarray, blocks: Iterator[tuple[int, np.ndarray]],
                k: int) -> np.ndarray:
  """Ids [Q, k] of the largest inner products (= smallest squared L2 between unit vectors)."""
  num = len(queries_norm)
  best_s = np.full((num, k), -np.inf, np.float32)
  best_i = np.full((num, k), -1, np.int64)
  for start, block in blocks:
    scores = queries_norm @ block.T
    kk = min(k, scores.shape[1])
    part = np.argpartition(scores, scores.shape[1] - kk, axis=1)[:, -kk:]
    cat_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], 1)
    cat_i = np.concatenate([best_i, part + start], 1)
    order = np.lexsort((cat_i, -cat_s), axis=1)[:, :k]  # Ties go to the smaller id.
    best_s, best_i = np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)
  return best_i


def in_memory_blocks(x: np.ndarray, rows: int = _SCAN_BLOCK_ROWS):
  return ((start, x[start:start + rows]) for start in range(0, len(x), rows))


def file_blocks_normalized(rows: NpyRows, stop: int):
  return ((start, normalized(block)) for start, block in rows.blocks(stop))


# --- Timing and tuning --------------------------------------------------------------------

def timed(fn: Callable[[], Any], repeats: int, min_seconds: float = 0.0,
          max_calls: int = 200) -> tuple[Any, float]:
  """(result, median seconds per call) after one warm-up call: at least `repeats` calls, and
  more (up to max_calls) until they add up to min_seconds. A batch that takes a few ms (the
  fast ANNs on 500 queries) is timed over a hundred calls, not three, so thread wake-ups and
  cache state do not decide which method wins."""
  out = fn()
  times: list[float] = []
  while len(times) < max(1, repeats) or (sum(times) < min_seconds and len(times) < max_calls):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return out, statistics.median(times)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, min_seconds: float = 0.0,
                burst: int = 3, max_rounds: int = 2000) -> dict[str, float]:
  """{name: median seconds per timed call}, the calls taken in rounds until every function has
  at least `repeats` timed calls adding up to min_seconds (or max_rounds).

  Each round gives every function (in an order rotated every round) a burst of `burst` calls:
  the first untimed, so its caches are its own again after the others ran, the rest timed. A
  slow spell of the machine then hits every contestant alike, and their ratio is measured
  in one stretch of time, not between timings minutes apart."""
  names = list(fns)
  times: dict[str, list[float]] = {name: [] for name in names}
  rounds = 0
  while rounds < max_rounds and any(len(t) < max(1, repeats) or sum(t) < min_seconds
                                    for t in times.values()):
    shift = rounds % len(names)
    for name in names[shift:] + names[:shift]:
      fns[name]()
      for _ in range(max(1, burst - 1)):
        start = time.perf_counter()
        fns[name]()
        times[name].append(time.perf_counter() - start)
    rounds += 1
  return {name: statistics.median(t) for name, t in times.items()}


@dataclasses.dataclass
class Candidate:
  """One setting of a method: what it is, how to search the given queries, its costs."""
  setting: dict[str, Any]
  search: Callable[[np.ndarray], np.ndarray]              # raw queries -> ids [Q, >= K]
  cost: Callable[[np.ndarray], tuple[float, float]]       # raw queries -> (mflops/q, bytes/vector)


class Tuner:
  """Picks, on the tuning queries, the fastest candidate that meets the bar.

  The bar is bar_ratio x exact full-size search's metric on these queries. A candidate meets
  it when its metric, less `calibration.confidence_margin` at `confidence` (paired per query
  with exact search), is still at or above the bar, so a pick is not one that met the bar by
  luck on the tuning half (at 1M, picks at the bare bar fell to 98.7% on the reported half).
  """

  def __init__(self, queries: np.ndarray, query_labels: np.ndarray | None,
               db_labels: np.ndarray | None, exact_ids: np.ndarray, bar_ratio: float,
               repeats: int, min_seconds: float = 0.0, confidence: float = 0.5):
    self.queries, self.query_labels, self.db_labels = queries, query_labels, db_labels
    self.exact_ids, self.bar_ratio, self.repeats = exact_ids, bar_ratio, repeats
    self.min_seconds, self.confidence = min_seconds, confidence
    self.metric = "map@10" if query_labels is not None else "recall_exact@10"
    self.exact_values = per_query_quality(exact_ids, query_labels, db_labels,
                                          exact_ids)[self.metric]
    self.bar = bar_ratio * float(self.exact_values.mean())

  def measure(self, candidate: Candidate) -> dict[str, Any]:
    from mrl_jax.retrieval.calibration import confidence_margin, paired_spread
    ids, seconds = timed(lambda: candidate.search(self.queries), self.repeats, self.min_seconds)
    per_query = per_query_quality(ids, self.query_labels, self.db_labels, self.exact_ids)
    metrics = _mean_over_queries(per_query)
    margin = confidence_margin(paired_spread(per_query[self.metric], self.exact_values),
                               len(self.exact_values), self.bar_ratio, self.confidence)
    return {"setting": candidate.setting, "queries_per_s": len(self.queries) / seconds,
            **metrics, "bar_margin": margin,
            "met_bar": metrics[self.metric] - margin >= self.bar}

  def tune(self, chains: Sequence[Sequence[Candidate]]) -> tuple[Candidate, dict, list[dict]]:
    """Each chain is ordered by cost: it is walked until a candidate meets the bar, or is
    slower than the best one so far that met it (the rest of the chain can only be slower)."""
    log_rows, best, best_row, fallback, fallback_row = [], None, None, None, None
    for chain in chains:
      for candidate in chain:
        row = self.measure(candidate)
        log_rows.append(row)
        log(f"    tune {json.dumps(candidate.setting)}: {self.metric} {row[self.metric]:.4f} "
            f"- margin {row['bar_margin']:.4f} (bar {self.bar:.4f}), "
            f"{row['queries_per_s']:.0f} q/s")
        if row["met_bar"]:
          if best_row is None or row["queries_per_s"] > best_row["queries_per_s"]:
            best, best_row = candidate, row
          break
        if fallback_row is None or (row[self.metric], row["queries_per_s"]) > (
            fallback_row[self.metric], fallback_row["queries_per_s"]):
          fallback, fallback_row = candidate, row
        if best_row is not None and row["queries_per_s"] < best_row["queries_per_s"]:
          break
    if best is None:
      return fallback, fallback_row, log_rows
    return best, best_row, log_rows


# --- Methods ------------------------------------------------------------------------------

@dataclasses.dataclass
class Built:
  """A built method: its candidates (in chains), build time and rows it holds."""
  family: str
  chains: list[list[Candidate]]
  build_s: float
  built_rows: int
  notes: str = ""
  release: Callable[[], None] = lambda: None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  # save(path) writes the built structure and returns reopen(setting) -> (search, release),
  # so the rematch can load it again after the other methods are freed (faiss and ScaNN).
  save: Callable[[str], Callable[[dict], tuple[Callable, Callable]]] | None = None


def _faiss():
  import faiss
  return faiss


def hnsw_with_huge_pages(index) -> int:
  """The MRL index's huge-page backing (`mrl_jax.retrieval.huge_pages`) for a baseline graph."""
  from mrl_jax.retrieval.ann import hnsw_with_huge_pages as back
  return back(index)


def _faiss_queries(queries: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(normalized(queries))


def _faiss_save(index, configure: Callable[[Any, dict], None]):
  """Built.save for a faiss index: write_index now; reopen reads it back and prepares it as
  the tuned candidate ran (configure(index, setting): the tuned knob, huge pages)."""
  def save(path: str):
    _faiss().write_index(index, path)

    def reopen(setting: dict):
      loaded = _faiss().read_index(path)
      configure(loaded, setting)
      return (lambda q: loaded.search(_faiss_queries(q), K)[1]), loaded.reset
    return reopen
  return save


def _reopened_hnsw(index, setting: dict) -> None:
  """A reopened full-size graph: on huge pages again (as built) and at the tuned efSearch."""
  hnsw_with_huge_pages(index)
  index.hnsw.efSearch = int(setting["ef_search"])


def _set_nprobe(index, setting: dict) -> None:
  index.nprobe = int(setting["nprobe"])


def build_exact(db: Database, args: argparse.Namespace, rows: int) -> Built:
  start = time.perf_counter()
  vectors = db.rows.normalized_rows(rows)
  build_s = time.perf_counter() - start
  d = db.dim

  def search(q):
    return exact_top_k(normalized(q), in_memory_blocks(vectors), K)
  cand = Candidate({}, search, lambda q: (len(vectors) * d / 1e6, 4.0 * d))
  return Built("exact", [[cand]], build_s, len(vectors), extra={"vectors": vectors})


def build_faiss_flat(db: Database, args: argparse.Namespace, rows: int) -> Built:
  faiss = _faiss()
  start = time.perf_counter()
  index = faiss.IndexFlatIP(db.dim)
  for _, block in db.rows.blocks(rows):
    index.add(normalized(block))
  build_s = time.perf_counter() - start
  cand = Candidate({}, lambda q: index.search(_faiss_queries(q), K)[1],
                   lambda q: (index.ntotal * db.dim / 1e6, 4.0 * db.dim))
  return Built("exact", [[cand]], build_s, index.ntotal, release=index.reset)


def _hnsw_ndis_cost(index, dim: int, search: Callable[[np.ndarray], Any],
                    q: np.ndarray) -> float:
  faiss = _faiss()
  faiss.cvar.hnsw_stats.reset()
  search(q)
  return faiss.cvar.hnsw_stats.ndis * dim / len(q) / 1e6


def build_faiss_hnsw(db: Database, args: argparse.Namespace, rows: int) -> Built:
  faiss = _faiss()
  index = faiss.IndexHNSWFlat(db.dim, args.hnsw_neighbours)
  index.hnsw.efConstruction = args.ef_construction
  start, last = time.perf_counter(), 0.0
  for block_start, block in db.rows.blocks(rows):
    if block_start and time.perf_counter() - start + 1.05 * last > args.max_build_s:
      break  # The next block would pass the budget: keep the rows added so far.
    t = time.perf_counter()
    index.add(normalized(block))
    last = time.perf_counter() - t
  build_s = time.perf_counter() - start
  hnsw_with_huge_pages(index)  # As the MRL index's graphs get (see --huge_pages).
  d = db.dim

  def bytes_per_vector() -> float:
    return 4.0 * d + 4.0 * index.hnsw.neighbors.size() / index.ntotal

  chains = []
  for ef in args.ef_search:
    def search(q, ef=ef):
      index.hnsw.efSearch = ef
      return index.search(_faiss_queries(q), K)[1]
    chains.append(Candidate({"ef_search": ef}, search,
                            lambda q, s=search: (_hnsw_ndis_cost(index, d, s, q),
                                                 bytes_per_vector())))
  return Built("full_dim_ann", [chains], build_s, index.ntotal, release=index.reset,
               save=_faiss_save(index, _reopened_hnsw),
               extra={"hnsw_neighbours": args.hnsw_neighbours,
                      "ef_construction": args.ef_construction})


def _predicted_s(terms: Sequence[tuple[float, float]], scale: float) -> float:
  return sum(seconds * scale ** exponent for seconds, exponent in terms)


def _largest_rows_within(budget_s: float, total: int, pilot_rows: int,
                         terms: Sequence[tuple[float, float]]) -> int:
  """The most rows whose predicted build time (pilot seconds x (n / pilot)^exponent, summed
  over the build's parts) fits the budget (at least the pilot's rows)."""
  if pilot_rows >= total or _predicted_s(terms, total / pilot_rows) <= budget_s:
    return total
  low, high = pilot_rows, total
  while high - low > max(1, total // 1000):
    mid = (low + high) // 2
    low, high = (mid, high) if _predicted_s(terms, mid / pilot_rows) <= budget_s else (low, mid)
  return low


def _ivf_lists(rows: int) -> int:
  return max(1, min(int(round(4 * math.sqrt(rows))), rows // 40))


def _make_ivf(db: Database, rows: int, seed: int):
  """IVF-Flat on the first `rows` rows: (index, [(train s, 1), (add s, 1.5)]): k-means on
  40 points per list costs ~lists^2 ~ n, adding n rows to ~sqrt(n) lists ~ n^1.5."""
  faiss = _faiss()
  lists = _ivf_lists(rows)
  start = time.perf_counter()
  index = faiss.IndexIVFFlat(faiss.IndexFlatL2(db.dim), db.dim, lists)
  index.cp.niter, index.cp.seed = 10, seed
  sample_ids = np.sort(np.random.default_rng(seed).choice(rows, min(rows, 40 * lists),
                                                          replace=False))
  memmap = db.rows.memmap()
  index.train(normalized(memmap[sample_ids]))
  del memmap
  train_s = time.perf_counter() - start
  for _, block in db.rows.blocks(rows):
    index.add(normalized(block))
  return index, [(train_s, 1.0), (time.perf_counter() - start - train_s, 1.5)]


def _pilot_rows(db: Database, args: argparse.Namespace,
                pilot: Callable[[], list[tuple[float, float]]]) -> tuple[int, str]:
  """Rows that fit the build budget, from timed pilot builds (`pilot()` gives the parts'
  seconds at _PILOT_ROWS rows and the exponents they scale with)."""
  total = db.num
  if total <= _PILOT_ROWS:
    return total, ""
  terms = pilot()
  gc.collect()
  rows = _largest_rows_within(args.max_build_s, total, _PILOT_ROWS, terms)
  parts = " + ".join(f"{s:.1f} s x (n/{_PILOT_ROWS:,})^{e:g}" for s, e in terms)
  note = (f"pilot build on {_PILOT_ROWS:,} rows: {parts}; predicted at {total:,} rows "
          f"{_predicted_s(terms, total / _PILOT_ROWS):.0f} s")
  log(f"    {note}")
  return rows, note


def build_faiss_ivf(db: Database, args: argparse.Namespace, rows: int) -> Built:
  faiss = _faiss()
  rows, note = _pilot_rows(db, args, lambda: _make_ivf(db, _PILOT_ROWS, args.seed)[1])
  start = time.perf_counter()
  index, _ = _make_ivf(db, rows, args.seed)
  build_s = time.perf_counter() - start
  d, lists = db.dim, index.nlist

  def cost(q, search):
    faiss.cvar.indexIVF_stats.reset()
    search(q)
    return ((faiss.cvar.indexIVF_stats.ndis / len(q) + lists) * d / 1e6,
            4.0 * d + 8.0 + 4.0 * d * lists / index.ntotal)

  chain = []
  for nprobe in [p for p in args.nprobe if p <= lists] or [lists]:
    def search(q, nprobe=nprobe):
      index.nprobe = nprobe
      return index.search(_faiss_queries(q), K)[1]
    chain.append(Candidate({"nprobe": nprobe, "lists": lists}, search,
                           lambda q, s=search: cost(q, s)))
  return Built("full_dim_ann", [chain], build_s, index.ntotal, notes=note, release=index.reset,
               save=_faiss_save(index, _set_nprobe),
               extra={"lists": lists, "kmeans_iterations": 10})


def _scann_build(db: Database, rows: int, seed: int):
  """ScaNN on the first `rows` rows: ((searcher, leaves), [(build s, 1.5)]) (tree k-means
  and the assignment of n rows to ~sqrt(n) leaves ~ n^1.5)."""
  import scann
  start = time.perf_counter()
  vectors = db.rows.normalized_rows(rows)
  leaves = max(2, int(round(math.sqrt(rows))))
  searcher = (scann.scann_ops_pybind.builder(vectors, K, "dot_product")
              .tree(num_leaves=leaves, num_leaves_to_search=max(1, leaves // 20),
                    training_sample_size=min(rows, 250_000))
              .score_ah(2, anisotropic_quantization_threshold=0.2)
              .reorder(max(200, K)).build())
  del vectors
  return (searcher, leaves), [(time.perf_counter() - start, 1.5)]


def _scann_pilot(db: Database, seed: int) -> list[tuple[float, float]]:
  """ScaNN's parts scale differently (tree k-means on a capped sample, assignment ~ n^1.5,
  encoding ~ n): the exponent is fitted from pilots at half and all of _PILOT_ROWS, in [1, 1.5]."""
  half = _scann_build(db, _PILOT_ROWS // 2, seed)[1][0][0]
  full = _scann_build(db, _PILOT_ROWS, seed)[1][0][0]
  return [(full, min(1.5, max(1.0, math.log(full / half) / math.log(2))))]


def build_scann(db: Database, args: argparse.Namespace, rows: int) -> Built:
  rows, note = _pilot_rows(db, args, lambda: _scann_pilot(db, args.seed))
  # Its build peaks near SCANN_MEMORY_FACTOR x the float32 vectors (6.5 GB peak RSS for
  # 1.6 GB at 200k x 2048): cap the rows so the run stays under --max_rss_gb.
  fit = int(max(0.0, args.max_rss_gb - rss_gb() - 1.0) * 2**30 / (SCANN_MEMORY_FACTOR * 4 * db.dim))
  if fit < rows:
    rows = max(min(rows, _PILOT_ROWS), fit)
    note = (note + "; " if note else "") + (f"memory: built on {rows:,} rows to stay under "
                                            f"{args.max_rss_gb:g} GB resident")
    log(f"    {note}")
  start = time.perf_counter()
  (searcher, leaves), _ = _scann_build(db, rows, args.seed)
  build_s = time.perf_counter() - start
  d = db.dim
  chains = []
  for reorder in args.scann_reorder:
    chain = []
    for fraction in args.scann_leaves:
      to_search = max(1, min(leaves, int(round(leaves * fraction))))
      def search(q, to_search=to_search, reorder=reorder):
        ids, _ = searcher.search_batched_parallel(
            _faiss_queries(q), final_num_neighbors=K, leaves_to_search=to_search,
            pre_reorder_num_neighbors=reorder)
        return np.asarray(ids, np.int64)
      mflops = (leaves * d + rows * to_search / leaves * d / 2 + reorder * d) / 1e6
      chain.append(Candidate({"leaves_to_search": to_search, "leaves": leaves,
                              "reorder": reorder}, search,
                             lambda q, m=mflops: (m, 4.0 * d + d / 4 + 4.0)))
    chains.append(chain)
  return Built("full_dim_ann", chains, build_s, rows, notes=note, release=lambda: None,
               save=_scann_save(searcher))


def _scann_save(searcher):
  """Built.save for ScaNN: serialize into a directory now; reopen loads it back and searches
  with the tuned leaves / reorder, as the tuned candidate did."""
  def save(path: str):
    os.makedirs(path, exist_ok=True)
    searcher.serialize(path)

    def reopen(setting: dict):
      import scann
      loaded = [scann.scann_ops_pybind.load_searcher(path)]

      def search(q):
        ids, _ = loaded[0].search_batched_parallel(
            _faiss_queries(q), final_num_neighbors=K,
            leaves_to_search=int(setting["leaves_to_search"]),
            pre_reorder_num_neighbors=int(setting["reorder"]))
        return np.asarray(ids, np.int64)
      return search, loaded.clear
    return reopen
  return save


def _remove_saved(path: str) -> None:
  """Drops a structure written for the rematch (a faiss file or a ScaNN directory)."""
  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.exists(path):
    os.remove(path)


def _parse_stores(text: str, full: int) -> dict[int, str]:
  stores = {}
  for item in text.split(","):
    dim, _, dtype = item.partition(":")
    dim = full if dim == "full" else int(dim)
    if dim <= full:
      stores[dim] = dtype or "float32"
  return stores


def _parse_ann(text: str, full: int, hnsw_neighbours: int, ef_construction: int):
  """The MRL ANNs; their graphs are built with the full-size graph's M and efConstruction."""
  from mrl_jax.retrieval.ann import AnnSpec
  specs = {}
  for item in filter(None, text.split(",")):
    name, _, body = item.partition("=")
    kind, dim, *rest = body.split(":")
    codes = [r for r in rest if not r.isdigit()]
    cluster = [int(r) for r in rest if r.isdigit()]
    if int(dim) <= full:
      specs[name] = AnnSpec(kind, int(dim), cluster_dim=cluster[0] if cluster else None,
                            hnsw_neighbours=hnsw_neighbours, ef_construction=ef_construction,
                            codes=codes[0] if codes else "float32")
  return specs


def mrl_plans(full: int, num: int, store_dims: Sequence[int], ann: dict[str, Any],
              args: argparse.Namespace) -> list[tuple[str, list[Any]]]:
  """(family, chains of plans) for the MRL index: adaptive and funnel plans, each with an
  exact shortlist at each --shortlist_dims store and with every ANN, reranked at each
  --rerank_dims store (families that rerank below full size end in _to<Dr>); chains grow
  in cost."""
  from mrl_jax.retrieval.plans import Adaptive, Funnel
  sizes = [s for s in args.shortlist_sizes if K <= s <= num]
  stored = sorted(store_dims)
  reranks = sorted({full if d == 0 else d for d in args.rerank_dims} & set(stored))

  def funnel_dims(first: int, last: int) -> tuple[int, ...]:
    return (first, *[d for d in stored if first < d < last], last)

  def funnel_keeps(size: int, stages: int) -> tuple[int, ...]:
    return tuple(max(K, size >> i) for i in range(stages))

  def suffix(last: int) -> str:
    return "" if last == full else f"_to{last}"

  families = []
  for ds in [d for d in args.shortlist_dims if d in stored and d < full]:
    for dr in [d for d in reranks if d > ds]:
      families.append((f"adaptive_exact{ds}{suffix(dr)}",
                       [[Adaptive(ds, s, dr) for s in sizes]]))
      dims = funnel_dims(ds, dr)
      if len(dims) > 2:
        families.append((f"funnel_exact{ds}{suffix(dr)}",
                         [[Funnel(dims, funnel_keeps(s, len(dims) - 1)) for s in sizes]]))
  for name, spec in ann.items():
    knobs = ([("ef_search", ef) for ef in args.ef_search] if spec.kind == "hnsw"
             else [("nprobe", p) for p in args.nprobe])
    for dr in [d for d in reranks if d > spec.dim]:
      dims = funnel_dims(spec.dim, dr)
      for structure in ("adaptive", "funnel"):
        if structure == "funnel" and len(dims) <= 2:
          continue
        chains = []
        for s in sizes:
          chain = []
          # HNSW returns at most efSearch candidates: efSearch below the shortlist becomes it.
          for key, value in dict.fromkeys((key, max(value, s) if key == "ef_search" else value)
                                          for key, value in knobs):
            options = {"shortlist": name, key: value}
            chain.append(Adaptive(spec.dim, s, dr, **options) if structure == "adaptive" else
                         Funnel(dims, funnel_keeps(s, len(dims) - 1), **options))
          chains.append(chain)
        families.append((f"{structure}_{name}{suffix(dr)}", chains))
  return families


def _ann_mflops(index, plan, queries: np.ndarray, ann: dict[str, Any], num: int) -> float:
  """Distances the plan's ANN shortlist computes per query (faiss counters) times its dims."""
  if plan.shortlist == "exact":
    return 0.0
  faiss = _faiss()
  spec = ann[plan.shortlist]
  faiss.cvar.hnsw_stats.reset()
  faiss.cvar.indexIVF_stats.reset()
  index.search(queries, K, plan)
  if spec.kind == "hnsw":
    return faiss.cvar.hnsw_stats.ndis * spec.dim / len(queries) / 1e6
  lists = spec.ivf_lists or int(round(4 * math.sqrt(num)))
  return (faiss.cvar.indexIVF_stats.ndis / len(queries) * spec.dim
          + lists * (spec.cluster_dim or spec.dim)) / 1e6


def build_mrl(db: Database, args: argparse.Namespace, rows: int) -> Built:
  from mrl_jax.retrieval.index import Index
  from mrl_jax.retrieval.plans import plan_flops, plan_name
  full = db.dim
  stores = _parse_stores(args.mrl_stores, full)
  ann = _parse_ann(args.mrl_ann, full, args.hnsw_neighbours, args.ef_construction)
  memmap = db.rows.memmap()
  start = time.perf_counter()
  index = Index.build(memmap[:rows], stores=stores, ann=ann)
  build_s = time.perf_counter() - start
  del memmap
  gc.collect()
  families = mrl_plans(full, rows, sorted(stores), ann, args)
  chains, family_of = [], {}
  for family, family_chains in families:
    for chain in family_chains:
      out = []
      for plan in chain:
        text = plan_name(plan)
        family_of[text] = family

        def cost(q, plan=plan):
          return ((plan_flops(plan, rows, full) / 1e6 + _ann_mflops(index, plan, q, ann, rows)),
                  float(index.bytes_per_vector(plan)))
        out.append(Candidate({"plan": text, "family": family},
                             lambda q, plan=plan: index.search(q, K, plan)[0], cost))
      chains.append(out)
  # How good each stored prefix is on its own (exact search at that size): the nested shape.
  prefix_ids = {d: index.search(db.queries, K, f"exact:{d}")[0] for d in sorted(stores)
                if d < full}
  if args.index_exact:  # The index's own exact full-size plan (on its full-size store's codes).
    chains.append([Candidate(
        {"plan": "exact", "family": INDEX_EXACT}, lambda q: index.search(q, K, "exact")[0],
        lambda q: (rows * full / 1e6, float(index.bytes_per_vector("exact"))))])
  return Built("mrl", chains, build_s, rows, release=lambda: None,
               extra={"stores": {str(d): t for d, t in stores.items()},
                      "ann": {name: dataclasses.asdict(spec) for name, spec in ann.items()},
                      "bytes_per_vector_index": float(index.bytes_per_vector()),
                      "_prefix_ids": prefix_ids})


BUILDERS = {"exact": build_exact, "faiss_flat": build_faiss_flat, "faiss_hnsw": build_faiss_hnsw,
            "faiss_ivf": build_faiss_ivf, "scann": build_scann, "mrl": build_mrl}


def scann_available() -> bool:
  try:
    import scann  # noqa: F401
  except Exception:  # noqa: BLE001  (any broken install: the optional baseline is skipped)
    return False
  return True


# --- Calibration of the synthetic noise --------------------------------------------------

def calibrate_noise(args: argparse.Namespace) -> dict[str, Any]:
  """Bisects log(noise) on a subsample until exact full-size mAP@10 ~ --target_map."""
  from mrl_jax.evaluation.retrieval import retrieval_metrics
  rows = min(args.num_database, args.calibrate_rows)
  nq = min(args.num_queries, args.calibrate_queries)
  db_labels, q_labels = synthetic_labels(rows, nq, args.classes, args.seed)
  centres = _centres(args.classes, args.dim, args.decay, args.seed)
  # x = c + noise * e: keep c and e once, so each trial noise costs one pass of arithmetic.
  signal_db, noise_db = centres[db_labels], synthetic_block(
      np.zeros_like(centres), db_labels, 1.0, args.decay, args.seed, 4, 0)
  signal_q, noise_q = centres[q_labels], synthetic_block(
      np.zeros_like(centres), q_labels, 1.0, args.decay, args.seed, 5, 0)

  def exact_map(noise: float, dim: int) -> float:
    db = normalized((signal_db + np.float32(noise) * noise_db)[:, :dim])
    q = normalized((signal_q + np.float32(noise) * noise_q)[:, :dim])
    ids = exact_top_k(q, in_memory_blocks(db), K)
    return retrieval_metrics(db_labels[ids], q_labels, db_labels, (K,))["map@10"]

  low, high = math.log(0.25), math.log(4.0)
  trials = []
  for _ in range(args.calibrate_steps):
    mid = (low + high) / 2
    value = exact_map(math.exp(mid), args.dim)
    trials.append({"noise": math.exp(mid), "map@10": value})
    log(f"  calibrate: noise {math.exp(mid):.4f} -> exact mAP@10 {value:.4f} on {rows:,} rows")
    low, high = (mid, high) if value > args.target_map else (low, mid)
  noise = math.exp((low + high) / 2)
  prefixes = {str(d): exact_map(noise, d) for d in (8, 16, 64, 256, args.dim) if d <= args.dim}
  log(f"  calibrated noise {noise:.4f}: subsample exact mAP@10 by prefix {prefixes}")
  return {"noise": noise, "rows": rows, "queries": nq, "target_map@10": args.target_map,
          "subsample_map@10_by_dim": prefixes, "trials": trials}


# --- The run ------------------------------------------------------------------------------

def set_faiss_blas_threshold(threshold: int) -> int | None:
  """Sets faiss's distance_compute_blas_threshold for every faiss method of the run (a process
  global); returns the value it replaced (None without faiss)."""
  try:
    import faiss
  except ImportError:
    return None
  before = int(faiss.cvar.distance_compute_blas_threshold)
  faiss.cvar.distance_compute_blas_threshold = int(threshold)
  return before


def run(args: argparse.Namespace) -> dict[str, Any]:
  wall = time.perf_counter()
  if args.faiss_blas_threshold > 0:
    before = set_faiss_blas_threshold(args.faiss_blas_threshold)
    log(f"faiss distance_compute_blas_threshold {args.faiss_blas_threshold} for every faiss "
        f"method (faiss's default here: {before}).")
  from mrl_jax.retrieval import huge_pages
  huge_pages.enabled = bool(args.huge_pages)
  log(f"huge pages under every HNSW graph (MRL and full size) and the MRL rerank stores: "
      f"{'on' if huge_pages.enabled else 'off'} (--huge_pages).")
  scratch = args.scratch or tempfile.mkdtemp(prefix="retrieval_bench_")
  os.makedirs(scratch, exist_ok=True)
  calibration = None
  try:
    if args.database:
      db = file_database(args)
    else:
      if args.calibrate or args.calibrate_only:
        calibration = calibrate_noise(args)
        args.noise = calibration["noise"]
        if args.calibrate_only:
          return {"calibration": calibration}
      db = synthetic_database(args, scratch)
    return _run_methods(args, db, calibration, wall, scratch)
  finally:
    if not args.scratch:
      shutil.rmtree(scratch, ignore_errors=True)


def _split(num_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  order = np.random.default_rng([seed, 7]).permutation(num_queries)
  half = num_queries // 2
  return np.sort(order[:half]), np.sort(order[half:])


def _method_list(args: argparse.Namespace) -> list[str]:
  methods = [m for m in args.methods.split(",") if m]
  unknown = set(methods) - set(ALL_METHODS)
  if unknown:
    raise SystemExit(f"error: unknown --methods {sorted(unknown)}; choose from {ALL_METHODS}.")
  if "scann" in methods and not scann_available():
    log("ScaNN does not import here (`pip install scann`): skipping it.")
    methods.remove("scann")
  return methods


def _report_name(method: str, row: dict) -> str:
  return f"mrl_{row['setting']['family']}" if method == "mrl" else method


def _family(built: Built, setting: dict[str, Any]) -> str:
  return "exact" if setting.get("family") == INDEX_EXACT else built.family


def _run_methods(args: argparse.Namespace, db: Database, calibration: dict | None,
                 wall: float, scratch: str) -> dict[str, Any]:
  methods = _method_list(args)
  tune_ids, report_ids = _split(len(db.queries), args.seed)
  labelled = db.query_labels is not None
  metric = "map@10" if labelled else "recall_exact@10"
  log(f"{db.name}: {db.num:,} x {db.dim} database, {len(db.queries)} queries "
      f"({len(tune_ids)} tuning, {len(report_ids)} reported), bar {args.bar:g} x exact {metric}.")

  # The reference: exact full-size top-10 of every query, over all rows and (lazily) over the
  # row prefix a budget-limited baseline was built on.
  references: dict[int, np.ndarray] = {}

  def reference(rows: int, vectors: np.ndarray | None = None) -> np.ndarray:
    if rows not in references:
      blocks = (in_memory_blocks(vectors[:rows]) if vectors is not None
                else file_blocks_normalized(db.rows, rows))
      references[rows] = exact_top_k(normalized(db.queries), blocks, K)
    return references[rows]

  def labels_for(rows: int) -> np.ndarray | None:
    return None if db.labels is None else db.labels[:rows]

  def query_labels(ids: np.ndarray) -> np.ndarray | None:
    return None if db.query_labels is None else db.query_labels[ids]

  results: dict[str, dict[str, Any]] = {}
  prefix_exact: dict[str, dict[str, float]] = {}  # Exact search at each MRL store's prefix.
  tuning_log: dict[str, list[dict]] = {}
  # The best full-size ANN so far, written to scratch so the rematch can reopen it beside the
  # MRL index (built last) once the other baselines are freed: (name, setting, reopen, path).
  saved_ann: tuple[str, dict, Callable, str] | None = None
  rematch_out = None
  order = ["exact"] + [m for m in methods if m not in ("exact", "mrl")]
  for method in order + (["mrl"] if "mrl" in methods else []):
    log(f"  {method}: building ...")
    built = BUILDERS[method](db, args, db.num)
    if method == "exact":
      reference(db.num, built.extra.pop("vectors"))
    ref = reference(built.built_rows)
    db_labels = labels_for(built.built_rows)
    for dim, ids in built.extra.pop("_prefix_ids", {}).items():
      prefix_exact[str(dim)] = quality(ids[report_ids], query_labels(report_ids), db_labels,
                                       ref[report_ids])
    log(f"  {method}: built in {built.build_s:.1f} s on {built.built_rows:,} rows "
        f"(peak RSS {peak_rss_gb():.2f} GB); tuning ...")
    tuner = Tuner(db.queries[tune_ids], query_labels(tune_ids), db_labels, ref[tune_ids],
                  args.bar, args.tune_repeats, args.min_time_s, args.bar_confidence)
    bar = tuner.bar
    if method == "mrl":  # Report the best plan of every MRL family, and mark the best of all.
      per_family: dict[str, list[list[Candidate]]] = {}
      for chain in built.chains:
        per_family.setdefault(chain[0].setting["family"], []).append(chain)
      picks = [tuner.tune(chains) for chains in per_family.values()]
    else:
      picks = [tuner.tune(built.chains)]
    names = []
    for candidate, tune_row, log_rows in picks:
      name = _report_name(method, tune_row)
      names.append(name)
      tuning_log[name] = log_rows
      ids, seconds = timed(lambda c=candidate: c.search(db.queries[report_ids]), args.repeats,
                           args.min_time_s)
      mflops, bytes_per_vector = candidate.cost(db.queries[report_ids])
      row = {"family": _family(built, candidate.setting),
             "queries_per_s": len(report_ids) / seconds,
             **quality(ids, query_labels(report_ids), db_labels, ref[report_ids]),
             "build_s": built.build_s, "bytes_per_vector": bytes_per_vector,
             "mflops_per_query": mflops, "setting": candidate.setting,
             "tuning": {"metric": metric, "value": tune_row[metric], "bar": bar,
                        "bar_margin": tune_row["bar_margin"],
                        "met_bar": bool(tune_row["met_bar"]),
                        "queries_per_s": tune_row["queries_per_s"],
                        "settings_tried": len(log_rows)},
             "built_rows": built.built_rows, "subset": built.built_rows < db.num,
             **({"notes": built.notes} if built.notes else {}), **built.extra}
      if row["subset"]:
        row["exact_on_subset"] = quality(ref[report_ids], query_labels(report_ids), db_labels,
                                         ref[report_ids])
      results[name] = row
      shown = ", ".join(f"{key} {row[key]:.4f}" for key in ("map@10", "recall_exact@10")
                        if key in row)
      log(f"  {name}: {row['queries_per_s']:.0f} q/s, {shown}, "
          f"setting {json.dumps(candidate.setting)}")
    if (built.family == "full_dim_ann" and built.save is not None and args.rematch
        and _best(results, "full_dim_ann") == names[0]):
      if saved_ann:
        _remove_saved(saved_ann[3])
      path = os.path.join(scratch, f"rematch_{method}")  # A faiss file or a ScaNN directory.
      start = time.perf_counter()
      saved_ann = (names[0], picks[0][0].setting, built.save(path), path)
      log(f"  {names[0]}: the best full-size ANN so far, saved for the rematch "
          f"({time.perf_counter() - start:.0f} s)")
    if method == "mrl" and args.rematch:
      contenders = {name: c for name, (c, _, _) in zip(names, picks)
                    if results[name]["family"] == "mrl"}
      rematch_out = rematch(results, contenders, saved_ann, db.queries[tune_ids],
                            db.queries[report_ids], args)
    built.release()
    candidate = None  # The last candidate's closures hold the method's data: drop them all.
    del built, tuner, picks, candidate
    gc.collect()
    for name in names:
      results[name]["rss_gb_after_release"] = rss_gb()
      results[name]["peak_rss_gb_so_far"] = peak_rss_gb()
    if method == "exact" and "exact" not in methods:
      results.pop("exact")
  if saved_ann:
    _remove_saved(saved_ann[3])
  out = summarize(args, db, results, tuning_log, calibration, tune_ids, report_ids, wall,
                  rematch_out)
  if prefix_exact:
    out["prefix_exact_reported"] = prefix_exact
  if "exact" in results and "map@10" in results["exact"]:
    value = results["exact"]["map@10"]
    out["exact_map@10_in_0.5_0.9"] = 0.5 <= value <= 0.9
  return out


def rematch(results: dict[str, dict], contenders: dict[str, Candidate],
            saved_ann: tuple[str, dict, Callable, str] | None, tune_queries: np.ndarray,
            report_queries: np.ndarray, args: argparse.Namespace) -> dict[str, Any] | None:
  """The final, interleaved timing (`interleaved`) of the MRL families that met the bar and
  ran within --rematch_within of the fastest of them on the tuning half.

  1. On the tuning half, the pick: the best MRL plan is the fastest here (so two plans that
     tied within noise, timed minutes apart, are decided under the same conditions; still
     never on the reported half).
  2. On the reported half, the ratio: the same plans and the best full-size ANN, reopened
     from scratch with its tuned setting, call for call: the speed-up over the best ANN is
     measured in one stretch of time, not between a timing at minute 5 and one at minute 30.
  """
  met = {n: c for n, c in contenders.items() if results[n]["tuning"]["met_bar"]}
  if not met:
    return None
  fastest = max(results[n]["tuning"]["queries_per_s"] for n in met)
  met = {n: c for n, c in met.items()
         if results[n]["tuning"]["queries_per_s"] >= args.rematch_within * fastest}
  log(f"  rematch: {', '.join(met)} interleaved, {args.rematch_s:g} s each ...")
  tuning = interleaved({n: (lambda c=c: c.search(tune_queries)) for n, c in met.items()},
                       args.repeats, args.rematch_s)
  tuning_qps = {n: len(tune_queries) / s for n, s in tuning.items()}
  best_mrl = max(tuning_qps, key=tuning_qps.get)
  fns = {n: (lambda c=c: c.search(report_queries)) for n, c in met.items()}
  release, ann_name = (lambda: None), None
  if saved_ann:
    ann_name, setting, reopen, _ = saved_ann
    start = time.perf_counter()
    search, release = reopen(setting)
    log(f"  rematch: reopened {ann_name} in {time.perf_counter() - start:.0f} s "
        f"(RSS {rss_gb():.1f} GB)")
    fns[ann_name] = lambda: search(report_queries)
  reported = interleaved(fns, args.repeats, args.rematch_s)
  release()
  out = {"contenders": list(met), "seconds_each": args.rematch_s,
         "tuning_queries_per_s": tuning_qps,
         "reported_queries_per_s": {n: len(report_queries) / s for n, s in reported.items()},
         "best_mrl": best_mrl, "best_full_dim_ann": ann_name}
  if ann_name:
    out["speedup_vs_best_ann"] = reported[ann_name] / reported[best_mrl]
  log("  rematch: " + ", ".join(f"{n} {q:.0f} q/s" for n, q in
                                out["reported_queries_per_s"].items()) + f"; best MRL {best_mrl}")
  return out


def _best(results: dict[str, dict], family: str, full_only: bool = False) -> str | None:
  names = [n for n, r in results.items() if r["family"] == family]
  met = [n for n in names if results[n]["tuning"]["met_bar"]]
  pool = met or names
  if not pool:
    return None
  # The best is decided on the tuning half (queries/s there), never on the reported half.
  return max(pool, key=lambda n: results[n]["tuning"]["queries_per_s"])


def summarize(args, db: Database, results: dict[str, dict], tuning_log: dict, calibration,
              tune_ids, report_ids, wall: float,
              rematch_out: dict[str, Any] | None = None) -> dict[str, Any]:
  exact = results.get("exact")
  best = {family: _best(results, family) for family in FAMILIES}
  if rematch_out:  # The pick of the interleaved tuning-half timing.
    best["mrl"] = rematch_out["best_mrl"]
  best_ann = results.get(best["full_dim_ann"]) if best["full_dim_ann"] else None
  for row in results.values():
    if exact:
      row["speedup_vs_exact"] = row["queries_per_s"] / exact["queries_per_s"]
    if best_ann:
      row["speedup_vs_best_ann"] = row["queries_per_s"] / best_ann["queries_per_s"]
  out = {"name": db.name, "num_database": db.num, "dim": db.dim,
         "num_queries": int(len(db.queries)), "num_tuning_queries": int(len(tune_ids)),
         "num_reported_queries": int(len(report_ids)), "k": K, "bar": args.bar,
         "bar_confidence": args.bar_confidence,
         "labels": db.query_labels is not None, "database": db.info,
         "methods": results, "best": best,
         "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                     "python": sys.version.split()[0]},
         "max_build_s": args.max_build_s, "repeats": args.repeats,
         "faiss_blas_threshold": args.faiss_blas_threshold,
         "huge_pages": bool(args.huge_pages),
         "min_time_s": args.min_time_s,
         "peak_rss_gb": peak_rss_gb(), "wall_s": time.perf_counter() - wall}
  if calibration:
    out["calibration"] = calibration
  if rematch_out:
    out["rematch"] = rematch_out
  if best["mrl"]:
    mrl = results[best["mrl"]]
    metric = "map@10" if "map@10" in mrl else "recall_exact@10"
    goals = {"best_mrl": best["mrl"], "plan": mrl["setting"].get("plan"), "metric": metric,
             "met_bar_on_tuning": mrl["tuning"]["met_bar"],
             "bytes_per_vector": mrl["bytes_per_vector"],
             "bytes_at_most_half_float32": mrl["bytes_per_vector"] <= 0.5 * 4 * db.dim}
    if exact:
      goals.update({"metric_vs_exact": mrl[metric] / exact[metric],
                    "within_1pct_of_exact": mrl[metric] >= 0.99 * exact[metric],
                    "speedup_vs_exact": mrl["speedup_vs_exact"],
                    "at_least_20x_exact": mrl["speedup_vs_exact"] >= 20})
    index_exact = results.get(f"mrl_{INDEX_EXACT}")
    if index_exact:  # The GPU goal's reference: the index's exact plan, on the device there.
      goals["speedup_vs_index_exact"] = mrl["queries_per_s"] / index_exact["queries_per_s"]
    if best_ann:
      # The ratio is the rematch's (both timed call for call) where it could reopen the ANN;
      # the one between the two methods' own timings, minutes apart, is kept beside it.
      from_rematch = bool(rematch_out
                          and rematch_out.get("best_full_dim_ann") == best["full_dim_ann"])
      speedup = (rematch_out["speedup_vs_best_ann"] if from_rematch
                 else mrl["speedup_vs_best_ann"])
      goals.update({"best_full_dim_ann": best["full_dim_ann"],
                    "speedup_vs_best_ann": speedup,
                    "speedup_vs_best_ann_timed_apart": mrl["speedup_vs_best_ann"],
                    "speedup_from_rematch": from_rematch,
                    "at_least_3x_best_ann": speedup >= 3,
                    "metric_at_least_best_ann": mrl[metric] >= best_ann[metric],
                    "best_ann_on_all_rows": not best_ann["subset"]})
    out["goals"] = goals
  if args.tuning_log:
    out["tuning_log"] = tuning_log
  return out


def print_table(out: dict[str, Any]) -> None:
  log(f"\n{out['name']}: {out['num_database']:,} x {out['dim']}, {out['num_reported_queries']} "
      f"reported queries (settings tuned on the other {out['num_tuning_queries']}), peak RSS "
      f"{out['peak_rss_gb']:.1f} GB, {out['wall_s']:.0f} s")
  cols = ("build s", "B/vector", "queries/s", "mAP@10", "P@10", "R@10 exact", "MFLOPs/q",
          "x exact", "x best ANN")
  log(f"| method | family | {' | '.join(cols)} | setting |")
  log("|" + " --- |" * (len(cols) + 3))
  for name, r in out["methods"].items():
    def f(key, fmt):
      return format(r[key], fmt) if key in r else "-"
    mark = " *" if name in out["best"].values() else ""
    subset = f" (built on {r['built_rows']:,} of {out['num_database']:,})" if r["subset"] else ""
    setting = r["setting"].get("plan") or json.dumps(r["setting"]) if r["setting"] else ""
    if not r["tuning"]["met_bar"]:
      setting += " (missed the bar on the tuning half: its best)"
    log(f"| {name}{mark}{subset} | {r['family']} | {f('build_s', '.1f')} | "
        f"{f('bytes_per_vector', '.0f')} | {f('queries_per_s', '.0f')} | {f('map@10', '.4f')} | "
        f"{f('precision@10', '.4f')} | {f('recall_exact@10', '.4f')} | "
        f"{f('mflops_per_query', '.2f')} | {f('speedup_vs_exact', '.2f')} | "
        f"{f('speedup_vs_best_ann', '.2f')} | {setting} |")
  if "prefix_exact_reported" in out:
    log("exact search at each stored prefix (reported half): " + ", ".join(
        f"{dim}: " + "/".join(f"{v:.4f}" for v in row.values())
        for dim, row in out["prefix_exact_reported"].items()) + " (recall, mAP@10, P@10)")
  if "rematch" in out:
    r = out["rematch"]
    tuning = {n: f"{q:.0f}" for n, q in r["tuning_queries_per_s"].items()}
    shown = ", ".join(f"{n} {tuning.get(n, '-')} / {q:.0f}"
                      for n, q in r["reported_queries_per_s"].items())
    ratio = (f" = {r['speedup_vs_best_ann']:.2f}x {r['best_full_dim_ann']}"
             if r.get("best_full_dim_ann") else "")
    log(f"rematch (interleaved, {r['seconds_each']:g} s each), queries/s tuning / reported: "
        f"{shown}; best MRL {r['best_mrl']}{ratio}")
  if "goals" in out:
    log(f"goals: {json.dumps(out['goals'])}")


def _ints(text: str) -> list[int]:
  return [int(t) for t in text.split(",") if t]


def _floats(text: str) -> list[float]:
  return [float(t) for t in text.split(",") if t]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  data = p.add_argument_group("database")
  data.add_argument("--database", default=None, help="[N, d] float .npy (instead of synthetic)")
  data.add_argument("--database_labels", default=None, help="[N] int .npy")
  data.add_argument("--queries", default=None, help="[Q, d] float .npy")
  data.add_argument("--query_labels", default=None, help="[Q] int .npy")
  data.add_argument("--name", default=None, help="the database's name in the table")
  data.add_argument("--num_database", type=int, default=1_000_000)
  data.add_argument("--dim", type=int, default=2048)
  data.add_argument("--num_queries", type=int, default=1000)
  data.add_argument("--classes", type=int, default=1000)
  data.add_argument("--decay", type=float, default=1.0)
  data.add_argument("--noise", type=float, default=0.75)
  data.add_argument("--seed", type=int, default=0)
  data.add_argument("--scratch", default=None,
                    help="where the synthetic database is written (kept; default a temp dir)")
  data.add_argument("--calibrate", action="store_true",
                    help="bisect --noise on a subsample to reach --target_map first")
  data.add_argument("--target_map", type=float, default=0.6,
                    help="exact full-size mAP@10 on the calibration subsample (the full "
                         "database, with more rows per class, scores higher)")
  data.add_argument("--calibrate_rows", type=int, default=200_000)
  data.add_argument("--calibrate_only", action="store_true",
                    help="print the calibrated noise and stop")
  data.add_argument("--calibrate_queries", type=int, default=200)
  data.add_argument("--calibrate_steps", type=int, default=10)
  run_args = p.add_argument_group("methods")
  run_args.add_argument("--methods", default=",".join(ALL_METHODS))
  run_args.add_argument("--bar", type=float, default=0.99,
                        help="tuned settings reach this fraction of exact's tuning metric")
  run_args.add_argument("--bar_confidence", type=float, default=0.95,
                        help="one-sided confidence that a tuned setting meets the bar on new "
                        "queries: it must clear the bar by z x the standard error of its "
                        "per-query difference from exact (0.5: no margin)")
  run_args.add_argument("--repeats", type=int, default=3)
  run_args.add_argument("--tune_repeats", type=int, default=1)
  run_args.add_argument("--min_time_s", type=float, default=0.5,
                        help="time each setting over more calls (up to 200) until they add "
                        "up to this many seconds; the median call is reported")
  run_args.add_argument("--rematch", type=int, default=1,
                        help="time the best MRL plans and the best full-size ANN interleaved "
                        "at the end (1/0): the pick and the ratio of the goals")
  run_args.add_argument("--rematch_s", type=float, default=3.0,
                        help="seconds of calls each contestant gets in the rematch")
  run_args.add_argument("--rematch_within", type=float, default=0.5,
                        help="MRL families within this fraction of the fastest one's tuning "
                        "queries/s enter the rematch")
  # faiss 1.15 computes brute-force distances of batches under 128,000 queries without BLAS:
  # its IVF coarse quantizers (and IndexFlat) then ran ~13x slower on 500 queries (1265
  # centroids x 16 dims, 1.4 ms vs 0.11 ms). The setting is global: every faiss method,
  # baselines and MRL alike, runs with the same value.
  from mrl_jax.retrieval.ann import BATCH_BLAS_THRESHOLD  # The index's own searches use it.
  run_args.add_argument("--faiss_blas_threshold", type=int, default=BATCH_BLAS_THRESHOLD,
                        help="faiss distance_compute_blas_threshold for the run (0: faiss's)")
  # Graph hops and reranks read rows anywhere in buffers of 0.25-8 GB: on 2 MiB pages they
  # miss the TLB less (the MRL int8 graph ran 1.07-1.10x). Applied to the full-size HNSW
  # baseline alike; IVF lists are scanned in order and left alone.
  run_args.add_argument("--huge_pages", type=int, default=1,
                        help="back HNSW graphs and the MRL faiss rerank stores with "
                        "transparent huge pages where Linux allows (1/0)")
  run_args.add_argument("--max_build_s", type=float, default=900.0)
  run_args.add_argument("--max_rss_gb", type=float, default=20.0,
                        help="ScaNN is built on fewer rows if its build would pass this")
  run_args.add_argument("--block_rows", type=int, default=0,
                        help="database rows read (and added to HNSW) per block; 0: 64 MiB")
  run_args.add_argument("--hnsw_neighbours", type=int, default=32)
  run_args.add_argument("--ef_construction", type=int, default=40)
  # From 10 (= k): the full-size graph gets beams as small as the MRL shortlists.
  run_args.add_argument("--ef_search", type=_ints,
                        default=_ints("10,12,16,24,32,64,128,256,512,1024"))
  run_args.add_argument("--nprobe", type=_ints, default=_ints("1,2,4,8,16,32,64,128,256"))
  run_args.add_argument("--scann_leaves", type=_floats, default=_floats(
      "0.005,0.01,0.02,0.05,0.1,0.2"), help="fractions of the leaves searched")
  run_args.add_argument("--scann_reorder", type=_ints, default=_ints("50,100,200"))
  run_args.add_argument("--mrl_stores", default="16:float32,32:float32,64:float32,256:int8,"
                        "full:int8", help="DIM:DTYPE,... (full = the embedding size)")
  run_args.add_argument("--mrl_ann", default="hnsw16=hnsw:16,adanns=ivf:64:16,"
                        "hnsw256=hnsw:256,hnsw256q=hnsw:256:int8,hnsw384q=hnsw:384:int8,"
                        "hnsw512q=hnsw:512:int8",
                        help="NAME=hnsw:DIM[:int8] or NAME=ivf:DIM[:CLUSTER_DIM][:int8],... "
                        "(int8: the ANN stores int8 codes of its prefix)")
  run_args.add_argument("--shortlist_dims", type=_ints, default=_ints("16,32,64"))
  # A nested embedding's large prefixes rank almost as the full one does: a plan may rerank
  # at a stored prefix below full size, and is held to the same bar (exact full-size search).
  run_args.add_argument("--rerank_dims", type=lambda t: [0 if x == "full" else int(x)
                                                         for x in t.split(",") if x],
                        default=[0], help="stores the MRL plans rerank at (full = the "
                        "embedding size), e.g. 1024,full; the bar stays full-size exact's")
  # From 10 (= k), like --ef_search: the MRL shortlists get lists as short as the full-size
  # graph's beams.
  run_args.add_argument("--shortlist_sizes", type=_ints,
                        default=_ints("10,12,16,25,50,100,200,400,800,1600"))
  run_args.add_argument("--index_exact", type=int, default=1,
                        help="also time the MRL index's own exact full-size plan (1/0)")
  run_args.add_argument("--tuning_log", action="store_true",
                        help="keep every setting tried in the JSON")
  p.add_argument("--out", default=None, help="write the JSON here")
  args = p.parse_args(argv)
  if args.database and not args.queries:
    p.error("--database needs --queries")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  out = run(args)
  if "methods" in out:
    print_table(out)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main()
