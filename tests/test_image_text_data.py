"""Image-text data: corpus builds (manifests, webdataset tars, bad rows), the demo
corpus mrl_digit_captions, and the pair pipeline (shapes, captions, resume, eval
coverage, process shares)."""

from __future__ import annotations

import io
import os
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest

from mrl_jax.data import caption_demo
from mrl_jax.data import image_text_corpus
from mrl_jax.data import image_text_pipeline as pairs
from mrl_jax.data import label_corpus
from mrl_jax.data import sources
from mrl_jax.errors import ConfigError, UserError
from mrl_jax.tools import build_image_text_corpus as cli

# Solid colours, so an image is recognised from any resized view of it.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (128, 128, 128)]


def _png(colour, size=(8, 8)) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full(size + (3,), colour, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def _write_images(folder, count):
  os.makedirs(folder, exist_ok=True)
  paths = []
  for k in range(count):
    path = os.path.join(folder, f"img{k}.png")
    with open(path, "wb") as f:
      f.write(_png(COLOURS[k]))
    paths.append(path)
  return paths


def _write_tar(path, members):
  """members: (name, bytes) in order."""
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def _records(name, split, data_dir):
  source, _ = sources.open_source(name, split, data_dir)
  return {r["image_id"].decode(): r for r in (source[i] for i in range(len(source)))}


def _captions(record):
  return [c.decode() for c in record["captions"]]


# ----------------------------------------------------------------- a tiny manifest corpus
TINY_CAPTIONS = {0: ["zero red", "zero crimson"], 1: ["one green"], 2: ["two blue", "two navy",
                 "two azure"], 3: ["three yellow"], 4: ["four cyan", "four teal"],
                 5: ["five magenta"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A 6-image train / 5-image test corpus with 1-3 captions per image (solid colours)."""
  root = str(tmp_path_factory.mktemp("tiny"))
  _write_images(os.path.join(root, "images"), 6)
  # An image's captions on lines apart: every image's first caption, then the seconds, ...
  rows = [f"images/img{k}.png\t{cs[j]}" for j in range(3) for k, cs in TINY_CAPTIONS.items()
          if j < len(cs)]
  with open(os.path.join(root, "train.tsv"), "w") as f:
    f.write("# tiny\n" + "\n".join(rows) + "\n")
  with open(os.path.join(root, "test.tsv"), "w") as f:
    f.write("\n".join(r for r in rows if not r.startswith("images/img5")) + "\n")
  data_dir = os.path.join(root, "tfds")
  image_text_corpus.build_image_text_corpus(
      "tiny_pairs", data_dir=data_dir, tokenizer_vocab_size=200,
      manifests={"train": os.path.join(root, "train.tsv"), "test": os.path.join(root, "test.tsv")})
  return data_dir


def _tiny_cfg(data_dir, **kw):
  return ml_collections.ConfigDict(dict(dict(name="tiny_pairs", data_dir=data_dir, image_size=8,
                                             train_augment="resize", seq_len=8,
                                             prefetch=0), **kw))


def _image_of(normalised: np.ndarray) -> int:
  pixel = np.round((normalised[0, 0] * 0.5 + 0.5) * 255).astype(int)
  return [tuple(c) for c in COLOURS].index(tuple(pixel))


def test_manifest_build_groups_captions_by_image_and_resolves_relative_paths(tiny):
  records = _records("tiny_pairs", "train", tiny)
  assert sorted(records) == [f"images/img{k}.png" for k in range(6)]
  for k, captions in TINY_CAPTIONS.items():
    record = records[f"images/img{k}.png"]
    assert _captions(record) == captions  # All of them, in the manifest's order.
    np.testing.assert_array_equal(record["image"], np.full((8, 8, 3), COLOURS[k], np.uint8))
  report = label_corpus.read_report(os.path.join(tiny, "tiny_pairs", "1.0.0"))
  assert report["splits"]["train"]["captions"] == 10
  assert report["splits"]["train"]["examples"] == 6
  assert os.path.isfile(os.path.join(tiny, "tiny_pairs", "1.0.0", "tokenizer", "tokenizer.json"))


def test_webdataset_tars_group_members_by_key(tmp_path):
  shard0 = _write_tar(str(tmp_path / "00000.tar"), [
      ("00000/000000000.png", _png(COLOURS[0])), ("00000/000000000.txt", b"a red square\n"),
      ("00000/000000000.json", b'{"url": "x"}'),
      ("00000/000000001.txt", "a green caf\u00e9".encode()),
      ("00000/000000001.jpg", _jpeg(COLOURS[1]))])
  _write_tar(str(tmp_path / "00001.tar"), [
      ("000000002.webp", _webp(COLOURS[2])), ("000000002.txt", b"  a blue\tsquare  ")])
  data_dir = str(tmp_path / "tfds")
  image_text_corpus.build_image_text_corpus(
      "tar_pairs", data_dir=data_dir, tokenizer_vocab_size=50,
      shards={"train": str(tmp_path / "0000*.tar"), "test": [shard0]})
  records = _records("tar_pairs", "train", data_dir)
  assert sorted(records) == ["00000.tar:00000/000000000", "00000.tar:00000/000000001",
                             "00001.tar:000000002"]
  assert _captions(records["00000.tar:00000/000000000"]) == ["a red square"]
  assert _captions(records["00000.tar:00000/000000001"]) == ["a green caf\u00e9"]
  assert _captions(records["00001.tar:000000002"]) == ["a blue square"]  # Whitespace collapsed.
  np.testing.assert_array_equal(records["00000.tar:00000/000000000"]["image"],
                                np.full((8, 8, 3), COLOURS[0], np.uint8))
  for record in records.values():
    assert record["image"].shape == (8, 8, 3) and record["image"].dtype == np.uint8
  assert len(_records("tar_pairs", "test", data_dir)) == 2


def _jpeg(colour) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def _webp(colour) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(buffer, format="WEBP", lossless=True)
  return buffer.getvalue()


# ----------------------------------------------------------------- bad rows
# reason -> manifest lines after one good line (line 1); the bad row is line 2.
MANIFEST_BAD = {
    "not_utf8": b"img0.png\tcaf\xe9 au lait",
    "wrong_column_count": b"img0.png\ta\tb",
    "empty_caption": b"img0.png\t   ",
    "missing_file": b"nothere.png\ta caption",
    "undecodable_image": b"broken.png\ta caption",
}
# reason -> tar members after one good key; the named member is the bad one.
TAR_BAD = {
    "missing_caption": ([("k1.png", "PNG")], "k1.png"),
    "missing_image": ([("k1.txt", b"a caption")], "k1.txt"),
    "not_utf8": ([("k1.png", "PNG"), ("k1.txt", b"caf\xe9")], "k1.txt"),
    "empty_caption": ([("k1.png", "PNG"), ("k1.txt", b" \n ")], "k1.txt"),
    "undecodable_image": ([("k1.png", b"not a png"), ("k1.txt", b"a caption")], "k1.png"),
    "duplicate_member": ([("k1.png", "PNG"), ("k1.jpg", "PNG"), ("k1.txt", b"x")], "k1.png"),
}


def _bad_manifest(folder, reason):
  _write_images(str(folder), 1)
  (folder / "broken.png").write_bytes(_png(COLOURS[0])[:30])  # Truncated.
  path = folder / f"{reason}.tsv"
  path.write_bytes(b"img0.png\tgood caption\n" + MANIFEST_BAD[reason] + b"\n")
  return str(path)


def _bad_tar(folder, reason):
  extra, _ = TAR_BAD[reason]
  members = [("k0.png", _png(COLOURS[0])), ("k0.txt", b"good caption")]
  members += [(n, _png(COLOURS[1]) if d == "PNG" else d) for n, d in extra]
  return _write_tar(str(folder / f"{reason}.tar"), members)


@pytest.mark.parametrize("reason", sorted(MANIFEST_BAD))
def test_bad_manifest_row_stops_with_one_line_naming_file_and_line(tmp_path, reason):
  manifest = _bad_manifest(tmp_path, reason)
  with pytest.raises(label_corpus.BadRowError) as e:
    image_text_corpus.build_image_text_corpus("bad_rows", data_dir=str(tmp_path / "tfds"),
                                              manifests={"train": manifest})
  message = str(e.value)
  assert isinstance(e.value, UserError) and "\n" not in message
  assert message.startswith(f"{manifest} line 2: {reason}:") and "on_bad_row='skip'" in message
  assert not os.path.exists(tmp_path / "tfds" / "bad_rows" / "1.0.0")


@pytest.mark.parametrize("reason", sorted(TAR_BAD) + ["unreadable_tar"])
def test_bad_tar_member_stops_with_one_line_naming_shard_and_member(tmp_path, reason):
  if reason == "unreadable_tar":
    shard, where = str(tmp_path / "junk.tar"), ""
    (tmp_path / "junk.tar").write_bytes(b"this is no tar file" * 40)
  else:
    shard, where = _bad_tar(tmp_path, reason), f" member {TAR_BAD[reason][1]}"
  with pytest.raises(image_text_corpus.BadMemberError) as e:
    image_text_corpus.build_image_text_corpus("bad_tar", data_dir=str(tmp_path / "tfds"),
                                              shards={"train": [shard]})
  message = str(e.value)
  assert isinstance(e.value, UserError) and "\n" not in message
  assert message.startswith(f"{shard}{where}: {reason}:"), message
  assert "on_bad_row='skip'" in message


def test_skip_leaves_bad_rows_out_and_counts_them_per_reason(tmp_path):
  folder = tmp_path / "in"
  folder.mkdir()
  _write_images(str(folder), 2)
  (folder / "broken.png").write_bytes(_png(COLOURS[0])[:30])
  manifest = folder / "train.tsv"
  manifest.write_bytes(b"img0.png\tgood\nimg1.png\talso good\n"
                       + b"\n".join(MANIFEST_BAD[r] for r in sorted(MANIFEST_BAD)) + b"\n"
                       + b"broken.png\tsecond row of the broken image\n")
  shard_members = [("g.png", _png(COLOURS[2])), ("g.txt", b"good tar")]
  for i, reason in enumerate(sorted(TAR_BAD)):
    extra, _ = TAR_BAD[reason]
    shard_members += [(f"r{i}{n[2:]}", _png(COLOURS[1]) if d == "PNG" else d) for n, d in extra]
  shard = _write_tar(str(folder / "a.tar"), shard_members)
  junk = folder / "junk.tar"
  junk.write_bytes(b"no tar" * 100)
  data_dir = str(tmp_path / "tfds")
  builder = image_text_corpus.build_image_text_corpus(
      "skipped", data_dir=data_dir, manifests={"train": str(manifest)},
      shards={"train": [shard, str(junk)]}, on_bad_row="skip", tokenizer_vocab_size=50)
  expected = {r: 1 for r in MANIFEST_BAD}
  expected["undecodable_image"] = 2  # Both rows of broken.png (the tar member adds one).
  for r in TAR_BAD:
    expected[r] = expected.get(r, 0) + 1
  expected["unreadable_tar"] = 1
  report = label_corpus.read_report(builder.data_path)["splits"]["train"]
  assert report["skipped"] == expected
  assert report["examples"] == 3 and report["captions"] == 3
  assert report["rows"] == 2 + len(MANIFEST_BAD) + 1 + 1 + len(TAR_BAD) + 1
  assert sorted(_records("skipped", "train", data_dir)) == ["a.tar:g", "img0.png", "img1.png"]


def test_cli_builds_and_reports_and_bad_rows_are_one_error_line(tmp_path, capsys):
  folder = tmp_path / "in"
  _write_images(str(folder), 2)
  (folder / "train.tsv").write_text("img0.png\tred\nimg1.png\tgreen\n")
  shard = _write_tar(str(folder / "val.tar"), [("v.png", _png(COLOURS[2])), ("v.txt", b"blue")])
  data_dir = str(tmp_path / "tfds")
  assert cli.main(["--name", "cli_pairs", "--data_dir", data_dir, "--train",
                   str(folder / "train.tsv"), "--validation", shard,
                   "--tokenizer_vocab_size", "40"]) == 0
  out = capsys.readouterr().out
  assert "train: 2 images with 2 captions written of 2 rows" in out
  assert "validation: 1 images with 1 captions" in out and "tokenizer:" in out
  (folder / "bad.tsv").write_text("img0.png\tred\nmissing.png\tx\n")
  assert cli.main(["--name", "cli_bad", "--data_dir", data_dir, "--train",
                   str(folder / "bad.tsv")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "line 2: missing_file" in err[0]


# ----------------------------------------------------------------- the demo corpus
def test_demo_corpus_uses_disjoint_source_digits_and_fixed_sizes(image_text_demo_data_dir):
  train = _records(caption_demo.NAME, "train", image_text_demo_data_dir)
  test = _records(caption_demo.NAME, "test", image_text_demo_data_dir)
  assert len(train) == 8000 and len(test) == 1000
  rows = {split: {r for i in records for r in caption_demo.source_rows(i)}
          for split, records in (("train", train), ("test", test))}
  assert not rows["train"] & rows["test"]
  labels = np.array([r["label"] for r in test.values()])
  assert np.bincount(labels, minlength=100).tolist() == [10] * 100
  _, mnist_labels = caption_demo.two_digits.load_mnist()
  for image_id, r in test.items():  # The label is the number the source digits spell.
    left, right = caption_demo.source_rows(image_id)
    assert r["label"] == 10 * mnist_labels[left] + mnist_labels[right]
    assert r["image"].shape == (32, 32, 3)


def test_demo_captions_name_the_number_in_the_image_and_nothing_else(image_text_demo_data_dir):
  test = _records(caption_demo.NAME, "test", image_text_demo_data_dir)
  words = caption_demo.DIGIT_WORDS
  # Every word a caption may use: the templates' own words, digits and number words.
  template_words = {w for t in caption_demo.TEMPLATES
                    for w in t.replace(",", " ").replace(".", " ").split() if "{" not in w}
  allowed = template_words | set(words) | set("0123456789") | set(caption_demo.CLASS_NAMES)
  for r in test.values():
    left, right = divmod(int(r["label"]), 10)
    image = r["image"]
    # White ink: every channel equal, and ink in both halves.
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert image[:, :16].max() > 128 and image[:, 16:].max() > 128
    captions = _captions(r)
    assert 3 <= len(captions) <= 5 and len(set(captions)) == len(captions)
    for text in captions:
      tokens = text.replace(",", " ").replace(".", " ").split()
      number = f"{left}{right}" in tokens
      digits = [t for t in tokens if t in "0123456789" and len(t) == 1] == [str(left), str(right)]
      spelled = [t for t in tokens if t in words] == [words[left], words[right]]
      assert number or digits or spelled, (text, r["label"])
      assert set(tokens) <= allowed, text


# ----------------------------------------------------------------- the pair pipeline
def _demo_cfg(data_dir, **kw):
  return ml_collections.ConfigDict(dict(dict(data_dir=data_dir, seq_len=16, prefetch=0), **kw))


def test_dataset_info_of_the_demo(image_text_demo_data_dir):
  info = pairs.image_text_dataset_info(_demo_cfg(image_text_demo_data_dir))
  tokenizer = pairs.load_caption_tokenizer(_demo_cfg(image_text_demo_data_dir))
  test = _records(caption_demo.NAME, "test", image_text_demo_data_dir)
  assert (info.num_train_examples, info.num_eval_images) == (8000, 1000)
  assert info.num_eval_captions == sum(len(r["captions"]) for r in test.values())
  assert (info.image_size, info.in_channels, info.seq_len) == (32, 3, 16)
  assert info.num_classes == 100 and info.class_names == caption_demo.CLASS_NAMES
  assert info.vocab_size == tokenizer.vocab_size and info.pad_id == tokenizer.pad_id
  with pytest.raises(ConfigError, match="vocab_size"):
    pairs.image_text_dataset_info(_demo_cfg(image_text_demo_data_dir, vocab_size=7))
  with pytest.raises(ConfigError, match="Unknown data config"):
    pairs.image_text_dataset_info(_demo_cfg(image_text_demo_data_dir, seq_lenn=3))


def test_train_batches_pair_each_image_with_one_of_its_captions(tiny):
  cfg = _tiny_cfg(tiny)
  tokenizer = pairs.load_caption_tokenizer(cfg)
  it = pairs.make_pair_train_iterator(cfg, global_batch_size=4, seed=3)
  seen: dict[int, set[str]] = {k: set() for k in TINY_CAPTIONS}
  for _ in range(30):  # 20 epochs.
    batch = next(it)
    assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
    for key in ("input_ids", "attention_mask", "token_type_ids"):
      assert batch[key].shape == (4, 8) and batch[key].dtype == np.int32
    assert (batch["input_ids"][:, 0] == tokenizer.cls_id).all()
    assert not batch["token_type_ids"].any()
    for image, ids, attention in zip(batch["image"], batch["input_ids"], batch["attention_mask"]):
      k = _image_of(image)
      expected = pairs.tokenize_texts(tokenizer, TINY_CAPTIONS[k], 8)
      matches = [j for j in range(len(TINY_CAPTIONS[k]))
                 if (expected["input_ids"][j] == ids).all()
                 and (expected["attention_mask"][j] == attention).all()]
      assert len(matches) == 1
      seen[k].add(TINY_CAPTIONS[k][matches[0]])
  assert all(seen[k] == set(c) for k, c in TINY_CAPTIONS.items())  # Drawn afresh per epoch.


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_resumed_train_iterator_continues_exactly(tiny):
  cfg = _tiny_cfg(tiny, train_augment="random_resized_crop", crop_scale=(0.3, 1.0))
  it = pairs.make_pair_train_iterator(cfg, global_batch_size=4, seed=5)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 6)  # Across epoch boundaries (6 images, 4 per batch).
  resumed = pairs.make_pair_train_iterator(cfg, global_batch_size=4, seed=5)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 6)):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_two_process_shares_are_the_global_batch(image_text_demo_data_dir):
  cfg = _demo_cfg(image_text_demo_data_dir)
  whole = _take(pairs.make_pair_train_iterator(cfg, global_batch_size=8, seed=1), 3)
  shares = [_take(pairs.make_pair_train_iterator(cfg, global_batch_size=8, seed=1,
                                                 process_index=p, process_count=2), 3)
            for p in range(2)]
  for step in range(3):
    for key in whole[step]:
      np.testing.assert_array_equal(
          np.concatenate([shares[0][step][key], shares[1][step][key]]), whole[step][key])
  for make in (pairs.make_pair_eval_batches, pairs.make_caption_eval_batches):
    seen = [np.concatenate([b["image_index"][b["mask"] == 1]
                            for b in make(cfg, global_batch_size=512, process_index=p,
                                          process_count=2)]) for p in range(2)]
    if make is pairs.make_pair_eval_batches:
      assert not set(seen[0]) & set(seen[1])
      assert sorted(np.concatenate(seen)) == list(range(1000))
    else:
      assert len(seen[0]) + len(seen[1]) == pairs.image_text_dataset_info(cfg).num_eval_captions


def test_eval_batches_cover_every_image_and_every_caption_once(image_text_demo_data_dir):
  cfg = _demo_cfg(image_text_demo_data_dir)
  tokenizer = pairs.load_caption_tokenizer(cfg)
  source, _ = sources.open_source(caption_demo.NAME, "test", image_text_demo_data_dir)
  batches = list(pairs.make_pair_eval_batches(cfg, global_batch_size=384))
  assert len(batches) == 3  # 1,000 images padded to 1,152.
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert rows["mask"].dtype == np.int32 and rows["image_index"].dtype == np.int32
  real = rows["mask"] == 1
  np.testing.assert_array_equal(rows["image_index"][real], np.arange(1000))
  assert (rows["image_index"][~real] == -1).all() and (rows["label"][~real] == -1).all()
  assert not rows["attention_mask"][~real].any() and not rows["image"][~real].any()
  labels = np.array([source[i]["label"] for i in range(1000)])
  np.testing.assert_array_equal(rows["label"][real], labels)
  first = pairs.tokenize_texts(tokenizer, [source[i]["captions"][0].decode()
                                           for i in range(1000)], 16)
  np.testing.assert_array_equal(rows["input_ids"][real], first["input_ids"])
  view = (source[7]["image"].astype(np.float32) / 255.0 - 0.5) / 0.5  # Stored size: no resize.
  np.testing.assert_allclose(rows["image"][7], view, atol=1e-6)

  caption_batches = list(pairs.make_caption_eval_batches(cfg, global_batch_size=384))
  crows = {k: np.concatenate([b[k] for b in caption_batches]) for k in caption_batches[0]}
  creal = crows["mask"] == 1
  texts = [(i, c.decode()) for i in range(1000) for c in source[i]["captions"]]
  assert creal.sum() == len(texts) == pairs.image_text_dataset_info(cfg).num_eval_captions
  assert len(creal) % 384 == 0 and (crows["image_index"][~creal] == -1).all()
  np.testing.assert_array_equal(crows["image_index"][creal], [i for i, _ in texts])
  expected = pairs.tokenize_texts(tokenizer, [t for _, t in texts], 16)
  for key, value in expected.items():
    np.testing.assert_array_equal(crows[key][creal], value)


def test_unlabelled_corpus_gives_label_minus_one_and_no_classes(tiny):
  cfg = _tiny_cfg(tiny)
  info = pairs.image_text_dataset_info(cfg)
  assert (info.num_classes, info.class_names) == (0, ())
  assert (info.num_eval_images, info.num_eval_captions) == (5, 9)
  (batch,) = list(pairs.make_pair_eval_batches(cfg, global_batch_size=8))
  assert (batch["label"] == -1).all() and batch["mask"].tolist() == [1] * 5 + [0] * 3


def _faulty_source(monkeypatch, data_dir):
  """Split "faulty" of the tiny corpus: example 2 has an empty caption, example 4 a
  one-channel image (what a hand-made or damaged dataset can hold)."""
  real, info = sources.open_source("tiny_pairs", "train", data_dir)
  examples = [dict(real[i]) for i in range(len(real))]
  examples[2]["captions"] = [b"  "]
  bad_colours = {tuple(examples[2]["image"][0, 0]), tuple(examples[4]["image"][0, 0])}
  examples[4]["image"] = examples[4]["image"][..., :1]  # One channel, not RGB.
  faulty = sources.InMemorySource(examples, "faulty")
  original = sources.open_source

  def open_source(name, split, data_dir=None, **kw):
    if split == "faulty":
      return faulty, info
    return original(name, split, data_dir, **kw)
  monkeypatch.setattr(sources, "open_source", open_source)
  return bad_colours


def test_bad_examples_stop_with_their_index_or_are_skipped(tiny, monkeypatch):
  from mrl_jax.data import pipeline
  bad_colours = _faulty_source(monkeypatch, tiny)
  stop = _tiny_cfg(tiny, train_split="faulty", eval_split="faulty")
  with pytest.raises(pipeline.DataError, match=r"tiny_pairs/faulty example [24]"):
    _take(pairs.make_pair_train_iterator(stop, global_batch_size=4, seed=0), 2)
  with pytest.raises(pipeline.DataError, match=r"example 2: caption 0 is empty"):
    list(pairs.make_caption_eval_batches(stop, global_batch_size=4))

  skip = _tiny_cfg(tiny, train_split="faulty", eval_split="faulty", on_bad_example="skip")
  it = pairs.make_pair_train_iterator(skip, global_batch_size=4, seed=0)
  for batch in _take(it, 6):
    colours = {tuple(np.round((im[0, 0] * 0.5 + 0.5) * 255).astype(np.uint8))
               for im in batch["image"]}
    assert not colours & bad_colours
  assert pipeline.data_metrics(it)["data/skipped_examples"] == 2 * 4  # Twice per epoch, 4 epochs.
  (batch,) = list(pairs.make_pair_eval_batches(skip, global_batch_size=8))
  assert batch["mask"].tolist() == [1, 1, 0, 1, 0, 1, 0, 0]
  assert batch["image_index"].tolist() == [0, 1, -1, 3, -1, 5, -1, -1]
  captions = list(pairs.make_caption_eval_batches(skip, global_batch_size=16))
  index = np.concatenate([b["image_index"][b["mask"] == 1] for b in captions])
  assert not set(index.tolist()) & {2, 4} and set(index.tolist()) == {0, 1, 3, 5}


def test_a_given_tokenizer_is_stored_instead_of_training_one(tiny, tmp_path):
  from mrl_jax.data import tokenizer as tokenizer_lib
  folder = tmp_path / "in"
  _write_images(str(folder), 1)
  (folder / "train.tsv").write_text("img0.png\tzero red\n")
  given = os.path.join(tiny, "tiny_pairs", "1.0.0", "tokenizer")
  builder = image_text_corpus.build_image_text_corpus(
      "given_tokenizer", data_dir=str(tmp_path / "tfds"),
      manifests={"train": str(folder / "train.tsv")}, tokenizer=given)
  stored = tokenizer_lib.load_tokenizer(os.path.join(builder.data_path, "tokenizer"))
  assert stored.vocab() == tokenizer_lib.load_tokenizer(given).vocab()
  cfg = ml_collections.ConfigDict(dict(name="given_tokenizer", data_dir=str(tmp_path / "tfds"),
                                       image_size=8, eval_split="train"))
  assert pairs.load_caption_tokenizer(cfg).vocab() == stored.vocab()


def test_a_corpus_without_tokenizer_asks_for_one_in_one_line(tmp_path):
  folder = tmp_path / "in"
  _write_images(str(folder), 1)
  (folder / "train.tsv").write_text("img0.png\tzero red\n")
  image_text_corpus.build_image_text_corpus(
      "no_tokenizer", data_dir=str(tmp_path / "tfds"),
      manifests={"train": str(folder / "train.tsv")}, tokenizer_vocab_size=0)
  cfg = ml_collections.ConfigDict(dict(name="no_tokenizer", data_dir=str(tmp_path / "tfds")))
  with pytest.raises(ConfigError) as e:
    pairs.load_caption_tokenizer(cfg)
  assert "\n" not in str(e.value) and "data.tokenizer" in str(e.value)
  assert "mrl_jax.tools.build_image_text_corpus" in str(e.value)
