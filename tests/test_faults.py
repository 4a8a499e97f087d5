"""Faults: bad examples met while training, and training processes killed mid-run.

Bad data is real: `MrlFaultyDigits` below writes a small TFDS array_record
dataset whose image bytes are truncated, not an image, or of the wrong shape,
so the errors come from TFDS decoding the records. Labels out of range cannot
be written through a ClassLabel, so they come from a wrapped source.

Kills are real too: `python -m mrl_jax.main` is SIGKILLed (at a random step,
or while an async checkpoint save is in flight) and the same command is run
again; every logged loss must equal an uninterrupted run's to the last bit.
The child processes share a persistent XLA compilation cache, so only the
first one compiles (the compiled programs, hence the numbers, are the same).
"""

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from conftest import subprocess_env
from mrl_jax import inference, train
from mrl_jax.checkpointing import COMMIT_MARKER, Checkpointer, CheckpointMismatchError
from mrl_jax.errors import ConfigError
from mrl_jax.data import digits, pipeline, sources
from test_train import QUICKSTART, ROOT, quickstart_config

# ---------------------------------------------------------------- a dataset with bad bytes

FAULTY = "mrl_faulty_digits"
SIZES = {"train": 160, "test": 120}
# Index in the split -> what is wrong with its stored image.
BAD = {"train": {5: "truncated", 17: "not_an_image", 40: "rgb"},
       "test": {2: "truncated", 50: "not_an_image"}}


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


class MrlFaultyDigits(tfds.core.GeneratorBasedBuilder):
  """sklearn digits (8x8x1 PNG) with a few broken images; stored in generation order."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,  # Example i of a split is the i-th generated.
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SIZES}

  def _generate_examples(self, split):
    images, labels = digits.load_arrays()
    offset = 0 if split == "train" else 1000
    for i in range(SIZES[split]):
      image = images[offset + i]
      data = _png(image[:, :, 0])
      problem = BAD[split].get(i)
      if problem == "truncated":
        data = data[:len(data) // 2]
      elif problem == "not_an_image":
        data = b"these bytes are not an image"
      elif problem == "rgb":  # Decodes fine, but to 3 channels where 1 is declared.
        data = _png(np.repeat(image, 3, axis=-1))
      # The Image feature stores given bytes as they are: the damage reaches the files.
      yield i, {"image": data, "label": int(labels[offset + i])}


@pytest.fixture(scope="module")
def faulty_data_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("faulty_tfds"))
  MrlFaultyDigits(data_dir=data_dir).download_and_prepare(file_format="array_record")
  return data_dir


def faulty_cfg(data_dir, **overrides) -> ml_collections.ConfigDict:
  cfg = dict(name=FAULTY, data_dir=data_dir, image_size=16, train_augment="resize",
             flip=False, eval_crop_fraction=1.0, prefetch=2)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


# ---------------------------------------------------------------- a wrapped source with ids


class _Source:
  """Examples whose pixels all equal their id (so batches show which example filled a slot)."""

  def __init__(self, n: int, bad: dict[int, dict]):
    self.examples = [{"image": np.full((8, 8, 1), i, np.uint8), "label": i % 10, **bad.get(i, {})}
                     for i in range(n)]

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]


def use_source(monkeypatch, digits_data_dir, source):
  _, info = sources.open_source("mrl_digits", "train", digits_data_dir)  # 10 classes, 8x8x1.
  monkeypatch.setattr(sources, "open_source", lambda *a, **k: (source, info))


def id_cfg(digits_data_dir, **overrides) -> ml_collections.ConfigDict:
  cfg = dict(name="mrl_digits", data_dir=digits_data_dir, image_size=8, train_augment="resize",
             flip=False, eval_crop_fraction=1.0, mean=(0.0,), std=(1.0,), prefetch=2,
             on_bad_example="skip")
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def ids(batch) -> list[int]:
  return [int(round(v)) for v in batch["image"][:, 0, 0, 0] * 255]


# ---------------------------------------------------------------- on_bad_example="stop"


@pytest.mark.parametrize("split, message", [
    ("train", "mrl_faulty_digits/train example 5 cannot be read or decoded "
              "(OSError: image file is truncated)."),
    ("train[6:]", "mrl_faulty_digits/train[6:] example 11 cannot be read or decoded "
                  "(UnidentifiedImageError: cannot identify image file"),
    ("train[18:]", "mrl_faulty_digits/train[18:] example 22: image 'image' is uint8 [8, 8, 3], "
                   "expected uint8 [8, 8, 1]."),
])
def test_stop_names_the_bad_example_and_the_fix(faulty_data_dir, split, message):
  cfg = faulty_cfg(faulty_data_dir)
  with pytest.raises(pipeline.DataError) as e:
    list(pipeline.make_eval_batches(cfg, global_batch_size=40, split=split))
  assert message in str(e.value)
  assert 'set data.on_bad_example="skip"' in str(e.value) and "\n" not in str(e.value)
  # Training meets them in shuffled order, through the prefetch thread: still a DataError.
  with pytest.raises(pipeline.DataError, match=r"mrl_faulty_digits/train example (5|17|40)\b"):
    iterator = pipeline.make_train_iterator(cfg, global_batch_size=32, seed=0)
    for _ in range(SIZES["train"] // 32):
      next(iterator)


def test_bad_on_bad_example_value_is_a_config_error(faulty_data_dir):
  with pytest.raises(ConfigError, match="data.on_bad_example='ignore'"):
    pipeline.dataset_info(faulty_cfg(faulty_data_dir, on_bad_example="ignore"))


# ---------------------------------------------------------------- on_bad_example="skip"


def expected_slots(n: int, bad: set[int], seed: int, positions: int) -> tuple[list[int], list[int]]:
  """The documented rule: a bad example's slot takes the next good one of the same epoch."""
  order = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
  filled, skipped = [], []
  for position in range(positions):
    start, offset = position - position % n, position % n
    for passed in range(n):
      index = order[start + (offset + passed) % n]
      if index not in bad:
        filled.append(index)
        skipped.append(passed)
        break
  return filled, skipped


