"""Text data: the corpus builder, the embedded demo corpus, the MLM pipeline."""

from __future__ import annotations

import json
import math

import ml_collections
import numpy as np
import pytest

from mrl_jax.data import label_corpus
from mrl_jax.data import mlm_pipeline
from mrl_jax.data import pipeline
from mrl_jax.data import sources
from mrl_jax.data import text_corpus
from mrl_jax.data import text_demo
from mrl_jax.data import tokenizer as tokenizer_lib
from mrl_jax.errors import ConfigError, UserError
from mrl_jax.tools import build_text_corpus

SMALL_DOCS = 40   # Lee background articles in the small corpus.
SMALL_SEQ_LEN = 32


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
  """(data_dir, documents): 40 news articles as a `lines` corpus with a 1000-token tokenizer.

  About 300 sequences of 32 tokens: an epoch is a few batches, so the tests
  cross epoch boundaries quickly.
  """
  folder = tmp_path_factory.mktemp("small_text")
  docs = text_demo.lee_background_documents()[:SMALL_DOCS]
  train = folder / "train.txt"
  train.write_text("\n".join(docs[:-5]) + "\n", encoding="utf-8")
  validation = folder / "validation.txt"
  validation.write_text("\n\n".join(docs[-5:]) + "\n", encoding="utf-8")
  data_dir = str(folder / "tfds")
  text_corpus.build_text_corpus("small_text", {"train": [train], "validation": [validation]},
                                data_dir=data_dir, tokenizer_vocab_size=1000)
  return data_dir, docs


def small_cfg(data_dir, **overrides) -> ml_collections.ConfigDict:
  fields = dict(name="small_text", data_dir=data_dir, seq_len=SMALL_SEQ_LEN, prefetch=0)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def fake_processes(monkeypatch, index, count):
  monkeypatch.setattr(pipeline, "process_layout", lambda: (index, count))


# ------------------------------------------------------------------ the demo corpus
def test_demo_corpus_builds_with_its_tokenizer(text_demo_data_dir):
  demo_dir = text_demo_data_dir
  train, info = sources.open_source("mrl_text_demo", "train", demo_dir)
  validation, _ = sources.open_source("mrl_text_demo", "validation", demo_dir)
  n = len(text_demo.documents())
  assert len(train) + len(validation) == n
  assert len(validation) == round(0.05 * n)
  ids = {s[i]["id"] for s in (train, validation) for i in range(len(s))}
  assert len(ids) == n  # Disjoint splits, every document once.
  texts = [train[i]["text"].decode() for i in range(len(train))]
  assert all(t.strip() for t in texts)
  assert not any("{{" in t or "[[" in t or "<ref" in t for t in texts)
  sources_seen = {int(train[i]["source"]) for i in range(len(train))}
  assert sources_seen == {0, 1}
  tokenizer = tokenizer_lib.load_tokenizer(
      str(text_corpus.corpus_tokenizer_dir(info.data_dir)))
  assert tokenizer.vocab_size == text_demo.VOCAB_SIZE
  data = mlm_pipeline.text_dataset_info(ml_collections.ConfigDict(dict(data_dir=demo_dir)))
  assert (data.vocab_size, data.seq_len, data.max_predictions) == (8000, 128, 19)
  assert (data.pad_id, data.cls_id, data.sep_id, data.mask_id) == (0, 2, 3, 4)
  assert data.num_documents == len(train)
  assert data.num_train_examples >= len(train)


def test_lee_similarity_matrix():
  docs, sim = text_demo.lee_similarity()
  assert len(docs) == 50 and sim.shape == (50, 50)
  np.testing.assert_array_equal(sim, sim.T)
  np.testing.assert_array_equal(np.diag(sim), 1.0)
  assert 0.0 <= sim.min() and sim.max() <= 1.0
  # The file's upper triangle, read here independently: row i, column j >= i.
  path = f"{text_demo.test_data_dir()}/{text_demo.LEE_SIMILARITY_FILE}"
  with open(path) as f:
    rows = [[float(x) for x in line.split("\t")] for line in f if line.strip()]
  for i in range(50):
    for j in range(i, 50):
      assert sim[i, j] == sim[j, i] == rows[i][j]
  assert docs[0].startswith("The national executive of the strife-torn Democrats")


