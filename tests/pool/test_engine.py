"""PoolEngine on CPU: same tokens as the transformers engine, grouped sessions, errors, cancel."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("torch")

from coe.config import EngineConfig, PoolConfig
from coe.errors import ContextLengthError, ExpertNotFoundError
from coe.types import ChatMessage, Dispatch, GenerationRequest, SamplingParams
from tests.helpers import generate, generate_batch

CPU = EngineConfig(kind="hf", device="cpu", max_num_seqs=8, max_model_len=128)
GREEDY = SamplingParams(max_tokens=6, temperature=0)
QUESTIONS = ["what is the capital of france ?", "hello world", "1 + 2 = ?", "python def return x"]


def _req(i, expert, question=None, sampling=GREEDY):
    q = question or QUESTIONS[i % len(QUESTIONS)]
    return Dispatch(GenerationRequest(f"r{i}", messages=[ChatMessage(role="user", content=q)], sampling=sampling),
                    expert=expert)


async def _burst(engine, requests):
    """Submit all requests before the worker may pick any (so grouping is deterministic)."""
    with engine._cond:
        tasks = [asyncio.create_task(generate(engine, r)) for r in requests]
        await asyncio.sleep(0.05)  # every stream has enqueued its row by now
    return await asyncio.gather(*tasks)


def _engine(experts, **pool):
    from coe.serving.pool.engine import PoolEngine

    return PoolEngine({k: str(v) for k, v in experts.items()}, PoolConfig(**pool), CPU)


def test_pool_matches_hf_engine_and_groups_sessions(tiny_experts):
    from coe.serving.engines.hf import HFEngine

    experts = {k: tiny_experts[k] for k in ("e0", "e1", "e2")}
    order = ["e0", "e1", "e2", "e1", "e0", "e1", "e2", "e1"]
    requests = [_req(i, e) for i, e in enumerate(order)]

    async def main():
        expected = {}
        for eid, path in experts.items():
            hf = HFEngine(str(path), CPU)
            await hf.start()
            for r in requests:
                if r.expert == eid:
                    expected[r.request_id] = (await generate(hf, r)).token_ids
            await hf.stop()
        engine = _engine(experts, max_resident=1, swap="always", policy="largest_group")
        await engine.start()
        outs = await _burst(engine, requests)
        pool = engine.pool
        await engine.stop()  # joins the worker: its last session is recorded
        sessions, swaps = list(engine.sessions), pool.stats.swaps
        return expected, outs, sessions, swaps

    expected, outs, sessions, swaps = asyncio.run(main())
    for r, out in zip(requests, outs):
        assert out.token_ids == expected[r.request_id], r.request_id
        assert out.completion_tokens == len(out.token_ids) > 0
    assert sessions == [("e1", 4), ("e0", 2), ("e2", 2)]  # largest group first, one session each
    assert swaps == 3


def test_fcfs_serves_in_arrival_order_with_more_swaps(tiny_experts):
    experts = {k: tiny_experts[k] for k in ("e0", "e1")}
    order = ["e0", "e1", "e0", "e1", "e1"]

    async def main():
        engine = _engine(experts, max_resident=1, swap="always", policy="fcfs")
        await engine.start()
        await _burst(engine, [_req(i, e) for i, e in enumerate(order)])
        pool = engine.pool
        await engine.stop()  # joins the worker: its last session is recorded
        sessions, swaps = list(engine.sessions), pool.stats.swaps
        return sessions, swaps

    sessions, swaps = asyncio.run(main())
    assert sessions == [("e0", 1), ("e1", 1), ("e0", 1), ("e1", 2)]
    assert swaps == 4


def test_errors_and_cancellation(tiny_experts):
    experts = {"e0": tiny_experts["e0"], "e1": tiny_experts["e1"]}

    async def main():
        engine = _engine(experts)  # CPU 'auto': everyone resident, same API
        await engine.start()
        with pytest.raises(ExpertNotFoundError, match="this pool serves: e0, e1"):
            await generate(engine, _req(0, "nope"))
        with pytest.raises(ExpertNotFoundError):
            await generate(engine, _req(0, None))
        with pytest.raises(ContextLengthError):
            await generate(engine, _req(0, "e0", sampling=SamplingParams(max_tokens=500)))
        long = SamplingParams(max_tokens=100, temperature=1.0, seed=1)
        stream = engine.stream(_req(1, "e1", sampling=long))
        first = await stream.__anext__()
        await stream.aclose()  # the caller went away
        out = await generate(engine, _req(2, "e1"))
        assert out.completion_tokens > 0 and first.completion_tokens == 1
        assert engine.pool.stats.swaps == 0
        await engine.stop()
        assert not await engine.healthy()

    asyncio.run(main())


def test_registered_as_pool_engine():
    from coe.serving.engines.base import get_engine_class
    from coe.serving.pool.engine import PoolEngine

    assert get_engine_class("pool") is PoolEngine


def test_one_bad_request_does_not_fail_its_batch_and_sessions_are_bounded(tiny_experts, monkeypatch):
    from coe.errors import InvalidRequestError
    from coe.serving.pool.engine import PoolEngine
    from coe.types import GenerationOutput

    monkeypatch.setattr(PoolEngine, "SESSION_LOG", 2)
    experts = {"e0": tiny_experts["e0"], "e1": tiny_experts["e1"]}
    bad = Dispatch(GenerationRequest("bad", messages=[ChatMessage(role="user", content="x")],
                                     sampling=SamplingParams.model_construct(max_tokens=6, temperature=0.7, top_p=1.0,
                                                                             stop=[], seed=2**64)),  # past the API's checks
                   expert="e0")
    reqs = [_req(i, "e0") for i in range(7)]

    async def main():
        engine = _engine(experts)
        await engine.start()
        outs = await generate_batch(engine, reqs[:4] + [bad] + reqs[4:])
        alone = [await generate(engine, r) for r in reqs]
        for i in range(3):
            await generate(engine, _req(i, "e1"))
        await engine.stop()
        return engine, outs, alone

    engine, outs, alone = asyncio.run(main())
    assert isinstance(outs[4], InvalidRequestError) and outs[4].param == "seed"
    good = outs[:4] + outs[5:]
    assert all(isinstance(o, GenerationOutput) for o in good)
    assert [o.token_ids for o in good] == [o.token_ids for o in alone]
    assert len(engine.sessions) == 2 and engine.sessions[-1] == ("e1", 1)  # only the last SESSION_LOG kept
    assert engine.sessions_served >= 4


def test_from_config_takes_pooled_model_experts(tiny_experts):
    from coe.config import parse_config
    from coe.errors import ConfigError
    from coe.serving.pool.engine import PoolEngine

    hf = {"kind": "hf", "device": "cpu"}
    data = {
        "experts": [
            {"id": "a", "kind": "model", "model": str(tiny_experts["e0"]), "engine": hf, "pooled": True},
            {"id": "b", "kind": "model", "model": str(tiny_experts["e1"]), "engine": hf, "pooled": True},
            {"id": "h", "kind": "model", "model": str(tiny_experts["e1"]), "engine": hf},  # own deployment
            {"id": "v", "kind": "model", "model": "smollm2-135m-instruct"},  # vLLM: not pooled
        ],
        "serving": {"pool": {"max_resident": 1, "pinned": ["a"], "policy": "oldest_first"}},
    }
    engine = PoolEngine.from_config(parse_config(data))
    assert engine.experts == {"a": str(tiny_experts["e0"]), "b": str(tiny_experts["e1"])}
    assert engine.pool_config.pinned == ["a"] and engine.config.device == "cpu"
    with pytest.raises(ConfigError, match="pooled is true but serving.pool is not set"):
        parse_config({**data, "serving": {}})
    with pytest.raises(ConfigError, match="allowed: pooled `model` experts: a, b"):
        parse_config({**data, "serving": {"pool": {"pinned": ["zz"]}}})
    vllm_pooled = {"id": "w", "kind": "model", "model": "m", "pooled": True}
    with pytest.raises(ConfigError, match="pooled needs engine.kind 'hf'"):
        parse_config({**data, "experts": data["experts"] + [vllm_pooled]})
    lora_on_pooled = {"id": "l", "kind": "lora", "base": "a", "adapter": "/x"}
    with pytest.raises(ConfigError, match="pooled models host no adapters"):
        parse_config({**data, "experts": data["experts"] + [lora_on_pooled]})


def test_expert_server_hosts_the_pool(tiny_experts):
    """Pooled experts share one expert server (one deployment) whose engine is the pool."""
    from coe.config import parse_config
    from coe.serving.deployments.spec import POOL_SERVER, plan_servers, server_id_of

    hf = {"kind": "hf", "device": "cpu"}
    cfg = parse_config({
        "experts": [
            {"id": "a", "kind": "model", "model": str(tiny_experts["e0"]), "engine": hf, "pooled": True},
            {"id": "b", "kind": "model", "model": str(tiny_experts["e1"]), "engine": hf, "pooled": True},
            {"id": "h", "kind": "model", "model": str(tiny_experts["e2"]), "engine": hf},
        ],
        "serving": {"pool": {"max_resident": 1, "swap": "always"}},
    })
    specs = plan_servers(cfg.experts, base_dir=None, batching=cfg.serving.batching, pool=cfg.serving.pool)
    assert sorted(specs) == sorted([POOL_SERVER, "expert-h"])
    assert [server_id_of(e) for e in cfg.experts] == [POOL_SERVER, POOL_SERVER, "expert-h"]
    spec = specs[POOL_SERVER]
    assert spec.engine_kind == "pool" and spec.expert_ids() == ["a", "b"]
    asyncio.run(_serve_pool(spec))


async def _serve_pool(spec):
    from coe.serving.deployments.expert_server import ExpertServer
    from coe.types import GenerationRequest, SamplingParams

    server = ExpertServer(spec)
    await server.start()
    try:
        assert server.ready() == {"a": None, "b": None}
        outs = {}
        for eid in ("a", "b", "a"):
            req = GenerationRequest(request_id=eid, prompt="the capital of",
                                    sampling=SamplingParams(max_tokens=4, temperature=0))
            out = await generate(server, req, expert=eid)
            outs.setdefault(eid, []).append(out.token_ids)
            assert out.completion_tokens >= 1
        assert outs["a"][0] == outs["a"][1]
        assert server.engine.pool.stats.swaps >= 2  # room for one: a → b → a swaps
    finally:
        await server.stop()


@pytest.mark.gpu
def test_cuda_pool_engine_swaps_and_prefetches(tiny_experts):
    experts = dict(tiny_experts)
    order = ["e0", "e1", "e2", "e3", "e0", "e2", "e1", "e3"] * 2
    requests = [_req(i, e) for i, e in enumerate(order)]

    async def main():
        from coe.serving.pool.engine import PoolEngine

        cuda = EngineConfig(kind="hf", device="cuda", dtype="float32", max_num_seqs=8, max_model_len=128)
        engine = PoolEngine({k: str(v) for k, v in experts.items()}, PoolConfig(max_resident=2), cuda)
        await engine.start()
        outs = await _burst(engine, requests)
        pool = engine.pool
        await engine.stop()
        return outs, pool

    outs, pool = asyncio.run(main())
    assert pool.swapping and pool.stats.swaps >= 2 and all(o.completion_tokens > 0 for o in outs)
    assert pool.stats.prefetches >= 1  # the next group's expert was copied in during compute


@pytest.mark.parametrize(("overdue_after_ms", "first"), [(60_000, "e1"), (1, "e0")])
def test_wait_bound_serves_an_overdue_rare_expert_first(tiny_experts, overdue_after_ms, first):
    experts = {"e0": tiny_experts["e0"], "e1": tiny_experts["e1"]}
    order = ["e0"] + ["e1"] * 4  # the rare expert's request is the oldest

    async def main():
        engine = _engine(experts, max_resident=1, swap="always", overdue_after_ms=overdue_after_ms)
        await engine.start()
        await _burst(engine, [_req(i, e) for i, e in enumerate(order)])
        await engine.stop()
        return engine.sessions

    sessions = asyncio.run(main())
    assert sessions[0][0] == first
    assert sorted(sessions) == [("e0", 1), ("e1", 4)]


def test_same_expert_requests_join_the_running_session(tiny_experts):
    async def main():
        engine = _engine({"e0": tiny_experts["e0"]}, swap="always")
        await engine.start()
        long = engine.stream(_req(0, "e0", sampling=SamplingParams(max_tokens=100, temperature=0)))
        await long.__anext__()  # the session is running
        late = await generate(engine, _req(1, "e0"))
        async for _ in long:
            pass
        stats = engine.stats()
        await engine.stop()
        return list(engine.sessions), late, stats

    sessions, late, stats = asyncio.run(main())
    assert late.completion_tokens > 0
    assert sessions == [("e0", 2)]  # one session: the late request joined the running batch
    assert stats["swaps"] == 1 and stats["resident"] == ["e0"] and stats["queued"] == {}


def test_stop_fails_queued_and_running_requests_cleanly(tiny_experts):
    from coe.errors import NotReadyError

    experts = {"e0": tiny_experts["e0"], "e1": tiny_experts["e1"]}
    long = SamplingParams(max_tokens=100, temperature=0)

    async def main():
        engine = _engine(experts, max_resident=1, swap="always", overdue_after_ms=60_000)
        await engine.start()
        tasks = [asyncio.create_task(generate(engine, _req(i, e, sampling=long))) for i, e in enumerate(["e0", "e1"])]
        while engine.running() <= sum(engine.queued().values()):
            await asyncio.sleep(0.01)  # wait until the first session is decoding
        await engine.stop()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert any(isinstance(r, NotReadyError) for r in results)  # the queued one at least
    assert all(isinstance(r, NotReadyError) or r.completion_tokens > 0 for r in results)
