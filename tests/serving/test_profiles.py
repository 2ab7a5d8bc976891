"""Runtime profiles (#11 item 5): a newly registered expert is measured in the background, its
outcomes join the fitted router's data, and it wins the queries it is measurably best at.

The ingress logic is real (CoEService, admission, ProfileJobs, the kNN router refitted on the
data plus the profiles, the SQLite registry); the expert servers are a fake backend that returns
prompt log-probabilities the way the engine contract (coe.types) says, computed from the expert's
real tokenizer. The real engines are tested in tests/engines."""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from typing import ClassVar

import httpx
import numpy as np
import pytest

from coe.config import parse_config
from coe.errors import EngineError
from coe.registry import ExpertRegistry
from coe.types import Logprob, StreamDelta
from tests.helpers import LoopThread
from tests.serving.serving_helpers import ADMIN as ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MATH = ["what is 1 + 2 ?", "what is 3 + 4 ?", "what is 5 * 6 ?", "what is 7 - 8 ?"]
CODE = ["def return x python code", "python code def x y", "def return y python", "code python return x"]
REFERENCE = {"math": "the answer is 3 .", "code": "def x : return y"}


class HashEmbedder:
    """Bag-of-words hashed into 64 unit-norm dimensions (no model download)."""

    def encode(self, texts):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, zlib.crc32(w.encode()) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def encode_tracked(self, texts):
        return self.encode(texts), np.zeros(len(texts), dtype=bool)


class FakeBackend:
    """Expert servers that score token-id prompts: per-token logprob ``LOGPROB[expert][category]``."""

    LOGPROB: ClassVar[dict] = {"base": {"math": -1.0, "code": -0.5}, "other": {"math": -1.2, "code": -0.9},
               "new": {"math": -0.1, "code": -3.0}}

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.fail: set[str] = set()
        self.gate: asyncio.Event | None = None
        self.calls: list[str] = []

    async def stream(self, dispatch):
        """The Backend protocol: the whole answer as one delta."""
        yield await self.answer(dispatch)

    async def answer(self, dispatch):
        self.calls.append(dispatch.expert)
        if self.gate is not None:
            await self.gate.wait()
        if dispatch.expert in self.fail:
            raise EngineError(f"engine of {dispatch.expert} failed")
        return self.score(dispatch)

    def score(self, dispatch):
        request = dispatch.request
        assert request.sampling.prompt_logprobs == 0 and request.sampling.max_tokens == 1
        ids = list(request.prompt_token_ids)
        text = self.tok.decode(ids)
        cat = "math" if any(c in text for c in "+-*") else "code"
        lp = self.LOGPROB.get(dispatch.expert, {"math": -2.0, "code": -2.0})[cat]
        plp = [None] + [{t: Logprob(lp, 1, "w")} for t in ids[1:]]
        return StreamDelta(text="", finish_reason="length", prompt_tokens=len(ids), completion_tokens=1,
                           prompt_logprobs=plp, prompt_token_ids=ids)

    async def add_server(self, spec):
        pass

    async def remove_server(self, server_id):
        pass

    def attach_server(self, spec):   # another replica's registration (RegistrySync)
        pass

    def detach_server(self, server_id):
        pass

    async def ready(self):
        return {}

    async def stats(self):
        return {}


