"""bench/mixture_window.py on a tiny random mixture: the window batches, direct does not, and
the answers do not depend on the mode."""

from __future__ import annotations

from bench.mixture_window import main


def test_window_batches_and_keeps_the_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("COE_BENCH_RESULTS", str(tmp_path))
    data = main(["--preset", "tiny", "--clients", "4", "--per-client", "1", "--max-tokens", "3", "--batch", "4",
                 "--windows", "20", "--rounds", "1", "--name", "mw"])
    assert data["same_answers_in_every_mode"]
    assert data["mean_batch"]["direct"]["median"] == 1.0
    assert data["mean_batch"]["window_20"]["median"] > 1.0
    assert data["run"]["load_before"] and (tmp_path / "mw.md").read_text().startswith("# Batching window")
