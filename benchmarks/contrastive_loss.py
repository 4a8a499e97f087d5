"""Cost of the nested contrastive loss against one full-size loss and the naive per-size loop.

    python benchmarks/contrastive_loss.py [--batch 4096 --dim 768 --repeats 10 --out FILE]

Forward + backward (gradients wrt both embeddings and the scale; for sigmoid the
bias too) of, for kind softmax and sigmoid:
  * nested: `losses.nested_contrastive_loss` over dims 12..768 (one pass over the
    embedding: per-chunk products in a running sum, hand-written VJP),
  * full_size: the same function with dims=(d,) (what a plain dual encoder pays),
  * naive_loop: each size normalises its own prefix, multiplies it out and takes
    its loss (autodiff), the obvious implementation.
The steps are called interleaved (one call each per round) so load from other
processes hits all alike; medians of wall and process CPU time, the ratio
nested / full_size and XLA's FLOP count. `--parts` adds the GEMM part alone: the
running sum of chunk products (its autodiff backward) and one full product, each
with a sum-of-squares loss, so the rest of a row above is the per-size loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from mrl_jax import losses
from mrl_jax.nesting import Nesting


def naive_nested_loss(image_emb, text_emb, dims, weights, scale, bias, kind):
  """The per-size loop: every size normalises and multiplies its own prefix."""
  batch = image_emb.shape[0]
  total = 0.0
  for k, (m, w) in enumerate(zip(dims, weights)):
    a = image_emb[:, :m] * jax.lax.rsqrt(jnp.sum(image_emb[:, :m] ** 2, -1, keepdims=True) + 1e-12)
    b = text_emb[:, :m] * jax.lax.rsqrt(jnp.sum(text_emb[:, :m] ** 2, -1, keepdims=True) + 1e-12)
    logits = scale[k] * a @ b.T
    if kind == "softmax":
      own = jnp.diagonal(logits)
      loss = 0.5 * (jnp.mean(jax.nn.logsumexp(logits, 1) - own)
                    + jnp.mean(jax.nn.logsumexp(logits, 0) - own))
    else:
      z = 2.0 * jnp.eye(batch) - 1.0
      loss = -jnp.sum(jax.nn.log_sigmoid(z * (logits + bias[k]))) / batch
    total = total + w * loss
  return total


def _entry(fn, args) -> dict:
  argnums = tuple(range(len(args)))
  step = jax.jit(jax.value_and_grad(fn, argnums=argnums))
  compiled = step.lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  jax.block_until_ready(compiled(*args))
  return {"run": lambda: compiled(*args), "xla_flops": float(cost.get("flops", 0.0)),
          "wall": [], "cpu": []}


def _time_interleaved(entries: list[dict], repeats: int) -> None:
  for _ in range(repeats):
    for entry in entries:
      cpu, start = time.process_time(), time.perf_counter()
      jax.block_until_ready(entry["run"]())
      entry["wall"].append(time.perf_counter() - start)
      entry["cpu"].append(time.process_time() - cpu)


def _summary(entry: dict) -> dict[str, float]:
  return {"median_ms": 1e3 * statistics.median(entry["wall"]),
          "min_ms": 1e3 * min(entry["wall"]),
          "median_cpu_ms": 1e3 * statistics.median(entry["cpu"]),
          "xla_gflops": entry["xla_flops"] / 1e9}


def run(batch: int, dim: int, kinds: tuple[str, ...], repeats: int, parts: bool) -> dict:
  dims = tuple(m for m in (12, 24, 48, 96, 192, 384, 768, 1536, 3072) if m <= dim)
  if dims[-1] != dim:
    dims = dims + (dim,)
  n = len(dims)
  weights = (1.0,) * n
  k1, k2 = jax.random.split(jax.random.key(0))
  image = jax.random.normal(k1, (batch, dim))
  text = 0.5 * image + jax.random.normal(k2, (batch, dim))  # correlated pairs
  results = {"batch": batch, "dim": dim, "dims": list(dims), "repeats": repeats,
             "device": jax.devices()[0].device_kind, "jax": jax.__version__,
             "cpu_count": os.cpu_count()}
  entries = {}
  for kind in kinds:
    bias = jnp.float32(-10.0) if kind == "sigmoid" else None
    scale = jnp.float32(10.0)

    def nested(i, t, s, *b, dims=dims, kind=kind):
      return losses.nested_contrastive_loss(i, t, dims, (1.0,) * len(dims), scale=s,
                                            bias=b[0] if b else None, kind=kind)[0]

    def naive(i, t, s, *b, kind=kind):
      return naive_nested_loss(i, t, dims, weights, jnp.broadcast_to(s, (n,)),
                               jnp.broadcast_to(b[0], (n,)) if b else None, kind)

    args = (image, text, scale) + (() if bias is None else (bias,))
    entries[kind, "nested"] = _entry(nested, args)
    entries[kind, "full_size"] = _entry(lambda *a, kind=kind: nested(*a, dims=(dim,), kind=kind),
                                        args)
    entries[kind, "naive_loop"] = _entry(naive, args)
  if parts:
    chunks = Nesting.create(dims).chunks

    def products_only(i, t):  # the running sum of chunk GEMMs (autodiff backward)
      return sum(jnp.sum(s ** 2) for s in losses._chunk_scores(chunks, i, t))

    entries["parts", "prefix_products_only"] = _entry(products_only, (image, text))
    entries["parts", "full_product_only"] = _entry(lambda i, t: jnp.sum((i @ t.T) ** 2),
                                                   (image, text))
  _time_interleaved(list(entries.values()), repeats)
  for (kind, variant), entry in entries.items():
    results.setdefault(kind, {})[variant] = _summary(entry)
  for kind in kinds:
    r = results[kind]
    r["nested_over_full_size"] = r["nested"]["median_ms"] / r["full_size"]["median_ms"]
    r["nested_over_full_size_cpu"] = (r["nested"]["median_cpu_ms"]
                                      / r["full_size"]["median_cpu_ms"])
    r["naive_over_nested"] = r["naive_loop"]["median_ms"] / r["nested"]["median_ms"]
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--kinds", default="softmax,sigmoid")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--parts", action="store_true")
  parser.add_argument("--note", default="", help="Stored in the JSON (e.g. machine load).")
  parser.add_argument("--out", default=None, help="Write the results as JSON here.")
  args = parser.parse_args()
  results = run(args.batch, args.dim, tuple(args.kinds.split(",")), args.repeats, args.parts)
  results["note"] = args.note
  print(f"Nested contrastive loss, B={args.batch}, d={args.dim}, dims {results['dims']}, "
        f"fwd+bwd, {results['device']} (median of {args.repeats}, interleaved):")
  print(f"  {'kind':8s} {'variant':22s} {'ms':>9s} {'min ms':>9s} {'CPU ms':>9s} {'XLA GFLOP':>10s}")
  for kind, variants in results.items():
    if not isinstance(variants, dict):
      continue
    for variant, r in variants.items():
      if isinstance(r, dict):
        print(f"  {kind:8s} {variant:22s} {r['median_ms']:9.1f} {r['min_ms']:9.1f} "
              f"{r['median_cpu_ms']:9.1f} {r['xla_gflops']:10.2f}")
  for kind in args.kinds.split(","):
    r = results[kind]
    print(f"  {kind}: nested / full-size x{r['nested_over_full_size']:.3f} (CPU time "
          f"x{r['nested_over_full_size_cpu']:.3f}); naive loop / nested x{r['naive_over_nested']:.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