def test_skip_fills_each_slot_from_its_position(digits_data_dir, monkeypatch, caplog):
  n, batch, seed = 30, 6, 7
  order = grain.MapDataset.range(n).shuffle(seed=seed)
  # Two neighbours in epoch 0's order, so one slot passes over two bad examples.
  bad = {order[3]: {"label": 10}, order[4]: {"image": np.zeros((8, 8, 3), np.uint8)},
         order[20]: {"label": -1}}
  use_source(monkeypatch, digits_data_dir, _Source(n, bad))
  cfg = id_cfg(digits_data_dir)
  steps = 3 * n // batch  # Three epochs.
  filled, skipped = expected_slots(n, set(bad), seed, steps * batch)

  caplog.set_level(logging.WARNING)
  monkeypatch.setattr(pipeline, "_LOGGED_BAD", set())  # Other tests' bad examples were logged.
  iterator = pipeline.make_train_iterator(cfg, global_batch_size=batch, seed=seed)
  batches = [next(iterator) for _ in range(steps)]
  assert all(b["image"].shape == (batch, 8, 8, 1) and b.keys() == {"image", "label"}
             for b in batches)
  assert sum((ids(b) for b in batches), []) == filled
  assert not set(filled) & set(bad)
  assert all(b["label"].tolist() == [i % 10 for i in ids(b)] for b in batches)
  # Epoch 0: position 3 passes over two, positions 4 and 20 over one each.
  assert skipped[3] == 2 and sum(skipped[:n]) == 4
  assert pipeline.data_metrics(iterator) == {"data/skipped_examples": sum(skipped)}
  # Logged once per example, with its index, however often it was met.
  logged = [r.getMessage() for r in caplog.records if "Skipping a bad example" in r.getMessage()]
  assert sorted(int(re.search(r"example (\d+)", m).group(1)) for m in logged) == sorted(bad)

  # Resume from a saved state: the same batches, and the count covers this run only.
  resumed = pipeline.make_train_iterator(cfg, global_batch_size=batch, seed=seed)
  resumed.set_state({"next_index": 7})
  assert [ids(next(resumed)) for _ in range(steps - 7)] == [ids(b) for b in batches[7:]]
  assert pipeline.data_metrics(resumed) == {"data/skipped_examples": sum(skipped[7 * batch:])}

  # Two processes read the halves of the one-process global batches.
  from jax.experimental import multihost_utils
  halves = []
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
    local = pipeline.make_train_iterator(cfg, global_batch_size=batch, seed=seed)
    halves.append([ids(next(local)) for _ in range(steps)])
  assert [a + b for a, b in zip(*halves)] == [ids(b) for b in batches]


