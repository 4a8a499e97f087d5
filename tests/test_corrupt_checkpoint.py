"""Committed checkpoints made unreadable afterwards, and a cut-short config.json.

Real files: a tiny run trains once (steps 3 and 6 saved); each test works on a
copy of its workdir in which the newest step's Orbax data is damaged the way a
disk or an interrupted sync damages it (a data file cut in half, or the OCDBT
manifest gone) while its commit marker stays. Resuming must continue from step
3 with the uninterrupted run's losses to the last bit, and probing (which
restores through `inference.load`) must restore step 3; the damaged folder is
kept as `6.corrupt`, never deleted.
"""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from mrl_jax import inference, train
from mrl_jax.checkpointing import CORRUPT_SUFFIX, Checkpointer
from test_train import quickstart_config, train_losses

STEPS, EVERY = 6, 3


def _config(data_dir):
  # keep_checkpoints=2: the resumed run saves step 6 anew beside step 3, and the
  # set-aside folder does not count towards the two kept.
  return quickstart_config(data_dir, total_steps=STEPS, checkpoint_every_steps=EVERY,
                           keep_checkpoints=2)


@pytest.fixture(scope="module")
def trained(digits_data_dir, quickstart_runlocal_run):
  """(workdir, {step: loss}) of an uninterrupted run; copy it, never modify it. The
  session's quickstart:runlocal run (tests/conftest.py) is this config's run."""
  workdir, config, _ = quickstart_runlocal_run
  assert config.to_dict() == _config(digits_data_dir).to_dict()
  workdir = pathlib.Path(workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  return workdir, train_losses(workdir)


def _damage(state_dir, how: str) -> None:
  if how == "truncated_data_file":
    # Which OCDBT data file holds which array is TensorStore's business (a small
    # checkpoint reads from state/d/, a larger one from ocdbt.process_0/d/):
    # every data file is cut in half.
    for folder, _, names in os.walk(state_dir):
      if os.path.basename(folder) == "d":
        for name in names:
          path = os.path.join(folder, name)
          with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
  else:
    os.remove(os.path.join(state_dir, "manifest.ocdbt"))


def _damaged_copy(trained, tmp_path, how: str):
  source, _ = trained
  workdir = tmp_path / "workdir"
  shutil.copytree(source, workdir)
  _damage(workdir / "checkpoints" / "6" / "state", how)
  assert os.path.exists(workdir / "checkpoints" / "6" / "commit_success.txt")
  return workdir


HOW = ["truncated_data_file", "no_manifest"]


@pytest.mark.parametrize("how", HOW)
def test_probe_restores_the_newest_readable_step(trained, tmp_path, capsys, how):
  workdir = _damaged_copy(trained, tmp_path, how)
  model = inference.load(str(workdir))
  assert model.step == 3
  lines = [l for l in capsys.readouterr().out.splitlines() if "unreadable" in l]
  assert len(lines) == 1 and "step 6" in lines[0] and "6.corrupt" in lines[0], lines
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6" + CORRUPT_SUFFIX]
  # Step 3's parameters, as a direct restore of the untouched run reads them.
  source, _ = trained
  reference = inference.load(str(source), step=3)
  for a, b in zip(jax_leaves(model.params), jax_leaves(reference.params)):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_probe_with_no_readable_step_is_one_line(trained, tmp_path):
  workdir = _damaged_copy(trained, tmp_path, "no_manifest")
  _damage(workdir / "checkpoints" / "3" / "state", "no_manifest")
  with pytest.raises(inference.CheckpointNotFoundError, match="set aside: 6, 3") as e:
    inference.load(str(workdir))
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3.corrupt", "6.corrupt"]


def test_asking_for_an_unreadable_step_is_one_line(trained, tmp_path):
  workdir = _damaged_copy(trained, tmp_path, "no_manifest")
  with pytest.raises(inference.CheckpointUnreadableError, match="step 6") as e:
    inference.load(str(workdir), step=6)
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_resume_continues_from_the_newest_readable_step(trained, digits_data_dir, tmp_path,
                                                        capsys):
  _, expected = trained
  workdir = _damaged_copy(trained, tmp_path, "truncated_data_file")
  with open(workdir / "config.json", "r+") as f:  # Training does not need it; it rewrites it.
    f.truncate(10)
  rows_before = len(open(workdir / "metrics.jsonl").readlines())
  capsys.readouterr()
  summary = train.train_and_evaluate(_config(digits_data_dir), str(workdir))
  out = capsys.readouterr().out
  assert summary["steps"] == STEPS
  lines = [l for l in out.splitlines() if "unreadable" in l]
  assert len(lines) == 1 and "step 6" in lines[0], out
  assert f"Resumed from {workdir}/checkpoints/3 (step 3)." in out
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f.readlines()[rows_before:]]
  resumed = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  assert sorted(resumed) == [4, 5, 6]
  for step, loss in resumed.items():  # CPU, same batches: identical to the last bit.
    assert loss == expected[step], step
  # Step 3 survived the resumed run's garbage collection; the damaged folder is kept.
  names = sorted(os.listdir(workdir / "checkpoints"))
  assert names == ["3", "6", "6" + CORRUPT_SUFFIX], names
  with open(workdir / "config.json") as f:
    assert json.load(f)["total_steps"] == STEPS


