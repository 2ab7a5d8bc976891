"""Opt-in memory diagnostics of the replicas (serving/deployments/memtrace.py), in process.

The soak benchmark (``bench/soak.py --tracemalloc``) drives them inside the real replicas by
handle; here the module itself, the deployments' hooks and the start-up check."""

from __future__ import annotations

import asyncio
import pickle
import tracemalloc

import pytest

from coe.errors import ConfigError
from coe.serving.deployments.memtrace import ENV, MemTrace, frames_from_env, memory_report

HELD: list = []


def _grow(n: int) -> None:
    HELD.extend(bytearray(1024) for _ in range(n))   # the allocation site the diff must name


@pytest.fixture
def untraced():
    assert not tracemalloc.is_tracing(), "run without -X tracemalloc / PYTHONTRACEMALLOC"
    yield
    tracemalloc.stop()
    HELD.clear()


@pytest.mark.parametrize(("raw", "frames"), [(None, 0), ("", 0), (" 0 ", 0), ("16", 16), ("64", 64)])
def test_the_variable_reads_as_a_number_of_frames(raw, frames):
    assert frames_from_env({} if raw is None else {ENV: raw}) == frames


@pytest.mark.parametrize("raw", ["yes", "-1", "65", "1.5"])
def test_a_bad_value_is_refused_naming_the_variable(raw):
    with pytest.raises(ConfigError, match=rf"{ENV}=.*integer from 1 to 64"):
        frames_from_env({ENV: raw})


def test_off_by_default_traces_nothing(untraced):
    assert MemTrace.from_env({}) is None and not tracemalloc.is_tracing()
    report = memory_report(None)
    assert report["tracing"] is False and report["rss_mib"] > 10 and "top" not in report
    pickle.dumps(report)


def test_the_diff_names_what_grew_and_what_was_freed(untraced):
    trace = MemTrace.from_env({ENV: "8"})
    assert tracemalloc.is_tracing() and tracemalloc.get_traceback_limit() == 8
    _grow(2000)
    first = memory_report(trace, limit=5)
    assert pickle.loads(pickle.dumps(first)) == first   # plain data: it crosses a Serve handle
    top = first["top"][0]
    assert top["where"].endswith(f"{__file__}:{_grow.__code__.co_firstlineno + 1}")
    assert top["count_diff"] >= 2000 and top["size_diff_kib"] >= 2000
    assert any("test_memtrace.py" in f for f in top["frames"][1:])   # callers, innermost first
    assert first["by_file"][0]["file"] == __file__ and first["traced_diff_kib"] >= 2000
    assert len(first["top"]) <= 5 and first["rss_mib"] > 0
    HELD.clear()   # the next diff is against the previous call, not against the start
    second = trace.diff(5)
    freed = [s for s in second["top"] if s["where"] == top["where"]]
    assert freed and freed[0]["size_diff_kib"] <= -2000 and second["traced_diff_kib"] <= -2000


def test_the_replicas_answer_memory_diff(untraced):
    """Both deployments (expert server and ingress) expose the report; built without their
    constructors, which need an engine and a Serve replica."""
    from coe.serving.deployments.ingress import CoEIngress
    from coe.serving.deployments.ray_deployments import ExpertServerDeployment

    for deployment in (ExpertServerDeployment, CoEIngress):
        cls = deployment.func_or_class
        replica = cls.__new__(cls)
        replica.memtrace = None
        assert asyncio.run(replica.memory_diff(3))["tracing"] is False
        replica.memtrace = MemTrace(4)
        _grow(500)
        report = asyncio.run(replica.memory_diff(3))
        assert report["tracing"] is True and report["top"][0]["count_diff"] >= 500
        tracemalloc.stop()


def test_coe_serve_refuses_a_bad_value_before_starting_ray(monkeypatch, capsys):
    from coe.tools.cli import main

    monkeypatch.setenv(ENV, "lots")
    assert main(["serve", "--port", "1"]) == 2
    assert f"{ENV}='lots'" in capsys.readouterr().err


def test_serve_access_log_records_are_not_kept_after_the_engine_configures_logging(tmp_path):
    """What the soak found growing (~1.5 KiB per request in the expert replica): vLLM's
    ``dictConfig`` closes every existing log handler, Serve's MemoryHandler loses its file and
    keeps every later access-log record. The deployment gives it its file back."""
    import logging
    from logging.handlers import MemoryHandler

    from coe.serving.deployments.ray_deployments import serve_log_targets_kept

    def replica_logger(name):
        logger = logging.getLogger(name)
        logger.propagate = False
        handler = MemoryHandler(capacity=1, target=logging.FileHandler(tmp_path / f"{name}.log"))
        logger.addHandler(handler)
        return logger, handler

    def requests(logger, n=200):
        for i in range(n):
            logger.warning("CALL stream OK %d", i)

    bare, leaking = replica_logger("coe-test-bare")
    leaking.close()   # what dictConfig does to it
    requests(bare)
    assert len(leaking.buffer) == 200   # the leak, reproduced

    kept, handler = replica_logger("coe-test-kept")
    with serve_log_targets_kept("coe-test-kept"):
        handler.close()
    requests(kept)
    assert handler.buffer == [] and (tmp_path / "coe-test-kept.log").read_text().count("CALL stream OK") == 200
    for logger, h in ((bare, leaking), (kept, handler)):
        logger.removeHandler(h)
        h.target and h.target.close()
