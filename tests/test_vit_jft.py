"""configs/vit_jft.py end to end: runlocal trains, resumes and evaluates; the full config
compiles for an 8-device mesh; the 18k-class sigmoid head never gathers all classes."""

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import subprocess_env
from mrl_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_JFT = os.path.join(ROOT, "configs", "vit_jft.py")


@pytest.mark.slow
def test_runlocal_trains_resumes_and_runs_the_knn_evaluator(runlocal_run, tmp_path):
  # The first run is the session's vit_jft:runlocal run (tests/conftest.py); a copy resumes.
  source, config, first = runlocal_run("vit_jft.py")
  assert first["steps"] == 6 and first["dataset"] == "mrl_demo_corpus"
  tmp_path = tmp_path / "run"
  shutil.copytree(source, tmp_path)
  config = copy.deepcopy(config)  # the shared run's config stays as it was
  assert set(os.listdir(tmp_path / "checkpoints")) >= {"3", "6"}
  config.total_steps = 8
  second = train.train_and_evaluate(config, str(tmp_path))
  assert second["steps"] == 8
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == [1, 2, 4, 6, 7, 8]  # resumed after 6: nothing retrained
  knn_steps = [r["step"] for r in rows if "eval/imagenet_knn/knn1_top1_d12" in r]
  assert knn_steps == [3, 6, 8]
  for m in config.nesting.dims:
    assert 0.0 <= second["evaluators"][f"eval/imagenet_knn/linear_top1_d{m}"] <= 1.0


@pytest.mark.slow
def test_full_config_compiles_for_8_devices_and_reports_memory(tmp_path):
  """ViT-B/16, 18,291 classes, batch 8192, bf16 on data x fsdp=4 x model=2; no data needed."""
  subprocess.run(
      [sys.executable, "-m", "mrl_jax.main", f"--config={VIT_JFT}", f"--workdir={tmp_path}",
       "--mode=compile_check", "--cpu_devices=8"],
      check=True, cwd=ROOT, env=subprocess_env(1), timeout=900, capture_output=True)
  with open(tmp_path / "compile_check.json") as f:
    report = json.load(f)
  assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 4, "model": 2}
  assert report["input_from"] == "config" and report["num_classes"] == 18291
  assert report["global_batch"] == 8192 and report["compute_dtype"] == "bfloat16"
  # ViT-B/16 encoder (86,567,656 - the 769,000 of a 1000-way head) + MRL head over
  # 18,304 stored classes: sum(12..768) = 1524 kernel rows and 7 bias rows.
  assert report["parameters"] == 86_567_656 - 769_000 + (1524 + 7) * 18_304
  mem = report["per_device_mib"]
  # fsdp=4 x model=2 splits the float32 parameters about 8 ways.
  assert mem["params"] < 1.1 * report["parameters"] * 4 / 2**20 / 8 + 1
  assert mem["temporaries"] > 0 and mem["peak_estimate"] >= mem["train_state"]


@pytest.mark.slow
def test_sigmoid_head_never_gathers_the_class_dimension():
  """With classes sharded over "model", no collective assembles full-width logits or kernels."""
  script = textwrap.dedent(f"""
      import re, jax
      from mrl_jax import experiment
      from mrl_jax.tasks.classification import ImageDataInfo
      import importlib.util
      spec = importlib.util.spec_from_file_location("vit_jft", {VIT_JFT!r})
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      config = module.get_config("runlocal")
      config.num_classes, config.head_class_multiple = 4000, 128   # stored as 4096
      config.mesh = dict(data=2, fsdp=2, model=2)
      config.batch_size = 16
      exp = experiment.build(config, info=ImageDataInfo(4000, (32, 32, 3), True, 16))
      assert jax.device_count() == 8
      batch = exp.abstract_batch(16)
      assert batch["image"].shape == (16, 32, 32, 3) and batch["label"].shape == (16, 4000)
      hlo = exp.train_step().lower(exp.restore_target(), batch).compile().as_text()
      gathers = [l for l in hlo.splitlines() if re.search(r"= \\S+ (all-gather|all-to-all)", l)]
      assert gathers, "expected FSDP parameter gathers"
      wide = [l.strip()[:160] for l in gathers if re.search(r"[\\[,](4000|4096)[\\],]", l)]
      assert not wide, wide
      # The per-device class slice (4096 / 2) is what the head's collectives carry.
      assert any("2048]" in l for l in gathers)
      print("ok", len(gathers))
      """)
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(8),
                       timeout=600, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("ok")
