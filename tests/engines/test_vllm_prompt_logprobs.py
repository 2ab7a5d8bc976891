"""The real vLLM engine (SmolLM2, the session fixture) under requests that used to take it down or
answer 503: prompt log-probabilities for a batch that mixes LoRAs (vllm#16668: the EngineCore died
for every expert on the engine), and request content that vLLM itself rejects (a 400, not a 503
followed by a fallback).

Slow: the prepared SmolLM2 (skipped otherwise) and the session's vLLM engine (~30 s or more to start).
"""

from __future__ import annotations

import asyncio

import pytest

from coe.errors import InvalidRequestError
from coe.types import Dispatch, GenerationRequest, SamplingParams
from tests.engines.engine_helpers import chat, generate, generate_batch, make_lora

pytestmark = pytest.mark.slow

QUESTION = "What is 12 times 12? Explain it step by step."
PARITY_ABS = 2e-2  # float32 in both engines; as test_real_engines' prompt logprob parity


@pytest.fixture(scope="module")
def two_loras(smollm2_dir, smollm2_lora, tmp_path_factory):
    """Two rank-8 LoRAs that change the prompt's logprobs in different ways (attention / MLP)."""
    mlp = make_lora(smollm2_dir, tmp_path_factory.mktemp("smollm2-lora") / "mlp", rank=8, seed=6,
                    targets=("gate_proj", "up_proj", "down_proj"))
    return {"attn": smollm2_lora, "mlp": mlp}


@pytest.fixture(scope="module")
def both_with_loras(smollm2_hf, smollm2_vllm, two_loras, loop):
    """Both engines with the two LoRAs added (removed again after the module)."""
    for engine in (smollm2_hf, smollm2_vllm):
        for name, path in two_loras.items():
            loop.run(engine.add_adapter(name, path))
    yield smollm2_hf, smollm2_vllm
    for engine in (smollm2_hf, smollm2_vllm):
        for name in two_loras:
            loop.run(engine.remove_adapter(name))


def scoring(ids: list[int], adapter: str | None, max_tokens: int = 1) -> Dispatch:
    """A likelihood-profile request: the prompt as token ids, its logprobs, one greedy token."""
    return Dispatch(GenerationRequest("score", prompt_token_ids=ids, sampling=SamplingParams(
        max_tokens=max_tokens, temperature=0.0, prompt_logprobs=0)), adapter=adapter)


def prompt_lps(out) -> list[float]:
    ids = out.prompt_token_ids
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    return [out.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))]


def test_mixed_lora_prompt_logprobs_keep_the_engine_up_and_match_transformers(both_with_loras, loop):
    """Base + two LoRAs scored at once, beside a chat in mid-decode: no crash, every adapter's
    prompt logprobs equal the transformers engine's (peft) for that adapter, the chat's tokens are
    those it gets alone, and the engine serves afterwards."""
    hf, vllm = both_with_loras
    ids = vllm.encode_prompt(chat(QUESTION))
    adapters = [None, "attn", "mlp", "attn", "mlp"]
    reqs = [scoring(ids, a, max_tokens=1 if i < 3 else 4) for i, a in enumerate(adapters)]
    talk = chat("Write a Python function that reverses a string.", max_tokens=24, adapter="mlp")

    async def at_once():
        chatting = asyncio.ensure_future(generate(vllm, talk))
        await asyncio.sleep(0.05)  # the chat is in the engine when the scoring requests come
        scored = await asyncio.gather(*(generate(vllm, r) for r in reqs), return_exceptions=True)
        return scored, await chatting

    scored, chatted = loop.run(at_once())
    assert not [o for o in scored if isinstance(o, BaseException)], scored
    expected = dict(zip(adapters[:3], loop.run(generate_batch(hf, reqs[:3]))))  # the prompts repeat after 3
    for adapter, out in zip(adapters, scored):
        ref = expected[adapter]
        assert out.prompt_token_ids == ref.prompt_token_ids == ids
        assert prompt_lps(out) == pytest.approx(prompt_lps(ref), abs=PARITY_ABS), adapter
    got = {a: prompt_lps(o) for a, o in zip(adapters[:3], scored)}
    # each adapter moves the logprobs far beyond the tolerance: a wrong LoRA mapping would show
    for a, b in [(None, "attn"), (None, "mlp"), ("attn", "mlp")]:
        assert max(abs(x - y) for x, y in zip(got[a], got[b])) > 10 * PARITY_ABS, (a, b)
    assert scored[3].completion_tokens == 4  # the longer ones decode on after their prefill
    assert chatted.token_ids == loop.run(generate(vllm, talk)).token_ids
    assert loop.run(vllm.healthy())
    assert vllm._gate.state == (0, False, 0)
    assert "Paris" in loop.run(generate(vllm, chat("What is the capital of France?", max_tokens=12))).text


