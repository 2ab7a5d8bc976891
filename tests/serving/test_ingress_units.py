"""Units of the ingress without engines: the admission queue, the catalog's health and ranking,
and the mapping of Ray's errors (by type, without Ray's internals in the message)."""

from __future__ import annotations

import asyncio
import math

import pytest

from coe.config import AdmissionConfig, ModelExpert
from coe.errors import DeadlineExceededError, InvalidRequestError, OverloadedError
from coe.serving.api.admission import Admission, Deadline


def _run(coro):
    return asyncio.run(coro)


def test_admission_is_fifo_bounded_and_hands_slots_on():
    async def go():
        adm = Admission(AdmissionConfig(max_running_per_expert=1, max_queued_per_expert=2, max_queue_wait_s=5))
        dl = Deadline(10)
        await adm.acquire("e", dl)
        order = []

        async def wait(tag):
            await adm.acquire("e", dl)
            order.append(tag)

        waiters = [asyncio.ensure_future(wait(k)) for k in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError) as full:
            await adm.acquire("e", dl)
        assert full.value.retry_after_s == adm.config.retry_after_s
        assert await_nothing(adm) == (1, 2)
        adm.release("e")
        await asyncio.sleep(0)
        adm.release("e")
        await asyncio.gather(*waiters)
        adm.release("e")
        assert order == [0, 1] and await_nothing(adm) == (0, 0)
        assert await adm.acquire("other", dl) is None  # experts do not share slots

    _run(go())


def await_nothing(adm):
    return adm.running("e"), adm.waiting("e")


def test_admission_wait_timeout_deadline_and_cancellation_leak_nothing():
    async def go():
        adm = Admission(AdmissionConfig(max_running_per_expert=1, max_queued_per_expert=4, max_queue_wait_s=0.02))
        await adm.acquire("e", Deadline(10))
        with pytest.raises(OverloadedError):
            await adm.acquire("e", Deadline(10))
        with pytest.raises(DeadlineExceededError):
            await adm.acquire("e", Deadline(0.005))
        task = asyncio.ensure_future(adm.acquire("e", Deadline(10)))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert adm.waiting("e") == 0
        adm.release("e")
        assert adm.running("e") == 0

    _run(go())


def test_admission_bounds_a_server_shared_by_its_experts():
    """A base model and its LoRA share one server: its bound holds across both experts, a slot
    passes from one expert to the other, and a refusal at the server gives the expert slot back."""

    async def go():
        cfg = AdmissionConfig(max_running_per_expert=4, max_running_per_server=1, max_queued_per_server=1,
                              max_queue_wait_s=5)
        adm = Admission(cfg, server_of=lambda e: {"base": "s", "lora": "s"}.get(e))
        dl = Deadline(10)
        await adm.acquire("base", dl)
        queued = asyncio.ensure_future(adm.acquire("lora", dl))  # waits for the server, not its expert
        await asyncio.sleep(0)
        assert not queued.done() and adm.running("lora") == 1
        with pytest.raises(OverloadedError, match="server of expert 'base'"):
            await adm.acquire("base", dl)  # the server's queue (1) is full
        assert adm.running("base") == 1  # the refused request gave its expert slot back
        adm.release("base")
        await queued
        assert adm.running("base") == 0
        await adm.acquire("other", dl)  # no server: only the expert bound applies
        adm.release("lora")
        adm.release("other")
        await adm.acquire("base", dl)  # the server's slot is free again
        adm.release("base")
        assert (adm.running("base"), adm.running("lora"), adm.running("other")) == (0, 0, 0)

    _run(go())


def test_admission_server_wait_counts_toward_max_queue_wait():
    async def go():
        cfg = AdmissionConfig(max_running_per_server=1, max_queue_wait_s=0.05)
        adm = Admission(cfg, server_of=lambda e: "s")
        await adm.acquire("a", Deadline(10))
        with pytest.raises(OverloadedError, match="no slot within"):
            await adm.acquire("b", Deadline(10))
        assert adm.running("b") == 0
        adm.release("a")

    _run(go())


def test_plan_ranks_serving_experts_by_score_and_skips_down_ones():
    from coe.serving.api.catalog import ExpertCatalog

    class Router:
        def add_expert(self, e): ...
        def remove_expert(self, eid): ...

    experts = [ModelExpert(id=i, model="m", description="d") for i in ("a", "b", "c", "d")]
    cat = ExpertCatalog(experts, config_ids=["a"], router=Router())
    from coe.routers.policy import SelectionPolicy
    from coe.serving.api.admission import Admission
    from coe.serving.api.live import LiveState

    live = LiveState(cat, Admission(AdmissionConfig()), backend=None)

    def ranked(exclude=()):
        return live.plan(SelectionPolicy(), cat.ids(), scores, default="d").ranked(exclude, usable=cat.serving)

    scores = {"a": 0.1, "b": 0.9, "c": math.nan}
    assert ranked() == ["b", "a", "d", "c"]
    cat.health.mark_down(["b"], "test")
    assert ranked(exclude={"a"}) == ["d", "c"]
    assert cat.health.retry_after("b") > 0 and not cat.serving("b")
    cat.health.mark_up(["b"])
    assert cat.serving("b")
    snap = cat.snapshot()
    cat.remove("b")
    assert "b" in snap and "b" not in cat and cat.ids() == ["a", "c", "d"]


