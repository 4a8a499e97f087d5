r"""Imports a Hugging Face (transformers) BERT folder into an mrl_jax MLM workdir.

    python -m mrl_jax.tools.import_hf_bert --checkpoint DIR --workdir OUT
    python -m mrl_jax.tools.import_hf_bert --checkpoint DIR --workdir OUT \
        --nesting 12,24,48,96,192,384,768 --head mrl_e --pooling cls

DIR is what `save_pretrained` writes (or a hub snapshot): `config.json` (a
BertConfig: BertForMaskedLM or BertForPreTraining), the weights as
`model.safetensors` (or sharded with `model.safetensors.index.json`) or
`pytorch_model.bin` (needs torch), and the tokenizer as `tokenizer.json` or
`vocab.txt` (lower-cased unless `tokenizer_config.json` says
`do_lower_case: false`). Nothing is downloaded.

OUT gets what a training run leaves behind, so `--mode=probe` and inference
(`inference.load(OUT).embed_text(...)`) work on it, and a new run can start
from its weights (MRL fine-tuning of a pre-trained BERT), e.g. bert-base-uncased
(the recipe's variant "base"):

    python -m mrl_jax.main --config configs/bert_mlm.py --workdir W2 \
        --config.init_from.workdir=OUT --config.data.tokenizer=OUT/tokenizer.json

For other sizes set the config.model fields as in OUT/config.json (a variant
plus the width/depth/num_heads/mlp_dim/max_len overrides builds the same
architecture as OUT's variant=None). OUT holds:
  * `OUT/config.json`: the `configs/bert_mlm.py` recipe with the imported
    architecture and dropout rates, `head` (default "mrl_e": the tied decoder
    scores every prefix), the nesting (default: the recipe's sizes up to the
    width, and the width itself), `data.tokenizer` = OUT/tokenizer.json and
    `data.vocab_size`, computing in `--compute_dtype` (float32 by default, so
    the logits equal transformers' up to float32 rounding).
  * `OUT/tokenizer.json`: the checkpoint's tokenizer (vocab.txt converted).
  * `OUT/checkpoints/0`: the imported parameters at step 0 (no update made
    here), the optimizer state freshly initialised, no input position; its
    meta is the MLM task's `checkpoint_meta`.

Exit status: 0 written; 2 a folder, config or state dict that cannot be
imported (one line saying what and how to fix it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrl_jax import experiment, sharding
from mrl_jax.checkpointing import Checkpointer
from mrl_jax.errors import ConfigError, UserError
from mrl_jax.models import bert, bert_hf
from mrl_jax.models.bert_hf import HFCheckpointError
from mrl_jax.sharding import path_to_str
from mrl_jax.workdir_path import make_dirs, workdir_path, write_json_atomic, \
    write_through_local_file

IMPORT_STEP = 0
TOKENIZER_FILE = "tokenizer.json"
HEADS = ("mrl_e", "mrl", "ff")
COMPUTE_DTYPES = ("float32", "bfloat16")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RECIPE = os.path.join(_ROOT, "configs", "bert_mlm.py")
# Architectures whose state dict holds BERT + the MLM head (cls.predictions).
MLM_ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining")


# ---------------------------------------------------------------- reading the folder

def read_hf_config(checkpoint: str) -> dict[str, Any]:
  path = os.path.join(checkpoint, "config.json")
  if not os.path.isdir(checkpoint):
    raise HFCheckpointError(f"--checkpoint {checkpoint} is not a directory: give the folder "
                            "save_pretrained wrote (config.json, model.safetensors, vocab.txt).")
  if not os.path.isfile(path):
    raise HFCheckpointError(f"{path} does not exist: --checkpoint must be a transformers "
                            "folder with config.json.")
  try:
    with open(path) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise HFCheckpointError(f"{path} cannot be read as JSON ({type(e).__name__}).") from None
  if not isinstance(hf, dict):
    raise HFCheckpointError(f"{path} is not a JSON object: it is not a BertConfig.")
  architectures = hf.get("architectures") or []
  if hf.get("model_type") == "bert" and architectures and not set(architectures) & set(
      MLM_ARCHITECTURES):
    raise HFCheckpointError(
        f"{path} is a {', '.join(architectures)}: only checkpoints with BERT's MLM head "
        f"({' or '.join(MLM_ARCHITECTURES)}) can be imported, since the nested decoder is that "
        "head.")
  return hf


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  # bfloat16 tensors load too: importing jax registers ml_dtypes' bfloat16 with numpy.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return dict(load_file(path))


def read_hf_weights(checkpoint: str) -> dict[str, np.ndarray]:
  """model.safetensors (one file or an index of shards), else pytorch_model.bin."""
  single = os.path.join(checkpoint, "model.safetensors")
  index = os.path.join(checkpoint, "model.safetensors.index.json")
  torch_bin = os.path.join(checkpoint, "pytorch_model.bin")
  try:
    if os.path.isfile(single):
      return _load_safetensors(single)
    if os.path.isfile(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      out: dict[str, np.ndarray] = {}
      for shard in shards:
        out.update(_load_safetensors(os.path.join(checkpoint, shard)))
      return out
    if os.path.isfile(torch_bin):
      try:
        import torch  # pylint: disable=g-import-not-at-top  # only .bin files need it
      except ImportError:
        raise HFCheckpointError(f"{torch_bin} needs torch to read: `pip install torch` (the "
                                "CPU wheel), or save the model as safetensors.") from None
      state = torch.load(torch_bin, map_location="cpu", weights_only=True)
      return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
              for k, v in state.items()}
  except HFCheckpointError:
    raise
  except ImportError as e:
    raise HFCheckpointError(f"Reading {checkpoint}'s weights needs safetensors ({e}): "
                            "`pip install safetensors`.") from None
  except Exception as e:  # pylint: disable=broad-except  # whatever a damaged file raises
    detail = " ".join(str(e).split())[:200]
    raise HFCheckpointError(f"The weights in {checkpoint} cannot be read "
                            f"({type(e).__name__}: {detail}).") from None
  raise HFCheckpointError(f"{checkpoint} has no model.safetensors, model.safetensors.index.json "
                          "or pytorch_model.bin: save the model with save_pretrained.")


def read_hf_tokenizer(checkpoint: str):
  """The folder's tokenizer.json, else its vocab.txt (lower-cased per tokenizer_config.json)."""
  from mrl_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  lowercase = True
  settings = os.path.join(checkpoint, "tokenizer_config.json")
  if os.path.isfile(settings):
    try:
      with open(settings) as f:
        lowercase = bool(json.load(f).get("do_lower_case", True))
    except (OSError, ValueError, AttributeError):
      pass  # The vocabulary alone still defines the ids; BERT's default is uncased.
  for name in (TOKENIZER_FILE, "vocab.txt"):
    path = os.path.join(checkpoint, name)
    if os.path.isfile(path):
      return tokenizer_lib.load_tokenizer(path, lowercase=lowercase)
  raise HFCheckpointError(f"{checkpoint} has no tokenizer.json or vocab.txt: copy the "
                          "checkpoint's tokenizer files into it.")


