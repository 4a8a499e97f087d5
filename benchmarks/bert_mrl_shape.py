"""The MRL shape for text: masked-LM accuracy per size for MRL, FF-k and truncated FF.

    python benchmarks/bert_mrl_shape.py --out benchmarks/results/bert_mrl_shape.json \
        [--steps 1000 --dims 8,16,32,64,128 --ff_dims 8,32,128 --workdir /tmp/bert_shape]

On the embedded `mrl_text_demo` corpus (`configs/bert_mlm.py:runlocal`: a tiny
BERT, 128 wide, 2 layers, sequences of 64 tokens) it trains, with the
project's own train loop and probe:

* `mrl`: one model, the nested tied decoder over all `--dims`;
* `ff`: the paper's FF-k, one model per k in `--ff_dims`, trained with the
  decoder on the first k dims only (`head=ff`, `ff_dim=k`); FF at the largest
  size is the plain, non-nested BERT;
* `ff_truncated`: that plain model cut to every size: its decoder scores
  h[:m] @ E[:, :m]^T + b, its sentence embedding is truncated to z[:m] (the
  probe's baseline rows, `config.probe.baseline_workdir`).

Every size is measured on the validation split (MLM accuracy, fixed masks),
on the Lee corpus (Spearman correlation of cosine similarity with the human
ratings, 1225 document pairs) and on the labelled newsgroup posts (1-NN
top-1). Writes JSON `{"dims", "methods": {method: {metric: [per size]}}, ...}`,
a PNG beside it and prints a table. Each model is trained in
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

METHODS = ("mrl", "ff", "ff_truncated")
LABELS = {"mrl": "MRL (one model)", "ff": "FF-k (one model per size)",
          "ff_truncated": "plain BERT truncated"}
METRICS = {"mlm_accuracy": "MLM accuracy (%)", "lee_spearman": "Lee Spearman rho",
           "knn1_top1": "newsgroup 1-NN top-1 (%)"}
PERCENT = ("mlm_accuracy", "knn1_top1")


def base_config(dims: tuple[int, ...], steps: int, data_dir: str | None):
  spec = importlib.util.spec_from_file_location(
      "bert_mlm_config", os.path.join(ROOT, "configs", "bert_mlm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.nesting.dims = tuple(dims)
  config.total_steps = steps
  config.schedule.warmup_steps = max(steps // 10, 1)
  config.checkpoint_every_steps = steps  # Only the final state is probed.
  config.log_every_steps = max(steps // 10, 1)
  config.data.data_dir = data_dir
  return config


def run(dims: tuple[int, ...], ff_dims: tuple[int, ...], steps: int, workdir: str,
        data_dir: str | None) -> dict[str, Any]:
  start = time.time()
  timings: dict[str, float] = {}
  full = dims[-1]
  if ff_dims[-1] != full or any(k not in dims for k in ff_dims):
    raise SystemExit(f"--ff_dims must be sizes of --dims ending at {full}; got {ff_dims}.")
  methods = {m: {k: [None] * len(dims) for k in METRICS} for m in METHODS}

  def config_for(head: str, ff_dim: int | None = None):
    config = base_config(dims, steps, data_dir)
    config.head = head
    if ff_dim is not None:
      config.ff_dim = ff_dim
    return config

  # FF-k, the largest first: it is also the plain model the baselines truncate.
  ff_dirs = {}
  for k in sorted(ff_dims, reverse=True):
    ff_dirs[k] = os.path.join(workdir, f"ff{k}")
    summary = train_and_probe(f"ff{k}", config_for("ff", k), ff_dirs[k], timings)
    i = dims.index(k)
    for key in METRICS:
      methods["ff"][key][i] = summary[key][0]
  config = config_for("mrl_e")
  config.probe.baseline_workdir = ff_dirs[full]
  summary = train_and_probe("mrl", config, os.path.join(workdir, "mrl"), timings)
  for key in METRICS:
    methods["mrl"][key] = summary[key]
  methods["ff_truncated"]["mlm_accuracy"] = summary["baseline_mlm_accuracy_truncated"]
  for key in ("lee_spearman", "knn1_top1"):
    methods["ff_truncated"][key] = summary[f"baseline_{key}"]
  return {
      "dims": list(dims), "ff_dims": list(ff_dims), "dataset": config.data.name,
      "methods": methods, "model": config.model.to_dict(), "steps": steps,
      "batch_size": config.batch_size, "seq_len": config.data.seq_len,
      "eval_predictions": summary["mlm_predictions"],
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
      "wall_s": round(time.time() - start, 1), "timings_s": timings,
  }


def _cell(key: str, value: float | None) -> str:
  if value is None:
    return "-"
  return f"{100 * value:.2f}" if key in PERCENT else f"{value:.3f}"


def format_table(result: dict[str, Any]) -> str:
  lines = []
  for key, title in METRICS.items():
    lines.append(f"{title} on {result['dataset']}")
    lines.append("| dims | " + " | ".join(METHODS) + " |")
    lines.append("| --- |" + " --- |" * len(METHODS))
    for i, m in enumerate(result["dims"]):
      cells = [_cell(key, result["methods"][method][key][i]) for method in METHODS]
      lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
  for ax, (key, title) in zip(axes, METRICS.items()):
    scale = 100 if key in PERCENT else 1
    for method in METHODS:
      values = result["methods"][method][key]
      points = [(m, scale * v) for m, v in zip(result["dims"], values) if v is not None]
      if points:
        ax.plot(*zip(*points), marker="o", label=LABELS[method])
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["dims"], [str(m) for m in result["dims"]])
    ax.set_xlabel("embedding dims")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
  axes[0].legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="JSON file; the PNG goes beside it.")
  parser.add_argument("--steps", type=int, default=1000, help="Train steps per model.")
  parser.add_argument("--dims", default="8,16,32,64,128",
                      help="Nesting sizes, increasing; the last is the BERT width (128).")
  parser.add_argument("--ff_dims", default="8,32,128",
                      help="The sizes k that get their own FF-k model; must end at the width.")
  parser.add_argument("--workdir", default="/tmp/bert_mrl_shape",
                      help="Where the models are trained.")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's).")
  args = parser.parse_args(argv)
  dims = tuple(int(d) for d in args.dims.split(","))
  ff_dims = tuple(sorted(int(d) for d in args.ff_dims.split(",")))
  result = run(dims, ff_dims, args.steps, os.path.abspath(args.workdir), args.data_dir)
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
