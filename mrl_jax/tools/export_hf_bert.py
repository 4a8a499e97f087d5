r"""Exports an mrl_jax MLM workdir as a Hugging Face BERT folder (+ sentence-transformers).

    python -m mrl_jax.tools.export_hf_bert --workdir W --out DIR [--step N]

DIR then loads with transformers (`BertForMaskedLM.from_pretrained(DIR)`:
the full-size MLM logits; `BertModel`: the hidden states; `AutoTokenizer`)
and with sentence-transformers (`SentenceTransformer(DIR, truncate_dim=m)`:
the nested sentence embedding z[:, :m], the vector whose prefixes the nested
decoder trained; unit-normalise it with `normalize_embeddings=True`). Files:

  * `config.json` (a BertConfig for BertForMaskedLM, decoder tied to the word
    embeddings) and `model.safetensors` (float32, torch layouts; the tied
    decoder weight is left out, as `save_pretrained` does);
  * `tokenizer.json` (the workdir's, with BERT's `[CLS] A [SEP] (B [SEP])`
    post-processor), `vocab.txt` (WordPiece vocabularies) and
    `tokenizer_config.json`;
  * sentence-transformers modules (`modules.json`, `sentence_bert_config.json`):
    0 the BERT encoder, 1_Pooling (config.model.pooling: the [CLS] token or
    the mean of the real tokens), 2_Dense (the MLM transform's Dense with
    exact GELU), 3_Dense (x 2^11, exact in float32) and 4_LayerNorm (the
    transform's LayerNorm). sentence-transformers' LayerNorm has eps 1e-5;
    scaling its input by 2^11 makes it compute LayerNorm with eps
    1e-5 / 2^22 = 2.4e-12 on the GELU output, BERT's 1e-12 to within far
    less than float32 rounding for any vector with variance above ~1e-6.

The nesting sizes and the head kind are not part of a BertConfig (a BERT
has no notion of them): they are written to `mrl_jax.json` beside it.
Exit status: 0 written; 2 a workdir that cannot be exported (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mrl_jax.errors import UserError
from mrl_jax.models import bert_hf
from mrl_jax.sharding import path_to_str

# 2^11: a power of two, so the scaling itself rounds nothing.
LAYER_NORM_INPUT_SCALE = 2.0 ** 11
_GELU = "torch.nn.modules.activation.GELU"  # approximate="none": erf, as BERT
_IDENTITY = "torch.nn.modules.linear.Identity"


class ExportError(UserError, ValueError):
  """A workdir that is not an MLM run, or an output folder that is not empty."""


def _write_json(path: str, value: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")


def _save_tensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, path,
            metadata={"format": "pt"})


def _lowercase_of(tokenizer_json: dict[str, Any]) -> bool:
  normalizer = tokenizer_json.get("normalizer") or {}
  items = normalizer.get("normalizers", [normalizer]) if isinstance(normalizer, dict) else []
  for item in items:
    if isinstance(item, dict) and (item.get("type") == "Lowercase" or item.get("lowercase")):
      return True
  return False


def write_tokenizer(tokenizer: Any, out: str, *, max_len: int) -> None:
  """tokenizer.json with BERT's post-processor, vocab.txt, tokenizer_config.json."""
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  backend = tokenizer.backend
  cls, sep = "[CLS]", "[SEP]"
  # transformers adds [CLS]/[SEP] through the post-processor (mrl_jax's encode adds them
  # itself, so a workdir's tokenizer.json may have none).
  backend.post_processor = processors.TemplateProcessing(
      single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
      special_tokens=[(cls, tokenizer.cls_id), (sep, tokenizer.sep_id)])
  backend.no_padding()
  backend.no_truncation()
  path = os.path.join(out, "tokenizer.json")
  backend.save(path)
  with open(path) as f:
    lowercase = _lowercase_of(json.load(f))
  try:
    tokenizer.save_vocab(os.path.join(out, "vocab.txt"))
  except ValueError:
    pass  # Not a WordPiece vocabulary with ids 0..n-1: tokenizer.json alone serves it.
  _write_json(os.path.join(out, "tokenizer_config.json"), {
      "tokenizer_class": "BertTokenizer", "do_lower_case": lowercase,
      "model_max_length": max_len, "pad_token": "[PAD]", "unk_token": "[UNK]",
      "cls_token": cls, "sep_token": sep, "mask_token": "[MASK]"})


