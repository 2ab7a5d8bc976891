"""The live expert set of one ingress replica, owned in one place: experts, router, registry, health.

:class:`ExpertCatalog` is the only object that changes which experts are served: ``add`` and
``remove`` keep the expert dict, the online router and the persistent registry in step (all or
nothing), and ``snapshot`` gives readers a copy. It also holds the health of the experts'
servers (:class:`Health`), so request handling, readiness probes and the router's choice read one
state. Everything runs on the ingress's event loop (not thread-safe).
"""

from __future__ import annotations

import logging
import time

from coe.config import Expert, ModelExpert
from coe.serving.deployments.spec import server_id_of

log = logging.getLogger("coe.serving")


class Health:
    """Which experts cannot serve right now and until when (per ingress replica).

    ``mark_down`` starts a hold of ``retry_after_s``; while it lasts, :meth:`retry_after` says how
    long is left and requests fail fast or go elsewhere. When it ends the next request is let
    through (half-open): a success or a good probe marks the expert up, another failure marks it
    down again.

    Apart from that, an expert its server reported as failed to load (its adapter folder is gone,
    its model does not load) is *unavailable* (:meth:`unavailable`) until a readiness probe finds
    it loaded: no hold runs out on it, routing never picks it, and pinned requests fail fast."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        self._down: dict[str, tuple[float, str]] = {}  # expert id -> (monotonic end of hold, why)
        self._unavailable: dict[str, str] = {}  # expert id -> why its server could not load it

    def mark_down(self, expert_ids, why: str, retry_after_s: float | None = None) -> None:
        until = time.monotonic() + (retry_after_s or self.retry_after_s)
        for eid in expert_ids:
            if eid not in self._down:
                log.warning("expert %s marked down: %s", eid, why)
            self._down[eid] = (until, why)

    def mark_up(self, expert_ids) -> None:
        for eid in expert_ids:
            if self._down.pop(eid, None) is not None:
                log.info("expert %s is serving again", eid)

    def retry_after(self, expert_id: str) -> float | None:
        """Seconds until ``expert_id`` may be tried again; None when it may be tried now."""
        entry = self._down.get(expert_id)
        if entry is None:
            return None
        left = entry[0] - time.monotonic()
        return left if left > 0 else None

    def why(self, expert_id: str) -> str | None:
        entry = self._down.get(expert_id)
        return entry[1] if entry else None

    def set_unavailable(self, reasons: dict[str, str]) -> None:
        """Replace the unavailable experts (expert id -> why), as a readiness probe found them."""
        for eid in reasons.keys() - self._unavailable.keys():
            log.warning("expert %s is unavailable: %s", eid, reasons[eid])
        for eid in self._unavailable.keys() - reasons.keys():
            log.info("expert %s is available again", eid)
        self._unavailable = dict(reasons)

    def unavailable(self, expert_id: str) -> str | None:
        """Why ``expert_id`` could not be loaded; None when it is not known to have failed."""
        return self._unavailable.get(expert_id)

    def forget(self, expert_id: str) -> None:
        self._down.pop(expert_id, None)
        self._unavailable.pop(expert_id, None)


class ExpertCatalog:
    """The experts this replica serves (config + registry), kept in step with the router and
    the registry. ``config_ids`` are the experts of the config file (not removable at runtime)."""

    def __init__(self, experts: list[Expert], *, config_ids, router, registry=None,
                 down_retry_after_s: float = 5.0) -> None:
        self._experts: dict[str, Expert] = {e.id: e for e in experts}
        self.config_ids = frozenset(config_ids)
        self.router = router
        self.registry = registry
        self.health = Health(down_retry_after_s)

    # ------------------------------------------------------------------ reading

    def __contains__(self, expert_id: str) -> bool:
        return expert_id in self._experts

    def get(self, expert_id: str) -> Expert | None:
        return self._experts.get(expert_id)

    def snapshot(self) -> dict[str, Expert]:
        """A copy of the live set (id -> expert), safe to iterate while experts change."""
        return dict(self._experts)

    def ids(self) -> list[str]:
        return list(self._experts)

    def model_experts(self) -> list[str]:
        return sorted(e.id for e in self._experts.values() if isinstance(e, ModelExpert))

    def server_of(self, expert_id: str) -> str:
        return server_id_of(self._experts[expert_id])

    def on_server(self, server_id: str) -> list[str]:
        """The experts hosted by ``server_id`` (all of them go down with it)."""
        return [eid for eid, e in self._experts.items() if server_id_of(e) == server_id]

    def users_of(self, expert_id: str) -> list[str]:
        """Experts that name ``expert_id`` as their base or fallback."""
        return sorted(e.id for e in self._experts.values()
                      if getattr(e, "base", None) == expert_id or e.fallback == expert_id)

    def serving(self, expert_id: str) -> bool:
        """Whether requests may go to ``expert_id`` now: it is live, not unavailable, not held down."""
        return (expert_id in self._experts and self.health.unavailable(expert_id) is None
                and self.health.retry_after(expert_id) is None)

    # ------------------------------------------------------------------ changing

    def add(self, expert: Expert) -> None:
        """Serve ``expert``: registry (persisted), router and live set, all or nothing. The
        caller has loaded it on its server already; raises what the router or registry raised."""
        if self.registry is not None:
            self.registry.add(expert)
        try:
            self.router.add_expert(expert)
        except Exception:
            if self.registry is not None:
                self._quiet(self.registry.remove, expert.id)
            raise
        self._experts[expert.id] = expert
        self.health.forget(expert.id)

    def remove(self, expert_id: str) -> Expert:
        """Stop serving ``expert_id`` (router, live set, registry); returns it (KeyError if unknown)."""
        expert = self._experts[expert_id]
        if self.registry is not None:   # first: a registry outage (503) leaves the expert serving
            self.registry.remove(expert_id)
        self.router.remove_expert(expert_id)
        self._experts.pop(expert_id)
        self.health.forget(expert_id)
        return expert

    def follow(self, expert: Expert) -> None:
        """Serve ``expert`` that is already in the registry (another replica registered it):
        router and live set only. Raises what the router raised (nothing changed then)."""
        self.router.add_expert(expert)
        self._experts[expert.id] = expert
        self.health.forget(expert.id)

    def forget(self, expert_id: str) -> Expert | None:
        """Stop serving ``expert_id`` that is gone from the registry (another replica removed
        it): router and live set only. Returns it, or None when it was not served."""
        expert = self._experts.pop(expert_id, None)
        if expert is not None:
            self._quiet(self.router.remove_expert, expert_id)
            self.health.forget(expert_id)
        return expert

    @staticmethod
    def _quiet(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # (undoing after a failure; the first error is what matters)
            log.exception("undo failed: %s%s", getattr(fn, "__name__", fn), args)
