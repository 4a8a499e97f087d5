"""configs/align.py end to end: the contrastive task trains through the real loop, writes
its summary (zero-shot, retrieval), resumes exactly after a kill, compiles for a pod
mesh without data; the plain (ff) head, the sigmoid loss and a LiT run train."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import subprocess_env
from mrl_jax import sharding, train
from mrl_jax.errors import ConfigError
from test_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIGN = os.path.join(ROOT, "configs", "align.py")
# Tests about the loop (resume, heads, losses, LiT) train a 2-layer ViT image tower instead
# of :runlocal's ResNet-18: about twice the steps per second and faster to compile. The
# run that must learn (`trained`) keeps the ResNet, which learns the digits in fewer steps.
VIT_TOWER = dict(name="vit", variant=None, width=64, depth=2, num_heads=2, mlp_dim=128,
                 patch=4, pool="gap", dropout=0.0, remat=False)
# One layer per tower where the test is about the loop, not the model: faster to compile.
ONE_LAYER = {"model.image.depth": 1, "model.text.depth": 1}


def align_config(data_dir, arg="runlocal", *, evaluators=False, vit_tower=True, **overrides):
  """The :runlocal config on the test fixture's corpus; without `evaluators` no zero-shot
  or retrieval run and the eval split is cut to 128 pairs (compiles and seconds saved)."""
  config = load_config(ALIGN, arg)
  config.data.data_dir = data_dir
  if "runlocal" in arg and vit_tower:
    config.model.image = VIT_TOWER
  config.log_every_steps = 1
  if not evaluators:
    config.zero_shot = None
    config.retrieval = None
    config.data.eval_split = "test[:128]"
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir):
  return {r["step"]: r["train/loss"] for r in metric_rows(workdir) if "train/loss" in r}


def final_params(workdir):
  """(step, {path: array}) of the workdir's newest checkpoint."""
  from mrl_jax import experiment, inference
  from mrl_jax.checkpointing import Checkpointer
  config = inference.load_config(workdir)
  checkpointer = Checkpointer(os.path.abspath(workdir), every_steps=0)
  try:
    step = checkpointer.latest_step()
    exp = experiment.build(config, meta=checkpointer.read_meta(step), check=False)
    state = checkpointer.restore(step, exp.restore_target(), None, exp.checkpoint_meta())
  finally:
    checkpointer.close()
  leaves, _ = jax.tree_util.tree_flatten_with_path(state["params"])
  return step, {sharding.path_to_str(p): np.asarray(x) for p, x in leaves}


# ---------------------------------------------------------------- the runlocal run
@pytest.fixture(scope="module")
def trained(align_runlocal_run):
  """(workdir, config, summary) of a 120-step :runlocal run with both evaluators (the
  session's one run, tests/conftest.py; test_dual_probe.py restores and probes it)."""
  return align_runlocal_run


@pytest.mark.slow
def test_runlocal_writes_zero_shot_and_retrieval_for_every_size(trained):
  workdir, config, summary = trained
  with open(os.path.join(workdir, "summary.json")) as f:
    on_disk = json.load(f)
  dims = [str(m) for m in config.nesting.dims]
  assert on_disk["dims"] == summary["dims"] == list(config.nesting.dims) == [8, 16, 32, 64]
  for key in ("zero_shot_top1", "image_to_text_recall@1", "text_to_image_recall@1",
              "image_to_text_recall@5", "text_to_image_recall@10", "eval_pair_top1"):
    assert list(on_disk[key]) == dims, key
    assert all(0.0 <= v <= 1.0 for v in on_disk[key].values()), (key, on_disk[key])
  # recall@k grows with k at every size.
  for direction in ("image_to_text", "text_to_image"):
    for m in dims:
      r = [on_disk[f"{direction}_recall@{k}"][m] for k in (1, 5, 10)]
      assert r == sorted(r), (direction, m, r)
  assert on_disk["steps"] == config.total_steps and on_disk["eval_pairs"] >= config.eval_batch_size
  assert os.path.exists(os.path.join(workdir, "tokenizer.json"))