def test_labelled_texts_are_topic_labelled_newsgroup_bodies():
  texts, labels, names = text_demo.labelled_texts()
  assert names == ["alt.atheism", "sci.space"]
  assert len(texts) == len(labels) == 200
  assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [100, 100]
  # The headers name the newsgroup, which would give the label away.
  assert not any("Newsgroups:" in t or "Path:" in t for t in texts)
  again = text_demo.labelled_texts()
  assert again[0] == texts and np.array_equal(again[1], labels)


# ------------------------------------------------------------------ packing and masking
def test_packing_keeps_every_token_of_every_document(small_corpus):
  data_dir, _ = small_corpus
  cfg = small_cfg(data_dir)
  packed = mlm_pipeline.packed_split(cfg)
  tokenizer = mlm_pipeline.load_data_tokenizer(cfg)
  source, _ = sources.open_source("small_text", "train", data_dir)
  assert packed.num_documents == len(source) == SMALL_DOCS - 5
  for d in range(len(source)):
    rows = np.flatnonzero(packed.document == d)
    expected = tokenizer.tokenize_ids(source[d]["text"].decode())
    assert len(rows) == math.ceil(len(expected) / (SMALL_SEQ_LEN - 2))
    got = []
    for r in rows:  # [CLS] chunk [SEP] [PAD]...
      ids, length = packed.input_ids[r], packed.lengths[r]
      assert ids[0] == tokenizer.cls_id and ids[length - 1] == tokenizer.sep_id
      assert (ids[length:] == tokenizer.pad_id).all()
      got.extend(ids[1:length - 1].tolist())
    assert got == expected


def test_masking_statistics_follow_bert():
  """80/10/10 within binomial margins on ~27k predictions; specials never chosen."""
  rng = np.random.default_rng(0)
  vocab, seq_len, max_pred = 1000, 64, 10
  special = np.arange(5, dtype=np.int32)
  random_ids = np.arange(5, vocab, dtype=np.int32)
  counts = {"mask": 0, "same": 0, "other": 0}
  total = 0
  for trial in range(6000):
    length = int(rng.integers(3, seq_len + 1))
    ids = np.zeros(seq_len, np.int32)
    ids[1:length - 1] = rng.integers(5, vocab, length - 2)
    # Some [UNK]s in the text: real tokens, but special, so never chosen.
    ids[1:length - 1][rng.random(length - 2) < 0.05] = 1
    ids[0], ids[length - 1] = 2, 3
    out = mlm_pipeline.mask_sequence(ids, np.random.default_rng(trial), mask_rate=0.15,
                                     max_predictions=max_pred, mask_id=4, special_ids=special,
                                     random_ids=random_ids)
    candidates = np.flatnonzero(ids >= 5)
    k = min(max_pred, max(1, int(round(0.15 * len(candidates))))) if len(candidates) else 0
    w = out["masked_weights"]
    assert w.sum() == k and (w[:k] == 1).all() and (w[k:] == 0).all()
    pos = out["masked_positions"][:k]
    assert len(set(pos.tolist())) == k and np.isin(pos, candidates).all()
    np.testing.assert_array_equal(out["masked_ids"][:k], ids[pos])  # Labels: the originals.
    assert (out["masked_positions"][k:] == 0).all() and (out["masked_ids"][k:] == 0).all()
    unchosen = np.setdiff1d(np.arange(seq_len), pos)
    np.testing.assert_array_equal(out["input_ids"][unchosen], ids[unchosen])
    new = out["input_ids"][pos]
    counts["mask"] += int((new == 4).sum())
    counts["same"] += int((new == ids[pos]).sum())
    counts["other"] += int(((new != 4) & (new != ids[pos])).sum())
    assert (new[new != 4] >= 5).all()  # A random token is never a special one.
    total += k
  assert total > 25_000
  p_collide = 1 / len(random_ids)  # A random token may equal the original.
  expected = {"mask": 0.8, "same": 0.1 + 0.1 * p_collide, "other": 0.1 * (1 - p_collide)}
  for key, p in expected.items():
    margin = 5 * math.sqrt(p * (1 - p) / total)
    assert abs(counts[key] / total - p) < margin, (key, counts[key] / total, p)


