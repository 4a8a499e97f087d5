# python -m mrl_jax.main --config configs/align.py --workdir gs://BUCKET/mrl_align
"""ALIGN-MRL: an image-text dual encoder whose every prefix 12..768 is trained contrastively.

MRL paper (ALIGN): both towers nested, each prefix of the image and the text
embedding L2-normalised on its own and scored with the contrastive loss,
summed over the nesting list 12, 24, ..., 768; 1M steps. ALIGN itself:
EfficientNet-L2 + BERT-Large, batch 16,384, softmax (InfoNCE) loss in both
directions with a learned temperature, LAMB with lr 1e-3 (10K warm-up steps,
linear decay), weight decay 1e-5. EfficientNet is not in this model registry,
so the image tower here is ViT-B/16 and the text tower BERT-Base (CLS token),
each projected to 768 dims. Data: an image-text corpus built with
`python -m mrl_jax.tools.build_corpus` from a manifest or webdataset tars
(see the README); its WordPiece tokenizer in config.data.tokenizer. The run
ends with zero-shot ImageNet-1K top-1 (a few CLIP prompt templates) and
image<->text recall@1/5/10 per size (mrl_jax/evaluation/dual_evaluators.py);
`--mode=probe` adds image k-NN per size and the truncation baselines.

Arguments:
  `:sigmoid`  SigLIP's pairwise sigmoid loss (learned scale, init 10, and bias, init -10).
  `:lit`      LiT: the image tower locked (`config.freeze`), initialised from the
              image classifier run given by --config.init_from.image.workdir.
  `:runlocal` a tiny dual encoder on the embedded `mrl_digit_captions` corpus.
The plain (not nested) baseline: `--config.head=ff`. Check memory per device
before booking a pod (no data needed):
  python -m mrl_jax.main --config configs/align.py --workdir /tmp/cc \
      --mode=compile_check --cpu_devices=8

`:runlocal`: a narrow ResNet-18 image tower (16 channels, CIFAR stem) and a tiny
BERT (128 wide, 2 layers) with 64-d projections, nesting 8..64, 300 steps of
batch 64 on the embedded `mrl_digit_captions` (32x32 pairs of MNIST digits,
captions naming the number). Measured on the 2-core CPU with other jobs running:
117 s for the run, evaluators included; on the test split (1,000 images, 3,990
captions) zero-shot top-1 28.9-30.0% over the sizes (chance 1%), in-batch pair
top-1 about 33% (chance 1.6%), image->text R@1 3.2-4.1%, text->image R@1
2.8-3.0% (a caption's number has 10 test images: R@1 is at most ~10%).
1,000 steps reach 94% zero-shot at every size (benchmarks/align_mrl_shape.py).
"""

import ml_collections
from ml_collections import config_dict

from mrl_jax.config_args import parse_config_arg
from mrl_jax.evaluation.probe_settings import default_probe_config

