# python -m mrl_jax.main --config configs/quickstart.py --workdir /tmp/mrl_quickstart
"""MRL on the handwritten digits that ship inside scikit-learn: a few minutes on 2 CPU cores.

A ResNet-18 (width 16, small-image stem) embeds 16x16 digits into 128 dims; an
MRL head trains a classifier on every prefix 2, 4, ..., 128 at once. The run
ends with a table of validation top-1 per prefix size. `:runlocal` makes it a
seconds-long smoke run. Compare with the plain model:
`--config.head=ff` (one classifier on all 128 dims).
"""

import ml_collections
from ml_collections import config_dict

from mrl_jax.config_args import parse_config_arg
from mrl_jax.evaluation.probe_settings import default_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_config_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = "classification"  # images -> encoder -> nested head (mrl_jax/tasks/)

  # Data: sklearn's 1,797 8x8 digits, built into TFDS array_record on first use.
  config.data = dict(
      name="mrl_digits", data_dir=config_dict.placeholder(str), train_split="train", eval_split="test",
      image_size=16, train_augment="random_resized_crop", crop_scale=(0.6, 1.0),
      flip=False,  # Mirrored digits are other symbols.
      eval_crop_fraction=1.0, mean=(0.5,), std=(0.5,), worker_count=0, prefetch=2,
      mock_examples=0,
      on_bad_example="stop")  # "skip": leave undecodable or mislabelled examples out.

  # Model: embedding_dim = 512 * width / 64 = 128.
  config.model = dict(name="resnet", depth=18, width=16, small_images=True, blurpool=False)
  config.compute_dtype = "float32"

  # MRL head: "mrl" (a classifier per size), "mrl_e" (one shared, sliced) or "ff".
  config.head = "mrl"
  config.nesting = dict(dims=(2, 4, 8, 16, 32, 64, 128), weights=())  # () = all ones.
  config.ff_dim = config_dict.placeholder(int)  # For head="ff": the k of FF-k (None = the full embedding).
  config.loss = "softmax"
  config.label_smoothing = 0.0

  # Optimisation.
  config.batch_size = 64
  config.eval_batch_size = 120
  config.total_epochs = 15
  config.total_steps = 0  # > 0 overrides total_epochs.
  config.lr = 0.1
  config.optimizer = dict(name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                          decay_norms_and_biases=False, grad_clip_norm=0.0)
  config.schedule = dict(name="cosine", warmup_steps=30)
  config.grad_accum_steps = 1

  # Devices: all of them on the data axis.
  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.sharding_rules = (("(^|/)head/", ("model",)),)

  # `--mode=probe`: the paper's SVD / random-feature baselines truncate a model
  # trained without MRL; point baseline_workdir at a `--config.head=ff` run.
  config.probe = default_probe_config()  # Every field: mrl_jax/evaluation/probe_settings.py.

  # Logging and checkpoints.
  config.log_every_steps = 25
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  # A NaN/Inf loss or gradient stops the run; "skip" drops such updates instead,
  # up to max_nonfinite_steps of them.
  config.on_nonfinite = "stop"
  config.max_nonfinite_steps = 100

  if arg.runlocal:
    config.total_epochs = 0
    config.total_steps = 6
    config.model.width = 8
    config.nesting.dims = (2, 4, 8, 16, 32, 64)
    config.log_every_steps = 2
    config.checkpoint_every_steps = 3
  return config
