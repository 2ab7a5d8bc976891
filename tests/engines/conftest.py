"""Engine fixtures: one event loop on a background thread, engines started once per session.

vLLM's ``AsyncLLM`` binds to the loop that first uses it, so every engine call in these tests
goes through the same long-lived loop (``loop.run(coro)``, see engine_helpers). Starting vLLM costs ~30 s or more
here: the vLLM engine is a session fixture shared by every test that needs it.
"""

from __future__ import annotations

import pytest

from coe.config import EngineConfig
from tests.engines.engine_helpers import LoopThread, make_lora


@pytest.fixture(scope="session")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def tiny_hf(tiny_llama_dir, loop):
    """HFEngine on the tiny random llama (float32, CPU, context 256)."""
    from coe.serving.engines.hf import HFEngine

    engine = HFEngine(tiny_llama_dir, EngineConfig(kind="hf", device="cpu", max_model_len=256, max_num_seqs=8))
    loop.run(engine.start())
    yield engine
    loop.run(engine.stop())


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir, loop):
    """HFEngine on SmolLM2-135M-Instruct in float32 (the dtype the vLLM fixture uses too)."""
    from coe.serving.engines.hf import HFEngine

    engine = HFEngine(smollm2_dir, EngineConfig(kind="hf", device="cpu", dtype="float32", max_lora_rank=8))
    loop.run(engine.start())
    yield engine
    loop.run(engine.stop())


@pytest.fixture(scope="session")
def smollm2_vllm(smollm2_dir, loop):
    """VLLMEngine on SmolLM2 in float32, started once per session."""
    pytest.importorskip("vllm")
    from coe.serving.engines.vllm_engine import VLLMEngine

    cfg = EngineConfig(kind="vllm", dtype="float32", max_model_len=1024, max_num_seqs=8, max_loras=2, max_lora_rank=8)
    engine = VLLMEngine(smollm2_dir, cfg)
    loop.run(engine.start())
    yield engine
    loop.run(engine.stop())


@pytest.fixture(scope="session")
def smollm2_lora(smollm2_dir, tmp_path_factory):
    """A rank-8 peft LoRA on SmolLM2's q_proj/v_proj with random non-zero B weights."""
    return make_lora(smollm2_dir, tmp_path_factory.mktemp("smollm2-lora") / "a", rank=8, seed=5)
