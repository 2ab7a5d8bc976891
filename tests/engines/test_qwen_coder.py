"""The real Qwen2.5-Coder-0.5B-Instruct (``qwen2.5-coder-0.5b-instruct``) through both engines: the same
greedy tokens, a LoRA on it in both, its shipped chat template with and without a system prompt.

Slow: it needs the prepared built-in model (skipped otherwise, with the command to run).
"""

from __future__ import annotations

import pytest

from coe.config import EngineConfig
from coe.types import ChatMessage, Dispatch, GenerationRequest, SamplingParams
from tests.engines.engine_helpers import chat, generate, generate_batch, make_lora

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a python function that reverses a string.",
    "What is 7 times 8?",
    "Name the keyword that defines a function in Python.",
]


@pytest.fixture(scope="module")
def qwen_hf(qwen_dir, loop):
    from coe.serving.engines.hf import HFEngine

    engine = HFEngine(qwen_dir, EngineConfig(kind="hf", device="cpu", dtype="float32", max_model_len=1024,
                                             max_lora_rank=8))
    loop.run(engine.start())
    yield engine
    loop.run(engine.stop())


@pytest.fixture(scope="module")
def qwen_vllm(qwen_dir, loop):
    pytest.importorskip("vllm")
    from coe.serving.engines.vllm_engine import VLLMEngine

    cfg = EngineConfig(kind="vllm", dtype="float32", max_model_len=1024, max_num_seqs=4, max_loras=1, max_lora_rank=8)
    engine = VLLMEngine(qwen_dir, cfg)
    loop.run(engine.start())
    yield engine
    loop.run(engine.stop())


def test_both_engines_give_the_same_greedy_tokens(qwen_hf, qwen_vllm, loop):
    reqs = [chat(p, max_tokens=16) for p in PROMPTS]
    hf = loop.run(generate_batch(qwen_hf, reqs))
    vl = loop.run(generate_batch(qwen_vllm, reqs))
    for p, a, b in zip(PROMPTS, hf, vl):
        assert a.prompt_tokens == b.prompt_tokens, p
        assert a.token_ids == b.token_ids, (p, a.text, b.text)
    assert "def " in hf[0].text   # a real coder: the reversal starts as a function


def test_the_shipped_template_with_and_without_a_system_prompt(qwen_hf):
    """Qwen's own template: its default system prompt when none is given, the caller's otherwise."""
    tok = qwen_hf._tokenizer
    bare = tok.decode(qwen_hf.encode_prompt(chat("hi")))
    assert bare.startswith("<|im_start|>system\n") and "Qwen" in bare
    assert bare.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    sys_req = GenerationRequest(request_id="s", sampling=SamplingParams(max_tokens=4), messages=[
        ChatMessage(role="system", content="Answer in French."), ChatMessage(role="user", content="hi")])
    own = tok.decode(qwen_hf.encode_prompt(Dispatch(sys_req)))
    assert own.startswith("<|im_start|>system\nAnswer in French.<|im_end|>") and "Qwen" not in own


def test_a_lora_on_qwen_agrees_across_engines(qwen_hf, qwen_vllm, qwen_dir, tmp_path, loop):
    lora = make_lora(qwen_dir, tmp_path / "qwen-lora", rank=8, seed=3)
    loop.run(qwen_hf.add_adapter("rand", lora))
    loop.run(qwen_vllm.add_adapter("rand", lora))
    try:
        base = loop.run(generate(qwen_vllm, chat(PROMPTS[2], max_tokens=8)))
        a = loop.run(generate(qwen_hf, chat(PROMPTS[2], max_tokens=8, adapter="rand")))
        b = loop.run(generate(qwen_vllm, chat(PROMPTS[2], max_tokens=8, adapter="rand")))
    finally:
        loop.run(qwen_hf.remove_adapter("rand"))
        loop.run(qwen_vllm.remove_adapter("rand"))
    assert a.token_ids[:4] == b.token_ids[:4], (a.text, b.text)
    assert b.token_ids != base.token_ids   # random B weights change the answer
