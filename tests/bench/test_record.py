"""bench.record: the results header reads the load at the start and at the end, and says how the
run was made; one writer, redirectable to $OUT."""

from __future__ import annotations

import json
import os

from bench import record
from bench.record import RunRecord, command_line, conclude, write_results


def test_load_is_read_at_start_and_at_finish(monkeypatch):
    loads = iter([(7.0, 6.0, 5.0), (0.5, 0.4, 0.3)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    rec = RunRecord.start(note="n", argv=["bench/x.py", "--flag", "a b"])
    data = rec.finish({"figure": 1})
    run = data["run"]
    assert run["load_before"] == [7.0, 6.0, 5.0]  # read by start(), not at the end
    assert run["load_after"] == [0.5, 0.4, 0.3]
    assert data["figure"] == 1
    assert run["command"].endswith("bench/x.py --flag 'a b'")
    assert run["started"] <= run["finished"] and run["wall_s"] >= 0
    assert {"cpu", "cpus", "platform", "python"} <= run["machine"].keys()
    md = rec.markdown_header("T")
    assert md.startswith("# T\n") and "before 7.00/6.00/5.00, after 0.50/0.40/0.30" in md
    assert "`" + run["command"] + "`" in md


def test_command_line_quotes_for_a_shell():
    assert command_line(["s.py", "x y", "--n=1"]).endswith("s.py 'x y' --n=1")


def test_write_results_goes_to_coe_bench_results(tmp_path, monkeypatch):
    monkeypatch.setenv("COE_BENCH_RESULTS", str(tmp_path))
    js, md = write_results("sub/name", {"a": 1}, "# md")
    assert js == tmp_path / "sub" / "name.json" and json.loads(js.read_text()) == {"a": 1}
    assert md.read_text() == "# md\n"
    monkeypatch.delenv("COE_BENCH_RESULTS")
    assert record.RESULTS.name == "results"


def test_conclude_compares_writes_both_files_and_prints_the_body(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COE_BENCH_RESULTS", str(tmp_path))
    rec = RunRecord.start(argv=["bench/x.py"])
    data = conclude(rec, "x", "Title", {"n": 3}, compare=lambda res: {"twice": res["n"] * 2},
                    markdown=lambda res, cmp: f"n {res['n']}, twice {cmp['twice']}\n")
    assert data["comparison"] == {"twice": 6} and data["n"] == 3 and data["run"]["finished"]
    assert json.loads((tmp_path / "x.json").read_text()) == json.loads(json.dumps(data))
    md = (tmp_path / "x.md").read_text()
    assert md.startswith("# Title\n") and md.endswith("n 3, twice 6\n")
    assert capsys.readouterr().out == "n 3, twice 6\n\n"
