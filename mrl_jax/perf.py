"""Model FLOPs utilisation: FLOPs per train step and the peak of the chip it runs on.

MFU = (FLOPs of one step) / (step time) / (peak FLOP/s per chip x chips). The
step's FLOPs come from XLA's cost analysis of the *lowered* (not yet
compiled) program: on GPUs the compiled program hands its matrix multiplies to
cuBLAS custom calls that the compiled cost analysis does not count, while the
lowered program still holds them as dots. The count is for the whole global
step (all devices), forward, backward and update. Peaks are dense bfloat16
(the usual MFU convention, also for float32 runs), per chip as JAX lists devices.
"""

from __future__ import annotations

from typing import Any

import jax

# Dense bf16 peak TFLOP/s per JAX device, matched on the lower-cased device_kind.
# TPU v2/v3 show each core as a device, hence half a chip's peak.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918.0),   # v6e (Trillium)
    ("tpu v6e", 918.0),
    ("tpu v5 lite", 197.0),   # v5e
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),        # v5p reports "TPU v5"
    ("tpu v4", 275.0),
    ("tpu v3", 61.5),         # per core (123 per chip)
    ("tpu v2", 22.5),         # per core
    ("h200", 989.0),
    ("h100", 989.0),          # SXM; the PCIe card peaks at 756
    ("a100", 312.0),
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bf16 FLOP/s of one device of this kind, or None if unknown (e.g. CPU)."""
  kind = device_kind.lower()
  if "h100" in kind and "pcie" in kind:
    return 756e12
  for key, tflops in PEAK_TFLOPS:
    if key in kind:
      return tflops * 1e12
  return None


def step_flops(lowered: Any) -> float | None:
  """FLOPs XLA counts for one call of a jitted step, or None.

  For a lowered step: the whole global program. A compiled step works too (its
  per-device program, minus what backends hand to library calls).
  """
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  return flops if flops > 0 else None


def mfu(flops_per_step: float | None, seconds_per_step: float,
        devices: list[jax.Device] | None = None) -> float | None:
  """Model FLOPs utilisation of a step, or None where FLOPs or the peak are unknown."""
  devices = devices if devices is not None else jax.devices()
  peak = peak_flops_per_device(devices[0].device_kind)
  if not flops_per_step or not peak or seconds_per_step <= 0:
    return None
  return flops_per_step / seconds_per_step / (peak * len(devices))
