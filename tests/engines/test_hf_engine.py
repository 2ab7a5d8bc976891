"""HFEngine on the tiny random llama: batching, streaming, sampling, stop, usage, cancel, LoRA."""

from __future__ import annotations

import asyncio
import time

import pytest

from coe.errors import AdapterError, ContextLengthError
from coe.types import Dispatch, GenerationRequest, SamplingParams
from tests.helpers import generate, generate_batch

PROMPTS = [
    "hello world",
    "def x return 1 + 2",
    "the city of paris is in france",
    "what is the capital of france ? the capital is",
    "math",
    "1 2 3 4 5 6 7 8 9 0 + - * = ? . , : !",
]


def raw(prompt: str, *, max_tokens: int = 12, temperature: float = 0.0, adapter=None, **kw) -> Dispatch:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, **kw)
    return Dispatch(GenerationRequest(request_id="r", prompt=prompt, sampling=sampling), adapter=adapter)


def test_batched_equals_sequential_greedy(tiny_hf, loop):
    sequential = [loop.run(generate(tiny_hf, raw(p))).token_ids for p in PROMPTS]
    batched = loop.run(generate_batch(tiny_hf, [raw(p) for p in PROMPTS]))
    assert [o.token_ids for o in batched] == sequential
    assert all(len(ids) >= 1 for ids in sequential)


def test_request_joining_a_running_batch_gets_the_same_tokens(tiny_hf, loop):
    """A request arriving mid-decode is prefilled and joined to the running batch."""
    long_req, late_req = raw(PROMPTS[2], max_tokens=20), raw(PROMPTS[5], max_tokens=20)
    alone = [loop.run(generate(tiny_hf, r)).token_ids for r in (long_req, late_req)]

    async def staggered():
        first, ids = tiny_hf.stream(long_req), []
        for _ in range(3):
            ids += (await first.__anext__()).token_ids
        late = asyncio.create_task(generate(tiny_hf, late_req))
        async for delta in first:
            ids += delta.token_ids
        return ids, (await late).token_ids

    assert list(loop.run(staggered())) == alone


def test_stream_deltas_join_to_the_full_text(tiny_hf, loop):
    async def collect():
        return [d async for d in tiny_hf.stream(raw(PROMPTS[2], max_tokens=15))]

    deltas = loop.run(collect())
    full = loop.run(generate(tiny_hf, raw(PROMPTS[2], max_tokens=15)))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert deltas[-1].finish_reason is not None and all(d.finish_reason is None for d in deltas[:-1])
    decoded = tiny_hf._tokenizer.decode(full.token_ids, skip_special_tokens=True)
    assert full.text.strip() == decoded.strip()


def test_max_tokens_gives_length_and_usage_counts(tiny_hf, loop):
    req = raw(PROMPTS[1], max_tokens=7)
    out = loop.run(generate(tiny_hf, req))
    assert out.finish_reason == "length"
    assert out.completion_tokens == len(out.token_ids) == 7
    assert out.prompt_tokens == len(tiny_hf.encode_prompt(req))


def test_stop_string_ends_the_answer_and_is_not_included(tiny_hf, loop):
    plain = loop.run(generate(tiny_hf, raw(PROMPTS[2], max_tokens=20)))
    words = plain.text.split()
    assert len(words) >= 4, plain.text
    stop = " ".join(words[2:4])
    cut = loop.run(generate(tiny_hf, raw(PROMPTS[2], max_tokens=20, stop=[stop])))
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert plain.text.startswith(cut.text) and cut.text.strip() == " ".join(words[:2])


def test_seeded_sampling_is_reproducible(tiny_hf, loop):
    a = loop.run(generate(tiny_hf, raw(PROMPTS[0], max_tokens=20, temperature=1.0, seed=7)))
    b = loop.run(generate(tiny_hf, raw(PROMPTS[0], max_tokens=20, temperature=1.0, seed=7)))
    others = {tuple(loop.run(generate(tiny_hf, raw(PROMPTS[0], max_tokens=20, temperature=1.0, seed=s))).token_ids)
              for s in (1, 2, 3)}
    assert a.token_ids == b.token_ids
    assert len(others | {tuple(a.token_ids)}) > 1, "different seeds should sample differently"


