"""``tools`` / ``tool_choice``: OpenAI function calling, served by experts whose chat template takes
tools in a family coe parses; refused otherwise with a 400 naming the expert.

Capability: a chat template takes tools when its text uses the ``tools`` variable that transformers'
``apply_chat_template(..., tools=...)`` passes (:func:`template_takes_tools`), and coe serves them
when a parser registered in :data:`TOOL_CALL_PARSERS` (``@register_tool_parser``) recognises the
template's family. One family is registered, ``hermes`` (:class:`HermesToolCalls`): templates that
write ``<tool_call>`` (Hermes 2 Pro, Qwen2.5 and its Coder models): the tools are rendered in the
system prompt, and the model answers a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
Of the built-in models, Qwen2.5-Coder-0.5B-Instruct takes tools; SmolLM2-135M-Instruct and
gemma-3-270m-it do not.

What a client gets, as vLLM's OpenAI server with its ``hermes`` parser:

- The request's ``tools`` are rendered by the template; an assistant message's ``tool_calls`` and
  ``tool`` messages (``tool_call_id``) are rendered as the template writes them
  (``coe.serving.engines.tokens.template_messages``).
- Each well-formed call becomes ``tool_calls[]`` (``id``, ``type: "function"``, ``function.name``,
  ``function.arguments`` as a JSON string); the text outside the calls is ``content`` (null when
  there is none; whitespace next to a call is dropped); ``finish_reason`` is ``"tool_calls"`` when
  the model called a tool and stopped by itself (a length cut stays ``"length"``). A block whose
  JSON does not parse (or has no name, or arguments that are not an object) stays in ``content``
  as text, tags included: a model's bad call is never a 5xx. A final call left open at the end of
  the answer counts when its JSON parses. Qwen2.5's small models often drop the tags when they
  call (Qwen2.5-Coder-0.5B-Instruct answers the bare ``{"name": ..., "arguments": ...}``): an
  answer that is nothing but such objects, each with ``arguments`` and naming one of the
  request's tools, is read as calls too (vLLM's ``hermes`` parser leaves it as content).
- Streamed, text outside the calls streams as it comes (a possible partial ``<tool_call>`` tag and
  trailing whitespace are held back until the next text decides them); a call is buffered and
  sent whole, once its closing tag arrives, as ``delta.tool_calls[{index, id, type, function}]``.
  An answer that opens with ``{`` is held back until its first object is whole (or the answer
  ends) and it is clear whether it is bare calls.
  The streamed and the whole answer are the same parse (:func:`parse_tool_calls` is one feed).
- ``tool_choice``: ``"auto"`` (or left out) and ``"none"`` (tools are not rendered and the answer
  is plain text, as OpenAI's ``none`` promises; accepted with any expert). ``"required"`` and a
  named function (``{"type": "function", "function": {"name": ...}}``) get a 400 naming
  ``tool_choice``: forcing a call needs guided decoding of the call's JSON, which is not wired
  here, and a 0.5B model does not call reliably unforced.
- A routed request (``model: "coe"``) whose chosen expert cannot serve tools goes to the best
  tool-capable expert by the router's scores (``coe.fallback_from`` names the router's choice); a
  400 naming the chosen expert when no serving expert can. A pinned one gets the 400.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from coe.errors import ConfigError, InvalidRequestError
from coe.plugins import Plugins
from coe.serving.api.models import FunctionCall, ToolCall
from coe.serving.engines.tokens import template_messages

TOOL_CALL_PARSERS: Plugins[type[ToolCallParser]] = Plugins("tool-call parser", error=ConfigError)
"""Template family -> the parser of its models' tool calls."""

ALLOWED_TOOL_CHOICE = "'auto' or 'none'"
_TOOLS_VAR = re.compile(r"\btools\b")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ToolCallParser(Protocol):
    """Splits a model's answer into text and tool calls, incrementally; one per answer, built
    with the names of the request's tools.

    ``feed`` takes the next piece of text and returns what is decided so far, in order: ``str``
    pieces of content and :class:`ToolCall` s; ``finish`` returns the rest at the end."""

    def __init__(self, names: Iterable[str] = ()) -> None: ...

    @classmethod
    def detects(cls, template: str) -> bool:
        """Whether ``template`` (a chat template that takes tools) is of this parser's family."""

    def feed(self, text: str) -> list[str | ToolCall]: ...

    def finish(self) -> list[str | ToolCall]: ...


