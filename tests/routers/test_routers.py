"""One case table run over every registered router: fit, score shapes, policy, save/load.

A new router gets these tests by registering itself; ``CASES`` only holds overrides (params for
a quick fit, and whether it should learn the synthetic specialists).
"""

from __future__ import annotations

import numpy as np
import pytest

from coe.routers import (
    FitContext,
    QueryBatch,
    SelectionPolicy,
    create_router,
    load_router,
    router_names,
    save_router,
)

# name -> (params for a quick fit, expected to send held-out queries to the right specialist)
CASES: dict[str, tuple[dict, bool]] = {
    "knn": ({"k": 5}, True),
    "learned": ({"l2": 1.0}, True),
    "centroid": ({}, True),
    "category": ({"n_categories": 3}, True),
    "skill": ({"n_skills": 3, "shrink": 1.0}, False),
    "random": ({}, False),
    "best-single": ({}, False),
    "oracle": ({}, True),
    "irt": ({"dim": 2, "l2": 1.0}, True),
    "stacked": ({"members": ["knn:k=5", "learned:l2=1.0"]}, True),
}
NAMES = router_names()


def _case(name):
    return CASES.get(name, ({}, False))


_FITTED: dict = {}


def _fit(name, synthetic, embedder):
    """Each router fitted once per session (fits are read-only afterwards)."""
    if name not in _FITTED:
        train, xtr, *_ = synthetic
        params, _ = _case(name)
        _FITTED[name] = create_router(name, params).fit(train, xtr, FitContext(embed=embedder.encode))
    return _FITTED[name]


def _batch(synthetic):
    _, _, test, xte, _ = synthetic
    return QueryBatch(list(test.queries), xte, outcomes=test.quality)


def test_every_router_has_a_case():
    assert sorted(NAMES) == sorted(CASES), "add the new router to CASES (params for a quick fit)"


@pytest.mark.parametrize("name", NAMES)
def test_score_shapes(name, synthetic, embedder):
    router = _fit(name, synthetic, embedder)
    scores = router.score(_batch(synthetic))
    b = len(synthetic[2])
    assert scores.experts == ["math-expert", "code-expert", "general"]
    assert scores.quality.shape == (b, 3)
    assert np.isfinite(scores.quality).all()
    assert scores.cost is not None and np.allclose(scores.cost, [2.0, 3.0, 1.0])


@pytest.mark.parametrize("name", NAMES)
def test_policy_over_scores(name, synthetic, embedder):
    router = _fit(name, synthetic, embedder)
    s = router.score(_batch(synthetic))
    best = SelectionPolicy("max_quality").select(s.quality, s.cost)
    assert (best == np.argmax(s.quality, axis=1)).all()
    cheap = SelectionPolicy("tradeoff", lam=1e6).select(s.quality, s.cost)
    assert (cheap == 2).all(), "a huge λ must send everything to the cheapest expert"
    low_tau = SelectionPolicy("threshold", tau=-1e9).select(s.quality, s.cost)
    assert (low_tau == 2).all(), "with τ below every score the cheapest expert qualifies"


@pytest.mark.parametrize("name", [n for n in NAMES if _case(n)[1]])
def test_learns_the_specialists(name, synthetic, embedder):
    router = _fit(name, synthetic, embedder)
    kinds = synthetic[4]
    pick = SelectionPolicy("max_quality").select(router.score(_batch(synthetic)).quality)
    want = np.array([{"math": 0, "code": 1, "chat": 2}[k] for k in kinds])
    assert (pick == want).mean() >= 0.8, f"{name} routed {pick.tolist()} vs {want.tolist()}"


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, synthetic, embedder, tmp_path):
    router = _fit(name, synthetic, embedder)
    save_router(router, tmp_path / name, embedder="minilm-l6")
    loaded, meta = load_router(tmp_path / name)
    assert meta["router"] == name and loaded.experts == router.experts
    a, b = router.score(_batch(synthetic)), loaded.score(_batch(synthetic))
    np.testing.assert_allclose(a.quality, b.quality, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.cost, b.cost)


def test_registry_refuses_duplicates_and_lists_unknown():
    from coe.errors import RouterNotFoundError
    from coe.routers import Router, register_router

    with pytest.raises(ValueError, match="already registered"):
        @register_router("knn")
        class Other(Router):
            pass

    with pytest.raises(RouterNotFoundError, match="available: best-single, category, centroid"):
        create_router("nope")


def test_bad_params_name_the_field():
    from coe.errors import ConfigError

    with pytest.raises(ConfigError, match="k"):
        create_router("knn", {"k": 0})
    with pytest.raises(ConfigError, match="allowed: k, shrink"):
        create_router("knn", {"kk": 3})


def test_category_unsure_goes_to_general_expert(synthetic, embedder):
    train, xtr, test, xte, _ = synthetic
    router = create_router("category", {"n_categories": 3, "min_confidence": 1.0, "general_expert": "general"})
    router.fit(train, xtr)
    pick = SelectionPolicy("max_quality").select(router.score(QueryBatch(list(test.queries), xte)).quality)
    assert (pick == 2).all()


def test_skill_router_top_k_recruits(synthetic, embedder):
    train, xtr, test, xte, _ = synthetic
    router = create_router("skill", {"top_k": 1}).fit(train, xtr, FitContext(embed=embedder.encode))
    q = router.score(QueryBatch(list(test.queries), xte)).quality
    assert (np.isfinite(q).sum(axis=1) == 1).all()
