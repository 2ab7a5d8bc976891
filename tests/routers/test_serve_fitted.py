"""Every router can serve: ``coe router fit`` → folder → ``router.fitted`` → the service's router.

The config's experts carry ``cost``, ``category`` and ``skills``; the fit reads them (category
labels, declared skills, the calibration's costs) and the online router loads the folder through
its public loading path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from coe.config import load_config
from coe.routers import FitContext, QueryBatch, build_online_router, create_router
from coe.tools.cli import main
from tests.routers.conftest import MODELS, synthetic_rows

SERVABLE = ["knn", "learned", "skill", "category", "centroid", "irt", "stacked"]
# routers expected to send the held-out queries to the right specialist
LEARNS = {"knn", "learned", "category", "centroid", "irt", "stacked"}
EXPERTS = [
    {"id": "math-expert", "cost": 2.0, "category": "math", "skills": ["arithmetic", "word problems"]},
    {"id": "code-expert", "cost": 3.0, "category": "code", "skills": ["python programming"]},
    {"id": "general", "cost": 1.0, "category": "chat", "skills": ["creative writing"]},
]
FAST = {"stacked": {"members": ["knn:k=5", "learned:l2=1.0"]}, "irt": {"dim": 2, "l2": 1.0}, "knn": {"k": 5},
        "learned": {"l2": 1.0}, "category": {"n_categories": 3, "c": 20.0}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_dir):
    root = tmp_path_factory.mktemp("serve-fitted")
    q, _, y, _ = synthetic_rows(12, seed=0)
    # no categories and no costs in the data: they come from the config
    (root / "data.jsonl").write_text("\n".join(
        json.dumps({"query": text, "outcomes": dict(zip(MODELS, map(float, row)))}) for text, row in zip(q, y)))
    for name in SERVABLE:
        cfg = {"version": 1, "router": {"name": name, "embedder": "minilm-l6", "params": FAST.get(name, {})},
               "experts": [{**e, "kind": "model", "model": "smollm2-135m-instruct",
                            "description": f"{e['category']} questions"} for e in EXPERTS]}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.mark.parametrize("name", SERVABLE)
def test_fit_then_serve(name, workspace, embedder, capsys):
    out = workspace / f"fitted-{name}"
    assert main(["router", "fit", "--config", str(workspace / f"{name}.yaml"), "--data", str(workspace / "data.jsonl"),
                 "--out", str(out), "--no-cv", "--quiet", "--target-top-share", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "costs used: the config's expert cost fields" in printed
    cfg = load_config(workspace / f"{name}.yaml")
    meta = json.loads((out / "router.json").read_text())
    policy = meta["calibrated_policy"]
    router_cfg = cfg.router.model_copy(update={"fitted": str(out), "policy": cfg.router.policy.model_copy(
        update={"mode": policy["mode"], "lam": policy["lam"]})})
    online = build_online_router(router_cfg, cfg.experts, embedder=embedder)
    queries = ["What is 17 plus 25?", "Write a python function that reverses a list.",
               "Write a short poem about the ocean."]
    decisions = online.route(queries)
    assert all(d.router == name for d in decisions)
    assert all(set(d.scores) == {"math-expert", "code-expert", "general"} for d in decisions)
    assert decisions[0].costs == {"math-expert": 2.0, "code-expert": 3.0, "general": 1.0}
    if name in LEARNS:
        max_q = cfg.router.model_copy(update={"fitted": str(out)})
        picks = [d.expert for d in build_online_router(max_q, cfg.experts, embedder=embedder).route(queries)]
        assert picks == ["math-expert", "code-expert", "general"], picks


def test_category_learns_the_configured_categories(synthetic, embedder):
    from coe.routers.datasets import RoutingData

    train, xtr, _, xte, kinds = synthetic
    unlabelled = RoutingData(train.queries, train.models, train.quality, train.cost)
    ctx = FitContext(categories={e["id"]: e["category"] for e in EXPERTS}, embed=embedder.encode)
    router = create_router("category").fit(unlabelled, xtr, ctx)
    assert router.categories == ["chat", "code", "math"]
    probs = router.probabilities(xte)
    assert (np.array(router.categories)[probs.argmax(axis=1)] == np.array(kinds)).mean() >= 0.8


def test_skill_router_reads_declared_skills(synthetic, embedder):
    from coe.routers.datasets import RoutingData

    train, xtr, *_ = synthetic
    flat = RoutingData(train.queries, train.models, np.full_like(train.quality, 0.5), train.cost)
    declared = FitContext(skills={"code-expert": ["python programming"]}, embed=embedder.encode)
    router = create_router("skill", {"shrink": 1000.0}).fit(flat, xtr, declared)
    q = router.score(QueryBatch(["Write a python function to sort a list."], embedder.encode(
        ["Write a python function to sort a list."]))).quality[0]
    assert np.argmax(q) == 1 and q[1] > q[0]


def test_fallback_calibration_on_fit(workspace, capsys):
    out = workspace / "fitted-fallback"
    args = ["router", "fit", "--config", str(workspace / "knn.yaml"), "--data", str(workspace / "data.jsonl"),
            "--out", str(out), "--no-cv", "--quiet"]
    assert main([*args, "--fallback-expert", "general", "--target-fallback-share", "0.25"]) == 0
    policy = json.loads((out / "router.json").read_text())["calibrated_policy"]
    assert policy["fallback_expert"] == "general" and policy["max_uncertainty"] >= 0
    assert "fallback_expert: general, max_uncertainty:" in capsys.readouterr().out
    assert main([*args, "--fallback-expert", "nope", "--target-fallback-share", "0.25"]) == 2
    assert "not one of the router's experts" in capsys.readouterr().err
    assert main([*args, "--fallback-expert", "general"]) == 2
    assert "needs --target-fallback-share" in capsys.readouterr().err


def test_the_served_router_applies_the_uncertainty_fallback(workspace, embedder):
    """The service's router passes the fitted router's standard errors to the policy: with
    max_uncertainty 0 every query it is unsure about goes to the fallback expert; with a huge
    threshold none does."""
    out = workspace / "fitted-knn-fallback"
    assert main(["router", "fit", "--config", str(workspace / "knn.yaml"), "--data", str(workspace / "data.jsonl"),
                 "--out", str(out), "--no-cv", "--quiet"]) == 0
    cfg = load_config(workspace / "knn.yaml")
    queries = ["What is 17 plus 25?", "Write a python function that reverses a list."]

    def picks(max_u):
        policy = cfg.router.policy.model_copy(update={"fallback_expert": "general", "max_uncertainty": max_u})
        rcfg = cfg.router.model_copy(update={"fitted": str(out), "policy": policy})
        return [d.expert for d in build_online_router(rcfg, cfg.experts, embedder=embedder).route(queries)]

    assert picks(1e9) == ["math-expert", "code-expert"]
    assert picks(0.0) == ["general", "general"]
