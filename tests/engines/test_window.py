"""The batching window (serving/engines/window.py, the mixture engine's; no engine here): windows, grouping, size limits, concurrency, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from coe.serving.engines.window import ExpertGroupedBatcher


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
