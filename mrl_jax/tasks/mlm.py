"""The masked-LM task: token ids -> BERT -> nested tied MLM decoder, one loss per prefix size.

`config.task = "mlm"` (see `configs/bert_mlm.py`). The objective is the MRL
sum over the nesting list, sum_m c_m * CE_m, where CE_m is the masked-LM
cross-entropy of the decoder that scores only the first m features of the
transformed hidden state (`models/nested_mlm_head.py`), averaged over the real
predictions of the batch (`masked_weights` = 1; padding predictions weigh 0).
With the decoder tied to the word embeddings, "mrl" and "mrl_e" are the same
head (one tied matrix, sliced); `head="ff"` trains the single size
`config.ff_dim` with weight 1, the FF-k baseline of the paper.

Data (`mrl_jax/data/mlm_pipeline.py`): batches of input_ids, token_type_ids,
attention_mask [B, L] and masked_positions, masked_ids, masked_weights [B, P].
The vocabulary is the tokenizer's; `config.data.vocab_size` (optional) must
agree with it and is what `--mode=compile_check` shapes the decoder with when
the corpus is not on the machine. A training run copies its tokenizer to
WORKDIR/tokenizer.json, so the workdir alone restores a model that reads text
(`inference.load(W).embed_text([...])`).

The sentence embedding (`embed`, probes, `embed_text`) is the nested vector
whose prefixes the decoder trains: the MLM transform of the pooled final
hidden states, pooling = config.model.pooling ("mean" over real tokens, or
"cls").
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mrl_jax.errors import ConfigError, UserError
from mrl_jax.nesting import Nesting
from mrl_jax.tasks.base import Task
from mrl_jax.workdir_path import local_file, make_dirs, workdir_path, \
    write_through_local_file

POOLINGS = ("mean", "cls")
DEFAULT_POOLING = "mean"
# config.data fields the task reads itself; the pipeline does not see them.
TASK_DATA_FIELDS = ("vocab_size",)
TOKENIZER_FILE = "tokenizer.json"


class TokenizerMismatchError(UserError, ValueError):
  """A workdir's tokenizer does not fit its checkpoint's vocabulary."""


def pooling_of(config: ml_collections.ConfigDict) -> str:
  """The sentence-embedding pooling: config.model.pooling, else "mean"."""
  pooling = config.model.get("pooling") or DEFAULT_POOLING
  if pooling not in POOLINGS:
    raise ConfigError(f"config.model.pooling={pooling!r} is unknown: use one of {POOLINGS}.")
  return pooling


def pipeline_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.data without the fields only the task reads (the pipeline refuses unknown ones)."""
  fields = {k: v for k, v in config.data.to_dict().items() if k not in TASK_DATA_FIELDS}
  return ml_collections.ConfigDict(fields)


def max_predictions_of(data_cfg: ml_collections.ConfigDict) -> int:
  """BERT's max_predictions_per_seq: config.data.max_predictions, else round(0.15 * seq_len)."""
  given = data_cfg.get("max_predictions")
  if given:
    return int(given)
  return max(1, int(round(float(data_cfg.get("mask_rate", 0.15)) * int(data_cfg.seq_len))))