def register_tool_parser(family: str) -> Callable[[type], type]:
    """Class decorator: parse the tool calls of templates of ``family`` (refuses a second class)."""
    return TOOL_CALL_PARSERS.register(family)


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders the ``tools`` that ``apply_chat_template(tools=...)`` passes."""
    return bool(template) and _TOOLS_VAR.search(template) is not None


def parser_for(template: str | None) -> type[ToolCallParser] | None:
    """The parser of a template's tool calls; None when it does not take tools or no family matches."""
    if not template_takes_tools(template):
        return None
    return next((p for p in map(TOOL_CALL_PARSERS.get, TOOL_CALL_PARSERS.names()) if p.detects(template)), None)


@functools.lru_cache(maxsize=64)
def model_chat_template(model_ref: str) -> str | None:
    """The chat template of a model reachable from here (a built-in alias or a local folder:
    ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``); None when unknown."""
    from coe.model_paths import resolve

    try:
        folder = Path(resolve(model_ref))
    except Exception:  # noqa: BLE001  (not prepared, not a folder: unknown here)
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
        return template if isinstance(template, str) else None
    return None


def asks_for_tools(req) -> bool:
    """Whether a chat request wants the model to (be able to) call tools: ``tools`` given and
    ``tool_choice`` not ``"none"``. 400 naming ``tool_choice`` when it names tools without ``tools``."""
    tools = getattr(req, "tools", None) or []
    choice = getattr(req, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequestError(f"tool_choice is {choice!r} but no tools are given; allowed without tools: "
                                      "'none' or leave it out", param="tool_choice")
        return False
    return choice != "none"


def check_tools(tools: list) -> None:
    """400 naming ``tools`` unless each is ``{type: 'function', function: {name, description?, parameters?}}``
    (a name of 1 to 64 letters, digits, '_', '.' or '-'; parameters a JSON schema object)."""
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not _NAME.match(name) or \
                not isinstance(function.get("parameters", {}), dict):
            raise InvalidRequestError(
                f"tools[{i}] must be {{type: 'function', function: {{name, description, parameters}}}} with a name "
                "of 1 to 64 letters, digits, '_', '.' or '-' and parameters a JSON schema object", param="tools")


def tools_for(req, info, *, model_ref: Callable[[str], str | None],
              ranked: Callable[[], list[str]]) -> Callable[[], ToolCallParser] | None:
    """A factory of parsers of ``req``'s tool calls on ``info.expert`` (one parser per answer, bound
    to the request's tool names); None when the request does not ask for tools
    (:func:`asks_for_tools`). Checks the messages' ``tool_calls`` and the ``tools`` (400 naming
    them). A routed request whose expert cannot serve tools moves to the first of
    ``ranked()`` that can (``info.expert`` set, ``info.fallback_from`` the router's choice).
    Raises a 400 naming ``tools`` and the expert when none can (or it is pinned), and naming
    ``tool_choice`` for ``'required'`` or a named function."""
    template_messages(req.messages)  # malformed tool_calls: a 400 here, not on the expert's server
    if not asks_for_tools(req):
        return None
    check_tools(req.tools)
    parser = _parser_of(info.expert, model_ref)
    if parser is None and not info.pinned:
        capable = next((e for e in ranked() if e != info.expert and _parser_of(e, model_ref) is not None), None)
        if capable is not None:
            info.fallback_from, info.expert = info.expert, capable
            parser = _parser_of(capable, model_ref)
    if parser is None:
        _refuse(info, model_ref(info.expert))
    if req.tool_choice not in (None, "auto"):
        what = "a named function" if isinstance(req.tool_choice, dict) else repr(req.tool_choice)
        raise InvalidRequestError(
            f"tool_choice {what} is not supported (coe cannot force a tool call); allowed: {ALLOWED_TOOL_CHOICE}",
            param="tool_choice")
    return functools.partial(parser, [tool["function"]["name"] for tool in req.tools])


def _parser_of(expert_id: str, model_ref: Callable[[str], str | None]) -> type[ToolCallParser] | None:
    ref = model_ref(expert_id)
    return parser_for(model_chat_template(ref)) if ref else None


def _refuse(info, model_ref: str | None) -> None:
    model = f" (model {model_ref})" if model_ref else ""
    if template_takes_tools(model_chat_template(model_ref) if model_ref else None):
        why = f"its chat template{model} takes tools, but coe has no parser for its tool-call output"
    else:
        why = f"its chat template{model} does not support tools"
    also = "" if info.pinned else " (nor does any other serving expert)"
    raise InvalidRequestError(
        f"tools are not supported by expert {info.expert!r}: {why}{also}; leave tools out or send tool_choice: "
        "'none'", param="tools")


def parse_tool_calls(parser: Callable[[], ToolCallParser], text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a whole answer; content is None when the answer is only calls."""
    p = parser()
    pieces = p.feed(text) + p.finish()
    calls = [x for x in pieces if isinstance(x, ToolCall)]
    content = "".join(x for x in pieces if isinstance(x, str))
    return (content or None) if calls else content, calls


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_of(body: str) -> ToolCall | None:
    """The call a ``{"name": ..., "arguments": {...}}`` body holds; None when it is malformed (not
    JSON, no string name, arguments not an object or a string holding one)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(id=new_call_id(), function=FunctionCall(name=obj["name"],
                                                            arguments=json.dumps(args, ensure_ascii=False)))


def bare_calls(text: str, names: frozenset[str]) -> list[ToolCall] | None:
    """The calls of an answer that is only call objects without tags (whitespace between them),
    each with a ``name`` among ``names`` and an ``arguments`` key; None when it is anything else.
    Qwen2.5's small models often drop the tags when they call (Qwen2.5-Coder-0.5B-Instruct does)."""
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while True:
        pos = len(text) - len(text[pos:].lstrip())
        if pos == len(text):
            return calls or None
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in names or "arguments" not in obj:
            return None
        call = call_of(json.dumps(obj))
        if call is None:
            return None
        calls.append(call)


def _not_bare(head: str, names: frozenset[str]) -> bool:
    """Whether an answer opening with ``head`` (``{`` first) is decided not to be bare calls: its
    first object is whole and is not a call of one of ``names``."""
    try:
        _, end = json.JSONDecoder().raw_decode(head)
    except ValueError:  # not whole yet (or never will be: then the end of the answer decides)
        return False
    return bare_calls(head[:end], names) is None


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (a tag that may be arriving)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


@register_tool_parser("hermes")
class HermesToolCalls:
    """Hermes-style calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (JSON
    between the tags, any whitespace around it), and, given the request's tool ``names``, an answer
    that is nothing but bare call objects naming those tools (:func:`bare_calls`). Not
    thread-safe; one per answer."""

    START, END = "<tool_call>", "</tool_call>"

    @classmethod
    def detects(cls, template: str) -> bool:
        return cls.START in template

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._names = frozenset(names)
        self._head = ""        # the answer so far while it may be bare calls
        self._bare: bool | None = None if self._names else False  # None: undecided (only whitespace yet)
        self._buf = ""         # text not decided yet: a partial start tag, or an open call's body
        self._in_call = False
        self._ws = ""          # whitespace held back: dropped if a call follows
        self._after_call = False  # the last thing decided was a call: drop the whitespace after it

    def feed(self, text: str) -> list[str | ToolCall]:
        if self._bare is False:
            return self._feed(text)
        self._head += text
        head = self._head.lstrip()
        if self._bare is None and head:
            self._bare = head.startswith("{")
        if self._bare is None or (self._bare and not _not_bare(head, self._names)):
            return []
        self._bare, text, self._head = False, self._head, ""
        return self._feed(text)

    def finish(self) -> list[str | ToolCall]:
        if self._bare is not False:
            calls = bare_calls(self._head, self._names) if self._bare else None
            if calls is not None:
                return list(calls)
            self._bare, text, self._head = False, self._head, ""
            return self._feed(text) + self._finish()
        return self._finish()

    def _feed(self, text: str) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        self._buf += text
        while True:
            if self._in_call:
                end = self._buf.find(self.END)
                if end < 0:
                    return out
                body, self._buf, self._in_call = self._buf[:end], self._buf[end + len(self.END):], False
                self._decided_call(body, self.END, out)
                continue
            start = self._buf.find(self.START)
            if start < 0:
                keep = _partial_tag(self._buf, self.START)
                text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                self._text(text, out)
                return out
            text, self._buf, self._in_call = self._buf[:start], self._buf[start + len(self.START):], True
            self._text(text, out)

    def _finish(self) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        if self._in_call:  # an unclosed final call: a call when its JSON is whole
            self._decided_call(self._buf, "", out)
        else:
            self._text(self._buf, out)
        self._buf, self._in_call = "", False
        if self._ws:
            out.append(self._ws)
            self._ws = ""
        return out

    def _decided_call(self, body: str, end: str, out: list) -> None:
        call = call_of(body)
        if call is None:  # malformed: the block is text, tags included
            self._text(self.START + body + end, out)
            return
        self._ws, self._after_call = "", True
        out.append(call)

    def _text(self, text: str, out: list) -> None:
        if self._after_call:
            stripped = text.lstrip()
            if not stripped:
                return
            text, self._after_call = stripped, False
        text = self._ws + text
        decided = text.rstrip()
        self._ws = text[len(decided):]  # trailing whitespace waits: dropped if a call follows
        if decided:
            out.append(decided)