def test_text_checks_name_the_field():
    from coe.serving.api.validation import check_text

    check_text({"a": ["ok", {"b": "fine\x00"}]})
    with pytest.raises(InvalidRequestError) as err:
        check_text({"a": ["ok", {"b": "bad\ud800"}]})
    assert err.value.param == "a[1].b"
    with pytest.raises(InvalidRequestError) as err:
        check_text({"adapter": "/x\x00y"}, allow_nul=False)
    assert err.value.param == "adapter" and "NUL" in err.value.message


def test_ray_errors_are_mapped_by_type_without_internals():
    ray_exc = pytest.importorskip("ray.exceptions")
    from ray.serve.exceptions import BackPressureError

    from coe.errors import EngineError, ServerDownError
    from coe.serving.deployments.ray_deployments import map_ray_error

    wrapped = ray_exc.RayTaskError("generate", "Traceback ... pid=4242 ip=10.1.2.3",
                                   InvalidRequestError("bad stop", param="stop"), pid=4242, ip="10.1.2.3")
    for err in (wrapped, wrapped.as_instanceof_cause()):
        mapped = map_ray_error(err, "expert-x")
        assert type(mapped) is InvalidRequestError and mapped.param == "stop"
    died = map_ray_error(ray_exc.ActorDiedError(), "expert-x")
    assert isinstance(died, ServerDownError) and died.retry_after_s > 0
    gone = map_ray_error(ray_exc.ActorUnavailableError("node 10.1.2.3 unreachable", b"\x01" * 16), "expert-x")
    assert isinstance(gone, ServerDownError) and "10.1.2.3" not in gone.message
    crash = map_ray_error(ray_exc.RayTaskError("generate", "pid=4242 ip=10.1.2.3", RuntimeError("boom"),
                                               pid=4242, ip="10.1.2.3"), "expert-x")
    assert type(crash) is EngineError and "4242" not in crash.message and "10.1.2.3" not in crash.message
    assert isinstance(map_ray_error(BackPressureError(num_queued_requests=9, max_queued_requests=8), "x"),
                      OverloadedError)
    plain = ValueError("not Ray's")
    assert map_ray_error(plain, "x") is plain


def test_no_error_is_mapped_by_its_class_name():
    from coe.serving.api.errors import as_coe_error

    class RayLookalikeError(Exception):
        pass

    assert as_coe_error(RayLookalikeError("x")) is None


def test_routing_ms_is_the_whole_routing_time_queue_wait_included():
    """``coe.routing_ms`` (and the routing histogram) run from the hand-over to the micro-batcher
    until the decision is back: a query queued behind the batch in flight reports that wait too."""
    import time

    from coe.config import parse_config
    from coe.serving.api.service import CoEService
    from coe.types import ChatMessage
    from tests.serving.serving_helpers import Decision

    class SlowRouter:
        name = "slow"

        def route(self, queries):
            time.sleep(0.05)
            return [Decision("a", {"a": 1.0}, self.name) for _ in queries]

    config = parse_config({
        "router": {"name": "centroid", "default_expert": "a", "batch_wait_ms": 0},
        "experts": [{"id": "a", "kind": "model", "model": "m", "description": "d"}],
        "serving": {"faults": {"health_check_period_s": 0}},
    })
    service = CoEService(config, backend=None, router=SlowRouter())

    async def go():
        first = asyncio.ensure_future(service.decide("coe", [ChatMessage(role="user", content="one")]))
        await asyncio.sleep(0.01)   # "one" is being routed; "two" waits for the next batch
        second = await service.decide("coe", [ChatMessage(role="user", content="two")])
        return await first, second

    first, second = _run(go())
    assert first.routing_ms >= 50
    assert second.routing_ms >= 85   # ~40 ms behind "one", then its own 50 ms
    text = service.metrics.render().decode()
    assert "coe_routing_latency_seconds_count 2.0" in text
    total = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("coe_routing_latency_seconds_sum"))
    assert total >= 0.135
    assert "coe_routing_batch_size_count 2.0" in text   # two batches of one query each
    assert "coe_routing_batch_size_sum 2.0" in text
