"""`mrl_text_demo`: real English text that ships inside gensim's wheel, as a TFDS corpus.

Nothing is downloaded: the documents are read from `gensim/test/test_data/`
(found with `importlib.util.find_spec("gensim")`; gensim itself is never
imported, so its compiled parts and their import time do not matter):

  * `lee_background.cor`: 300 Australian news articles (the Lee corpus'
    background set), one per line.
  * `enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`:
    206 Wikipedia pages (a shortened 2016 dump); the 103 that are articles,
    not redirects, and keep some prose are kept, their wiki markup stripped roughly
    (`strip_wiki_markup`: templates, tables, references, files, categories,
    headings, lists and HTML go; link texts stay), one document per page.

About 2.9 MB of text in 403 documents. Python's `pydoc_data` prose was left
out: it changes with every Python release, so the corpus would too.

Splits: a fixed 5 % of the documents (`VALIDATION_FRACTION`, chosen by a
permutation from `np.random.default_rng(SEED)` over the documents in the
order above) is "validation", the rest "train". Features: text (Text), id
(Text: `lee_background.cor:<line>` or `enwiki:<page title>`), source
(ClassLabel "lee_background" / "enwiki").

The build also trains the corpus's own WordPiece tokenizer (`VOCAB_SIZE`
tokens, uncased) on the train split and stores it beside the dataset
(`<data_dir>/mrl_text_demo/<version>/tokenizer/`), which the MLM pipeline uses
when `config.data.tokenizer` is None. `sources.open_source("mrl_text_demo",
...)` builds it on first use (6.4-7.4 s of CPU on a 2-core machine at load
average 2, about 4 s of it training the tokenizer: 1.6 s counting the 0.44M
words, 2.7 s learning the 8,000 tokens). The tokenizer is the same on every
machine (`tokenizer.train_wordpiece` is deterministic).

Two small labelled sets for evaluation, read from the same folder (not part
of the TFDS dataset; their documents are not in it):

  * `lee_similarity()`: the Lee corpus' 50 documents (`lee.cor`) and the
    50x50 matrix of mean human similarity ratings (`similarities0-1.txt`).
  * `labelled_texts()`: 200 newsgroup posts of two topics (see its doc).
"""

from __future__ import annotations

import bz2
import copyreg
import functools
import html
import importlib.util
import io
import os
import pickle
import re
import xml.etree.ElementTree as ElementTree
import zlib
from typing import Any, Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mrl_jax.data import text_corpus
from mrl_jax.errors import UserError

NAME = "mrl_text_demo"
# 1.0.1: the tokenizer is trained deterministically (tokenizer.train_wordpiece); a
# 1.0.0 build keeps the one Hugging Face's trainer gave in that process.
VERSION = "1.0.1"
SEED = 0
VALIDATION_FRACTION = 0.05
VOCAB_SIZE = 8000
SOURCES = ("lee_background", "enwiki")
LEE_BACKGROUND_FILE = "lee_background.cor"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee.cor"
LEE_SIMILARITY_FILE = "similarities0-1.txt"
NEWSGROUP_FILE = "mini_newsgroup"
# lee.cor and the polarity sentences are Windows-1252 (a pound sign, dashes);
# lee_background.cor is ASCII.
_LEE_ENCODING = "cp1252"


class MissingGensimError(UserError, ImportError):
  """gensim, whose wheel ships the demo text, is not installed."""


def test_data_dir() -> str:
  """The folder of gensim's test data (the package is located, not imported)."""
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise MissingGensimError(
        f"Dataset {NAME!r} is made from text inside gensim's wheel, which is not installed: "
        f"run `pip install gensim`.")
  folder = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data")
  if not os.path.isfile(os.path.join(folder, LEE_BACKGROUND_FILE)):
    raise MissingGensimError(f"gensim is installed but its test data is not in {folder} "
                             f"(a stripped install?): reinstall it with `pip install "
                             f"--force-reinstall gensim`.")
  return folder