def test_eval_batches_mask_real_tokens_and_are_fixed(small_corpus):
  data_dir, _ = small_corpus
  cfg = small_cfg(data_dir)
  packed = mlm_pipeline.packed_split(cfg, "validation")
  tokenizer = mlm_pipeline.load_data_tokenizer(cfg)
  first = list(mlm_pipeline.make_mlm_eval_batches(cfg, global_batch_size=16))
  assert_batches_equal(first, list(mlm_pipeline.make_mlm_eval_batches(cfg, global_batch_size=16)))
  n = len(packed)
  assert len(first) == math.ceil(n / 16)
  rows = {k: np.concatenate([b[k] for b in first]) for k in first[0]}
  np.testing.assert_array_equal(rows["mask"], (np.arange(len(rows["mask"])) < n).astype(np.float32))
  real = slice(0, n)
  original = packed.input_ids
  np.testing.assert_array_equal(rows["attention_mask"][real],
                                (np.arange(SMALL_SEQ_LEN) < packed.lengths[:, None]))
  np.testing.assert_array_equal(rows["token_type_ids"], 0)
  for i in range(n):
    k = int(rows["masked_weights"][i].sum())
    pos = rows["masked_positions"][i, :k]
    assert k >= 1 and not np.isin(original[i, pos], tokenizer.special_ids).any()
    np.testing.assert_array_equal(rows["masked_ids"][i, :k], original[i, pos])
    others = np.setdiff1d(np.arange(SMALL_SEQ_LEN), pos)
    np.testing.assert_array_equal(rows["input_ids"][i, others], original[i, others])
  pad = slice(n, None)
  assert (rows["input_ids"][pad] == tokenizer.pad_id).all()
  assert (rows["attention_mask"][pad] == 0).all() and (rows["masked_weights"][pad] == 0).all()
  # Two processes: each sees its rows of every global batch, together all of them.
  halves = []
  for index in range(2):
    with pytest.MonkeyPatch.context() as mp:
      fake_processes(mp, index, 2)
      halves.append(list(mlm_pipeline.make_mlm_eval_batches(cfg, global_batch_size=16)))
  for whole, a, b in zip(first, *halves):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[key])


# ------------------------------------------------------------------ the train iterator
def test_train_batches_have_the_contract_shapes(small_corpus):
  data_dir, _ = small_corpus
  cfg = small_cfg(data_dir, max_predictions=6)
  batch = next(mlm_pipeline.make_mlm_train_iterator(cfg, global_batch_size=8, seed=0))
  shapes = {k: (v.dtype.name, v.shape) for k, v in batch.items()}
  assert shapes == {
      "input_ids": ("int32", (8, SMALL_SEQ_LEN)), "token_type_ids": ("int32", (8, SMALL_SEQ_LEN)),
      "attention_mask": ("int32", (8, SMALL_SEQ_LEN)), "masked_positions": ("int32", (8, 6)),
      "masked_ids": ("int32", (8, 6)), "masked_weights": ("float32", (8, 6))}


