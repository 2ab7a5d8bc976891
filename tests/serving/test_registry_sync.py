"""One expert set for every ingress replica (no Ray): two ingress services over the same expert
servers and the same registry file, as two replicas are; registrations and removals through one
reach the other through :class:`RegistrySync`. Also the expert server's lazily loaded,
LRU-evictable adapters (what Serve multiplexing drives on a replica)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.helpers import generate
from tests.serving.serving_helpers import ADMIN, Harness, KeywordRouter, tiny_config_dict

AUTH = {"Authorization": f"Bearer {ADMIN}"}
POLL_S = 0.2


class Replica:
    """A second ingress replica: its own service, router and registry connection, the same
    expert servers (``backend``) as ``first``."""

    def __init__(self, first: Harness, config, root) -> None:
        from coe.registry import ExpertRegistry, live_experts
        from coe.serving.api.registry_sync import RegistrySync
        from coe.serving.api.routes import create_api
        from coe.serving.api.service import CoEService

        registry = ExpertRegistry(root / "registry.sqlite")
        experts = live_experts(config, registry)
        self.lt = first.lt
        self.service = CoEService(config, backend=first.backend, router=KeywordRouter([e.id for e in experts], "tiny"),
                                  registry=registry, base_dir=root, experts=experts)
        self.sync = RegistrySync(self.service, period_s=POLL_S)
        self.sync.revision = registry.revision()
        self.app = create_api(self.service)

    def request(self, method, path, **kw) -> httpx.Response:
        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://coe") as c:
                return await c.request(method, path, **kw)

        return self.lt.run(go())

    def chat(self, content, model="coe"):
        return self.request("POST", "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0})


@pytest.fixture
def pair(loop_thread, tiny_llama_dir, tiny_loras, serving_root, tmp_path):
    from coe.config import parse_config
    from coe.registry import ExpertRegistry

    (tmp_path / "adapters").symlink_to(serving_root / "adapters")
    config = parse_config(tiny_config_dict(tiny_llama_dir, tiny_loras, tmp_path, flaky=False,
                                           registry_poll_s=POLL_S))
    a = Harness(loop_thread, config, tmp_path, ExpertRegistry(tmp_path / "registry.sqlite"))
    b = Replica(a, config, tmp_path)
    a.root = tmp_path
    yield a, b
    loop_thread.run(b.sync.stop())
    loop_thread.run(b.service.close())
    a.close()


def _lora(root, eid="tiny-c", folder="c"):
    return {"id": eid, "base": "tiny", "adapter": str(root / "adapters" / folder),
            "description": "physics", "examples": ["what is gravity ?"]}


def test_registration_through_a_routes_through_b_within_the_bound(pair):
    a, b = pair
    a.lt.run(_start(b.sync))
    assert a.request("POST", "/v1/experts", headers=AUTH, json=_lora(a.root)).status_code == 201
    t0 = time.monotonic()
    while b.chat("tiny-c what is gravity ?").json().get("model") != "tiny-c":
        assert time.monotonic() - t0 < POLL_S + 2.0, "B never served the registration"
        time.sleep(0.02)
    visible_s = time.monotonic() - t0
    assert visible_s <= POLL_S + 1.0  # the stated bound: poll period + one reload
    assert b.chat("hello", model="tiny-c").status_code == 200  # pinned too
    # a removal through B reaches A
    assert b.request("DELETE", "/v1/experts/tiny-c", headers=AUTH).status_code == 200
    assert a.lt.run(_sync_a(a)) is True
    assert a.chat("hello", model="tiny-c").status_code == 404
    assert a.chat("tiny-c what is gravity ?").json()["model"] == "tiny"


async def _start(sync):
    sync.start()


async def _sync_a(a):
    from coe.serving.api.registry_sync import RegistrySync

    sync = RegistrySync(a.service, period_s=POLL_S)
    sync.revision = -1
    return await sync.sync_once()


def test_sync_is_idempotent_on_the_registering_replica(pair):
    a, b = pair
    assert a.request("POST", "/v1/experts", headers=AUTH, json=_lora(a.root)).status_code == 201
    before = a.service.catalog.snapshot()
    assert a.lt.run(_sync_a(a)) is False  # A already serves what the registry says
    assert a.service.catalog.snapshot() == before
    assert a.lt.run(b.sync.sync_once()) is True and a.lt.run(b.sync.sync_once()) is False


def test_re_registration_with_other_weights_replaces_it_everywhere(pair):
    a, b = pair
    assert a.request("POST", "/v1/experts", headers=AUTH, json=_lora(a.root)).status_code == 201
    a.lt.run(b.sync.sync_once())
    assert a.request("DELETE", "/v1/experts/tiny-c", headers=AUTH).status_code == 200
    assert a.request("POST", "/v1/experts", headers=AUTH, json=_lora(a.root, folder="a")).status_code == 201
    assert a.lt.run(b.sync.sync_once()) is True
    assert b.service.catalog.get("tiny-c").adapter.endswith("/a")


def test_a_poll_during_a_registration_on_the_same_replica_keeps_it(pair, monkeypatch):
    """A's poll sees an older change while A is loading a new expert: it must not apply a list
    read before that expert reached the registry (the expert would vanish until the next poll)."""
    a, _ = pair
    assert a.request("POST", "/v1/experts", headers=AUTH, json=_lora(a.root)).status_code == 201
    original = a.backend.add_adapter

    async def slow_add(*args):
        await asyncio.sleep(0.5)
        await original(*args)

    monkeypatch.setattr(a.backend, "add_adapter", slow_add)

    async def go():
        from coe.serving.api.registry_sync import RegistrySync

        sync = RegistrySync(a.service, period_s=POLL_S)
        sync.revision = -1
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=a.app), base_url="http://coe") as c:
            register = asyncio.create_task(c.post("/v1/experts", headers=AUTH, json=_lora(a.root, "tiny-d", "a")))
            await asyncio.sleep(0.1)  # the registration holds the admin lock, loading
            await sync.sync_once()
            assert (await register).status_code == 201

    a.lt.run(go())
    assert "tiny-d" in a.service.catalog and a.chat("hello", model="tiny-d").status_code == 200


def test_registry_outage_keeps_serving_and_refuses_registrations(pair, monkeypatch):
    from coe.errors import RegistryUnavailableError

    a, b = pair
    assert a.request("POST", "/v1/experts", headers=AUTH, json=_lora(a.root)).status_code == 201
    a.lt.run(b.sync.sync_once())

    def down(*args, **kw):
        raise RegistryUnavailableError("expert registry sqlite:///x is unreachable")

    for svc in (a.service, b.service):
        for name in ("revision", "list", "add", "remove"):
            monkeypatch.setattr(svc.catalog.registry, name, down)
    assert a.lt.run(b.sync.sync_once()) is False and b.sync.reachable is False
    assert b.chat("tiny-c what is gravity ?").json()["model"] == "tiny-c"  # the current set keeps serving
    r = b.request("POST", "/v1/experts", headers=AUTH, json=_lora(a.root, eid="tiny-d", folder="a"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable"
    assert "tiny-d" not in b.service.catalog
    assert "tiny-d" not in a.backend.servers["expert-tiny"].engine.adapters()  # nothing half-live
    assert b.request("DELETE", "/v1/experts/tiny-c", headers=AUTH).status_code == 503
    assert "tiny-c" in b.service.catalog
    monkeypatch.undo()
    assert a.lt.run(b.sync.sync_once()) is False and b.sync.reachable is True


def test_a_registered_expert_this_replica_cannot_serve_is_not_routed(pair):
    from coe.config import LoraExpert

    a, b = pair
    # a row whose base this replica does not serve (e.g. written by a newer config): skipped, logged
    b.service.catalog.registry.add(LoraExpert(id="orphan", base="gone", adapter=str(a.root / "adapters" / "c")))
    assert a.lt.run(b.sync.sync_once()) is False
    assert "orphan" not in b.service.catalog
    assert b.chat("orphan hello").json()["model"] == "tiny"


def test_a_followed_lora_whose_folder_is_gone_is_a_503_never_a_client_error(pair):
    """Replica B follows a LoRA whose folder is gone by the time B's server first loads it: a
    routed request goes to the next-best expert, a pinned one gets a 503 naming the expert only."""
    from coe.config import LoraExpert

    a, b = pair
    folder = a.root / "adapters" / "vanished"
    b.service.catalog.registry.add(LoraExpert(id="ghost", base="tiny", adapter=str(folder)))
    assert a.lt.run(b.sync.sync_once()) is True and "ghost" in b.service.catalog
    r = b.chat("ghost hello")
    assert r.status_code == 200 and r.json()["model"] == "tiny" and r.json()["coe"]["fallback_from"] == "ghost"
    r = b.chat("hello", model="ghost")
    assert r.status_code == 503 and "'ghost' is unavailable" in r.json()["error"]["message"]
    assert str(folder) not in r.text
    assert b.request("DELETE", "/v1/experts/ghost", headers=AUTH).status_code == 200


def test_lazy_adapters_load_on_first_use_and_unload_when_idle(loop_thread, tiny_llama_dir, tiny_loras):
    """What a Serve replica does for a LoRA registered through another replica: load it under its
    multiplexed id on the first request, and on LRU eviction unload it once no request uses it."""
    from coe.config import BatchingConfig, ModelExpert
    from coe.serving.deployments.expert_server import ExpertServer
    from coe.serving.deployments.spec import ServerSpec, adapter_model_id
    from coe.types import ChatMessage, Dispatch, GenerationRequest, SamplingParams

    host = ModelExpert(id="tiny", model=str(tiny_llama_dir), engine={"kind": "hf", "max_model_len": 128,
                                                                     "max_lora_rank": 8})
    server = ExpertServer(ServerSpec(server_id="expert-tiny", host=host, batching=BatchingConfig()))
    path = str(tiny_loras[0])
    name = adapter_model_id("tiny-x", path)
    assert name != adapter_model_id("tiny-x", str(tiny_loras[1])) and name.startswith("tiny-x--")

    def req():
        return Dispatch(GenerationRequest(request_id="r", messages=[ChatMessage(role="user", content="hi")],
                                          sampling=SamplingParams(max_tokens=8, temperature=0)),
                        expert="tiny-x", adapter="tiny-x", adapter_path=path)

    async def go():
        await server.start()
        try:
            served = await generate(server, req(), name)  # first request: loads it
            assert served.completion_tokens >= 1 and server.lazy_adapters() == [name]
            assert name in server.engine.adapters()
            stream = server.stream(req(), name)
            await stream.__anext__()  # in use
            unload = asyncio.create_task(server.unload_lazy(name))
            await asyncio.sleep(0.1)
            assert not unload.done() and name in server.engine.adapters()  # waits for the stream
            await stream.aclose()
            await asyncio.wait_for(unload, 5)
            assert server.lazy_adapters() == [] and name not in server.engine.adapters()
            await generate(server, req(), name)  # asked for again: loaded again
            assert server.lazy_adapters() == [name]
        finally:
            await server.stop()

    loop_thread.run(go())


def test_a_lora_that_failed_at_start_is_removed_and_registered_again_on_a_replica(loop_thread, tiny_llama_dir,
                                                                                  tiny_loras, tmp_path):
    """A Serve replica whose start-up LoRA's folder was gone: it reports the failure (the ingress
    marks the expert unavailable), and once the expert is registered again with a folder that
    exists it serves under its new multiplexed id, also on a replica the removal never reached."""
    from coe.config import BatchingConfig, LoraExpert, ModelExpert
    from coe.serving.deployments.expert_server import ExpertServer
    from coe.serving.deployments.spec import ServerSpec, adapter_model_id
    from coe.types import ChatMessage, Dispatch, GenerationRequest, SamplingParams

    host = ModelExpert(id="tiny", model=str(tiny_llama_dir), engine={"kind": "hf", "max_model_len": 128,
                                                                     "max_lora_rank": 8})
    gone = LoraExpert(id="tiny-x", base="tiny", adapter=str(tmp_path / "gone"))
    spec = ServerSpec(server_id="expert-tiny", host=host, loras=[gone], batching=BatchingConfig())
    removed, missed = ExpertServer(spec), ExpertServer(spec)   # two replicas of one server
    path = str(tiny_loras[0])
    request = Dispatch(GenerationRequest(request_id="r", messages=[ChatMessage(role="user", content="hi")],
                                         sampling=SamplingParams(max_tokens=4, temperature=0)),
                       expert="tiny-x", adapter="tiny-x", adapter_path=path)

    async def go():
        for server in (removed, missed):
            await server.start()
        try:
            states = removed.ready()
            assert states["tiny"] is None and f"adapter folder {tmp_path / 'gone'} does not exist" in states["tiny-x"]
            await removed.remove_adapter("tiny-x")   # DELETE /v1/experts/tiny-x reaches one replica
            assert "tiny-x" not in removed.ready()
            name = adapter_model_id("tiny-x", path)  # registered again, with a folder that exists
            for server in (removed, missed):
                served = await generate(server, request, name)
                assert served.completion_tokens >= 1
        finally:
            for server in (removed, missed):
                await server.stop()

    loop_thread.run(go())
