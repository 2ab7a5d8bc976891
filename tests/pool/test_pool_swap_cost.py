"""ExpertPool.swap_in_s on CPU ('always' swaps through slots): measured, per expert, read-only."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from coe.config import EngineConfig, PoolConfig

CPU = EngineConfig(kind="hf", device="cpu")


def test_swap_in_cost_comes_from_measured_swaps(tiny_experts):
    from coe.serving.pool.pool import ExpertPool

    two = {k: str(tiny_experts[k]) for k in ("e0", "e1")}
    pool = ExpertPool(two, PoolConfig(max_resident=1, swap="always"), CPU)
    pool.load()
    assert pool.swap_in_s("e0") is None and pool.swap_in_s("e1") is None   # nothing measured yet
    with pool.lease("e0"):
        pass
    assert pool.swap_in_s("e0") == 0.0                   # resident: nothing to swap
    rate_based = pool.swap_in_s("e1")                    # e1 never swapped: its size at e0's measured rate
    assert rate_based is not None and rate_based > 0
    with pool.lease("e1"):                               # evicts e0 (one slot)
        pass
    assert pool.resident_experts() == ["e1"]
    swaps_before = pool.stats.swaps
    e0 = pool.swap_in_s("e0")
    assert e0 is not None and e0 > 0 and pool.stats.swaps == swaps_before   # read-only: no swap, no change
    assert pool.swap_in_s("e1") == 0.0


def test_no_swap_cost_when_the_pool_does_not_swap(tiny_experts):
    from coe.serving.pool.pool import ExpertPool

    pool = ExpertPool({"e0": str(tiny_experts["e0"])}, PoolConfig(swap="auto"), CPU)   # CPU auto: all resident
    pool.load()
    assert pool.swap_in_s("e0") == 0.0