# ---------------------------------------------------------------- config

def _recipe(path: str = _RECIPE) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("bert_mlm", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def parse_nesting(text: str | None, width: int, recipe_dims: Sequence[int]) -> tuple[int, ...]:
  """"12,24,48" -> (12, 24, 48); None: the recipe's sizes below the width, then the width."""
  if text is None:
    return tuple(m for m in recipe_dims if m < width) + (width,)
  try:
    dims = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise ConfigError(f"--nesting {text!r}: give comma-separated sizes, e.g. "
                      "12,24,48,96,192,384,768.") from None
  if not dims or dims[-1] > width:
    raise ConfigError(f"--nesting {text!r}: give sizes up to the model's width {width}.")
  return dims


def import_config(hf: dict[str, Any], *, workdir: str, nesting: str | None = None,
                  head: str = "mrl_e", compute_dtype: str = "float32",
                  pooling: str | None = None) -> ml_collections.ConfigDict:
  """The bert_mlm recipe set to the HF config's architecture and the chosen head and sizes."""
  if head not in HEADS:
    raise ConfigError(f"--head {head!r}: use one of {HEADS}.")
  if compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"--compute_dtype {compute_dtype!r}: use one of {COMPUTE_DTYPES}.")
  model_fields, vocab_size = bert_hf.model_config_from_hf(hf)
  config = _recipe()
  for key, value in model_fields.items():
    config.model[key] = value
  if pooling is not None:
    config.model.pooling = pooling
  width = bert.bert_embedding_dim(model_fields["variant"],
                                  **{k: model_fields[k] for k in bert.ARCH_FIELDS})
  config.head = head
  if head == "ff":
    config.ff_dim = width
    config.nesting.dims = (width,)
  else:
    config.nesting.dims = parse_nesting(nesting, width, config.nesting.dims)
  config.nesting.weights = ()
  config.compute_dtype = compute_dtype
  max_len = int(model_fields["max_len"])
  if config.data.seq_len > max_len:  # A model with fewer positions than the recipe's 128.
    config.data.seq_len = max_len
    config.data.max_predictions = max(1, round(0.15 * max_len))
  config.data.vocab_size = vocab_size
  config.data.tokenizer = os.fspath(workdir_path(workdir) / TOKENIZER_FILE)
  return config


