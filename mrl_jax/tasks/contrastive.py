"""The contrastive task: image-text pairs -> two towers -> the nested contrastive loss.

`config.task = "contrastive"` (see `configs/align.py`). An ALIGN / CLIP / SigLIP
style dual encoder (`models/dual_encoder.py`: an image tower, a BERT text
tower, optional projections to `config.model.embed_dim`) embeds each pair of a
batch; for every prefix size m of the nesting list both prefixes
image_emb[:, :m] and text_emb[:, :m] are L2-normalised on their own and scored
against the whole batch with CLIP's symmetric InfoNCE (`config.contrastive.kind
= "softmax"`) or SigLIP's pairwise sigmoid loss ("sigmoid"), at the learned
temperature exp(t) (and, for sigmoid, the learned bias);
total = sum_m c_m * loss_m (`losses.nested_contrastive_loss`). `head="ff"` is
the plain dual encoder baseline: one size (config.ff_dim, default the whole
embedding), weight 1.

Data (`mrl_jax/data/image_text_pipeline.py`): training batches of
{"image" [B, H, W, C], "input_ids", "attention_mask", "token_type_ids" [B, L]},
one caption per image, drawn anew each epoch. The vocabulary is the caption
tokenizer's; `config.data.vocab_size` (optional) must agree with it and is what
`--mode=compile_check` shapes the text tower with when the corpus is absent. A
training run copies the tokenizer to WORKDIR/tokenizer.json, so the workdir
alone restores a model that reads text (`inference.load(W).embed_text([...])`).

Evaluation: the eval split's pairs in batches of config.eval_batch_size give
the per-size contrastive loss and the in-batch pair top-1 (the fraction of
images whose own caption scores highest among the batch's). Both depend on
the number of negatives, so only FULL batches count: a partial last batch
(fewer negatives, padding rows) is left out, and config.eval_batch_size must
not exceed the eval split. Zero-shot classification and image<->text
retrieval run as evaluators (`evaluation/dual_evaluators.py`, config.zero_shot
and config.retrieval), the image tower's 1-NN as config.evaluators.

LiT (locked-image tuning): when config.freeze freezes every parameter of the
image tower, the tower also runs in inference mode during training (BatchNorm
statistics kept, no dropout): a locked tower is a fixed feature extractor.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.nesting import Nesting
from mrl_jax.tasks.base import Task
from mrl_jax.workdir_path import make_dirs, workdir_path, write_through_local_file

KINDS = ("softmax", "sigmoid")
HEADS = ("mrl", "ff")
TOKENIZER_FILE = "tokenizer.json"
# What the metric names of the final evaluators become in summary.json.
_ZERO_SHOT_METRIC = re.compile(r"^eval/zero_shot/top1_d(\d+)$")
_RETRIEVAL_METRIC = re.compile(
    r"^eval/retrieval/((?:image_to_text|text_to_image)_recall@\d+)_d(\d+)$")


def _text_max_len(config: ml_collections.ConfigDict) -> int:
  """The text tower's position embeddings (its BERT variant's, or config.model.text.max_len)."""
  from mrl_jax.models import bert
  text = config.model.get("text") or ml_collections.ConfigDict()
  return int(bert.architecture(text.get("variant", "base"),
                               **bert.model_overrides(text))["max_len"])


def _positive_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and bool(np.isfinite(value)) and value > 0)


class ContrastiveTask(Task):
  """A nested (Matryoshka) image-text dual encoder, trained contrastively."""

  name = "contrastive"
  console_metric = "pair_top1"

  # ------------------------------------------------------------ config and data
  def check_config(self, config: ml_collections.ConfigDict) -> None:
    if config.model.get("name") != "dual_encoder":
      raise ConfigError(f"config.model.name={config.model.get('name')!r}: config.task="
                        "'contrastive' trains an image-text dual encoder: set "
                        "config.model.name='dual_encoder' (see configs/align.py).")
    if config.get("head", "mrl") not in HEADS:
      raise ConfigError(f"config.head={config.get('head')!r}: a dual encoder takes 'mrl' (every "
                        "prefix trained) or 'ff' (the plain baseline, one size).")
    cfg = config.get("contrastive") or ml_collections.ConfigDict()
    kind = cfg.get("kind", "softmax")
    if kind not in KINDS:
      raise ConfigError(f"config.contrastive.kind={kind!r} is unknown: use 'softmax' (CLIP / "
                        "ALIGN InfoNCE) or 'sigmoid' (SigLIP).")
    for field in ("init_scale", "max_scale"):
      value = cfg.get(field)
      if value is not None and not _positive_number(value):
        raise ConfigError(f"config.contrastive.{field}={value!r}: the logit scale multiplies "
                          "cosine similarities: use a number > 0 (None: the default).")
    from mrl_jax.models import dual_encoder
    dual_encoder.contrastive_settings(config)  # init_scale within max_scale, the defaults.
    seq_len = config.data.get("seq_len")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 3:
      raise ConfigError(f"config.data.seq_len={seq_len!r}: use an integer >= 3 "
                        "([CLS], at least one token, [SEP]).")
    max_len = _text_max_len(config)
    if seq_len > max_len:
      raise ConfigError(f"config.data.seq_len={seq_len} exceeds the text tower's {max_len} "
                        f"position embeddings: lower it or set --config.model.text.max_len="
                        f"{seq_len}.")
    batch, accum = config.batch_size, int(config.get("grad_accum_steps", 1))
    if not isinstance(batch, int) or batch // max(accum, 1) < 2:
      raise ConfigError(f"config.batch_size={batch!r} (per accumulation step): a contrastive "
                        "batch needs at least 2 pairs (the others are the negatives): raise it.")
    if config.eval_batch_size < 2:
      raise ConfigError(f"config.eval_batch_size={config.eval_batch_size}: the in-batch eval "
                        "needs at least 2 pairs per batch: raise it.")
    vocab = config.data.get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 5):
      raise ConfigError(f"config.data.vocab_size={vocab!r}: use the tokenizer's vocabulary size "
                        "(an integer), or leave it unset to take it from the tokenizer.")

  def data_info(self, config: ml_collections.ConfigDict) -> Any:
    from mrl_jax.data import image_text_pipeline
    info = image_text_pipeline.image_text_dataset_info(config.data)
    vocab = config.data.get("vocab_size")
    if vocab is not None and vocab != info.vocab_size:
      raise ConfigError(
          f"config.data.vocab_size={vocab} but the caption tokenizer ({info.tokenizer_path}) has "
          f"{info.vocab_size} tokens: set --config.data.vocab_size={info.vocab_size} "
          "(or leave it unset).")
    if info.num_eval_images and config.eval_batch_size > info.num_eval_images:
      raise ConfigError(
          f"config.eval_batch_size={config.eval_batch_size} exceeds the {info.num_eval_images} "
          f"pairs of {config.data.name!r}'s eval split, so no full eval batch is left to score: "
          f"lower it (at most {info.num_eval_images}).")
    return info

  def data_info_from_config(self, config: ml_collections.ConfigDict) -> Any:
    from mrl_jax.data import image_text_pipeline
    from mrl_jax.data.sources import DatasetNotPreparedError
    try:
      return self.data_info(config)
    except DatasetNotPreparedError:
      pass
    vocab, size = config.data.get("vocab_size"), config.data.get("image_size")
    missing = [f"config.data.{n}" for n, v in (("vocab_size", vocab), ("image_size", size))
               if not v]
    if missing:
      raise ConfigError(
          f"Image-text corpus {config.data.name!r} is not prepared here, so compile_check needs "
          f"{' and '.join(missing)} to shape the towers: set them.")
    return image_text_pipeline.ImageTextDataInfo(
        num_train_examples=int(config.batch_size), image_size=int(size), in_channels=3,
        seq_len=int(config.data.seq_len), vocab_size=int(vocab), tokenizer_path="", pad_id=0,
        num_classes=0, class_names=(), num_eval_images=0, num_eval_captions=0)

  def data_info_from_meta(self, config: ml_collections.ConfigDict, meta: dict[str, Any]) -> Any:
    from mrl_jax.data import image_text_pipeline
    return image_text_pipeline.ImageTextDataInfo(
        num_train_examples=1, image_size=int(meta["image_size"]),
        in_channels=int(meta["in_channels"]), seq_len=int(config.data.seq_len),
        vocab_size=int(meta["vocab_size"]), tokenizer_path="", pad_id=0, num_classes=0,
        class_names=(), num_eval_images=0, num_eval_captions=0)

  def train_iterator(self, config: ml_collections.ConfigDict) -> Any:
    from mrl_jax.data import image_text_pipeline
    return image_text_pipeline.make_pair_train_iterator(
        config.data, global_batch_size=config.batch_size, seed=config.seed)

  def eval_batches(self, config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
    from mrl_jax.data import image_text_pipeline
    return image_text_pipeline.make_pair_eval_batches(
        config.data, global_batch_size=config.eval_batch_size)

  def on_workdir(self, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Copies the caption tokenizer to WORKDIR/tokenizer.json (process 0)."""
    if jax.process_index() != 0:
      return
    from mrl_jax.data import image_text_pipeline
    tokenizer = image_text_pipeline.load_caption_tokenizer(config.data)
    # A reader never sees half a file; a bucket workdir gets one object write.
    write_through_local_file(make_dirs(workdir_path(workdir)) / TOKENIZER_FILE, tokenizer.save)

  # ------------------------------------------------------------ model and checkpoint
  def embedding_dim(self, config: ml_collections.ConfigDict) -> int:
    from mrl_jax.models import dual_encoder
    return int(dual_encoder.dual_embedding_dim(config))

  def model_description(self, config: ml_collections.ConfigDict, nesting: Nesting) -> str:
    image, text = config.model.image, config.model.text
    if image.get("variant"):
      image_name = f"{image.name} {image.variant}"
    elif image.name == "resnet":
      image_name = f"resnet-{image.get('depth')}"
    else:  # A ViT given by its fields.
      image_name = f"vit {image.get('width')} wide, {image.get('depth')} layers"
    kind = (config.get("contrastive") or {}).get("kind", "softmax")
    return (f"dual encoder (image: {image_name}, text: bert {text.get('variant') or ''}, "
            f"{self.embedding_dim(config)}-d embeddings; {kind} loss, {config.head} head, "
            f"dims {list(nesting.dims)})")

  def build_model(self, config: ml_collections.ConfigDict, nesting: Nesting, info: Any,
                  rngs: nnx.Rngs) -> nnx.Module:
    from mrl_jax.models import dual_encoder
    return dual_encoder.build_dual_encoder(
        config, nesting, in_channels=int(info.in_channels), image_size=int(info.image_size),
        vocab_size=int(info.vocab_size), rngs=rngs)

  def checkpoint_meta(self, config: ml_collections.ConfigDict, nesting: Nesting,
                      info: Any) -> dict[str, Any]:
    cfg = config.get("contrastive") or {}
    return {"task": "contrastive", "model": config.model.to_dict(), "head": config.head,
            "dims": list(nesting.dims), "vocab_size": int(info.vocab_size),
            "image_size": int(info.image_size), "in_channels": int(info.in_channels),
            "contrastive_kind": cfg.get("kind", "softmax"),
            "per_size_scale": bool(cfg.get("per_size_scale", False))}

  def sharding_rules(self, config: ml_collections.ConfigDict) -> tuple:
    from mrl_jax.models import dual_encoder
    return tuple(dual_encoder.sharding_rules(config))

  def restored_model(self, experiment: Any, state: dict[str, Any], step: int) -> Any:
    from mrl_jax import dual_model
    return dual_model.RestoredDualEncoder(experiment, state, step)

  def evaluators(self, config: ml_collections.ConfigDict, info: Any) -> list[Any]:
    from mrl_jax.evaluation import dual_evaluators, periodic
    return [*dual_evaluators.build_dual_evaluators(config, info),
            *periodic.build_evaluators(config, in_channels=int(info.in_channels))]

  # ------------------------------------------------------------ steps (traced)
  def abstract_batch(self, config: ml_collections.ConfigDict, info: Any,
                     batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    size, seq = int(info.image_size), (batch_size, int(info.seq_len))
    return {"image": jax.ShapeDtypeStruct((batch_size, size, size, int(info.in_channels)),
                                          jnp.float32),
            "input_ids": jax.ShapeDtypeStruct(seq, jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct(seq, jnp.int32),
            "token_type_ids": jax.ShapeDtypeStruct(seq, jnp.int32)}

  def _embed_pairs(self, config: ml_collections.ConfigDict, model: nnx.Module,
                   batch: dict[str, jax.Array], train: bool) -> tuple[jax.Array, jax.Array]:
    # A tower config.freeze locks entirely runs in inference mode even here (LiT: its
    # BatchNorm statistics stay those it was trained with, no dropout): the model's
    # `locked` towers ignore train=True (models/dual_encoder.py).
    z_img = model.embed_image(batch["image"], train=train)
    z_txt = model.embed_text(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             token_type_ids=batch.get("token_type_ids"), train=train)
    return z_img, z_txt

  def _nested_loss(self, config: ml_collections.ConfigDict, model: nnx.Module,
                   z_img: jax.Array, z_txt: jax.Array, nesting: Nesting):
    from mrl_jax import losses
    scale, bias = model.scale_and_bias()
    kind = (config.get("contrastive") or {}).get("kind", "softmax")
    total, per_size = losses.nested_contrastive_loss(
        z_img, z_txt, nesting.dims, nesting.weights, scale=scale, bias=bias, kind=kind)
    top1 = losses.nested_pair_top1(z_img, z_txt, nesting.dims)
    return total, per_size, top1, scale, bias

  def loss(self, config: ml_collections.ConfigDict, model: nnx.Module,
           batch: dict[str, jax.Array], nesting: Nesting, *,
           train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    z_img, z_txt = self._embed_pairs(config, model, batch, train)
    total, per_size, top1, scale, bias = self._nested_loss(config, model, z_img, z_txt, nesting)
    metrics = {"per_size_loss": per_size, "per_size_pair_top1": top1}
    # The temperature (and SigLIP's bias) in the log: "scale", or per size when learned so.
    for name, value in (("scale", scale), ("bias", bias)):
      if value is None:
        continue
      value = jax.lax.stop_gradient(jnp.asarray(value, jnp.float32))
      metrics[name if value.ndim == 0 else f"per_size_{name}"] = value
    return total, metrics

  def eval_sums(self, config: ml_collections.ConfigDict, model: nnx.Module,
                batch: dict[str, jax.Array], nesting: Nesting) -> dict[str, jax.Array]:
    # In-batch numbers depend on the batch's negatives: only a full batch counts
    # (see the module docstring); a partial one adds zeros.
    mask = batch["mask"].astype(jnp.float32)
    full = jnp.all(mask > 0).astype(jnp.float32)
    z_img, z_txt = self._embed_pairs(config, model, batch, False)
    _, per_size, top1, _, _ = self._nested_loss(config, model, z_img, z_txt, nesting)
    rows = full * mask.sum()
    # where, not a product: a padding row's NaN must not reach the sums.
    return {"loss_sum": jnp.where(full > 0, per_size, 0.0),
            "correct": jnp.where(full > 0, rows * top1, 0.0), "count": rows,
            "batches": full, "pairs_seen": mask.sum()}

  def reduce_eval(self, totals: dict[str, np.ndarray]) -> dict[str, Any]:
    if totals is None:  # An empty eval split.
      totals = {"loss_sum": np.nan, "correct": np.nan, "count": 0.0, "batches": 0.0,
                "pairs_seen": 0.0}
    batches, count = float(totals["batches"]), float(totals["count"])
    nan = np.full_like(np.asarray(totals["loss_sum"], np.float64), np.nan)
    return {"loss": np.asarray(totals["loss_sum"]) / batches if batches else nan,
            "pair_top1": np.asarray(totals["correct"]) / count if count else nan,
            "count": int(round(count)), "batches": int(round(batches)),
            "pairs_seen": int(round(float(totals["pairs_seen"])))}

  def embed(self, config: ml_collections.ConfigDict, model: nnx.Module,
            batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    out = {}
    if "image" in batch:
      out["z"] = model.embed_image(batch["image"], train=False).astype(jnp.float32)
    if "input_ids" in batch:
      z_txt = model.embed_text(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                               token_type_ids=batch.get("token_type_ids"),
                               train=False).astype(jnp.float32)
      out["text_z" if "z" in out else "z"] = z_txt
    if not out:
      raise ValueError("A dual encoder embeds batches with 'image' or 'input_ids'; this one "
                       f"has {sorted(batch)}.")
    for key in ("mask", "label", "image_index"):
      if key in batch:
        out[key] = batch[key]
    return out

  # ------------------------------------------------------------ reporting
  def summary(self, config: ml_collections.ConfigDict, dims: tuple[int, ...],
              result: dict[str, Any]) -> dict[str, Any]:
    return {"dims": list(dims),
            "eval_pair_top1": {str(m): float(v) for m, v in zip(dims, result["pair_top1"])},
            "eval_loss": {str(m): float(v) for m, v in zip(dims, result["loss"])},
            "eval_pairs": int(result["count"]), "eval_batch_size": int(config.eval_batch_size)}

  def val_metrics(self, dims: tuple[int, ...], result: dict[str, Any]) -> dict[str, float]:
    out = {f"val/pair_top1_d{m}": float(v) for m, v in zip(dims, result["pair_top1"])}
    out.update({f"val/loss_d{m}": float(v) for m, v in zip(dims, result["loss"])})
    return out

  def evaluator_summary(self, config: ml_collections.ConfigDict, dims: tuple[int, ...],
                        metrics: dict[str, float]) -> dict[str, Any]:
    out: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
      zero_shot, retrieval = _ZERO_SHOT_METRIC.match(name), _RETRIEVAL_METRIC.match(name)
      if zero_shot:
        out.setdefault("zero_shot_top1", {})[zero_shot.group(1)] = float(value)
      elif retrieval:
        out.setdefault(retrieval.group(1), {})[retrieval.group(2)] = float(value)
    # In nesting order, whatever order the evaluators wrote them in.
    order = {str(m): i for i, m in enumerate(dims)}
    return {key: dict(sorted(v.items(), key=lambda kv: order.get(kv[0], len(order))))
            for key, v in out.items()}

  def format_table(self, config: ml_collections.ConfigDict, dims: tuple[int, ...],
                   result: dict[str, Any]) -> str:
    if not result["batches"]:
      return (f"No full eval batch of {config.eval_batch_size} pairs in {config.data.name!r}'s "
              "eval split: lower config.eval_batch_size to score it.")
    lines = [f"Validation in-batch pair top-1 per nesting size ({config.data.name}, "
             f"{result['count']} pairs in batches of {config.eval_batch_size}):",
             "   dims | pair top-1 (%) | loss", "  ------+----------------+-------"]
    lines += [f"  {m:5d} | {100 * a:14.2f} | {v:6.3f}"
              for m, a, v in zip(dims, result["pair_top1"], result["loss"])]
    return "\n".join(lines)

  def report_fields(self, config: ml_collections.ConfigDict, info: Any) -> dict[str, Any]:
    return {"vocab_size": int(info.vocab_size), "image_size": int(info.image_size),
            "in_channels": int(info.in_channels), "seq_len": int(info.seq_len),
            "contrastive_kind": (config.get("contrastive") or {}).get("kind", "softmax")}
