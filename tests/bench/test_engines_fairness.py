"""bench/engines.py compares like with like: same prompts at batch 1 and 16, same threads."""

from __future__ import annotations

from bench.engines import PROMPTS, thread_env, workloads


def test_batch1_and_batch16_use_the_same_prompts():
    w = workloads(4)
    assert w["batch1"] == PROMPTS[:4]
    assert len(w["batch16"]) == 16 and set(w["batch16"]) == set(w["batch1"])
    assert all(w["batch16"].count(p) == 4 for p in w["batch1"])  # every prompt equally often


def test_both_engines_get_the_same_threads():
    assert thread_env(1, "cpu") == {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    assert thread_env(2, "cpu")["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in thread_env(2, "cuda")
