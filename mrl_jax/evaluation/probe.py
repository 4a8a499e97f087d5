"""Probe a restored model at every nesting size: `--mode=probe`.

Embeds the train split (the k-NN database and linear-probe training set) and
the test split once, with evaluation preprocessing, then per prefix size:
linear-probe top-1, k-NN top-1 (1-NN and `knn_k`), retrieval mAP/precision/
recall@k (unit-normalised prefixes, L2), the nested head's own top-1, and the
same-run baselines: SVD truncation of the full embedding and random feature
subsets. Then adaptive classification (a cascade over sizes) and adaptive /
funnel retrieval. Writes WORKDIR/probe/{summary.json, report.md, *.png}.

The paper's baselines truncate a model trained *without* MRL (SVD of the
fixed-feature FF model's embedding, random features of it): set
`config.probe.baseline_workdir` to such a run (e.g. the same config trained with
`--config.head=ff`) and the probe adds `baseline_svd_*` and `baseline_random_*`
rows computed on that model's embeddings of the same splits. The same-run
`svd_*` / `random_*` rows truncate the MRL embedding itself.

config.probe fields (all optional): knn_k (5), retrieval_ks ((10, 25, 50, 100)),
linear_l2 (1e-4), linear_steps (100), holdout_fraction (0.5), adaptive_splits (30
random hold-out splits), adaptive_method ("greedy" or "pairwise"), seed (0),
shortlist_dim (16), shortlist_size (200), funnel_dims ((16, 32, 64, 128, 256)),
funnel_shortlists ((200, 100, 50, 25, 10)), train_split / test_split (default:
config.data.train_split / eval_split), batch_size (256), baseline_workdir (None).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

from mrl_jax import inference
from mrl_jax.data import pipeline
from mrl_jax.evaluation import adaptive, funnel, knn, retrieval
from mrl_jax.evaluation.linear_probe import linear_probe_top1
from mrl_jax.evaluation.report import write_report

DEFAULTS = dict(knn_k=5, retrieval_ks=(10, 25, 50, 100), linear_l2=1e-4, linear_steps=100,
                holdout_fraction=0.5, adaptive_splits=30, adaptive_method="greedy", seed=0,
                shortlist_dim=16, shortlist_size=200,
                funnel_dims=(16, 32, 64, 128, 256), funnel_shortlists=(200, 100, 50, 25, 10),
                train_split=None, test_split=None, batch_size=256, baseline_workdir=None)


def probe_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  settings = dict(DEFAULTS)
  settings.update((config.get("probe") or ml_collections.ConfigDict()).to_dict())
  unknown = set(settings) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"Unknown config.probe field(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}.")
  settings["train_split"] = settings["train_split"] or config.data.get("train_split", "train")
  settings["test_split"] = settings["test_split"] or config.data.get("eval_split", "test")
  return settings


def embed_split(model: inference.RestoredModel, data_cfg, split: str,
                batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(embeddings [N, d], nested logits [n, N, C], labels [N]) of one split, in order."""
  zs, logits, labels = [], [], []
  for batch in pipeline.make_eval_batches(data_cfg, global_batch_size=batch_size, split=split):
    keep = batch["mask"] > 0
    z, lg = model.embed_and_logits(batch["image"][keep])
    zs.append(z)
    logits.append(lg)
    labels.append(batch["label"][keep])
  return np.concatenate(zs), np.concatenate(logits, axis=1), np.concatenate(labels)


