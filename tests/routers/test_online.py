"""The service's router: centroid over descriptions, fitted routers, experts added and removed at runtime."""

from __future__ import annotations

import pytest

from coe.config import LoraExpert, ModelExpert, RouterConfig, load_config
from coe.errors import ConfigError, ExpertNotFoundError
from coe.routers import build_online_router


@pytest.fixture(scope="module")
def default_cfg():
    """The default config's experts, routed by their descriptions (centroid, no fitted router);
    the shipped fitted router is tested in test_default_router.py."""
    cfg = load_config()
    router = cfg.router.model_copy(update={"name": "centroid", "fitted": None, "min_profile_similarity": None})
    return cfg.model_copy(update={"router": router})


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
    cfg = RouterConfig(name="knn", fitted=str(tmp_path / "fitted"), default_expert="general")
    router = build_online_router(cfg, experts, embedder=embedder)
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


def test_queries_outside_the_profile_go_to_the_expert_best_on_average(tmp_path, synthetic, embedder):
    """Below router.min_profile_similarity (here every query), outside_profile: profile_mean scores each
    fitted expert by its mean outcome over the fitted data; an unseen expert still wins the queries
    close to its description, against the best of those means."""
    from coe.routers import create_router, save_router

    train, xtr, *_ = synthetic
    save_router(create_router("knn", {"k": 5}).fit(train, xtr), tmp_path / "fitted", embedder="minilm-l6")
    experts = [ModelExpert(id="general", model="smollm2-135m-instruct"),
               LoraExpert(id="math-expert", base="general", adapter="x"),
               LoraExpert(id="code-expert", base="general", adapter="y")]
    means = dict(zip(train.models, train.quality.mean(axis=0)))
    best = max(means, key=means.get)
    cfg = RouterConfig(name="knn", fitted=str(tmp_path / "fitted"), default_expert="math-expert",
                       min_profile_similarity=0.99)
    router = build_online_router(cfg, experts, embedder=embedder)
    queries = ["What is 12 plus 30?", "Write a python function that reverses a list.", "Give me a recipe for pancakes."]
    out = router.route(queries)
    assert [d.expert for d in out] == [best] * 3 and {d.reason for d in out} == {"policy"}
    assert out[0].scores == pytest.approx(means) and not out[0].uncertainty    # no local evidence, no spread
    router.add_expert(ModelExpert(id="chef", model="smollm2-135m-instruct", description="Recipes and cooking advice.",
                                  examples=["How long should I boil an egg?", "Give me a recipe for tomato soup."]))
    out = router.route(queries)
    assert [d.expert for d in out] == [best, best, "chef"]
    assert out[0].scores["chef"] < means[best] < out[2].scores["chef"]
    # outside_profile: descriptions scores everyone by cosine to the descriptions instead
    desc = build_online_router(cfg.model_copy(update={"outside_profile": "descriptions"}), experts, embedder=embedder)
    cos = desc.route(queries)[0].scores
    assert cos != pytest.approx(means) and all(-1.0 <= v <= 1.0 for v in cos.values())


def test_router_that_needs_outcomes_is_refused_without_fitted(default_cfg, embedder):
    with pytest.raises(ConfigError, match="needs outcome data"):
        build_online_router(RouterConfig(name="knn"), default_cfg.experts, embedder=embedder)
    with pytest.raises(ConfigError, match="not a fitted router folder"):
        build_online_router(RouterConfig(fitted="/nonexistent"), default_cfg.experts, embedder=embedder)


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, coe.routers, coe.routers.microbatch, coe.routers.embedders, coe.config; "
            "coe.config.load_config(); print([m for m in ('torch', 'faiss', 'sentence_transformers', 'onnxruntime', "
            "'model2vec') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# --------------------------------------------------------------------------- router.params (#10)


