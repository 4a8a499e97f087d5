"""Probe a restored model at every nesting size: `--mode=probe`.

Embeds the train split (the k-NN database and linear-probe training set) and
the test split once, with evaluation preprocessing, then per prefix size:
linear-probe top-1, k-NN top-1 (1-NN and `knn_k`), retrieval mAP/precision/
recall@k (unit-normalised prefixes, L2), the nested head's own top-1, and the
same-run baselines: SVD truncation of the full embedding and random feature
subsets. Then adaptive classification (a cascade over sizes) and adaptive /
funnel retrieval. Writes WORKDIR/probe/{summary.json, report.md, *.png}.

Large databases: train embeddings over `config.probe.max_in_memory_gb`, and every
probe with several processes, are not held in memory. Each process streams its rows
of the splits to shards (embedding_shards.py; WORKDIR/probe/embeddings/SPLIT/, or
config.probe.embeddings_dir, or a local temporary directory for a gs:// workdir),
and process 0 computes the single-label rows in row blocks over them
(`shard_metrics`: streamed_probe.py, and the retrieval comparison on an Index over
shard-backed stores); same keys, plus "linear_probe" naming the mini-batch optimiser
that replaces L-BFGS there (see streamed_probe.py for what equals the in-memory path).
A masked-LM workdir (config.task="mlm") is measured by `text_probe.py` instead
(MLM accuracy, text retrieval and the Lee similarity correlation per size), a
dual encoder (config.task="contrastive") by `dual_probe.py` (zero-shot top-1,
image<->text recall@k and image k-NN per size).

The paper's baselines truncate a model trained *without* MRL (SVD of the
fixed-feature FF model's embedding, random features of it): set
`config.probe.baseline_workdir` to such a run (e.g. the same config trained with
`--config.head=ff`) and the probe adds `baseline_svd_*` and `baseline_random_*`
rows computed on that model's embeddings of the same splits. The same-run
`svd_*` / `random_*` rows truncate the MRL embedding itself.

Settings: `config.probe`, every field defined in every config from
`probe_settings.default_probe_config()` (see that module for the fields and
their ranges); they are checked before anything is embedded.

The model comes from WORKDIR/config.json and its checkpoint, not from
`--config`: the config file supplies the data (`config.data`) and the probe
settings (`config.probe`) only, so probing a `--config.head=ff` workdir with the
plain quickstart config file is right. A command-line override of any other
field (`--config.nesting.dims=...`, `--config.head=...`, `--config.model.*`,
`--config.lr`, ...) cannot take effect, so `main` passes the overrides and
`run_probe` refuses each one whose value differs from the checkpoint's config
(ProbeOverrideError naming the field, the value asked for and the checkpoint's);
one equal to the checkpoint's value is accepted. Config-file arguments
(`configs/x.py:head=mrl_e`) choose a config file's defaults, not overrides, and
are not checked.

Models trained on a multi-label corpus (multi-hot labels, e.g. the JFT-style
`label_corpus` builds): on the corpus itself (config.data, train / eval
splits) the probe reports per size `multilabel_head_precision@1` and
`multilabel_head_map` (the nested head's scores), `multilabel_knn_precision@1`
(the 1-NN of a test example among the train examples, unit-normalised prefixes)
and `multilabel_linear_map` (a one-vs-rest linear probe fitted on the train
embeddings); see `multilabel.py` for the definitions. The single-label metrics
(linear / k-NN top-1, retrieval, baselines, funnel) run on `config.probe.data`
when it is set (as the paper measures JFT models on ImageNet-1K), else on
config.data when it is single-label. The nested head's top-1 and adaptive
classification always use config.data's test split (the head's classes) when it
is single-label.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import ml_collections
import numpy as np

from mrl_jax import inference
from mrl_jax.data import pipeline
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import adaptive, embedding_shards, knn, multilabel
from mrl_jax.evaluation import probe_settings as settings_lib
from mrl_jax.evaluation import retrieval, streamed_probe
from mrl_jax.evaluation.linear_probe import linear_probe_scores, linear_probe_top1
from mrl_jax.evaluation.report import write_report
from mrl_jax.workdir_path import make_dirs, workdir_path, write_json_atomic

DEFAULTS = settings_lib.DEFAULTS  # One source: mrl_jax/evaluation/probe_settings.py.

# Top-level config fields that probe mode takes from --config; every other field
# describes the trained model or its training and comes from WORKDIR/config.json.
# (zero_shot and retrieval: a dual encoder's evaluation settings, dual_probe.py.)
PROBE_MODE_FIELDS = ("data", "probe", "zero_shot", "retrieval")


class ProbeOverrideError(ConfigError):
  """A command-line override of a field probe mode takes from the checkpoint."""


def _plain(value: Any) -> Any:
  """Comparable form of a config value: ConfigDicts as dicts, lists as tuples."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def check_overrides(overrides: dict[str, Any] | None, checkpoint_config: ml_collections.ConfigDict,
                    workdir: str) -> None:
  """Refuses `--config.X=` overrides that probe mode cannot apply (see the module doc).

  `overrides` maps dotted field paths to the values given on the command line
  (ml_collections' `config_flags.get_override_values`).
  """
  saved = _plain(checkpoint_config)
  for path, value in sorted((overrides or {}).items()):
    if path.split(".")[0] in PROBE_MODE_FIELDS:
      continue
    node: Any = saved
    for part in path.split("."):
      node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    if node is _MISSING or _plain(value) != node:
      where = "is not in it" if node is _MISSING else f"has {path}={node!r}"
      raise ProbeOverrideError(
          f"--config.{path}={_plain(value)!r} cannot take effect in --mode=probe: the model "
          f"comes from {os.path.join(workdir, 'config.json')}, which {where}; probe mode takes "
          "only --config.data.*, --config.probe.* (a dual encoder's also --config.zero_shot.* "
          "and --config.retrieval.*): drop the flag, or train a workdir with it.")


