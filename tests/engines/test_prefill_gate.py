"""The vLLM engine's PrefillGate (a prompt-logprob request's prefill runs alone, first come first
served) and how the engine maps vLLM's request rejections and a dead EngineCore to our errors.

Unit tests: the gate on plain asyncio; the error mapping with vLLM's own exception types and a
stand-in for ``AsyncLLM`` whose EngineCore is dead. The real engine is tested in
``test_vllm_prompt_logprobs.py``.
"""

from __future__ import annotations

import asyncio

import pytest

from coe.errors import EngineError, InvalidRequestError
from coe.serving.engines.vllm_engine import PrefillGate
from tests.engines.engine_helpers import chat, generate


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_shared_holders_run_together_and_an_exclusive_one_waits_for_them():
    async def go():
        gate = PrefillGate()
        a, b = await gate.enter(exclusive=False), await gate.enter(exclusive=False)
        assert gate.state == (2, False, 0)
        ex = asyncio.ensure_future(gate.enter(exclusive=True))
        await settle()
        assert not ex.done() and gate.state == (2, False, 1)
        a.release()
        a.release()  # idempotent
        await settle()
        assert not ex.done()
        b.release()
        hold = await ex
        assert gate.state == (0, True, 0) and hold.exclusive
        hold.release()
        assert gate.state == (0, False, 0)

    run(go())


def test_first_come_first_served_so_neither_kind_starves():
    """Requests after a waiting exclusive one wait for its prefill; it waits only for those before it."""
    order = []

    async def go():
        gate = PrefillGate()
        first = await gate.enter(exclusive=False)

        async def one(name, exclusive, hold_for):
            hold = await gate.enter(exclusive=exclusive)
            order.append(name)
            await asyncio.sleep(hold_for)
            hold.release()

        tasks = [asyncio.ensure_future(one("x1", True, 0.01))]
        await settle()
        tasks.append(asyncio.ensure_future(one("s1", False, 0.01)))
        tasks.append(asyncio.ensure_future(one("s2", False, 0.01)))
        await settle()
        tasks.append(asyncio.ensure_future(one("x2", True, 0.01)))
        await settle()
        assert order == [] and gate.state == (1, False, 4)  # s1 and s2 do not overtake x1
        first.release()
        await asyncio.gather(*tasks)
        assert gate.state == (0, False, 0)

    run(go())
    assert order == ["x1", "s1", "s2", "x2"]


def test_downgrade_lets_the_waiting_requests_in_beside_the_decoding_one():
    async def go():
        gate = PrefillGate()
        ex = await gate.enter(exclusive=True)
        shared = asyncio.ensure_future(gate.enter(exclusive=False))
        nxt = asyncio.ensure_future(gate.enter(exclusive=True))
        await settle()
        assert not shared.done()
        ex.downgrade()  # its first output came: prefill done
        s = await shared
        assert gate.state == (2, False, 1) and not nxt.done()
        ex.release()
        s.release()
        (await nxt).release()
        assert gate.state == (0, False, 0)

    run(go())


def test_a_cancelled_waiter_leaves_the_queue_and_unblocks_those_behind_it():
    async def go():
        gate = PrefillGate()
        held = await gate.enter(exclusive=False)
        ex = asyncio.ensure_future(gate.enter(exclusive=True))
        await settle()
        behind = asyncio.ensure_future(gate.enter(exclusive=False))
        await settle()
        assert not behind.done()
        ex.cancel()  # the client of the prompt-logprob request went away while it waited
        hold = await behind
        assert gate.state == (2, False, 0)
        hold.release()
        held.release()
        # cancelled after being admitted but before resuming: its place is given back
        ex_hold = await gate.enter(exclusive=True)
        late = asyncio.ensure_future(gate.enter(exclusive=True))
        await settle()
        ex_hold.release()  # admits `late` (its future gets a result) ...
        late.cancel()  # ... and cancels it before it runs
        with pytest.raises(asyncio.CancelledError):
            await late
        assert gate.state == (0, False, 0)

    run(go())


# ------------------------------------------------------------------ error mapping


