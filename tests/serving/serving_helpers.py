"""Helpers of the serving tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers import LoopThread, make_lora  # noqa: F401  (re-exported for the serving tests)

ADMIN = "test-admin-key"
"""The admin key of the serving tests: in ``$COE_ADMIN_KEY`` for the whole session (``conftest.py``),
as an operator sets it; a config file never holds it."""


@dataclass
class Decision:
    """Shaped like ``routers.RoutingDecision`` (not imported: under pytest's prepend import mode
    the folder tests/routers can shadow the routers package)."""

    expert: str
    scores: dict
    router: str


class KeywordRouter:
    """Test double of ``routers.OnlineRouter``: an expert whose id appears in the query wins,
    else the default expert. Real routing is tested with the real router elsewhere."""

    name = "keyword-test"

    def __init__(self, expert_ids, default):
        self.ids = list(expert_ids)
        self.default = default

    def route(self, queries):
        out = []
        for q in queries:
            hits = [e for e in self.ids if e in q.split()]
            choice = hits[-1] if hits else self.default
            out.append(Decision(choice, {e: float(e == choice) for e in self.ids}, self.name))
        return out

    def add_expert(self, expert):
        self.ids.append(expert.id)

    def remove_expert(self, expert_id):
        self.ids.remove(expert_id)

    def experts(self):
        return list(self.ids)




def tiny_config_dict(llama: Path, loras: list[Path], root: Path, *, flaky: bool = True, **serving) -> dict:
    """Experts: 'tiny' (hf), LoRAs 'tiny-a', 'tiny-b' on it, and 'flaky' (a second model whose
    engine the tests may break) falling back to 'tiny'."""
    engine = {"kind": "hf", "max_model_len": 128, "max_lora_rank": 8, "nice": 5}   # nice: Ray replicas only
    experts = [
        {"id": "tiny", "kind": "model", "model": str(llama), "engine": engine,
         "description": "general questions and facts", "examples": ["what is the capital of france ?"],
         "resources": {"num_cpus": 0.25}},
        {"id": "tiny-a", "kind": "lora", "base": "tiny", "adapter": str(loras[0]),
         "description": "math and arithmetic", "examples": ["what is 2 + 3 ?", "1 + 1 = ?"]},
        {"id": "tiny-b", "kind": "lora", "base": "tiny", "adapter": str(loras[1]),
         "description": "python code", "examples": ["def return x python code"]},
        {"id": "flaky", "kind": "model", "model": str(llama), "engine": engine, "fallback": "tiny",
         "description": "a model whose engine fails in tests", "resources": {"num_cpus": 0.25}},
    ]
    if not flaky:
        experts = [e for e in experts if e["id"] != "flaky"]
    return {
        "router": {"name": "centroid", "default_expert": "tiny"},
        "experts": experts,
        "serving": {
            "registry_path": str(root / "registry.sqlite"),
            "adapter_roots": [str(root / "adapters")],
            "max_tokens_limit": 64,
            "max_tokens_default": 8,
            "batching": {"max_batch_size": 8, "max_wait_ms": 5},
            "ingress": {"num_cpus": 0.25},
            **serving,
        },
    }


class Harness:
    """The FastAPI app + ingress logic + in-process expert servers (real engines) on a loop thread.

    ``engine_cls_for(spec)`` may swap an engine class (None: the registered one); ``router``
    defaults to a :class:`KeywordRouter` over the experts with ``default`` as its default."""

    def __init__(self, loop_thread, config, base_dir, registry=None, *, engine_cls_for=None, router=None,
                 default="tiny"):
        from coe.registry import live_experts
        from coe.serving.api.backend import LocalBackend
        from coe.serving.api.routes import create_api
        from coe.serving.api.service import CoEService
        from coe.serving.deployments.spec import plan_servers

        experts = live_experts(config, registry) if registry is not None else list(config.experts)
        specs = plan_servers(experts, base_dir=base_dir, batching=config.serving.batching)
        self.backend = LocalBackend(specs, engine_cls_for=engine_cls_for)
        self.lt = loop_thread
        self.lt.run(self.backend.start())
        router = router or KeywordRouter([e.id for e in experts], default)
        self.service = CoEService(config, backend=self.backend, router=router, registry=registry,
                                  base_dir=base_dir, experts=experts)
        self.app = create_api(self.service)

    def request(self, method, path, **kw) -> httpx.Response:
        async def go():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://coe") as client:
                return await client.request(method, path, **kw)

        return self.lt.run(go())

    def chat(self, content, model="coe", **kw) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": 6, **kw}
        return self.request("POST", "/v1/chat/completions", json=body)

    def close(self) -> None:
        self.lt.run(self.service.close())
        self.lt.run(self.backend.stop())


def error_of(resp) -> str:
    return resp.json()["error"]["message"]

