"""`--mode=probe` on a dual-encoder workdir: every nesting size of both towers, measured.

    python -m mrl_jax.main --mode=probe --config configs/align.py:runlocal --workdir W \
        [--config.probe.baseline_workdir=W_FF]

`probe.run_probe` hands a workdir whose config has `task="contrastive"` to
`run_dual_probe`, which restores it (`inference.load`, a `RestoredDualEncoder`)
and reports, per prefix size m of its nesting list (both modalities' prefixes
unit-normalised on their own):
  * zero-shot top-1 as config.zero_shot describes it (`dual_evaluators.py`;
    absent: its defaults, on config.data's eval split; skipped with a note when
    that corpus is unlabelled and no zero-shot data is named);
  * image->text and text->image recall@k (config.retrieval.ks, default 1/5/10)
    on config.retrieval.split (default config.data.eval_split): its images
    against ALL its captions (`cross_modal_retrieval.py`);
  * image-tower 1-NN top-1, the paper's ALIGN metric (Table 4): the train split
    is the database, the test split the queries (`knn.py`, exact L2 search).
    Data: config.probe.data when set (any single-label image dataset, e.g.
    imagenet2012, read with config.data's image_size / mean / std unless it
    gives its own), else config.data's corpus when it is labelled; splits
    config.probe.train_split / test_split (default: that data's train_split /
    eval_split).
The training evaluators and the probe embed through the same code
(`dual_embedding.py`), the probe with the restored model's `embed_batch`.

`config.probe.baseline_workdir` (a plain dual encoder, e.g. the same config with
`--config.head=ff`) adds its truncations to every size the probe reports:
`baseline_truncated_*` (its first m coordinates, as the nested model is cut),
and the paper's baselines `baseline_svd_*` (top-m directions of a basis fitted
on the baseline's retrieval-split image AND caption embeddings, both modalities
projected on them) and `baseline_random_*` (one seeded subset of m coordinates,
config.probe.seed, for both modalities); see `dual_baselines.py`.

Writes WORKDIR/probe/summary.json: "dims", then per metric {"<dim>": value}:
zero_shot_top1, image_to_text_recall@k, text_to_image_recall@k, image_knn_top1,
baseline_{truncated,svd,random}_<same>; plus what was measured on ("zero_shot",
"retrieval", "knn", "baseline"). And report.md (tables), zero_shot.png,
recall.png, knn.png, and a console table. The model comes from the workdir;
`--config` supplies config.data, config.probe, config.zero_shot and
config.retrieval (see probe.py for the overrides rule).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Files only: no display on servers.
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mrl_jax import inference  # noqa: E402
from mrl_jax.data import pipeline  # noqa: E402
from mrl_jax.errors import ConfigError  # noqa: E402
from mrl_jax.evaluation import (cross_modal_retrieval, dual_baselines, dual_embedding,  # noqa: E402
                                dual_evaluators, knn, zero_shot)
from mrl_jax.evaluation.report import finish_plot  # noqa: E402
from mrl_jax.workdir_path import (make_dirs, workdir_path, write_json_atomic,  # noqa: E402
                                  write_text_atomic)

Represent = Callable[[np.ndarray, int], np.ndarray]  # (embeddings [..., d], m) -> [..., m']
PREFIX: Represent = lambda z, m: np.asarray(z)[..., :m]
# A plain model's m-dim rows: its first m coordinates, then the two classic baselines.
BASELINE_KINDS = ("truncated", *dual_baselines.KINDS)


@dataclasses.dataclass
class KnnData:
  """Where the image 1-NN reads: a labelled image dataset's train and test splits."""
  data: ml_collections.ConfigDict
  train_split: str
  test_split: str
  pairs: bool  # True: the image-text corpus config.data (its labels)

  def batches(self, split: str, batch_size: int):
    if self.pairs:
      from mrl_jax.data import image_text_pipeline
      return image_text_pipeline.make_pair_eval_batches(self.data, global_batch_size=batch_size,
                                                        split=split)
    return pipeline.make_eval_batches(self.data, global_batch_size=batch_size, split=split)


