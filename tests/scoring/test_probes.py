"""Probe files: validation names the file and line; MBPP/GSM8K converters."""

import json

import pytest

from coe.errors import DatasetError
from coe.scoring.probes import Probe, load_probes, mbpp_probes, write_probes


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in rows) + "\n")
    return path


GOOD = {"id": "t1", "query": "What is 2+2?", "scorer": "exact_number", "answer": "4", "category": "math"}


def test_round_trip(tmp_path):
    probes = [Probe(**GOOD), Probe(id="c1", query="q", scorer="code_tests", tests=["assert True"])]
    write_probes(probes, tmp_path / "p.jsonl")
    assert load_probes(tmp_path / "p.jsonl") == probes


def test_unknown_field_names_the_line(tmp_path):
    f = _write(tmp_path / "p.jsonl", [GOOD, {**GOOD, "id": "t2", "difficulty": 3}])
    with pytest.raises(DatasetError, match=r"line 2: unknown field 'difficulty'.*allowed fields: id, query"):
        load_probes(f)


def test_task_without_tests_names_the_line(tmp_path):
    f = _write(tmp_path / "p.jsonl", [GOOD, "", {"id": "c", "query": "q", "scorer": "code_tests", "tests": []}])
    with pytest.raises(DatasetError, match=r"line 3: task 'c' has no tests"):
        load_probes(f)


@pytest.mark.parametrize("row, msg", [
    ({**GOOD, "scorer": "bleu"}, r"line 1: scorer: Input should be"),
    ({**GOOD, "answer": None}, r"line 1: task 't1' has no 'answer'"),
    ({"id": "m", "query": "q", "scorer": "choice", "choices": ["a", "b"], "answer": "c"}, "one of its 'choices'"),
    ({"id": "r", "query": "q", "scorer": "reference_nll"}, "has no 'reference'"),
])
def test_invalid_rows(tmp_path, row, msg):
    with pytest.raises(DatasetError, match=msg):
        load_probes(_write(tmp_path / "p.jsonl", [row]))


def test_bad_json_duplicate_and_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="line 2: not valid JSON"):
        load_probes(_write(tmp_path / "a.jsonl", [GOOD, "{oops"]))
    with pytest.raises(DatasetError, match="line 2: duplicate id 't1' \\(first on line 1\\)"):
        load_probes(_write(tmp_path / "b.jsonl", [GOOD, GOOD]))
    with pytest.raises(DatasetError, match="does not exist"):
        load_probes(tmp_path / "missing.jsonl")


def test_mbpp_rows(tmp_path):
    row = {"task_id": 11, "text": "Write f.", "code": "def f():\r\n\treturn 1", "test_list": ["assert f() == 1"],
           "test_setup_code": "", "split": "test"}
    f = _write(tmp_path / "m.jsonl", [row, {**row, "task_id": 12, "split": "train"}])
    (p,) = mbpp_probes(f, "test")
    assert p.id == "mbpp/11" and p.scorer == "code_tests" and "assert f() == 1" in p.query
    assert p.reference == "```python\ndef f():\n\treturn 1\n```"
    with pytest.raises(DatasetError, match=r"line 1: task 'mbpp/11' has no tests"):
        mbpp_probes(_write(tmp_path / "n.jsonl", [{**row, "test_list": []}]))
    with pytest.raises(DatasetError, match=r"line 1: unknown field 'extra'"):
        mbpp_probes(_write(tmp_path / "o.jsonl", [{**row, "extra": 1}]))


def test_shared_mbpp_file_loads(shared_data):
    probes = mbpp_probes(shared_data / "probes" / "mbpp.jsonl")
    assert len(probes) == 964 and all(p.tests for p in probes)
