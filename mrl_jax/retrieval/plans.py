"""Search plans for the vector index: exact at one size, adaptive, funnel, or a target to meet.

A plan says which stored prefixes a search looks at and how many candidates each
stage keeps; `Index.search` carries it out.

  Exact(dim)      exact top-k over the whole database at one prefix (None: full size);
  Funnel(dims, shortlists, shortlist)
                  stage 0 shortlists shortlists[0] candidates at dims[0], exactly
                  (shortlist="exact") or with a built ANN of that name; stage i >= 1
                  reranks them at dims[i] and keeps shortlists[i]. `shortlists` may
                  have one entry fewer than `dims`: the last stage then keeps k.
                  As `evaluation.funnel.funnel_retrieve`;
  Adaptive(...)   the two-stage funnel (shortlist at a small prefix, rerank at a large one);
  Target(metric, within, confidence)
                  the fastest calibrated plan whose metric is at least (1 - within) times
                  exact full-size search's (`Index.calibrate` measures the candidates), by
                  a margin: at one-sided `confidence` (default 0.95) it meets that bar on
                  new queries like the calibration ones, not only on those (0.5: no margin;
                  `calibration.confidence_margin`).

Plans have a text form (`parse_plan` / `plan_name`, the CLI's --plan) and a JSON form
(`plan_to_dict` / `plan_from_dict`, kept in saved calibration tables):

  exact                      exact:256
  adaptive:16:200:2048       (shortlist dim : shortlist size : rerank dim; "full" or
                              nothing after the size = the full embedding)
  funnel:16,64,2048:200,50   (dims : shortlists)
  ...@hnsw16                 stage 0 from the ANN named hnsw16; options follow, one per
  ...@hnsw16:ef=256          colon: ef=<efSearch> (HNSW), nprobe=<lists> (IVF)
  ...@ivf32:nprobe=8
  target:map@10:0.01         (metric : within [: confidence], e.g. target:map@10:0.01:0.99)
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Sequence
from typing import Any, Union

from mrl_jax.retrieval.errors import IndexQueryError

EXACT_SHORTLIST = "exact"  # Funnel.shortlist for an exact stage-0 scan of a stored prefix.
SHORTLIST_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")  # An ANN's name in a plan.
DEFAULT_CONFIDENCE = 0.95  # A Target's default one-sided confidence (module doc).
_METRIC = re.compile(r"[a-z_]+@[1-9][0-9]*\Z")
_GRAMMAR = ("exact[:DIM] | adaptive:DS:SIZE[:DR] | funnel:D1,D2,...:S1,S2,... (either with "
            "@ANN[:ef=N][:nprobe=N]) | target:METRIC@K:WITHIN[:CONFIDENCE]")


def _positive_int(value: Any, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise IndexQueryError(f"{what} must be a positive integer, got {value!r}.")
  if value <= 0:
    raise IndexQueryError(f"{what} must be a positive integer, got {value}.")
  return int(value)


def _dim_or_full(value: Any, what: str) -> int | None:
  return None if value is None else _positive_int(value, what)


@dataclasses.dataclass(frozen=True)
class Exact:
  """Exact top-k over every stored vector at prefix `dim` (None: the full embedding)."""
  dim: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "dim", _dim_or_full(self.dim, "Exact plan dim"))


@dataclasses.dataclass(frozen=True)
class Funnel:
  """Shortlist at dims[0] (exactly, or from the ANN named `shortlist`), rerank at the rest."""
  dims: tuple[int | None, ...]
  shortlists: tuple[int, ...]
  shortlist: str = EXACT_SHORTLIST
  ef_search: int | None = None
  nprobe: int | None = None

  def __post_init__(self):
    dims = tuple(_dim_or_full(d, "Funnel dim") for d in _as_sequence(self.dims, "dims"))
    keeps = tuple(_positive_int(s, "Funnel shortlist") for s in
                  _as_sequence(self.shortlists, "shortlists"))
    if not dims or len(keeps) not in (len(dims), len(dims) - 1):
      raise IndexQueryError(f"A funnel needs len(shortlists) == len(dims) or len(dims) - 1, got "
                            f"{len(keeps)} shortlists for {len(dims)} dims.")
    if any(after > before for before, after in zip(keeps, keeps[1:])):
      raise IndexQueryError(f"Funnel shortlists must not increase from stage to stage, got "
                            f"{list(keeps)}.")
    if not isinstance(self.shortlist, str) or not SHORTLIST_NAME.match(self.shortlist):
      raise IndexQueryError(f"Shortlist {self.shortlist!r} is not 'exact' or an ANN name "
                            "(letters, digits, _ . -).")
    ef = _dim_or_full(self.ef_search, "ef_search")
    nprobe = _dim_or_full(self.nprobe, "nprobe")
    if self.shortlist == EXACT_SHORTLIST and (ef is not None or nprobe is not None):
      raise IndexQueryError("ef_search / nprobe apply to an ANN shortlist, not an exact one: "
                            "name the ANN (e.g. '@hnsw16:ef=256') or drop them.")
    object.__setattr__(self, "dims", dims)
    object.__setattr__(self, "shortlists", keeps)
    object.__setattr__(self, "ef_search", ef)
    object.__setattr__(self, "nprobe", nprobe)

  def resolved(self, full_dim: int, k: int) -> tuple[list[int], list[int]]:
    """(dims with None as `full_dim`, how many candidates each stage keeps) for top-k."""
    dims = [full_dim if d is None else d for d in self.dims]
    keeps = list(self.shortlists)
    if len(keeps) == len(dims) - 1:
      keeps.append(int(k))
    return dims, keeps


def Adaptive(shortlist_dim: int, shortlist_size: int,  # noqa: N802 (reads as a plan type)
             rerank_dim: int | None = None, *, shortlist: str = EXACT_SHORTLIST,
             ef_search: int | None = None, nprobe: int | None = None) -> Funnel:
  """Adaptive retrieval: `shortlist_size` candidates at `shortlist_dim`, reranked at
  `rerank_dim` (None: the full embedding)."""
  return Funnel(dims=(shortlist_dim, rerank_dim), shortlists=(shortlist_size,),
                shortlist=shortlist, ef_search=ef_search, nprobe=nprobe)


@dataclasses.dataclass(frozen=True)
class Target:
  """The fastest calibrated plan with metric >= (1 - within) * exact full-size search's, by the
  margin that makes it hold at one-sided `confidence` on new queries (module doc)."""
  metric: str = "map@10"
  within: float = 0.01
  confidence: float = DEFAULT_CONFIDENCE

  def __post_init__(self):
    if not isinstance(self.metric, str) or not _METRIC.match(self.metric):
      raise IndexQueryError(f"Target metric {self.metric!r} is not of the form name@k "
                            "(e.g. 'map@10', 'recall_exact@10').")
    for field, low, high, example in (("within", 0.0, 1.0, "0.01 = within 1%"),
                                      ("confidence", 0.5, 1.0, "0.5 = no margin")):
      try:
        value = float(getattr(self, field))
      except (TypeError, ValueError):
        raise IndexQueryError(f"Target {field}={getattr(self, field)!r} is not a number in "
                              f"[{low:g}, {high:g}).") from None
      if not low <= value < high:
        raise IndexQueryError(f"Target {field}={value} is outside [{low:g}, {high:g}) "
                              f"({example}).")
      object.__setattr__(self, field, value)


Plan = Union[Exact, Funnel, Target]


def _as_sequence(value: Any, what: str) -> Sequence[Any]:
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise IndexQueryError(f"Funnel {what} must be a sequence, got {value!r}.")
  return value


def as_plan(plan: Plan | str | None) -> Plan:
  """A plan object from a plan, its text, or None (exact full-size search)."""
  if plan is None:
    return Exact()
  if isinstance(plan, str):
    return parse_plan(plan)
  if isinstance(plan, (Exact, Funnel, Target)):
    return plan
  raise IndexQueryError(f"plan must be Exact, Funnel, Target or its text, got "
                        f"{type(plan).__name__}.")


# --- Text form ------------------------------------------------------------------------------

def _parse_int(text: str, what: str, spec: str) -> int:
  if not re.fullmatch(r"[0-9]+", text) or int(text) <= 0:
    raise IndexQueryError(f"Plan {spec!r}: {what} {text!r} is not a positive integer.")
  return int(text)


def _parse_dim(text: str, spec: str) -> int | None:
  return None if text == "full" else _parse_int(text, "dim", spec)


def _parse_list(text: str, parse, spec: str) -> list:
  if not text:
    raise IndexQueryError(f"Plan {spec!r} has an empty list; use {_GRAMMAR}.")
  return [parse(item) for item in text.split(",")]


def _parse_shortlist(suffix: str, spec: str) -> dict[str, Any]:
  name, *options = suffix.split(":")
  out: dict[str, Any] = {"shortlist": name}
  for option in options:
    key, _, value = option.partition("=")
    field = {"ef": "ef_search", "ef_search": "ef_search", "nprobe": "nprobe"}.get(key)
    if field is None or not value:
      raise IndexQueryError(f"Plan {spec!r}: option {option!r} is unknown; use ef=N (HNSW) or "
                            "nprobe=N (IVF).")
    out[field] = _parse_int(value, key, spec)
  return out


def parse_plan(text: str) -> Plan:
  """A plan from its text form (module doc); IndexQueryError naming the grammar otherwise."""
  if not isinstance(text, str):
    raise IndexQueryError(f"A plan's text must be a string, got {type(text).__name__}.")
  spec = text.strip()
  kind, _, rest = spec.partition(":")
  if kind == "target":
    metric, *numbers_text = rest.split(":")
    if len(numbers_text) not in (1, 2):
      raise IndexQueryError(f"Plan {spec!r}: a target is target:METRIC@K:WITHIN[:CONFIDENCE] "
                            "(e.g. target:map@10:0.01).")
    values = []
    for field, number in zip(("within", "confidence"), numbers_text):
      try:
        values.append(float(number))
      except ValueError:
        raise IndexQueryError(f"Plan {spec!r}: {field} {number!r} is not a number.") from None
    return Target(metric, *values)
  body, at, suffix = spec.partition("@")
  kind, _, rest = body.partition(":")
  parts = rest.split(":") if rest else []
  options = _parse_shortlist(suffix, spec) if at else {}
  if kind == "exact":
    if at or len(parts) > 1:
      raise IndexQueryError(f"Plan {spec!r}: an exact plan is exact or exact:DIM (no ANN).")
    return Exact(_parse_dim(parts[0], spec) if parts else None)
  if kind == "adaptive":
    if len(parts) not in (2, 3):
      raise IndexQueryError(f"Plan {spec!r}: adaptive is adaptive:SHORTLIST_DIM:SIZE[:RERANK_DIM] "
                            "(e.g. adaptive:16:200:2048).")
    rerank = _parse_dim(parts[2], spec) if len(parts) == 3 else None
    return Adaptive(_parse_dim(parts[0], spec), _parse_int(parts[1], "size", spec), rerank,
                    **options)
  if kind == "funnel":
    if len(parts) != 2:
      raise IndexQueryError(f"Plan {spec!r}: a funnel is funnel:D1,D2,...:S1,S2,... "
                            "(e.g. funnel:16,64,2048:200,50).")
    dims = _parse_list(parts[0], lambda t: _parse_dim(t, spec), spec)
    shortlists = _parse_list(parts[1], lambda t: _parse_int(t, "shortlist", spec), spec)
    return Funnel(tuple(dims), tuple(shortlists), **options)
  raise IndexQueryError(f"Plan {spec!r} is not understood; use {_GRAMMAR}.")


def _dim_text(dim: int | None) -> str:
  return "full" if dim is None else str(dim)


def plan_name(plan: Plan) -> str:
  """The text form of `plan` (parse_plan(plan_name(p)) == p)."""
  plan = as_plan(plan)
  if isinstance(plan, Exact):
    return "exact" if plan.dim is None else f"exact:{plan.dim}"
  if isinstance(plan, Target):
    text = f"target:{plan.metric}:{plan.within:g}"
    return text if plan.confidence == DEFAULT_CONFIDENCE else f"{text}:{plan.confidence:g}"
  if len(plan.dims) == 2 and len(plan.shortlists) == 1:
    text = f"adaptive:{_dim_text(plan.dims[0])}:{plan.shortlists[0]}"
    if plan.dims[1] is not None:
      text += f":{plan.dims[1]}"
  else:
    text = (f"funnel:{','.join(_dim_text(d) for d in plan.dims)}:"
            f"{','.join(str(s) for s in plan.shortlists)}")
  if plan.shortlist != EXACT_SHORTLIST:
    text += f"@{plan.shortlist}"
    if plan.ef_search is not None:
      text += f":ef={plan.ef_search}"
    if plan.nprobe is not None:
      text += f":nprobe={plan.nprobe}"
  return text


# --- JSON form ------------------------------------------------------------------------------

def plan_to_dict(plan: Plan) -> dict[str, Any]:
  """A JSON-serialisable dict with a "kind" key ("exact", "funnel", "target")."""
  plan = as_plan(plan)
  kind = {Exact: "exact", Funnel: "funnel", Target: "target"}[type(plan)]
  out = {"kind": kind, **dataclasses.asdict(plan)}
  if kind == "funnel":
    out["dims"], out["shortlists"] = list(plan.dims), list(plan.shortlists)
  return out


def plan_from_dict(d: dict[str, Any]) -> Plan:
  """The plan `plan_to_dict` wrote."""
  if not isinstance(d, dict) or d.get("kind") not in ("exact", "funnel", "target"):
    raise IndexQueryError(f"Not a plan dict (needs kind exact, funnel or target): {d!r}.")
  cls = {"exact": Exact, "funnel": Funnel, "target": Target}[d["kind"]]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - fields - {"kind"}
  if unknown:
    raise IndexQueryError(f"Plan dict has unknown fields {sorted(unknown)} for {d['kind']}.")
  kwargs = {key: value for key, value in d.items() if key != "kind"}
  for key in ("dims", "shortlists"):
    if isinstance(kwargs.get(key), list):
      kwargs[key] = tuple(kwargs[key])
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise IndexQueryError(f"Plan dict {d!r} is incomplete: {e}.") from None


# --- Cost -----------------------------------------------------------------------------------

def plan_flops(plan: Plan, num_vectors: int, full_dim: int) -> int:
  """Multiply-adds of distance dot products per query, as `funnel.funnel_flops` counts them.

  Exact(dim): N * dim. Funnel: N * dims[0] for an exact shortlist plus
  sum_{i>=1} shortlists[i-1] * dims[i] for the reranks. An ANN shortlist's own work
  depends on the graph / lists it visits and is not counted (its time is measured by
  `Index.calibrate`); a Target must be resolved by an index first.
  """
  plan = as_plan(plan)
  if isinstance(plan, Target):
    raise IndexQueryError("A target plan has no cost of its own: resolve it with a calibrated "
                          "Index (Index.resolve_plan) first.")
  if isinstance(plan, Exact):
    return int(num_vectors) * int(full_dim if plan.dim is None else plan.dim)
  dims = [full_dim if d is None else d for d in plan.dims]
  first = int(num_vectors) * int(dims[0]) if plan.shortlist == EXACT_SHORTLIST else 0
  return first + sum(int(s) * int(d) for s, d in zip(plan.shortlists, dims[1:]))
