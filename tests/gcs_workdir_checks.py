"""A gs:// workdir end to end, against a GCS emulator, in a loopback-only network namespace.

Not collected by a plain `pytest` run (the name does not start with test_):
tests/test_gcs_workdir.py runs this file in its own pytest process inside a network
namespace that has only `lo` (tests/gcs_emulator.py says why and what was measured),
and every test here first checks that it really is there. Run by hand (as root):

  unshare -n bash -c 'ip link set lo up && MRL_TEST_LOOPBACK_NAMESPACE=1 \
    python -m pytest -q tests/gcs_workdir_checks.py'

The training test trains `configs/quickstart.py:runlocal` with --workdir=gs://BUCKET/run,
SIGKILLs the process once checkpoint 3 is committed in the bucket, runs the same
command again (it resumes from the bucket), then `--mode=probe` on the same workdir,
and reads every result back from the bucket through etils.epath. Each logged loss, the
final parameters and the validation top-1 must equal, to the last bit, those of the
uninterrupted local run of the same config that the calling session trained
(MRL_TEST_REFERENCE_WORKDIR), so a bucket workdir changes nothing but where files go.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
BUCKET = "mrl-test"

if not gcs_emulator.in_loopback_namespace():
  pytest.skip("runs only inside a loopback-only network namespace (see tests/test_gcs_workdir.py)",
              allow_module_level=True)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """The emulator serving gs://mrl-test, and this process's clients pointed at it."""
  # First, as in mrl_jax.main: workdir_path sets gcsfs up (no listing cache) before any use.
  import mrl_jax.workdir_path  # noqa: F401
  server = gcs_emulator.GcsEmulator(str(tmp_path_factory.mktemp("gcs")), BUCKET)
  os.environ.update(gcs_emulator.client_env(server.url))
  os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  yield server
  server.stop()


def test_nothing_beyond_loopback_is_reachable():
  assert gcs_emulator.network_interfaces() == ["lo"]
  assert gcs_emulator.outside_is_unreachable()


def test_epath_and_orbax_write_into_the_emulator(emulator, tmp_path):
  import orbax.checkpoint as ocp
  from etils import epath
  text = epath.Path(f"gs://{BUCKET}/roundtrip/note.txt")
  text.write_text("hello bucket")
  assert text.read_text() == "hello bucket"
  with open(emulator.object_file("roundtrip/note.txt")) as f:  # It reached the emulator.
    assert f.read() == "hello bucket"

  tree = {"w": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
          "step": np.array(7, np.int32)}
  directory = epath.Path(f"gs://{BUCKET}/roundtrip/checkpoints")
  with ocp.CheckpointManager(directory) as manager:
    manager.save(7, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
  with ocp.CheckpointManager(directory) as manager:
    assert manager.latest_step() == 7
    restored = manager.restore(7, args=ocp.args.StandardRestore(tree))
  assert restored["w"].tobytes() == tree["w"].tobytes() and int(restored["step"]) == 7
  assert os.path.isdir(emulator.object_file("roundtrip/checkpoints/7"))


def test_workdir_paths_on_a_bucket(emulator):
  from mrl_jax import workdir_path as wp
  run = wp.workdir_path(f"gs://{BUCKET}/paths")
  assert str(run) == f"gs://{BUCKET}/paths" and not wp.is_local(run)
  wp.write_text_atomic(run / "config.json", '{"a": 1}')
  assert wp.read_text(run / "config.json") == '{"a": 1}'
  assert not (run / "config.json.tmp").exists()  # One object write, no temporary object.
  # Lines appended in two sessions (a run and its resume) read back as one file.
  for lines in (["1", "2"], ["3"]):
    appended = wp.AppendedLines(run / "lines.txt")
    for line in lines:
      appended.append(line)
    appended.close()
  assert wp.read_text(run / "lines.txt") == "1\n2\n3\n"
  # What another process adds after this one listed the folder is seen (gcsfs caches
  # listings unless told not to): a resume, or process 0 waiting for the others' files.
  assert sorted(p.name for p in run.iterdir()) == ["config.json", "lines.txt"]
  subprocess.run([sys.executable, "-c", "from etils import epath; "
                  f"epath.Path('{run}/checkpoints/6/done').write_text('x')"], check=True,
                 timeout=120)
  assert (run / "checkpoints" / "6" / "done").exists()
  assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "lines.txt"]