def test_stop_mode_reports_no_data_metrics(digits_data_dir, monkeypatch):
  use_source(monkeypatch, digits_data_dir, _Source(12, {}))
  iterator = pipeline.make_train_iterator(id_cfg(digits_data_dir, on_bad_example="stop"),
                                          global_batch_size=4, seed=0)
  assert ids(next(iterator)) and pipeline.data_metrics(iterator) == {}


def test_all_bad_examples_fail_instead_of_searching_forever(digits_data_dir, monkeypatch):
  use_source(monkeypatch, digits_data_dir, _Source(8, {i: {"label": 99} for i in range(8)}))
  with pytest.raises(pipeline.DataError, match=r"Every one of the 8 examples of mrl_digits/train "
                                               r"is bad \(the last: .*label 99 is out of range"):
    next(pipeline.make_train_iterator(id_cfg(digits_data_dir), global_batch_size=4, seed=0))
  # A large split is not searched to the end: a long run of bad examples is broken data.
  monkeypatch.setattr(pipeline, "MAX_CONSECUTIVE_BAD", 5)
  use_source(monkeypatch, digits_data_dir, _Source(50, {i: {"label": 99} for i in range(50)}))
  with pytest.raises(pipeline.DataError, match="5 examples in a row of mrl_digits/train are bad"):
    next(pipeline.make_train_iterator(id_cfg(digits_data_dir), global_batch_size=4, seed=0))


def test_eval_masks_bad_examples_out(faulty_data_dir, digits_data_dir, monkeypatch):
  # Real bad bytes: rows 2 and 50 of the test split are masked out; the others are there.
  batches = list(pipeline.make_eval_batches(faulty_cfg(faulty_data_dir, on_bad_example="skip"),
                                            global_batch_size=50))
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert mask.shape == (150,) and mask.sum() == SIZES["test"] - len(BAD["test"])
  assert np.flatnonzero(mask[:SIZES["test"]] == 0).tolist() == sorted(BAD["test"])
  _, all_labels = digits.load_arrays()
  good = [i for i in range(SIZES["test"]) if i not in BAD["test"]]
  np.testing.assert_array_equal(labels[good], all_labels[1000:1000 + SIZES["test"]][good])

  # A label out of range is masked too (never counted as a label-0 example).
  use_source(monkeypatch, digits_data_dir, _Source(10, {3: {"label": 10}}))
  batch, = pipeline.make_eval_batches(id_cfg(digits_data_dir), global_batch_size=10)
  assert batch["mask"].tolist() == [1.0] * 3 + [0.0] + [1.0] * 6
  assert ids(batch)[:3] + ids(batch)[4:] == [0, 1, 2, 4, 5, 6, 7, 8, 9]


# ---------------------------------------------------------------- the real train loop

TOTAL_STEPS, EVERY = 40, 5