@dataclasses.dataclass
class Embedded:
  """One model's embeddings of everything the probe scores (None: not measured)."""
  class_z: np.ndarray | None = None        # [C, T, d] prompt embeddings
  zs_image_z: np.ndarray | None = None     # [N, d] zero-shot images
  zs_labels: np.ndarray | None = None
  image_z: np.ndarray | None = None        # [N, d] retrieval images
  text_z: np.ndarray | None = None         # [T, d] retrieval captions
  text_image: np.ndarray | None = None     # [T] each caption's image row
  knn_train: tuple[np.ndarray, np.ndarray] | None = None   # (z, labels)
  knn_test: tuple[np.ndarray, np.ndarray] | None = None


# ---------------------------------------------------------------- what to measure
def _zero_shot_evaluator(config: ml_collections.ConfigDict, info: Any, log) -> Any:
  """config.zero_shot's evaluator (its defaults when the section is absent); None with a
  log line when config.data is unlabelled and no zero-shot data is named."""
  cfg = config.get("zero_shot")
  section = dict(cfg.items()) if cfg is not None else {}
  if section.get("data") is None and not info.num_classes:
    log(f"Zero-shot skipped: {config.data.name!r} is unlabelled and config.zero_shot.data "
        "names no labelled image dataset.")
    return None
  probe_config = ml_collections.ConfigDict(config.to_dict())
  probe_config.zero_shot = section
  return dual_evaluators.build_zero_shot(probe_config, info)


def _retrieval_evaluator(config: ml_collections.ConfigDict, info: Any) -> Any:
  cfg = config.get("retrieval")
  probe_config = ml_collections.ConfigDict(config.to_dict())
  probe_config.retrieval = dict(cfg.items()) if cfg is not None else {}
  return dual_evaluators.build_retrieval(probe_config, info)


def _knn_data(config: ml_collections.ConfigDict, settings: dict[str, Any], info: Any,
              log) -> KnnData | None:
  if settings["data"] is None:
    if not info.num_classes:
      log(f"Image k-NN skipped: {config.data.name!r} is unlabelled and config.probe.data names "
          "no labelled image dataset.")
      return None
    return KnnData(config.data, settings["train_split"], settings["test_split"], pairs=True)
  data = dual_evaluators.image_data_config(config, settings["data"], "config.probe.data")
  summary = pipeline.dataset_info(ml_collections.ConfigDict(
      {**data.to_dict(), "train_split": settings["train_split"],
       "eval_split": settings["test_split"]}))
  if summary.multilabel:
    raise ConfigError(f"config.probe.data: {data.name!r} is multi-label; the image k-NN top-1 "
                      "needs single-label data (e.g. imagenet2012).")
  size, channels = summary.eval_image_shape[0], summary.eval_image_shape[2]
  if size != int(info.image_size) or channels not in (1, int(info.in_channels)):
    raise ConfigError(f"config.probe.data gives {size}x{size}x{channels} images but the image "
                      f"tower takes {info.image_size}x{info.image_size}x{info.in_channels}: set "
                      f"config.probe.data.image_size={info.image_size}.")
  return KnnData(data, settings["train_split"], settings["test_split"], pairs=False)


def _check_model_fits(model: Any, info: Any, config: ml_collections.ConfigDict,
                      workdir: str) -> None:
  from mrl_jax.dual_model import RestoredDualEncoder
  if not isinstance(model, RestoredDualEncoder):
    raise ConfigError(f"{workdir} does not hold a dual encoder (config.task='contrastive'): "
                      "probe it on its own, or give a dual-encoder workdir.")
  if int(info.image_size) != model.image_size or int(info.in_channels) != model.in_channels:
    raise ConfigError(f"config.data gives {info.image_size}x{info.image_size}x{info.in_channels} "
                      f"images but {workdir} was trained on {model.image_size}x"
                      f"{model.image_size}x{model.in_channels}: set config.data.image_size="
                      f"{model.image_size} (or probe with the config it was trained with).")
  if int(info.vocab_size) != model.vocab_size:
    raise ConfigError(f"config.data's caption tokenizer ({info.tokenizer_path}) has "
                      f"{info.vocab_size} tokens but {workdir}'s text tower has "
                      f"{model.vocab_size}: probe with the tokenizer it was trained with "
                      "(config.data.tokenizer).")


