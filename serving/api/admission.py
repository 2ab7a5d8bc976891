"""Admission control at the ingress: a bounded queue per expert, and the request deadline.

:class:`Admission` lets at most ``max_running_per_expert`` requests of one expert, and at most
``max_running_per_server`` requests of all the experts of one server, go to that server at once;
up to ``max_queued_per_expert`` / ``max_queued_per_server`` more wait, first come first served. A request
past that bound is refused at once (:class:`OverloadedError`, 429 with ``Retry-After``); one
that waits longer than ``max_queue_wait_s`` is refused the same way; one whose deadline ends
while it waits gets :class:`DeadlineExceededError` (504). The limits are per ingress replica.
Runs on one asyncio loop (not thread-safe).

It also measures how long requests hold their slot (an EWMA of the service time per expert
server, :meth:`Admission.service_time_s`) and, from that and the queues, what a new request
would wait (:meth:`Admission.expected_wait_s`): what the load-aware policy weighs.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coe.config import AdmissionConfig
from coe.errors import DeadlineExceededError, OverloadedError


class Deadline:
    """The moment by which a request must be answered (``timeout_s`` from now), made when the
    request arrives, before it is routed. ``started`` (``time.perf_counter()`` at that moment) is
    the origin of the request's latency and time-to-first-token metrics, whoever routes it."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.started = time.perf_counter()
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


SERVICE_EWMA = 0.2   # weight of the newest request in the service-time average (~ the last 10 requests)


@dataclass
class _Gate:
    running: int = 0
    waiters: collections.deque = field(default_factory=collections.deque)

    def waiting(self) -> int:
        return sum(not f.done() for f in self.waiters)


