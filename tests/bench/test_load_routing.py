"""bench/load_routing.py: the per-arm summary and the targets on known records, and (slow: two
starts of the default service, ~150 s) the --smoke run end to end."""

from __future__ import annotations

import pytest

from bench.load_routing import MIX, SECOND, TOP, arm_config, arm_summary, compare, main


def _rec(status, latency, expert=None, quality=None, best=None):
    return {"status": status, "latency_s": latency, "expert": expert, "quality": quality, "best_quality": best}


def test_arm_summary_counts_answers_429s_errors_and_shares():
    recs = [_rec(200, 1.0, TOP, 0.20, 0.20), _rec(200, 3.0, SECOND, 0.18, 0.20), _rec(200, 2.0, TOP, 0.20, 0.20),
            _rec(429, 0.01), _rec(None, 180.0) | {"error": "timeout"}, _rec(504, 30.0)]
    s = arm_summary(recs)
    assert (s["sent"], s["answered"], s["http_429"], s["errors"]) == (6, 3, 1, 2)
    assert s["error_kinds"] == {"timeout": 1, "504": 1}
    assert s["latency_s"]["p50"] == 2.0 and s["latency_s"]["max"] == 3.0    # answered requests only
    assert s["mean_quality"] == pytest.approx((0.20 + 0.18 + 0.20) / 3)
    assert s["share"] == pytest.approx({TOP: 2 / 3, SECOND: 1 / 3})


def test_compare_checks_the_three_targets():
    slow = [_rec(200, 20.0 + i / 10, TOP, 0.20, 0.20) for i in range(20)] + [_rec(429, 0.01)] * 5
    fast = [_rec(200, 4.0 + i / 10, TOP if i % 2 else SECOND, 0.20 if i % 2 else 0.18, 0.20) for i in range(25)]
    res = {"runs": [{"arm": "quality", "records": slow}, {"arm": "load-aware", "records": fast}]}
    cmp = compare(res)
    assert cmp["p99_ratio_pooled"] > 2 and cmp["targets"]["p99_ratio_at_least_2"]
    assert cmp["targets"]["answered_at_least_as_many"]
    assert cmp["quality_drop"] == pytest.approx(0.20 - (12 * 0.20 + 13 * 0.18) / 25)
    assert cmp["targets"]["quality_within_0.02"]
    worse = compare({"runs": [{"arm": "quality", "records": fast}, {"arm": "load-aware", "records": slow}]})
    assert not worse["targets"]["p99_ratio_at_least_2"] and not worse["targets"]["answered_at_least_as_many"]


def test_arm_config_changes_only_the_load_weight_and_the_outside_rule(tmp_path):
    from coe.config import load_config

    shipped = load_config(None)
    written = load_config(arm_config(tmp_path, "x", 0.25))
    assert written.router.policy.load_weight == 0.25 and written.router.outside_profile == "descriptions"
    shipped.router.policy.load_weight = 0.25
    shipped.router.outside_profile = "descriptions"
    assert written.model_dump() == shipped.model_dump()


@pytest.mark.slow
def test_smoke_runs_both_arms_on_the_default_service(smollm2_dir, qwen_dir, tmp_path, monkeypatch):
    from coe.config import load_config
    from coe.model_paths import is_prepared

    if not is_prepared(load_config(None).router.embedder):
        pytest.skip("the default router's embedder is not prepared: run `coe models prepare`")
    monkeypatch.setenv("COE_BENCH_RESULTS", str(tmp_path))
    data = main(["--smoke", "--name", "lr"])
    assert [r["arm"] for r in data["runs"]] == ["quality", "load-aware"]
    assert all(m["first"][0] == TOP and m["second"][0] == SECOND for m in data["mix"])   # the mix still fits
    assert len(data["mix"]) == len(MIX) and data["capacity"]["rps"] > 0
    arms = data["comparison"]["arms"]
    assert all(a["answered"] > 0 and a["errors"] == 0 for a in arms.values())
    assert arms["quality"]["share"] == {TOP: 1.0}            # quality-only never leaves the top expert
    assert (tmp_path / "lr.md").read_text().startswith("# Load-aware routing under load")