def test_router_params_are_checked_against_the_router():
    from coe.routers import check_router_config

    with pytest.raises(ConfigError, match=r"router.params: router 'knn' params are invalid: kk.*allowed: k, shrink"):
        check_router_config(RouterConfig(name="knn", params={"kk": 3}))
    with pytest.raises(ConfigError, match="router.params: .*calibrate"):
        check_router_config(RouterConfig(name="centroid", params={"calibrate": "sometimes"}))
    with pytest.raises(ConfigError, match="router.name: unknown router 'nope'; available: .*centroid"):
        check_router_config(RouterConfig(name="nope"))
    assert check_router_config(RouterConfig(name="knn", params={"k": 7})).k == 7


def test_serving_router_refuses_params_the_router_does_not_take(default_cfg, embedder):
    cfg = default_cfg.router.model_copy(update={"params": {"calibrate": "sometimes"}})
    with pytest.raises(ConfigError, match="router.params: router 'centroid' params are invalid"):
        build_online_router(cfg, default_cfg.experts, embedder=embedder)


def test_centroid_params_reach_the_serving_router(default_cfg, embedder):
    cfg = default_cfg.router.model_copy(update={"params": {"calibrate": False}})
    router = build_online_router(cfg, default_cfg.experts, embedder=embedder)
    assert router.params == {"calibrate": False}
    assert build_online_router(default_cfg.router, default_cfg.experts, embedder=embedder).params == {"calibrate": True}


def test_params_contradicting_the_fitted_router_are_refused(tmp_path, synthetic, embedder):
    from coe.routers import create_router, save_router

    train, xtr, *_ = synthetic
    save_router(create_router("knn", {"k": 5}).fit(train, xtr), tmp_path / "fitted", embedder="minilm-l6")
    experts = [ModelExpert(id="general", model="smollm2-135m-instruct")]
    fitted = str(tmp_path / "fitted")
    same = RouterConfig(name="knn", fitted=fitted, params={"k": 5})
    assert build_online_router(same, experts, embedder=embedder).params["k"] == 5
    with pytest.raises(ConfigError, match=r"router.params \{'k': 9\} differ .* fitted with \{'k': 5\}"):
        build_online_router(RouterConfig(name="knn", fitted=fitted, params={"k": 9}), experts, embedder=embedder)
    with pytest.raises(ConfigError, match="holds a 'knn' router but router.name is 'centroid'"):
        build_online_router(RouterConfig(name="centroid", fitted=fitted, params={"calibrate": False}), experts,
                            embedder=embedder)


# --------------------------------------------------------------------------- cache hits and micro-batching


def test_decisions_say_whether_the_embedding_was_cached(default_cfg, minilm_dir):
    from coe.routers.embedding import Embedder

    router = build_online_router(default_cfg.router, default_cfg.experts, embedder=Embedder(str(minilm_dir)))
    query = "How many legs do three spiders have in total?"
    first, again = router.route([query, query])
    assert not first.cached and again.cached   # a repeat within one batch is embedded once
    assert router.route([query])[0].cached
    fresh = build_online_router(default_cfg.router, default_cfg.experts,
                                embedder=Embedder(str(minilm_dir), memory_items=0))
    assert not any(d.cached for d in fresh.route([query]) + fresh.route([query]))


def test_service_metrics_count_cache_hits_apart():
    from coe.serving.metrics import ServiceMetrics

    m = ServiceMetrics()
    m.observe_routing(0.004, cached=False)
    m.observe_routing(0.0001, cached=True)
    m.observe_routing(0.0001, cached=True)
    text = m.render().decode()
    assert "coe_routing_latency_seconds_count 1.0" in text
    assert "coe_routing_cache_hits_total 2.0" in text


class _CountingRouter:
    """Batch router that records the batches it was given (thread-safe enough: one batch at a time)."""

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on

    def route(self, queries):
        import time

        self.batches.append(list(queries))
        time.sleep(self.delay_s)
        if self.fail_on in queries:
            raise ExpertNotFoundError("no experts are registered; nothing to route to")
        return [f"decision:{q}" for q in queries]


