"""Probe settings take effect: every field is settable from every config's command line,
bad values are refused before anything is embedded, and model-field overrides that
probe mode cannot apply are refused instead of ignored."""

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import subprocess_env
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import probe, probe_settings
from test_configs import load_config, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))

# A command-line value for every field but `data` (a dict: set in the config file),
# and the value the parsed config must then hold.
FLAG_VALUES = {
    "knn_k": ("3", 3), "retrieval_ks": ("(5,10)", (5, 10)), "linear_l2": ("0.01", 0.01),
    "linear_steps": ("7", 7), "holdout_fraction": ("0.25", 0.25), "seed": ("3", 3),
    "shortlist_dim": ("8", 8), "shortlist_size": ("50", 50), "funnel_dims": ("(8,16)", (8, 16)),
    "funnel_shortlists": ("(50,20)", (50, 20)), "train_split": ("train[:50%]", "train[:50%]"),
    "test_split": ("test[:10]", "test[:10]"), "batch_size": ("64", 64),
    "baseline_workdir": ("/tmp/ff_run", "/tmp/ff_run"),
    "adaptive_splits": ("5", 5), "adaptive_method": ("pairwise", "pairwise"),
    "retrieval_ann": ("hnsw", "hnsw"), "max_in_memory_gb": ("0.5", 0.5),
    "embeddings_dir": ("/tmp/shards", "/tmp/shards"), "block_rows": ("1024", 1024),
    "linear_epochs": ("3", 3), "linear_batch_size": ("128", 128),
}


def test_flag_values_cover_every_default_field():
  assert set(FLAG_VALUES) | {"data"} == set(probe_settings.DEFAULTS)


@pytest.mark.parametrize("arg", ["", ":runlocal"])
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_probe_field_is_settable_from_every_config(path, arg):
  default, _ = parse([f"--config={path}{arg}"])
  assert set(default.probe.keys()) == set(probe_settings.DEFAULTS)
  probe_settings.check_probe_settings(default.probe)  # the shipped settings are valid
  config, overrides = parse([f"--config={path}{arg}"] + [
      f"--config.probe.{name}={text}" for name, (text, _) in FLAG_VALUES.items()])
  for name, (_, value) in FLAG_VALUES.items():
    assert config.probe[name] == value, name
  assert overrides["probe.knn_k"] == 3
  settings = probe.probe_settings(config)
  assert settings["retrieval_ks"] == (5, 10) and settings["train_split"] == "train[:50%]"
  if config.probe.data is not None:  # vit_jft: the single-label data's fields are settable
    config, _ = parse([f"--config={path}{arg}", "--config.probe.data.data_dir=/data",
                       "--config.probe.data.name=mrl_digits"])
    assert (config.probe.data.data_dir, config.probe.data.name) == ("/data", "mrl_digits")


def test_vit_jft_probes_on_its_evaluators_single_label_data():
  for arg in (None, "runlocal"):
    config = load_config(os.path.join(ROOT, "configs", "vit_jft.py"), arg)
    assert config.probe.data.to_dict() == config.evaluators.imagenet_knn.data.to_dict()
  assert load_config(os.path.join(ROOT, "configs", "vit_jft.py")).probe.data.name == "imagenet2012"


BAD = [
    ("knn_k", 0, "integer >= 1"), ("knn_k", 2.5, "integer >= 1"), ("knn_k", True, "integer"),
    ("retrieval_ks", (10, 0), ">= 1"), ("retrieval_ks", (-5,), ">= 1"), ("retrieval_ks", (), "non-empty"),
    ("linear_l2", -1.0, ">= 0"), ("linear_steps", 0, ">= 1"),
    ("holdout_fraction", 0.0, r"in \(0, 1\)"), ("holdout_fraction", 1.0, r"in \(0, 1\)"),
    ("holdout_fraction", 1.5, r"in \(0, 1\)"), ("seed", -1, ">= 0"),
    ("shortlist_dim", 0, ">= 1"), ("shortlist_size", -3, ">= 1"),
    ("funnel_dims", (32, 16, 64, 128, 256), "strictly increasing"),
    ("funnel_dims", (16, 16, 64, 128, 256), "strictly increasing"),
    ("funnel_shortlists", (200, 100, 150, 25, 10), "non-increasing"),
    ("funnel_shortlists", (200, 100, 0, 0, 0), ">= 1"),
    ("funnel_shortlists", (200, 100), "one shortlist per stage"),
    ("batch_size", 0, ">= 1"), ("batch_size", -8, ">= 1"),
    ("train_split", "", "non-empty string"), ("baseline_workdir", 5, "string"),
    ("data", {"data_dir": "/x"}, "dataset name"),
    ("adaptive_splits", 0, ">= 1"), ("adaptive_method", "exhaustive", "'greedy' or 'pairwise'"),
    ("retrieval_ann", "flat", r"one of \('hnsw', 'ivf'\)"),
    ("max_in_memory_gb", -1.0, ">= 0"), ("max_in_memory_gb", "2", ">= 0"),
    ("embeddings_dir", "", "non-empty string"), ("block_rows", 0, ">= 1"),
    ("linear_epochs", 0, ">= 1"), ("linear_batch_size", 0, ">= 1"),
]


