"""Peak memory and time of `--mode=probe`'s on-disk path at ImageNet scale, on fake embeddings.

For each database size (default 100k, 400k and 1.28M rows x 2048 dims, float32: 0.8,
3.3 and 10.5 GB) a fresh child process
  1. writes a synthetic nested database to shards exactly as the probe writes them
     (`embedding_shards.ShardWriter`, block by block) plus 1,000 test queries, then
  2. runs the probe's metric code on them, `probe.shard_metrics` (what the on-disk probe
     runs once the shards exist): streamed statistics and SVD basis, the blocked k-NN /
     retrieval metrics and the mini-batch linear probe of every truncation (MRL prefix,
     SVD, random features) at the `--dims` sizes, and the Index retrieval comparison
     (single-shot at 2048, adaptive 16 -> 2048, funnel 16-32-64-128-256-2048).
The parent reads the child's peak resident set (ru_maxrss, from os.wait4: the
RUSAGE_CHILDREN figure of that one child) and the child's phase times. The model
(image embedding) is not part of it: a 2-core CPU cannot embed 1.28M images in any
sensible time, and embedding streams batch by batch into the same writer.

`--in_memory` runs today's in-memory path (`probe.truncation_rows` and
`retrieval_comparison` on the whole matrix, full-batch L-BFGS linear probe) on the same
data instead, for the comparison of peak memory and of the results.

Synthetic data: 100 classes; embedding = class centre + noise, both with standard
deviation falling as (1 + j)^-0.5 over the 2048 coordinates (earlier coordinates
carry more, as in an MRL embedding), generated per block from a seeded generator.

    python benchmarks/probe_memory.py --out benchmarks/results/probe_memory.json
    python benchmarks/probe_memory.py --sizes 20000 --dim 256   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NUM_CLASSES = 100
GENERATE_ROWS = 16384


def _generate(directory: str, rows: int, dim: int, seed: int) -> None:
  import numpy as np
  from mrl_jax.evaluation.embedding_shards import ShardWriter
  scale = ((1.0 + np.arange(dim)) ** -0.5).astype(np.float32)
  centres = np.random.default_rng(1234).normal(size=(NUM_CLASSES, dim)).astype(np.float32) * scale
  writer = ShardWriter(directory)
  for start in range(0, rows, GENERATE_ROWS):
    rng = np.random.default_rng([seed, start])
    n = min(GENERATE_ROWS, rows - start)
    labels = rng.integers(0, NUM_CLASSES, n)
    z = rng.standard_normal((n, dim), dtype=np.float32)
    z *= scale * np.float32(1.5)
    z += centres[labels]
    writer.append(z, labels, np.arange(start, start + n))
  writer.close()


def _log_with_peak(line: str) -> None:
  """The probe's log line and the peak RSS so far (VmHWM), to see which phase sets it."""
  with open("/proc/self/status") as f:
    peak = next((l.split()[1] for l in f if l.startswith("VmHWM")), "?")
  print(f"{line}  [peak RSS so far {int(peak) / 1e6:.2f} GB]", file=sys.stderr, flush=True)


def child(args: argparse.Namespace) -> None:
  """One size: write the shards, run the metrics, print one JSON line of timings."""
  from mrl_jax.evaluation import probe, probe_settings
  from mrl_jax.evaluation.embedding_shards import SplitEmbeddings
  root = tempfile.mkdtemp(prefix="probe_memory_", dir=args.scratch)
  try:
    begin = time.perf_counter()
    _generate(os.path.join(root, "train"), args.child_size, args.dim, seed=0)
    _generate(os.path.join(root, "test"), args.queries, args.dim, seed=1)
    write_seconds = time.perf_counter() - begin
    train, test = SplitEmbeddings(os.path.join(root, "train")), SplitEmbeddings(
        os.path.join(root, "test"))
    settings = probe_settings.check_probe_settings(dict(
        max_in_memory_gb=0.0, linear_epochs=args.linear_epochs, block_rows=args.block_rows))
    dims = [int(d) for d in args.dims.split(",")]
    begin = time.perf_counter()
    test_z, test_y = test.read(0, len(test)), test.labels
    if args.in_memory:  # Today's in-memory path on the same data, for comparison.
      import numpy as np
      train_z = train.read(0, len(train))
      rng = np.random.default_rng(settings["seed"])
      summary = probe.truncation_rows(train_z, train.labels, test_z, test_y, dims, NUM_CLASSES,
                                      settings, rng, prefixes=("", "svd_", "random_"),
                                      log=_log_with_peak)
      summary["funnel_retrieval"] = probe.retrieval_comparison(train_z, train.labels, test_z,
                                                               test_y, settings)
    else:
      summary = probe.shard_metrics(train, test_z, test_y, dims, NUM_CLASSES, settings,
                                    log=_log_with_peak)
    metric_seconds = time.perf_counter() - begin
    funnel = summary["funnel_retrieval"]
    print(json.dumps({
        "write_seconds": round(write_seconds, 1), "metric_seconds": round(metric_seconds, 1),
        "metrics": {k: v for k, v in summary.items() if isinstance(v, list)},
        "retrieval": {name: {k: funnel[name][k] for k in ("map@10", "top1", "seconds")}
                      for name in ("single_shot_full", "adaptive", "funnel")}}))
  finally:
    shutil.rmtree(root, ignore_errors=True)


def measure(size: int, args: argparse.Namespace) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--child_size", str(size),
             "--dim", str(args.dim), "--dims", args.dims, "--queries", str(args.queries),
             "--linear_epochs", str(args.linear_epochs), "--block_rows", str(args.block_rows)]
  if args.scratch:
    command += ["--scratch", args.scratch]
  if args.in_memory:
    command += ["--in_memory"]
  begin = time.perf_counter()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT)
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  seconds = time.perf_counter() - begin
  if status != 0:
    raise SystemExit(f"size {size}: child failed with status {status}")
  result = json.loads(out.decode().strip().splitlines()[-1])
  return {"rows": size, "dim": args.dim, "gb_float32": round(size * args.dim * 4 / 1e9, 2),
          "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
          "total_seconds": round(seconds, 1), **result}


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="100000,400000,1280000")
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--dims", default="16,64,256", help="probed prefix sizes")
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--linear_epochs", type=int, default=1)
  parser.add_argument("--block_rows", type=int, default=16384)
  parser.add_argument("--scratch", default=None, help="directory for the shards (default /tmp)")
  parser.add_argument("--in_memory", action="store_true",
                      help="run today's in-memory path (probe.truncation_rows) instead")
  parser.add_argument("--out", default=None)
  parser.add_argument("--child_size", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child_size is not None:
    child(args)
    return
  rows = []
  for size in (int(s) for s in args.sizes.split(",")):
    load = os.getloadavg()[0]
    row = measure(size, args)
    row["load_average_before"] = round(load, 1)
    rows.append(row)
    print(f"{size:>9,} x {args.dim}: peak RSS {row['peak_rss_gb']:.2f} GB, metrics "
          f"{row['metric_seconds']:.0f} s, writing {row['write_seconds']:.0f} s "
          f"(load average {load:.1f})", flush=True)
  result = {"machine": f"{_cpu_name()}, {os.cpu_count()} cores",
            "path": "in_memory" if args.in_memory else "on_disk",
            "dims": args.dims, "queries": args.queries, "linear_epochs": args.linear_epochs,
            "block_rows": args.block_rows, "rows": rows}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
