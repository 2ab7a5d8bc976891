"""Log-probabilities from the one decode core (hf, pool, mixture): generated tokens, prompt tokens,
the chat rendering flags and token-id prompts."""

from __future__ import annotations

import math

import pytest
import torch

from coe.config import EngineConfig
from coe.errors import InvalidRequestError
from coe.types import ChatMessage, Dispatch, GenerationRequest, SamplingParams
from tests.helpers import generate, generate_batch

PROMPT = "what is the capital of france ? the capital is"


def req(prompt=PROMPT, *, messages=None, ids=None, expert=None, **sampling) -> Dispatch:
    params = SamplingParams(**{"max_tokens": 6, "temperature": 0.0, **sampling})
    return Dispatch(GenerationRequest(request_id="lp", prompt=None if messages or ids else prompt, messages=messages,
                                      prompt_token_ids=ids, sampling=params), expert=expert)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def reference_logp(model, ids: list[int]):
    """log_softmax of the model's logits over ``ids`` in one teacher-forced pass: ``[T, V]``."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def check_position(entry, token: int, logp_row, n: int) -> None:
    """``entry`` holds ``token`` with its logprob and rank, then the ``n`` most likely in order."""
    lp = entry[token]
    assert lp.logprob == pytest.approx(float(logp_row[token]), abs=1e-4)
    assert lp.rank == 1 + int((logp_row > logp_row[token]).sum())
    top_lp, top_ids = logp_row.topk(n)
    others = {t: e for t, e in entry.items() if t != token or e.rank <= n}
    ranked = sorted(others.items(), key=lambda kv: kv[1].rank)
    assert [t for t, _ in ranked][:n] == top_ids.tolist()
    assert [e.rank for _, e in ranked][:n] == list(range(1, n + 1))
    assert [e.logprob for _, e in ranked][:n] == pytest.approx(top_lp.tolist(), abs=1e-4)
    assert len(entry) <= n + 1


def test_greedy_logprobs_are_log_softmax_of_the_logits(tiny_hf, tiny_model, loop):
    model, tok = tiny_model
    out = loop.run(generate(tiny_hf, req(logprobs=3)))
    prompt = tiny_hf.encode_prompt(req())
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == out.completion_tokens
    logp = reference_logp(model, prompt + out.token_ids)  # [T, V]
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = logp[len(prompt) - 1 + i]
        check_position(entry, token, row, 3)
        assert entry[token].rank == 1  # greedy: the chosen token is the most likely
        assert entry[token].decoded_token == tok.decode([token])
    assert out.prompt_logprobs is None


def test_sampled_tokens_get_their_true_rank(tiny_hf, tiny_model, loop):
    model, _ = tiny_model
    out = loop.run(generate(tiny_hf, req(max_tokens=12, temperature=2.0, seed=3, logprobs=0)))
    prompt = tiny_hf.encode_prompt(req())
    logp = reference_logp(model, prompt + out.token_ids)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert set(entry) == {token}  # logprobs=0: the sampled token only
        check_position(entry, token, logp[len(prompt) - 1 + i], 0)
    assert any(e[t].rank > 1 for t, e in zip(out.token_ids, out.logprobs))  # temperature 2 leaves the argmax


def test_prompt_logprobs_equal_the_teacher_forced_likelihood(tiny_hf, tiny_model, loop):
    from coe.scoring.likelihood import HFLikelihood, encode_chat

    model, tok = tiny_model
    query, answer = "what is the capital of france ?", "paris is the capital"
    ids, n = encode_chat(tok, query, answer)
    expected = HFLikelihood(model, tok).continuation_logprobs([(query, answer)])[0]
    out = loop.run(generate(tiny_hf, req(ids=ids, max_tokens=1, prompt_logprobs=0)))
    assert out.prompt_token_ids == ids and out.prompt_tokens == len(ids)
    assert out.prompt_token_texts == [tok.decode([t]) for t in ids]
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    assert all(set(e) == {t} for t, e in zip(ids[1:], out.prompt_logprobs[1:]))  # 0: the prompt token only
    got = [out.prompt_logprobs[p][ids[p]].logprob for p in range(len(ids) - n, len(ids))]
    assert got == pytest.approx(expected, abs=1e-4)
    logp = reference_logp(model, ids)
    out = loop.run(generate(tiny_hf, req(ids=ids, max_tokens=1, prompt_logprobs=4)))
    for p in range(1, len(ids)):
        check_position(out.prompt_logprobs[p], ids[p], logp[p - 1], 4)


def test_prompt_logprob_rows_batch_with_plain_rows_without_changing_them(tiny_hf, loop):
    plain = [req(p) for p in ("hello world", PROMPT, "1 + 2 = ?")]
    scored = [req(p, prompt_logprobs=2, logprobs=1) for p in ("hello world", PROMPT)]
    outs = loop.run(generate_batch(tiny_hf, plain + scored))
    alone = [loop.run(generate(tiny_hf, r)) for r in plain + scored]
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert outs[3].prompt_logprobs[1:] and outs[4].logprobs
    for a, b in zip(outs[3:], alone[3:]):
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert {t: e.logprob for t, e in x.items()} == pytest.approx({t: e.logprob for t, e in y.items()}, abs=1e-4)


def test_stream_carries_logprobs_per_token_and_prompt_logprobs_first(tiny_hf, loop):
    async def collect():
        return [d async for d in tiny_hf.stream(req(logprobs=2, prompt_logprobs=1))]

    deltas = loop.run(collect())
    assert deltas[0].prompt_logprobs is not None and deltas[0].prompt_token_ids == tiny_hf.encode_prompt(req())
    assert all(d.prompt_logprobs is None for d in deltas[1:])
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)


def test_chat_rendering_flags_and_token_id_prompts(tiny_hf):
    tok = tiny_hf._tokenizer
    msgs = [ChatMessage(role="user", content="hello"), ChatMessage(role="assistant", content="the capital")]
    default = tok.decode(tiny_hf.encode_prompt(req(messages=msgs)))
    assert default.rstrip().endswith("<|assistant|>")
    plain = Dispatch(GenerationRequest("f", messages=msgs, add_generation_prompt=False))
    assert not tok.decode(tiny_hf.encode_prompt(plain)).rstrip().endswith("<|assistant|>")
    cont = Dispatch(GenerationRequest("f", messages=msgs, add_generation_prompt=False, continue_final_message=True))
    text = tok.apply_chat_template([m.model_dump() for m in msgs], tokenize=False, continue_final_message=True)
    assert text.endswith("the capital")  # left open: no end-of-message newline
    assert tiny_hf.encode_prompt(cont) == tok(text)["input_ids"]
    assert tok.decode(tiny_hf.encode_prompt(cont)).endswith("capital")
    both = Dispatch(GenerationRequest("f", messages=msgs, continue_final_message=True))
    with pytest.raises(InvalidRequestError, match="add_generation_prompt") as err:
        tiny_hf.encode_prompt(both)
    assert err.value.param == "continue_final_message"
    user_last = Dispatch(GenerationRequest("f", messages=msgs[:1], add_generation_prompt=False,
                                           continue_final_message=True))
    with pytest.raises(InvalidRequestError, match="assistant"):
        tiny_hf.encode_prompt(user_last)
    ids = tiny_hf.encode_prompt(req())
    assert tiny_hf.encode_prompt(req(ids=ids)) == ids  # token ids bypass every template
    for bad in ([], [len(tok)], [-1]):
        with pytest.raises(InvalidRequestError) as err:
            tiny_hf.encode_prompt(req(ids=bad))
        assert err.value.param == "prompt"


def test_pool_engine_gives_the_same_logprobs_as_hf(tiny_hf, tiny_llama_dir, loop):
    from coe.config import PoolConfig
    from coe.serving.pool.engine import PoolEngine

    expected = loop.run(generate(tiny_hf, req(logprobs=2, prompt_logprobs=2)))
    engine = PoolEngine({"e": str(tiny_llama_dir)}, PoolConfig(),
                        EngineConfig(kind="hf", device="cpu", max_num_seqs=4, max_model_len=128))
    request = req(logprobs=2, prompt_logprobs=2, expert="e")

    async def run():
        await engine.start()
        try:
            return await generate(engine, request)
        finally:
            await engine.stop()

    out = loop.run(run())
    assert out.token_ids == expected.token_ids
    for a, b in zip(out.logprobs + out.prompt_logprobs[1:], expected.logprobs + expected.prompt_logprobs[1:]):
        assert {t: e.rank for t, e in a.items()} == {t: e.rank for t, e in b.items()}
        assert {t: e.logprob for t, e in a.items()} == pytest.approx({t: e.logprob for t, e in b.items()}, abs=1e-4)


def test_mixture_engine_reports_generated_logprobs_and_refuses_prompt_logprobs(tiny_llama_dir, tiny_loras, loop):
    from coe.serving.engines.mixture import MixtureEngine

    engine = MixtureEngine(tiny_llama_dir, EngineConfig(kind="hf"), method="mole",
                           adapters=[("a", tiny_loras[0]), ("b", tiny_loras[1])])

    async def run():
        await engine.start()
        return await generate_batch(engine, [req(logprobs=3), req(prompt_logprobs=0)])

    out, refused = loop.run(run())
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        assert entry[token].rank == 1 and len(entry) == 3  # greedy: the chosen token is the top one
        assert math.log(sum(math.exp(e.logprob) for e in entry.values())) <= 1e-6
    assert isinstance(refused, InvalidRequestError) and refused.param == "prompt_logprobs"
    assert "mixture engine" in refused.message
