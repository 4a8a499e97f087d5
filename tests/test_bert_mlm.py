"""The masked-LM task: loss, config, training, resume, compile_check, probe, inference."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from conftest import subprocess_env
from mrl_jax.errors import ConfigError
from mrl_jax.evaluation import similarity, text_probe
from mrl_jax.nesting import Nesting
from mrl_jax.tasks import mlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BERT_MLM = os.path.join(ROOT, "configs", "bert_mlm.py")


# ---------------------------------------------------------------- correlation (pure)
@pytest.mark.parametrize("seed", range(4))
def test_pearson_and_spearman_match_scipy(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=1225)
  y = 0.3 * x + rng.normal(size=1225)
  # Ties (ratings are averages of a few integer scores): Spearman's average ranks.
  ties = np.round(y * 2) / 2
  assert similarity.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
  assert similarity.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
  assert similarity.spearman(x, ties) == pytest.approx(scipy.stats.spearmanr(x, ties)[0],
                                                       abs=1e-12)
  np.testing.assert_allclose(similarity.average_ranks(ties), scipy.stats.rankdata(ties))


def test_similarity_correlation_reads_the_upper_triangle_of_prefix_cosines():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(50, 16))
  human = rng.uniform(size=(50, 50))
  human[np.tril_indices(50)] = 99.0  # Only the 1225 pairs above the diagonal may be read.
  out = similarity.similarity_correlation(z, human, [4, 16])
  for i, m in enumerate([4, 16]):
    unit = z[:, :m] / np.linalg.norm(z[:, :m], axis=1, keepdims=True)
    cos, ratings = [], []
    for a in range(50):
      for b in range(a + 1, 50):
        cos.append(unit[a] @ unit[b])
        ratings.append(human[a, b])
    assert len(cos) == 1225
    assert out["pearson"][i] == pytest.approx(scipy.stats.pearsonr(cos, ratings)[0], abs=1e-12)
    assert out["spearman"][i] == pytest.approx(scipy.stats.spearmanr(cos, ratings)[0], abs=1e-12)


def test_stratified_halves_split_every_class():
  labels = np.array([0] * 5 + [1] * 4 + [2] * 1)
  db, q = text_probe.stratified_halves(labels, seed=3)
  assert sorted(np.concatenate([db, q]).tolist()) == list(range(10))
  assert [int((labels[db] == c).sum()) for c in range(3)] == [3, 2, 1]
  assert [int((labels[q] == c).sum()) for c in range(3)] == [2, 2, 0]
  again = text_probe.stratified_halves(labels, seed=3)
  assert (again[0] == db).all() and (again[1] == q).all()


# ---------------------------------------------------------------- the loss (pure)
def numpy_nested_mlm_xent(logits, ids, weights, c):
  """float64 reference: per size, the weighted mean over predictions of -log softmax."""
  logits = np.asarray(logits, np.float64)
  per_size, accuracy = [], []
  for lg in logits:
    shifted = lg - lg.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, ids[..., None], -1)[..., 0]
    per_size.append((nll * weights).sum() / weights.sum())
    accuracy.append(((lg.argmax(-1) == ids) * weights).sum() / weights.sum())
  per_size = np.array(per_size)
  return float((np.asarray(c) * per_size).sum()), per_size, np.array(accuracy)


def tiny_mlm_config(**model):
  from configs import bert_mlm
  config = bert_mlm.get_config("runlocal")
  config.model.width, config.model.depth = 32, 1
  config.model.num_heads, config.model.mlp_dim = 2, 64
  config.nesting.dims = (4, 8, 16, 32)
  config.data.seq_len = 16
  config.data.max_predictions = 3
  for k, v in model.items():
    config.model[k] = v
  return config


def test_task_loss_is_the_weighted_sum_of_per_size_cross_entropies():
  config = tiny_mlm_config()
  task = mlm.MaskedLMTask()
  task.check_config(config)
  nesting = Nesting.create((4, 8, 16, 32), (2.0, 1.0, 0.5, 1.0))
  info = ml_collections.ConfigDict(dict(vocab_size=50))
  model = task.build_model(config, nesting, info, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(0, 50, (3, 16)).astype(np.int32),
           "token_type_ids": np.zeros((3, 16), np.int32),
           "attention_mask": np.ones((3, 16), np.int32),
           "masked_positions": rng.integers(0, 16, (3, 3)).astype(np.int32),
           "masked_ids": rng.integers(0, 50, (3, 3)).astype(np.int32),
           # Padding predictions (weight 0) must not count, in the mean or its denominator.
           "masked_weights": np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.float32)}
  graphdef, state = nnx.split(model)

  @jax.jit
  def loss_and_logits(state, batch):  # One compile instead of hundreds of eager ops.
    m = nnx.merge(graphdef, state)
    return (task.loss(config, m, batch, nesting, train=False),
            m(batch["input_ids"], masked_positions=batch["masked_positions"], train=False))

  (total, metrics), logits = loss_and_logits(state, batch)
  assert logits.shape == (4, 3, 3, 50)
  ref_total, ref_per_size, ref_acc = numpy_nested_mlm_xent(
      logits, batch["masked_ids"], batch["masked_weights"], nesting.weights)
  # float32 logsumexp over 50 logits of size ~1: relative error a few 1e-7.
  np.testing.assert_allclose(metrics["per_size_loss"], ref_per_size, rtol=1e-5)
  np.testing.assert_allclose(metrics["per_size_mlm_accuracy"], ref_acc, rtol=1e-6)
  assert float(total) == pytest.approx(ref_total, rel=1e-5)
  # The eval sums of the same batch with one padding row (mask 0) give the same
  # per-size means over the real rows.
  padded = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}
  padded["mask"] = np.array([1, 1, 1, 0], np.int32)
  sums = jax.jit(lambda state, b: task.eval_sums(config, nnx.merge(graphdef, state), b,
                                                 nesting))(state, padded)
  result = task.reduce_eval(jax.tree.map(np.asarray, sums))
  assert result["count"] == 6 and result["sequences"] == 3
  np.testing.assert_allclose(result["loss"], ref_per_size, rtol=1e-5)
  np.testing.assert_allclose(result["mlm_accuracy"], ref_acc, rtol=1e-6)


@pytest.mark.parametrize("overrides, match", [
    ({"data.seq_len": 600}, "position embeddings"),
    ({"data.max_predictions": 70}, "maskable"),
    ({"model.name": "vit"}, "config.model.name"),
    ({"model.pooling": "max"}, "config.model.pooling"),
    ({"head": "nested"}, "config.head"),
])
def test_bad_mlm_config_is_one_line(overrides, match):
  from configs import bert_mlm
  config = bert_mlm.get_config("runlocal")
  for key, value in overrides.items():
    section, field = key.split(".") if "." in key else (None, key)
    (config[section] if section else config)[field] = value
  with pytest.raises(ConfigError, match=match):
    mlm.MaskedLMTask().check_config(config)


# ---------------------------------------------------------------- training end to end
def mlm_config(text_demo_data_dir, **overrides):
  """configs/bert_mlm.py:runlocal, smaller still (32 wide, 1 layer, 32 tokens)."""
  config = tiny_mlm_config()
  config.data.data_dir = text_demo_data_dir
  config.data.seq_len = 32
  config.data.max_predictions = 5
  config.batch_size = 16
  config.eval_batch_size = 64
  config.total_steps = 40
  config.lr = 1e-2  # A 32-wide model takes it; the decoder bias learns token frequencies fast.
  config.schedule.warmup_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 20
  config.probe.batch_size = 48
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def trained(text_demo_data_dir, tmp_path_factory):
  """(workdir, config, summary) of a 40-step tiny MLM run."""
  from mrl_jax import train
  workdir = str(tmp_path_factory.mktemp("mlm_run"))
  config = mlm_config(text_demo_data_dir)
  summary = train.train_and_evaluate(config, workdir)
  return workdir, config, summary


@pytest.mark.slow
def test_training_writes_summary_tokenizer_and_learns(trained):
  workdir, config, summary = trained
  with open(os.path.join(workdir, "summary.json")) as f:
    on_disk = json.load(f)
  dims = list(config.nesting.dims)
  assert on_disk["dims"] == summary["dims"] == dims
  assert set(on_disk["mlm_accuracy"]) == set(on_disk["mlm_loss"]) == {str(m) for m in dims}
  assert on_disk["steps"] == 40 and on_disk["eval_predictions"] > 1000
  # Chance is 1 / 8000. After 40 steps the model predicts frequent tokens at
  # every size (seeds 0-2: 3.2-5.1% at every size), so 1% leaves a wide margin;
  # the summed loss fell to 0.81-0.86 of the first step's over those seeds.
  assert min(on_disk["mlm_accuracy"].values()) > 0.01, on_disk["mlm_accuracy"]
  losses = train_losses(workdir)
  assert losses[40] < 0.93 * losses[1]
  # The total is the sum (weights 1) of the per-size losses.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    row = json.loads(f.readline())
  assert row["train/loss"] == pytest.approx(sum(row[f"train/loss_d{m}"] for m in dims), rel=1e-5)
  assert all(f"train/mlm_accuracy_d{m}" in row for m in dims)
  # The workdir carries the tokenizer it was trained with.
  from mrl_jax.data import mlm_pipeline, tokenizer as tokenizer_lib
  saved = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer.json"))
  original = mlm_pipeline.load_data_tokenizer(mlm.pipeline_data_config(config))
  assert saved.vocab_size == original.vocab_size
  text = ["The economy grew faster than expected in the third quarter."]
  np.testing.assert_array_equal(saved.encode(text, 32)["input_ids"],
                                original.encode(text, 32)["input_ids"])


@pytest.mark.slow
def test_sigterm_then_rerun_resumes_on_the_same_batches_and_dropout(text_demo_data_dir, tmp_path,
                                                                    monkeypatch):
  """Resume is exact with dropout on: the data position and the dropout RNG state are saved."""
  import signal
  from mrl_jax import sharding, train
  config = mlm_config(text_demo_data_dir, total_steps=6, checkpoint_every_steps=100,
                      **{"model.dropout": 0.1, "model.attention_dropout": 0.1})
  uninterrupted = tmp_path / "uninterrupted"
  train.train_and_evaluate(config, str(uninterrupted))

  calls = {"n": 0}
  real_global_batch = sharding.global_batch

  def global_batch_then_sigterm(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_global_batch(batch, mesh)

  interrupted = tmp_path / "interrupted"
  monkeypatch.setattr(sharding, "global_batch", global_batch_then_sigterm)
  result = train.train_and_evaluate(config, str(interrupted))
  monkeypatch.setattr(sharding, "global_batch", real_global_batch)
  assert result["preempted"] and result["steps"] == 3
  summary = train.train_and_evaluate(config, str(interrupted))
  assert summary["steps"] == 6
  expected, resumed = train_losses(uninterrupted), train_losses(interrupted)
  assert sorted(resumed) == list(range(1, 7))
  for step in expected:  # CPU, same data and dropout masks: identical to the last bit.
    assert resumed[step] == expected[step], step
  with open(uninterrupted / "summary.json") as f:
    a = json.load(f)
  with open(interrupted / "summary.json") as f:
    b = json.load(f)
  assert a["mlm_accuracy"] == b["mlm_accuracy"]


def test_compile_check_on_8_devices_without_the_corpus(tmp_path):
  """The pod layout (fsdp x model) compiles from config fields alone."""
  workdir = tmp_path / "cc"
  result = subprocess.run(
      [sys.executable, "-m", "mrl_jax.main", f"--config={BERT_MLM}:runlocal",
       f"--workdir={workdir}", "--mode=compile_check", "--cpu_devices=8",
       f"--config.data.data_dir={tmp_path / 'absent'}", "--config.data.name=absent_corpus",
       "--config.data.vocab_size=1000", "--config.mesh.data=2", "--config.mesh.fsdp=2",
       "--config.mesh.model=2",
       # Dropout puts RNG keys (key<fry>, not a numpy dtype) into the state's memory count.
       "--config.model.dropout=0.1"],
      cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "compile_check.json") as f:
    report = json.load(f)
  assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "model": 2}
  assert report["dims"] == [8, 16, 32, 64, 128] and report["task"] == "mlm"
  # tiny BERT, 1000 tokens: embeddings (1000 + 512 + 2) x 128, 2 blocks, the MLM transform.
  width, mlp, blocks = 128, 512, 2
  block = 4 * (width * width + width) + 2 * width * mlp + mlp + width + 4 * width
  expected = ((1000 + 512 + 2) * width + 2 * width + blocks * block
              + (width * width + 3 * width) + 1000)
  assert report["parameters"] == expected


def test_compile_check_without_the_corpus_needs_the_vocab_size(tmp_path):
  config = mlm_config(str(tmp_path / "absent"), **{"data.name": "absent_corpus",
                                                   "data.vocab_size": None})
  with pytest.raises(ConfigError, match="config.data.vocab_size"):
    mlm.MaskedLMTask().data_info_from_config(config)


# ---------------------------------------------------------------- inference
@pytest.mark.slow
def test_inference_embeds_text_and_gives_mlm_logits(trained, text_demo_data_dir):
  from mrl_jax import inference
  from mrl_jax.data import mlm_pipeline
  workdir, config, _ = trained
  model = inference.load(workdir)
  assert model.dims == (4, 8, 16, 32) and model.step == 40
  assert model.vocab_size == model.tokenizer.vocab_size
  texts = ["The space shuttle landed safely.", "God and religion were debated.",
           "Stocks fell sharply on Monday.", "A short one."]
  z = model.embed_text(texts, dim=8)
  assert z.shape == (4, 8)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-6)
  full = model.embed_text(texts, normalize=False)
  assert full.shape == (4, 32)
  # z[:, :m] renormalised is the served prefix.
  np.testing.assert_allclose(z, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  # Text and its token ids give the same vectors; the batch size does not matter.
  ids = model.tokenizer.encode(texts, config.data.seq_len)
  model.batch_size = 3
  by_ids = model.embed_text(ids["input_ids"], normalize=False)
  np.testing.assert_allclose(by_ids, full, rtol=1e-5, atol=1e-5)
  cls = model.embed_text(texts, pooling="cls", normalize=False)
  assert not np.allclose(cls, full)

  # mlm_logits at the masked positions give the eval sums' loss and accuracy.
  batch = next(iter(mlm_pipeline.make_mlm_eval_batches(
      mlm.pipeline_data_config(config), global_batch_size=8)))
  logits = model.mlm_logits(batch["input_ids"], attention_mask=batch["attention_mask"])
  assert logits.shape == (4, 8, 32, model.vocab_size) and logits.dtype == np.float32
  rows = np.arange(8)[:, None]
  picked = logits[:, rows, batch["masked_positions"]]            # [n, B, P, V]
  weights = batch["masked_weights"] * batch["mask"][:, None]
  _, ref_loss, ref_acc = numpy_nested_mlm_xent(picked, batch["masked_ids"], weights,
                                               [1.0] * 4)
  sums = model.mlm_sums(batch)
  count = float(sums["count"])
  np.testing.assert_allclose(np.asarray(sums["loss_sum"]) / count, ref_loss, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(sums["correct"]) / count, ref_acc, atol=1e-6)
  # Other prefix sizes (the truncated-FF rows): the model's own sizes give its own sums,
  # and a size scored alone equals the same size scored beside others.
  own = model.mlm_sums(batch, dims=(4, 8, 16, 32))
  for k in ("loss_sum", "correct"):
    np.testing.assert_allclose(own[k], sums[k], rtol=1e-6, atol=1e-6)
  alone, beside = model.mlm_sums(batch, dims=(3,)), model.mlm_sums(batch, dims=(3, 32))
  np.testing.assert_allclose(alone["loss_sum"][0], beside["loss_sum"][0], rtol=1e-5)
  np.testing.assert_allclose(beside["loss_sum"][1], sums["loss_sum"][3], rtol=1e-5)


def test_a_tokenizer_that_does_not_fit_the_checkpoint_is_one_line(tmp_path):
  from mrl_jax.data import tokenizer as tokenizer_lib
  small = tokenizer_lib.train_wordpiece(["a few words of text", "and some more words"] * 5, 60)
  small.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(mlm.TokenizerMismatchError, match=r"tokens but the checkpoint") as e:
    mlm.check_workdir_tokenizer(str(tmp_path), 8000)
  assert "\n" not in str(e.value)
  with pytest.raises(mlm.TokenizerMismatchError, match="does not exist"):
    mlm.check_workdir_tokenizer(str(tmp_path / "nothing"), 8000)


# ---------------------------------------------------------------- probe
@pytest.mark.slow
def test_probe_end_to_end_with_an_ff_baseline(trained, tmp_path):
  from mrl_jax import inference, train
  from mrl_jax.data import text_demo
  from mrl_jax.evaluation import probe
  workdir, config, train_summary = trained
  baseline = str(tmp_path / "ff16")
  train.train_and_evaluate(mlm_config(config.data.data_dir, head="ff", ff_dim=16,
                                      total_steps=4, checkpoint_every_steps=0), baseline)
  probe_config = mlm_config(config.data.data_dir, **{"probe.baseline_workdir": baseline})
  summary = probe.run_probe(workdir, probe_config, log=lambda *_: None)
  dims = [4, 8, 16, 32]
  assert summary["dims"] == dims and summary["task"] == "mlm"
  # The probe's MLM accuracy is training's final evaluation (same split, masks, tokenizer).
  np.testing.assert_allclose(summary["mlm_accuracy"],
                             [train_summary["mlm_accuracy"][str(m)] for m in dims], atol=1e-6)
  data = summary["retrieval_data"]
  assert data["database"] == 100 and data["queries"] == 100
  for key in ("knn1_top1", "map@10", "precision@10", "recall@10", "lee_pearson", "lee_spearman"):
    assert len(summary[key]) == 4 and all(v is not None for v in summary[key]), key
    assert len(summary["baseline_" + key]) == 4, key
  assert all(0.0 <= v <= 1.0 for v in summary["knn1_top1"] + summary["map@10"])
  assert summary["lee_pairs"] == 1225
  # The FF-16 baseline scores only its own size.
  assert summary["baseline"]["dims"] == [16]
  assert [v is not None for v in summary["baseline_mlm_accuracy"]] == [False, False, True, False]
  # ... and its decoder cut to the probe's sizes up to its own width (16) gives the rest;
  # at 16 that is its own accuracy.
  cut = summary["baseline_mlm_accuracy_truncated"]
  assert [v is not None for v in cut] == [True, True, True, False]
  assert cut[2] == pytest.approx(summary["baseline_mlm_accuracy"][2], abs=1e-6)
  # The Lee rows recomputed with scipy from the model's embeddings (the probe's
  # batch size: the same computation; a barely trained model's cosines are all
  # close to 1, so their ranks hang on the last bits of float32).
  docs, human = text_demo.lee_similarity()
  model = inference.load(workdir)
  model.batch_size = probe_config.probe.batch_size
  full = model.embed_text(docs, normalize=False).astype(np.float64)
  rows, cols = np.triu_indices(50, k=1)
  for i, m in enumerate(dims):
    z = full[:, :m] / np.linalg.norm(full[:, :m], axis=1, keepdims=True)
    cos = (z @ z.T)[rows, cols]
    assert summary["lee_spearman"][i] == pytest.approx(
        scipy.stats.spearmanr(cos, human[rows, cols])[0], abs=1e-9)
    assert summary["lee_pearson"][i] == pytest.approx(
        scipy.stats.pearsonr(cos, human[rows, cols])[0], abs=1e-9)
  out = os.path.join(workdir, "probe")
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f)["dims"] == dims
  for name in ("report.md", "mlm_accuracy.png", "retrieval.png", "lee_correlation.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, "report.md")) as f:
    report = f.read()
  assert "baseline (ff head" in report and "| 16 |" in report


@pytest.mark.slow
def test_second_phase_starts_from_the_first_runs_weights(trained, tmp_path):
  """BERT's 512-token phase as configs/bert_mlm.py describes it: another seq_len, init_from."""
  from mrl_jax import train
  workdir, config, _ = trained
  second = mlm_config(config.data.data_dir, total_steps=1, checkpoint_every_steps=0,
                      **{"data.seq_len": 48, "data.max_predictions": 7,
                         "init_from.workdir": workdir})
  train.train_and_evaluate(second, str(tmp_path / "phase2"))
  scratch = mlm_config(config.data.data_dir, total_steps=1, checkpoint_every_steps=0,
                       **{"data.seq_len": 48, "data.max_predictions": 7})
  train.train_and_evaluate(scratch, str(tmp_path / "scratch"))
  # From scratch the first loss is 4 x log(8000) ~ 36; the first run ended near 30.
  first_losses = train_losses(workdir)
  assert train_losses(tmp_path / "phase2")[1] < 0.5 * (first_losses[1] + first_losses[40])
  assert train_losses(tmp_path / "scratch")[1] > 0.99 * first_losses[1]


def test_a_vocab_size_other_than_the_tokenizers_is_one_line(text_demo_data_dir):
  config = mlm_config(text_demo_data_dir, **{"data.vocab_size": 30522})
  with pytest.raises(ConfigError, match=r"vocab_size=30522 but the tokenizer .* has \d+ tokens"):
    mlm.MaskedLMTask().data_info(config)
