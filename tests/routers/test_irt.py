"""The ``irt`` router: ability × difficulty, shrinkage of thinly measured experts, calibration, uncertainty."""

from __future__ import annotations

import numpy as np

from coe.routers import QueryBatch, create_router
from coe.routers.datasets import RoutingData


def _irt_data(n=400, d=16, m=4, seed=0):
    """Outcomes drawn from one true 1-D IRT model over random unit embeddings (``seed``: which queries)."""
    model = np.random.default_rng(123)
    w_disc, w_diff = model.standard_normal((d, 1)), model.standard_normal(d)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    disc = x @ w_disc * 2 + 1.0                                # [N, 1]
    diff = x @ w_diff * 1.5                                    # [N]
    theta = np.array([[1.5], [-1.5], [0.5], [0.0]])[:m]        # [M, 1]
    delta = np.array([0.5, 0.5, 0.0, -0.5])[:m]
    p = 1 / (1 + np.exp(-(disc @ theta.T + delta - diff[:, None])))
    y = (rng.random(p.shape) < p).astype(float)
    data = RoutingData([f"q{i}" for i in range(n)], [f"e{j}" for j in range(m)], y, np.tile([4.0, 3.0, 2.0, 1.0][:m], (n, 1)))
    return data, x, p


def test_irt_recovers_the_true_probabilities_and_is_calibrated():
    from coe.routers.evaluate import calibration

    data, x, _ = _irt_data()
    test, xt, pt = _irt_data(seed=1)
    router = create_router("irt", {"dim": 1, "l2": 1.0}).fit(data, x)
    q = router.score(QueryBatch(list(test.queries), xt)).quality
    assert np.corrcoef(q.ravel(), pt.ravel())[0, 1] > 0.8
    cal = calibration(q, test.quality)
    base = calibration(np.tile(data.quality.mean(axis=0), (len(test), 1)), test.quality)
    assert cal["binary"] and cal["brier"] < base["brier"] - 0.02, (cal["brier"], base["brier"])
    for b in cal["reliability"]:
        if b["count"] >= 100:
            assert abs(b["predicted"] - b["observed"]) < 0.1, b


def test_thinly_measured_expert_shrinks_toward_the_population_and_is_less_certain():
    data, x, _ = _irt_data(n=400)
    # e0 is the strongest expert, but we observe it on only 6 queries, all of them failures.
    observed = np.ones_like(data.quality, dtype=bool)
    observed[6:, 0] = False
    y = data.quality.copy()
    y[:6, 0] = 0.0
    thin = RoutingData(data.queries, data.models, y, data.cost, observed=observed)
    router = create_router("irt", {"dim": 1, "l2": 1.0, "ability_l2": 1.0}).fit(thin, x)
    s = router.score(QueryBatch(list(data.queries), x))
    mean_q = s.quality.mean(axis=0)
    # 6 failures alone would put e0 near 0; the population prior keeps it near the others.
    assert mean_q[0] > 0.25, mean_q
    assert abs(mean_q[0] - np.mean(mean_q[1:])) < 0.3
    # and the router knows it knows little about e0
    assert s.uncertainty.shape == s.quality.shape
    u = s.uncertainty.mean(axis=0)
    assert u[0] > 1.5 * u[1:].max(), u
    assert router.notes["observed"] == int(observed.sum())


def test_graded_scores_map_back_to_their_scale():
    data, x, _ = _irt_data(n=200, m=2)
    graded = RoutingData(data.queries, data.models, 1 + 9 * data.quality, data.cost)
    s = create_router("irt", {"dim": 1}).fit(graded, x).score(QueryBatch(list(data.queries), x))
    assert s.quality.min() >= 1.0 and s.quality.max() <= 10.0
    assert s.quality.mean() > 3.0