def test_each_epoch_visits_every_sequence_once(small_corpus):
  data_dir, _ = small_corpus
  cfg = small_cfg(data_dir)
  n = len(mlm_pipeline.packed_split(cfg))
  packed = mlm_pipeline.packed_split(cfg)
  batches = take(mlm_pipeline.make_mlm_train_iterator(cfg, global_batch_size=n, seed=3), 2)
  for batch in batches:
    # Unmasked, each row is one packed sequence: restore the chosen tokens.
    rows = batch["input_ids"].copy()
    for r in range(n):
      k = int(batch["masked_weights"][r].sum())
      rows[r, batch["masked_positions"][r, :k]] = batch["masked_ids"][r, :k]
    order = sorted(map(tuple, rows.tolist()))
    assert order == sorted(map(tuple, packed.input_ids.tolist()))
  assert not np.array_equal(batches[0]["input_ids"], batches[1]["input_ids"])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_state_across_an_epoch_boundary(small_corpus, prefetch):
  data_dir, _ = small_corpus
  cfg = small_cfg(data_dir, prefetch=prefetch)
  n = len(mlm_pipeline.packed_split(cfg))
  steps_per_epoch = n // 32
  k = steps_per_epoch - 2  # Resume two steps before the first epoch ends.
  it = mlm_pipeline.make_mlm_train_iterator(cfg, global_batch_size=32, seed=5)
  take(it, k)
  state = it.get_state()
  assert state == {"next_index": k}
  expected = take(it, 6)
  resumed = mlm_pipeline.make_mlm_train_iterator(cfg, global_batch_size=32, seed=5)
  resumed.set_state(json.loads(json.dumps(state)))  # As a checkpoint stores it.
  assert_batches_equal(take(resumed, 6), expected)
  # An uninterrupted iterator without prefetching reads the same batches.
  plain = mlm_pipeline.make_mlm_train_iterator(small_cfg(data_dir), global_batch_size=32, seed=5)
  assert_batches_equal(take(plain, k + 6)[k:], expected)


def test_iterator_state_round_trips_through_the_checkpoint_handler(small_corpus, tmp_path):
  import orbax.checkpoint as ocp
  from mrl_jax import checkpointing
  data_dir, _ = small_corpus
  cfg = small_cfg(data_dir, prefetch=2)
  it = mlm_pipeline.make_mlm_train_iterator(cfg, global_batch_size=16, seed=0)
  take(it, 3)
  with ocp.CheckpointManager(tmp_path, item_handlers={
      "data": checkpointing.IteratorStateHandler()}) as manager:
    manager.save(3, args=ocp.args.Composite(data=checkpointing.IteratorStateSave(it.get_state())))
    manager.wait_until_finished()
    expected = take(it, 2)
    resumed = mlm_pipeline.make_mlm_train_iterator(cfg, global_batch_size=16, seed=0)
    manager.restore(3, args=ocp.args.Composite(
        data=checkpointing.IteratorStateRestore(resumed)))
  assert_batches_equal(take(resumed, 2), expected)


def test_two_processes_read_the_one_process_global_batch(small_corpus, monkeypatch):
  data_dir, _ = small_corpus
  cfg = small_cfg(data_dir)
  steps = len(mlm_pipeline.packed_split(cfg)) // 16 + 3  # Into the second epoch.
  whole = take(mlm_pipeline.make_mlm_train_iterator(cfg, global_batch_size=16, seed=1), steps)
  halves = []
  for index in range(2):
    fake_processes(monkeypatch, index, 2)
    halves.append(take(mlm_pipeline.make_mlm_train_iterator(cfg, global_batch_size=16, seed=1),
                       steps))
  for step in range(steps):
    for key in whole[step]:
      assert halves[0][step][key].shape[0] == 8
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), whole[step][key])


def test_seeds_give_different_masks(small_corpus):
  data_dir, _ = small_corpus
  cfg = small_cfg(data_dir)
  a = next(mlm_pipeline.make_mlm_train_iterator(cfg, global_batch_size=8, seed=0))
  b = next(mlm_pipeline.make_mlm_train_iterator(cfg, global_batch_size=8, seed=1))
  assert not np.array_equal(a["input_ids"], b["input_ids"])