# ---------------------------------------------------------------- import

def _local_mesh():
  # Arrays are made on this process's devices, unsharded; any mesh restores them later.
  return sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})


def import_hf_bert(checkpoint: str, workdir: str, *, nesting: str | None = None,
                   head: str = "mrl_e", compute_dtype: str = "float32",
                   pooling: str | None = None) -> str:
  """Writes OUT/config.json, OUT/tokenizer.json and a step-0 checkpoint; returns its path."""
  workdir = workdir_path(workdir)
  ckpt_dir = workdir / "checkpoints"
  if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
    raise HFCheckpointError(f"{ckpt_dir} is not empty: import into a new --workdir.")
  hf = read_hf_config(checkpoint)
  config = import_config(hf, workdir=workdir, nesting=nesting, head=head,
                         compute_dtype=compute_dtype, pooling=pooling)
  tokenizer = read_hf_tokenizer(checkpoint)
  if tokenizer.vocab_size != config.data.vocab_size:
    # The workdir's tokenizer must match the decoder (tasks/mlm.check_workdir_tokenizer).
    raise HFCheckpointError(
        f"The tokenizer in {checkpoint} has {tokenizer.vocab_size} tokens but config.json's "
        f"vocab_size is {config.data.vocab_size}: put the model's own tokenizer files there.")
  state_dict = read_hf_weights(checkpoint)

  from mrl_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
  task = get_task(config)
  task.check_config(config)
  # The decoder's size comes from the weights' config; there is no dataset.
  info = task.data_info_from_meta(config, {"vocab_size": config.data.vocab_size})
  exp = experiment.build(config, info=info, mesh=_local_mesh(), check=False)
  abstract = exp.spec.abstract
  expected = {path_to_str(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_leaves_with_path(abstract["params"])}
  arrays = bert_hf.hf_to_params(state_dict, expected)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(arrays[path_to_str(p)], x.dtype), abstract["params"])
  # The model state holds only dropout RNG streams: take a fresh model's (jit drops
  # the unused parameter initialisation).
  model_state = jax.jit(lambda: exp.spec.init()["model_state"])()
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
           "opt_state": jax.jit(exp.spec.tx.init)(params)}
  if jax.tree.structure(state) != jax.tree.structure(abstract):
    raise AssertionError("The imported state's structure differs from the train state's.")

  make_dirs(workdir)
  write_through_local_file(config.data.tokenizer, tokenizer.save)
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    checkpointer.save(IMPORT_STEP, state, None, exp.checkpoint_meta())
  finally:
    checkpointer.close()
  write_json_atomic(workdir / "config.json", config.to_dict())
  return os.path.join(checkpointer.directory, str(IMPORT_STEP))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mrl_jax.tools.import_hf_bert",
      description="Import a Hugging Face BERT (BertForMaskedLM) folder into an mrl_jax workdir.")
  parser.add_argument("--checkpoint", required=True, help="the save_pretrained folder")
  parser.add_argument("--workdir", required=True, help="new workdir to write")
  parser.add_argument("--nesting", default=None,
                      help="comma-separated prefix sizes (default: 12,24,... up to the width)")
  parser.add_argument("--head", choices=HEADS, default="mrl_e",
                      help="config.head (mrl and mrl_e are the same tied decoder; ff: one size)")
  parser.add_argument("--pooling", choices=("mean", "cls"), default=None,
                      help="config.model.pooling of the sentence embedding (default: the "
                           "recipe's)")
  parser.add_argument("--compute_dtype", choices=COMPUTE_DTYPES, default="float32",
                      help="written into config.json (float32: transformers' numbers)")
  args = parser.parse_args(argv)
  try:
    path = import_hf_bert(args.checkpoint, args.workdir, nesting=args.nesting, head=args.head,
                          compute_dtype=args.compute_dtype, pooling=args.pooling)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Wrote {path}, {os.path.join(args.workdir, 'config.json')} and "
        f"{os.path.join(args.workdir, TOKENIZER_FILE)}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