def _read(name: str) -> bytes:
  with open(os.path.join(test_data_dir(), name), "rb") as f:
    return f.read()


# ------------------------------------------------------------------ Wikipedia
_COMMENT_RE = re.compile(r"<!--.*?-->", re.S)
_REF_RE = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TAG_BLOCK_RE = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|pre|table)"
                           r"\b[^>]*>.*?</\1>", re.S | re.I)
_TAG_RE = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK_RE = re.compile(r"\[\[(?:File|Image|Category|Media):", re.I)
_LINK_RE = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_EXTERNAL_RE = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_BARE_URL_RE = re.compile(r"https?://\S+")
_QUOTES_RE = re.compile(r"'{2,}")
_SPACE_RE = re.compile(r"[ \t]+")
_MIN_PARAGRAPH_CHARS = 40


def _drop_nested(text: str, open_: str, close: str) -> str:
  """`text` without the (possibly nested) spans open_ ... close."""
  out, depth, i = [], 0, 0
  while i < len(text):
    if text.startswith(open_, i):
      depth += 1
      i += len(open_)
    elif depth and text.startswith(close, i):
      depth -= 1
      i += len(close)
    else:
      if not depth:
        out.append(text[i])
      i += 1
  return "".join(out)


def _drop_file_links(text: str) -> str:
  """Removes [[File:...]], [[Image:...]], [[Category:...]] links with nested links inside."""
  while True:
    match = _FILE_LINK_RE.search(text)
    if not match:
      return text
    depth, i = 0, match.start()
    while i < len(text):
      if text.startswith("[[", i):
        depth, i = depth + 1, i + 2
      elif text.startswith("]]", i):
        depth, i = depth - 1, i + 2
        if depth == 0:
          break
      else:
        i += 1
    text = text[:match.start()] + text[i:]


def strip_wiki_markup(text: str) -> str:
  """Rough prose of a page's wikitext: paragraphs of running text, "\\n"-separated.

  Templates {{...}}, tables {|...|}, comments, references, HTML, files and
  categories are dropped; links become their text; headings, lists, indented
  lines and paragraphs under 40 characters are dropped.
  """
  text = html.unescape(_COMMENT_RE.sub("", text))
  text = _REF_RE.sub("", text)
  text = _TAG_BLOCK_RE.sub("", text)
  text = _drop_nested(text, "{{", "}}")
  text = _drop_nested(text, "{|", "|}")
  text = _drop_file_links(text)
  text = _LINK_RE.sub(lambda m: m.group(1), text)
  text = _LINK_RE.sub(lambda m: m.group(1), text)  # Links inside link texts.
  text = _EXTERNAL_RE.sub(lambda m: m.group(1), text)
  text = _BARE_URL_RE.sub("", text)
  text = _TAG_RE.sub("", text)
  text = _QUOTES_RE.sub("", text)
  paragraphs = []
  for line in text.split("\n"):
    line = _SPACE_RE.sub(" ", line).strip()
    if (len(line) < _MIN_PARAGRAPH_CHARS or line[0] in "=*#:;|!{}[" or
        line.startswith("__")):
      continue
    paragraphs.append(line)
  return "\n".join(paragraphs)


def wikipedia_pages() -> list[tuple[str, str]]:
  """(title, prose) of the dump's articles (namespace 0, no redirects), in file order."""
  data = bz2.decompress(_read(WIKI_FILE))
  pages = []
  for _, element in ElementTree.iterparse(io.BytesIO(data)):
    if not element.tag.endswith("}page"):
      continue
    ns = element.find("{*}ns")
    redirect = element.find("{*}redirect")
    title = element.findtext("{*}title") or ""
    wikitext = element.findtext("{*}revision/{*}text") or ""
    element.clear()
    if ns is None or ns.text != "0" or redirect is not None or "#REDIRECT" in wikitext[:20].upper():
      continue
    prose = strip_wiki_markup(wikitext)
    if prose:
      pages.append((title, prose))
  return pages


