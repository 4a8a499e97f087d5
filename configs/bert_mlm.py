# python -m mrl_jax.main --config configs/bert_mlm.py --workdir gs://BUCKET/mrl_bert_base
"""BERT-Base masked-LM pre-training with a nested (Matryoshka) tied decoder: the paper's recipe.

MRL paper (BERT): BERT-Base on Wikipedia + BooksCorpus, the MLM decoder tied to
the word embeddings scores every prefix 12, 24, ..., 768 of the transformed
hidden state (MRL-E: with a tied decoder "mrl" and "mrl_e" are the same head),
AdamW lr 1e-4 with 10K warm-up steps and linear decay, weight decay 0.01,
batch 1024, 450K steps, sequences of 128 tokens; MLM accuracy within 0.5% of
FF at every size. The FF-k baseline: `--config.head=ff --config.ff_dim=k`.

Data: a text corpus built with `python -m mrl_jax.tools.build_text_corpus
--name wiki_books --data_dir DIR --train FILES --validation FILES` and a
WordPiece vocabulary (bert-base-uncased's vocab.txt: 30,522 tokens) in
config.data.tokenizer. BERT's second phase (the last 10% of steps at 512
tokens) is a second run that starts from this one's weights:
  python -m mrl_jax.main --config configs/bert_mlm.py --workdir W512 \
      --config.data.seq_len=512 --config.data.max_predictions=80 \
      --config.total_steps=50000 --config.init_from.workdir=W
Check memory per device before booking a pod (no data needed):
  python -m mrl_jax.main --config configs/bert_mlm.py --workdir /tmp/cc \
      --mode=compile_check --cpu_devices=8
Probe every size (MLM accuracy, retrieval on labelled newsgroup posts,
correlation with human similarity ratings on the Lee corpus): `--mode=probe`.

Arguments: `:variant=large`, `:dataset=NAME`, `:runlocal` (a tiny BERT on the
embedded `mrl_text_demo` corpus, 300 steps, about a minute on a 2-core CPU:
5.1-6.0% MLM accuracy over the sizes against a chance of 1/8000 -- at this
budget it has learnt mostly which tokens are frequent; 1000 steps at lr 1e-3
reached 5.2% at 8 dims to 8.6% at 128).
"""

import ml_collections
from ml_collections import config_dict

from mrl_jax.config_args import parse_config_arg
from mrl_jax.evaluation.probe_settings import default_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_config_arg(arg, runlocal=False, variant="base", dataset="wiki_books")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = "mlm"

  # Data: documents -> WordPiece ids -> [CLS] ... [SEP] sequences, 15% of tokens
  # masked (80% [MASK], 10% random, 10% kept); see mrl_jax/data/mlm_pipeline.py.
  config.data = dict(
      name=arg.dataset, data_dir=config_dict.placeholder(str), train_split="train",
      eval_split="validation",
      # A vocab.txt or tokenizer.json; None: the corpus's own.
      tokenizer=config_dict.placeholder(str),
      # The tokenizer's size, checked against it (None: take it from the tokenizer);
      # what compile_check shapes the decoder with when the corpus is absent.
      vocab_size=config_dict.placeholder(int),
      seq_len=128, mask_rate=0.15,
      max_predictions=20,  # BERT's max_predictions_per_seq at 128 tokens.
      worker_count=16, prefetch=4,
      on_bad_example="stop")  # "skip": leave undecodable or empty documents out.
  config.data.vocab_size = 30522  # bert-base-uncased's WordPiece vocabulary.

  # Model: BERT as published (post-LN, learned positions, erf GELU, N(0, 0.02) init).
  config.model = dict(
      name="bert", variant=arg.variant,
      # Architecture overrides; None: the variant's.
      width=config_dict.placeholder(int), depth=config_dict.placeholder(int),
      num_heads=config_dict.placeholder(int), mlp_dim=config_dict.placeholder(int),
      max_len=config_dict.placeholder(int),  # Position embeddings (512).
      type_vocab_size=config_dict.placeholder(int),
      dropout=0.1, attention_dropout=0.1,
      remat=False,  # True trades ~30% more compute for activation memory.
      pooling="mean")  # Sentence embedding: "mean" of real tokens or "cls", then the MLM transform.
  config.compute_dtype = "bfloat16"

  # MRL: the tied decoder scores every prefix of the transformed hidden state.
  config.head = "mrl_e"  # "mrl" is the same for a tied decoder; "ff": FF-k on ff_dim dims.
  config.nesting = dict(dims=(12, 24, 48, 96, 192, 384, 768), weights=())  # () = all ones.
  config.ff_dim = config_dict.placeholder(int)  # For head="ff": the k of FF-k (None = all).

  # Optimisation (BERT / the MRL paper).
  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.total_epochs = 0
  config.total_steps = 450_000
  config.lr = 1e-4
  config.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01,
                          decay_norms_and_biases=False,  # BERT: none on LayerNorm and biases.
                          grad_clip_norm=1.0)
  config.schedule = dict(name="linear", warmup_steps=10_000, end_lr_fraction=0.0)
  config.grad_accum_steps = 1
  # Start from another workdir's weights, the MLM head included (BERT's 512-token
  # second phase); the optimizer starts fresh.
  config.init_from = dict(workdir=config_dict.placeholder(str), head=True)

  # A pod: parameters and optimizer state sharded 4-way (fsdp), attention heads and
  # MLP hidden units 2-way (model), the rest data-parallel.
  config.mesh = dict(data=-1, fsdp=4, model=2)
  config.sharding_rules = ()  # (): the task's rules, Megatron-style (models/bert.py).

  # `--mode=probe`: MLM accuracy per size on eval_split, retrieval on labelled
  # newsgroup posts (100 queries: ks up to 50), Lee-corpus similarity correlation;
  # baseline_workdir: an FF-k run (mrl_jax/evaluation/text_probe.py).
  config.probe = default_probe_config(retrieval_ks=(10, 25, 50))

  # Logging and checkpoints.
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 3
  # A NaN/Inf loss or gradient stops the run; "skip" drops such updates instead,
  # up to max_nonfinite_steps of them.
  config.on_nonfinite = "stop"
  config.max_nonfinite_steps = 100

  if arg.runlocal:
    config.data.name = "mrl_text_demo"  # Built on first use from gensim's test texts.
    config.data.vocab_size = None  # Its own ~8K-token WordPiece vocabulary.
    config.data.seq_len = 64
    config.data.max_predictions = 10
    config.data.worker_count = 0
    config.data.prefetch = 2
    config.model.variant = "tiny"  # 128 wide, 2 layers, 2 heads.
    config.model.dropout = 0.0  # Too few steps to overfit.
    config.model.attention_dropout = 0.0
    config.compute_dtype = "float32"
    config.nesting.dims = (8, 16, 32, 64, 128)
    config.mesh = dict(data=-1, fsdp=1, model=1)
    config.batch_size = 32
    config.eval_batch_size = 64
    config.total_steps = 300
    config.lr = 2e-3  # 300 steps: 5-6% MLM accuracy (chance 1/8000); 3e-3 stalled at 4.9%.
    config.schedule.warmup_steps = 30
    config.log_every_steps = 50
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 2
    config.probe.batch_size = 64
  return config
