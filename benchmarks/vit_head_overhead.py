"""Step-time overhead of the MRL head on a ViT: nested head vs the same ViT with a plain head.

    python benchmarks/vit_head_overhead.py [--variant B/16 --classes 18291 --batch 128
        --image 224 --dtype bfloat16 --repeats 20 --out results.json]

Builds `configs/vit_jft.py` (sigmoid loss, Adafactor, the config's class
padding) with the given variant, class count and global batch on all local
devices (data-parallel), and times the full jitted train step (forward,
backward, optimizer update) of the same ViT with three heads: a plain
classifier on all dims ("ff", the baseline), MRL (a classifier per size,
nesting 12..768) and MRL-E (one classifier, sliced). Synthetic inputs (random
images and multi-hot labels), so only compute is measured. Reports the median
step time over `repeats` (each step waited on) and the overhead ratio
mrl / ff - 1. The paper's target: under 2% at B/16 scale with 18k classes.
On a CPU use a small setting, e.g. `--variant Ti/16 --image 64 --batch 16
--classes 1000 --dtype float32`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import jax
import numpy as np

from mrl_jax import experiment, models, sharding
from mrl_jax.tasks.classification import ImageDataInfo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vit_jft_config(variant: str, classes: int, batch: int, image: int, dtype: str, head: str):
  spec = importlib.util.spec_from_file_location("vit_jft", os.path.join(ROOT, "configs", "vit_jft.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"variant={variant},num_classes={classes}")
  config.head = head
  config.batch_size = batch
  config.eval_batch_size = batch
  config.data.image_size = image
  config.compute_dtype = dtype
  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.evaluators = {}
  # Smaller variants embed into fewer dims (Ti: 192): keep the sizes that fit.
  config.nesting.dims = tuple(m for m in config.nesting.dims if m <= models.embedding_dim(config))
  return config


def time_step(config, repeats: int) -> dict:
  # Synthetic data: the batch layout comes from the config (num_classes, image size).
  exp = experiment.build(config, info=ImageDataInfo(
      config.num_classes, (config.data.image_size, config.data.image_size, 3), True,
      config.batch_size, "config"))
  nesting, mesh, spec = exp.nesting, exp.mesh, exp.spec
  state = exp.init_state()
  step = exp.train_step()
  rng = np.random.default_rng(0)
  b, s, c = config.batch_size, config.data.image_size, config.num_classes
  labels = np.zeros((b, c), np.int32)
  labels[np.arange(b)[:, None], rng.integers(0, c, (b, 3))] = 1  # ~3 labels per image, as JFT
  batch = sharding.global_batch(
      {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32), "label": labels}, mesh)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics["loss"])
  compile_s = time.perf_counter() - start
  for _ in range(2):
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  params = sum(x.size for x in jax.tree.leaves(spec.abstract["params"]))
  head_params = sum(x.size for x in jax.tree.leaves(spec.abstract["params"]["head"]))
  return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
          "compile_s": round(compile_s, 1), "parameters": int(params),
          "head_parameters": int(head_params), "dims": list(nesting.dims),
          "loss": float(metrics["loss"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--classes", type=int, default=18291)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--image", type=int, default=224)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--heads", default="ff,mrl,mrl_e")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  results = {"variant": args.variant, "classes": args.classes, "batch": args.batch,
             "image": args.image, "dtype": args.dtype, "repeats": args.repeats,
             "devices": jax.device_count(), "device": jax.devices()[0].device_kind, "heads": {}}
  for head in args.heads.split(","):
    config = vit_jft_config(args.variant, args.classes, args.batch, args.image, args.dtype, head)
    results["heads"][head] = time_step(config, args.repeats)
    print(f"{head:6s} {results['heads'][head]}", flush=True)
  base = results["heads"].get("ff")
  print(f"\nViT-{args.variant}, {args.classes} classes, batch {args.batch} x {args.image}px, "
        f"{args.dtype}, {jax.device_count()} x {results['device']} (median of {args.repeats})")
  print("| head | step ms | head params | overhead vs plain head |")
  print("|---|---|---|---|")
  for head, r in results["heads"].items():
    overhead = f"{100 * (r['median_ms'] / base['median_ms'] - 1):+.2f}%" if base else "-"
    r["overhead_vs_ff"] = r["median_ms"] / base["median_ms"] - 1 if base else None
    print(f"| {head} | {r['median_ms']:.2f} | {r['head_parameters']:,} | {overhead} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