def write_world(root, tiny, adapter_roots=()):
    """A likelihood data file of experts base/other on MATH+CODE, a kNN fitted on it, probe files."""
    from coe.routers.base import create_router, save_router
    from coe.routers.datasets import load_routing_data

    rows = []
    for q in MATH + CODE:
        cat = "math" if q in MATH else "code"
        out = {e: float(np.exp(FakeBackend.LOGPROB[e][cat])) for e in ("base", "other")}
        rows.append({"id": q, "query": q, "category": cat, "outcomes": out, "costs": {"base": 5.0, "other": 5.0},
                     "detail": {e: {"nll": -FakeBackend.LOGPROB[e][cat]} for e in ("base", "other")}})
    data_path = root / "data.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_routing_data(data_path)
    router = create_router("knn", {"k": 2}).fit(data, HashEmbedder().encode(data.queries))
    save_router(router, root / "fitted", embedder="hash", extra={"data": str(data_path)})
    (root / "probes").mkdir()
    probes = [{"id": f"p{i}", "query": q, "scorer": "reference_nll", "category": "math" if q in MATH else "code",
               "reference": REFERENCE["math" if q in MATH else "code"]} for i, q in enumerate(MATH + CODE)]
    (root / "probes" / "same.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    foreign = [{**p, "id": "f" + p["id"], "query": p["query"] + " ?"} for p in probes]
    (root / "probes" / "foreign.jsonl").write_text("".join(json.dumps(p) + "\n" for p in foreign))
    (root / "outside.jsonl").write_text((root / "probes" / "same.jsonl").read_text())
    return world_config(root, tiny, root / "probes", adapter_roots=[str(r) for r in adapter_roots])


def world_config(root, tiny, probes, **serving):
    """Experts base/other on the tiny model, the kNN fitted under ``root / "fitted"``, probes under ``probes``."""
    engine = {"kind": "hf", "max_model_len": 128}
    return parse_config({
        "router": {"name": "knn", "fitted": str(root / "fitted"), "embedder": "hash", "default_expert": "base",
                   "min_profile_similarity": None},
        "experts": [{"id": e, "kind": "model", "model": str(tiny), "engine": engine, "description": d,
                     "resources": {"num_cpus": 0.1}}
                    for e, d in (("base", "general questions"), ("other", "other things"))],
        "serving": {"registry_path": str(root / "registry.sqlite"), "probe_roots": [str(probes)], **serving},
    })


class World:
    def __init__(self, lt, config, root, backend):
        from coe.registry import live_experts
        from coe.routers.base import load_router
        from coe.routers.online import OnlineRouter
        from coe.serving.api.routes import create_api
        from coe.serving.api.service import CoEService

        self.lt, self.backend = lt, backend
        self.registry = ExpertRegistry(root / "registry.sqlite")
        experts = live_experts(config, self.registry)
        fitted, _ = load_router(root / "fitted")
        self.router = OnlineRouter(config.router, experts, fitted=fitted, embedder=HashEmbedder())
        self.service = CoEService(config, backend=backend, router=self.router, registry=self.registry,
                                  base_dir=root, experts=experts)
        self.app = lt.run(_build(create_api, self.service))

    def request(self, method, path, **kw):
        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://coe") as c:
                return await c.request(method, path, headers=ADMIN, **kw)

        return self.lt.run(go())

    def wait(self, expert_id, states=("done", "failed"), timeout=30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            prof = self.request("GET", f"/v1/experts/{expert_id}").json()["profile"]
            if prof and prof["state"] in states:
                return prof
            time.sleep(0.05)
        raise AssertionError(f"profile of {expert_id} did not reach {states}: {prof}")

    def route(self, query):
        return self.router.route([query])[0].expert


async def _build(create_api, service):
    return create_api(service)   # on the loop: ProfileJobs may refit at once


@pytest.fixture
def world(tmp_path, tiny_llama_dir, tiny_loras):
    from transformers import AutoTokenizer

    config = write_world(tmp_path, tiny_llama_dir, adapter_roots=[tiny_loras[0].parent])
    lt = LoopThread()
    made = []

    def make(backend=None):
        w = World(lt, config, tmp_path, backend or FakeBackend(AutoTokenizer.from_pretrained(tiny_llama_dir)))
        made.append(w)
        return w

    make.config, make.root, make.tiny = config, tmp_path, tiny_llama_dir
    yield make
    for w in made:
        lt.run(w.app.state.profiles.close())
    lt.close()


def _new(tiny, **profile):
    body = {"id": "new", "kind": "model", "model": str(tiny), "engine": {"kind": "hf", "max_model_len": 128},
            "description": "new expert", "resources": {"num_cpus": 0.1}}
    if profile:
        body["profile"] = profile
    return body


def test_a_registered_expert_is_profiled_in_the_background_and_wins_what_it_is_best_at(world):
    w = world()
    assert w.route(MATH[0]) == "base" and w.route(CODE[0]) == "base"
    r = w.request("POST", "/v1/experts", json=_new(world.tiny, probe=str(world.root / "probes" / "same.jsonl"),
                                                   budget=6))
    assert r.status_code == 201, r.text
    assert r.json()["profile"]["state"] in ("queued", "running") and r.json()["profile"]["total"] == 6
    prof = w.wait("new")
    assert prof["state"] == "done" and prof["done"] == prof["total"] == 6 and prof["failed"] == 0, prof
    assert prof["started_at"] <= prof["finished_at"]
    assert prof["kind"] == "likelihood"   # the kind of the fitted data (detail.nll), by default
    assert set(w.backend.calls) == {"new"}   # the probes are the fitted data's: nobody else is re-measured
    # the probes went round-robin over the categories; the outcomes are exp(-mean NLL), on the data's scale
    stored = w.registry.profile_outcomes()
    assert sorted(o.category for o in stored) == ["code"] * 3 + ["math"] * 3
    assert {round(o.outcome, 4) for o in stored if o.category == "math"} == {round(float(np.exp(-0.1)), 4)}
    listed = {e["id"]: e for e in w.request("GET", "/v1/experts").json()}
    assert listed["new"]["profile"]["state"] == "done" and listed["base"]["profile"] is None
    # measurably best on math (also on the math query it was not profiled on), worse on code
    assert [w.route(q) for q in MATH] == ["new"] * 4
    assert [w.route(q) for q in CODE] == ["base"] * 4

    w2 = world()   # a restart (or another replica) rebuilds the same router from the registry
    assert [w2.route(q) for q in MATH + CODE] == [w.route(q) for q in MATH + CODE]

    assert w2.request("DELETE", "/v1/experts/new").status_code == 200
    assert w2.registry.profile_outcomes() == []
    assert w2.route(MATH[0]) == "base"


def test_another_replica_follows_the_profile_through_the_registry(world):
    from coe.serving.api.registry_sync import RegistrySync

    a, b = world(), world()   # two ingress replicas on one registry
    sync = RegistrySync(b.service, period_s=60)
    sync.listeners.append(b.app.state.profiles.refresh)   # as the ingress deployment wires it
    b.lt.run(sync.sync_once())
    assert a.request("POST", "/v1/experts", json=_new(world.tiny, probe=str(world.root / "probes" / "same.jsonl"),
                                                      budget=4)).status_code == 201
    assert a.wait("new")["state"] == "done"
    assert b.lt.run(sync.sync_once()) is True
    assert b.request("GET", "/v1/experts/new").json()["profile"]["state"] == "done"   # progress: any replica
    assert b.route(MATH[1]) == "new" and b.route(CODE[1]) == "base"
    assert a.request("DELETE", "/v1/experts/new").status_code == 200
    b.lt.run(sync.sync_once())
    assert b.route(MATH[1]) == "base"


def test_bad_profile_requests_are_refused_naming_the_field(world):
    w = world()
    same = str(world.root / "probes" / "same.jsonl")
    cases = [
        ({"probe": same, "budget": 2, "extra": 1}, "profile.extra"),
        ({"probe": same, "budget": 0}, "profile.budget"),
        ({"probe": same, "budget": 9}, "profile.budget"),
        ({"probe": "no-such-set", "budget": 1}, "profile.probe"),
        ({"probe": str(world.root / "outside.jsonl"), "budget": 1}, "profile.probe"),
        ({"budget": 1}, "profile.probe"),
    ]
    for profile, param in cases:
        r = w.request("POST", "/v1/experts", json=_new(world.tiny, **profile))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (profile, r.text)
    assert "new" not in {e["id"] for e in w.request("GET", "/v1/experts").json()}   # nothing registered
    r = w.request("POST", "/v1/experts/nobody/profile", json={"probe": same, "budget": 1})
    assert r.status_code == 404
    assert w.request("GET", "/v1/experts/nobody").status_code == 404
    r = w.request("POST", "/v1/experts/base/profile", json={"probe": same, "budget": 1})
    assert r.status_code == 400 and "fitted router's data" in r.json()["error"]["message"]


def test_a_running_profile_is_a_409_and_a_failed_one_leaves_the_expert_routable(world):
    from transformers import AutoTokenizer

    backend = FakeBackend(AutoTokenizer.from_pretrained(world.tiny))
    w = world(backend)
    backend.gate = w.lt.run(_event())
    backend.fail.add("new")
    same = {"probe": str(world.root / "probes" / "same.jsonl"), "budget": 3}
    assert w.request("POST", "/v1/experts", json=_new(world.tiny, **same)).status_code == 201
    r = w.request("POST", "/v1/experts/new/profile", json=same)
    assert r.status_code == 409 and "still" in r.json()["error"]["message"]
    fitted = w.router.fitted
    w.lt.loop.call_soon_threadsafe(backend.gate.set)
    prof = w.wait("new")
    assert prof["state"] == "failed" and prof["failed"] == 3 and "engine of new failed" in prof["error"], prof
    assert w.router.fitted is fitted and "new" in w.router.experts()   # routed by its description, as before
    # a restart after the engine is mended
    backend.fail.clear()
    r = w.request("POST", "/v1/experts/new/profile", json=same)
    assert r.status_code == 202 and r.json()["state"] == "queued"
    assert w.wait("new")["state"] == "done"
    assert w.route(MATH[0]) == "new"


def test_a_foreign_probe_set_measures_the_fitted_experts_on_it_too(world):
    w = world()
    r = w.request("POST", "/v1/experts", json=_new(world.tiny, probe=str(world.root / "probes" / "foreign.jsonl"),
                                                   budget=2))
    assert r.status_code == 201
    prof = w.wait("new")
    assert prof["state"] == "done" and prof["total"] == 2 * 3, prof   # the new expert + base + other on each
    got = {(o.expert, o.query) for o in w.registry.profile_outcomes()}
    assert {e for e, _ in got} == {"new", "base", "other"} and len(got) == 6
    assert w.route(MATH[0] + " ?") == "new"


async def _event():
    return asyncio.Event()


def test_answer_nll_checks_the_engine_scored_encode_chat_tokens(tiny_llama_dir):
    from transformers import AutoTokenizer

    from coe.scoring.served_likelihood import ScoringError, answer_nll, likelihood_cell, scoring_prompt

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    sp = scoring_prompt(tok, "what is 1 + 2 ?", "the answer is 3 .")
    assert sp.answer_tokens == 6   # five words and the eos
    plp = [None] + [{t: Logprob(-0.5 if k >= len(sp.token_ids) - 7 else -9.0, 1, "")}
                    for k, t in enumerate(sp.token_ids[1:])]
    assert answer_nll(plp, sp) == pytest.approx(0.5)
    as_json = [None] + [{str(t): {"logprob": v.logprob}} for p in plp[1:] for t, v in p.items()]
    assert answer_nll(as_json, sp) == pytest.approx(0.5)   # the HTTP shape reads the same
    with pytest.raises(ScoringError, match="not the 1[0-9] of encode_chat"):
        answer_nll(plp[:-1], sp)
    with pytest.raises(ScoringError, match="no prompt log-probabilities"):
        answer_nll(None, sp)
    assert likelihood_cell(0.5, 6, 2.0) == (round(float(np.exp(-0.5)), 6), 12.0, {"nll": 0.5, "tokens": 6})
