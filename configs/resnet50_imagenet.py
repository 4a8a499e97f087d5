# python -m mrl_jax.main --config configs/resnet50_imagenet.py --workdir gs://BUCKET/mrl_r50
"""ResNet-50 MRL on ImageNet-1K: the paper's recipe.

40 epochs, SGD momentum 0.9, batch 512, weight decay 1e-4 (not on BatchNorm or
biases), label smoothing 0.1, nesting 8..2048, BlurPool (the FFCV recipe of the
official checkpoints). The paper used FFCV's progressive resolution 160->192 and
a cyclic learning rate; here training is at a fixed 176 px (their mid-point)
with warm-up + cosine, and evaluation at 224 with a 224/256 centre crop.

Data: TFDS `imagenet2012` in array_record format (see the README for `tfds build`).
`:runlocal` trains a few steps on TFDS mock ImageNet, so the config smoke-runs on a CPU.
Arguments: `:head=mrl_e`, `:depth=18`, `:runlocal`.
"""

import ml_collections
from ml_collections import config_dict

from mrl_jax.config_args import parse_config_arg
from mrl_jax.evaluation.probe_settings import default_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_config_arg(arg, runlocal=False, head="mrl", depth=50)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = "classification"  # images -> encoder -> nested head (mrl_jax/tasks/)

  config.data = dict(
      name="imagenet2012", data_dir=config_dict.placeholder(str), train_split="train", eval_split="validation",
      image_size=176, train_augment="random_resized_crop", crop_scale=(0.08, 1.0), flip=True,
      eval_image_size=224, eval_crop_fraction=224 / 256,
      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
      worker_count=8, prefetch=4, mock_examples=0,
      on_bad_example="stop")  # "skip": leave undecodable or mislabelled examples out.

  config.model = dict(name="resnet", depth=arg.depth, width=64, small_images=False,
                      blurpool=True, zero_init_residual=False)
  config.compute_dtype = "bfloat16"

  config.head = arg.head
  config.nesting = dict(dims=(8, 16, 32, 64, 128, 256, 512, 1024, 2048), weights=())
  config.ff_dim = config_dict.placeholder(int)
  config.loss = "softmax"
  config.label_smoothing = 0.1

  config.batch_size = 512
  config.eval_batch_size = 1000
  config.total_epochs = 40
  config.total_steps = 0  # > 0 overrides total_epochs.
  config.lr = 0.2  # Linear scaling: 0.1 per 256 examples (Goyal et al.).
  config.optimizer = dict(name="sgd", momentum=0.9, nesterov=False, weight_decay=1e-4,
                          decay_norms_and_biases=False, grad_clip_norm=0.0)
  config.schedule = dict(name="cosine", warmup_steps=2 * 2502)  # About 2 epochs.
  config.grad_accum_steps = 1

  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.sharding_rules = (("(^|/)head/", ("model",)),)

  # `--mode=probe`: the paper's SVD / random-feature baselines truncate a model
  # trained without MRL; point baseline_workdir at a `--config.head=ff` run.
  config.probe = default_probe_config()  # Every field: mrl_jax/evaluation/probe_settings.py.

  config.log_every_steps = 100
  config.eval_every_steps = 2502 * 5
  config.checkpoint_every_steps = 2502
  config.keep_checkpoints = 3
  # A NaN/Inf loss or gradient stops the run; "skip" drops such updates instead,
  # up to max_nonfinite_steps of them.
  config.on_nonfinite = "stop"
  config.max_nonfinite_steps = 100

  if arg.runlocal:
    config.data.mock_examples = 64
    config.data.image_size = 32
    config.data.eval_image_size = 32
    config.data.worker_count = 0
    config.model.depth = 18 if arg.depth == 50 else arg.depth
    config.model.width = 8
    config.nesting.dims = (8, 16, 32, 64)
    config.compute_dtype = "float32"
    config.batch_size = 16
    config.eval_batch_size = 16
    config.total_epochs = 0
    config.total_steps = 4
    config.schedule.warmup_steps = 1
    config.lr = 0.1
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 2
  return config