# A few of CLIP's ImageNet prompt templates (its paper: prompt ensembling adds
# about 1.5 points of zero-shot top-1 over "a photo of a {}.").
CLIP_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.",
    "a sculpture of a {}.", "a rendering of a {}.", "a cropped photo of the {}.",
    "a photo of the large {}.", "a photo of the small {}.", "itap of a {}.",
    "art of the {}.",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_config_arg(arg, runlocal=False, sigmoid=False, lit=False, dataset="align_pairs")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = "contrastive"  # image-text pairs -> two towers -> nested contrastive loss

  # Data: image-caption pairs (mrl_jax/data/image_text_pipeline.py); captions as
  # [CLS] text [SEP], padded to seq_len tokens.
  config.data = dict(
      name=arg.dataset, data_dir=config_dict.placeholder(str), train_split="train",
      eval_split="validation", image_size=224, train_augment="random_resized_crop",
      crop_scale=(0.5, 1.0),  # Captions describe the whole image: milder crops than ImageNet's.
      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),  # Pixels to [-1, 1].
      tokenizer=config_dict.placeholder(str),  # A vocab.txt or tokenizer.json; None: the corpus's.
      seq_len=64,  # ALIGN: 64 tokens of alt-text.
      # The tokenizer's size, checked against it (None: take it from the tokenizer);
      # what compile_check shapes the text tower with when the corpus is absent.
      vocab_size=config_dict.placeholder(int),
      worker_count=16, prefetch=4,
      on_bad_example="stop")  # "skip": leave undecodable images or empty captions out.
  config.data.vocab_size = 30522  # bert-base-uncased's WordPiece vocabulary.

  # Model (mrl_jax/models/dual_encoder.py): each tower, then a linear projection to
  # embed_dim; the nesting is over the projected embeddings of both towers.
  config.model = dict(
      name="dual_encoder",
      image=dict(name="vit", variant="B/16", pool="token",
                 representation_size=config_dict.placeholder(int), dropout=0.0, remat=False,
                 # Architecture overrides; None: the variant's.
                 width=config_dict.placeholder(int), depth=config_dict.placeholder(int),
                 mlp_dim=config_dict.placeholder(int), num_heads=config_dict.placeholder(int),
                 patch=config_dict.placeholder(int)),
      text=dict(name="bert", variant="base", pooling="cls", dropout=0.1, attention_dropout=0.1,
                # Architecture overrides; None: the variant's.
                width=config_dict.placeholder(int), depth=config_dict.placeholder(int),
                num_heads=config_dict.placeholder(int), mlp_dim=config_dict.placeholder(int),
                max_len=config_dict.placeholder(int),  # Position embeddings (512).
                remat=False),
      embed_dim=768)  # None: no projections (both towers must then be equally wide).
  config.compute_dtype = "bfloat16"

  # The contrastive loss (losses.nested_contrastive_loss) at the learned scale exp(t).
  config.contrastive = dict(
      kind="sigmoid" if arg.sigmoid else "softmax",
      init_scale=config_dict.placeholder(float),  # None: 1/0.07 (softmax, CLIP), 10 (sigmoid).
      init_bias=config_dict.placeholder(float),   # None: -10 (sigmoid, SigLIP); softmax: none.
      learn_scale=True,
      per_size_scale=False,  # True: one learned temperature per prefix size.
      max_scale=100.0)       # CLIP's clip of the scale.

  # MRL: every prefix of both embeddings; head="ff" trains the plain dual encoder
  # (one size, ff_dim or the whole embedding).
  config.head = "mrl"
  config.nesting = dict(dims=(12, 24, 48, 96, 192, 384, 768), weights=())  # () = all ones.
  config.ff_dim = config_dict.placeholder(int)

  # Optimisation. LAMB, as ALIGN: at batch 16,384 its per-layer trust ratio keeps
  # every layer's step in proportion to its weights, where AdamW needs its lr
  # retuned (and clipping) for the large batch.
  config.batch_size = 16_384
  config.eval_batch_size = 4096
  config.total_epochs = 0
  config.total_steps = 1_000_000  # The MRL paper's ALIGN run.
  config.lr = 1e-3
  config.optimizer = dict(name="lamb", b1=0.9, b2=0.999, eps=1e-6, weight_decay=1e-5,
                          decay_norms_and_biases=False, grad_clip_norm=0.0)
  config.schedule = dict(name="linear", warmup_steps=10_000, end_lr_fraction=0.0)
  config.grad_accum_steps = 1

  # LiT and fine-tuning: regexes over parameter paths ("image/...", "text/...",
  # "image_projection/...", "logit_scale") that get no gradient and no optimizer
  # state; and per-tower initialisation from other runs' checkpoints (the
  # parameters under `prefix` there are copied into "image/" or "text/").
  config.freeze = ()
  config.init_from = dict(
      image=dict(workdir=config_dict.placeholder(str), prefix="encoder/"),
      text=dict(workdir=config_dict.placeholder(str), prefix="encoder/"))

  # A pod: parameters and optimizer state sharded 8-way (fsdp), the rest data-parallel.
  config.mesh = dict(data=-1, fsdp=8, model=1)
  config.sharding_rules = ()  # (): the towers' Megatron rules (models/dual_encoder.py).

  # After the last step (and every every_steps): zero-shot ImageNet-1K top-1 per size
  # (class-name prompts, text embeddings averaged per class) and image<->text recall@k
  # on the corpus's eval split (mrl_jax/evaluation/dual_evaluators.py).
  config.zero_shot = dict(
      every_steps=50_000,
      data=dict(name="imagenet2012", data_dir=config_dict.placeholder(str),
                train_split="train", eval_split="validation", image_size=224,
                eval_crop_fraction=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                worker_count=16),
      split="validation",
      # imagenet2012's TFDS labels are WordNet ids: give the 1000 readable names
      # (e.g. CLIP's list) here; None: the dataset's own label names.
      class_names=config_dict.placeholder(tuple),
      templates=CLIP_TEMPLATES, batch_size=1024, max_examples=0)
  config.retrieval = dict(every_steps=50_000, split=config_dict.placeholder(str),
                          ks=(1, 5, 10), batch_size=1024, max_images=0)
  config.evaluators = {}  # Image-tower 1-NN per size (mrl_jax/evaluation/periodic.py).
  config.probe = default_probe_config()  # `--mode=probe`: mrl_jax/evaluation/probe_settings.py.

  # Logging and checkpoints.
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 3
  # A NaN/Inf loss or gradient stops the run; "skip" drops such updates instead,
  # up to max_nonfinite_steps of them.
  config.on_nonfinite = "stop"
  config.max_nonfinite_steps = 100

  if arg.lit:
    # LiT: a pre-trained image tower, locked (it also runs in inference mode);
    # only the text tower, both projections and the temperature train.
    config.freeze = ("^image/",)
    config.init_from.image.prefix = "encoder/"  # An image classifier run's encoder.

  if arg.runlocal:
    config.data.name = "mrl_digit_captions"  # Built on first use (MNIST digit pairs + captions).
    config.data.eval_split = "test"
    config.data.image_size = 32
    config.data.crop_scale = (0.8, 1.0)
    config.data.seq_len = 16
    config.data.vocab_size = None  # The corpus's own small WordPiece vocabulary.
    config.data.worker_count = 0
    config.data.prefetch = 2
    # A narrow ResNet-18 (16 channels in its first stage, CIFAR-style stem): in 300
    # steps it learns the digits (zero-shot 30%), where a 2-layer ViT at the same
    # wall time stays near chance (2-4%).
    config.model.image = dict(name="resnet", depth=18, width=16, small_images=True)
    config.model.text.variant = "tiny"  # 128 wide, 2 layers.
    config.model.text.dropout = 0.0
    config.model.text.attention_dropout = 0.0
    config.model.embed_dim = 64
    config.compute_dtype = "float32"
    config.nesting.dims = (8, 16, 32, 64)
    config.mesh = dict(data=-1, fsdp=1, model=1)
    config.batch_size = 64
    config.eval_batch_size = 64
    config.total_steps = 300
    config.lr = 2e-3
    config.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
                            decay_norms_and_biases=False, grad_clip_norm=1.0)
    config.schedule = dict(name="cosine", warmup_steps=20, end_lr_fraction=0.0)
    config.zero_shot = dict(every_steps=0, data=None, split="test", class_names=None,
                            templates=("the number {}", "a photo of {}."),  # As the captions say it.
                            batch_size=128, max_examples=0)
    config.retrieval = dict(every_steps=0, split="test", ks=(1, 5, 10), batch_size=128,
                            max_images=0)
    config.log_every_steps = 50
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 2
    config.probe.batch_size = 128
  return config