_MISSING = object()


def probe_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Checked `config.probe` with defaults filled in and the splits resolved."""
  settings = settings_lib.check_probe_settings(config.get("probe"))
  if settings["data"] is not None and settings["data"].get("data_dir") is None:
    settings["data"].data_dir = config.data.get("data_dir")  # Where the training data lives.
  data = settings["data"] if settings["data"] is not None else config.data
  settings["train_split"] = settings["train_split"] or data.get("train_split", "train")
  settings["test_split"] = settings["test_split"] or data.get("eval_split", "test")
  return settings


def embed_split(model: inference.RestoredModel, data_cfg, split: str, batch_size: int,
                in_channels: int | None = None, *, with_logits: bool = True,
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
  """(embeddings [N, d], nested logits [n, N, C], labels [N] or multi-hot [N, K]) of a split.

  Grayscale images fed to a model with `in_channels=3` are repeated over the channels.
  `with_logits=False` keeps no logits (None in their place): a large database's
  [n, N, C] logits would not fit in memory.
  """
  zs, logits, labels = [], [], []
  for batch in pipeline.make_eval_batches(data_cfg, global_batch_size=batch_size, split=split):
    keep = batch["mask"] > 0
    z, lg = _embed_batch(model, batch, keep, in_channels)
    zs.append(z)
    if with_logits:
      logits.append(lg)
    labels.append(batch["label"][keep])
  return (np.concatenate(zs), np.concatenate(logits, axis=1) if with_logits else None,
          np.concatenate(labels))


def _embed_batch(model: inference.RestoredModel, batch: dict[str, np.ndarray], keep: np.ndarray,
                 in_channels: int | None) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings, nested logits) of the kept rows of one eval batch.

  With several processes the model runs on every row (padding too): its mesh spans all
  processes, so each must run the same batches, also one whose rows here are all padding.
  """
  import jax  # Process count only.
  everyone = jax.process_count() > 1
  images = batch["image"] if everyone else batch["image"][keep]
  if in_channels == 3 and images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  z, lg = model.embed_and_logits(images)
  return (z[keep], lg[:, keep]) if everyone else (z, lg)


