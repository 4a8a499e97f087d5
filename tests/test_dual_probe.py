"""A trained dual-encoder workdir: `inference.load(W)` (embed_image / embed_text /
zero_shot_classifier per prefix) and `--mode=probe` (zero-shot, recall@k, image 1-NN per
size, the baselines' truncations), checked against independent recomputations."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from mrl_jax import inference, sharding
from mrl_jax.data import caption_demo
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import cross_modal_retrieval, dual_baselines, probe, zero_shot
from test_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIGN = os.path.join(ROOT, "configs", "align.py")
DIMS = ["8", "16", "32", "64"]


def runlocal(data_dir: str) -> ml_collections.ConfigDict:
  config = load_config(ALIGN, "runlocal")
  config.data.data_dir = data_dir
  return config


@pytest.fixture(scope="module")
def trained(align_runlocal_run):
  """(workdir, config, summary) of a 120-step :runlocal run (both final evaluators on the
  whole test split): the session's one run (tests/conftest.py), which
  test_align_train.py checks learnt."""
  return align_runlocal_run


def _test_pairs(config, n):
  """(images [n, H, W, C], their first captions) of the test split, straight from the pipeline."""
  from mrl_jax.data import image_text_pipeline
  (batch,) = list(image_text_pipeline.make_pair_eval_batches(
      config.data, global_batch_size=n, split=f"test[:{n}]"))
  captions = image_text_pipeline.split_captions(config.data, f"test[:{n}]")
  first = [captions.texts[list(captions.image_index).index(i)] for i in range(n)]
  return batch["image"], first, captions


@pytest.mark.slow
def test_restored_dual_encoder_embeds_every_prefix(trained):
  from mrl_jax.data import image_text_pipeline
  from mrl_jax.dual_model import RestoredDualEncoder
  workdir, config, _ = trained
  model = inference.load(workdir, batch_size=32)
  assert isinstance(model, RestoredDualEncoder)
  assert model.dims == (8, 16, 32, 64) and model.batch_size == 32
  assert model.step == config.total_steps == 120
  assert model.workdir == os.path.abspath(workdir)
  images, texts, _ = _test_pairs(config, 50)

  full = model.embed_image(images, normalize=False)
  assert full.shape == (50, 64) and full.dtype == np.float32
  for m in (8, 64):  # Each prefix normalised on its own, not the full vector first.
    z = model.embed_image(images, dim=m)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(z, full[:, :m] / np.linalg.norm(full[:, :m], axis=1,
                                                                keepdims=True), atol=1e-6)
  # Batching pads the last batch; the rows do not depend on the batch size.
  model.batch_size = 7
  np.testing.assert_allclose(model.embed_image(images, normalize=False), full, rtol=1e-5,
                             atol=1e-5)
  model.batch_size = 32

  text_full = model.embed_text(texts, normalize=False)
  assert text_full.shape == (50, 64)
  tokens = image_text_pipeline.tokenize_texts(
      image_text_pipeline.load_caption_tokenizer(config.data), texts, config.data.seq_len)
  np.testing.assert_array_equal(model.embed_text(tokens, normalize=False), text_full)
  np.testing.assert_array_equal(model.embed_text(tokens["input_ids"], normalize=False),
                                text_full)
  z16 = model.embed_text(texts, dim=16)
  np.testing.assert_allclose(np.linalg.norm(z16, axis=1), 1.0, atol=1e-6)

  names, templates = ["07", "42", "99"], ("a photo of {}.", "the number {}")
  w = model.zero_shot_classifier(names, templates, dim=16)
  prompts = model.embed_text([t.replace("{}", n) for n in names for t in templates],
                             normalize=False).astype(np.float64)[:, :16].reshape(3, 2, 16)
  prompts /= np.linalg.norm(prompts, axis=-1, keepdims=True)
  ref = prompts.mean(1) / np.linalg.norm(prompts.mean(1), axis=-1, keepdims=True)
  np.testing.assert_allclose(w, ref, atol=1e-6)

  # The scale: exp of the learned t, capped at max_scale (100).
  leaves = {sharding.path_to_str(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(model.params)[0]}
  assert model.scale == pytest.approx(min(float(np.exp(leaves["logit_scale"])), 100.0),
                                      rel=1e-6)
  assert model.bias is None  # softmax: no bias

  with pytest.raises(ValueError, match="dim=65"):
    model.embed_image(images, dim=65)
  with pytest.raises(ValueError, match=r"images must be float \[N, 32, 32, 3\]"):
    model.embed_image(images[:, :16, :16])


@pytest.mark.slow
def test_final_evaluators_agree_with_the_restored_model(trained):
  """Training's evaluators (embed_step on the train mesh) against the inference model's
  embeddings scored directly: the same numbers, up to float32 near-ties."""
  from mrl_jax.data import image_text_pipeline
  workdir, config, summary = trained
  model = inference.load(workdir, batch_size=128)
  data = config.data
  (batch,) = list(image_text_pipeline.make_pair_eval_batches(data, global_batch_size=1000))
  image_z = model.embed_image(batch["image"], normalize=False)
  captions = image_text_pipeline.split_captions(data)
  text_z = model.embed_text(list(captions.texts), normalize=False)
  recalls = cross_modal_retrieval.recall_at_k(image_z, text_z, captions.image_index,
                                              (8, 16, 32, 64), (1, 5, 10))
  # Both paths compute the same float32 functions; a different batch layout can move a
  # score by ~1e-6 and swap a near-tie: allow 3 of the 1000 images (~4,000 captions).
  for direction in ("image_to_text", "text_to_image"):
    for k in (1, 5, 10):
      for m, value in zip(DIMS, recalls[direction][k]):
        assert summary[f"{direction}_recall@{k}"][m] == pytest.approx(float(value), abs=3e-3)
  names = list(model.config.zero_shot.get("class_names") or
               image_text_pipeline.image_text_dataset_info(data).class_names)
  templates = tuple(config.zero_shot.templates)
  class_z = model.embed_text([t.replace("{}", n) for n in names for t in templates],
                             normalize=False).reshape(len(names), len(templates), -1)
  top1 = zero_shot.zero_shot_top1(image_z, batch["label"], class_z, (8, 16, 32, 64))
  for m, value in zip(DIMS, top1):
    assert summary["zero_shot_top1"][m] == pytest.approx(float(value), abs=3e-3)


@pytest.mark.slow
def test_probe_writes_every_size_and_the_baselines(trained, capsys):
  workdir, config, summary = trained
  config = ml_collections.ConfigDict(config.to_dict())
  config.probe.train_split = "train[:1000]"  # the 1-NN database: enough for the check
  config.probe.baseline_workdir = workdir    # the run itself stands in for a plain one
  result = probe.run_probe(workdir, config, overrides={"probe.train_split": "train[:1000]"})
  with open(os.path.join(workdir, "probe", "summary.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(result))
  assert on_disk["dims"] == [8, 16, 32, 64] and on_disk["task"] == "contrastive"
  metrics = ["zero_shot_top1", "image_knn_top1"] + [
      f"{d}_recall@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
  for prefix in ("", "baseline_truncated_", "baseline_svd_", "baseline_random_"):
    for key in metrics:
      assert list(on_disk[prefix + key]) == DIMS, prefix + key
      assert all(0.0 <= v <= 1.0 for v in on_disk[prefix + key].values())
  assert on_disk["knn"]["database"] == 1000 and on_disk["knn"]["queries"] == 1000
  assert on_disk["retrieval"]["captions"] == sum(map(len, caption_demo.plan("test")["captions"]))
  # The probe's zero-shot and recall are the training evaluators' (same split, prompts).
  for key in ("zero_shot_top1", "image_to_text_recall@1", "text_to_image_recall@10"):
    for m in DIMS:
      assert on_disk[key][m] == pytest.approx(summary[key][m], abs=3e-3), (key, m)
  # At the full width the random subset is every coordinate in order (the model itself)
  # and the SVD basis a rotation: the same scores, up to rounding (float32 normalisation
  # of rotated vectors) swapping a near-tie; the demo has many exactly equal captions.
  for key in metrics:
    for kind in ("random", "svd"):
      assert on_disk[f"baseline_{kind}_{key}"]["64"] == pytest.approx(on_disk[key]["64"],
                                                                      abs=5e-3), (kind, key)
    for m in DIMS:  # The baseline's first m dims: the run's own prefixes, re-embedded.
      assert on_disk[f"baseline_truncated_{key}"][m] == pytest.approx(on_disk[key][m],
                                                                      abs=1e-3), (key, m)
  # Image 1-NN against an independent exact search in float64.
  model = inference.load(workdir)
  from mrl_jax.data import image_text_pipeline
  (train_b,) = list(image_text_pipeline.make_pair_eval_batches(
      config.data, global_batch_size=1000, split="train[:1000]"))
  (test_b,) = list(image_text_pipeline.make_pair_eval_batches(config.data,
                                                              global_batch_size=1000))
  db = model.embed_image(train_b["image"], dim=8).astype(np.float64)
  q = model.embed_image(test_b["image"], dim=8).astype(np.float64)
  distances = ((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)
  top1 = np.mean(train_b["label"][distances.argmin(1)] == test_b["label"])
  assert on_disk["image_knn_top1"]["8"] == pytest.approx(top1, abs=3e-3)

  report = open(os.path.join(workdir, "probe", "report.md")).read()
  assert "| 64 |" in report and "m random dims" in report
  for name in ("zero_shot.png", "recall.png", "knn.png"):
    assert os.path.getsize(os.path.join(workdir, "probe", name)) > 0
  out = capsys.readouterr().out
  assert "MRL dual encoder (%):" in out and "baseline, SVD to m dims (%):" in out


@pytest.mark.slow
def test_probe_with_an_image_config_is_one_line(trained):
  workdir, _, _ = trained
  config = load_config(os.path.join(ROOT, "configs", "quickstart.py"))
  with pytest.raises(ConfigError, match="holds a dual encoder") as e:
    probe.run_probe(workdir, config)
  assert "\n" not in str(e.value)


def test_joint_truncation_at_full_width_keeps_every_score():
  """The property the probe test leans on, checked in float64: the full-width SVD map
  is orthogonal and the full-width random subset is the identity."""
  rng = np.random.default_rng(0)
  zi, zt = rng.normal(size=(20, 8)), rng.normal(size=(40, 8))
  maps = dual_baselines.truncations(zi, zt, (8,), seed=3)
  np.testing.assert_array_equal(maps["random"](zi, 8), zi.astype(np.float32))
  basis = dual_baselines.joint_svd_basis(zi, zt)
  np.testing.assert_allclose(basis @ basis.T, np.eye(8), atol=1e-12)


def test_probe_mode_takes_the_dual_evaluation_settings_from_the_command_line(tmp_path):
  """--config.zero_shot.* / --config.retrieval.* choose what the probe measures, not the
  model: accepted even where they differ from the workdir's config (others are refused)."""
  saved = ml_collections.ConfigDict(runlocal(str(tmp_path)).to_dict())
  probe.check_overrides({"zero_shot.templates": ("a {}",), "retrieval.ks": (1, 2),
                         "zero_shot.max_examples": 10}, saved, str(tmp_path))
  with pytest.raises(probe.ProbeOverrideError, match="--config.model.embed_dim=32"):
    probe.check_overrides({"model.embed_dim": 32}, saved, str(tmp_path))


@pytest.mark.slow
def test_embed_workdir_split_gives_a_dual_encoders_image_embeddings(trained):
  """The vector index's database from a dual encoder: its image tower on the split, in order."""
  from mrl_jax.retrieval.workdir_embeddings import embed_workdir_split
  workdir, config, _ = trained
  z, labels = embed_workdir_split(workdir, "test[:40]", data_dir=config.data.data_dir,
                                  batch_size=16)
  assert z.dtype == np.float32 and z.shape == (40, 64)
  images, _, _ = _test_pairs(config, 40)
  model = inference.load(workdir, batch_size=32)
  np.testing.assert_allclose(z, model.embed_image(images, normalize=False), rtol=1e-4, atol=1e-5)
  from mrl_jax.data import image_text_pipeline
  (batch,) = list(image_text_pipeline.make_pair_eval_batches(
      config.data, global_batch_size=40, split="test[:40]"))
  assert labels.dtype == np.int64  # mrl_digit_captions is labelled: the labels come along.
  np.testing.assert_array_equal(labels, batch["label"])