# ---------------------------------------------------------------- embedding
def embed_all(model: Any, zs: Any, ret: Any, knn_data: KnnData | None,
              batch_size: int) -> Embedded:
  """Everything one model embeds, each image split once (zero-shot, retrieval and k-NN
  reading the same split of the same data share it)."""
  embed, mesh, channels = model.embed_batch, model.mesh, model.in_channels
  cache: dict[tuple, dict[str, np.ndarray]] = {}

  def images(pairs: bool, data, split: str, batches) -> dict[str, np.ndarray]:
    key = (pairs, json.dumps(data.to_dict(), sort_keys=True, default=str), split)
    if key not in cache:
      cache[key] = dual_embedding.embed_images(embed, batches, mesh, in_channels=channels)
    return cache[key]

  out = Embedded()
  if zs is not None:
    out.class_z = zs.class_text_embeddings(embed, mesh)
    got = images(zs.pairs, zs.data, zs.split, zs.image_batches(batch_size))
    limit = zs.max_examples or len(got["z"])
    out.zs_image_z, out.zs_labels = got["z"][:limit], got["label"][:limit]
  from mrl_jax.data import image_text_pipeline
  got = images(True, ret.data, ret.split, image_text_pipeline.make_pair_eval_batches(
      ret.data, global_batch_size=batch_size, split=ret.split))
  limit = ret.max_images or len(got["z"])
  captions = dual_embedding.embed_captions(embed, image_text_pipeline.make_caption_eval_batches(
      ret.data, global_batch_size=batch_size, split=ret.split), mesh)
  out.image_z = got["z"][:limit]
  out.text_z, out.text_image = dual_evaluators.captions_of(got["image_index"][:limit], captions)
  if knn_data is not None:
    for split, field in ((knn_data.train_split, "knn_train"), (knn_data.test_split, "knn_test")):
      got = images(knn_data.pairs, knn_data.data, split, knn_data.batches(split, batch_size))
      setattr(out, field, (got["z"], got["label"]))
  return out


# ---------------------------------------------------------------- scoring
def image_knn_top1(train: tuple[np.ndarray, np.ndarray],
                   test: tuple[np.ndarray, np.ndarray]) -> float:
  """1-NN top-1 of unit-normalised vectors (exact L2 search, ties to the lower index)."""
  (train_x, train_y), (test_x, test_y) = train, test
  _, idx = knn.knn_search(np.asarray(knn.l2_normalize(test_x)),
                          np.asarray(knn.l2_normalize(train_x)), 1)
  return float(np.mean(train_y[idx[:, 0]] == test_y))


def score(emb: Embedded, represent: Represent, dims: list[int], ks: tuple[int, ...],
          width: int) -> dict[str, dict[str, float]]:
  """{metric: {"<m>": value}} for every m in `dims` up to `width`, each modality's
  vectors `represent(z, m)` (then unit-normalised by the metric functions)."""
  out: dict[str, dict[str, float]] = {}

  def put(key: str, m: int, value: float) -> None:
    out.setdefault(key, {})[str(m)] = float(value)

  for m in (m for m in dims if m <= width):
    if emb.class_z is not None:
      image = represent(emb.zs_image_z, m)
      put("zero_shot_top1", m, zero_shot.zero_shot_top1(
          image, emb.zs_labels, represent(emb.class_z, m), (image.shape[1],))[0])
    image, text = represent(emb.image_z, m), represent(emb.text_z, m)
    recalls = cross_modal_retrieval.recall_at_k(image, text, emb.text_image,
                                                (image.shape[1],), ks)
    for direction, per_k in recalls.items():
      for k, values in per_k.items():
        put(f"{direction}_recall@{k}", m, values[0])
    if emb.knn_train is not None:
      train = (represent(emb.knn_train[0], m), emb.knn_train[1])
      test = (represent(emb.knn_test[0], m), emb.knn_test[1])
      put("image_knn_top1", m, image_knn_top1(train, test))
  return out


