"""Tolerances for float32 results, from float32's rounding error (not one machine's output).

Two correct float32 implementations of a network (XLA and PyTorch, or XLA on two
CPUs with different vector widths) sum in different orders. With rounding errors
of random sign, a dot product of n terms then differs by about u * sqrt(n) of its
scale (u = 2**-24, float32's unit roundoff), and the differences of `depth`
layers in sequence add up like a random walk: u * sqrt(n * depth) * scale. The
bound is SAFETY times that unit. The largest errors measured in these tests
(against float64 references) were 0.01 to 1 unit, so the bound leaves a wide
margin for other CPUs and reduction orders, while real mistakes (a wrong
padding, a missing BatchNorm term, bfloat16 compute at ~2**-8 per op) are
orders of magnitude above it.
"""

import math

U32 = 2.0 ** -24
SAFETY = 16.0


def float32_atol(scale: float, fan_in: int, depth: int = 1) -> float:
  """Absolute tolerance for a float32 result of magnitude `scale` (e.g. max |reference|).

  fan_in: the longest sum (contraction) in one layer; depth: layers in sequence.
  """
  return SAFETY * U32 * math.sqrt(fan_in * depth) * float(scale)
