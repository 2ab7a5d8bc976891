"""GroupedQueue policies and the wait bound (pure Python, explicit clocks)."""

from __future__ import annotations

import pytest

from coe.serving.pool.scheduler import GroupedQueue


def _queue(policy, experts, overdue_after_ms=1000, max_batch=16, t0=0.0):
    q = GroupedQueue(policy, overdue_after_ms=overdue_after_ms, max_batch=max_batch)
    for i, e in enumerate(experts):
        q.put(e, f"{e}{i}", now=t0 + i * 0.001)
    return q


def _drain(q, now=0.1, resident=()):
    out = []
    while (batch := q.next_batch(now=now, resident=resident)) is not None:
        out.append(batch)
    return out


def test_largest_group_first_serves_each_expert_once():
    q = _queue("largest_group", ["a", "b", "b", "c", "b", "a", "b", "c", "a", "d"])
    batches = _drain(q)
    assert [e for e, _ in batches] == ["b", "a", "c", "d"]
    assert batches[0][1] == ["b1", "b2", "b4", "b6"]  # arrival order within a group


def test_fcfs_batches_only_consecutive_runs():
    q = _queue("fcfs", ["a", "a", "b", "a", "c", "c"])
    assert _drain(q) == [("a", ["a0", "a1"]), ("b", ["b2"]), ("a", ["a3"]), ("c", ["c4", "c5"])]


def test_oldest_first_groups_the_oldest_requests_expert():
    q = _queue("oldest_first", ["c", "a", "b", "a", "c", "a"])
    assert [e for e, _ in _drain(q)] == ["c", "a", "b"]


def test_overdue_request_jumps_the_largest_group():
    q = _queue("largest_group", ["rare"] + ["hot"] * 5, overdue_after_ms=50)
    assert q.choose(now=0.01) == "hot"
    assert q.choose(now=0.06) == "rare"  # waited 60 ms > 50 ms
    assert q.next_batch(now=0.06) == ("rare", ["rare0"])


def test_ties_prefer_a_resident_expert_then_the_oldest():
    q = _queue("largest_group", ["a", "b", "a", "b"])
    assert q.choose(now=0.01) == "a"
    assert q.choose(now=0.01, resident={"b"}) == "b"


def test_groups_beyond_max_batch_tie_and_prefer_resident():
    q = _queue("largest_group", ["a"] * 6 + ["b"] * 4, max_batch=4)
    assert q.choose(now=0.02, resident={"b"}) == "b"
    assert len(q.take("a")) == 4 and q.groups() == {"a": 2, "b": 4}


def test_remove_if_and_take_all():
    q = _queue("largest_group", ["a", "b", "a"])
    assert q.remove_if(lambda item: item == "a0") == 1
    assert q.take_all() == ["b1", "a2"] and len(q) == 0 and q.next_batch() is None


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="allowed: largest_group, oldest_first, fcfs"):
        GroupedQueue("random")
    with pytest.raises(ValueError, match="max_batch"):
        GroupedQueue("fcfs", max_batch=0)


def test_due_groups_for_the_batching_window():
    """The window batcher's view of the queue: a group is due when full or its oldest request
    has waited the bound; full groups go first, then the oldest."""
    q = _queue("oldest_first", ["a", "b", "b", "b"], overdue_after_ms=10, max_batch=3)  # arrivals 0..3 ms
    assert q.due(now=0.004) == ["b"]  # full, though nobody waited 10 ms
    assert q.next_due_in(now=0.004) == 0.0
    q.take("b")
    assert q.due(now=0.004) == [] and q.next_due_in(now=0.004) == pytest.approx(0.006)
    q.put("c", "c9", now=0.005)
    assert q.due(now=0.0151) == ["a", "c"]  # both overdue, oldest first
    q.take_all()
    assert q.next_due_in(now=1.0) is None and q.due(now=1.0) == []
