"""Entry point: `python -m mrl_jax.main --config configs/quickstart.py --workdir DIR`.

`--mode=probe` restores the latest checkpoint in DIR and measures every nesting
size (writes DIR/probe/); the model comes from DIR/config.json, the data and
probe settings from --config. `--mode=compile_check` compiles the train step
for the config's mesh on abstract inputs and reports memory per device
(DIR/compile_check.json); with `--cpu_devices=8` it checks an 8-device mesh on a CPU.

Any config field can be overridden with `--config.FIELD=VALUE`, and the config
file takes arguments after a colon: `--config configs/resnet50_imagenet.py:runlocal`.
A FIELD the config does not have, or a VALUE of the wrong type, stops the run
with one `error:` line (naming the closest fields) and exit status 2.

The console (stdout) shows the project's own lines. Library logs (Orbax, TFDS,
Grain, absl, JAX; Python warnings) go to DIR/logs/<mode>.log
(DIR/logs/<mode>.process<i>.log per process in a multi-process run); with
`--library_logs=console` they are also printed on stderr, as absl prints them.

Multi-process (multi-host) runs start this same command once per process; the
environment says which process it is (mrl_jax/distributed.py, launch/README.md).
"""

from __future__ import annotations

import sys

from absl import app, flags
import jax
from ml_collections import config_flags

from mrl_jax import compile_check, distributed, library_logs, train
from mrl_jax.config_checks import unknown_field
from mrl_jax.errors import UserError
from mrl_jax.evaluation import probe

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "probe", "compile_check"],
                          "train: train (or resume) and evaluate; probe: measure every size; "
                          "compile_check: compile the train step for the mesh and report "
                          "memory per device, without data.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Run on this many (fake) CPU devices, e.g. to compile_check an "
    "8-device mesh on a laptop. Only for CPU runs.")
_LIBRARY_LOGS = flags.DEFINE_enum(
    "library_logs", "file", list(library_logs.MODES),
    "file: library log records (Orbax, TFDS, absl, JAX) go only to WORKDIR/logs/<mode>.log; "
    "console: also to stderr.")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_file_and_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
  """The --config argument and the FIELD of every --config.FIELD in `argv`."""
  path, fields = None, []
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    name = arg.lstrip("-").split("=", 1)[0] if arg.startswith("-") else ""
    if name == "config":
      path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
    elif name.startswith(("config.", "noconfig.")):
      fields.append(name.split(".", 1)[1])
  return path, fields


def _unknown_override(argv: list[str]) -> str | None:
  """The message for the first --config.FIELD that names no field, if any does."""
  path, fields = _config_file_and_overrides(argv)
  if path is None or not fields:
    return None
  config = flags.FLAGS["config"].parser.parse(path)
  for field in fields:
    message = unknown_field(config, field)
    if message:
      return message
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a bad flag or config override as one line and exit status 2.

  ml_collections applies --config.FIELD overrides while the flags are parsed,
  before main() runs; a FIELD the config lacks raises AttributeError there.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}" + (": give the field a value of its type." if "--config." in str(e) else ""))
  except (AttributeError, KeyError):
    message = _unknown_override(argv)
    if message is None:
      raise
    _fail(message)


def main(argv: list[str]) -> None:
  del argv
  logs = library_logs.LibraryLogs(_LIBRARY_LOGS.value)
  try:
    if _CPU_DEVICES.value:
      # Must precede backend initialisation, which the first device query triggers.
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    # Before anything touches devices: in a multi-process run, jax.devices() is global.
    distributed.initialize_from_env()
    logs.open_log_file(_WORKDIR.value, _MODE.value, jax.process_index(), jax.process_count())
    if _MODE.value == "probe":
      # The model comes from the workdir: overrides of model fields are refused there.
      probe.run_probe(_WORKDIR.value, _CONFIG.value,
                      overrides=config_flags.get_override_values(flags.FLAGS["config"]))
    elif _MODE.value == "compile_check":
      compile_check.compile_check(_CONFIG.value, _WORKDIR.value)
    else:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:  # Something the user can fix: one line, no traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  finally:
    logs.close()  # A bucket workdir gets its log file copied in now.


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
