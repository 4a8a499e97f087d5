# python -m mrl_jax.main --config configs/vit_imagenet.py --workdir WORKDIR --config.init_from.workdir=PRETRAINED_WORKDIR
"""Fine-tune an MRL ViT on ImageNet-1K (TFDS `imagenet2012`, array_record).

Starts from the encoder of a pre-training run (configs/vit_jft.py or
configs/vit_imagenet21k.py; `config.init_from`), with a new MRL head over the
1000 classes, nesting 12..768. The fine-tuning recipe of the ViT paper: SGD
momentum 0.9, no weight decay, gradient clipping at 1, cosine decay from 0.03,
batch 512, 20K steps, 384 px (the position embeddings are resized from the
pre-training grid). Without `init_from.workdir` it trains from scratch.

Arguments: `:variant=L/16`, `:runlocal` (a tiny ViT, a few steps on TFDS mock ImageNet).
"""

import ml_collections
from ml_collections import config_dict

from mrl_jax.config_args import parse_config_arg
from mrl_jax.evaluation.probe_settings import default_probe_config
from mrl_jax.models import vit


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_config_arg(arg, runlocal=False, variant="B/16")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = "classification"  # images -> encoder -> nested head (mrl_jax/tasks/)

  config.data = dict(
      name="imagenet2012", data_dir=config_dict.placeholder(str), train_split="train",
      eval_split="validation", image_size=384, train_augment="random_resized_crop",
      crop_scale=(0.08, 1.0), flip=True, eval_crop_fraction=1.0,
      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), worker_count=16, prefetch=4, mock_examples=0)
  config.num_classes = 1000

  # The encoder must match the pre-training run's (variant, pool, representation).
  config.model = dict(name="vit", variant=arg.variant, pool="token",
                      representation_size=config_dict.placeholder(int), dropout=0.0, remat=False)
  config.init_from = dict(workdir=config_dict.placeholder(str), head=False)
  config.compute_dtype = "bfloat16"

  config.head = "mrl"
  config.nesting = dict(dims=(12, 24, 48, 96, 192, 384, 768), weights=())
  config.ff_dim = config_dict.placeholder(int)
  config.loss = "softmax"
  config.label_smoothing = 0.0

  config.batch_size = 512
  config.eval_batch_size = 512
  config.total_steps = 20_000
  config.lr = 0.03
  config.optimizer = dict(name="sgd", momentum=0.9, nesterov=False, weight_decay=0.0,
                          decay_norms_and_biases=False, grad_clip_norm=1.0)
  config.schedule = dict(name="cosine", warmup_steps=500)
  config.grad_accum_steps = 1

  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.sharding_rules = vit.SHARDING_RULES
  config.probe = default_probe_config()  # Every field: mrl_jax/evaluation/probe_settings.py.

  config.log_every_steps = 100
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = 3
  # A NaN/Inf loss or gradient stops the run; "skip" drops such updates instead,
  # up to max_nonfinite_steps of them.
  config.on_nonfinite = "stop"
  config.max_nonfinite_steps = 100

  if arg.runlocal:
    config.data.mock_examples = 32
    config.data.image_size = 32
    config.data.worker_count = 0
    config.model.variant = "Ti/8"
    config.model.depth = 2
    config.compute_dtype = "float32"
    config.nesting.dims = (12, 24, 48, 96, 192)
    config.batch_size = 16
    config.eval_batch_size = 16
    config.total_steps = 4
    config.schedule.warmup_steps = 1
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 2
  return config