# ---------------------------------------------------------------- the probe
def run_dual_probe(workdir: str, config: ml_collections.ConfigDict,
                   settings: dict[str, Any], log=print) -> dict[str, Any]:
  """Probes the latest checkpoint of a contrastive `workdir`; writes WORKDIR/probe/."""
  from mrl_jax.data import image_text_pipeline
  if config.get("task", "classification") != "contrastive":
    raise ConfigError(f"{workdir} holds a dual encoder but --config is a "
                      f"{config.get('task', 'classification')!r} config: probe it with an "
                      "image-text config (e.g. --config configs/align.py) whose config.data is "
                      "an image-text corpus.")
  start = time.time()
  info = image_text_pipeline.image_text_dataset_info(config.data)
  # Everything is checked and opened before anything is restored or embedded.
  zs = _zero_shot_evaluator(config, info, log)
  ret = _retrieval_evaluator(config, info)
  knn_data = _knn_data(config, settings, info, log)
  batch_size = settings["batch_size"]
  if batch_size % pipeline.process_layout()[1]:
    raise ConfigError(f"config.probe.batch_size={batch_size} must be a multiple of the process "
                      "count.")
  model = inference.load(workdir)
  model.batch_size = batch_size
  _check_model_fits(model, info, config, workdir)
  dims = list(model.dims)
  log(f"Probing {workdir} (step {model.step}, sizes {dims}).")
  emb = embed_all(model, zs, ret, knn_data, batch_size)
  summary: dict[str, Any] = {"task": "contrastive", "dims": dims, "head": model.config.head,
                             "step": model.step, "dataset": config.data.name}
  summary["retrieval"] = {"split": ret.split, "images": int(len(emb.image_z)),
                          "captions": int(len(emb.text_z)), "ks": list(ret.ks)}
  if zs is not None:
    summary["zero_shot"] = {"dataset": zs.dataset, "split": zs.split,
                            "images": int(len(emb.zs_image_z)),
                            "classes": len(zs.class_names), "templates": list(zs.templates)}
  if knn_data is not None:
    summary["knn"] = {"dataset": knn_data.data.name, "train_split": knn_data.train_split,
                      "test_split": knn_data.test_split, "database": int(len(emb.knn_train[0])),
                      "queries": int(len(emb.knn_test[0]))}
  summary.update(score(emb, PREFIX, dims, ret.ks, model.embedding_dim))

  if settings["baseline_workdir"]:
    base_dir = os.fspath(workdir_path(settings["baseline_workdir"],
                                      "config.probe.baseline_workdir"))
    base = inference.load(base_dir)
    base.batch_size = batch_size
    log(f"Baseline {base_dir} (step {base.step}, {base.config.head} head, sizes "
        f"{list(base.dims)}): its truncations to every size.")
    _check_model_fits(base, info, config, base_dir)
    summary["baseline"] = {"workdir": base_dir, "head": base.config.head,
                           "dims": list(base.dims), "step": base.step,
                           "embedding_dim": int(base.embedding_dim),
                           "basis": f"{ret.split} images and captions"}
    base_emb = embed_all(base, zs, ret, knn_data, batch_size)
    maps = {"truncated": PREFIX, **dual_baselines.truncations(
        base_emb.image_z, base_emb.text_z, [m for m in dims if m <= base.embedding_dim],
        settings["seed"])}
    for kind in BASELINE_KINDS:
      rows = score(base_emb, maps[kind], dims, ret.ks, base.embedding_dim)
      summary.update({f"baseline_{kind}_{k}": v for k, v in rows.items()})
  summary["probe_seconds"] = round(time.time() - start, 1)

  out_dir = make_dirs(workdir_path(workdir) / "probe")  # A folder, or a prefix in a bucket.
  write_json_atomic(out_dir / "summary.json", summary)
  write_dual_report(summary, out_dir)
  log(console_table(summary))
  log(f"Wrote {out_dir}/summary.json, report.md and plots.")
  return summary


