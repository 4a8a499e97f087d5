"""The on-disk probe's parts against in-memory references: split shards, the streamed k-NN,
the streamed SVD statistics, the shard-backed retrieval store and the mini-batch linear probe.
(The whole probe both ways on the digits run: tests/test_probe.py.)"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax.evaluation import knn, streamed_probe
from mrl_jax.evaluation.embedding_shards import (EmbeddingShardError, ShardWriter,
                                                 SplitEmbeddings)
from mrl_jax.evaluation.linear_probe import linear_probe_top1
from mrl_jax.evaluation.minibatch_linear_probe import MinibatchSoftmaxProbe
from mrl_jax.retrieval import plans
from mrl_jax.retrieval.index import Index
from mrl_jax.retrieval.prefix_store import PrefixStore
from mrl_jax.retrieval.shard_store import ShardPrefixStore


def write_like_processes(directory, z, labels, processes, local_batch):
  """Shards as `processes` processes write them: process p gets local batch j*P + p."""
  for p in range(processes):
    writer = ShardWriter(str(directory), p, processes)
    for j in range(len(z) // local_batch + 1):
      rows = np.arange((j * processes + p) * local_batch, (j * processes + p + 1) * local_batch)
      rows = rows[rows < len(z)]
      if len(rows):
        writer.append(z[rows], labels[rows], rows)
    writer.close()
  return SplitEmbeddings(str(directory))


@pytest.fixture(scope="module")
def database():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(1000, 48)).astype(np.float32) + 0.5
  return z, rng.integers(0, 7, len(z))


@pytest.mark.parametrize("processes", [1, 3])
def test_shards_read_back_in_split_order(tmp_path, database, processes):
  z, y = database
  split = write_like_processes(tmp_path, z, y, processes, 64)
  assert split.shape == z.shape and np.array_equal(split.labels, y)
  assert np.array_equal(split.read(0, len(z)), z)
  assert np.array_equal(split[70:333], z[70:333])
  ids = np.random.default_rng(1).integers(0, len(z), 500)
  assert np.array_equal(split.take(ids), z[ids]) and np.array_equal(split[ids, :5], z[ids, :5])
  assert np.array_equal(np.concatenate([b for _, b in split.blocks(300)]), z)
  shard = np.load(tmp_path / "shard-00000.npy", mmap_mode="r")  # a plain .npy
  assert shard.shape[1] == 48 and np.array_equal(shard[:64], z[:64])
  split.close()


def test_a_missing_shard_names_the_fix(tmp_path, database):
  z, y = database
  write_like_processes(tmp_path, z, y, 2, 64).close()
  os.remove(tmp_path / "shard-00001.json")   # Process 1 did not finish.
  with pytest.raises(EmbeddingShardError, match=r"lacks shard\(s\) \[1\] of 2.*run the probe"):
    SplitEmbeddings(str(tmp_path))
  with pytest.raises(EmbeddingShardError, match="No complete embedding shard"):
    SplitEmbeddings(str(tmp_path / "absent"))


@pytest.mark.parametrize("dim", [8, 48])
def test_streaming_knn_over_blocks_equals_knn_search(database, dim):
  z, _ = database
  db = np.asarray(knn.l2_normalize(jnp.asarray(z[:, :dim])))
  queries = np.asarray(knn.l2_normalize(jnp.asarray(z[:200, :dim] + 0.1)))
  dist, idx = knn.knn_search(queries, db, 30)
  centre = np.asarray(jnp.mean(jnp.asarray(db), axis=0))
  one = knn.StreamingKnn(queries, 30, centre=centre)
  one.add(db)
  got = one.result()
  assert np.array_equal(got[1], idx) and np.array_equal(got[0], dist)  # One block: bitwise.
  blocks = knn.StreamingKnn(queries, 30, centre=centre)
  for start in range(0, len(db), 170):            # Blocks smaller than k's worth of ties.
    blocks.add(db[start:start + 170])
  got = blocks.result()
  assert np.array_equal(got[1], idx)
  # Distances: the same per pair, only the float32 sum with the query's norm may round.
  np.testing.assert_allclose(got[0], dist, rtol=0, atol=4 * np.finfo(np.float32).eps * 4)


def test_streaming_knn_breaks_ties_towards_the_smaller_id_across_blocks():
  db = np.tile(np.eye(4, dtype=np.float32), (6, 1))   # Every row repeated 6 times.
  search = knn.StreamingKnn(db[:4], 5)
  for start in range(0, len(db), 5):
    search.add(db[start:start + 5])
  assert np.array_equal(search.result()[1], knn.knn_search(db[:4], db, 5)[1])


def test_column_statistics_give_the_svd_of_the_centred_matrix(database, tmp_path):
  z, y = database
  z = z * np.linspace(0.2, 3.0, z.shape[1]).astype(np.float32)   # Distinct variances.
  split = write_like_processes(tmp_path, z, y, 1, 256)
  stats = streamed_probe.column_statistics(split, 300)
  x = z.astype(np.float64)
  np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(stats["std"], x.std(0), rtol=1e-9)
  _, singular, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
  np.testing.assert_allclose(stats["eigenvalues"], singular ** 2 / len(x), rtol=1e-9)
  # Directions up to sign (the eigenvalues are well apart here).
  np.testing.assert_allclose(np.abs(np.sum(stats["basis"] * vt.T, axis=0)), 1.0, atol=1e-9)
  split.close()


def test_shard_store_index_gives_the_in_memory_index_results(database, tmp_path):
  z, y = database
  split = write_like_processes(tmp_path, z, y, 2, 64)
  queries = z[:50] + 0.05
  memory = Index.build(z, stores={8: "float32", 16: "float32", 48: "float32"})
  disk = Index(48, {d: ShardPrefixStore(split, d) for d in (8, 16, 48)})
  disk.faiss_refine = False
  for d in (8, 48):
    assert np.array_equal(disk.store(d).decoded(), memory.store(d).decoded())
  for plan in (plans.Exact(), plans.Adaptive(8, 100, 48),
               plans.Funnel((8, 16, 48), (200, 50, 10))):
    got, want = disk.search(queries, 10, plan), memory.search(queries, 10, plan)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), plan
  split.close()


def test_shard_store_reranks_in_chunks_like_the_in_memory_store(database, tmp_path, monkeypatch):
  from mrl_jax.retrieval import shard_store
  monkeypatch.setattr(shard_store, "_GATHER_ROWS", 300)   # Several chunks of queries.
  z, y = database
  split = write_like_processes(tmp_path, z, y, 1, 64)
  rng = np.random.default_rng(2)
  candidates = rng.integers(-1, len(z), (40, 120))
  queries = rng.normal(size=(40, 48)).astype(np.float32)
  got = ShardPrefixStore(split, 32).rerank(queries, candidates, 15)
  want = PrefixStore.build(z, 32).rerank(queries, candidates, 15)
  assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
  split.close()


def test_minibatch_probe_reaches_the_lbfgs_probe_accuracy():
  """Same objective, another optimiser: top-1 within the module doc's tolerance (0.05)."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(5, 12)) * 0.8
  y, yt = rng.integers(0, 5, 2000), rng.integers(0, 5, 500)
  x = (centres[y] + rng.normal(size=(2000, 12))).astype(np.float32) * 3 + 1
  xt = (centres[yt] + rng.normal(size=(500, 12))).astype(np.float32) * 3 + 1
  reference = linear_probe_top1(x, y, xt, yt, 5, l2=1e-4, steps=100)
  epochs, block, batch = 10, 700, 128
  steps = epochs * sum(MinibatchSoftmaxProbe.steps_per_block(min(block, 2000 - s), batch)
                       for s in range(0, 2000, block))
  probe = MinibatchSoftmaxProbe(12, 5, x.mean(0), x.std(0) + 1e-6, l2=1e-4, total_steps=steps,
                                batch_size=batch, seed=0)
  for _ in range(epochs):
    for start in range(0, 2000, block):
      probe.train_block(x[start:start + block], y[start:start + block])
  assert reference > 0.6  # A problem with something to learn.
  assert abs(probe.top1(xt, yt) - reference) <= 0.05


