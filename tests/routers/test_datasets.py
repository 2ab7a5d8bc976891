"""Dataset readers: every format, bad rows skipped and counted, bad files named by line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coe.errors import DatasetError
from coe.routers.datasets import load_cost_table, load_routing_data, routing_texts, shared_prefix

ROUTERBENCH = (
    ",sample_id,prompt,eval_name,m1,m2,m1|model_response,m2|model_response,m1|total_cost,m2|total_cost,oracle_model_to_route_to\n"
    "0,a,\"['What is 1+1?']\",math,1.0,0.0,2,3,0.001,0.01,m1\n"
    "1,b,plain prompt,math,0,1,x,y,0.002,0.02,m2\n"
    "2,c,missing one,math,,1,x,y,0.002,0.02,m2\n"
    "3,d,bad value,math,maybe,1,x,y,0.002,0.02,m2\n"
)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_routerbench_csv(tmp_path):
    data = load_routing_data(_write(tmp_path, "rb.csv", ROUTERBENCH))
    assert data.models == ["m1", "m2"]
    assert data.queries == ["What is 1+1?", "plain prompt"]
    assert data.quality.tolist() == [[1, 0], [0, 1]]
    assert data.cost.tolist() == [[0.001, 0.01], [0.002, 0.02]]
    assert data.skipped == {"missing outcome": 1, "unparseable outcome": 1}
    assert data.categories == ["math", "math"]


def test_routellm_csv(tmp_path):
    text = "prompt,weak,strong,weak_response,strong_response\nq1,True,True,a,b\nq2,False,True,a,b\nq3,,True,a,b\n"
    data = load_routing_data(_write(tmp_path, "rl.csv", text))
    assert data.models == ["weak", "strong"] and data.quality.tolist() == [[1, 1], [0, 1]]
    assert data.cost is None and data.mean_costs().tolist() == [1.0, 1.0]
    assert data.skipped == {"missing outcome": 1}


def test_scores_json_and_jsonl_with_cost_table(tmp_path):
    recs = [{"question": "q1", "scores": {"a": 0.5, "b": 1}}, {"question": "", "scores": {"a": 1, "b": 1}},
            {"question": "q3", "scores": {"a": 0.0, "b": None}}]
    js = load_routing_data(_write(tmp_path, "s.json", json.dumps(recs)))
    jl = load_routing_data(_write(tmp_path, "s.jsonl", "\n".join(json.dumps(r) for r in recs)))
    for data in (js, jl):
        assert data.queries == ["q1"] and data.quality.tolist() == [[0.5, 1.0]]
        assert data.skipped == {"empty query": 1, "missing outcome": 1}
    table = _write(tmp_path, "costs.yaml", "a: 0.1\nb: 2\n")
    data = load_routing_data(tmp_path / "s.jsonl", costs=table)
    assert data.mean_costs().tolist() == [0.1, 2.0]
    assert load_cost_table(_write(tmp_path, "c.csv", "model,cost\na,1\nb,3\n")) == {"a": 1.0, "b": 3.0}
    with pytest.raises(DatasetError, match="no cost for models: b"):
        load_routing_data(tmp_path / "s.jsonl", costs=_write(tmp_path, "c2.json", '{"a": 1}'))


def test_native_jsonl(tmp_path):
    lines = [
        {"query": "q1", "outcomes": {"x": 1, "y": 0}, "costs": {"x": 1, "y": 5}, "category": "math"},
        {"query": "q2", "outcomes": {"x": 0, "y": 1}, "costs": {"x": 1, "y": 5}, "category": "code"},
        {"query": "q3", "outcomes": {"x": 0, "y": 1}},
    ]
    data = load_routing_data(_write(tmp_path, "n.jsonl", "\n".join(json.dumps(r) for r in lines)))
    assert data.models == ["x", "y"] and data.cost.tolist() == [[1, 5], [1, 5]]
    assert data.categories == ["math", "code"] and data.skipped == {"missing cost": 1}


def test_native_lines_of_one_probe_id_are_folded(tmp_path):
    from coe.routers.datasets import fold_by_id

    lines = [
        {"id": "p0", "query": "q0", "outcomes": {"x": 1}, "costs": {"x": 1}, "category": "math"},
        {"id": "p1", "query": "q1", "outcomes": {"x": 0, "y": 1}, "costs": {"x": 1, "y": 5}},
        {"id": "p0", "query": "q0", "outcomes": {"y": 0}, "costs": {"y": 5}},   # y profiled into the file later
    ]
    data = load_routing_data(_write(tmp_path, "n.jsonl", "\n".join(json.dumps(r) for r in lines)))
    assert list(data.queries) == ["q0", "q1"] and data.quality.tolist() == [[1, 0], [0, 1]]
    assert data.cost.tolist() == [[1, 5], [1, 5]] and data.categories == ["math", ""] and not data.skipped
    assert lines[0]["outcomes"] == {"x": 1}                                     # the input is not changed
    assert fold_by_id([{"query": "a", "outcomes": {}}] * 2) == [{"query": "a", "outcomes": {}}] * 2   # no id: kept
    with pytest.raises(DatasetError, match="line 3: expected an object"):      # line numbers still right
        load_routing_data(_write(tmp_path, "b.jsonl", "\n".join(json.dumps(r) for r in [*lines[:2], {"id": "p2", "query": "q", "outcomes": 3}])))


def test_unparseable_files_name_the_line(tmp_path):
    bad = _write(tmp_path, "bad.jsonl", '{"query": "q", "outcomes": {"a": 1}}\n{"query": oops}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_routing_data(bad)
    with pytest.raises(DatasetError, match=r"line 1: no 'prompt' column"):
        load_routing_data(_write(tmp_path, "np.csv", "question,a\nq,1\n"))
    with pytest.raises(DatasetError, match="line 1: expected an object"):
        load_routing_data(_write(tmp_path, "x.jsonl", '{"query": "q", "outcomes": 3}\n'))
    with pytest.raises(DatasetError, match="no usable rows"):
        load_routing_data(_write(tmp_path, "e.csv", "prompt,a\nq,\n"))
    with pytest.raises(DatasetError, match="unknown dataset format 'xml'"):
        load_routing_data(bad, fmt="xml")


def test_model_mismatch_is_refused_with_the_difference(tmp_path):
    a = load_routing_data(_write(tmp_path, "a.csv", "prompt,m1,m2\nq,1,0\n"))
    b = load_routing_data(_write(tmp_path, "b.csv", "prompt,m2,m3\nq,1,0\n"))
    with pytest.raises(DatasetError, match="only in train: m1; only in test: m3"):
        b.reordered(a.models)
    c = load_routing_data(_write(tmp_path, "c.csv", "prompt,m2,m1\nq,1,0\n")).reordered(a.models)
    assert c.models == ["m1", "m2"] and c.quality.tolist() == [[0, 1]]


def test_shared_routerbench_files(shared_data):
    data = load_routing_data(shared_data / "routing" / "winograde_test.csv")
    assert len(data) == 380 and len(data.models) == 11 and data.cost is not None
    prefix = shared_prefix(data.queries)
    assert len(prefix) > 500 and prefix.endswith("\n\n")
    texts = routing_texts(data.queries, prefix)
    assert all(len(t) < 600 for t in texts) and "_" in texts[0]
    assert shared_prefix(["a", "b"]) == ""
    assert np.isclose(data.quality.mean(axis=0).max(), 0.855, atol=1e-3)


def test_mtbench_judgements_with_questions_beside(tmp_path):
    q = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
         {"question_id": 82, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]}]
    _write(tmp_path, "mt_bench_questions.jsonl", "\n".join(json.dumps(r) for r in q))
    judged = [{"question_id": qid, "model": m, "turn": t, "score": s, "judgment": "..."}
              for qid, m, t, s in [(81, "a", 1, 9), (81, "b", 1, 4), (81, "a", 2, 8), (81, "b", 2, 7),
                                   (82, "a", 1, 10), (82, "b", 1, 2), (82, "a", 2, 10)]]   # (82, b, 2) missing
    data = load_routing_data(_write(tmp_path, "judgements.jsonl", "\n".join(json.dumps(r) for r in judged)))
    assert data.models == ["a", "b"] and len(data) == 3 and data.skipped["missing outcome"] == 1
    assert data.queries[1] == "Write a poem.\n\nNow shorter."
    assert data.quality.tolist() == [[9, 4], [8, 7], [10, 2]]
    assert data.categories == ["writing", "writing", "math"]
    (tmp_path / "mt_bench_questions.jsonl").unlink()
    with pytest.raises(DatasetError, match="questions file beside them"):
        load_routing_data(tmp_path / "judgements.jsonl")


def test_observed_mask_follows_subset_and_reorder(tmp_path):
    from coe.routers.datasets import RoutingData

    obs = np.array([[True, False], [True, True], [False, True]])
    data = RoutingData(["a", "b", "c"], ["m1", "m2"], np.zeros((3, 2)), None, observed=obs)
    assert data.subset([2, 0]).observed.tolist() == [[False, True], [True, False]]
    assert data.reordered(["m2", "m1"]).observed.tolist() == [[False, True], [True, True], [True, False]]
    assert data.with_cost_table({"m1": 1, "m2": 2}).observed is obs


def test_shared_mtbench_and_gsm8k(shared_data):
    mt = load_routing_data(shared_data / "routing" / "mt_bench_judgements.jsonl")
    assert len(mt) == 160 and len(mt.models) == 2 and 1 <= mt.quality.min() and mt.quality.max() <= 10
    gsm = load_routing_data(shared_data / "routing" / "routellm_gsm8k_responses.csv")
    assert len(gsm) == 1319 and set(np.unique(gsm.quality)) <= {0.0, 1.0}


def test_the_shipped_expert_profile_is_native_routing_data():
    """`coe eval --train configs/profiles/default_likelihood.jsonl` reads the Composition profile as
    it is: the four served experts' likelihoods on 120 probes, labelled code or math. Its costs are
    one tokenizer's answer length for every expert, so experts tie on cost within each probe."""
    from coe.paths import default_config_path

    data = load_routing_data(default_config_path().parent / "profiles" / "default_likelihood.jsonl")
    assert len(data) == 120 and not data.skipped
    assert set(data.models) == {"smollm2", "smollm2-math", "smollm2-code", "gemma3"}
    assert set(data.categories) == {"code", "math"}
    assert ((data.quality > 0) & (data.quality < 1)).all()
    assert (data.cost == data.cost[:, :1]).all()
