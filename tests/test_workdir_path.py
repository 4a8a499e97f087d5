"""The one workdir path type (mrl_jax/workdir_path.py) and the metrics file written through it.

The object-store branch (no append, no rename: whole-object rewrites) is exercised here on
a local folder by making `is_local` answer False, so these tests need no bucket; the
emulator test (test_gcs_workdir.py) runs the same code against gs://.
"""

from __future__ import annotations

import json
import os

import pytest
from etils import epath

from mrl_jax import metric_writer, workdir_path
from mrl_jax.errors import ConfigError, UserError


def _as_object_store(monkeypatch) -> None:
  """Every path takes the object-store branch (both modules look `is_local` up by name)."""
  monkeypatch.setattr(workdir_path, "is_local", lambda path: False)
  monkeypatch.setattr(metric_writer, "is_local", lambda path: False)


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = workdir_path.workdir_path("runs/a")
  assert isinstance(path, epath.Path)
  assert os.fspath(path) == os.path.join(str(tmp_path), "runs", "a")
  assert workdir_path.is_local("runs/a") and workdir_path.is_local(str(tmp_path))


def test_bucket_uris_are_kept_as_they_are():
  for uri in ("gs://bucket/mrl_vit_b16_jft", "s3://b/run"):
    path = workdir_path.workdir_path(uri)
    assert os.fspath(path) == uri and not workdir_path.is_local(uri)
    assert os.fspath(path / "checkpoints" / "7") == uri + "/checkpoints/7"


@pytest.mark.parametrize("bad", ["", "   "])
def test_an_empty_workdir_is_one_line_config_error(bad):
  with pytest.raises(ConfigError) as e:
    workdir_path.workdir_path(bad)
  assert isinstance(e.value, UserError) and "\n" not in str(e.value)
  assert "--workdir is empty" in str(e.value)


def test_a_scheme_epath_cannot_open_is_one_line_config_error():
  with pytest.raises(ConfigError) as e:
    workdir_path.workdir_path("memory://x/run")
  message = str(e.value)
  assert "\n" not in message and "memory://" in message and "gs://" in message


def test_local_write_is_atomic(tmp_path, monkeypatch):
  target = tmp_path / "summary.json"
  workdir_path.write_json_atomic(target, {"a": 1})
  assert json.loads(target.read_text()) == {"a": 1}
  assert target.read_text() == json.dumps({"a": 1}, indent=2)  # As the workdir always had it.
  assert sorted(os.listdir(tmp_path)) == ["summary.json"]  # No .tmp left behind.

  def crash(*args):
    raise OSError("disk gone")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError):
    workdir_path.write_text_atomic(target, "half")
  assert json.loads(target.read_text()) == {"a": 1}  # A failed write keeps the old file.


def test_object_store_write_is_one_write_with_no_temporary(tmp_path, monkeypatch):
  _as_object_store(monkeypatch)
  monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("no rename on an object store"))
  target = tmp_path / "config.json"
  workdir_path.write_json_atomic(target, {"b": [1, 2]})
  assert workdir_path.read_json(target) == {"b": [1, 2]}
  assert sorted(os.listdir(tmp_path)) == ["config.json"]


def _write_run(workdir, rows, **kwargs):
  writer = metric_writer.MetricWriter(workdir, enabled=True, **kwargs)
  for step, row in rows:
    writer.write(step, row)
  writer.close()


_ROWS = [(1, {"train/loss": 2.5, "perf/mfu": 0.25}), (2, {"train/loss": float("nan")}),
         (10, {"val/accuracy@8": 0.75})]


def test_metrics_through_the_object_store_branch_read_like_local(tmp_path, monkeypatch):
  local = tmp_path / "local"
  _write_run(local, _ROWS[:2], tensorboard=False)
  _write_run(local, _ROWS[2:], tensorboard=False)  # A resumed run appends.

  _as_object_store(monkeypatch)
  # Appending is impossible on an object store: the branch must never open "a".
  real_open = open

  def no_append(file, mode="r", *args, **kwargs):
    assert "a" not in mode, f"opened {file} with mode {mode!r}"
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr("builtins.open", no_append)
  bucket = tmp_path / "bucket"
  _write_run(bucket, _ROWS[:2], tensorboard=False)
  _write_run(bucket, _ROWS[2:], tensorboard=False)  # Reads what the first run wrote first.

  expected = [{"step": 1, "train/loss": 2.5, "perf/mfu": 0.25},
              {"step": 2, "train/loss": "nan"}, {"step": 10, "val/accuracy@8": 0.75}]
  assert metric_writer.read_metrics(local) == expected
  assert metric_writer.read_metrics(bucket) == expected
  assert ((bucket / "metrics.jsonl").read_bytes() == (local / "metrics.jsonl").read_bytes())


