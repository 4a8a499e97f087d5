"""`Index`: an MRL vector index a user keeps (build, add, search with plans, calibrate, save, load).

An index holds the database once per stored prefix size (`PrefixStore`: the
unit-normalised first `dim` features in float32, float16 or int8) and optional
approximate shortlists on small prefixes (`AnnShortlist`: faiss HNSW / IVF).
`search(queries, k, plan)` carries out a plan (`plans.py`):

  Exact(dim)   exact top-k over the store at `dim` (`exact_stage.exact_top_k`), in one
               scan when the decoded store is small, else in row blocks merged by
               (distance, id) so a 1M x 2048 store never decodes at once;
  Funnel       stage 0: an exact top-shortlist over the store at dims[0], or the named
               ANN (with the plan's ef_search / nprobe); stages i >= 1: the store at
               dims[i] reranks the candidates (`PrefixStore.rerank`) and keeps shortlists[i].
               After an ANN the whole funnel runs as one faiss IndexRefine chain over the
               same codes (`refine_chain.py`; `index.faiss_refine = False` for the
               stage-by-stage path, which gives the same ids); queries go in blocks so
               the candidate lists stay bounded;
  Target       the fastest calibrated plan that meets it (`calibration.py`).

Distances are squared L2 between unit-normalised prefixes (smaller = closer), ties go
to the smaller id, and -1 ids (an ANN that found fewer than asked) come last with
distance +inf. With float32 stores and exact shortlists the ids equal
`evaluation.funnel.funnel_retrieve` / `single_shot`'s.

On disk (`save` / `load`): manifest.json (format version, sizes, store dtypes, ANN
specs, calibration table), stores/dim<D>/ and ann/<name>/ as those classes save
them, labels.npy. A save goes to a sibling temporary directory that replaces the
old one only when complete, so an interrupted save leaves the previous index intact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mrl_jax.retrieval import calibration
from mrl_jax.retrieval.errors import IndexFileError, IndexNotFoundError, IndexQueryError, one_line
from mrl_jax.retrieval.exact_stage import EXACT_METHODS, exact_top_k
from mrl_jax.retrieval.plans import (EXACT_SHORTLIST, SHORTLIST_NAME, Exact, Funnel, Plan, Target,
                                     as_plan, plan_flops, plan_name)
from mrl_jax.retrieval.prefix_store import STORE_DTYPES, PrefixStore
from mrl_jax.retrieval.refine_chain import RefineChain

if TYPE_CHECKING:  # ann.py needs faiss; an index without ANN shortlists does not.
  from mrl_jax.retrieval.ann import AnnShortlist, AnnSpec

FORMAT = "mrl_jax.retrieval.Index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
_SINGLE_SCAN_BYTES = 1 << 30   # Decoded stores up to this size are scanned in one call (cached)
_DEVICE_SCAN_FRACTION = 0.25   # ... or up to this share of an accelerator's memory.
_SCAN_BLOCK_BYTES = 1 << 28    # Larger ones in row blocks of about this many float32 bytes.
_QUERY_BLOCK_CANDIDATES = 1 << 22  # Funnels run on blocks of queries with this many candidates.
_DEFAULT_SHORTLIST_DIM = 16


def _one_line(error: BaseException) -> str:
  return one_line(error)[:300]


def _check_rows(x: Any, dim: int | None, what: str, row_name: str, block_rows: int) -> Any:
  """2-D, numeric, finite rows (checked in blocks: x may be a large np.memmap)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    x = np.asarray(x, np.float32)
  if len(x.shape) != 2:
    raise IndexQueryError(f"{what} must be a 2-D array [rows, dims], got shape {tuple(x.shape)}"
                          + (": pass x[None] for one row." if len(x.shape) == 1 else "."))
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise IndexQueryError(f"{what} must be numbers, got dtype {x.dtype}.")
  if dim is not None and x.shape[1] != dim:
    raise IndexQueryError(f"{what} have {x.shape[1]} dims but the index was built on {dim}-dim "
                          "embeddings.")
  for start in range(0, x.shape[0], block_rows):
    finite = np.isfinite(np.asarray(x[start:start + block_rows])).all(axis=1)
    if not finite.all():
      row = start + int(np.argmin(finite))
      raise IndexQueryError(f"{row_name} {row} has NaN/inf values.")
  return x


