"""A restored masked-LM workdir as a text model: `m = inference.load(W)` on an mlm run.

    m = inference.load("/tmp/bert_mlm")
    z = m.embed_text(["a sentence", "another one"], dim=48)   # [2, 48], unit norm
    logits = m.mlm_logits(ids, attention_mask=mask)          # [num_sizes, B, L, vocab]

Text is tokenized with WORKDIR/tokenizer.json (which training writes; its
vocabulary is checked against the checkpoint's decoder) at config.data.seq_len
tokens ([CLS] ... [SEP], truncated, padded). Token-id arrays [N, L] (with an
optional attention mask; else every non-[PAD] token is real) or the dict that
`TextTokenizer.encode` returns work too. Calls are batched at `batch_size`
rows (the last batch padded, so one shape compiles once) and jitted, and run
data-parallel over the devices of the restoring process, like `RestoredModel`.

The embedding is the nested sentence vector the MLM decoder's prefixes are
trained on (see `mrl_jax/tasks/mlm.py`): `dim=m` keeps z[:, :m] and, by
default, unit-normalises that prefix on its own, as Matryoshka embeddings are
served.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrl_jax import sharding
from mrl_jax.tasks import mlm
from mrl_jax.workdir_path import workdir_path


class TokenInputs:
  """Text or token arrays -> checked int32 arrays -> fixed-size global batches, for a
  restored model that reads text (`RestoredTextModel`, `dual_model.RestoredDualEncoder`).

  The model sets `workdir`, `vocab_size` (its embedding table's), `seq_len`,
  `batch_size`, `_mesh` and `_tokenizer = None`; the tokenizer is
  WORKDIR/tokenizer.json, checked against `vocab_size` on first use.
  """

  @property
  def tokenizer(self) -> Any:
    """WORKDIR/tokenizer.json (checked against the checkpoint's vocabulary on first use)."""
    if self._tokenizer is None:
      from mrl_jax.data import tokenizer as tokenizer_lib
      if self.workdir is None:
        raise mlm.TokenizerMismatchError(
            "This model was not restored from a workdir: pass token-id arrays, not text.")
      path = mlm.check_workdir_tokenizer(self.workdir, self.vocab_size)
      self._tokenizer = tokenizer_lib.load_tokenizer(path)
    return self._tokenizer

  def encode(self, texts: Any) -> dict[str, np.ndarray]:
    """{"input_ids", "token_type_ids", "attention_mask"} int32 [N, L] for any accepted input."""
    if isinstance(texts, str):
      raise TypeError("Give a list of texts, not one string (e.g. [text]).")
    if isinstance(texts, Mapping):
      return self._token_arrays(texts["input_ids"], texts.get("attention_mask"),
                                texts.get("token_type_ids"))
    if isinstance(texts, np.ndarray) or (isinstance(texts, Sequence) and texts
                                         and not isinstance(texts[0], str)):
      return self._token_arrays(texts)
    return {k: np.asarray(v, np.int32)
            for k, v in self.tokenizer.encode(list(texts), self.seq_len).items()
            if k in ("input_ids", "token_type_ids", "attention_mask")}

  def _pad_id(self) -> int:
    if self._tokenizer is not None or (self.workdir and (
        workdir_path(self.workdir) / mlm.TOKENIZER_FILE).exists()):
      return int(self.tokenizer.pad_id)
    return 0  # BERT vocabularies put [PAD] first.

  def _token_arrays(self, input_ids, attention_mask=None, token_type_ids=None):
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"Token ids must be an integer array [N, L], got {ids.dtype} {ids.shape}.")
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"Token ids must be in [0, {self.vocab_size}) (the model's vocabulary); "
                       f"got values in [{ids.min()}, {ids.max()}].")
    if attention_mask is None:
      attention_mask = ids != self._pad_id()
    if token_type_ids is None:
      token_type_ids = np.zeros_like(ids)
    out = {"input_ids": ids, "token_type_ids": np.asarray(token_type_ids),
           "attention_mask": np.asarray(attention_mask)}
    for k, v in out.items():
      if v.shape != ids.shape:
        raise ValueError(f"{k} has shape {v.shape}; input_ids has {ids.shape}.")
    return {k: v.astype(np.int32) for k, v in out.items()}

  def _batches(self, arrays: dict[str, np.ndarray]):
    """(real rows, global batch) per batch of `batch_size` rows (a multiple of the devices)
    of equally long arrays (token arrays, images)."""
    dp = max(sharding.data_parallel_size(self._mesh), 1)
    batch = max(self.batch_size - self.batch_size % dp, dp)
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch):
      chunk = {k: v[start:start + batch] for k, v in arrays.items()}
      real = len(next(iter(chunk.values())))
      if real < batch:  # One compiled shape: pad the last batch.
        chunk = {k: np.concatenate([v, np.zeros((batch - real, *v.shape[1:]), v.dtype)])
                 for k, v in chunk.items()}
      yield real, sharding.global_batch(chunk, self._mesh)


