"""bench/engine_memory.py: the growth slope and the table (the engine run itself is the benchmark)."""

from bench.engine_memory import markdown, slope


def test_slope_is_mib_per_thousand_requests_over_the_tail():
    samples = [{"requests": r, "VLLM::Worker": 100 + 0.5 * r} for r in range(0, 401, 50)]
    samples[0]["VLLM::Worker"] = 0.0   # the warm-up jump is left out with `after`
    assert slope(samples, "VLLM::Worker", 200) == 500.0
    assert slope(samples[:1], "VLLM::Worker", 0) is None


def test_markdown_has_one_row_per_variant():
    samples = [{"requests": 0, "s": 0.0, "VLLM::Worker": 10.0}, {"requests": 100, "s": 50.0, "VLLM::Worker": 30.0}]
    res = {"requests": 100, "clients": 2, "variants": [
        {"name": "default", "samples": samples, "slope_second_half": 200.0, "requests_per_s": 2.0},
        {"name": "0", "samples": samples, "slope_second_half": 20.0, "requests_per_s": 1.9}]}
    md = markdown(res)
    assert "| default | 10.0 | 30.0 | 20.0 | 200.0 | 2.0 |" in md and "| 0 |" in md


def test_the_model_process_is_the_worker_or_else_the_engine_core():
    from bench.engine_memory import model_process

    assert model_process([{"VLLM::EngineCore": 800.0, "VLLM::Worker": 2300.0}]) == "VLLM::Worker"
    assert model_process([{"VLLM::EngineCore": 2900.0}]) == "VLLM::EngineCore"
    samples = [{"requests": 0, "s": 0.0, "VLLM::EngineCore": 10.0}, {"requests": 100, "s": 50.0, "VLLM::EngineCore": 25.0}]
    md = markdown({"requests": 100, "clients": 2, "variants": [
        {"name": "default", "samples": samples, "slope_second_half": 150.0, "requests_per_s": 2.0}]})
    assert "| default | 10.0 | 25.0 | 15.0 | 150.0 | 2.0 |" in md
