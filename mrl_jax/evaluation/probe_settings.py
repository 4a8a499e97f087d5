"""The `config.probe` settings of `--mode=probe`: one source of defaults, and their checks.

Every config builds its probe section from `default_probe_config()` (overriding
what it wants), so every field below can be set on the command line, e.g.
`--config.probe.retrieval_ks='(5,10)'` or `--config.probe.train_split=train[:50%]`.
`check_probe_settings` validates them before anything is embedded: a bad value
is a `ConfigError` naming the field and the allowed range.

This module imports no JAX, so config files can import it cheaply.

Fields:
  knn_k              k of the k-NN majority vote (>= 1; 1-NN is always reported).
  retrieval_ks       ks of retrieval mAP/precision/recall@k (positive ints).
  linear_l2          L2 weight of the linear probe (>= 0).
  linear_steps       L-BFGS steps of the linear probe (>= 1).
  holdout_fraction   share of the test split that searches the adaptive cascade's
                     thresholds (in (0, 1); the rest measures them).
  adaptive_splits    random hold-out splits the cascade is averaged over (>= 1; the
                     paper: 30; split 0 gives the single-split numbers).
  adaptive_method    threshold search: "greedy" (per target accuracy) or "pairwise"
                     (the official code's per-pair search); see evaluation/adaptive.py.
  seed               seed of the random-feature baselines and the holdout split (>= 0).
  shortlist_dim, shortlist_size
                     adaptive retrieval: shortlist with this many dims, keep this
                     many candidates, rerank at full size (>= 1 each).
  funnel_dims        funnel retrieval's dims per stage (strictly increasing, >= 1;
                     stages at or above the embedding's width are dropped).
  funnel_shortlists  candidates kept per stage, one per funnel_dims entry
                     (non-increasing, >= 1).
  retrieval_ann      an approximate shortlist to add to the retrieval comparison: "hnsw"
                     or "ivf" (a faiss index over the shortlist_dim prefix; the row
                     "adaptive_<kind>" shortlists shortlist_size with it and reranks at
                     full size), or None (unset: exact shortlists only).
  train_split, test_split
                     splits of the probe's data (default: data.train_split /
                     data.eval_split).
  batch_size         embedding batch size (>= 1).
  baseline_workdir   a run trained without MRL whose truncations are the paper's
                     baselines (None: no baseline rows).
  max_in_memory_gb   train embeddings (float32, rows x width) up to this many GB are
                     probed in memory as before; larger ones (and every probe with
                     several processes) go to shards on disk and are probed in row
                     blocks with a mini-batch linear probe (streamed_probe.py; > 0,
                     or 0 for always on disk).
  embeddings_dir     where the shards go (None: WORKDIR/probe/embeddings, or a local
                     temporary directory for a gs:// workdir); removed afterwards.
  block_rows         rows per block of the on-disk probe (>= 1).
  linear_epochs, linear_batch_size
                     the on-disk probe's mini-batch linear probe: passes over the
                     train rows and rows per Adam step (>= 1 each).
  data               a data config (like config.data) for the single-label metrics
                     (k-NN, linear probe, retrieval, truncation baselines, funnel);
                     None: config.data. How a model trained on a multi-label corpus
                     is measured on a single-label dataset (the paper: JFT models
                     on ImageNet-1K). Its data_dir defaults to config.data.data_dir.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from mrl_jax.errors import ConfigError

DEFAULTS: dict[str, Any] = dict(
    knn_k=5, retrieval_ks=(10, 25, 50, 100), linear_l2=1e-4, linear_steps=100,
    holdout_fraction=0.5, adaptive_splits=30, adaptive_method="greedy", seed=0,
    shortlist_dim=16, shortlist_size=200,
    funnel_dims=(16, 32, 64, 128, 256), funnel_shortlists=(200, 100, 50, 25, 10),
    retrieval_ann=None, train_split=None, test_split=None, batch_size=256, baseline_workdir=None,
    max_in_memory_gb=2.0, embeddings_dir=None, block_rows=16384, linear_epochs=10,
    linear_batch_size=256, data=None)

# Fields whose default is None but that take a string: typed placeholders, so that
# `--config.probe.FIELD=VALUE` parses (a plain None field refuses every override).
_STRING_FIELDS = ("train_split", "test_split", "baseline_workdir", "retrieval_ann",
                  "embeddings_dir")
RETRIEVAL_ANN_KINDS = ("hnsw", "ivf")


def default_probe_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.probe` with every field at its default, then `overrides` (known fields only)."""
  unknown = sorted(set(overrides) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"Unknown config.probe field(s) {unknown}; known: {sorted(DEFAULTS)}.")
  fields: dict[str, Any] = {}
  for name, default in DEFAULTS.items():
    if name in _STRING_FIELDS:
      fields[name] = config_dict.placeholder(str)
    else:
      fields[name] = default
  probe = ml_collections.ConfigDict(fields)
  for name, value in overrides.items():
    probe[name] = value  # through the placeholders: keeps the field's type
  return probe


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_at_least(name: str, value: Any, low: int) -> int:
  if not _is_int(value) or value < low:
    raise ConfigError(f"config.probe.{name}={value!r}: must be an integer >= {low}.")
  return int(value)


def _int_tuple(name: str, value: Any, rule: str) -> tuple[int, ...]:
  if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value
      or not all(_is_int(v) and v >= 1 for v in value)):
    raise ConfigError(f"config.probe.{name}={value!r}: must be a non-empty tuple of integers "
                      f">= 1{rule}.")
  return tuple(int(v) for v in value)