def write_sentence_transformers(out: str, params: dict[str, np.ndarray], *, width: int,
                                pooling: str, seq_len: int) -> None:
  """modules.json and the Pooling, Dense(GELU), Dense(x 2^11), LayerNorm module folders."""
  modules = [("", "sentence_transformers.models.Transformer"),
             ("1_Pooling", "sentence_transformers.models.Pooling"),
             ("2_Dense", "sentence_transformers.models.Dense"),
             ("3_Dense", "sentence_transformers.models.Dense"),
             ("4_LayerNorm", "sentence_transformers.models.LayerNorm")]
  _write_json(os.path.join(out, "modules.json"),
              [{"idx": i, "name": str(i), "path": p, "type": t}
               for i, (p, t) in enumerate(modules)])
  _write_json(os.path.join(out, "sentence_bert_config.json"),
              {"max_seq_length": seq_len, "do_lower_case": False})
  _write_json(os.path.join(out, "config_sentence_transformers.json"),
              {"similarity_fn_name": "cosine"})
  modes = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
           "lasttoken")
  chosen = {"cls": "cls_token", "mean": "mean_tokens"}[pooling]
  _write_json(os.path.join(out, "1_Pooling", "config.json"),
              {"word_embedding_dimension": width,
               **{f"pooling_mode_{m}": m == chosen for m in modes}, "include_prompt": True})
  dense = {"in_features": width, "out_features": width, "bias": True}
  _write_json(os.path.join(out, "2_Dense", "config.json"),
              {**dense, "activation_function": _GELU})
  kernel = np.asarray(params["head/transform/dense/kernel"], np.float32)
  _save_tensors(os.path.join(out, "2_Dense", "model.safetensors"),
                {"linear.weight": kernel.T,
                 "linear.bias": np.asarray(params["head/transform/dense/bias"])})
  _write_json(os.path.join(out, "3_Dense", "config.json"),
              {**dense, "bias": False, "activation_function": _IDENTITY})
  _save_tensors(os.path.join(out, "3_Dense", "model.safetensors"),
                {"linear.weight": LAYER_NORM_INPUT_SCALE * np.eye(width, dtype=np.float32)})
  _write_json(os.path.join(out, "4_LayerNorm", "config.json"), {"dimension": width})
  _save_tensors(os.path.join(out, "4_LayerNorm", "model.safetensors"),
                {"norm.weight": np.asarray(params["head/transform/norm/scale"]),
                 "norm.bias": np.asarray(params["head/transform/norm/bias"])})


def export_hf_bert(workdir: str, out: str, *, step: int | None = None) -> str:
  """Writes the folder described in the module docstring; returns `out`."""
  from mrl_jax import inference  # pylint: disable=g-import-not-at-top
  config = inference.load_config(workdir)
  if config.get("task", "classification") != "mlm":
    raise ExportError(f"{workdir} is a config.task={config.get('task', 'classification')!r} "
                      "workdir: only masked-LM BERT workdirs (config.task='mlm') export to a "
                      "Hugging Face BERT.")
  if os.path.isdir(out) and os.listdir(out):
    raise ExportError(f"--out {out} is not empty: export into a new folder.")
  model = inference.load(workdir, step=step)
  from mrl_jax.tasks import mlm  # pylint: disable=g-import-not-at-top
  from mrl_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_lib.load_tokenizer(
      mlm.check_workdir_tokenizer(workdir, model.vocab_size))
  params = {path_to_str(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(model.params)}
  os.makedirs(out, exist_ok=True)
  _save_tensors(os.path.join(out, "model.safetensors"), bert_hf.params_to_hf(params))
  hf_config = bert_hf.hf_config_from_model(config.model.to_dict(), model.vocab_size,
                                           pad_token_id=int(tokenizer.pad_id))
  _write_json(os.path.join(out, "config.json"), hf_config)
  write_tokenizer(tokenizer, out, max_len=hf_config["max_position_embeddings"])
  write_sentence_transformers(out, params, width=hf_config["hidden_size"],
                              pooling=mlm.pooling_of(config),
                              seq_len=int(config.data.seq_len))
  _write_json(os.path.join(out, "mrl_jax.json"),
              {"head": config.head, "nesting_dims": list(model.dims), "step": model.step,
               "pooling": mlm.pooling_of(config),
               "embedding": "transform(pool(hidden)); truncate to m, then unit-normalise"})
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mrl_jax.tools.export_hf_bert",
      description="Export an mrl_jax masked-LM workdir as a Hugging Face BERT folder.")
  parser.add_argument("--workdir", required=True, help="the mrl_jax workdir (config.task='mlm')")
  parser.add_argument("--out", required=True, help="new folder to write")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  args = parser.parse_args(argv)
  try:
    out = export_hf_bert(args.workdir, args.out, step=args.step)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Wrote {out} (transformers BertForMaskedLM and sentence-transformers).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
