"""ExpertPool residency on CPU: swapping through slots ('always'), LRU, pinned, budget, errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from coe.config import EngineConfig, PoolConfig
from coe.errors import ConfigError, ExpertNotFoundError

CPU = EngineConfig(kind="hf", device="cpu")
IDS = torch.tensor([[1, 5, 6, 7, 8, 9]])


def _pool(experts, **kw):
    from coe.serving.pool.pool import ExpertPool

    pool = ExpertPool({k: str(v) for k, v in experts.items()}, PoolConfig(**kw), CPU)
    pool.load()
    return pool


@pytest.fixture(scope="module")
def reference_logits(tiny_experts):
    from transformers import AutoModelForCausalLM

    out = {}
    for eid, path in tiny_experts.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            out[eid] = model(input_ids=IDS).logits
    return out


def _run(pool, eid):
    with pool.lease(eid) as model, torch.no_grad():
        return model(input_ids=IDS).logits


def test_swapped_experts_compute_like_their_checkpoints(tiny_experts, reference_logits):
    pool = _pool(tiny_experts, max_resident=2, swap="always")
    for eid in ["e0", "e1", "e2", "e3", "e0", "e2"]:
        torch.testing.assert_close(_run(pool, eid), reference_logits[eid], rtol=0, atol=0)
    assert len(pool.slots) == 2
    assert len(pool.resident_experts()) == 2


def test_lru_eviction_order_and_hits(tiny_experts):
    pool = _pool(tiny_experts, max_resident=2, swap="always")
    _run(pool, "e0")
    _run(pool, "e1")
    _run(pool, "e0")  # hit: e1 is now the least recently used
    _run(pool, "e2")  # evicts e1
    assert pool.resident_experts() == ["e0", "e2"]
    assert pool.stats.hits == 1 and pool.stats.swaps == 3 and pool.stats.evictions == 1
    assert pool.stats.bytes_swapped == 3 * pool.host["e0"].nbytes


def test_pinned_expert_is_never_evicted(tiny_experts, reference_logits):
    pool = _pool(tiny_experts, max_resident=2, pinned=["e3"], swap="always")
    assert pool.resident_experts() == ["e3"]  # pinned experts are loaded at start
    for eid in ["e0", "e1", "e2", "e0"]:
        _run(pool, eid)
    assert "e3" in pool.resident_experts()
    swaps = pool.stats.swaps
    torch.testing.assert_close(_run(pool, "e3"), reference_logits["e3"], rtol=0, atol=0)
    assert pool.stats.swaps == swaps


def test_leased_expert_is_not_evicted(tiny_experts):
    from coe.serving.pool.pool import PoolBusyError

    pool = _pool(tiny_experts, max_resident=1, swap="always")
    with pool.lease("e0"):
        with pytest.raises(PoolBusyError, match="pinned or in use"):
            pool.acquire("e1")
        assert pool.prefetch("e1") is False
    _run(pool, "e1")
    assert pool.resident_experts() == ["e1"]


def test_memory_budget_limits_slots(tiny_experts):
    from coe.serving.pool.pool import GIB

    one = _pool({"e0": tiny_experts["e0"]}, swap="always").host["e0"].nbytes
    pool = _pool(tiny_experts, max_resident=4, memory_budget_gib=(2.5 * one) / GIB, swap="always")
    for eid in ["e0", "e1", "e2", "e3"]:
        _run(pool, eid)
    assert len(pool.slots) == 2 and pool.slot_bytes() <= pool.budget_bytes
    with pytest.raises(ConfigError, match="raise the budget"):
        _pool(tiny_experts, memory_budget_gib=(0.5 * one) / GIB, swap="always")


def test_mixed_shapes_share_the_budget(tiny_experts, odd_expert):
    experts = {"e0": tiny_experts["e0"], "e1": tiny_experts["e1"], "odd": odd_expert}
    pool = _pool(experts, max_resident=2, swap="always")
    for eid in ["e0", "e1", "odd", "e0", "odd"]:
        _run(pool, eid)
    assert len(pool.slots) <= 2
    assert pool.resident_experts()[-1] == "odd"


def test_cpu_auto_keeps_everyone_resident_without_copies(tiny_experts, reference_logits):
    pool = _pool(tiny_experts, max_resident=1)  # 'auto' on CPU: no swapping
    assert not pool.swapping and sorted(pool.resident_experts()) == sorted(tiny_experts)
    for eid in ["e0", "e1", "e2", "e3", "e0"]:
        torch.testing.assert_close(_run(pool, eid), reference_logits[eid], rtol=0, atol=0)
    assert pool.stats.swaps == 0 and pool.stats.bytes_swapped == 0


def test_errors_name_what_is_allowed(tiny_experts):
    from coe.serving.pool.pool import ExpertPool

    pool = _pool({"e0": tiny_experts["e0"]}, swap="always")
    with pytest.raises(ExpertNotFoundError, match="available: e0"):
        pool.acquire("nope")
    with pytest.raises(ConfigError, match="pool.pinned has 'zz'; allowed: e0"):
        ExpertPool({"e0": str(tiny_experts["e0"])}, PoolConfig(pinned=["zz"]), CPU)


@pytest.mark.gpu
def test_cuda_swap_uses_pinned_memory_and_copy_stream(tiny_experts, reference_logits):
    from coe.serving.pool.pool import ExpertPool

    pool = ExpertPool({k: str(v) for k, v in tiny_experts.items()}, PoolConfig(max_resident=2),
                      EngineConfig(kind="hf", device="cuda", dtype="float32"))
    pool.load()
    assert pool.swapping and all(h.flat.is_pinned() for h in pool.host.values())
    for eid in ["e0", "e1", "e2", "e3", "e1"]:
        with pool.lease(eid) as model, torch.no_grad():
            got = model(input_ids=IDS.cuda()).logits.cpu()
        torch.testing.assert_close(got, reference_logits[eid], rtol=1e-4, atol=1e-4)
    assert pool.prefetch("e0") is True  # starts the copy on the copy stream, returns at once
    with pool.lease("e0") as model, torch.no_grad():  # compute waits for the copy's event
        got = model(input_ids=IDS.cuda()).logits.cpu()
    torch.testing.assert_close(got, reference_logits["e0"], rtol=1e-4, atol=1e-4)
    assert all(s.flat.device.type == "cuda" for s in pool.slots) and len(pool.slots) == 2
