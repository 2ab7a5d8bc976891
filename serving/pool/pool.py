"""The expert pool: N whole-model experts in host memory, at most M resident on the device.

A resident expert occupies a *slot*: a flat device buffer of its layout plus a module skeleton
whose tensors are views of that buffer (built once, on the ``meta`` device, then bound). A
swap is one ``copy_`` of the expert's flat host buffer into a slot's buffer.

Residency: at most ``max_resident`` slots, and their bytes stay within ``memory_budget_gib``
(actual tensor bytes of the layouts); least-recently-used eviction; ``pinned`` experts are
loaded at start and never evicted; an expert in use (leased) is never evicted.

On CUDA, swaps run on a separate copy stream from pinned host memory: a slot's copy waits
(on the device, not the host) for the last compute that used the slot, and compute on a
swapped-in expert waits for its copy through a CUDA event, so :meth:`ExpertPool.prefetch` of
the next expert overlaps the current expert's compute. On CPU with ``swap='auto'`` no copy is
needed at all: every expert's skeleton is bound straight to its host buffer (all resident).

Swap-ins are timed: on CPU the copy itself (it is synchronous), on CUDA the copy on the copy
stream (timing events, read once the copy has finished). :meth:`ExpertPool.swap_in_s` says what
swapping an expert in would cost now, from those measurements.

Thread-safety: every public method takes the pool's lock; leases may be released from any
thread. The models it hands out are not themselves thread-safe (one forward at a time).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coe.config import EngineConfig, PoolConfig
from coe.errors import ConfigError, EngineError, ExpertNotFoundError, available

if TYPE_CHECKING:
    import torch

    from coe.serving.pool.layout import Layout
    from coe.serving.pool.store import HostExpert

GIB = 1024**3


class PoolBusyError(EngineError):
    """No slot can be freed: every resident expert is pinned or in use."""


@dataclass
class Slot:
    """A device buffer of one layout, with a module skeleton bound to it."""

    layout: Layout
    flat: torch.Tensor
    model: object
    holder: str | None = None
    leases: int = 0
    ready: object = None  # CUDA event: the copy into this slot is done
    free: object = None  # CUDA event: the last compute reading this slot is done


@dataclass
class PoolStats:
    """Counters since start (``swap_s`` is host-side time spent issuing/doing copies)."""

    hits: int = 0
    swaps: int = 0
    prefetches: int = 0
    evictions: int = 0
    bytes_swapped: int = 0
    swap_s: float = 0.0
    per_expert_swaps: dict[str, int] = field(default_factory=dict)


class ExpertPool:
    """Whole-model experts kept in host memory and swapped into at most M device slots.

    ``experts`` maps expert id → model folder. Construct, then :meth:`load` (blocking; reads
    every expert once). Use :meth:`lease` to get a model ready for compute.
    """

    def __init__(self, experts: dict[str, str], config: PoolConfig | None = None,
                 engine: EngineConfig | None = None) -> None:
        if not experts:
            raise ConfigError("an expert pool needs at least one expert")
        self.config = config or PoolConfig()
        self.engine_config = engine or EngineConfig(kind="hf")
        unknown = [p for p in self.config.pinned if p not in experts]
        if unknown:
            raise ConfigError(f"pool.pinned has {unknown[0]!r}; allowed: {available(experts)}")
        self.paths = dict(experts)
        self.host: dict[str, HostExpert] = {}
        self.layouts: dict[str, Layout] = {}
        self.slots: list[Slot] = []
        self.resident: OrderedDict[str, Slot] = OrderedDict()  # LRU order: oldest first
        self.stats = PoolStats()
        self.device = "cpu"
        self.swapping = False
        self.dtype = None
        self._lock = threading.RLock()
        self._copy_stream = None
        self._swap_times: dict[str, list] = {}  # expert id -> [seconds, count] of its timed swap-ins
        self._untimed: list[tuple[str, object, object]] = []  # CUDA copies in flight: (expert, start, end event)

    # ------------------------------------------------------------------ loading

    @property
    def budget_bytes(self) -> int | None:
        gib = self.config.memory_budget_gib
        return int(gib * GIB) if gib is not None else None

    def load(self) -> None:
        """Read every expert into host memory, then make the pinned ones resident.

        Raises ModelNotFoundError (a folder cannot be loaded) or ConfigError (the budget cannot
        hold the largest expert, or the pinned experts together).
        """
        import torch

        from coe.serving.engines.loading import resolve_device, resolve_dtype
        from coe.serving.pool.store import load_host_expert

        self.device = resolve_device(self.engine_config)
        self.dtype = dtype = getattr(torch, resolve_dtype(self.engine_config, self.device, engine="hf"))
        mode = self.config.swap
        self.swapping = mode == "always" or (mode == "auto" and self.device == "cuda")
        pin = self.device == "cuda"
        for expert_id, path in self.paths.items():
            self.host[expert_id] = load_host_expert(
                expert_id, path, dtype=dtype, pin=pin, layouts=self.layouts
            )
        if self.device == "cuda":
            self._copy_stream = torch.cuda.Stream()
        self._check_budget()
        with self._lock:
            if not self.swapping:
                for expert_id in self.host:
                    self._make_resident(expert_id)
            else:
                for expert_id in self.config.pinned:
                    self._make_resident(expert_id)

    def _check_budget(self) -> None:
        budget = self.budget_bytes
        if not self.swapping:
            need = sum(h.nbytes for h in self.host.values())
            if budget is not None and self.device != "cpu" and need > budget:
                raise ConfigError(
                    f"pool.swap is 'never' but the {len(self.host)} experts need {need / GIB:.2f} GiB "
                    f"and pool.memory_budget_gib is {budget / GIB:.2f}: raise the budget or allow swapping"
                )
            return
        if budget is None:
            return
        largest = max(self.host.values(), key=lambda h: h.nbytes)
        if largest.nbytes > budget:
            raise ConfigError(
                f"expert {largest.id!r} needs {largest.nbytes / GIB:.3f} GiB on the device but "
                f"pool.memory_budget_gib is {budget / GIB:.3f}: raise the budget"
            )
        pinned = sum(self.host[p].nbytes for p in self.config.pinned)
        if pinned > budget:
            raise ConfigError(
                f"the pinned experts need {pinned / GIB:.3f} GiB together but pool.memory_budget_gib is "
                f"{budget / GIB:.3f}: pin fewer experts or raise the budget"
            )

    # ------------------------------------------------------------------ public API

    def experts(self) -> list[str]:
        return list(self.paths)

    def host_expert(self, expert_id: str) -> HostExpert:
        """The host record of ``expert_id`` (tokenizer, eos ids). Raises ExpertNotFoundError."""
        if expert_id not in self.host:
            raise ExpertNotFoundError(f"unknown expert {expert_id!r}; available: {available(self.paths)}")
        return self.host[expert_id]

    def resident_experts(self) -> list[str]:
        """Resident experts, least recently used first."""
        with self._lock:
            return list(self.resident)

    def swap_in_s(self, expert_id: str) -> float | None:
        """Seconds that swapping ``expert_id`` in would take now (read-only): 0.0 when it is
        resident or the pool does not swap; else the mean of its measured swap-ins, or, before it
        has one, its size at the rate measured over every expert's swap-ins; None before any swap-in
        has been measured. Raises ExpertNotFoundError."""
        host = self.host_expert(expert_id)
        with self._lock:
            if not self.swapping or expert_id in self.resident:
                return 0.0
            self._read_timings()
            seconds, count = self._swap_times.get(expert_id, (0.0, 0))
            if count:
                return seconds / count
            total_s = sum(t for t, _ in self._swap_times.values())
            total_bytes = sum(n * self.host[e].nbytes for e, (_, n) in self._swap_times.items())
            return total_s * host.nbytes / total_bytes if total_bytes else None

    def _read_timings(self) -> None:
        """Count the CUDA copies that have finished into the swap-in times."""
        pending = []
        for expert_id, start, end in self._untimed:
            if end.query():
                self._timed(expert_id, start.elapsed_time(end) / 1000.0)
            else:
                pending.append((expert_id, start, end))
        self._untimed = pending

    def _timed(self, expert_id: str, seconds: float) -> None:
        entry = self._swap_times.setdefault(expert_id, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1

    def slot_bytes(self) -> int:
        with self._lock:
            return sum(s.layout.nbytes for s in self.slots)

    @contextmanager
    def lease(self, expert_id: str):
        """Yield ``expert_id``'s model, resident and ready for compute on the current stream.

        Swaps it in if needed (evicting the least recently used unpinned, unleased expert).
        While leased the expert is not evicted. Raises ExpertNotFoundError or PoolBusyError.
        """
        slot = self.acquire(expert_id)
        try:
            yield slot.model
        finally:
            self.release(expert_id)

    def acquire(self, expert_id: str) -> Slot:
        """Like :meth:`lease` without the context manager; pair with :meth:`release`."""
        self.host_expert(expert_id)
        with self._lock:
            slot = self.resident.get(expert_id)
            if slot is None:
                slot = self._make_resident(expert_id)
            else:
                self.stats.hits += 1
            self.resident.move_to_end(expert_id)
            slot.leases += 1
            if slot.ready is not None:
                import torch

                torch.cuda.current_stream().wait_event(slot.ready)
            return slot

    def release(self, expert_id: str) -> None:
        with self._lock:
            slot = self.resident[expert_id]
            slot.leases -= 1
            if self.device == "cuda":
                import torch

                slot.free = torch.cuda.Event()
                slot.free.record(torch.cuda.current_stream())

    def prefetch(self, expert_id: str) -> bool:
        """Start swapping ``expert_id`` in without waiting for the copy (CUDA copy stream).

        Returns False (and does nothing) when it is already resident, when no slot can be freed,
        or when swapping is off. Never raises PoolBusyError.
        """
        self.host_expert(expert_id)
        with self._lock:
            if not self.swapping or expert_id in self.resident:
                return False
            try:
                self._make_resident(expert_id)
            except PoolBusyError:
                return False
            self.stats.prefetches += 1
            # a prefetched expert is the most recently used: it is about to be
            return True

    # ------------------------------------------------------------------ residency

    def _make_resident(self, expert_id: str) -> Slot:
        host = self.host[expert_id]
        if not self.swapping:
            slot = self._new_slot(host.layout, flat=host.flat if self.device == "cpu" else None)
            if self.device != "cpu":
                slot.flat.copy_(host.flat)
            slot.holder = expert_id
            self.resident[expert_id] = slot
            return slot
        slot = self._free_slot(host.layout)
        self._copy_in(slot, host)
        slot.holder = expert_id
        self.resident[expert_id] = slot
        return slot

    def _free_slot(self, layout: Layout) -> Slot:
        """A slot of ``layout`` holding nobody: an empty one, a new one, or an evicted one."""
        for slot in self.slots:
            if slot.holder is None and slot.layout is layout:
                return slot
        if self._can_allocate(layout):
            return self._new_slot(layout)
        victims = [
            (eid, s) for eid, s in self.resident.items()
            if eid not in self.config.pinned and s.leases == 0
        ]
        for eid, slot in victims:  # least recently used first; same shape reuses the buffer
            if slot.layout is layout:
                self._evict(eid)
                return slot
        for eid, slot in victims:  # other shapes: free their buffers until a new one fits
            self._evict(eid)
            self.slots.remove(slot)
            if self._can_allocate(layout):
                return self._new_slot(layout)
        held = ", ".join(f"{e}{' (pinned)' if e in self.config.pinned else ''}" for e in self.resident)
        raise PoolBusyError(
            f"no device slot can be freed for an expert: every resident expert is pinned or in use ({held})"
        )

    def _can_allocate(self, layout: Layout) -> bool:
        if len(self.slots) >= self.config.max_resident:
            return False
        budget = self.budget_bytes
        return budget is None or sum(s.layout.nbytes for s in self.slots) + layout.nbytes <= budget

    def _evict(self, expert_id: str) -> None:
        slot = self.resident.pop(expert_id)
        slot.holder = None
        self.stats.evictions += 1

    def _new_slot(self, layout: Layout, flat=None) -> Slot:
        from coe.serving.pool.store import build_skeleton

        if flat is None:
            flat = layout.empty(self.device)
            if self._copy_stream is not None:
                # the copy stream writes this buffer: freeing it must wait for that stream too
                flat.record_stream(self._copy_stream)
        host = next(h for h in self.host.values() if h.layout is layout)
        model = build_skeleton(host.config, self.dtype)
        layout.bind(model, flat)
        slot = Slot(layout=layout, flat=flat, model=model)
        if self.swapping or self.device != "cpu":
            self.slots.append(slot)
        return slot

    def _copy_in(self, slot: Slot, host: HostExpert) -> None:
        start = time.perf_counter()
        if self._copy_stream is None:
            slot.flat.copy_(host.flat)
            self._timed(host.id, time.perf_counter() - start)
        else:
            import torch

            compute = torch.cuda.current_stream()  # read before switching streams below
            with torch.cuda.stream(self._copy_stream):
                if slot.free is not None:
                    self._copy_stream.wait_event(slot.free)
                else:
                    # a fresh buffer may reuse memory the compute stream still reads (a freed
                    # slot of another shape): order the copy after the compute queued so far
                    self._copy_stream.wait_stream(compute)
                began = torch.cuda.Event(enable_timing=True)   # after the wait: times the copy alone
                began.record(self._copy_stream)
                slot.flat.copy_(host.flat, non_blocking=True)
                slot.ready = torch.cuda.Event(enable_timing=True)
                slot.ready.record(self._copy_stream)
            self._read_timings()
            self._untimed.append((host.id, began, slot.ready))
        self.stats.swap_s += time.perf_counter() - start
        self.stats.swaps += 1
        self.stats.bytes_swapped += host.nbytes
        self.stats.per_expert_swaps[host.id] = self.stats.per_expert_swaps.get(host.id, 0) + 1