def svd_basis(train_z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and principal directions (columns, by decreasing variance) of the train embeddings."""
  mean = train_z.mean(0)
  _, _, vt = np.linalg.svd(train_z - mean, full_matrices=False)
  return mean, vt.T


def knn_metrics(train_x, train_y, test_x, test_y, num_classes, knn_k, ks) -> dict[str, float]:
  """1-NN and k-NN top-1 and retrieval metrics for unit-normalised vectors."""
  depth = min(max(max(ks), knn_k), len(train_x))
  _, idx = knn.knn_search(np.asarray(knn.l2_normalize(test_x)),
                          np.asarray(knn.l2_normalize(train_x)), depth)
  neighbour_labels = train_y[idx]
  out = {"knn1_top1": float(np.mean(neighbour_labels[:, 0] == test_y)),
         f"knn{knn_k}_top1": float(np.mean(
             knn.knn_classify(neighbour_labels[:, :knn_k], num_classes) == test_y))}
  out.update(retrieval.retrieval_metrics(neighbour_labels, test_y, train_y,
                                         [k for k in ks if k <= depth]))
  return out


def truncation_rows(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray,
                    test_y: np.ndarray, dims: list[int], num_classes: int,
                    settings: dict[str, Any], rng: np.random.Generator, *,
                    prefixes: tuple[str, ...], key_prefix: str = "",
                    log=print) -> dict[str, list[float | None]]:
  """Per-size metrics of `dims`-dim truncations of one model's embeddings.

  Prefix "" keeps the first m coordinates (the MRL prefix), "svd_" projects on
  the top-m principal directions of the train embeddings, "random_" keeps m
  random coordinates. Sizes above the embedding's dim get None.
  """
  full = train_z.shape[1]
  mean, basis = svd_basis(train_z)
  random_subsets = {m: np.sort(rng.choice(full, size=m, replace=False)) for m in dims if m <= full}
  represent = {
      "": lambda z, m: z[:, :m],
      "svd_": lambda z, m: (z - mean) @ basis[:, :m],
      "random_": lambda z, m: z[:, random_subsets[m]],
  }
  ks = tuple(settings["retrieval_ks"])
  out: dict[str, list[float | None]] = {}
  for prefix in prefixes:
    rows = []
    for m in dims:
      if m > full:
        rows.append(None)
        continue
      train_x, test_x = represent[prefix](train_z, m), represent[prefix](test_z, m)
      row = knn_metrics(train_x, train_y, test_x, test_y, num_classes, settings["knn_k"], ks)
      row["linear_top1"] = linear_probe_top1(train_x, train_y, test_x, test_y, num_classes,
                                             l2=settings["linear_l2"],
                                             steps=settings["linear_steps"])
      rows.append(row)
      log(f"  {key_prefix}{prefix or 'mrl_'}d={m}: linear {row['linear_top1']:.4f}, "
          f"1-NN {row['knn1_top1']:.4f}")
    keys = next(r for r in rows if r is not None)
    for key in keys:
      out[key_prefix + prefix + key] = [r[key] if r is not None else None for r in rows]
  return out


def run_probe(workdir: str, config: ml_collections.ConfigDict | None = None,
              log=print) -> dict[str, Any]:
  """Probes the latest checkpoint in `workdir`; `config` supplies data and probe settings."""
  model = inference.load(workdir)
  config = config or model.config
  settings = probe_settings(config)
  model.batch_size = settings["batch_size"]
  dims, num_classes = list(model.dims), model.num_classes
  out_dir = os.path.join(workdir, "probe")
  os.makedirs(out_dir, exist_ok=True)

  start = time.time()
  train_z, _, train_y = embed_split(model, config.data, settings["train_split"],
                                    settings["batch_size"])
  test_z, test_logits, test_y = embed_split(model, config.data, settings["test_split"],
                                            settings["batch_size"])
  log(f"Embedded {len(train_z)} train and {len(test_z)} test examples "
      f"({time.time() - start:.1f} s); probing {len(dims)} sizes.")

  summary: dict[str, Any] = {"dims": dims, "num_train": len(train_z), "num_test": len(test_z),
                             "head": model.config.head, "step": model.step}
  rng = np.random.default_rng(settings["seed"])
  summary.update(truncation_rows(train_z, train_y, test_z, test_y, dims, num_classes, settings,
                                 rng, prefixes=("", "svd_", "random_"), log=log))
  if settings["baseline_workdir"]:
    base = inference.load(settings["baseline_workdir"])
    base.batch_size = settings["batch_size"]
    base_train_z, _, _ = embed_split(base, config.data, settings["train_split"],
                                     settings["batch_size"])
    base_test_z, _, _ = embed_split(base, config.data, settings["test_split"],
                                    settings["batch_size"])
    summary["baseline"] = {"workdir": os.path.abspath(settings["baseline_workdir"]),
                           "head": base.config.head, "step": base.step,
                           "embedding_dim": int(base_train_z.shape[1])}
    summary.update(truncation_rows(base_train_z, train_y, base_test_z, test_y, dims,
                                   num_classes, settings, rng, prefixes=("svd_", "random_"),
                                   key_prefix="baseline_", log=log))
  summary["head_top1"] = [float(np.mean(np.argmax(lg, -1) == test_y)) for lg in test_logits]

  summary["adaptive_classification"] = adaptive.adaptive_classification(
      test_logits, test_y, dims, holdout_fraction=settings["holdout_fraction"],
      seed=settings["seed"], num_splits=settings["adaptive_splits"],
      method=settings["adaptive_method"])
  summary["funnel_retrieval"] = retrieval_comparison(train_z, train_y, test_z, test_y, settings)
  summary["probe_seconds"] = round(time.time() - start, 1)

  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  write_report(summary, out_dir)
  log(f"Wrote {out_dir}/summary.json, report.md and plots.")
  return summary


def retrieval_comparison(train_z, train_y, test_z, test_y, settings) -> dict[str, Any]:
  """Adaptive and funnel retrieval against single-shot full-size search (database = train)."""
  full = train_z.shape[1]
  db_size = len(train_z)
  funnel_dims = [d for d in settings["funnel_dims"] if d < full]
  shortlists = [min(s, db_size) for s in settings["funnel_shortlists"][:len(funnel_dims) + 1]]
  funnel_dims = funnel_dims[:len(shortlists) - 1] + [None]
  return funnel.compare_retrieval(
      test_z, test_y, train_z, train_y,
      shortlist_dim=min(settings["shortlist_dim"], full),
      shortlist_size=min(settings["shortlist_size"], db_size),
      funnel_dims=tuple(funnel_dims), funnel_shortlists=tuple(shortlists), repeats=3)
