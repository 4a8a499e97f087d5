"""Funnel and adaptive retrieval against exact full-size search (and faiss flat), one run.

    python benchmarks/retrieval.py [--num_database 1000000 --dim 2048 --num_queries 1000]

The database has nested structure like an MRL embedding: each vector is its
class centre plus noise, and the centres' scale decays over dimensions
(scale_j = (j + 1) ** -decay), so leading dims separate classes best. Every
method searches unit-normalised prefixes by L2. Exact search and the first
shortlist stage run on prebuilt normalised prefixes on the default JAX device
(the index a deployment would keep), and reranking gathers candidates from the
raw database on the same device; faiss flat runs on the CPU. Reports
mAP@10, top-1 (label of the first hit), recall of the exact full-size top-10,
multiply-adds per query and median wall time, with ratios to exact search.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.evaluation import funnel, knn, retrieval


def make_nested_data(num_database: int, num_queries: int, dim: int, classes: int, decay: float,
                     noise: float, seed: int = 0):
  key_centres, key_db, key_q, key_labels = jax.random.split(jax.random.key(seed), 4)
  scale = (jnp.arange(dim) + 1.0) ** -decay
  centres = jax.random.normal(key_centres, (classes, dim)) * scale
  db_labels = np.arange(num_database) % classes
  q_labels = np.asarray(jax.random.randint(key_labels, (num_queries,), 0, classes))

  @jax.jit
  def points(key, labels):
    return centres[labels] + noise * scale * jax.random.normal(key, (labels.shape[0], dim))

  chunk = 65536
  database = np.empty((num_database, dim), np.float32)
  for i, start in enumerate(range(0, num_database, chunk)):
    labels = jnp.asarray(db_labels[start:start + chunk])
    database[start:start + chunk] = np.asarray(points(jax.random.fold_in(key_db, i), labels))
  queries = np.asarray(points(key_q, jnp.asarray(q_labels)))
  return database, db_labels, queries, q_labels


def timed(fn, repeats: int):
  fn()  # compile and warm caches
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return out, statistics.median(times)


def normalized_on_device(x: np.ndarray, dim: int) -> jax.Array:
  out = []
  for start in range(0, len(x), 65536):  # bounded host->device copies
    out.append(knn.l2_normalize(jnp.asarray(x[start:start + 65536, :dim])))
  return jnp.concatenate(out)


def run(args) -> dict:
  database, db_labels, queries, q_labels = make_nested_data(
      args.num_database, args.num_queries, args.dim, args.classes, args.decay, args.noise)
  k, full, m = 10, args.dim, args.num_database
  funnel_dims = [d for d in (16, 32, 64, 128, 256) if d < full] + [full]
  shortlists = [200, 100, 50, 25, 10][:len(funnel_dims) - 1]
  db_raw = jnp.asarray(database)  # reranking gathers candidates from it on the device
  db_full = normalized_on_device(database, full)
  db_small = normalized_on_device(database, 16)
  q_full = knn.l2_normalize(jnp.asarray(queries))
  q_small = knn.l2_normalize(jnp.asarray(queries[:, :16]))

  def exact():
    return knn.knn_search(np.asarray(q_full), db_full, k)[1]

  def shortlist(size):
    return knn.knn_search(np.asarray(q_small), db_small, size)[1]

  def adaptive():
    return funnel.rerank(queries, db_raw, shortlist(200), full, k)

  def funnel_search():
    candidates = shortlist(shortlists[0])
    for d, keep in zip(funnel_dims[1:], shortlists[1:] + [k]):
      candidates = funnel.rerank(queries, db_raw, candidates, d, keep)
    return candidates

  methods = {"exact_full": (exact, m * full),
             "adaptive_16_to_full": (adaptive, funnel.adaptive_flops(m, 16, full, 200)),
             "funnel": (funnel_search, funnel.funnel_flops(m, funnel_dims, shortlists + [k]))}
  try:
    import faiss
    index = faiss.IndexFlatL2(full)
    index.add(np.asarray(db_full))
    methods["faiss_flat_full"] = (lambda: index.search(np.asarray(q_full), k)[1], m * full)
  except ImportError:
    print("faiss is not installed: skipping the faiss flat baseline.")

  results = {"num_database": m, "dim": full, "num_queries": args.num_queries,
             "device": jax.devices()[0].device_kind, "funnel_dims": funnel_dims,
             "funnel_shortlists": shortlists + [k]}
  exact_ids = None
  for name, (fn, macs) in methods.items():
    ids, seconds = timed(fn, args.repeats)
    ids = np.asarray(ids)
    if exact_ids is None:
      exact_ids = ids
    metrics = retrieval.retrieval_metrics(db_labels[ids], q_labels, db_labels, (k,))
    results[name] = {
        "map@10": metrics["map@10"], "top1": float(np.mean(db_labels[ids[:, 0]] == q_labels)),
        "recall_of_exact@10": float(np.mean([len(set(a) & set(b)) / k
                                             for a, b in zip(ids, exact_ids)])),
        "mflops_per_query": macs / 1e6, "seconds": seconds}
  base = results["exact_full"]
  for name in methods:
    results[name]["flop_ratio_vs_exact"] = base["mflops_per_query"] / results[name]["mflops_per_query"]
    results[name]["speedup_vs_exact"] = base["seconds"] / results[name]["seconds"]
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_database", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--num_queries", type=int, default=1000)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--decay", type=float, default=0.5)
  parser.add_argument("--noise", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  results = run(args)
  print(f"Retrieval, {results['num_database']:,} x {results['dim']} database, "
        f"{results['num_queries']} queries, {results['device']} (median of {args.repeats}):")
  print(f"  {'method':22s} {'mAP@10':>7s} {'top-1':>6s} {'R@10 vs exact':>13s} "
        f"{'MFLOPs/q':>9s} {'seconds':>8s} {'FLOPs x':>8s} {'speed x':>8s}")
  for name, r in results.items():
    if isinstance(r, dict):
      print(f"  {name:22s} {r['map@10']:7.4f} {r['top1']:6.4f} {r['recall_of_exact@10']:13.4f} "
            f"{r['mflops_per_query']:9.2f} {r['seconds']:8.3f} {r['flop_ratio_vs_exact']:8.1f} "
            f"{r['speedup_vs_exact']:8.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
