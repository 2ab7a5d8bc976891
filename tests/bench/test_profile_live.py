"""The pure helpers of bench/profile_live.py (the service run itself is its smoke run)."""

from __future__ import annotations

import math

from bench.profile_live import analyse, candidate, during, latency_stats, ratio_ci, verdict


def row(phase, expert, t0, latency, status=200):
    return {"phase": phase, "expert": expert, "t0": t0, "t1": t0 + latency, "latency_s": latency, "status": status}


def test_ratio_ci_brackets_the_ratio_of_medians():
    idle = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95] * 5
    busy = [x * 1.5 for x in idle]
    r = ratio_ci(busy, idle)
    assert math.isclose(r["ratio"], 1.5)
    assert r["ci"][0] <= 1.5 <= r["ci"][1] and r["ci"][1] < 2
    assert math.isnan(ratio_ci([1.0], idle)["ratio"])


def test_verdict_needs_the_whole_interval():
    assert verdict([1.2, 1.8], 2.0) == "met"
    assert verdict([2.1, 3.0], 2.0) == "missed"
    assert verdict([1.5, 2.5], 2.0) == "not resolved"
    assert verdict([float("nan")] * 2, 2.0) == "not resolved"


def test_latency_stats_counts_non_2xx_as_errors_not_latencies():
    s = latency_stats([row("idle", "a", 0, 1.0), row("idle", "a", 0, 3.0), row("idle", "a", 0, 50.0, status=503)])
    assert s["n"] == 3 and s["ok"] == 2 and s["errors"] == 1 and s["p50_s"] == 2.0


def test_candidate_and_during():
    plan = {"expert": "x", "candidates": [{"expert": "x", "quality": 0.9, "uncertainty": 0.1},
                                          {"expert": "new", "quality": 0.8, "uncertainty": None}]}
    assert candidate(plan, "new") == {"rank": 2, "of": 2, "quality": 0.8, "uncertainty": None, "chosen": False}
    assert candidate(plan, "missing") is None
    rows = [row("p", "a", 1, 1), row("p", "a", 5, 1), row("p", "a", 9, 3)]
    assert [r["t0"] for r in during(rows, 2, 10)] == [5]
    assert [r["t0"] for r in during(rows, 2, None)] == [5, 9]


def test_analyse_times_from_the_register_call():
    job = {"state": "done", "finished_at": 1000.0 + 50, "probes_done": 24, "ability": {"theta": 0.3, "se": 0.4}}
    raw = {"t_register": 10.0, "wall_ref": 1000.0,
           "rows": [row("idle", "a", 1, 1.0), row("idle", "a", 2, 1.2), row("profile", "a", 11, 1.5),
                    row("profile", "a", 13, 1.7), row("profile", "a", 49.5, 1.0), row("after", "a", 70, 1.1)],
           "polls": [{"t": 20, "ms": 5, "status": 200, "state": "running", "phase": "measuring"},
                     {"t": 40, "ms": 9, "status": 200, "state": "running", "phase": "refitting"},
                     {"t": 52, "ms": 5, "status": 200, "state": "done", "phase": None, "job": job}],
           "routes": [{"t": 21, "ms": 3, "status": 200, "chosen": "a",
                       "new_expert": {"rank": 3, "of": 4, "quality": 0.5, "uncertainty": None, "chosen": False}},
                      {"t": 53, "ms": 3, "status": 200, "chosen": "new",
                       "new_expert": {"rank": 1, "of": 4, "quality": 0.7, "uncertainty": 0.1, "chosen": True}}]}
    a = analyse(raw)
    assert a["times"] == {"measured_s": 30.0, "refitted_s": 40.0, "routed_s": 43.0, "within_target": True}
    assert a["latency"]["profile"]["all"]["n"] == 2   # the one answered after the job ended is left out
    assert math.isclose(a["p50_ratio"]["all"]["ratio"], 1.6 / 1.1)
    assert a["polls_ms"]["admin_max_refitting"] == 9
    assert a["route"]["final"]["new_expert"]["rank"] == 1


def test_a_profile_that_never_ended_is_summarised_from_the_last_poll():
    from bench.profile_live import last_job

    polls = [{"t": 20, "ms": 5, "status": 200, "state": "queued", "phase": None, "probes_done": 0, "done": 0,
              "total": 24, "failed": 0, "ability": None},
             {"t": 600, "ms": 5, "status": 200, "state": "running", "phase": "measuring", "probes_done": 20,
              "done": 20, "total": 24, "failed": 1, "ability": {"theta": 0.1, "se": 0.5, "answered": 19}}]
    assert last_job(polls) == {k: polls[-1][k] for k in ("state", "phase", "probes_done", "done", "total", "failed",
                                                          "ability")}
    full = {**polls[-1], "job": {"state": "running", "probes_done": 20, "strategy": "adaptive", "note": "n"}}
    assert last_job([polls[0], full]) == full["job"] and last_job([]) is None
    raw = {"t_register": 10.0, "wall_ref": 1000.0, "rows": [row("idle", "a", 1, 1.0), row("idle", "a", 2, 1.2)],
           "polls": polls, "routes": []}
    a = analyse(raw)
    assert a["profile"]["probes_done"] == 20 and a["profile"]["state"] == "running"
    assert a["times"] == {"measured_s": None, "refitted_s": None, "routed_s": None, "within_target": False}
