"""Entry point: `python -m mrl_jax.main --config configs/quickstart.py --workdir DIR`.

`--mode=probe` restores the latest checkpoint in DIR and measures every nesting
size (writes DIR/probe/); the model comes from DIR/config.json, the data and
probe settings from --config. `--mode=compile_check` compiles the train step
for the config's mesh on abstract inputs and reports memory per device
(DIR/compile_check.json); with `--cpu_devices=8` it checks an 8-device mesh on a CPU.

Any config field can be overridden with `--config.FIELD=VALUE`, and the config
file takes arguments after a colon: `--config configs/resnet50_imagenet.py:runlocal`.

Multi-process (multi-host) runs start this same command once per process; the
environment says which process it is (mrl_jax/distributed.py, launch/README.md).
"""

from __future__ import annotations

import sys

from absl import app, flags
import jax
from ml_collections import config_flags

from mrl_jax import compile_check, distributed, train
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
flags.mark_flags_as_required(["config", "workdir"])

def main(argv: list[str]) -> None:
  del argv
  try:
    if _CPU_DEVICES.value:
      # Must precede backend initialisation, which the first device query triggers.
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    # Before anything touches devices: in a multi-process run, jax.devices() is global.
    distributed.initialize_from_env()
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


if __name__ == "__main__":
  app.run(main)
