"""Ingress micro-batching: concurrent requests' queries are routed (embedded) in one batch.

One forward pass over 32 queries costs far less than 32 passes over one, so under load the
ingress should not route queries one at a time. :class:`MicroBatcher` collects the queries of
concurrent ``route`` calls and hands them to the router's batch ``route(list[str])`` together:

- while a batch is being routed (in a worker thread), newly arriving queries queue and go
  together in the next batch, so batches grow with load by themselves;
- the first query of a batch waits at most ``max_wait_ms`` for others (0: not at all);
- a batch holds at most ``max_batch`` queries; one batch is in flight at a time (the embedding
  is CPU-bound, so two batches at once would only compete for the same cores).

An idle service therefore adds at most ``max_wait_ms`` to a lone query.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from typing import Any


class MicroBatcher:
    """Coalesces concurrent ``await route(text)`` calls into batched ``route_batch`` calls.

    ``route_batch(texts) -> decisions`` (one per text, in order) must be thread-safe; it runs
    in a worker thread. ``route`` must be awaited on one event loop at a time (the ingress's);
    an exception from ``route_batch`` is raised by every ``route`` call of that batch. A caller
    that is cancelled while queued is dropped from its batch.
    """

    def __init__(self, route_batch: Callable[[list[str]], Sequence[Any]], *, max_batch: int = 64,
                 max_wait_ms: float = 1.0, on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be at least 0, got {max_wait_ms}")
        self.route_batch = route_batch
        self.on_batch = on_batch    # called with each batch's size (the service's metrics)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.batches = 0            # batches routed (for tests and metrics)
        self.largest_batch = 0
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._full = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def route(self, text: str) -> Any:
        """The decision for ``text``, routed together with the queries of concurrent calls."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:   # first use, or a new loop (tests): start from a clean state
            self._loop, self._pending, self._full, self._worker = loop, [], asyncio.Event(), None
        fut: asyncio.Future = loop.create_future()
        self._pending.append((text, fut))
        if len(self._pending) >= self.max_batch:
            self._full.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        """Route queued queries batch by batch until none are left; then the task ends."""
        while self._pending:
            if self.max_wait_s > 0 and len(self._pending) < self.max_batch:
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), timeout=self.max_wait_s)
                except TimeoutError:
                    pass
            batch = [(t, f) for t, f in self._pending[: self.max_batch] if not f.done()]
            del self._pending[: self.max_batch]
            if not batch:
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                decisions = await asyncio.to_thread(self.route_batch, [t for t, _ in batch])
            except Exception as err:  # noqa: BLE001  (any router error belongs to every waiter of the batch)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut), decision in zip(batch, decisions):
                if not fut.done():
                    fut.set_result(decision)


_BATCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def batcher_for(router, cfg, on_batch: Callable[[int], None] | None = None) -> MicroBatcher:
    """The one :class:`MicroBatcher` over ``router.route`` (created on first use, settings from
    ``cfg``, a ``coe.config.RouterConfig``: ``batch_max_queries``, ``batch_wait_ms``; ``on_batch``
    as given on that first use).

    Any object with the batch ``route(list[str])`` method works; the batcher lives as long as
    the router does.
    """
    batcher = _BATCHERS.get(router)
    if batcher is None:
        batcher = MicroBatcher(router.route, max_batch=cfg.batch_max_queries, max_wait_ms=cfg.batch_wait_ms,
                               on_batch=on_batch)
        _BATCHERS[router] = batcher
    return batcher