def _check_labels(labels: Any, num_rows: int) -> np.ndarray:
  return calibration.check_class_ids(labels, num_rows, "labels",
                                     "integer class ids (one per embedding)")


def _load_ann(directory: str) -> AnnShortlist:
  from mrl_jax.retrieval.ann import AnnShortlist
  return AnnShortlist.load(directory)


def _single_scan_limit() -> int:
  """Bytes of decoded store kept on the device and scanned in one call.

  On CPU 1 GiB (larger stores stream in row blocks; a copy of them would only add
  memory). On a GPU/TPU a quarter of its memory: streaming blocks to it on every search
  would cost far more than the scan itself.
  """
  import jax
  device = jax.devices()[0]
  if device.platform == "cpu":
    return _SINGLE_SCAN_BYTES
  try:
    limit = int((device.memory_stats() or {}).get("bytes_limit", 0))
  except Exception:  # noqa: BLE001 (backends without memory stats)
    limit = 0
  return max(_SINGLE_SCAN_BYTES, int(limit * _DEVICE_SCAN_FRACTION))


def _merge_top_k(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                 k: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-k of two (ids, distances) lists per query, by distance then id."""
  ids = np.concatenate([a[0], b[0]], axis=1)
  dist = np.concatenate([a[1], b[1]], axis=1)
  order = np.lexsort((ids, dist), axis=-1)[:, :k]
  return np.take_along_axis(ids, order, 1), np.take_along_axis(dist, order, 1)


class Index:
  """An MRL vector index: stored prefixes, ANN shortlists, labels and a calibration table."""

  def __init__(self, dim: int, stores: Mapping[int, PrefixStore],
               ann: Mapping[str, AnnShortlist] | None = None, labels: np.ndarray | None = None,
               calibration_table: list[dict[str, Any]] | None = None, *,
               exact_method: str = "auto"):
    """Use `Index.build` or `Index.load`; this assembles already built parts."""
    if exact_method not in EXACT_METHODS:
      raise IndexQueryError(f"exact_method={exact_method!r} is unknown: use one of "
                            f"{EXACT_METHODS}.")
    self._dim = int(dim)
    self._stores = dict(sorted((int(d), s) for d, s in stores.items()))
    self._ann = dict(sorted((ann or {}).items()))
    self._labels = labels
    self._calibration = list(calibration_table or [])
    self.exact_method = exact_method
    # ANN-shortlist funnels run as one faiss IndexRefine chain (refine_chain.py); False:
    # the ANN's search, then PrefixStore.rerank stage by stage (the same ids).
    self.faiss_refine = True
    self._scan_cache: dict[int, Any] = {}
    self._chains: dict[tuple[str, tuple[int, ...]], RefineChain] = {}

  # --- Building -----------------------------------------------------------------------------

  @classmethod
  def build(cls, embeddings: Any, *, stores: Mapping[int, str] | None = None,
            ann: Mapping[str, AnnSpec] | None = None, labels: Any = None,
            block_rows: int = 65536, exact_method: str = "auto") -> Index:
    """An index over raw embeddings [N, d] (np.ndarray or np.memmap, read in row blocks).

    stores: {prefix dim: "float32" | "float16" | "int8"} (default: float32 at min(16, d)
    and at d); ann: {name: AnnSpec} shortlists to build; labels: int class ids [N]
    (kept and saved, for calibrate's label metrics); exact_method: how exact stages scan
    (`exact_stage.EXACT_METHODS`).
    """
    embeddings = _check_rows(embeddings, None, "embeddings", "embedding", block_rows)
    num, dim = embeddings.shape
    if num == 0 or dim == 0:
      raise IndexQueryError(f"Cannot build an index on embeddings of shape "
                            f"{tuple(embeddings.shape)}: need at least one row and one dim.")
    stores = dict(stores) if stores is not None else {min(_DEFAULT_SHORTLIST_DIM, dim): "float32",
                                                      dim: "float32"}
    if not stores:
      raise IndexQueryError("stores is empty: give at least one {dim: dtype}, e.g. "
                            "{16: 'float32'}.")
    for store_dim, dtype in stores.items():
      if isinstance(store_dim, bool) or not isinstance(store_dim, (int, np.integer)) or not (
          0 < store_dim <= dim):
        raise IndexQueryError(f"Store dim {store_dim!r} must be an integer in [1, {dim}] (the "
                              "embedding size).")
      if dtype not in STORE_DTYPES:
        raise IndexQueryError(f"Store dtype {dtype!r} (dim {store_dim}) is unknown: use one of "
                              f"{STORE_DTYPES}.")
    ann = dict(ann or {})
    if ann:
      from mrl_jax.retrieval.ann import AnnShortlist, AnnSpec
    for name, spec in ann.items():
      if not isinstance(name, str) or name == EXACT_SHORTLIST or not SHORTLIST_NAME.match(name):
        raise IndexQueryError(f"ANN name {name!r} must be letters, digits, _ . - (not starting "
                              "with a digit, not 'exact'), e.g. 'hnsw16'.")
      if not isinstance(spec, AnnSpec):
        raise IndexQueryError(f"ann[{name!r}] must be an AnnSpec, got {type(spec).__name__}.")
      if not 0 < spec.dim <= dim:
        raise IndexQueryError(f"ann[{name!r}] covers {spec.dim} dims, outside [1, {dim}].")
    labels = None if labels is None else _check_labels(labels, num)
    built = {int(d): PrefixStore.build(embeddings, int(d), dtype, block_rows=block_rows)
             for d, dtype in stores.items()}
    anns = {name: AnnShortlist.build(embeddings, spec, block_rows=block_rows)
            for name, spec in ann.items()}
    return cls(dim, built, anns, labels, exact_method=exact_method)

  @classmethod
  def from_workdir(cls, workdir: str, *, split: str, data_dir: str | None = None,
                   batch_size: int = 256, **build_kwargs: Any) -> Index:
    """An index over the embeddings (and labels) of `split` of a trained workdir's data."""
    from mrl_jax.retrieval.workdir_embeddings import embed_workdir_split
    embeddings, labels = embed_workdir_split(workdir, split, data_dir=data_dir,
                                             batch_size=batch_size)
    build_kwargs.setdefault("labels", labels)
    return cls.build(embeddings, **build_kwargs)

  def add(self, embeddings: Any, labels: Any = None) -> None:
    """Appends rows [M, d] to every store and ANN (ids N..N+M-1); labels iff the index has them.

    A calibration table is kept as it was measured (re-calibrate after large additions).
    """
    embeddings = _check_rows(embeddings, self._dim, "embeddings", "embedding", 65536)
    if self._labels is not None and labels is None:
      raise IndexQueryError("This index has labels: pass labels=... (one per added embedding).")
    if self._labels is None and labels is not None:
      raise IndexQueryError("This index was built without labels: add without labels=..., or "
                            "rebuild with labels.")
    if labels is not None:
      labels = _check_labels(labels, embeddings.shape[0])
    if embeddings.shape[0] == 0:
      return
    for store in self._stores.values():
      store.add(embeddings)
    for shortlist in self._ann.values():
      shortlist.add(embeddings)
    if labels is not None:
      self._labels = np.concatenate([np.asarray(self._labels), labels])
    self._scan_cache.clear()
    self._chains.clear()  # The stores' faiss copies of their codes are rebuilt on next use.

  # --- What it holds ------------------------------------------------------------------------

  @property
  def num_vectors(self) -> int:
    return next(iter(self._stores.values())).num_vectors

  @property
  def dim(self) -> int:
    """The width of the embeddings the index was built on (queries have it too)."""
    return self._dim

  @property
  def store_dims(self) -> list[int]:
    return list(self._stores)

  @property
  def ann_names(self) -> list[str]:
    return list(self._ann)

  @property
  def labels(self) -> np.ndarray | None:
    return self._labels

  @property
  def calibration(self) -> list[dict[str, Any]]:
    """The last calibration table (empty if never calibrated)."""
    return list(self._calibration)

  def store(self, dim: int) -> PrefixStore:
    """The PrefixStore at prefix `dim`."""
    if dim not in self._stores:
      raise IndexQueryError(f"The index stores no {dim}-dim prefix (it stores {self.store_dims}).")
    return self._stores[dim]

  def shortlist(self, name: str) -> AnnShortlist:
    """The AnnShortlist built under `name`."""
    if name not in self._ann:
      raise IndexQueryError(f"The index has no ANN {name!r} (built: "
                            f"{', '.join(self._ann) or 'none'}).")
    return self._ann[name]

  def __repr__(self) -> str:
    stores = ", ".join(f"{d}: {s.dtype}" for d, s in self._stores.items())
    return (f"Index({self.num_vectors} x {self._dim}, stores {{{stores}}}, ann "
            f"{self.ann_names}, labels {self._labels is not None}, "
            f"{len(self._calibration)} calibrated plans)")

  def bytes_per_vector(self, plan: Plan | str | None = None) -> float:
    """Bytes per database vector of the stores and ANNs `plan` touches (None: all of them).

    Labels and the calibration table are not counted.
    """
    if plan is None:
      return float(sum(s.bytes_per_vector for s in self._stores.values())
                   + sum(a.bytes_per_vector for a in self._ann.values()))
    plan = self.resolve_plan(plan)
    store_dims, ann_name = self._plan_parts(plan)
    total = sum(self._stores[d].bytes_per_vector for d in store_dims)
    if ann_name is not None:
      total += self._ann[ann_name].bytes_per_vector
    return float(total)

  # --- Plans --------------------------------------------------------------------------------

  def resolve_plan(self, plan: Plan | str | None) -> Plan:
    """`plan` as an Exact or Funnel: a Target becomes the calibrated plan that meets it."""
    plan = as_plan(plan)
    if isinstance(plan, Target):
      plan = calibration.resolve_target(plan, self._calibration)
    return plan

  def _plan_parts(self, plan: Exact | Funnel) -> tuple[list[int], str | None]:
    """(store dims the plan reads, its ANN name or None), checked against what is built."""
    if isinstance(plan, Exact):
      dims, ann_name = [self._dim if plan.dim is None else plan.dim], None
    else:
      dims = [self._dim if d is None else d for d in plan.dims]
      ann_name = None if plan.shortlist == EXACT_SHORTLIST else plan.shortlist
    for d in dims:
      if d > self._dim:
        raise IndexQueryError(f"Plan {plan_name(plan)!r} uses {d} dims but the embeddings have "
                              f"{self._dim}.")
    if ann_name is not None:
      if ann_name not in self._ann:
        built = ", ".join(self._ann) or "none"
        raise IndexQueryError(f"Plan {plan_name(plan)!r} shortlists with ANN {ann_name!r}, which "
                              f"this index does not have (built: {built}): rebuild with "
                              f"ann={{{ann_name!r}: AnnSpec(...)}}.")
      ann_dim = self._ann[ann_name].dim
      if ann_dim != dims[0]:
        raise IndexQueryError(f"Plan {plan_name(plan)!r} shortlists at {dims[0]} dims but ANN "
                              f"{ann_name!r} covers {ann_dim}: make the first dim {ann_dim}.")
      dims = dims[1:]
    for d in dims:
      if d not in self._stores:
        wanted = ", ".join(f"{s}: ..." for s in sorted(set(self._stores) | {d}))
        raise IndexQueryError(f"Plan {plan_name(plan)!r} uses {d} dims but the index stores "
                              f"{self.store_dims}: rebuild with stores={{{wanted}}}.")
    return sorted(set(dims)), ann_name

  # --- Search -------------------------------------------------------------------------------

  def search(self, queries: Any, k: int, plan: Plan | str | None = None,
             ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [Q, k], squared L2 distances float32 [Q, k]) of raw queries [Q, d] by `plan`.

    plan: a Plan, its text (`plans.parse_plan`), or None for exact full-size search.
    """
    queries = np.asarray(_check_rows(queries, self._dim, "queries", "query", 65536), np.float32)
    num = self.num_vectors
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 < k <= num:
      raise IndexQueryError(f"k={k!r} is outside [1, {num}] (the number of indexed vectors).")
    k = int(k)
    plan = self.resolve_plan(plan)
    self._plan_parts(plan)
    if len(queries) == 0:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    if isinstance(plan, Exact):
      return self._exact(queries, self._dim if plan.dim is None else plan.dim, k)
    dims, keeps = plan.resolved(self._dim, k)
    if keeps[0] > num:
      raise IndexQueryError(f"Plan {plan_name(plan)!r} shortlists {keeps[0]} candidates but the "
                            f"index holds {num} vectors: use a shortlist of at most {num}.")
    if k > keeps[-1]:
      raise IndexQueryError(f"k={k} is more than plan {plan_name(plan)!r} keeps in its last stage "
                            f"({keeps[-1]}): ask for k <= {keeps[-1]} or keep more.")
    # Blocks of queries bound the candidate lists in memory ([block, shortlists[0]] ids).
    block = max(1, _QUERY_BLOCK_CANDIDATES // keeps[0])
    out_ids = np.empty((len(queries), k), np.int64)
    out_dist = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), block):
      ids, dist = self._funnel(queries[start:start + block], plan, dims, keeps)
      out_ids[start:start + block], out_dist[start:start + block] = ids[:, :k], dist[:, :k]
    return out_ids, out_dist

  def _funnel(self, queries: np.ndarray, plan: Funnel, dims: list[int], keeps: list[int],
              ) -> tuple[np.ndarray, np.ndarray]:
    if plan.shortlist == EXACT_SHORTLIST:
      ids, dist = self._exact(queries, dims[0], keeps[0])
    elif self.faiss_refine and len(dims) > 1:
      key = (plan.shortlist, tuple(dims[1:]))
      if key not in self._chains:
        self._chains[key] = RefineChain(self._ann[plan.shortlist],
                                        [self._stores[d] for d in dims[1:]], self._dim)
      return self._chains[key].search(queries, keeps, ef_search=plan.ef_search,
                                      nprobe=plan.nprobe)
    else:
      ids, dist = self._ann[plan.shortlist].search(queries, keeps[0], ef_search=plan.ef_search,
                                                   nprobe=plan.nprobe)
    for dim, keep in zip(dims[1:], keeps[1:]):
      ids, dist = self._stores[dim].rerank(queries, ids, keep)
    return ids, dist

  def _exact(self, queries: np.ndarray, dim: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the store at `dim`: one scan if small, else merged row blocks."""
    store = self._stores[dim]
    q = store.normalize_queries(queries)
    num = store.num_vectors
    # A store read from disk (shard_store.py) caps its one-piece size: it is decoded whole.
    if num * dim * 4 <= min(_single_scan_limit(), getattr(store, "single_scan_bytes", np.inf)):
      if dim not in self._scan_cache:
        import jax  # The decoded store stays in device memory between searches.
        self._scan_cache[dim] = jax.device_put(np.asarray(store.decoded(), np.float32))
      return exact_top_k(q, self._scan_cache[dim], k, method=self.exact_method)
    rows = max(k, _SCAN_BLOCK_BYTES // (4 * dim))
    best = (np.full((len(q), 0), -1, np.int64), np.full((len(q), 0), np.inf, np.float32))
    for start in range(0, num, rows):
      block = np.asarray(store.decoded(start, min(num, start + rows)), np.float32)
      ids, dist = exact_top_k(q, block, min(k, len(block)), method=self.exact_method)
      best = _merge_top_k(best, (np.asarray(ids, np.int64) + start, np.asarray(dist)), k)
    return best

  # --- Calibration --------------------------------------------------------------------------

  def calibrate(self, queries: Any, *, query_labels: Any = None, k: int = 10,
                plans: Sequence[Plan | str] | None = None, repeats: int = 3,
                ) -> list[dict[str, Any]]:
    """Measures plans on held-out queries; keeps and returns the table (`calibration.py`).

    plans: default `calibration.default_plans` of what is built; exact full-size search is
    always measured (it is the reference of recall_exact@k and of Target plans). Each
    plan runs once untimed (compilation, and the metrics), then `repeats` timed runs.
    """
    queries = np.asarray(_check_rows(queries, self._dim, "queries", "query", 65536), np.float32)
    if len(queries) == 0:
      raise IndexQueryError("calibrate needs at least one query.")
    labels = calibration.check_query_labels(query_labels, len(queries), self._labels)
    if self._dim not in self._stores:
      raise IndexQueryError(f"calibrate compares with exact full-size search, but the index "
                            f"stores only {self.store_dims}: rebuild with a {self._dim}-dim store.")
    if plans is None:
      plans = calibration.default_plans(self._dim, self.store_dims,
                                        {n: a.dim for n, a in self._ann.items()},
                                        self.num_vectors, k)
    plans = [as_plan(p) for p in plans]
    if any(isinstance(p, Target) for p in plans):
      raise IndexQueryError("calibrate measures concrete plans; a Target is resolved from them.")
    ordered = [Exact()] + [p for p in plans if plan_name(p) != plan_name(Exact())]
    names = [plan_name(p) for p in ordered]
    ordered = [p for i, p in enumerate(ordered) if names.index(names[i]) == i]  # Drop repeats.
    for plan in ordered:
      self._plan_parts(plan)
    table, exact_ids, exact_values = [], None, None
    for plan in ordered:
      ids, _ = self.search(queries, k, plan)
      if exact_ids is None:
        exact_ids = ids
      values = calibration.per_query_plan_metrics(ids, exact_ids, labels, self._labels)
      if exact_values is None:
        exact_values = values
      seconds = calibration.timed_median(lambda plan=plan: self.search(queries, k, plan), repeats)
      table.append({
          "plan": plan_name(plan), "k": int(k), "num_queries": int(len(queries)),
          "queries_per_s": len(queries) / max(seconds, 1e-12), "seconds": seconds,
          "metrics": {name: float(v.mean()) for name, v in values.items()},
          # Per-query spread against exact search, for a Target's confidence margin.
          "spread": {name: calibration.paired_spread(v, exact_values[name])
                     for name, v in values.items()},
          "mflops_per_query": plan_flops(plan, self.num_vectors, self._dim) / 1e6,
          "bytes_per_vector": self.bytes_per_vector(plan),
      })
    self._calibration = table
    return list(table)

  # --- Files --------------------------------------------------------------------------------

  def save(self, directory: str) -> None:
    """Writes the index to `directory` (replaced whole; an interrupted save leaves the old one)."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isfile(os.path.join(directory, MANIFEST)) and (
        not os.path.isdir(directory) or os.listdir(directory)):
      raise IndexFileError(f"{directory} exists and is not an index: save to a new or empty "
                           "directory.")
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    stores = []
    for dim, store in self._stores.items():
      store.save(os.path.join(tmp, "stores", f"dim{dim}"))
      stores.append({"dim": dim, "dtype": store.dtype, "path": f"stores/dim{dim}"})
    anns = []
    for name, shortlist in self._ann.items():
      shortlist.save(os.path.join(tmp, "ann", name))
      anns.append({"name": name, "spec": shortlist.spec.to_dict(), "path": f"ann/{name}"})
    if self._labels is not None:
      np.save(os.path.join(tmp, LABELS), np.asarray(self._labels, np.int64))
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "dim": self._dim,
                "num_vectors": self.num_vectors, "stores": stores, "ann": anns,
                "labels": self._labels is not None, "exact_method": self.exact_method,
                "calibration": self._calibration}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    old = f"{directory}.old-{os.getpid()}"
    if os.path.exists(directory):
      os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)

  @classmethod
  def load(cls, directory: str, *, mmap: bool = True) -> Index:
    """The index `save` wrote; with mmap the stores' codes are memory-mapped, not read."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.exists(directory):
      raise IndexNotFoundError(f"No index at {directory}: build one and save it there "
                               "(Index.build(...).save(path)).")
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
      raise IndexFileError(f"{directory} is not an index (no {MANIFEST}): save the index there "
                           "again.")
    try:
      with open(path) as f:
        manifest = json.load(f)
    except (OSError, ValueError) as e:
      raise IndexFileError(f"{path} is unreadable ({_one_line(e)}): save the index "
                           "again.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
      raise IndexFileError(f"{path} is not an mrl_jax index manifest: save the index again.")
    if manifest.get("format_version") != FORMAT_VERSION:
      raise IndexFileError(f"{directory} is index format version {manifest.get('format_version')}, "
                           f"this code reads version {FORMAT_VERSION}: rebuild the index.")
    try:
      dim, num = int(manifest["dim"]), int(manifest["num_vectors"])
      store_entries = [(int(s["dim"]), s["path"]) for s in manifest["stores"]]
      ann_entries = [(a["name"], a["path"]) for a in manifest["ann"]]
      has_labels, table = bool(manifest["labels"]), list(manifest["calibration"])
      exact_method = manifest.get("exact_method", "auto")
    except (KeyError, TypeError, ValueError) as e:
      raise IndexFileError(f"{path} is incomplete ({_one_line(e)}): save the index "
                           "again.") from None
    stores, anns = {}, {}
    for part, entries, loader in (
        ("store", store_entries, lambda p: PrefixStore.load(p, mmap=mmap)),
        ("ANN", ann_entries, _load_ann)):
      for key, rel in entries:
        try:
          loaded = loader(os.path.join(directory, rel))
        except IndexFileError:
          raise  # Already names the file and the fix.
        except (OSError, ValueError, KeyError, EOFError, RuntimeError) as e:
          raise IndexFileError(f"{directory}: {part} {rel} is unreadable ({_one_line(e)}): "
                               "save the index again.") from None
        (stores if part == "store" else anns)[key] = loaded
    for store_dim, store in stores.items():
      if store.num_vectors != num or store.dim != store_dim:
        raise IndexFileError(f"{directory}: store stores/dim{store_dim} holds {store.num_vectors} "
                             f"x {store.dim} but the manifest says {num} x {store_dim}: save the "
                             "index again.")
    if not stores:
      raise IndexFileError(f"{path} lists no stores: save the index again.")
    labels = None
    if has_labels:
      try:
        labels = np.load(os.path.join(directory, LABELS), allow_pickle=False)
      except (OSError, ValueError, EOFError) as e:
        raise IndexFileError(f"{directory}: {LABELS} is unreadable ({_one_line(e)}): save the "
                             "index again.") from None
      if labels.shape != (num,):
        raise IndexFileError(f"{directory}: {LABELS} holds {labels.shape} labels for {num} "
                             "vectors: save the index again.")
    return cls(dim, stores, anns, labels, table, exact_method=exact_method)
