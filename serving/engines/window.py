"""The batching window: collect requests for a short window, group them by expert, and
dispatch one batch per expert.

Kept by the engines that run one batch at a time (``Capabilities.batching == "window"``: the
mixture engine) in front of their decoding, as the expert pool keeps its own grouped queue.
A request waits at most ``window_ms`` after the oldest pending request of its group arrived
(less when its group reaches ``max_batch_size``). When the window closes every group is handed
to ``run_batch`` as one call, up to ``max_concurrent`` batches in flight (``max_concurrent=1``:
requests keep collecting while a batch runs, and the next batch of a group takes everything
that arrived meanwhile). Groups are served oldest first, full groups before others.

The waiting requests live in the one grouped queue of the project,
:class:`~coe.serving.pool.scheduler.GroupedQueue` (the expert pool's), with the window as its
overdue bound: this module adds only the asyncio side (futures, waking, dispatch).

Runs on one asyncio loop; ``submit`` may be awaited concurrently from many tasks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from coe.serving.pool.scheduler import GroupedQueue

Req = TypeVar("Req")
Out = TypeVar("Out")


class ExpertGroupedBatcher(Generic[Req, Out]):
    """``await submit(key, request)`` → ``(output, batch_size)``.

    ``run_batch(key, requests)`` must return one entry per request, in order: its output, or an
    Exception for a request that failed alone (given to that request only); an exception it
    raises is given to every request of that batch. A cancelled ``submit`` whose batch has not
    started is dropped from its group.
    """

    def __init__(
        self,
        run_batch: Callable[[str, list[Req]], Awaitable[list[Out]]],
        *,
        max_batch_size: int,
        window_ms: float,
        max_concurrent: int | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.window_s = window_ms / 1000.0
        self._slots = asyncio.Semaphore(max_concurrent) if max_concurrent else None
        # items are (request, future); "oldest_first" never skips a group within take()
        self._queue = GroupedQueue("oldest_first", window_ms, max_batch_size)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self.batches_dispatched = 0

    def queue_depth(self) -> int:
        """Requests waiting for a batch (not yet dispatched)."""
        return len(self._queue)

    async def submit(self, key: str, request: Req) -> tuple[Out, int]:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._loop())
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put(key, (request, fut))
        self._wake.set()
        try:
            return await fut
        except asyncio.CancelledError:
            self._queue.remove_if(lambda item: item[1] is fut)
            raise

    async def _loop(self) -> None:
        while True:
            due = self._queue.next_due_in(time.monotonic())
            if due is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            if due > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=due)
                except TimeoutError:
                    pass
                continue
            if self._slots is not None:
                await self._slots.acquire()
            ready = self._queue.due(time.monotonic())
            if not ready:  # cancelled while waiting for a slot
                if self._slots is not None:
                    self._slots.release()
                continue
            key = ready[0]
            take = self._queue.take(key, self.max_batch_size)
            task = asyncio.create_task(self._dispatch(key, take))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _dispatch(self, key: str, items: list[tuple[Req, asyncio.Future]]) -> None:
        items = [(r, f) for r, f in items if not f.done()]
        try:
            if not items:
                return
            self.batches_dispatched += 1
            try:
                outputs = await self._run_batch(key, [r for r, _ in items])
                if len(outputs) != len(items):
                    raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(items)} requests")
            except BaseException as err:
                for _, f in items:
                    if not f.done():
                        f.set_exception(err if isinstance(err, Exception) else RuntimeError(str(err)))
                if not isinstance(err, Exception):
                    raise
                return
            for (_, f), out in zip(items, outputs):
                if f.done():
                    continue
                if isinstance(out, Exception):
                    f.set_exception(out)
                else:
                    f.set_result((out, len(items)))
        finally:
            if self._slots is not None:
                self._slots.release()
            self._wake.set()

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self._inflight):
            task.cancel()
