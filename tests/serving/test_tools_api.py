"""Tool calls (``tools``): the Hermes parser alone (well-formed, several, malformed, text around,
any chunk boundary), then through the HTTP API in-process with a scripted engine on a model whose
template is Qwen2.5's (plain and streamed answers, re-routing, refusals), and one real answer
from Qwen2.5-Coder-0.5B-Instruct on the transformers engine."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import make_byte_level_llama
from tests.serving.serving_helpers import Harness, error_of

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET", "exact": true}}\n</tool_call>'
BAD = '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'


BARE = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def parse(text: str, names=()):
    from functools import partial

    from coe.serving.api.tools import HermesToolCalls, parse_tool_calls

    return parse_tool_calls(partial(HermesToolCalls, names), text)


def streamed(text: str, cuts: list[int], names=()):
    """(content, calls) from feeding ``text`` cut at ``cuts``."""
    from coe.serving.api.models import ToolCall
    from coe.serving.api.tools import HermesToolCalls

    p, pieces, start = HermesToolCalls(names), [], 0
    for cut in [*cuts, len(text)]:
        pieces += p.feed(text[start:cut])
        start = cut
    pieces += p.finish()
    calls = [x for x in pieces if isinstance(x, ToolCall)]
    return "".join(x for x in pieces if isinstance(x, str)), calls


def named(calls):
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


# ------------------------------------------------------------------ the parser


def test_a_well_formed_call():
    content, calls = parse(CALL)
    assert content is None and named(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0].type == "function" and calls[0].id.startswith("call_")
    assert isinstance(calls[0].function.arguments, str)


def test_several_calls_with_text_around():
    content, calls = parse(f"Let me look.\n{CALL}\n{CALL2}\nDone.")
    assert named(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET", "exact": True})]
    assert content == "Let me look.Done."  # whitespace next to a call is dropped
    assert len({c.id for c in calls}) == 2


def test_malformed_json_stays_text():
    for text in (BAD, f"Sure: {BAD}", '<tool_call>\n["get_weather"]\n</tool_call>',
                 '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
                 '<tool_call>\n{"name": "get_weather", "arguments": {"ci'):  # cut by max_tokens
        assert parse(text) == (text, []), text
    content, calls = parse(f"{CALL}\n{BAD}")  # a bad block does not spoil a good one
    assert named(calls) == [("get_weather", {"city": "Paris"})] and content == BAD


def test_text_without_calls_is_untouched():
    for text in ("", "hello", "  spaced out \n\n", "a < b and <tool_ is not a tag", "x <tool_call"):
        assert parse(text) == (text, []), text


def test_unclosed_final_call_and_string_arguments():
    content, calls = parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n')
    assert content is None and named(calls) == [("get_weather", {"city": "Oslo"})]
    _, calls = parse('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>')
    assert named(calls) == [("get_weather", {"city": "Rome"})]


def test_bare_call_objects_naming_a_tool_are_calls():
    from functools import partial

    from coe.serving.api.tools import HermesToolCalls, parse_tool_calls

    tools = partial(HermesToolCalls, ["get_weather", "get_time"])
    content, calls = parse_tool_calls(tools, BARE)
    assert content is None and named(calls) == [("get_weather", {"city": "Paris"})]
    _, calls = parse_tool_calls(tools, f'{BARE}\n{{"name": "get_time", "arguments": {{}}}}')
    assert named(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    for text in ('{"name": "Bob", "arguments": {}}',        # not one of the tools
                 '{"name": "get_weather", "city": "Paris"}',  # no arguments
                 f"{BARE} is what I would send",            # text after it
                 f"Sure: {BARE}", '{"name": "get_weather", "arguments": {"ci'):
        assert parse_tool_calls(tools, text) == (text, []), text
    assert parse(BARE) == (BARE, [])  # without the request's tool names: content


@pytest.mark.parametrize("text", [CALL, f"Let me look.\n{CALL}\n{CALL2}\nDone.", f"ok {BAD} then", "plain  text \n",
                                  BARE, f" {BARE}\n", '{"name": "Bob", "arguments": {}} hi', f"{BARE} tail"])
def test_every_chunk_boundary_gives_the_same_parse(text):
    for names in ((), ("get_weather",)):
        whole = parse(text, names)
        whole = (whole[0] or "", named(whole[1]))
        for cut in range(len(text) + 1):
            content, calls = streamed(text, [cut], names)
            assert (content, named(calls)) == whole, cut
        content, calls = streamed(text, list(range(1, len(text))), names)  # one character at a time
        assert (content, named(calls)) == whole


def test_a_call_is_sent_only_once_its_closing_tag_arrives():
    from coe.serving.api.models import ToolCall
    from coe.serving.api.tools import HermesToolCalls

    p = HermesToolCalls()
    assert p.feed("Hi <tool") == ["Hi"]            # the partial tag and the space are held back
    assert p.feed('_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_') == []
    out = p.feed("call>")
    assert len(out) == 1 and isinstance(out[0], ToolCall)
    assert p.feed("\n") == [] and p.finish() == []


def test_family_detection(qwen_dir):
    from coe.serving.api.tools import HermesToolCalls, model_chat_template, parser_for

    assert parser_for(model_chat_template(str(qwen_dir))) is HermesToolCalls
    assert parser_for("{% if tools %}{{ tools | tojson }}{% endif %}") is None  # takes tools, unknown family
    assert parser_for("<tool_call>{{ messages }}") is None                      # no tools variable


def test_tool_messages_are_checked():
    from coe.errors import InvalidRequestError
    from coe.serving.engines.tokens import template_messages
    from coe.types import ChatMessage

    good = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    out = template_messages([ChatMessage(role="assistant", content=None, tool_calls=[good]),
                             ChatMessage(role="tool", content="sunny", tool_call_id="call_1")])
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"} and out[0]["content"] == ""
    assert out[1] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    for bad in ({"function": {"arguments": "{}"}}, {"function": {"name": "f", "arguments": "not json"}},
                {"function": {"name": "f", "arguments": "[1]"}}, "call"):
        with pytest.raises(InvalidRequestError, match=r"messages\[0\]\.tool_calls\[0\]"):
            template_messages([ChatMessage(role="assistant", content="", tool_calls=[bad])])


# ------------------------------------------------------------------ through the API (scripted engine)

SCRIPTS = {  # the last user message -> what the scripted model answers
    "weather in paris?": f"Let me check.\n{CALL}",
    "two things": f"{CALL}\n{CALL2}",
    "broken": BAD,
    "bare": BARE,
}
PROMPTS: list[str] = []  # the prompts the scripted engine saw, as text


def _scripted_engine_cls():
    from coe.serving.engines.hf import HFEngine
    from coe.types import StreamDelta

    class ScriptedEngine(HFEngine):
        """The real engine's prompt encoding, then a scripted answer in 3-character deltas (tags
        split across deltas)."""

        async def stream(self, request):
            prompt = self.prompt_ids(request)
            PROMPTS.append(self._tokenizer.decode(prompt))
            text = SCRIPTS.get(request.request.messages[-1].text(), "no tools needed")
            pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
            for k, piece in enumerate(pieces):
                last = k == len(pieces) - 1
                yield StreamDelta(text=piece, token_ids=[0], finish_reason="stop" if last else None,
                                  prompt_tokens=len(prompt), completion_tokens=k + 1)

    return ScriptedEngine


@pytest.fixture(scope="module")
def h(loop_thread, tmp_path_factory, qwen_dir):
    from coe.config import parse_config

    root = tmp_path_factory.mktemp("tools-api")
    plain = make_byte_level_llama(root / "plain")
    hermes = root / "hermes"
    shutil.copytree(plain, hermes)
    shutil.copy(qwen_dir / "chat_template.jinja", hermes / "chat_template.jinja")  # Qwen2.5's template
    model_config = json.loads((hermes / "config.json").read_text())  # room for the tools prompt, in bytes
    (hermes / "config.json").write_text(json.dumps({**model_config, "max_position_embeddings": 2048}))
    experts = [{"id": eid, "kind": "model", "model": str(folder), "engine": {"kind": "hf", "max_model_len": size},
                "description": eid, "resources": {"num_cpus": 0.25}}
               for eid, folder, size in (("plain", plain, 512), ("hermes", hermes, 2048))]
    config = {"router": {"name": "centroid", "default_expert": "plain"}, "experts": experts,
              "serving": {"registry_path": str(root / "registry.sqlite"), "max_tokens_limit": 256,
                          "max_tokens_default": 8, "ingress": {"num_cpus": 0.25}}}
    scripted = _scripted_engine_cls()
    harness = Harness(loop_thread, parse_config(config), root, default="plain",
                      engine_cls_for=lambda spec: scripted if spec.host.id.startswith("hermes") else None)
    yield harness
    harness.close()


def _events(r) -> list[dict]:
    assert r.status_code == 200, r.text
    assert r.text.endswith("data: [DONE]\n\n")
    return [json.loads(ln.removeprefix("data: ")) for ln in r.text.split("\n\n") if ln and ln != "data: [DONE]"]


def test_a_tool_call_answer(h):
    PROMPTS.clear()
    r = h.chat("weather in paris?", model="hermes", tools=[WEATHER])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me check."
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert "<tools>" in PROMPTS[-1] and '"name": "get_weather"' in PROMPTS[-1]  # the tools were rendered


def test_only_calls_give_null_content_and_plain_answers_are_unchanged(h):
    r = h.chat("two things", model="hermes", tools=[WEATHER])
    message = r.json()["choices"][0]["message"]
    assert message["content"] is None and [c["function"]["name"] for c in message["tool_calls"]] == \
        ["get_weather", "get_time"]
    r = h.chat("hello", model="hermes", tools=[WEATHER])
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "no tools needed", "tool_calls": None}
    assert choice["finish_reason"] == "stop"


def test_malformed_call_is_plain_content(h):
    r = h.chat("broken", model="hermes", tools=[WEATHER])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == BAD and choice["message"]["tool_calls"] is None
    assert choice["finish_reason"] == "stop"


def test_streamed_tool_calls(h):
    chunks = _events(h.chat("weather in paris?", model="hermes", tools=[WEATHER], stream=True,
                            stream_options={"include_usage": True}))
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    text = "".join(d["delta"].get("content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls", [])]
    assert text == "Let me check." and deltas[-1]["finish_reason"] == "tool_calls"
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert chunks[-1]["usage"]["completion_tokens"] > 0

    deltas = [c["choices"][0] for c in _events(h.chat("two things", model="hermes", tools=[WEATHER], stream=True))
              if c["choices"]]
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "get_weather"), (1, "get_time")]
    assert not any(d["delta"].get("content") for d in deltas)


def test_a_bare_call_object_plain_and_streamed(h):
    r = h.chat("bare", model="hermes", tools=[WEATHER])
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    deltas = [c["choices"][0] for c in _events(h.chat("bare", model="hermes", tools=[WEATHER], stream=True))
              if c["choices"]]
    assert [tc["function"]["name"] for d in deltas for tc in d["delta"].get("tool_calls", [])] == ["get_weather"]
    assert deltas[-1]["finish_reason"] == "tool_calls" and not any(d["delta"].get("content") for d in deltas)


def test_streamed_malformed_call_is_content(h):
    deltas = [c["choices"][0] for c in _events(h.chat("broken", model="hermes", tools=[WEATHER], stream=True))
              if c["choices"]]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == BAD
    assert deltas[-1]["finish_reason"] == "stop" and not any(d["delta"].get("tool_calls") for d in deltas)


def test_routed_request_goes_to_a_tool_capable_expert(h):
    r = h.chat("weather in paris?", tools=[WEATHER])  # the router picks 'plain', which cannot
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "hermes" and body["coe"]["fallback_from"] == "plain"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    r = h.chat("weather in paris?", tools=[WEATHER], stream=True)
    assert r.status_code == 200 and r.headers["x-coe-expert"] == "hermes"
    r = h.chat("weather in paris?")  # no tools: the router's choice stands
    assert r.json()["model"] == "plain"


def test_pinned_expert_without_tools_is_a_400(h):
    r = h.chat("weather in paris?", model="plain", tools=[WEATHER])
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "'plain'" in error_of(r) and "does not support tools" in error_of(r)


def test_tool_choice(h):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}, "sometimes"):
        r = h.chat("weather in paris?", model="hermes", tools=[WEATHER], tool_choice=choice)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
        assert "'auto'" in error_of(r) and "'none'" in error_of(r)
    r = h.chat("weather in paris?", model="hermes", tools=[WEATHER], tool_choice="auto")
    assert r.json()["choices"][0]["finish_reason"] == "tool_calls"
    PROMPTS.clear()
    r = h.chat("weather in paris?", model="hermes", tools=[WEATHER], tool_choice="none")
    choice = r.json()["choices"][0]  # not rendered, not parsed: the text as the model wrote it
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == SCRIPTS["weather in paris?"]
    assert "<tools>" not in PROMPTS[-1]


def test_bad_tools_are_a_400_naming_tools(h):
    for tools in ([{"type": "function"}], [{"type": "retrieval", "function": {"name": "f"}}],
                  [{"type": "function", "function": {"name": "has space"}}],
                  [{"type": "function", "function": {"name": "f", "parameters": "nope"}}]):
        r = h.chat("weather in paris?", model="hermes", tools=tools)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


def test_a_conversation_with_tool_results(h):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "weather in paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"}]
    PROMPTS.clear()
    r = h.request("POST", "/v1/chat/completions", json={"model": "hermes", "messages": messages,
                                                        "tools": [WEATHER], "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in PROMPTS[-1]
    assert "<tool_response>\n22 C and sunny\n</tool_response>" in PROMPTS[-1]
    messages[1]["tool_calls"] = [{**call, "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]
    r = h.request("POST", "/v1/chat/completions", json={"model": "hermes", "messages": messages,
                                                        "tools": [WEATHER], "max_tokens": 8})
    assert r.status_code == 400 and "messages[1].tool_calls[0]" in error_of(r), r.text


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_qwen_calls_the_weather_tool(loop_thread, tmp_path_factory, qwen_dir):
    """Qwen2.5-Coder-0.5B-Instruct on the transformers engine, greedy: the weather question with a
    get_weather(city) tool comes back as a call of get_weather naming the city."""
    from coe.config import parse_config

    root = tmp_path_factory.mktemp("tools-qwen")
    config = {"router": {"name": "centroid", "default_expert": "qwen"},
              "experts": [{"id": "qwen", "kind": "model", "model": str(qwen_dir),
                           "engine": {"kind": "hf", "max_model_len": 1024}, "description": "code",
                           "resources": {"num_cpus": 0.25}}],
              "serving": {"registry_path": str(root / "registry.sqlite"), "max_tokens_limit": 64,
                          "ingress": {"num_cpus": 0.25}}}
    h = Harness(loop_thread, parse_config(config), root, default="qwen")
    try:
        r = h.chat("What is the weather like in Paris right now?", model="qwen", tools=[WEATHER], max_tokens=64)
    finally:
        h.close()
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert "paris" in json.loads(call["function"]["arguments"]).get("city", "").lower(), call