def test_object_store_metrics_are_throttled_but_flush_writes_every_row(tmp_path, monkeypatch):
  _as_object_store(monkeypatch)
  lines = workdir_path.AppendedLines(tmp_path / "metrics.jsonl", min_interval_s=3600.0)
  lines.append('{"step": 1}')  # The first append writes at once ...
  lines.append('{"step": 2}')  # ... the next only once the interval has passed, or at flush.
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
  lines.flush()  # The train loop flushes before every checkpoint save.
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
  lines.append('{"step": 3}')
  lines.close()
  assert (tmp_path / "metrics.jsonl").read_text().splitlines()[-1] == '{"step": 3}'


def test_object_store_tensorboard_events_are_copied_into_the_workdir(tmp_path, monkeypatch):
  _as_object_store(monkeypatch)
  writer = metric_writer.MetricWriter(tmp_path, enabled=True)
  local_events = writer._tb_local_dir
  assert local_events and not local_events.startswith(str(tmp_path))
  writer.write(1, {"train/loss": 1.0})
  writer.flush()
  copied = os.listdir(tmp_path / "tensorboard")
  assert copied and all(name.startswith("events.out.tfevents") for name in copied)
  writer.write(2, {"train/loss": 0.5})
  writer.close()
  assert not os.path.exists(local_events)  # The temporary folder is removed at close.
  (event_file,) = os.listdir(tmp_path / "tensorboard")
  from tensorboardX.proto import event_pb2  # Read back: both scalars arrived.
  import struct
  data, steps = (tmp_path / "tensorboard" / event_file).read_bytes(), []
  while data:
    (length,) = struct.unpack("<Q", data[:8])
    event = event_pb2.Event.FromString(data[12:12 + length])
    steps += [event.step for value in event.summary.value if value.tag == "train/loss"]
    data = data[16 + length:]
  assert steps == [1, 2]


def test_a_data_dir_array_record_cannot_read_is_one_line_config_error():
  from mrl_jax.data import sources
  with pytest.raises(ConfigError) as e:
    sources.open_source("mrl_digits", "train", "s3://bucket/tensorflow_datasets")
  message = str(e.value)
  assert "\n" not in message and "s3://" in message and "mount" in message


def test_an_embedded_dataset_missing_from_a_bucket_is_one_line_config_error(monkeypatch):
  """array_record cannot write into a bucket: building mrl_digits there is refused."""
  from mrl_jax.data import sources

  class Unprepared:  # What TFDS's builder reports for a gs:// data_dir that lacks the dataset.
    def is_prepared(self):
      return False

  monkeypatch.setattr(sources, "_builder", lambda name, data_dir: Unprepared())
  monkeypatch.setattr(sources, "_build", lambda builder: pytest.fail("must not build in a bucket"))
  with pytest.raises(ConfigError) as e:
    sources.open_source("mrl_digits", "train", "gs://bucket/tensorflow_datasets")
  message = str(e.value)
  assert "\n" not in message and "gs://bucket/tensorflow_datasets" in message
  assert "'mrl_digits'" in message and "gcsfuse" in message


def test_writers_that_take_a_local_file_name_land_at_the_path(tmp_path, monkeypatch):
  def save(name):  # Like a tokenizer's save(path): writes a local file by name.
    with open(name, "w") as f:
      f.write('{"vocab": 3}')

  workdir_path.write_through_local_file(tmp_path / "local.json", save)
  assert sorted(os.listdir(tmp_path)) == ["local.json"]
  assert workdir_path.local_file(tmp_path / "local.json") == str(tmp_path / "local.json")
  _as_object_store(monkeypatch)
  workdir_path.write_through_local_file(tmp_path / "object.json", save)
  assert sorted(os.listdir(tmp_path)) == ["local.json", "object.json"]
  copy = workdir_path.local_file(tmp_path / "object.json")  # A downloaded copy elsewhere.
  assert copy != str(tmp_path / "object.json") and open(copy).read() == '{"vocab": 3}'
