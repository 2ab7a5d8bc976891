"""bench/engine_executor.py: what counts as the engine's CPU (the engine run itself is the benchmark)."""

from bench.engine_executor import SIDES, engine_cpu_s


def test_engine_cpu_counts_every_vllm_process_and_nothing_else():
    mp = {"VLLM::Worker": 3.85, "bench:VLLM::EngineCore": 3.78, "bench:python": 0.05, "ray::ServeController": 0.1}
    uni = {"bench:VLLM::EngineCore": 3.74, "bench:python": 0.06}
    assert abs(engine_cpu_s(mp) - 7.63) < 1e-9
    assert engine_cpu_s(uni) == 3.74
    assert engine_cpu_s({}) == 0


def test_the_sides_are_the_two_cpu_executors():
    from typing import get_args

    from coe.config import EngineConfig

    allowed = get_args(EngineConfig.model_fields["cpu_executor"].annotation)
    assert set(SIDES) <= set(allowed) and "auto" in allowed
