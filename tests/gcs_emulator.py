"""A Google Cloud Storage emulator on loopback, inside a network namespace of its own.

The gs:// tests must not send one request beyond this machine, credential and metadata
look-ups included. So they run in a network namespace that has only `lo`
(`unshare -n`, then `ip link set lo up`): the emulator, the test process and every
training process it starts live there, and nothing they do can leave the machine.
`tests/test_gcs_workdir.py` starts `tests/gcs_workdir_checks.py` that way.

What was measured (2026-12-02; gcp-storage-emulator 2026.7.19, gcsfs 2026.10.1,
fsspec 2026.9.0, etils 1.15, orbax-checkpoint 0.12.8, tensorstore 0.1.86, no TensorFlow):
- `unshare -n` needs root (or CAP_SYS_ADMIN); in the new namespace `lo` is down until
  `ip link set lo up`. Every port is free there, and /proc/self/net/dev lists only `lo`.
- gcp-storage-emulator serves the GCS JSON API (one request at a time; `_serve` gives
  it a listen backlog that parallel clients fit in) and creates the default bucket; objects are files under `DATA_DIR/.cloudstorage/BUCKET/...` (so a
  test can see that a write reached it). It prints a BrokenPipeError traceback
  whenever a client closes a connection early (TensorStore does): noise, sent to its
  log file.
- Its media downloads lack the `x-goog-generation` header, which TensorStore reads as
  the object's version: Orbax's first save works, but any save that reads an OCDBT
  manifest back (every train-state save) fails with "Malformed StorageGeneration".
  So it is started through this file (`python tests/gcs_emulator.py`), which adds
  the header from the object's metadata (`_add_generation_headers`). It also ignores
  write preconditions (ifGenerationMatch): harmless here, where each object has one
  writer (each process writes its own `ocdbt.process_<i>`).
- gcsfs keeps every folder listing for the life of the process unless
  `use_listings_cache` is off (mrl_jax/workdir_path.py turns it off): objects another
  process wrote later stayed invisible to `iterdir()`.
- A TFDS data_dir on gs:// works without TensorFlow: the dataset_info and features
  files are read through epath, the records by array_record's own GCS client
  (google-cloud-cpp), which follows CLOUD_STORAGE_EMULATOR_ENDPOINT. Without that
  variable, inside the namespace, its reader never returned (killed after 5 minutes).
- etils.epath without TensorFlow opens gs:// through fsspec's gcsfs, which follows
  STORAGE_EMULATOR_HOST=http://127.0.0.1:P. gcsfs 2026.10 first asks for the bucket
  type over gRPC and waits 60 s per call against an emulator unless
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false.
- Orbax writes array data through TensorStore's gcs driver, which follows
  TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:P; without credentials it logs "Could not
  find the credentials file" once and goes on anonymously. Orbax's directory and
  metadata work goes through epath (gcsfs). A save and restore of a small tree took
  about 0.1 s.
- Credentials: by default gcsfs asks google-auth, which looks for a credentials file
  and then the GCE metadata server; TensorStore does the same. FSSPEC_GCS_TOKEN=anon
  makes gcsfs anonymous, GOOGLE_AUTH_TOKEN_FOR_TESTING gives TensorStore a fixed token
  (the emulator accepts any), NO_GCE_CHECK=true stops google-auth's GCE probe, and
  GOOGLE_APPLICATION_CREDENTIALS is removed: no look-up is made, and the namespace
  would stop one anyway.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

# Set (to "1") in the environment of a process started by run_in_loopback_namespace.
NAMESPACE_ENV = "MRL_TEST_LOOPBACK_NAMESPACE"
# What tests/test_gcs_workdir.py hands tests/gcs_workdir_checks.py: the uninterrupted
# local quickstart:runlocal run the bucket run must equal, and a data_dir with mrl_digits.
REFERENCE_ENV = "MRL_TEST_REFERENCE_WORKDIR"
DATA_DIR_ENV = "MRL_TEST_DIGITS_DATA_DIR"
XLA_CACHE_ENV = "MRL_TEST_XLA_CACHE_DIR"  # The caller's compilation cache, for the children.


def _command_output(argv: list[str], timeout: float = 60) -> tuple[int, str]:
  try:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
  except (OSError, subprocess.TimeoutExpired) as e:
    return 1, str(e)
  return result.returncode, (result.stdout + result.stderr).strip()


def loopback_namespace_unavailable() -> str | None:
  """Why this machine cannot give a test a loopback-only network namespace, or None."""
  if shutil.which("unshare") is None or shutil.which("ip") is None:
    return "needs `unshare` (util-linux) and `ip` (iproute2) for a loopback-only namespace"
  code, output = _command_output(["unshare", "-n", "ip", "link", "set", "lo", "up"])
  if code != 0:
    return ("cannot make a loopback-only network namespace (`unshare -n` needs root or "
            f"CAP_SYS_ADMIN): {output.splitlines()[-1] if output else f'exit status {code}'}")
  return None


def emulator_unavailable() -> str | None:
  """Why the emulator or the gs:// clients cannot be imported, or None."""
  import importlib.util
  for module, package in (("gcp_storage_emulator", "gcp-storage-emulator"),
                          ("gcsfs", "gcsfs")):
    if importlib.util.find_spec(module) is None:
      return f"needs {package} (pip install -r requirements-test.txt)"
  return None


