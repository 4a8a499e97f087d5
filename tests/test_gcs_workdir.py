"""A gs:// workdir, end to end, against a GCS emulator that nothing outside the machine sees.

The checks themselves are in tests/gcs_workdir_checks.py; this test runs them in a
pytest process of their own inside a new network namespace with only `lo`
(`unshare -n`), so that no request of theirs, credential and metadata look-ups
included, can leave the machine. Skipped, with the reason, where such a namespace
cannot be made (not root, no CAP_SYS_ADMIN) or the emulator is not installed.
"""

from __future__ import annotations

import os
import re
import sys

import jax
import pytest

import gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = os.path.join("tests", "gcs_workdir_checks.py")
NUM_CHECKS = 6  # The tests in CHECKS: every one must pass, none may be skipped.


@pytest.mark.slow
def test_gcs_workdir_in_a_loopback_only_namespace(quickstart_runlocal_run, digits_data_dir,
                                                  tmp_path):
  reason = gcs_emulator.loopback_namespace_unavailable() or gcs_emulator.emulator_unavailable()
  if reason:
    pytest.skip(reason)
  reference, _, _ = quickstart_runlocal_run  # Uninterrupted, local: what the bucket run must equal.
  # This process's environment, as the reference run saw it (same XLA flags, so the same
  # programs), and its compilation cache: the children load the reference run's
  # compiled train and eval steps instead of compiling them again (~40 CPU s).
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  env.update({gcs_emulator.REFERENCE_ENV: str(reference),
              gcs_emulator.DATA_DIR_ENV: digits_data_dir,
              gcs_emulator.XLA_CACHE_ENV: jax.config.jax_compilation_cache_dir or ""})
  result = gcs_emulator.run_in_loopback_namespace(
      [sys.executable, "-m", "pytest", "-q", "-rfEs", "--durations=0", "-p", "no:cacheprovider", CHECKS,
       f"--basetemp={tmp_path / 'checks'}"], env=env, cwd=ROOT, timeout=1200)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-8000:]
  print(result.stdout[-3000:])  # The checks' durations, shown with -s or on failure.
  summary = result.stdout.strip().splitlines()[-1]  # e.g. "5 passed in 41.2s"
  assert re.fullmatch(rf"=* *{NUM_CHECKS} passed(, \d+ warnings?)? in .*", summary), output[-4000:]