def test_microbatcher_coalesces_concurrent_queries_in_order():
    import asyncio

    from coe.routers.microbatch import MicroBatcher

    inner = _CountingRouter(delay_s=0.02)
    batcher = MicroBatcher(inner.route, max_batch=8, max_wait_ms=5)

    async def main():
        return await asyncio.gather(*(batcher.route(f"q{i}") for i in range(20)))

    out = asyncio.run(main())
    assert out == [f"decision:q{i}" for i in range(20)]
    assert [len(b) for b in inner.batches] == [8, 8, 4]          # bounded by max_batch, nothing lost
    assert [q for b in inner.batches for q in b] == [f"q{i}" for i in range(20)]


def test_microbatcher_queues_behind_a_batch_in_flight_and_bounds_the_wait():
    import asyncio
    import time

    from coe.routers.microbatch import MicroBatcher

    inner = _CountingRouter(delay_s=0.05)
    batcher = MicroBatcher(inner.route, max_batch=64, max_wait_ms=0)

    async def main():
        t0 = time.perf_counter()
        first = asyncio.create_task(batcher.route("alone"))
        await asyncio.sleep(0.01)                       # "alone" is being routed now
        rest = await asyncio.gather(*(batcher.route(f"q{i}") for i in range(5)))
        return await first, rest, time.perf_counter() - t0

    first, rest, took = asyncio.run(main())
    assert first == "decision:alone" and rest == [f"decision:q{i}" for i in range(5)]
    assert inner.batches == [["alone"], [f"q{i}" for i in range(5)]]   # the five waited together
    assert took < 0.5

    waited = MicroBatcher(_CountingRouter().route, max_batch=64, max_wait_ms=30)

    async def lone():
        t0 = time.perf_counter()
        await waited.route("x")
        return time.perf_counter() - t0

    assert 0.025 <= asyncio.run(lone()) < 0.5   # a lone query waits max_wait_ms, no longer


def test_microbatcher_passes_router_errors_to_every_waiter_and_recovers():
    import asyncio

    from coe.routers.microbatch import MicroBatcher

    inner = _CountingRouter(fail_on="bad")
    batcher = MicroBatcher(inner.route, max_batch=4, max_wait_ms=5)

    async def main():
        res = await asyncio.gather(batcher.route("bad"), batcher.route("ok"), return_exceptions=True)
        return res, await batcher.route("later")

    res, later = asyncio.run(main())
    assert all(isinstance(r, ExpertNotFoundError) for r in res)
    assert later == "decision:later"
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(inner.route, max_batch=0)


def test_batcher_for_reuses_one_batcher_per_router(default_cfg):
    from coe.routers.microbatch import batcher_for

    a, b = _CountingRouter(), _CountingRouter()
    cfg = default_cfg.router.model_copy(update={"batch_max_queries": 3, "batch_wait_ms": 0.5})
    assert batcher_for(a, cfg) is batcher_for(a, cfg) and batcher_for(a, cfg) is not batcher_for(b, cfg)
    assert batcher_for(a, cfg).max_batch == 3


def test_online_router_under_concurrent_requests_embeds_in_batches(default_cfg, minilm_dir):
    """The real router behind the batcher: 24 concurrent distinct queries, far fewer model calls."""
    import asyncio

    from coe.routers.embedding import Embedder
    from coe.routers.microbatch import batcher_for

    emb = Embedder(str(minilm_dir), memory_items=0)
    router = build_online_router(default_cfg.router, default_cfg.experts, embedder=emb)
    batcher = batcher_for(router, default_cfg.router)
    queries = [f"Write a python function that returns {i} squared." for i in range(12)] + [
        f"A farmer has {i} cows and buys 3 more. How many cows?" for i in range(12)]

    async def main():
        return await asyncio.gather(*(batcher.route(q) for q in queries))

    out = asyncio.run(main())
    assert [d.expert for d in out] == ["smollm2-code"] * 12 + ["smollm2-math"] * 12
    assert batcher.batches <= 4 and batcher.largest_batch >= 8
    assert not any(d.cached for d in out)
