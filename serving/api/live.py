"""The live state the routing policy weighs, gathered at the ingress: load, residency, health.

:class:`LiveState` reads, per expert, the admission queue (queue depth, expected wait from the
measured service time: :class:`coe.serving.api.admission.Admission`), the health the catalog
keeps (:meth:`coe.serving.api.catalog.ExpertCatalog.serving`) and, for pooled experts, the pool's
residency and measured swap-in times (the pool engine's ``stats()``: ``resident``, ``swap_in_s``,
as the pool server reports them).
It only gathers; the ranking is :meth:`coe.routers.policy.SelectionPolicy.plan`'s.

The pool's state lives on its server (another process under Ray), so it is read in the
background, at most every ``refresh_s`` seconds while routed requests come, and a decision uses
the last answer (None before the first: residency unknown). Between reads the view follows the
requests this ingress sends (:meth:`LiveState.dispatched`): the pool keeps its residents in LRU
order, so an expert just sent a request becomes the most recently used resident and, past the
pool's ``max_resident``, the least recently used one leaves; a read asked for before such a
request gets those requests replayed on it. Without this, decisions made between reads saw a
resident set from before the swaps of the requests just routed (``docs/benchmarks.md``). Runs on
the ingress's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from coe.config import ModelExpert
from coe.routers.policy import ExpertLoad, Plan, SelectionPolicy
from coe.serving.deployments.spec import POOL_SERVER

log = logging.getLogger("coe.serving")


class LiveState:
    """Per-expert :class:`ExpertLoad` from ``admission``, ``catalog`` and ``backend`` (see module doc)."""

    def __init__(self, catalog, admission, backend, *, refresh_s: float = 1.0) -> None:
        self.catalog = catalog
        self.admission = admission
        self.backend = backend
        self.refresh_s = refresh_s
        self._pool: dict | None = None        # the pool server's last stats, requests sent since applied
        self._pool_at = -float("inf")         # when they were asked for (monotonic)
        self._sent: list[tuple[float, str]] = []   # (when, expert) of requests to pooled experts since that ask
        self._refresh: asyncio.Task | None = None

    def plan(self, policy: SelectionPolicy, experts, scores, *, uncertainty=None, head: str | None = None,
             default: str | None = None) -> Plan:
        """``policy``'s :class:`Plan` over ``experts`` (ids in the catalog) now: the router's
        ``scores`` and ``uncertainty`` (expert id -> value), each expert's configured ``cost`` and
        live state; ``head`` as for :meth:`SelectionPolicy.plan`. Exact ties go to ``default``
        first, then to the catalog's order."""
        wanted = set(experts)
        ids = [e for e in self.catalog.ids() if e in wanted]
        if default in ids:
            ids.remove(default)
            ids.insert(0, default)
        costs = {e: float(self.catalog.get(e).cost) for e in ids}
        return policy.plan(ids, scores, costs, uncertainty=uncertainty, load=self.loads(ids), head=head)

    def loads(self, expert_ids) -> dict[str, ExpertLoad]:
        """The live state of each of ``expert_ids`` (all in the catalog) now."""
        pooled = {e for e in expert_ids if _pooled(self.catalog.get(e))}
        if pooled:
            self._refresh_pool()
        return {e: self._load(e, e in pooled) for e in expert_ids}

    def _load(self, expert_id: str, pooled: bool) -> ExpertLoad:
        adm = self.admission
        resident, swap_s = True, None
        if pooled:
            pool = self._pool or {}
            resident = expert_id in pool["resident"] if "resident" in pool else None
            if resident is False:      # an expert the view evicted since the read has a swap-in cost of 0 there
                costs = pool.get("swap_in_s") or {}
                swap_s = costs.get(expert_id) or max((c for c in costs.values() if c), default=None)
        return ExpertLoad(healthy=self.catalog.serving(expert_id), queue_depth=adm.queue_depth(expert_id),
                          running=adm.running(expert_id), expected_wait_s=adm.expected_wait_s(expert_id),
                          resident=resident, swap_s=swap_s)

    def dispatched(self, expert_id: str) -> None:
        """A request is being sent to ``expert_id``: take a pooled expert into the residency view now."""
        if expert_id not in self.catalog or not _pooled(self.catalog.get(expert_id)):
            return
        self._sent.append((time.monotonic(), expert_id))
        if self._pool is not None:
            self._pool = _used(self._pool, [expert_id])

    def _refresh_pool(self) -> None:
        """Ask the pool server for its state in the background when the last answer is old."""
        if time.monotonic() - self._pool_at < self.refresh_s or (self._refresh and not self._refresh.done()):
            return
        self._pool_at = asked = time.monotonic()
        self._refresh = asyncio.get_running_loop().create_task(self._read_pool(asked))

    async def _read_pool(self, asked: float) -> None:
        try:
            stats = await asyncio.wait_for(self.backend.stats(), timeout=10)
        except Exception as err:  # noqa: BLE001  (routing goes on with the last state)
            log.warning("the expert pool's state could not be read: %s", type(err).__name__)
            return
        self._sent = [(t, e) for t, e in self._sent if t >= asked]     # the read saw the older ones
        pool = (stats.get(POOL_SERVER) or {}).get("engine") or None
        self._pool = _used(pool, [e for _, e in self._sent]) if pool is not None else None

    async def close(self) -> None:
        """Stop a refresh in flight."""
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
            self._refresh = None


def _used(pool: dict, experts: list[str]) -> dict:
    """``pool`` (its stats) after requests to ``experts``, in order: each becomes the most recently
    used resident (``resident`` is LRU first), the least recently used leaving past ``max_resident``."""
    if "resident" not in pool or not experts:
        return pool
    resident = list(pool["resident"])
    for e in experts:
        resident = [r for r in resident if r != e] + [e]
    cap = pool.get("max_resident")
    return {**pool, "resident": resident[-cap:] if cap else resident}


def _pooled(expert) -> bool:
    return isinstance(expert, ModelExpert) and expert.pooled
