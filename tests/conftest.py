"""Shared fixtures: one prepared copy of the embedded digits dataset per test session."""

import os

import pytest


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


def subprocess_env(num_devices: int = 1) -> dict[str, str]:
  """Environment for a child `python -m mrl_jax.main` with `num_devices` CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  return env


def pytest_collection_modifyitems(config, items):
  """Tests marked `gpu` are skipped where JAX sees no GPU (CI runs on CPU)."""
  import jax
  if any(d.platform == "gpu" for d in jax.devices()):
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
