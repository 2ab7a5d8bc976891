"""The shared selection policy and its calibration."""

from __future__ import annotations

import numpy as np
import pytest

from coe.errors import ConfigError
from coe.routers.policy import SelectionPolicy, calibrate, lambda_sweep

Q = np.array([[0.9, 0.8, 0.2], [0.3, 0.6, 0.55], [0.5, 0.5, 0.5]])
C = np.array([10.0, 2.0, 1.0])


def test_modes():
    assert SelectionPolicy("max_quality").select(Q, C).tolist() == [0, 1, 2]   # tie -> cheapest
    assert SelectionPolicy("tradeoff", lam=0.02).select(Q, C).tolist() == [1, 1, 2]
    assert SelectionPolicy("threshold", tau=0.5).select(Q, C).tolist() == [1, 2, 2]
    # nobody reaches τ: the best expert
    assert SelectionPolicy("threshold", tau=0.95).select(Q, C).tolist() == [0, 1, 2]


def test_select_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[B, M\]"):
        SelectionPolicy().select(np.zeros(3), C)


def test_calibrate_to_average_cost():
    rng = np.random.default_rng(0)
    q = rng.random((500, 3))
    policy = calibrate(q, C, target_cost=3.0)
    pick = policy.select(q, C)
    assert C[pick].mean() <= 3.0 + 1e-9
    assert C[pick].mean() > 2.0   # uses the budget, not just the cheapest expert
    assert policy.mode == "tradeoff" and policy.lam > 0


def test_calibrate_to_share_of_the_most_expensive_expert():
    rng = np.random.default_rng(1)
    q = rng.random((400, 3))
    for mode in ("tradeoff", "threshold"):
        policy = calibrate(q, C, mode=mode, target_top_share=0.1)
        share = (policy.select(q, C) == 0).mean()
        assert 0.05 <= share <= 0.1, (mode, share)


def test_calibrate_refuses_impossible_and_ambiguous_targets():
    with pytest.raises(ConfigError, match="cannot be met"):
        calibrate(Q, C, target_cost=0.5)
    with pytest.raises(ConfigError, match="exactly one"):
        calibrate(Q, C)


def test_lambda_sweep_spans_cheap_to_best():
    lams = lambda_sweep(C)
    assert lams[0] == 0
    assert SelectionPolicy("tradeoff", lam=lams[-1]).select(Q, C).tolist() == [2, 2, 2]
