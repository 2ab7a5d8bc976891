"""bench/serve_overhead.py: a config valid for either engine, and an honest TTFT verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.serve_overhead import TTFT_TARGET_MS, build_config, verdict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_config_has_only_the_chosen_engines_fields(engine, tmp_path):
    loras = {"smollm2-math": ROOT / "adapters/experts/math", "smollm2-code": ROOT / "adapters/experts/code"}
    cfg = build_config(engine, loras, tmp_path, threads=1)
    host = cfg.experts[0].engine
    assert host.kind == engine
    assert host.cpu_threads == (1 if engine == "hf" else None)  # vLLM's threads come from the environment
    assert [e.id for e in cfg.experts] == ["smollm2", "smollm2-math", "smollm2-code"]


def test_ttft_verdict_needs_the_interval_not_just_the_median():
    assert verdict([2.0, 15.0], TTFT_TARGET_MS) == "met"
    assert verdict([25.0, 40.0], TTFT_TARGET_MS) == "missed"
    assert verdict([-300.0, 400.0], TTFT_TARGET_MS) == "not resolved"  # noise wider than the target


def test_hop_breakdown_splits_each_ttft_request_by_its_stamps(tmp_path, monkeypatch):
    """--hops: each TTFT request's hops come from the stamps inside its own window; warm-up
    requests and throughput-phase items are kept apart."""
    from bench.serve_overhead import HOPS, hop_breakdown, stream_items
    from coe.serving.deployments import hops

    stamps = [(0.0, 1, "client.send", "warm0"), (0.5, 1, "client.first", "warm0"),
              (1.0, 3, "backend.first", "r1"), (1.1, 3, "backend.item", "r1"), (1.2, 3, "backend.item", "r1"),
              (1.5, 3, "backend.first", "r2")]
    for k in range(2):
        t0 = 10.0 * (k + 1)
        stamps.append((t0, 1, "client.send", f"ttft{k}"))
        for j, (_, a, _b) in enumerate(HOPS[1:], start=1):
            stamps.append((t0 + j * 0.001 * (k + 1), 2, a, "x"))
        stamps.append((t0 + len(HOPS) * 0.001 * (k + 1), 1, "client.first", f"ttft{k}"))
    out = hop_breakdown(sorted(stamps), [2.0, 4.0])
    for name, _, _ in HOPS:
        assert out[name]["n"] == 2 and abs(out[name]["median"] - 1.5) < 1e-6   # 1 ms and 2 ms
    assert abs(out["total"]["median"] - 1.5 * len(HOPS)) < 1e-6
    assert out["routing_ms (inside the routing hop)"]["median"] == 3.0
    assert stream_items(sorted(stamps)) == 2.0   # r1: 3 items, r2: 1; none of the TTFT phase

    monkeypatch.delenv(hops.ENV, raising=False)
    hops.stamp("off")   # unset: nothing written anywhere
    monkeypatch.setenv(hops.ENV, str(tmp_path / "h.txt"))
    hops.stamp("route.enter")
    hops.stamp("server.first", "req-1")
    got = hops.read(str(tmp_path / "h.txt"))
    assert [(s, r) for _, _, s, r in got] == [("route.enter", "-"), ("server.first", "req-1")]
    assert got[0][0] <= got[1][0]
