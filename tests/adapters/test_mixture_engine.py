"""The `mixture` engine serves a MoLE / X-LoRA expert: chat template, streaming, usage, batches."""

from __future__ import annotations

import asyncio

import pytest
import torch

from coe.config import EngineConfig
from coe.errors import AdapterError, ConfigError
from coe.serving.engines.base import get_engine_class
from coe.types import ChatMessage, Dispatch, GenerationRequest, SamplingParams
from tests.helpers import generate, generate_batch


def _req(text: str, **sampling) -> Dispatch:
    return Dispatch(GenerationRequest(
        request_id=text,
        messages=[ChatMessage(role="user", content=text)],
        sampling=SamplingParams(**{"max_tokens": 5, "temperature": 0, **sampling}),
    ))


@pytest.fixture(scope="module")
def saved_mole(tiny_llama_dir, tiny_loras, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from coe.adapters.mole import MoLE

    mole = MoLE(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), [("a", tiny_loras[0]), ("b", tiny_loras[1])], top_k=1)
    torch.manual_seed(0)
    with torch.no_grad():
        for g in mole.gates.values():
            g.weight.normal_(0, 1.0)
    folder = tmp_path_factory.mktemp("mix") / "mole"
    mole.save(folder, {"a": tiny_loras[0], "b": tiny_loras[1]})
    return folder


def test_streams_greedy_tokens_of_the_mixture_with_usage(tiny_llama_dir, saved_mole):
    from transformers import AutoModelForCausalLM

    from coe.adapters.decode import decode
    from coe.adapters.mixtures import load_mixture

    engine = get_engine_class("mixture")(tiny_llama_dir, EngineConfig(kind="hf"), method="mole", checkpoint=saved_mole)

    async def run():
        await engine.start()
        deltas = [d async for d in engine.stream(_req("what is the capital of france ?"))]
        before = engine.window.batches_dispatched
        batch = await generate_batch(engine, [_req("hello world"), _req("what is 2 + 2 ?", max_tokens=3)])
        batches = engine.window.batches_dispatched - before
        return deltas, batch, batches, await generate(engine, _req("hello world"))

    deltas, batch, batches, single = asyncio.run(run())
    assert batches == 1  # the two streams arrived within the engine's window: one batch
    req = _req("what is the capital of france ?")
    ids = engine.encode_prompt(req)
    mix = load_mixture(saved_mole, AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval())
    t = torch.tensor([ids])
    want = [int(x) for x, _ in decode(mix, t, torch.ones_like(t), 5, eos_ids=engine._eos, pad_id=engine._pad_id)]
    assert [i for d in deltas for i in d.token_ids] == want
    last = deltas[-1]
    assert last.finish_reason in ("stop", "length") and last.prompt_tokens == len(ids)
    assert last.completion_tokens == len(want)
    assert batch[1].completion_tokens <= 3 and batch[0].prompt_tokens == len(engine.encode_prompt(_req("hello world")))
    assert single.token_ids == batch[0].token_ids  # batching (left padding) does not change the answer
    assert engine.adapters() == ["a", "b"]


def test_uniform_mixture_without_checkpoint_and_config_errors(tiny_llama_dir, tiny_loras, saved_mole):
    cls = get_engine_class("mixture")
    engine = cls(tiny_llama_dir, method="mole", adapters=[("a", tiny_loras[0]), ("c", tiny_loras[2])])
    out = asyncio.run(_start_and_generate(engine))
    assert out.completion_tokens >= 1
    with pytest.raises(ConfigError, match="needs a `checkpoint`"):
        cls(tiny_llama_dir, method="xlora", adapters=[("a", tiny_loras[0]), ("c", tiny_loras[2])])
    with pytest.raises(AdapterError, match="cannot name one"):
        asyncio.run(generate(engine, GenerationRequest(request_id="x", prompt="hello"), adapter="a"))
    wrong = cls(tiny_llama_dir, method="xlora", checkpoint=saved_mole)
    with pytest.raises(ConfigError, match="holds a 'mole' mixture"):
        asyncio.run(wrong.start())


async def _start_and_generate(engine):
    await engine.start()
    return await generate(engine, _req("hello"))


def _unseedable(text: str) -> Dispatch:
    """A request whose seed torch cannot use, built past the API's validation."""
    params = SamplingParams.model_construct(max_tokens=5, temperature=0.7, top_p=1.0, stop=[], seed=2**64)
    return Dispatch(GenerationRequest(request_id="bad", messages=[ChatMessage(role="user", content=text)],
                                      sampling=params))


def test_one_bad_request_does_not_fail_its_batch(tiny_llama_dir, saved_mole):
    from coe.errors import InvalidRequestError
    from coe.types import GenerationOutput

    engine = get_engine_class("mixture")(tiny_llama_dir, EngineConfig(kind="hf"), method="mole", checkpoint=saved_mole)
    prompts = ["hello world", "what is 2 + 2 ?", "paris", "def f", "math", "the sea", "a b c"]

    async def run():
        await engine.start()
        batch = await generate_batch(engine, [_req(p) for p in prompts[:2]] + [_unseedable("x")] + [_req(p) for p in prompts[2:]])
        alone = [await generate(engine, _req(p)) for p in prompts]
        return batch, alone

    batch, alone = asyncio.run(run())
    assert isinstance(batch[2], InvalidRequestError) and batch[2].param == "seed"
    good = batch[:2] + batch[3:]
    assert all(isinstance(o, GenerationOutput) for o in good)
    assert [o.token_ids for o in good] == [o.token_ids for o in alone]


def test_the_mixture_engine_keeps_the_window_of_its_server_spec(tiny_llama_dir, tiny_loras, saved_mole):
    from coe.config import BatchingConfig, LoraExpert, MixtureExpert, ModelExpert
    from coe.serving.deployments.expert_server import ExpertServer
    from coe.serving.deployments.spec import ServerSpec

    base = ModelExpert(id="tiny", model=str(tiny_llama_dir), engine=EngineConfig(kind="hf", device="cpu"))
    loras = [LoraExpert(id=n, base="tiny", adapter=str(p)) for n, p in zip("ab", tiny_loras)]
    mix = MixtureExpert(id="mix", base="tiny", adapters=["a", "b"], checkpoint=str(saved_mole))
    spec = ServerSpec(server_id="expert-mix", host=mix, base=base, loras=loras,
                      batching=BatchingConfig(max_batch_size=8, window_ms=200))

    async def run():
        server = ExpertServer(spec)
        await server.start()
        served = await asyncio.gather(*(generate(server, _req(p), expert="mix") for p in ["hello", "paris", "math"]))
        stats = server.stats()
        await server.stop()
        return server, served, stats

    server, served, stats = asyncio.run(run())
    assert server.ready() == {"mix": None}
    assert stats["engine"]["batches"] == 1 and stats["queue_depth"] == 0  # the three streams: one window
    assert all(s.completion_tokens >= 1 for s in served)
