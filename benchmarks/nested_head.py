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


def _measure(step, params, z, repeats: int, macs: int) -> dict[str, float]:
  compiled = step.lower(params, z).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  jax.block_until_ready(compiled(params, z))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, z))
    times.append(time.perf_counter() - start)
  return {"median_ms": 1e3 * statistics.median(times), "forward_macs_per_example": macs,
          "xla_flops": float(cost.get("flops", 0.0))}


def run(dim: int, classes: int, batch: int, repeats: int) -> dict:
  dims = tuple(2 ** k for k in range(3, dim.bit_length()) if 2 ** k <= dim)
  z = jax.random.normal(jax.random.key(0), (batch, dim))
  results = {"dims": list(dims), "classes": classes, "batch": batch,
             "device": jax.devices()[0].device_kind}

  def head_fn(efficient):
    head = NestedHead(dims, classes, efficient=efficient, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(head)
    return (lambda p, x: nnx.merge(graphdef, p)(x)), params, head

  sum_m = sum(dims)
  for kind, efficient in (("mrl", False), ("mrl_e", True)):
    fn, params, head = head_fn(efficient)
    ours = _measure(_step(fn), params, z, repeats, (dim if efficient else sum_m) * classes)
    kernels = head.per_size_kernels()
    if efficient:  # The official loop slices the one shared matrix per size.
      naive_params = {"w": kernels[-1], "b": head.bias[...]}
      naive = lambda p, x: naive_nested_logits(x, [p["w"]] * len(dims), [p["b"]] * len(dims), dims)
    else:
      naive_params = {"w": kernels, "b": list(head.bias[...])}
      naive = lambda p, x: naive_nested_logits(x, p["w"], p["b"], dims)
    loop = _measure(_step(naive), naive_params, z, repeats, sum_m * classes)
    results[kind] = {
        "nested_head": ours, "naive_loop": loop,
        "time_ratio_naive_over_nested_head": loop["median_ms"] / ours["median_ms"],
        "mac_ratio_naive_over_nested_head":
            loop["forward_macs_per_example"] / ours["forward_macs_per_example"]}

  plain_params = {"w": jnp.zeros((dim, classes)), "b": jnp.zeros((classes,))}
  plain = _measure(_step(lambda p, x: x @ p["w"] + p["b"]), plain_params, z, repeats,
                   dim * classes)
  results["plain_linear"] = plain
  for kind in ("mrl", "mrl_e"):
    ours = results[kind]["nested_head"]
    results[kind]["time_ratio_over_plain"] = ours["median_ms"] / plain["median_ms"]
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
        f"{results['device']} (median of {args.repeats}):")
  print(f"  {'head':16s} {'ms':>9s} {'MACs/example':>13s} {'XLA GFLOP':>10s}")
  rows = [("plain linear", results["plain_linear"])]
  rows += [(f"{kind} {variant}", results[kind][variant])
           for kind in ("mrl", "mrl_e") for variant in ("nested_head", "naive_loop")]
  for name, r in rows:
    print(f"  {name:16s} {r['median_ms']:9.2f} {r['forward_macs_per_example']:13,d} "
          f"{r['xla_flops'] / 1e9:10.3f}")
  for kind in ("mrl", "mrl_e"):
    r = results[kind]
    print(f"  {kind}: naive/nested_head time x{r['time_ratio_naive_over_nested_head']:.2f}, "
          f"MACs x{r['mac_ratio_naive_over_nested_head']:.2f}; nested_head/plain time "
          f"x{r['time_ratio_over_plain']:.2f}, MACs x{r['mac_ratio_over_plain']:.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
