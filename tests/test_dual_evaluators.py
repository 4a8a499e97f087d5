"""The dual-encoder training evaluators (config.zero_shot, config.retrieval): config checks,
and their data path (batches, padding, masks, prompt order, caption ownership, caps)
against a reference that reads the demo corpus in one batch and scores it directly.

The `embed` given to the evaluators is an exact stand-in for the task's: an image's
"embedding" is 16 of its pixels and a text's its 16 token ids, so the evaluator's
batched path and the reference give bitwise the same vectors (exact ties included)
and the metrics must agree exactly.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np
import pytest

from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import cross_modal_retrieval, dual_evaluators, zero_shot
from test_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIGN = os.path.join(ROOT, "configs", "align.py")
DIMS = (4, 16)


def _image_vectors(images: np.ndarray) -> np.ndarray:
  return np.asarray(images)[:, ::8, ::8, 0].reshape(len(images), -1)[:, :16].astype(np.float32)


def _text_vectors(input_ids: np.ndarray) -> np.ndarray:
  return np.asarray(input_ids)[:, :16].astype(np.float32)


def fake_embed(batch):
  """The contrastive task's `embed` contract with exact stand-in towers."""
  out = {k: np.asarray(batch[k]) for k in ("mask", "label", "image_index") if k in batch}
  if "image" in batch:
    out["z"] = _image_vectors(batch["image"])
  else:
    out["z"] = _text_vectors(batch["input_ids"])
  return out


@pytest.fixture(scope="module")
def setup(image_text_demo_data_dir):
  from mrl_jax import sharding
  from mrl_jax.data import image_text_pipeline
  config = load_config(ALIGN, "runlocal")
  config.data.data_dir = image_text_demo_data_dir
  info = image_text_pipeline.image_text_dataset_info(config.data)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  return config, info, mesh


def _with(config, section, **fields):
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in fields.items():
    config[section][key] = value
  return config


def _reference_split(config, split):
  """(images' vectors [N, 16], labels [N], caption vectors [T, 16], caption owners [T])."""
  from mrl_jax.data import image_text_pipeline
  data = config.data
  n = image_text_pipeline.image_text_dataset_info(
      ml_collections.ConfigDict({**data.to_dict(), "eval_split": split})).num_eval_images
  (batch,) = list(image_text_pipeline.make_pair_eval_batches(data, global_batch_size=n,
                                                             split=split))
  assert batch["mask"].all()
  captions = image_text_pipeline.split_captions(data, split)
  tokens = image_text_pipeline.tokenize_texts(image_text_pipeline.load_caption_tokenizer(data),
                                              captions.texts, int(data.seq_len))
  return (_image_vectors(batch["image"]), batch["label"], _text_vectors(tokens["input_ids"]),
          np.asarray(captions.image_index))


def test_zero_shot_on_the_corpus_matches_a_one_batch_reference(setup):
  from mrl_jax.data import image_text_pipeline
  config, info, mesh = setup
  templates = ("a photo of the digit {}.", "a handwritten {}.")
  config = _with(config, "zero_shot", batch_size=96, templates=templates, max_examples=0)
  (ev,) = [e for e in dual_evaluators.build_dual_evaluators(config, info) if e.name == "zero_shot"]
  got = ev.run(fake_embed, mesh, DIMS)
  image_z, labels, _, _ = _reference_split(config, "test")
  prompts = [t.format(name) for name in info.class_names for t in templates]
  tokens = image_text_pipeline.tokenize_texts(
      image_text_pipeline.load_caption_tokenizer(config.data), prompts, int(config.data.seq_len))
  class_z = _text_vectors(tokens["input_ids"]).reshape(len(info.class_names), 2, -1)
  want = zero_shot.zero_shot_top1(image_z, labels, class_z, DIMS)
  for m, value in zip(DIMS, want):
    assert got[f"eval/zero_shot/top1_d{m}"] == float(value)
  assert ev.console_line(got, DIMS).startswith("zero-shot top-1 @4:")
  # max_examples scores the first images only.
  capped = _with(config, "zero_shot", max_examples=250)
  ev = dual_evaluators.build_zero_shot(capped, info)
  got = ev.run(fake_embed, mesh, DIMS)
  want = zero_shot.zero_shot_top1(image_z[:250], labels[:250], class_z, DIMS)
  assert [got[f"eval/zero_shot/top1_d{m}"] for m in DIMS] == [float(v) for v in want]