# ------------------------------------------------------------------ config mistakes
@pytest.mark.parametrize("overrides, match", [
    (dict(image_size=8), "Unknown data config field"),
    (dict(seq_len=2), "data.seq_len"),
    (dict(mask_rate=0.0), "data.mask_rate"),
    (dict(max_predictions=31), "data.max_predictions"),
    (dict(on_bad_example="ignore"), "data.on_bad_example"),
])
def test_config_mistakes(small_corpus, overrides, match):
  data_dir, _ = small_corpus
  with pytest.raises(ConfigError, match=match):
    mlm_pipeline.text_dataset_info(small_cfg(data_dir, **overrides))


def test_absent_dataset_and_missing_tokenizer(tmp_path, small_corpus):
  with pytest.raises(sources.DatasetNotPreparedError):
    mlm_pipeline.text_dataset_info(ml_collections.ConfigDict(
        dict(name="no_such_text_corpus", data_dir=str(tmp_path))))
  docs = tmp_path / "d.txt"
  docs.write_text("one document here\nanother one\n", encoding="utf-8")
  text_corpus.build_text_corpus("no_tokenizer", {"train": [docs]}, data_dir=str(tmp_path),
                                tokenizer_vocab_size=0)
  cfg = ml_collections.ConfigDict(dict(name="no_tokenizer", data_dir=str(tmp_path)))
  with pytest.raises(ConfigError, match="data.tokenizer"):
    mlm_pipeline.text_dataset_info(cfg)
  # With a tokenizer given, the same corpus works.
  data_dir, _ = small_corpus
  cfg.tokenizer = str(text_corpus.corpus_tokenizer_dir(
      sources.open_source("small_text", "train", data_dir)[1].data_dir))
  assert mlm_pipeline.text_dataset_info(cfg).num_documents == 2


# ------------------------------------------------------------------ bad rows and examples
def _bad_files(folder):
  lines = folder / "lines.txt"
  lines.write_bytes(b"a good document\ncaf\xe9 in Latin-1\nanother good one\n")
  jsonl = folder / "rows.jsonl"
  jsonl.write_text('{"text": "first", "label": "x"}\n[1, 2]\n{"text": "  "}\n'
                   '{"label": "y"}\n{"text": "second", "label": 3}\nnot json\n'
                   '{"text": "unlabelled"}\n', encoding="utf-8")
  return lines, jsonl


def test_bad_rows_stop_names_file_and_line(tmp_path):
  lines, jsonl = _bad_files(tmp_path)
  with pytest.raises(label_corpus.BadRowError) as e:
    text_corpus.build_text_corpus("bad_lines", {"train": [lines]}, data_dir=str(tmp_path / "d"),
                                  tokenizer_vocab_size=0)
  assert (e.value.manifest, e.value.line, e.value.reason) == (str(lines), 2, "not_utf8")
  assert isinstance(e.value, UserError) and "\n" not in str(e.value)
  with pytest.raises(label_corpus.BadRowError) as e:
    text_corpus.build_text_corpus("bad_rows", {"train": [jsonl]}, data_dir=str(tmp_path / "d"),
                                  text_format="jsonl", tokenizer_vocab_size=0)
  assert (e.value.line, e.value.reason) == (2, "not_an_object")
  assert not (tmp_path / "d" / "bad_rows" / "1.0.0").exists()


def test_bad_rows_skip_counts_reasons_and_keeps_labels(tmp_path):
  _, jsonl = _bad_files(tmp_path)
  builder = text_corpus.build_text_corpus(
      "skipped_rows", {"train": [jsonl]}, data_dir=str(tmp_path / "d"), text_format="jsonl",
      on_bad_row="skip", tokenizer_vocab_size=0)
  report = builder.report["train"]
  assert report.rows == 7 and report.examples == 2
  assert report.skipped == {"not_an_object": 1, "empty_document": 1, "missing_text": 1,
                            "not_json": 1, "missing_label": 1}
  source, info = sources.open_source("skipped_rows", "train", str(tmp_path / "d"))
  names = info.features["label"].names
  # The labels of the rows that became documents, sorted ("y" was on a bad row).
  assert names == ["3", "x"]
  got = sorted((source[i]["text"].decode(), names[int(source[i]["label"])])
               for i in range(len(source)))
  assert got == [("first", "x"), ("second", "3")]
  saved = label_corpus.read_report(builder.data_path)
  assert saved["splits"]["train"]["num_skipped"] == 5


