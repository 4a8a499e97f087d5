"""Plots and a short Markdown report of a probe summary (for people; summary.json is for machines)."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Files only: no display on servers.
import matplotlib.pyplot as plt  # noqa: E402

from mrl_jax.workdir_path import save_figure, write_text_atomic  # noqa: E402

METRICS = (("linear_top1", "Linear probe top-1"), ("knn1_top1", "1-NN top-1"),
           ("map@10", "mAP@10"))
BASELINES = (("", "MRL"), ("svd_", "SVD of MRL's embedding"), ("random_", "random MRL features"),
             ("baseline_svd_", "SVD of baseline"), ("baseline_random_", "random baseline features"))


def finish_plot(fig, ax, path: str | os.PathLike, xlabel: str, ylabel: str, base: int = 2) -> None:
  """Log-scale x axis, labels, grid and legend; saves the PNG and frees the figure."""
  ax.set_xscale("log", base=base)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  save_figure(fig, path, dpi=120)  # A local file or an object in a bucket.
  plt.close(fig)


def _plot_metric(summary: dict[str, Any], key: str, title: str, path: str) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for prefix, label in BASELINES:
    if prefix + key in summary:
      points = [(m, v) for m, v in zip(summary["dims"], summary[prefix + key]) if v is not None]
      ax.plot(*zip(*points), marker="o", label=label)
  if key == "linear_top1" and "head_top1" in summary:
    ax.plot(summary["dims"], summary["head_top1"], marker="x", linestyle="--", label="nested head")
  finish_plot(fig, ax, path, "representation size (dims)", title, base=2)


def _plot_cascade(adaptive: dict[str, Any], path: str) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  curve = sorted(adaptive["curve"], key=lambda p: p["expected_dims"])
  ax.plot([p["expected_dims"] for p in curve], [p["accuracy"] for p in curve], marker="o",
          label="adaptive cascade")
  ax.plot([p["dim"] for p in adaptive["fixed"]], [p["accuracy"] for p in adaptive["fixed"]],
          marker="s", label="fixed size")
  finish_plot(fig, ax, path, "expected dims per example", "top-1", base=2)


def _plot_retrieval(funnel: dict[str, Any], path: str) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, result in funnel.items():
    # An ANN-shortlist row has no multiply-add count (mflops None): not on this plot.
    if isinstance(result, dict) and result.get("mflops") is not None:
      ax.scatter(result["mflops"], result["map@10"], label=name)
  finish_plot(fig, ax, path, "MFLOPs per query (multiply-adds)", "mAP@10", base=10)


def _table(summary: dict[str, Any], keys: list[tuple[str, str]]) -> list[str]:
  lines = ["| dims | " + " | ".join(title for _, title in keys) + " |",
           "|" + "---|" * (len(keys) + 1)]
  for i, m in enumerate(summary["dims"]):
    cells = [f"{100 * summary[k][i]:.2f}" if summary.get(k) and summary[k][i] is not None
             else "-" for k, _ in keys]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return lines


def _mean_std(stats: dict[str, float] | None, scale: float = 1.0, digits: int = 2) -> str:
  if stats is None:
    return "-"
  return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def _adaptive_lines(adaptive: dict[str, Any]) -> list[str]:
  """Split 0's cascade at the full size's accuracy, then mean ± std over all splits."""
  lines = ["", "## Adaptive classification", "",
           f"Cascade at the full size's accuracy (split 0): {100 * adaptive['accuracy']:.2f}% "
           f"with {adaptive['expected_dims']:.1f} expected dims; "
           f"x smaller at equal accuracy: {adaptive['x_smaller_at_equal_accuracy']}.", ""]
  over = adaptive.get("over_splits")
  if not over:
    return lines
  n, x = adaptive["num_splits"], over["x_smaller_at_equal_accuracy"]
  lines += [f"Over {n} random hold-out splits ({adaptive['method']} threshold search, "
            f"{adaptive['num_holdout']} held-out / {adaptive['num_reported']} reported; "
            f"mean ± std): top-1 {_mean_std(over['accuracy'], 100)}%, expected dims "
            f"{_mean_std(over['expected_dims'], digits=1)}, x smaller at equal accuracy "
            f"{_mean_std(x)} (reached in {x['count'] if x else 0} of {n} splits).", "",
            "| cascade | top-1 (%) | expected dims |", "|---|---|---|"]
  for point in over["curve"]:
    if "matched_dim" in point:
      name = f"matched to d={point['matched_dim']}"
    elif "max_dim" in point:
      name = f"sizes up to d={point['max_dim']}"
    else:
      name = f"target {100 * point['target']['mean']:.2f}%"
    lines.append(f"| {name} | {_mean_std(point['accuracy'], 100)} | "
                 f"{_mean_std(point['expected_dims'], digits=1)} |")
  return lines + [""]


def write_report(summary: dict[str, Any], out_dir: str | os.PathLike) -> None:
  """Writes the PNG plots and report.md into `out_dir` (a local folder or a bucket prefix)."""
  images = []
  # A multi-label model probed without a single-label dataset has no single-label rows.
  single = "linear_top1" in summary
  for key, title in METRICS if single else ():
    name = f"{key.replace('@', '_at_')}.png"
    _plot_metric(summary, key, title, os.path.join(out_dir, name))
    images.append((title, name))
  if "adaptive_classification" in summary:
    _plot_cascade(summary["adaptive_classification"], os.path.join(out_dir, "cascade.png"))
    images.append(("Adaptive classification", "cascade.png"))
  if "funnel_retrieval" in summary:
    _plot_retrieval(summary["funnel_retrieval"], os.path.join(out_dir, "retrieval.png"))
    images.append(("Retrieval cost", "retrieval.png"))

  lines = [f"# Probe report (step {summary['step']}, {summary['head']} head)", ""]
  if "multilabel" in summary:
    ml = summary["multilabel"]
    lines += [f"## Per size: multi-label corpus `{ml['dataset']}`", "",
              f"{ml['num_train']} train embeddings (1-NN database, linear-probe training), "
              f"{ml['num_test']} test examples, {ml['num_classes']} labels. prec@1: the top "
              "class / the 1-NN shares a label with the example; mAP: mean over labels of "
              "the AP of ranking the test examples by that label's score. Percentages.", ""]
    lines += _table(summary, [("multilabel_head_precision@1", "head prec@1"),
                              ("multilabel_head_map", "head mAP"),
                              ("multilabel_knn_precision@1", "1-NN prec@1"),
                              ("multilabel_linear_map", "linear mAP")])
    lines.append("")
  if not single:
    lines += [""] + [f"![{title}]({name})" for title, name in images] + [""]
    write_text_atomic(os.path.join(out_dir, "report.md"), "\n".join(lines))
    return
  on = f" of `{summary['single_label_dataset']}`" if "single_label_dataset" in summary else ""
  lines += [f"{summary['num_train']} train embeddings{on} (database / probe training), "
            f"{summary['num_test']} test queries. Numbers are percentages.", "",
            "## Per size: MRL prefix", ""]
  lines += _table(summary, [("linear_top1", "linear"), ("knn1_top1", "1-NN"),
                            ("map@10", "mAP@10"), ("head_top1", "head")])
  lines += ["", "## Per size: baselines from the same embeddings (1-NN / linear)", ""]
  lines += _table(summary, [("svd_knn1_top1", "SVD 1-NN"), ("svd_linear_top1", "SVD linear"),
                            ("random_knn1_top1", "random 1-NN"),
                            ("random_linear_top1", "random linear")])
  if "baseline" in summary:
    base = summary["baseline"]
    lines += ["", f"## Per size: baselines truncating a model trained without MRL "
              f"({base['head']} head, {base['embedding_dim']} dims, `{base['workdir']}`)", ""]
    lines += _table(summary, [("baseline_svd_knn1_top1", "SVD 1-NN"),
                              ("baseline_svd_linear_top1", "SVD linear"),
                              ("baseline_random_knn1_top1", "random 1-NN"),
                              ("baseline_random_linear_top1", "random linear")])
  adaptive = summary.get("adaptive_classification")  # None: multi-label head
  lines += [] if adaptive is None else _adaptive_lines(adaptive)
  lines += ["## Retrieval: single-shot vs adaptive vs funnel", "",
            "| method | plan | mAP@10 | top-1 | MFLOPs/query | wall s | queries/s |",
            "|---|---|---|---|---|---|---|"]
  for name, r in summary["funnel_retrieval"].items():
    if isinstance(r, dict) and "map@10" in r:
      mflops = "-" if r.get("mflops") is None else f"{r['mflops']:.3f}"
      qps = f"{r['queries_per_s']:.0f}" if "queries_per_s" in r else "-"
      lines.append(f"| {name} | `{r.get('plan', '-')}` | {100 * r['map@10']:.2f} | "
                   f"{100 * r['top1']:.2f} | {mflops} | {r['seconds']:.3f} | {qps} |")
  lines += [""] + [f"![{title}]({name})" for title, name in images] + [""]
  write_text_atomic(os.path.join(out_dir, "report.md"), "\n".join(lines))