@pytest.fixture(scope="module")
def child_env(tmp_path_factory) -> dict[str, str]:
  env = subprocess_env(1)
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def main_command(workdir, data_dir, *flags) -> list[str]:
  return [sys.executable, "-m", "mrl_jax.main", f"--config={QUICKSTART}:runlocal",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          f"--config.total_steps={TOTAL_STEPS}", f"--config.checkpoint_every_steps={EVERY}",
          "--config.log_every_steps=1", *flags]


def run(command, env, log_path) -> str:
  with open(log_path, "w") as log:
    result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=400)
  with open(log_path) as f:
    text = f.read()
  assert result.returncode == 0, text[-3000:]
  return text


def metric_rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def complete_steps(checkpoint_dir) -> list[int]:
  return sorted(int(n) for n in os.listdir(checkpoint_dir)
                if n.isdigit() and os.path.exists(os.path.join(checkpoint_dir, n, COMMIT_MARKER)))


@pytest.fixture(scope="module")
def reference(digits_data_dir, child_env, tmp_path_factory):
  """An uninterrupted run: {step: train/loss}, and its workdir (not to be modified)."""
  workdir = tmp_path_factory.mktemp("reference")
  run(main_command(workdir, digits_data_dir), child_env, workdir / "log.txt")
  losses = {r["step"]: r["train/loss"] for r in metric_rows(workdir) if "train/loss" in r}
  assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
  return losses, workdir


@pytest.mark.slow
def test_skip_trains_through_and_reports_the_count(faulty_data_dir, child_env, tmp_path):
  run(main_command(tmp_path, faulty_data_dir, f"--config.data.name={FAULTY}",
                   "--config.data.on_bad_example=skip"), child_env, tmp_path / "log.txt")
  rows = [r for r in metric_rows(tmp_path) if "train/loss" in r]
  assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  # What the loop logged is what the pipeline skips in the same batches.
  config = quickstart_config(faulty_data_dir, **{"data.name": FAULTY,
                                                 "data.on_bad_example": "skip"})
  iterator = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                          seed=config.seed)
  expected = []
  for _ in rows:
    next(iterator)
    expected.append(pipeline.data_metrics(iterator)["data/skipped_examples"])
  assert [r["data/skipped_examples"] for r in rows] == expected
  epochs = TOTAL_STEPS * config.batch_size // SIZES["train"]
  assert expected[-1] >= epochs * len(BAD["train"])  # Every epoch meets every bad one.
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["eval_examples"] == SIZES["test"] - len(BAD["test"])
  with open(tmp_path / "log.txt") as f:
    log = f.read()
  for split, bad in BAD.items():
    for index in bad:
      assert log.count(f"{FAULTY}/{split} example {index}") == 1, (split, index)


@pytest.mark.slow
def test_stop_ends_the_run_with_one_line(faulty_data_dir, child_env, tmp_path):
  result = subprocess.run(main_command(tmp_path, faulty_data_dir, f"--config.data.name={FAULTY}"),
                          cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=400)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in result.stderr
  assert re.search(r"mrl_faulty_digits/train example (5|17|40)\b", errors[0])
  assert 'data.on_bad_example="skip"' in errors[0]
  assert not complete_steps(tmp_path / "checkpoints")


# ---------------------------------------------------------------- SIGKILL and resume

_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def _stopped(pid: int) -> bool:
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0] == "T"


