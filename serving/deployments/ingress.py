"""The ingress deployment: the FastAPI app of ``serving/api`` on Ray Serve.

Each replica builds its own :class:`CoEService`: the live experts (config + registry), the
online router over them, and a :class:`ServeBackend` over the expert-server handles it was
bound to (plus the Serve applications of models registered at runtime), and keeps that set in
step with the registry (:class:`RegistrySync`). Responses name the replica (``x-coe-replica``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray import serve

from coe.config import CoEConfig
from coe.registry import live_experts, open_registry
from coe.serving.api.registry_sync import RegistrySync
from coe.serving.deployments.hops import stamp
from coe.serving.deployments.memtrace import MemTrace, frames_from_env, memory_report
from coe.serving.deployments.ray_deployments import ServeBackend
from coe.serving.deployments.spec import plan_servers

log = logging.getLogger("coe.serving")


@serve.deployment(max_ongoing_requests=1024, graceful_shutdown_timeout_s=5)
@serve.ingress()
class CoEIngress:
    async def __init__(self, config_json: str, base_dir: str | None, servers: dict) -> None:
        from coe.routers import build_online_router
        from coe.serving.api.service import CoEService

        logging.basicConfig(level=logging.INFO)
        frames = frames_from_env()   # COE_TRACEMALLOC, checked first
        config = CoEConfig.model_validate_json(config_json)
        base = Path(base_dir) if base_dir else None
        registry = open_registry(config, base)
        revision = registry.revision()  # before reading the set: a change in between is seen at the first poll
        experts = live_experts(config, registry)
        specs = plan_servers(experts, base_dir=base, batching=config.serving.batching, pool=config.serving.pool,
                             max_adapters=config.serving.adapters_per_replica)
        replicas = {sid: (r.autoscaling.max_replicas if r.autoscaling else r.num_replicas)
                    for sid, r in ((sid, s.resources) for sid, s in specs.items())}
        backend = ServeBackend(servers, load_timeout_s=config.serving.request_timeout_s, replicas=replicas)
        backend.attach_runtime_servers({sid: s for sid, s in specs.items() if sid not in servers})
        router = build_online_router(config.router, experts)
        self.service = CoEService(config, backend=backend, router=router, registry=registry, base_dir=base,
                                  experts=experts)
        self.sync = RegistrySync(self.service, period_s=config.serving.registry_poll_s)
        self.sync.revision = revision
        self.sync.start()  # every replica follows the registry (serving/api/registry_sync.py)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.memtrace = MemTrace.of(frames)   # traced from here on (off: None)
        log.info("coe ingress %s up: %d experts, router %s", self.replica, len(experts), getattr(router, "name", "?"))

    async def memory_diff(self, limit: int = 20) -> dict:
        """This replica's RSS and, under ``COE_TRACEMALLOC``, its heap diff (by handle only: no route)."""
        return memory_report(self.memtrace, limit)

    def __serve_build_asgi_app__(self):
        from coe.serving.api.routes import create_api

        app = create_api(self.service)
        self.sync.listeners.append(app.state.profiles.refresh)   # profiles stored through another replica
        # which ingress replica answered (a random id, no host detail): replicas answer alike
        # within the registry sync bound, and this is how an operator checks which one lags
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app


class ReplicaHeader:
    """Pure ASGI middleware (streams and disconnects pass through untouched): adds
    ``x-coe-replica`` to every HTTP response."""

    def __init__(self, app, replica: str) -> None:
        self.app, self.header = app, (b"x-coe-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        stamp("ingress.enter")
        body = False

        async def send_named(message):
            nonlocal body
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            elif not body and message["type"] == "http.response.body":
                body = True
                stamp("ingress.first_body")
            await send(message)

        return await self.app(scope, receive, send_named)
