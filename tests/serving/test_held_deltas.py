"""Dispatch.hold_s: the expert server sends the first delta at once and may join the later ones
into fewer stream items; an answer read whole (``CoEService.generate``) asks for one item after
the first. The text, ids, usage and logprobs come out the same."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from coe.errors import EngineError
from coe.types import (
    ChatMessage,
    Dispatch,
    GenerationOutput,
    GenerationRequest,
    Logprob,
    SamplingParams,
    StreamDelta,
)


def deltas(n: int) -> list[StreamDelta]:
    out = [StreamDelta(text=f"t{i} ", token_ids=[i], prompt_tokens=5, completion_tokens=i + 1,
                       logprobs=[{i: Logprob(-0.1 * i, 1, f"t{i}")}]) for i in range(n)]
    out[0].prompt_token_ids, out[0].prompt_logprobs = [1, 2], [None, {2: Logprob(-1.0, 1, "b")}]
    out[-1].finish_reason = "length"
    return out


def test_join_keeps_everything_of_the_deltas_it_joins():
    ds = deltas(4)
    joined = StreamDelta.join(ds)
    assert joined.text == "t0 t1 t2 t3 " and joined.token_ids == [0, 1, 2, 3]
    assert (joined.finish_reason, joined.prompt_tokens, joined.completion_tokens) == ("length", 5, 4)
    assert [list(p) for p in joined.logprobs] == [[0], [1], [2], [3]]
    assert joined.prompt_token_ids == [1, 2] and joined.prompt_logprobs == ds[0].prompt_logprobs
    # joining in parts and then whole gives the answer of joining everything at once
    parts = [ds[0], StreamDelta.join(ds[1:3]), StreamDelta.join(ds[3:])]
    assert GenerationOutput.from_deltas(parts) == GenerationOutput.from_deltas(ds)
    assert StreamDelta.join([StreamDelta(text="a"), StreamDelta(text="b")]).logprobs is None   # none asked for
    with pytest.raises(ValueError):
        StreamDelta.join([])


class PacedEngine:
    """A unit-test stand-in engine: ``n`` deltas, one every ``gap_s``; ``fail_at``: raises there."""

    from coe.serving.engines.base import Capabilities

    capabilities = Capabilities(batching="continuous", runtime_adapters=False)
    n, gap_s, fail_at = 10, 0.01, None

    @classmethod
    def from_spec(cls, spec):
        return cls()

    async def start(self): ...

    async def stop(self): ...

    def prepare(self, dispatch):
        return dispatch

    async def stream(self, dispatch):
        for i, d in enumerate(deltas(self.n)):
            if i == self.fail_at:
                raise RuntimeError("engine step failed")
            await asyncio.sleep(self.gap_s)
            yield d


def server(engine_cls, model_dir):
    from coe.config import BatchingConfig, ModelExpert
    from coe.serving.deployments.expert_server import ExpertServer
    from coe.serving.deployments.spec import ServerSpec

    host = ModelExpert(id="m", model=str(model_dir), engine={"kind": "hf"})   # the folder is not opened
    return ExpertServer(ServerSpec(server_id="expert-m", host=host, batching=BatchingConfig()), engine_cls=engine_cls)


def dispatch(hold_s: float) -> Dispatch:
    return Dispatch(GenerationRequest(request_id="r", messages=[ChatMessage(role="user", content="hi")]),
                    expert="m", hold_s=hold_s)


async def items(srv, hold_s: float) -> list[StreamDelta]:
    return [d async for d in srv.stream(dispatch(hold_s))]


def test_the_server_sends_the_first_delta_at_once_and_joins_the_rest_by_hold_s(tmp_path):
    async def go():
        srv = server(PacedEngine, tmp_path)
        await srv.start()
        every = await items(srv, 0.0)
        whole = await items(srv, math.inf)
        paced = await items(srv, 0.035)
        return srv, every, whole, paced

    srv, every, whole, paced = asyncio.run(go())
    assert len(every) == 10   # 0: as the engine gives them
    assert len(whole) == 2 and whole[0] == deltas(10)[0]   # the first at once, the rest as one
    assert 2 < len(paced) < 10   # joined over 35 ms (a delta every 10 ms)
    for got in (whole, paced):
        assert GenerationOutput.from_deltas(got) == GenerationOutput.from_deltas(every)
    assert srv.requests_served == 3 and srv.tokens_generated == 30   # counted once per answer, not per item


def test_an_answer_that_fails_midway_fails_with_its_held_deltas(tmp_path):
    class Failing(PacedEngine):
        fail_at = 6

    async def go():
        srv = server(Failing, tmp_path)
        await srv.start()
        got = []
        with pytest.raises(EngineError, match="engine step failed"):
            async for d in srv.stream(dispatch(math.inf)):
                got.append(d)
        return got

    got = asyncio.run(go())
    assert [d.text for d in got] == ["t0 "]   # the first went at once; the held ones went with the failure


def test_a_real_engine_answer_read_whole_comes_in_two_items_with_the_same_tokens(tiny_llama_dir):
    from coe.config import BatchingConfig, ModelExpert
    from coe.serving.deployments.expert_server import ExpertServer
    from coe.serving.deployments.spec import ServerSpec

    host = ModelExpert(id="tiny", model=str(tiny_llama_dir), engine={"kind": "hf", "max_model_len": 128})
    srv = ExpertServer(ServerSpec(server_id="expert-tiny", host=host, batching=BatchingConfig()))
    req = GenerationRequest(request_id="r", messages=[ChatMessage(role="user", content="hello there")],
                            sampling=SamplingParams(max_tokens=12, temperature=0, logprobs=2))

    async def go():
        await srv.start()
        try:
            base = Dispatch(req, expert="tiny")
            every = [d async for d in srv.stream(base)]
            whole = [d async for d in srv.stream(dataclasses.replace(base, hold_s=math.inf))]
            return every, whole
        finally:
            await srv.stop()

    every, whole = asyncio.run(go())
    assert len(every) > 2 and len(whole) == 2
    a, b = GenerationOutput.from_deltas(every), GenerationOutput.from_deltas(whole)
    assert (b.text, b.token_ids, b.completion_tokens, b.finish_reason) == (a.text, a.token_ids, a.completion_tokens,
                                                                           a.finish_reason)
    assert [list(p) for p in b.logprobs] == [list(p) for p in a.logprobs]