# ---------------------------------------------------------------- the real train loop


def _command(workdir: str, data_dir: str, *flags: str) -> list[str]:
  return [sys.executable, "-m", "mrl_jax.main", f"--config={QUICKSTART}:runlocal",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          "--config.log_every_steps=1", *flags]


def _child_env(tmp_path) -> dict[str, str]:
  # The caller's environment plus the emulator's clients, and one compilation cache:
  # the caller's (which holds the reference run's programs) or a new one.
  cache_dir = os.environ.get(gcs_emulator.XLA_CACHE_ENV) or str(tmp_path / "xla_cache")
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run(command: list[str], env: dict[str, str], log_path) -> str:
  with open(log_path, "w") as log:
    result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=600)
  text = log_path.read_text()
  assert result.returncode == 0, text[-4000:]
  return text


def _stopped(pid: int) -> bool:
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _kill_once_committed(process, marker: str, log_path) -> None:
  """SIGKILLs `process` as soon as the emulator holds the object file `marker`.

  Frozen first (SIGSTOP), so that nothing more is sent between seeing the marker
  and the kill."""
  deadline = time.monotonic() + 600
  while process.poll() is None and time.monotonic() < deadline:
    if os.path.exists(marker):
      os.kill(process.pid, signal.SIGSTOP)
      while not _stopped(process.pid):
        time.sleep(0.001)
      os.kill(process.pid, signal.SIGKILL)
      process.wait()
      return
    time.sleep(0.005)
  pytest.fail(f"{marker} never appeared before the run ended (exit code {process.poll()}): "
              f"{log_path.read_text()[-3000:]}")


def _losses(rows: list[dict]) -> dict[int, list[float]]:
  """Every logged train/loss by step (a resumed run logs a killed run's steps again)."""
  out: dict[int, list[float]] = {}
  for row in rows:
    if "train/loss" in row:
      out.setdefault(row["step"], []).append(row["train/loss"])
  return out


def _params_bytes(workdir: str) -> dict[str, bytes]:
  import jax
  from mrl_jax import inference
  model = inference.load(workdir)
  leaves = jax.tree_util.tree_leaves_with_path(model.params)
  return {jax.tree_util.keystr(path): np.asarray(leaf).tobytes() for path, leaf in leaves}


def _upload_dataset(local_data_dir: str, name: str, data_dir: str) -> None:
  """Copies TFDS dataset `name` from `local_data_dir` to `data_dir` (as one would with
  `gcloud storage cp -r`)."""
  from etils import epath
  root = os.path.join(local_data_dir, name)
  for folder, _, files in os.walk(root):
    for file in files:
      with open(os.path.join(folder, file), "rb") as f:
        epath.Path(data_dir, name, os.path.relpath(os.path.join(folder, file), root)
                   ).write_bytes(f.read())


def test_a_dataset_in_a_bucket(emulator):
  from mrl_jax.data import sources
  from mrl_jax.errors import ConfigError
  local = os.environ[gcs_emulator.DATA_DIR_ENV]
  _upload_dataset(local, "mrl_digits", f"gs://{BUCKET}/tfds")
  from_bucket, _ = sources.open_source("mrl_digits", "test", f"gs://{BUCKET}/tfds")
  from_disk, _ = sources.open_source("mrl_digits", "test", local)
  assert len(from_bucket) == len(from_disk) == 360
  for i in (0, 359):
    assert from_bucket[i]["image"].tobytes() == from_disk[i]["image"].tobytes()
    assert from_bucket[i]["label"] == from_disk[i]["label"]
  # An embedded dataset is built on first use, which array_record cannot do in a bucket.
  with pytest.raises(ConfigError, match="gcsfuse") as error:
    sources.open_source("mrl_digits", "train", f"gs://{BUCKET}/empty_tfds")
  assert "\n" not in str(error.value)


