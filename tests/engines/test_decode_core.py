"""The one decode core (rows, the stream bridge, the decode batch, the sampler) and row isolation:
a request that fails never fails the other requests of its batch."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from coe.errors import AdapterError, EngineError, InvalidRequestError
from coe.types import GenerationOutput, GenerationRequest, SamplingParams, StreamDelta
from tests.helpers import generate, generate_batch

GOOD = ["hello world", "def x return 1 + 2", "the city of paris is in france", "math",
        "what is the capital of france ? the capital is", "1 2 3 + 4", "world hello", "paris"]


def raw(prompt: str, **sampling) -> GenerationRequest:
    return GenerationRequest(request_id="r", prompt=prompt,
                             sampling=SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **sampling}))


def test_seven_good_requests_and_one_bad_seed_in_one_batch(tiny_hf, loop):
    reqs = [raw(p) for p in GOOD[:7]]
    outs = loop.run(generate_batch(tiny_hf, reqs[:3] + [bad_seed()] + reqs[3:]))
    assert isinstance(outs[3], InvalidRequestError) and outs[3].param == "seed"
    good = [o for i, o in enumerate(outs) if i != 3]
    assert all(isinstance(o, GenerationOutput) and o.completion_tokens >= 1 for o in good)
    assert [o.token_ids for o in good] == [loop.run(generate(tiny_hf, raw(p))).token_ids for p in GOOD[:7]]


def bad_seed() -> GenerationRequest:
    """A request whose seed torch cannot use (built without validation: the API validates seeds at
    the boundary, the engine must still fail only this request when one gets through)."""
    params = SamplingParams.model_construct(max_tokens=8, temperature=0.7, top_p=1.0, stop=[], seed=2**64)
    return GenerationRequest(request_id="bad", prompt="hello", sampling=params)


def _rows(tokenizer, prompts, sinks, **sampling):
    from coe.serving.engines.rows import Row

    params = SamplingParams(**{"max_tokens": 6, "temperature": 0.0, **sampling})
    return [Row.create(tokenizer, tokenizer(p)["input_ids"], params, device="cpu", sink=s.append)
            for p, s in zip(prompts, sinks)]


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def _decode_all(batch):
    with torch.inference_mode():
        while batch.rows:
            batch.step()
            batch.drop_finished()


def test_a_row_failing_mid_decode_ends_alone(tiny_model):
    """An error in one row's detokenisation (at a step every row shares) fails that row only."""
    from coe.serving.engines.decode_batch import DecodeBatch, causal_lm_forward

    model, tok = tiny_model
    sinks = [[] for _ in GOOD]
    rows = _rows(tok, GOOD, sinks)

    class Broken:
        def push(self, token):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "broken detokeniser")

    rows[5].text = Broken()
    batch = DecodeBatch(causal_lm_forward(model, "cpu"), eos=set(), pad_id=0, device="cpu")
    with torch.inference_mode():
        batch.admit(rows)
        batch.drop_finished()
    _decode_all(batch)
    assert isinstance(sinks[5][-1], EngineError) and "UnicodeDecodeError" in str(sinks[5][-1])
    for i, deltas in enumerate(sinks):
        if i != 5:
            assert all(isinstance(d, StreamDelta) for d in deltas) and deltas[-1].finish_reason == "length"
            assert deltas[-1].completion_tokens == 6


def test_a_row_whose_prefill_fails_is_admitted_alone(tiny_model):
    """A prompt the model cannot run (a token id outside the vocabulary) fails only its row."""
    from coe.serving.engines.decode_batch import DecodeBatch, causal_lm_forward

    model, tok = tiny_model
    sinks = [[] for _ in GOOD[:4]]
    rows = _rows(tok, GOOD[:4], sinks)
    rows[1].prompt_ids = [model.config.vocab_size + 7]
    batch = DecodeBatch(causal_lm_forward(model, "cpu"), eos=set(), pad_id=0, device="cpu")
    with torch.inference_mode():
        batch.admit(rows)
        batch.drop_finished()
    assert len(batch) == 3 and isinstance(sinks[1][-1], EngineError)
    _decode_all(batch)
    assert all(sinks[i][-1].finish_reason == "length" for i in (0, 2, 3))


def test_stream_bridge_carries_deltas_and_errors_across_threads():
    from coe.serving.engines.rows import StreamBridge

    async def collect(items):
        bridge = StreamBridge()
        thread = threading.Thread(target=lambda: [bridge.emit(i) for i in items])
        thread.start()
        got = []
        try:
            async for d in bridge.deltas():
                got.append(d.text)
        except Exception as err:  # noqa: BLE001
            got.append(err)
        thread.join()
        return got

    ok = asyncio.run(collect([StreamDelta("a"), StreamDelta("b", finish_reason="stop"), StreamDelta("late")]))
    assert ok == ["a", "b"]
    coe_err, other = (asyncio.run(collect([StreamDelta("a"), e])) for e in (AdapterError("gone"), KeyError("k")))
    assert coe_err[0] == "a" and isinstance(coe_err[1], AdapterError)
    assert isinstance(other[1], EngineError) and "KeyError" in str(other[1])


def test_the_one_sampler_greedy_top_p_and_seeded():
    from coe.adapters.decode import sample

    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample(logits, 0.0).tolist() == [1, 0]
    assert int(sample(logits[0], 0.0)) == 1  # one row: a 0-d tensor
    assert sample(logits, 1.0, top_p=1e-6).tolist() == [1, 0]  # only the most likely token stays
    flat = torch.tensor([1.0, 1.2, 0.9])
    draws = [[int(sample(flat, 1.5, 0.99, torch.Generator().manual_seed(s))) for s in range(20)] for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_registry_discovers_every_engine_and_capabilities_are_declared():
    import typing

    from coe.config import EngineConfig
    from coe.serving.engines.base import Capabilities, engine_names, get_engine_class

    assert engine_names() == ["hf", "mixture", "pool", "vllm"]
    kinds = set(typing.get_args(EngineConfig.model_fields["kind"].annotation))
    assert kinds <= set(engine_names())  # every engine.kind a config can name is a registered engine
    caps = {n: get_engine_class(n).capabilities for n in engine_names()}
    assert all(isinstance(c, Capabilities) for c in caps.values())
    assert {n: c.batching for n, c in caps.items()} == {
        "hf": "continuous", "vllm": "continuous", "pool": "grouped", "mixture": "window"}
    assert caps["hf"].runtime_adapters and caps["vllm"].runtime_adapters and not caps["mixture"].runtime_adapters
    assert caps["pool"].multi_model


def test_engines_are_built_from_a_neutral_spec(tiny_llama_dir):
    from coe.config import EngineConfig, PoolConfig
    from coe.errors import ConfigError
    from coe.serving.engines.base import get_engine_class
    from coe.serving.engines.spec import EngineSpec

    cfg = EngineConfig(kind="hf", device="cpu")
    hf = get_engine_class("hf").from_spec(EngineSpec(model=str(tiny_llama_dir), config=cfg))
    assert hf.model_path == str(tiny_llama_dir) and hf.config is cfg
    pool = get_engine_class("pool").from_spec(
        EngineSpec(model="a", config=cfg, models={"e0": "a", "e1": "b"}, pool=PoolConfig()))
    assert pool.experts == {"e0": "a", "e1": "b"}
    with pytest.raises(ConfigError, match="needs `mixture`"):
        get_engine_class("mixture").from_spec(EngineSpec(model="a", config=cfg))
    with pytest.raises(ConfigError, match="needs `models` and `pool`"):
        get_engine_class("pool").from_spec(EngineSpec(model="a", config=cfg))