@pytest.mark.slow
def test_runlocal_logs_the_weighted_sum_the_scale_and_learns(trained):
  workdir, config, summary = trained
  rows = [r for r in metric_rows(workdir) if "train/loss" in r]
  dims = config.nesting.dims
  for row in rows:  # Weights all 1: the total is the sum of the per-size losses.
    assert row["train/loss"] == pytest.approx(sum(row[f"train/loss_d{m}"] for m in dims),
                                              rel=1e-5)
    assert all(0.0 <= row[f"train/pair_top1_d{m}"] <= 1.0 for m in dims)
  # The softmax loss starts at the learned temperature 1/0.07 (CLIP's initialisation).
  assert rows[0]["train/scale"] == pytest.approx(1 / 0.07, rel=1e-3)
  # Learnt at every size, on the 960 test pairs in full batches of 64: chance is an
  # in-batch top-1 of 1/64 and a symmetric InfoNCE of log(64) = 4.16. After 120 steps
  # (seeds 0 and 1): top-1 6.7-7.6% and 7.5-9.0%, loss 3.43-3.46 and 3.35-3.37.
  for m in map(str, dims):
    assert summary["eval_pair_top1"][m] > 2.0 / config.eval_batch_size, m
    assert summary["eval_loss"][m] < 0.95 * np.log(config.eval_batch_size), m


# ---------------------------------------------------------------- resume
@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_parameters(
    image_text_demo_data_dir, tmp_path):
  """A copy of a 6-step run with only its step-3 checkpoint (as a kill between the saves
  at 3 and 6 leaves it), rerun: steps 4-6 give the same losses and parameters, bit for
  bit (the data position and the optimizer state are in the checkpoint)."""
  config = align_config(image_text_demo_data_dir, total_steps=6, checkpoint_every_steps=3,
                        **ONE_LAYER)
  uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
  train.train_and_evaluate(config, str(uninterrupted))
  assert sorted(os.listdir(uninterrupted / "checkpoints")) == ["3", "6"]
  shutil.copytree(uninterrupted, killed)
  shutil.rmtree(killed / "checkpoints" / "6")
  os.remove(killed / "summary.json")
  summary = train.train_and_evaluate(config, str(killed))
  assert summary["steps"] == 6

  expected = train_losses(uninterrupted)
  rows = [r for r in metric_rows(killed) if "train/loss" in r]
  rerun = {r["step"]: r["train/loss"] for r in rows[-3:]}  # The rerun's rows come last.
  assert sorted(rerun) == [4, 5, 6]
  for step, loss in rerun.items():  # CPU, the same batches: identical to the last bit.
    assert loss == expected[step], step
  (step_a, a), (step_b, b) = final_params(uninterrupted), final_params(killed)
  assert step_a == step_b == 6 and a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)