def test_a_schema_vllm_rejects_is_a_400_naming_response_format(smollm2_vllm, loop):
    """uniqueItems passes our schema check (xgrammar compiles it, ignoring the keyword) but vLLM's
    xgrammar backend refuses it: the client's error (400), not the engine's (503 and a fallback)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "ints", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}
    with pytest.raises(InvalidRequestError) as err:
        loop.run(generate(smollm2_vllm, chat("Three numbers as JSON.", response_format=fmt)))
    assert err.value.status_code == 400 and err.value.param == "response_format"
    assert "schema" in err.value.message and "Traceback" not in err.value.message
    assert smollm2_vllm._gate.state == (0, False, 0)
    assert loop.run(smollm2_vllm.healthy())


class _Lent:
    """The session's running vLLM engine lent to an in-process service: ``stop`` leaves it running."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def stop(self) -> None:
        pass


def test_the_400_reaches_the_http_client_without_a_fallback(smollm2_vllm, smollm2_dir, loop, tmp_path):
    """Through the service (in process, the real engine): 400 in OpenAI's error shape naming
    response_format, not 503, and the expert's fallback is not tried."""
    from coe.config import parse_config
    from coe.serving.engines.vllm_engine import VLLMEngine
    from tests.serving.serving_helpers import Harness

    class Lent(VLLMEngine):
        @classmethod
        def from_spec(cls, spec):
            return _Lent(smollm2_vllm)

    engine = {"kind": "vllm", "max_model_len": 1024, "max_lora_rank": 8}
    config = parse_config({
        "router": {"name": "centroid", "default_expert": "smol"},
        "experts": [{"id": "smol", "kind": "model", "model": str(smollm2_dir), "engine": engine,
                     "fallback": "smol-too", "description": "general questions"},
                    {"id": "smol-too", "kind": "model", "model": str(smollm2_dir), "engine": engine,
                     "description": "the fallback"}],
        "serving": {"registry_path": str(tmp_path / "registry.sqlite"), "max_tokens_limit": 64},
    })
    h = Harness(loop, config, tmp_path, engine_cls_for=lambda spec: Lent, default="smol")
    try:
        fmt = {"type": "json_schema", "json_schema": {"name": "ints", "schema": {
            "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}
        r = h.chat("Three numbers as JSON.", model="smol", response_format=fmt)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "response_format" and "schema" in err["message"], err
        assert "Traceback" not in err["message"] and "smol-too" not in r.text
        ok = h.chat("What is the capital of France?", model="smol", max_tokens=12)
        assert ok.status_code == 200 and "Paris" in ok.json()["choices"][0]["message"]["content"], ok.text
    finally:
        h.close()


def test_a_base_chat_beside_both_loras_keeps_the_base_model(both_with_loras, loop):
    """Both LoRA slots full, a base-model chat in mid-decode and one chat per LoRA beside it: each
    answer's tokens are those it gets alone, and the base chat's are the transformers engine's.
    On vLLM's own CPU ops the base rows were given the last slot's adapter (vllm-project/vllm#48421;
    coe.serving.engines.vllm_lora_cpu)."""
    hf, vllm = both_with_loras
    text = "Write a Python function that reverses a string."
    base = chat(text, max_tokens=24)
    loras = {name: chat(text, max_tokens=24, adapter=name) for name in ("attn", "mlp")}
    alone = loop.run(generate(vllm, base)).token_ids
    alone_lora = {name: loop.run(generate(vllm, d)).token_ids for name, d in loras.items()}
    # each adapter changes this answer, so a base row given either adapter would show
    assert all(ids != alone for ids in alone_lora.values()), alone_lora

    async def beside():
        chatting = asyncio.ensure_future(generate(vllm, base))
        await asyncio.sleep(0.05)  # the base chat is in the engine when the LoRA chats come
        others = await asyncio.gather(*(generate(vllm, d) for d in loras.values()))
        return await chatting, others

    together, others = loop.run(beside())
    assert together.token_ids == alone
    assert alone == loop.run(generate(hf, base)).token_ids
    for name, out in zip(loras, others):
        assert out.token_ids == alone_lora[name], name