class Admission:
    """``await acquire(expert, deadline)`` then ``release(expert)`` exactly once (see module doc).

    Two bounds apply, one after the other: the expert's own (``max_running_per_expert``,
    ``max_queued_per_expert``) and its server's (``max_running_per_server``,
    ``max_queued_per_server``), because the experts of one server (a base model and its LoRAs, the
    pool) share its capacity. ``server_of(expert)`` names the server (None: no server bound);
    ``max_queue_wait_s`` bounds the wait across both."""

    def __init__(self, config: AdmissionConfig, server_of: Callable[[str], str | None] | None = None) -> None:
        self.config = config
        self.server_of = server_of or (lambda expert_id: None)
        self._gates: dict[str, _Gate] = collections.defaultdict(_Gate)
        self._servers: dict[str, _Gate] = collections.defaultdict(_Gate)
        self._held: dict[str, list[str]] = collections.defaultdict(list)  # expert -> servers it holds slots of
        self._started: dict[str, collections.deque] = collections.defaultdict(collections.deque)  # expert -> t0s
        self._service: dict[str, float] = {}  # server (else expert) id -> EWMA of the seconds a slot is held

    def running(self, expert_id: str) -> int:
        return self._gates[expert_id].running

    def waiting(self, expert_id: str) -> int:
        return self._gates[expert_id].waiting()

    def queue_depth(self, expert_id: str) -> int:
        """Requests a new request of ``expert_id`` would queue behind: those waiting for a slot of
        the expert, plus those waiting for a slot of its server (when ``max_running_per_server`` is set)."""
        depth = self.waiting(expert_id)
        server = self._server(expert_id)
        if server is not None and server in self._servers:
            depth += self._servers[server].waiting()
        return depth

    def service_time_s(self, expert_id: str) -> float | None:
        """The measured time a request to ``expert_id``'s server holds its slot (EWMA over the
        requests released so far, any expert of that server); None before the first one ends."""
        return self._service.get(self.server_of(expert_id) or expert_id)

    def expected_wait_s(self, expert_id: str) -> float:
        """Seconds a request of ``expert_id`` arriving now would wait for its slots: 0 while both
        bounds have room, else, per full bound of ``running`` slots with ``waiting`` requests
        queued, (waiting + 1) × service time / running (slots free at running / service time per
        second). Before any request has ended, the service time is the age of the oldest request
        running on the expert (a lower bound)."""
        c = self.config
        service = self.service_time_s(expert_id)
        if service is None:
            started = self._started.get(expert_id)
            service = time.monotonic() - started[0] if started else 0.0
        wait = _gate_wait(self._gates.get(expert_id), c.max_running_per_expert, service)
        server = self._server(expert_id)
        if server is not None:
            wait += _gate_wait(self._servers.get(server), c.max_running_per_server, service)
        return wait

    def _server(self, expert_id: str) -> str | None:
        """The server whose bound applies to ``expert_id`` (None: no server bound)."""
        return self.server_of(expert_id) if self.config.max_running_per_server is not None else None

    async def acquire(self, expert_id: str, deadline: Deadline) -> None:
        """Take a slot for ``expert_id`` and its server; raises OverloadedError (a queue full or
        waited too long) or DeadlineExceededError. Cancellation while waiting gives nothing up."""
        c = self.config
        wait_end = time.monotonic() + c.max_queue_wait_s
        await self._take(self._gates[expert_id], c.max_running_per_expert, c.max_queued_per_expert,
                         f"expert {expert_id!r}", wait_end, deadline)
        server = self._server(expert_id)
        if server is not None:
            try:
                await self._take(self._servers[server], c.max_running_per_server, c.max_queued_per_server,
                                 f"the server of expert {expert_id!r}", wait_end, deadline)
            except BaseException:
                self._give(self._gates[expert_id])
                raise
            self._held[expert_id].append(server)
        self._started[expert_id].append(time.monotonic())

    async def _take(self, gate: _Gate, running: int, queued: int, what: str, wait_end: float,
                    deadline: Deadline) -> None:
        c = self.config
        if gate.running < running and not gate.waiters:
            gate.running += 1
            return
        if len(gate.waiters) >= queued:
            raise OverloadedError(
                f"{what} is at capacity ({running} running, {queued} waiting); retry after {c.retry_after_s:g} s",
                retry_after_s=c.retry_after_s,
            )
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        gate.waiters.append(fut)
        wait = max(min(wait_end - time.monotonic(), deadline.left()), 0.0)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout=wait)
        except TimeoutError:
            if not self._give_up(gate, fut):  # the slot arrived as the wait ended: keep it
                return
            if deadline.left() <= 0:
                raise deadline.error() from None
            raise OverloadedError(
                f"{what} is busy: no slot within {c.max_queue_wait_s:g} s "
                "(serving.admission.max_queue_wait_s); retry later",
                retry_after_s=c.retry_after_s,
            ) from None
        except asyncio.CancelledError:
            if not self._give_up(gate, fut):
                self._give(gate)  # handed a slot we will not use
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
        """Give the expert's slot back, and its server's (each to its oldest waiter, else to the
        pool), and count the time it was held into the server's service time. Releases are paired
        with the expert's oldest running request: among concurrent requests one's time may be
        counted as another's, but their sum, and so the average, is exact."""
        started = self._started.get(expert_id)
        if started:
            held_s = time.monotonic() - started.popleft()
            if not started:
                del self._started[expert_id]
            key = self.server_of(expert_id) or expert_id
            old = self._service.get(key)
            self._service[key] = held_s if old is None else old + SERVICE_EWMA * (held_s - old)
        held = self._held.get(expert_id)
        if held:
            self._give(self._servers[held.pop()])
            if not held:
                del self._held[expert_id]
        self._give(self._gates[expert_id])

    @staticmethod
    def _give(gate: _Gate) -> None:
        while gate.waiters:
            fut = gate.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes on; ``running`` is unchanged
                return
        gate.running = max(gate.running - 1, 0)


def _gate_wait(gate: _Gate | None, slots: int | None, service_s: float) -> float:
    """Expected wait at one bound: 0 while it has a free slot and no queue."""
    if gate is None or slots is None or (gate.running < slots and not gate.waiters):
        return 0.0
    return (gate.waiting() + 1) * service_s / slots