@pytest.mark.parametrize("field,value,rule", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_probe_settings_are_refused_naming_field_and_range(field, value, rule):
  with pytest.raises(ConfigError, match=rf"config\.probe\.{field}.*{rule}") as error:
    probe_settings.check_probe_settings({field: value})
  assert "\n" not in str(error.value)


def test_unknown_probe_fields_are_refused():
  with pytest.raises(ConfigError, match=r"Unknown config.probe field\(s\) \['knn'\]"):
    probe_settings.check_probe_settings({"knn": 3})


def _workdir_without_checkpoint(tmp_path, **changes):
  """A workdir holding only the config.json a quickstart:runlocal run writes."""
  config = load_config(os.path.join(ROOT, "configs", "quickstart.py"), "runlocal")
  for key, value in changes.items():
    config[key] = value
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config.to_dict(), f)
  return config


def test_bad_settings_are_refused_before_the_checkpoint_is_touched(tmp_path):
  """Old code went on to look for a checkpoint (or embedded, then reported nonsense)."""
  config = _workdir_without_checkpoint(tmp_path)
  config.probe.knn_k = 0
  with pytest.raises(ConfigError, match=r"config\.probe\.knn_k=0: must be an integer >= 1"):
    probe.run_probe(str(tmp_path), config, log=lambda _: None)


def test_model_field_overrides_that_differ_from_the_checkpoint_are_refused(tmp_path):
  saved = _workdir_without_checkpoint(tmp_path, head="ff")
  workdir = str(tmp_path)
  with pytest.raises(probe.ProbeOverrideError) as error:
    probe.check_overrides({"nesting.dims": (8, 4)}, saved, workdir)
  message = str(error.value)
  assert "--config.nesting.dims=(8, 4)" in message and "nesting.dims=(2, 4, 8, 16, 32, 64)" in message
  assert "\n" not in message
  for overrides in ({"head": "mrl"}, {"model.width": 16}, {"compute_dtype": "bfloat16"},
                    {"lr": 0.5}, {"ff_dim": 8}, {"no_such_field": 1}):
    with pytest.raises(probe.ProbeOverrideError, match=f"--config.{next(iter(overrides))}="):
      probe.check_overrides(overrides, saved, workdir)
  # Accepted: no overrides (the README's command), values equal to the checkpoint's
  # (e.g. the training command's flags repeated), and every data / probe field.
  probe.check_overrides({}, saved, workdir)
  probe.check_overrides({"head": "ff", "nesting.dims": (2, 4, 8, 16, 32, 64), "model.width": 8},
                        saved, workdir)
  probe.check_overrides({"data.data_dir": "/d", "data.image_size": 24, "probe.knn_k": 3,
                         "probe.baseline_workdir": "/ff"}, saved, workdir)


def test_main_refuses_a_model_override_in_probe_mode_in_one_line(tmp_path):
  _workdir_without_checkpoint(tmp_path)
  out = subprocess.run(
      [sys.executable, "-m", "mrl_jax.main", f"--config={ROOT}/configs/quickstart.py",
       f"--workdir={tmp_path}", "--mode=probe", "--config.nesting.dims=(8,4)"],
      cwd=ROOT, env=subprocess_env(1), timeout=300, capture_output=True, text=True)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("error: --config.nesting.dims=(8, 4) cannot take effect in "
                              "--mode=probe"), out.stderr[-2000:]
  assert "nesting.dims=(2, 4, 8, 16, 32, 64)" in lines[-1]