def test_blocks_format(tmp_path):
  path = tmp_path / "blocks.txt"
  path.write_text("first block\nstill first\n\n  \nsecond\n\n\n\nthird\n", encoding="utf-8")
  text_corpus.build_text_corpus("blocks_corpus", {"train": [path]}, data_dir=str(tmp_path),
                                text_format="blocks", tokenizer_vocab_size=0)
  source, _ = sources.open_source("blocks_corpus", "train", str(tmp_path))
  got = sorted((source[i]["id"].decode(), source[i]["text"].decode()) for i in range(len(source)))
  assert got == [(f"{path}:1", "first block\nstill first"), (f"{path}:5", "second"),
                 (f"{path}:9", "third")]


def test_build_text_corpus_cli(tmp_path, capsys):
  lines, jsonl = _bad_files(tmp_path)
  data_dir = str(tmp_path / "d")
  assert build_text_corpus.main(["--name", "cli_stop", "--data_dir", data_dir,
                                 "--train", str(lines), "--vocab_size", "0"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and f"{lines} line 2: not_utf8" in err[0]
  assert build_text_corpus.main([
      "--name", "cli_skip", "--data_dir", data_dir, "--train", str(jsonl), str(lines),
      "--validation", str(jsonl), "--format", "jsonl", "--on_bad_row", "skip",
      "--vocab_size", "50"]) == 0
  out = capsys.readouterr().out.splitlines()
  summary = [line for line in out if "skipped bad rows" in line]
  assert len(summary) == 1
  # The lines file read as JSONL: 2 rows not JSON, 1 not UTF-8.
  assert ("train 8 (empty_document 1, missing_label 1, missing_text 1, not_an_object 1, "
          "not_json 3, not_utf8 1); validation 5 (" in summary[0]), summary
  assert any("tokenizer:" in line for line in out)
  # A split left without a single document is refused, in one line.
  assert build_text_corpus.main([
      "--name", "cli_empty", "--data_dir", data_dir, "--train", str(jsonl),
      "--validation", str(lines), "--format", "jsonl", "--on_bad_row", "skip",
      "--vocab_size", "0"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "validation" in err[0] and "no documents" in err[0], err
  assert build_text_corpus.main(["--name", "mrl_text_demo", "--data_dir", data_dir,
                                 "--train", str(lines)]) == 2


def test_bad_documents_in_a_prepared_dataset(small_corpus, monkeypatch):
  """A dataset not built here may hold empty or non-UTF-8 texts: stop names it, skip drops it."""
  data_dir, _ = small_corpus
  real = sources.open_source

  def fake_open(name, split, data_dir=None, **kwargs):
    source, info = real("small_text", split, data_dir, **kwargs)
    if name != "odd_text":
      return source, info
    examples = [source[i] for i in range(3)]
    examples[1] = dict(examples[1], text=b"   ")
    examples.append(dict(examples[0], text=b"caf\xe9"))
    return sources.InMemorySource(examples, "odd"), info

  monkeypatch.setattr(sources, "open_source", fake_open)
  _, info = real("small_text", "train", data_dir)
  tokenizer = str(text_corpus.corpus_tokenizer_dir(info.data_dir))
  cfg = small_cfg(data_dir, name="odd_text", tokenizer=tokenizer)
  with pytest.raises(pipeline.DataError, match="odd_text/train example 1: text is empty"):
    mlm_pipeline.text_dataset_info(cfg)
  cfg.on_bad_example = "skip"
  packed = mlm_pipeline.packed_split(cfg)
  assert packed.num_skipped == 2 and packed.num_documents == 2
  assert set(packed.document.tolist()) == {0, 2}