def kill_during_a_save(process, checkpoint_dir, min_step: int) -> int:
  """SIGKILLs `process` while a save of a step >= min_step is in flight; returns that step.

  An in-flight save is a `<step>.orbax-checkpoint-tmp` folder (Orbax renames it
  to `<step>` once complete). Seeing one, the process is frozen with SIGSTOP, so
  the check that the save is still unfinished cannot race with the rename; if
  it has finished, the process goes on and the next save is tried.
  """
  deadline = time.time() + 400
  while process.poll() is None and time.time() < deadline:
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    steps = [int(m.group(1)) for m in map(_TMP.match, names) if m and int(m.group(1)) >= min_step]
    if steps:
      step = min(steps)
      os.kill(process.pid, signal.SIGSTOP)
      while not _stopped(process.pid):
        time.sleep(0.001)
      if not os.path.exists(os.path.join(checkpoint_dir, str(step))):
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        return step
      os.kill(process.pid, signal.SIGCONT)
      min_step = step + 1
    time.sleep(0.002)
  pytest.fail(f"No save was caught in flight (exit code {process.poll()}).")


def kill_after_step(process, log_path, step: int) -> None:
  """SIGKILLs `process` as soon as its log shows training step `step`."""
  deadline = time.time() + 400
  while process.poll() is None and time.time() < deadline:
    with open(log_path) as f:
      if f"step {step}/{TOTAL_STEPS} |" in f.read():
        process.kill()
        process.wait()
        return
    time.sleep(0.01)
  pytest.fail(f"Step {step} never logged (exit code {process.poll()}).")


def plant_partial_checkpoints(checkpoint_dir, complete: int) -> tuple[str, str]:
  """Leaves what interrupted saves or copies leave: a temporary folder, and a step
  folder without its commit marker and with a truncated file. Both are newer than
  `complete` and made from it, so they would restore if they were picked up."""
  source = os.path.join(checkpoint_dir, str(complete))
  temporary = f"{complete + 15}.orbax-checkpoint-tmp"
  shutil.copytree(source, os.path.join(checkpoint_dir, temporary))
  unmarked = str(complete + 10)
  shutil.copytree(source, os.path.join(checkpoint_dir, unmarked))
  os.remove(os.path.join(checkpoint_dir, unmarked, COMMIT_MARKER))
  with open(os.path.join(checkpoint_dir, unmarked, "state", "manifest.ocdbt"), "r+b") as f:
    f.truncate(8)
  return temporary, unmarked


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["during_a_save", "at_a_random_step"])
def test_sigkill_then_rerun_resumes_from_the_last_complete_checkpoint(
    moment, reference, digits_data_dir, child_env, tmp_path):
  expected, _ = reference
  command = main_command(tmp_path, digits_data_dir)
  checkpoint_dir = tmp_path / "checkpoints"
  log_path = tmp_path / "killed.txt"
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, cwd=ROOT, env=child_env, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
      if moment == "during_a_save":
        in_flight = kill_during_a_save(process, checkpoint_dir, min_step=2 * EVERY)
        what = f"killed while saving step {in_flight}"
      else:
        kill_step = random.Random().randint(12, 30)
        kill_after_step(process, log_path, kill_step)
        what = f"killed after step {kill_step}"
    finally:
      if process.poll() is None:
        process.kill()
        process.wait()

  complete = complete_steps(checkpoint_dir)
  assert complete, what
  last = complete[-1]
  if moment == "during_a_save":
    # The kill left the save unfinished; the one before it is the newest complete.
    assert os.path.isdir(checkpoint_dir / f"{in_flight}.orbax-checkpoint-tmp"), what
    assert last == in_flight - EVERY, (what, complete)
    planted = ()
  else:
    planted = plant_partial_checkpoints(checkpoint_dir, last)
  checkpointer = Checkpointer(str(tmp_path), every_steps=EVERY)
  assert checkpointer.latest_step() == last, (what, sorted(os.listdir(checkpoint_dir)))
  checkpointer.close()

  rows_before = len(metric_rows(tmp_path))
  log = run(command, child_env, tmp_path / "rerun.txt")  # The same command again.
  assert f"Resumed from {checkpoint_dir}/{last} (step {last})." in log, what
  rows = metric_rows(tmp_path)
  resumed = [r["step"] for r in rows[rows_before:] if "train/loss" in r]
  assert resumed == list(range(last + 1, TOTAL_STEPS + 1)), what  # Lost only steps after `last`.
  for r in rows:  # The killed run's steps and the resumed run's, all bitwise the reference.
    if "train/loss" in r:
      assert r["train/loss"] == expected[r["step"]], (what, r["step"])
  assert complete_steps(checkpoint_dir)[-2:] == [TOTAL_STEPS - EVERY, TOTAL_STEPS]
  if planted:
    _, unmarked = planted
    assert os.path.isdir(checkpoint_dir / f"{unmarked}.incomplete"), os.listdir(checkpoint_dir)


