"""The embeddings of one split of a trained workdir's data: the database of an `Index`.

`embed_workdir_split(W, "train")` restores W's latest checkpoint (`inference.load`)
and embeds the split of W's own `config.data` through the probe's embedding path
(`probe.embed_split` for a classification model, `dual_embedding.embed_images`
for a dual encoder's image tower), with evaluation preprocessing, in the split's
order (row i of the result is example i; examples the pipeline skips as bad,
`data.on_bad_example="skip"`, are left out).

Supported: classification workdirs (config.task="classification", images) and
dual encoders (config.task="contrastive": the image embeddings of the image-text
corpus). Masked-LM text workdirs are refused: their corpus has no fixed
documents to index; embed texts with `inference.load(W).embed_text(texts)` and
build from the array.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mrl_jax import inference
from mrl_jax.errors import UserError


class WorkdirEmbeddingError(UserError, ValueError):
  """A workdir whose kind of model has no embedding of a data split here."""


def _data_config(config: ml_collections.ConfigDict,
                 data_dir: str | None) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict(config.data.to_dict())
  if data_dir is not None:
    data.data_dir = data_dir
  return data


def embed_workdir_split(workdir: str, split: str, *, data_dir: str | None = None,
                        batch_size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
  """(embeddings float32 [N, d], labels int64 [N] or None) of `split` of W's config.data.

  `data_dir` replaces config.data.data_dir (where the TFDS data lives on this
  machine). Labels are None where the data has none, or several per example
  (a multi-label corpus).
  """
  config = inference.load_config(workdir)
  task = config.get("task", "classification")
  if task not in ("classification", "contrastive"):
    raise WorkdirEmbeddingError(
        f"{workdir} holds a config.task={task!r} model: only classification and dual-encoder "
        "(contrastive) workdirs embed a data split; embed your texts with "
        "inference.load(W).embed_text(texts), np.save them and build with --embeddings.")
  data = _data_config(config, data_dir)
  model = inference.load(workdir, batch_size=batch_size)
  if task == "classification":
    from mrl_jax.evaluation import probe
    z, _, labels = probe.embed_split(model, data, split, batch_size, with_logits=False)
    labels = np.asarray(labels)
    labels = labels.astype(np.int64) if labels.ndim == 1 else None
  else:
    from mrl_jax.data import image_text_pipeline
    from mrl_jax.evaluation import dual_embedding
    info = image_text_pipeline.image_text_dataset_info(data)
    got = dual_embedding.embed_images(
        model.embed_batch, image_text_pipeline.make_pair_eval_batches(
            data, global_batch_size=batch_size, split=split),
        model.mesh, in_channels=model.in_channels)
    z = got["z"]
    labels = got["label"].astype(np.int64) if info.num_classes and "label" in got else None
  return np.ascontiguousarray(z, np.float32), labels
