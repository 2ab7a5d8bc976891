"""The HTTP API in-process: FastAPI app + ingress logic + expert servers on the real transformers
engine (tiny llama, tiny peft LoRAs), no Ray. Covers the OpenAI schema, streaming, routing and
pinning, admin registration, and every bad-input case of the issue."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest

from tests.serving.serving_helpers import ADMIN, Harness, error_of, make_lora, tiny_config_dict

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def _flaky_engine_cls():
    from coe.serving.engines.hf import HFEngine

    class FlakyEngine(HFEngine):
        """The real engine, except that generation fails (a crashed engine, as seen by callers)."""

        async def generate_batch(self, requests):
            raise RuntimeError("simulated engine crash")

        async def stream(self, request):
            raise RuntimeError("simulated engine crash")
            yield  # pragma: no cover

    return FlakyEngine


@pytest.fixture(scope="module")
def h(loop_thread, tiny_llama_dir, tiny_loras, serving_root, tmp_path_factory):
    from coe.config import parse_config
    from coe.registry import ExpertRegistry

    root = tmp_path_factory.mktemp("api")
    (root / "adapters").symlink_to(serving_root / "adapters")
    config = parse_config(tiny_config_dict(tiny_llama_dir, tiny_loras, root))
    flaky = _flaky_engine_cls()
    harness = Harness(loop_thread, config, root, ExpertRegistry(root / "registry.sqlite"),
                      engine_cls_for=lambda s: flaky if s.host.id.startswith("flaky") else None)
    harness.root = root
    yield harness
    harness.close()


def _error(resp) -> str:
    return resp.json()["error"]["message"]


# ------------------------------------------------------------------ chat


def test_routed_chat_answers_in_openai_shape(h):
    r = h.chat("what is the capital of france ?")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "tiny" == r.headers["x-coe-expert"]
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] >= 1
    assert body["coe"]["router"] == "keyword-test"
    assert set(body["coe"]["scores"]) == {"tiny", "tiny-a", "tiny-b", "flaky"}


def test_router_choice_and_pin_reach_the_lora(h):
    routed = h.chat("what is tiny-a 1 + 2 ?")
    pinned = h.chat("what is 1 + 2 ?", model="tiny-a")
    base = h.chat("what is 1 + 2 ?", model="tiny")
    assert routed.json()["model"] == "tiny-a"
    assert pinned.json()["model"] == "tiny-a" and pinned.json()["coe"]["pinned"] is True
    # the adapter is really applied: greedy answers of LoRA and base differ
    assert pinned.json()["choices"][0]["message"]["content"] != base.json()["choices"][0]["message"]["content"]


def test_stream_is_sse_in_openai_chunks_and_matches_plain(h):
    plain = h.chat("hello world", model="tiny-b")
    r = h.chat("hello world", model="tiny-b", stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-coe-expert"] == "tiny-b"
    lines = [ln for ln in r.text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny-b" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[0]["coe"]["expert"] == "tiny-b"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain.json()["choices"][0]["message"]["content"]
    assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == plain.json()["usage"]["completion_tokens"]


def test_route_and_models(h):
    r = h.request("POST", "/v1/route", json={"query": "tiny-b def return"})
    assert r.status_code == 200 and r.json()["expert"] == "tiny-b" and r.json()["router"] == "keyword-test"
    ids = [m["id"] for m in h.request("GET", "/v1/models").json()["data"]]
    assert ids[0] == "coe" and {"tiny", "tiny-a", "tiny-b", "flaky"} <= set(ids)


def test_concurrent_mixed_experts_each_reach_their_adapter(h):
    """A burst over three experts of one engine: every request is answered by the engine with
    its own expert (the continuously batching engine gets each request at once)."""
    server = h.backend.servers["expert-tiny"]
    calls = []
    real = server.engine.stream

    def spy(dispatch):
        calls.append((dispatch.expert, dispatch.adapter))
        return real(dispatch)

    server.engine.stream = spy
    try:
        async def burst():
            transport = httpx.ASGITransport(app=h.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://coe") as c:
                bodies = [{"model": m, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                           "temperature": 0} for m in ["tiny-a", "tiny-b", "tiny"] * 3]
                return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

        responses = h.lt.run(burst())
    finally:
        server.engine.stream = real
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["model"] for r in responses] == ["tiny-a", "tiny-b", "tiny"] * 3
    assert sorted(calls) == sorted([("tiny-a", "tiny-a"), ("tiny-b", "tiny-b"), ("tiny", None)] * 3)


def test_health_ready_metrics(h):
    assert h.request("GET", "/healthz").json() == {"status": "ok"}
    ready = h.request("GET", "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    text = h.request("GET", "/metrics").text
    for series in ["coe_requests_total", "coe_request_errors_total", "coe_routing_latency_seconds",
                   "coe_queue_depth", "coe_generated_tokens_total", "coe_tokens_per_second",
                   "coe_server_queue_depth", "coe_expert_ready"]:
        assert series in text
    assert 'coe_requests_total{endpoint="chat",expert="tiny-a"}' in text


# ------------------------------------------------------------------ bad input


def test_malformed_json_is_400(h):
    r = h.request("POST", "/v1/chat/completions", content=b'{"model": "coe", "messages": [',
                  headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in _error(r)


@pytest.mark.parametrize("body", [{"model": "coe"}, {"model": "coe", "messages": []}])
def test_missing_or_empty_messages_is_422_naming_the_field(h, body):
    r = h.request("POST", "/v1/chat/completions", json=body)
    assert r.status_code == 422 and "messages" in _error(r) and r.json()["error"]["param"] == "messages"


def test_unknown_expert_is_404_listing_available(h):
    r = h.chat("hello", model="nope")
    assert r.status_code == 404
    assert "nope" in _error(r) and "tiny-a" in _error(r) and "coe" in _error(r)


def test_prompt_too_long_is_400_naming_the_limit(h):
    r = h.chat("hello " * 200, model="tiny")
    assert r.status_code == 400 and "128" in _error(r)
    r = h.chat("hello " * 200, model="tiny", stream=True)
    assert r.status_code == 400 and "128" in _error(r)


@pytest.mark.parametrize("max_tokens", [0, -3, 65, 100000])
def test_max_tokens_out_of_range_is_400(h, max_tokens):
    r = h.chat("hello", max_tokens=max_tokens)
    assert r.status_code == 400 and "max_tokens" in _error(r) and "64" in _error(r)


def test_engine_failure_retries_on_the_fallback(h):
    r = h.chat("hello", model="flaky")
    assert r.status_code == 200 and r.json()["model"] == "tiny" and r.json()["coe"]["fallback_from"] == "flaky"
    s = h.chat("hello", model="flaky", stream=True)
    assert s.status_code == 200 and s.headers["x-coe-expert"] == "tiny" and s.text.endswith("data: [DONE]\n\n")


def test_engine_failure_without_fallback_is_503_and_others_keep_serving(h, tiny_llama_dir):
    r = h.request("POST", "/v1/experts", headers=AUTH, json={"id": "flaky2", "kind": "model",
                  "model": str(tiny_llama_dir), "engine": {"kind": "hf", "max_model_len": 128}})
    assert r.status_code == 201, r.text
    try:
        r = h.chat("hello", model="flaky2")
        assert r.status_code == 503 and "flaky2" in _error(r) and r.headers["retry-after"].isdigit()
        assert "simulated engine crash" not in _error(r) and "RuntimeError" not in _error(r)  # internals: log only
        assert h.chat("hello", model="tiny-a").status_code == 200
        routed = h.chat("flaky2 hello")  # routed (not pinned): retried on the router's default expert
        assert routed.status_code == 200 and routed.json()["model"] == "tiny"
        assert routed.json()["coe"]["fallback_from"] == "flaky2"
    finally:
        assert h.request("DELETE", "/v1/experts/flaky2", headers=AUTH).status_code == 200
    assert "expert-flaky2" not in h.backend.servers


def test_client_disconnect_cancels_the_generation(h):
    from coe.serving.api.models import ChatCompletionRequest

    engine = h.backend.servers["expert-tiny"].engine
    req = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=64,
                                temperature=1.0, stream=True)

    async def go():
        _, events = await h.service.chat_stream(req)
        await events.__anext__()  # role chunk
        await events.__anext__()  # first token
        assert engine.running() == 1
        await events.aclose()  # the client went away
        for _ in range(100):
            if engine.running() == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    before = h.service.metrics.cancelled.labels("tiny")._value.get()
    assert h.lt.run(go())
    assert h.service.metrics.cancelled.labels("tiny")._value.get() == before + 1


# ------------------------------------------------------------------ admin


def test_admin_needs_the_key(h):
    assert h.request("GET", "/v1/experts").status_code == 401
    assert h.request("GET", "/v1/experts", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert h.request("POST", "/v1/experts", json={"id": "x"}).status_code == 401
    assert h.request("DELETE", "/v1/experts/tiny-a", headers={"Authorization": "Bearer wrong"}).status_code == 403
    listed = h.request("GET", "/v1/experts", headers=AUTH).json()
    assert {e["id"]: e["source"] for e in listed}["tiny-a"] == "config"


def test_keys_are_kept_only_as_digests(h, tiny_llama_dir, tiny_loras, monkeypatch):
    from coe.config import parse_config
    from coe.errors import ForbiddenError, UnauthorizedError
    from coe.serving.api.service import CoEService

    def shown(service) -> str:  # what a debugger, a repr or a traceback's locals would show
        return repr(vars(service)) + repr(service.config)

    assert ADMIN not in shown(h.service)
    h.service.check_admin(ADMIN)
    with pytest.raises(ForbiddenError, match="wrong") as wrong:
        h.service.check_admin(ADMIN[:-1])  # a prefix of the key is just as wrong
    assert ADMIN not in str(wrong.value)
    # a chat key from $COE_API_KEY: the service keeps its digest only
    data = tiny_config_dict(tiny_llama_dir, tiny_loras, h.root, flaky=False)
    monkeypatch.delenv("COE_ADMIN_KEY")
    monkeypatch.setenv("COE_API_KEY", "chat-s3cret")
    service = CoEService(parse_config(data), backend=h.backend, router=h.service.router)
    assert "chat-s3cret" not in shown(service)
    service.check_api("chat-s3cret")
    with pytest.raises(UnauthorizedError):
        service.check_api(None)
    with pytest.raises(ForbiddenError, match="wrong"):
        service.check_api("chat-s3cre")
    with pytest.raises(ForbiddenError, match=r"no admin key is configured: set \$COE_ADMIN_KEY"):
        service.check_admin(ADMIN)


def test_chat_key_from_the_environment_guards_chat(h, tiny_llama_dir, tiny_loras, monkeypatch):
    """$COE_API_KEY (serving.api_key_env) set at start: chat, routing and models need it; unset
    (the shared harness): they are open."""
    from coe.config import parse_config
    from coe.serving.api.routes import create_api
    from coe.serving.api.service import CoEService

    assert h.chat("hi").status_code == 200  # no key in the environment: open
    data = tiny_config_dict(tiny_llama_dir, tiny_loras, h.root, flaky=False)
    data["serving"]["api_key_env"] = "MY_CHAT_KEY"
    monkeypatch.setenv("MY_CHAT_KEY", "chat-s3cret")
    service = CoEService(parse_config(data), backend=h.backend, router=h.service.router)
    app = create_api(service)
    body = {"model": "coe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def post(**headers):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://coe") as client:
            return await client.post("/v1/chat/completions", json=body, headers=headers)

    try:
        assert h.lt.run(post()).status_code == 401
        wrong = h.lt.run(post(Authorization="Bearer chat-s3cre"))
        assert wrong.status_code == 403 and "chat-s3cret" not in wrong.text
        ok = h.lt.run(post(Authorization="Bearer chat-s3cret"))
        assert ok.status_code == 200, ok.text
    finally:
        h.lt.run(service.close())


def test_register_lora_live_routed_persisted_and_removed(h):
    from coe.registry import ExpertRegistry

    body = {"id": "tiny-c", "base": "tiny", "adapter": str(h.root / "adapters" / "c"),
            "description": "physics", "examples": ["what is gravity ?"]}
    r = h.request("POST", "/v1/experts", headers=AUTH, json=body)
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "lora" and r.json()["server"] == "expert-tiny"
    assert "tiny-c" in [m["id"] for m in h.request("GET", "/v1/models").json()["data"]]
    routed = h.chat("tiny-c what is gravity ?")
    assert routed.status_code == 200 and routed.json()["model"] == "tiny-c"
    assert "tiny-c" in h.backend.servers["expert-tiny"].engine.adapters()
    assert [e.id for e in ExpertRegistry(h.root / "registry.sqlite").list()] == ["tiny-c"]  # survives a restart
    assert h.request("POST", "/v1/experts", headers=AUTH, json=body).status_code == 409
    assert h.request("DELETE", "/v1/experts/tiny-c", headers=AUTH).status_code == 200
    assert h.chat("hi", model="tiny-c").status_code == 404
    assert ExpertRegistry(h.root / "registry.sqlite").list() == []
    assert h.request("DELETE", "/v1/experts/tiny-c", headers=AUTH).status_code == 404


def test_bad_registrations_are_400_and_register_nothing(h, tiny_llama_dir, tmp_path):
    from coe.registry import ExpertRegistry

    outside = tmp_path / "outside"
    shutil.copytree(h.root / "adapters" / "a", outside)
    not_peft = h.root / "adapters" / "not-peft"
    not_peft.mkdir(exist_ok=True)
    (not_peft / "weights.bin").write_bytes(b"x")
    big = h.root / "adapters" / "big"
    if not big.exists():
        make_lora(tiny_llama_dir, big, rank=16)
    cases = {
        "outside": (outside, "outside the allowed roots"),
        "not-peft": (not_peft, "adapter_config.json"),
        "big": (big, "rank 16"),
        "missing": (h.root / "adapters" / "missing", "does not exist"),
    }
    for name, (path, words) in cases.items():
        r = h.request("POST", "/v1/experts", headers=AUTH, json={"id": f"bad-{name}", "base": "tiny", "adapter": str(path)})
        assert r.status_code == 400 and words in _error(r), (name, r.text)
    r = h.request("POST", "/v1/experts", headers=AUTH, json={"id": "bad-base", "base": "nope", "adapter": str(big)})
    assert r.status_code == 400 and "tiny" in _error(r)
    assert h.request("POST", "/v1/experts", headers=AUTH, json={"id": "tiny", "base": "tiny",
                     "adapter": str(h.root / "adapters" / "a")}).status_code == 409
    r = h.request("POST", "/v1/experts", headers=AUTH, json={"id": "bad-model", "model": str(not_peft)})
    assert r.status_code == 404 and "config.json" in _error(r)
    r = h.request("POST", "/v1/experts", headers=AUTH, json={"id": "bad-model", "model": "./nowhere"})
    assert r.status_code == 404 and "does not exist" in _error(r)
    r = h.request("POST", "/v1/experts", headers=AUTH, json={"id": "bad id!", "base": "tiny", "adapter": "x"})
    assert r.status_code == 422 and "id" in _error(r)
    assert h.request("DELETE", "/v1/experts/tiny-a", headers=AUTH).status_code == 400
    assert ExpertRegistry(h.root / "registry.sqlite").list() == []
    assert not any(e.startswith("bad-") for e in h.service.catalog.ids())
    assert not any(sid.startswith("expert-bad") for sid in h.backend.servers)
    assert h.backend.servers["expert-tiny"].engine.adapters() == ["tiny-a", "tiny-b"]


def test_registered_lora_whose_folder_is_gone_is_unavailable_and_holds_nothing(loop_thread, tiny_llama_dir,
                                                                                 tiny_loras, tmp_path):
    """As a user met it: register a LoRA, delete its folder, restart. The expert reads as
    unavailable with its reason; the service is ready; routing skips it; it can be removed."""
    from coe.config import parse_config
    from coe.registry import ExpertRegistry

    folder = tmp_path / "adapters" / "c"
    shutil.copytree(tiny_loras[2], folder)
    config = parse_config(tiny_config_dict(tiny_llama_dir, tiny_loras, tmp_path, flaky=False))
    body = {"id": "tiny-c", "base": "tiny", "adapter": str(folder), "description": "physics",
            "examples": ["what is gravity ?"]}
    first = Harness(loop_thread, config, tmp_path, ExpertRegistry(tmp_path / "registry.sqlite"))
    try:
        assert first.request("POST", "/v1/experts", headers=AUTH, json=body).status_code == 201
    finally:
        first.close()
    shutil.rmtree(folder)
    h = Harness(loop_thread, config, tmp_path, ExpertRegistry(tmp_path / "registry.sqlite"))  # the restart
    try:
        # the first routed request, before any probe: answered by the next-best expert
        r = h.chat("tiny-c what is gravity ?")
        assert r.status_code == 200 and r.json()["model"] == "tiny" and r.json()["coe"]["fallback_from"] == "tiny-c"
        ready = h.request("GET", "/readyz")
        assert ready.status_code == 200, ready.text
        assert "does not exist" in ready.json()["experts"]["tiny-c"]
        assert {k for k, v in ready.json()["experts"].items() if v} == {"tiny-c"}
        listed = {e["id"]: e for e in h.request("GET", "/v1/experts", headers=AUTH).json()}
        assert {k: e["state"] for k, e in listed.items()} == {"tiny": "ready", "tiny-a": "ready", "tiny-b": "ready",
                                                               "tiny-c": "unavailable"}
        one = h.request("GET", "/v1/experts/tiny-c", headers=AUTH).json()
        assert one["ready"] is False and one["state"] == "unavailable" and one["source"] == "registry"
        assert f"adapter folder {folder} does not exist" in one["error"] and "DELETE /v1/experts/tiny-c" in one["error"]
        # routing never picks it; pinned, it fails at once with a 503 that names it, not its files
        for _ in range(2):
            r = h.chat("tiny-c what is gravity ?")
            assert r.status_code == 200 and r.json()["model"] == "tiny"
            assert r.json()["coe"]["fallback_from"] == "tiny-c"
        r = h.chat("hello", model="tiny-c")
        assert r.status_code == 503 and "'tiny-c' is unavailable" in error_of(r) and "retry-after" in r.headers
        assert str(folder) not in r.text and "does not exist" not in r.text
        for model in ("tiny", "tiny-a", "tiny-b"):
            assert h.chat("hello", model=model).status_code == 200
        # `coe experts remove` still works on it
        assert h.request("DELETE", "/v1/experts/tiny-c", headers=AUTH).status_code == 200
        assert ExpertRegistry(tmp_path / "registry.sqlite").list() == []
        assert h.request("GET", "/readyz").json() == {"ready": True, "experts": dict.fromkeys(
            ["tiny", "tiny-a", "tiny-b"])}
        # its folder back, it registers again and serves
        shutil.copytree(tiny_loras[2], folder)
        assert h.request("POST", "/v1/experts", headers=AUTH, json=body).status_code == 201
        assert h.chat("hello", model="tiny-c").status_code == 200
        assert h.request("GET", "/v1/experts/tiny-c", headers=AUTH).json()["state"] == "ready"
    finally:
        h.close()


def test_config_lora_whose_folder_is_gone_holds_readiness(loop_thread, tiny_llama_dir, tiny_loras, tmp_path):
    """The config file is the operator's contract: a config expert that cannot load keeps
    /readyz at 503 (a rollout stops there), yet routing skips it and the others serve."""
    from coe.config import parse_config

    folder = tmp_path / "b"
    shutil.copytree(tiny_loras[1], folder)
    config = parse_config(tiny_config_dict(tiny_llama_dir, [tiny_loras[0], folder], tmp_path, flaky=False))
    shutil.rmtree(folder)
    h = Harness(loop_thread, config, tmp_path)
    try:
        ready = h.request("GET", "/readyz")
        assert ready.status_code == 503 and "does not exist" in ready.json()["experts"]["tiny-b"]
        info = h.request("GET", "/v1/experts/tiny-b", headers=AUTH).json()
        assert info["state"] == "unavailable" and "fix the config file" in info["error"]
        r = h.chat("tiny-b def f ( ) :")
        assert r.status_code == 200 and r.json()["model"] == "tiny" and r.json()["coe"]["fallback_from"] == "tiny-b"
        assert h.chat("hello", model="tiny-a").status_code == 200
        assert h.request("DELETE", "/v1/experts/tiny-b", headers=AUTH).status_code == 400  # the config's: edit it there
    finally:
        h.close()


# ------------------------------------------------------------------ the CLI over the same app


class _LoopTransport(httpx.BaseTransport):
    """A sync httpx transport that answers from the in-process app on the harness's loop."""

    def __init__(self, h):
        self.h = h

    def handle_request(self, request):
        r = self.h.request(request.method, request.url.raw_path.decode(), headers=dict(request.headers),
                           content=request.read())
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)


def test_cli_experts_list_add_remove(h, monkeypatch, capsys):
    import coe.tools.cli.experts as cli
    from coe.tools.cli import main

    def client(args):
        key = args.admin_key or ""
        return httpx.Client(transport=_LoopTransport(h), base_url="http://coe",
                            headers={"Authorization": f"Bearer {key}"} if key else {})

    monkeypatch.setattr(cli, "_client", client)
    adapter = h.root / "adapters" / "c"
    assert main(["experts", "--admin-key", ADMIN, "add", "tiny-cli", "--base", "tiny", "--adapter", str(adapter),
                 "--description", "cli test", "--example", "hello"]) == 0
    assert "registered tiny-cli (lora) on expert-tiny" in capsys.readouterr().out
    assert main(["experts", "--admin-key", ADMIN, "list"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-cli" in listing and "registry" in listing and "tiny-a" in listing
    assert main(["experts", "--admin-key", "wrong", "list"]) == 2
    assert "403" in capsys.readouterr().err
    assert main(["experts", "--admin-key", ADMIN, "remove", "tiny-cli"]) == 0
    assert main(["experts", "--admin-key", ADMIN, "remove", "tiny-cli"]) == 2
    assert "404" in capsys.readouterr().err
