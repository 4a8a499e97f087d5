# python -m mrl_jax.main --config configs/vit_jft.py --workdir gs://BUCKET/mrl_vit_b16_jft
"""ViT-B/16 with an MRL head on a JFT-style multi-label corpus: the paper's recipe.

JFT-300M is private; any large multi-label corpus works once built into
array_record with `python -m mrl_jax.tools.build_corpus --name jft_like
--labels labels.txt --split train=train.tsv --split validation=val.tsv
--data_dir DIR` (manifest rows: `image_path<TAB>label ids`; see the README).
Recipe (MRL paper, appendix): ViT-B/16, nesting 12..768, sigmoid cross-entropy,
Adafactor with linear decay from 1e-3, 300K steps, batch 128 per device on an
8x8 TPU slice (64 chips: 8,192), 224 px, bfloat16 compute. The paper
evaluates JFT models by 1-NN on ImageNet-1K at every size: `config.evaluators`.

Arguments: `:variant=L/16`, `:dataset=NAME`, `:num_classes=N`, `:runlocal`.
Check memory per device before booking a pod (no data needed):
  python -m mrl_jax.main --config configs/vit_jft.py --workdir /tmp/cc \
      --mode=compile_check --cpu_devices=8
`:runlocal` trains a tiny ViT for a few steps on CPU on `mrl_demo_corpus`
(multi-label 2x2 digit grids, built on first use from real PNG files).
"""

import copy

import ml_collections
from ml_collections import config_dict

from mrl_jax.config_args import parse_config_arg
from mrl_jax.evaluation.probe_settings import default_probe_config
from mrl_jax.models import vit


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_config_arg(arg, runlocal=False, variant="B/16", dataset="jft_like",
                         num_classes=18291)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = "classification"  # images -> encoder -> nested head (mrl_jax/tasks/)

  # Data: a corpus built by mrl_jax.tools.build_corpus (multi-hot "labels").
  config.data = dict(
      name=arg.dataset, data_dir=config_dict.placeholder(str), train_split="train",
      eval_split="validation", label_key="labels", image_size=224,
      train_augment="random_resized_crop", crop_scale=(0.05, 1.0), flip=True,
      eval_crop_fraction=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),  # pixels to [-1, 1]
      worker_count=16, prefetch=4, mock_examples=0,
      on_bad_example="stop")  # "skip": leave undecodable or mislabelled examples out.
  # JFT-300M's label space; checked against the dataset, and what compile_check
  # shapes the head with when the data is not on this machine.
  config.num_classes = arg.num_classes

  config.model = dict(name="vit", variant=arg.variant, pool="token",
                      representation_size=config_dict.placeholder(int), dropout=0.0,
                      remat=False)  # remat=True trades ~30% more compute for activation memory.
  config.compute_dtype = "bfloat16"

  config.head = "mrl"
  config.nesting = dict(dims=(12, 24, 48, 96, 192, 384, 768), weights=())
  config.ff_dim = config_dict.placeholder(int)
  # 18,291 classes stored as 18,304 columns so the class dim splits over any
  # power-of-two "model" axis up to 128 (logits keep the real 18,291).
  config.head_class_multiple = 128
  config.loss = "sigmoid"

  config.batch_size = 128 * 64
  config.eval_batch_size = 128 * 64
  config.total_steps = 300_000
  config.lr = 1e-3
  config.optimizer = dict(name="adafactor", momentum=0.9, weight_decay=1e-4,
                          decay_norms_and_biases=False, grad_clip_norm=1.0)
  config.schedule = dict(name="linear", warmup_steps=10_000, end_lr_fraction=0.0)
  config.grad_accum_steps = 1

  # A pod: parameters and optimizer state sharded 4-way (fsdp), attention heads,
  # MLP hidden units and head classes 2-way (model), the rest data-parallel.
  config.mesh = dict(data=-1, fsdp=4, model=2)
  config.sharding_rules = vit.SHARDING_RULES  # Megatron-style q/k/v/out, fc1/fc2; head classes.

  # 1-NN and linear probe per size on ImageNet-1K during training.
  config.evaluators = dict(
      imagenet_knn=dict(
          every_steps=25_000, batch_size=1024, max_train_examples=0, max_test_examples=0,
          linear_probe=False,  # 1.28M x 768 embeddings: the L-BFGS probe is for --mode=probe.
          data=dict(name="imagenet2012", data_dir=config_dict.placeholder(str),
                    train_split="train", eval_split="validation", image_size=224,
                    eval_crop_fraction=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                    worker_count=16)))
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
    config.data.crop_scale = (0.5, 1.0)
    config.data.worker_count = 0
    config.num_classes = 10
    config.model.variant = "Ti/8"
    config.model.depth = 2  # Override the variant's depth: a seconds-long smoke run.
    config.compute_dtype = "float32"
    config.nesting.dims = (12, 24, 48, 96, 192)
    config.head_class_multiple = 4
    config.mesh = dict(data=-1, fsdp=1, model=1)
    config.batch_size = 16
    config.eval_batch_size = 32
    config.total_steps = 6
    config.schedule.warmup_steps = 2
    config.log_every_steps = 2
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 3
    ev = config.evaluators.imagenet_knn
    ev.every_steps = 3
    ev.batch_size = 120
    ev.max_train_examples = 480
    ev.linear_probe = True
    ev.linear_steps = 20
    ev.data = dict(name="mrl_digits", data_dir=config_dict.placeholder(str), image_size=32,
                   eval_crop_fraction=1.0, mean=(0.5,), std=(0.5,))
  # `--mode=probe`: label-set metrics per size on the corpus, and k-NN / linear probe /
  # retrieval per size on the evaluator's single-label data (a copy: --config.probe.data.*
  # changes only the probe's).
  config.probe.data = copy.deepcopy(config.evaluators.imagenet_knn.data)
  return config
