"""``coe experts profile``'s core (coe.tools.profiling) against an in-process OpenAI-shaped endpoint
(httpx.MockTransport, a unit-test double): outcomes, costs, failures, resumption. The real
service path is exercised by bench/composition.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from coe.scoring.probes import Probe
from coe.tools.profiling import done_ids, expert_costs, profile_experts

ANSWERS = {"good": "so the answer is 42", "bad": "I think 7"}


def _probes(n: int = 3) -> list[Probe]:
    return [Probe(id=f"p{i}", query=f"question {i}", scorer="exact_number", category="math", answer="42")
            for i in range(n)]


def _transport(calls: list, fail_for: str | None = None):
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append((body["model"], body["messages"][0]["content"]))
        assert body["temperature"] == 0.0
        if body["model"] == fail_for:
            return httpx.Response(503, json={"error": {"message": "expert down", "type": "engine_unavailable"}})
        text = ANSWERS[body["model"]]
        return httpx.Response(200, json={
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        })

    return httpx.MockTransport(handle)


def test_profile_writes_outcomes_and_costs(tmp_path):
    out = tmp_path / "profile.jsonl"
    calls: list = []
    run = asyncio.run(profile_experts("http://coe", _probes(), {"good": 2.0, "bad": 1.0}, out,
                                      concurrency=2, progress=False, transport=_transport(calls)))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"]
    assert all(r["outcomes"] == {"good": 1.0, "bad": 0.0} for r in rows)
    assert all(r["costs"] == {"good": 30.0, "bad": 15.0} for r in rows)
    assert rows[0]["category"] == "math" and rows[0]["detail"]["bad"]["reason"]
    assert run.written == 3 and run.mean_outcome == {"good": 1.0, "bad": 0.0}
    assert len(calls) == 6
    # the native routing loader reads what profiling writes
    from coe.routers.datasets import load_routing_data

    data = load_routing_data(out)
    assert list(data.models) == ["good", "bad"] and len(data) == 3


def test_profile_resumes_and_records_failures(tmp_path):
    out = tmp_path / "profile.jsonl"
    calls: list = []
    asyncio.run(profile_experts("http://coe", _probes(2), {"good": 1.0}, out, progress=False,
                                transport=_transport(calls)))
    with out.open("a") as fh:
        fh.write('{"id": "p9", "outc')  # a torn line from a killed run
    calls.clear()
    run = asyncio.run(profile_experts("http://coe", _probes(4), {"good": 1.0, "bad": 1.0}, out,
                                      progress=False, transport=_transport(calls, fail_for="bad")))
    # p0 and p1 lacked only "bad": that cell alone is asked; p2 and p3 are asked of both
    assert run.skipped == 0 and run.written == 4
    assert sorted(calls) == sorted([("bad", f"question {i}") for i in range(4)] + [("good", "question 2"), ("good", "question 3")])
    assert done_ids(out) == {"p0", "p1", "p2", "p3"}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3"]                 # one line per probe, in order
    assert all(set(r["outcomes"]) == {"good", "bad"} for r in rows) and rows[0]["outcomes"]["good"] == 1.0
    assert rows[-1]["outcomes"]["bad"] == 0.0 and "HTTP 503" in rows[-1]["detail"]["bad"]["reason"]
    assert run.failures == {"bad": 4}
    calls.clear()
    again = asyncio.run(profile_experts("http://coe", _probes(4), {"good": 1.0, "bad": 1.0}, out,
                                        progress=False, transport=_transport(calls)))
    assert again.skipped == 4 and again.written == 0 and calls == []


def test_an_added_expert_after_a_killed_run_is_folded_into_its_rows(tmp_path):
    from coe.tools.profiling import merge_lines

    out = tmp_path / "profile.jsonl"
    asyncio.run(profile_experts("http://coe", _probes(2), {"good": 1.0}, out, progress=False, transport=_transport([])))
    with out.open("a") as fh:   # a killed run had appended one probe's new column, then a torn line
        fh.write(json.dumps({"id": "p0", "outcomes": {"bad": 0.0}, "costs": {"bad": 15.0}, "detail": {"bad": {}}}) + "\n")
        fh.write('{"id": "p1", "outc')
    calls: list = []
    asyncio.run(profile_experts("http://coe", _probes(2), {"good": 1.0, "bad": 1.0}, out, progress=False,
                                transport=_transport(calls)))
    assert calls == [("bad", "question 1")]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1"] and rows[0]["query"] == "question 0"
    assert rows[0]["costs"] == {"good": 15.0, "bad": 15.0} and merge_lines(out) == 0
    # lines that are not profile records (no id, or not JSON) survive a fold untouched
    other = tmp_path / "mixed.jsonl"
    other.write_text('{"query": "q", "outcomes": {"a": 1}}\nnot json\n{"id": "x", "outcomes": {"a": 1}}\n'
                     '{"id": "x", "outcomes": {"b": 0}}\n')
    assert merge_lines(other) == 1
    assert other.read_text().splitlines() == ['{"query": "q", "outcomes": {"a": 1}}', "not json",
                                              '{"id": "x", "outcomes": {"a": 1, "b": 0}}']


def test_profile_refuses_likelihood_probes_and_unknown_experts(tmp_path):
    from coe.errors import ExpertNotFoundError, InvalidRequestError

    nll = [Probe(id="r", query="q", scorer="reference_nll", reference="text")]
    with pytest.raises(InvalidRequestError, match="reference_nll"):
        asyncio.run(profile_experts("http://coe", nll, {"good": 1.0}, tmp_path / "o.jsonl", progress=False))
    listed = [{"id": "good", "config": {"cost": 2}}, {"id": "bad", "config": {}}]
    assert expert_costs(lambda _: listed, []) == {"good": 2.0, "bad": 1.0}
    with pytest.raises(ExpertNotFoundError, match="nope"):
        expert_costs(lambda _: listed, ["nope"])


def test_likelihood_profile_on_the_tiny_model(tmp_path, tiny_llama_dir, tiny_loras):
    """Real path: the tiny llama and two tiny peft LoRAs, outcomes exp(-NLL) per expert."""
    import math

    import yaml

    from coe.tools.profiling import likelihood_table, profile_likelihood
    from tests.serving.serving_helpers import tiny_config_dict

    cfg = tiny_config_dict(tiny_llama_dir, tiny_loras, tmp_path, flaky=False)
    path = tmp_path / "coe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    probes = [Probe(id="a", query="what is the capital of france", scorer="exact_number", answer="1",
                    reference="paris is the capital"),
              Probe(id="b", query="hello world", scorer="exact_number", answer="2", reference="hello")]
    out = tmp_path / "lik.jsonl"
    run = profile_likelihood(probes, str(path), {"tiny": 1.0, "tiny-a": 2.0}, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert run.written == 2 and [r["id"] for r in rows] == ["a", "b"]
    table, tokens = likelihood_table(probes, str(path), ["tiny", "tiny-a"])
    for r in rows:
        for e in ("tiny", "tiny-a"):
            assert r["outcomes"][e] == pytest.approx(math.exp(-table[r["id"]][e]), rel=1e-4)
        assert r["costs"]["tiny-a"] == 2 * r["costs"]["tiny"] == 2 * tokens[r["id"]]
    # the LoRA changes the likelihood (its B weights are non-zero)
    assert table["a"]["tiny"] != table["a"]["tiny-a"]
