"""The routing plan (issue 25): the policy ranks every expert by quality, cost and live load,
never picks a down one, and /v1/route and a traced chat answer carry the plan. Unit tests of
the policy and the admission measurements, then the in-process service (tiny llama, real engines)."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from coe.config import AdmissionConfig, ModelExpert
from coe.errors import ConfigError
from coe.routers.policy import ExpertLoad, SelectionPolicy
from coe.serving.api.admission import Admission, Deadline
from tests.serving.serving_helpers import (
    Decision,
    Harness,
    KeywordRouter,
    error_of,
    tiny_config_dict,
)

FIELDS = ["expert", "quality", "uncertainty", "cost", "queue_depth", "running", "expected_wait_ms",
          "resident", "swap_ms", "healthy"]
COST = {"a": 1.0, "b": 1.0, "c": 1.0}


# ------------------------------------------------------------------ the policy


def test_load_weight_prefers_a_less_loaded_expert_of_similar_quality():
    quality = {"a": 0.80, "b": 0.78, "c": 0.20}
    load = {"a": ExpertLoad(queue_depth=6, running=4, expected_wait_s=3.0)}
    assert SelectionPolicy(load_weight=0.0).plan(["a", "b", "c"], quality, COST, load=load).expert == "a"
    plan = SelectionPolicy(load_weight=0.05).plan(["a", "b", "c"], quality, COST, load=load)
    assert [c.expert for c in plan.candidates] == ["b", "a", "c"]   # 0.80 − 0.05·3 < 0.78
    # but not a much worse one: quality still wins over a small wait
    assert SelectionPolicy(load_weight=0.05).plan(["a", "c"], quality, COST, load=load).expert == "a"
    # the swap-in of a pooled expert counts as waiting too
    swap = {"a": ExpertLoad(resident=False, swap_s=2.0)}
    assert SelectionPolicy(load_weight=0.05).plan(["a", "b"], quality, COST, load=swap).expert == "b"


def test_tradeoff_with_load_is_quality_minus_lambda_cost_minus_mu_wait():
    q = np.array([[0.9, 0.7, 0.6]])
    cost, wait = np.array([4.0, 1.0, 1.0]), np.array([0.0, 2.0, 0.0])
    policy = SelectionPolicy("tradeoff", lam=0.05, load_weight=0.1)
    objective = q - 0.05 * cost - 0.1 * wait                      # [0.7, 0.45, 0.55]
    assert policy.rank(q, cost, delay=wait)[0].tolist() == list(np.argsort(-objective[0]))
    assert policy.select(q, cost, delay=wait).tolist() == [0]


def test_zero_load_weight_keeps_todays_choice():
    rng = np.random.default_rng(0)
    q = rng.random((200, 4))
    q[::7, 1] = q[::7, 0]                                        # exact ties too
    cost = np.array([3.0, 1.0, 2.0, 1.0])
    delay = rng.random((200, 4)) * 10
    for policy in (SelectionPolicy(), SelectionPolicy("tradeoff", lam=0.1), SelectionPolicy("threshold", tau=0.6)):
        eps = 1e-9 * cost / cost.max()                           # the policy's documented rule, written out
        if policy.mode == "max_quality":
            today = np.argmax(q - eps, axis=1)
        elif policy.mode == "tradeoff":
            today = np.argmax(q - 0.1 * cost - eps, axis=1)
        else:
            ok = q >= 0.6
            today = np.where(ok.any(axis=1), np.argmin(np.where(ok, cost, np.inf) + eps, axis=1),
                             np.argmax(q - eps, axis=1))
        assert (policy.select(q, cost, delay=delay) == today).all(), policy.mode
        assert (policy.rank(q, cost)[:, 0] == today).all(), policy.mode


def test_a_down_server_is_never_picked():
    quality = {"a": 0.9, "b": 0.5, "c": 0.1}
    down = {"a": ExpertLoad(healthy=False), "b": ExpertLoad(healthy=False)}
    for mu in (0.0, 10.0):
        plan = SelectionPolicy(load_weight=mu).plan(["a", "b", "c"], quality, COST, load=down)
        assert plan.expert == "c" and [c.healthy for c in plan.candidates] == [True, False, False]
        assert plan.ranked() == ["c"]
    # not as the router's override (head) either, nor as the uncertainty fallback expert
    assert SelectionPolicy().plan(["a", "b", "c"], quality, COST, load=down, head="a").expert == "c"
    unsure = SelectionPolicy(fallback_expert="b", max_uncertainty=0.1)
    assert unsure.plan(["a", "b", "c"], quality, COST, uncertainty={"c": 0.5}, load=down).expert == "c"
    assert unsure.plan(["a", "b", "c"], quality, COST, uncertainty={"a": 0.5}).expert == "b"


def test_the_router_override_leads_whatever_the_load():
    quality = {"a": 0.9, "b": 0.5}
    busy = {"b": ExpertLoad(expected_wait_s=100.0)}
    assert SelectionPolicy(load_weight=1.0).plan(["a", "b"], quality, COST, load=busy, head="b").expert == "b"


def test_load_weight_below_zero_is_refused_by_the_config():
    from coe.config import parse_config

    def config(**policy):
        return parse_config({"router": {"policy": policy},
                             "experts": [{"id": "m", "kind": "model", "model": "m", "description": "d"}]})

    assert config().router.policy.load_weight == 0.0
    ok = config(load_weight=0.5)
    assert ok.router.policy.load_weight == 0.5 == SelectionPolicy.from_config(ok.router.policy).load_weight
    with pytest.raises(ConfigError, match="load_weight"):
        config(load_weight=-0.1)


# ------------------------------------------------------------------ admission's measurements


def test_admission_measures_service_time_and_expected_wait():
    async def go():
        adm = Admission(AdmissionConfig(max_running_per_expert=2, max_queued_per_expert=4, max_queue_wait_s=5),
                        server_of=lambda e: "s")
        dl = Deadline(10)
        assert adm.service_time_s("x") is None and adm.expected_wait_s("x") == 0.0
        for _ in range(2):
            await adm.acquire("x", dl)
        await asyncio.sleep(0.1)
        assert adm.expected_wait_s("x") >= 0.1 / 2   # full, nothing ended yet: the oldest's age
        adm.release("x")
        adm.release("x")
        measured = adm.service_time_s("x")
        assert 0.1 <= measured < 1.0 and adm.service_time_s("y") == measured   # per server
        assert adm.expected_wait_s("x") == 0.0                                  # room again
        for _ in range(2):
            await adm.acquire("x", dl)
        waiters = [asyncio.create_task(adm.acquire("x", dl)) for _ in range(3)]
        await asyncio.sleep(0)
        assert adm.queue_depth("x") == 3 and adm.running("x") == 2
        assert adm.expected_wait_s("x") == pytest.approx(4 * measured / 2)     # (3 + 1) × S / 2 slots
        for _ in range(5):
            adm.release("x")
            await asyncio.sleep(0)
        await asyncio.gather(*waiters)
        assert adm.queue_depth("x") == 0 and adm.running("x") == 0

    asyncio.run(go())


# ------------------------------------------------------------------ the service


class ScoredRouter(KeywordRouter):
    """A router double with fixed, close scores: 'tiny-a' best, 'tiny-b' a near second (the expert
    bookkeeping is KeywordRouter's)."""

    name = "scored-test"

    def __init__(self, expert_ids):
        super().__init__(expert_ids, default="tiny-a")

    def route(self, queries):
        return [Decision("tiny-a", {"tiny-a": 0.80, "tiny-b": 0.79, "tiny": 0.30}, self.name) for _ in queries]


@pytest.fixture(scope="module")
def h(loop_thread, tiny_llama_dir, tiny_loras, serving_root, tmp_path_factory):
    from coe.config import parse_config

    root = tmp_path_factory.mktemp("plan")
    (root / "adapters").symlink_to(serving_root / "adapters")
    data = tiny_config_dict(tiny_llama_dir, tiny_loras, root, flaky=False,
                            admission={"max_running_per_expert": 1, "max_queued_per_expert": 4})
    config = parse_config(data)
    harness = Harness(loop_thread, config, root, router=ScoredRouter(e.id for e in config.experts))
    yield harness
    harness.close()


@pytest.fixture
def policy(h):
    """Set the service's policy for one test."""
    before = h.service.policy

    def use(**kw):
        h.service.policy = dataclasses.replace(before, **kw)

    yield use
    h.service.policy = before


def _route(h, query="which expert ?"):
    r = h.request("POST", "/v1/route", json={"query": query})
    assert r.status_code == 200, r.text
    return r.json()


def test_route_answers_the_plan_best_first(h):
    body = _route(h)
    assert {"expert", "router", "scores", "pinned", "routing_ms"} <= set(body)        # the fields of before
    cands = body["candidates"]
    assert [list(c) for c in cands] == [FIELDS] * 3
    assert [c["expert"] for c in cands] == ["tiny-a", "tiny-b", "tiny"] and body["expert"] == "tiny-a"
    assert [c["quality"] for c in cands] == [0.80, 0.79, 0.30]
    assert all(c["healthy"] and c["resident"] and c["queue_depth"] == 0 and c["expected_wait_ms"] == 0
               and c["cost"] == 1.0 and c["uncertainty"] is None for c in cands)


def _hold(h, expert, seconds):
    """Run one real request's worth of admission on ``expert``: a slot held ``seconds`` then
    released (a measured service time), then a slot taken and kept (the expert is full)."""
    adm = h.service.admission

    async def go():
        await adm.acquire(expert, Deadline(30))
        await asyncio.sleep(seconds)
        adm.release(expert)
        await adm.acquire(expert, Deadline(30))

    h.lt.run(go())


def test_load_aware_route_goes_to_a_less_loaded_expert_of_similar_quality(h, policy):
    _hold(h, "tiny-a", 0.2)       # tiny-a: its one slot taken, ~0.2 s per request
    try:
        body = _route(h)
        assert body["expert"] == "tiny-a"                       # load_weight 0: today's choice
        a = next(c for c in body["candidates"] if c["expert"] == "tiny-a")
        assert a["running"] == 1 and a["expected_wait_ms"] >= 30
        policy(load_weight=0.5)                                 # 0.80 − 0.5·0.2 < 0.79
        body = _route(h)
        assert body["expert"] == "tiny-b" and [c["expert"] for c in body["candidates"]][:2] == ["tiny-b", "tiny-a"]
        chat = h.chat("hello", coe={"trace": True})
        assert chat.status_code == 200 and chat.json()["model"] == "tiny-b"
        assert chat.json()["coe"]["fallback_from"] is None     # a choice of the policy, not a fallback
    finally:
        h.service.admission.release("tiny-a")


def test_route_skips_an_expert_marked_down(h, policy):
    policy(load_weight=0.5)
    h.service.catalog.health.mark_down(["tiny-a"], "test")
    try:
        body = _route(h)
        assert body["expert"] == "tiny-b"
        assert [(c["expert"], c["healthy"]) for c in body["candidates"]][-1] == ("tiny-a", False)
    finally:
        h.service.catalog.health.mark_up(["tiny-a"])


def test_chat_carries_the_plan_only_when_traced(h):
    plain = h.chat("hello")
    assert plain.status_code == 200 and plain.json()["coe"]["candidates"] is None
    traced = h.chat("hello", coe={"trace": True})
    assert traced.status_code == 200, traced.text
    cands = traced.json()["coe"]["candidates"]
    assert [c["expert"] for c in cands] == ["tiny-a", "tiny-b", "tiny"] and list(cands[0]) == FIELDS
    pinned = h.chat("hello", model="tiny", coe={"trace": True}).json()["coe"]["candidates"]
    assert [c["expert"] for c in pinned] == ["tiny"] and pinned[0]["quality"] is None
    streamed = h.chat("hello", coe={"trace": True}, stream=True)
    assert streamed.status_code == 200 and '"candidates":[{"expert":"tiny-a"' in streamed.text


@pytest.mark.parametrize("coe, field", [
    ({"trace": True, "explain": 1}, "coe.explain"),
    ({"trace": "yes"}, "coe.trace"),
    ("trace", "coe"),
])
def test_bad_coe_options_get_a_400_naming_the_field(h, coe, field):
    r = h.chat("hello", coe=coe)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and "allowed keys: trace" in error_of(r)


def test_plan_reads_the_pools_residency_and_swap_cost():
    """A pooled expert's residency and swap-in cost come from the pool server's stats (what
    ``PoolEngine.stats`` reports, measured by ``ExpertPool.swap_in_s``: tests/pool/test_pool_swap_cost.py);
    here a backend answers them in that shape, without loading a pool."""
    from coe.serving.api.catalog import ExpertCatalog
    from coe.serving.api.live import LiveState
    from coe.serving.deployments.spec import POOL_SERVER

    class Backend:
        async def stats(self):
            return {POOL_SERVER: {"engine": {"resident": ["p0"], "swap_in_s": {"p0": 0.0, "p1": 0.25}}}}

    pooled = [ModelExpert(id=i, model="m", description="d", pooled=True) for i in ("p0", "p1")]
    cat = ExpertCatalog(pooled, config_ids=["p0", "p1"], router=None)
    live = LiveState(cat, Admission(AdmissionConfig()), Backend(), refresh_s=0.0)

    async def go():
        first = live.loads(["p0", "p1"])             # asks in the background; nothing known yet
        await asyncio.sleep(0.01)
        return first, live.loads(["p0", "p1"])

    first, then = asyncio.run(go())
    assert first["p0"].resident is None and first["p1"].swap_s is None
    assert then["p0"].resident is True and then["p1"].resident is False and then["p1"].swap_s == 0.25
    plan = SelectionPolicy(load_weight=1.0).plan(["p1", "p0"], {"p0": 0.5, "p1": 0.6}, {"p0": 1, "p1": 1},
                                                 load=then)
    assert plan.expert == "p0" and plan.candidates[1].swap_ms == 250.0


def test_the_residency_view_follows_the_requests_sent_between_reads():
    """Decisions between two reads of the pool's stats see the swaps of the requests just routed:
    the expert sent a request becomes the most recently used resident, the least recently used
    one leaves past ``max_resident``; a read asked for before a request gets it replayed."""
    from coe.serving.api.catalog import ExpertCatalog
    from coe.serving.api.live import LiveState
    from coe.serving.deployments.spec import POOL_SERVER

    class Backend:
        def __init__(self):
            self.gate = asyncio.Event()

        async def stats(self):
            await self.gate.wait()                    # the pool answers what it held when asked
            return {POOL_SERVER: {"engine": {"resident": ["p0", "p1"], "max_resident": 2,
                                             "swap_in_s": {"p0": 0.0, "p1": 0.0, "p2": 0.3}}}}

    pooled = [ModelExpert(id=i, model="m", description="d", pooled=True) for i in ("p0", "p1", "p2")]
    cat = ExpertCatalog(pooled, config_ids=["p0", "p1", "p2"], router=None)
    backend = Backend()
    live = LiveState(cat, Admission(AdmissionConfig()), backend, refresh_s=0.0)
    ids = ["p0", "p1", "p2"]

    async def go():
        live.loads(ids)                              # first read, answered below
        backend.gate.set()
        await asyncio.sleep(0.01)
        before = live.loads(ids)
        backend.gate.clear()                         # the next read is asked now, answered later
        live.dispatched("p2")                        # p2 swaps in; p0 (LRU) leaves
        after = live.loads(ids)
        backend.gate.set()
        await asyncio.sleep(0.01)                    # the stale read lands: the request is replayed on it
        return before, after, live.loads(ids)

    before, after, replayed = asyncio.run(go())
    assert [before[e].resident for e in ids] == [True, True, False] and before["p2"].swap_s == 0.3
    for view in (after, replayed):
        assert [view[e].resident for e in ids] == [False, True, True]
        assert view["p0"].swap_s == 0.3              # evicted by the view: priced as the measured swap