# ------------------------------------------------------------------ the corpus
def lee_background_documents() -> list[str]:
  """The 300 news articles of `lee_background.cor`, in file order."""
  lines = _read(LEE_BACKGROUND_FILE).decode(_LEE_ENCODING).splitlines()
  return [line.strip() for line in lines if line.strip()]


@functools.lru_cache(maxsize=1)
def documents() -> tuple[tuple[str, str, str], ...]:
  """Every document of the corpus: (id, source, text), Lee's articles first, then Wikipedia's."""
  docs = [(f"{LEE_BACKGROUND_FILE}:{i + 1}", "lee_background", text)
          for i, text in enumerate(lee_background_documents())]
  docs += [(f"enwiki:{title}", "enwiki", text) for title, text in wikipedia_pages()]
  return tuple(docs)


def split_of_documents(num_documents: int, seed: int = SEED,
                       fraction: float = VALIDATION_FRACTION) -> dict[str, np.ndarray]:
  """Sorted document indices per split: the first round(fraction * N) of a seeded permutation
  are validation."""
  rng = np.random.default_rng(seed)
  held_out = np.sort(rng.permutation(num_documents)[:int(round(fraction * num_documents))])
  return {"train": np.setdiff1d(np.arange(num_documents), held_out), "validation": held_out}


class MrlTextDemo(text_corpus.TextCorpus, skip_registration=True):
  """The embedded demo text corpus (see module doc); reads gensim's files only when built."""

  def __init__(self, *, data_dir: epath.PathLike | None = None, **kwargs: Any):
    super().__init__(
        name=NAME, files={}, text_format="lines", on_bad_row="stop", version=VERSION,
        tokenizer_vocab_size=VOCAB_SIZE, data_dir=data_dir,
        description=(f"English text from gensim's test data: the Lee corpus' 300 background "
                     f"news articles and the articles of a shortened 2016 Wikipedia dump "
                     f"(markup stripped); {VALIDATION_FRACTION:.0%} of the documents (seed "
                     f"{SEED}) held out as validation. Embedded demo corpus of mrl_jax, with "
                     f"its own {VOCAB_SIZE}-token uncased WordPiece tokenizer."),
        **kwargs)

  def _label_names(self) -> list[str] | None:
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self._description,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "id": tfds.features.Text(),
            "source": tfds.features.ClassLabel(names=SOURCES),
        }),
        homepage="https://github.com/piskvorky/gensim/tree/develop/gensim/test/test_data")

  def _split_generators(self, dl_manager):
    del dl_manager  # The text ships inside gensim.
    docs = documents()
    self.report = {}
    self._train_texts = []
    return {split: self._demo_examples(split, rows)
            for split, rows in split_of_documents(len(docs)).items()}

  def _demo_examples(self, split: str, rows: np.ndarray) -> Iterator[tuple[str, dict[str, Any]]]:
    docs = documents()
    for i in rows:
      key, source, text = docs[int(i)]
      if split == "train":
        self._train_texts.append(text)
      yield key, {"text": text, "id": key, "source": source}


# ------------------------------------------------------------------ evaluation sets
def lee_similarity() -> tuple[list[str], np.ndarray]:
  """The Lee corpus' 50 documents and their human similarity matrix (float64 [50, 50]).

  `similarities0-1.txt` holds the upper triangle (row i, columns j >= i; 1 on
  the diagonal, 0 below it) of the mean of human pairwise ratings scaled to
  0..1 (Lee, Pincombe & Welsh 2005); the matrix returned is that triangle
  mirrored, so it is symmetric with a unit diagonal. Document i is line i of
  `lee.cor`.
  """
  docs = [line.strip() for line in _read(LEE_FILE).decode(_LEE_ENCODING).splitlines()
          if line.strip()]
  rows = [line.split() for line in _read(LEE_SIMILARITY_FILE).decode("ascii").splitlines()
          if line.strip()]
  upper = np.array(rows, np.float64)
  if upper.shape != (len(docs), len(docs)):
    raise ValueError(f"{LEE_SIMILARITY_FILE} is {upper.shape}, expected "
                     f"{(len(docs), len(docs))} for the {len(docs)} documents of {LEE_FILE}.")
  upper = np.triu(upper)
  return docs, upper + np.triu(upper, 1).T


