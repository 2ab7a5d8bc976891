"""The ingress deployment: the FastAPI app of ``serving/api`` on Ray Serve.

Each replica builds its own :class:`CoEService`: the live experts (config + registry), the
online router over them, and a :class:`ServeBackend` over the expert-server handles it was
bound to (plus the Serve applications of models registered at runtime).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray import serve

from coe.config import CoEConfig
from coe.registry import live_experts, open_registry
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
        config = CoEConfig.model_validate_json(config_json)
        base = Path(base_dir) if base_dir else None
        registry = open_registry(config, base)
        experts = live_experts(config, registry)
        backend = ServeBackend(servers, load_timeout_s=config.serving.request_timeout_s)
        specs = plan_servers(experts, base_dir=base, batching=config.serving.batching, pool=config.serving.pool)
        backend.attach_runtime_servers({sid: s for sid, s in specs.items() if sid not in servers})
        router = build_online_router(config.router, experts, base_dir=base)
        self.service = CoEService(config, backend=backend, router=router, registry=registry, base_dir=base,
                                  experts=experts)
        log.info("coe ingress up: %d experts, router %s", len(experts), getattr(router, "name", "?"))

    def __serve_build_asgi_app__(self):
        from coe.serving.api.routes import create_api

        return create_api(self.service)
