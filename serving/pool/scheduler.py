"""Expert-grouped scheduling: which expert's queued requests the pool serves next.

Swapping an expert in costs a copy of its whole weights; serving the requests routed to it
together pays that once per group instead of once per request. The queue holds routed
requests in arrival order and a policy picks the next expert:

- ``largest_group`` (default): the expert with the most queued requests — the most requests
  per swap, so the most throughput. Ties go to an expert already resident (no swap), then to
  the one whose oldest request is oldest.
- ``oldest_first``: the expert of the oldest queued request, with all its queued requests —
  age order between experts, grouping within one.
- ``fcfs``: strict arrival order; a batch is the run of consecutive requests at the head that
  are routed to the same expert (the baseline the benchmark compares against).

The wait bound: whatever the policy, once a request has waited ``overdue_after_ms`` it is
overdue and its expert is served next (the oldest overdue request first). A request therefore
waits at most about ``overdue_after_ms`` plus the batch in progress plus the other overdue
groups ahead of it; the bound keeps ``largest_group`` from starving a rarely-routed expert.

The same queue is the deployment layer's batching window (``due``/``next_due_in``: a group goes
when it is full or its oldest request has waited the window).

Pure Python, no torch; not thread-safe (the engine guards it with its condition lock).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

Policy = Literal["largest_group", "oldest_first", "fcfs"]
POLICIES: tuple[str, ...] = ("largest_group", "oldest_first", "fcfs")


@dataclass(order=True)
class Queued:
    """One routed request waiting for its expert (``arrived`` in time.monotonic() seconds)."""

    seq: int
    arrived: float = field(compare=False)
    expert: str = field(compare=False)
    item: Any = field(compare=False)


class GroupedQueue:
    """Routed requests waiting for their experts, served group by group."""

    def __init__(self, policy: Policy = "largest_group", overdue_after_ms: float = 2000, max_batch: int = 16) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown pool policy {policy!r}; allowed: {', '.join(POLICIES)}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.policy = policy
        self.overdue_after_s = overdue_after_ms / 1000
        self.max_batch = max_batch
        self._items: list[Queued] = []  # arrival order
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, expert: str, item: Any, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._items.append(Queued(next(self._seq), now, expert, item))

    def groups(self) -> dict[str, int]:
        """Queued requests per expert."""
        out: dict[str, int] = {}
        for q in self._items:
            out[q.expert] = out.get(q.expert, 0) + 1
        return out

    def due(self, now: float | None = None) -> list[str]:
        """Experts whose group should go now: full groups (``max_batch`` requests) first, then
        those whose oldest request is overdue, oldest first. (The batching window of the
        deployment layer is this queue with ``overdue_after_ms`` = the window.)"""
        now = time.monotonic() if now is None else now
        oldest: dict[str, float] = {}
        for q in self._items:
            oldest.setdefault(q.expert, q.arrived)
        sizes = self.groups()
        ready = [e for e in oldest if sizes[e] >= self.max_batch or now - oldest[e] >= self.overdue_after_s]
        return sorted(ready, key=lambda e: (sizes[e] < self.max_batch, oldest[e]))

    def next_due_in(self, now: float | None = None) -> float | None:
        """Seconds until some group is due (<= 0: one is due now); None when the queue is empty."""
        if not self._items:
            return None
        now = time.monotonic() if now is None else now
        if self.due(now):
            return 0.0
        return self._items[0].arrived + self.overdue_after_s - now

    def choose(self, now: float | None = None, resident: Collection[str] = ()) -> str | None:
        """The expert the policy serves next (None when the queue is empty)."""
        if not self._items:
            return None
        now = time.monotonic() if now is None else now
        head = self._items[0]
        if now - head.arrived >= self.overdue_after_s or self.policy in ("fcfs", "oldest_first"):
            return head.expert  # overdue requests first, oldest of them first
        first_seen: dict[str, int] = {}
        for q in self._items:
            first_seen.setdefault(q.expert, q.seq)
        sizes = self.groups()
        return max(sizes, key=lambda e: (min(sizes[e], self.max_batch), e in resident, -first_seen[e]))

    def take(self, expert: str, limit: int | None = None) -> list[Any]:
        """Remove and return up to ``limit`` (default ``max_batch``) of ``expert``'s requests.

        Under ``fcfs`` only the run of ``expert``'s requests at the head of the queue is taken.
        """
        limit = self.max_batch if limit is None else limit
        taken: list[Queued] = []
        keep: list[Queued] = []
        for q in self._items:
            if len(taken) < limit and q.expert == expert and (self.policy != "fcfs" or not keep):
                taken.append(q)
            else:
                keep.append(q)
        self._items = keep
        return [q.item for q in taken]

    def next_batch(self, now: float | None = None, resident: Collection[str] = ()) -> tuple[str, list[Any]] | None:
        """``(expert, requests)`` to serve next, removed from the queue; None when empty."""
        expert = self.choose(now, resident)
        if expert is None:
            return None
        return expert, self.take(expert)

    def take_all(self) -> list[Any]:
        """Remove and return every queued request (arrival order)."""
        items, self._items = [q.item for q in self._items], []
        return items

    def remove_if(self, predicate) -> int:
        """Drop queued requests whose item satisfies ``predicate`` (e.g. cancelled); returns how many."""
        before = len(self._items)
        self._items = [q for q in self._items if not predicate(q.item)]
        return before - len(self._items)
