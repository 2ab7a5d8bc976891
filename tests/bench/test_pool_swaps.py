"""bench/pool_swaps.py --smoke on tiny random llamas: the ingress logic over the real pool counts
swaps per arm, and the results carry what the targets need."""

from __future__ import annotations

import json

import pytest

from bench.pool_swaps import MIX, QUALITY, compare, main


def _embedder_or_skip() -> None:
    from coe.model_paths import is_prepared

    if not is_prepared("minilm-l6-int8"):
        pytest.skip("embedder minilm-l6-int8 is not prepared: run `coe models prepare`")


def test_smoke_counts_swaps_and_predicted_quality_per_arm(tiny_llama_dir, tmp_path, monkeypatch):
    _embedder_or_skip()
    monkeypatch.setenv("COE_BENCH_RESULTS", str(tmp_path))
    data = main(["--smoke", "--model", str(tiny_llama_dir), "--dtype", "float32", "--name", "ps"])
    arms = data["comparison"]["arms"]
    assert set(arms) == {QUALITY, "swap-aware 0.05"}
    assert data["comparison"]["answered_all"]
    q = arms[QUALITY]
    assert q["requests"] == 6 and q["swaps"] >= 1        # three experts, one slot: quality-only swaps
    assert 0 < q["mean_quality"] <= 1
    assert data["swap_in_s"] > 0 and data["load_weight"]["swap-aware 0.05"] == pytest.approx(0.05 / data["swap_in_s"])
    assert data["run"]["load_before"] and data["run"]["machine"]["cpus"]
    assert (tmp_path / "ps.md").read_text().startswith("# Swaps in the expert pool")
    assert json.loads((tmp_path / "ps.json").read_text())["mix"] == MIX


def test_compare_pairs_each_swap_aware_arm_with_quality_only():
    def rnd(arm, r, swaps, quality):
        return {"arm": arm, "round": r, "requests": 100, "answered": 100, "swaps": swaps, "swaps_per_100": swaps,
                "mean_quality": quality}

    res = {"load_weight": {QUALITY: 0.0, "swap-aware 0.02": 1.0, "swap-aware 0.1": 5.0},
           "rounds": [rnd(QUALITY, 0, 40, 0.50), rnd("swap-aware 0.02", 0, 36, 0.499), rnd("swap-aware 0.1", 0, 20, 0.49),
                      rnd(QUALITY, 1, 60, 0.50), rnd("swap-aware 0.02", 1, 54, 0.499), rnd("swap-aware 0.1", 1, 30, 0.48)]}
    cmp = compare(res)
    assert cmp["arms"][QUALITY]["swaps_per_100"] == 50.0
    v = cmp["versus_quality"]
    assert v["swap-aware 0.02"]["swap_share"] == pytest.approx(0.9) and not v["swap-aware 0.02"]["swaps_at_most_70pct"]
    assert v["swap-aware 0.1"]["swap_share"] == pytest.approx(0.5)
    assert v["swap-aware 0.1"]["quality_loss"] == pytest.approx(0.015)
    assert v["swap-aware 0.1"]["swap_share_by_round"]["median"] == pytest.approx(0.5)
    assert cmp["targets_met_by"] == ["swap-aware 0.1"]
