"""An MRL-native vector index: nested prefixes stored once, searched by adaptive or funnel plans.

  prefix_store.py  unit-normalised dim-prefixes of the database in float32, float16 or int8
                   (per-dimension scales), and the exact candidate rerank on them
  ann.py           faiss HNSW / IVF shortlists on a small prefix; AdANNS IVF (clusters
                   learnt on one prefix, lists scanned at another)
  exact_stage.py   exact top-k over a stored prefix (blocked scan or jax.lax.approx_max_k)
  plans.py         search plans: exact at a size, adaptive, funnel, a target to meet
  index.py         `Index`: build / add / search / calibrate / save / load
  calibration.py   measuring plans on held-out queries; the plan that meets a target
  refine_chain.py  an ANN-shortlist funnel as one faiss IndexRefine chain over the stores
  huge_pages.py    2 MiB pages under the graphs and rerank stores (fewer TLB misses per hop)
  metadata_file.py the versioned JSON saved beside each store and shortlist
  workdir_embeddings.py  a trained workdir's split as (embeddings, labels) to build from
  errors.py        the user errors of all of the above

The main names are re-exported here (`from mrl_jax.retrieval import Index, AnnSpec,
parse_plan`), imported on first use so that importing the errors stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Index": "index",
    "Exact": "plans", "Funnel": "plans", "Adaptive": "plans", "Target": "plans",
    "parse_plan": "plans", "plan_name": "plans", "plan_to_dict": "plans",
    "plan_from_dict": "plans", "plan_flops": "plans",
    "AnnSpec": "ann", "AnnShortlist": "ann",
    "PrefixStore": "prefix_store", "STORE_DTYPES": "prefix_store",
    "IndexQueryError": "errors", "IndexFileError": "errors", "IndexNotFoundError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
