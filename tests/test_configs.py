"""Every config smoke-runs with `:runlocal`; config arguments parse; full configs validate."""

import glob
import importlib.util
import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

from mrl_jax import train
from mrl_jax.config_args import parse_config_arg
from mrl_jax.config_checks import check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse(argv):
  """The config `mrl_jax.main` would get from `argv` (same flag definition, fresh FlagValues)."""
  argv = ["config_test", *argv]
  values = flags.FlagValues()
  # The override flags are defined from the argv the config flag is given.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values["config"].value, config_flags.get_override_values(values["config"])


# Fields every config declares, so that `--config.FIELD=` can set them (the
# configs are locked: an undeclared field is refused), with a value to set.
LOOP_FIELDS = {"total_steps": ("7", 7), "on_nonfinite": ("skip", "skip"),
               "max_nonfinite_steps": ("3", 3), "keep_checkpoints": ("2", 2)}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_loop_fields_are_settable_from_every_config(path):
  config, _ = parse([f"--config={path}"] + [f"--config.{name}={text}"
                                           for name, (text, _) in LOOP_FIELDS.items()])
  for name, (_, value) in LOOP_FIELDS.items():
    assert config[name] == value, name


def test_every_config_opens_with_its_run_command():
  for path in CONFIGS:
    with open(path) as f:
      first = f.readline()
    assert first.startswith("# python -m mrl_jax.main --config configs/"), path


# Configs whose runlocal run other tests train anyway, trained once for the session by
# tests/conftest.py's fixtures: here their summaries are checked, without a second run.
SHARED_RUNS = {"quickstart.py": "quickstart_runlocal_run",  # test_train, corrupt_checkpoint
               "align.py": "align_runlocal_run",  # test_align_train, test_dual_probe
               "vit_jft.py": "runlocal_run",  # test_vit_jft resumes a copy
               "vit_imagenet21k.py": "runlocal_run"}  # test_init_from fine-tunes from it


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_runlocal_trains_and_writes_a_summary(path, digits_data_dir, tmp_path, request):
  config = load_config(path, "runlocal")
  name = os.path.basename(path)
  if name in SHARED_RUNS:
    run = request.getfixturevalue(SHARED_RUNS[name])
    workdir, run_config, summary = run(name) if callable(run) else run
    assert run_config.model.to_dict() == config.model.to_dict()  # the runlocal model
  else:
    if config.data.name in ("mrl_digits", "mrl_demo_corpus", "mrl_two_digits"):  # built on first use
      config.data.data_dir = digits_data_dir
    if config.data.name == "mrl_text_demo":
      config.data.data_dir = request.getfixturevalue("text_demo_data_dir")
      # The minute-long demo run, cut to a smoke run (tests/test_bert_mlm.py trains it).
      config.total_steps = 8
    workdir = str(tmp_path)
    summary = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["dims"] == summary["dims"] == list(config.nesting.dims)


@pytest.mark.slow
def test_training_options_run_together(digits_data_dir, tmp_path):
  """MRL-E head, bfloat16 compute, gradient accumulation, AdamW, clipping, sigmoid loss."""
  config = load_config(os.path.join(ROOT, "configs", "quickstart.py"), "runlocal")
  config.data.data_dir = digits_data_dir
  config.head = "mrl_e"
  config.compute_dtype = "bfloat16"
  config.grad_accum_steps = 2
  config.loss = "sigmoid"
  config.lr = 1e-3
  config.optimizer = dict(name="adamw", weight_decay=0.05, grad_clip_norm=1.0)
  config.schedule = dict(name="linear", warmup_steps=2)
  config.nesting.weights = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == config.total_steps
  assert all(0.0 <= v <= 1.0 for v in summary["val_top1"].values())


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_full_configs_pass_the_checks_on_8_devices(path):
  config = load_config(path)
  nesting = check_config(config, num_devices=8, process_count=1)
  assert nesting.dims == tuple(config.nesting.dims)


def test_resnet50_config_is_the_papers_recipe():
  config = load_config(os.path.join(ROOT, "configs", "resnet50_imagenet.py"))
  assert config.nesting.dims == (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
  assert (config.total_epochs, config.batch_size, config.label_smoothing) == (40, 512, 0.1)
  assert (config.optimizer.name, config.optimizer.momentum) == ("sgd", 0.9)
  assert config.optimizer.weight_decay == 1e-4 and not config.optimizer.decay_norms_and_biases
  assert config.data.name == "imagenet2012" and config.model.depth == 50
  assert load_config(os.path.join(ROOT, "configs", "resnet50_imagenet.py"), "head=mrl_e").head == "mrl_e"


def test_config_args_parse_literals_and_reject_typos():
  arg = parse_config_arg("runlocal,depth=50,variant=B/16", runlocal=False, depth=18, variant="S/16")
  assert (arg.runlocal, arg.depth, arg.variant) == (True, 50, "B/16")
  with pytest.raises(ValueError, match="runlcal"):
    parse_config_arg("runlcal", runlocal=False)
