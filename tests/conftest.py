"""Shared fixtures: the embedded datasets and the runs several test files read, each built
once per session; the session's XLA compilation cache; the GPU skip."""

import os
import shutil
import tempfile

import pytest

_XLA_CACHE_DIR = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding `mrl_digits`, built once (it takes seconds)."""
  from mrl_jax.data import sources
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  sources.open_source("mrl_digits", "train", data_dir)
  return data_dir


@pytest.fixture(scope="session")
def text_demo_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding `mrl_text_demo` and its tokenizer, built once (about 3 s)."""
  from mrl_jax.data import sources
  data_dir = str(tmp_path_factory.mktemp("tfds_text"))
  sources.open_source("mrl_text_demo", "train", data_dir)
  return data_dir


@pytest.fixture(scope="session")
def image_text_demo_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding `mrl_digit_captions` and its tokenizer, built once (about 5 s)."""
  from mrl_jax.data import sources
  data_dir = str(tmp_path_factory.mktemp("tfds_captions"))
  sources.open_source("mrl_digit_captions", "train", data_dir)
  return data_dir


@pytest.fixture(scope="session")
def runlocal_run(digits_data_dir, tmp_path_factory):
  """`runlocal_run("vit_jft.py")`: (workdir, config, summary) of `configs/<name>:runlocal`
  as it ships (on the embedded digits), trained at most once per session for every test
  that needs that run (test_configs.py's smoke run and the tests that train it anyway).
  Copy the workdir before changing anything in it."""
  from mrl_jax import train
  from test_configs import load_config
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  runs = {}

  def run(name: str):
    if name not in runs:
      config = load_config(os.path.join(root, "configs", name), "runlocal")
      assert config.data.name in ("mrl_digits", "mrl_demo_corpus", "mrl_two_digits"), name
      config.data.data_dir = digits_data_dir
      workdir = str(tmp_path_factory.mktemp(name.removesuffix(".py")))
      runs[name] = (workdir, config, train.train_and_evaluate(config, workdir))
    return runs[name]

  return run


@pytest.fixture(scope="session")
def quickstart_runlocal_run(digits_data_dir, tmp_path_factory):
  """(workdir, config, summary) of `configs/quickstart.py:runlocal` as it ships (6 steps,
  checkpoints 3 and 6) with a metrics row every step, trained once for every test that
  reads such a run (tests/test_train.py, test_configs.py, test_corrupt_checkpoint.py).
  Copy the workdir before changing anything in it."""
  from mrl_jax import train
  from test_train import quickstart_config
  workdir = str(tmp_path_factory.mktemp("quickstart_runlocal"))
  config = quickstart_config(digits_data_dir)
  return workdir, config, train.train_and_evaluate(config, workdir)


@pytest.fixture(scope="session")
def align_runlocal_run(image_text_demo_data_dir, tmp_path_factory):
  """(workdir, config, summary) of a 120-step `configs/align.py:runlocal` run (its ResNet-18
  image tower; zero-shot and retrieval on the whole test split at the end), trained once
  for the tests that need a trained dual encoder (tests/test_align_train.py checks that it
  learnt, tests/test_dual_probe.py restores and probes it, test_configs.py smoke-runs the
  config). Tests may add a folder (a probe's probe/) but change nothing already in it."""
  from mrl_jax import train
  from test_align_train import align_config
  workdir = str(tmp_path_factory.mktemp("align_runlocal"))
  config = align_config(image_text_demo_data_dir, evaluators=True, vit_tower=False,
                        total_steps=120, log_every_steps=10, checkpoint_every_steps=120)
  return workdir, config, train.train_and_evaluate(config, workdir)


def subprocess_env(num_devices: int = 1) -> dict[str, str]:
  """Environment for a child `python -m mrl_jax.main` with `num_devices` CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  return env


def pytest_configure(config):
  """One persistent XLA compilation cache for the session's own process, in a fresh folder.

  Tests train the same tiny programs again and again (a run and its resume, the same config
  in several files); compiling them is most of a short run's time: a quickstart:runlocal
  run took 35-39 CPU seconds compiling afresh and 6 with its programs cached. A cached
  program is the same executable, so results stay bit for bit those of a fresh compile
  (tests/test_faults.py relies on that for its child processes). Child processes keep
  compiling for themselves (their environment does not name the folder)."""
  import jax
  cache_dir = tempfile.mkdtemp(prefix="mrl_jax_test_xla_cache_")
  config.stash[_XLA_CACHE_DIR] = cache_dir
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  cache_dir = config.stash.get(_XLA_CACHE_DIR, None)
  if cache_dir:
    shutil.rmtree(cache_dir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Tests marked `gpu` are skipped where JAX sees no GPU (CI runs on CPU)."""
  import jax
  if any(d.platform == "gpu" for d in jax.devices()):
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
