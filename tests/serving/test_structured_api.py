"""``response_format`` through the HTTP API in-process: the official openai SDK's
``client.chat.completions.parse`` gets a parsed pydantic object from a random-weight model (guided
decoding), ``/v1/completions`` takes it too, and every malformed ``response_format`` is a 400
naming the field and what is allowed (before routing: never an engine error)."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from tests.helpers import make_byte_level_llama
from tests.serving.serving_helpers import Harness


class Answer(BaseModel):
    city: str = Field(pattern="^[a-z]{1,12}$")
    ok: bool
    tag: Literal["a", "b"]


@pytest.fixture(scope="module")
def h(loop_thread, tmp_path_factory):
    from coe.config import parse_config

    root = tmp_path_factory.mktemp("structured-api")
    model = make_byte_level_llama(root / "bytes-llama")
    engine = {"kind": "hf", "max_model_len": 512}
    config = {
        "router": {"name": "centroid", "default_expert": "bytes"},
        "experts": [{"id": "bytes", "kind": "model", "model": str(model), "engine": engine,
                     "description": "general questions", "resources": {"num_cpus": 0.25}}],
        "serving": {"registry_path": str(root / "registry.sqlite"),
                    "max_tokens_limit": 256, "max_tokens_default": 8, "ingress": {"num_cpus": 0.25}},
    }
    harness = Harness(loop_thread, parse_config(config), root, default="bytes")
    yield harness
    harness.close()


def test_openai_sdk_parse_gets_a_parsed_object(h):
    from openai import AsyncOpenAI

    async def go():
        transport = httpx.ASGITransport(app=h.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://coe/v1") as http:
            client = AsyncOpenAI(base_url="http://coe/v1", api_key="x", http_client=http, max_retries=0)
            return await client.chat.completions.parse(
                model="coe", messages=[{"role": "user", "content": "hello"}], response_format=Answer,
                max_tokens=200, temperature=0)

    completion = h.lt.run(go())
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Answer) and completion.choices[0].finish_reason == "stop"


def test_json_schema_streamed_and_on_completions(h):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": Answer.model_json_schema()}}
    r = h.chat("hello", max_tokens=200, response_format=fmt, stream=True)
    assert r.status_code == 200, r.text
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in r.text.split("\n\n") if ln and ln != "data: [DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    Answer.model_validate_json(text)
    r = h.request("POST", "/v1/completions", json={"model": "coe", "prompt": "hello", "max_tokens": 200,
                                                   "temperature": 0, "response_format": fmt})
    assert r.status_code == 200, r.text
    Answer.model_validate_json(r.json()["choices"][0]["text"])


def test_text_is_unconstrained(h):
    r = h.chat("hello", response_format={"type": "text"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("fmt", [
    {"type": "xml"},
    {"type": "json_schema"},
    {"type": "json_object", "json_schema": {"name": "a", "schema": {}}},
    {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
    {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nonsense"}}},
    {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "string", "pattern": "(("}}},
])
def test_bad_response_format_is_a_400_naming_it(h, fmt):
    r = h.chat("hello", response_format=fmt)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and "response_format" in err["message"], err
    assert "json_schema" in err["message"] and "json_object" in err["message"], err  # what is allowed


TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


def test_tools_refused_naming_the_expert_and_why(h):
    for body in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}):
        for model in ("coe", "bytes"):  # routed: the chosen expert is named
            r = h.chat("hello", model=model, **body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "tools" and "'bytes'" in err["message"], err
            assert "chat template" in err["message"] and "does not support tools" in err["message"], err
            if model == "coe":  # no other expert to re-route to
                assert "nor does any other serving expert" in err["message"], err
    r = h.chat("hello", tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = h.chat("hello", tools=TOOLS, tool_choice="none")
    assert r.status_code == 200, r.text


def test_template_capability_detection():
    from coe.serving.api.tools import template_takes_tools

    assert template_takes_tools("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}")
    assert not template_takes_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_takes_tools(None)


@pytest.mark.slow
def test_shipped_experts_templates_and_tools(smollm2_dir, gemma3_dir, qwen_dir):
    """What the refusal rests on: SmolLM2's and gemma's chat templates do not render tools;
    Qwen2.5-Coder's does, in the Hermes family coe parses."""
    from coe.serving.api.tools import (
        HermesToolCalls,
        model_chat_template,
        parser_for,
        template_takes_tools,
    )

    for folder in (smollm2_dir, gemma3_dir):
        template = model_chat_template(str(folder))
        assert template and not template_takes_tools(template) and parser_for(template) is None, folder
    template = model_chat_template(str(qwen_dir))
    assert template_takes_tools(template) and parser_for(template) is HermesToolCalls