def test_top_p_tiny_keeps_only_the_greedy_token(tiny_hf, loop):
    greedy = loop.run(generate(tiny_hf, raw(PROMPTS[2], max_tokens=10)))
    nucleus = loop.run(generate(tiny_hf, raw(PROMPTS[2], max_tokens=10, temperature=1.0, top_p=1e-6, seed=3)))
    assert nucleus.token_ids == greedy.token_ids


def test_closing_the_stream_frees_the_slot(tiny_hf, loop):
    async def start_and_leave():
        stream = tiny_hf.stream(raw(PROMPTS[1], max_tokens=200))
        await stream.__anext__()
        assert tiny_hf.running() == 1
        await stream.aclose()

    loop.run(start_and_leave())
    deadline = time.monotonic() + 10
    while tiny_hf.running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tiny_hf.running() == 0
    assert loop.run(generate(tiny_hf, raw(PROMPTS[0], max_tokens=3))).completion_tokens >= 1


def test_context_length_error_names_limit_and_counts(tiny_hf, loop):
    prompt = " ".join(["hello"] * 250)
    with pytest.raises(ContextLengthError) as err:
        loop.run(generate(tiny_hf, raw(prompt, max_tokens=10)))
    msg = str(err.value)
    assert "256" in msg and "250" in msg and "max_tokens is 10" in msg


def test_unknown_adapter_in_request(tiny_hf, loop):
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        loop.run(generate(tiny_hf, raw(PROMPTS[0], adapter="nope")))


def _peft_greedy(base_dir, adapter_dir, prompt_ids: list[int], n: int) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_lora_mixed_batch_matches_plain_peft(tiny_hf, tiny_llama_dir, tiny_loras, loop):
    base_before = loop.run(generate(tiny_hf, raw(PROMPTS[2]))).token_ids
    loop.run(tiny_hf.add_adapter("a", tiny_loras[0]))
    loop.run(tiny_hf.add_adapter("b.two", tiny_loras[1]))  # a name peft itself could not take
    try:
        assert tiny_hf.adapters() == ["a", "b.two"]
        reqs = [raw(PROMPTS[2], adapter="a"), raw(PROMPTS[2], adapter="b.two"), raw(PROMPTS[2])]
        outs = loop.run(generate_batch(tiny_hf, reqs))
        prompt_ids = tiny_hf.encode_prompt(reqs[0])
        for out, lora in zip(outs[:2], tiny_loras[:2]):
            assert out.token_ids == _peft_greedy(tiny_llama_dir, lora, prompt_ids, 12)[: len(out.token_ids)]
        assert outs[2].token_ids == base_before
        assert outs[0].token_ids != base_before
        with pytest.raises(AdapterError, match="already added"):
            loop.run(tiny_hf.add_adapter("a", tiny_loras[2]))
    finally:
        loop.run(tiny_hf.remove_adapter("a"))
        loop.run(tiny_hf.remove_adapter("b.two"))
    assert tiny_hf.adapters() == []
    with pytest.raises(AdapterError):
        loop.run(generate(tiny_hf, raw(PROMPTS[2], adapter="a")))
    assert loop.run(generate(tiny_hf, raw(PROMPTS[2]))).token_ids == base_before


def test_bad_adapters_fail_at_registration(tiny_hf, tiny_loras, tmp_path, loop):
    with pytest.raises(AdapterError, match="does not exist"):
        loop.run(tiny_hf.add_adapter("x", tmp_path / "missing"))
    small = type(tiny_hf)(tiny_hf.model_path, tiny_hf.config.model_copy(update={"max_lora_rank": 4}))
    with pytest.raises(AdapterError, match="rank 8 exceeds"):
        loop.run(small.add_adapter("b", tiny_loras[1]))  # validation happens before loading
    assert tiny_hf.adapters() == []
