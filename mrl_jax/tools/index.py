r"""Build, search and benchmark an MRL vector index (`mrl_jax.retrieval.Index`) from the shell.

    python -m mrl_jax.tools.index build --embeddings DB.npy [--labels L.npy] --out IDX \
        [--stores 16:float32,2048:int8] [--ann hnsw16=hnsw:16,adanns=ivf:64:cluster=16]
    python -m mrl_jax.tools.index build --workdir W --split train [--data_dir D] --out IDX
    python -m mrl_jax.tools.index search --index IDX --queries Q.npy --k 10 \
        [--plan adaptive:16:200:2048@hnsw16] --out ids.npy
    python -m mrl_jax.tools.index bench --index IDX --queries Q.npy [--query_labels QL.npy] \
        [--plans exact adaptive:16:200:2048 funnel:16,64,2048:200,50] [--out bench.json]

build: the database is a float32 [N, d] .npy (memory-mapped, read in row blocks) or
  a split of a trained workdir's data (`embed_workdir_split`: classification and
  dual-encoder workdirs; the split's labels are kept). --stores lists the stored
  prefixes as DIM:DTYPE (float32, float16 or int8); --ann names faiss shortlists as
  NAME=KIND:DIM[:OPTION=VALUE...], KIND hnsw or ivf; options: cluster (AdANNS: the
  prefix the IVF clusters are learnt on), lists (IVF lists), neighbours and
  ef_construction (HNSW), seed, codes (float32, or int8: the structure keeps 8-bit
  codes of its prefix, a quarter of the bytes). Prints one line: vectors, dims,
  bytes/vector, seconds.
search: writes the ids [Q, k] (int64) to --out and the distances (float32 squared
  L2 between unit-normalised prefixes) beside it (`ids_distances.npy` for `ids.npy`);
  prints queries/s of one search after an untimed one (JAX compiles on first use; the
  warm-up runs all queries up to 4,096, else the first 1,024). Plans: see
  `mrl_jax.retrieval.plans.parse_plan` ("exact", "exact:256", "adaptive:16:200:2048",
  "funnel:16,64,2048:200,50", an "@ANN" suffix, "target:map@10:0.01[:0.95]" once the
  index is calibrated: within 1% of exact's mAP@10 at 95% confidence; a target prints the
  plan it chose).
bench: calibrates the plans on the queries (`Index.calibrate`: queries/s, mAP@k with
  labels, recall of exact full-size top-k), prints a table, saves the calibration in
  the index (so target plans work in search) and, with --out, writes it as JSON.
Queries (search, bench) are a .npy, or `--workdir W --split test` (bench then
uses the split's labels as query labels).

Exit status: 0 done; 2 a mistake in the arguments or the inputs (one `error:` line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mrl_jax.errors import UserError

_WARMUP_QUERIES = 4096  # search warms up on all queries up to this many, else on 1,024.
_ANN_OPTIONS = {"cluster": "cluster_dim", "lists": "ivf_lists", "neighbours": "hnsw_neighbours",
                "ef_construction": "ef_construction", "seed": "seed", "codes": "codes"}
# Passed on as written (AnnSpec names the allowed values if one is wrong); the rest are ints.
_TEXT_ANN_OPTIONS = ("codes",)


class ArrayFileError(UserError, ValueError):
  """A .npy input that cannot be read, or of the wrong dtype or shape."""


class ArrayFileNotFoundError(UserError, FileNotFoundError):
  """A .npy input that does not exist."""


class ArgumentError(UserError, ValueError):
  """A --stores / --ann / --plans value that does not parse, or arguments that do not fit."""


# ---------------------------------------------------------------- inputs
def load_array(path: str, what: str, *, ndim: int, kind: str, rows: int | None = None,
               width: int | None = None) -> np.ndarray:
  """The .npy at `path`, memory-mapped, checked: `ndim` dims, dtype kind "float32" or
  "int"; `rows` / `width` when given. Any mismatch is one line naming the file and the fix."""
  if not os.path.isfile(path):
    raise ArrayFileNotFoundError(f"{what} file {path} does not exist: give the path of a .npy "
                                 "written with np.save.")
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except  # numpy's many "not a .npy" errors.
    raise ArrayFileError(f"{what} file {path} is not a readable .npy ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'}): write it with "
                         "np.save(path, array).") from e
  if not isinstance(array, np.ndarray):
    raise ArrayFileError(f"{what} file {path} is an .npz archive, not one array: np.save a "
                         "single array.")
  if kind == "float32" and array.dtype != np.float32:
    raise ArrayFileError(f"{what} file {path} holds {array.dtype}, not float32: save it with "
                         "np.save(path, x.astype(np.float32)).")
  if kind == "int" and not np.issubdtype(array.dtype, np.integer):
    raise ArrayFileError(f"{what} file {path} holds {array.dtype}, not integers: save the "
                         "class ids with np.save(path, y.astype(np.int64)).")
  if array.ndim != ndim:
    shape = "[N, d]" if ndim == 2 else "[N]"
    raise ArrayFileError(f"{what} file {path} has shape {array.shape}, not {shape}: save a "
                         f"{ndim}-D array.")
  if rows is not None and array.shape[0] != rows:
    raise ArrayFileError(f"{what} file {path} has {array.shape[0]} rows but there are {rows} "
                         "vectors: give one row per vector, in the same order.")
  if width is not None and array.shape[1] != width:
    raise ArrayFileError(f"{what} file {path} has {array.shape[1]} columns but the index holds "
                         f"{width}-dim vectors: embed the queries with the same model.")
  if array.ndim == 2 and array.shape[0] == 0:
    raise ArrayFileError(f"{what} file {path} has no rows: give at least one vector.")
  return array


def parse_stores(text: str | None) -> dict[int, str] | None:
  """"16:float32,2048:int8" -> {16: "float32", 2048: "int8"}; None stays None (the default)."""
  if text is None:
    return None
  from mrl_jax.retrieval.prefix_store import STORE_DTYPES
  stores: dict[int, str] = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    dim, _, dtype = item.partition(":")
    dtype = dtype or "float32"
    if not dim.isdigit() or int(dim) < 1 or dtype not in STORE_DTYPES:
      raise ArgumentError(f"--stores entry {item!r} is not DIM:DTYPE: write e.g. "
                          f"16:float32,2048:int8 (DTYPE one of {', '.join(STORE_DTYPES)}).")
    stores[int(dim)] = dtype
  if not stores:
    raise ArgumentError(f"--stores {text!r} names no store: write e.g. 16:float32,2048:int8.")
  return stores


def parse_ann(texts: Sequence[str] | None) -> dict[str, Any] | None:
  """["hnsw16=hnsw:16,adanns=ivf:64:cluster=16:lists=1024"] -> {name: AnnSpec}."""
  if not texts:
    return None
  from mrl_jax.retrieval.ann import AnnSpec
  specs: dict[str, Any] = {}
  usage = ("write NAME=KIND:DIM[:OPTION=VALUE...], e.g. hnsw16=hnsw:16, "
           "adanns=ivf:64:cluster=16:lists=1024 or hnsw256q=hnsw:256:codes=int8 (options: "
           + ", ".join(_ANN_OPTIONS) + ")")
  for item in (part.strip() for text in texts for part in text.split(",")):
    if not item:
      continue
    name, _, body = item.partition("=")
    fields = body.split(":")
    if not name or len(fields) < 2 or fields[0] not in ("hnsw", "ivf") or not fields[1].isdigit():
      raise ArgumentError(f"--ann entry {item!r} does not parse: {usage}.")
    if name in specs or name == "exact":
      why = "reserved" if name == "exact" else "given twice"
      raise ArgumentError(f"--ann name {name!r} is {why}: give each shortlist its own name.")
    options: dict[str, int | str] = {}
    for option in fields[2:]:
      key, _, value = option.partition("=")
      text = key in _TEXT_ANN_OPTIONS
      if key not in _ANN_OPTIONS or not (value if text else value.isdigit()):
        raise ArgumentError(f"--ann entry {item!r}: option {option!r} does not parse: {usage}.")
      options[_ANN_OPTIONS[key]] = value if text else int(value)
    try:
      specs[name] = AnnSpec(kind=fields[0], dim=int(fields[1]), **options)
    except (TypeError, ValueError) as e:
      raise ArgumentError(f"--ann entry {item!r}: {e}") from e
  return specs or None


def _workdir_queries(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray | None]:
  from mrl_jax.retrieval.workdir_embeddings import embed_workdir_split
  return embed_workdir_split(args.workdir, args.split, data_dir=args.data_dir,
                             batch_size=args.batch_size)


def _queries(args: argparse.Namespace, index: Any) -> tuple[np.ndarray, np.ndarray | None]:
  """(queries [Q, d] float32 in memory, their labels or None) from --queries or --workdir."""
  if (args.queries is None) == (args.workdir is None):
    raise ArgumentError("give the queries as --queries Q.npy or as --workdir W --split SPLIT "
                        "(one of the two).")
  if args.workdir is not None:
    queries, labels = _workdir_queries(args)
    if queries.shape[1] != index.dim:
      raise ArgumentError(f"{args.workdir} embeds {queries.shape[1]}-dim vectors but the index "
                          f"holds {index.dim}-dim ones: use the workdir the index was built from.")
    return queries, labels
  queries = load_array(args.queries, "--queries", ndim=2, kind="float32", width=index.dim)
  return np.array(queries), None  # Queries are small: in memory, so timing reads no disk.


# ---------------------------------------------------------------- subcommands
def build(args: argparse.Namespace) -> str:
  from mrl_jax.retrieval.index import Index
  if (args.embeddings is None) == (args.workdir is None):
    raise ArgumentError("give the database as --embeddings DB.npy or as --workdir W "
                        "[--split train] (one of the two).")
  if args.labels is not None and args.embeddings is None:
    raise ArgumentError("--labels goes with --embeddings; a --workdir split brings its own "
                        "labels.")
  stores, ann = parse_stores(args.stores), parse_ann(args.ann)
  if args.embeddings is not None:
    embeddings = load_array(args.embeddings, "--embeddings", ndim=2, kind="float32")
    labels = None if args.labels is None else np.asarray(load_array(
        args.labels, "--labels", ndim=1, kind="int", rows=embeddings.shape[0]), np.int64)
  else:
    embeddings, labels = _workdir_queries(args)
  start = time.perf_counter()
  index = Index.build(embeddings, stores=stores, ann=ann, labels=labels,
                      block_rows=args.block_rows)
  seconds = time.perf_counter() - start
  index.save(args.out)
  stores_text = ",".join(f"{d}:{index.store(d).dtype}" for d in index.store_dims)
  return (f"Built {args.out}: {index.num_vectors} vectors, {index.dim} dims, stores "
          f"{stores_text}, ANN {','.join(index.ann_names) or '-'}, "
          f"{index.bytes_per_vector():.1f} bytes/vector, built in {seconds:.1f} s.")


def _load_index(path: str):
  from mrl_jax.retrieval.index import Index
  return Index.load(path, mmap=True)


def distances_path(ids_path: str) -> str:
  """Where `search --out ids.npy` writes the distances: ids_distances.npy."""
  stem = ids_path[:-4] if ids_path.endswith(".npy") else ids_path
  return stem + "_distances.npy"


def search(args: argparse.Namespace) -> str:
  index = _load_index(args.index)
  queries, _ = _queries(args, index)
  from mrl_jax.retrieval.plans import Target, plan_name
  plan = None if args.plan is None else _parse_plan(args.plan, "--plan")
  resolved = plan_name(index.resolve_plan(plan))
  shown = f"{args.plan} = {resolved}" if isinstance(plan, Target) else resolved
  # One untimed search first: JAX compiles each query-block shape on its first use.
  index.search(queries if len(queries) <= _WARMUP_QUERIES else queries[:1024], args.k, plan)
  start = time.perf_counter()
  ids, distances = index.search(queries, args.k, plan)
  seconds = time.perf_counter() - start
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  np.save(args.out, np.asarray(ids, np.int64))
  np.save(distances_path(args.out), np.asarray(distances, np.float32))
  return (f"Searched {len(queries)} queries, k={args.k}, plan {shown}: "
          f"{len(queries) / max(seconds, 1e-9):.1f} queries/s "
          f"({1e3 * seconds / len(queries):.3f} ms/query); wrote {args.out} and "
          f"{distances_path(args.out)}.")


def _parse_plan(text: str, flag: str):
  from mrl_jax.retrieval import plans
  try:
    return plans.parse_plan(text)
  except UserError:
    raise
  except ValueError as e:  # The parser's own errors are IndexQueryErrors; anything else too.
    raise ArgumentError(f"{flag} {text!r}: {e}") from e


def _cell(value: Any, scale: float = 1.0, digits: int = 2) -> str:
  return f"{scale * value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def bench_table(rows: Sequence[dict[str, Any]], k: int) -> str:
  """The calibration rows (`Index.calibrate`) as a fixed-width table; metrics in percent."""
  header = ("plan", "queries/s", f"map@{k} %", f"recall_exact@{k} %", "MFLOPs/query",
            "bytes/vector")
  lines = []
  for row in rows:
    metrics = row.get("metrics", {})
    lines.append((str(row.get("plan", "?")), _cell(row.get("queries_per_s"), digits=1),
                  _cell(metrics.get(f"map@{k}"), 100), _cell(metrics.get(f"recall_exact@{k}"), 100),
                  _cell(row.get("mflops_per_query"), digits=3),
                  _cell(row.get("bytes_per_vector"), digits=1)))
  widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]

  def fmt(cells: Sequence[str]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([fmt(header)] + [fmt(line) for line in lines])


def bench(args: argparse.Namespace) -> str:
  index = _load_index(args.index)
  queries, labels = _queries(args, index)
  if index.labels is None:
    labels = None  # A workdir split's labels mean nothing to an index built without labels.
  if args.query_labels is not None:
    labels = np.asarray(load_array(args.query_labels, "--query_labels", ndim=1, kind="int",
                                   rows=len(queries)), np.int64)
  plans = None if not args.plans else [_parse_plan(p, "--plans") for p in args.plans]
  rows = index.calibrate(queries, query_labels=labels, k=args.k, plans=plans,
                         repeats=args.repeats)
  index.save(args.index)  # The calibration goes with the index: target plans read it.
  if args.out:
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"index": os.path.abspath(args.index), "num_queries": int(len(queries)),
                 "k": args.k, "rows": list(rows)}, f, indent=2, default=_json_default)
  return bench_table(rows, args.k) + (f"\nWrote {args.out}." if args.out else "")


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


# ---------------------------------------------------------------- arguments
def _add_workdir_source(parser: argparse.ArgumentParser, split: str) -> None:
  parser.add_argument("--workdir", help="A trained workdir whose data split to embed "
                                        "(instead of a .npy).")
  parser.add_argument("--split", default=split, help=f"The split to embed (default {split}).")
  parser.add_argument("--data_dir", help="Where the workdir's TFDS data is (default: its "
                                         "config.data.data_dir).")
  parser.add_argument("--batch_size", type=int, default=256, help="Embedding batch size.")


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m mrl_jax.tools.index",
      description="Build, search and benchmark an MRL vector index.")
  commands = parser.add_subparsers(dest="command", required=True)

  p = commands.add_parser("build", help="Build an index from embeddings or a workdir's split.")
  p.add_argument("--embeddings", help="float32 [N, d] .npy of database vectors.")
  p.add_argument("--labels", help="int [N] .npy of database labels (kept for bench's mAP).")
  _add_workdir_source(p, "train")
  p.add_argument("--out", required=True, help="The index directory to write.")
  p.add_argument("--stores", help="Stored prefixes, DIM:DTYPE,... (default 16:float32 and the "
                                  "full size in float32).")
  p.add_argument("--ann", action="append", help="faiss shortlists, NAME=KIND:DIM[:OPT=V...],...")
  p.add_argument("--block_rows", type=int, default=65536, help="Rows read per block.")
  p.set_defaults(run=build)

  p = commands.add_parser("search", help="Search an index; writes ids and distances.")
  p.add_argument("--index", required=True, help="An index directory (from build).")
  p.add_argument("--queries", help="float32 [Q, d] .npy of query vectors.")
  _add_workdir_source(p, "test")
  p.add_argument("--k", type=int, default=10, help="Neighbours per query.")
  p.add_argument("--plan", help="Search plan (default: exact full size).")
  p.add_argument("--out", required=True, help="Where to write the ids [Q, k] .npy.")
  p.set_defaults(run=search)

  p = commands.add_parser("bench", help="Calibrate plans on queries; prints a table.")
  p.add_argument("--index", required=True, help="An index directory (from build).")
  p.add_argument("--queries", help="float32 [Q, d] .npy of held-out query vectors.")
  p.add_argument("--query_labels", help="int [Q] .npy of query labels (for mAP).")
  _add_workdir_source(p, "test")
  p.add_argument("--plans", nargs="+", help="Plans to measure (default: the index's own list).")
  p.add_argument("--k", type=int, default=10, help="Neighbours per query.")
  p.add_argument("--repeats", type=int, default=3, help="Timed runs per plan (median).")
  p.add_argument("--out", help="Write the calibration table here as JSON.")
  p.set_defaults(run=bench)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one subcommand; a UserError prints `error: <line>` and exits with status 2."""
  args = make_parser().parse_args(argv)
  try:
    print(args.run(args))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  return 0


if __name__ == "__main__":
  sys.exit(main())
