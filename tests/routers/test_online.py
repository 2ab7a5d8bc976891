"""The service's router: centroid over descriptions, fitted routers, experts added and removed at runtime."""

from __future__ import annotations

import pytest

from coe.config import LoraExpert, ModelExpert, RouterConfig, load_config
from coe.errors import ConfigError, ExpertNotFoundError
from coe.routers import build_online_router


@pytest.fixture(scope="module")
def default_cfg():
    return load_config()


@pytest.fixture()
def online(default_cfg, embedder):
    return build_online_router(default_cfg.router, default_cfg.experts, embedder=embedder)


def test_centroid_routes_by_description(online):
    out = online.route([
        "A baker made 24 muffins and sold 3/4 of them. How many are left?",
        "Write a python function to remove duplicates from a list.",
        "",
    ])
    assert [d.expert for d in out] == ["smollm2-math", "smollm2-code", "smollm2"]
    assert out[0].router == "centroid" and set(out[0].scores) == set(online.experts())
    assert out[2].scores == {}   # empty query: default expert, nothing scored


def test_add_and_remove_expert_at_runtime(online):
    query = "Translate 'good morning, my friend' into French."
    assert online.route([query])[0].expert != "french"
    online.add_expert(ModelExpert(
        id="french", model="smollm2-135m-instruct",
        description="Translates English sentences into French.",
        examples=["Translate 'thank you very much' into French.", "How do you say 'the cat is black' in French?"],
    ))
    assert "french" in online.experts()
    assert online.route([query])[0].expert == "french"
    online.remove_expert("french")
    assert online.route([query])[0].expert != "french"
    with pytest.raises(ExpertNotFoundError, match="unknown expert 'french'"):
        online.remove_expert("french")


def test_unsure_queries_go_to_the_default_expert(default_cfg, embedder):
    cfg = default_cfg.router.model_copy(update={"unsure_similarity": 0.99})
    router = build_online_router(cfg, default_cfg.experts, embedder=embedder)
    assert router.route(["Write a python function to add two numbers."])[0].expert == "smollm2"


def test_fitted_router_and_unseen_expert(tmp_path, synthetic, embedder):
    from coe.routers import create_router, save_router

    train, xtr, *_ = synthetic
    save_router(create_router("knn", {"k": 5}).fit(train, xtr), tmp_path / "fitted", embedder="minilm-l6")
    experts = [
        ModelExpert(id="general", model="smollm2-135m-instruct"),
        LoraExpert(id="math-expert", base="general", adapter="x"),
        LoraExpert(id="code-expert", base="general", adapter="y"),
    ]
    cfg = RouterConfig(name="knn", fitted="fitted", default_expert="general")
    router = build_online_router(cfg, experts, base_dir=tmp_path, embedder=embedder)
    assert router.name == "knn"
    picks = router.route(["What is 12 plus 30?", "Write a python function that reverses a list.", "Give me 3 tips for a job interview."])
    assert [d.expert for d in picks] == ["math-expert", "code-expert", "general"]
    router.add_expert(ModelExpert(
        id="chef", model="smollm2-135m-instruct", description="Recipes and cooking advice.",
        examples=["How long should I boil an egg?", "Give me a recipe for tomato soup."],
    ))
    out = router.route(["Give me a recipe for pancakes.", "What is 12 plus 30?"])
    assert [d.expert for d in out] == ["chef", "math-expert"]
    assert out[1].scores["chef"] < out[1].scores["math-expert"]


def test_router_that_needs_outcomes_is_refused_without_fitted(default_cfg, embedder):
    with pytest.raises(ConfigError, match="needs outcome data"):
        build_online_router(RouterConfig(name="knn"), default_cfg.experts, embedder=embedder)
    with pytest.raises(ConfigError, match="not a fitted router folder"):
        build_online_router(RouterConfig(fitted="/nonexistent"), default_cfg.experts, embedder=embedder)


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, routers, coe.config; print([m for m in ('torch', 'faiss', 'sentence_transformers') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
