"""The MRL shape: top-1 per embedding size for MRL, MRL-E, FF-k, SVD and random features.

    python benchmarks/mrl_shape.py --out benchmarks/results/mrl_shape.json \
        [--steps 4000 --dims 2,4,8,16,32,64 --width 8 --workdir /tmp/mrl_shape --data_dir DIR]

On `mrl_two_digits` (100 classes of two MNIST digits side by side, built on
first use; `configs/two_digits.py` is the base config) it trains, with the
project's own train loop (`train.train_and_evaluate`) and probe
(`probe.run_probe`):

* `mrl` and `mrl_e`: one model each, nested head over all `--dims`;
* `ff`: the paper's FF-k, one model per size k trained with a plain head on a
  k-dim embedding (`head=ff`, `ff_dim=k`); FF at the largest size is the plain,
  non-nested model;
* `ff_svd` and `ff_random`: that plain model's full embedding truncated to its
  top-m principal directions, or to m random coordinates (the probe's baseline
  rows, `config.probe.baseline_workdir`).

Every size is measured by a linear probe and 1-NN top-1 on the test split
(database / probe training set: the train split). Writes JSON
`{"dims", "num_classes", "methods": {method: {"linear_top1", "knn1_top1"}}, ...}`,
a PNG beside it (top-1 against dims, log2 axis, linear and 1-NN panels) and
prints a table. Each model is trained in `--workdir/<method>`; a run already
complete there (its summary.json at the requested step count) is reused.
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

from mrl_jax import models, train  # pylint: disable=wrong-import-position
from mrl_jax.evaluation import probe  # pylint: disable=wrong-import-position

METHODS = ("mrl", "mrl_e", "ff", "ff_svd", "ff_random")
LABELS = {"mrl": "MRL", "mrl_e": "MRL-E", "ff": "FF-k (one model per size)",
          "ff_svd": "SVD of FF", "ff_random": "random features of FF"}
METRICS = {"linear_top1": "linear probe", "knn1_top1": "1-NN"}


def base_config(dims: tuple[int, ...], steps: int, data_dir: str | None, width: int):
  spec = importlib.util.spec_from_file_location(
      "two_digits_config", os.path.join(ROOT, "configs", "two_digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.width = width
  config.nesting.dims = tuple(dims)
  config.total_steps = steps
  config.checkpoint_every_steps = steps  # Only the final state is probed.
  config.data.data_dir = data_dir
  return config


def finished_run(workdir: str, steps: int) -> bool:
  """Whether `workdir` holds a finished run of `steps` steps (its summary.json says so)."""
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      return json.load(f).get("steps") == steps
  except (OSError, ValueError):
    return False


def train_and_probe(name: str, config, workdir: str, timings: dict[str, float]) -> dict[str, Any]:
  """Trains `config` in `workdir` (unless already done) and returns the probe summary."""
  print(f"=== {name}: head={config.head}, ff_dim={config.get('ff_dim')}, "
        f"{config.total_steps} steps", flush=True)
  start = time.time()
  if not finished_run(workdir, config.total_steps):
    train.train_and_evaluate(config, workdir)
  timings[f"{name}_train_s"] = round(time.time() - start, 1)
  start = time.time()
  summary = probe.run_probe(workdir, config)
  timings[f"{name}_probe_s"] = round(time.time() - start, 1)
  return summary


def run(dims: tuple[int, ...], steps: int, workdir: str, data_dir: str | None,
        width: int) -> dict[str, Any]:
  start = time.time()
  timings: dict[str, float] = {}
  full = dims[-1]
  embedding = models.embedding_dim(base_config(dims, steps, data_dir, width))
  if full != embedding:
    raise SystemExit(f"--dims must end at the embedding dim, {embedding} at --width {width} "
                     f"(512 * width / 64); got {dims}.")
  methods: dict[str, dict[str, list[float | None]]] = {
      m: {k: [None] * len(dims) for k in METRICS} for m in METHODS}

  def config_for(head: str, ff_dim: int | None = None):
    config = base_config(dims, steps, data_dir, width)
    config.head = head
    if ff_dim is not None:
      config.ff_dim = ff_dim
    return config

  # FF-k, the largest first: it is also the plain model the baselines truncate.
  ff_dirs = {}
  for i, k in reversed(list(enumerate(dims))):
    ff_dirs[k] = os.path.join(workdir, f"ff{k}")
    summary = train_and_probe(f"ff{k}", config_for("ff", k), ff_dirs[k], timings)
    for key in METRICS:
      methods["ff"][key][i] = summary[key][0]
  for head in ("mrl", "mrl_e"):
    config = config_for(head)
    # The baselines are the same for both; computing them once is enough.
    if head == "mrl":
      config.probe.baseline_workdir = ff_dirs[full]
    summary = train_and_probe(head, config, os.path.join(workdir, head), timings)
    for key in METRICS:
      methods[head][key] = summary[key]
      if head == "mrl":
        methods["ff_svd"][key] = summary[f"baseline_svd_{key}"]
        methods["ff_random"][key] = summary[f"baseline_random_{key}"]
  config = base_config(dims, steps, data_dir, width)
  return {
      "dims": list(dims), "num_classes": 100, "dataset": config.data.name,
      "methods": methods,
      "model": config.model.to_dict(), "steps": steps, "batch_size": config.batch_size,
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
      "wall_s": round(time.time() - start, 1), "timings_s": timings,
  }


def format_table(result: dict[str, Any]) -> str:
  lines = []
  for key, title in METRICS.items():
    lines.append(f"{title} top-1 (%) on {result['dataset']} ({result['num_classes']} classes)")
    lines.append("| dims | " + " | ".join(METHODS) + " |")
    lines.append("| --- |" + " --- |" * len(METHODS))
    for i, m in enumerate(result["dims"]):
      cells = []
      for method in METHODS:
        v = result["methods"][method][key][i]
        cells.append("-" if v is None else f"{100 * v:.2f}")
      lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, (key, title) in zip(axes, METRICS.items()):
    for method in METHODS:
      values = result["methods"][method][key]
      points = [(m, 100 * v) for m, v in zip(result["dims"], values) if v is not None]
      ax.plot(*zip(*points), marker="o", label=LABELS[method])
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["dims"], [str(m) for m in result["dims"]])
    ax.set_xlabel("embedding dims")
    ax.set_title(f"{title} top-1, {result['dataset']}")
    ax.grid(True, alpha=0.3)
  axes[0].set_ylabel("top-1 (%)")
  axes[1].legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="JSON file; the PNG goes beside it.")
  parser.add_argument("--steps", type=int, default=4000, help="Train steps per model.")
  parser.add_argument("--dims", default="2,4,8,16,32,64",
                      help="Comma-separated sizes, increasing; the last is the embedding dim.")
  parser.add_argument("--width", type=int, default=8,
                      help="ResNet-18 width; the embedding has 512 * width / 64 dims.")
  parser.add_argument("--workdir", default="/tmp/mrl_shape", help="Where the models are trained.")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's).")
  args = parser.parse_args(argv)
  dims = tuple(int(d) for d in args.dims.split(","))
  result = run(dims, args.steps, os.path.abspath(args.workdir), args.data_dir, args.width)
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
