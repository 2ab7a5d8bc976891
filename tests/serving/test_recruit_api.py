"""Recruit and aggregate in the service (issue 25, item 3): the pure logic (pick, recruits, the
aggregator's prompt, the stream rewrite, the config's checks), then the in-process service with
real engines (tiny llama on the transformers engine: 'tiny' and its LoRAs 'tiny-a', 'tiny-b' on
one server, 'twin' — the same weights — on a second)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from coe.errors import ConfigError
from coe.serving.api.models import RoutingInfo, Usage
from coe.serving.api.recruit import (
    Annotated,
    Recruitment,
    aggregator_messages,
    answer_kind,
    pick,
    recruits,
)
from coe.types import ChatMessage
from tests.serving.serving_helpers import Harness, KeywordRouter, error_of, tiny_config_dict

# ------------------------------------------------------------------ the pure logic


def test_vote_takes_the_majority_over_the_higher_quality():
    won, kind, normalized = pick(["B", "The answer is (C)", "c."], [0.9, 0.5, 0.4])
    assert (won, kind, normalized) == (1, "choice", ["B", "C", "C"])   # C's best supporter represents it


def test_a_tie_goes_to_the_higher_predicted_quality_then_plan_order():
    assert pick(["12", "13"], [0.5, 0.7])[:2] == (1, "number")
    assert pick(["12", "13"], [0.7, 0.5])[0] == 0
    assert pick(["12", "13"], [None, 0.1])[0] == 1        # unknown quality ranks last
    assert pick(["12", "13"], [0.5, 0.5])[0] == 0         # equal: plan order
    assert pick(["", None], [0.1, 0.9])[0] == 0           # nobody answers: the first reply


def test_answer_kind_auto_takes_the_first_kind_every_reply_gives():
    assert answer_kind(["(A)", "Answer: b", ""]) == "choice"
    assert answer_kind(["x = 1,000", "It is 1000.0", "A"]) == "text"   # 'A' gives no number
    assert answer_kind(["x = 1,000", "It is 1000.0"]) == "number"
    assert pick(["Paris.", " paris", "Lyon"], [0.1, 0.2, 0.9], "text")[0] == 1
    assert pick(["1,000", "1000.0", "7"], [0.1, 0.2, 0.9], "number")[0] == 1


def _cand(expert, quality, uncertainty=None, healthy=True):
    return SimpleNamespace(expert=expert, quality=quality, uncertainty=uncertainty, healthy=healthy)


def test_recruits_are_the_first_k_healthy_candidates_and_the_trigger_gates_them():
    plan = [_cand("a", 0.8, 0.3), _cand("b", 0.79, healthy=False), _cand("c", 0.78), _cand("d", 0.1)]
    assert recruits(plan, Recruitment(k=2)) == ["a", "c"]
    assert recruits(plan, Recruitment(k=9)) == ["a", "c", "d"]
    assert recruits(plan, Recruitment(k=2, when="margin", threshold=0.05)) == ["a", "c"]    # 0.02 < 0.05
    assert recruits(plan, Recruitment(k=2, when="margin", threshold=0.01)) == []
    assert recruits(plan, Recruitment(k=2, when="uncertainty", threshold=0.2)) == ["a", "c"]
    assert recruits(plan, Recruitment(k=2, when="uncertainty", threshold=0.3)) == []
    assert recruits([_cand("a", None), _cand("c", 0.1)], Recruitment(k=2, when="margin", threshold=1)) == []
    assert recruits([_cand("a", 0.8, healthy=False)], Recruitment(k=2)) == []


def test_the_aggregator_gets_the_question_and_the_candidate_answers():
    msgs = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="first"),
            ChatMessage(role="assistant", content="ok"), ChatMessage(role="user", content="what is 2 + 3 ?")]
    out = aggregator_messages(msgs, ["5", " five \n"])
    assert out[:3] == msgs[:3] and len(out) == 4 and out[3].role == "user"
    text = out[3].content
    assert text.startswith("what is 2 + 3 ?") and "2 candidate answers" in text
    assert "Answer 1:\n5" in text and "Answer 2:\nfive" in text and "best final answer" in text
    assert msgs[3].content == "what is 2 + 3 ?"                         # the request is not changed
    only_system = aggregator_messages([ChatMessage(role="system", content="s")], ["x"])
    assert [m.role for m in only_system] == ["system", "user"]


class _Inner:
    def __init__(self, events):
        self.events, self.closed = list(events), False

    async def __anext__(self):
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    async def aclose(self):
        self.closed = True


def test_the_aggregators_stream_names_the_recruits_and_sums_the_usage():
    chunk = {"id": "x", "coe": {"expert": "agg", "router": "pinned"}, "choices": []}
    usage = {"id": "x", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    two = 'data: {"id":"x","choices":[]}\n\n' + f"data: {json.dumps(usage)}\n\n"   # two events in one piece
    inner = _Inner([f"data: {json.dumps(chunk)}\n\n", two, "data: [DONE]\n\n"])
    coe = RoutingInfo(expert="agg", router="knn", recruited=["a", "b"], aggregate="agg")
    stream = Annotated(inner, coe, Usage(prompt_tokens=10, completion_tokens=4, total_tokens=14))

    async def read():
        return [e async for e in stream]

    events = asyncio.run(read())
    first = json.loads(events[0][len("data: "):])
    assert first["coe"]["recruited"] == ["a", "b"] and first["coe"]["router"] == "knn"
    second = [json.loads(e[len("data: "):]) for e in events[1].split("\n\n") if e]
    assert second[1]["usage"] == {"prompt_tokens": 15, "completion_tokens": 6, "total_tokens": 21}
    assert events[-1] == "data: [DONE]\n\n" and all(e.endswith("\n\n") for e in events)
    unread = _Inner(["data: [DONE]\n\n"])
    asyncio.run(Annotated(unread, coe, Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)).aclose())
    assert unread.closed                                                 # closed though never iterated


def _config(**recruit):
    from coe.config import parse_config

    return parse_config({"router": {"policy": {"recruit": recruit}}, "experts": [
        {"id": "m", "kind": "model", "model": "m", "description": "d"},
        {"id": "n", "kind": "model", "model": "m", "description": "d"}]})


def test_the_config_checks_recruit_at_load_time():
    assert _config().router.policy.recruit.k == 1
    ok = _config(k=2, aggregate="n", when="margin", threshold=0.05).router.policy.recruit
    assert (ok.k, ok.aggregate, ok.when, ok.threshold) == (2, "n", "margin", 0.05)
    for bad, key in [({"k": 3}, "router.policy.recruit.k is 3; allowed: 1 to 2"),
                     ({"k": 0}, "router.policy.recruit.k"),
                     ({"aggregate": "nope"}, "router.policy.recruit.aggregate is 'nope'"),
                     ({"when": "uncertainty"}, "router.policy.recruit.threshold is needed"),
                     ({"when": "sometimes", "threshold": 1}, "router.policy.recruit.when"),
                     ({"k": 2, "extra": 1}, "router.policy.recruit.extra")]:
        with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
            _config(**bad)


# ------------------------------------------------------------------ the service


@dataclass
class Scored:
    expert: str
    scores: dict
    router: str
    uncertainty: dict = field(default_factory=dict)
    reason: str = "policy"


QUALITY = {"tiny-a": 0.80, "tiny": 0.60, "twin": 0.50, "tiny-b": 0.20}


class ScoredRouter(KeywordRouter):
    """A router double with scores a test sets (the expert bookkeeping is KeywordRouter's)."""

    name = "scored-test"

    def __init__(self, expert_ids):
        super().__init__(expert_ids, default="tiny")
        self.quality = dict(QUALITY)
        self.uncertainty: dict = {}

    def route(self, queries):
        best = max(self.quality, key=self.quality.get)
        return [Scored(best, dict(self.quality), self.name, dict(self.uncertainty)) for _ in queries]


@pytest.fixture(scope="module")
def h(loop_thread, tiny_llama_dir, tiny_loras, serving_root, tmp_path_factory):
    from coe.config import parse_config

    root = tmp_path_factory.mktemp("recruit")
    (root / "adapters").symlink_to(serving_root / "adapters")
    data = tiny_config_dict(tiny_llama_dir, tiny_loras, root)
    twin = next(e for e in data["experts"] if e["id"] == "flaky")
    twin.update(id="twin", description="the tiny model again, on its own server")
    del twin["fallback"]
    data["experts"][2]["cost"] = 2.0                              # tiny-b costs twice the others
    config = parse_config(data)
    harness = Harness(loop_thread, config, root, router=ScoredRouter(e.id for e in config.experts))
    yield harness
    harness.close()


@pytest.fixture
def router(h):
    r = h.service.router
    yield r
    r.quality, r.uncertainty = dict(QUALITY), {}


Q = "what is the capital of france ?"


def _ok(resp):
    assert resp.status_code == 200, resp.text
    return resp.json()


def _alone(h, expert, content=Q, messages=None):
    """The expert's own answer, pinned (greedy: the answer it gives when recruited)."""
    body = {"model": expert, "messages": messages or [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 6}
    return _ok(h.request("POST", "/v1/chat/completions", json=body))


def _text(body):
    return body["choices"][0]["message"]["content"]


def _sum(*bodies):
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: sum(b["usage"][k] for b in bodies) for k in keys}


def test_a_vote_returns_the_majoritys_answer_and_sums_the_usage(h, router):
    alone = {e: _alone(h, e) for e in ("tiny-a", "tiny", "twin")}
    assert _text(alone["tiny"]) == _text(alone["twin"]) != _text(alone["tiny-a"])   # the test's premise
    body = _ok(h.chat(Q, coe={"recruit": 3, "answer": "text"}))
    coe = body["coe"]
    assert coe["recruited"] == ["tiny-a", "tiny", "twin"] and coe["failed"] == [] and coe["aggregate"] == "vote"
    assert body["model"] == coe["expert"] == "tiny"            # the majority beats the best predicted expert
    assert _text(body) == _text(alone["tiny"]) and coe["pinned"] is False and coe["router"] == "scored-test"
    assert coe["votes"]["tiny"] == coe["votes"]["twin"] != coe["votes"]["tiny-a"]
    assert body["usage"] == _sum(*alone.values()) and coe["cost"] == 3.0
    assert coe["candidates"] is None


def test_a_tie_goes_to_the_higher_predicted_quality(h, router):
    assert _text(_alone(h, "tiny")) != _text(_alone(h, "tiny-a"))
    first = _ok(h.chat(Q, coe={"recruit": 2, "aggregate": "vote", "answer": "text"}))
    assert first["coe"]["recruited"] == ["tiny-a", "tiny"] and first["model"] == "tiny-a"
    router.quality.update({"tiny": 0.9})
    second = _ok(h.chat(Q, coe={"recruit": 2, "answer": "text", "trace": True}))
    assert second["coe"]["recruited"] == ["tiny", "tiny-a"] and second["model"] == "tiny"
    assert [c["expert"] for c in second["coe"]["candidates"]] == ["tiny", "tiny-a", "twin", "tiny-b"]


def test_an_aggregator_writes_the_final_answer(h, router):
    alone = [_alone(h, e) for e in ("tiny-a", "tiny")]
    messages = aggregator_messages([ChatMessage(role="user", content=Q)], [_text(b) for b in alone])
    expected = _alone(h, "twin", messages=[m.model_dump() for m in messages])
    body = _ok(h.chat(Q, coe={"recruit": 2, "aggregate": "twin"}))
    coe = body["coe"]
    assert body["model"] == coe["expert"] == coe["aggregate"] == "twin" and coe["recruited"] == ["tiny-a", "tiny"]
    assert _text(body) == _text(expected) and coe["votes"] is None and coe["failed"] == []
    assert body["usage"] == _sum(*alone, expected) and coe["cost"] == 3.0
    metrics = h.request("GET", "/metrics").text
    assert 'coe_recruited_total{expert="twin",role="aggregate"}' in metrics
    assert 'coe_recruited_total{expert="tiny-a",role="answer"}' in metrics


def _events(resp):
    assert resp.status_code == 200, resp.text
    lines = [e[len("data: "):] for e in resp.text.split("\n\n") if e.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def _streamed_text(events):
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c["choices"])


@pytest.mark.parametrize("aggregate", ["vote", "twin"])
def test_streaming_streams_the_aggregated_answer(h, router, aggregate):
    opts = {"recruit": 2, "aggregate": aggregate, "answer": "text"}
    whole = _ok(h.chat(Q, coe=opts))
    resp = h.chat(Q, coe=opts, stream=True, stream_options={"include_usage": True})
    events = _events(resp)
    assert resp.headers["x-coe-expert"] == whole["model"]
    assert events[0]["coe"]["recruited"] == ["tiny-a", "tiny"] and events[0]["coe"]["aggregate"] == aggregate
    assert _streamed_text(events) == _text(whole)
    assert events[-1]["usage"] == whole["usage"]
    assert [c["choices"][0].get("finish_reason") for c in events if c["choices"]][-1] == \
        whole["choices"][0]["finish_reason"]


@pytest.fixture
def down(h):
    """Take expert servers away (as a crashed server is: every call fails fast with 503) for one test."""
    from coe.serving.deployments.spec import server_id_of

    taken = {}

    def take(expert_id):
        sid = server_id_of(h.service.catalog.get(expert_id))
        taken[sid] = h.backend.servers.pop(sid)

    yield take
    h.backend.servers.update(taken)
    h.service.catalog.health.mark_up(h.service.catalog.ids())


def test_a_recruit_whose_server_is_down_is_left_out_and_named(h, router, down):
    down("twin")
    body = _ok(h.chat(Q, coe={"recruit": 3, "answer": "text"}))
    coe = body["coe"]
    assert coe["recruited"] == ["tiny-a", "tiny"] and [f["expert"] for f in coe["failed"]] == ["twin"]
    assert "twin" in coe["failed"][0]["error"] and "unavailable" in coe["failed"][0]["error"]
    assert set(coe["votes"]) == {"tiny-a", "tiny"} and body["model"] == "tiny-a"
    assert body["usage"] == _sum(_alone(h, "tiny-a"), _alone(h, "tiny"))
    again = _ok(h.chat(Q, coe={"recruit": 3}))                   # now known down: not recruited at all
    assert again["coe"]["recruited"] == ["tiny-a", "tiny", "tiny-b"] and again["coe"]["failed"] == []


def test_a_recruit_answered_by_its_fallback_votes_once(h, router, down):
    twin = h.service.catalog.get("twin")
    twin.fallback = "tiny"                                       # twin's own fallback: an expert already recruited
    try:
        down("twin")
        body = _ok(h.chat(Q, coe={"recruit": 3, "answer": "text"}))
    finally:
        twin.fallback = None
    coe = body["coe"]
    assert coe["recruited"] == ["tiny-a", "tiny"] and set(coe["votes"]) == {"tiny-a", "tiny"}
    assert coe["failed"] == [{"expert": "twin", "error": "it failed; its fallback 'tiny' answered, which had "
                                                         "already answered (left out of the vote)"}]
    tiny = _alone(h, "tiny")
    assert body["usage"] == _sum(_alone(h, "tiny-a"), tiny, tiny) and coe["cost"] == 3.0   # paid for, all three


def test_a_failed_aggregator_leaves_the_vote(h, router, down):
    down("twin")
    for stream in (False, True):
        resp = h.chat(Q, coe={"recruit": 2, "aggregate": "twin", "answer": "text"}, stream=stream)
        coe = _events(resp)[0]["coe"] if stream else _ok(resp)["coe"]
        assert coe["recruited"] == ["tiny-a", "tiny"] and coe["aggregate"] == "vote" and coe["expert"] == "tiny-a"
        assert coe["failed"][0]["expert"] == "twin" and coe["failed"][0]["error"].startswith("aggregator: ")


def test_the_recruits_are_asked_at_once(h, router, monkeypatch):
    """The k calls are in flight together (each then joins its own server's batch, as any pinned
    request does)."""
    real, live, peak, asked = h.service.chat, [0], [0], []

    async def spy(req, **kw):
        asked.append(req.model)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        try:
            return await real(req, **kw)
        finally:
            live[0] -= 1

    monkeypatch.setattr(h.service, "chat", spy)
    _ok(h.chat(Q, coe={"recruit": 3}, max_tokens=20))
    assert asked == ["tiny-a", "tiny", "twin"] and peak[0] == 3


def test_when_no_recruit_answers_the_usual_fallback_serves(h, router, down):
    down("tiny")                                                 # tiny, tiny-a and tiny-b's server
    body = _ok(h.chat(Q, coe={"recruit": 2}))
    coe = body["coe"]
    assert body["model"] == "twin" and coe["recruited"] == [] and coe["aggregate"] == "vote"
    assert [f["expert"] for f in coe["failed"]] == ["tiny-a", "tiny"]
    assert body["usage"] == _alone(h, "twin")["usage"]
    streamed = _events(h.chat(Q, coe={"recruit": 2}, stream=True))   # known down now: twin alone
    assert streamed[0]["coe"]["recruited"] == ["twin"]


@pytest.mark.parametrize("extra, field, says", [
    ({"coe": {"recruit": 0}}, "coe.recruit", "allowed: 1 to 4"),
    ({"coe": {"recruit": 5}}, "coe.recruit", "allowed: 1 to 4"),
    ({"coe": {"recruit": "2"}}, "coe.recruit", "integer"),
    ({"coe": {"recruit": True}}, "coe.recruit", "integer"),
    ({"coe": {"recruit": 2, "aggregate": "nope"}}, "coe.aggregate", "allowed: vote or an expert id"),
    ({"coe": {"recruit": 2, "aggregate": 3}}, "coe.aggregate", "string"),
    ({"coe": {"aggregate": "vote"}}, "coe.aggregate", "needs coe.recruit"),
    ({"coe": {"recruit": 2, "answer": "letters"}}, "coe.answer", "choice"),
    ({"coe": {"recruit": 2}, "n": 2}, "coe.recruit", "n = 2"),
    ({"coe": {"recruit": 2}, "tools": [{"type": "function", "function": {"name": "f"}}]}, "coe.recruit", "tools"),
    ({"coe": {"recruit": 2}, "model": "tiny"}, "coe.recruit", "model 'coe'"),
    ({"coe": {"recruit": 2}, "max_tokens": 0}, "max_tokens", "allowed"),
])
def test_bad_recruit_options_get_a_400_naming_the_field(h, extra, field, says):
    resp = h.chat(Q, **extra)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field and says in error_of(resp)
    streamed = h.chat(Q, stream=True, **extra)
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == field


@pytest.fixture
def configured(h):
    """Set router.policy.recruit for one test."""
    from coe.config import RecruitConfig

    before = h.service.config

    def use(**kw):
        policy = before.router.policy.model_copy(update={"recruit": RecruitConfig(**kw)})
        h.service.config = before.model_copy(update={"router": before.router.model_copy(update={"policy": policy})})

    yield use
    h.service.config = before


def test_the_config_recruits_only_when_the_top_prediction_is_unsure(h, router, configured):
    configured(k=2, when="margin", threshold=0.1)
    assert _ok(h.chat(Q))["coe"]["recruited"] is None            # 0.80 vs 0.60: sure enough
    router.quality.update({"tiny": 0.75})
    unsure = _ok(h.chat(Q))
    assert unsure["coe"]["recruited"] == ["tiny-a", "tiny"] and unsure["coe"]["aggregate"] == "vote"
    assert _ok(h.chat(Q, coe={"recruit": 1}))["coe"]["recruited"] is None    # the request turns it off
    assert _ok(h.chat(Q, model="tiny"))["coe"]["recruited"] is None          # pinned: one expert
    configured(k=3, aggregate="twin", when="uncertainty", threshold=0.2)
    assert _ok(h.chat(Q))["coe"]["recruited"] is None            # the router reports no uncertainty
    router.uncertainty = {"tiny-a": 0.3}
    body = _ok(h.chat(Q))
    assert body["coe"]["recruited"] == ["tiny-a", "tiny", "twin"] and body["model"] == "twin"
    configured(k=2)
    assert _ok(h.chat(Q, coe={"aggregate": "tiny"}))["coe"]["aggregate"] == "tiny"   # the request's aggregator


def test_a_request_the_trigger_does_not_recruit_is_routed_once(h, router, configured, monkeypatch):
    """The config's trigger decides on the plan; the single-expert path then serves that decision
    instead of routing the request again (and shows the plan only when asked)."""
    configured(k=2, when="margin", threshold=0.1)                 # 0.80 vs 0.60: sure enough, no recruits
    real, decided = h.service.decide, []

    async def spy(model, messages, **kw):
        decided.append(model)
        return await real(model, messages, **kw)

    monkeypatch.setattr(h.service, "decide", spy)
    alone = _alone(h, "tiny-a")
    decided.clear()
    for stream in (False, True):
        resp = h.chat(Q, stream=stream)
        coe = _events(resp)[0]["coe"] if stream else _ok(resp)["coe"]
        assert coe["expert"] == "tiny-a" and coe.get("recruited") is None and coe.get("candidates") is None
        assert coe["router"] == "scored-test" and coe["pinned"] is False
        if not stream:
            assert _text(_ok(resp)) == _text(alone)
    assert decided == ["coe", "coe"]                              # once per request
    traced = _ok(h.chat(Q, coe={"trace": True}))["coe"]
    assert [c["expert"] for c in traced["candidates"]] == ["tiny-a", "tiny", "twin", "tiny-b"]
    assert decided == ["coe"] * 3


def test_a_request_routed_before_it_is_served_counts_its_routing_in_its_latency(h, router, configured,
                                                                                 monkeypatch):
    """Recruit decides before the service serves (``info=``): the latency and time-to-first-token
    metrics still count from the request's arrival, so the routing time is in them."""
    configured(k=2, when="margin", threshold=0.1)                 # no recruits: served on the decision
    real, routing_s = h.service.decide, 1.0

    async def slow(model, messages, **kw):
        await asyncio.sleep(routing_s)
        return await real(model, messages, **kw)

    monkeypatch.setattr(h.service, "decide", slow)
    samples = h.service.metrics.registry.get_sample_value

    def total(name: str) -> float:
        return samples(f"coe_{name}_seconds_sum", {"expert": "tiny-a"}) or 0.0

    before = total("request_latency")
    assert _ok(h.chat(Q))["coe"]["expert"] == "tiny-a"
    assert total("request_latency") - before >= routing_s
    before, first = total("request_latency"), total("time_to_first_token")
    assert _events(h.chat(Q, stream=True))[0]["coe"]["expert"] == "tiny-a"
    assert total("time_to_first_token") - first >= routing_s
    assert total("request_latency") - before >= routing_s
