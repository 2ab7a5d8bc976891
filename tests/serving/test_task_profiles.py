"""Task-scored runtime profiles (#23 item 1): a new expert is measured by each probe's own scorer
(exact number, code tests in the sandbox, multiple choice by option likelihood), never mixed with
likelihood outcomes; the profile's outcome kind must be the fitted router's.

The ingress is real (as in test_profiles.py); the expert servers are a fake backend that answers
chat requests from a table and scores token-id prompts like test_profiles.FakeBackend. Code
answers run in the real sandbox (coe.scoring.sandbox)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from coe.profile_records import ProfileOutcome
from coe.types import StreamDelta
from tests.helpers import LoopThread
from tests.serving.test_profiles import (
    CODE,
    MATH,
    FakeBackend,
    HashEmbedder,
    World,
    _new,
    world_config,
)

CHOICE_Q = "what is 2 + 2 ?"
GOLD = {q: str(eval(q.removeprefix("what is ").removesuffix(" ?"))) for q in MATH}
DOUBLE = "```python\ndef f(x):\n    return x * 2\n```"


class TaskBackend(FakeBackend):
    """Chat requests: ``answers[expert][query]`` (5 tokens of usage); token-id prompts: FakeBackend."""

    def __init__(self, tokenizer, answers):
        super().__init__(tokenizer)
        self.answers = answers
        self.chats: list[tuple[str, str, object]] = []   # (expert, query, sampling)

    async def answer(self, dispatch):
        request = dispatch.request
        if request.prompt_token_ids is not None:
            return await super().answer(dispatch)
        query = request.messages[-1].content
        self.chats.append((dispatch.expert, query, request.sampling))
        return StreamDelta(text=self.answers[dispatch.expert][query], finish_reason="stop", prompt_tokens=3,
                           completion_tokens=2)


class StreamingTaskBackend(TaskBackend):
    """Chat answers streamed 4 characters a delta (one token each, usage counted as it goes, like the
    engines); ``closed_early``: the queries whose stream the consumer closed before its last delta."""

    def __init__(self, tokenizer, answers):
        super().__init__(tokenizer, answers)
        self.closed_early: list[str] = []

    async def stream(self, dispatch):
        request = dispatch.request
        if request.prompt_token_ids is not None:
            yield await self.answer(dispatch)
            return
        query = request.messages[-1].content
        self.chats.append((dispatch.expert, query, request.sampling))
        text = self.answers[dispatch.expert][query]
        pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
        finished = False
        try:
            for k, piece in enumerate(pieces, 1):
                await asyncio.sleep(0)
                yield StreamDelta(text=piece, finish_reason="stop" if k == len(pieces) else None, prompt_tokens=3,
                                  completion_tokens=k)
            finished = True
        finally:
            if not finished:
                self.closed_early.append(query)


def write_task_world(root, tiny):
    """Task outcomes (0/1, no nll) of base/other: base solves the code tasks, nobody the math; a kNN
    fitted on them (router.json records outcome_kind: task, as `coe router fit` does); probe files."""
    from coe.routers.base import create_router, save_router
    from coe.routers.datasets import load_routing_data

    rows = []
    for q in [*MATH, CHOICE_Q, *CODE]:
        cat = "code" if q in CODE else "math"
        out = {"base": float(cat == "code"), "other": 0.0}
        rows.append({"id": q, "query": q, "category": cat, "outcomes": out, "costs": {"base": 5.0, "other": 5.0},
                     "detail": {e: {"tokens": 5, "reason": None if v else "wrong"} for e, v in out.items()}})
    data_path = root / "data.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_routing_data(data_path)
    router = create_router("knn", {"k": 2}).fit(data, HashEmbedder().encode(data.queries))
    save_router(router, root / "fitted", embedder="hash", extra={"data": str(data_path), "outcome_kind": "task"})
    probes = root / "probes"
    probes.mkdir()
    tests = ["assert f(2) == 4", "assert f(3) == 6"]
    tasks = ([{"id": f"m{i}", "query": q, "scorer": "exact_number", "category": "math", "answer": GOLD[q]}
              for i, q in enumerate(MATH)]
             + [{"id": "choice", "query": CHOICE_Q, "scorer": "choice", "category": "math", "choices": ["4", "5 6 7 8"],
                 "answer": "4"}]
             + [{"id": f"c{i}", "query": q, "scorer": "code_tests", "category": "code", "tests": tests}
                for i, q in enumerate(CODE)])
    _write(probes / "tasks.jsonl", tasks)
    _write(probes / "hostile.jsonl", [t for t in tasks if t["query"] in CODE[:2]])
    _write(probes / "notests.jsonl", [{"id": "c", "query": CODE[0], "scorer": "code_tests", "category": "code",
                                       "reference": DOUBLE}])
    _write(probes / "references.jsonl", [{"id": "r", "query": MATH[0], "scorer": "reference_nll", "reference": "3"}])
    return world_config(root, tiny, probes)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def task_world(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    config = write_task_world(tmp_path, tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lt = LoopThread()
    made = []

    def make(answers, backend=None):
        w = World(lt, config, tmp_path, (backend or TaskBackend)(tok, answers))
        made.append(w)
        return w

    make.root, make.tiny = tmp_path, tiny_llama_dir
    yield make
    for w in made:
        lt.run(w.app.state.profiles.close())
    lt.close()


def test_a_task_profile_scores_each_probe_by_its_scorer_and_refits(task_world):
    wrong = "```python\ndef f(x):\n    return x + 1\n```"
    answers = {"new": {**{q: f"{q} ... #### {GOLD[q]}" for q in MATH}, CODE[0]: DOUBLE,
                       **{q: wrong for q in CODE[1:]}}}
    w = task_world(answers)
    assert w.route(MATH[0]) == "base"
    r = w.request("POST", "/v1/experts", json=_new(task_world.tiny, probe=str(task_world.root / "probes" / "tasks.jsonl"),
                                                   budget=9, max_tokens=64))
    assert r.status_code == 201, r.text
    assert r.json()["profile"]["kind"] == "task"   # the fitted data's kind, by default
    prof = w.wait("new", timeout=120)
    assert prof["state"] == "done" and prof["done"] == prof["total"] == 9 and prof["failed"] == 0, prof
    assert w.request("GET", "/v1/experts/new").json()["profile"]["kind"] == "task"
    # pinned greedy chat requests for the generated answers, none for the choice probe
    assert sorted(q for _, q, _ in w.backend.chats) == sorted(MATH + CODE)
    assert {(e, s.temperature, s.max_tokens) for e, _, s in w.backend.chats} == {("new", 0.0, 64)}
    assert w.backend.calls == ["new", "new"]   # the choice probe: one scoring request per option
    got = {o.probe_id: o for o in w.registry.profile_outcomes()}
    assert {o.kind for o in got.values()} == {"task"} and {o.expert for o in got.values()} == {"new"}
    assert {p: got[p].outcome for p in got} == {"m0": 1.0, "m1": 1.0, "m2": 1.0, "m3": 1.0, "choice": 1.0,
                                                "c0": 1.0, "c1": 0.0, "c2": 0.0, "c3": 0.0}
    assert "AssertionError" in got["c1"].detail["reason"] and got["c0"].detail["reason"] is None
    assert got["m0"].cost == 5.0 and "nll" not in got["m0"].detail
    # refitted: measurably best on math, worse on code
    assert [w.route(q) for q in MATH] == ["new"] * 4
    assert [w.route(q) for q in CODE[1:]] == ["base"] * 3
    # a stored likelihood outcome (measured before the router was refitted on tasks) is never mixed in
    w.registry.put_profile_outcomes([ProfileOutcome(expert="new", probe_id="x", query="what is 9 + 9 ?", outcome=0.9,
                                                    cost=1.0, detail={"nll": 0.1}, profiled_by="new")])
    w.app.state.profiles.refit()
    assert w.router.fitted.notes["profiled"]["rows"] == 9   # the task rows only, no row for the likelihood query


def test_generation_stops_once_the_answer_is_scorable_and_each_scorer_has_its_max_tokens(task_world):
    ramble = "\nThis function doubles x." * 40
    wrong = "```python\ndef f(x):\n    return x + 1\n```"
    looped = f"{MATH[3]} = {GOLD[MATH[3]]}\n" + "So the total stays the same.\n" * 10   # a greedy loop, no ####
    answers = {"new": {**{q: f"{q} = {GOLD[q]}\n#### {GOLD[q]}" for q in MATH[:3]}, MATH[3]: looped,
                       CODE[0]: "Here:\n" + DOUBLE + ramble,
                       CODE[1]: wrong + "\nOr:\n" + DOUBLE + ramble, CODE[2]: DOUBLE,
                       CODE[3]: "def f(x):\n    return x * 2\n"   # no fence: all of it runs (and no loop)
                       + "".join(f"# f({i}) == {2 * i}\n" for i in range(40))}}
    w = task_world(answers, StreamingTaskBackend)
    r = w.request("POST", "/v1/experts", json=_new(task_world.tiny, probe=str(task_world.root / "probes" / "tasks.jsonl"),
                                                   budget=9))
    assert r.status_code == 201, r.text
    prof = w.wait("new", timeout=120)
    assert prof["state"] == "done" and prof["done"] == 9 and prof["failed"] == 0, prof
    # no max_tokens in the request: each scorer's default
    assert {q: s.max_tokens for _, q, s in w.backend.chats} == {**{q: 512 for q in MATH}, **{q: 256 for q in CODE}}
    # the streams of the two rambling answers with a closed code block and of the looping one were
    # closed (the engine aborts them)
    assert sorted(w.backend.closed_early) == sorted([*CODE[:2], MATH[3]])
    got = {o.probe_id: o for o in w.registry.profile_outcomes()}
    assert {p: got[p].outcome for p in ("c0", "c1", "c2", "c3")} == {"c0": 1.0, "c1": 0.0, "c2": 1.0, "c3": 1.0}
    stop0 = -(-len("Here:\n" + DOUBLE) // 4)   # the delta that closed the block, in 4-character tokens
    assert got["c0"].detail["completion_tokens"] == stop0 and got["c0"].detail["finish_reason"] == "settled"
    assert got["c0"].detail["tokens"] == 3 + stop0 and got["c0"].cost == 3 + stop0   # the tokens generated
    assert got["c1"].detail["finish_reason"] == "settled" and "AssertionError" in got["c1"].detail["reason"]
    assert got["c3"].detail["finish_reason"] == "stop"
    assert got["c3"].detail["completion_tokens"] == -(-len(answers["new"][CODE[3]]) // 4)
    assert all(got[f"m{i}"].detail["finish_reason"] == "stop" and got[f"m{i}"].outcome == 1.0 for i in range(3))
    # the loop rule: stopped after the third copy of the block, still scored by its final number
    stop3 = -(-len(f"{MATH[3]} = {GOLD[MATH[3]]}\n" + "So the total stays the same.\n" * 3) // 4)
    assert got["m3"].detail["finish_reason"] == "loop" and got["m3"].outcome == 1.0
    assert got["m3"].detail["completion_tokens"] == stop3


def test_code_answers_run_in_the_sandbox_and_the_ingress_keeps_answering(task_world, tmp_path):
    escaped = tmp_path / "escaped.txt"
    answers = {"new": {CODE[0]: DOUBLE.replace("def f", f"open({str(escaped)!r}, 'w').write('x')\ndef f"),
                       CODE[1]: "```python\ndef f(x):\n    while True:\n        pass\n```"}}
    w = task_world(answers)
    w.app.state.profiles.scorer_options = {"code_tests": {"timeout_s": 4.0}}
    r = w.request("POST", "/v1/experts", json=_new(task_world.tiny, probe=str(task_world.root / "probes" / "hostile.jsonl"),
                                                   budget=2))
    assert r.status_code == 201, r.text
    end = time.monotonic() + 60
    while len(w.backend.chats) < 2 and time.monotonic() < end:   # both answers are being scored now
        time.sleep(0.02)
    t0 = time.monotonic()
    during = w.request("GET", "/v1/experts/new")
    assert during.status_code == 200 and time.monotonic() - t0 < 2.0   # the endless loop runs off the event loop
    assert during.json()["profile"]["state"] == "running"
    prof = w.wait("new", timeout=60)
    assert prof["state"] == "done" and prof["failed"] == 0, prof
    got = {o.probe_id: o for o in w.registry.profile_outcomes()}
    assert got["c0"].outcome == 0.0 and "PermissionError" in got["c0"].detail["reason"], got["c0"]
    assert got["c1"].outcome == 0.0 and "timed out after 4 s" in got["c1"].detail["reason"], got["c1"]
    assert not escaped.exists()


def test_bad_task_profiles_are_refused_naming_the_field(task_world):
    w = task_world({})
    probes = task_world.root / "probes"
    tasks = str(probes / "tasks.jsonl")
    cases = [
        ({"probe": tasks, "budget": 2, "kind": "likelihood"}, "profile.kind", ["'likelihood'", "'task'"]),
        ({"probe": tasks, "budget": 2, "kind": "vibes"}, "profile.kind", ["task", "likelihood"]),
        ({"probe": tasks, "budget": 2, "max_tokens": 0}, "profile.max_tokens", []),
        ({"probe": tasks, "budget": 2, "max_tokens": 10**6}, "profile.max_tokens", ["1 to 4096"]),
        ({"probe": str(probes / "notests.jsonl"), "budget": 1}, "profile.probe", ["'tests'"]),
        ({"probe": str(probes / "references.jsonl"), "budget": 1}, "profile.probe", ["task scorer", "'task'",
                                                                                    "likelihood"]),
    ]
    for profile, param, words in cases:
        r = w.request("POST", "/v1/experts", json=_new(task_world.tiny, **profile))
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param, (profile, r.text)
        assert all(word in err["message"] for word in words), (profile, err["message"])
    assert "new" not in {e["id"] for e in w.request("GET", "/v1/experts").json()}   # nothing registered
    assert w.backend.calls == []


def test_outcome_kinds_of_data_files_fitted_routers_and_stored_rows(tmp_path):
    from coe.profile_records import ProfileJob, data_outcome_kind, fitted_outcome_kind

    lik, task = tmp_path / "lik.jsonl", tmp_path / "task.jsonl"
    _write(lik, [{"id": "a", "query": "q", "outcomes": {"x": 0.5}, "detail": {"x": {"nll": 0.69}}}])
    _write(task, [{"id": "a", "query": "q", "outcomes": {"x": 1.0}, "detail": {"x": {"tokens": 3}}}])
    (tmp_path / "bench.csv").write_text("prompt,x\nq,1\n")
    assert [data_outcome_kind(p) for p in (lik, task, tmp_path / "bench.csv")] == ["likelihood", "task", "task"]
    assert fitted_outcome_kind({}, lik) == "likelihood"                              # an old router.json
    assert fitted_outcome_kind({"outcome_kind": "task"}, lik) == "task"              # recorded wins
    with pytest.raises(ValueError, match="allowed: task, likelihood"):
        fitted_outcome_kind({"outcome_kind": "vibes"}, lik)
    old = {"expert": "e", "probe_id": "p", "query": "q", "outcome": 0.5, "cost": 1.0, "profiled_by": "e"}
    assert ProfileOutcome.model_validate({**old, "detail": {"nll": 0.69}}).kind == "likelihood"
    assert ProfileOutcome.model_validate({**old, "detail": {"tokens": 3}}).kind == "task"
    assert ProfileJob.model_validate({"expert": "e", "probe": "default", "budget": 1, "created_at": 0}).kind == "likelihood"


def test_router_fit_records_the_outcome_kind(tmp_path, monkeypatch):
    from coe.routers import embedding
    from coe.routers.base import load_router
    from coe.tools.cli import main

    class Stub(HashEmbedder):
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(embedding, "Embedder", Stub)
    for kind, detail in (("likelihood", {"nll": 0.7}), ("task", {"tokens": 3})):
        data = tmp_path / f"{kind}.jsonl"
        _write(data, [{"id": q, "query": q, "outcomes": {"a": float(i % 2), "b": 0.5}, "costs": {"a": 1.0, "b": 1.0},
                       "detail": {"a": detail, "b": detail}} for i, q in enumerate(MATH + CODE)])
        out = tmp_path / kind
        assert main(["router", "fit", "--data", str(data), "--out", str(out), "--router", "knn", "--no-cv",
                     "--quiet"]) == 0
        assert load_router(out)[1]["outcome_kind"] == kind


def test_the_builtin_default_probe_set_serves_both_kinds():
    from coe.scoring.probes import load_probes
    from coe.serving.api.profiles import builtin_probe_sets, scorable

    probes = load_probes(builtin_probe_sets()["default"])
    assert probes and all(scorable(p, "task") and scorable(p, "likelihood") for p in probes)
    assert {p.scorer for p in probes} == {"exact_number", "code_tests"}


def test_task_cell_scores_an_answer_or_records_the_failed_request():
    from coe.scoring.cells import task_cell
    from coe.scoring.probes import Probe

    p = Probe(id="m", query="what is 1 + 2 ?", scorer="exact_number", answer="3")
    assert task_cell(p, "#### 3", {"tokens": 4}, 2.0) == (1.0, 8.0, {"tokens": 4, "reason": None})
    assert task_cell(p, "#### 4", {"tokens": 4}, 1.0)[2]["reason"] == "final number 4 != 3"
    assert task_cell(p, None, {"tokens": 0}, 1.0, error="HTTP 503: down", keep_answer=True) == (
        0.0, 0.0, {"tokens": 0, "reason": "HTTP 503: down", "answer": None})
    assert np.isclose(task_cell(p, "the answer is 3", {"tokens": 1}, 1.0)[0], 1.0)


def test_joined_reads_until_a_reason_and_closes_the_stream():
    from coe.serving.api.service import joined

    closed, seen = [], []

    async def stream(pieces):
        k = 0
        try:
            for k, piece in enumerate(pieces, 1):
                yield StreamDelta(text=piece, finish_reason="stop" if k == len(pieces) else None, prompt_tokens=3,
                                  completion_tokens=k)
        finally:
            closed.append(k)

    def until(text):
        seen.append(text)
        return "settled" if text.endswith("c") else None

    out = asyncio.run(joined(stream(["a", "b", "c", "d"]), until=until))
    assert (out.text, out.finish_reason, out.completion_tokens) == ("abc", "settled", 3)
    assert seen == ["a", "ab", "abc"] and closed == [3]   # closed at the delta that stopped it
    # never asked after the last delta: a finished answer keeps its own finish_reason
    out = asyncio.run(joined(stream(["a", "b"]), until=lambda text: "loop" if text == "ab" else None))
    assert (out.text, out.finish_reason) == ("ab", "stop") and closed[-1] == 2
    # without until: the whole stream
    out = asyncio.run(joined(stream(["a", "b", "c"])))
    assert (out.text, out.finish_reason, out.completion_tokens) == ("abc", "stop", 3) and closed[-1] == 3


def test_stop_reason_names_the_rule_that_stops_a_generated_answer():
    from coe.scoring.base import get_scorer
    from coe.scoring.probes import Probe
    from coe.serving.api.profile_measure import stop_reason

    math = Probe(id="g", query="q", scorer="exact_number", answer="18")
    exact = get_scorer("exact_number")
    loop = "So she has 9 * 2 = 18 apples.\n" * 3
    answer = "Step 1: " + loop + "So she has 9 * 2 = 18 apples.\nThen 7"
    stops = [n for n in range(len(answer) + 1) if stop_reason(exact, math, answer[:n])]
    assert stops and answer[:stops[0]].endswith(loop)   # the third copy of the block stops it
    assert stop_reason(exact, math, answer[:stops[0]]) == "loop" and exact(math, answer[:stops[0]]).score == 1.0
    assert stop_reason(exact, math, "Step 1: " + "So she has 9 * 2 = 18 apples.\n" * 2) is None   # twice: no loop
    assert stop_reason(exact, math, "9 * 2 = 18\n#### 18\n") is None
    # every scorer's answer: the scorer's own rule first, then the loop rule
    code = Probe(id="c", query="q", scorer="code_tests", tests=["assert f(2) == 4"])
    tests = get_scorer("code_tests")
    assert stop_reason(tests, code, DOUBLE) == "settled"
    assert stop_reason(tests, code, DOUBLE + "\nIt doubles x, as asked.\n" * 3) == "settled"
    assert stop_reason(tests, code, "It doubles x, as asked.\n" * 3) == "loop"
    assert stop_reason(tests, code, "It doubles x, as asked.\n" * 2) is None