def _optional_string(name: str, value: Any) -> str | None:
  if value is not None and (not isinstance(value, str) or not value):
    raise ConfigError(f"config.probe.{name}={value!r}: must be a non-empty string or unset.")
  return value


def check_probe_settings(probe: Mapping[str, Any] | None) -> dict[str, Any]:
  """The probe settings (defaults filled in), or a ConfigError naming the first bad field."""
  given = dict(probe.items()) if probe is not None else {}
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"Unknown config.probe field(s) {unknown}; known: {sorted(DEFAULTS)}.")
  s = {**DEFAULTS, **given}
  out: dict[str, Any] = {}
  out["knn_k"] = _int_at_least("knn_k", s["knn_k"], 1)
  out["retrieval_ks"] = _int_tuple("retrieval_ks", s["retrieval_ks"], "")
  if not isinstance(s["linear_l2"], numbers.Real) or isinstance(s["linear_l2"], bool) \
      or not s["linear_l2"] >= 0:
    raise ConfigError(f"config.probe.linear_l2={s['linear_l2']!r}: must be a number >= 0.")
  out["linear_l2"] = float(s["linear_l2"])
  out["linear_steps"] = _int_at_least("linear_steps", s["linear_steps"], 1)
  fraction = s["holdout_fraction"]
  if (not isinstance(fraction, numbers.Real) or isinstance(fraction, bool)
      or not 0.0 < fraction < 1.0):
    raise ConfigError(f"config.probe.holdout_fraction={fraction!r}: must be in (0, 1) "
                      "(the share of the test split that tunes the adaptive thresholds).")
  out["holdout_fraction"] = float(fraction)
  out["adaptive_splits"] = _int_at_least("adaptive_splits", s["adaptive_splits"], 1)
  if s["adaptive_method"] not in ("greedy", "pairwise"):
    raise ConfigError(f"config.probe.adaptive_method={s['adaptive_method']!r}: must be "
                      "'greedy' or 'pairwise'.")
  out["adaptive_method"] = s["adaptive_method"]
  out["seed"] = _int_at_least("seed", s["seed"], 0)
  out["shortlist_dim"] = _int_at_least("shortlist_dim", s["shortlist_dim"], 1)
  out["shortlist_size"] = _int_at_least("shortlist_size", s["shortlist_size"], 1)
  dims = _int_tuple("funnel_dims", s["funnel_dims"], ", strictly increasing")
  if any(b <= a for a, b in zip(dims, dims[1:])):
    raise ConfigError(f"config.probe.funnel_dims={s['funnel_dims']!r}: must be strictly "
                      "increasing (each stage reranks with more dims).")
  out["funnel_dims"] = dims
  keeps = _int_tuple("funnel_shortlists", s["funnel_shortlists"], ", non-increasing")
  if any(b > a for a, b in zip(keeps, keeps[1:])):
    raise ConfigError(f"config.probe.funnel_shortlists={s['funnel_shortlists']!r}: must be "
                      "non-increasing (each stage keeps at most as many candidates as the last).")
  if len(keeps) != len(dims):
    raise ConfigError(f"config.probe.funnel_shortlists has {len(keeps)} entries but "
                      f"funnel_dims has {len(dims)}: give one shortlist per stage.")
  out["funnel_shortlists"] = keeps
  if s["retrieval_ann"] is not None and s["retrieval_ann"] not in RETRIEVAL_ANN_KINDS:
    raise ConfigError(f"config.probe.retrieval_ann={s['retrieval_ann']!r}: must be one of "
                      f"{RETRIEVAL_ANN_KINDS} (a faiss shortlist) or unset.")
  out["retrieval_ann"] = s["retrieval_ann"]
  out["train_split"] = _optional_string("train_split", s["train_split"])
  out["test_split"] = _optional_string("test_split", s["test_split"])
  out["batch_size"] = _int_at_least("batch_size", s["batch_size"], 1)
  out["baseline_workdir"] = _optional_string("baseline_workdir", s["baseline_workdir"])
  budget = s["max_in_memory_gb"]
  if not isinstance(budget, numbers.Real) or isinstance(budget, bool) or not budget >= 0:
    raise ConfigError(f"config.probe.max_in_memory_gb={budget!r}: must be a number >= 0 (GB of "
                      "train embeddings probed in memory; 0: always on disk).")
  out["max_in_memory_gb"] = float(budget)
  out["embeddings_dir"] = _optional_string("embeddings_dir", s["embeddings_dir"])
  out["block_rows"] = _int_at_least("block_rows", s["block_rows"], 1)
  out["linear_epochs"] = _int_at_least("linear_epochs", s["linear_epochs"], 1)
  out["linear_batch_size"] = _int_at_least("linear_batch_size", s["linear_batch_size"], 1)
  data = s["data"]
  if data is not None:
    if isinstance(data, ml_collections.ConfigDict):
      data = data.to_dict()
    if not isinstance(data, Mapping) or not isinstance(data.get("name"), str) or not data["name"]:
      raise ConfigError(f"config.probe.data={data!r}: must be a data config like config.data "
                        "with a dataset name (e.g. dict(name='imagenet2012', ...)), or unset.")
    data = ml_collections.ConfigDict(dict(data))
  out["data"] = data
  return out
