"""Cost of NestedHead against the naive per-size loop and a plain linear head.

    python benchmarks/nested_head.py [--dim 2048 --classes 1000 --batch 256 --repeats 20]

For MRL and MRL-E at d=2048, 1000 classes (nesting 8..2048) it times a jitted
forward + backward (gradients for weights and embedding) and gives each head's
multiply-adds per example in the forward pass (analytic: sum(m)*C for MRL and
for the naive MRL-E loop, d*C for NestedHead's MRL-E and the plain head) next to
XLA's FLOP count of the compiled step (complete on CPU; on GPU XLA does not
count cuBLAS calls, so there only the analytic count and the times mean much).
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mrl_jax.models.nested_head import NestedHead, naive_nested_logits


def _step(logits_fn):
  """Forward + backward of a scalar loss over all sizes (what training runs)."""
  def loss(params, z):
    return jnp.sum(logits_fn(params, z) ** 2)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _compile(step, params, z, macs: int) -> dict:
  compiled = step.lower(params, z).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  jax.block_until_ready(compiled(params, z))
  return {"run": lambda: compiled(params, z), "forward_macs_per_example": macs,
          "xla_flops": float(cost.get("flops", 0.0)), "wall": [], "cpu": []}


def _time_interleaved(entries: list[dict], repeats: int) -> None:
  """One call of every step per round, so load from other processes hits all alike."""
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
          "forward_macs_per_example": entry["forward_macs_per_example"],
          "xla_flops": entry["xla_flops"]}


def run(dim: int, classes: int, batch: int, repeats: int) -> dict:
  dims = tuple(2 ** k for k in range(3, dim.bit_length()) if 2 ** k <= dim)
  z = jax.random.normal(jax.random.key(0), (batch, dim))
  results = {"dims": list(dims), "classes": classes, "batch": batch, "repeats": repeats,
             "device": jax.devices()[0].device_kind}

  def head_fn(efficient):
    head = NestedHead(dims, classes, efficient=efficient, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(head)
    return (lambda p, x: nnx.merge(graphdef, p)(x)), params, head

  sum_m, n = sum(dims), len(dims)
  entries = {}
  for kind, efficient in (("mrl", False), ("mrl_e", True)):
    fn, params, head = head_fn(efficient)
    entries[kind, "nested_head"] = _compile(
        _step(fn), params, z, (dim if efficient else sum_m) * classes)
    kernels = head.per_size_kernels()
    if efficient:  # The official loop slices the one shared matrix per size.
      naive_params = {"w": kernels[-1], "b": head.bias[...]}
      naive = lambda p, x: naive_nested_logits(x, [p["w"]] * n, [p["b"]] * n, dims)
    else:
      naive_params = {"w": kernels, "b": list(head.bias[...])}
      naive = lambda p, x: naive_nested_logits(x, p["w"], p["b"], dims)
    entries[kind, "naive_loop"] = _compile(_step(naive), naive_params, z, sum_m * classes)

  plain_params = {"w": jnp.zeros((dim, classes)), "b": jnp.zeros((classes,))}
  entries["plain_linear"] = _compile(_step(lambda p, x: x @ p["w"] + p["b"]), plain_params,
                                     z, dim * classes)
  # The floor of any head that emits one set of logits per size at d x C
  # multiply-adds: one full product, spread over the sizes by a cheap add. The
  # loss then reads, and its backward writes, num_sizes x [batch, C] logits.
  def per_size_outputs(p, x):
    logits = x @ p["w"] + p["b"]
    return jnp.stack([logits + 0.01 * i for i in range(n)])
  entries["plain_one_product_per_size_outputs"] = _compile(
      _step(per_size_outputs), plain_params, z, dim * classes)
  _time_interleaved(list(entries.values()), repeats)

  for kind in ("mrl", "mrl_e"):
    ours, loop = _summary(entries[kind, "nested_head"]), _summary(entries[kind, "naive_loop"])
    results[kind] = {
        "nested_head": ours, "naive_loop": loop,
        "time_ratio_naive_over_nested_head": loop["median_ms"] / ours["median_ms"],
        "mac_ratio_naive_over_nested_head":
            loop["forward_macs_per_example"] / ours["forward_macs_per_example"]}
  plain = results["plain_linear"] = _summary(entries["plain_linear"])
  floor = _summary(entries["plain_one_product_per_size_outputs"])
  results["plain_one_product_per_size_outputs"] = floor
  floor["time_ratio_over_plain"] = floor["median_ms"] / plain["median_ms"]
  floor["cpu_ratio_over_plain"] = floor["median_cpu_ms"] / plain["median_cpu_ms"]
  for kind in ("mrl", "mrl_e"):
    ours = results[kind]["nested_head"]
    results[kind]["time_ratio_over_plain"] = ours["median_ms"] / plain["median_ms"]
    results[kind]["cpu_ratio_over_plain"] = ours["median_cpu_ms"] / plain["median_cpu_ms"]
    results[kind]["mac_ratio_over_plain"] = (ours["forward_macs_per_example"]
                                             / plain["forward_macs_per_example"])
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default=None, help="Write the results as JSON here.")
  args = parser.parse_args()
  results = run(args.dim, args.classes, args.batch, args.repeats)
  print(f"Nested head, d={args.dim}, C={args.classes}, batch {args.batch}, fwd+bwd, "
        f"{results['device']} (median of {args.repeats}, interleaved):")
  print(f"  {'head':24s} {'ms':>8s} {'min ms':>8s} {'CPU ms':>8s} {'MACs/example':>13s} "
        f"{'XLA GFLOP':>10s}")
  rows = [("plain linear", results["plain_linear"]),
          ("plain, per-size outputs", results["plain_one_product_per_size_outputs"])]
  rows += [(f"{kind} {variant}", results[kind][variant])
           for kind in ("mrl", "mrl_e") for variant in ("nested_head", "naive_loop")]
  for name, r in rows:
    print(f"  {name:24s} {r['median_ms']:8.2f} {r['min_ms']:8.2f} {r['median_cpu_ms']:8.2f} "
          f"{r['forward_macs_per_example']:13,d} {r['xla_flops'] / 1e9:10.3f}")
  for kind in ("mrl", "mrl_e"):
    r = results[kind]
    print(f"  {kind}: naive/nested_head time x{r['time_ratio_naive_over_nested_head']:.2f}, "
          f"MACs x{r['mac_ratio_naive_over_nested_head']:.2f}; nested_head/plain time "
          f"x{r['time_ratio_over_plain']:.2f} (CPU time x{r['cpu_ratio_over_plain']:.2f}), "
          f"MACs x{r['mac_ratio_over_plain']:.2f}")
  floor = results["plain_one_product_per_size_outputs"]
  print(f"  plain with per-size outputs / plain: time x{floor['time_ratio_over_plain']:.2f} "
        f"(CPU time x{floor['cpu_ratio_over_plain']:.2f})")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
