"""Overload and faults through the HTTP API, in-process on the real transformers engine: admission
(429 + Retry-After), the request deadline (504, generation cancelled), a plain request whose client
leaves (aborted on the engine), and a dead expert server (fail fast, or the next-best expert on a
healthy server; the router skips it; readiness brings it back)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.serving.serving_helpers import Harness, error_of
from tests.serving.test_reliability import _config


def _slow_engine_cls():
    from coe.serving.engines.hf import HFEngine

    class SlowEngine(HFEngine):
        """The real engine, each model step 10 ms slower: generations last long enough to be
        cut short on any machine load."""

        def forward(self, *args, **kwargs):
            time.sleep(0.01)
            return super().forward(*args, **kwargs)

    return SlowEngine


@pytest.fixture(scope="module")
def make(loop_thread, tiny_llama_dir, tiny_loras, tmp_path_factory):
    made = []

    def build(slow: bool = False, **serving) -> Harness:
        root = tmp_path_factory.mktemp("faults")
        engine = _slow_engine_cls() if slow else None
        harness = Harness(loop_thread, _config(tiny_llama_dir, tiny_loras, root, **serving), root,
                          engine_cls_for=lambda spec: engine)
        made.append(harness)
        return harness

    yield build
    for harness in made:
        harness.close()


@pytest.fixture(scope="module")
def h(make):
    return make(slow=True)


def _burst(h, bodies):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=h.app), base_url="http://coe") as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

    return h.lt.run(go())


def _body(model="tiny", content="hello", **kw):
    """A long generation: with this seed the tiny llama samples no EOS within 120 tokens (~1 s)."""
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 60,
            "temperature": 1.0, "seed": 0, **kw}


# ------------------------------------------------------------------ admission and deadline


def test_past_the_queue_bound_is_429_at_once_with_retry_after(make):
    h = make(slow=True, admission={"max_running_per_expert": 1, "max_queued_per_expert": 1, "retry_after_s": 3})
    t0 = time.monotonic()
    responses = _burst(h, [_body() for _ in range(6)])
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429, 429, 429], codes
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "3" and "'tiny'" in error_of(r) and "capacity" in error_of(r)
    assert time.monotonic() - t0 < 30
    assert h.service.admission.running("tiny") == 0 and h.service.admission.waiting("tiny") == 0


def test_waiting_past_max_queue_wait_is_429(make):
    h = make(slow=True, admission={"max_running_per_expert": 1, "max_queued_per_expert": 8, "max_queue_wait_s": 0.001})
    responses = _burst(h, [_body() for _ in range(3)])
    assert sorted(r.status_code for r in responses) == [200, 429, 429]
    assert all("max_queue_wait_s" in error_of(r) for r in responses if r.status_code == 429)


def test_deadline_gives_504_and_cancels_the_generation(make):
    h = make(slow=True, request_timeout_s=0.3, max_tokens_limit=120)
    engine = h.backend.servers["expert-tiny"].engine
    served = h.backend.servers["expert-tiny"].requests_served
    body = _body(max_tokens=120)
    for stream in (False, True):
        t0 = time.monotonic()
        r = h.request("POST", "/v1/chat/completions", json={**body, "stream": stream})
        assert time.monotonic() - t0 < 5
        if not stream or r.status_code == 504:
            assert r.status_code == 504 and "request_timeout_s" in error_of(r)
        else:  # streamed: the first token came in time, the deadline ends the stream with an error event
            assert r.status_code == 200 and "request_timeout_s" in r.text and r.text.endswith("data: [DONE]\n\n")
    assert _eventually(h, lambda: engine.running() == 0)
    assert h.backend.servers["expert-tiny"].requests_served == served  # nothing ran to its end


def _eventually(h, check, timeout=3.0) -> bool:
    async def wait():
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if check():
                return True
            await asyncio.sleep(0.01)
        return check()

    return h.lt.run(wait())


def test_plain_request_whose_client_leaves_is_aborted_on_the_engine(h):
    server = h.backend.servers["expert-tiny"]
    engine, served = server.engine, server.requests_served
    body = json.dumps(_body(max_tokens=60)).encode()
    before = h.service.metrics.cancelled.labels("tiny")._value.get()

    async def go():
        sent, delivered = [], False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            while engine.running() == 0:  # leave once the engine is generating this request
                await asyncio.sleep(0.002)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("coe", 80),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        await asyncio.wait_for(h.app(scope, receive, send), timeout=10)
        return sent

    sent = h.lt.run(go())
    assert sent[0]["status"] == 499
    assert _eventually(h, lambda: engine.running() == 0)
    assert server.requests_served == served  # the generation never finished
    assert h.service.metrics.cancelled.labels("tiny")._value.get() == before + 1
    assert h.service.admission.running("tiny") == 0


# ------------------------------------------------------------------ faults


class _Calls:
    """Records which servers the backend was asked to generate on (plain and streamed requests
    alike: both are one ``backend.stream(dispatch)``)."""

    def __init__(self, backend):
        self.backend, self.servers, self.real = backend, [], backend.stream

        def spy(dispatch):
            self.servers.append(dispatch.server_id)
            return self.real(dispatch)

        backend.stream = spy

    def close(self):
        self.backend.stream = self.real


@pytest.fixture
def dead_tiny(h):
    """The server of tiny, tiny-a and tiny-b is gone (as a killed replica is, to the backend)."""
    server = h.backend.servers.pop("expert-tiny")
    calls = _Calls(h.backend)
    yield calls
    calls.close()
    h.backend.servers["expert-tiny"] = server
    h.lt.run(h.service.readiness())


def test_routed_request_on_a_dead_server_goes_to_the_next_best_healthy_server(h, dead_tiny):
    r = h.chat("tiny-a what is 1 + 1 ?")  # the router picks tiny-a; its default 'tiny' is on the same dead server
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "other" and r.json()["coe"]["fallback_from"] == "tiny-a"
    assert dead_tiny.servers == ["expert-tiny", "expert-other"]
    # now marked down: the router's choice is skipped without trying the dead server again
    r = h.chat("tiny-b hello", stream=True)
    assert r.status_code == 200 and r.headers["x-coe-expert"] == "other"
    r = h.chat("tiny-b hello")
    assert r.json()["model"] == "other" and r.json()["coe"]["fallback_from"] == "tiny-b"
    assert dead_tiny.servers == ["expert-tiny", "expert-other", "expert-other", "expert-other"]


def test_pinned_request_on_a_dead_server_fails_fast_with_retry_after(h, dead_tiny):
    for _ in range(2):
        t0 = time.monotonic()
        r = h.chat("hello", model="tiny-a")
        assert time.monotonic() - t0 < 2
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "'tiny-a'" in error_of(r) and "expert-tiny" not in error_of(r)
    assert dead_tiny.servers == ["expert-tiny"]  # the second one did not even try


def test_fail_policy_answers_503_at_once(h, dead_tiny):
    faults = h.service.config.serving.faults
    faults.on_server_down = "fail"
    try:
        r = h.chat("tiny-a hello")
        assert r.status_code == 503 and "retry-after" in r.headers and "'tiny-a'" in error_of(r)
    finally:
        faults.on_server_down = "fallback"


def test_readiness_marks_experts_down_and_up(h):
    server = h.backend.servers.pop("expert-other")
    try:
        ready, states = h.lt.run(h.service.readiness())
        assert not ready and states["other"]
        calls = _Calls(h.backend)
        try:
            r = h.chat("hello", model="other")
            assert r.status_code == 503 and calls.servers == []  # failed fast on the probe's word
        finally:
            calls.close()
    finally:
        h.backend.servers["expert-other"] = server
    assert h.lt.run(h.service.readiness())[0]
    assert h.chat("hello", model="other").status_code == 200


def test_stream_closed_before_its_first_byte_frees_generation_and_slot(h):
    from coe.serving.api.models import ChatCompletionRequest

    engine = h.backend.servers["expert-tiny"].engine
    req = ChatCompletionRequest(**_body(stream=True))

    async def go():
        _, events = await h.service.chat_stream(req)
        assert h.service.admission.running("tiny") == 1 and engine.running() == 1
        await events.aclose()  # the client left before the response started: never iterated

    h.lt.run(go())
    assert h.service.admission.running("tiny") == 0
    assert _eventually(h, lambda: engine.running() == 0)
