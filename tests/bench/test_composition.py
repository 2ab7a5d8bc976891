"""bench/composition.py ``policy``: the statistics, the curve and the CV choice rules on known rows, and
the choices it simulates are the shipped service router's (needs the prepared embedder)."""

from __future__ import annotations

import pytest

from bench.composition import (
    choose_knob,
    curve,
    cv_choices,
    knob_sweep,
    policy_choices,
    policy_stats,
)


def _row(outcomes, costs, latency=None):
    detail = {e: {"completion_tokens": 10, "latency_ms": (latency or {}).get(e, 1000.0)} for e in outcomes}
    return {"outcomes": outcomes, "costs": costs, "detail": detail}


ROWS = [_row({"big": 1.0, "small": 0.0}, {"big": 10.0, "small": 1.0}),
        _row({"big": 0.0, "small": 0.0}, {"big": 10.0, "small": 1.0}),
        _row({"big": 1.0, "small": 1.0}, {"big": 10.0, "small": 1.0}, {"big": 3000.0})]


def test_policy_stats_are_paired_against_the_best_expert():
    s = policy_stats(ROWS, ["big", "small", "small"], "big")
    assert s["accuracy"] == pytest.approx(2 / 3) and s["minus_best"] == 0.0
    assert s["cost"] == pytest.approx(4.0) and s["share_best"] == pytest.approx(1 / 3)
    assert s["mean_latency_ms"] == 1000.0
    worse = policy_stats(ROWS, ["small", "small", "small"], "big")
    assert worse["minus_best"] == pytest.approx(-1 / 3)
    assert worse["minus_best_ci"][0] < 0 <= worse["minus_best_ci"][1]   # 3 items: the CI reaches 0


def test_curve_merges_equal_choices_and_choose_knob_stops_at_the_first_loss():
    knobs = [0.0, 0.1, 0.2, 0.3, 0.4]
    choices = [["big"] * 3, ["big"] * 3, ["big", "small", "small"], ["small"] * 3, ["big"] * 3]
    points = curve(ROWS, knobs, choices, "big")
    assert [(p["knob_from"], p["knob_to"]) for p in points] == [(0.0, 0.1), (0.2, 0.2), (0.3, 0.3), (0.4, 0.4)]
    # no_loss: the last value before the first point below the best single expert (a later return does not count)
    assert choose_knob(points, best_accuracy=2 / 3)["no_loss"] == 0.2
    assert choose_knob(points, best_accuracy=2 / 3)["ci"] == 0.4          # 3 items: every CI reaches 0
    assert choose_knob(points, best_accuracy=1.0)["no_loss"] == 0.0       # nothing qualifies: the first value


def test_knob_sweeps_run_from_max_quality_to_cheapest():
    lams, taus = knob_sweep("tradeoff", [1.0, 4.6], 50), knob_sweep("threshold", [1.0, 4.6], 41)
    assert lams[0] == 0.0 and lams == sorted(lams) and len(lams) == 50
    assert taus[0] == 1.0 and taus[-1] == 0.0 and taus == sorted(taus, reverse=True)


QUERIES = ["A baker made 24 muffins and sold 3/4 of them. How many are left?",
           ("Write a python function to remove duplicates from a list.\nYour code should pass this test:\n"
            "assert remove_dups([1, 1, 2]) == [1, 2]"),
           "What is the capital of France?"]


def test_policy_choices_are_the_service_routers(shipped):
    cfg, router = shipped
    served = [d.expert for d in router.route(QUERIES)]
    lam0, huge = policy_choices(cfg, router.fitted, router.embedder, QUERIES, "tradeoff", [0.0, 1e3])
    assert lam0 == served                                    # λ = 0 is the shipped max_quality choice
    costs = {e.id: e.cost for e in cfg.experts}
    assert all(costs[e] == min(costs.values()) for e in huge)   # a huge λ: only the cheapest cost counts
    (tau1,) = policy_choices(cfg, router.fitted, router.embedder, QUERIES, "threshold", [1.0])
    assert tau1 == served                                    # τ above every prediction: the best expert


def test_cv_choices_route_every_profile_row_out_of_fold(shipped):
    from coe.paths import default_config_path
    from coe.routers.datasets import load_routing_data

    cfg, router = shipped
    data = load_routing_data(default_config_path().parent / "profiles" / "default_tasks.jsonl")
    (row,) = cv_choices(cfg, router.fitted, router.embedder, data, "tradeoff", [0.0], folds=5)
    assert len(row) == len(data) and set(row) <= {e.id for e in cfg.experts}


def test_out_of_source_queries_come_from_every_source_and_none_from_the_profile():
    from bench.composition import PROBES, out_of_source_queries

    sets = out_of_source_queries(5)
    assert len(sets) == 6 and all(queries and all(isinstance(q, str) and q.strip() for q in queries)
                                  for queries in sets.values())
    assert all(len(q) <= 5 for name, q in sets.items() if not name.startswith(("math/code", "chat")))
    import json

    profiled = {json.loads(line)["query"] for line in (PROBES / "profile_probes.jsonl").read_text().splitlines()}
    assert not profiled & {q for queries in sets.values() for q in queries}


def test_transfer_probes_carry_other_sources_answers_and_no_profiled_task():
    import json

    from bench.composition import REPO, transfer_probes

    sets = transfer_probes(4)
    assert len(sets) == 3 and all(0 < len(ps) <= 4 for ps in sets.values())
    probes = [p for ps in sets.values() for p in ps]
    assert all(p.scorer == "reference_nll" and p.reference.strip() and p.category in ("math", "code") for p in probes)
    assert len({p.id for p in probes}) == len(probes)
    profiled = [json.loads(line)["query"] for line in
                (REPO / "configs/profiles/default_tasks.jsonl").read_text().splitlines() if line.strip()]
    assert not any(p.query in q for p in probes for q in profiled)
    assert not any(r.startswith("[") for r in (p.reference for p in probes))   # RouterBench's list cells unwrapped


def test_nll_transfer_stats_pair_coe_with_the_best_single_and_the_oracle():
    import numpy as np

    from bench.composition import nll_transfer_stats

    nll = np.array([[1.0, 2.0], [1.0, 0.0], [1.0, 0.5], [1.0, 3.0]])     # a is best on average (1.0 vs 1.375)
    st = nll_transfer_stats(nll, np.array([0, 1, 0, 0]), ["a", "b"], n_boot=200)
    assert st["best_single"] == "a" and st["coe"] == pytest.approx(0.75) and st["oracle"] == pytest.approx(0.625)
    assert st["coe_minus_best"] == pytest.approx(-0.25)
    assert st["recovered"] == pytest.approx(0.25 / 0.375)               # row 2 stays with a: 2/3 of the gain
    assert st["share"] == {"a": 0.75, "b": 0.25} and st["oracle_share"] == {"a": 0.5, "b": 0.5}
    lo, hi = st["recovered_ci"]
    assert lo <= st["recovered"] <= hi
