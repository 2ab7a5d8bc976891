"""Paired-bootstrap CIs of AIQ differences and the calibration summary of ``coe eval``."""

from __future__ import annotations

import numpy as np

from coe.routers.datasets import RoutingData
from coe.routers.evaluate import calibration, paired_bootstrap, power


def _data(n=300, seed=0):
    """Two models: 'cheap' right on even queries, 'dear' (10x the cost) right on 70% of all."""
    rng = np.random.default_rng(seed)
    cheap = (np.arange(n) % 2 == 0).astype(float)
    dear = (rng.random(n) < 0.7).astype(float)
    y = np.stack([cheap, dear], axis=1)
    return RoutingData([f"q{i}" for i in range(n)], ["cheap", "dear"], y, np.tile([1.0, 10.0], (n, 1)))


def _sweep(pick_first):
    """Picks [L, N]: at λ = 0 ``pick_first``, then all 'cheap'."""
    return np.stack([pick_first, np.zeros_like(pick_first)])


def test_a_real_gain_has_a_ci_above_zero_and_noise_does_not():
    data = _data()
    n = len(data)
    oracle_like = np.where(data.quality[:, 0] == 1, 0, 1)                 # cheap where it is right
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 2, n)                                         # a coin flip
    always_dear = np.ones(n, dtype=int)                                   # the zero router's own point
    picks = {"good": _sweep(oracle_like), "noise": _sweep(noise), "dear": _sweep(always_dear)}
    ci = paired_bootstrap(picks, data, ["dear"], n_boot=300, seed=0)
    assert ci["good"]["vs_zero"]["lo"] > 0 and not ci["good"]["vs_zero"]["includes_zero"]
    assert ci["good"]["vs_dear"]["lo"] > 0
    assert ci["noise"]["vs_zero"]["hi"] < 0.05
    # a router that reproduces the zero router's hull differs from it by exactly 0
    assert ci["dear"]["vs_zero"]["diff"] == 0 and ci["dear"]["vs_zero"]["includes_zero"]
    assert "vs_dear" not in ci["dear"]


def test_bootstrap_is_paired_and_seeded():
    data = _data()
    p = {"a": _sweep(np.where(data.quality[:, 0] == 1, 0, 1)), "b": _sweep(np.ones(len(data), dtype=int))}
    one = paired_bootstrap(p, data, ["b"], n_boot=200, seed=3)
    assert one == paired_bootstrap(p, data, ["b"], n_boot=200, seed=3)
    # identical routers: the paired difference is 0 in every replicate
    same = paired_bootstrap({"a": p["a"], "a2": p["a"].copy()}, data, ["a2"], n_boot=100)
    assert same["a"]["vs_a2"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "includes_zero": True, "halfwidth": 0.0, "se": 0.0}


def test_power_shrinks_with_the_test_set_and_says_what_it_can_detect():
    """The half-width is the CI's; the 80% MDE falls as 1/√n; a gain above it is resolvable."""
    def ci_for(n):
        data = _data(n, seed=5)
        better = np.where(data.quality[:, 0] == 1, 0, 1)
        return paired_bootstrap({"a": _sweep(better), "dear": _sweep(np.ones(n, dtype=int))}, data, ["dear"],
                                n_boot=400, seed=0)["a"]["vs_dear"]

    small, large = ci_for(100), ci_for(1600)
    assert small["halfwidth"] == (small["hi"] - small["lo"]) / 2
    assert 1.5 < small["halfwidth"] / small["se"] < 2.5           # ≈ 1.96 for a near-normal replicate spread
    p_small, p_large = power(small, 100, 0.01), power(large, 1600, 0.01)
    assert 2.5 < p_small["mde_80"] / p_large["mde_80"] < 6          # √16 = 4
    assert p_small["mde_80"] > p_small["mde_50"]
    # rows that would make the 80% MDE equal the target, and the verdict at a target above / below it
    assert p_small["rows_for_target"] == int(np.ceil(100 * (p_small["mde_80"] / 0.01) ** 2))
    assert not p_small["detectable"]
    assert power(small, 100, p_small["mde_80"] * 1.01)["detectable"]
    # routers that pick alike: no spread, so no verdict and no sample size
    same = {"diff": 0.0, "lo": 0.0, "hi": 0.0, "includes_zero": True, "halfwidth": 0.0, "se": 0.0}
    assert power(same, 100, 0.01)["detectable"] is None and power(same, 100, 0.01)["rows_for_target"] is None


def test_calibration_brier_and_reliability():
    y = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    perfect = calibration(y, y)
    assert perfect["brier"] == 0 and perfect["binary"]
    flat = calibration(np.full_like(y, 0.5), y)
    assert flat["brier"] == 0.25 and len(flat["reliability"]) == 1
    assert flat["reliability"][0]["observed"] == y.mean() and flat["reliability"][0]["count"] == 8
    graded = calibration(1 + 9 * np.full_like(y, 0.5), 1 + 9 * y)        # 1–10 scores: rescaled
    assert graded["brier"] == 0.25 and not graded["binary"]