def test_truncated_config_json_is_one_line(trained, tmp_path):
  source, _ = trained
  workdir = tmp_path / "workdir"
  shutil.copytree(source, workdir)
  with open(workdir / "config.json", "r+") as f:
    f.truncate(100)
  with pytest.raises(inference.ConfigFileError, match="config.json is not valid JSON") as e:
    inference.load(str(workdir))
  assert "\n" not in str(e.value)


def _tiny_checkpoints(tmp_path, steps=(3, 6), keep=3):
  checkpointer = Checkpointer(str(tmp_path), every_steps=1, keep=keep)
  for step in steps:
    checkpointer.save(step, {"w": np.full(4, float(step), np.float32)}, None, {"a": 1})
  checkpointer.close()
  return tmp_path / "checkpoints"


def _target():
  import jax
  return {"w": jax.ShapeDtypeStruct((4,), np.float32)}


def test_no_readable_step_left_means_none_and_both_are_kept(tmp_path, capsys):
  directory = _tiny_checkpoints(tmp_path)
  for step in (3, 6):
    _damage(directory / str(step) / "state", "no_manifest")
  checkpointer = Checkpointer(str(tmp_path), every_steps=1)
  assert checkpointer.restore_latest(_target(), None, {"a": 1}) == (None, None)
  checkpointer.close()
  assert sorted(os.listdir(directory)) == ["3.corrupt", "6.corrupt"]
  lines = [l for l in capsys.readouterr().out.splitlines() if "unreadable" in l]
  assert [l.split("checkpoint step ")[1][0] for l in lines] == ["6", "3"]


def test_a_checkpoint_of_another_setup_is_refused_not_set_aside(tmp_path):
  from mrl_jax.checkpointing import CheckpointMismatchError
  directory = _tiny_checkpoints(tmp_path)
  checkpointer = Checkpointer(str(tmp_path), every_steps=1)
  with pytest.raises(CheckpointMismatchError, match="a: checkpoint has 1, config has 2"):
    checkpointer.restore_latest(_target(), None, {"a": 2})
  checkpointer.close()
  assert sorted(os.listdir(directory)) == ["3", "6"]


def test_set_aside_step_does_not_count_towards_keep(tmp_path):
  directory = _tiny_checkpoints(tmp_path, keep=2)
  _damage(directory / "6" / "state", "truncated_data_file")
  checkpointer = Checkpointer(str(tmp_path), every_steps=1, keep=2)
  step, state = checkpointer.restore_latest(_target(), None, {"a": 1})
  assert step == 3
  np.testing.assert_array_equal(state["w"], np.full(4, 3.0, np.float32))
  checkpointer.save(4, {"w": np.full(4, 4.0, np.float32)}, None, {"a": 1})
  checkpointer.close()
  # Kept: 3 and 4 (two readable ones); the damaged 6 is beside them, untouched.
  assert sorted(os.listdir(directory)) == ["3", "4", "6.corrupt"]