class _Bunch(dict):
  """Stands in for the scikit-learn Bunch the newsgroup pickle was written with."""


def _newsgroup_unpickler(data: bytes) -> pickle.Unpickler:
  """An unpickler that builds only dicts, lists, strings and numpy arrays (nothing runs)."""
  from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
  allowed = {("copy_reg", "_reconstructor"): copyreg._reconstructor,  # pylint: disable=protected-access
             ("__builtin__", "object"): object, ("__builtin__", "dict"): dict,
             ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,  # pylint: disable=protected-access
             ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("sklearn.datasets.base", "Bunch"): _Bunch}

  class Restricted(pickle.Unpickler):

    def find_class(self, module: str, name: str):
      if (module, name) not in allowed:
        raise pickle.UnpicklingError(f"{NEWSGROUP_FILE}: refusing to load {module}.{name}.")
      return allowed[(module, name)]

  return Restricted(io.BytesIO(data), encoding="latin1")


_QUOTE_INTRO_RE = re.compile(r"(writes|wrote|says|said)\s*:\s*$|^in article <", re.I)
_QUOTED_RE = re.compile(r"^\S{0,4}>")  # "> text", "MB> text".
# Header lines repeated inside a body (forwarded posts) name the newsgroup too.
_HEADER_LINE_RE = re.compile(
    r"^(newsgroups|from|to|subject|message-id|organi[sz]ation|date|path|references|lines|"
    r"reply-to|distribution|nntp-posting-host|keywords|summary|sender|followup-to|"
    r"in-reply-to|originator|expires|approved|article-i\.d\.|x-[\w-]+)\s*:", re.I)


def strip_newsgroup_post(post: str) -> str:
  """The body a person wrote: no header block or header lines (they name the
  newsgroup), no quoted lines ("> ...", "MB> ...", "... writes:"), no signature
  (after a "--" line)."""
  _, _, body = post.partition("\n\n")
  lines = []
  for line in body.splitlines():
    if line.strip() in ("--", "-- "):
      break
    stripped = line.strip()
    if (stripped.startswith(("|", ":")) or _QUOTED_RE.match(stripped) or
        _QUOTE_INTRO_RE.search(stripped) or _HEADER_LINE_RE.match(stripped)):
      continue
    lines.append(stripped)
  return re.sub(r"\s+", " ", " ".join(lines)).strip()


def labelled_texts() -> tuple[list[str], np.ndarray, list[str]]:
  """200 newsgroup posts, their int64 topic labels [200] and the 2 class names.

  gensim's `mini_newsgroup` (a pickled scikit-learn 20-newsgroups subset:
  100 posts each of alt.atheism and sci.space), read with an unpickler that
  can build nothing but plain data. Headers, quoted replies and signatures are
  removed (`strip_newsgroup_post`): the headers name the newsgroup, which
  would give the label away. Order: as stored (deterministic).

  Chosen over `pang_lee_polarity.cor` (200 one-line movie-review sentences,
  positive/negative) because topic is what masked-LM embeddings of news and
  encyclopedia text capture; sentiment of short film reviews is far from the
  training text, so per-size retrieval there would mostly measure noise.
  """
  raw = _newsgroup_unpickler(zlib.decompress(_read(NEWSGROUP_FILE))).load()
  names = [str(n) for n in raw["target_names"]]
  texts = [strip_newsgroup_post(str(post)) for post in raw["data"]]
  labels = np.asarray(raw["target"], np.int64)
  if len(texts) != len(labels):
    raise ValueError(f"{NEWSGROUP_FILE}: {len(texts)} posts but {len(labels)} labels.")
  return texts, labels, names
