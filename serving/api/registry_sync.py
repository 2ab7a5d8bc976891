"""One expert set for every ingress replica: each follows the registry, the source of truth.

A registration or removal changes the registry and the live set of the replica that handled it
(``serving/api/admin.py``). Every replica runs a :class:`RegistrySync`: every
``serving.registry_poll_s`` seconds it reads the registry's revision (one row), and when it
changed it re-reads the registered experts and brings its own live set in step: router and
live set, and for a ``model`` expert the handle of the Serve application the registering replica
started. LoRA experts need nothing more: expert-server replicas load them on their first
request for them (Serve multiplexing, ``serving/deployments/ray_deployments.py``).

Bound: a change through one replica is served by every other one within ``registry_poll_s``
plus the time of one reload (a registry read and the router's update).

A registry that cannot be reached leaves the current set serving (and is logged once per
outage); registrations are refused meanwhile by the registry itself (503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from coe.config import Expert, LoraExpert, ModelExpert
from coe.errors import CoEError, RegistryUnavailableError
from coe.serving.deployments.spec import ServerSpec, server_id_of

log = logging.getLogger("coe.serving")


class RegistrySync:
    """Keeps ``service``'s live expert set equal to its config's experts plus the registry's.

    Runs on the service's event loop; changes are applied under ``service.admin_lock``, so they
    never interleave with a registration on the same replica. ``revision`` is the registry
    revision the live set reflects (None before the first sync)."""

    def __init__(self, service, *, period_s: float) -> None:
        self.service = service
        self.registry = service.catalog.registry
        self.period_s = period_s
        self.revision: int | None = None
        self.reachable = True
        self.last_reload_s: float | None = None
        # called after every revision change, once the live set follows it (e.g. the router's
        # refit on stored runtime profiles: ``ProfileJobs.refresh``)
        self.listeners: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start polling on the running loop (no-op without a registry or when running)."""
        if self.registry is not None and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.sync_once()
            except Exception:  # a poll must never stop polling
                log.exception("registry sync failed")

    async def sync_once(self) -> bool:
        """Check the revision; reload on a change. True when the live set changed.

        Runs under the admin lock: a registration in progress on this replica (loaded, not yet
        in the registry) is never undone by a list read before it was written."""
        async with self.service.admin_lock:
            try:
                revision = await asyncio.to_thread(self.registry.revision)
                if revision == self.revision:
                    self._up()
                    return False
                t0 = time.perf_counter()
                registered = await asyncio.to_thread(self.registry.list)
            except RegistryUnavailableError as err:
                if self.reachable:
                    log.warning("registry unreachable; serving the current %d experts: %s",
                                len(self.service.catalog.ids()), err.message)
                self.reachable = False
                return False
            self._up()
            changed = self._apply(registered)
            self.revision = revision
        for listen in self.listeners:
            await listen()
        self.last_reload_s = time.perf_counter() - t0
        if changed:
            log.info("registry revision %d: now serving %s (reload %.3f s)", revision,
                     ", ".join(self.service.catalog.ids()), self.last_reload_s)
        return changed

    def _up(self) -> None:
        if not self.reachable:
            log.info("registry reachable again")
        self.reachable = True

    def _apply(self, registered: list[Expert]) -> bool:
        catalog = self.service.catalog
        want = {e.id: e for e in registered if e.id not in catalog.config_ids}
        have = {eid: e for eid, e in catalog.snapshot().items() if eid not in catalog.config_ids}
        stale = [eid for eid, e in have.items() if eid not in want or _body(e) != _body(want[eid])]
        # LoRAs first: a removed model's LoRAs go before it
        for eid in sorted(stale, key=lambda i: not isinstance(have[i], LoraExpert)):
            expert = catalog.forget(eid)
            if isinstance(expert, ModelExpert):
                self.service.backend.detach_server(server_id_of(expert))
        added = 0
        for expert in [e for eid, e in want.items() if eid not in have or eid in stale]:
            try:  # registry order: a model before the LoRAs on it
                self._follow(expert)
                added += 1
            except (CoEError, ValueError, KeyError) as err:
                # not routed by this replica (never half-live); the registry keeps it
                log.error("registered expert %s cannot be served by this replica: %s", expert.id, err)
        return bool(stale or added)

    def _follow(self, expert: Expert) -> None:
        catalog = self.service.catalog
        if isinstance(expert, LoraExpert) and not isinstance(catalog.get(expert.base), ModelExpert):
            raise KeyError(f"its base {expert.base!r} is not a served model expert")
        if isinstance(expert, ModelExpert):
            base_dir = self.service.base_dir
            spec = ServerSpec(server_id=server_id_of(expert), host=expert, batching=self.service.config.serving.batching,
                              base_dir=str(base_dir) if base_dir else None)
            self.service.backend.attach_server(spec)
            try:
                catalog.follow(expert)
            except Exception:
                self.service.backend.detach_server(spec.server_id)
                raise
            return
        catalog.follow(expert)


def _body(expert: Expert) -> dict:
    return expert.model_dump(mode="json")