def test_checkpointer_ignores_and_sets_aside_incomplete_folders(tmp_path):
  state = {"w": np.arange(4.0, dtype=np.float32)}
  checkpointer = Checkpointer(str(tmp_path), every_steps=1, keep=3)
  checkpointer.save(3, state, None, {"a": 1})
  checkpointer.close()
  directory = tmp_path / "checkpoints"
  plant_partial_checkpoints(directory, 3)  # "13" unmarked, "18.orbax-checkpoint-tmp".
  checkpointer = Checkpointer(str(tmp_path), every_steps=1, keep=3)
  assert checkpointer.latest_step() == 3
  checkpointer.save(13, {"w": state["w"] + 1}, None, {"a": 1})  # Step 13 is written anew.
  checkpointer.close()
  checkpointer = Checkpointer(str(tmp_path), every_steps=1, keep=3)
  assert checkpointer.latest_step() == 13 and complete_steps(directory) == [3, 13]
  assert os.path.isdir(directory / "13.incomplete")
  target = {"w": jax.ShapeDtypeStruct((4,), np.float32)}
  restored = checkpointer.restore(13, target, None, {"a": 1})
  np.testing.assert_array_equal(restored["w"], state["w"] + 1)
  checkpointer.close()


# ---------------------------------------------------------------- a checkpoint from another setup


def _tree_digest(root) -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
  return out


@pytest.mark.slow
@pytest.mark.parametrize("overrides, difference", [
    ({"model.depth": 34}, "model.depth: checkpoint has 18, config has 34"),
    ({"nesting.dims": (4, 8, 16, 32, 64)},
     "dims: checkpoint has [2, 4, 8, 16, 32, 64], config has [4, 8, 16, 32, 64]"),
])
def test_checkpoint_of_another_setup_is_refused_and_left_as_it_is(
    reference, digits_data_dir, tmp_path, overrides, difference):
  _, reference_dir = reference
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  shutil.copytree(reference_dir / "checkpoints", workdir / "checkpoints")
  shutil.copy(reference_dir / "config.json", workdir / "config.json")
  before = _tree_digest(workdir / "checkpoints")
  with open(workdir / "config.json") as f:
    config_before = f.read()
  config = quickstart_config(digits_data_dir, total_steps=TOTAL_STEPS,
                             checkpoint_every_steps=EVERY, **overrides)
  with pytest.raises(CheckpointMismatchError) as e:
    train.train_and_evaluate(config, str(workdir))
  message = str(e.value)
  assert "\n" not in message and difference in message
  assert message.count("checkpoint has") == 1  # Only what differs.
  assert _tree_digest(workdir / "checkpoints") == before
  with open(workdir / "config.json") as f:  # Probing still rebuilds the trained model.
    assert f.read() == config_before


def test_workdir_with_only_an_incomplete_checkpoint_has_none(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump(quickstart_config(None).to_dict(), f)
  checkpointer = Checkpointer(str(tmp_path), every_steps=1)
  checkpointer.save(4, {"w": np.zeros(2, np.float32)}, None, {"a": 1})
  checkpointer.close()
  os.remove(tmp_path / "checkpoints" / "4" / COMMIT_MARKER)
  with pytest.raises(inference.CheckpointNotFoundError, match="No complete checkpoint in"):
    inference.load(str(tmp_path))