def embed_split_to_shards(model: inference.RestoredModel, data_cfg, split: str, batch_size: int,
                          directory: str, in_channels: int | None = None) -> None:
  """Embeds this process's rows of `split` into its shard under `directory` (no logits).

  Rows stream to disk batch by batch (embedding_shards.py), each with its index in the
  split, so `SplitEmbeddings(directory)` reads all processes' shards back in split order.
  """
  import jax  # Process layout only.
  process, processes = jax.process_index(), jax.process_count()
  local_batch = batch_size // processes
  writer = embedding_shards.ShardWriter(directory, process, processes)
  batches = pipeline.make_eval_batches(data_cfg, global_batch_size=batch_size, split=split)
  for j, batch in enumerate(batches):
    keep = batch["mask"] > 0
    z, _ = _embed_batch(model, batch, keep, in_channels)
    # make_eval_batches gives process p local batch j*P + p of the split (see there).
    rows = (j * processes + process) * local_batch + np.flatnonzero(keep)
    writer.append(z, batch["label"][keep], rows)
  writer.close()


def svd_basis(train_z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and principal directions (columns, by decreasing variance) of the train embeddings."""
  mean = train_z.mean(0)
  _, _, vt = np.linalg.svd(train_z - mean, full_matrices=False)
  return mean, vt.T


def knn_metrics(train_x, train_y, test_x, test_y, num_classes, knn_k, ks) -> dict[str, float]:
  """1-NN and k-NN top-1 and retrieval metrics for unit-normalised vectors."""
  depth = min(max(max(ks), knn_k), len(train_x))
  _, idx = knn.knn_search(np.asarray(knn.l2_normalize(test_x)),
                          np.asarray(knn.l2_normalize(train_x)), depth)
  return neighbour_metrics(idx, train_y, test_y, num_classes, knn_k, ks, depth)


def neighbour_metrics(idx, train_y, test_y, num_classes, knn_k, ks, depth) -> dict[str, float]:
  """`knn_metrics` from the test queries' `depth` nearest train ids [Q, depth]."""
  neighbour_labels = train_y[idx]
  out = {"knn1_top1": float(np.mean(neighbour_labels[:, 0] == test_y)),
         f"knn{knn_k}_top1": float(np.mean(
             knn.knn_classify(neighbour_labels[:, :knn_k], num_classes) == test_y))}
  out.update(retrieval.retrieval_metrics(neighbour_labels, test_y, train_y,
                                         [k for k in ks if k <= depth]))
  return out


def truncation_rows(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray,
                    test_y: np.ndarray, dims: list[int], num_classes: int,
                    settings: dict[str, Any], rng: np.random.Generator, *,
                    prefixes: tuple[str, ...], key_prefix: str = "",
                    log=print) -> dict[str, list[float | None]]:
  """Per-size metrics of `dims`-dim truncations of one model's embeddings.

  Prefix "" keeps the first m coordinates (the MRL prefix), "svd_" projects on
  the top-m principal directions of the train embeddings, "random_" keeps m
  random coordinates. Sizes above the embedding's dim get None.
  """
  full = train_z.shape[1]
  mean, basis = svd_basis(train_z)
  random_subsets = {m: np.sort(rng.choice(full, size=m, replace=False)) for m in dims if m <= full}
  represent = {
      "": lambda z, m: z[:, :m],
      "svd_": lambda z, m: (z - mean) @ basis[:, :m],
      "random_": lambda z, m: z[:, random_subsets[m]],
  }
  ks = tuple(settings["retrieval_ks"])
  out: dict[str, list[float | None]] = {}
  for prefix in prefixes:
    rows = []
    for m in dims:
      if m > full:
        rows.append(None)
        continue
      train_x, test_x = represent[prefix](train_z, m), represent[prefix](test_z, m)
      row = knn_metrics(train_x, train_y, test_x, test_y, num_classes, settings["knn_k"], ks)
      row["linear_top1"] = linear_probe_top1(train_x, train_y, test_x, test_y, num_classes,
                                             l2=settings["linear_l2"],
                                             steps=settings["linear_steps"])
      rows.append(row)
      log(f"  {key_prefix}{prefix or 'mrl_'}d={m}: linear {row['linear_top1']:.4f}, "
          f"1-NN {row['knn1_top1']:.4f}")
    out.update(streamed_probe.size_columns(rows, key_prefix + prefix))
  return out


def multilabel_rows(train_z: np.ndarray, train_labels: np.ndarray, test_z: np.ndarray,
                    test_logits: np.ndarray, test_labels: np.ndarray, dims: list[int],
                    settings: dict[str, Any], log=print) -> dict[str, list[float]]:
  """Label-set metrics per nesting size on a multi-label corpus (see multilabel.py)."""
  rows: dict[str, list[float]] = {f"multilabel_{k}": [] for k in (
      "head_precision@1", "head_map", "knn_precision@1", "linear_map")}
  for i, m in enumerate(dims):
    _, idx = knn.knn_search(np.asarray(knn.l2_normalize(test_z[:, :m])),
                            np.asarray(knn.l2_normalize(train_z[:, :m])), 1)
    linear = linear_probe_scores(train_z[:, :m], train_labels, test_z[:, :m],
                                            l2=settings["linear_l2"],
                                            steps=settings["linear_steps"])
    row = {"head_precision@1": multilabel.head_precision_at_1(test_logits[i], test_labels),
           "head_map": multilabel.mean_average_precision(test_logits[i], test_labels),
           "knn_precision@1": multilabel.neighbour_precision_at_1(test_labels,
                                                                  train_labels[idx[:, 0]]),
           "linear_map": multilabel.mean_average_precision(linear, test_labels)}
    for key, value in row.items():
      rows[f"multilabel_{key}"].append(value)
    log(f"  multi-label d={m}: head prec@1 {row['head_precision@1']:.4f}, head mAP "
        f"{row['head_map']:.4f}, 1-NN prec@1 {row['knn_precision@1']:.4f}, linear mAP "
        f"{row['linear_map']:.4f}")
  return rows


def run_probe(workdir: str, config: ml_collections.ConfigDict | None = None,
              log=print, *, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Probes the latest checkpoint in `workdir`; `config` supplies data and probe settings.

  `overrides`: the `--config.X=` values given on the command line; any outside
  config.data / config.probe that differs from the checkpoint's config is refused.
  """
  checkpoint_config = inference.load_config(workdir)
  check_overrides(overrides, checkpoint_config, workdir)
  config = config or checkpoint_config
  settings = probe_settings(config)  # Checked before anything is restored or embedded.
  if checkpoint_config.get("task", "classification") == "mlm":
    from mrl_jax.evaluation import text_probe  # Text models: their own metrics (see there).
    return text_probe.run_text_probe(workdir, config, settings, log=log)
  if checkpoint_config.get("task", "classification") == "contrastive":
    from mrl_jax.evaluation import dual_probe  # Dual encoders: zero-shot, recall, k-NN.
    return dual_probe.run_dual_probe(workdir, config, settings, log=log)
  data_info = pipeline.dataset_info(config.data)
  single_data = settings["data"]
  if single_data is not None:
    single_info = pipeline.dataset_info(
        ml_collections.ConfigDict({**single_data.to_dict(), "train_split": settings["train_split"],
                                   "eval_split": settings["test_split"]}))
    if single_info.multilabel:
      raise ConfigError(f"config.probe.data: {single_data.name!r} is multi-label; the k-NN and "
                        "linear-probe top-1 need single-label data (e.g. imagenet2012).")
  elif not data_info.multilabel:
    single_data, single_info = config.data, data_info
  in_channels = data_info.eval_image_shape[-1]

  model = inference.load(workdir)
  model.batch_size = settings["batch_size"]
  dims = list(model.dims)
  out_dir = make_dirs(workdir_path(workdir) / "probe")  # A folder, or a prefix in a bucket.
  batch_size = settings["batch_size"]

  start = time.time()
  summary: dict[str, Any] = {"dims": dims, "head": model.config.head, "step": model.step}
  # The training data's test split: the nested head's own metrics (its classes).
  head_split = (settings["test_split"] if single_data is config.data
                else config.data.get("eval_split", "test"))
  head_z, head_logits, head_y = embed_split(model, config.data, head_split, batch_size,
                                            in_channels)
  if data_info.multilabel:
    corpus_train_z, _, corpus_train_y = embed_split(
        model, config.data, config.data.get("train_split", "train"), batch_size, in_channels)
    log(f"Multi-label corpus {config.data.name!r}: {len(corpus_train_z)} train and "
        f"{len(head_z)} test examples; probing {len(dims)} sizes.")
    summary["multilabel"] = {"dataset": config.data.name, "num_train": len(corpus_train_z),
                             "num_test": len(head_z), "num_classes": model.num_classes}
    summary.update(multilabel_rows(corpus_train_z, corpus_train_y, head_z, head_logits, head_y,
                                   dims, settings, log=log))
  else:
    summary["head_top1"] = [float(np.mean(np.argmax(lg, -1) == head_y)) for lg in head_logits]
    summary["adaptive_classification"] = adaptive.adaptive_classification(
        head_logits, head_y, dims, holdout_fraction=settings["holdout_fraction"],
        seed=settings["seed"], num_splits=settings["adaptive_splits"],
        method=settings["adaptive_method"])

  if single_data is not None:
    summary.update(single_label_rows(model, config, single_data, single_info.num_classes,
                                     settings, dims, in_channels,
                                     test=(head_z, head_y) if single_data is config.data else None,
                                     workdir=workdir, log=log))
  summary["probe_seconds"] = round(time.time() - start, 1)
  import jax  # Process index only.
  if jax.process_index() != 0:
    return summary  # Process 0 computed the single-label rows and writes the results.

  write_json_atomic(out_dir / "summary.json", summary)
  write_report(summary, out_dir)
  log(f"Wrote {out_dir}/summary.json, report.md and plots.")
  return summary


def _embeddings_on_disk(model: inference.RestoredModel, data: ml_collections.ConfigDict,
                        settings: dict[str, Any]) -> bool:
  """Whether the train split goes to shards on disk (several processes, or too large)."""
  import jax  # Process count only.
  if jax.process_count() > 1:
    return True  # Each process embeds its share; process 0 reads all shards.
  rows = pipeline.dataset_info(ml_collections.ConfigDict(
      {**data.to_dict(), "train_split": settings["train_split"]})).num_train_examples
  return rows * max(model.dims) * 4 > settings["max_in_memory_gb"] * 1e9


def single_label_rows(model: inference.RestoredModel, config: ml_collections.ConfigDict,
                      data: ml_collections.ConfigDict, num_classes: int,
                      settings: dict[str, Any], dims: list[int], in_channels: int, *,
                      test: tuple[np.ndarray, np.ndarray] | None = None,
                      workdir: str | None = None, log=print) -> dict[str, Any]:
  """k-NN / linear probe / retrieval / truncation baselines / funnel on single-label `data`.

  `test`: the test split's (embeddings, labels) when already embedded. Train
  embeddings over config.probe.max_in_memory_gb (and every multi-process probe) go to
  shards on disk and are probed in row blocks (`_single_label_rows_on_disk`).
  """
  if _embeddings_on_disk(model, data, settings):
    return _single_label_rows_on_disk(model, config, data, num_classes, settings, dims,
                                      in_channels, test=test, workdir=workdir, log=log)
  batch_size = settings["batch_size"]
  train_z, _, train_y = embed_split(model, data, settings["train_split"], batch_size,
                                    in_channels)
  if test is None:
    test_z, _, test_y = embed_split(model, data, settings["test_split"], batch_size,
                                    in_channels)
  else:
    test_z, test_y = test
  log(f"Embedded {len(train_z)} train and {len(test_z)} test examples of {data.name!r}; "
      f"probing {len(dims)} sizes.")
  out: dict[str, Any] = {"num_train": len(train_z), "num_test": len(test_z)}
  if data is not config.data:
    out["single_label_dataset"] = data.name
  rng = np.random.default_rng(settings["seed"])
  out.update(truncation_rows(train_z, train_y, test_z, test_y, dims, num_classes, settings,
                             rng, prefixes=("", "svd_", "random_"), log=log))
  if settings["baseline_workdir"]:
    base = inference.load(settings["baseline_workdir"])
    base.batch_size = batch_size
    base_train_z, _, _ = embed_split(base, data, settings["train_split"], batch_size,
                                     in_channels)
    base_test_z, _, _ = embed_split(base, data, settings["test_split"], batch_size,
                                    in_channels)
    out["baseline"] = {"workdir": os.fspath(workdir_path(settings["baseline_workdir"])),
                       "head": base.config.head, "step": base.step,
                       "embedding_dim": int(base_train_z.shape[1])}
    out.update(truncation_rows(base_train_z, train_y, base_test_z, test_y, dims,
                               num_classes, settings, rng, prefixes=("svd_", "random_"),
                               key_prefix="baseline_", log=log))
  out["funnel_retrieval"] = retrieval_comparison(train_z, train_y, test_z, test_y, settings)
  return out


def _shards_root(workdir: str | None, settings: dict[str, Any]) -> tuple[str, bool]:
  """(directory for the split shards, whether it is a temporary one to remove afterwards)."""
  import jax  # Process count only.
  if settings["embeddings_dir"]:
    return settings["embeddings_dir"], False
  from mrl_jax.workdir_path import is_local
  if workdir is not None and is_local(workdir):
    return os.path.join(os.path.abspath(workdir), "probe", "embeddings"), False
  if jax.process_count() > 1:
    raise ConfigError(f"--mode=probe with {jax.process_count()} processes on the workdir "
                      f"{workdir} needs a directory every process can read for the embedding "
                      "shards: set --config.probe.embeddings_dir (e.g. an NFS or gcsfuse mount).")
  # An object-store workdir (gs://...): shards are read back with seeks and row gathers,
  # which local files do well and buckets do not, so they go to a local temporary directory.
  import tempfile
  return tempfile.mkdtemp(prefix="mrl_jax_probe_embeddings_"), True


def _single_label_rows_on_disk(model: inference.RestoredModel, config: ml_collections.ConfigDict,
                               data: ml_collections.ConfigDict, num_classes: int,
                               settings: dict[str, Any], dims: list[int], in_channels: int, *,
                               test: tuple[np.ndarray, np.ndarray] | None, workdir: str | None,
                               log=print) -> dict[str, Any]:
  """`single_label_rows` with the splits in shards on disk and the metrics in row blocks.

  Every process embeds its rows of each split into its shard; after a barrier,
  process 0 reads all shards and computes the metrics (streamed_probe.py; the
  retrieval comparison on an Index over ShardPrefixStores), the others return {}.
  The shards are removed afterwards (a database's worth of disk: 10.5 GB for
  ImageNet-1K at 2048 dims).
  """
  import jax
  root, temporary = _shards_root(workdir, settings)
  batch_size = settings["batch_size"]
  multi = jax.process_count() > 1
  splits = {"train": (model, settings["train_split"])}
  if test is None or multi:
    splits["test"] = (model, settings["test_split"])
  base = None
  if settings["baseline_workdir"]:
    base = inference.load(settings["baseline_workdir"])
    base.batch_size = batch_size
    splits["baseline_train"] = (base, settings["train_split"])
    splits["baseline_test"] = (base, settings["test_split"])
  for name, (which, split) in splits.items():
    embed_split_to_shards(which, data, split, batch_size, os.path.join(root, name), in_channels)
  if multi:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("mrl_jax_probe_embedding_shards")
    if jax.process_index() != 0:
      return {}
  readers = {name: embedding_shards.SplitEmbeddings(os.path.join(root, name)) for name in splits}
  try:
    train = readers["train"]
    if "test" in readers:
      test_z, test_y = readers["test"].read(0, len(readers["test"])), readers["test"].labels
    else:
      test_z, test_y = test
    log(f"Embedded {len(train)} train and {len(test_z)} test examples of {data.name!r} into "
        f"shards under {root}; probing {len(dims)} sizes in blocks of {settings['block_rows']} rows.")
    out: dict[str, Any] = {"num_train": len(train), "num_test": len(test_z)}
    if data is not config.data:
      out["single_label_dataset"] = data.name
    baseline = None
    if base is not None:
      base_train = readers["baseline_train"]
      out["baseline"] = {"workdir": os.fspath(workdir_path(settings["baseline_workdir"])),
                         "head": base.config.head, "step": base.step,
                         "embedding_dim": int(base_train.shape[1])}
      baseline = (base_train, readers["baseline_test"].read(0, len(readers["baseline_test"])))
    out.update(shard_metrics(train, test_z, test_y, dims, num_classes, settings,
                             baseline=baseline, log=log))
  finally:
    for reader in readers.values():
      reader.close()
    for name in splits:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if temporary:
      shutil.rmtree(root, ignore_errors=True)
  return out


def shard_metrics(train: embedding_shards.SplitEmbeddings, test_z: np.ndarray,
                  test_y: np.ndarray, dims: list[int], num_classes: int,
                  settings: dict[str, Any], *,
                  baseline: tuple[embedding_shards.SplitEmbeddings, np.ndarray] | None = None,
                  log=print) -> dict[str, Any]:
  """The single-label rows of embeddings in shards: truncations, baseline, retrieval.

  `baseline`: the baseline model's (train shards, test embeddings) of the same splits.
  What the on-disk probe computes once the shards exist (benchmarks/probe_memory.py
  measures this path).
  """
  out: dict[str, Any] = {"linear_probe": {"optimizer": "minibatch_adam",
                                          "epochs": settings["linear_epochs"],
                                          "batch_size": settings["linear_batch_size"]}}
  train_y = train.labels
  rng = np.random.default_rng(settings["seed"])
  metrics = lambda idx, ty, qy, depth: neighbour_metrics(
      idx, ty, qy, num_classes, settings["knn_k"], tuple(settings["retrieval_ks"]), depth)
  out.update(streamed_probe.streamed_truncation_rows(
      train, train_y, test_z, test_y, dims, num_classes, settings, rng,
      prefixes=("", "svd_", "random_"), neighbour_metrics=metrics, log=log))
  if baseline is not None:
    base_train, base_test_z = baseline
    out.update(streamed_probe.streamed_truncation_rows(
        base_train, train_y, base_test_z, test_y, dims, num_classes, settings, rng,
        prefixes=("svd_", "random_"), neighbour_metrics=metrics, key_prefix="baseline_",
        log=log))
  # One timed search per plan (its first, compilation included): each exact full-size
  # search is a pass over the whole database.
  out["funnel_retrieval"] = retrieval_comparison(train, train_y, test_z, test_y, settings,
                                                 repeats=0)
  return out


def retrieval_comparison(train_z, train_y, test_z, test_y, settings,
                         repeats: int = 3) -> dict[str, Any]:
  """Single-shot full-size vs adaptive vs funnel retrieval, as plans of an `Index` over train.

  The index stores float32 prefixes at the shortlist, funnel and full sizes, so every
  plan returns the ids `funnel.compare_retrieval` would (same keys: per method
  retrieval_metrics at k=10, "top1", "flops"/"mflops" per query, "seconds" (median of
  `repeats` timed searches after one untimed run), the resolved settings), plus the
  plan's text ("plan", `plans.parse_plan` form), "queries_per_s" and "bytes_per_vector".
  `train_z` may be a `SplitEmbeddings` (shards on disk): the index's stores are then
  `ShardPrefixStore`s read from it (same ids), and repeats=0 times the first search.
  settings["retrieval_ann"] ("hnsw" / "ivf") adds "adaptive_<kind>": the adaptive plan
  with that faiss shortlist at shortlist_dim (flops / mflops None: an ANN's work is not
  a multiply-add count).
  """
  from mrl_jax.retrieval import plans
  from mrl_jax.retrieval.index import Index
  on_disk = isinstance(train_z, embedding_shards.SplitEmbeddings)
  if not on_disk:
    train_z = np.ascontiguousarray(train_z, np.float32)
  test_z = np.ascontiguousarray(test_z, np.float32)
  test_y, train_y = np.asarray(test_y).reshape(-1), np.asarray(train_y).reshape(-1)
  full = train_z.shape[1]
  db_size = len(train_z)
  k = 10
  funnel_dims = [d for d in settings["funnel_dims"] if d < full]
  shortlists = [min(s, db_size) for s in settings["funnel_shortlists"][:len(funnel_dims) + 1]]
  funnel_dims = funnel_dims[:len(shortlists) - 1] + [full]
  shortlist_dim = min(settings["shortlist_dim"], full)
  shortlist_size = min(settings["shortlist_size"], db_size)
  methods = {
      "single_shot_full": (plans.Exact(), {"dim": full}),
      "adaptive": (plans.Adaptive(shortlist_dim, shortlist_size, full),
                   {"shortlist_dim": shortlist_dim, "rerank_dim": full,
                    "shortlist_size": shortlist_size}),
      "funnel": (plans.Funnel(tuple(funnel_dims), tuple(shortlists)),
                 {"dims": funnel_dims, "shortlists": shortlists}),
  }
  ann = None
  if settings.get("retrieval_ann"):
    from mrl_jax.retrieval.ann import AnnSpec
    kind = settings["retrieval_ann"]
    ann = {kind: AnnSpec(kind=kind, dim=shortlist_dim, seed=settings.get("seed", 0))}
    methods[f"adaptive_{kind}"] = (
        plans.Adaptive(shortlist_dim, shortlist_size, full, shortlist=kind),
        {"shortlist_dim": shortlist_dim, "rerank_dim": full, "shortlist_size": shortlist_size})
  store_dims = {shortlist_dim, full, *funnel_dims}
  if on_disk:
    from mrl_jax.retrieval.shard_store import ShardPrefixStore
    anns = {}
    if ann:
      from mrl_jax.retrieval.ann import AnnShortlist
      anns = {name: AnnShortlist.build(train_z, spec, block_rows=settings["block_rows"])
              for name, spec in ann.items()}
    index = Index(full, {d: ShardPrefixStore(train_z, d) for d in store_dims}, anns)
    index.faiss_refine = False  # Refine chains copy the stores into faiss; same ids without.
  else:
    index = Index.build(train_z, stores={d: "float32" for d in store_dims}, ann=ann)
  out: dict[str, Any] = {"k": k, "num_queries": int(len(test_z)), "num_database": int(db_size),
                         "full_dim": full}
  for name, (plan, resolved) in methods.items():
    begin = time.perf_counter()
    ids, _ = index.search(test_z, k, plan)  # Untimed: compiles, and gives the ids measured.
    times = [time.perf_counter() - begin] if repeats <= 0 else []
    for _ in range(max(0, repeats)):
      begin = time.perf_counter()
      index.search(test_z, k, plan)
      times.append(time.perf_counter() - begin)
    seconds = float(np.median(times))
    labels = np.where(ids >= 0, train_y[np.maximum(ids, 0)], -1)  # -1: an ANN found fewer.
    result = retrieval.retrieval_metrics(labels, test_y, train_y, (k,))
    result["top1"] = float(np.mean(labels[:, 0] == test_y))
    # An ANN's own work (graph hops, list scans) is no multiply-add count: None.
    exact_shortlist = getattr(plan, "shortlist", plans.EXACT_SHORTLIST) == plans.EXACT_SHORTLIST
    flops = plans.plan_flops(plan, db_size, full) if exact_shortlist else None
    result.update(flops=flops, mflops=None if flops is None else flops / 1e6, seconds=seconds,
                  queries_per_s=len(test_z) / max(seconds, 1e-12), plan=plans.plan_name(plan),
                  bytes_per_vector=index.bytes_per_vector(plan), **resolved)
    out[name] = result
  return out