# ---------------------------------------------------------------- compile_check
@pytest.mark.slow
def test_pod_config_compiles_for_an_8_device_mesh_without_data(tmp_path):
  """The full config's shapes (ViT-B/16 and BERT-Base widths, 768-d projections, batch
  16,384 at 224 px, bf16, data x fsdp=8), 2 blocks per tower instead of 12 so that it
  compiles in seconds; run it without the overrides for the real memory report."""
  result = subprocess.run(
      [sys.executable, "-m", "mrl_jax.main", f"--config={ALIGN}", f"--workdir={tmp_path}",
       "--mode=compile_check", "--cpu_devices=8", "--config.model.image.depth=2",
       "--config.model.text.depth=2"],
      cwd=ROOT, env=subprocess_env(1), timeout=900, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "compile_check.json") as f:
    report = json.load(f)
  assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "model": 1}
  assert report["task"] == "contrastive" and report["dims"] == [12, 24, 48, 96, 192, 384, 768]
  assert report["global_batch"] == 16384 and report["compute_dtype"] == "bfloat16"
  assert report["vocab_size"] == 30522 and report["image_size"] == 224
  assert report["batch"]["image"]["shape"] == [16384, 224, 224, 3]
  assert report["batch"]["input_ids"]["shape"] == [16384, 64]
  # A 768-wide pre/post-LN block (attention 4 x (768^2 + 768), MLP 2 x 768 x 3072 + 3072 +
  # 768, two LayerNorms): 7,087,872. Outside the blocks: ViT-B/16's patch embedding, class
  # token, positions and final norm (85,798,656 - 12 blocks = 744,192), BERT-Base's
  # embeddings and their norm (108,891,648 - 12 blocks = 23,837,184); two 768 x 768
  # projections and the temperature t.
  block = 7_087_872
  assert report["parameters"] == (744_192 + 2 * block) + (23_837_184 + 2 * block) \
      + 2 * 768 * 768 + 1
  mem = report["per_device_mib"]
  assert mem["params"] < 1.1 * report["parameters"] * 4 / 2**20 / 8 + 1  # fsdp=8 splits them
  assert mem["temporaries"] > 0 and mem["peak_estimate"] >= mem["train_state"]


def test_compile_check_without_the_corpus_names_the_fields_to_set(tmp_path):
  from mrl_jax.tasks.contrastive import ContrastiveTask
  config = align_config(str(tmp_path / "absent"), **{"data.name": "absent_corpus",
                                                     "data.vocab_size": None})
  with pytest.raises(ConfigError, match="config.data.vocab_size"):
    ContrastiveTask().data_info_from_config(config)
  config.data.vocab_size = 1000
  info = ContrastiveTask().data_info_from_config(config)
  assert (info.vocab_size, info.image_size, info.in_channels, info.seq_len) == (1000, 32, 3, 16)


# ---------------------------------------------------------------- variants
@pytest.mark.slow
def test_plain_ff_head_trains_one_size(image_text_demo_data_dir, tmp_path):
  config = align_config(image_text_demo_data_dir, total_steps=4, head="ff", **ONE_LAYER)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["dims"] == [64] and list(summary["eval_pair_top1"]) == ["64"]
  row = [r for r in metric_rows(tmp_path) if "train/loss" in r][0]
  assert row["train/loss"] == pytest.approx(row["train/loss_d64"], rel=1e-6)


@pytest.mark.slow
def test_sigmoid_lit_run_keeps_the_pretrained_image_tower_and_trains_the_rest(
    trained, image_text_demo_data_dir, tmp_path):
  """LiT with SigLIP's loss: the image tower comes from another run (init_from.image),
  stays locked bit for bit; the text tower, projections, scale and bias train."""
  source, _, _ = trained
  config = align_config(image_text_demo_data_dir, "runlocal,sigmoid,lit", total_steps=4,
                        vit_tower=False,  # The source run's ResNet tower.
                        **{"init_from.image.workdir": source, "init_from.image.prefix": "image/"})
  assert config.contrastive.kind == "sigmoid" and tuple(config.freeze) == ("^image/",)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 4 and all(np.isfinite(v) for v in summary["eval_loss"].values())
  rows = [r for r in metric_rows(tmp_path) if "train/loss" in r]
  assert rows[0]["train/scale"] == pytest.approx(10.0, rel=1e-3)  # SigLIP's init
  assert rows[0]["train/bias"] == pytest.approx(-10.0, abs=1e-2)
  assert rows[-1]["train/bias"] != rows[0]["train/bias"]
  _, pretrained = final_params(source)
  _, after = final_params(tmp_path)
  image = [p for p in after if p.startswith("image/")]
  assert image and all(np.array_equal(pretrained[p], after[p]) for p in image)
  # The text tower started from its own random init, not the source's, and trained on.
  text = [p for p in after if p.startswith("text/")]
  assert any(not np.array_equal(pretrained[p], after[p]) for p in text)
  assert "logit_bias" in after and "image_projection/kernel" in after
