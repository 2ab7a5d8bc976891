"""The router the default config ships: kNN fitted on the experts' measured task outcomes (exact final
number on GSM8K, unit tests on MBPP; configs/fitted/default, from configs/profiles/default_tasks.jsonl),
with queries unlike every profiled one (router.min_profile_similarity) sent to the expert best on average
on the profile (router.outside_profile: profile_mean)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coe.paths import default_config_path
from coe.routers import build_online_router
from coe.routers.base import QueryBatch


def test_default_config_ships_a_fitted_router(shipped):
    cfg, router = shipped
    assert cfg.router.name == "knn" and cfg.router.fitted and router.name == "knn"
    assert cfg.router.min_profile_similarity is not None
    profile = default_config_path().parent / "profiles" / "default_tasks.jsonl"
    rows = [json.loads(line) for line in profile.read_text().splitlines()]
    assert {e.id for e in cfg.experts} == set(rows[0]["outcomes"])
    assert {o for r in rows for o in r["outcomes"].values()} <= {0.0, 1.0}   # task outcomes, not likelihoods


def test_profiled_domains_go_to_the_measured_best_expert(shipped):
    """Qwen2.5-Coder solves more of both profiled domains than every SmolLM2 expert, LoRAs included."""
    _, router = shipped
    out = router.route([
        "A baker made 24 muffins and sold 3/4 of them. How many are left?",
        ("Write a python function to remove duplicates from a list.\nYour code should pass this test:\n"
         "assert remove_dups([1, 1, 2]) == [1, 2]"),
    ])
    assert [d.expert for d in out] == ["qwen-coder", "qwen-coder"]


def test_queries_outside_the_profiles_go_to_the_expert_best_on_the_profile(shipped):
    """router.outside_profile: profile_mean (the default): a query unlike every profiled one goes to the
    expert with the best mean outcome on the profile, not by the descriptions (which sent MT-Bench
    reasoning questions to the SmolLM2 experts, worse by reference NLL: bench/results/composition_transfer.md)."""
    cfg, router = shipped
    queries = ["What is the capital of France?",
               "Continue the story. Once upon a time, in a small village by the river,"]
    cov = router.fitted.coverage(QueryBatch(queries, router.embedder.encode(queries)))
    assert np.all(cov < cfg.router.min_profile_similarity)
    assert cfg.router.outside_profile == "profile_mean"
    means = dict(zip(router.fitted.experts, router.fitted.mean_quality()))
    assert max(means, key=means.get) == "qwen-coder"
    out = router.route(queries)
    assert [d.expert for d in out] == ["qwen-coder", "qwen-coder"]
    assert out[0].scores == {e: pytest.approx(v) for e, v in means.items()}
    # outside_profile: descriptions routes them as without a fitted router: to the cheap chat expert
    desc = build_online_router(cfg.router.model_copy(update={"outside_profile": "descriptions"}), cfg.experts)
    assert [d.expert for d in desc.route(queries)] == ["smollm2", "smollm2"]
