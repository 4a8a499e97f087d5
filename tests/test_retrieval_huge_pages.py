"""Huge-page backing of the index's search buffers: contents and results unchanged, the
kernel's answer checked in /proc, and the graph's and store's own buffers are the ones
advised."""

import numpy as np
import pytest

from mrl_jax.retrieval import ann as ann_module
from mrl_jax.retrieval import huge_pages
from mrl_jax.retrieval import prefix_store as store_module
from mrl_jax.retrieval.ann import AnnShortlist, AnnSpec
from mrl_jax.retrieval.index import Index

faiss = pytest.importorskip("faiss")


def _anon_huge_kb(address: int) -> int:
  """AnonHugePages (kB) of the mapping that holds `address`, from /proc/self/smaps."""
  inside = False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()[0]
      if "-" in head and not head.endswith(":"):
        lo, hi = (int(v, 16) for v in head.split("-"))
        inside = lo <= address < hi
      elif inside and head == "AnonHugePages:":
        return int(line.split()[1])
  return 0


def test_a_large_buffer_keeps_its_contents_and_the_kernel_answer_shows_in_smaps():
  rng = np.random.default_rng(0)
  buffer = rng.integers(0, 255, size=48 << 20, dtype=np.uint8)
  expected = buffer.copy()
  collapsed = huge_pages.back_with_huge_pages(buffer)
  np.testing.assert_array_equal(buffer, expected)
  assert collapsed % (2 << 20) == 0 and 0 <= collapsed <= buffer.nbytes
  if collapsed:  # The kernel said yes: the pages under the buffer are huge now.
    start = buffer.__array_interface__["data"][0]
    assert _anon_huge_kb(start + buffer.nbytes // 2) * 1024 >= collapsed
  # Small buffers, and the switch off, are left alone.
  assert huge_pages.back_with_huge_pages(np.zeros(1 << 20, np.uint8)) == 0
  huge_pages.enabled = False
  try:
    assert huge_pages.back_with_huge_pages(buffer) == 0
  finally:
    huge_pages.enabled = True


def _recorder(monkeypatch, module):
  seen = []

  def record(buffer):
    seen.append((buffer.__array_interface__["data"][0], buffer.nbytes))
    return 0
  monkeypatch.setattr(module, "back_with_huge_pages", record)
  return seen


def _address(vector) -> int:
  return faiss.rev_swig_ptr(vector.data(), vector.size()).__array_interface__["data"][0]


@pytest.mark.parametrize("codes", ["float32", "int8"])
def test_an_hnsw_graph_advises_its_own_links_and_codes_after_build_add_and_load(
    monkeypatch, tmp_path, codes):
  seen = _recorder(monkeypatch, ann_module)
  x = np.random.default_rng(1).standard_normal((600, 24)).astype(np.float32)
  graph = AnnShortlist.build(x[:400], AnnSpec("hnsw", 16, codes=codes, hnsw_neighbours=8))

  def expected(index):
    storage = faiss.downcast_index(index.storage)
    return [(_address(index.hnsw.neighbors), 4 * index.hnsw.neighbors.size()),
            (_address(storage.codes), storage.codes.size())]
  assert seen == expected(graph.index)
  seen.clear()
  graph.add(x[400:])
  assert seen == expected(graph.index)
  graph.save(tmp_path / "g")
  seen.clear()
  loaded = AnnShortlist.load(tmp_path / "g")
  assert seen == expected(loaded.index)
  seen.clear()
  AnnShortlist.build(x, AnnSpec("ivf", 16, ivf_lists=4))
  assert seen == []  # IVF lists are scanned in order: left as they are.


def test_the_faiss_rerank_store_advises_its_codes_and_results_do_not_change(monkeypatch):
  x = np.random.default_rng(2).standard_normal((40000, 128)).astype(np.float32)
  q = np.random.default_rng(3).standard_normal((20, 128)).astype(np.float32)
  plan = "adaptive:16:30:128@g:ef=40"
  seen = _recorder(monkeypatch, store_module)
  index = Index.build(x, stores={16: "float32", 128: "int8"},
                      ann={"g": AnnSpec("hnsw", 16, hnsw_neighbours=8)})
  before = index.search(q, 10, plan)
  codes = index.store(128)._faiss_index.codes  # The chain handed faiss the store's codes.
  assert (_address(codes), codes.size()) in seen
  monkeypatch.undo()
  # Now for real, on buffers this small too (5 MB of codes): the same ids and distances.
  monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
  huge_pages.back_with_huge_pages(faiss.rev_swig_ptr(codes.data(), codes.size()))
  index.shortlist("g").back_with_huge_pages()
  after = index.search(q, 10, plan)
  np.testing.assert_array_equal(before[0], after[0])
  np.testing.assert_array_equal(before[1], after[1])
