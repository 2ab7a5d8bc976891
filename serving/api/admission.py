"""Admission control at the ingress: a bounded queue per expert, and the request deadline.

:class:`Admission` lets at most ``max_running_per_expert`` requests of one expert go to its
server at once; up to ``max_queued_per_expert`` more wait, first come first served. A request
past that bound is refused at once (:class:`OverloadedError`, 429 with ``Retry-After``); one
that waits longer than ``max_queue_wait_s`` is refused the same way; one whose deadline ends
while it waits gets :class:`DeadlineExceededError` (504). The limits are per ingress replica.
Runs on one asyncio loop (not thread-safe).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

from coe.config import AdmissionConfig
from coe.errors import DeadlineExceededError, OverloadedError


class Deadline:
    """The moment by which a request must be answered (``timeout_s`` from now)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s

    def left(self) -> float:
        return self.end - time.monotonic()

    def error(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"no answer within the request deadline of {self.timeout_s:g} s (serving.request_timeout_s); "
            "try again, with a shorter max_tokens or later"
        )

    async def run(self, awaitable):
        """``awaitable`` within the time left; cancels it and raises DeadlineExceededError past it."""
        left = self.left()
        if left <= 0:
            if hasattr(awaitable, "close"):
                awaitable.close()
            raise self.error()
        try:
            return await asyncio.wait_for(awaitable, timeout=left)
        except TimeoutError:
            raise self.error() from None


@dataclass
class _Gate:
    running: int = 0
    waiters: collections.deque = field(default_factory=collections.deque)


class Admission:
    """``await acquire(expert, deadline)`` then ``release(expert)`` exactly once (see module doc)."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._gates: dict[str, _Gate] = collections.defaultdict(_Gate)

    def running(self, expert_id: str) -> int:
        return self._gates[expert_id].running

    def waiting(self, expert_id: str) -> int:
        return sum(not f.done() for f in self._gates[expert_id].waiters)

    async def acquire(self, expert_id: str, deadline: Deadline) -> None:
        """Take a slot for ``expert_id``; raises OverloadedError (queue full or waited too long)
        or DeadlineExceededError. Cancellation while waiting gives nothing up."""
        c, gate = self.config, self._gates[expert_id]
        if gate.running < c.max_running_per_expert and not gate.waiters:
            gate.running += 1
            return
        if len(gate.waiters) >= c.max_queued_per_expert:
            raise OverloadedError(
                f"expert {expert_id!r} is at capacity ({c.max_running_per_expert} running, "
                f"{c.max_queued_per_expert} waiting); retry after {c.retry_after_s:g} s",
                retry_after_s=c.retry_after_s,
            )
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        gate.waiters.append(fut)
        wait = min(c.max_queue_wait_s, max(deadline.left(), 0.0))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout=wait)
        except TimeoutError:
            if not self._give_up(gate, fut):  # the slot arrived as the wait ended: keep it
                return
            if deadline.left() <= 0:
                raise deadline.error() from None
            raise OverloadedError(
                f"expert {expert_id!r} is busy: no slot within {c.max_queue_wait_s:g} s "
                "(serving.admission.max_queue_wait_s); retry later",
                retry_after_s=c.retry_after_s,
            ) from None
        except asyncio.CancelledError:
            if not self._give_up(gate, fut):
                self.release(expert_id)  # handed a slot we will not use
            raise

    @staticmethod
    def _give_up(gate: _Gate, fut: asyncio.Future) -> bool:
        """Withdraw a waiter; False when it was already handed a slot."""
        if fut.done():
            return False
        fut.cancel()
        try:
            gate.waiters.remove(fut)
        except ValueError:
            pass
        return True

    def release(self, expert_id: str) -> None:
        """Give a slot back: to the oldest waiter, else to the pool."""
        gate = self._gates[expert_id]
        while gate.waiters:
            fut = gate.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes on; ``running`` is unchanged
                return
        gate.running = max(gate.running - 1, 0)
