"""Reliability of the HTTP API (issue 16), in-process on the real transformers engine (tiny llama,
tiny LoRAs): validation at the boundary (400 naming the field, never a 503 or a fallback),
OpenAI compatibility, body limits, OpenAPI, admission (429 + Retry-After), deadlines (504),
client disconnects, and faults (fail fast or the next-best expert on a healthy server)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.serving.serving_helpers import ADMIN, Harness, error_of, tiny_config_dict

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def _config(llama, loras, root, **serving):
    """tiny (+ LoRAs tiny-a, tiny-b) on one server, 'other' (a second model) on another."""
    from coe.config import parse_config

    data = tiny_config_dict(llama, loras, root, flaky=False, **serving)
    data["experts"].append({"id": "other", "kind": "model", "model": str(llama),
                            "engine": {"kind": "hf", "max_model_len": 128}, "description": "another model"})
    data["serving"]["faults"] = {"health_check_period_s": 0, **data["serving"].get("faults", {})}
    return parse_config(data)


@pytest.fixture(scope="module")
def h(loop_thread, tiny_llama_dir, tiny_loras, tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    harness = Harness(loop_thread, _config(tiny_llama_dir, tiny_loras, root), root)
    yield harness
    harness.close()


def _counter(h, name: str) -> float:
    total = 0.0
    for metric in h.service.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return total


# ------------------------------------------------------------------ validation at the boundary


@pytest.mark.parametrize(("extra", "field", "words"), [
    ({"stop": ""}, "stop", "non-empty"),
    ({"stop": ["a", ""]}, "stop", "non-empty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"seed": 2**64}, "seed", "2^63-1"),
    ({"seed": -1}, "seed", "2^63-1"),
    ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
    ({"temperature": 2.5}, "temperature", "[0, 2]"),
    ({"temperature": -1}, "temperature", "[0, 2]"),
    ({"top_p": 1.5}, "top_p", "[0, 1]"),
    ({"n": 2}, "n", "allowed: 1"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "1 to 64"),
])
def test_bad_sampling_parameters_are_400_naming_the_field_without_fallback(h, extra, field, words):
    fallbacks, engine_errors = _counter(h, "coe_fallbacks_total"), _engine_errors(h)
    for model in ("coe", "tiny"):
        r = h.chat("hello", model=model, **extra)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field and field in error_of(r) and words in error_of(r)
    assert _counter(h, "coe_fallbacks_total") == fallbacks and _engine_errors(h) == engine_errors


def _engine_errors(h) -> float:
    return sum(s.value for m in h.service.metrics.registry.collect() for s in m.samples
               if s.name == "coe_request_errors_total" and s.labels.get("code") == "engine_unavailable")


def test_lone_surrogate_is_400_not_500(h):
    raw = b'{"model": "coe", "messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 4}'
    r = h.request("POST", "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in error_of(r) and r.json()["error"]["param"] == "messages[0].content"
    raw = b'{"query": "x\\udfffy"}'
    r = h.request("POST", "/v1/route", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in error_of(r)


def test_one_bad_request_never_fails_its_batch_mates(h):
    async def burst():
        transport = httpx.ASGITransport(app=h.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://coe") as c:
            bodies = [{"model": "tiny", "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 4,
                       "temperature": 0} for i in range(7)]
            bodies.insert(3, {**bodies[0], "stop": ""})
            bodies.insert(5, {**bodies[0], "seed": 2**64})
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

    codes = [r.status_code for r in h.lt.run(burst())]
    assert codes == [200, 200, 200, 400, 200, 400, 200, 200, 200]


def test_top_p_zero_is_greedy_and_max_completion_tokens_wins(h):
    greedy = h.chat("hello world", model="tiny", max_tokens=5)
    r = h.chat("hello world", model="tiny", temperature=1.0, top_p=0, max_tokens=5)
    assert r.status_code == 200 and r.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
    r = h.chat("hello world", model="tiny", max_tokens=60, max_completion_tokens=2)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    r = h.chat("hello world", model="tiny", max_tokens=0, max_completion_tokens=2)
    assert r.status_code == 200  # the deprecated field is not even looked at


@pytest.mark.parametrize(("extra", "field"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required"}, "tools"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"12": 5}}, "logit_bias"),
])
def test_unimplemented_features_are_refused_naming_field_and_expert(h, extra, field):
    r = h.chat("hello", model="tiny-a", **extra)
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert field in error_of(r) and "'tiny-a'" in error_of(r)
    r = h.chat("hello", model="tiny", stream=True, **extra)
    assert r.status_code == 400 and "'tiny'" in error_of(r)


def test_features_left_at_their_defaults_are_accepted(h):
    r = h.chat("hello", model="tiny", logprobs=False, response_format={"type": "text"}, tool_choice="none",
               presence_penalty=0, frequency_penalty=0.0, tools=[], n=1)
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ HTTP: limits, media type, models, OpenAPI


def test_body_over_the_limit_is_413_before_parsing(h):
    limit = h.service.config.serving.limits.max_body_bytes
    big = b'{"model": "coe", "messages": [{"role": "user", "content": "' + b"x" * limit + b'"}]}'
    r = h.request("POST", "/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(limit) in error_of(r) and "max_body_bytes" in error_of(r)

    async def chunks():  # no Content-Length: counted while read
        for _ in range(5):
            yield b" " * (limit // 4)

    r = h.request("POST", "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_body_without_json_content_type_is_415_saying_so(h):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = h.request("POST", "/v1/chat/completions", content=body, headers={"content-type": ctype})
        assert r.status_code == 415 and "Content-Type: application/json" in error_of(r) and ctype in error_of(r)
    r = h.request("POST", "/v1/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_get_one_model(h):
    assert h.request("GET", "/v1/models/coe").json()["id"] == "coe"
    card = h.request("GET", "/v1/models/tiny-a").json()
    assert card["id"] == "tiny-a" and card["object"] == "model" and card["base"] == "tiny"
    r = h.request("GET", "/v1/models/nope")
    assert r.status_code == 404 and "nope" in error_of(r) and "tiny-a" in error_of(r)


def test_openapi_declares_errors_and_the_admin_scheme(h):
    spec = h.request("GET", "/openapi.json").json()
    assert {"adminKey", "apiKey"} <= set(spec["components"]["securitySchemes"])
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "403", "404", "413", "429", "503"} <= set(chat["responses"])
    assert {"adminKey": []} in spec["paths"]["/v1/experts"]["post"]["security"]
    assert {"409"} <= set(spec["paths"]["/v1/experts"]["post"]["responses"])
    assert "/v1/models/{model_id}" in spec["paths"]


def test_docs_can_be_turned_off(loop_thread, tiny_llama_dir, tiny_loras, tmp_path):
    from coe.serving.api.routes import create_api

    config = _config(tiny_llama_dir, tiny_loras, tmp_path, openapi_docs=False)
    app = create_api(_BareService(config))

    async def get(path):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://coe") as c:
            return await c.get(path)

    for path in ("/docs", "/redoc", "/openapi.json"):
        assert loop_thread.run(get(path)).status_code == 404
    assert loop_thread.run(get("/healthz")).status_code == 200


class _BareService:
    """Just enough of CoEService for create_api (no engines needed to check the docs routes)."""

    def __init__(self, config):
        from types import SimpleNamespace

        self.config = config
        self.catalog = SimpleNamespace(registry=None)  # no registry: no stored profiles to read


def test_admin_text_with_nul_or_surrogate_is_400(h):
    r = h.request("POST", "/v1/experts", headers=AUTH, json={"id": "x", "base": "tiny", "adapter": "/tmp/a\x00b"})
    assert r.status_code == 400 and "NUL" in error_of(r) and r.json()["error"]["param"] == "adapter"
    raw = b'{"id": "x", "base": "tiny", "adapter": "/tmp/a\\udc80"}'
    r = h.request("POST", "/v1/experts", headers={**AUTH, "content-type": "application/json"}, content=raw)
    assert r.status_code == 400 and "surrogate" in error_of(r)
