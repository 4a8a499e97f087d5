"""Manifest corpora (label_corpus.py): bad rows, labels, pixels, the CLI and the demo corpus."""

import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mrl_jax.data import digits
from mrl_jax.data import label_corpus
from mrl_jax.data import pipeline
from mrl_jax.data import sources
from mrl_jax.tools import build_corpus

from conftest import subprocess_env

CLASSES = ["cat", "dog", "bird", "fish"]
RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8)
# Smooth, so that JPEG keeps it close.
PHOTO = np.stack([*np.meshgrid(np.arange(16) * 15, np.arange(12) * 20, indexing="xy"),
                  np.full((12, 16), 90)], axis=-1).astype(np.uint8)


def write_images(folder) -> dict[str, np.ndarray]:
  """Writes the test images into folder/img; returns path -> expected RGB pixels (None: no exact value)."""
  img = folder / "img"
  img.mkdir(parents=True)
  Image.fromarray(RGB, mode="RGB").save(img / "rgb.png")
  Image.fromarray(GRAY, mode="L").save(img / "gray.png")
  Image.fromarray(RGBA, mode="RGBA").save(img / "rgba.png")
  Image.fromarray(PHOTO, mode="RGB").save(img / "photo.jpg", quality=90)
  Image.fromarray(PHOTO[..., 0], mode="L").save(img / "gray.jpg", quality=90)
  data = (img / "photo.jpg").read_bytes()
  (img / "truncated.jpg").write_bytes(data[:len(data) // 2])
  (img / "text.jpg").write_text("this is not a JPEG\n")
  with Image.open(img / "photo.jpg") as photo:
    decoded_photo = np.asarray(photo.convert("RGB"))
  return {"img/rgb.png": RGB, "img/gray.png": np.repeat(GRAY[..., None], 3, axis=-1),
          "img/rgba.png": RGBA[..., :3], "img/photo.jpg": decoded_photo,
          "img/gray.jpg": None}


# (line text, expected label ids or the bad-row reason). Line numbers are the
# index in this list + 1.
TRAIN_ROWS = [
    ("# A JFT-style manifest: image_path<TAB>labels.", None),
    ("img/rgb.png\tcat,dog", [0, 1]),
    ("", None),
    ("img/gray.png\t2", [2]),
    ("img/rgba.png\t dog , 3 ,dog", [1, 3]),
    ("img/photo.jpg\tfish,0,bird", [0, 2, 3]),
    ("img/gray.jpg\tbird", [2]),
    ("img/truncated.jpg\tcat", "undecodable_image"),
    ("img/text.jpg\tcat", "undecodable_image"),
    ("img/nowhere.jpg\tcat", "missing_file"),
    ("img/rgb.png\t4", "label_id_out_of_range"),
    ("img/rgb.png\t-1", "label_id_out_of_range"),
    ("img/rgb.png\tzebra", "unknown_label_name"),
    ("img/rgb.png", "wrong_column_count"),
    ("img/rgb.png\tcat\textra", "wrong_column_count"),
    ("img/rgb.png\t , ", "empty_labels"),
    ("img/rgb.png\tfish", [3]),  # The same file again: a second example.
    ("  # An indented comment.", None),
]
# ImageNet-21k style: one label per row.
VALIDATION_ROWS = [("img/photo.jpg\tcat", [0]), ("img/rgb.png\t2", [2]), ("img/gray.png\tdog", [1])]


def expected_reasons(rows) -> dict[str, int]:
  counts = {}
  for _, want in rows:
    if isinstance(want, str):
      counts[want] = counts.get(want, 0) + 1
  return counts


def good_rows(rows) -> list[tuple[str, list[int]]]:
  return [(text.split("\t")[0], want) for text, want in rows if isinstance(want, list)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Image files, two manifests and a label file; the absolute `abs` row added."""
  folder = tmp_path_factory.mktemp("corpus")
  pixels = write_images(folder)
  (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n\n")
  train_rows = TRAIN_ROWS + [(f"{folder}/img/rgb.png\tbird", [2])]  # An absolute path.
  pixels[f"{folder}/img/rgb.png"] = RGB
  (folder / "train.tsv").write_text("\n".join(t for t, _ in train_rows) + "\n")
  # The validation manifest lives elsewhere: its paths are relative to it.
  (folder / "val").mkdir()
  (folder / "val" / "val.tsv").write_text(
      "\n".join(t.replace("img/", "../img/") for t, _ in VALIDATION_ROWS) + "\n")
  validation_rows = [(t.replace("img/", "../img/"), w) for t, w in VALIDATION_ROWS]
  pixels.update({k.replace("img/", "../img/"): v for k, v in list(pixels.items())})
  return dict(folder=folder, pixels=pixels, labels=folder / "labels.txt",
              manifests={"train": folder / "train.tsv", "validation": folder / "val" / "val.tsv"},
              rows={"train": train_rows, "validation": validation_rows})


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = label_corpus.build("my_jft", corpus["manifests"], corpus["labels"],
                               data_dir=data_dir, on_bad_row="skip")
  return data_dir, builder


def multi_hot(ids, n=len(CLASSES)):
  out = np.zeros(n, np.int32)
  out[ids] = 1
  return out


def corpus_cfg(data_dir, **overrides):
  cfg = dict(name="my_jft", data_dir=data_dir, label_key="labels", image_size=8,
             eval_split="validation", train_augment="resize", flip=False,
             eval_crop_fraction=1.0, prefetch=0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


# ------------------------------------------------------------ building with skip


def test_skip_counts_bad_rows_per_reason(corpus, built):
  data_dir, builder = built
  report = label_corpus.read_report(f"{data_dir}/my_jft/1.0.0")
  assert report["on_bad_row"] == "skip"
  for split in ("train", "validation"):
    rows = corpus["rows"][split]
    r = report["splits"][split]
    assert r["manifest"] == str(corpus["manifests"][split])
    assert r["skipped"] == expected_reasons(rows)
    assert r["examples"] == len(good_rows(rows))
    assert r["rows"] == r["examples"] + r["num_skipped"]
    # Every bad row is named by its line, in order.
    bad = [(i + 1, want) for i, (_, want) in enumerate(rows) if isinstance(want, str)]
    assert [(b["line"], b["reason"]) for b in r["bad_rows"]] == bad
    assert builder.report[split].skipped == r["skipped"]
  assert report["splits"]["train"]["num_skipped"] == 9
  by_line = {b["line"]: b for b in report["splits"]["train"]["bad_rows"]}
  assert by_line[10]["text"] == "img/nowhere.jpg\tcat"
  assert "nowhere.jpg" in by_line[10]["detail"]


def test_examples_read_by_name_without_the_builder(corpus, built):
  data_dir, _ = built
  # Nothing registers "my_jft": TFDS reads it from its files.
  with pytest.raises(tfds.core.registered.DatasetNotFoundError):
    tfds.builder_cls("my_jft")
  assert isinstance(tfds.builder("my_jft", data_dir=data_dir),
                    tfds.core.read_only_builder.ReadOnlyBuilder)
  for split in ("train", "validation"):
    source, info = sources.open_source("my_jft", split, data_dir)
    label, multilabel = sources.label_feature(info, "labels")
    assert multilabel and label.names == CLASSES
    assert tuple(info.features["image"].shape) == (None, None, 3)
    want = sorted((p, tuple(ids)) for p, ids in good_rows(corpus["rows"][split]))
    got = []
    for i in range(len(source)):
      ex = source[i]
      path = ex["id"].decode()
      got.append((path, tuple(int(x) for x in ex["labels"])))
      image = ex["image"]
      assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, path
      expected = corpus["pixels"][path]
      if path.endswith(".png") or path.endswith("photo.jpg"):
        # PNGs (converted or not) exactly; an RGB JPEG is stored as it was.
        np.testing.assert_array_equal(image, expected, err_msg=path)
      else:  # A grayscale JPEG, re-encoded as an RGB JPEG.
        assert image.shape == (12, 16, 3)
        np.testing.assert_array_equal(image[..., 0], image[..., 1])
        assert np.abs(image[..., 0].astype(int) - PHOTO[..., 0]).mean() < 3
    assert sorted(got) == want


def test_rgb_jpeg_bytes_are_stored_unchanged(corpus, built):
  data_dir, _ = built
  builder = tfds.builder("my_jft", data_dir=data_dir)
  source = builder.as_data_source(split="validation", decoders={"image": tfds.decode.SkipDecoding()})
  stored = {source[i]["id"].decode(): source[i]["image"] for i in range(len(source))}
  assert stored["../img/photo.jpg"] == (corpus["folder"] / "img" / "photo.jpg").read_bytes()
  assert stored["../img/rgb.png"] == (corpus["folder"] / "img" / "rgb.png").read_bytes()
  assert stored["../img/gray.png"] != (corpus["folder"] / "img" / "gray.png").read_bytes()


def test_pipeline_gives_the_manifest_labels_as_multi_hot(corpus, built):
  data_dir, _ = built
  cfg = corpus_cfg(data_dir)
  summary = pipeline.dataset_info(cfg)
  assert summary.multilabel and summary.num_classes == 4
  assert (summary.num_train_examples, summary.num_eval_examples) == (7, 3)

  # Evaluation reads the split in its stored order.
  source, _ = sources.open_source("my_jft", "validation", data_dir)
  want = dict(good_rows(corpus["rows"]["validation"]))
  batches = list(pipeline.make_eval_batches(cfg, global_batch_size=4))
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [1, 1, 1, 0])
  for i in range(len(source)):
    np.testing.assert_array_equal(labels[i], multi_hot(want[source[i]["id"].decode()]))
    assert labels[i].sum() == 1  # Single-label rows stay single-label.

  # One training batch of the whole split is a permutation of its rows.
  train = pipeline.make_train_iterator(cfg, global_batch_size=7, seed=3)
  batch = next(train)
  assert batch["image"].shape == (7, 8, 8, 3) and batch["label"].shape == (7, 4)
  rows = sorted(tuple(multi_hot(ids)) for _, ids in good_rows(corpus["rows"]["train"]))
  assert sorted(tuple(r) for r in batch["label"]) == rows


def test_builds_are_deterministic(corpus, built, tmp_path):
  data_dir, _ = built
  again = label_corpus.build("my_jft", corpus["manifests"], corpus["labels"],
                             data_dir=str(tmp_path), on_bad_row="skip")
  for split in ("train", "validation"):
    a = tfds.builder("my_jft", data_dir=data_dir).as_data_source(split=split)
    b = again.as_data_source(split=split)
    assert [a[i]["id"] for i in range(len(a))] == [b[i]["id"] for i in range(len(b))]
  assert (label_corpus.read_report(f"{data_dir}/my_jft/1.0.0") ==
          label_corpus.read_report(again.data_path))


# ------------------------------------------------------------ building with stop


@pytest.mark.parametrize("row,reason", [
    ("img/truncated.jpg\tcat", "undecodable_image"),
    ("img/text.jpg\tcat", "undecodable_image"),
    ("img/nowhere.jpg\tcat", "missing_file"),
    ("img/rgb.png\t9", "label_id_out_of_range"),
    ("img/rgb.png\tzebra", "unknown_label_name"),
    ("img/rgb.png", "wrong_column_count"),
    ("img/rgb.png\t", "empty_labels"),
])
def test_stop_names_manifest_line_and_reason(corpus, tmp_path, row, reason):
  manifest = corpus["folder"] / f"stop_{reason}.tsv"
  manifest.write_text(f"# header\nimg/rgb.png\tcat\n{row}\nimg/gray.png\tdog\n")
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(label_corpus.BadRowError) as e:
    label_corpus.build("stopped", {"train": manifest}, corpus["labels"], data_dir=data_dir)
  assert (e.value.manifest, e.value.line, e.value.reason) == (str(manifest), 3, reason)
  assert str(e.value).startswith(f"{manifest} line 3: {reason}: ")
  # Nothing usable is left behind.
  assert not label_corpus.LabelCorpus(
      name="stopped", manifests={"train": manifest}, label_file=corpus["labels"],
      data_dir=data_dir).is_prepared()
  with pytest.raises(sources.DatasetNotPreparedError):
    sources.open_source("stopped", "train", data_dir)


def test_bad_names_label_files_and_manifests(corpus, tmp_path):
  args = ({"train": corpus["manifests"]["train"]}, corpus["labels"])
  for name, match in (("mnist", "is a TFDS dataset"), ("mrl_digits", "package's own"),
                      ("My-JFT", "lowercase")):
    with pytest.raises(ValueError, match=match):
      label_corpus.build(name, *args, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="on_bad_row"):
    label_corpus.build("x", *args, on_bad_row="ignore", data_dir=str(tmp_path))
  for text, match in (("a\n\nb\n", "line 2 is blank"), ("a\nb\na\n", "repeats line 1"),
                      ("\n", "no class names")):
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
      label_corpus.read_label_file(tmp_path / "l.txt")
  with pytest.raises(FileNotFoundError, match="train=.*absent.tsv"):
    label_corpus.build("x", {"train": tmp_path / "absent.tsv"}, corpus["labels"],
                       data_dir=str(tmp_path))


def test_cli_builds_and_reports(corpus, tmp_path):
  data_dir = str(tmp_path / "tfds")
  folder = corpus["folder"]
  command = [sys.executable, "-m", "mrl_jax.tools.build_corpus", "--name", "cli_jft",
             "--labels", str(folder / "labels.txt"), "--split", f"train={folder}/train.tsv",
             "--split", f"validation={folder}/val/val.tsv", "--data_dir", data_dir,
             "--on_bad_row=skip"]
  done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                        timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  assert "train: 7 examples written, 9 rows skipped (empty_labels: 1, label_id_out_of_range: 2, " \
         "missing_file: 1, undecodable_image: 2, unknown_label_name: 1, " \
         "wrong_column_count: 2)" in done.stdout
  assert "validation: 3 examples written, 0 rows skipped" in done.stdout
  source, _ = sources.open_source("cli_jft", "train", data_dir)
  assert len(source) == 7

  # In process: a second run finds it built; a stop run names the bad row.
  assert build_corpus.main(command[3:]) == 0
  assert build_corpus.main(["--name", "cli_stop", "--labels", str(folder / "labels.txt"),
                            "--split", f"train={folder}/train.tsv", "--data_dir", data_dir]) == 1
  with pytest.raises(SystemExit):
    build_corpus.parse_args(["--name", "x", "--labels", "l", "--split", "train"])


def test_cli_output(corpus, tmp_path, capsys):
  folder = corpus["folder"]
  args = ["--name", "out_jft", "--labels", str(folder / "labels.txt"),
          "--split", f"validation={folder}/val/val.tsv", "--data_dir", str(tmp_path)]
  assert build_corpus.main(args) == 0
  assert "validation: 3 examples written, 0 rows skipped" in capsys.readouterr().out
  assert build_corpus.main(args) == 0
  out = capsys.readouterr().out
  assert "already prepared" in out and "validation: 3 examples written" in out
  assert build_corpus.main(["--name", "out_stop", "--labels", str(folder / "labels.txt"),
                            "--split", f"train={folder}/train.tsv",
                            "--data_dir", str(tmp_path)]) == 1
  assert f"{folder}/train.tsv line 8: undecodable_image" in capsys.readouterr().err


# ------------------------------------------------------------ files that are not UTF-8

# A manifest saved by a Windows editor: a byte-order mark, CRLF line breaks, a
# Latin-1 comment (ignored) and a Latin-1 path on line 3, with good rows after it.
NOT_UTF8_MANIFEST = (b"\xef\xbb\xbfimg/rgb.png\tcat\r\n# caf\xe9 photos\r\n"
                     b"img/caf\xe9.png\tdog\r\nimg/gray.png\tbird\r\nimg/rgba.png\tdog,fish\r\n")


def test_not_utf8_row_stops_the_cli_naming_file_and_line(corpus, tmp_path, capsys):
  manifest = corpus["folder"] / "latin1_stop.tsv"
  manifest.write_bytes(NOT_UTF8_MANIFEST)
  assert build_corpus.main(["--name", "latin1_stop", "--labels", str(corpus["labels"]),
                            "--split", f"train={manifest}", "--data_dir", str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  (line,) = [l for l in err.splitlines() if "error" in l]  # The rest is TFDS' progress bar.
  assert line.startswith(f"build_corpus: error: {manifest} line 3: not_utf8: byte 0xe9 at "
                         f"column 8 is not UTF-8") and "--on_bad_row=skip" in line, err


def test_not_utf8_rows_are_skipped_and_the_other_lines_kept(corpus, tmp_path):
  manifest = corpus["folder"] / "latin1_skip.tsv"
  manifest.write_bytes(NOT_UTF8_MANIFEST)
  builder = label_corpus.build("latin1_skip", {"train": manifest}, corpus["labels"],
                               data_dir=str(tmp_path), on_bad_row="skip")
  report = label_corpus.read_report(builder.data_path)["splits"]["train"]
  assert (report["rows"], report["examples"], report["skipped"]) == (4, 3, {"not_utf8": 1})
  (bad,) = report["bad_rows"]
  assert (bad["line"], bad["reason"], bad["text"]) == (3, "not_utf8", "img/caf\\xe9.png\tdog")
  source, _ = sources.open_source("latin1_skip", "train", str(tmp_path))
  got = sorted((source[i]["id"].decode(), tuple(int(x) for x in source[i]["labels"]))
               for i in range(len(source)))
  # The byte-order mark is not part of the first path; CRs are not part of the labels.
  assert got == [("img/gray.png", (2,)), ("img/rgb.png", (0,)), ("img/rgba.png", (1, 3))]


def test_label_file_not_utf8_names_its_line(tmp_path):
  path = tmp_path / "labels.txt"
  path.write_bytes(b"cat\ndog\nna\xefve\n")
  with pytest.raises(label_corpus.LabelFileError, match=r"labels\.txt line 3: byte 0xef at "
                                                        r"column 3 is not UTF-8"):
    label_corpus.read_label_file(path)
  path.write_bytes(b"\xef\xbb\xbfcat\r\ndog\r\n")  # A byte-order mark and CRLF are fine,
  assert label_corpus.read_label_file(path) == ["cat", "dog"]
  path.write_bytes(b"cat\rdog\rbird")  # and so are old Mac line breaks.
  assert label_corpus.read_label_file(path) == ["cat", "dog", "bird"]


# ------------------------------------------------------------ the demo corpus


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """mrl_demo_corpus built as process 0 and as process 1 of 2 (data_dirs not shared)."""
  from jax.experimental import multihost_utils
  root = tmp_path_factory.mktemp("demo")
  at_barrier = {}
  for index in (0, 1):
    data_dir = str(root / f"p{index}")
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(jax, "process_index", lambda i=index: i)
      mp.setattr(jax, "process_count", lambda: 2)
      mp.setattr(multihost_utils, "sync_global_devices", lambda name, d=data_dir: at_barrier.setdefault(
          index, label_corpus.MrlDemoCorpus(data_dir=d).is_prepared()))
      sources.open_source("mrl_demo_corpus", "train", data_dir)
  return str(root / "p0"), at_barrier


def test_demo_corpus_is_built_by_process_0_then_the_others(demo):
  _, at_barrier = demo
  assert at_barrier == {0: True, 1: False}


def test_demo_corpus_sizes_labels_and_pixels(demo):
  data_dir, _ = demo
  images, labels = digits.load_arrays()
  pools = digits.split_indices(labels)
  for split, size in (("train", 512), ("validation", 128)):
    source, info = sources.open_source("mrl_demo_corpus", split, data_dir)
    assert len(source) == size == label_corpus.DEMO_SPLITS[split]
    assert sources.dataset_num_classes(info, "labels") == 10
    grids, rows, grid_labels = label_corpus.demo_examples(split)
    # Digits come from mrl_digits' matching split, four different ones per grid.
    assert np.isin(rows, pools["train" if split == "train" else "test"]).all()
    assert all(len(set(r)) == 4 for r in rows)
    seen = set()
    for i in range(size):
      ex = source[i]
      k = int(ex["id"].decode().split("/")[1].split(".")[0])
      seen.add(k)
      np.testing.assert_array_equal(ex["image"], grids[k])
      assert sorted(int(x) for x in ex["labels"]) == grid_labels[k] == sorted(set(labels[rows[k]]))
      # The top-left cell is the first digit, upsampled 2x.
      np.testing.assert_array_equal(ex["image"][:16:2, :16:2, 0], images[rows[k][0], :, :, 0])
    assert seen == set(range(size))
  builder = tfds.builder("mrl_demo_corpus", data_dir=data_dir)
  assert builder.info.file_format.value == "array_record"
  report = label_corpus.read_report(builder.data_path)
  assert {s: r["examples"] for s, r in report["splits"].items()} == {"train": 512, "validation": 128}

  cfg = ml_collections.ConfigDict(dict(name="mrl_demo_corpus", data_dir=data_dir, label_key="labels",
                                       eval_split="validation", image_size=32, prefetch=0))
  summary = pipeline.dataset_info(cfg)
  assert (summary.num_classes, summary.multilabel, summary.image_shape) == (10, True, (32, 32, 3))
  batch = next(pipeline.make_train_iterator(cfg, global_batch_size=32, seed=0))
  assert batch["label"].shape == (32, 10) and 1 <= batch["label"].sum(1).min()
  assert batch["label"].sum(1).max() <= 4


def test_demo_files_are_real_files(tmp_path):
  manifests, label_file = label_corpus.write_demo_files(tmp_path)
  assert label_file.read_text().split() == [str(d) for d in range(10)]
  lines = [l for l in manifests["validation"].read_text().splitlines() if not l.startswith("#")]
  assert len(lines) == 128
  path, text = lines[5].split("\t")
  grids, _, grid_labels = label_corpus.demo_examples("validation")
  with Image.open(tmp_path / path) as image:
    assert image.format == "PNG" and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), grids[5])
  assert [int(t) for t in text.split(",")] == grid_labels[5]