# ---------------------------------------------------------------- report
def _columns(summary: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
  ks = summary["retrieval"]["ks"]
  cols = [("zero_shot_top1", "zero-shot")]
  cols += [(f"image_to_text_recall@{k}", f"i->t R@{k}") for k in ks]
  cols += [(f"text_to_image_recall@{k}", f"t->i R@{k}") for k in ks]
  cols += [("image_knn_top1", "image 1-NN")]
  return [(prefix + key, title) for key, title in cols if prefix + key in summary]


def _cells(summary: dict[str, Any], columns, m: int) -> list[str]:
  cells = []
  for key, _ in columns:
    value = summary[key].get(str(m))
    cells.append("-" if value is None else f"{100 * value:.2f}")
  return cells


def console_table(summary: dict[str, Any]) -> str:
  """Per size, the model's rows then each baseline's (percentages)."""
  lines = []
  for prefix, title in [("", "MRL dual encoder")] + [
      (f"baseline_{k}_", f"baseline, {BASELINE_TITLES[k]}") for k in BASELINE_KINDS]:
    columns = _columns(summary, prefix)
    if not columns:
      continue
    titles = [t for _, t in columns]
    widths = [max(len(t), 6) for t in titles]
    lines.append(f"{title} (%):")
    lines.append("   dims | " + " | ".join(t.rjust(w) for t, w in zip(titles, widths)))
    lines.append("  ------+-" + "-+-".join("-" * w for w in widths))
    for m in summary["dims"]:
      cells = _cells(summary, columns, m)
      lines.append(f"  {m:5d} | " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)))
  return "\n".join(lines)


PLOTS = (("zero_shot.png", "zero-shot top-1", (("zero_shot_top1", ""),)),
         ("recall.png", "recall@1", (("image_to_text_recall@1", " i->t"),
                                     ("text_to_image_recall@1", " t->i"))),
         ("knn.png", "image 1-NN top-1", (("image_knn_top1", ""),)))
WHO = (("", "MRL", "-"), ("baseline_truncated_", "baseline first m", "-."),
       ("baseline_svd_", "baseline SVD", "--"), ("baseline_random_", "baseline random", ":"))
BASELINE_TITLES = {"truncated": "its first m dims", "svd": "SVD to m dims",
                   "random": "m random dims"}


def _plot(summary: dict[str, Any], keys, ylabel: str, path: str) -> bool:
  """One line per (metric, model) with values; False (no file) when there are none."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  drawn = False
  for key, label in keys:
    for prefix, who, style in WHO:
      values = summary.get(prefix + key)
      if values:
        ax.plot(*zip(*sorted((int(m), v) for m, v in values.items())), marker="o",
                linestyle=style, label=who + label)
        drawn = True
  if not drawn:
    plt.close(fig)
    return False
  finish_plot(fig, ax, path, "representation size (dims)", ylabel)
  return True


def write_dual_report(summary: dict[str, Any], out_dir: str) -> None:
  """report.md and one PNG per metric family into `out_dir`."""
  images = [(ylabel, name) for name, ylabel, keys in PLOTS
            if _plot(summary, keys, ylabel, os.path.join(out_dir, name))]
  r = summary["retrieval"]
  lines = [f"# Dual-encoder probe report (step {summary['step']}, {summary['head']} head)", "",
           f"Retrieval: `{summary['dataset']}`/{r['split']}, {r['images']} images against "
           f"{r['captions']} captions (an image counts if any of its captions is found)."]
  if "zero_shot" in summary:
    z = summary["zero_shot"]
    lines.append(f"Zero-shot: `{z['dataset']}`/{z['split']}, {z['images']} images, "
                 f"{z['classes']} classes x {len(z['templates'])} templates.")
  if "knn" in summary:
    k = summary["knn"]
    lines.append(f"Image 1-NN: `{k['dataset']}`, database {k['train_split']} "
                 f"({k['database']}), queries {k['test_split']} ({k['queries']}).")
  lines += ["Every prefix unit-normalised on its own. Percentages.", ""]
  for prefix, title in [("", "Per size: MRL")] + [
      (f"baseline_{k}_", f"Per size: baseline ({summary['baseline']['head']} head, "
       f"`{summary['baseline']['workdir']}`), {BASELINE_TITLES[k]}")
      for k in BASELINE_KINDS if "baseline" in summary]:
    columns = _columns(summary, prefix)
    if not columns:
      continue
    lines += [f"## {title}", "", "| dims | " + " | ".join(t for _, t in columns) + " |",
              "|" + "---|" * (len(columns) + 1)]
    lines += [f"| {m} | " + " | ".join(_cells(summary, columns, m)) + " |"
              for m in summary["dims"]]
    lines.append("")
  lines += [f"![{title}]({name})" for title, name in images] + [""]
  write_text_atomic(os.path.join(out_dir, "report.md"), "\n".join(lines))
