"""Expert-grouped batching (no engine): windows, grouping, size limits, concurrency, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from coe.serving.deployments.batcher import ExpertGroupedBatcher


class Recorder:
    def __init__(self, delay=0.0, fail_on=None):
        self.calls: list[tuple[str, list[int]]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.active = 0
        self.max_active = 0

    async def __call__(self, key, requests):
        self.calls.append((key, list(requests)))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
            if key == self.fail_on:
                raise RuntimeError(f"{key} broke")
            return [r * 10 for r in requests]
        finally:
            self.active -= 1


def run(coro):
    return asyncio.run(coro)


def test_groups_by_expert_within_the_window():
    rec = Recorder()

    async def go():
        b = ExpertGroupedBatcher(rec, max_batch_size=16, window_ms=20)
        keys = ["a", "b", "c"] * 4
        outs = await asyncio.gather(*(b.submit(k, i) for i, k in enumerate(keys)))
        await b.close()
        return outs

    outs = run(go())
    assert [o for o, _ in outs] == [i * 10 for i in range(12)]
    assert all(size == 4 for _, size in outs)
    assert sorted(k for k, _ in rec.calls) == ["a", "b", "c"]  # one call per expert


def test_full_group_goes_without_waiting_and_splits_at_max_batch_size():
    rec = Recorder()

    async def go():
        b = ExpertGroupedBatcher(rec, max_batch_size=4, window_ms=5000)
        t0 = time.monotonic()
        outs = await asyncio.gather(*(b.submit("a", i) for i in range(8)))
        await b.close()
        return outs, time.monotonic() - t0

    outs, elapsed = run(go())
    assert elapsed < 1.0  # never waited for the 5 s window: the groups were full
    assert [len(r) for _, r in rec.calls] == [4, 4]
    assert [o for o, _ in outs] == [i * 10 for i in range(8)]


def test_window_bounds_the_wait_of_a_lone_request():
    rec = Recorder()

    async def go():
        b = ExpertGroupedBatcher(rec, max_batch_size=16, window_ms=30)
        t0 = time.monotonic()
        out = await b.submit("a", 1)
        await b.close()
        return out, time.monotonic() - t0

    (out, size), elapsed = run(go())
    assert out == 10 and size == 1
    assert 0.025 <= elapsed < 0.5


def test_one_batch_in_flight_collects_the_next_batch_meanwhile():
    rec = Recorder(delay=0.5)

    async def go():
        b = ExpertGroupedBatcher(rec, max_batch_size=16, window_ms=1, max_concurrent=1)
        first = asyncio.create_task(b.submit("a", 0))
        while not rec.calls:  # wait until batch 1 is running
            await asyncio.sleep(0.005)
        rest = [asyncio.create_task(b.submit("a", i)) for i in range(1, 6)]
        await asyncio.gather(first, *rest)
        await b.close()

    run(go())
    assert [len(r) for _, r in rec.calls] == [1, 5]
    assert rec.max_active == 1


def test_a_failing_batch_fails_only_its_expert():
    rec = Recorder(fail_on="bad")

    async def go():
        b = ExpertGroupedBatcher(rec, max_batch_size=8, window_ms=5)
        res = await asyncio.gather(b.submit("bad", 1), b.submit("good", 2), b.submit("bad", 3),
                                   return_exceptions=True)
        await b.close()
        return res

    res = run(go())
    assert isinstance(res[0], RuntimeError) and isinstance(res[2], RuntimeError)
    assert res[1] == (20, 1)


def test_cancelled_request_leaves_its_group():
    rec = Recorder()

    async def go():
        b = ExpertGroupedBatcher(rec, max_batch_size=8, window_ms=500)
        t = asyncio.create_task(b.submit("a", 1))
        keep = asyncio.create_task(b.submit("a", 2))
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        out = await keep
        await b.close()
        return out

    assert run(go()) == (20, 1)
    assert rec.calls == [("a", [2])]


def test_a_request_that_fails_alone_fails_only_itself():
    """run_batch may put an Exception in a request's place: only that request gets it."""

    async def run_batch(key, requests):
        return [ValueError(f"bad {r}") if r == 3 else r * 10 for r in requests]

    async def go():
        b = ExpertGroupedBatcher(run_batch, max_batch_size=8, window_ms=5)
        res = await asyncio.gather(*(b.submit("a", i) for i in range(5)), return_exceptions=True)
        await b.close()
        return res

    res = run(go())
    assert isinstance(res[3], ValueError) and str(res[3]) == "bad 3"
    assert [r for i, r in enumerate(res) if i != 3] == [(0, 5), (10, 5), (20, 5), (40, 5)]


class _Engine:
    """A stand-in engine that records how requests reach it (the real engines' choice of path is
    tested with them: tests/adapters/test_mixture_engine.py, tests/serving/test_api.py)."""

    name = "fake"
    max_model_len = 1024

    def __init__(self):
        self.batches, self.singles = [], []

    @classmethod
    def from_spec(cls, spec):
        return cls()

    async def start(self):
        pass

    async def stop(self):
        pass

    def count_prompt_tokens(self, request):
        return 3

    def running(self):
        return None

    async def generate(self, request):
        from coe.types import GenerationOutput

        self.singles.append(request.request_id)
        return GenerationOutput("x", "stop", 3, 1)

    async def generate_batch(self, requests):
        from coe.types import GenerationOutput

        self.batches.append([r.request_id for r in requests])
        return [KeyError("boom") if r.request_id == "r2" else GenerationOutput("x", "stop", 3, 1) for r in requests]


@pytest.mark.parametrize(("batching", "override"),
                         [("continuous", None), ("grouped", None), ("window", None), ("continuous", True)])
def test_expert_server_uses_the_window_only_for_engines_that_run_one_batch_at_a_time(batching, override, tmp_path):
    from coe.config import BatchingConfig, ModelExpert
    from coe.errors import EngineError
    from coe.serving.deployments.expert_server import ExpertServer
    from coe.serving.deployments.spec import ServerSpec
    from coe.serving.engines.base import Capabilities
    from coe.types import GenerationRequest

    engine_cls = type("Engine", (_Engine,), {"capabilities": Capabilities(batching=batching)})
    spec = ServerSpec(server_id="expert-m", host=ModelExpert(id="m", model=str(tmp_path)),
                      batching=BatchingConfig(max_batch_size=8, window_ms=20))

    async def go():
        server = ExpertServer(spec, engine_cls=engine_cls, window=override)  # override: benchmarks only
        await server.start()
        reqs = [GenerationRequest(f"r{i}", prompt="hi") for i in range(4)]
        res = await asyncio.gather(*(server.generate(r) for r in reqs), return_exceptions=True)
        await server.stop()
        return server, res

    server, res = run(go())
    engine = server.engine
    if batching == "window" or override:
        assert engine.batches == [["r0", "r1", "r2", "r3"]] and engine.singles == []
        assert isinstance(res[2], EngineError) and "KeyError" in str(res[2])  # alone: its batch mates succeed
        assert [r.batch_size for i, r in enumerate(res) if i != 2] == [4, 4, 4]
    else:
        assert engine.batches == [] and sorted(engine.singles) == ["r0", "r1", "r2", "r3"]
        assert all(r.batch_size == 1 for r in res)
