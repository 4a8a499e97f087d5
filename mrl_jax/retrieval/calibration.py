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

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mrl_jax.evaluation.retrieval import per_query_retrieval_metrics
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


def per_query_exact_recall(ids: np.ndarray, exact_ids: np.ndarray) -> np.ndarray:
  """|found ∩ exact top k| / k of every query, float64 [Q] (-1 ids count as misses)."""
  k = exact_ids.shape[1]
  hits = [len(set(row[row >= 0].tolist()) & set(ref.tolist())) for row, ref in zip(ids, exact_ids)]
  return np.asarray(hits, np.float64) / k


def per_query_plan_metrics(ids: np.ndarray, exact_ids: np.ndarray,
                           query_labels: np.ndarray | None,
                           database_labels: np.ndarray | None) -> dict[str, np.ndarray]:
  """recall_exact@k, and retrieval_metrics at k when there are labels: float64 [Q] each,
  one value a query (their means are the calibration table's metrics)."""
  k = ids.shape[1]
  metrics = {EXACT_RECALL.format(k=k): per_query_exact_recall(ids, exact_ids)}
  if query_labels is not None:
    neighbour_labels = np.where(ids >= 0, database_labels[np.maximum(ids, 0)], -1)
    metrics.update(per_query_retrieval_metrics(neighbour_labels, query_labels,
                                               database_labels, (k,)))
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


def paired_spread(values: np.ndarray, reference_values: np.ndarray) -> dict[str, float]:
  """{"variance", "covariance_with_exact", "reference_variance"} over queries (ddof 1) of a
  plan's per-query metric and the reference's (exact full-size search's) on the same queries:
  enough for `confidence_margin` at any ratio, without keeping the per-query values."""
  values, reference_values = (np.asarray(values, np.float64),
                              np.asarray(reference_values, np.float64))
  if values.shape != reference_values.shape or values.ndim != 1:
    raise ValueError(f"Per-query values {values.shape} and reference values "
                     f"{reference_values.shape} must be paired 1-D arrays.")
  if len(values) < 2:
    return {"variance": 0.0, "covariance_with_exact": 0.0, "reference_variance": 0.0}
  covariance = np.cov(values, reference_values, ddof=1)
  return {"variance": float(covariance[0, 0]), "covariance_with_exact": float(covariance[0, 1]),
          "reference_variance": float(covariance[1, 1])}


def confidence_margin(spread: dict[str, float], num_queries: int, ratio: float,
                      confidence: float) -> float:
  """How far a plan's mean metric must lie above `ratio` x the reference's mean on these queries
  for the plan to meet that bar, at one-sided `confidence`, on new queries drawn like them.

  spread: `paired_spread` of the plan's and the reference's per-query metric. The margin is
  z(confidence) x the standard error of the mean of plan - ratio x reference over the
  queries; 0 at confidence 0.5 (the bare comparison of means). Picking the fastest of many
  plans by the bare comparison favours plans that were lucky on these queries (the winner's
  curse): on other queries they fall short of the bar more often than not.
  """
  if not 0.5 <= confidence < 1.0:
    raise ValueError(f"confidence={confidence} must be in [0.5, 1) (0.5: no margin).")
  if num_queries < 2 or confidence == 0.5:
    return 0.0
  variance = (spread["variance"] - 2.0 * ratio * spread["covariance_with_exact"]
              + ratio ** 2 * spread["reference_variance"])
  z = statistics.NormalDist().inv_cdf(confidence)
  return float(z * math.sqrt(max(variance, 0.0) / num_queries))


def resolve_target(target: Target, table: list[dict[str, Any]]) -> Plan:
  """The fastest plan in `table` whose metric, less its `confidence_margin` at the target's
  confidence, is at least (1 - within) * exact full size's."""
  if not table:
    raise IndexQueryError(f"Plan {plan_name(target)!r} needs a calibrated index: run "
                          "index.calibrate(queries, query_labels=...) first.")
  exact_name = plan_name(Exact())
  baseline = [row for row in table if row["plan"] == exact_name]
  if not baseline:
    raise IndexQueryError("The calibration table has no exact full-size row to compare with: "
                          "calibrate again with Exact() among the plans.")
  if target.metric not in baseline[0]["metrics"]:
    raise IndexQueryError(f"Target metric {target.metric} was not calibrated (measured: "
                          f"{', '.join(sorted(baseline[0]['metrics']))}); calibrate with "
                          "query_labels for map@k, or at that k.")
  ratio = 1.0 - target.within
  bar = ratio * baseline[0]["metrics"][target.metric]

  def margin(row: dict[str, Any]) -> float:
    if row["plan"] == exact_name or target.confidence == 0.5:
      return 0.0  # Exact full size is the reference: it meets its own bar on any queries.
    spread = row.get("spread", {}).get(target.metric)
    if spread is None:
      raise IndexQueryError(f"The calibration table has no per-query spread of "
                            f"{target.metric} (calibrated by an older mrl_jax): calibrate "
                            f"again, or ask for confidence 0.5 "
                            f"(target:{target.metric}:{target.within:g}:0.5).")
    return confidence_margin(spread, int(row["num_queries"]), ratio, target.confidence)

  meeting = [row for row in table
             if target.metric in row["metrics"]
             and row["metrics"][target.metric] - margin(row) >= bar]
  # Exact full size always meets its own bar, so `meeting` is never empty.
  best = max(meeting, key=lambda row: (row["queries_per_s"], -row["mflops_per_query"]))
  return parse_plan(best["plan"])
