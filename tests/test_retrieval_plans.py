"""Search plans: text and JSON forms round-trip, bad plans are one-line IndexQueryErrors, cost."""

import json

import numpy as np
import pytest

from mrl_jax.errors import UserError
from mrl_jax.evaluation import funnel
from mrl_jax.retrieval.errors import IndexQueryError
from mrl_jax.retrieval.plans import (Adaptive, Exact, Funnel, Target, as_plan, parse_plan,
                                     plan_flops, plan_from_dict, plan_name, plan_to_dict)

PARSED = {
    "exact": Exact(),
    "exact:256": Exact(256),
    "adaptive:16:200:2048": Funnel((16, 2048), (200,)),
    "adaptive:16:200": Funnel((16, None), (200,)),
    "funnel:16,64,2048:200,50": Funnel((16, 64, 2048), (200, 50)),
    "funnel:16,full:200,20": Funnel((16, None), (200, 20)),
    "funnel:32:100": Funnel((32,), (100,)),
    "adaptive:16:200:2048@hnsw16": Funnel((16, 2048), (200,), shortlist="hnsw16"),
    "adaptive:16:200:2048@hnsw16:ef=256": Funnel((16, 2048), (200,), "hnsw16", ef_search=256),
    "funnel:32,64,2048:400,100@ivf32:nprobe=8": Funnel((32, 64, 2048), (400, 100), "ivf32",
                                                      nprobe=8),
    "target:map@10:0.01": Target("map@10", 0.01),
    "target:recall_exact@10:0.05": Target("recall_exact@10", 0.05),
    "target:map@10:0.01:0.5": Target("map@10", 0.01, confidence=0.5),
    "target:map@10:0.02:0.99": Target("map@10", 0.02, confidence=0.99),
}


@pytest.mark.parametrize("text", sorted(PARSED))
def test_parse_plan_and_name_round_trip(text):
  plan = parse_plan(text)
  assert plan == PARSED[text]
  assert plan_name(plan) == text
  assert parse_plan(plan_name(plan)) == plan
  # The JSON form survives a real JSON round trip.
  assert plan_from_dict(json.loads(json.dumps(plan_to_dict(plan)))) == plan


def test_adaptive_is_the_two_stage_funnel():
  assert Adaptive(16, 200, 2048) == Funnel(dims=(16, 2048), shortlists=(200,))
  assert Adaptive(16, 200) == Funnel(dims=(16, None), shortlists=(200,))
  plan = Adaptive(16, 300, 64, shortlist="hnsw16", ef_search=128)
  assert plan_name(plan) == "adaptive:16:300:64@hnsw16:ef=128"
  # Lists and numpy integers are accepted and stored as plain tuples of ints.
  plan = Funnel([np.int64(16), 64], [np.int32(100)])
  assert plan.dims == (16, 64) and plan.shortlists == (100,)
  assert all(type(v) is int for v in plan.dims + plan.shortlists)


def test_resolved_fills_full_dim_and_last_keep():
  assert Funnel((16, None), (200,)).resolved(2048, 10) == ([16, 2048], [200, 10])
  assert Funnel((16, 64, None), (200, 50, 20)).resolved(512, 10) == ([16, 64, 512], [200, 50, 20])


def test_as_plan():
  assert as_plan(None) == Exact()
  assert as_plan("exact:16") == Exact(16)
  plan = Adaptive(8, 50, 32)
  assert as_plan(plan) is plan
  with pytest.raises(IndexQueryError, match="plan must be"):
    as_plan(16)


BAD_TEXT = {
    "": "not understood",
    "nearest": "not understood",
    "exact:0": "not a positive integer",
    "exact:16:32": "exact or exact:DIM",
    "exact@hnsw16": "exact or exact:DIM",
    "adaptive:16": "adaptive:SHORTLIST_DIM:SIZE",
    "adaptive:16:abc:2048": "size 'abc' is not a positive integer",
    "adaptive:16:-5:2048": "not a positive integer",
    "funnel:16,64:": "empty list",
    "funnel:16,64,2048:200,50,20,10": "len\\(shortlists\\) == len\\(dims\\)",
    "funnel:16,64,2048:50,200": "must not increase",
    "adaptive:16:200:2048@hnsw16:efs=3": "option 'efs=3' is unknown",
    "adaptive:16:200:2048@hnsw16:ef=": "option 'ef=' is unknown",
    "adaptive:16:200:2048@": "not 'exact' or an ANN name",
    "adaptive:16:200:2048@h nsw": "not 'exact' or an ANN name",
    "adaptive:16:200:2048@exact:ef=64": "apply to an ANN shortlist",
    "target:map@10": "target:METRIC@K:WITHIN",
    "target:map@10:x": "within 'x' is not a number",
    "target:map@10:1.5": "outside \\[0, 1\\)",
    "target:map:0.01": "name@k",
    "target:map@10:0.01:y": "confidence 'y' is not a number",
    "target:map@10:0.01:0.3": "confidence=0.3 is outside \\[0.5, 1\\)",
    "target:map@10:0.01:1": "confidence=1.0 is outside \\[0.5, 1\\)",
    "target:map@10:0.01:0.9:1": "target:METRIC@K:WITHIN\\[:CONFIDENCE\\]",
}


@pytest.mark.parametrize("text", sorted(BAD_TEXT))
def test_bad_plan_text_is_a_one_line_user_error(text):
  with pytest.raises(IndexQueryError, match=BAD_TEXT[text]) as info:
    parse_plan(text)
  assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
  assert "\n" not in str(info.value)


def test_bad_plan_objects_and_dicts():
  with pytest.raises(IndexQueryError, match="positive integer"):
    Exact(0)
  with pytest.raises(IndexQueryError, match="positive integer"):
    Exact(16.0)
  with pytest.raises(IndexQueryError, match="positive integer"):
    Funnel((16, True), (100,))
  with pytest.raises(IndexQueryError, match="sequence"):
    Funnel(16, (100,))
  with pytest.raises(IndexQueryError, match="len\\(shortlists\\)"):
    Funnel((), ())
  with pytest.raises(IndexQueryError, match="apply to an ANN"):
    Funnel((16, 64), (100,), nprobe=4)
  with pytest.raises(IndexQueryError, match="Not a plan dict"):
    plan_from_dict({"kind": "magic"})
  with pytest.raises(IndexQueryError, match="unknown fields"):
    plan_from_dict({"kind": "exact", "dim": 4, "size": 3})
  with pytest.raises(IndexQueryError, match="incomplete"):
    plan_from_dict({"kind": "funnel", "dims": [16, 64]})
  with pytest.raises(IndexQueryError, match="must be a string"):
    parse_plan(None)


def test_plan_flops_match_funnel_flops():
  n, d = 1_000_000, 2048
  assert plan_flops(Exact(), n, d) == funnel.single_shot_flops(n, d) == n * d
  assert plan_flops("exact:64", n, d) == n * 64
  assert plan_flops(Adaptive(16, 200, None), n, d) == funnel.adaptive_flops(n, 16, d, 200)
  dims, shortlists = (16, 32, 64, 128, 256, 2048), (200, 100, 50, 25, 10)
  assert plan_flops(Funnel(dims, shortlists), n, d) == funnel.funnel_flops(n, dims, shortlists)
  # An ANN shortlist is not a scan of the database: only the reranks are counted.
  assert plan_flops(Adaptive(16, 200, 2048, shortlist="hnsw16"), n, d) == 200 * 2048
  with pytest.raises(IndexQueryError, match="resolve"):
    plan_flops(Target(), n, d)
