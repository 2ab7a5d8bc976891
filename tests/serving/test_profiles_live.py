"""Live runtime profiles (#23 items 2 and 3): probes asked in waves by a strategy, the ability
estimate and its standard error while the profile runs, the early stop, the refit's params chosen
by cross-validation off the event loop, bad input, and a profile stopped midway.

The ingress is real (as in test_profiles.py: CoEService, admission, ProfileJobs, the kNN refit,
the SQLite registry); the expert servers are test_profiles.FakeBackend, which also answers chats.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from coe.profile_records import ProfileJob
from coe.types import StreamDelta
from tests.helpers import LoopThread
from tests.serving.test_profiles import (
    CODE,
    MATH,
    FakeBackend,
    HashEmbedder,
    World,
    _new,
    write_world,
)


class PausingBackend(FakeBackend):
    """FakeBackend that holds every request after the first ``after`` at ``gate``, and answers chats."""

    def __init__(self, tokenizer, after: int | None = None):
        super().__init__(tokenizer)
        self.after = after
        self.release = threading.Event()

    async def answer(self, dispatch):
        if dispatch.request.prompt_token_ids is None:
            return StreamDelta(text="fine", token_ids=[5], finish_reason="stop", prompt_tokens=3, completion_tokens=1)
        if self.after is not None and len(self.calls) >= self.after:
            self.calls.append(dispatch.expert)
            while not self.release.is_set():
                await asyncio.sleep(0.01)
            return self.score(dispatch)
        return await super().answer(dispatch)


@pytest.fixture
def live(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    config = write_world(tmp_path, tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lt = LoopThread()
    made = []

    def make(after=None, **serving):
        cfg = config.model_copy(update={"serving": config.serving.model_copy(update=serving)}) if serving else config
        w = World(lt, cfg, tmp_path, PausingBackend(tok, after))
        made.append(w)
        return w

    make.root, make.tiny = tmp_path, tiny_llama_dir
    make.same, make.foreign = str(tmp_path / "probes" / "same.jsonl"), str(tmp_path / "probes" / "foreign.jsonl")
    yield make
    for w in made:
        w.backend.release.set()
        lt.run(w.app.state.profiles.close())
        lt.run(w.service.close())
    lt.close()


def _until(w, expert_id, check, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        prof = w.request("GET", f"/v1/experts/{expert_id}").json()["profile"]
        if prof and check(prof):
            return prof
        time.sleep(0.02)
    raise AssertionError(f"profile of {expert_id} never matched: {prof}")


def test_an_adaptive_profile_shows_its_ability_while_it_runs_and_after(live):
    w = live(after=2)   # the first wave (profile_concurrency 2) is answered, the second waits
    r = w.request("POST", "/v1/experts", json=_new(live.tiny, probe=live.same, budget=6, strategy="adaptive"))
    assert r.status_code == 201, r.text
    assert r.json()["profile"]["strategy"] == "adaptive" and r.json()["profile"]["note"] is None
    during = _until(w, "new", lambda p: p["probes_done"] == 2)
    assert during["state"] == "running" and during["phase"] == "measuring" and during["budget"] == 6
    first = during["ability"]
    assert first["answered"] == 2 and first["se"] > 0, during
    w.backend.release.set()
    prof = w.wait("new")
    assert prof["state"] == "done" and prof["probes_done"] == prof["done"] == 6 and prof["phase"] is None, prof
    assert prof["ability"]["answered"] == 6 and prof["ability"]["se"] < first["se"]
    # the new expert is far better than both fitted experts on math, worse on code: a middling ability
    assert len({o.query for o in w.registry.profile_outcomes()}) == 6
    assert prof["refit"]["selected_by"] == "kept" and "too few" in prof["refit"]["note"]   # 8 + 0 new rows < 10
    assert [w.route(q) for q in MATH] == ["new"] * 4


def test_adaptive_falls_back_to_round_robin_without_the_fitted_experts_outcomes(live):
    w = live()
    body = _new(live.tiny, probe=live.foreign, budget=4, strategy="adaptive", stop_when={"se": 0.2})
    r = w.request("POST", "/v1/experts", json=body)
    assert r.status_code == 201, r.text
    prof = w.wait("new")
    assert prof["state"] == "done" and prof["strategy"] == "round_robin", prof
    assert "fell back to round_robin" in prof["note"] and "stop_when is not applied" in prof["note"]
    assert prof["ability"] is None and prof["total"] == 4 * 3 and prof["probes_done"] == 4
    # 8 fitted rows + 4 probed: enough for 5-fold CV over the kNN grid, within the default budget
    refit = prof["refit"]
    assert refit["selected_by"] == "cv" and refit["scored"] == refit["grid"] == 16 and refit["cv_aiq"] is not None
    assert w.router.fitted.params.model_dump()["k"] == refit["params"]["k"]


def test_stop_when_ends_the_profile_once_the_standard_error_is_small_enough(live):
    w = live()
    body = _new(live.tiny, probe=live.same, budget=8, stop_when={"se": 5.0, "min_probes": 3})
    assert w.request("POST", "/v1/experts", json=body).status_code == 201
    prof = w.wait("new")
    assert prof["state"] == "done" and prof["stop_se"] == 5.0, prof
    assert prof["probes_done"] == 4 and prof["total"] == prof["done"] == 4   # the wave that reached 3 finishes
    assert "stopped after 3 outcomes" in prof["note"] and prof["ability"]["answered"] == 4
    assert len(w.registry.profile_outcomes()) == 4


def test_bad_strategies_and_stop_rules_are_refused_naming_the_field(live):
    w = live()
    cases = [
        ({"strategy": "smart"}, "profile.strategy", ["adaptive", "round_robin", "random"]),
        ({"strategy": 3}, "profile.strategy", ["adaptive"]),
        ({"stop_when": {"se": 0}}, "profile.stop_when.se", ["greater than 0"]),
        ({"stop_when": {"se": -0.5}}, "profile.stop_when.se", []),
        ({"stop_when": {"se": 0.3, "every": 2}}, "profile.stop_when.every", ["unknown field", "se, min_probes"]),
        ({"stop_when": {}}, "profile.stop_when.se", []),
        ({"stop_when": {"se": 0.3, "min_probes": 0}}, "profile.stop_when.min_probes", []),
        ({"stop_when": 0.3}, "profile.stop_when", []),
        ({"budget": 0}, "profile.budget", []),
        ({"budget": 9}, "profile.budget", ["allowed: 1 to 8"]),
    ]
    for extra, param, words in cases:
        r = w.request("POST", "/v1/experts", json=_new(live.tiny, **{"probe": live.same, "budget": 2, **extra}))
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param, (extra, r.text)
        assert all(word in err["message"] for word in words), (extra, err["message"])
    assert "new" not in {e["id"] for e in w.request("GET", "/v1/experts").json()}
    assert w.backend.calls == []


def test_a_profile_stopped_midway_stores_nothing_and_reads_failed(live):
    a = live(after=2)
    assert a.request("POST", "/v1/experts", json=_new(live.tiny, probe=live.same, budget=6)).status_code == 201
    _until(a, "new", lambda p: p["probes_done"] == 2)
    fitted = a.router.fitted
    a.lt.run(a.app.state.profiles.close())   # the replica shuts down with the second wave in flight
    job = a.registry.profile_jobs()["new"]
    assert job.state == "failed" and "stopped midway" in job.error and job.probes_done == 2, job
    assert a.registry.profile_outcomes() == [] and a.router.fitted is fitted   # nothing half-written
    b = live()   # another replica (or the restarted one) shows it and may start it again
    assert b.request("GET", "/v1/experts/new").json()["profile"]["state"] == "failed"
    assert b.request("POST", "/v1/experts/new/profile", json={"probe": live.same, "budget": 6}).status_code == 202
    assert b.wait("new")["state"] == "done"
    assert len(b.registry.profile_outcomes()) == 6


def test_a_profile_whose_replica_was_killed_reads_failed_and_restarts(live):
    w = live()
    assert w.request("POST", "/v1/experts", json=_new(live.tiny)).status_code == 201
    old = time.time() - 10_000   # a replica killed mid-profile: its job row stays 'running', its heartbeat stops
    w.registry.start_profile_job(ProfileJob(expert="new", state="running", probe=live.same, budget=6, done=2, total=6,
                                            probes_done=2, created_at=old, updated_at=old), stale_before=old - 1)
    prof = w.request("GET", "/v1/experts/new").json()["profile"]
    assert prof["state"] == "failed" and "no progress" in prof["error"], prof
    assert w.registry.profile_outcomes() == []
    assert w.request("POST", "/v1/experts/new/profile", json={"probe": live.same, "budget": 6}).status_code == 202
    assert w.wait("new")["state"] == "done"


def test_the_ingress_answers_chats_while_a_slow_refit_runs(live, monkeypatch):
    from coe.routers import profile_data

    w = live()
    entered, release = threading.Event(), threading.Event()
    real = profile_data.select_params

    def slow(*args, **kw):   # the CV of a big grid: blocks its worker thread, not the event loop
        entered.set()
        release.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(profile_data, "select_params", slow)
    assert w.request("POST", "/v1/experts", json=_new(live.tiny, probe=live.same, budget=4)).status_code == 201
    assert entered.wait(30)
    t0 = time.monotonic()
    chat = w.request("POST", "/v1/chat/completions", json={"model": "base", "max_tokens": 4,
                                                            "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "fine", chat.text
    prof = w.request("GET", "/v1/experts/new").json()["profile"]
    assert time.monotonic() - t0 < 5.0
    assert prof["state"] == "running" and prof["phase"] == "refitting", prof
    assert w.registry.profile_outcomes() == []   # stored with the refit's result, not before
    release.set()
    assert w.wait("new")["state"] == "done"
    assert len(w.registry.profile_outcomes()) == 4


def test_select_params_cross_validates_within_its_budget():
    from coe.routers.datasets import RoutingData
    from coe.routers.profile_data import select_params

    rng = np.random.default_rng(0)
    queries = [f"{w} {i}" for i in range(40) for w in ("math", "code")][:60]
    quality = np.array([[1.0, 0.0] if q.startswith("math") else [0.0, 1.0] for q in queries]) + rng.normal(0, .1, (60, 2))
    data = RoutingData(queries=queries, models=["a", "b"], quality=quality, cost=np.ones((60, 2)), source="t")
    emb = HashEmbedder().encode(queries)
    params = {"k": 20, "shrink": 0.0}
    chosen, report = select_params("knn", params, data, emb, budget_s=60)
    assert report["selected_by"] == "cv" and report["scored"] == report["grid"] == 16
    assert np.isfinite(report["cv_aiq"]) and set(chosen) >= {"k", "shrink"}
    kept, report = select_params("knn", params, data, emb, budget_s=1e-9)
    assert kept == params and report["selected_by"] == "kept" and report["scored"] <= 1
    assert "over serving.refit_budget_s" in report["note"]
    kept, report = select_params("knn", params, data, emb, budget_s=0)
    assert kept == params and report["note"] == "serving.refit_budget_s is 0"


def test_a_probe_plan_asks_each_probe_once_in_its_strategy_order():
    from types import SimpleNamespace

    from coe.routers.probe_selection import ItemBank, next_probes, round_robin_order
    from coe.serving.api.profile_plan import ProbePlan

    queries = MATH + CODE
    probes = [SimpleNamespace(query=q, category="math" if q in MATH else "code") for q in queries]
    quality = np.array([[0.9, 0.2, 0.5] if q in MATH else [0.1, 0.8, 0.5] for q in queries])
    fitted = SimpleNamespace(queries=queries, models=["a", "b", "c"], quality=quality, observed=None)
    rr = ProbePlan(probes, "round_robin", 8, fitted)
    assert [probes.index(p) for p in rr.planned()] == list(round_robin_order(8, [p.category for p in probes]))
    emb = HashEmbedder().encode(queries)
    info = ProbePlan(probes, "information", 6, fitted)
    info.fit()
    bank = ItemBank.fit(quality)
    # three in flight at once: the strategy's first three, none handed out twice
    assert [info.next_probe()[0] for _ in range(3)] == list(next_probes("information", 8, [], [], 3, bank=bank))
    assert len(info.in_flight) == 3
    # one ends: the next is chosen from its outcome, skipping the two still in flight
    done, *flying = info.asked
    info.record(done, 0.0)
    after = info.next_probe()[0]
    expect = [int(i) for i in next_probes("information", 8, [done], [0.0], 3, bank=bank) if int(i) not in flying]
    assert after == expect[0] and after not in info.asked[:3]
    with pytest.raises(ValueError, match="not in flight"):
        info.record(done, 1.0)
    plan = ProbePlan(probes, "adaptive", 6, fitted)
    plan.fit(emb)
    first = [plan.next_probe()[0] for _ in range(2)]
    bank = ItemBank.fit(quality, embeddings=emb)
    assert first == list(next_probes("adaptive", 8, [], [], 2, bank=bank))
    plan.record(first[0], 1.0)
    plan.record(first[1], None)   # a failed request: not asked again, no outcome
    second = [plan.next_probe()[0] for _ in range(4)]
    assert len(set(second)) == 4 and not set(second) & set(first)
    assert plan.next_probe() is None and plan.ability().answered == 1   # the budget (6) is handed out
    stop = ProbePlan(probes, "information", 8, fitted, stop_se=10.0, min_probes=1)
    stop.fit()
    a, b = stop.next_probe()[0], stop.next_probe()[0]
    stop.record(a, 1.0)   # the rule holds: nothing more is handed out, the one in flight still records
    assert stop.stopped and stop.next_probe() is None
    stop.record(b, 0.0)
    assert stop.ability().answered == 2 and stop.in_flight == []
    foreign = ProbePlan([SimpleNamespace(query="x ?", category="")] * 3, "adaptive", 2, fitted, stop_se=0.1)
    assert foreign.strategy == "round_robin" and "fell back" in foreign.note and "stop_when" in foreign.note
