"""Per-example image preprocessing in numpy and PIL.

Images come in as uint8 [H, W, C] arrays (TFDS data sources decode them
already; [H, W] is taken as one channel) and keep their channel count. The
geometric functions return uint8 arrays; `normalize` gives float32 [H, W, C].
Randomness always comes from an explicit `np.random.Generator`, so that a
pipeline that seeds one per example is reproducible.

Resizing is PIL's bilinear filter (which widens its kernel when shrinking, i.e.
antialiased, as torchvision does on PIL images).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def as_hwc(image: np.ndarray) -> np.ndarray:
  """`image` as a uint8 [H, W, C] array ([H, W] becomes [H, W, 1])."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3:
    raise ValueError(f"Expected an image [H, W, C], got shape {image.shape}.")
  if image.dtype != np.uint8:
    raise ValueError(f"Expected a uint8 image, got {image.dtype}.")
  return image


def resize(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
  """Resizes to `size` (an int for square, or (height, width)), bilinear."""
  image = as_hwc(image)
  h, w = _size2(size)
  if (h, w) == image.shape[:2]:
    return image
  image = np.ascontiguousarray(image)
  if image.shape[2] in (1, 3):
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    out = np.asarray(pil.resize((w, h), Image.BILINEAR))
    return out.reshape(h, w, image.shape[2])
  channels = [np.asarray(Image.fromarray(image[:, :, c]).resize((w, h), Image.BILINEAR))
              for c in range(image.shape[2])]
  return np.stack(channels, axis=-1)


def crop(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
  return image[top:top + height, left:left + width]


def random_resized_crop_params(
    height: int, width: int, rng: np.random.Generator,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, crop_height, crop_width) with torchvision's RandomResizedCrop rule.

  Up to 10 tries draw an area fraction uniformly from `scale` and an aspect
  ratio (width / height) log-uniformly from `ratio`; the first box that fits
  is placed uniformly at random. If none fits, the largest centred box whose
  aspect ratio is clipped into `ratio` is used.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: centre crop at the nearest allowed aspect ratio.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator,
                        size: int | Sequence[int],
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Crops a random box (see `random_resized_crop_params`) and resizes it to `size`."""
  image = as_hwc(image)
  box = random_resized_crop_params(image.shape[0], image.shape[1], rng, scale, ratio)
  return resize(crop(image, *box), size)


def resize_shorter_side(image: np.ndarray, target: int) -> np.ndarray:
  """Resizes so that the shorter side is `target`, keeping the aspect ratio.

  The longer side becomes int(target * long / short), as in torchvision.
  """
  image = as_hwc(image)
  h, w = image.shape[:2]
  if h <= w:
    return resize(image, (target, int(target * w / h)))
  return resize(image, (int(target * h / w), target))


def center_crop(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
  """The centred `size` box (offsets rounded as torchvision's CenterCrop does)."""
  ch, cw = _size2(size)
  h, w = image.shape[:2]
  if ch > h or cw > w:
    raise ValueError(f"Cannot centre-crop {ch}x{cw} from a {h}x{w} image.")
  top = int(round((h - ch) / 2.0))
  left = int(round((w - cw) / 2.0))
  return crop(image, top, left, ch, cw)


def center_crop_resize(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """ImageNet-style evaluation view: shorter side to round(size / crop_fraction), then
  the centred size x size crop (crop_fraction 224/256 gives "resize 256, crop 224")."""
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
  resized = resize_shorter_side(image, int(round(size / crop_fraction)))
  return center_crop(resized, size)


def random_flip(image: np.ndarray, rng: np.random.Generator, prob: float = 0.5) -> np.ndarray:
  """Mirrors left-right with probability `prob`."""
  if rng.uniform() < prob:
    return image[:, ::-1]
  return image


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """float32 (image / 255 - mean) / std, per channel; `mean`/`std` have C or 1 entries."""
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  channels = image.shape[-1]
  for name, v in (("mean", mean), ("std", std)):
    if v.size not in (1, channels):
      raise ValueError(f"{name} has {v.size} entries for an image with {channels} channels.")
  out = image.astype(np.float32) * np.float32(1.0 / 255.0)
  return (out - mean) / std
