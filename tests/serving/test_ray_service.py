"""End to end over HTTP on Ray Serve: the app from ``coe.serving.app.build_app`` on a tiny config
(tiny llama on the transformers engine, tiny LoRAs, the real centroid router on minilm).
Ray and Serve start once for the module."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.serving_helpers import ADMIN, tiny_config_dict

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(config, base_dir):
    from ray import serve

    from coe.serving.app import APP_NAME, build_app

    serve.run(build_app(config, base_dir=base_dir), name=APP_NAME, route_prefix="/", blocking=False)


@pytest.fixture(scope="module")
def svc(tiny_llama_dir, tiny_loras, serving_root, minilm_dir, tmp_path_factory):
    import ray
    from ray import serve

    from coe.config import parse_config

    root = tmp_path_factory.mktemp("ray")
    (root / "adapters").symlink_to(serving_root / "adapters")
    config = parse_config(tiny_config_dict(tiny_llama_dir, tiny_loras, root, flaky=False))
    port = _free_port()
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _deploy(config, root)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        yield {"client": client, "config": config, "root": root, "llama": tiny_llama_dir,
               "session": Path(ctx.address_info["session_dir"])}
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()


def _chat(client, content, model="coe", **kw):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0, **kw}
    return client.post("/v1/chat/completions", json=body)


def test_ready_and_routed_chat_plain_and_streamed(svc):
    c = svc["client"]
    assert c.get("/readyz").json()["ready"] is True
    r = _chat(c, "what is 2 + 3 ?")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-a" == r.headers["x-coe-expert"]
    assert r.json()["coe"]["router"] == "centroid" and set(r.json()["coe"]["scores"]) == {"tiny", "tiny-a", "tiny-b"}
    with c.stream("POST", "/v1/chat/completions", json={"model": "tiny-b", "stream": True, "max_tokens": 6,
                                                         "temperature": 0,
                                                         "messages": [{"role": "user", "content": "hello"}]}) as s:
        assert s.status_code == 200 and s.headers["x-coe-expert"] == "tiny-b"
        events = [ln for ln in s.iter_lines() if ln]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    bad = c.post("/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    # errors raised inside the expert-server replicas come back with their own status
    for stream in (False, True):
        long = _chat(c, "hello " * 200, model="tiny", stream=stream)
        assert long.status_code == 400 and "128" in long.json()["error"]["message"]
    assert _chat(c, "hello", model="nope").status_code == 404


def test_disconnect_mid_stream_cancels(svc):
    """A client that goes away mid-stream cancels its generation. The tiny random model samples its
    end-of-sequence token now and then, so a generation can end on its own before the disconnect
    reaches it (nothing to cancel): then the request is sent again, at most three times."""
    import re

    from ray import serve

    c = svc["client"]
    handle = serve.get_deployment_handle("expert-tiny", app_name="coe")

    def cancelled() -> float:
        m = re.search(r'coe_cancelled_total\{expert="tiny"\} ([0-9.]+)', c.get("/metrics").text)
        return float(m.group(1)) if m else 0.0

    for _ in range(3):
        before = cancelled()
        with c.stream("POST", "/v1/chat/completions", json={"model": "tiny", "stream": True, "max_tokens": 64,
                                                             "temperature": 1.0,
                                                             "messages": [{"role": "user", "content": "hello"}]}) as s:
            lines = s.iter_lines()
            next(lines)
            next(lines)
        deadline, idle_since = time.time() + 20, None
        while time.time() < deadline:
            stats = handle.stats.remote().result()
            if stats["engine_running"] == 0 and cancelled() > before:
                return
            idle_since = (idle_since or time.time()) if stats["engine_running"] == 0 else None
            if idle_since and time.time() - idle_since > 3:   # finished, and no cancel counted: it ended on its own
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"generation not cancelled within 20 s: {stats}")
    pytest.fail(f"three generations ended without a cancel: {stats}")


def test_engine_replicas_run_at_the_configured_niceness(svc):
    """engine.nice lowers the replica's CPU priority (and its engine's), so routing in the ingress runs first."""
    import os

    import ray
    from ray import serve

    base = ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())   # Ray's worker niceness
    handle = serve.get_deployment_handle("expert-tiny", app_name="coe")
    assert handle.stats.remote().result()["nice"] == min(19, base + 5)


def test_runtime_lora_and_model_registration(svc):
    c = svc["client"]
    lora = {"id": "physics", "base": "tiny", "adapter": str(svc["root"] / "adapters" / "c"),
            "description": "physics: gravity, forces, energy and motion",
            "examples": ["what is gravity and why do apples fall?", "how much energy does a moving car have?"]}
    assert c.post("/v1/experts", json=lora).status_code == 401
    r = c.post("/v1/experts", json=lora, headers=AUTH)
    assert r.status_code == 201, r.text
    assert "physics" in [m["id"] for m in c.get("/v1/models").json()["data"]]
    routed = _chat(c, "why do apples fall because of gravity?")
    assert routed.status_code == 200 and routed.json()["model"] == "physics"
    model = {"id": "tiny2", "kind": "model", "model": str(svc["llama"]), "description": "a second general model",
             "engine": {"kind": "hf", "max_model_len": 128}, "resources": {"num_cpus": 0.25}}
    r = c.post("/v1/experts", json=model, headers=AUTH)
    assert r.status_code == 201, r.text
    assert _chat(c, "hello", model="tiny2").json()["model"] == "tiny2"
    assert c.delete("/v1/experts/physics", headers=AUTH).status_code == 200
    assert c.delete("/v1/experts/tiny2", headers=AUTH).status_code == 200
    assert "tiny2" not in [m["id"] for m in c.get("/v1/models").json()["data"]]


def test_model_that_cannot_be_placed_is_refused_with_503(svc):
    c = svc["client"]
    before = [m["id"] for m in c.get("/v1/models").json()["data"]]
    model = {"id": "huge", "kind": "model", "model": str(svc["llama"]), "description": "does not fit",
             "engine": {"kind": "hf", "max_model_len": 128}, "resources": {"num_cpus": 64, "num_gpus": 1}}
    t0 = time.time()
    r = c.post("/v1/experts", json=model, headers=AUTH)
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    assert "expert-huge" in msg and "CPU 64" in msg and "GPU 1" in msg and "missing" in msg, msg
    assert time.time() - t0 < 30
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == before
    assert "huge" not in [e["id"] for e in c.get("/v1/experts", headers=AUTH).json()]
    r = c.post("/v1/experts", json={**model, "resources": {"num_cpus": 0.25}}, headers=AUTH)
    assert r.status_code == 201, r.text  # nothing half-registered blocks the id
    assert c.delete("/v1/experts/huge", headers=AUTH).status_code == 200


def test_inline_admin_key_is_not_written_under_the_ray_session(svc):
    """The admin key is in the driver's environment (as `coe serve` has it; the local Ray's
    workers inherit it): it is never written under the Ray session, in a runtime env or a log."""
    files = [f for f in svc["session"].rglob("*") if f.is_file() and not f.is_symlink()]
    assert files
    leaks = [str(f) for f in files if ADMIN.encode() in f.read_bytes()]
    assert not leaks, f"the admin key is written to {leaks}"
