"""The issue's "done when", for real: ``coe serve`` on the embedded default config (SmolLM2 on
vLLM with its LoRA experts, Qwen2.5-Coder on vLLM, the fitted kNN router the default config ships), driven by the
official ``openai`` client changed only in ``base_url`` and ``api_key``; a LoRA registered over
HTTP is listed, receives routed traffic, and is still there after Ctrl-C and a restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from coe.scoring.base import get_scorer, score
from coe.scoring.probes import Probe, mbpp_prompt
from tests.serving.serving_helpers import make_lora
from tests.serving.test_ops_service import beyond_loopback, listening, process_tree, still_running

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
KEY = "e2e-admin-key"
ASTRONOMY = {
    "description": "Astronomy: planets, moons, stars, galaxies, black holes and telescopes.",
    "examples": ["How many moons does Jupiter have?", "What is a black hole?", "How far away is the nearest star?",
                 "Why does Mars look red in the night sky?"],
}


class Service:
    """``coe serve`` in a subprocess; ``stop()`` sends Ctrl-C (SIGINT) and waits for a clean exit."""

    def __init__(self, env: dict, port: int) -> None:
        self.port = port
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coe.tools.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(900) or self.url is None:
            self.kill()
            notable = [ln for ln in self.lines if any(w in ln for w in ("Error", "error", "Traceback", "failed", "died"))]
            pytest.fail("coe serve did not come up:\n" + "\n".join(notable[-40:] + ["..."] + self.lines[-20:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if "serving at http://" in line:
                self.url = line.split("serving at ")[1].split()[0]
                self._ready.set()
        self._ready.set()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.kill()
            return -1

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def _sse(resp: httpx.Response) -> list[dict]:
    """The JSON events of a streamed answer, which must end with [DONE]."""
    assert resp.status_code == 200, resp.text
    data = [e[len("data: "):] for e in resp.text.split("\n\n") if e.startswith("data: ")]
    assert data and data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def check_recruit(client, url: str, experts: set[str]) -> None:
    """Recruit and aggregate through Ray Serve: the plan's first two experts answer (each on its own
    server's replica), the vote's winner is the response, usage is the sum of the two pinned answers;
    streamed, the same coe fields and usage; a bad coe.recruit is a 400 naming it."""
    ask = [{"role": "user", "content": "What is 7 + 5? Answer with the number only."}]
    params = {"max_tokens": 4, "temperature": 0}
    plan = httpx.post(f"{url}/route", json={"model": "coe", "messages": ask}, timeout=60).json()["candidates"]
    recruit = {"coe": {"recruit": 2, "aggregate": "vote"}}
    voted = client.chat.completions.create(model="coe", messages=ask, extra_body=recruit, **params)
    coe = voted.model_extra["coe"]
    assert coe["recruited"] == [c["expert"] for c in plan if c["healthy"]][:2], (coe, plan)
    assert coe["failed"] == [] and coe["aggregate"] == "vote" and set(coe["votes"]) == set(coe["recruited"])
    assert voted.model == coe["expert"] in coe["recruited"] and set(coe["recruited"]) <= experts
    alone = [client.chat.completions.create(model=e, messages=ask, **params) for e in coe["recruited"]]
    text = voted.choices[0].message.content
    assert text == next(a for a in alone if a.model == voted.model).choices[0].message.content
    usage = ("prompt_tokens", "completion_tokens", "total_tokens")
    for key in usage:
        assert getattr(voted.usage, key) == sum(getattr(a.usage, key) for a in alone), (voted.usage, alone)

    body = {"model": "coe", "messages": ask, **params, **recruit}
    with httpx.Client(base_url=url, timeout=300) as http:
        events = _sse(http.post("/chat/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}}))
        first = events[0]["coe"]
        named = ("expert", "recruited", "failed", "aggregate", "votes", "cost")
        assert {k: first.get(k) for k in named} == {k: coe.get(k) for k in named}
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == text
        assert events[-1]["usage"] == voted.usage.model_dump(include=set(usage))

        for k in (0, len(experts) + 1):
            for stream in (False, True):
                bad = http.post("/chat/completions", json={**body, "coe": {"recruit": k}, "stream": stream})
                assert bad.status_code == 400, bad.text
                error = bad.json()["error"]
                assert error["param"] == "coe.recruit" and "coe.recruit" in error["message"], error


@pytest.fixture(scope="module")
def env(tmp_path_factory, smollm2_dir, qwen_dir, minilm_dir):
    from coe.paths import models_dir

    home = tmp_path_factory.mktemp("coe-home")
    (home / "models").symlink_to(models_dir())  # the prepared models; a fresh registry
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**os.environ, "COE_HOME": str(home), "COE_ADMIN_KEY": KEY, "PYTHONUNBUFFERED": "1"}, port


@pytest.fixture(scope="module")
def lora_dir(smollm2_dir):
    """A LoRA on SmolLM2 inside the default config's adapter root (removed afterwards)."""
    folder = REPO / "adapters" / "experts" / f"_e2e-{uuid.uuid4().hex[:8]}"
    make_lora(smollm2_dir, folder, rank=8, seed=5)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_default_config_openai_client_register_restart(env, lora_dir):
    from openai import OpenAI

    environ, port = env
    service = Service(environ, port)
    try:
        client = OpenAI(base_url=service.url, api_key="anything")
        experts = {"smollm2", "smollm2-math", "smollm2-code", "qwen-coder"}

        raw = client.chat.completions.with_raw_response.create(
            model="coe", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16,
            temperature=0,
        )
        answer = raw.parse()
        assert answer.model in experts and raw.headers["x-coe-expert"] == answer.model
        assert answer.choices[0].message.content and answer.model_extra["coe"]["router"] == "knn"  # the shipped fitted router

        # a code question goes to the real coder, and its first answer passes the task's test (sandboxed)
        task = mbpp_prompt("Write a python function to reverse a string.", "assert reverse_string('abc') == 'cba'")
        code = client.chat.completions.create(model="coe", messages=[{"role": "user", "content": task}],
                                              max_tokens=200, temperature=0)
        assert code.model == "qwen-coder", code.model_extra["coe"]
        probe = Probe(id="reverse", query=task, scorer="code_tests", category="code",
                      tests=["assert reverse_string('abc') == 'cba'", "assert reverse_string('') == ''"])
        outcome = score(get_scorer("code_tests"), probe, code.choices[0].message.content)
        assert outcome.score == 1.0, (outcome.reason, code.choices[0].message.content)

        stream = client.chat.completions.create(
            model="coe", stream=True, max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": "Continue the story. Once upon a time, in a small village by the river,"}],
        )
        chunks = list(stream)
        assert chunks and all(c.model in experts for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)

        check_recruit(client, service.url, experts)

        admin = httpx.Client(base_url=service.url.removesuffix("/v1"), timeout=300,
                             headers={"Authorization": f"Bearer {KEY}"})
        r = admin.post("/v1/experts", json={"id": "astronomy", "base": "smollm2", "adapter": str(lora_dir), **ASTRONOMY})
        assert r.status_code == 201, r.text
        assert "astronomy" in [m.id for m in client.models.list().data]
        routed = client.chat.completions.create(
            model="coe", max_tokens=8, messages=[{"role": "user", "content": "How many moons does Saturn have?"}]
        )
        assert routed.model == "astronomy", routed.model_extra["coe"]
        # vLLM, the transformers engine, Ray and Serve: every socket on loopback only
        procs = process_tree(service.proc.pid)
        sockets = listening(procs)
        assert "raylet" in " ".join(sockets) and not beyond_loopback(sockets), sockets
    finally:
        rc = service.stop()
    assert rc == 0, "\n".join(service.lines[-30:])
    time.sleep(1)
    assert not still_running(procs), still_running(procs)  # no Ray, Serve or vLLM process left

    service = Service(environ, port)  # restart: the registration is persisted
    try:
        client = OpenAI(base_url=service.url, api_key="anything")
        assert "astronomy" in [m.id for m in client.models.list().data]
        routed = client.chat.completions.create(
            model="coe", max_tokens=8, messages=[{"role": "user", "content": "What is a black hole made of?"}]
        )
        assert routed.model == "astronomy"
        admin = httpx.Client(base_url=service.url.removesuffix("/v1"), timeout=60,
                             headers={"Authorization": f"Bearer {KEY}"})
        assert admin.delete("/v1/experts/astronomy").status_code == 200
    finally:
        assert service.stop() == 0
