"""The console of a `python -m mrl_jax.main` run shows the project's lines; library logs go
to WORKDIR/logs/train.log. One tiny training run serves every check."""

import os
import re
import subprocess
import sys

import pytest

from conftest import subprocess_env
from test_train import QUICKSTART, ROOT

# absl's record prefix ("I1201 20:29:12.194067 1399... file.py:596]") and Python's default.
pytestmark = pytest.mark.slow

LIBRARY_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]|(INFO|WARNING|DEBUG):)")


@pytest.fixture(scope="module")
def run(digits_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("console")
  # A step folder that was never completed: setting it aside is the project's warning.
  os.makedirs(workdir / "checkpoints" / "9")
  result = subprocess.run(
      [sys.executable, "-m", "mrl_jax.main", f"--config={QUICKSTART}:runlocal",
       f"--workdir={workdir}", f"--config.data.data_dir={digits_data_dir}",
       "--config.total_steps=3"],
      cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_no_library_lines_on_the_console(run):
  _, result = run
  for stream in (result.stdout, result.stderr):
    bad = [line for line in stream.splitlines() if LIBRARY_LINE.match(line)]
    assert not bad, bad[:5]


def test_the_projects_lines_stay_on_stdout(run):
  _, result = run
  out = result.stdout
  assert "step 1/3 | loss" in out and "step 3/3 | loss" in out
  assert "Validation top-1 per nesting size" in out
  warnings = [line for line in out.splitlines() if "checkpoint step 9" in line]
  assert len(warnings) == 1 and "9.incomplete" in warnings[0], out


def test_library_logs_go_to_the_log_file(run):
  workdir, _ = run
  with open(workdir / "logs" / "train.log") as f:
    log = f.read().splitlines()
  library = [line for line in log if LIBRARY_LINE.match(line)]
  # Orbax's own records of the save, in absl's format.
  assert any("checkpoint_manager.py" in line for line in library), log[:20]
  assert len(library) > 20