def run_in_loopback_namespace(argv: list[str], *, env: dict[str, str], cwd: str,
                              timeout: float) -> subprocess.CompletedProcess:
  """Runs `argv` in a new network namespace with only `lo` (up); output captured.

  In a session of its own: past `timeout` everything it started (the emulator, training
  processes) is killed with it, and TimeoutExpired raised."""
  env = {**env, NAMESPACE_ENV: "1"}
  command = ["unshare", "-n", "bash", "-c", 'ip link set lo up && exec "$@"', "bash", *argv]
  with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
    try:
      stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      process.communicate()
      raise
  return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def network_interfaces() -> list[str]:
  """The interfaces of this process's network namespace (/proc/self/net/dev)."""
  with open("/proc/self/net/dev") as f:
    lines = f.read().splitlines()[2:]  # Two header lines.
  return sorted(line.split(":", 1)[0].strip() for line in lines)


def outside_is_unreachable() -> bool:
  """True when no route leads off the machine: connecting a UDP socket sends nothing,
  it only looks the route up, and fails with 'Network is unreachable' here."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    try:
      s.connect(("192.0.2.1", 9))  # TEST-NET-1: never a real host.
    except OSError:
      return True
  return False


def in_loopback_namespace() -> bool:
  """Whether this process runs where only loopback is reachable (checked, not assumed)."""
  return (os.environ.get(NAMESPACE_ENV) == "1" and network_interfaces() == ["lo"]
          and outside_is_unreachable())


def client_env(url: str) -> dict[str, str]:
  """What points gcsfs, google-cloud-storage, TensorStore and array_record (google-cloud-cpp)
  at the emulator at `url`."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
          # No credential look-up at all: gcsfs anonymous (fsspec reads FSSPEC_GCS_TOKEN
          # as GCSFileSystem(token=...)), TensorStore a fixed token the emulator ignores,
          # google-auth never asks whether it runs on GCE.
          "FSSPEC_GCS_TOKEN": "anon", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
          "NO_GCE_CHECK": "true", "GOOGLE_CLOUD_PROJECT": "mrl-test"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """`gcp-storage-emulator` serving bucket `bucket` from `store_dir`, on a free loopback port.

  `url` is where it listens; `object_file(name)` is where it keeps an object on disk.
  """

  def __init__(self, store_dir: str, bucket: str):
    self.store_dir, self.bucket = store_dir, bucket
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    os.makedirs(store_dir, exist_ok=True)
    self.log_path = os.path.join(store_dir, "emulator.log")
    with open(self.log_path, "w") as log:
      self.process = subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "--port", str(self.port),
           "--bucket", bucket, "--data_dir", store_dir], stdout=log, stderr=subprocess.STDOUT)
    self._wait_until_serving(timeout=120)

  def _wait_until_serving(self, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"the GCS emulator exited with {self.process.returncode}: "
                           f"{self.log()[-2000:]}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}", timeout=5):
          return
      except OSError:
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"the GCS emulator did not serve within {timeout} s: {self.log()[-2000:]}")

  def object_file(self, name: str) -> str:
    return os.path.join(self.store_dir, ".cloudstorage", self.bucket, name)

  def log(self) -> str:
    with open(self.log_path, errors="replace") as f:
      return f.read()

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()


def _add_generation_headers() -> None:
  """Makes the emulator's media downloads carry x-goog-generation / x-goog-metageneration,
  as real GCS does (TensorStore takes the object's generation from them)."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      except NotFound:
        return
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  objects.download = download  # objects.get (?alt=media, TensorStore's reads) calls it.
  for _, handlers in server.HANDLERS:
    for method, handler in handlers.items():
      if handler is original:
        handlers[method] = download


def _serve() -> None:
  import argparse
  parser = argparse.ArgumentParser(description="gcp-storage-emulator on 127.0.0.1, fixed up")
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--bucket", required=True)
  parser.add_argument("--data_dir", required=True)
  args = parser.parse_args()
  _add_generation_headers()
  # One request at a time, with Python's default listen backlog of 5: a client opening
  # more connections at once (array_record reads records in parallel, TensorStore
  # writes) had its connections dropped and retried after 1, 3, 7 s: 100 records took
  # 55 s. With room for them all in the backlog they wait their turn instead.
  import http.server
  http.server.HTTPServer.request_queue_size = 1024
  from gcp_storage_emulator.server import create_server
  create_server("127.0.0.1", args.port, in_memory=False, default_bucket=args.bucket,
                data_dir=args.data_dir).run()


if __name__ == "__main__":
  _serve()