def test_train_sigkill_resume_and_probe_on_a_bucket(emulator, tmp_path):
  from etils import epath
  from mrl_jax.checkpointing import COMMIT_MARKER, Checkpointer
  from mrl_jax.metric_writer import read_metrics
  reference = os.environ[gcs_emulator.REFERENCE_ENV]
  # The data in the bucket too (the reference read the same records from a local disk).
  data_dir = f"gs://{BUCKET}/tfds"
  if not epath.Path(data_dir, "mrl_digits").exists():
    _upload_dataset(os.environ[gcs_emulator.DATA_DIR_ENV], "mrl_digits", data_dir)
  workdir = f"gs://{BUCKET}/run"
  env = _child_env(tmp_path)
  command = _command(workdir, data_dir)

  # 1. Train, SIGKILLed once checkpoint 3 is committed in the bucket.
  with open(tmp_path / "killed.txt", "w") as log:
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      _kill_once_committed(process, emulator.object_file(f"run/checkpoints/3/{COMMIT_MARKER}"),
                           tmp_path / "killed.txt")
    finally:
      if process.poll() is None:
        process.kill()
        process.wait()
  checkpointer = Checkpointer(workdir, every_steps=3)
  last = checkpointer.latest_step()
  checkpointer.close()
  assert last == 3, (tmp_path / "killed.txt").read_text()[-3000:]
  assert not epath.Path(workdir, "summary.json").exists()

  # 2. The same command again resumes from the bucket and finishes the run.
  log = _run(command, env, tmp_path / "resumed.txt")
  assert f"Resumed from {workdir}/checkpoints/3 (step 3)." in log, log[-3000:]
  assert "step 3/6 |" not in log and all(f"step {s}/6 |" in log for s in (4, 5, 6)), log[-3000:]
  assert os.path.isfile(emulator.object_file("run/metrics.jsonl"))  # In the bucket.
  rows = read_metrics(workdir)
  expected = {step: losses[0] for step, losses in _losses(read_metrics(reference)).items()}
  got = _losses(rows)
  assert sorted(got) == sorted(expected) == list(range(1, 7))
  for step, losses in got.items():  # The killed run's rows and the resumed run's: bitwise.
    assert all(loss == expected[step] for loss in losses), (step, losses, expected[step])
  summary = json.loads(epath.Path(workdir, "summary.json").read_text())
  with open(os.path.join(reference, "summary.json")) as f:
    assert summary["val_top1"] == json.load(f)["val_top1"]
  assert summary["steps"] == 6
  assert _params_bytes(workdir) == _params_bytes(reference)
  assert json.loads(epath.Path(workdir, "config.json").read_text())["total_steps"] == 6
  assert list(epath.Path(workdir, "tensorboard").iterdir())

  # 3. Probe the bucket workdir, its train embeddings streamed through shards (which go
  # to a local temporary folder for a bucket); read its outputs back from the bucket.
  _run(_command(workdir, data_dir, "--mode=probe", "--config.probe.max_in_memory_gb=0",
                "--config.probe.linear_epochs=2"), env, tmp_path / "probe.txt")
  out = epath.Path(workdir, "probe")
  probed = json.loads((out / "summary.json").read_text())
  assert probed["dims"] == [2, 4, 8, 16, 32, 64]
  assert probed["num_train"] == 1437 and probed["num_test"] == 360
  for key in ("linear_top1", "knn1_top1", "map@10"):
    assert len(probed[key]) == 6 and all(0.0 <= v <= 1.0 for v in probed[key]), key
  assert "| 64 |" in (out / "report.md").read_text()
  assert not (out / "embeddings").exists()  # The shards stayed local, and are gone.
  for name in ("linear_top1.png", "knn1_top1.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  # Nothing landed in a local folder named like the URI (os.path.abspath("gs://...")).
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_two_processes_checkpoint_into_one_bucket(emulator, tmp_path):
  """A pod in small: launch/local.sh, 2 processes x 2 CPU devices, one gs:// workdir."""
  from etils import epath
  from mrl_jax.metric_writer import read_metrics
  workdir = f"gs://{BUCKET}/two_processes"
  env = _child_env(tmp_path)
  # Compiling dominates this short run; unoptimised CPU code compiles ~2x faster.
  env.update(XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
             PYTHON=sys.executable, NUM_PROCESSES="2", CPU_DEVICES_PER_PROCESS="2",
             LOG_DIR=str(tmp_path / "logs"))
  _run(["bash", os.path.join(ROOT, "launch", "local.sh"), *_command(
      workdir, os.environ[gcs_emulator.DATA_DIR_ENV], "--config.total_steps=2")[3:]], env,
       tmp_path / "local_sh.txt")
  state = epath.Path(workdir, "checkpoints", "2", "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in state.iterdir()}
  assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [1, 2]
  assert json.loads(epath.Path(workdir, "summary.json").read_text())["steps"] == 2