def test_retrieval_matches_a_one_batch_reference_with_every_caption(setup):
  config, info, mesh = setup
  split = "test[:400]"  # A sliced split: fewer images to decode, the same code path.
  config = _with(config, "retrieval", batch_size=96, ks=(1, 5), max_images=0, split=split)
  ev = dual_evaluators.build_retrieval(config, info)
  got = ev.run(fake_embed, mesh, DIMS)
  image_z, _, text_z, owners = _reference_split(config, split)
  assert len(image_z) == 400
  assert len(text_z) > len(image_z)  # several captions per image
  want = cross_modal_retrieval.recall_at_k(image_z, text_z, owners, DIMS, (1, 5))
  for direction in ("image_to_text", "text_to_image"):
    for k in (1, 5):
      for m, value in zip(DIMS, want[direction][k]):
        assert got[f"eval/retrieval/{direction}_recall@{k}_d{m}"] == float(value)
  # max_images: the first N images and only their captions.
  ev = dual_evaluators.build_retrieval(_with(config, "retrieval", max_images=150), info)
  got = ev.run(fake_embed, mesh, DIMS)
  keep = owners < 150
  want = cross_modal_retrieval.recall_at_k(image_z[:150], text_z[keep], owners[keep], DIMS,
                                           (1, 5))
  assert got["eval/retrieval/text_to_image_recall@5_d16"] == float(want["text_to_image"][5][1])
  assert got["eval/retrieval/image_to_text_recall@1_d4"] == float(want["image_to_text"][1][0])


def test_zero_shot_on_another_image_dataset(setup, digits_data_dir):
  """A grayscale single-label dataset of the image pipeline, its own label names, and
  config.data's image size (the model's) when it gives none."""
  from mrl_jax.data import pipeline
  config, info, mesh = setup
  data = dict(name="mrl_digits", data_dir=digits_data_dir, eval_split="test")
  config = _with(config, "zero_shot", data=data, split=None, templates=("{}",), batch_size=64)
  ev = dual_evaluators.build_zero_shot(config, info)
  assert ev.class_names == tuple(str(d) for d in range(10))
  got = ev.run(fake_embed, mesh, DIMS)
  size = int(config.data.image_size)
  cfg = ml_collections.ConfigDict({**data, "image_size": size, "mean": (0.5,), "std": (0.5,)})
  batches = list(pipeline.make_eval_batches(cfg, global_batch_size=64))
  keep = np.concatenate([b["mask"] for b in batches]) > 0
  images = np.concatenate([b["image"] for b in batches])[keep]
  assert images.shape[1:] == (size, size, 1)
  labels = np.concatenate([b["label"] for b in batches])[keep]
  from mrl_jax.data import image_text_pipeline
  tokens = image_text_pipeline.tokenize_texts(
      image_text_pipeline.load_caption_tokenizer(config.data), list(ev.class_names),
      int(config.data.seq_len))
  want = zero_shot.zero_shot_top1(_image_vectors(images), labels,
                                  _text_vectors(tokens["input_ids"]), DIMS)
  assert [got[f"eval/zero_shot/top1_d{m}"] for m in DIMS] == [float(v) for v in want]
  with pytest.raises(ConfigError, match=f"image_size={size}"):
    dual_evaluators.build_zero_shot(_with(config, "zero_shot", data={**data, "image_size": 8}),
                                    info)


@pytest.mark.parametrize("section, fields, match", [
    ("zero_shot", dict(every_step=5), r"unknown field\(s\) \['every_step'\]"),
    ("zero_shot", dict(templates=("a photo of a digit.",)), "needs a '\\{\\}'"),
    ("zero_shot", dict(templates=()), "non-empty tuple"),
    ("zero_shot", dict(class_names=("zero", "one")), "2 names but 'mrl_digit_captions' has 100"),
    ("zero_shot", dict(batch_size=0), "batch_size=0"),
    ("zero_shot", dict(max_examples=-1), "max_examples=-1"),
    ("retrieval", dict(ks=(1, 0)), "ks=\\(1, 0\\)"),
    ("retrieval", dict(split="nope"), "nope"),
])
def test_bad_settings_are_one_line_config_errors(setup, section, fields, match):
  config, info, _ = setup
  with pytest.raises(ConfigError, match=match) as e:
    dual_evaluators.build_dual_evaluators(_with(config, section, **fields), info)
  assert "\n" not in str(e.value)


def test_zero_shot_needs_labels_or_a_dataset(setup):
  config, info, _ = setup
  unlabelled = dataclasses.replace(info, num_classes=0, class_names=())
  with pytest.raises(ConfigError, match="unlabelled"):
    dual_evaluators.build_zero_shot(config, unlabelled)
  config = ml_collections.ConfigDict(config.to_dict())
  config.zero_shot = None
  config.retrieval = None
  assert dual_evaluators.build_dual_evaluators(config, unlabelled) == []
