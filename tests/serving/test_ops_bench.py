"""The reliability benchmark's arithmetic (bench/soak.py, bench/reliability.py); the benchmark
itself drives the real service and is run by hand (results in bench/results/reliability.*)."""

from __future__ import annotations

from bench.reliability import markdown, pct
from bench.soak import growth, soak_markdown


def _s(n, replica, tree):
    return {"requests": n, "replica_mib": replica, "tree_mib": tree}


def test_growth_separates_a_filled_cache_from_a_leak():
    plateau = [_s(0, 900, 3000), _s(250, 1400, 3500), _s(500, 1400, 3500), _s(750, 1400, 3500), _s(1000, 1400, 3500)]
    g = growth(plateau)
    assert g["growth_per_1000_mib"] == {"replica_mib": 500.0, "tree_mib": 500.0}
    assert g["growth_per_1000_second_half_mib"] == {"replica_mib": 0.0, "tree_mib": 0.0}
    leak = [_s(i * 250, 900 + i * 25, 3000 + i * 25) for i in range(5)]
    assert growth(leak)["growth_per_1000_second_half_mib"] == {"replica_mib": 100.0, "tree_mib": 100.0}


def test_percentiles_and_report():
    assert pct([], 0.5) is None and pct([3.0, 1.0, 2.0], 0.5) == 2.0 and pct([1.0, 2.0], 0.99) == 2.0
    soak = {"requests": 2, "answered_200": 2, "seconds": 1.0, "samples": [_s(0, 1, 2), _s(2, 1, 2)],
            **growth([_s(0, 1, 2), _s(2, 1, 2)])}
    text = markdown({"startup_s": 1.0, "stop": {"exit_code": 0}, "soak": soak,
                     "fuzz": {"requests": 10, "examples_per_operation": 1, "seconds": 2, "stopped_at_time_limit": False,
                              "5xx": 0, "5xx_by_status": {}, "statuses": {"200": 10}}})
    assert "**0 5xx**" in text and soak_markdown(soak) in text
