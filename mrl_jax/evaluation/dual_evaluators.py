"""Training evaluators of a dual encoder: zero-shot top-1 and image<->text recall@k per size.

Two config sections ask for them (config.task="contrastive"); each runs every
`every_steps` steps (0 = never before the end) and always after the last step:

  config.zero_shot = dict(
      every_steps=0,
      data=None,            # None: config.data's corpus (it must be labelled, e.g. the
                            # demo mrl_digit_captions); or any single-label image dataset
                            # of the image pipeline (data/pipeline.py, e.g. imagenet2012),
                            # read with config.data's image_size / mean / std unless it
                            # gives its own (its data_dir defaults to config.data's)
      split=None,           # None: that data's eval_split
      class_names=None,     # None: the dataset's own label names
      templates=("a photo of {}.",),   # every class name in every template ("{}")
      batch_size=256, max_examples=0)  # max_examples: images scored (0 = all)
  config.retrieval = dict(
      every_steps=0, split=None,       # None: config.data.eval_split
      ks=(1, 5, 10), batch_size=256, max_images=0)   # max_images: the first N (0 = all)

Zero-shot (`zero_shot.py`): the prompts are tokenized with the corpus's caption
tokenizer and embedded by the text tower; per size m the classifier is the
template-averaged unit prefixes, the images' unit prefixes are scored against it.
Retrieval (`cross_modal_retrieval.py`): the split's images
(`make_pair_eval_batches`) against ALL its captions (`make_caption_eval_batches`).
Metrics: `eval/zero_shot/top1_d<m>`, `eval/retrieval/image_to_text_recall@<k>_d<m>`,
`eval/retrieval/text_to_image_recall@<k>_d<m>` (and `.../seconds`). Every field
is checked, the datasets opened and the prompts tokenized when the evaluators
are built, before training starts.

The image tower's k-NN per size is the image evaluators' job (config.evaluators,
`periodic.py`); `--mode=probe` (`dual_probe.py`) measures all of it at once.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from mrl_jax.data import pipeline
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import cross_modal_retrieval, dual_embedding, zero_shot

ZERO_SHOT_DEFAULTS: dict[str, Any] = dict(
    every_steps=0, data=None, split=None, class_names=None, templates=("a photo of {}.",),
    batch_size=256, max_examples=0)
RETRIEVAL_DEFAULTS: dict[str, Any] = dict(
    every_steps=0, split=None, ks=(1, 5, 10), batch_size=256, max_images=0)
# The image pipeline's preprocessing fields a zero-shot dataset takes from config.data.
IMAGE_FIELDS = ("image_size", "mean", "std")


def _due(every_steps: int, step: int, total_steps: int) -> bool:
  return step == total_steps or (every_steps > 0 and step % every_steps == 0)


def _per_size(metrics: dict[str, float], key: str, dims: Sequence[int]) -> str:
  return " ".join(f"@{m}:{metrics[key.format(m=m)]:.3f}" for m in dims)


@dataclasses.dataclass
class ZeroShotEvaluator:
  """Zero-shot top-1 per size (see the module doc)."""
  every_steps: int
  batch_size: int
  max_examples: int
  data: ml_collections.ConfigDict  # config.data (pairs) or an image-pipeline data config
  split: str
  pairs: bool                      # True: images of the image-text corpus config.data
  prompts: dict[str, np.ndarray]   # token arrays [C * T, L], class-major
  class_names: tuple[str, ...]
  templates: tuple[str, ...]
  in_channels: int
  dataset: str
  name: str = "zero_shot"

  def due(self, step: int, total_steps: int) -> bool:
    return _due(self.every_steps, step, total_steps)

  def class_text_embeddings(self, embed: dual_embedding.Embed, mesh) -> np.ndarray:
    """The prompts' text embeddings [C, T, d]."""
    z = dual_embedding.embed_texts(embed, self.prompts, self.batch_size, mesh)
    return z.reshape(len(self.class_names), len(self.templates), -1)

  def image_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the labelled images ("image", "label", "mask", ...)."""
    if self.pairs:
      from mrl_jax.data import image_text_pipeline
      return image_text_pipeline.make_pair_eval_batches(self.data, global_batch_size=batch_size,
                                                        split=self.split)
    return pipeline.make_eval_batches(self.data, global_batch_size=batch_size, split=self.split)

  def embed_images(self, embed: dual_embedding.Embed, mesh) -> dict[str, np.ndarray]:
    return dual_embedding.embed_images(embed, self.image_batches(self.batch_size), mesh,
                                       in_channels=self.in_channels, limit=self.max_examples)

  def run(self, embed: dual_embedding.Embed, mesh, dims: tuple[int, ...]) -> dict[str, float]:
    start = time.time()
    class_z = self.class_text_embeddings(embed, mesh)
    images = self.embed_images(embed, mesh)
    top1 = zero_shot.zero_shot_top1(images["z"], images["label"], class_z, dims)
    out = {f"eval/{self.name}/top1_d{m}": float(v) for m, v in zip(dims, top1)}
    out[f"eval/{self.name}/seconds"] = round(time.time() - start, 2)
    return out

  def console_line(self, metrics: dict[str, float], dims: tuple[int, ...]) -> str:
    return "zero-shot top-1 " + _per_size(metrics, f"eval/{self.name}/top1_d{{m}}", dims)


@dataclasses.dataclass
class RetrievalEvaluator:
  """Image->text and text->image recall@k per size (see the module doc)."""
  every_steps: int
  batch_size: int
  max_images: int
  ks: tuple[int, ...]
  data: ml_collections.ConfigDict
  split: str
  in_channels: int
  name: str = "retrieval"

  def due(self, step: int, total_steps: int) -> bool:
    return _due(self.every_steps, step, total_steps)

  def embed_split(self, embed: dual_embedding.Embed, mesh) -> tuple[np.ndarray, np.ndarray,
                                                                     np.ndarray]:
    """(image_z [N, d], caption_z [T, d], text_image [T]: the row of each caption's image)."""
    from mrl_jax.data import image_text_pipeline
    images = dual_embedding.embed_images(
        embed, image_text_pipeline.make_pair_eval_batches(
            self.data, global_batch_size=self.batch_size, split=self.split),
        mesh, in_channels=self.in_channels, limit=self.max_images)
    captions = dual_embedding.embed_captions(
        embed, image_text_pipeline.make_caption_eval_batches(
            self.data, global_batch_size=self.batch_size, split=self.split), mesh)
    return images["z"], *captions_of(images["image_index"], captions)

  def run(self, embed: dual_embedding.Embed, mesh, dims: tuple[int, ...]) -> dict[str, float]:
    start = time.time()
    image_z, text_z, text_image = self.embed_split(embed, mesh)
    recalls = cross_modal_retrieval.recall_at_k(image_z, text_z, text_image, dims, self.ks)
    out = {}
    for direction, per_k in recalls.items():
      for k, values in per_k.items():
        out.update({f"eval/{self.name}/{direction}_recall@{k}_d{m}": float(v)
                    for m, v in zip(dims, values)})
    out[f"eval/{self.name}/seconds"] = round(time.time() - start, 2)
    return out

  def console_line(self, metrics: dict[str, float], dims: tuple[int, ...]) -> str:
    k = self.ks[0]
    return " | ".join(
        f"{arrow} R@{k} " + _per_size(metrics, f"eval/{self.name}/{d}_recall@{k}_d{{m}}", dims)
        for arrow, d in (("i->t", "image_to_text"), ("t->i", "text_to_image")))


def captions_of(image_index: np.ndarray,
                captions: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(caption_z [T', d], text_image [T']): the captions whose image was embedded (all of
  them unless a cap left images out), each pointing at its image's row."""
  row_of = {int(i): row for row, i in enumerate(np.asarray(image_index))}
  keep = np.asarray([int(i) in row_of for i in captions["image_index"]], bool)
  rows = np.asarray([row_of[int(i)] for i in captions["image_index"][keep]], np.int32)
  return captions["z"][keep], rows


# ---------------------------------------------------------------- config checks
def _settings(config: ml_collections.ConfigDict, section: str,
              defaults: dict[str, Any]) -> dict[str, Any] | None:
  cfg = config.get(section)
  if cfg is None:
    return None
  given = dict(cfg.items())
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ConfigError(f"config.{section}: unknown field(s) {unknown}; known: "
                      f"{sorted(defaults)}.")
  s = {**defaults, **{k: v for k, v in given.items() if v is not None}}  # None: the default
  for key in ("every_steps", "max_examples", "max_images"):
    if key in s and (not _is_int(s[key]) or s[key] < 0):
      raise ConfigError(f"config.{section}.{key}={s[key]!r}: must be an integer >= 0.")
  batch, processes = s["batch_size"], pipeline.process_layout()[1]
  if not _is_int(batch) or batch < 1 or batch % processes:
    raise ConfigError(f"config.{section}.batch_size={batch!r}: must be a positive multiple of "
                      f"the process count ({processes}).")
  if s["split"] is not None and (not isinstance(s["split"], str) or not s["split"]):
    raise ConfigError(f"config.{section}.split={s['split']!r}: must be a split name or unset.")
  return s


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _string_tuple(section: str, key: str, value: Any) -> tuple[str, ...]:
  if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value
      or not all(isinstance(v, str) and v for v in value)):
    raise ConfigError(f"config.{section}.{key}={value!r}: must be a non-empty tuple of "
                      "non-empty strings.")
  return tuple(value)


def image_data_config(config: ml_collections.ConfigDict, data: Any,
                      field: str = "config.zero_shot.data") -> ml_collections.ConfigDict:
  """The image-pipeline data config `data` (e.g. config.zero_shot.data): its own fields,
  then config.data's data_dir and image preprocessing (IMAGE_FIELDS) where it gives none."""
  if isinstance(data, ml_collections.ConfigDict):
    data = data.to_dict()
  if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
    raise ConfigError(f"{field}={data!r}: must be an image data config with a dataset name "
                      "(e.g. dict(name='imagenet2012', ...)), or None for config.data's corpus.")
  out = {k: v for k, v in data.items() if v is not None}
  for key in ("data_dir", *IMAGE_FIELDS):
    value = config.data.get(key)
    if out.get(key) is None and value is not None:
      if key in ("mean", "std") and len(set(value)) == 1:
        # One value for every channel fits a dataset of any channel count (a grayscale
        # one read for an RGB model); per-channel values must be given for it.
        value = tuple(value[:1])
      out[key] = value
  return ml_collections.ConfigDict(out)


def _open_corpus_split(config: ml_collections.ConfigDict, split: str, field: str) -> None:
  """Opens `split` of config.data's corpus now, not after training (one line if it is not there)."""
  from mrl_jax.data import sources
  try:
    sources.open_source(config.data.name, split, config.data.get("data_dir"),
                        mock_examples=int(config.data.get("mock_examples") or 0))
  except ValueError as e:
    if not str(e).startswith("Unknown split"):  # TFDS's message for a split it does not have
      raise
    raise ConfigError(f"{field}={split!r}: {e}") from e


def _label_names(data: ml_collections.ConfigDict, split: str) -> tuple[str, ...]:
  from mrl_jax.data import sources
  _, info = sources.open_source(data.name, split, data.get("data_dir"),
                                mock_examples=int(data.get("mock_examples", 0) or 0))
  label, _ = sources.label_feature(info, data.get("label_key", "label"))
  return tuple(str(n) for n in label.names)


def build_zero_shot(config: ml_collections.ConfigDict, info: Any) -> ZeroShotEvaluator | None:
  """The checked config.zero_shot evaluator (None when the section is absent)."""
  from mrl_jax.data import image_text_pipeline
  s = _settings(config, "zero_shot", ZERO_SHOT_DEFAULTS)
  if s is None:
    return None
  templates = _string_tuple("zero_shot", "templates", s["templates"])
  if any("{}" not in t for t in templates):
    raise ConfigError(f"config.zero_shot.templates={templates!r}: every template needs a '{{}}' "
                      "where the class name goes.")
  in_channels = int(info.in_channels)
  if s["data"] is None:
    if not info.num_classes:
      raise ConfigError(f"config.zero_shot.data is None but {config.data.name!r} is unlabelled: "
                        "name a labelled image dataset there (e.g. imagenet2012), or set "
                        "config.zero_shot=None.")
    data, split = config.data, s["split"] or config.data.get("eval_split", "test")
    num_classes, names = int(info.num_classes), tuple(info.class_names)
    dataset = config.data.name
    _open_corpus_split(config, split, "config.zero_shot.split")
  else:
    data = image_data_config(config, s["data"])
    split = s["split"] or data.get("eval_split", pipeline.DEFAULTS["eval_split"])
    try:
      data_info = pipeline.dataset_info(ml_collections.ConfigDict(
          {**data.to_dict(), "eval_split": split}))
    except ValueError as e:
      if not str(e).startswith("Unknown split"):
        raise
      raise ConfigError(f"config.zero_shot.split={split!r}: {e}") from e
    if data_info.multilabel:
      raise ConfigError(f"config.zero_shot.data: {data.name!r} is multi-label; zero-shot top-1 "
                        "needs single-label data (e.g. imagenet2012).")
    height, _, channels = data_info.eval_image_shape
    if height != int(info.image_size):
      raise ConfigError(f"config.zero_shot.data gives {height}x{height} evaluation images but the "
                        f"image tower takes {info.image_size}x{info.image_size}: set "
                        f"config.zero_shot.data.image_size={info.image_size}.")
    if channels not in (1, in_channels):
      raise ConfigError(f"config.zero_shot.data: {data.name!r} images have {channels} channels "
                        f"but the image tower takes {in_channels}.")
    num_classes, names, dataset = data_info.num_classes, None, data.name
  if s["class_names"] is not None:
    names = _string_tuple("zero_shot", "class_names", s["class_names"])
  elif not names:
    names = _label_names(data, split)
  if len(names) != num_classes:
    raise ConfigError(f"config.zero_shot.class_names has {len(names)} names but {dataset!r} has "
                      f"{num_classes} classes: give one name per class, in label order.")
  tokenizer = image_text_pipeline.load_caption_tokenizer(config.data)
  prompts = image_text_pipeline.tokenize_texts(
      tokenizer, zero_shot.prompt_texts(names, templates), int(info.seq_len))
  return ZeroShotEvaluator(every_steps=int(s["every_steps"]), batch_size=int(s["batch_size"]),
                           max_examples=int(s["max_examples"]), data=data, split=split,
                           pairs=s["data"] is None,
                           prompts=prompts, class_names=tuple(names), templates=templates,
                           in_channels=in_channels, dataset=dataset)


def build_retrieval(config: ml_collections.ConfigDict, info: Any) -> RetrievalEvaluator | None:
  """The checked config.retrieval evaluator (None when the section is absent)."""
  s = _settings(config, "retrieval", RETRIEVAL_DEFAULTS)
  if s is None:
    return None
  ks = s["ks"]
  if (isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or not ks
      or not all(_is_int(k) and k >= 1 for k in ks)):
    raise ConfigError(f"config.retrieval.ks={ks!r}: must be a non-empty tuple of integers >= 1.")
  split = s["split"] or config.data.get("eval_split", "test")
  _open_corpus_split(config, split, "config.retrieval.split")
  return RetrievalEvaluator(every_steps=int(s["every_steps"]), batch_size=int(s["batch_size"]),
                            max_images=int(s["max_images"]), ks=tuple(int(k) for k in ks),
                            data=config.data, split=split, in_channels=int(info.in_channels))


def build_dual_evaluators(config: ml_collections.ConfigDict, info: Any) -> list[Any]:
  """The evaluators config.zero_shot and config.retrieval ask for (checked, data opened)."""
  return [ev for ev in (build_zero_shot(config, info), build_retrieval(config, info))
          if ev is not None]
