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
