# python -m mrl_jax.main --config configs/vit_imagenet21k.py --workdir WORKDIR --config.data.data_dir=DATA_DIR
"""ViT-B/16 MRL pre-training on ImageNet-21k style data (one label per image).

Build the corpus once from a manifest with one label per row (the same
builder as JFT-style data; see the README):
  python -m mrl_jax.tools.build_corpus --name imagenet21k --labels labels.txt \
      --split train=train.tsv --split validation=val.tsv --data_dir DATA_DIR
Labels arrive multi-hot, and training uses sigmoid cross-entropy, as
big_vision's ImageNet-21k recipe does: AdamW (b2 0.999), lr 1e-3 with 10K
warm-up steps and linear decay, weight decay 1e-4, batch 4096, 90 epochs,
224 px, nesting 12..768. Fine-tune the result with configs/vit_imagenet.py.

Arguments: `:variant=L/16`, `:dataset=NAME`, `:num_classes=N`, `:runlocal`
(a tiny ViT, a few steps on the embedded `mrl_demo_corpus`).
"""

import ml_collections
from ml_collections import config_dict

from mrl_jax.config_args import parse_config_arg
from mrl_jax.evaluation.probe_settings import default_probe_config
from mrl_jax.models import vit


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_config_arg(arg, runlocal=False, variant="B/16", dataset="imagenet21k",
                         num_classes=21843)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = "classification"  # images -> encoder -> nested head (mrl_jax/tasks/)

  config.data = dict(
      name=arg.dataset, data_dir=config_dict.placeholder(str), train_split="train",
      eval_split="validation", label_key="labels", image_size=224,
      train_augment="random_resized_crop", crop_scale=(0.08, 1.0), flip=True,
      eval_crop_fraction=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
      worker_count=16, prefetch=4, mock_examples=0)
  config.num_classes = arg.num_classes

  config.model = dict(name="vit", variant=arg.variant, pool="token",
                      representation_size=config_dict.placeholder(int), dropout=0.0, remat=False)
  config.compute_dtype = "bfloat16"

  config.head = "mrl"
  config.nesting = dict(dims=(12, 24, 48, 96, 192, 384, 768), weights=())
  config.ff_dim = config_dict.placeholder(int)
  config.head_class_multiple = 128  # 21,843 classes stored as 21,888: shardable over "model".
  config.loss = "sigmoid"

  config.batch_size = 4096
  config.eval_batch_size = 4096
  config.total_epochs = 90
  config.total_steps = 0  # > 0 overrides total_epochs.
  config.lr = 1e-3
  config.optimizer = dict(name="adamw", b1=0.9, b2=0.999, weight_decay=1e-4,
                          decay_norms_and_biases=False, grad_clip_norm=1.0)
  config.schedule = dict(name="linear", warmup_steps=10_000, end_lr_fraction=0.0)
  config.grad_accum_steps = 1

  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.sharding_rules = vit.SHARDING_RULES
  config.probe = default_probe_config()  # Every field: mrl_jax/evaluation/probe_settings.py.

  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 3
  # A NaN/Inf loss or gradient stops the run; "skip" drops such updates instead,
  # up to max_nonfinite_steps of them.
  config.on_nonfinite = "stop"
  config.max_nonfinite_steps = 100

  if arg.runlocal:
    config.data.name = "mrl_demo_corpus"
    config.data.image_size = 32
    config.data.worker_count = 0
    config.num_classes = 10
    config.model.variant = "Ti/8"
    config.model.depth = 2
    config.compute_dtype = "float32"
    config.nesting.dims = (12, 24, 48, 96, 192)
    config.head_class_multiple = 1
    config.batch_size = 16
    config.eval_batch_size = 32
    config.total_epochs = 0
    config.total_steps = 4
    config.schedule.warmup_steps = 1
    config.log_every_steps = 2
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 2
  return config
