"""The MRL shape for dual encoders: zero-shot, recall and image 1-NN per size, MRL vs plain.

    python benchmarks/align_mrl_shape.py --out benchmarks/results/align_mrl_shape.json \
        [--steps 1000 --workdir /tmp/align_shape --data_dir DIR]

On the embedded `mrl_digit_captions` corpus (`configs/align.py:runlocal`: a
2-layer ViT image tower and a tiny BERT text tower, 64-d projections, the
softmax contrastive loss with a learned temperature) it trains two models
with the same steps, data order and seed, with the project's own train loop:

* `mrl`: the nested contrastive loss over every prefix 8, 16, 32, 64 of both
  towers' embeddings (`head=mrl`);
* `ff`: the plain dual encoder, the loss on the full 64 dims only (`head=ff`),

and measures, with the dual probe (`mrl_jax/evaluation/dual_probe.py`), per
size m on the test split: zero-shot top-1 over the 100 classes ("00".."99",
the config's prompt templates), image->text and text->image recall@1/5 (each
image against all test captions), and image-tower 1-NN top-1 (train split as
the database). Rows for the plain model: `ff_truncated` (its first m
coordinates of both towers, each prefix renormalised), `ff_svd` (the top-m
directions of an SVD fitted on its test image and caption embeddings) and
`ff_random` (a seeded random subset of m coordinates), the paper's baselines.

Writes JSON `{"dims", "methods": {method: {metric: [per size]}}, ...}`, a
PNG beside it and prints a table. Each model is trained in
`--workdir/<method>`; a run already complete there is reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The image benchmark's train-then-probe step (reuses a finished run in its workdir).
from benchmarks.mrl_shape import train_and_probe  # pylint: disable=wrong-import-position

METHODS = ("mrl", "ff_truncated", "ff_svd", "ff_random")
LABELS = {"mrl": "MRL (nested loss)", "ff_truncated": "plain, first m dims",
          "ff_svd": "plain, SVD to m dims", "ff_random": "plain, random m dims"}
METRICS = {"zero_shot_top1": "zero-shot top-1 (%)",
           "image_to_text_recall@1": "image->text R@1 (%)",
           "image_to_text_recall@5": "image->text R@5 (%)",
           "text_to_image_recall@1": "text->image R@1 (%)",
           "text_to_image_recall@5": "text->image R@5 (%)",
           "image_knn_top1": "image 1-NN top-1 (%)"}


def base_config(steps: int, data_dir: str | None):
  spec = importlib.util.spec_from_file_location(
      "align_config", os.path.join(ROOT, "configs", "align.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.total_steps = steps
  config.schedule.warmup_steps = max(steps // 20, 1)
  config.checkpoint_every_steps = steps  # Only the final state is probed.
  config.log_every_steps = max(steps // 10, 1)
  config.data.data_dir = data_dir
  # The probe measures everything at the end; no evaluator during or after training.
  config.zero_shot.every_steps = 0
  config.retrieval.every_steps = 0
  return config


def truncated_rows(config, baseline_workdir: str, dims: list[int]) -> dict[str, dict]:
  """The plain model's first-m-coordinates rows, scored by the dual probe's code."""
  from mrl_jax import inference
  from mrl_jax.data import image_text_pipeline
  from mrl_jax.evaluation import dual_evaluators, dual_probe
  from mrl_jax.evaluation.probe_settings import check_probe_settings
  settings = check_probe_settings(config.probe)
  info = image_text_pipeline.image_text_dataset_info(config.data)
  zs = dual_evaluators.build_zero_shot(config, info)
  ret = dual_evaluators.build_retrieval(config, info)
  knn_data = dual_probe.KnnData(config.data, settings["train_split"] or config.data.train_split,
                                settings["test_split"] or config.data.eval_split, pairs=True)
  model = inference.load(baseline_workdir)
  emb = dual_probe.embed_all(model, zs, ret, knn_data, settings["batch_size"])
  return dual_probe.score(emb, dual_probe.PREFIX, dims, ret.ks, model.embedding_dim)


def run(steps: int, workdir: str, data_dir: str | None) -> dict[str, Any]:
  start = time.time()
  timings: dict[str, float] = {}
  ff_config = base_config(steps, data_dir)
  ff_config.head = "ff"  # ff_dim None: the whole embedding.
  ff_dir = os.path.join(workdir, "ff")
  ff_summary = train_and_probe("ff", ff_config, ff_dir, timings)
  config = base_config(steps, data_dir)
  config.probe.baseline_workdir = ff_dir
  mrl_dir = os.path.join(workdir, "mrl")
  summary = train_and_probe("mrl", config, mrl_dir, timings)
  dims = list(summary["dims"])
  t = time.time()
  truncated = truncated_rows(config, ff_dir, dims)
  timings["ff_truncated_probe_s"] = round(time.time() - t, 1)

  def column(rows: dict[str, dict], key: str) -> list[float | None]:
    values = rows.get(key) or {}
    return [values.get(str(m)) for m in dims]

  methods = {
      "mrl": {k: column(summary, k) for k in METRICS},
      "ff_truncated": {k: column(truncated, k) for k in METRICS},
      "ff_svd": {k: column(summary, f"baseline_svd_{k}") for k in METRICS},
      "ff_random": {k: column(summary, f"baseline_random_{k}") for k in METRICS},
  }
  with open(os.path.join(mrl_dir, "summary.json")) as f:
    mrl_train = json.load(f)
  with open(os.path.join(ff_dir, "summary.json")) as f:
    ff_train = json.load(f)
  return {
      "dims": dims, "dataset": config.data.name, "methods": methods,
      "ff_full_size": {k: (ff_summary.get(k) or {}).get(str(dims[-1])) for k in METRICS},
      "train_eval_pair_top1": {"mrl": mrl_train.get("eval_pair_top1"),
                               "ff": ff_train.get("eval_pair_top1")},
      "zero_shot": summary.get("zero_shot"), "retrieval": summary.get("retrieval"),
      "knn": summary.get("knn"),
      "model": config.model.to_dict(), "steps": steps, "batch_size": config.batch_size,
      "lr": config.lr, "seed": config.seed,
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
      "wall_s": round(time.time() - start, 1), "timings_s": timings,
  }


def _cell(value: float | None) -> str:
  return "-" if value is None else f"{100 * value:.1f}"


def format_table(result: dict[str, Any]) -> str:
  lines = []
  for key, title in METRICS.items():
    lines.append(f"{title} on {result['dataset']} (test split)")
    lines.append("| dims | " + " | ".join(METHODS) + " |")
    lines.append("| --- |" + " --- |" * len(METHODS))
    for i, m in enumerate(result["dims"]):
      cells = [_cell(result["methods"][method][key][i]) for method in METHODS]
      lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = ("zero_shot_top1", "image_to_text_recall@1", "text_to_image_recall@1",
          "image_knn_top1")
  fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4))
  for ax, key in zip(axes, keys):
    for method in METHODS:
      points = [(m, 100 * v) for m, v in zip(result["dims"], result["methods"][method][key])
                if v is not None]
      if points:
        ax.plot(*zip(*points), marker="o", label=LABELS[method])
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["dims"], [str(m) for m in result["dims"]])
    ax.set_xlabel("embedding dims")
    ax.set_title(METRICS[key])
    ax.grid(True, alpha=0.3)
  axes[0].legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="JSON file; the PNG goes beside it.")
  parser.add_argument("--steps", type=int, default=1000, help="Train steps per model.")
  parser.add_argument("--workdir", default="/tmp/align_mrl_shape",
                      help="Where the models are trained.")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's).")
  args = parser.parse_args(argv)
  result = run(args.steps, os.path.abspath(args.workdir), args.data_dir)
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  png = os.path.splitext(args.out)[0] + ".png"
  plot(result, png)
  print(format_table(result))
  print(f"Wall time {result['wall_s']:.0f} s on {result['machine']}. Wrote {args.out} and {png}.")


if __name__ == "__main__":
  main()