def _model_fields(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The variant's architecture with config.model's overrides applied."""
  from mrl_jax.models import bert
  return bert.architecture(model_cfg.get("variant", "base"), **bert.model_overrides(model_cfg))


def nested_mlm_xent(logits: jax.Array, masked_ids: jax.Array, masked_weights: jax.Array,
                    weights: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum_m c_m * CE_m, CE per size [n], accuracy per size [n]) from logits [n, B, P, V].

  Both per-size values are averages over the real predictions
  (masked_weights > 0) of the whole batch, weighted by masked_weights.
  """
  return nested_mlm_xent_of_sums(masked_lm_sums(logits, masked_ids, masked_weights), weights)


def nested_mlm_xent_of_sums(sums: dict[str, jax.Array], weights: jax.Array
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`nested_mlm_xent` from `masked_lm_sums`' output (e.g. `BertMLM.mlm_sums`, fused)."""
  count = jnp.maximum(sums["count"], 1.0)
  per_size_loss, accuracy = sums["loss_sum"] / count, sums["correct"] / count
  return jnp.sum(jnp.asarray(weights, jnp.float32) * per_size_loss), per_size_loss, accuracy


def masked_lm_sums(logits: jax.Array, masked_ids: jax.Array,
                   masked_weights: jax.Array) -> dict[str, jax.Array]:
  """{"loss_sum" [n], "correct" [n], "count" []}: weighted sums over the predictions.

  The cross-entropy is logsumexp(logits) - logit of the true token, which
  XLA fuses without a [n, B, P, V] log-softmax buffer.
  """
  logits = logits.astype(jnp.float32)
  w = masked_weights.astype(jnp.float32)
  true_logit = jnp.take_along_axis(logits, masked_ids[None, ..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - true_logit          # [n, B, P]
  correct = (jnp.argmax(logits, axis=-1) == masked_ids[None]).astype(jnp.float32)
  return {"loss_sum": (nll * w).sum(axis=(1, 2)), "correct": (correct * w).sum(axis=(1, 2)),
          "count": w.sum()}


class MaskedLMTask(Task):
  """BERT masked-LM pre-training with a nested (Matryoshka) tied decoder."""

  name = "mlm"
  console_metric = "mlm_accuracy"

  # ------------------------------------------------------------ config and data
  def check_config(self, config: ml_collections.ConfigDict) -> None:
    if config.model.get("name") != "bert":
      raise ConfigError(f"config.model.name={config.model.get('name')!r}: config.task='mlm' "
                        "trains a BERT encoder: set config.model.name='bert'.")
    pooling_of(config)
    if config.head not in ("mrl", "mrl_e", "ff"):
      raise ConfigError(f"config.head={config.head!r} is unknown: use 'mrl_e' (the tied decoder "
                        "sliced per size; 'mrl' is the same for a tied decoder) or 'ff'.")
    seq_len = config.data.get("seq_len")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 3:
      raise ConfigError(f"config.data.seq_len={seq_len!r}: use an integer >= 3 "
                        "([CLS], at least one token, [SEP]).")
    max_len = int(_model_fields(config.model)["max_len"])
    if seq_len > max_len:
      raise ConfigError(f"config.data.seq_len={seq_len} exceeds the model's {max_len} position "
                        f"embeddings: lower seq_len or set --config.model.max_len={seq_len}.")
    predictions = max_predictions_of(config.data)
    if predictions > seq_len - 2:
      raise ConfigError(f"config.data.max_predictions={predictions} exceeds the {seq_len - 2} "
                        "maskable tokens of a sequence: lower it (BERT: round(0.15 * seq_len)).")
    vocab = config.data.get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 5):
      raise ConfigError(f"config.data.vocab_size={vocab!r}: use the tokenizer's vocabulary size "
                        "(an integer), or leave it unset to take it from the tokenizer.")

  def data_info(self, config: ml_collections.ConfigDict) -> Any:
    from mrl_jax.data import mlm_pipeline
    info = mlm_pipeline.text_dataset_info(pipeline_data_config(config))
    vocab = config.data.get("vocab_size")
    if vocab is not None and vocab != info.vocab_size:
      raise ConfigError(
          f"config.data.vocab_size={vocab} but the tokenizer ({info.tokenizer_path}) has "
          f"{info.vocab_size} tokens: set --config.data.vocab_size={info.vocab_size} "
          "(or leave it unset).")
    return info

  def data_info_from_config(self, config: ml_collections.ConfigDict) -> Any:
    from mrl_jax.data import mlm_pipeline
    from mrl_jax.data.sources import DatasetNotPreparedError
    try:
      return self.data_info(config)
    except DatasetNotPreparedError:
      pass
    vocab = config.data.get("vocab_size")
    if not vocab:
      raise ConfigError(
          f"Text corpus {config.data.name!r} is not prepared here, so compile_check needs "
          "config.data.vocab_size (the tokenizer's vocabulary) to shape the decoder: set it.")
    return mlm_pipeline.TextDataInfo(
        vocab_size=int(vocab), num_train_examples=int(config.batch_size),
        seq_len=int(config.data.seq_len), max_predictions=max_predictions_of(config.data),
        tokenizer_path="", pad_id=0, cls_id=0, sep_id=0, mask_id=0, num_documents=0)

  def data_info_from_meta(self, config: ml_collections.ConfigDict, meta: dict[str, Any]) -> Any:
    from mrl_jax.data import mlm_pipeline
    return mlm_pipeline.TextDataInfo(
        vocab_size=int(meta["vocab_size"]), num_train_examples=1,
        seq_len=int(config.data.seq_len), max_predictions=max_predictions_of(config.data),
        tokenizer_path="", pad_id=0, cls_id=0, sep_id=0, mask_id=0, num_documents=0)

  def train_iterator(self, config: ml_collections.ConfigDict) -> Any:
    from mrl_jax.data import mlm_pipeline
    return mlm_pipeline.make_mlm_train_iterator(
        pipeline_data_config(config), global_batch_size=config.batch_size, seed=config.seed)

  def eval_batches(self, config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
    from mrl_jax.data import mlm_pipeline
    return mlm_pipeline.make_mlm_eval_batches(pipeline_data_config(config),
                                              global_batch_size=config.eval_batch_size)

  def on_workdir(self, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Copies the run's tokenizer to WORKDIR/tokenizer.json (process 0)."""
    if jax.process_index() != 0:
      return
    from mrl_jax.data import mlm_pipeline
    tokenizer = mlm_pipeline.load_data_tokenizer(pipeline_data_config(config))
    # A reader never sees half a file; a bucket workdir gets one object write.
    write_through_local_file(make_dirs(workdir_path(workdir)) / TOKENIZER_FILE, tokenizer.save)

  # ------------------------------------------------------------ model and checkpoint
  def embedding_dim(self, config: ml_collections.ConfigDict) -> int:
    return int(_model_fields(config.model)["width"])

  def model_description(self, config: ml_collections.ConfigDict, nesting: Nesting) -> str:
    arch = _model_fields(config.model)
    return (f"BERT {config.model.get('variant') or ''} ({arch['width']} wide, {arch['depth']} "
            f"layers; nested tied MLM decoder, {config.head} head, dims {list(nesting.dims)})")

  def build_model(self, config: ml_collections.ConfigDict, nesting: Nesting, info: Any,
                  rngs: nnx.Rngs) -> nnx.Module:
    from mrl_jax import models
    from mrl_jax.models import bert
    return bert.build_bert_mlm(config.model, nesting, vocab_size=int(info.vocab_size),
                               head=config.head, dtype=models.compute_dtype(config), rngs=rngs)

  def checkpoint_meta(self, config: ml_collections.ConfigDict, nesting: Nesting,
                      info: Any) -> dict[str, Any]:
    return {"task": "mlm", "model": config.model.to_dict(), "head": config.head,
            "dims": list(nesting.dims), "vocab_size": int(info.vocab_size)}

  def sharding_rules(self, config: ml_collections.ConfigDict) -> tuple:
    from mrl_jax.models import bert
    return tuple(bert.SHARDING_RULES)

  # ------------------------------------------------------------ steps (traced)
  def abstract_batch(self, config: ml_collections.ConfigDict, info: Any,
                     batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    seq = (batch_size, int(info.seq_len))
    preds = (batch_size, int(info.max_predictions))
    return {"input_ids": jax.ShapeDtypeStruct(seq, jnp.int32),
            "token_type_ids": jax.ShapeDtypeStruct(seq, jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct(seq, jnp.int32),
            "masked_positions": jax.ShapeDtypeStruct(preds, jnp.int32),
            "masked_ids": jax.ShapeDtypeStruct(preds, jnp.int32),
            "masked_weights": jax.ShapeDtypeStruct(preds, jnp.float32)}

  def _logits(self, model: nnx.Module, batch: dict[str, jax.Array], train: bool) -> jax.Array:
    return model(batch["input_ids"], masked_positions=batch["masked_positions"],
                 token_type_ids=batch.get("token_type_ids"),
                 attention_mask=batch.get("attention_mask"), train=train)

  def _sums(self, model: nnx.Module, batch: dict[str, jax.Array], masked_weights: jax.Array,
            train: bool) -> dict[str, jax.Array]:
    return model.mlm_sums(batch["input_ids"], masked_positions=batch["masked_positions"],
                          masked_ids=batch["masked_ids"], masked_weights=masked_weights,
                          token_type_ids=batch.get("token_type_ids"),
                          attention_mask=batch.get("attention_mask"), train=train)

  def loss(self, config: ml_collections.ConfigDict, model: nnx.Module,
           batch: dict[str, jax.Array], nesting: Nesting, *,
           train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    # The decoder and the loss fused: no [n, B, P, V] logits (nested_mlm_head.py).
    sums = self._sums(model, batch, batch["masked_weights"], train)
    total, per_size_loss, accuracy = nested_mlm_xent_of_sums(
        sums, jnp.asarray(nesting.weights, jnp.float32))
    return total, {"per_size_loss": per_size_loss, "per_size_mlm_accuracy": accuracy}

  def eval_sums(self, config: ml_collections.ConfigDict, model: nnx.Module,
                batch: dict[str, jax.Array], nesting: Nesting) -> dict[str, jax.Array]:
    # Padding rows of the last batch predict nothing.
    weights = batch["masked_weights"] * batch["mask"].astype(jnp.float32)[:, None]
    sums = self._sums(model, batch, weights, False)
    sums["sequences"] = batch["mask"].astype(jnp.float32).sum()
    return sums

  def reduce_eval(self, totals: dict[str, np.ndarray]) -> dict[str, Any]:
    count = max(float(totals["count"]), 1.0)
    return {"mlm_accuracy": np.asarray(totals["correct"]) / count,
            "loss": np.asarray(totals["loss_sum"]) / count,
            "count": int(round(float(totals["count"]))),
            "sequences": int(round(float(totals.get("sequences", 0))))}

  def embed(self, config: ml_collections.ConfigDict, model: nnx.Module,
            batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    z = model.embed(batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                    attention_mask=batch.get("attention_mask"), pooling=pooling_of(config),
                    train=False)
    out = {"z": z.astype(jnp.float32)}
    if "mask" in batch:
      out["mask"] = batch["mask"]
    if "label" in batch:
      out["label"] = batch["label"]
    return out

  def restored_model(self, experiment: Any, state: dict[str, Any], step: int) -> Any:
    from mrl_jax import text_model
    return text_model.RestoredTextModel(experiment, state, step)

  # ------------------------------------------------------------ reporting
  def summary(self, config: ml_collections.ConfigDict, dims: tuple[int, ...],
              result: dict[str, Any]) -> dict[str, Any]:
    return {"dims": list(dims),
            "mlm_accuracy": {str(m): float(a) for m, a in zip(dims, result["mlm_accuracy"])},
            "mlm_loss": {str(m): float(v) for m, v in zip(dims, result["loss"])},
            "eval_predictions": int(result["count"]),
            "eval_sequences": int(result.get("sequences", 0))}

  def val_metrics(self, dims: tuple[int, ...], result: dict[str, Any]) -> dict[str, float]:
    out = {f"val/mlm_accuracy_d{m}": float(a) for m, a in zip(dims, result["mlm_accuracy"])}
    out.update({f"val/loss_d{m}": float(v) for m, v in zip(dims, result["loss"])})
    return out

  def format_table(self, config: ml_collections.ConfigDict, dims: tuple[int, ...],
                   result: dict[str, Any]) -> str:
    lines = [f"Validation MLM accuracy per nesting size ({config.data.name}, "
             f"{result['count']} masked tokens):",
             "   dims | MLM acc (%) | loss", "  ------+-------------+-------"]
    lines += [f"  {m:5d} | {100 * a:11.2f} | {v:6.3f}"
              for m, a, v in zip(dims, result["mlm_accuracy"], result["loss"])]
    return "\n".join(lines)


def check_workdir_tokenizer(workdir: str, vocab_size: int) -> str:
  """WORKDIR/tokenizer.json's path, once checked to have the checkpoint's vocabulary size
  (for a bucket workdir, the path of a local copy: tokenizers open local files only)."""
  from mrl_jax.data import tokenizer as tokenizer_lib
  path = workdir_path(workdir) / TOKENIZER_FILE
  if not path.exists():
    raise TokenizerMismatchError(
        f"{path} does not exist: the workdir has no tokenizer to turn text into ids. Copy the "
        "tokenizer it was trained with there, or pass token-id arrays instead of text.")
  local = local_file(path)
  found = tokenizer_lib.load_tokenizer(local).vocab_size
  if found != vocab_size:
    raise TokenizerMismatchError(
        f"{path} has {found} tokens but the checkpoint's decoder has {vocab_size}: it is not the "
        "tokenizer the model was trained with; put that one at this path.")
  return local

