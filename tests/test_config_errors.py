"""Bad config fields and overrides stop with one line before anything compiles."""

import os
import subprocess
import sys

import ml_collections
import pytest

from conftest import subprocess_env
from mrl_jax.config_checks import check_config, unknown_field
from mrl_jax.errors import ConfigError
from test_train import QUICKSTART, ROOT, quickstart_config


@pytest.mark.parametrize("field, value, match", [
    ("on_nonfinite", "ignore", r"config.on_nonfinite='ignore': use one of \('stop', 'skip'\)"),
    ("max_nonfinite_steps", -1, r"config.max_nonfinite_steps=-1: use an integer >= 0"),
    ("log_every_steps", 0, r"config.log_every_steps=0: use an integer >= 1"),
    ("eval_every_steps", -5, r"config.eval_every_steps=-5"),
    ("checkpoint_every_steps", 2.5, r"config.checkpoint_every_steps=2.5"),
    ("keep_checkpoints", 0, r"config.keep_checkpoints=0: use an integer >= 1"),
    ("total_steps", -1, r"config.total_steps=-1"),
    ("total_epochs", -1.0, r"config.total_epochs=-1.0"),
])
def test_loop_fields_are_checked(field, value, match):
  # Rebuilt, not assigned: a config file may set a field to any type.
  config = ml_collections.ConfigDict({**quickstart_config(None).to_dict(), field: value})
  with pytest.raises(ConfigError, match=match) as e:
    check_config(config, num_devices=1, process_count=1)
  assert "\n" not in str(e.value)


def test_the_shipped_config_passes():
  check_config(quickstart_config(None), num_devices=1, process_count=1)


def test_unknown_field_names_the_closest_fields():
  config = quickstart_config(None)
  assert unknown_field(config, "total_steps") is None
  assert unknown_field(config, "model.depth") is None
  assert "config.total_steps" in unknown_field(config, "totl_steps")
  message = unknown_field(config, "model.dpth")
  assert "no field config.model.dpth" in message and "config.model.depth" in message
  assert "no field config.modle" in unknown_field(config, "modle.depth")


def _main(tmp_path, *flags):
  return subprocess.run(
      [sys.executable, "-m", "mrl_jax.main", f"--config={QUICKSTART}:runlocal",
       f"--workdir={tmp_path}", f"--config.data.data_dir={tmp_path / 'tfds'}", *flags],
      cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag, expected", [
    ("--config.totl_steps=3", ["config.totl_steps", "config.total_steps"]),
    ("--config.optimizer.momentun=0.5", ["config.optimizer.momentum"]),
    ("--config.total_steps=abc", ["--config.total_steps=abc", "type"]),
    ("--config.keep_checkpoints=0", ["config.keep_checkpoints=0: use an integer >= 1"]),
])
def test_bad_override_is_one_line_and_exit_2(tmp_path, flag, expected):
  result = _main(tmp_path, flag)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  for text in expected:
    assert text in lines[0], lines[0]
  # Stopped before any data was built or anything compiled or trained.
  assert not (tmp_path / "tfds").exists() and not (tmp_path / "checkpoints").exists()
  assert not (tmp_path / "metrics.jsonl").exists()