def test_a_shard_with_empty_appends_and_no_rows_reads_back(tmp_path):
  z = np.arange(12, dtype=np.float32).reshape(4, 3)
  writer = ShardWriter(str(tmp_path), 0, 2)
  writer.append(z[:0], np.zeros(0, int), np.zeros(0, int))   # A batch of padding only.
  writer.append(z, np.arange(4), np.arange(4))
  writer.close()
  ShardWriter(str(tmp_path), 1, 2).close()                   # A process that kept no row.
  split = SplitEmbeddings(str(tmp_path))
  assert split.shape == (4, 3) and np.array_equal(split.read(0, 4), z)
  split.close()


def test_shards_go_under_the_workdir_or_a_local_temp_dir_for_a_bucket(tmp_path, monkeypatch):
  import jax
  from mrl_jax.errors import ConfigError
  from mrl_jax.evaluation import probe
  settings = {"embeddings_dir": None}
  assert probe._shards_root(str(tmp_path), settings) == (
      os.path.join(str(tmp_path), "probe", "embeddings"), False)
  root, temporary = probe._shards_root("gs://bucket/run", settings)
  assert temporary and os.path.isdir(root) and "://" not in root
  os.rmdir(root)
  assert probe._shards_root("gs://bucket/run", {"embeddings_dir": "/nfs/x"}) == ("/nfs/x", False)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match="set --config.probe.embeddings_dir"):
    probe._shards_root("gs://bucket/run", settings)