def test_vllm_rejections_become_400s_naming_the_parameter_without_internals():
    pytest.importorskip("vllm")
    from vllm.exceptions import VLLMValidationError

    from coe.serving.engines.vllm_engine import _rejected

    err = _rejected(VLLMValidationError("prompt logprobs of 30 exceed 20\n  at somewhere", parameter="prompt_logprobs",
                                        value=30), chat("hi"))
    assert isinstance(err, InvalidRequestError) and err.status_code == 400
    assert err.param == "prompt_logprobs"
    assert err.message == "the request was rejected: prompt logprobs of 30 exceed 20"  # no value dump, no trace
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    err = _rejected(ValueError("The JSON schema is nested too deeply"), chat("hi", response_format=fmt))
    assert err.param == "response_format"
    assert _rejected(TypeError(), chat("hi")).message == "the request was rejected: TypeError"


class DeadAsyncLLM:
    """Stands in for vLLM's AsyncLLM after its EngineCore died: what the real one does then
    (``errored`` true, ``generate`` and ``check_health`` raise EngineDeadError)."""

    def __init__(self, dead_after_add: bool = False):
        self.dead = not dead_after_add
        self.aborted = []

    @property
    def errored(self):
        return self.dead

    async def generate(self, prompt, params, request_id, lora_request=None):
        from vllm.v1.engine.exceptions import EngineDeadError

        self.dead = True
        raise EngineDeadError()
        yield  # an async generator, as vLLM's

    async def abort(self, request_id):
        self.aborted.append(request_id)

    async def check_health(self):
        from vllm.v1.engine.exceptions import EngineDeadError

        raise EngineDeadError()


def test_a_dead_engine_fails_every_request_at_once_with_a_clear_error(tiny_llama_dir, tiny_loras):
    pytest.importorskip("vllm")
    from coe.config import EngineConfig
    from coe.serving.engines.tokens import load_tokenizer
    from coe.serving.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_llama_dir, EngineConfig(kind="vllm", max_model_len=128))
    engine._tokenizer = load_tokenizer(tiny_llama_dir)
    engine._max_len = 128
    engine._engine = DeadAsyncLLM(dead_after_add=True)  # dies under the first request
    with pytest.raises(EngineError, match="has died") as err:
        run(generate(engine, chat("what is the capital of france ?", prompt_logprobs=0)))
    assert "EngineCore" in err.value.message and err.value.status_code == 503
    assert engine._gate.state == (0, False, 0)  # the gate was given back
    assert engine._engine.aborted == []  # no abort sent to a dead engine
    with pytest.raises(EngineError, match="has died"):  # later requests fail before the gate
        run(generate(engine, chat("hello")))
    with pytest.raises(EngineError, match="has died"):
        run(engine.add_adapter("a", tiny_loras[0]))
    assert run(engine.healthy()) is False


def test_prompt_logprobs_under_an_lm_head_lora_are_refused_on_a_gpu(tiny_llama_dir, tiny_loras):
    """vLLM's GPU kernel applies an lm_head LoRA to the first prompt position only (vllm#51594):
    a 400 instead of silently wrong numbers. Other adapters, and generation, go to the engine."""
    pytest.importorskip("vllm")
    from coe.config import EngineConfig
    from coe.serving.engines.adapter_check import LoraInfo
    from coe.serving.engines.tokens import load_tokenizer
    from coe.serving.engines.vllm_engine import VLLMEngine, _trains_lm_head

    assert [_trains_lm_head(LoraInfo("x", 4, t, None)) for t in
            (["q_proj", "lm_head"], ["model.lm_head"], [r".*\.(lm_head|q_proj)"], ["q_proj", "v_proj"],
             ["all-linear"])] == [True, True, True, False, False]
    engine = VLLMEngine(tiny_llama_dir, EngineConfig(kind="vllm", device="cuda", max_model_len=128))
    engine._tokenizer = load_tokenizer(tiny_llama_dir)
    engine._max_len = 128
    engine._engine = DeadAsyncLLM(dead_after_add=True)  # reached only by the requests that pass
    engine._adapters = {"head": (1, LoraInfo(str(tiny_loras[0]), 4, ["q_proj", "lm_head"], None)),
                        "attn": (2, LoraInfo(str(tiny_loras[1]), 8, ["q_proj", "v_proj"], None))}
    with pytest.raises(InvalidRequestError, match="lm_head") as err:
        run(generate(engine, chat("hello", adapter="head", prompt_logprobs=0)))
    assert err.value.param == "prompt_logprobs" and engine._gate.state == (0, False, 0)
    assert not engine._engine.dead
    with pytest.raises(EngineError, match="has died"):
        run(generate(engine, chat("hello", adapter="attn", prompt_logprobs=0)))
