"""`--mode=probe` on a masked-LM workdir: every nesting size of the text model, measured.

`probe.run_probe` hands a workdir whose config has `task="mlm"` to `run_text_probe`,
which restores it (`inference.load`, a `RestoredTextModel`) and measures, per
prefix size m of the nesting list:
  * MLM accuracy and cross-entropy on config.data's test split (`probe.test_split`,
    default data.eval_split) with the pipeline's fixed eval masking, text
    tokenized with the workdir's own tokenizer (WORKDIR/tokenizer.json);
  * sentence-embedding retrieval on a real labelled set (`text_demo.labelled_texts`):
    the texts are split once, seeded (`probe.seed`) and stratified by label,
    into a database half and a query half; every prefix is unit-normalised on
    its own and searched exactly (L2, `knn.py`): 1-NN and k-NN top-1 (`probe.knn_k`),
    mAP@k / precision@k / recall@k for `probe.retrieval_ks` (`retrieval.py`'s
    definitions; recall over the real class sizes of the database);
  * the Lee benchmark (`text_demo.lee_similarity`): Pearson and Spearman
    correlation between the cosine similarity of the 50 documents' prefixes and
    the mean human ratings, over the 1225 document pairs (`similarity.py`).
`probe.baseline_workdir` (a run trained without MRL, e.g. `--config.head=ff
--config.ff_dim=k`) adds the same rows for that model as `baseline_*`: its
embedding truncated to every size, and its MLM accuracy at the sizes it scores.

Writes WORKDIR/probe/{summary.json, report.md, mlm_accuracy.png, retrieval.png,
lee_correlation.png}. The model comes from the workdir; `--config` supplies
config.data (the corpus) and config.probe (see probe.py for the overrides rule).
"""

from __future__ import annotations

import os
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Files only: no display on servers.
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mrl_jax import inference  # noqa: E402
from mrl_jax.errors import ConfigError  # noqa: E402
from mrl_jax.evaluation import similarity  # noqa: E402
from mrl_jax.evaluation.report import finish_plot  # noqa: E402
from mrl_jax.workdir_path import (make_dirs, workdir_path, write_json_atomic,  # noqa: E402
                                  write_text_atomic)

RETRIEVAL_KEYS = ("knn1_top1", "map@10", "precision@10", "recall@10")


def stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(database indices, query indices): each class's items shuffled (seeded) and split
  in two, the extra item of an odd class going to the database. Sorted indices."""
  rng = np.random.default_rng(seed)
  database, queries = [], []
  for c in np.unique(labels):
    items = rng.permutation(np.flatnonzero(labels == c))
    half = (len(items) + 1) // 2
    database.append(items[:half])
    queries.append(items[half:])
  return np.sort(np.concatenate(database)), np.sort(np.concatenate(queries))


def mlm_rows(model, data_cfg: ml_collections.ConfigDict, split: str,
             batch_size: int, dims: list[int] | None = None) -> dict[str, Any]:
  """MLM accuracy / loss per size over `split` (sums of the task's eval_sums); with
  `dims`, the model's decoder truncated to each of those prefix sizes instead."""
  from mrl_jax.data import mlm_pipeline
  totals = None
  for batch in mlm_pipeline.make_mlm_eval_batches(data_cfg, global_batch_size=batch_size,
                                                  split=split):
    sums = model.mlm_sums(batch, dims)
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  if totals is None:
    raise ValueError(f"Split {data_cfg.name}/{split} yielded no batches.")
  count = max(float(totals["count"]), 1.0)
  return {"mlm_accuracy": [float(v) for v in np.asarray(totals["correct"]) / count],
          "mlm_loss": [float(v) for v in np.asarray(totals["loss_sum"]) / count],
          "mlm_predictions": int(round(float(totals["count"])))}


def retrieval_rows(z_db: np.ndarray, y_db: np.ndarray, z_q: np.ndarray, y_q: np.ndarray,
                   dims: list[int], settings: dict[str, Any],
                   num_classes: int) -> dict[str, list[float | None]]:
  """k-NN top-1 and retrieval metrics per prefix size (None above the embedding's width)."""
  from mrl_jax.evaluation.probe import knn_metrics
  ks = tuple(k for k in settings["retrieval_ks"] if k <= len(z_db))
  rows = []
  for m in dims:
    if m > z_db.shape[1]:
      rows.append(None)
      continue
    row = knn_metrics(z_db[:, :m], y_db, z_q[:, :m], y_q, num_classes, settings["knn_k"], ks)
    # The official recall divides by ImageNet's 1300 per class: meaningless here.
    rows.append({k: v for k, v in row.items() if not k.startswith("recall_official")})
  keys = next(r for r in rows if r is not None)
  return {k: [r[k] if r is not None else None for r in rows] for k in keys}


def lee_rows(z: np.ndarray, human: np.ndarray, dims: list[int]) -> dict[str, list[float | None]]:
  sizes = [m for m in dims if m <= z.shape[1]]
  corr = similarity.similarity_correlation(z, human, sizes)
  pad = [None] * (len(dims) - len(sizes))
  return {"lee_pearson": corr["pearson"] + pad, "lee_spearman": corr["spearman"] + pad}


def _model_data_config(model, config: ml_collections.ConfigDict, workdir: str):
  """config.data for the pipeline, tokenized with the workdir's tokenizer."""
  from mrl_jax.tasks import mlm
  data = mlm.pipeline_data_config(config)
  data.tokenizer = mlm.check_workdir_tokenizer(workdir, model.vocab_size)
  return data


def measure(model, workdir: str, config: ml_collections.ConfigDict, settings: dict[str, Any],
            dims: list[int], split: str, prefix: str = "", log=print) -> dict[str, Any]:
  """Every per-size row of one restored text model (keys prefixed by `prefix`)."""
  from mrl_jax.data import text_demo
  out: dict[str, Any] = {}
  who = prefix.replace("_", " ")  # "baseline " in the log lines
  data = _model_data_config(model, config, workdir)
  mlm = mlm_rows(model, data, split, settings["batch_size"])
  own = list(model.dims)
  # The model's own sizes, placed at the probe's dims (None where it scores none).
  out["mlm_accuracy"] = [mlm["mlm_accuracy"][own.index(m)] if m in own else None for m in dims]
  out["mlm_loss"] = [mlm["mlm_loss"][own.index(m)] if m in own else None for m in dims]
  out["mlm_predictions"] = mlm["mlm_predictions"]
  if prefix:
    # A baseline scores only its own sizes; its decoder cut to every probe size
    # (h[:m] @ E[:, :m]^T + b) is the paper's truncated-FF row. Dims past its
    # largest trained size never met a loss: no row there.
    sizes = [m for m in dims if m <= max(model.dims)]
    cut = mlm_rows(model, data, split, settings["batch_size"], sizes)["mlm_accuracy"]
    out["mlm_accuracy_truncated"] = cut + [None] * (len(dims) - len(sizes))
  log(f"  {who}MLM accuracy: " + " ".join(
      f"@{m}:{a:.4f}" for m, a in zip(dims, out["mlm_accuracy"]) if a is not None))

  texts, labels, class_names = text_demo.labelled_texts()
  labels = np.asarray(labels)
  z = model.embed_text(texts, normalize=False)
  db, q = stratified_halves(labels, settings["seed"])
  out.update(retrieval_rows(z[db], labels[db], z[q], labels[q], dims, settings,
                            len(class_names)))
  out["retrieval_data"] = {"texts": len(texts), "database": int(len(db)),
                           "queries": int(len(q)), "classes": list(class_names)}
  log(f"  {who}retrieval 1-NN top-1: " + " ".join(
      f"@{m}:{a:.4f}" for m, a in zip(dims, out["knn1_top1"]) if a is not None))

  docs, human = text_demo.lee_similarity()
  out.update(lee_rows(model.embed_text(docs, normalize=False), np.asarray(human), dims))
  out["lee_pairs"] = len(docs) * (len(docs) - 1) // 2
  log(f"  {who}Lee Spearman: " + " ".join(
      f"@{m}:{a:.3f}" for m, a in zip(dims, out["lee_spearman"]) if a is not None))
  return {prefix + k: v for k, v in out.items()}


def run_text_probe(workdir: str, config: ml_collections.ConfigDict,
                   settings: dict[str, Any], log=print) -> dict[str, Any]:
  """Probes the latest checkpoint of an mlm `workdir`; writes WORKDIR/probe/."""
  if config.get("task", "classification") != "mlm":
    raise ConfigError(f"{workdir} holds a masked-LM model but --config is a "
                      f"{config.get('task', 'classification')!r} config: probe it with a text "
                      "config (e.g. --config configs/bert_mlm.py) whose config.data is a text "
                      "corpus.")
  start = time.time()
  model = inference.load(workdir)
  model.batch_size = settings["batch_size"]
  dims = list(model.dims)
  split = settings["test_split"]
  summary: dict[str, Any] = {"task": "mlm", "dims": dims, "head": model.config.head,
                             "step": model.step, "pooling": model.pooling,
                             "dataset": config.data.name, "split": split}
  log(f"Probing {workdir} (step {model.step}, sizes {dims}).")
  summary.update(measure(model, workdir, config, settings, dims, split, log=log))
  if settings["baseline_workdir"]:
    base_dir = os.fspath(workdir_path(settings["baseline_workdir"],
                                      "config.probe.baseline_workdir"))
    base = inference.load(base_dir)
    base.batch_size = settings["batch_size"]
    summary["baseline"] = {"workdir": base_dir, "head": base.config.head,
                           "dims": list(base.dims), "step": base.step,
                           "embedding_dim": int(base.embedding_dim)}
    summary.update(measure(base, base_dir, config, settings, dims, split, prefix="baseline_",
                           log=log))
  summary["probe_seconds"] = round(time.time() - start, 1)
  out_dir = make_dirs(workdir_path(workdir) / "probe")  # A folder, or a prefix in a bucket.
  write_json_atomic(out_dir / "summary.json", summary)
  write_text_report(summary, out_dir)
  log(f"Wrote {out_dir}/summary.json, report.md and plots.")
  return summary


# ---------------------------------------------------------------- report
PLOTS = (
    ("mlm_accuracy.png", "MLM accuracy", (("mlm_accuracy", "MLM accuracy"),)),
    ("retrieval.png", "retrieval (labelled texts)",
     (("knn1_top1", "1-NN top-1"), ("map@10", "mAP@10"))),
    ("lee_correlation.png", "correlation with human ratings (Lee)",
     (("lee_pearson", "Pearson"), ("lee_spearman", "Spearman"))),
)


def _plot(summary: dict[str, Any], keys, ylabel: str, path: str) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for key, label in keys:
    for prefix, who, style in (("", "MRL", "-"), ("baseline_", "baseline", "--")):
      values = summary.get(prefix + key)
      if not values:
        continue
      points = [(m, v) for m, v in zip(summary["dims"], values) if v is not None]
      if points:
        ax.plot(*zip(*points), marker="o", linestyle=style, label=f"{who} {label}")
  finish_plot(fig, ax, path, "representation size (dims)", ylabel)


def _cell(value: float | None, scale: float) -> str:
  if value is None:
    return "-"
  return f"{scale * value:.2f}" if scale == 100 else f"{value:.3f}"


def _table(summary: dict[str, Any], columns) -> list[str]:
  lines = ["| dims | " + " | ".join(title for _, title, _ in columns) + " |",
           "|" + "---|" * (len(columns) + 1)]
  for i, m in enumerate(summary["dims"]):
    cells = [_cell(summary[k][i], scale) if summary.get(k) else "-" for k, _, scale in columns]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return lines


def write_text_report(summary: dict[str, Any], out_dir: str) -> None:
  """report.md and one PNG per metric family into `out_dir`."""
  for name, ylabel, keys in PLOTS:
    _plot(summary, keys, ylabel, os.path.join(out_dir, name))
  data = summary["retrieval_data"]
  lines = [f"# Text probe report (step {summary['step']}, {summary['head']} head, "
           f"{summary['pooling']} pooling)", "",
           f"MLM on `{summary['dataset']}`/{summary['split']}: {summary['mlm_predictions']} "
           "masked tokens. Retrieval: labelled texts "
           f"({', '.join(data['classes'])}), {data['database']} in the database, "
           f"{data['queries']} queries, unit-normalised prefixes. Lee: "
           f"{summary['lee_pairs']} document pairs. Accuracies in %.", ""]
  columns = [("mlm_accuracy", "MLM acc", 100), ("mlm_accuracy_truncated", "MLM acc, cut", 100),
             ("mlm_loss", "MLM loss", 1),
             ("knn1_top1", "1-NN", 100), ("map@10", "mAP@10", 100),
             ("precision@10", "P@10", 100), ("recall@10", "R@10", 100),
             ("lee_pearson", "Lee r", 1), ("lee_spearman", "Lee rho", 1)]
  lines += ["## Per size: MRL", ""] + _table(summary, columns)
  if "baseline" in summary:
    base = summary["baseline"]
    lines += ["", f"## Per size: baseline ({base['head']} head, sizes {base['dims']}, "
              f"`{base['workdir']}`), its embedding truncated", ""]
    lines += _table(summary, [("baseline_" + k, t, s) for k, t, s in columns])
  lines += [""] + [f"![{ylabel}]({name})" for name, ylabel, _ in PLOTS] + [""]
  write_text_atomic(os.path.join(out_dir, "report.md"), "\n".join(lines))
