"""Calibrating an index's search plans on held-out queries, and meeting a `Target` with the table.

`Index.calibrate` runs every candidate plan on the same queries and keeps one row per
plan:

  {"plan": "adaptive:16:200:2048@hnsw16", "k": 10, "num_queries": 1000,
   "queries_per_s": ..., "seconds": ...,          (median of `repeats` timed runs)
   "metrics": {"recall_exact@10": ..., "map@10": ..., "precision@10": ..., ...},
   "mflops_per_query": ..., "bytes_per_vector": ...}

recall_exact@k is the fraction of exact full-size search's top k that the plan found;
the label metrics (evaluation.retrieval.retrieval_metrics against the index's labels)
are there when the queries have labels. Every number but the timings depends only on
the index and the queries, so a table is reproducible apart from queries_per_s/seconds.

The default grid (`default_plans`) follows what the index holds: exact search at every
stored size, and for every shortlist source (an exact scan of each stored prefix
below full size, and each built ANN at its prefix) x shortlist sizes 50..1600 (those
in [k, N]): one adaptive plan per larger stored size, plus one funnel through all the
larger stored sizes when there are two or more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mrl_jax.evaluation.retrieval import retrieval_metrics
from mrl_jax.retrieval.errors import IndexQueryError
from mrl_jax.retrieval.plans import (EXACT_SHORTLIST, Exact, Funnel, Plan, Target, parse_plan,
                                     plan_name)

SHORTLIST_SIZES = (50, 100, 200, 400, 800, 1600)
EXACT_RECALL = "recall_exact@{k}"
_FUNNEL_SHRINK = 4  # Each intermediate funnel stage keeps a quarter of the one before.


def default_plans(full_dim: int, store_dims: Sequence[int], ann_dims: dict[str, int],
                  num_vectors: int, k: int) -> list[Plan]:
  """The default candidate plans for an index with these stores and ANNs (module doc)."""
  store_dims = sorted(set(int(d) for d in store_dims))
  plans: list[Plan] = [Exact(None if d == full_dim else d) for d in reversed(store_dims)]
  sources = [(EXACT_SHORTLIST, d) for d in store_dims if d < full_dim]
  sources += sorted(ann_dims.items())
  sizes = [s for s in SHORTLIST_SIZES if k <= s <= num_vectors]
  for source, shortlist_dim in sources:
    larger = [d for d in store_dims if d > shortlist_dim]
    for size in sizes:
      for rerank_dim in larger:
        plans.append(Funnel((shortlist_dim, rerank_dim), (size,), shortlist=source))
      if len(larger) >= 2:
        keeps = [size]
        for _ in larger[:-1]:
          keeps.append(max(k, keeps[-1] // _FUNNEL_SHRINK))
        plans.append(Funnel((shortlist_dim, *larger), tuple(keeps), shortlist=source))
  return plans


def exact_recall(ids: np.ndarray, exact_ids: np.ndarray) -> float:
  """Mean over queries of |found ∩ exact top k| / k (-1 ids count as misses)."""
  k = exact_ids.shape[1]
  hits = [len(set(row[row >= 0].tolist()) & set(ref.tolist())) for row, ref in zip(ids, exact_ids)]
  return float(np.mean(hits) / k) if hits else 0.0


def plan_metrics(ids: np.ndarray, exact_ids: np.ndarray, query_labels: np.ndarray | None,
                 database_labels: np.ndarray | None) -> dict[str, float]:
  """recall_exact@k, and retrieval_metrics at k when there are labels."""
  k = ids.shape[1]
  metrics = {EXACT_RECALL.format(k=k): exact_recall(ids, exact_ids)}
  if query_labels is not None:
    neighbour_labels = np.where(ids >= 0, database_labels[np.maximum(ids, 0)], -1)
    metrics.update(retrieval_metrics(neighbour_labels, query_labels, database_labels, (k,)))
  return metrics


def timed_median(run: Callable[[], Any], repeats: int) -> float:
  """Median wall seconds of `repeats` calls of `run` (at least one)."""
  times = []
  for _ in range(max(1, int(repeats))):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def check_query_labels(query_labels: Any, num_queries: int,
                       database_labels: np.ndarray | None) -> np.ndarray | None:
  """Query labels as int64 [Q], validated against the index's labels."""
  if query_labels is None:
    return None
  if database_labels is None:
    raise IndexQueryError("calibrate got query_labels but the index has no labels: build it "
                          "with labels=... (or calibrate without query_labels).")
  return check_class_ids(query_labels, num_queries, "query_labels", "integer labels (one per "
                         "query)")


def check_class_ids(labels: Any, num_rows: int, name: str, what: str) -> np.ndarray:
  """`labels` as int64 [num_rows] non-negative class ids; `what` describes them in the error."""
  labels = np.asarray(labels)
  if labels.shape != (num_rows,) or not np.issubdtype(labels.dtype, np.integer):
    raise IndexQueryError(f"{name} must be {num_rows} {what}, got shape {labels.shape} of "
                          f"{labels.dtype}.")
  if num_rows and labels.min() < 0:
    raise IndexQueryError(f"{name} must be non-negative class ids.")
  return labels.astype(np.int64)


def resolve_target(target: Target, table: list[dict[str, Any]]) -> Plan:
  """The fastest plan in `table` with metric >= (1 - within) * exact full size's."""
  if not table:
    raise IndexQueryError(f"Plan {plan_name(target)!r} needs a calibrated index: run "
                          "index.calibrate(queries, query_labels=...) first.")
  baseline = [row for row in table if row["plan"] == plan_name(Exact())]
  if not baseline:
    raise IndexQueryError("The calibration table has no exact full-size row to compare with: "
                          "calibrate again with Exact() among the plans.")
  if target.metric not in baseline[0]["metrics"]:
    raise IndexQueryError(f"Target metric {target.metric} was not calibrated (measured: "
                          f"{', '.join(sorted(baseline[0]['metrics']))}); calibrate with "
                          "query_labels for map@k, or at that k.")
  bar = (1.0 - target.within) * baseline[0]["metrics"][target.metric]
  meeting = [row for row in table if row["metrics"].get(target.metric, -np.inf) >= bar]
  # Exact full size always meets its own bar, so `meeting` is never empty.
  best = max(meeting, key=lambda row: (row["queries_per_s"], -row["mflops_per_query"]))
  return parse_plan(best["plan"])
