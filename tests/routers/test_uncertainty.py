"""Uncertainty: which routers report it, what it means, and the policy's fallback on it."""

from __future__ import annotations

import numpy as np
import pytest

from coe.errors import ConfigError
from coe.routers import (
    FitContext,
    QueryBatch,
    SelectionPolicy,
    create_router,
    load_router,
    router_names,
    save_router,
)
from coe.routers.base import router_class
from coe.routers.policy import calibrate_fallback

Q = np.array([[0.9, 0.5, 0.2], [0.3, 0.8, 0.1], [0.2, 0.1, 0.7]])
U = np.array([[0.30, 0.0, 0.0], [0.0, 0.05, 0.0], [0.0, 0.0, 0.20]])
EXPERTS = ["a", "b", "strong"]


def test_fallback_sends_unsure_queries_to_the_strong_expert():
    plain = SelectionPolicy("max_quality")
    assert plain.select(Q, uncertainty=U, experts=EXPERTS).tolist() == [0, 1, 2]   # no fallback configured
    pol = SelectionPolicy("max_quality", fallback_expert="b", max_uncertainty=0.1)
    assert pol.select(Q, uncertainty=U, experts=EXPERTS).tolist() == [1, 1, 1]
    assert pol.select(Q).tolist() == [0, 1, 2]                                      # no uncertainty given
    assert pol.select(Q, uncertainty=U, experts=["x", "y", "z"]).tolist() == [0, 1, 2]   # expert not present


def test_calibrate_fallback_meets_the_share():
    rng = np.random.default_rng(0)
    q, u = rng.random((500, 3)), rng.random((500, 3))
    for share in (0.0, 0.1, 0.3):
        pol = calibrate_fallback(SelectionPolicy("max_quality"), q, None, u, EXPERTS, fallback_expert="strong",
                                 target_share=share)
        chosen = SelectionPolicy("max_quality").select(q)
        sent = (u[np.arange(500), chosen] > pol.max_uncertainty).mean()
        assert share - 0.01 <= sent <= share, (share, sent)
    with pytest.raises(ConfigError, match="not one of the router's experts"):
        calibrate_fallback(SelectionPolicy(), q, None, u, EXPERTS, fallback_expert="nope", target_share=0.1)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        calibrate_fallback(SelectionPolicy(), q, None, u, EXPERTS, fallback_expert="strong", target_share=1.5)


def test_policy_config_fields_reach_the_policy():
    from coe.config import PolicyConfig

    cfg = PolicyConfig(mode="tradeoff", lam=0.1, fallback_expert="strong", max_uncertainty=0.2)
    assert SelectionPolicy.from_config(cfg) == SelectionPolicy("tradeoff", 0.1, 0.5, "strong", 0.2)


def test_declared_capability_matches_scores(synthetic, embedder):
    train, xtr, test, xte, _ = synthetic
    givers = [n for n in router_names() if router_class(n).gives_uncertainty]
    assert {"irt", "knn", "learned"} <= set(givers)
    for name in router_names():
        params = {"members": ["knn:k=5", "learned"]} if name == "stacked" else {}
        s = create_router(name, params).fit(train, xtr, FitContext(embed=embedder.encode)).score(
            QueryBatch(list(test.queries), xte, outcomes=test.quality))
        if name in givers:
            assert s.uncertainty.shape == s.quality.shape and (s.uncertainty >= 0).all(), name
        else:
            assert s.uncertainty is None, name


def test_knn_uncertainty_is_neighbour_disagreement(synthetic):
    from coe.routers.datasets import RoutingData

    train, xtr, test, xte, _ = synthetic
    agree = RoutingData(train.queries, train.models, np.tile([1.0, 0.0, 0.5], (len(train), 1)), train.cost)
    mixed = RoutingData(train.queries, train.models, (np.arange(len(train))[:, None] % 2) * np.ones((1, 3)), train.cost)
    batch = QueryBatch(list(test.queries), xte)
    u_agree = create_router("knn", {"k": 10}).fit(agree, xtr).score(batch).uncertainty
    u_mixed = create_router("knn", {"k": 10}).fit(mixed, xtr).score(batch).uncertainty
    assert np.allclose(u_agree, 0, atol=1e-9) and (u_mixed > 0.1).all()


def test_learned_uncertainty_grows_away_from_the_data(synthetic, tmp_path):
    train, xtr, *_ = synthetic
    router = create_router("learned", {"l2": 1.0}).fit(train, xtr)
    near = router.score(QueryBatch(["a"], xtr[:1])).uncertainty
    far_x = -xtr.mean(axis=0, keepdims=True)
    far = router.score(QueryBatch(["b"], far_x / np.linalg.norm(far_x))).uncertainty
    assert (far > near).all()
    save_router(router, tmp_path / "r", embedder="minilm-l6")
    loaded, _ = load_router(tmp_path / "r")
    np.testing.assert_allclose(loaded.score(QueryBatch(["a"], xtr[:1])).uncertainty, near)
