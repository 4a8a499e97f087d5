"""configs/align.py end to end: the contrastive task trains through the real loop, writes
its summary (zero-shot, retrieval), resumes exactly after SIGTERM, compiles for a pod
mesh without data; the plain (ff) head, the sigmoid loss and a LiT run train."""

import json
import os
import signal
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


def align_config(data_dir, arg="runlocal", *, evaluators=False, **overrides):
  """The :runlocal config on the test fixture's corpus; without `evaluators` no zero-shot
  or retrieval run and the eval split is cut to 128 pairs (compiles and seconds saved)."""
  config = load_config(ALIGN, arg)
  config.data.data_dir = data_dir
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


def initial_params(config):
  from mrl_jax import experiment
  state = experiment.build(config).init_state()
  leaves, _ = jax.tree_util.tree_flatten_with_path(state["params"])
  return {sharding.path_to_str(p): np.asarray(x) for p, x in leaves}


# ---------------------------------------------------------------- the runlocal run
@pytest.fixture(scope="module")
def trained(image_text_demo_data_dir, tmp_path_factory):
  """(workdir, config, summary) of a short :runlocal run with both evaluators."""
  workdir = str(tmp_path_factory.mktemp("align_run"))
  config = align_config(image_text_demo_data_dir, evaluators=True, total_steps=40,
                        log_every_steps=10, checkpoint_every_steps=40)
  return workdir, config, train.train_and_evaluate(config, workdir)


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
  assert on_disk["steps"] == 40 and on_disk["eval_pairs"] >= config.eval_batch_size
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
  # Chance of in-batch top-1 is 1/64; the symmetric InfoNCE starts near 2 * log(64) / 2
  # per size. After 40 steps every size's loss has fallen (seeds 0-2: MEASURED).
  first, last = rows[0], rows[-1]
  for m in dims:
    assert last[f"train/loss_d{m}"] < 0.9 * first[f"train/loss_d{m}"], m
  assert min(summary["eval_pair_top1"].values()) > 2.0 / config.eval_batch_size


# ---------------------------------------------------------------- resume
@pytest.mark.slow
def test_sigterm_then_rerun_resumes_to_the_same_parameters(image_text_demo_data_dir, tmp_path,
                                                           monkeypatch):
  """Kill at step 3 of 6, rerun: the same losses and final parameters, bit for bit."""
  config = align_config(image_text_demo_data_dir, total_steps=6, checkpoint_every_steps=100)
  uninterrupted = tmp_path / "uninterrupted"
  train.train_and_evaluate(config, str(uninterrupted))

  calls = {"n": 0}
  real_global_batch = sharding.global_batch

  def global_batch_then_sigterm(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_global_batch(batch, mesh)

  interrupted = tmp_path / "interrupted"
  monkeypatch.setattr(sharding, "global_batch", global_batch_then_sigterm)
  result = train.train_and_evaluate(config, str(interrupted))
  monkeypatch.setattr(sharding, "global_batch", real_global_batch)
  assert result["preempted"] and result["steps"] == 3
  assert train.train_and_evaluate(config, str(interrupted))["steps"] == 6

  expected, resumed = train_losses(uninterrupted), train_losses(interrupted)
  assert sorted(resumed) == list(range(1, 7))
  for step in expected:  # CPU, same batches (the data position is saved): identical.
    assert resumed[step] == expected[step], step
  (step_a, a), (step_b, b) = final_params(uninterrupted), final_params(interrupted)
  assert step_a == step_b == 6 and a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)


# ---------------------------------------------------------------- compile_check
@pytest.mark.slow
def test_full_config_compiles_for_an_8_device_pod_mesh_without_data(tmp_path):
  """ViT-B/16 + BERT-Base, 768-d projections, batch 16,384, bf16, data x fsdp=8."""
  result = subprocess.run(
      [sys.executable, "-m", "mrl_jax.main", f"--config={ALIGN}", f"--workdir={tmp_path}",
       "--mode=compile_check", "--cpu_devices=8"],
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
  # ViT-B/16 without a head (86,567,656 - 769,000), BERT-Base without the pooler (the
  # encoder of bert-base-uncased: 108,891,648), two 768x768 projections, t.
  assert report["parameters"] == (86_567_656 - 769_000) + 108_891_648 + 2 * 768 * 768 + 1
  mem = report["per_device_mib"]
  assert mem["params"] < 1.1 * report["parameters"] * 4 / 2**20 / 8 + 1  # fsdp=8 splits them


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
  config = align_config(image_text_demo_data_dir, total_steps=4, head="ff")
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["dims"] == [64] and list(summary["eval_pair_top1"]) == ["64"]
  row = [r for r in metric_rows(tmp_path) if "train/loss" in r][0]
  assert row["train/loss"] == pytest.approx(row["train/loss_d64"], rel=1e-6)


@pytest.mark.slow
def test_sigmoid_lit_run_trains_the_text_tower_and_keeps_the_image_tower(
    image_text_demo_data_dir, tmp_path):
  """SigLIP loss (scale and bias logged) with the image tower locked (LiT)."""
  config = align_config(image_text_demo_data_dir, "runlocal,sigmoid,lit", total_steps=4)
  assert config.contrastive.kind == "sigmoid" and tuple(config.freeze) == ("^image/",)
  before = initial_params(config)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 4 and all(np.isfinite(v) for v in summary["eval_loss"].values())
  rows = [r for r in metric_rows(tmp_path) if "train/loss" in r]
  assert rows[0]["train/scale"] == pytest.approx(10.0, rel=1e-3)  # SigLIP's init
  assert rows[0]["train/bias"] == pytest.approx(-10.0, abs=1e-2)
  _, after = final_params(tmp_path)
  image = [p for p in after if p.startswith("image/")]
  assert image and all(np.array_equal(before[p], after[p]) for p in image)
  changed = [p for p in after if not p.startswith("image/")
             and not np.array_equal(before[p], after[p])]
  assert any(p.startswith("text/") for p in changed)
  assert "image_projection/kernel" in changed and "logit_bias" in changed
