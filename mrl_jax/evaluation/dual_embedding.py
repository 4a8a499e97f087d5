"""Embedding a dual encoder's evaluation data through one `embed(global_batch)` callable.

The training evaluators (`dual_evaluators.py`) and `--mode=probe`
(`dual_probe.py`) measure the same things and embed the same data, so both go
through these functions: `embed` maps a global batch (rows on the mesh's batch
axes, `sharding.global_batch`) to the contrastive task's replicated host dict
(`ContrastiveTask.embed`: a batch with "image" gives the image embedding as
"z", a batch of token arrays without "image" the text embedding as "z"; "mask",
"label" and "image_index" come back as given). Only real rows (mask > 0) are
kept. Every process calls these functions with its own rows and gets every
row back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from mrl_jax import sharding
from mrl_jax.data import pipeline

Embed = Callable[[dict[str, Any]], dict[str, np.ndarray]]
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def embed_images(embed: Embed, batches: Iterable[dict[str, np.ndarray]], mesh, *,
                 in_channels: int, limit: int = 0) -> dict[str, np.ndarray]:
  """{"z" [N, d], and "label" / "image_index" [N] where the batches carry them} of the
  first `limit` (0 = all) real images. Only the image is embedded (a pair batch's
  caption is left out); grayscale images fed to an RGB model are repeated over
  the channels."""
  keep_keys = ("image", "mask", "label", "image_index")
  parts: dict[str, list[np.ndarray]] = {}
  seen = 0
  for batch in batches:
    batch = {k: v for k, v in batch.items() if k in keep_keys}
    if batch["image"].shape[-1] == 1 and in_channels == 3:
      batch["image"] = np.repeat(batch["image"], 3, axis=-1)
    out = embed(sharding.global_batch(batch, mesh))
    real = np.asarray(out["mask"]) > 0
    for key in ("z", "label", "image_index"):
      if key in out:
        parts.setdefault(key, []).append(np.asarray(out[key])[real])
    seen += int(real.sum())
    if limit and seen >= limit:
      break
  if not parts:
    raise ValueError("The image batches held no real example.")
  result = {k: np.concatenate(v) for k, v in parts.items()}
  return {k: v[:limit] for k, v in result.items()} if limit else result


def embed_captions(embed: Embed, batches: Iterable[dict[str, np.ndarray]],
                   mesh) -> dict[str, np.ndarray]:
  """{"z" [T, d], "image_index" [T]} of every real caption of caption batches
  (`image_text_pipeline.make_caption_eval_batches`)."""
  zs, owners = [], []
  for batch in batches:
    batch = {k: batch[k] for k in (*TOKEN_KEYS, "image_index", "mask")}
    out = embed(sharding.global_batch(batch, mesh))
    real = np.asarray(out["mask"]) > 0
    zs.append(np.asarray(out["z"])[real])
    owners.append(np.asarray(out["image_index"])[real])
  if not zs:
    raise ValueError("The caption batches held no caption.")
  return {"z": np.concatenate(zs), "image_index": np.concatenate(owners).astype(np.int32)}


def token_batches(arrays: dict[str, np.ndarray],
                  global_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of fixed-size global batches over token arrays every process
  holds in full (e.g. zero-shot prompts), the last padded; with "mask"."""
  process_index, process_count = pipeline.process_layout()
  local = global_batch_size // process_count
  n = len(arrays["input_ids"])
  for start in range(0, max(n, 1), global_batch_size):
    rows = {k: np.asarray(arrays[k][start:start + global_batch_size], np.int32)
            for k in TOKEN_KEYS}
    real = len(rows["input_ids"])
    mask = np.zeros(global_batch_size, np.int32)
    mask[:real] = 1
    if real < global_batch_size:  # One compiled shape: pad the last batch.
      rows = {k: np.concatenate([v, np.zeros((global_batch_size - real, *v.shape[1:]), v.dtype)])
              for k, v in rows.items()}
    rows["mask"] = mask
    yield {k: v[process_index * local:(process_index + 1) * local] for k, v in rows.items()}


def embed_texts(embed: Embed, arrays: dict[str, np.ndarray], global_batch_size: int,
                mesh) -> np.ndarray:
  """Text embeddings [N, d] of token arrays ({"input_ids", "attention_mask",
  "token_type_ids"} int32 [N, L]) held in full by every process."""
  zs = []
  for batch in token_batches(arrays, global_batch_size):
    out = embed(sharding.global_batch(batch, mesh))
    zs.append(np.asarray(out["z"])[np.asarray(out["mask"]) > 0])
  return np.concatenate(zs)