class RestoredTextModel(TokenInputs):
  """A restored BERT with a nested tied MLM decoder: `embed_text`, `mlm_logits`, `mlm_sums`."""

  def __init__(self, experiment: Any, state: dict[str, Any], step: int, batch_size: int = 256):
    self.config = experiment.config
    self.task = experiment.task
    self.nesting = experiment.nesting
    self.dims = tuple(experiment.nesting.dims)
    self.step = int(step)
    self.vocab_size = int(experiment.info.vocab_size)
    self.seq_len = int(self.config.data.seq_len)
    self.pooling = mlm.pooling_of(self.config)
    self.batch_size = batch_size
    self.workdir = getattr(experiment, "workdir", None)
    self._mesh = experiment.mesh
    self._params, self._model_state = state["params"], state["model_state"]
    self._tokenizer = None
    graphdef = experiment.spec.graphdef
    task, nesting = self.task, self.nesting

    def merged(params, model_state):
      return nnx.merge(graphdef, params, model_state, copy=True)

    @functools.partial(jax.jit, static_argnames="pooling")
    def embed(params, model_state, batch, pooling):
      model = merged(params, model_state)
      return model.embed(batch["input_ids"], token_type_ids=batch["token_type_ids"],
                         attention_mask=batch["attention_mask"], pooling=pooling,
                         train=False).astype(jnp.float32)

    @jax.jit
    def all_logits(params, model_state, batch):
      model = merged(params, model_state)
      return model.all_logits(batch["input_ids"], token_type_ids=batch["token_type_ids"],
                              attention_mask=batch["attention_mask"]).astype(jnp.float32)

    @functools.partial(jax.jit, static_argnames="dims")
    def sums(params, model_state, batch, dims):
      model = merged(params, model_state)
      if dims is None:
        return task.eval_sums(self.config, model, batch, nesting)
      logits = model(batch["input_ids"], masked_positions=batch["masked_positions"],
                     token_type_ids=batch["token_type_ids"],
                     attention_mask=batch["attention_mask"], train=False, dims=dims)
      weights = batch["masked_weights"] * batch["mask"].astype(jnp.float32)[:, None]
      return mlm.masked_lm_sums(logits, batch["masked_ids"], weights)

    self._embed, self._all_logits, self._sums = embed, all_logits, sums

  # ------------------------------------------------------------ state
  @property
  def params(self) -> Any:
    """The restored parameters (an NNX State)."""
    return self._params

  @property
  def model_state(self) -> Any:
    return self._model_state

  # ------------------------------------------------------------ outputs
  def embed_text(self, texts: Any, dim: int | None = None, normalize: bool = True,
                 pooling: str | None = None) -> np.ndarray:
    """Sentence embeddings [N, dim] (all d dims when None), each row unit-norm by default.

    texts: a list of strings, token ids [N, L], or a dict of arrays as
    `TextTokenizer.encode` returns; pooling: "mean" or "cls" (default: the
    config's, config.model.pooling).
    """
    pooling = pooling or self.pooling
    if pooling not in mlm.POOLINGS:
      raise ValueError(f"pooling={pooling!r}: use one of {mlm.POOLINGS}.")
    arrays = self.encode(texts)
    zs = [np.asarray(self._embed(self._params, self._model_state, b, pooling))[:real]
          for real, b in self._batches(arrays)]
    z = np.concatenate(zs) if zs else np.zeros((0, self.embedding_dim), np.float32)
    if dim is not None:
      if not 0 < dim <= z.shape[1]:
        raise ValueError(f"dim={dim} must be in [1, {z.shape[1]}].")
      z = z[:, :dim]
    if normalize:
      z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return z

  @property
  def embedding_dim(self) -> int:
    return int(self.task.embedding_dim(self.config))

  def mlm_logits(self, input_ids: Any, attention_mask: Any = None,
                 token_type_ids: Any = None) -> np.ndarray:
    """MLM logits at every position for every size: float32 [num_sizes, N, L, vocab]."""
    arrays = self._token_arrays(input_ids, attention_mask, token_type_ids)
    parts = [np.asarray(self._all_logits(self._params, self._model_state, b))[:, :real]
             for real, b in self._batches(arrays)]
    return np.concatenate(parts, axis=1)

  def mlm_sums(self, batch: dict[str, np.ndarray],
               dims: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The task's eval sums (correct, loss_sum [num_sizes], count) of one masked batch
    with "mask" rows, as `make_mlm_eval_batches` yields (decodes only masked positions).

    `dims` scores other prefix sizes than the model's nesting (at most its
    width): the decoder truncated to h[:m] @ E[:, :m]^T + b.
    """
    dims = None if dims is None else tuple(int(m) for m in dims)
    keys = ("input_ids", "token_type_ids", "attention_mask", "masked_positions", "masked_ids",
            "masked_weights", "mask")
    arrays = {k: np.asarray(batch[k]) for k in keys}
    totals = None
    for _, b in self._batches(arrays):  # padding rows have mask 0
      out = jax.tree.map(np.asarray, self._sums(self._params, self._model_state, b, dims))
      totals = out if totals is None else jax.tree.map(np.add, totals, out)
    return totals
